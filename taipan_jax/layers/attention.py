"""Softmax attention pieces shared by the SAL, Transformer++ and the Jamba-style baseline.

* :class:`AttentionProjections` — q/k/v/o projections with GQA and optional RoPE.
* :func:`dense_causal_attention` — every query, causal, optional sliding window, segment masks
  and a key mask; ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU, XLA elsewhere).
* :func:`ring_attention_step` — one query against a fixed-size ring buffer of keys / values
  (decoding with memory bounded by the window).
* :func:`cached_attention` — a whole segment of queries against a ring buffer plus the segment's
  own keys (streaming evaluation: continuing a whole-sequence call from a cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from taipan_jax.layers.common import Dense, scaled, torch_linear_init
from taipan_jax.sharding import constrain

FULL_WINDOW = 1 << 30  # "no window": larger than any sequence


def positions_from_segments(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Position of each token inside its document (restarting at each change of segment id)."""
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        return idx
    start = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    doc_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    return idx - doc_start


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on the last axis of ``x (b, l, h, d)`` (pairs (i, i + d/2), LLaMA style)."""
    d = x.shape[-1]
    half = d // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)
    ang = positions.astype(jnp.float32)[..., None] * freqs  # (b, l, half)
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half : 2 * half]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., 2 * half :]], axis=-1)
    return out.astype(x.dtype)


class AttentionProjections(nnx.Module):
    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rngs: nnx.Rngs,
        rope_theta: float | None = None,
        out_scale: float = 1.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if num_heads <= 0 or num_kv_heads <= 0 or head_dim <= 0:
            raise ValueError("attention: num_heads, num_kv_heads and head_dim must be > 0")
        if num_heads % num_kv_heads:
            raise ValueError(f"attention: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.wq = Dense(d_model, (num_heads, head_dim), axes=("embed", "heads", "head_dim"), **kw)
        self.wkv = Dense(d_model, (2, num_kv_heads, head_dim), axes=("embed", None, "kv_heads", "head_dim"), **kw)
        self.wo = Dense(
            num_heads * head_dim, d_model, axes=("heads", "embed"),
            kernel_init=scaled(torch_linear_init(num_heads * head_dim), out_scale), **kw,
        )

    def q(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        q = self.wq(x)
        return q if self.rope_theta is None else rope(q, positions, self.rope_theta)

    def kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        kv = self.wkv(x)
        k, v = kv[..., 0, :, :], kv[..., 1, :, :]
        if self.rope_theta is not None:
            k = rope(k, positions, self.rope_theta)
        return k, v

    def out(self, o: jax.Array) -> jax.Array:
        o = o.reshape(*o.shape[:-2], self.num_heads * self.head_dim)
        return self.wo(o.astype(self.dtype))


def dense_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    segment_ids: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Causal attention for every query: ``q (b, l, hq, d)``, ``k, v (b, l, hkv, d)``.

    Query i sees key j iff ``0 <= i - j < window``, same segment, and ``key_mask[b, j]``. A query
    with no visible key (possible only with ``key_mask``) outputs 0.
    """
    b, l = q.shape[:2]
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if key_mask is not None:
        km = jnp.broadcast_to(key_mask[:, None, None, :], (b, 1, l, l))
        mask = km if mask is None else mask & km
    local = None if window >= l else (window - 1, 0)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, local_window_size=local, implementation=implementation
    )
    if key_mask is not None:
        # Rows whose every key is masked get a uniform softmax from the XLA path; zero them.
        i = jnp.arange(l)
        visible = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < window)
        vis = visible[None] & key_mask[:, None, :]
        if segment_ids is not None:
            vis = vis & (segment_ids[:, :, None] == segment_ids[:, None, :])
        out = jnp.where(jnp.any(vis, axis=-1)[:, :, None, None], out, 0)
    return constrain(out, ("batch", "length", "heads", "head_dim"))


def ring_attention_step(
    q: jax.Array,
    k_buf: jax.Array,
    v_buf: jax.Array,
    pos_buf: jax.Array,
    q_pos: jax.Array,
    *,
    window: int,
) -> jax.Array:
    """One query per sequence against a ring buffer.

    ``q (b, hq, d)``, ``k_buf, v_buf (b, W, hkv, d)``, ``pos_buf (b, W)`` (−1 = empty slot),
    ``q_pos (b,)``. Keys with ``0 <= q_pos - pos < window`` are visible. Float32 softmax.
    """
    b, hq, d = q.shape
    hkv = k_buf.shape[2]
    rep = hq // hkv
    qf = q.astype(jnp.float32).reshape(b, hkv, rep, d)
    s = jnp.einsum("bgrd,bwgd->bgrw", qf, k_buf.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    delta = q_pos[:, None] - pos_buf
    ok = (pos_buf >= 0) & (delta >= 0) & (delta < window)
    s = jnp.where(ok[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bgrw,bwgd->bgrd", p, v_buf.astype(jnp.float32))
    return o.reshape(b, hq, d)


def chronological_keys(k_buf, v_buf, pos_buf, k_new, v_new, pos_new):
    """A ring buffer's entries followed by new ones, sorted by position with empty entries last.

    ``k_buf, v_buf (b, W, hkv, d)``, ``pos_buf (b, W)`` (−1 = empty slot; slots are in write order
    modulo W, not in time order); ``k_new, v_new (b, l, hkv, d)``, ``pos_new (b, l)`` (−1 = not
    written, e.g. an unselected token of a SAL with ``kv_source="selected"``). Returns
    ``(k, v, pos)`` of length ``W + l`` whose valid positions are strictly increasing with the
    padding at the end (the layout :func:`pallas_kernels.gathered_attention` expects).
    """
    k = jnp.concatenate([k_buf.astype(k_new.dtype), k_new], axis=1)
    v = jnp.concatenate([v_buf.astype(v_new.dtype), v_new], axis=1)
    pos = jnp.concatenate([pos_buf, pos_new.astype(pos_buf.dtype)], axis=1)
    order = jnp.argsort(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max), axis=1, stable=True)
    take = lambda a: jnp.take_along_axis(a, order.reshape(*order.shape, *([1] * (a.ndim - 2))), axis=1)
    return take(k), take(v), take(pos)


def cached_attention(
    q: jax.Array,
    q_pos: jax.Array,
    cache: dict,
    k_new: jax.Array,
    v_new: jax.Array,
    pos_new: jax.Array,
    *,
    window: int,
    impl: str = "auto",
) -> jax.Array:
    """Every query of a segment against the cached keys and the segment's own keys.

    ``q (b, l, hq, d)`` at positions ``q_pos (b, l)``; ``cache`` a ring buffer (``k``, ``v``,
    ``pos``) of earlier keys; ``k_new, v_new (b, l, hkv, d)`` at ``pos_new (b, l)`` (−1 = not a
    key). Query i sees key j iff ``0 <= q_pos[i] - pos[j] < window``; a query without a visible key
    outputs 0. Runs :func:`pallas_kernels.gathered_attention` (``impl``: its ``xla`` path on CPU,
    memory O(l · min(window, W + l)); the Pallas kernel of a GPU / TPU backend under ``"auto"``).
    """
    k, v, pos = chronological_keys(cache["k"], cache["v"], cache["pos"], k_new, v_new, pos_new)
    out = pallas_kernels.gathered_attention(q, k, v, q_pos.astype(jnp.int32), pos, window=window, impl=impl)
    return constrain(out, ("batch", "length", "heads", "head_dim"))
