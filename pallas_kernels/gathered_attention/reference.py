"""Dense masked softmax attention over every (query, key) pair: the oracle for the other implementations.

Inputs are already validated by :func:`pallas_kernels.gathered_attention.api.gathered_attention`.
Memory is ``O(b * hq * sq * skv)``; use it for testing only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def admissible(
    q_pos: jax.Array,
    kv_pos: jax.Array,
    window: int,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
) -> jax.Array:
    """Boolean mask ``q attends kv`` for broadcast-compatible position (and segment) arrays.

    ``q_pos >= 0``, ``kv_pos >= 0``, ``0 <= q_pos - kv_pos < window`` and, when given,
    ``q_seg == kv_seg``.
    """
    diff = q_pos - kv_pos  # may wrap only where kv_pos < 0, which is masked anyway
    mask = (q_pos >= 0) & (kv_pos >= 0) & (diff >= 0)
    if window <= jnp.iinfo(diff.dtype).max:  # otherwise every non-negative diff is < window
        mask = mask & (diff < window)
    if q_seg is not None:
        mask = mask & (q_seg == kv_seg)
    return mask


def masked_softmax_weights(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to ``mask``; all-masked rows give exact zeros.

    Masked scores are replaced by ``-inf`` before the max, so they contribute exact zeros
    to values and gradients; the max and the denominator of all-masked rows are guarded
    so that no ``NaN`` appears in values or gradients.
    """
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(scores - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def gathered_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    *,
    window: int,
    sm_scale: float,
    compute_dtype: jnp.dtype,
) -> jax.Array:
    """Dense reference: ``softmax_j(scale * q_i . k_j  |  i attends j) @ v`` in ``compute_dtype``.

    Shapes ``q (b, sq, hq, d)``, ``k, v (b, skv, hkv, d)``, positions ``(b, sq)`` / ``(b, skv)``.
    Query head ``j`` uses kv head ``j // (hq // hkv)``. Returns ``(b, sq, hq, d)`` in
    ``compute_dtype``; rows without an admissible key are exactly 0.
    """
    hq, hkv = q.shape[2], k.shape[2]
    q, k, v = (a.astype(compute_dtype) for a in (q, k, v))
    k = jnp.repeat(k, hq // hkv, axis=2)
    v = jnp.repeat(v, hq // hkv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST) * jnp.asarray(sm_scale, compute_dtype)
    mask = admissible(
        q_pos[:, :, None], kv_pos[:, None, :], window,
        None if q_seg is None else q_seg[:, :, None], None if kv_seg is None else kv_seg[:, None, :],
    )  # (b, sq, skv)
    probs = masked_softmax_weights(scores, mask[:, None])
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HIGHEST)
