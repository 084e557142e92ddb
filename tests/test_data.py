"""Data without TensorFlow: corpora and local files, vocabularies, packing, streams, resume, MQAR, errors."""

import json
import logging

import numpy as np
import pytest

from taipan_jax.data import (
    ByteVocabulary,
    HeldoutWindows,
    PackedStream,
    RandomWindowStream,
    StreamPacker,
    TokenizedDocs,
    kjv_documents,
    kjv_text,
    load_corpus,
    load_documents,
    pack_documents,
    shakespeare_documents,
    shakespeare_text,
)
from taipan_jax.data import mqar
from taipan_jax.data.packing import PackedHeldout, RepeatingDocs, mix_documents
from taipan_jax.data.vocab import get_vocabulary

TEXTS = ["Héllo, wörld — ✓\n", "The quick brown fox jumps over the lazy dog.", "日本語のテキスト", "a", ""]


# -- corpora and local files ------------------------------------------------------------------------
def test_offline_corpora_are_real_text():
    s, k = shakespeare_text(), kjv_text()
    assert len(s) > 4_000_000 and "ROMEO" in s and "**" not in s
    assert len(k) > 4_000_000 and k.startswith("Genesis 1:1\tIn the beginning God created")
    # Held-out text is not training text.
    assert "In the beginning God created the heaven" not in s
    # Documents: one per play / one per book.
    assert len(shakespeare_documents()) == 38 and len(kjv_documents()) == 66
    assert kjv_documents()[-1].startswith("Revelation 1:1\t")
    assert load_documents("kjv")[0] == kjv_documents()[0]


def test_local_files_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two", "body": "zwei"}) + "\n")
    assert load_corpus(f"files:{tmp_path}/*.txt") == "alpha\n\nbeta"
    assert load_documents(f"files:{tmp_path}/*.txt") == ["alpha", "beta"]
    assert load_documents(f"files:{tmp_path}/**/*.jsonl") == ["one", "two"]
    with pytest.raises(KeyError, match=r"c.jsonl:1: missing jsonl field 'body' \(record has \['id', 'text'\]\)"):
        load_documents(f"files:{tmp_path}/sub/*.jsonl;field=body")


def test_bad_input_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_corpus(f"files:{tmp_path}/*.md")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_documents(f"files:{tmp_path}/empty.txt")
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        load_documents(f"files:{tmp_path}/bad.jsonl")
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("c4")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['feild'\]"):
        load_documents(f"files:{tmp_path}/*.txt;feild=x")
    # Token ids >= the model's vocabulary.
    docs = TokenizedDocs.from_arrays([np.array([3, 300])], name="tiny")
    with pytest.raises(ValueError, match=r"tiny: token id 300 is outside the vocabulary \[0, 259\)"):
        PackedStream(docs, seq_len=4, global_batch_size=1, seed=0, bos_id=0, eos_id=1, vocab_size=259)
    bad = RepeatingDocs("stream", lambda epoch: iter([np.array([5, 999])]), vocab_size=259)
    with pytest.raises(ValueError, match="token id 999 is outside the vocabulary"):
        next(iter(bad))


def test_undecodable_bytes_policy(tmp_path, caplog):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ok".encode("latin-1") + b"\xff\xfe")
    with caplog.at_level(logging.WARNING, logger="taipan_jax.data"):
        docs = load_documents(f"files:{tmp_path}/latin1.txt")
    assert docs == ["caf\ufffd ok\ufffd\ufffd"]
    assert "3 undecodable byte(s) replaced by U+FFFD" in caplog.text
    with pytest.raises(ValueError, match=r"latin1.txt: invalid UTF-8 at byte 3"):
        load_documents(f"files:{tmp_path}/latin1.txt", decode_errors="strict")
    # Output side: token sequences that are not valid UTF-8 decode with U+FFFD, never raise.
    assert ByteVocabulary().decode(np.array([0xFF + 3])) == "\ufffd"


# -- vocabularies ---------------------------------------------------------------------------------
def test_byte_vocabulary_round_trip_and_policy():
    v = ByteVocabulary()
    text = "Héllo, wörld — ✓\n"
    ids = v.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < 259
    assert v.decode(ids) == text
    assert v.decode(np.array([v.eos_id, *ids, v.pad_id])) == text  # specials are dropped
    with pytest.raises(ValueError, match="out of range"):
        v.decode(np.array([259]))
    assert v.bytes_per_token(np.array([0, 1, 2, 3, 258])).tolist() == [0, 0, 0, 1, 1]
    assert get_vocabulary("bytes") is get_vocabulary("bytes")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [f"{t} Line number {i} of a tiny corpus, with some words repeated." for i, t in enumerate(TEXTS * 8)]
    (d / "corpus.txt").write_text("\n".join(lines))
    return d


def test_sentencepiece_trained_on_a_tiny_corpus_round_trips(tiny_corpus):
    from taipan_jax.data.train_spm import train_spm

    path = train_spm(f"files:{tiny_corpus}/corpus.txt", str(tiny_corpus / "spm"), 320)
    v = get_vocabulary(f"spm:{path}")
    assert (v.pad_id, v.eos_id, v.unk_id, v.bos_id) == (0, 1, 2, 0)
    for t in TEXTS + ["unseen ✗ ñ 🙂"]:  # byte fallback: unseen characters round-trip too
        ids = v.encode(t)
        assert ids.dtype == np.int32 and (ids < v.vocab_size).all()
        assert v.decode(ids) == t
        assert int(v.bytes_per_token(ids).sum()) == len(t.encode())  # for bits per byte
    assert v.decode(np.array([v.eos_id, *v.encode("ab")])) == "ab"


def _hf_tokenizer_json(path, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_json_round_trips(tmp_path):
    path = _hf_tokenizer_json(tmp_path / "tokenizer.json", TEXTS * 20)
    v = get_vocabulary(f"hf:{path}")
    assert v.eos_id == 0 and v.pad_id == 1 and v.bos_id == 0
    for t in TEXTS + ["unseen ✗ ñ 🙂"]:
        ids = v.encode(t)
        assert v.decode(ids) == t
        assert int(v.bytes_per_token(ids).sum()) == len(t.encode())  # byte-level BPE: exact
    assert v.bytes_per_token(np.array([v.eos_id])).tolist() == [0]
    assert v.encode_batch(["ab", "c"])[1].tolist() == v.encode("c").tolist()
    with pytest.raises(ValueError, match="has no eos token '<eos>'"):
        get_vocabulary(f"hf:{path};eos=<eos>")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_vocabulary(f"hf:{tmp_path}/missing.json")


def test_tiktoken_file_round_trips(tmp_path):
    import base64

    ranks = {bytes([i]): i for i in range(256)}
    for m in [b"th", b"he", b"the", b" t", b" the", b"in", b"ing"]:
        ranks[m] = len(ranks)
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(k).decode()} {r}\n" for k, r in ranks.items()))
    v = get_vocabulary(f"tiktoken:{path}")
    assert v.vocab_size == len(ranks) + 256 and v.eos_id == len(ranks) + 1 and v.bos_id == len(ranks)
    for t in TEXTS + ["the thing <|end_of_text|>"]:
        ids = v.encode(t)
        assert v.decode(ids) == t and (ids < len(ranks)).all()  # special-token text stays text
        assert int(v.bytes_per_token(ids).sum()) == len(t.encode())
    assert v.encode(" the").tolist() == [ranks[b" the"]]
    assert v.decode(np.array([ranks[b"\xe2"]])) == "\ufffd"  # half a character: replaced
    v2 = get_vocabulary(f"tiktoken:{path};special=none;pattern=gpt2")
    assert v2.vocab_size == len(ranks) + 1 and v2.eos_id == len(ranks)
    with pytest.raises(ValueError, match="unknown vocabulary"):
        get_vocabulary("sentencepiece")


# -- packing --------------------------------------------------------------------------------------
def test_pack_documents_layout():
    docs = [np.array([10, 11, 12]), np.array([20]), np.array([30, 31, 32, 33, 34, 35, 36])]
    r = pack_documents(docs, 5, bos_id=0, eos_id=1, pad_id=0)
    assert r["inputs"].tolist() == [[0, 10, 11, 12, 0], [20, 0, 30, 31, 32], [33, 34, 35, 36, 0]]
    assert r["targets"].tolist() == [[10, 11, 12, 1, 20], [1, 30, 31, 32, 33], [34, 35, 36, 1, 0]]
    assert r["segment_ids"].tolist() == [[1, 1, 1, 1, 2], [1, 2, 2, 2, 2], [1, 1, 1, 1, 0]]
    assert r["positions"].tolist() == [[0, 1, 2, 3, 0], [0, 0, 1, 2, 3], [0, 1, 2, 3, 0]]
    assert r["weights"].tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 1, 0]]


def _random_docs(n=50, seed=0, lo=1, hi=40):
    rs = np.random.RandomState(seed)
    return TokenizedDocs.from_arrays([rs.randint(3, 259, size=rs.randint(lo, hi)) for _ in range(n)])


def test_packed_stream_covers_every_document_once_per_epoch():
    docs = _random_docs()
    s = PackedStream(docs, seq_len=16, global_batch_size=4, seed=1, bos_id=0, eos_id=1)
    rows = s.rows(np.arange(s.rows_per_epoch))
    assert rows["weights"].sum() == s.pairs_per_epoch == docs.lengths.sum() + docs.num_docs
    # Reassemble every document from the (shuffled) rows: inputs after BOS up to EOS.
    got = []
    for r in range(rows["inputs"].shape[0]):
        for seg in range(1, rows["segment_ids"][r].max() + 1):
            m = rows["segment_ids"][r] == seg
            got.append((rows["inputs"][r][m], rows["targets"][r][m]))
    # Shifted by one inside each segment, and the pairs of all documents are all there.
    for inp, tgt in got:
        np.testing.assert_array_equal(inp[1:], tgt[:-1])
    n_eos = sum(int((t == 1).sum()) for _, t in got)
    assert n_eos == docs.num_docs
    all_targets = np.sort(np.concatenate([t for _, t in got]))
    np.testing.assert_array_equal(all_targets, np.sort(np.concatenate([docs.tokens, np.ones(docs.num_docs, np.int32)])))


def test_packed_stream_is_a_pure_function_of_seed_and_step(caplog):
    docs = _random_docs()
    a = PackedStream(docs, seq_len=16, global_batch_size=4, seed=3, bos_id=0, eos_id=1)
    b = PackedStream(docs, seq_len=16, global_batch_size=4, seed=3, bos_id=0, eos_id=1)
    for k in ("inputs", "targets", "segment_ids", "weights"):
        np.testing.assert_array_equal(a.batch(7)[k], b.batch(7)[k])
    assert not np.array_equal(a.batch(7)["inputs"], a.batch(8)["inputs"])
    # Process p computes rows [p B/P, (p+1) B/P) of the same global batch.
    parts = [PackedStream(docs, seq_len=16, global_batch_size=4, seed=3, bos_id=0, eos_id=1, process_index=i,
                          process_count=2).batch(5) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), a.batch(5)["inputs"])
    # Crossing into the next epoch is logged (data repeats), and never hangs.
    with caplog.at_level(logging.WARNING, logger="taipan_jax.data"):
        a.batch(a.rows_per_epoch // 4 + 1)
    assert "epoch 1 begins (the data repeats" in caplog.text


def test_stream_packer_resumes_exactly_and_logs_repeats(caplog):
    docs = _random_docs(n=12)
    factory = lambda epoch: (docs[i] for i in np.random.default_rng([0, epoch]).permutation(docs.num_docs))  # noqa: E731
    make = lambda: iter(RepeatingDocs("toy", factory))  # noqa: E731
    straight = StreamPacker(make, seq_len=16, local_batch_size=3, bos_id=0, eos_id=1, name="toy")
    with caplog.at_level(logging.WARNING, logger="taipan_jax.data"):
        want = [straight.batch(s) for s in range(12)]
    assert "epoch 1 ended after 12 documents on this process; repeating" in caplog.text
    resumed = StreamPacker(make, seq_len=16, local_batch_size=3, bos_id=0, eos_id=1, name="toy")
    for s in range(7, 12):  # a fresh stream asked for step 7 fast-forwards, then continues
        for k in want[s]:
            np.testing.assert_array_equal(resumed.batch(s)[k], want[s][k])
    np.testing.assert_array_equal(resumed.batch(2)["inputs"], want[2]["inputs"])  # going back replays
    empty = StreamPacker(lambda: iter(RepeatingDocs("none", lambda e: iter([]))), seq_len=4, local_batch_size=1,
                         bos_id=0, eos_id=1)
    with pytest.raises(ValueError, match="shard has no documents"):
        empty.batch(0)


def test_mixture_follows_rates_and_is_deterministic():
    a = RepeatingDocs("a", lambda e: iter([np.array([5])] * 10))
    b = RepeatingDocs("b", lambda e: iter([np.array([6])] * 10))
    it = mix_documents([a, b], [3.0, 1.0], seed=0)
    picks = np.array([int(next(it)[0]) for _ in range(4000)])
    assert abs((picks == 5).mean() - 0.75) < 0.03
    it2 = mix_documents([a, b], [3.0, 1.0], seed=0)
    assert [int(next(it2)[0]) for _ in range(100)] == picks[:100].tolist()
    with pytest.raises(ValueError, match="mixture rates"):
        next(mix_documents([a], [0.0], seed=0))


def test_packed_heldout_pads_uneven_end(caplog):
    docs = TokenizedDocs.from_arrays([np.arange(3, 13)])  # 11 pairs -> 2 rows of 8
    with caplog.at_level(logging.WARNING, logger="taipan_jax.data"):
        h = PackedHeldout(docs, seq_len=8, batch_size=2, num_batches=2, bos_id=0, eos_id=1)
    assert "the last 2 of the 4 evaluated rows are padding" in caplog.text
    batches = list(h)
    assert batches[0][1]["weights"].sum() == 11 and batches[1][1]["weights"].sum() == 0


# -- the random-window stream (the default tiny run) ----------------------------------------------
def test_stream_is_a_pure_function_of_seed_and_step():
    toks = np.arange(10_000, dtype=np.int32)
    a = RandomWindowStream(toks, seq_len=16, global_batch_size=8, seed=3)
    b = RandomWindowStream(toks, seq_len=16, global_batch_size=8, seed=3)
    np.testing.assert_array_equal(a.batch(7)["inputs"], b.batch(7)["inputs"])
    assert not np.array_equal(a.batch(7)["inputs"], a.batch(8)["inputs"])
    batch = a.batch(5)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])  # shifted by one
    parts = [RandomWindowStream(toks, seq_len=16, global_batch_size=8, seed=3, process_index=i, process_count=2).batch(5)
             for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), batch["inputs"])


def test_stream_and_heldout_errors():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        RandomWindowStream(np.arange(10), seq_len=16, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="not divisible by the process count"):
        RandomWindowStream(np.arange(100), seq_len=4, global_batch_size=3, seed=0, process_count=2)
    with pytest.raises(ValueError, match="held-out corpus has 10 tokens"):
        HeldoutWindows(np.arange(10), seq_len=4, batch_size=2, num_batches=2)


def test_heldout_windows_are_contiguous():
    toks = np.arange(100, dtype=np.int32)
    batches = [b for b, _ in HeldoutWindows(toks, seq_len=5, batch_size=2, num_batches=3)]
    assert len(batches) == 3
    flat = np.concatenate([b["inputs"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(flat, np.arange(30))
    np.testing.assert_array_equal(batches[0]["targets"][0], np.arange(1, 6))


# -- build_streams from config --------------------------------------------------------------------
def test_build_streams_from_config(tmp_path):
    from configs import tiny
    from taipan_jax.data.streams import build_streams

    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * (i + 3))
    c = tiny.get_config()
    c.data.seq_len, c.train.global_batch_size, c.train.eval_batches, c.train.eval_batch_size = 32, 4, 1, 2
    c.data.pipeline = "packed"
    c.data.tasks.mine = f"files:{tmp_path}/*.txt"
    c.data.mixtures.both = "mine:1,shakespeare:1"
    c.data.train_corpus, c.data.heldout_corpus = "mine", "kjv"
    v = ByteVocabulary()
    stream, held = build_streams(c.data, c.train, v, model_vocab_size=259)
    assert isinstance(stream, PackedStream) and stream.batch(0)["segment_ids"].shape == (4, 32)
    local, full = next(iter(held))
    assert v.decode(full["targets"][0][full["weights"][0] > 0]).startswith("Genesis 1:1")
    c.data.train_corpus = "both"
    stream, _ = build_streams(c.data, c.train, v, model_vocab_size=259)
    assert isinstance(stream, StreamPacker) and stream.batch(3)["inputs"].shape == (4, 32)
    c.data.train_corpus = "mqar;vocab_size=32;num_pairs=2;num_queries=2"
    stream, held = build_streams(c.data, c.train, v, model_vocab_size=64)
    assert stream.batch(0)["weights"].sum() == 8
    c.data.train_corpus, c.data.pipeline = "mine", "bogus"
    with pytest.raises(ValueError, match="pipeline must be one of"):
        build_streams(c.data, c.train, v, model_vocab_size=259)
    c.data.pipeline = "packed"
    with pytest.raises(ValueError, match="token id .* is outside the vocabulary"):
        build_streams(c.data, c.train, v, model_vocab_size=100)


# -- MQAR -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [mqar.MQARConfig(vocab_size=64, num_pairs=4, num_queries=4, seq_len=32),
                                 mqar.MQARConfig(vocab_size=8192, num_pairs=64, num_queries=16, seq_len=512, power_a=1.0)])
def test_mqar_examples_are_correct_by_construction(cfg):
    for i in range(200 if cfg.seq_len < 100 else 20):
        ex = mqar.mqar_example(cfg, seed=0, index=i)
        assert ex["tokens"].shape == (cfg.seq_len + 1,) and ex["tokens"].min() >= 1
        assert ex["tokens"].max() < cfg.vocab_size
        mqar.check_example(ex["tokens"], ex["answer"], cfg)
    rows = mqar.MQARStream(cfg, global_batch_size=4, seed=0).batch(1)
    np.testing.assert_array_equal(rows["inputs"][0], mqar.mqar_example(cfg, 0, 4)["tokens"][:-1])
    assert (rows["weights"].sum(axis=1) == cfg.num_queries).all()
    # The weighted positions' inputs are keys and their targets are those keys' values.
    assert (rows["inputs"][rows["weights"] > 0] < cfg.vocab_size // 2).all()
    assert (rows["targets"][rows["weights"] > 0] >= cfg.vocab_size // 2).all()
    val = mqar.mqar_example(cfg, 0, 4, split="validation")["tokens"]
    assert not np.array_equal(val, mqar.mqar_example(cfg, 0, 4)["tokens"])


def test_mqar_metric_on_crafted_predictions():
    targets = np.array([[5, 6, 7, 8], [9, 9, 9, 9]])
    weights = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], np.float32)
    preds = np.array([[5, 0, 0, 0], [9, 1, 9, 9]])  # weighted: right, wrong, right, wrong
    assert mqar.mqar_accuracy(preds, targets, weights) == 0.5
    assert mqar.mqar_accuracy(targets, targets, weights) == 1.0
    assert mqar.mqar_metric([np.array([1, 2]), np.array([3])], [np.array([1, 0]), np.array([3])]) == {"accuracy": 2 / 3}
    with pytest.raises(ValueError, match="no MQAR query positions"):
        mqar.mqar_accuracy(preds, targets, np.zeros_like(weights))
    with pytest.raises(ValueError, match="too short"):
        mqar.MQARConfig(vocab_size=64, num_pairs=8, num_queries=8, seq_len=20)
    with pytest.raises(ValueError, match="unknown MQAR option"):
        mqar.MQARConfig.from_options({"pairs": "3"}, 32)
