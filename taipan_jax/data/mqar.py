"""Synthetic multi-query associative recall (MQAR; Arora et al., Zoology, 2023; Based, 2024).

An example of ``seq_len + 1`` tokens (inputs = ``x[:-1]``, targets = ``x[1:]``) over a vocabulary of
``vocab_size`` ids (0 is never used, the first half ``[1, V/2)`` holds keys, ``[V/2, V)`` values):

    k1 v1 k2 v2 ... kP vP | filler ... kq vq ... filler ... kq' vq' ...

* ``num_pairs`` key-value pairs with distinct keys (and distinct values when there are enough);
* ``num_queries`` (≤ num_pairs) distinct keys of the context appear again in the query region, each
  followed by its value; their slots are at even offsets, drawn with Zoology's power law
  ``p(gap) ∝ gap^(power_a - 1)`` (short gaps more likely; ``power_a=1`` is uniform);
* filler tokens are uniform over ``[1, V)`` (Zoology's ``random_non_queries``, default) or 0;
* the loss weight is 1 exactly where the input is a queried key (the target is its value), so
  **accuracy** = fraction of those positions where the model's argmax is the value.

Example ``i`` of split ``s`` is a pure function of ``(seed, s, i)``.
Spec: ``mqar[;vocab_size=V][;num_pairs=P][;num_queries=Q][;power_a=a][;random_non_queries=false]``
(length = ``data.seq_len``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SPLITS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 64
    num_pairs: int = 4
    num_queries: int = 4
    seq_len: int = 64
    power_a: float = 0.01
    random_non_queries: bool = True  # filler tokens uniform over [1, V) (Zoology's default); False: 0

    def __post_init__(self):
        V, P, Q, L = self.vocab_size, self.num_pairs, self.num_queries, self.seq_len
        if V < 4 or V % 2:
            raise ValueError(f"MQAR vocab_size must be even and >= 4, got {V}")
        if P < 1 or P > V // 2 - 1:
            raise ValueError(f"MQAR num_pairs must be in [1, {V // 2 - 1}] for vocab_size {V}, got {P}")
        if not 1 <= Q <= P:
            raise ValueError(f"MQAR num_queries must be in [1, num_pairs={P}], got {Q}")
        if (L + 1 - 2 * P) // 2 < Q:
            raise ValueError(f"MQAR seq_len {L} is too short for {P} pairs and {Q} queries "
                             f"(needs >= {2 * P + 2 * Q - 1})")
        if self.power_a <= 0:
            raise ValueError(f"MQAR power_a must be > 0, got {self.power_a}")

    @classmethod
    def from_options(cls, options: dict[str, str], seq_len: int) -> "MQARConfig":
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in options.items():
            if k not in fields or k == "seq_len":
                raise ValueError(f"unknown MQAR option {k!r}; allowed: {[f for f in fields if f != 'seq_len']}")
            if k == "power_a":
                kw[k] = float(v)
            elif k == "random_non_queries":
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"MQAR random_non_queries must be true or false, got {v!r}")
                kw[k] = v.lower() in ("true", "1")
            else:
                kw[k] = int(v)
        return cls(seq_len=seq_len, **kw)


def mqar_example(cfg: MQARConfig, seed: int, index: int, split: str = "train") -> dict[str, np.ndarray]:
    """One example: ``tokens`` (seq_len + 1) and ``answer`` mask (seq_len + 1, 1 at value positions)."""
    V, P, Q, T = cfg.vocab_size, cfg.num_pairs, cfg.num_queries, cfg.seq_len + 1
    rng = np.random.default_rng([seed, SPLITS[split], index])
    half = V // 2
    keys = rng.choice(np.arange(1, half), P, replace=False)
    values = rng.choice(np.arange(half, V), P, replace=P > V - half)
    x = rng.integers(1, V, T)
    if not cfg.random_non_queries:
        x[:] = 0
    x[0: 2 * P: 2], x[1: 2 * P: 2] = keys, values
    slots = (T - 2 * P) // 2  # query slot k occupies positions 2P + 2k (key) and 2P + 2k + 1 (value)
    gaps = np.arange(1, slots + 1, dtype=np.float64)
    p = cfg.power_a * gaps ** (cfg.power_a - 1)
    chosen = rng.choice(slots, Q, replace=False, p=p / p.sum())
    which = rng.choice(P, Q, replace=False)
    pos = 2 * P + 2 * chosen
    x[pos], x[pos + 1] = keys[which], values[which]
    answer = np.zeros(T, np.int32)
    answer[pos + 1] = 1
    return {"tokens": x.astype(np.int32), "answer": answer}


def mqar_rows(cfg: MQARConfig, seed: int, indices, split: str = "train") -> dict[str, np.ndarray]:
    ex = [mqar_example(cfg, seed, int(i), split) for i in indices]
    x = np.stack([e["tokens"] for e in ex])
    ans = np.stack([e["answer"] for e in ex])
    b, L = x.shape[0], cfg.seq_len
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": ans[:, 1:].astype(np.float32),
            "segment_ids": np.ones((b, L), np.int32),
            "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (b, L)).copy()}


class MQARStream:
    """Training batches; the batch at step s is a pure function of ``(seed, s)``."""

    def __init__(self, cfg: MQARConfig, *, global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, split: str = "train"):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by the process count {process_count}")
        self.cfg, self.seed, self.split = cfg, seed, split
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index

    def batch(self, step: int) -> dict[str, np.ndarray]:
        lo = step * self.global_batch_size + self.process_index * self.local_batch_size
        return mqar_rows(self.cfg, self.seed, range(lo, lo + self.local_batch_size), self.split)


class MQARHeldout:
    """Fixed evaluation batches from the ``validation`` split; yields ``(local_batch, global_batch)``."""

    def __init__(self, cfg: MQARConfig, *, batch_size: int, num_batches: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"eval batch {batch_size} is not divisible by the process count {process_count}")
        self.cfg, self.seed, self.batch_size, self.num_batches = cfg, seed, batch_size, num_batches
        self.local = batch_size // process_count
        self.lo = process_index * self.local

    def __iter__(self):
        for b in range(self.num_batches):
            full = mqar_rows(self.cfg, self.seed, range(b * self.batch_size, (b + 1) * self.batch_size), "validation")
            yield {k: v[self.lo: self.lo + self.local] for k, v in full.items()}, full


def check_example(tokens: np.ndarray, answer: np.ndarray, cfg: MQARConfig) -> None:
    """Asserts that an example is correct by construction (used by the tests)."""
    P = cfg.num_pairs
    keys, values = tokens[0: 2 * P: 2], tokens[1: 2 * P: 2]
    assert len(set(keys.tolist())) == P, "keys are not distinct"
    assert ((keys >= 1) & (keys < cfg.vocab_size // 2)).all() and (values >= cfg.vocab_size // 2).all()
    lookup = dict(zip(keys.tolist(), values.tolist()))
    where = np.nonzero(answer)[0]
    assert where.size == cfg.num_queries, (where, cfg.num_queries)
    assert (where > 2 * P).all()
    queried = tokens[where - 1].tolist()
    assert len(set(queried)) == cfg.num_queries, "a key is queried twice"
    for k, v in zip(queried, tokens[where].tolist()):
        assert lookup[k] == v, (k, v, lookup)


def mqar_accuracy(predictions, targets, weights) -> float:
    """Fraction of weighted positions (the queried values) where ``predictions == targets``."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    weights = np.asarray(weights, np.float64)
    total = weights.sum()
    if total == 0:
        raise ValueError("no MQAR query positions (all weights are zero)")
    return float(((predictions == targets) * weights).sum() / total)


def mqar_metric(targets, predictions) -> dict[str, float]:
    """seqio-style metric: ``targets`` / ``predictions`` are per-example arrays of the queried values."""
    t = np.concatenate([np.asarray(x).reshape(-1) for x in targets]) if len(targets) else np.zeros(0)
    p = np.concatenate([np.asarray(x).reshape(-1) for x in predictions]) if len(predictions) else np.zeros(0)
    if t.shape != p.shape:
        raise ValueError(f"MQAR metric: {t.size} target values but {p.size} predictions")
    return {"accuracy": mqar_accuracy(p, t, np.ones_like(t, np.float32))}
