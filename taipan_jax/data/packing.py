"""Packing documents into fixed-length rows with segment ids and positions (numpy; no TensorFlow).

A document of tokens ``t1..tn`` becomes the stream ``[BOS, t1, ..., tn, EOS]``: ``n + 1``
(input, target) pairs — inputs ``[BOS, t1..tn]``, targets ``[t1..tn, EOS]`` (seqio's decoder
convention; BOS is the vocabulary's decoder start id, 0 for bytes). Rows of ``seq_len`` pairs are
cut from the concatenation of documents ("concatenate and chunk"): a row holds several documents,
and a document longer than the room left continues in another row (its continuation starts with the
token before it as input, and sees no earlier context). Every row carries

* ``inputs``, ``targets`` (int32), ``weights`` (float32: 1 for real pairs, 0 for padding),
* ``segment_ids`` (int32: 1, 2, ... per document piece within the row, 0 for padding) — the model
  restarts the SSD state and the conv window, and masks attention, at every change of id,
* ``positions`` (int32: position within the piece; the model derives the same from segment ids).

Padding (inputs / targets = pad id, weight 0, segment 0) appears only at uneven ends: the last row
of an epoch, and held-out data that runs out (logged).

:class:`PackedStream` — random access: the batch at step ``s`` is a pure function of
``(seed, s)``. Each epoch has a seeded permutation of the documents and of the rows; global row
``g`` is row ``g mod R`` of epoch ``g div R``. Process ``p`` of ``P`` computes only its rows
``[p·B/P, (p+1)·B/P)`` of the global batch, so the global batch does not depend on the process count.

:class:`StreamPacker` — sequential, for document iterators (seqio / TFDS datasets, mixtures):
each process packs its own shard of documents into its local rows. ``batch(s)`` is still a pure
function of ``(seed, s)``: a request for another step than the next one rebuilds the iterators and
replays (fast-forwards) the stream from the start, with a log line giving the time it took.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

log = logging.getLogger("taipan_jax.data")

KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = int(tokens.max()) if tokens.max() >= vocab_size else int(tokens.min())
        raise ValueError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size}) "
                         "(is config.model.vocab_size smaller than the tokenizer's?)")


def _segments(doc_key: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-local segment ids (1, 2, ... ; 0 = padding) and positions from a per-pair document key."""
    rows, length = doc_key.shape
    start = np.ones_like(valid)
    start[:, 1:] = doc_key[:, 1:] != doc_key[:, :-1]
    seg = np.cumsum(start, axis=1).astype(np.int32)
    idx = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    pos = (idx - first).astype(np.int32)
    return np.where(valid, seg, 0), np.where(valid, pos, 0)


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, *, bos_id: int, eos_id: int, pad_id: int = 0,
                   num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Pack ``docs`` (token arrays, in order) into rows; the last row is padded. ``num_rows`` pads or
    truncates to that many rows."""
    toks = TokenizedDocs.from_arrays(docs)
    stream = PackedStream(toks, seq_len=seq_len, global_batch_size=1, seed=0, shuffle=False, repeat=False,
                          bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    n = stream.rows_per_epoch if num_rows is None else num_rows
    return stream.rows(np.arange(n))


class TokenizedDocs:
    """Documents as one int32 token array plus offsets (``offsets[i]:offsets[i+1]`` is document i)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, name: str = "documents"):
        self.tokens = np.asarray(tokens, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        self.name = name
        if self.offsets.size < 2:
            raise ValueError(f"{name}: no documents")

    @classmethod
    def from_arrays(cls, docs: Sequence[np.ndarray], name: str = "documents") -> "TokenizedDocs":
        docs = [np.asarray(d, np.int32).reshape(-1) for d in docs]
        if not docs:
            raise ValueError(f"{name}: no documents")
        lengths = np.array([d.size for d in docs], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return cls(np.concatenate(docs) if docs else np.zeros(0, np.int32), offsets, name)

    @classmethod
    def from_texts(cls, texts: Sequence[str], vocab, name: str = "documents") -> "TokenizedDocs":
        if hasattr(vocab, "encode_batch"):
            arrays = vocab.encode_batch(list(texts))
        else:
            arrays = [vocab.encode(t) for t in texts]
        return cls.from_arrays(arrays, name)

    @property
    def num_docs(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]


class PackedStream:
    """Random-access packed rows; ``batch(step)`` is a pure function of ``(seed, step)``."""

    def __init__(self, docs: TokenizedDocs, *, seq_len: int, global_batch_size: int, seed: int, bos_id: int,
                 eos_id: int, pad_id: int = 0, shuffle: bool = True, repeat: bool = True, process_index: int = 0,
                 process_count: int = 1, vocab_size: int | None = None):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by the process count {process_count}")
        if vocab_size is not None:
            check_token_range(docs.tokens, vocab_size, docs.name)
        self.docs, self.seq_len, self.seed, self.shuffle, self.repeat = docs, seq_len, seed, shuffle, repeat
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.pair_lengths = docs.lengths + 1  # n tokens + EOS
        self.pairs_per_epoch = int(self.pair_lengths.sum())
        self.rows_per_epoch = -(-self.pairs_per_epoch // seq_len)
        self._logged_epochs: set[int] = set()

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int):
        n = self.docs.num_docs
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n)
            row_order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
        else:
            order, row_order = np.arange(n), np.arange(self.rows_per_epoch)
        cum = np.cumsum(self.pair_lengths[order])  # end (exclusive) of each document in the epoch's pairs
        return order, cum, row_order

    def rows(self, global_rows: np.ndarray) -> dict[str, np.ndarray]:
        """The packed rows with these global indices (over all epochs)."""
        global_rows = np.asarray(global_rows, np.int64)
        L = self.seq_len
        epochs = global_rows // self.rows_per_epoch
        inp = np.full((global_rows.size, L), self.pad_id, np.int32)
        tgt = np.full((global_rows.size, L), self.pad_id, np.int32)
        doc_key = np.full((global_rows.size, L), -1, np.int64)
        valid = np.zeros((global_rows.size, L), bool)
        for e in np.unique(epochs):
            sel = np.nonzero(epochs == e)[0]
            if e > 0 and not self.repeat:
                continue  # past the end of non-repeating data: padding rows
            if e > 0 and e not in self._logged_epochs:
                self._logged_epochs.add(int(e))
                log.warning("data %s: epoch %d begins (the data repeats; %d rows of %d per epoch)",
                            self.docs.name, e, self.rows_per_epoch, L)
            order, cum, row_order = self._epoch(int(e))
            row = row_order[global_rows[sel] % self.rows_per_epoch]
            j = row[:, None] * L + np.arange(L)[None, :]  # pair index within the epoch
            ok = j < self.pairs_per_epoch
            jc = np.where(ok, j, 0)
            dpos = np.searchsorted(cum, jc, side="right")
            d = order[dpos]
            q = jc - (cum[dpos] - self.pair_lengths[d])  # pair index within the document
            n = self.docs.lengths[d]
            base = self.docs.offsets[d]
            toks = self.docs.tokens
            i_in = np.clip(base + q - 1, 0, max(toks.size - 1, 0))
            i_tg = np.clip(base + q, 0, max(toks.size - 1, 0))
            x = np.where(q == 0, self.bos_id, toks[i_in] if toks.size else self.bos_id)
            y = np.where(q >= n, self.eos_id, toks[i_tg] if toks.size else self.eos_id)
            inp[sel] = np.where(ok, x, self.pad_id)
            tgt[sel] = np.where(ok, y, self.pad_id)
            doc_key[sel] = np.where(ok, dpos, -1)
            valid[sel] = ok
        seg, pos = _segments(doc_key, valid)
        return {"inputs": inp, "targets": tgt, "weights": valid.astype(np.float32), "segment_ids": seg,
                "positions": pos}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        lo = step * self.global_batch_size + self.process_index * self.local_batch_size
        return self.rows(np.arange(lo, lo + self.local_batch_size))


class PackedHeldout:
    """Held-out rows: the first ``batch_size × num_batches`` packed rows of the documents in order (no
    shuffle, no repeat; rows past the end are padding, logged). Yields ``(local_batch, global_batch)``."""

    def __init__(self, docs: TokenizedDocs, *, seq_len: int, batch_size: int, num_batches: int, bos_id: int,
                 eos_id: int, pad_id: int = 0, process_index: int = 0, process_count: int = 1,
                 vocab_size: int | None = None):
        if batch_size % process_count:
            raise ValueError(f"eval batch {batch_size} is not divisible by the process count {process_count}")
        self.stream = PackedStream(docs, seq_len=seq_len, global_batch_size=batch_size, seed=0, shuffle=False,
                                   repeat=False, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size)
        self.batch_size, self.num_batches = batch_size, num_batches
        self.local = batch_size // process_count
        self.lo = process_index * self.local
        need = batch_size * num_batches
        if need > self.stream.rows_per_epoch:
            log.warning("data %s: held-out data has %d rows of %d; the last %d of the %d evaluated rows are "
                        "padding (weight 0)", docs.name, self.stream.rows_per_epoch, seq_len,
                        need - self.stream.rows_per_epoch, need)

    def __iter__(self):
        for b in range(self.num_batches):
            full = self.stream.rows(np.arange(b * self.batch_size, (b + 1) * self.batch_size))
            local = {k: v[self.lo: self.lo + self.local] for k, v in full.items()}
            yield local, full


DocIterFactory = Callable[[int], Iterator[np.ndarray]]  # epoch -> documents (token arrays) of this shard


class RepeatingDocs:
    """Documents of one source, epoch after epoch (each epoch from ``factory(epoch)``), logging each repeat."""

    def __init__(self, name: str, factory: DocIterFactory, vocab_size: int | None = None):
        self.name, self.factory, self.vocab_size = name, factory, vocab_size

    def __iter__(self):
        epoch = 0
        while True:
            n = 0
            for doc in self.factory(epoch):
                doc = np.asarray(doc, np.int32).reshape(-1)
                if self.vocab_size is not None:
                    check_token_range(doc, self.vocab_size, f"data {self.name} (epoch {epoch}, document {n})")
                n += 1
                yield doc
            if n == 0:
                raise ValueError(f"data {self.name}: this process's shard has no documents (epoch {epoch}); "
                                 "use fewer processes or more files")
            epoch += 1
            log.warning("data %s: epoch %d ended after %d documents on this process; repeating", self.name, epoch, n)


def mix_documents(sources: Sequence[RepeatingDocs], rates: Sequence[float], seed: int) -> Iterator[np.ndarray]:
    """Each next document comes from source i with probability rate_i / sum(rates) (seeded)."""
    rates = np.asarray(rates, np.float64)
    if rates.size != len(sources) or (rates < 0).any() or rates.sum() <= 0:
        raise ValueError(f"mixture rates must be >= 0 with a positive sum, got {rates.tolist()}")
    p = rates / rates.sum()
    its = [iter(s) for s in sources]
    rng = np.random.default_rng([seed, 7])
    while True:
        choice = rng.choice(len(its), size=1024, p=p)
        for c in choice:
            yield next(its[c])


class StreamPacker:
    """Sequential packing of this process's documents into its local rows (see the module docstring)."""

    def __init__(self, make_docs: Callable[[], Iterator[np.ndarray]], *, seq_len: int, local_batch_size: int,
                 bos_id: int, eos_id: int, pad_id: int = 0, name: str = "stream"):
        self.make_docs, self.seq_len, self.local_batch_size = make_docs, seq_len, local_batch_size
        self.bos_id, self.eos_id, self.pad_id, self.name = bos_id, eos_id, pad_id, name
        self._reset()

    def _reset(self):
        self._docs = iter(self.make_docs())
        self._cur_in = self._cur_tg = np.zeros(0, np.int32)
        self._pos = 0
        self._doc_no = -1
        self.next_step = 0

    def _next_doc(self):
        doc = next(self._docs)
        self._cur_in = np.concatenate([[self.bos_id], doc]).astype(np.int32)
        self._cur_tg = np.concatenate([doc, [self.eos_id]]).astype(np.int32)
        self._pos = 0
        self._doc_no += 1

    def _row(self):
        L = self.seq_len
        inp, tgt, key = np.empty(L, np.int32), np.empty(L, np.int32), np.empty(L, np.int64)
        filled = 0
        while filled < L:
            if self._pos >= self._cur_in.size:
                self._next_doc()
            take = min(L - filled, self._cur_in.size - self._pos)
            inp[filled: filled + take] = self._cur_in[self._pos: self._pos + take]
            tgt[filled: filled + take] = self._cur_tg[self._pos: self._pos + take]
            key[filled: filled + take] = self._doc_no
            self._pos += take
            filled += take
        return inp, tgt, key

    def _produce(self) -> dict[str, np.ndarray]:
        rows = [self._row() for _ in range(self.local_batch_size)]
        inp, tgt, key = (np.stack(x) for x in zip(*rows))
        valid = np.ones(inp.shape, bool)
        seg, pos = _segments(key, valid)
        self.next_step += 1
        return {"inputs": inp, "targets": tgt, "weights": valid.astype(np.float32), "segment_ids": seg,
                "positions": pos}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        if step != self.next_step:
            t0 = time.time()
            if step < self.next_step:
                self._reset()
            start = self.next_step
            while self.next_step < step:
                self._produce()
            log.warning("data %s: fast-forwarded the stream from step %d to step %d in %.1f s", self.name, start,
                        step, time.time() - t0)
        return self._produce()
