"""The Selective Attention Layer (Taipan, arXiv 2410.18572 §3) and a standard attention block.

SAL, for a residual stream ``h (b, l, d)`` (choices the paper leaves open: docs/assumptions.md):

    x      = RMSNorm(h)
    s      = G(x) in R^2                                   # gate (Eq. 1), float32
    m      = ST-Gumbel-softmax(s, tau)[1]   (training)     # Eq. 2/3: forward {0,1}, backward soft
           = [s_1 + g_1(p) > s_0 + g_0(p)]  (evaluation, eval_selection="sampled": Gumbel noise
                                             keyed by the token's position p; or [s_1 > s_0])
    alpha  = softmax(s)[1]
    o      = W_o Attention(W_q x_sel, W_k x, W_v x)        # selected queries, sliding window, no PE
    h      = h + m * alpha * (o - h)                       # Eq. 5: (1-alpha) h + alpha o if selected
    h      = h + SwiGLU(RMSNorm(h))                        # Eq. 6, every token
    budget = mean_batch (C - mean_l m)^2                   # Eq. 7 term of this SAL

``attention="dense"`` computes attention for every query and masks with ``m`` (the exact
straight-through gradient reaches every token's gate). ``attention="gathered"`` gathers at most
``k_max = ceil(capacity_factor * C * L)`` selected tokens (highest gate margin first; the rest
overflow, are treated as unselected and are counted), runs
:func:`pallas_kernels.gathered_attention` on them only, and scatters back; then the gate learns
through the selected tokens' straight-through gradient and the budget loss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from taipan_jax.layers.attention import (
    FULL_WINDOW,
    AttentionProjections,
    cached_attention,
    dense_causal_attention,
    positions_from_segments,
    ring_attention_step,
)
from taipan_jax.layers.common import Dense, RMSNorm, SwiGLU, from_values, swiglu_hidden
from taipan_jax.model_config import ModelConfig
from taipan_jax.sharding import constrain


def straight_through_gumbel(s: jax.Array, key: jax.Array, tau: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """Straight-through Gumbel-softmax over the last axis (size 2) of ``s``.

    Returns ``(m, hard)``: ``m`` equals ``hard`` (0/1) exactly in the forward pass and has the
    gradient of the relaxed ``softmax((s + g) / tau)[..., 1]`` (Jang et al. 2017).
    """
    g = jax.random.gumbel(key, s.shape, jnp.float32)
    y_soft = jax.nn.softmax((s + g) / tau, axis=-1)[..., 1]
    hard = (jnp.argmax(s + g, axis=-1) == 1).astype(jnp.float32)
    return hard + (y_soft - jax.lax.stop_gradient(y_soft)), hard


def position_gumbel(key: jax.Array, positions: jax.Array) -> jax.Array:
    """Gumbel(0, 1) noise ``(..., 2)`` that depends only on ``key`` and each token's position.

    Evaluation-mode selection draws from the training distribution (``P(select) = alpha``) yet
    stays a deterministic function of the text: a token gets the same noise in a full forward,
    a streamed segment, a decode step, alone or in any batch.
    """
    def draw(p):
        return jax.random.gumbel(jax.random.fold_in(key, p), (2,), jnp.float32)

    for _ in range(positions.ndim):  # vmap per axis (no reshape: keeps a sharded batch axis in place)
        draw = jax.vmap(draw)
    return draw(jnp.maximum(positions, 0).astype(jnp.uint32))


def budget_loss(m: jax.Array, capacity: float, weights: jax.Array | None = None) -> jax.Array:
    """``mean_b (C - mean_l m)^2`` (per sequence, then averaged over the batch)."""
    if weights is None:
        frac = jnp.mean(m, axis=-1)
    else:
        frac = jnp.sum(m * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
    return jnp.mean(jnp.square(capacity - frac))


def _ring_append(cache, k, v, pos, valid):
    """Append a segment's entries to a ring buffer (slot = write index % size).

    ``k, v (b, l, hkv, d)``, ``pos (b, l)`` the tokens' positions, ``valid (b, l)`` which of them
    are written (all, or the selected ones); only the last ``size`` written ones can survive, so
    only those are scattered. ``t`` advances by ``l``.
    """
    size = cache["pos"].shape[1]
    b, l = valid.shape
    order = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1  # index of each written entry in the segment
    n = jnp.sum(valid.astype(jnp.int32), axis=1)
    keep = valid & (order >= (n[:, None] - size))
    slot = jnp.where(keep, (cache["count"][:, None] + order) % size, size)  # size = dropped
    bidx = jnp.arange(b)[:, None]
    return {
        "k": cache["k"].at[bidx, slot].set(k.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[bidx, slot].set(v.astype(cache["v"].dtype), mode="drop"),
        "pos": cache["pos"].at[bidx, slot].set(pos.astype(jnp.int32), mode="drop"),
        "count": cache["count"] + n,
        "t": cache["t"] + l,
    }


def _prefill_ring(k, v, valid, size, dtype):
    """The decoding cache after a whole prompt: the last ``size`` valid (k, v) in a ring buffer."""
    b, l = valid.shape
    idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    return _ring_append(_empty_ring(b, size, k.shape[2], k.shape[3], dtype), k, v, idx, valid)


def _segment_positions(cache, segment_ids, l, where):
    """Positions of a segment continuing from ``cache`` (its ``t`` onward)."""
    if segment_ids is not None:
        raise NotImplementedError(
            f"{where}: segment_ids together with a cache (packed documents in a streamed call) are not "
            "supported; stream one document at a time (segment_ids=None)."
        )
    return cache["t"][:, None] + jnp.arange(l, dtype=jnp.int32)[None]


def check_cache_room(cache, length: int, where: str) -> None:
    """Raise if a full-attention cache cannot hold ``length`` more tokens (when ``t`` is concrete).

    Under ``jit`` the check cannot see values; :func:`taipan_jax.evaluate.streaming_losses` checks
    the document length against the cache size before it starts.
    """
    try:
        t = int(jnp.max(cache["t"]))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return
    size = cache["pos"].shape[-1]
    if t + length > size:
        raise ValueError(
            f"{where}: the KV cache holds {size} tokens but {t} + {length} are needed; size it with "
            "model.init_cache(batch, kv_len=...) or raise model.attention.max_decode_len"
        )


def _ring_write(cache, k, v, pos, write):
    """Write one entry per sequence (where ``write``) at slot ``count % size``."""
    size = cache["pos"].shape[1]
    b = pos.shape[0]
    slot = jnp.where(write, cache["count"] % size, size)
    bidx = jnp.arange(b)
    return {
        "k": cache["k"].at[bidx, slot].set(k.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[bidx, slot].set(v.astype(cache["v"].dtype), mode="drop"),
        "pos": cache["pos"].at[bidx, slot].set(pos, mode="drop"),
        "count": cache["count"] + write.astype(jnp.int32),
        "t": cache["t"] + 1,
    }


def _empty_ring(batch, size, heads, head_dim, dtype):
    return {
        "k": jnp.zeros((batch, size, heads, head_dim), dtype),
        "v": jnp.zeros((batch, size, heads, head_dim), dtype),
        "pos": jnp.full((batch, size), -1, jnp.int32),
        "count": jnp.zeros((batch,), jnp.int32),
        "t": jnp.zeros((batch,), jnp.int32),
    }


class SALBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        sc = cfg.sal
        self.sc = sc
        d = cfg.d_model
        dt, pdt = cfg.compute_dtype, cfg.weight_dtype
        self.dtype = dt
        out_scale = 1.0 / math.sqrt(2 * len(cfg.blocks))
        self.norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        # Gate bias starts at [0, logit(p0)] with p0 = gate_init_frac or C: the Gumbel-max choice
        # selects with probability softmax(s)[1] = p0 at initialisation (for a zero-input gate).
        p0 = sc.gate_init_frac or sc.capacity
        bias0 = from_values([0.0, math.log(p0 / (1.0 - p0)) if p0 < 1 else 10.0])
        if sc.gate == "linear":
            self.gate_hidden = None
            self.gate_out = Dense(d, 2, axes=("embed", "gate"), rngs=rngs, use_bias=True, bias_init=bias0,
                                  dtype=jnp.float32, param_dtype=pdt)
        else:
            hidden = sc.gate_hidden or max(d // 4, 1)
            self.gate_hidden = Dense(d, hidden, axes=("embed", "mlp"), rngs=rngs, use_bias=True,
                                     dtype=jnp.float32, param_dtype=pdt)
            self.gate_out = Dense(hidden, 2, axes=("mlp", "gate"), rngs=rngs, use_bias=True, bias_init=bias0,
                                  dtype=jnp.float32, param_dtype=pdt)
        self.attn = AttentionProjections(
            d, num_heads=sc.num_heads, num_kv_heads=sc.num_kv_heads, head_dim=sc.head_dim, rngs=rngs,
            rope_theta=sc.rope_theta if sc.positional == "rope" else None, out_scale=1.0,
            dtype=dt, param_dtype=pdt,
        )
        self.mlp_norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        self.mlp = SwiGLU(d, sc.d_intermediate or swiglu_hidden(d), rngs=rngs, out_scale=out_scale,
                          dtype=dt, param_dtype=pdt)

    # -- gate ----------------------------------------------------------------------------------
    def gate_logits(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.gate_hidden is not None:
            x = jax.nn.silu(self.gate_hidden(x))
        return self.gate_out(x).astype(jnp.float32)

    def tau(self, step) -> jax.Array:
        sc = self.sc
        if step is None or sc.tau_anneal_rate == 0:
            return jnp.float32(sc.tau)
        return jnp.maximum(sc.tau_min, sc.tau * jnp.exp(-sc.tau_anneal_rate * jnp.asarray(step, jnp.float32)))

    def select(self, s: jax.Array, *, key, train: bool, step=None, positions=None):
        """``(m, hard, alpha)`` from gate logits ``s (..., 2)``.

        Training: straight-through Gumbel-softmax with noise from ``key``. Evaluation
        (``eval_selection="sampled"``): the hard sample with :func:`position_gumbel` noise from
        ``key`` (the model passes each SAL its own; default ``key(eval_seed)``) and ``positions``
        (same shape as ``s[..., 0]``); ``"threshold"``: ``[s_1 > s_0]``.
        """
        alpha = jax.nn.sigmoid(s[..., 1] - s[..., 0])  # = softmax(s)[1]
        if train:
            if key is None:
                raise ValueError("SAL: training mode needs a PRNG key for the Gumbel noise")
            m, hard = straight_through_gumbel(s, key, self.tau(step))
        elif self.sc.eval_selection == "sampled":
            if positions is None:
                raise ValueError("SAL: sampled evaluation selection needs the tokens' positions")
            key = jax.random.key(self.sc.eval_seed) if key is None else key
            g = position_gumbel(key, positions)
            hard = (s[..., 1] + g[..., 1] > s[..., 0] + g[..., 0]).astype(jnp.float32)
            m = hard
        else:
            hard = (s[..., 1] > s[..., 0]).astype(jnp.float32)
            m = hard
        return m, hard, alpha

    def _mlp(self, h):
        return h + self.mlp(self.mlp_norm(h)).astype(h.dtype)

    def cache_size(self) -> int:
        return self.sc.window

    def init_cache(self, batch: int, kv_len: int | None = None):
        del kv_len  # the ring buffer holds the window, whatever the context
        sc = self.sc
        return _empty_ring(batch, self.cache_size(), sc.num_kv_heads, sc.head_dim, self.dtype)

    # -- whole sequence ------------------------------------------------------------------------
    def __call__(self, h, *, segment_ids=None, cache=None, return_cache=False, key=None, train=False,
                 step=None, gate_logits=None, return_selection=False):
        """A whole sequence, or a segment continuing from ``cache`` (streaming evaluation).

        With a cache, the segment's tokens sit at positions ``cache["t"]`` onward and every selected
        query attends the ring buffer's keys and the segment's own (exactly the dense-mode result
        of one pass over the whole text; no overflow). ``return_selection`` adds the per-token
        hard selection ``selected`` and ``alpha`` (both ``(b, l)`` float32) to aux.
        ``gate_logits`` (tests only) replaces the gate's output, to check the maths exactly.
        """
        sc = self.sc
        b, l, _ = h.shape
        x = self.norm(h)
        s = self.gate_logits(x) if gate_logits is None else gate_logits.astype(jnp.float32)
        if cache is None:
            positions = positions_from_segments(segment_ids, b, l)
        else:
            positions = _segment_positions(cache, segment_ids, l, "SAL")
        m, hard, alpha = self.select(s, key=key, train=train, step=step, positions=positions)
        valid = jnp.ones_like(hard, bool) if sc.kv_source == "all" else hard > 0
        k, v = self.attn.kv(x, positions)
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        overflow = jnp.zeros((), jnp.float32)
        if cache is not None:
            q = self.attn.q(x, positions)
            o = cached_attention(q, positions, cache, k, v, jnp.where(valid, positions, -1), window=sc.window,
                                 impl=sc.impl)
            h = h + (m * alpha)[..., None] * (self.attn.out(o).astype(h.dtype) - h)
        elif sc.attention == "dense":
            q = self.attn.q(x, positions)
            key_mask = hard > 0 if sc.kv_source == "selected" else None
            o = self.attn.out(dense_causal_attention(q, k, v, window=sc.window, segment_ids=segment_ids,
                                                     key_mask=key_mask, implementation=sc.dense_impl or None))
            h = h + (m * alpha)[..., None] * (o.astype(h.dtype) - h)
        else:
            h, overflow = self._gathered(h, x, k, v, m, hard, alpha, s, positions, segment_ids)
        new_cache = None
        if return_cache:
            if cache is None:
                new_cache = _prefill_ring(k, v, valid, self.cache_size(), self.dtype)
            else:
                new_cache = _ring_append(cache, k, v, positions, valid)
        h = self._mlp(h)
        aux = {
            "selected_frac": jnp.mean(hard),
            "budget_loss": budget_loss(m, sc.capacity),
            "overflow": overflow,
        }
        if return_selection:
            aux["selected"] = hard
            aux["alpha"] = alpha
        return h, new_cache, aux

    def _gathered(self, h, x, k, v, m, hard, alpha, s, positions, segment_ids):
        sc = self.sc
        b, l, _ = h.shape
        k_max = min(l, max(1, math.ceil(sc.capacity_factor * sc.capacity * l)))
        margin = jnp.where(hard > 0, s[..., 1] - s[..., 0], -jnp.inf)
        vals, idx = jax.lax.top_k(margin, k_max)  # highest margin first; overflow drops the lowest
        valid = jnp.isfinite(vals)
        idx = jnp.sort(jnp.where(valid, idx, l), axis=-1)  # token order; invalid (= l) at the end
        valid = idx < l
        idx_c = jnp.minimum(idx, l - 1)
        take = lambda a: jnp.take_along_axis(a, idx_c.reshape(b, k_max, *([1] * (a.ndim - 2))), axis=1)
        q_pos = jnp.where(valid, idx, -1).astype(jnp.int32)
        x_sel, pos_sel = take(x), take(positions)
        seg = None if segment_ids is None else segment_ids
        seg_sel = None if seg is None else take(seg)
        q = self.attn.q(x_sel, pos_sel)
        if sc.kv_source == "all":
            kv_pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
            kq, vq, kv_seg = k, v, seg
        else:
            kv_pos, kq, vq, kv_seg = q_pos, take(k), take(v), seg_sel
        o = pallas_kernels.gathered_attention(
            q, kq, vq, q_pos, kv_pos, window=sc.window, q_segment_ids=seg_sel, kv_segment_ids=kv_seg,
            impl=sc.impl,
        )
        o = self.attn.out(o).astype(h.dtype)
        w = jnp.where(valid, take(m) * take(alpha), 0.0)
        delta = w[..., None] * (o - take(h))
        h = h.at[jnp.arange(b)[:, None], idx_c].add(delta)
        overflow = jnp.sum(jnp.maximum(jnp.sum(hard, axis=-1) - k_max, 0.0))
        return h, overflow

    # -- one token -----------------------------------------------------------------------------
    def step(self, h, cache, key=None):
        """One token per sequence; ``key``: this SAL's evaluation-noise key (as in ``__call__``)."""
        sc = self.sc
        x = self.norm(h)
        s = self.gate_logits(x)
        pos = cache["t"]
        _, hard, alpha = self.select(s, key=key, train=False, positions=pos)
        k, v = self.attn.kv(x[:, None], pos[:, None])
        write = jnp.ones_like(hard, bool) if sc.kv_source == "all" else hard > 0
        cache = _ring_write(cache, k[:, 0], v[:, 0], pos, write)
        q = self.attn.q(x[:, None], pos[:, None])[:, 0]
        o = ring_attention_step(q, cache["k"], cache["v"], cache["pos"], pos, window=sc.window)
        o = self.attn.out(o).astype(h.dtype)
        h = h + (hard * alpha)[:, None] * (o - h)
        return self._mlp(h), cache


class AttentionBlock(nnx.Module):
    """Transformer++ layer: ``h += Attn(RMSNorm(h))`` (RoPE, causal), ``h += SwiGLU(RMSNorm(h))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        ac = cfg.attention
        self.ac = ac
        d = cfg.d_model
        dt, pdt = cfg.compute_dtype, cfg.weight_dtype
        self.dtype = dt
        out_scale = 1.0 / math.sqrt(2 * len(cfg.blocks))
        self.norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        self.attn = AttentionProjections(
            d, num_heads=ac.num_heads, num_kv_heads=ac.num_kv_heads, head_dim=ac.head_dim, rngs=rngs,
            rope_theta=ac.rope_theta if ac.positional == "rope" else None, out_scale=out_scale,
            dtype=dt, param_dtype=pdt,
        )
        self.mlp_norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        self.mlp = SwiGLU(d, ac.d_intermediate or swiglu_hidden(d), rngs=rngs, out_scale=out_scale,
                          dtype=dt, param_dtype=pdt)

    @property
    def window(self) -> int:
        return self.ac.window or FULL_WINDOW

    def cache_size(self) -> int:
        return self.ac.window or self.ac.max_decode_len

    def init_cache(self, batch: int, kv_len: int | None = None):
        """An empty KV cache; ``kv_len`` sizes a full-attention cache (default ``max_decode_len``)."""
        size = self.ac.window or (kv_len or self.ac.max_decode_len)
        return _empty_ring(batch, size, self.ac.num_kv_heads, self.ac.head_dim, self.dtype)

    def _mlp(self, h):
        return h + self.mlp(self.mlp_norm(h)).astype(h.dtype)

    def __call__(self, h, *, segment_ids=None, cache=None, return_cache=False, key=None, train=False, step=None,
                 return_selection=False):
        """A whole sequence, or a segment continuing from ``cache`` (its tokens at ``cache["t"]`` on).

        With full attention (``window == 0``) the cache must hold every earlier token plus this
        segment: ``max_decode_len`` (or ``init_cache(..., kv_len=)``) >= the whole text.
        """
        del key, train, step, return_selection
        b, l, _ = h.shape
        x = self.norm(h)
        if cache is None:
            positions = positions_from_segments(segment_ids, b, l)
        else:
            positions = _segment_positions(cache, segment_ids, l, "attention block")
            if not self.ac.window:
                check_cache_room(cache, l, "attention block")
        q = self.attn.q(x, positions)
        k, v = self.attn.kv(x, positions)
        if cache is None:
            o = dense_causal_attention(q, k, v, window=self.window, segment_ids=segment_ids,
                                       implementation=self.ac.impl or None)
        else:
            o = cached_attention(q, positions, cache, k, v, positions, window=self.window)
        h = h + self.attn.out(o).astype(h.dtype)
        new_cache = None
        if return_cache:
            if cache is not None:
                new_cache = _ring_append(cache, k, v, positions, jnp.ones((b, l), bool))
            else:
                if self.ac.window == 0 and l > self.ac.max_decode_len:
                    raise ValueError(f"prompt of {l} tokens exceeds attention.max_decode_len={self.ac.max_decode_len}")
                new_cache = _prefill_ring(k, v, jnp.ones((b, l), bool), self.cache_size(), self.dtype)
        return self._mlp(h), new_cache, {}

    def step(self, h, cache, key=None):
        del key
        x = self.norm(h)
        pos = cache["t"]
        k, v = self.attn.kv(x[:, None], pos[:, None])
        cache = _ring_write(cache, k[:, 0], v[:, 0], pos, jnp.ones_like(pos, bool))
        q = self.attn.q(x[:, None], pos[:, None])[:, 0]
        o = ring_attention_step(q, cache["k"], cache["v"], cache["pos"], pos, window=self.window)
        h = h + self.attn.out(o).astype(h.dtype)
        return self._mlp(h), cache
