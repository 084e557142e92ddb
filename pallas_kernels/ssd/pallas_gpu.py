"""Mamba-2 SSD scan as a Pallas Mosaic GPU kernel (Hopper: TMA + wgmma), forward and backward.

Inputs arrive preprocessed by :func:`pallas_kernels.ssd.api.ssd` (``dt`` is the final step
size ``dt'``, ``D`` is ``(h, p)`` or ``None``, ``doc`` the monotonic document index), except
that ``x``, ``B`` and ``C`` keep their input dtype. ``p`` and ``n`` are zero-padded to
multiples of 64 and the sequence to a multiple of the kernel chunk (dt = 0, document index
continued), so any ``l``, ``p``, ``n <= 256`` work (see :func:`unsupported_reason`).

One generic kernel, :func:`_scan` (Lane semantics, one warpgroup per CTA), does all the
work. Per ``(value block, head, batch x segment)`` CTA it walks its chunks of
``T = block_sizes.gpu_chunk`` (64) tokens in order (or in reverse order), keeping the
``(value, key)`` state in float32 registers, and per chunk computes::

    G   = Qry . Keyᵀ                                       (T x T, wgmma)
    y   = w_start * (Qry . S_prevᵀ) + diag(G) u * Val + (G o L) . Val     (wgmma, L = strictly
          causal masked decay * u; the diagonal is added in float32)
    S   = c_decay * S_prev + (w_end * Val)ᵀ . Key          (wgmma)

with TMA loads of the next chunk (``gpu_stages``: single or double buffered) and TMA stores
of ``y``. The decays, document masks and per-token weights (``w_start``, ``w_end``,
``c_decay``) are those of the chunked algorithm in :mod:`pallas_kernels.ssd.xla`,
precomputed by plain JAX per token (a few MB): the xla path's math with the inter-chunk scan
fused into the kernel. When ``b * h`` is too small to fill the GPU (``gpu_seq_split``), the
sequence is cut into segments run by separate CTAs: a states-only pre-pass gives each
segment's local end state, a tiny scan over segments links them (:func:`_scan_split`).

Precision: bfloat16 ``x``/``B``/``C`` run bf16 wgmma operands with float32 accumulation
(like the peers; forward ~2.3e-3 relative to float32 math on the same values). Any other
input dtype (float32, float16) splits every matmul operand into three bfloat16 parts
(``hi + mid + lo``, 24 significant bits) and does six wgmmas per product (the part pairs of
order < 2^-16): ~5e-7 relative for float32 inputs. States, decays and accumulation are always
float32. A two-part split (16 bits, three wgmmas: ~5e-6) was not enough for ``dA``: on a
4096-token case its error was 7e-4 (interpret) / 1.04e-3 (H200) against float64, because
``dA`` sums largely cancelling per-token terms computed by different scans; the three-part
split gives 2.7e-5. To fit its operands in shared memory the three-part kernels store ``y``
and the saved states from registers and read the boundary states from global memory
directly (float32) instead of staging them.

Backward: a ``jax.custom_vjp`` whose backward pass is **also Pallas**: the same kernel run
three more times (reverse scans for ``dx`` and ``dB``, a forward scan for ``dC``; per-head
``dB``/``dC`` are summed over each group's heads in JAX) plus elementwise JAX. For the
log-decays ``a = dt A``, ``d a_k`` is the weight of all pairs straddling ``k``: the in-chunk
suffix sum of ``dLambda_t = dy_t . y_t - dt_t x_t . (R_t B_t)`` (``y`` in float32, saved by
the forward) plus a boundary term ``<S_after_chunk, R>`` that the reverse kernel computes
from the per-chunk states the forward saved, so rounding does not accumulate over the
sequence. Known limit: with bf16 operands ``dA`` and ``d dt_bias`` (whole-sequence sums of
largely cancelling terms) are less accurate than the other gradients (~1e-2 relative at
4 x 8192 on the H200, 3e-2 on a short test case); float32 inputs stay within 1e-3.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._bf16_split import split_bf16 as _split
from pallas_kernels._bf16_split import truncate_to_bf16 as _truncate_to_bf16
from pallas_kernels.ssd.config import SSDBlockSizes

# Rows of the per-token vector block that the kernel loads for each chunk.
_CS, _U, _WS, _WE, _DOC, _CDEC, _US = range(7)
_NVEC = 8  # padded to 8 rows

MAX_KEY_DIM = 256  # key dim (n forward, p in the dB / dC calls) after padding to 64


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


# --------------------------------------------------------------------------------------
# support checks used by the dispatcher


def _direct(nterm: int) -> bool:
    """Three-part split: ``y``, saved states and the boundary states go between registers and
    global memory directly (no shared-memory staging), to fit the larger operands."""
    return nterm >= 3


def _scratch_spec(nterm: int, T: int, dk: int, bv: int, out_dtype: Any, stages: int, *, states_only: bool,
                  has_z: bool) -> list[tuple]:
    """The scratch buffers of one :func:`_scan` CTA, in order: ``(kind, shape, dtype)`` with kind
    ``"tiled"`` (swizzled wgmma operand) or ``"smem"``, or ``("barrier", count)``. Unused
    buffers get small placeholders so the list's structure is fixed."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    direct = _direct(nterm)
    nb = (2 if states_only else 3) * nterm + 1  # TMA barriers per stage
    return [
        ("tiled", (1, 1, 8, 64) if states_only else (stages, nterm, T, dk), bf16),  # q_s
        ("tiled", (stages, nterm, T, dk), bf16),  # k_s
        ("tiled", (stages, nterm, T, bv), bf16),  # v_s
        ("smem", (stages, _NVEC, T), f32),  # vec_s
        ("tiled", (1, 8, 64) if states_only else (nterm, bv, dk), bf16),  # s_s: state operand
        ("tiled", (nterm, T, bv), bf16),  # vw_s: w_end * values
        ("tiled", (1, 8, 64) if states_only else (nterm, T, T), bf16),  # gm_s: masked, decayed G
        ("tiled", (8, 64) if direct or states_only else (T, bv), out_dtype),  # y_s
        ("smem", (bv,), f32),  # d_s
        ("barrier", stages * nb),  # TMA loads
        ("barrier", 1),  # d_bar
        ("tiled", (stages, nterm, bv, dk) if has_z and not direct else (1, 1, 8, 64), bf16),  # f_s
        ("smem", (bv,), f32),  # z_s
        ("barrier", stages * nterm),  # f_bar
    ]


def _smem_bytes(nterm: int, T: int, dk: int, bv: int, out_itemsize: int, stages: int) -> int:
    """Shared memory of the largest :func:`_scan` CTA of a call (with the boundary-state
    buffers, ``out_itemsize`` output): buffers are placed at 1024-byte boundaries, barriers
    take 8 bytes (matches Mosaic GPU's count on the CUDA lowering; tested)."""
    total = 0
    out_dtype = {2: jnp.bfloat16, 4: jnp.float32}[out_itemsize]
    for kind, *rest in _scratch_spec(nterm, T, dk, bv, out_dtype, stages, states_only=False, has_z=True):
        size = 8 * rest[0] if kind == "barrier" else math.prod(rest[0]) * jnp.dtype(rest[1]).itemsize
        total += _round_up(size, 1024)
    return total


_MAX_SMEM = 232448  # bytes per CTA on Hopper (227 KiB)


def _effective_stages(nterm: int, T: int, dk: int, bv: int, stages: int) -> int:
    """``stages`` if it fits in shared memory (float32 output, the largest), else 1."""
    if stages > 1 and _smem_bytes(nterm, T, dk, bv, 4, stages) > _MAX_SMEM:
        return 1
    return stages


def unsupported_reason(x: jax.Array, B: jax.Array, C: jax.Array, block_sizes: SSDBlockSizes) -> str | None:
    """``None`` if :func:`ssd_pallas_gpu` handles these inputs, else a short reason."""
    p, n = x.shape[-1], B.shape[-1]
    for name, a in (("x", x), ("B", B), ("C", C)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return f"{name} has non-float dtype {a.dtype}"
        if a.dtype == jnp.float64:
            return f"{name} is float64 (the kernel computes in float32)"
    nterm = _nterm(x, B, C)
    T, bv = block_sizes.gpu_chunk, block_sizes.gpu_block_v
    dk = max(_round_up(p, bv), _round_up(n, bv))
    if dk > MAX_KEY_DIM:
        return f"p={p}, n={n}: both must be <= {MAX_KEY_DIM}"
    if _smem_bytes(nterm, T, dk, bv, 4, 1) > _MAX_SMEM:
        kind = "bfloat16" if nterm == 1 else "non-bfloat16 (three-part bf16 split)"
        return (f"p={p}, n={n} with {kind} x/B/C and gpu_chunk={T}, gpu_block_v={bv} "
                "exceed the 227 KiB of shared memory per CTA")
    return None


# --------------------------------------------------------------------------------------
# the kernel


def _scan(
    qs: tuple[jax.Array, ...] | None,
    ks: tuple[jax.Array, ...],
    vs: tuple[jax.Array, ...],
    vec: jax.Array,
    init: jax.Array,
    D: jax.Array | None,
    *,
    reverse: bool,
    scale_out: bool,
    out_dtype: Any,
    block_v: int,
    stages: int,
    nseg: int,
    interpret: bool,
    save_states: bool = False,
    zdot: tuple[jax.Array, ...] | None = None,
) -> tuple:
    """Run the fused chunk scan.

    Args:
        qs, ks, vs: query / key / value operands, each a tuple of ``nterm`` (1, 2 or 3)
            bfloat16 arrays ``(b, L, G, d)`` (parts of a split, see
            :func:`pallas_kernels._bf16_split.split_bf16`); ``G`` divides ``h``.
            Query and key share ``d = dk``, values have ``d = dv``. ``L`` is a multiple
            of the chunk ``T``. ``qs=None``: states only (no ``y``).
        vec: ``(b, h, nc, 8, T)`` float32 per-token rows (see ``_CS`` ...).
        init: ``(b * nseg, h, dv, dk)`` float32 state entering each segment.
        D: ``(h, dv)`` float32 skip weights or ``None``.
        reverse: walk chunks last to first with anti-causal in-chunk masks.
        scale_out: multiply each output row by the per-token ``_US`` row.
        stages: input buffers (1: load chunk ``c + 1`` after chunk ``c``; 2: prefetch
            one chunk ahead, more SMEM).
        nseg: the sequence is cut into ``nseg`` equal segments of chunks, one CTA each,
            each starting from its own ``init`` row (see :func:`_scan_split`).
        save_states: also return the state after every chunk ``(b, h, nc, dv, dk)``: the
            ``nterm`` bfloat16 parts of the float32 state, or (three-part split) the float32
            state itself.
        zdot: states ``F_c`` as returned by a ``save_states`` forward scan with the same
            ``nterm``; also return ``z (b, h, nc, dv)`` with ``z[c] = rowsum(F_c * S)`` where
            ``S`` is the state carried into chunk ``c``.

    Returns:
        ``y (b, L, h, dv)`` in ``out_dtype`` (``None`` if ``qs is None``), the state
        after each segment ``(b * nseg, h, dv, dk)`` float32, then the ``save_states`` /
        ``zdot`` outputs if asked for.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    states_only = qs is None
    nterm = len(ks)
    b, L, gk, dk = ks[0].shape
    gq = gk if states_only else qs[0].shape[2]
    gv, dv = vs[0].shape[2:]
    h, nc, _, T = vec.shape[1:]
    assert L == nc * T and dv % block_v == 0 and dk % 64 == 0 and T % 64 == 0 and nc % nseg == 0
    cps = nc // nseg  # chunks per segment
    nvb = dv // block_v
    bf16 = jnp.bfloat16
    f32 = jnp.float32
    hq, hk, hv = h // gq, h // gk, h // gv  # heads per group of each operand

    def tiled(shape, dtype):
        swz = 128
        elems = swz // jnp.dtype(dtype).itemsize
        return plgpu.SMEM(
            shape, dtype,
            transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swz)),
        )

    # pairs (i, j) of split parts whose product we keep (part i is ~2^-8i of the value)
    terms = [(i, j) for i in range(nterm) for j in range(nterm) if i + j < max(nterm, 2)]

    def split(v):
        return _split(v, nterm)

    has_d = D is not None and not states_only
    has_z = zdot is not None
    direct = _direct(nterm)
    spec = _scratch_spec(nterm, T, dk, block_v, out_dtype, stages, states_only=states_only, has_z=has_z)
    nf = 0 if not has_z else (1 if direct else nterm)  # zdot arrays
    nst = 0 if not save_states else (1 if direct else nterm)  # save_states arrays
    assert not (states_only and (save_states or has_z))
    nops = 2 if states_only else 3
    nb = nops * nterm + 1  # TMA barriers per stage (as in _scratch_spec)

    def body(*refs):
        nq = 0 if states_only else nterm
        q_refs = refs[:nq]
        k_refs = refs[nq:nq + nterm]
        v_refs = refs[nq + nterm:nq + 2 * nterm]
        rest = refs[nq + 2 * nterm:]
        vec_ref, init_ref = rest[0], rest[1]
        rest = rest[2:]
        if has_d:
            d_ref, rest = rest[0], rest[1:]
        if has_z:
            f_refs, rest = rest[:nf], rest[nf:]
        if states_only:
            y_ref, fin_ref = None, rest[0]
            rest = rest[1:]
        else:
            y_ref, fin_ref = rest[0], rest[1]
            rest = rest[2:]
        if save_states:
            st_refs, rest = rest[:nst], rest[nst:]
        if has_z:
            z_ref, rest = rest[0], rest[1:]
        (q_s, k_s, v_s, vec_s, s_s, vw_s, gm_s, y_s, d_s, bars, d_bar, f_s, z_s, f_bar) = rest

        vb = lax.axis_index("v")
        hi = lax.axis_index("h")
        bs_idx = lax.axis_index("bs")
        bi, si = bs_idx // nseg, bs_idx % nseg
        iq, ik, iv = hi // hq, hi // hk, hi // hv
        vsl = pl.ds(vb * block_v, block_v)

        def chunk_of(step):
            return si * cps + ((cps - 1 - step) if reverse else step)

        def issue(step, slot):
            c = chunk_of(step)
            tok = pl.ds(c * T, T)
            bar = lambda i: bars.at[slot * nb + i]  # noqa: E731
            for t in range(nterm):
                plgpu.copy_gmem_to_smem(k_refs[t].at[bi, tok, ik], k_s.at[slot, t], bar(t))
                plgpu.copy_gmem_to_smem(v_refs[t].at[bi, tok, iv, vsl], v_s.at[slot, t], bar(nterm + t))
                if not states_only:
                    plgpu.copy_gmem_to_smem(q_refs[t].at[bi, tok, iq], q_s.at[slot, t], bar(2 * nterm + t))
            plgpu.copy_gmem_to_smem(vec_ref.at[bi, hi, c], vec_s.at[slot], bar(nops * nterm))
            if has_z and not direct:
                for t in range(nterm):
                    plgpu.copy_gmem_to_smem(f_refs[t].at[bi, hi, c, vsl], f_s.at[slot, t], f_bar.at[slot * nterm + t])

        if has_d:
            plgpu.copy_gmem_to_smem(d_ref.at[hi, vsl], d_s, d_bar)
        for st in range(min(stages, cps)):
            issue(st, st)
        # Initial state straight from GMEM into the wgmma accumulator layout.
        state = plgpu.load(init_ref.at[bs_idx, hi, vsl], layout=plgpu.Layout.WGMMA, optimized=False)
        if has_d:
            plgpu.barrier_wait(d_bar)
            d_row = plgpu.load(d_s, layout=plgpu.Layout.WGMMA.reduce(0))
        if not states_only:
            parts = split(state)
            for t in range(nterm):
                s_s[t] = parts[t]
            plgpu.commit_smem()

        row_l = plgpu.Layout.WGMMA.reduce(1)
        col_l = plgpu.Layout.WGMMA.reduce(0)

        def step_fn(step, state):
            slot = lax.rem(step, stages) if stages > 1 else 0
            for i in range(nb):
                plgpu.barrier_wait(bars.at[slot * nb + i])
            kv, vv, ve = k_s.at[slot], v_s.at[slot], vec_s.at[slot]
            we_r = plgpu.load(ve.at[_WE], layout=row_l)
            cdec = vec_s[slot, _CDEC, 0]
            vals = plgpu.load(vv.at[0], layout=plgpu.Layout.WGMMA).astype(f32)
            for t in range(1, nterm):
                vals = vals + plgpu.load(vv.at[t], layout=plgpu.Layout.WGMMA).astype(f32)

            if has_z:
                # Boundary term: rowsum(F_c * carried state), before this chunk's update.
                if direct:
                    f_val = plgpu.load(f_refs[0].at[bi, hi, chunk_of(step), vsl], layout=plgpu.Layout.WGMMA,
                                       optimized=False)
                else:
                    for t in range(nterm):
                        plgpu.barrier_wait(f_bar.at[slot * nterm + t])
                    f_val = plgpu.load(f_s.at[slot, 0], layout=plgpu.Layout.WGMMA).astype(f32)
                    for t in range(1, nterm):
                        f_val = f_val + plgpu.load(f_s.at[slot, t], layout=plgpu.Layout.WGMMA).astype(f32)
                zrow = jnp.sum(f_val * state, axis=1)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous z store
                z_s[...] = zrow
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(z_s, z_ref.at[bi, hi, chunk_of(step), vsl])

            if not states_only:
                qv = q_s.at[slot]
                cs_r = plgpu.load(ve.at[_CS], layout=row_l)
                cs_c = plgpu.load(ve.at[_CS], layout=col_l)
                u_c = plgpu.load(ve.at[_U], layout=col_l)
                ws_r = plgpu.load(ve.at[_WS], layout=row_l)
                doc_r = plgpu.load(ve.at[_DOC], layout=row_l)
                doc_c = plgpu.load(ve.at[_DOC], layout=col_l)

                # G = Qry Keyᵀ and y_off = Qry S_prevᵀ (accumulators start at zero).
                def mm_g_off(g_acc, o_acc):
                    for i, j in terms:
                        plgpu.wgmma(g_acc, qv.at[i], kv.at[j].transpose((1, 0)))
                    for i, j in terms:
                        plgpu.wgmma(o_acc, qv.at[i], s_s.at[j].transpose((1, 0)))
                    return g_acc[...], o_acc[...]

                g, y_off = pl.run_scoped(mm_g_off, plgpu.ACC((T, T), f32), plgpu.ACC((T, block_v), f32))

                shape = (T, T)
                ii = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                jj = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                # Strictly (anti-)causal: the diagonal (decay 1, same document) is added in
                # float32 below, so dy.y and x.(R B) cancel exactly in the backward's dLambda.
                causal = (ii < jj) if reverse else (ii > jj)
                same = lax.broadcast_in_dim(doc_r, shape, [0]) == lax.broadcast_in_dim(doc_c, shape, [1])
                diff = lax.broadcast_in_dim(cs_r, shape, [0]) - lax.broadcast_in_dim(cs_c, shape, [1])
                if reverse:
                    diff = -diff
                decay = jnp.exp(jnp.where(causal & same, diff, -jnp.inf))
                gm_parts = split(g * decay * lax.broadcast_in_dim(u_c, shape, [1]))
                for t in range(nterm):
                    gm_s[t] = gm_parts[t]
                plgpu.commit_smem()

                def mm_y(acc):
                    for i, j in terms:
                        plgpu.wgmma(acc, gm_s.at[i], vv.at[j])
                    return acc[...]

                u_r = plgpu.load(ve.at[_U], layout=row_l)
                g_diag = jnp.sum(jnp.where(ii == jj, g, 0.0), axis=1) * u_r
                y = y_off * lax.broadcast_in_dim(ws_r, (T, block_v), [0])
                y = y + vals * lax.broadcast_in_dim(g_diag, (T, block_v), [0])
                y = y + pl.run_scoped(mm_y, plgpu.ACC((T, block_v), f32))
                if has_d:
                    y = y + vals * lax.broadcast_in_dim(d_row, (T, block_v), [1])
                if scale_out:
                    us_r = plgpu.load(ve.at[_US], layout=row_l)
                    y = y * lax.broadcast_in_dim(us_r, (T, block_v), [0])
                if direct:
                    y_ref[bi, pl.ds(chunk_of(step) * T, T), hi, vsl] = y.astype(out_dtype)
                else:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous chunk's y store
                    y_s[...] = y.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(y_s, y_ref.at[bi, pl.ds(chunk_of(step) * T, T), hi, vsl])

            # State update with the values scaled by w_end.
            vw_parts = split(vals * lax.broadcast_in_dim(we_r, (T, block_v), [0]))
            for t in range(nterm):
                vw_s[t] = vw_parts[t]
            plgpu.commit_smem()

            def mm_s(acc):
                for i, j in terms:
                    plgpu.wgmma(acc, vw_s.at[i].transpose((1, 0)), kv.at[j])
                return acc[...]

            new_state = state * cdec + pl.run_scoped(mm_s, plgpu.ACC((block_v, dk), f32))

            if not states_only:
                # State operand for the next chunk's y_off (the wgmmas reading s_s are done).
                s_parts = split(new_state)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # s_s stores of last step
                for t in range(nterm):
                    s_s[t] = s_parts[t]
                plgpu.commit_smem()
                if save_states and direct:
                    st_refs[0][bi, hi, chunk_of(step), vsl] = new_state
                elif save_states:
                    for t in range(nterm):
                        plgpu.copy_smem_to_gmem(s_s.at[t], st_refs[t].at[bi, hi, chunk_of(step), vsl])
            else:
                # Every thread is past its reads of this slot before the refill below.
                vw_s[0] = vw_parts[0]

            @pl.when(step + stages < cps)
            def _():
                issue(step + stages, slot)

            return new_state

        state = lax.fori_loop(0, cps, step_fn, state)
        fin_ref[bs_idx, hi, vsl] = state
        plgpu.wait_smem_to_gmem(0)

    ydt = jnp.dtype(out_dtype)
    scratch = tuple(
        plgpu.Barrier(num_barriers=rest[0]) if kind == "barrier"
        else tiled(*rest) if kind == "tiled" else plgpu.SMEM(*rest)
        for kind, *rest in spec
    )
    fin_type = jax.ShapeDtypeStruct((b * nseg, h, dv, dk), f32)
    out_type = (fin_type,) if states_only else (jax.ShapeDtypeStruct((b, L, h, dv), ydt), fin_type)
    if save_states:
        out_type += tuple(jax.ShapeDtypeStruct((b, h, nc, dv, dk), f32 if direct else bf16) for _ in range(nst))
    if has_z:
        out_type += (jax.ShapeDtypeStruct((b, h, nc, dv), f32),)
    kernel = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(nvb, h, b * nseg),
        grid_names=("v", "h", "bs"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    args = [*(() if states_only else qs), *ks, *vs, vec, init]
    if has_d:
        args.append(D)
    if has_z:
        args.extend(zdot)
    out = kernel(*args)
    if states_only:
        return None, out[0]
    return tuple(out)


def _scan_split(qs, ks, vs, vec, init, D, *, reverse: bool, nseg: int, **kw) -> tuple[jax.Array, jax.Array]:
    """:func:`_scan` with the sequence cut into ``nseg`` segments run in parallel.

    Pass 1 (states only, from zero) gives each segment's local end state; a tiny scan over
    segments (decays = products of the chunk decays, which carry the document masks) gives
    the state entering each segment; pass 2 runs the full scan of every segment from it.
    ``init (b, h, dv, dk)``; returns ``y`` and the final state ``(b, h, dv, dk)``.
    """
    b, h = init.shape[:2]
    if nseg == 1:
        return _scan(qs, ks, vs, vec, init, D, reverse=reverse, nseg=1, **kw)
    kw1 = {k: v for k, v in kw.items() if k not in ("save_states", "zdot")}
    nc = vec.shape[2]
    zero = jnp.zeros((b * nseg,) + init.shape[1:], jnp.float32)
    _, local = _scan(None, ks, vs, vec, zero, None, reverse=reverse, nseg=nseg, **(kw1 | {"stages": 2}))
    local = local.reshape((b, nseg) + init.shape[1:])
    seg_decay = jnp.prod(vec[:, :, :, _CDEC, 0].reshape(b, h, nseg, nc // nseg), axis=-1)  # (b, h, nseg)
    order = range(nseg - 1, -1, -1) if reverse else range(nseg)
    s_in = [None] * nseg
    s = init.astype(jnp.float32)
    for j in order:
        s_in[j] = s
        s = seg_decay[:, :, j, None, None] * s + local[:, j]
    init_all = jnp.stack(s_in, axis=1).reshape((b * nseg,) + init.shape[1:])
    y, fin, *extra = _scan(qs, ks, vs, vec, init_all, D, reverse=reverse, nseg=nseg, **kw)
    last = 0 if reverse else nseg - 1
    return (y, fin.reshape((b, nseg) + init.shape[1:])[:, last], *extra)


# --------------------------------------------------------------------------------------
# JAX side: per-token vectors, padding, the three backward scans


def _chunk_vectors(a: jax.Array, u: jax.Array, out_scale: jax.Array | None, doc: jax.Array, T: int,
                   reverse: bool) -> jax.Array:
    """Per-token rows for :func:`_scan`: ``(b, h, nc, 8, T)`` float32.

    ``a (b, h, L)`` is the log-decay ``dt * A`` of each token, ``u (b, h, L)`` the key-side
    input scale, ``doc (b, L)`` the document index; ``L`` is a multiple of ``T``.
    Forward weights are those of :func:`pallas_kernels.ssd.xla.ssd_xla`; the reverse ones
    propagate a state backwards in time (relative to the token before each chunk).
    """
    b, h, L = a.shape
    nc = L // T
    f32 = jnp.float32
    cs = jnp.cumsum(a.reshape(b, h, nc, T).astype(f32), axis=-1)
    cs_last = cs[..., -1:]
    docc = doc.reshape(b, nc, T)
    first, last = docc[:, :, 0], docc[:, :, -1]
    prev_last = jnp.concatenate([jnp.zeros((b, 1), doc.dtype), last[:, :-1]], axis=1)
    next_first = jnp.concatenate([first[:, 1:], last[:, -1:]], axis=1)

    def mexp(mask, e):
        return jnp.exp(jnp.where(mask, e, -jnp.inf))

    tok = lambda v: v[:, None, :, None]  # (b, nc) -> (b, 1, nc, 1)  # noqa: E731
    chk = lambda v: v[:, None, :]  # (b, nc) -> (b, 1, nc)  # noqa: E731
    u = u.reshape(b, h, nc, T).astype(f32)
    dc = docc[:, None]
    if not reverse:
        ws = mexp(dc == tok(prev_last), cs)
        we = mexp(dc == tok(last), cs_last - cs) * u
        cdec = mexp(chk(last == prev_last), cs_last[..., 0])
    else:
        ws = mexp(dc == tok(next_first), cs_last - cs)
        we = mexp(dc == tok(prev_last), cs) * u
        cdec = mexp(chk(prev_last == next_first), cs_last[..., 0])
    docr = jnp.broadcast_to((docc - first[..., None]).astype(f32)[:, None], cs.shape)
    us = jnp.ones_like(cs) if out_scale is None else out_scale.reshape(b, h, nc, T).astype(f32)
    zero = jnp.zeros_like(cs)
    rows = [cs, u, ws, we, docr, jnp.broadcast_to(cdec[..., None], cs.shape), us, zero]
    return jnp.stack(rows, axis=3)


def _nterm(*arrays: jax.Array) -> int:
    """1: bfloat16 wgmma operands; 3: three-part bfloat16 split for float32 accuracy."""
    return 1 if all(a.dtype == jnp.bfloat16 for a in arrays) else 3


def _pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    pads = [(0, t - s) for s, t in zip(a.shape, shape)]
    return jnp.pad(a, pads) if any(p for _, p in pads) else a


class _Dims:
    def __init__(self, x, B, C, bs: SSDBlockSizes):
        self.b, self.l, self.h, self.p = x.shape
        self.g, self.n = B.shape[2:]
        self.T = bs.gpu_chunk
        self.bv = bs.gpu_block_v
        self.nterm = _nterm(x, B, C)
        self.L = _round_up(max(self.l, 1), self.T)
        self.P = _round_up(self.p, self.bv)  # value dim forward, key dim in dB / dC
        self.N = _round_up(self.n, self.bv)
        self.stages_cfg = bs.gpu_stages
        want = 2 if bs.gpu_stages is None else bs.gpu_stages
        self.stages = _effective_stages(self.nterm, self.T, max(self.P, self.N), self.bv, want)
        self.seq_split = bs.gpu_seq_split

    def nseg(self, dv: int) -> int:
        """Segments per sequence for a scan whose value dim is ``dv`` (see ``gpu_seq_split``)."""
        nc = self.L // self.T
        if self.seq_split is not None:
            if nc % self.seq_split:
                return 1
            return self.seq_split
        ctas = self.b * self.h * (dv // self.bv)
        target = 2 * _num_sms()
        nseg = 1
        while ctas * nseg * 2 <= target and nc % (2 * nseg) == 0 and nc // (2 * nseg) >= _MIN_SEG_CHUNKS:
            nseg *= 2
        return nseg


_MIN_SEG_CHUNKS = 16


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(getattr(dev, "core_count", 132) or 132)
    except Exception:  # pragma: no cover - no backend
        pass
    return 132


def _pad_seq(d: _Dims, x, dt, B, C, doc):
    """Pad the sequence to ``d.L`` (dt = 0, zero inputs, document index continued) and p, n."""
    x = _pad_to(x, (d.b, d.L, d.h, d.P))
    B = _pad_to(B, (d.b, d.L, d.g, d.N))
    C = _pad_to(C, (d.b, d.L, d.g, d.N))
    dt = _pad_to(dt, (d.b, d.L, d.h))
    if d.L != d.l:
        doc = jnp.pad(doc, [(0, 0), (0, d.L - d.l)], mode="edge")
    return x, dt, B, C, doc


def _forward(x, dt, A, B, C, D, state0, doc, bs: SSDBlockSizes, interpret: bool, out_dtype, fuse_d: bool,
             save_states: bool = False):
    d = _Dims(x, B, C, bs)
    nterm = d.nterm
    xp, dtp, Bp, Cp, docp = _pad_seq(d, x, dt, B, C, doc)
    a = jnp.transpose(dtp * A, (0, 2, 1))
    vec = _chunk_vectors(a, jnp.transpose(dtp, (0, 2, 1)), None, docp, d.T, reverse=False)
    init = _pad_to(state0.astype(jnp.float32), (d.b, d.h, d.P, d.N))
    Dp = None
    if fuse_d and D is not None:
        Dp = _pad_to(D.astype(jnp.float32), (d.h, d.P))
    nseg = d.nseg(d.P)
    # Plain inference forward without a sequence split: one input buffer, so two CTAs share
    # an SM and hide each other's loads (measured faster on H200); otherwise prefetch.
    stages = d.stages if d.stages_cfg is not None else (1 if (nseg == 1 and not save_states) else d.stages)
    y, fin, *states = _scan_split(
        _split(Cp, nterm), _split(Bp, nterm), _split(xp, nterm), vec, init, Dp, reverse=False, scale_out=False,
        out_dtype=out_dtype, block_v=d.bv, stages=stages, nseg=nseg, interpret=interpret, save_states=save_states)
    y, fin = y[:, :d.l, :, :d.p], fin[:, :, :d.p, :d.n]
    return (y, fin, tuple(states)) if save_states else (y, fin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _ssd_core(x, dt, A, B, C, D, state0, doc, bs, interpret):
    y, fin = _forward(x, dt, A, B, C, D, state0, doc, bs, interpret, x.dtype, fuse_d=True)
    return y, fin


def _ssd_core_fwd(x, dt, A, B, C, D, state0, doc, bs, interpret):
    # float32 y without D (needed by d dt) and the state after every chunk (boundary terms).
    y_ssm, fin, states = _forward(x, dt, A, B, C, D, state0, doc, bs, interpret, jnp.float32, fuse_d=False,
                                  save_states=True)
    y = y_ssm if D is None else y_ssm + D * x.astype(jnp.float32)
    return (y.astype(x.dtype), fin), (x, dt, A, B, C, D, state0, doc, y_ssm, states)


def _ssd_core_bwd(bs, interpret, res, cts):
    """Backward: three more runs of the scan kernel, then elementwise JAX.

    With ``R_s = sum_{t>=s} decay(s, t) dy_t (x) C_t`` (+ the decayed final-state cotangent),
    ``dx = dt R B (+ D dy)``, ``dB = dt (x . R)`` summed over the group's heads, ``dC = dy . S``
    (``S`` the forward state) likewise, ``d state0 = R`` before the first token. For the
    log-decays ``a = dt A``: ``d a_k`` is the total weight of all (source, target) pairs that
    straddle ``k``; with ``dLambda_t = dy_t . y_t - dt_t x_t . (R_t B_t)`` it is the in-chunk
    suffix sum of ``dLambda`` plus, for the pairs that leave the chunk, the boundary term
    ``<S_after_chunk, R_after_chunk>`` (computed inside the reverse kernel). Summing per
    chunk keeps the rounding errors of ``dLambda`` from accumulating over the sequence.
    """
    x, dt, A, B, C, D, state0, doc, y_ssm, states = res
    dy, dfin = cts
    f32 = jnp.float32
    d = _Dims(x, B, C, bs)
    nterm = d.nterm
    dy = dy.astype(x.dtype) if nterm == 1 else dy.astype(f32)
    dfin = dfin.astype(f32)
    xp, dtp, Bp, Cp, docp = _pad_seq(d, x, dt, B, C, doc)
    dyp = _pad_to(dy, (d.b, d.L, d.h, d.P))
    dtT = jnp.transpose(dtp, (0, 2, 1))
    a = dtT * A[None, :, None]
    ones = jnp.ones_like(dtT)
    vec_rev = _chunk_vectors(a, ones, None, docp, d.T, reverse=True)
    vec_rev_s = _chunk_vectors(a, ones, dtT, docp, d.T, reverse=True)
    vec_fwd = _chunk_vectors(a, dtT, None, docp, d.T, reverse=False)
    sp = lambda v: _split(v, nterm)  # noqa: E731
    kw = dict(block_v=d.bv, stages=d.stages, interpret=interpret)
    dfin_p = _pad_to(dfin, (d.b, d.h, d.P, d.N))
    part_dtype = jnp.bfloat16 if nterm == 1 else f32  # per-head dB / dC, summed below in float32
    # 1. dx-scan: out1_s = R_s B_s; final = d state0; z = boundary terms.
    out1, dstate0, z = _scan_split(sp(Bp), sp(Cp), sp(dyp), vec_rev, dfin_p, None, reverse=True,
                                   scale_out=False, out_dtype=f32, nseg=d.nseg(d.P), zdot=states, **kw)
    # 2. dB-scan: dB_s = dt_s sum_{t>=s} decay (x_s . dy_t) C_t (+ dt_s dfin^T x_s), per head.
    out2, _ = _scan_split(sp(xp), sp(dyp), sp(Cp), vec_rev_s, jnp.swapaxes(dfin_p, 2, 3), None, reverse=True,
                          scale_out=True, out_dtype=part_dtype, nseg=d.nseg(d.N), **kw)
    # 3. dC-scan: dC_t = sum_{s<=t} decay dt_s (dy_t . x_s) B_s (+ state0^T dy_t), per head.
    init3 = jnp.swapaxes(_pad_to(state0.astype(f32), (d.b, d.h, d.P, d.N)), 2, 3)
    out3, _ = _scan_split(sp(dyp), sp(xp), sp(Bp), vec_fwd, init3, None, reverse=False, scale_out=False,
                          out_dtype=part_dtype, nseg=d.nseg(d.N), **kw)

    l, p, n, g, h, T, L = d.l, d.p, d.n, d.g, d.h, d.T, d.L
    nc = L // T
    out1 = out1[:, :l, :, :p]
    xf, dyf = x.astype(f32), dy.astype(f32)
    dx = dt[..., None] * out1
    if D is not None:
        dx = dx + D * dyf
    xo = jnp.sum(xf * out1, axis=-1)  # (b, l, h)
    dlam = jnp.sum(dyf * y_ssm, axis=-1) - dt * xo
    dlam = _pad_to(dlam, (d.b, L, h)).reshape(d.b, nc, T, h)
    zc = jnp.transpose(jnp.sum(z, axis=-1), (0, 2, 1))[:, :, None, :]  # (b, nc, 1, h)
    da = (jnp.flip(jnp.cumsum(jnp.flip(dlam, 2), axis=2), 2) + zc).reshape(d.b, L, h)[:, :l]
    ddt = A * da + xo
    dA = jnp.sum(dt * da, axis=(0, 1))
    dB = out2[:, :l, :, :n].astype(f32).reshape(d.b, l, g, h // g, n).sum(3)
    dC = out3[:, :l, :, :n].astype(f32).reshape(d.b, l, g, h // g, n).sum(3)
    dD = None if D is None else jnp.sum(dyf * xf, axis=(0, 1)).astype(D.dtype)
    return (dx.astype(x.dtype), ddt.astype(dt.dtype), dA.astype(A.dtype), dB.astype(B.dtype),
            dC.astype(C.dtype), dD, dstate0[:, :, :p, :n].astype(state0.dtype), None)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def ssd_pallas_gpu(
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
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """SSD with the contract of :func:`pallas_kernels.ssd.reference.ssd_reference`, on Mosaic GPU.

    ``x``, ``B``, ``C`` in their input dtype (bfloat16 runs bf16 wgmma operands, anything
    else the float32-accurate three-part split); ``dt`` (preprocessed), ``A``, ``D (h, p)``,
    ``initial_state`` float32; ``doc (b, l)`` int32. Differentiable (Pallas backward).

    Returns:
        ``(y, final_state)``: ``y (b, l, h, p)`` in ``x.dtype``, ``final_state (b, h, p, n)``
        float32.
    """
    f32 = jnp.float32
    dt, A = dt.astype(f32), A.astype(f32)
    D = None if D is None else D.astype(f32)
    return _ssd_core(x, dt, A, B, C, D, initial_state.astype(f32), doc.astype(jnp.int32), block_sizes,
                     bool(interpret))
