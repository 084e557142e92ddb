"""Mosaic TPU Pallas kernels for the chunked SSD scan: forward and backward.

Same contract and math as :func:`pallas_kernels.ssd.xla.ssd_xla` (read its docstring
first); inputs are preprocessed by :func:`pallas_kernels.ssd.api.ssd`.

Layout (no transposes of the big arrays: every reshape below is free)::

    x  (b, l, h, p) -> (b, nc, Q, h*p)    block (Q, hb*p)  = heads [head0, head0+hb) of a chunk
    B  (b, l, g, n) -> (b, nc, Q, g*n)    block (Q, n)     = group gi of a chunk (C alike)
    dt (b, l, h)    -> (b, nc, Q, h)      block (Q, h)     = all heads; a head's column is
    cs = cumsum_Q(dt * A), same layout                       picked with a one-hot lane mask
    doc (b, l)      -> (b, nc, 1, Q)      document index relative to the previous chunk's
                                          last token (float32, exact for small ints)
    y  (b, nc, Q, h*p) float32            same blocks as x
    state0 / final_state (b, h, p, n)     left in HBM (``pl.ANY``) and copied by DMA

Grid ``(b, g, nc, h // g // hb)``: batch and group are ``"parallel"``; the chunk
axis is sequential (``"arbitrary"``) and the per-group head-block axis is the
innermost sequential axis, so ``C B^T`` and the ``B``/``C`` blocks are loaded and
computed once per (batch, group, chunk) and reused by every head of the group
(``C B^T`` lives in a VMEM scratch), and the backward accumulates ``dB``/``dC``
over the group's heads in VMEM. The ``(p, n)`` float32 state of every head of the
group is carried across chunks in a ``(h // g, p, n)`` VMEM scratch.

Per chunk and head, with ``cs`` the in-chunk cumulative log-decay (computed by XLA
outside the kernel; its gradient flows back through ``jnp.cumsum``)::

    L_ij   = [doc_i == doc_j, j <= i] exp(cs_i - cs_j)      (masked to -inf before exp)
    y      = (C B^T * L * dt_j) x + [doc_t == doc_prev] exp(cs_t) C S_prev^T
    S_next = [doc_last == doc_prev] exp(cs_last) S_prev
             + ((x * [doc == doc_last] exp(cs_last - cs) dt)^T B)

``exp(cs_i - cs_j)`` is a difference of in-chunk cumulative sums (as in mamba_ssm's
Triton kernels), not the stable ``segsum`` of ``xla.py``: it loses about
``|cs| * 2^-24`` relative accuracy, i.e. ~1e-5 for ``|cs| ~ 100`` in a chunk, well
inside the tests' tolerances. ``D x`` is added outside the kernel (fused by XLA).

Backward: a ``jax.custom_vjp`` whose backward is a second Pallas kernel sweeping the
chunks in reverse order, carrying ``dL/dS`` in VMEM, recomputing the intra-chunk
terms, and reading the per-chunk incoming states saved by the forward kernel
(``(b, nc, h, p, n)`` float32 residual). It returns ``dx, dB, dC, d dt, d cs,
d state0``; the wrapper's ``cumsum``/``reshape`` autodiff turns ``d cs`` into
``d dt`` and ``d A``.

Float32 accumulation everywhere; float32 matmuls use ``Precision.HIGHEST``. ``x``,
``B``, ``C`` may be bfloat16 (``C B^T`` then runs natively in bf16 with float32
accumulation, which is exact per product).

Tiling rules for the compiled kernel (interpret mode does not enforce them):
``hb * p % 128 == 0`` (or ``hb == h`` when ``g == 1``) and ``n % 128 == 0`` (or
``g == 1``). Only Pallas-level lowering could be checked without a TPU (see
``tests/test_ssd_pallas_tpu.py``); Mosaic's own compilation was never run and no
timing exists. Things Mosaic might reject or do slowly, to look at first on a TPU:
the static lane-offset slices ``x_ref[:, k*p:(k+1)*p]`` when ``p % 128 != 0``
(odd heads start at lane 64 for ``p = 64``), the transposed-LHS matmuls
(``a.T @ b``), the ``(1, 1)`` per-chunk scalars kept as vectors, and the cost of
``Precision.HIGHEST`` (6-pass bf16) for the float32 matmuls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd.config import (
    TPU_DEFAULT_SCOPED_VMEM_BYTES,
    SSDBlockSizes,
    tpu_generation_defaults,
)

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel configuration (hashable: a ``custom_vjp`` nondiff argument)."""

    b: int
    nc: int
    q: int
    h: int
    g: int
    p: int
    n: int
    hb: int  # heads per block
    interpret: Any  # False or a pltpu.InterpretParams
    vmem_limit_bytes: int | None

    @property
    def hpg(self) -> int:
        return self.h // self.g

    @property
    def nhb(self) -> int:
        return self.hpg // self.hb


def _chip() -> str | None:
    """``"v4"``, ``"v5e"``, ... of the default device, or ``None`` off TPU / when unknown."""
    try:
        if jax.default_backend() != "tpu":
            return None
        return str(pltpu.get_tpu_info().chip_version)
    except Exception:  # noqa: BLE001 - unknown chip: conservative defaults
        return None


def _tile_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of a VMEM buffer of ``shape`` after (8 * packing, 128) tiling of the last two dims."""
    *lead, sub, lane = (1,) * max(0, 2 - len(shape)) + tuple(shape)
    sub_tile = 8 * max(1, 4 // itemsize)
    return math.prod(lead) * (-(-sub // sub_tile) * sub_tile) * (-(-lane // 128) * 128) * itemsize


def vmem_estimate_bytes(q: int, h: int, g: int, p: int, n: int, hb: int, x_itemsize: int = 4,
                        bc_itemsize: int = 4) -> int:
    """Rough VMEM need of the larger (backward) kernel: double-buffered blocks + scratch + temporaries.

    Temporaries are counted as 8 (forward) / 14 (backward) live ``(Q, Q)`` float32
    arrays plus 8 ``(Q, max(p, n))`` ones; the compiler may do better or worse.
    """
    hpg = h // g
    common = (_tile_bytes((q, hb * p), x_itemsize) + 2 * _tile_bytes((q, n), bc_itemsize)
              + 2 * _tile_bytes((q, h), 4) + _tile_bytes((1, q), 4))
    scratch = _tile_bytes((hpg, p, n), 4) + _tile_bytes((q, q), 4)
    small = 8 * _tile_bytes((q, max(p, n)), 4)
    fwd_io = common + _tile_bytes((q, hb * p), 4) + _tile_bytes((hb, p, n), 4)
    bwd_io = (common + _tile_bytes((hb, p, n), 4) + 2 * _tile_bytes((q, hb * p), 4)
              + 2 * _tile_bytes((q, n), 4) + 2 * _tile_bytes((q, hpg), 4))
    fwd = 2 * fwd_io + scratch + 8 * _tile_bytes((q, q), 4) + small
    bwd = 2 * bwd_io + scratch + 14 * _tile_bytes((q, q), 4) + small
    return max(fwd, bwd)


def _aligned_heads(k: int, h: int, g: int, p: int) -> bool:
    """Whether a ``(Q, k * p)`` block of the ``(.., Q, h * p)`` array satisfies TPU lane tiling."""
    return (k * p) % 128 == 0 or (g == 1 and k == h)


def _plan(h: int, g: int, p: int, n: int, q: int, x_itemsize: int, bc_itemsize: int,
          block_sizes: SSDBlockSizes, chip: str | None, compiled: bool) -> tuple[int | None, int | None, str | None]:
    """Choose ``(heads_per_block, vmem_limit_bytes, reason)``; ``reason`` is set when unsupported.

    ``compiled=False`` (interpret mode) ignores the TPU tiling rules.
    """
    hpg = h // g
    defaults = tpu_generation_defaults(chip)
    budget = defaults.vmem_budget_bytes
    if compiled and not (n % 128 == 0 or g == 1):
        return None, None, f"d_state n={n} must be a multiple of 128 when g={g} > 1 (TPU lane tiling of B/C)"
    est = functools.partial(vmem_estimate_bytes, q, h, g, p, n, x_itemsize=x_itemsize, bc_itemsize=bc_itemsize)
    requested = block_sizes.tpu_heads_per_block
    if requested is not None:
        if hpg % requested:
            raise ValueError(f"tpu_heads_per_block={requested} must divide h // g = {hpg}.")
        if compiled and not _aligned_heads(requested, h, g, p):
            raise ValueError(
                f"tpu_heads_per_block={requested} with headdim p={p}: heads_per_block * p must be a "
                f"multiple of 128 (TPU lane tiling){' or equal h' if g == 1 else ''}."
            )
        hb = requested
    else:
        divisors = [k for k in range(1, hpg + 1) if hpg % k == 0]
        cands = [k for k in divisors if _aligned_heads(k, h, g, p)]
        if not cands:
            if compiled:
                return None, None, (f"no heads-per-block k dividing h // g = {hpg} makes k * p (p={p}) a "
                                    "multiple of 128 (TPU lane tiling)")
            cands = [1]
        fitting = [k for k in cands if est(k) <= budget] or cands[:1]
        wide = [k for k in fitting if k * p >= defaults.mxu_lanes]
        hb = wide[0] if wide else fitting[-1]
    need = est(hb)
    limit = block_sizes.tpu_vmem_limit_bytes
    if limit is None and need > TPU_DEFAULT_SCOPED_VMEM_BYTES:
        limit = min(2 * need, budget)
    if compiled and need > budget:
        return hb, limit, (f"estimated VMEM {need / 2**20:.1f} MiB exceeds the {chip or 'default'} "
                           f"budget {budget / 2**20:.0f} MiB")
    return hb, limit, None


def unsupported_reason(x_shape: tuple[int, ...], B_shape: tuple[int, ...], block_sizes: SSDBlockSizes,
                       compute_dtype: Any, x_dtype: Any = jnp.float32, bc_dtype: Any = jnp.float32) -> str | None:
    """Why ``impl="auto"`` should not use the compiled TPU kernel for this call, or ``None``.

    Conservative on purpose (the kernel was never compiled by Mosaic here): requires a
    float32 compute dtype, ``chunk_size % 128 == 0``, ``p % 8 == 0``, ``n % 8 == 0``,
    the lane-tiling rules of :func:`_plan` and a VMEM estimate within the chip's budget.
    """
    if jnp.dtype(compute_dtype) != jnp.float32:
        return f"compute dtype {jnp.dtype(compute_dtype)} (the TPU kernel is float32 only)"
    _, _, h, p = x_shape
    g, n = B_shape[2:]
    chunk_size = block_sizes.chunk_size
    if chunk_size % 128:
        return f"chunk_size={chunk_size} is not a multiple of 128"
    if p % 8 or n % 8:
        return f"headdim p={p} and d_state n={n} must be multiples of 8"
    _, _, reason = _plan(h, g, p, n, chunk_size, jnp.dtype(x_dtype).itemsize, jnp.dtype(bc_dtype).itemsize,
                         block_sizes, _chip(), compiled=True)
    return reason


# --------------------------------------------------------------------------- in-kernel helpers


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    """float32-accumulated matmul; exact-ish (HIGHEST) when an operand is float32."""
    if a.dtype != b.dtype:
        a, b = a.astype(_F32), b.astype(_F32)
    precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _sum_rows(a: jax.Array) -> jax.Array:
    return jnp.sum(a, axis=1, keepdims=True)


def _sum_cols(a: jax.Array) -> jax.Array:
    return jnp.sum(a, axis=0, keepdims=True)


def _row_to_col(row: jax.Array, eye: jax.Array) -> jax.Array:
    """``(1, Q) -> (Q, 1)`` without a transpose (exact: one nonzero per row)."""
    return _sum_rows(jnp.where(eye, row, 0.0))


def _col_to_row(col: jax.Array, eye: jax.Array) -> jax.Array:
    """``(Q, 1) -> (1, Q)`` without a transpose (exact)."""
    return _sum_cols(jnp.where(eye, col, 0.0))


def _copy(src, dst, sem) -> None:
    """Blocking DMA ``src -> dst`` (HBM <-> VMEM) on the kernel's DMA semaphore."""
    copy = pltpu.make_async_copy(src, dst, sem)
    copy.start()
    copy.wait()


def _pick_lane(a: jax.Array, idx) -> jax.Array:
    """Column ``idx`` (traced) of ``a`` as ``(rows, 1)`` via a one-hot lane mask (exact)."""
    lanes = jax.lax.broadcasted_iota(jnp.int32, a.shape, 1)
    return _sum_rows(jnp.where(lanes == idx, a, 0.0))


@dataclasses.dataclass
class _ChunkMasks:
    eye: jax.Array  # (Q, Q) bool
    same: jax.Array  # (Q, Q) bool: same document and j <= i
    m_prev: jax.Array  # (Q, 1) bool: token is in the document of the previous chunk's last token
    m_last: jax.Array  # (Q, 1) bool: token is in the document of this chunk's last token
    carry: jax.Array  # (1, 1) bool: the state crosses this chunk (no document change in it)
    last_lane: jax.Array  # (1, Q) bool: lane Q - 1
    last_row: jax.Array  # (Q, 1) bool: row Q - 1


def _chunk_masks(doc_row: jax.Array, q: int) -> _ChunkMasks:
    """Masks from ``doc_row (1, Q)``: document index minus the previous chunk's last one."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    eye = rows == cols
    doc_col = _row_to_col(doc_row, eye)
    last_lane = jax.lax.broadcasted_iota(jnp.int32, (1, q), 1) == q - 1
    last_row = jax.lax.broadcasted_iota(jnp.int32, (q, 1), 0) == q - 1
    doc_last = _sum_rows(jnp.where(last_lane, doc_row, 0.0))  # (1, 1)
    return _ChunkMasks(
        eye=eye,
        same=(doc_col == doc_row) & (rows >= cols),
        m_prev=doc_col == 0.0,
        m_last=doc_col == doc_last,
        carry=doc_last == 0.0,
        last_lane=last_lane,
        last_row=last_row,
    )


@dataclasses.dataclass
class _HeadTerms:
    dt_col: jax.Array  # (Q, 1)
    dt_row: jax.Array  # (1, Q)
    L: jax.Array  # (Q, Q) masked exp(cs_i - cs_j)
    e_off: jax.Array  # (Q, 1) [doc_t == doc_prev] exp(cs_t)
    w_e: jax.Array  # (Q, 1) [doc_t == doc_last] exp(cs_last - cs_t)
    decay: jax.Array  # (1, 1) [carry] exp(cs_last)


def _head_terms(dt_all: jax.Array, cs_all: jax.Array, head, mk: _ChunkMasks) -> _HeadTerms:
    dt_col = _pick_lane(dt_all, head)
    cs_col = _pick_lane(cs_all, head)
    dt_row = _col_to_row(dt_col, mk.eye)
    cs_row = _col_to_row(cs_col, mk.eye)
    cs_last = _sum_rows(jnp.where(mk.last_lane, cs_row, 0.0))  # (1, 1)
    neg_inf = -jnp.inf
    return _HeadTerms(
        dt_col=dt_col,
        dt_row=dt_row,
        L=jnp.exp(jnp.where(mk.same, cs_col - cs_row, neg_inf)),
        e_off=jnp.exp(jnp.where(mk.m_prev, cs_col, neg_inf)),
        w_e=jnp.exp(jnp.where(mk.m_last, cs_last - cs_col, neg_inf)),
        decay=jnp.exp(jnp.where(mk.carry, cs_last, neg_inf)),
    )


# --------------------------------------------------------------------------- forward kernel


def _fwd_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, doc_ref, s0_hbm, y_ref, fin_hbm, *rest,
                cfg: _Config, save_states: bool):
    if save_states:
        states_ref, state_scr, cb_scr, sem = rest
    else:
        states_ref = None
        state_scr, cb_scr, sem = rest
    bi, gi, c, hk = (pl.program_id(i) for i in range(4))
    nc = pl.num_programs(2)
    q, p, hb = cfg.q, cfg.p, cfg.hb
    hl0 = hk * hb  # first head of the block, index within the group
    head0 = gi * cfg.hpg + hl0  # ... and global index

    @pl.when(c == 0)
    def _load_initial_state():
        _copy(s0_hbm.at[bi, pl.ds(head0, hb)], state_scr.at[pl.ds(hl0, hb)], sem)

    @pl.when(hk == 0)
    def _group_cb():
        cb_scr[...] = _dot(c_ref[...], b_ref[...], _NT)

    mk = _chunk_masks(doc_ref[...], q)
    cb = cb_scr[...]
    c_f = c_ref[...].astype(_F32)
    b_f = b_ref[...].astype(_F32)
    dt_all = dt_ref[...]
    cs_all = cs_ref[...]
    for k in range(hb):
        t = _head_terms(dt_all, cs_all, head0 + k, mk)
        x = x_ref[:, k * p:(k + 1) * p].astype(_F32)
        s_prev = state_scr[hl0 + k]
        y = _dot(cb * t.L * t.dt_row, x, _NN) + t.e_off * _dot(c_f, s_prev, _NT)
        y_ref[:, k * p:(k + 1) * p] = y
        if states_ref is not None:
            states_ref[k] = s_prev
        state_scr[hl0 + k] = t.decay * s_prev + _dot(t.w_e * t.dt_col * x, b_f, _TN)

    @pl.when(c == nc - 1)
    def _store_final_state():
        _copy(state_scr.at[pl.ds(hl0, hb)], fin_hbm.at[bi, pl.ds(head0, hb)], sem)


def _compiler_params(cfg: _Config) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"),
        vmem_limit_bytes=cfg.vmem_limit_bytes,
    )


def _specs(cfg: _Config, reverse: bool):
    """BlockSpecs shared by the forward and backward kernels (``reverse``: chunks last to first)."""
    q, h, p, n, hb, nhb, nc = cfg.q, cfg.h, cfg.p, cfg.n, cfg.hb, cfg.nhb, cfg.nc

    def chunk(c):
        return nc - 1 - c if reverse else c

    heads = pl.BlockSpec((None, None, q, hb * p), lambda bi, gi, c, hk: (bi, chunk(c), 0, gi * nhb + hk))
    group = pl.BlockSpec((None, None, q, n), lambda bi, gi, c, hk: (bi, chunk(c), 0, gi))
    tokens = pl.BlockSpec((None, None, q, h), lambda bi, gi, c, hk: (bi, chunk(c), 0, 0))
    doc = pl.BlockSpec((None, None, 1, q), lambda bi, gi, c, hk: (bi, chunk(c), 0, 0))
    states = pl.BlockSpec((None, None, hb, p, n), lambda bi, gi, c, hk: (bi, chunk(c), gi * nhb + hk, 0, 0))
    per_group_heads = pl.BlockSpec((None, None, None, q, cfg.hpg), lambda bi, gi, c, hk: (bi, gi, chunk(c), 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    return heads, group, tokens, doc, states, per_group_heads, hbm


def _cost(cfg: _Config, backward: bool, bytes_accessed: int) -> pl.CostEstimate:
    q, p, n = cfg.q, cfg.p, cfg.n
    per_head = 2 * q * q * p + 4 * q * p * n + (2 * q * q * n) // cfg.hpg
    scale = 3 if backward else 1
    return pl.CostEstimate(
        flops=int(scale * cfg.b * cfg.h * cfg.nc * per_head),
        transcendentals=int(cfg.b * cfg.h * cfg.nc * (q * q + 2 * q)),
        bytes_accessed=int(bytes_accessed),
    )


def _nbytes(*arrays) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)


def _forward(cfg: _Config, save_states: bool, x, B, C, dt, cs, doc, s0):
    heads, group, tokens, doc_spec, states, _, hbm = _specs(cfg, reverse=False)
    b, nc, q, h, p, n = cfg.b, cfg.nc, cfg.q, cfg.h, cfg.p, cfg.n
    out_shape = [jax.ShapeDtypeStruct((b, nc, q, h * p), _F32), jax.ShapeDtypeStruct((b, h, p, n), _F32)]
    out_specs = [heads, hbm]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, nc, h, p, n), _F32))
        out_specs.append(states)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, save_states=save_states),
        out_shape=tuple(out_shape),
        grid=(b, cfg.g, nc, cfg.nhb),
        in_specs=[heads, group, group, tokens, tokens, doc_spec, hbm],
        out_specs=tuple(out_specs),
        scratch_shapes=[pltpu.VMEM((cfg.hpg, p, n), _F32), pltpu.VMEM((q, q), _F32), pltpu.SemaphoreType.DMA(())],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, False, _nbytes(x, B, C, dt, cs, doc, s0) + 4 * (b * nc * q * h * p + b * h * p * n)),
        name="ssd_pallas_tpu_fwd",
    )(x, B, C, dt, cs, doc, s0)


# --------------------------------------------------------------------------- backward kernel


def _bwd_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, doc_ref, states_ref, dy_ref, dfin_hbm,
                dx_ref, db_ref, dc_ref, ddt_ref, dcs_ref, ds0_hbm, ds_scr, cb_scr, sem, *, cfg: _Config):
    bi, gi, c, hk = (pl.program_id(i) for i in range(4))
    nc = pl.num_programs(2)
    q, p, hb = cfg.q, cfg.p, cfg.hb
    hl0 = hk * hb
    head0 = gi * cfg.hpg + hl0

    @pl.when(c == 0)  # first step of the reverse sweep: the last chunk
    def _load_final_state_cotangent():
        _copy(dfin_hbm.at[bi, pl.ds(head0, hb)], ds_scr.at[pl.ds(hl0, hb)], sem)

    @pl.when(hk == 0)
    def _init_group():
        cb_scr[...] = _dot(c_ref[...], b_ref[...], _NT)
        db_ref[...] = jnp.zeros_like(db_ref)
        dc_ref[...] = jnp.zeros_like(dc_ref)
        ddt_ref[...] = jnp.zeros_like(ddt_ref)
        dcs_ref[...] = jnp.zeros_like(dcs_ref)

    mk = _chunk_masks(doc_ref[...], q)
    cb = cb_scr[...]
    c_f = c_ref[...].astype(_F32)
    b_f = b_ref[...].astype(_F32)
    dt_all = dt_ref[...]
    cs_all = cs_ref[...]
    hpg_lanes = jax.lax.broadcasted_iota(jnp.int32, (q, cfg.hpg), 1)
    db = jnp.zeros((q, cfg.n), _F32)
    dc = jnp.zeros((q, cfg.n), _F32)
    ddt_cols = jnp.zeros((q, cfg.hpg), _F32)
    dcs_cols = jnp.zeros((q, cfg.hpg), _F32)
    for k in range(hb):
        t = _head_terms(dt_all, cs_all, head0 + k, mk)
        x = x_ref[:, k * p:(k + 1) * p].astype(_F32)
        dy = dy_ref[:, k * p:(k + 1) * p]
        s_prev = states_ref[k]
        ds = ds_scr[hl0 + k]  # dL/d(state leaving this chunk)

        # Diagonal block: y_i += sum_j CB_ij L_ij dt_j x_j.
        cbl = cb * t.L
        w = cbl * t.dt_row
        gxy = _dot(dy, x, _NT)  # G_ij = dy_i . x_j
        p_dt = cbl * gxy  # d/d dt_j before the sum over i
        m = p_dt * t.dt_row  # = W * G: d/d cs_i (row sums), -d/d cs_j (column sums)
        gl = gxy * t.L * t.dt_row  # dL/d CB_ij
        ddt_row = _sum_cols(p_dt)
        dcs_row = -_sum_cols(m)
        dcs_col = _sum_rows(m)
        dc_k = _dot(gl, b_f, _NN)
        db_k = _dot(gl, c_f, _TN)
        dx = _dot(w, dy, _TN)

        # Off-diagonal: y_t += e_off_t C_t . S_prev.
        cs_prev = _dot(c_f, s_prev, _NT)  # (Q, p)
        dcs_col = dcs_col + t.e_off * _sum_rows(dy * cs_prev)
        dy_off = t.e_off * dy
        dc_k = dc_k + _dot(dy_off, s_prev, _NN)
        ds_prev = _dot(dy_off, c_f, _TN)

        # State passed on: S_next = decay S_prev + sum_j w_e_j dt_j x_j (x) B_j.
        x_ds = _dot(x, ds, _NN)  # (Q, n)
        u = _sum_rows(x_ds * b_f)  # dL/d(w_e_j dt_j)
        wj = t.w_e * t.dt_col
        db_k = db_k + wj * x_ds
        dx = dx + wj * _dot(b_f, ds, _NT)
        ddt_col = t.w_e * u
        wu = wj * u
        dcs_col = dcs_col - wu
        dcs_last = _sum_cols(wu) + t.decay * _sum_cols(_sum_rows(ds * s_prev))  # (1, 1)
        dcs_col = dcs_col + jnp.where(mk.last_row, dcs_last, 0.0)
        ds_scr[hl0 + k] = t.decay * ds + ds_prev

        dx_ref[:, k * p:(k + 1) * p] = dx
        db = db + db_k
        dc = dc + dc_k
        onehot = hpg_lanes == hl0 + k
        ddt_cols = ddt_cols + jnp.where(onehot, ddt_col + _row_to_col(ddt_row, mk.eye), 0.0)
        dcs_cols = dcs_cols + jnp.where(onehot, dcs_col + _row_to_col(dcs_row, mk.eye), 0.0)

    db_ref[...] += db
    dc_ref[...] += dc
    ddt_ref[...] += ddt_cols
    dcs_ref[...] += dcs_cols

    @pl.when(c == nc - 1)  # chunk 0 done: the cotangent of the initial state
    def _store_initial_state_cotangent():
        _copy(ds_scr.at[pl.ds(hl0, hb)], ds0_hbm.at[bi, pl.ds(head0, hb)], sem)


def _backward(cfg: _Config, x, B, C, dt, cs, doc, states, dy, dfin):
    heads, group, tokens, doc_spec, states_spec, per_group_heads, hbm = _specs(cfg, reverse=True)
    b, nc, q, h, g, p, n = cfg.b, cfg.nc, cfg.q, cfg.h, cfg.g, cfg.p, cfg.n
    out_shape = (
        jax.ShapeDtypeStruct((b, nc, q, h * p), _F32),  # dx
        jax.ShapeDtypeStruct((b, nc, q, g * n), _F32),  # dB
        jax.ShapeDtypeStruct((b, nc, q, g * n), _F32),  # dC
        jax.ShapeDtypeStruct((b, g, nc, q, cfg.hpg), _F32),  # d dt
        jax.ShapeDtypeStruct((b, g, nc, q, cfg.hpg), _F32),  # d cs
        jax.ShapeDtypeStruct((b, h, p, n), _F32),  # d state0
    )
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg),
        out_shape=out_shape,
        grid=(b, g, nc, cfg.nhb),
        in_specs=[heads, group, group, tokens, tokens, doc_spec, states_spec, heads, hbm],
        out_specs=(heads, group, group, per_group_heads, per_group_heads, hbm),
        scratch_shapes=[pltpu.VMEM((cfg.hpg, p, n), _F32), pltpu.VMEM((q, q), _F32), pltpu.SemaphoreType.DMA(())],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, True, 2 * _nbytes(x, B, C, dt, cs, doc, states, dy, dfin)),
        name="ssd_pallas_tpu_bwd",
    )(x, B, C, dt, cs, doc, states, dy, dfin)


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(cfg: _Config, x, B, C, dt, cs, doc, s0):
    y, fin = _forward(cfg, False, x, B, C, dt, cs, doc, s0)
    return y, fin


def _ssd_core_fwd(cfg: _Config, x, B, C, dt, cs, doc, s0):
    y, fin, states = _forward(cfg, True, x, B, C, dt, cs, doc, s0)
    return (y, fin), (x, B, C, dt, cs, doc, states)


def _ssd_core_bwd(cfg: _Config, residuals, cotangents):
    x, B, C, dt, cs, doc, states = residuals
    dy, dfin = cotangents
    dx, dB, dC, ddt, dcs, ds0 = _backward(cfg, x, B, C, dt, cs, doc, states,
                                         dy.astype(_F32), dfin.astype(_F32))
    b, nc, q, h = dt.shape

    def heads_last(a):  # (b, g, nc, Q, h // g) -> (b, nc, Q, h)
        return jnp.transpose(a, (0, 2, 3, 1, 4)).reshape(b, nc, q, h)

    return (dx.astype(x.dtype), dB.astype(B.dtype), dC.astype(C.dtype),
            heads_last(ddt).astype(dt.dtype), heads_last(dcs).astype(cs.dtype), None, ds0.astype(_F32))


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


# --------------------------------------------------------------------------- public entry


def ssd_pallas_tpu(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    initial_state: jax.Array,
    doc: jax.Array,
    block_sizes: SSDBlockSizes,
    *,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD on TPU with the contract of :func:`~pallas_kernels.ssd.xla.ssd_xla`.

    Args:
        x: ``(b, l, h, p)`` float32 or bfloat16.
        dt: ``(b, l, h)`` float32 preprocessed step sizes.
        A: ``(h,)`` float32.
        B, C: ``(b, l, g, n)`` float32 or bfloat16.
        D: ``(h, p)`` float32 or ``None``.
        initial_state: ``(b, h, p, n)`` float32.
        doc: ``(b, l)`` int32 monotonic document index starting at 0.
        block_sizes: ``chunk_size`` and the ``tpu_*`` fields of :class:`SSDBlockSizes`.
        interpret: ``True`` (or a ``pltpu.InterpretParams``) runs the kernels in TPU
            interpret mode on any backend.

    Returns:
        ``(y, final_state)``: ``(b, l, h, p)`` and ``(b, h, p, n)``, float32.

    Raises:
        NotImplementedError: for a float64 compute dtype.
        ValueError: for a ``tpu_heads_per_block`` that does not divide ``h // g`` or,
            when compiling for TPU, shapes that break the TPU tiling rules.
    """
    if any(a.dtype == jnp.float64 for a in (x, dt, A, B, C, initial_state) if a is not None):
        raise NotImplementedError("ssd impl='pallas_tpu' supports float32 (and bfloat16 x/B/C) only, not float64.")
    if interpret is True:
        interpret = pltpu.InterpretParams()
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    q = block_sizes.chunk_size
    hb, vmem_limit, reason = _plan(h, g, p, n, q, jnp.dtype(x.dtype).itemsize, jnp.dtype(B.dtype).itemsize,
                                   block_sizes, _chip(), compiled=not interpret)
    if reason is not None and hb is None:
        raise ValueError(f"ssd impl='pallas_tpu' cannot tile this call for TPU: {reason}.")

    pad = -l % q
    if pad:
        x, dt, B, C = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (x, dt, B, C))
        doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
    nc = (l + pad) // q
    cfg = _Config(b=b, nc=nc, q=q, h=h, g=g, p=p, n=n, hb=hb, interpret=interpret, vmem_limit_bytes=vmem_limit)

    dt4 = dt.astype(_F32).reshape(b, nc, q, h)
    cs4 = jnp.cumsum(dt4 * A.astype(_F32), axis=2)
    doc3 = doc.astype(jnp.int32).reshape(b, nc, q)
    doc_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), doc3[:, :-1, -1]], axis=1)
    doc_rel = (doc3 - doc_prev[:, :, None]).astype(_F32).reshape(b, nc, 1, q)

    y4, final_state = _ssd_core(
        cfg, x.reshape(b, nc, q, h * p), B.reshape(b, nc, q, g * n), C.reshape(b, nc, q, g * n),
        dt4, cs4, doc_rel, initial_state.astype(_F32),
    )
    y = y4.reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + D.astype(_F32) * x[:, :l].astype(_F32)
    return y, final_state
