"""Mosaic TPU (Pallas) flash-attention kernels for gathered attention, forward and backward.

Inputs are validated by :func:`pallas_kernels.gathered_attention.api.gathered_attention`.
Same contract as :func:`~pallas_kernels.gathered_attention.reference.gathered_attention_reference`
for float32 / bfloat16 inputs; valid positions must be non-decreasing along each row with the
padding (negative positions) at the end -- repeated positions are fine (unlike ``"xla"``).

Layout. ``q, k, v`` are transposed to head-major ``(b, h, s, d)`` and padded along ``s`` to a
multiple of the block size (padding rows get position ``-1``), so every block's last two dims
are ``(block, d)`` with ``d`` the full dim. Per-row integer data (positions, segment ids) goes
in two TPU-friendly forms, as in JAX's splash attention: "lanes" ``(b, s, 128)`` (a column
``(block, 1)`` inside the kernel) and "sublanes" ``(b, 8, s)`` (a row ``(1, block)``). The
softmax statistics ``logsumexp`` and ``di = rowsum(do * out)`` are ``(b, hq, 1, s)`` rows.

Block skipping. For each ``(batch row, query block)`` the admissible keys lie in the kv index
range ``[#{kv_pos < min q_pos - window + 1}, #{kv_pos <= max q_pos})`` (binary searches on the
sorted valid kv positions, plain JAX outside the kernel). Its first kv block and number of kv
blocks are scalar-prefetched (``pltpu.PrefetchScalarGridSpec``); the grid's kv axis has the
static extent ``cdiv(skv, block_kv)``, step ``j`` processes kv block ``first + min(j, count - 1)``
and is skipped by ``pl.when(j < count)`` beyond the count. Since the block index does not
change over skipped steps the pipeline does not fetch anything for them: the work and the HBM
traffic are proportional to the visited blocks, only the grid bookkeeping is
``O(skv / block_kv)`` per query block. The dk/dv kernel does the same the other way round:
for each kv block, the query blocks holding ``kv_pos_min <= q_pos <= kv_pos_max + window - 1``.
Inside a block the exact rule (positions, window, segments, padding) masks the scores.

Kernels (all float32 statistics and accumulators in VMEM scratch):

* forward, grid ``(b, hq, nq, nkv)``: online softmax; writes ``out`` (``q.dtype``) and
  ``logsumexp`` (0 for rows without an admissible key, whose output is exactly 0);
* dq, grid ``(b, hq, nq, nkv)``: ``dq = scale * sum_j ds_ij k_j``;
* dk/dv, grid ``(b, hkv, nkv, hq // hkv, nq)``: transposed scores ``(block_kv, block_q)``,
  accumulated over the query heads of the kv head's group and the visited query blocks;
  keys that no query attends get exactly zero gradient.

Masked probabilities are set to exactly 0 with ``where`` (never ``exp(-inf)`` arithmetic), so
no NaN appears for empty rows, and the gradients of non-admissible pairs are exactly 0.

Precision: float32 inputs use ``Precision.HIGHEST`` matmuls; bfloat16 inputs feed the MXU in
bfloat16 (the probabilities are cast to bfloat16 for ``p @ v``, as in standard flash
attention) with float32 accumulation.

Limitations: the grid's kv (dk/dv: query) axis is statically ``cdiv(skv, block_kv)``
(``cdiv(sq, block_q)``) long, so very long sequences pay ~``n_q_blocks * n_kv_blocks`` cheap
skipped grid steps per head; GQA query heads of a group are separate grid rows in the forward
and dq kernels (k/v blocks are fetched once per query head); positions are used as int32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gathered_attention.plan import (  # noqa: F401 (re-exported for tests)
    _round_up,
    kv_blocks_per_q_block,
    pad_rows,
    q_blocks_per_kv_block,
)

NUM_LANES = 128
NUM_SUBLANES = 8
_I32_MAX = 2**31 - 1
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(mask - mask) is not NaN
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def unsupported_reason(*arrays: jax.Array) -> str | None:
    """Why the TPU kernel cannot run these ``q, k, v`` (``None`` if it can)."""
    for name, a in zip("qkv", arrays):
        if jnp.dtype(a.dtype) not in SUPPORTED_DTYPES:
            return f"{name} has dtype {a.dtype}; the Pallas TPU kernel supports float32 and bfloat16 only"
    return None


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel parameters (hashable: a ``custom_vjp`` non-differentiable argument)."""

    window: int
    block_q: int
    block_kv: int
    groups: int  # hq // hkv
    has_seg: bool
    interpret: Any  # False or a pltpu.InterpretParams


# --------------------------------------------------------------------------- host-side planning


def _pick_block(size: int, block: int) -> int:
    """``block``, or the whole (8-rounded) axis when that is smaller (a full dim is tiling-legal)."""
    whole = _round_up(max(size, 1), NUM_SUBLANES)
    return whole if whole <= block else block



# --------------------------------------------------------------------------- in-kernel helpers


def _admissible(shape, qp, kp, window: int, qs=None, ks=None):
    """Exact attention rule as a ``shape`` mask from int32 row / column tiles.

    The integer tiles are broadcast to ``shape`` first so that only full-shape boolean
    vectors are combined.
    """
    qp, kp = jnp.broadcast_to(qp, shape), jnp.broadcast_to(kp, shape)
    if qs is not None:
        qs, ks = jnp.broadcast_to(qs, shape), jnp.broadcast_to(ks, shape)
    diff = qp - kp
    mask = (qp >= 0) & (kp >= 0) & (diff >= 0)
    if window < _I32_MAX:
        mask = mask & (diff < window)
    if qs is not None:
        mask = mask & (qs == ks)
    return mask


def _dot(a, b, dims, precision):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _precision(dtype) -> Any:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _div(h, g: int):
    """``h // g`` for a non-negative grid index (``lax.div``: no sign fix-up in the index map)."""
    return h if g == 1 else lax.div(h, g)


def _clamped(first_ref, count_ref, idx, step):
    """Block visited at ``step``: ``first + min(step, count - 1)`` (constant over skipped steps)."""
    return first_ref[idx] + jnp.maximum(jnp.minimum(step, count_ref[idx] - 1), 0)


# --------------------------------------------------------------------------- forward


def _fwd_kernel(first_ref, count_ref, scale_ref, q_ref, k_ref, v_ref, qpos_ref, kvpos_ref, *rest,
                cfg: _Config, n_q: int, n_kv: int, precision):
    if cfg.has_seg:
        qseg_ref, kvseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    else:
        o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    count = count_ref[bi * n_q + i]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j < count)
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot(q, k, _NT, precision) * scale_ref[0]  # (bq, bkv)
        seg = (qseg_ref[:, :1], kvseg_ref[:1, :]) if cfg.has_seg else ()
        mask = _admissible(s.shape, qpos_ref[:, :1], kvpos_ref[:1, :], cfg.window, *seg)
        s = jnp.where(mask, s, _MASK_VALUE)
        m_prev = m_scr[...]  # (bq, 128), lane-broadcast
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + _dot(p.astype(v.dtype), v, _NN, precision)

    @pl.when(j == n_kv - 1)
    def _finish():
        l = l_scr[...]  # (bq, 128); 0 exactly for rows without an admissible key
        has_key = l > 0.0
        l_safe = jnp.where(has_key, l, 1.0)
        inv = jnp.where(has_key, 1.0 / l_safe, 0.0)
        o_ref[...] = (acc_scr[...] * inv[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_key, m_scr[...] + jnp.log(l_safe), 0.0)


def _lanes(a: jax.Array) -> jax.Array:
    """(b, s) -> (b, s, 128): a column per block inside the kernel."""
    return jnp.broadcast_to(a[:, :, None], (*a.shape, NUM_LANES))


def _sublanes(a: jax.Array) -> jax.Array:
    """(b, s) -> (b, 8, s): a row per block inside the kernel."""
    return jnp.broadcast_to(a[:, None, :], (a.shape[0], NUM_SUBLANES, a.shape[1]))


def _forward(cfg: _Config, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, kv_first, kv_count):
    """Head-major padded inputs -> ``out (b, hq, sq, d)`` and ``logsumexp (b, hq, sq)``."""
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    bq, bkv, g = cfg.block_q, cfg.block_kv, cfg.groups
    n_q, n_kv = sq // bq, skv // bkv
    precision = _precision(q.dtype)

    def q_map(bi, h, i, j, first, count):
        return bi, h, i, 0

    def kv_map(bi, h, i, j, first, count):
        return bi, _div(h, g), _clamped(first, count, bi * n_q + i, j), 0

    def qrow_map(bi, h, i, j, first, count):
        return bi, i, 0

    def kvrow_map(bi, h, i, j, first, count):
        return bi, 0, _clamped(first, count, bi * n_q + i, j)

    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM),
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bkv, d), kv_map),
        pl.BlockSpec((None, None, bkv, d), kv_map),
        pl.BlockSpec((None, bq, NUM_LANES), qrow_map),
        pl.BlockSpec((None, NUM_SUBLANES, bkv), kvrow_map),
    ]
    args = [scale, q, k, v, _lanes(q_pos), _sublanes(kv_pos)]
    if cfg.has_seg:
        in_specs += [in_specs[-2], in_specs[-1]]
        args += [_lanes(q_seg), _sublanes(kv_seg)]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_q=n_q, n_kv=n_kv, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hq, n_q, n_kv),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # running max m
                pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # running denominator l
                pltpu.VMEM((bq, d), jnp.float32),  # unnormalised output
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, hq, sq, d), q.dtype),
            jax.ShapeDtypeStruct((b, hq, sq, NUM_LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="gathered_attention_fwd",
    )(kv_first, kv_count, *args)
    return out, lse[..., 0]


# --------------------------------------------------------------------------- backward: dq


def _dq_kernel(first_ref, count_ref, scale_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
               qpos_ref, kvpos_ref, *rest, cfg: _Config, n_q: int, n_kv: int, precision):
    if cfg.has_seg:
        qseg_ref, kvseg_ref, dq_ref, dq_scr = rest
    else:
        dq_ref, dq_scr = rest
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    count = count_ref[bi * n_q + i]
    scale = scale_ref[0]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(j < count)
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, _NT, precision) * scale  # (bq, bkv)
        seg = (qseg_ref[:, :1], kvseg_ref[:1, :]) if cfg.has_seg else ()
        mask = _admissible(s.shape, qpos_ref[:, :1], kvpos_ref[:1, :], cfg.window, *seg)
        lse = jnp.expand_dims(lse_ref[0], -1)  # (bq, 1)
        di = jnp.expand_dims(di_ref[0], -1)
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)
        dp = _dot(do, v, _NT, precision)
        ds = p * (dp - di)
        dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN, precision)

    @pl.when(j == n_kv - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dq(cfg: _Config, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, kv_first, kv_count, do, lse, di):
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    bq, bkv, g = cfg.block_q, cfg.block_kv, cfg.groups
    n_q, n_kv = sq // bq, skv // bkv

    def q_map(bi, h, i, j, first, count):
        return bi, h, i, 0

    def stat_map(bi, h, i, j, first, count):
        return bi, h, 0, i

    def kv_map(bi, h, i, j, first, count):
        return bi, _div(h, g), _clamped(first, count, bi * n_q + i, j), 0

    def qrow_map(bi, h, i, j, first, count):
        return bi, i, 0

    def kvrow_map(bi, h, i, j, first, count):
        return bi, 0, _clamped(first, count, bi * n_q + i, j)

    q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_map)
    stat_spec = pl.BlockSpec((None, None, 1, bq), stat_map)
    qrow_spec = pl.BlockSpec((None, bq, NUM_LANES), qrow_map)
    kvrow_spec = pl.BlockSpec((None, NUM_SUBLANES, bkv), kvrow_map)
    in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM), q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                qrow_spec, kvrow_spec]
    args = [scale, q, k, v, do, lse[:, :, None, :], di[:, :, None, :], _lanes(q_pos), _sublanes(kv_pos)]
    if cfg.has_seg:
        in_specs += [qrow_spec, kvrow_spec]
        args += [_lanes(q_seg), _sublanes(kv_seg)]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, n_q=n_q, n_kv=n_kv, precision=_precision(q.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hq, n_q, n_kv),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="gathered_attention_dq",
    )(kv_first, kv_count, *args)


# --------------------------------------------------------------------------- backward: dk, dv


def _dkv_kernel(first_ref, count_ref, scale_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                qpos_ref, kvpos_ref, *rest, cfg: _Config, n_q: int, n_kv: int, precision):
    if cfg.has_seg:
        qseg_ref, kvseg_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
    else:
        dk_ref, dv_ref, dk_scr, dv_scr = rest
    bi, c, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    count = count_ref[bi * n_kv + c]
    scale = scale_ref[0]

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(i < count)
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = _dot(k, q, _NT, precision) * scale  # (bkv, bq): transposed scores
        seg = (kvseg_ref[:, :1], qseg_ref[:1, :]) if cfg.has_seg else ()
        mask = _admissible(st.shape, qpos_ref[:1, :], kvpos_ref[:, :1], cfg.window, *seg[::-1])
        pt = jnp.where(mask, jnp.exp(st - lse_ref[...]), 0.0)  # lse row (1, bq)
        dv_scr[...] += _dot(pt.astype(do.dtype), do, _NN, precision)
        dpt = _dot(v, do, _NT, precision)
        dst = pt * (dpt - di_ref[...])
        dk_scr[...] += _dot(dst.astype(q.dtype), q, _NN, precision)

    @pl.when((gi == cfg.groups - 1) & (i == n_q - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv(cfg: _Config, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, q_first, q_count, do, lse, di):
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1:3]
    bq, bkv, g = cfg.block_q, cfg.block_kv, cfg.groups
    n_q, n_kv = sq // bq, skv // bkv

    def q_map(bi, h, c, gi, i, first, count):
        return bi, h * g + gi, _clamped(first, count, bi * n_kv + c, i), 0

    def stat_map(bi, h, c, gi, i, first, count):
        return bi, h * g + gi, 0, _clamped(first, count, bi * n_kv + c, i)

    def kv_map(bi, h, c, gi, i, first, count):
        return bi, h, c, 0

    def qrow_map(bi, h, c, gi, i, first, count):
        return bi, 0, _clamped(first, count, bi * n_kv + c, i)

    def kvrow_map(bi, h, c, gi, i, first, count):
        return bi, c, 0

    q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_map)
    stat_spec = pl.BlockSpec((None, None, 1, bq), stat_map)
    qrow_spec = pl.BlockSpec((None, NUM_SUBLANES, bq), qrow_map)
    kvrow_spec = pl.BlockSpec((None, bkv, NUM_LANES), kvrow_map)
    in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM), q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                qrow_spec, kvrow_spec]
    args = [scale, q, k, v, do, lse[:, :, None, :], di[:, :, None, :], _sublanes(q_pos), _lanes(kv_pos)]
    if cfg.has_seg:
        in_specs += [qrow_spec, kvrow_spec]
        args += [_sublanes(q_seg), _lanes(kv_seg)]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, n_q=n_q, n_kv=n_kv, precision=_precision(q.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, n_kv, g, n_q),
            in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name="gathered_attention_dkv",
    )(q_first, q_count, *args)


# --------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan):
    return _forward(cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan[0], plan[1])[0]


def _flash_fwd(cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan):
    out, lse = _forward(cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan[0], plan[1])
    return out, (q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan, out, lse = res
    kv_first, kv_count, q_first, q_count = plan
    do = do.astype(q.dtype)
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (b, hq, sq)
    common = (cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg)
    dq = _dq(*common, kv_first, kv_count, do, lse, di)
    dk, dv = _dkv(*common, q_first, q_count, do, lse, di)
    return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def gathered_attention_pallas_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    *,
    window: int,
    sm_scale: float | jax.Array,
    block_q: int,
    block_kv: int,
    interpret: Any = False,
) -> jax.Array:
    """Pallas TPU gathered attention; returns ``(b, sq, hq, d)`` in ``q.dtype``.

    Args:
        q, k, v, q_pos, kv_pos, q_seg, kv_seg: as for ``gathered_attention`` (validated);
            positions and segment ids are used as int32.
        window, sm_scale: as for ``gathered_attention`` (``sm_scale`` may be traced).
        block_q, block_kv: query / key block sizes; each is replaced by the whole axis
            (rounded up to 8) when that is smaller. On a real TPU a block smaller than its
            axis must be a multiple of 128 (the Mosaic tiling rule); interpret mode takes any.
        interpret: ``False`` (compile for TPU) or a ``pltpu.InterpretParams``.

    Differentiable w.r.t. ``q, k, v`` (custom VJP with the dq and dk/dv kernels).
    """
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1:3]
    if sq == 0 or skv == 0 or b == 0:
        return jnp.zeros(q.shape, q.dtype)
    out_dtype = q.dtype
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(reason)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)  # bf16 only if all are bf16
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    bq, bkv = _pick_block(sq, block_q), _pick_block(skv, block_kv)
    sq_pad, skv_pad = _round_up(sq, bq), _round_up(skv, bkv)
    if interpret is False:
        for name, blk, full in (("block_q", bq, sq_pad), ("block_kv", bkv, skv_pad)):
            if blk != full and blk % NUM_LANES:
                raise ValueError(f"{name}={blk} must be a multiple of {NUM_LANES} for the Pallas TPU kernel "
                                 f"(or cover the whole axis of {full}).")
    has_seg = q_seg is not None
    cfg = _Config(window=window, block_q=bq, block_kv=bkv, groups=hq // hkv, has_seg=has_seg,
                  interpret=interpret)

    def head_major(a, n):
        return jnp.pad(a, [(0, 0), (0, n - a.shape[1]), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    qp, kp, qs, ks = pad_rows(q_pos, kv_pos, q_seg, kv_seg, sq_pad, skv_pad)
    plan = (*kv_blocks_per_q_block(qp, kp, window, bq, bkv), *q_blocks_per_kv_block(qp, kp, window, bq, bkv))
    scale = jnp.reshape(jnp.asarray(sm_scale, jnp.float32), (1,))
    out = _flash(cfg, head_major(q, sq_pad), head_major(k, skv_pad), head_major(v, skv_pad), scale,
                 qp, kp, qs, ks, plan)
    return out.transpose(0, 2, 1, 3)[:, :sq].astype(out_dtype)
