"""Wall-clock timing of a jitted JAX callable, shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def jtime(fn, fargs, seconds: float) -> float:
    """Milliseconds per call: 3 warm-ups, then the smaller of the median of synchronised single
    calls and the mean of a back-to-back batch (about ``seconds`` each, 5 to 200 calls)."""
    import jax

    for _ in range(3):
        jax.block_until_ready(fn(*fargs))
    t = time.perf_counter()
    jax.block_until_ready(fn(*fargs))
    est = time.perf_counter() - t
    n = int(max(5, min(200, seconds / max(est, 1e-5))))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*fargs))
        ts.append(time.perf_counter() - t)
    t = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn(*fargs)
    jax.block_until_ready(out)
    return min(statistics.median(ts), (time.perf_counter() - t) / n) * 1e3
