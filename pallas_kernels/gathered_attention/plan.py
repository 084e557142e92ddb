"""Block-visiting plans shared by the Pallas gathered-attention kernels (TPU and GPU).

For each block of queries, the admissible keys lie in the kv index range
``[#{kv_pos < min q_pos - window + 1}, #{kv_pos <= max q_pos})`` (binary searches on the
sorted valid kv positions); for each block of keys, the queries with
``kv_pos_min <= q_pos <= kv_pos_max + window - 1``. Plain JAX, run outside the kernels; the
kernels visit ``count`` blocks starting at ``first``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_I32_MAX = 2**31 - 1


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_rows(q_pos, kv_pos, q_seg, kv_seg, sq_pad: int, skv_pad: int):
    """Positions (padding: -1) and segment ids (padding: 0, or ``None``) as int32, padded along
    the sequence to the kernels' tile multiples ``sq_pad`` / ``skv_pad``."""

    def pad(a, n, fill):
        return None if a is None else jnp.pad(a.astype(jnp.int32), [(0, 0), (0, n - a.shape[1])],
                                              constant_values=fill)

    return pad(q_pos, sq_pad, -1), pad(kv_pos, skv_pad, -1), pad(q_seg, sq_pad, 0), pad(kv_seg, skv_pad, 0)


def _sorted_keys(pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions with padding replaced by int32 max (a sorted row) and the number of valid ones."""
    valid = pos >= 0
    return jnp.where(valid, pos, _I32_MAX), jnp.sum(valid, axis=1, dtype=jnp.int32)


def _searchsorted(keys: jax.Array, x: jax.Array, side: str) -> jax.Array:
    return jax.vmap(lambda row, v: jnp.searchsorted(row, v, side=side))(keys, x).astype(jnp.int32)


def _block_span(pos: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per block of ``pos (b, n * block)``: (has a valid entry, min valid, max valid), each ``(b, n)``."""
    b, s = pos.shape
    pb = pos.reshape(b, s // block, block)
    valid = pb >= 0
    lo = jnp.min(jnp.where(valid, pb, _I32_MAX), axis=-1)
    hi = jnp.max(jnp.where(valid, pb, -1), axis=-1)
    return jnp.any(valid, axis=-1), lo, hi


def _visit(nonempty: jax.Array, lo: jax.Array, hi: jax.Array, block: int, n_blocks: int):
    """Index range ``[lo, hi)`` of the other axis -> flattened (first block, number of blocks)."""
    first = lo // block
    count = jnp.where(nonempty & (hi > lo), (hi + block - 1) // block - first, 0)
    first = jnp.clip(first, 0, n_blocks - 1)
    return first.reshape(-1).astype(jnp.int32), count.reshape(-1).astype(jnp.int32)


def kv_blocks_per_q_block(q_pos, kv_pos, window: int, block_q: int, block_kv: int):
    """For each ``(b, q block)`` (flattened): first kv block and number of kv blocks to visit."""
    w1 = min(window, _I32_MAX) - 1
    keys, n_valid = _sorted_keys(kv_pos)
    nonempty, lo, hi = _block_span(q_pos, block_q)
    kv_lo = _searchsorted(keys, lo - w1, "left")  # lo >= 0 or lo = max: no overflow
    kv_hi = jnp.minimum(_searchsorted(keys, hi, "right"), n_valid[:, None])
    return _visit(nonempty, kv_lo, kv_hi, block_kv, kv_pos.shape[1] // block_kv)


def q_blocks_per_kv_block(q_pos, kv_pos, window: int, block_q: int, block_kv: int):
    """For each ``(b, kv block)`` (flattened): first query block and number of query blocks to visit."""
    w1 = min(window, _I32_MAX) - 1
    keys, n_valid = _sorted_keys(q_pos)
    nonempty, lo, hi = _block_span(kv_pos, block_kv)
    hi_plus = jnp.where(hi > _I32_MAX - w1, _I32_MAX, hi + w1)  # saturating hi + window - 1
    q_lo = _searchsorted(keys, lo, "left")
    q_hi = jnp.minimum(_searchsorted(keys, hi_plus, "right"), n_valid[:, None])
    return _visit(nonempty, q_lo, q_hi, block_q, q_pos.shape[1] // block_q)
