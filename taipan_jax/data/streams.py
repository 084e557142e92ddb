"""The trainer's data: ``build_streams(config, ...) -> (train stream, held-out batches)``.

``config.data.pipeline`` picks the machinery (the defaults need no TensorFlow):

* ``windows`` (default, the tiny run): random windows over one token array (``RandomWindowStream``),
  held-out contiguous windows; no documents, no segment ids.
* ``packed``: documents packed into rows with segment ids (numpy; ``shakespeare``, ``kjv``,
  ``files:...``). One corpus: :class:`~taipan_jax.data.packing.PackedStream` (random access);
  a mixture: :class:`~taipan_jax.data.packing.StreamPacker` over per-process shards.
* ``seqio``: the corpora are registered as seqio Tasks / Mixtures (``taipan_jax.data.seqio_tasks``;
  TFDS datasets by name) and packed by the ``StreamPacker``.

``data.train_corpus`` / ``data.heldout_corpus`` are specs (``shakespeare``, ``files:<glob>``,
``tfds:<name>``, ``mqar;...``) or names of ``data.tasks`` (name -> spec) / ``data.mixtures``
(name -> ``"task:rate,task:rate"``). ``mqar`` specs always use :mod:`taipan_jax.data.mqar`'s streams.

Every train stream has ``batch(step)``, a pure function of ``(seed, step)``; every held-out object
yields ``(local batch, global batch)`` with ``weights`` where padding exists.
"""

from __future__ import annotations

import logging

import numpy as np

from taipan_jax.data import corpora, mqar
from taipan_jax.data.packing import (
    PackedHeldout,
    PackedStream,
    RepeatingDocs,
    StreamPacker,
    TokenizedDocs,
    check_token_range,
    mix_documents,
)
from taipan_jax.data.pipeline import HeldoutWindows, RandomWindowStream
from taipan_jax.data.vocab import parse_spec

log = logging.getLogger("taipan_jax.data")
PIPELINES = ("windows", "packed", "seqio")


def _mixture_components(text: str, name: str) -> list[tuple[str, float]]:
    comps = []
    for part in text.split(","):
        task, _, rate = part.strip().rpartition(":")
        try:
            comps.append((task.strip(), float(rate)))
        except ValueError:
            raise ValueError(f"mixture {name!r}: {part!r} is not '<task>:<rate>'") from None
        if not task.strip():
            raise ValueError(f"mixture {name!r}: {part!r} is not '<task>:<rate>'")
    return comps


def _as_dict(x) -> dict:
    if x is None:
        return {}
    return dict(x.to_dict() if hasattr(x, "to_dict") else x)


def resolve(dc, name: str):
    """``("mixture", [(task_name, spec, rate)])`` or ``("task", (name, spec))``."""
    tasks = _as_dict(dc.get("tasks"))
    mixtures = _as_dict(dc.get("mixtures"))
    if name in mixtures:
        comps = []
        for t, r in _mixture_components(mixtures[name], name):
            if t in mixtures:
                raise ValueError(f"mixture {name!r}: nested mixture {t!r} is not supported")
            comps.append((t, tasks.get(t, t), r))
        return "mixture", comps
    return "task", (name, tasks.get(name, name))


def _docs(spec: str, vocab, dc, vocab_size: int) -> TokenizedDocs:
    texts = corpora.load_documents(spec, dc.get("decode_errors", "replace"))
    docs = TokenizedDocs.from_texts(texts, vocab, name=spec)
    check_token_range(docs.tokens, vocab_size, f"data {spec!r}")
    return docs


def _is_mqar(spec: str) -> bool:
    return parse_spec(spec)[0] == "mqar"


def build_streams(dc, tc, vocab, *, model_vocab_size: int, process_index: int = 0, process_count: int = 1):
    """The train stream and the held-out batches for ``config.data`` (``dc``) and ``config.train`` (``tc``)."""
    pipeline = dc.get("pipeline", "windows")
    if pipeline not in PIPELINES:
        raise ValueError(f"config.data.pipeline must be one of {PIPELINES}, got {pipeline!r}")
    pi, pc = process_index, process_count
    kind, train = resolve(dc, dc.train_corpus)
    hkind, held = resolve(dc, dc.heldout_corpus)
    if hkind == "mixture":
        raise ValueError(f"config.data.heldout_corpus {dc.heldout_corpus!r} is a mixture; evaluate one task")
    decode_errors = dc.get("decode_errors", "replace")
    shuffle = bool(dc.get("shuffle", True))

    # MQAR: synthetic rows, whatever the pipeline.
    if kind == "task" and _is_mqar(train[1]):
        cfg = mqar.MQARConfig.from_options(parse_spec(train[1])[2], dc.seq_len)
        if cfg.vocab_size > model_vocab_size:
            raise ValueError(f"MQAR vocab_size {cfg.vocab_size} > config.model.vocab_size {model_vocab_size}")
        stream = mqar.MQARStream(cfg, global_batch_size=tc.global_batch_size, seed=tc.seed, process_index=pi,
                                 process_count=pc)
        hcfg = mqar.MQARConfig.from_options(parse_spec(held[1])[2], dc.seq_len) if _is_mqar(held[1]) else cfg
        heldout = mqar.MQARHeldout(hcfg, batch_size=tc.eval_batch_size, num_batches=tc.eval_batches, seed=tc.seed,
                                   process_index=pi, process_count=pc)
        return stream, heldout

    if pipeline == "windows":
        if kind == "mixture":
            raise ValueError("config.data.pipeline='windows' takes one corpus; use 'packed' or 'seqio' for mixtures")
        tokens = vocab.encode(corpora.load_corpus(train[1], decode_errors))
        check_token_range(tokens, model_vocab_size, f"data {train[1]!r}")
        stream = RandomWindowStream(tokens, seq_len=dc.seq_len, global_batch_size=tc.global_batch_size,
                                    seed=tc.seed, process_index=pi, process_count=pc)
        htokens = vocab.encode(corpora.load_corpus(held[1], decode_errors))
        check_token_range(htokens, model_vocab_size, f"data {held[1]!r}")
        heldout = HeldoutWindows(htokens, seq_len=dc.seq_len, batch_size=tc.eval_batch_size,
                                 num_batches=tc.eval_batches, process_index=pi, process_count=pc)
        return stream, heldout

    ids = dict(bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
    if tc.global_batch_size % pc:
        raise ValueError(f"global batch {tc.global_batch_size} is not divisible by the process count {pc}")
    local = tc.global_batch_size // pc

    if pipeline == "packed":
        if kind == "task":
            stream = PackedStream(_docs(train[1], vocab, dc, model_vocab_size), seq_len=dc.seq_len,
                                  global_batch_size=tc.global_batch_size, seed=tc.seed, shuffle=shuffle,
                                  process_index=pi, process_count=pc, **ids)
        else:
            sources, rates = [], []
            for tname, spec, rate in train:
                docs = _docs(spec, vocab, dc, model_vocab_size)
                sources.append(RepeatingDocs(tname, _shard_factory(docs, tc.seed, shuffle, pi, pc)))
                rates.append(rate)
            stream = StreamPacker(lambda: mix_documents(sources, rates, tc.seed), seq_len=dc.seq_len,
                                  local_batch_size=local, name=dc.train_corpus, **ids)
        heldout = PackedHeldout(_docs(held[1], vocab, dc, model_vocab_size), seq_len=dc.seq_len,
                                batch_size=tc.eval_batch_size, num_batches=tc.eval_batches, process_index=pi,
                                process_count=pc, **ids)
        return stream, heldout

    # seqio
    from taipan_jax.data import seqio_tasks as st

    reg = dict(seq_len=dc.seq_len, decode_errors=decode_errors, tfds_data_dir=dc.get("tfds_data_dir", ""))
    comps = [(train[0], train[1], 1.0)] if kind == "task" else train
    sources, rates = [], []
    for tname, spec, rate in comps:
        task = st.register_task(tname, spec, vocab, **reg)
        split = st.split_of(spec)

        def factory(epoch, task=task, split=split):
            return st.task_documents(task, split, shuffle=shuffle, seed=tc.seed, epoch=epoch, process_index=pi,
                                     process_count=pc)

        sources.append(RepeatingDocs(tname, factory, vocab_size=model_vocab_size))
        rates.append(rate)
    if kind == "mixture":
        st.register_mixture(dc.train_corpus, [(t, r) for t, _, r in comps])
    make = (lambda: iter(sources[0])) if len(sources) == 1 else (lambda: mix_documents(sources, rates, tc.seed))
    stream = StreamPacker(make, seq_len=dc.seq_len, local_batch_size=local, name=dc.train_corpus, **ids)
    htask = st.register_task(held[0], held[1], vocab, **reg)
    heldout = PackedHeldout(
        seqio_heldout_docs(htask, st.split_of(held[1]), dc.seq_len, tc.eval_batch_size * tc.eval_batches,
                           model_vocab_size, name=held[1]),
        seq_len=dc.seq_len, batch_size=tc.eval_batch_size, num_batches=tc.eval_batches, process_index=pi,
        process_count=pc, **ids)
    return stream, heldout


def _shard_factory(docs: TokenizedDocs, seed: int, shuffle: bool, pi: int, pc: int):
    mine = np.arange(pi, docs.num_docs, pc)

    def factory(epoch):
        order = np.random.default_rng([seed, epoch, 2]).permutation(mine) if shuffle else mine
        for i in order:
            yield docs[i]

    return factory


def seqio_heldout_docs(task, split: str, seq_len: int, rows: int, vocab_size: int, name: str) -> TokenizedDocs:
    """The first documents of a task's split (unshuffled, unsharded: every process reads the same) that
    fill ``rows`` packed rows, or all of them if the split is shorter."""
    from taipan_jax.data import seqio_tasks as st

    need, have, docs = rows * seq_len, 0, []
    for doc in st.task_documents(task, split, shuffle=False, seed=0):
        check_token_range(doc, vocab_size, f"data {name!r} (held-out document {len(docs)})")
        docs.append(doc)
        have += doc.size + 1
        if have >= need:
            break
    if not docs:
        raise ValueError(f"held-out data {name!r} (split {split!r}) is empty")
    return TokenizedDocs.from_arrays(docs, name=name)
