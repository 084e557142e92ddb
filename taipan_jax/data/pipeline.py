"""Deterministic token streams.

``RandomWindowStream``: the batch at step ``s`` is a pure function of ``(seed, s)`` — random
windows of ``seq_len + 1`` tokens from one long token array — so resuming at step ``s`` yields
exactly the batches an uninterrupted run would have seen, with no iterator state to save.
``process_index`` / ``process_count`` select this process's rows of the global batch.

``HeldoutWindows``: contiguous non-overlapping windows from the start of a held-out token array,
for evaluation that is the same every time.
"""

from __future__ import annotations

import numpy as np


class RandomWindowStream:
    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        if tokens.size < seq_len + 2:
            raise ValueError(f"corpus has {tokens.size} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by the process count {process_count}"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.global_batch_size)
        lo = self.process_index * self.local_batch_size
        starts = starts[lo : lo + self.local_batch_size]
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        window = self.tokens[idx]
        return {"inputs": window[:, :-1], "targets": window[:, 1:]}


class HeldoutWindows:
    """Yields ``(local_batch, global_batch)``: this process's rows and the whole batch (for byte counts)."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        num_batches: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        tokens = np.asarray(tokens, dtype=np.int32)
        need = batch_size * num_batches * seq_len + 1
        if tokens.size < need:
            raise ValueError(
                f"held-out corpus has {tokens.size} tokens; {num_batches} batches of "
                f"{batch_size} x {seq_len} need {need}"
            )
        if batch_size % process_count:
            raise ValueError(f"eval batch {batch_size} is not divisible by the process count {process_count}")
        self.tokens, self.seq_len, self.batch_size, self.num_batches = tokens, seq_len, batch_size, num_batches
        self.local = batch_size // process_count
        self.lo = process_index * self.local

    def __iter__(self):
        n = self.batch_size * self.seq_len
        for b in range(self.num_batches):
            chunk = self.tokens[b * n : b * n + n + 1]
            inputs = chunk[:-1].reshape(self.batch_size, self.seq_len)
            targets = chunk[1:].reshape(self.batch_size, self.seq_len)
            rows = slice(self.lo, self.lo + self.local)
            yield {"inputs": inputs[rows], "targets": targets[rows]}, {"inputs": inputs, "targets": targets}
