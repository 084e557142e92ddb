"""Mosaic GPU (Pallas) flash-attention kernels for gathered attention, forward and backward.

Inputs are validated by :func:`pallas_kernels.gathered_attention.api.gathered_attention`.
Same contract as :func:`~pallas_kernels.gathered_attention.reference.gathered_attention_reference`
for float32 / bfloat16 / float16 inputs on Hopper (TMA + wgmma); valid positions must be
non-decreasing along each row with the padding (negative positions) at the end -- repeated
positions are fine (whole blocks are visited and masked exactly).

Layout: ``(b, s, h, d)`` as given (TMA reads ``(rows, d)`` boxes of one head), ``s`` padded to
the tile sizes with position ``-1``, ``d`` zero-padded to a multiple of 64.

Work decomposition (as in JAX's FlashAttention-3 Mosaic GPU example): every CTA has three
warpgroups, two compute warpgroups (64 rows each) and one memory warpgroup that streams the
other operand's blocks through ``stages`` shared-memory slots with TMA (``ready`` barriers
for the loads, ``consumed`` barriers that both compute warpgroups arrive on). The difference
from dense attention is the stream: for each CTA only the blocks that intersect its rows'
position window are streamed (the plan from :mod:`~pallas_kernels.gathered_attention.plan`:
first block and count, read as scalars from global memory), so the work is proportional to
the window, not to the sequence.

Kernels (float32 statistics and accumulators in registers):

* forward, grid ``(hq, query tiles of 128, b)``: online softmax in base 2; writes ``out`` and
  ``lse2`` (base-2 log-sum-exp of the scaled scores; 0 for rows without an admissible key,
  whose output is exactly 0);
* dq, same grid: ``dq = scale * sum_j ds_ij k_j`` with ``p = exp2(s * scale * log2e - lse2)``;
* dk/dv, grid ``(hkv, key tiles of 128, b)``: each compute warpgroup keeps 64 keys and streams
  ``(query head of the group, query block)`` pairs; keys that no query attends get exactly 0.

Inside the stream each block is classified from the ends of the sorted positions (scalars in
shared memory): skipped (no admissible pair for this warpgroup's 64 rows -- the CTA's range is
the union over its two warpgroups), processed without any mask (every pair admissible: the
interior of the window, most blocks when the window is long), or masked exactly (the window's
edges, padding, segments).

Masked scores use a finite mask value and masked probabilities are set to exactly 0 with
``where``, so rows without keys produce no NaN and non-admissible pairs have zero gradient.

Precision: bfloat16 inputs are bf16 wgmma operands (probabilities cast to bf16 for ``p @ v``,
as in standard flash attention) with float32 accumulation; other inputs (float32, float16)
are split into ``hi + lo`` bfloat16 parts and every product is three wgmmas
(``hi.hi + hi.lo + lo.hi``, the probabilities split the same way in registers): float32
accuracy (~1e-5 relative) at a third of the speed.

Limitations: head dim ``<= 256`` (bf16) / ``<= 128`` (split path) after padding to 64; the
shared-memory budget picks 2 (else 1) pipeline stages; GQA heads of a group re-stream their
keys per query head in the forward and dq kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._bf16_split import split_bf16, truncate_to_bf16
from pallas_kernels.gathered_attention.plan import (
    _I32_MAX,
    _round_up,
    kv_blocks_per_q_block,
    pad_rows,
    q_blocks_per_kv_block,
)

LOG2E = math.log2(math.e)
_MASK = -0.7 * float(np.finfo(np.float32).max)  # finite: exp2(mask - mask) is not NaN
_MAX_SMEM = 232448  # bytes per CTA on Hopper (227 KiB)
MAX_HEAD_DIM = 256
COMPUTE_WGS = 2
ROWS = 64  # rows per compute warpgroup (wgmma M)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel parameters (hashable: a ``custom_vjp`` non-differentiable argument)."""

    window: int
    groups: int  # hq // hkv
    nterm: int  # 1: bf16 operands; 2: hi/lo split
    has_seg: bool
    dp: int  # head dim padded to 64
    block_kv: int  # keys per streamed block (forward, dq)
    stages_fwd: int
    stages_dq: int
    stages_dkv: int
    interpret: bool


# --------------------------------------------------------------------------- support / planning


def _smem_fwd(nterm: int, dp: int, bkv: int, stages: int) -> int:
    res = COMPUTE_WGS * (nterm * ROWS * dp * 2 + 3 * ROWS * 4)
    return res + stages * (2 * nterm * bkv * dp * 2 + 2 * bkv * 4) + 1024


def _smem_dq(nterm: int, dp: int, bkv: int, stages: int) -> int:
    res = COMPUTE_WGS * (2 * nterm * ROWS * dp * 2 + 4 * ROWS * 4)
    return res + stages * (2 * nterm * bkv * dp * 2 + 2 * bkv * 4) + 1024


def _smem_dkv(nterm: int, dp: int, stages: int) -> int:
    res = COMPUTE_WGS * (2 * nterm * ROWS * dp * 2 + 2 * ROWS * 4)
    return res + stages * (2 * nterm * ROWS * dp * 2 + 4 * ROWS * 4) + 1024


def _plan(nterm: int, dp: int, block_kv: int, want: int) -> tuple[int, int, int, int] | None:
    """``(block_kv, stages_fwd, stages_dq, stages_dkv)`` that fit in shared memory, or ``None``.

    The streamed key block is ``block_kv`` (at most 64 for the split path), shrunk by 64 until
    every kernel fits with at least one stage; each kernel then gets up to ``want`` stages.
    """
    for bkv in range(block_kv if nterm == 1 else min(block_kv, 64), 0, -64):
        fwd = next((s for s in range(want, 0, -1) if _smem_fwd(nterm, dp, bkv, s) <= _MAX_SMEM), 0)
        dq = next((s for s in range(want, 0, -1) if _smem_dq(nterm, dp, bkv, s) <= _MAX_SMEM), 0)
        dkv = next((s for s in range(want, 0, -1) if _smem_dkv(nterm, dp, s) <= _MAX_SMEM), 0)
        if fwd and dq and dkv:
            return bkv, fwd, dq, dkv
    return None


def _nterm(dtype) -> int:
    return 1 if jnp.dtype(dtype) == jnp.bfloat16 else 2


def unsupported_reason(q: jax.Array, k: jax.Array, v: jax.Array, block_kv: int = 128,
                       stages: int = 2) -> str | None:
    """Why the Mosaic GPU kernels cannot run these ``q, k, v`` (``None`` if they can)."""
    for name, a in zip("qkv", (q, k, v)):
        if jnp.dtype(a.dtype) not in SUPPORTED_DTYPES:
            return (f"{name} has dtype {a.dtype}; the Pallas GPU kernel supports float32, bfloat16 "
                    "and float16 only")
    if block_kv % 64:
        return f"gpu_block_kv={block_kv} must be a multiple of 64"
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    nterm = _nterm(dtype)
    dp = _round_up(max(q.shape[-1], 1), 64)
    if dp > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if _plan(nterm, dp, block_kv, stages) is None:
        kind = "bfloat16" if nterm == 1 else f"{jnp.dtype(dtype).name} (hi/lo split)"
        return f"head dim {q.shape[-1]} with {kind} inputs exceeds the 227 KiB of shared memory per CTA"
    return None


# --------------------------------------------------------------------------- in-kernel helpers


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu


def _terms(nterm: int) -> list[tuple[int, int]]:
    return [(0, 0)] if nterm == 1 else [(0, 0), (0, 1), (1, 0)]


def _split_regs(x: jax.Array, nterm: int) -> tuple[jax.Array, ...]:
    """In-kernel ``hi (+ lo)`` bfloat16 parts of a float32 register array."""
    if nterm == 1:
        return (x.astype(jnp.bfloat16),)
    hi = truncate_to_bf16(x)
    return hi.astype(jnp.bfloat16), (x - hi).astype(jnp.bfloat16)


def _admissible(shape, qp, kp, q_dim: int, window: int, qs=None, ks=None):
    """Exact attention rule on a ``shape`` tile; ``qp`` runs along ``q_dim``, ``kp`` along the other."""
    k_dim = 1 - q_dim
    qp = lax.broadcast_in_dim(qp, shape, [q_dim])
    kp = lax.broadcast_in_dim(kp, shape, [k_dim])
    diff = qp - kp
    mask = (qp >= 0) & (kp >= 0) & (diff >= 0)
    if window < _I32_MAX:
        mask = mask & (diff < window)
    if qs is not None:
        mask = mask & (lax.broadcast_in_dim(qs, shape, [q_dim]) == lax.broadcast_in_dim(ks, shape, [k_dim]))
    return mask


SKIP, FULL, EDGE = 0, 1, 2


def _block_kind(q_first, q_last, k_first, k_last, cfg: _Config):
    """How a (query rows, key block) pair is processed, from the sorted positions' ends.

    Rows / keys are sorted with the padding (-1) at the end, so ``*_first`` is the smallest
    valid position (or -1: all padding) and ``*_last`` the largest (or -1: some padding).
    ``SKIP``: no pair can be admissible; ``FULL``: every pair is (no padding, no segments,
    all keys at or before every query and within the window), so no mask is computed;
    ``EDGE``: masked exactly.
    """
    w = jnp.int32(min(cfg.window, _I32_MAX))
    skip = ((q_first < 0) | (k_first < 0) | ((q_last >= 0) & (q_last < k_first))
            | ((k_last >= 0) & (q_first - k_last >= w)))
    if cfg.has_seg:
        full = jnp.zeros((), jnp.bool_)
    else:
        full = (q_last >= 0) & (k_last >= 0) & (q_first >= k_last) & (q_last - k_first < w)
    return jnp.where(skip, SKIP, jnp.where(full, FULL, EDGE)).astype(jnp.int32)


def _tiled(shape, dtype):
    plgpu = _plgpu()
    elems = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128)))


def _kernel_call(body, out_type, scratch, grid, grid_names, cfg: _Config):
    plgpu = _plgpu()
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=cfg.nterm == 1),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
    )


def _producer(count, stages: int, consumed, issue) -> None:
    """Memory warpgroup: stream ``count`` steps through ``stages`` slots."""
    plgpu = _plgpu()
    pl = _pl()
    for i in range(stages):
        pl.when(i < count)(lambda i=i: issue(jnp.int32(i), i))

    def body(i, carry):
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(consumed.at[slot])
        issue(i, slot)
        return carry

    lax.fori_loop(jnp.int32(stages), jnp.maximum(count, stages), body, None)
    # Observe the last steps' consumption too, so every barrier phase is waited on once.
    for j in range(stages):
        step = count - stages + j
        pl.when(step >= 0)(lambda step=step: plgpu.barrier_wait(consumed.at[lax.rem(step, jnp.int32(stages))]))


def _kv_block_issuer(k_refs, v_refs, kvpos_ref, kvseg_ref, k_s, v_s, kvm_s, ready, *, bi, kvh, first, bkv):
    """``issue(i, slot)`` for the forward / dq memory warpgroup: TMA the ``first + i``-th key block
    (k, v parts, positions, segment ids if ``kvseg_ref``) into ``slot``, all on ``ready[slot]``."""
    pl, plgpu = _pl(), _plgpu()

    def issue(i, slot):
        blk = pl.ds((first + i) * bkv, bkv)
        for t in range(len(k_refs)):
            plgpu.copy_gmem_to_smem(k_refs[t].at[bi, blk, kvh], k_s.at[slot, t], ready.at[slot])
            plgpu.copy_gmem_to_smem(v_refs[t].at[bi, blk, kvh], v_s.at[slot, t], ready.at[slot])
        plgpu.copy_gmem_to_smem(kvpos_ref.at[bi, blk], kvm_s.at[slot, 0], ready.at[slot])
        if kvseg_ref is not None:
            plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, blk], kvm_s.at[slot, 1], ready.at[slot])

    return issue


def _pl():
    import jax.experimental.pallas as pl

    return pl


def _mma_into(acc: jax.Array, mm, cfg: _Config) -> jax.Array:
    """``acc + (products issued by mm(acc_ref))``: accumulate in place (``run_state``) on the GPU;
    interpret mode cannot run ``run_state`` on a wgmma accumulator, so it adds a fresh one."""
    pl, plgpu = _pl(), _plgpu()
    if not cfg.interpret:
        return pl.run_state(mm)(plgpu.ACC.init(acc))

    def fresh(acc_ref):
        mm(acc_ref)
        return acc_ref[...]

    return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))


def _lhs(parts: tuple[jax.Array, ...], stage_ref, cfg: _Config):
    """wgmma left operands from registers: as they are on the GPU; staged through shared memory
    in interpret mode (whose wgmma reads both operands from shared memory)."""
    if not cfg.interpret:
        return parts
    for t, part in enumerate(parts):
        stage_ref[t] = part
    _plgpu().commit_smem()
    return tuple(stage_ref.at[t] for t in range(len(parts)))


def _stage_scratch(cfg: _Config, cols: int):
    """Shared memory for :func:`_lhs` (a placeholder on the GPU)."""
    shape = (COMPUTE_WGS, cfg.nterm, ROWS, cols) if cfg.interpret else (1, 1, 8, 64)
    return _tiled(shape, jnp.bfloat16)


def _set_registers(cfg: _Config, n: int, action: str) -> None:
    if not cfg.interpret:
        _plgpu().set_max_registers(n, action=action)


# --------------------------------------------------------------------------- forward


def _forward(cfg: _Config, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, kv_first, kv_count):
    """Padded inputs -> ``out (b, sq, hq, dp)`` (q.dtype) and ``lse2 (b, hq, sq)`` float32."""
    pl, plgpu = _pl(), _plgpu()
    b, sq, hq, dp = q.shape
    nt, S, bkv, g = cfg.nterm, cfg.stages_fwd, cfg.block_kv, cfg.groups
    n_tiles = sq // (COMPUTE_WGS * ROWS)
    qs_parts, ks_parts, vs_parts = split_bf16(q, nt), split_bf16(k, nt), split_bf16(v, nt)
    row_l, col_l = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    out_dtype = q.dtype
    n_res = nt + 1 + cfg.has_seg
    n_str = 2 * nt + 1 + cfg.has_seg

    def body(first_ref, count_ref, scale_ref, *refs):
        q_refs, k_refs, v_refs = refs[:nt], refs[nt:2 * nt], refs[2 * nt:3 * nt]
        rest = refs[3 * nt:]
        qpos_ref, kvpos_ref = rest[:2]
        rest = rest[2:]
        if cfg.has_seg:
            qseg_ref, kvseg_ref = rest[:2]
            rest = rest[2:]
        out_ref, lse_ref, q_s, k_s, v_s, qm_s, kvm_s, lse_s, res_bar, ready, consumed, lhs_s = rest
        h, tile, bi = lax.axis_index("h"), lax.axis_index("t"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        idx = bi * n_tiles + tile
        first, count = first_ref[idx], count_ref[idx]

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            _set_registers(cfg, 232, "increase")
            rows = pl.ds((tile * COMPUTE_WGS + wg) * ROWS, ROWS)
            for t in range(nt):
                plgpu.copy_gmem_to_smem(q_refs[t].at[bi, rows, h], q_s.at[wg, t], res_bar.at[wg])
            plgpu.copy_gmem_to_smem(qpos_ref.at[bi, rows], qm_s.at[wg, 0], res_bar.at[wg])
            if cfg.has_seg:
                plgpu.copy_gmem_to_smem(qseg_ref.at[bi, rows], qm_s.at[wg, 1], res_bar.at[wg])
            plgpu.barrier_wait(res_bar.at[wg])
            qp = plgpu.load(qm_s.at[wg, 0], layout=row_l)
            qsg = plgpu.load(qm_s.at[wg, 1], layout=row_l) if cfg.has_seg else None
            c = scale_ref[0] * LOG2E

            q_first, q_last = qm_s[wg, 0, 0], qm_s[wg, 0, ROWS - 1]

            def update(carry, slot, masked: bool):
                acc, m, l = carry

                def qk(acc_ref):
                    for a, bb in _terms(nt):
                        plgpu.wgmma(acc_ref, q_s.at[wg, a], k_s.at[slot, bb].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bkv), jnp.float32))
                if masked:
                    kp = plgpu.load(kvm_s.at[slot, 0], layout=col_l)
                    ksg = plgpu.load(kvm_s.at[slot, 1], layout=col_l) if cfg.has_seg else None
                    mask = _admissible(s.shape, qp, kp, 0, cfg.window, qsg, ksg)
                    s = jnp.where(mask, s * c, _MASK)
                else:
                    s = s * c
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                if masked:
                    p = jnp.where(mask, p, 0.0)
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                parts = _lhs(_split_regs(p, nt), lhs_s.at[wg], cfg)

                def pv(acc_ref):
                    for a, bb in _terms(nt):
                        plgpu.wgmma(acc_ref, parts[a], v_s.at[slot, bb])

                return _mma_into(acc, pv, cfg), m_new, l

            def step(i, carry):
                slot = lax.rem(i, jnp.int32(S))
                plgpu.barrier_wait(ready.at[slot])
                kind = _block_kind(q_first, q_last, kvm_s[slot, 0, 0], kvm_s[slot, 0, bkv - 1], cfg)
                carry = lax.switch(kind, [lambda c_: c_, lambda c_: update(c_, slot, False),
                                          lambda c_: update(c_, slot, True)], carry)
                plgpu.barrier_arrive(consumed.at[slot])
                return carry

            acc0 = plgpu.layout_cast(jnp.zeros((ROWS, dp), jnp.float32), plgpu.Layout.WGMMA)
            m0 = plgpu.layout_cast(jnp.full((ROWS,), _MASK, jnp.float32), row_l)
            l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_l)
            acc, m, l = lax.fori_loop(0, count, step, (acc0, m0, l0))
            has = l > 0.0
            l_safe = jnp.where(has, l, 1.0)
            inv = jnp.where(has, 1.0 / l_safe, 0.0)
            out_ref[bi, rows, h] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(out_dtype)
            lse_s[wg] = jnp.where(has, m + jnp.log(l_safe) * (1.0 / math.log(2.0)), 0.0)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(lse_s.at[wg], lse_ref.at[bi, h, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            _set_registers(cfg, 40, "decrease")
            kvh = lax.div(h, jnp.int32(g))

            kv_seg_ref = kvseg_ref if cfg.has_seg else None
            _producer(count, S, consumed, _kv_block_issuer(k_refs, v_refs, kvpos_ref, kv_seg_ref, k_s, v_s, kvm_s,
                                                           ready, bi=bi, kvh=kvh, first=first, bkv=bkv))

    bf16 = jnp.bfloat16
    scratch = (
        _tiled((COMPUTE_WGS, nt, ROWS, dp), bf16),
        _tiled((S, nt, bkv, dp), bf16),
        _tiled((S, nt, bkv, dp), bf16),
        plgpu.SMEM((COMPUTE_WGS, 2, ROWS), jnp.int32),
        plgpu.SMEM((S, 2, bkv), jnp.int32),
        plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),
        plgpu.Barrier(num_arrivals=n_res, num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=n_str, num_barriers=S),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=S),
        _stage_scratch(cfg, bkv),
    )
    out_type = (jax.ShapeDtypeStruct((b, sq, hq, dp), out_dtype), jax.ShapeDtypeStruct((b, hq, sq), jnp.float32))
    args = [kv_first, kv_count, scale, *qs_parts, *ks_parts, *vs_parts, q_pos, kv_pos]
    if cfg.has_seg:
        args += [q_seg, kv_seg]
    out, lse2 = _kernel_call(body, out_type, scratch, (hq, n_tiles, b), ("h", "t", "b"), cfg)(*args)
    return out, lse2


# --------------------------------------------------------------------------- backward: dq


def _dq(cfg: _Config, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, kv_first, kv_count, do, lse2, delta, parts):
    """``dq``; ``parts``: the bf16 parts of ``(q, do, k, v)`` (shared with :func:`_dkv`)."""
    pl, plgpu = _pl(), _plgpu()
    b, sq, hq, dp = q.shape
    nt, S, bkv, g = cfg.nterm, cfg.stages_dq, cfg.block_kv, cfg.groups
    n_tiles = sq // (COMPUTE_WGS * ROWS)
    row_l, col_l = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    n_res = 2 * nt + 3 + cfg.has_seg
    n_str = 2 * nt + 1 + cfg.has_seg

    def body(first_ref, count_ref, scale_ref, *refs):
        q_refs, do_refs, k_refs, v_refs = (refs[i * nt:(i + 1) * nt] for i in range(4))
        rest = refs[4 * nt:]
        lse_ref, delta_ref, qpos_ref, kvpos_ref = rest[:4]
        rest = rest[4:]
        if cfg.has_seg:
            qseg_ref, kvseg_ref = rest[:2]
            rest = rest[2:]
        dq_ref, q_s, do_s, k_s, v_s, qm_s, stat_s, kvm_s, res_bar, ready, consumed, lhs_s = rest
        h, tile, bi = lax.axis_index("h"), lax.axis_index("t"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        idx = bi * n_tiles + tile
        first, count = first_ref[idx], count_ref[idx]

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            _set_registers(cfg, 232, "increase")
            rows = pl.ds((tile * COMPUTE_WGS + wg) * ROWS, ROWS)
            for t in range(nt):
                plgpu.copy_gmem_to_smem(q_refs[t].at[bi, rows, h], q_s.at[wg, t], res_bar.at[wg])
                plgpu.copy_gmem_to_smem(do_refs[t].at[bi, rows, h], do_s.at[wg, t], res_bar.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, rows], stat_s.at[wg, 0], res_bar.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[bi, h, rows], stat_s.at[wg, 1], res_bar.at[wg])
            plgpu.copy_gmem_to_smem(qpos_ref.at[bi, rows], qm_s.at[wg, 0], res_bar.at[wg])
            if cfg.has_seg:
                plgpu.copy_gmem_to_smem(qseg_ref.at[bi, rows], qm_s.at[wg, 1], res_bar.at[wg])
            plgpu.barrier_wait(res_bar.at[wg])
            qp = plgpu.load(qm_s.at[wg, 0], layout=row_l)
            qsg = plgpu.load(qm_s.at[wg, 1], layout=row_l) if cfg.has_seg else None
            lse = plgpu.load(stat_s.at[wg, 0], layout=row_l)
            dlt = plgpu.load(stat_s.at[wg, 1], layout=row_l)
            sc = scale_ref[0]
            c = sc * LOG2E

            q_first, q_last = qm_s[wg, 0, 0], qm_s[wg, 0, ROWS - 1]

            def update(dq_acc, slot, masked: bool):
                def sdp(refs):
                    s_ref, dp_ref = refs
                    for a, bb in _terms(nt):
                        plgpu.wgmma(s_ref, q_s.at[wg, a], k_s.at[slot, bb].transpose((1, 0)))
                    for a, bb in _terms(nt):
                        plgpu.wgmma(dp_ref, do_s.at[wg, a], v_s.at[slot, bb].transpose((1, 0)))
                    return s_ref[...], dp_ref[...]

                s, dpm = pl.run_scoped(sdp, (plgpu.ACC((ROWS, bkv), jnp.float32),
                                             plgpu.ACC((ROWS, bkv), jnp.float32)))
                p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, s.shape, [0]))
                if masked:
                    kp = plgpu.load(kvm_s.at[slot, 0], layout=col_l)
                    ksg = plgpu.load(kvm_s.at[slot, 1], layout=col_l) if cfg.has_seg else None
                    p = jnp.where(_admissible(s.shape, qp, kp, 0, cfg.window, qsg, ksg), p, 0.0)
                ds = p * (dpm - lax.broadcast_in_dim(dlt, s.shape, [0]))
                ds_parts = _lhs(_split_regs(ds, nt), lhs_s.at[wg], cfg)

                def dq_mm(acc_ref):
                    for a, bb in _terms(nt):
                        plgpu.wgmma(acc_ref, ds_parts[a], k_s.at[slot, bb])

                return _mma_into(dq_acc, dq_mm, cfg)

            def step(i, dq_acc):
                slot = lax.rem(i, jnp.int32(S))
                plgpu.barrier_wait(ready.at[slot])
                kind = _block_kind(q_first, q_last, kvm_s[slot, 0, 0], kvm_s[slot, 0, bkv - 1], cfg)
                dq_acc = lax.switch(kind, [lambda a_: a_, lambda a_: update(a_, slot, False),
                                           lambda a_: update(a_, slot, True)], dq_acc)
                plgpu.barrier_arrive(consumed.at[slot])
                return dq_acc

            acc0 = plgpu.layout_cast(jnp.zeros((ROWS, dp), jnp.float32), plgpu.Layout.WGMMA)
            dq_acc = lax.fori_loop(0, count, step, acc0)
            dq_ref[bi, rows, h] = (dq_acc * sc).astype(dq_ref.dtype)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            _set_registers(cfg, 40, "decrease")
            kvh = lax.div(h, jnp.int32(g))

            kv_seg_ref = kvseg_ref if cfg.has_seg else None
            _producer(count, S, consumed, _kv_block_issuer(k_refs, v_refs, kvpos_ref, kv_seg_ref, k_s, v_s, kvm_s,
                                                           ready, bi=bi, kvh=kvh, first=first, bkv=bkv))

    bf16 = jnp.bfloat16
    scratch = (
        _tiled((COMPUTE_WGS, nt, ROWS, dp), bf16),
        _tiled((COMPUTE_WGS, nt, ROWS, dp), bf16),
        _tiled((S, nt, bkv, dp), bf16),
        _tiled((S, nt, bkv, dp), bf16),
        plgpu.SMEM((COMPUTE_WGS, 2, ROWS), jnp.int32),
        plgpu.SMEM((COMPUTE_WGS, 2, ROWS), jnp.float32),
        plgpu.SMEM((S, 2, bkv), jnp.int32),
        plgpu.Barrier(num_arrivals=n_res, num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=n_str, num_barriers=S),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=S),
        _stage_scratch(cfg, bkv),
    )
    args = [kv_first, kv_count, scale, *parts[0], *parts[1], *parts[2], *parts[3], lse2, delta, q_pos, kv_pos]
    if cfg.has_seg:
        args += [q_seg, kv_seg]
    out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return _kernel_call(body, out_type, scratch, (hq, n_tiles, b), ("h", "t", "b"), cfg)(*args)


# --------------------------------------------------------------------------- backward: dk, dv


def _dkv(cfg: _Config, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, q_first, q_count, do, lse2, delta, parts):
    """``dk, dv``; ``parts``: the bf16 parts of ``(q, do, k, v)`` (shared with :func:`_dq`)."""
    pl, plgpu = _pl(), _plgpu()
    b, sq, hq, dp = q.shape
    skv, hkv = k.shape[1:3]
    nt, S, g = cfg.nterm, cfg.stages_dkv, cfg.groups
    n_tiles = skv // (COMPUTE_WGS * ROWS)
    row_l, col_l = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    n_res = 2 * nt + 1 + cfg.has_seg
    n_str = 2 * nt + 3 + cfg.has_seg

    def body(first_ref, count_ref, scale_ref, *refs):
        q_refs, do_refs, k_refs, v_refs = (refs[i * nt:(i + 1) * nt] for i in range(4))
        rest = refs[4 * nt:]
        lse_ref, delta_ref, qpos_ref, kvpos_ref = rest[:4]
        rest = rest[4:]
        if cfg.has_seg:
            qseg_ref, kvseg_ref = rest[:2]
            rest = rest[2:]
        dk_ref, dv_ref, k_s, v_s, kvm_s, q_s, do_s, qm_s, stat_s, res_bar, ready, consumed, lhs_s = rest
        kvh, tile, bi = lax.axis_index("h"), lax.axis_index("t"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        idx = bi * n_tiles + tile
        first, count = first_ref[idx], count_ref[idx]
        n_steps = count * g

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            _set_registers(cfg, 232, "increase")
            rows = pl.ds((tile * COMPUTE_WGS + wg) * ROWS, ROWS)
            for t in range(nt):
                plgpu.copy_gmem_to_smem(k_refs[t].at[bi, rows, kvh], k_s.at[wg, t], res_bar.at[wg])
                plgpu.copy_gmem_to_smem(v_refs[t].at[bi, rows, kvh], v_s.at[wg, t], res_bar.at[wg])
            plgpu.copy_gmem_to_smem(kvpos_ref.at[bi, rows], kvm_s.at[wg, 0], res_bar.at[wg])
            if cfg.has_seg:
                plgpu.copy_gmem_to_smem(kvseg_ref.at[bi, rows], kvm_s.at[wg, 1], res_bar.at[wg])
            plgpu.barrier_wait(res_bar.at[wg])
            kp = plgpu.load(kvm_s.at[wg, 0], layout=row_l)
            ksg = plgpu.load(kvm_s.at[wg, 1], layout=row_l) if cfg.has_seg else None
            sc = scale_ref[0]
            c = sc * LOG2E

            k_first, k_last = kvm_s[wg, 0, 0], kvm_s[wg, 0, ROWS - 1]

            def update(carry, slot, masked: bool):
                dk_acc, dv_acc = carry

                def st_mm(acc_ref):
                    for a, bb in _terms(nt):
                        plgpu.wgmma(acc_ref, k_s.at[wg, a], q_s.at[slot, bb].transpose((1, 0)))
                    return acc_ref[...]

                st = pl.run_scoped(st_mm, plgpu.ACC((ROWS, ROWS), jnp.float32))  # (keys, queries)
                lse = plgpu.load(stat_s.at[slot, 0], layout=col_l)
                pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse, st.shape, [1]))
                if masked:
                    qp = plgpu.load(qm_s.at[slot, 0], layout=col_l)
                    qsg = plgpu.load(qm_s.at[slot, 1], layout=col_l) if cfg.has_seg else None
                    pt = jnp.where(_admissible(st.shape, qp, kp, 1, cfg.window, qsg, ksg), pt, 0.0)
                pt_parts = _lhs(_split_regs(pt, nt), lhs_s.at[wg], cfg)

                def dv_mm(acc_ref):
                    for a, bb in _terms(nt):
                        plgpu.wgmma(acc_ref, pt_parts[a], do_s.at[slot, bb])

                def dpt_mm(acc_ref):
                    for a, bb in _terms(nt):
                        plgpu.wgmma(acc_ref, v_s.at[wg, a], do_s.at[slot, bb].transpose((1, 0)))
                    return acc_ref[...]

                dv_acc = _mma_into(dv_acc, dv_mm, cfg)
                dpt = pl.run_scoped(dpt_mm, plgpu.ACC((ROWS, ROWS), jnp.float32))
                dlt = plgpu.load(stat_s.at[slot, 1], layout=col_l)
                dst = pt * (dpt - lax.broadcast_in_dim(dlt, st.shape, [1]))
                dst_parts = _lhs(_split_regs(dst, nt), lhs_s.at[wg], cfg)

                def dk_mm(acc_ref):
                    for a, bb in _terms(nt):
                        plgpu.wgmma(acc_ref, dst_parts[a], q_s.at[slot, bb])

                return _mma_into(dk_acc, dk_mm, cfg), dv_acc

            def step(i, carry):
                slot = lax.rem(i, jnp.int32(S))
                plgpu.barrier_wait(ready.at[slot])
                kind = _block_kind(qm_s[slot, 0, 0], qm_s[slot, 0, ROWS - 1], k_first, k_last, cfg)
                carry = lax.switch(kind, [lambda c_: c_, lambda c_: update(c_, slot, False),
                                          lambda c_: update(c_, slot, True)], carry)
                plgpu.barrier_arrive(consumed.at[slot])
                return carry

            zero = plgpu.layout_cast(jnp.zeros((ROWS, dp), jnp.float32), plgpu.Layout.WGMMA)
            dk_acc, dv_acc = lax.fori_loop(0, n_steps, step, (zero, zero))
            dk_ref[bi, rows, kvh] = (dk_acc * sc).astype(dk_ref.dtype)
            dv_ref[bi, rows, kvh] = dv_acc.astype(dv_ref.dtype)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            _set_registers(cfg, 40, "decrease")

            def issue(i, slot):
                gi = lax.div(i, count)
                blk = first + (i - gi * count)
                head = kvh * g + gi
                rws = pl.ds(blk * ROWS, ROWS)
                for t in range(nt):
                    plgpu.copy_gmem_to_smem(q_refs[t].at[bi, rws, head], q_s.at[slot, t], ready.at[slot])
                    plgpu.copy_gmem_to_smem(do_refs[t].at[bi, rws, head], do_s.at[slot, t], ready.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[bi, head, rws], stat_s.at[slot, 0], ready.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[bi, head, rws], stat_s.at[slot, 1], ready.at[slot])
                plgpu.copy_gmem_to_smem(qpos_ref.at[bi, rws], qm_s.at[slot, 0], ready.at[slot])
                if cfg.has_seg:
                    plgpu.copy_gmem_to_smem(qseg_ref.at[bi, rws], qm_s.at[slot, 1], ready.at[slot])

            _producer(n_steps, S, consumed, issue)

    bf16 = jnp.bfloat16
    scratch = (
        _tiled((COMPUTE_WGS, nt, ROWS, dp), bf16),
        _tiled((COMPUTE_WGS, nt, ROWS, dp), bf16),
        plgpu.SMEM((COMPUTE_WGS, 2, ROWS), jnp.int32),
        _tiled((S, nt, ROWS, dp), bf16),
        _tiled((S, nt, ROWS, dp), bf16),
        plgpu.SMEM((S, 2, ROWS), jnp.int32),
        plgpu.SMEM((S, 2, ROWS), jnp.float32),
        plgpu.Barrier(num_arrivals=n_res, num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=n_str, num_barriers=S),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=S),
        _stage_scratch(cfg, ROWS),
    )
    args = [q_first, q_count, scale, *parts[0], *parts[1], *parts[2], *parts[3], lse2, delta, q_pos, kv_pos]
    if cfg.has_seg:
        args += [q_seg, kv_seg]
    out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    return _kernel_call(body, out_type, scratch, (hkv, n_tiles, b), ("h", "t", "b"), cfg)(*args)


# --------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan):
    return _forward(cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan[0], plan[1])[0]


def _flash_fwd(cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan):
    out, lse2 = _forward(cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan[0], plan[1])
    return out, (q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan, out, lse2)


def _flash_bwd(cfg, res, do):
    q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg, plan, out, lse2 = res
    kv_first, kv_count, q_first, q_count = plan
    do = do.astype(q.dtype)
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
    common = (cfg, q, k, v, scale, q_pos, kv_pos, q_seg, kv_seg)
    parts = [split_bf16(a, cfg.nterm) for a in (q, do, k, v)]
    dq = _dq(*common, kv_first, kv_count, do, lse2, delta, parts)
    dk, dv = _dkv(*common, q_first, q_count, do, lse2, delta, parts)
    return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def gathered_attention_pallas_gpu(
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
    block_kv: int = 128,
    stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Pallas Mosaic GPU gathered attention; returns ``(b, sq, hq, d)`` in ``q.dtype``.

    Args:
        q, k, v, q_pos, kv_pos, q_seg, kv_seg: as for ``gathered_attention`` (validated);
            positions and segment ids are used as int32.
        window, sm_scale: as for ``gathered_attention`` (``sm_scale`` may be traced).
        block_kv: keys per streamed block in the forward and dq kernels (multiple of 64; the
            hi/lo split path uses at most 64).
        stages: shared-memory pipeline slots wanted (fewer when they do not fit).
        interpret: run in Mosaic GPU interpret mode (``plgpu.InterpretGPUParams()``, on CPU).

    Differentiable w.r.t. ``q, k, v`` (custom VJP with the dq and dk/dv kernels).
    """
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1:3]
    if sq == 0 or skv == 0 or b == 0:
        return jnp.zeros(q.shape, q.dtype)
    out_dtype = q.dtype
    reason = unsupported_reason(q, k, v, block_kv, stages)
    if reason is not None:
        raise ValueError(reason)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    nterm = _nterm(dtype)
    dp = _round_up(d, 64)
    bkv, s_fwd, s_dq, s_dkv = _plan(nterm, dp, block_kv, stages)
    tile_q = COMPUTE_WGS * ROWS
    sq_pad = _round_up(sq, tile_q)
    skv_pad = _round_up(skv, math.lcm(bkv, COMPUTE_WGS * ROWS))
    has_seg = q_seg is not None
    cfg = _Config(window=window, groups=hq // hkv, nterm=nterm, has_seg=has_seg, dp=dp, block_kv=bkv,
                  stages_fwd=s_fwd, stages_dq=s_dq, stages_dkv=s_dkv, interpret=bool(interpret))

    def pad(a, n):
        return jnp.pad(a.astype(dtype), [(0, 0), (0, n - a.shape[1]), (0, 0), (0, dp - d)])

    qp, kp, qs, ks = pad_rows(q_pos, kv_pos, q_seg, kv_seg, sq_pad, skv_pad)
    plan = (*kv_blocks_per_q_block(qp, kp, window, tile_q, bkv),
            *q_blocks_per_kv_block(qp, kp, window, ROWS, COMPUTE_WGS * ROWS))
    scale = jnp.reshape(jnp.asarray(sm_scale, jnp.float32), (1,))
    out = _flash(cfg, pad(q, sq_pad), pad(k, skv_pad), pad(v, skv_pad), scale, qp, kp, qs, ks, plan)
    return out[:, :sq, :, :d].astype(out_dtype)
