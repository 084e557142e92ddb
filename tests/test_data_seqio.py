"""seqio Tasks / Mixtures (TensorFlow): TFDS via tfds.testing.mock_data, local files, the offline
defaults, MQAR, the seqio vocabulary adapters, and the seqio pipeline's exact resume.

All TensorFlow-using tests live in this one file (TensorFlow's import is slow).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")
tfds = pytest.importorskip("tensorflow_datasets")

from taipan_jax.data import ByteVocabulary, corpora, mqar  # noqa: E402
from taipan_jax.data import seqio_tasks as st  # noqa: E402
from taipan_jax.data.packing import StreamPacker  # noqa: E402
from taipan_jax.data.streams import build_streams  # noqa: E402
from taipan_jax.data.vocab import get_vocabulary  # noqa: E402

BYTES = ByteVocabulary()
C4 = "tfds:c4/en:3.1.0;field=text"


def _config(**data):
    from configs import tiny

    c = tiny.get_config()
    c.data.pipeline = "seqio"
    c.data.seq_len = 32
    c.train.global_batch_size, c.train.eval_batch_size, c.train.eval_batches = 4, 2, 1
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def _docs(task, **kw):
    return [d.tolist() for d in st.task_documents(task, "train", **kw)]


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=24):
        task = st.register_task("c4", C4, BYTES, seq_len=32)
        assert isinstance(task.source, seqio.TfdsDataSource)
        docs = _docs(task, shuffle=False, seed=0)
        assert len(docs) == 24 and all(min(d) >= 3 for d in docs)
        # Each process reads its own shard; together they are the whole split, without overlap.
        shards = [_docs(task, shuffle=False, seed=0, process_index=i, process_count=2) for i in range(2)]
        assert sorted(map(tuple, shards[0] + shards[1])) == sorted(map(tuple, docs))
        assert not set(map(tuple, shards[0])) & set(map(tuple, shards[1]))
        # Shuffled epochs are deterministic per (seed, epoch) and differ between epochs.
        e0 = _docs(task, shuffle=True, seed=5)
        assert e0 == _docs(task, shuffle=True, seed=5) and e0 != _docs(task, shuffle=True, seed=5, epoch=1)
        # A missing text field is named with the fields that exist.
        bad = st.register_task("c4_bad", "tfds:c4/en:3.1.0;field=txt", BYTES, seq_len=32)
        with pytest.raises(KeyError, match=r"missing text field 'txt' \(the examples have \[.*'text'"):
            _docs(bad, shuffle=False, seed=0)
        # The trainer's seqio pipeline over TFDS: packed rows, resumable.
        c = _config(train_corpus="c4", heldout_corpus="c4", tasks={"c4": C4})
        stream, held = build_streams(c.data, c.train, BYTES, model_vocab_size=259)
        want = [stream.batch(s) for s in range(4)]
        assert want[0]["segment_ids"].shape == (4, 32) and want[0]["weights"].all()
        fresh, _ = build_streams(c.data, c.train, BYTES, model_vocab_size=259)
        for k in want[3]:
            np.testing.assert_array_equal(fresh.batch(3)[k], want[3][k])
        local, full = next(iter(held))
        assert full["weights"].sum() > 0


def test_seqio_tasks_for_offline_defaults_and_local_files(tmp_path):
    for name, docs_fn in (("shakespeare", corpora.shakespeare_documents), ("kjv", corpora.kjv_documents)):
        task = st.register_task(name, name, BYTES, seq_len=32)
        got = _docs(task, shuffle=False, seed=0)
        assert len(got) == len(docs_fn())
        assert got[0] == BYTES.encode(docs_fn()[0]).tolist()
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i} é"}) for i in range(5)))
    task = st.register_task("mine", f"files:{tmp_path}/*.jsonl;field=body", BYTES, seq_len=32)
    assert [BYTES.decode(d) for d in st.task_documents(task, "train", shuffle=False, seed=0)] == [
        f"doc {i} é" for i in range(5)]
    with pytest.raises(FileNotFoundError, match="matches no files"):
        st.register_task("none", f"files:{tmp_path}/*.txt", BYTES, seq_len=32)
    missing = st.register_task("missing", f"files:{tmp_path}/*.jsonl", BYTES, seq_len=32)
    with pytest.raises(Exception, match="missing jsonl field 'text'"):
        _docs(missing, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="unknown task spec"):
        st.register_task("x", "hub:c4", BYTES, seq_len=32)


def test_seqio_pipeline_with_a_mixture_resumes_exactly():
    c = _config(train_corpus="mix", heldout_corpus="kjv", mixtures={"mix": "shakespeare:3,kjv:1"})
    stream, held = build_streams(c.data, c.train, BYTES, model_vocab_size=259)
    assert isinstance(stream, StreamPacker)
    assert st.task_name("mix") in seqio.MixtureRegistry.names()
    want = [stream.batch(s) for s in range(3)]
    fresh, _ = build_streams(c.data, c.train, BYTES, model_vocab_size=259)
    for k in want[2]:
        np.testing.assert_array_equal(fresh.batch(2)[k], want[2][k])
    local, full = next(iter(held))  # held-out: the first KJV book, in order
    assert BYTES.decode(full["targets"][0][full["weights"][0] > 0]).startswith("Genesis 1:1\tIn the beginning")
    with pytest.raises(ValueError, match="token id .* is outside the vocabulary"):
        build_streams(c.data, c.train, BYTES, model_vocab_size=100)[0].batch(0)


def test_mqar_seqio_task_matches_the_numpy_generator():
    task = st.register_task("mqar", "mqar;vocab_size=32;num_pairs=3;num_queries=2;num_examples=5", BYTES, seq_len=24)
    ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False, seed=3, trim_output_features=False)
    exs = list(ds.as_numpy_iterator())
    cfg = mqar.MQARConfig(vocab_size=32, num_pairs=3, num_queries=2, seq_len=24)
    assert len(exs) == 5
    for i, ex in enumerate(exs):
        ref = mqar.mqar_example(cfg, 3, i, "validation")
        np.testing.assert_array_equal(ex["targets"], ref["tokens"])
        mqar.check_example(ex["targets"], ex["answer"], cfg)
    assert task.metric_fns == [mqar.mqar_metric]


def _tf_encode(voc, text):
    return voc.encode_tf(tf.constant(text)).numpy().tolist()


def test_seqio_vocabulary_adapters(tmp_path):
    texts = ["Héllo, wörld — ✓", "the thing", "日本"]
    sv = st.seqio_vocabulary(BYTES)
    assert isinstance(sv, seqio.ByteVocabulary)
    for t in texts:
        assert _tf_encode(sv, t) == BYTES.encode(t).tolist()
    # SentencePiece: seqio's own class over our trained model gives our ids.
    from taipan_jax.data.train_spm import train_spm

    (tmp_path / "c.txt").write_text("\n".join(texts * 30))
    spm = get_vocabulary(f"spm:{train_spm(f'files:{tmp_path}/c.txt', str(tmp_path / 'spm'), 300)}")
    sv = st.seqio_vocabulary(spm)
    assert isinstance(sv, seqio.SentencePieceVocabulary)
    for t in texts:
        assert _tf_encode(sv, t) == spm.encode(t).tolist() and sv.decode(spm.encode(t).tolist()) == t
    # Hugging Face tokenizer.json through the generic adapter (encode_tf / decode_tf).
    from test_data import _hf_tokenizer_json

    hf = get_vocabulary(f"hf:{_hf_tokenizer_json(tmp_path / 'tokenizer.json', texts * 20)}")
    sv = st.seqio_vocabulary(hf)
    assert isinstance(sv, seqio.Vocabulary) and sv.vocab_size == hf.vocab_size and sv.eos_id == hf.eos_id
    for t in texts:
        ids = _tf_encode(sv, t)
        assert ids == hf.encode(t).tolist() and sv.decode(ids) == t
        assert sv.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == t
    assert sv == st.seqio_vocabulary(hf)
    # A seqio Task with the adapter tokenizes with it.
    task = st.register_task("hf_files", f"files:{tmp_path}/c.txt", hf, seq_len=32)
    assert _docs(task, shuffle=False, seed=0)[0] == hf.encode("\n".join(texts * 30)).tolist()
