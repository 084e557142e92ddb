"""The Mamba-2 mixer (state-spaces/mamba ``Mamba2``) in Flax NNX.

``in_proj -> [z | x | B | C | dt]``, depthwise causal conv1d + SiLU over ``xBC``, the SSD scan
(:func:`pallas_kernels.ssd`), gated RMSNorm ``norm(y * silu(z))`` with group size
``d_ssm / ngroups``, ``out_proj``. Initialisation follows mamba_ssm (see docs/assumptions.md).

The single ``in_proj`` of mamba_ssm is stored as three weights (``[z|x]``, ``[B|C]``, ``dt``) and the
depthwise conv as two (over ``x`` and over ``[B|C]``): mathematically identical (the conv is
depthwise, the projection is a concatenation of columns), but each piece gets its own logical axes
so tensor parallelism can shard heads without slicing across the concatenation.

Three ways to run it share one set of weights:
* ``__call__(u)``: a whole sequence (optionally continuing from a cache, optionally returning one);
* ``step(u_t, cache)``: one token, constant memory;
* ``init_cache(batch)``: zero states.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from pallas_kernels.ssd.api import document_index
from taipan_jax.layers.common import (
    Dense,
    GatedRMSNorm,
    Initializer,
    constant,
    make_param,
    scaled,
    torch_linear_init,
)
from taipan_jax.sharding import constrain, shard_map_by_logical

Cache = dict[str, jax.Array]


def _dt_bias_init(dt_min: float, dt_max: float, floor: float) -> Initializer:
    """mamba_ssm: dt ~ logU[dt_min, dt_max] floored, dt_bias = softplus^-1(dt)."""

    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _a_log_init(lo: float, hi: float) -> Initializer:
    def init(key, shape, dtype):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)

    return init


def causal_depthwise_conv(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    *,
    state: jax.Array | None = None,
    doc: jax.Array | None = None,
) -> jax.Array:
    """Causal depthwise conv over axis 1 of ``x (batch, l, *c)`` with taps ``w (k, *c)``.

    ``state (batch, k-1, *c)`` holds the inputs just before ``x`` (zeros when None). With ``doc``
    (the monotonic document index of each position, shape (batch, l)) taps never reach across a
    document boundary; the state belongs to document 0. Computed in float32.
    """
    k = w.shape[0]
    bsz, l = x.shape[:2]
    x = x.astype(jnp.float32)
    if state is None:
        state = jnp.zeros((bsz, k - 1, *x.shape[2:]), jnp.float32)
    xp = jnp.concatenate([state.astype(jnp.float32), x], axis=1)
    if doc is not None:
        doc_p = jnp.concatenate([jnp.zeros((bsz, k - 1), doc.dtype), doc], axis=1)
    out = jnp.zeros_like(x)
    extra = (1,) * (x.ndim - 2)
    for i in range(k):
        tap = xp[:, i : i + l]
        if doc is not None and i < k - 1:
            same = (doc_p[:, i : i + l] == doc).reshape(bsz, l, *extra)
            tap = jnp.where(same, tap, 0.0)
        out = out + tap * w[i].astype(jnp.float32)
    if b is not None:
        out = out + b.astype(jnp.float32)
    return out


def conv_state_after(x: jax.Array, k: int, state: jax.Array | None) -> jax.Array:
    """The last ``k-1`` conv inputs after consuming ``x`` (left context from ``state`` or zeros)."""
    bsz = x.shape[0]
    if state is None:
        state = jnp.zeros((bsz, k - 1, *x.shape[2:]), x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    return xp[:, xp.shape[1] - (k - 1) :]


class Mamba2Mixer(nnx.Module):
    def __init__(
        self,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        D_has_hdim: bool = False,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        out_scale: float = 1.0,
        ssd_impl: str = "auto",
        ssd_interpret: bool = False,
        ssd_shard_map: str = "auto",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"mamba: d_inner={d_inner} is not a multiple of headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"mamba: nheads={nheads} is not a multiple of ngroups={ngroups}")
        if d_conv < 1:
            raise ValueError(f"mamba: d_conv must be >= 1, got {d_conv}")
        self.d_model, self.d_inner, self.nheads = d_model, d_inner, nheads
        self.headdim, self.d_state, self.ngroups, self.d_conv = headdim, d_state, ngroups, d_conv
        self.chunk_size, self.dt_limit, self.ssd_impl = chunk_size, tuple(dt_limit), ssd_impl
        self.ssd_interpret, self.ssd_shard_map = ssd_interpret, ssd_shard_map
        self.dtype = dtype
        gn = ngroups * d_state
        common = dict(rngs=rngs, use_bias=bias, dtype=dtype, param_dtype=param_dtype)
        self.in_proj_zx = Dense(d_model, (2, d_inner), axes=("embed", None, "ssm_inner"), **common)
        self.in_proj_bc = Dense(d_model, (2, gn), axes=("embed", None, "ssm_state"), **common)
        self.in_proj_dt = Dense(d_model, nheads, axes=("embed", "ssm_heads"), **common)
        conv_init = torch_linear_init(d_conv)  # depthwise: fan_in = 1 * d_conv
        self.conv_x_w = make_param(rngs, conv_init, (d_conv, d_inner), ("conv_kernel", "ssm_inner"), param_dtype)
        self.conv_bc_w = make_param(rngs, conv_init, (d_conv, 2, gn), ("conv_kernel", None, "ssm_state"), param_dtype)
        if conv_bias:
            self.conv_x_b = make_param(rngs, conv_init, (d_inner,), ("ssm_inner",), param_dtype, weight_decay=False)
            self.conv_bc_b = make_param(rngs, conv_init, (2, gn), (None, "ssm_state"), param_dtype, weight_decay=False)
        else:
            self.conv_x_b = self.conv_bc_b = None
        self.dt_bias = make_param(
            rngs, _dt_bias_init(dt_min, dt_max, dt_init_floor), (nheads,), ("ssm_heads",),
            jnp.float32, weight_decay=False,
        )
        self.A_log = make_param(
            rngs, _a_log_init(*A_init_range), (nheads,), ("ssm_heads",), jnp.float32, weight_decay=False
        )
        d_shape, d_axes = ((nheads, headdim), ("ssm_heads", "ssm_head_dim")) if D_has_hdim else ((nheads,), ("ssm_heads",))
        self.D = make_param(rngs, constant(1.0), d_shape, d_axes, jnp.float32, weight_decay=False)
        self.norm = GatedRMSNorm(
            d_inner, d_inner // ngroups, rngs=rngs, eps=norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.out_proj = Dense(
            d_inner, d_model, axes=("ssm_inner", "embed"), rngs=rngs, use_bias=bias,
            kernel_init=scaled(torch_linear_init(d_inner), out_scale), dtype=dtype, param_dtype=param_dtype,
        )

    # -- helpers -------------------------------------------------------------------------------
    def _project(self, u: jax.Array):
        zx = self.in_proj_zx(u)
        bc = self.in_proj_bc(u)
        dt = self.in_proj_dt(u)
        return zx[..., 0, :], zx[..., 1, :], bc, dt

    def _conv_params(self):
        cxb = None if self.conv_x_b is None else self.conv_x_b[...]
        cbb = None if self.conv_bc_b is None else self.conv_bc_b[...]
        return self.conv_x_w[...], cxb, self.conv_bc_w[...], cbb

    def _ssd(self, x, dt, A, B, C, D, dt_bias, initial_state, segment_ids):
        """The SSD op; under ``jax.shard_map`` over batch and heads when it is a Pallas kernel.

        XLA cannot partition a Pallas custom call, so the kernel runs per shard: batch over the
        data axes, heads (and B/C groups when they divide) over the tensor axis.
        """
        optional = {"initial_state": initial_state, "segment_ids": segment_ids}
        present = [k for k, v in optional.items() if v is not None]

        def fn(x, dt, A, B, C, D, dt_bias, *opt):
            kw = dict(zip(present, opt))
            return pallas_kernels.ssd(
                x, dt, A, B, C, chunk_size=self.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                dt_min=self.dt_limit[0], dt_max=self.dt_limit[1], return_final_state=True,
                impl=self.ssd_impl, interpret=self.ssd_interpret, **kw,
            )

        args = (x, dt, A, B, C, D, dt_bias, *(optional[k] for k in present))
        mode = self.ssd_shard_map
        kernel = self.ssd_impl.startswith("pallas") or (
            self.ssd_impl == "auto" and jax.default_backend() in ("gpu", "tpu")
        )
        if mode == "never" or (mode == "auto" and not kernel):
            return fn(*args)
        mesh = jax.sharding.get_abstract_mesh()
        tp = 1 if mesh is None or mesh.empty else int(dict(mesh.shape).get("tensor", 1))
        # Heads may be split only if every shard keeps whole groups (or there is one group).
        heads = "ssm_heads" if (self.ngroups == 1 or self.ngroups % tp == 0) else None
        groups = "ssm_groups" if heads else None
        d_axes = (heads,) if D.ndim == 1 else (heads, None)
        logical_opt = {"initial_state": ("batch", heads, None, None), "segment_ids": ("batch", None)}
        return shard_map_by_logical(
            fn, args,
            in_logical=(("batch", None, heads, None), ("batch", None, heads), (heads,),
                        ("batch", None, groups, None), ("batch", None, groups, None), d_axes, (heads,),
                        *(logical_opt[k] for k in present)),
            out_logical=(("batch", None, heads, None), ("batch", heads, None, None)),
        )

    def init_cache(self, batch: int) -> Cache:
        k, gn = self.d_conv, self.ngroups * self.d_state
        return {
            "conv_x": jnp.zeros((batch, k - 1, self.d_inner), self.dtype),
            "conv_bc": jnp.zeros((batch, k - 1, 2, gn), self.dtype),
            "ssm": jnp.zeros((batch, self.nheads, self.headdim, self.d_state), jnp.float32),
        }

    # -- whole sequence ------------------------------------------------------------------------
    def __call__(
        self,
        u: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        return_cache: bool = False,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        bsz, l, _ = u.shape
        z, xr, bc, dt = self._project(u)
        xr = constrain(xr, ("batch", "length", "ssm_inner"))
        doc = None if segment_ids is None else document_index(segment_ids, bsz, l)
        cxw, cxb, cbw, cbb = self._conv_params()
        x = jax.nn.silu(causal_depthwise_conv(xr, cxw, cxb, state=None if cache is None else cache["conv_x"], doc=doc))
        bcc = jax.nn.silu(causal_depthwise_conv(bc, cbw, cbb, state=None if cache is None else cache["conv_bc"], doc=doc))
        x = x.astype(self.dtype).reshape(bsz, l, self.nheads, self.headdim)
        B = bcc[..., 0, :].astype(self.dtype).reshape(bsz, l, self.ngroups, self.d_state)
        C = bcc[..., 1, :].astype(self.dtype).reshape(bsz, l, self.ngroups, self.d_state)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, final_state = self._ssd(
            x, dt.astype(jnp.float32), A, B, C, self.D[...], self.dt_bias[...],
            None if cache is None else cache["ssm"], segment_ids,
        )
        y = y.reshape(bsz, l, self.d_inner)
        out = self.out_proj(self.norm(y, z))
        if not return_cache:
            return out
        k = self.d_conv
        new_cache = {
            "conv_x": conv_state_after(xr, k, None if cache is None else cache["conv_x"]).astype(self.dtype),
            "conv_bc": conv_state_after(bc, k, None if cache is None else cache["conv_bc"]).astype(self.dtype),
            "ssm": final_state,
        }
        return out, new_cache

    # -- one token -----------------------------------------------------------------------------
    def step(self, u: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """One token ``u (batch, d_model)`` -> ``(out (batch, d_model), new cache)``."""
        bsz = u.shape[0]
        z, xr, bc, dt = self._project(u)
        cxw, cxb, cbw, cbb = self._conv_params()

        def conv_step(state, xt, w, b):
            window = jnp.concatenate([state.astype(jnp.float32), xt[:, None].astype(jnp.float32)], axis=1)
            out = jnp.sum(window * w.astype(jnp.float32)[None], axis=1)
            if b is not None:
                out = out + b.astype(jnp.float32)
            return out, window[:, 1:].astype(state.dtype)

        x, conv_x = conv_step(cache["conv_x"], xr, cxw, cxb)
        bcc, conv_bc = conv_step(cache["conv_bc"], bc, cbw, cbb)
        x = jax.nn.silu(x).astype(self.dtype).astype(jnp.float32).reshape(bsz, self.nheads, self.headdim)
        bcc = jax.nn.silu(bcc).astype(self.dtype).astype(jnp.float32)
        rep = self.nheads // self.ngroups
        B = jnp.repeat(bcc[:, 0].reshape(bsz, self.ngroups, self.d_state), rep, axis=1)
        C = jnp.repeat(bcc[:, 1].reshape(bsz, self.ngroups, self.d_state), rep, axis=1)
        dtp = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])
        dtp = jnp.clip(dtp, self.dt_limit[0], self.dt_limit[1])
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        decay = jnp.exp(dtp * A)  # (b, h)
        ssm = cache["ssm"] * decay[:, :, None, None] + (dtp[:, :, None] * x)[..., None] * B[:, :, None, :]
        y = jnp.einsum("bhpn,bhn->bhp", ssm, C)
        D = self.D[...].astype(jnp.float32)
        y = y + (D[None, :, None] if D.ndim == 1 else D[None]) * x
        y = y.astype(self.dtype).reshape(bsz, self.d_inner)
        out = self.out_proj(self.norm(y, z))
        return out, {"conv_x": conv_x, "conv_bc": conv_bc, "ssm": ssm}


def mamba2_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :class:`Mamba2Mixer` from a ``Mamba2Config``."""
    return dict(
        d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim,
        ngroups=cfg.ngroups, chunk_size=cfg.chunk_size, A_init_range=tuple(cfg.A_init_range),
        dt_min=cfg.dt_min, dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
        dt_limit=tuple(cfg.dt_limit), D_has_hdim=cfg.D_has_hdim, conv_bias=cfg.conv_bias,
        bias=cfg.bias, ssd_impl=cfg.ssd_impl, ssd_interpret=cfg.ssd_interpret, ssd_shard_map=cfg.ssd_shard_map,
    )
