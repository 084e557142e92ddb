"""seqio Tasks and Mixtures from config (imports TensorFlow and seqio: load it only for seqio data).

Task specs (the same strings as ``config.data.train_corpus`` / ``config.data.tasks.<name>``):

* ``tfds:<name>[:<version>][;split=<split>][;field=<text field>]`` — any TFDS dataset by name
  (``tfds:c4/en:3.0.1;field=text``, ``tfds:pg19;field=book_text``, ``tfds:wikipedia/20230601.en``);
  read from ``config.data.tfds_data_dir`` (or TFDS's default directory), never downloaded here.
* ``files:<glob>[;field=<name>]`` — local ``.txt`` (one document per file) / ``.jsonl`` (one per line).
* ``shakespeare``, ``kjv`` — the offline corpora.
* ``mqar[;vocab_size=..][;num_pairs=..][;num_queries=..][;power_a=..]`` — synthetic MQAR; its
  examples carry ``targets`` (seq_len + 1 tokens) and ``answer`` (1 at the queried values); the
  Task's metric is :func:`taipan_jax.data.mqar.mqar_metric`.

Every text Task yields ``targets`` (token ids, **without** EOS: the packer adds BOS and EOS) and
``targets_pretokenized``. A Mixture is ``"<task>:<rate>,<task>:<rate>"`` over task names.

The vocabulary adapter :func:`seqio_vocabulary` gives seqio's own ``ByteVocabulary`` /
``SentencePieceVocabulary`` for bytes / SentencePiece and wraps a Hugging Face ``tokenizer.json`` or
tiktoken file as a ``seqio.Vocabulary`` (``encode_tf`` / ``decode_tf`` through ``tf.numpy_function``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from taipan_jax.data import corpora, mqar  # noqa: E402
from taipan_jax.data.vocab import ByteVocabulary, SentencePieceVocabulary, parse_spec  # noqa: E402

try:  # TensorFlow must never take the accelerators from JAX.
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):
    pass


class NumpyVocabularyAdapter(seqio.Vocabulary):
    """A ``seqio.Vocabulary`` around one of this package's numpy vocabularies (HF / tiktoken)."""

    def __init__(self, vocab):
        self.vocab = vocab
        super().__init__(extra_ids=0)

    @property
    def eos_id(self):
        return self.vocab.eos_id

    @property
    def unk_id(self):
        return getattr(self.vocab, "unk_id", None)

    @property
    def pad_id(self):
        return self.vocab.pad_id

    @property
    def bos_id(self):
        return self.vocab.bos_id

    @property
    def _base_vocab_size(self):
        return self.vocab.vocab_size

    def _encode(self, s):
        return self.vocab.encode(s).tolist()

    def _decode(self, ids):
        return self.vocab.decode(np.asarray(list(ids), np.int64))

    def _encode_tf(self, s):
        def enc(x):
            x = x.item() if isinstance(x, np.ndarray) else x  # eager calls pass a 0-d array
            return self.vocab.encode(x.decode("utf-8")).astype(np.int32)

        out = tf.numpy_function(enc, [s], tf.int32, stateful=False)
        out.set_shape([None])
        return out

    def _decode_tf(self, ids):
        def dec(x):
            return self.vocab.decode(x[x != self.pad_id] if self.pad_id != self.eos_id else x).encode("utf-8")

        if ids.shape.rank == 1:
            out = tf.numpy_function(dec, [ids], tf.string, stateful=False)
            out.set_shape([])
            return out
        return tf.map_fn(self._decode_tf, ids, fn_output_signature=tf.string)

    def __eq__(self, other):
        return isinstance(other, NumpyVocabularyAdapter) and other.vocab.name == self.vocab.name

    def __hash__(self):
        return hash(self.vocab.name)


def seqio_vocabulary(vocab) -> seqio.Vocabulary:
    if isinstance(vocab, ByteVocabulary):
        return seqio.ByteVocabulary()
    if isinstance(vocab, SentencePieceVocabulary):
        return seqio.SentencePieceVocabulary(vocab.path)
    return NumpyVocabularyAdapter(vocab)


def task_name(name_or_spec: str) -> str:
    """A valid, stable seqio name for a config task name or a raw spec."""
    clean = re.sub(r"[^\w.]", "_", name_or_spec)[:60]
    if clean == name_or_spec:
        return f"taipan.{clean}"
    return f"taipan.{clean}.{hashlib.sha1(name_or_spec.encode()).hexdigest()[:8]}"


def _require_field(field: str, what: str):
    def check(ds):
        spec = ds.element_spec
        if not isinstance(spec, dict) or field not in spec:
            have = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
            raise KeyError(f"{what}: missing text field {field!r} (the examples have {have}); set it with ';field=<name>'")
        return ds

    return check


def _text_dataset(docs_fn, seed_offset: int = 0):
    """A FunctionDataSource dataset_fn over a list of documents (in-memory), shuffled by the seed."""

    def dataset_fn(split, shuffle_files, seed=None):
        del split
        docs = docs_fn()
        order = np.arange(len(docs))
        if shuffle_files:
            order = np.random.default_rng([0 if seed is None else int(seed), seed_offset]).permutation(len(docs))
        return tf.data.Dataset.from_tensor_slices(tf.constant([docs[i] for i in order], tf.string)).map(
            lambda t: {"text": t})

    return dataset_fn


def _files_dataset(paths, field: str, decode_errors: str):
    def dataset_fn(split, shuffle_files, seed=None):
        del split
        order = list(paths)
        if shuffle_files:
            order = [paths[i] for i in np.random.default_rng([0 if seed is None else int(seed), 1]).permutation(len(paths))]

        def gen():
            for doc in corpora.iter_file_documents(order, field, decode_errors):
                yield doc

        return tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec((), tf.string)).map(
            lambda t: {"text": t})

    return dataset_fn


def _mqar_dataset(cfg: mqar.MQARConfig, num_examples: int):
    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files  # each example is already a pure function of (seed, split, index)

        def gen():
            for i in range(num_examples):
                ex = mqar.mqar_example(cfg, 0 if seed is None else int(seed), i, split)
                yield {"targets": ex["tokens"], "answer": ex["answer"]}

        sig = {"targets": tf.TensorSpec((cfg.seq_len + 1,), tf.int32), "answer": tf.TensorSpec((cfg.seq_len + 1,), tf.int32)}
        return tf.data.Dataset.from_generator(gen, output_signature=sig)

    return dataset_fn


def register_task(name: str, spec: str, vocab, *, seq_len: int, decode_errors: str = "replace",
                  tfds_data_dir: str = "") -> seqio.Task:
    """Register (or re-register) the seqio Task ``task_name(name)`` for ``spec``; returns it."""
    kind, arg, options = parse_spec(spec)
    tname = task_name(name)
    if tname in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(tname)
    text_feature = {"targets": seqio.Feature(seqio_vocabulary(vocab), add_eos=False, dtype=tf.int32)}
    tokenize = [functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}), seqio.preprocessors.tokenize]

    def opts(allowed):
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"task spec {spec!r}: unknown option(s) {unknown}; allowed: {list(allowed)}")
        return options

    if kind == "tfds":
        if not arg:
            raise ValueError(f"task spec {spec!r}: 'tfds:' needs a dataset name, e.g. tfds:c4/en:3.0.1")
        field = opts(("split", "field")).get("field", "text")
        source = seqio.TfdsDataSource(tfds_name=arg, tfds_data_dir=tfds_data_dir or None)
        pre = [_require_field(field, f"TFDS dataset {arg!r}"),
               functools.partial(seqio.preprocessors.rekey, key_map={"targets": field}), seqio.preprocessors.tokenize]
        return seqio.TaskRegistry.add(tname, source=source, preprocessors=pre, output_features=text_feature)
    if kind == "files":
        o = opts(("split", "field"))
        paths = corpora.glob_files(arg)
        source = seqio.FunctionDataSource(_files_dataset(paths, o.get("field", "text"), decode_errors),
                                          splits=["train", "validation", "test"])
        return seqio.TaskRegistry.add(tname, source=source, preprocessors=tokenize, output_features=text_feature)
    if kind in ("shakespeare", "kjv") and not arg:
        opts(("split",))
        docs_fn = corpora.shakespeare_documents if kind == "shakespeare" else corpora.kjv_documents
        source = seqio.FunctionDataSource(_text_dataset(lambda: list(docs_fn())), splits=["train", "validation", "test"])
        return seqio.TaskRegistry.add(tname, source=source, preprocessors=tokenize, output_features=text_feature)
    if kind == "mqar":
        o = dict(options)
        num = int(o.pop("num_examples", 1_000_000))
        o.pop("split", None)
        cfg = mqar.MQARConfig.from_options(o, seq_len)
        feats = {"targets": seqio.Feature(seqio.PassThroughVocabulary(cfg.vocab_size), add_eos=False, dtype=tf.int32),
                 "answer": seqio.Feature(seqio.PassThroughVocabulary(2), add_eos=False, dtype=tf.int32, required=False)}
        source = seqio.FunctionDataSource(_mqar_dataset(cfg, num), splits=list(mqar.SPLITS))
        return seqio.TaskRegistry.add(tname, source=source, output_features=feats, metric_fns=[mqar.mqar_metric])
    raise ValueError(f"unknown task spec {spec!r}; use tfds:<name>, files:<glob>, shakespeare, kjv or mqar")


def register_mixture(name: str, components: list[tuple[str, float]]) -> seqio.Mixture:
    mname = task_name(name)
    if mname in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(mname)
    return seqio.MixtureRegistry.add(mname, [(task_name(t), r) for t, r in components])


def split_of(spec: str, default: str = "train") -> str:
    return parse_spec(spec)[2].get("split", default)


def epoch_seed(seed: int, epoch: int) -> int:
    return int((seed * 1_000_003 + epoch * 7919) % (2**31 - 1))


def task_documents(task: seqio.Task, split: str, *, shuffle: bool, seed: int, epoch: int = 0,
                   process_index: int = 0, process_count: int = 1):
    """This process's shard of the task's documents (``targets`` token arrays) for one epoch."""
    # seqio shards at the source's files when there are enough of them; otherwise (or when the
    # source cannot list its files, e.g. mocked TFDS) every process reads the same seeded order and
    # keeps every process_count-th example.
    file_shards = process_count > 1
    if file_shards:
        try:
            file_shards = len(task.source.list_shards(split)) >= process_count
        except (KeyError, ValueError, AttributeError, NotImplementedError):
            file_shards = False
    shard = seqio.ShardInfo(process_index, process_count) if file_shards else None
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=epoch_seed(seed, epoch),
                          shard_info=shard, num_epochs=1, trim_output_features=False, use_cached=False,
                          try_in_mem_cache=False)
    if process_count > 1 and not file_shards:
        ds = ds.shard(process_count, process_index)
    opts = tf.data.Options()
    opts.deterministic = True
    ds = ds.with_options(opts)
    for ex in ds.as_numpy_iterator():
        yield np.asarray(ex["targets"], np.int32)
