"""Blocked gathered attention in plain JAX: each query touches only the keys inside its window.

Inputs are validated by :func:`pallas_kernels.gathered_attention.api.gathered_attention`.
Differentiable by ordinary autodiff (gradients w.r.t. ``q``, ``k`` and ``v``).

Precondition for exactness: **valid kv positions are distinct**, i.e. strictly increasing
along each row with padding (negative positions) at the end -- e.g. ``kv_pos = arange(L)``
with trailing ``-1``, or ``kv_pos`` = the (sorted) positions of selected tokens. Then the
admissible keys of query ``i`` all lie in the contiguous kv-index range of length
``W = min(window, skv)`` ending at ``e_i = #{j valid : kv_pos[j] <= q_pos[i]} - 1``.

With repeated valid kv positions more than ``W`` keys may be admissible for one query and
this implementation silently drops the earliest of them (it never attends a
non-admissible key, but it is then not equal to the reference). Use ``impl="reference"``
for such inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gathered_attention.config import GatheredAttentionBlockSizes
from pallas_kernels.gathered_attention.reference import admissible, masked_softmax_weights

_HIGHEST = jax.lax.Precision.HIGHEST


def window_end(q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
    """``e[b, i] = #{j : 0 <= kv_pos[b, j] <= q_pos[b, i]} - 1`` via a per-row binary search.

    Padding keys (``kv_pos < 0``, at the end of each row) are replaced by the dtype's
    maximum so the searched row stays sorted, and ``e`` is clamped to the number of valid
    keys so that they are never counted. ``O(sq log skv)`` work, ``O(sq)`` memory.
    """
    valid = kv_pos >= 0
    keys = jnp.where(valid, kv_pos, jnp.iinfo(kv_pos.dtype).max)
    count = jax.vmap(lambda row, x: jnp.searchsorted(row, x, side="right"))(keys, q_pos)
    n_valid = jnp.sum(valid, axis=1, dtype=count.dtype)
    return jnp.minimum(count, n_valid[:, None]) - 1


def gathered_attention_xla(
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
    block_sizes: GatheredAttentionBlockSizes,
) -> jax.Array:
    """Same contract as :func:`~pallas_kernels.gathered_attention.reference.gathered_attention_reference`.

    Algorithm (``W = min(window, skv)``):

    * ``e_i`` from :func:`window_end` (a binary search per query);
    * queries are processed in chunks of ``block_q`` (padded with ``q_pos = -1``) by
      ``lax.map`` over a ``jax.checkpoint``-ed chunk function, so forward and backward
      keep only ``O(b * block_q * W * (hkv * d + hq))`` intermediates alive per chunk;
    * per query, candidates ``e_i - W + 1 .. e_i`` (clamped into ``[0, skv)``, those below 0
      masked) are gathered from ``k``, ``v``, ``kv_pos`` and ``kv_seg``; the full mask
      (positions, window, segments, padding) is applied and a guarded softmax
      (:func:`~pallas_kernels.gathered_attention.reference.masked_softmax_weights`)
      gives exact zeros -- and zero gradients -- for rows without an admissible key.

    Exact under the module precondition (distinct valid kv positions). Returns
    ``(b, sq, hq, d)`` in ``compute_dtype``.
    """
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1:3]
    if sq == 0 or skv == 0:
        return jnp.zeros((b, sq, hq, d), compute_dtype)
    groups = hq // hkv
    w = min(window, skv)
    scale = jnp.asarray(sm_scale, compute_dtype)
    end = window_end(q_pos, kv_pos)  # (b, sq)
    offsets = jnp.arange(w, dtype=end.dtype) - (w - 1)  # (w,): -(w-1) .. 0
    gather_rows = jax.vmap(lambda table, idx: table[idx])  # per batch row: table[idx]

    def chunk(q_c: jax.Array, qp_c: jax.Array, end_c: jax.Array, qs_c: jax.Array | None) -> jax.Array:
        bq = q_c.shape[1]
        idx = end_c[:, :, None] + offsets  # (b, bq, w)
        in_range = idx >= 0  # idx <= end < skv always
        idx = jnp.clip(idx, 0, skv - 1)
        kp = gather_rows(kv_pos, idx)  # (b, bq, w)
        ks = None if kv_seg is None else gather_rows(kv_seg, idx)
        qs = None if qs_c is None else qs_c[:, :, None]
        mask = in_range & admissible(qp_c[:, :, None], kp, window, qs, ks)  # (b, bq, w)
        k_c = gather_rows(k, idx).astype(compute_dtype)  # (b, bq, w, hkv, d)
        v_c = gather_rows(v, idx).astype(compute_dtype)
        q_g = q_c.astype(compute_dtype).reshape(b, bq, hkv, groups, d)
        scores = jnp.einsum("bqhgd,bqwhd->bqhgw", q_g, k_c, precision=_HIGHEST) * scale
        probs = masked_softmax_weights(scores, mask[:, :, None, None, :])
        out = jnp.einsum("bqhgw,bqwhd->bqhgd", probs, v_c, precision=_HIGHEST)
        return out.reshape(b, bq, hq, d)

    bq = min(block_sizes.block_q, sq)
    if bq == sq:  # a single chunk: no padding, no rematerialisation needed
        return chunk(q, q_pos, end, q_seg)

    pad = -sq % bq
    n_chunks = (sq + pad) // bq

    def split(a: jax.Array, fill) -> jax.Array:
        """(b, sq, ...) -> (n_chunks, b, bq, ...), padding the query axis with ``fill``."""
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return jnp.moveaxis(a.reshape(b, n_chunks, bq, *a.shape[2:]), 1, 0)

    xs = (split(q, 0), split(q_pos, -1), split(end, -1), None if q_seg is None else split(q_seg, 0))
    out = jax.lax.map(jax.checkpoint(lambda args: chunk(*args)), xs)  # (n_chunks, b, bq, hq, d)
    return jnp.moveaxis(out, 0, 1).reshape(b, sq + pad, hq, d)[:, :sq]
