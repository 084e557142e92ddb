"""Tests for gathered_attention(impl="pallas_tpu"): TPU interpret mode on CPU vs impl="reference",
the block-visiting plan, dispatch, and AOT lowering of the Mosaic kernels for TPU."""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import GatheredAttentionBlockSizes, _dispatch, gathered_attention
from pallas_kernels.gathered_attention import api as ga_api
from pallas_kernels.gathered_attention import pallas_tpu as ga_tpu
from test_gathered_attention import Case, make_inputs, numpy_mask, rel_err


@pytest.fixture(autouse=True)
def _clean_interpreter_state():
    """TPU interpret mode keeps global state after an exception inside a kernel; reset it."""
    yield
    pltpu.reset_tpu_interpret_mode_state()


@dataclasses.dataclass(frozen=True)
class TpuCase:
    case: Case
    block_q: int = 8
    block_kv: int = 16


def attend(case: Case, args, kwargs, impl: str, block_q: int = 8, block_kv: int = 16) -> jax.Array:
    """The jitted core (same dispatch as the public API) with explicit block sizes."""
    scale = 1.0 / math.sqrt(args[0].shape[-1]) if kwargs["sm_scale"] is None else kwargs["sm_scale"]
    return ga_api._gathered_attention(
        *args, kwargs.get("q_segment_ids"), kwargs.get("kv_segment_ids"), scale,
        window=kwargs["window"], impl=impl,
        block_sizes=GatheredAttentionBlockSizes(block_q=block_q, block_kv=block_kv), interpret=True,
    )


def out_and_grads(tc: TpuCase, args, kwargs, impl: str):
    """``(out, (dq, dk, dv))`` of ``sum(out * w)`` for a fixed random ``w``, in one jit."""
    q, k, v, q_pos, kv_pos = args
    w = jnp.asarray(np.random.RandomState(tc.case.seed + 1000).randn(*q.shape), jnp.float32)

    @jax.jit
    def f(q, k, v):
        out, vjp = jax.vjp(lambda *qkv: attend(tc.case, (*qkv, q_pos, kv_pos), kwargs, impl, tc.block_q,
                                               tc.block_kv), q, k, v)
        return out, vjp(w.astype(out.dtype))

    return f(q, k, v)


# Interpret mode costs ~10 ms per grid step on a busy CPU: heads and block counts are kept small
# (b * hq * n_q_blocks * n_kv_blocks <= ~64 per kernel).
CASES = [
    TpuCase(Case(0, L=32, density=1.0, hq=2, hkv=2, window=8)),  # dense, window shorter than block_kv
    TpuCase(Case(1, L=64, density=0.15, window=16, hkv=2, kv_pad=5), block_kv=32),  # sparse ~15%, GQA 4/2
    TpuCase(Case(2, L=48, density=0.6, window=12, hkv=1, q_pad=6, kv_short=True), block_q=16),  # GQA 4/1, padding
    TpuCase(Case(3, L=24, density=1.0, hq=2, hkv=1, window=1)),  # window 1
    TpuCase(Case(4, L=30, density=0.6, hq=2, hkv=2, window=1000, kv_pad=3), block_q=16, block_kv=8),  # window >> blocks
    TpuCase(Case(6, L=13, sq=7, d=5, hq=2, hkv=1, window=4)),  # odd sizes, single blocks
    TpuCase(Case(7, L=48, density=0.6, hq=2, hkv=1, kv="selected", window=10, sm_scale=0.7)),  # kv = selected tokens
    TpuCase(Case(8, L=40, density=1.0, hq=2, hkv=2, seg=3, window=16), block_q=16, block_kv=8),  # packed documents
    TpuCase(Case(9, L=64, density=0.15, seg=4, hq=2, hkv=1, window=24, q_pad=3, kv_pad=2)),
    TpuCase(Case(10, L=48, density=0.6, kv="selected", seg=3, q_pad=5, kv_pad=2, window=12, hkv=2)),
    TpuCase(Case(11, L=32, density=0.6, hq=2, hkv=2, window=32, kv_short=True, q_pad=19)),  # a fully padded query row
]


@pytest.mark.parametrize("tc", CASES, ids=lambda tc: f"seed{tc.case.seed}")
def test_matches_reference(tc: TpuCase) -> None:
    """Forward (rel <= 1e-4) and dq/dk/dv (rel <= 1e-3) against the dense reference, float32."""
    args, kwargs = make_inputs(tc.case)
    out, grads = out_and_grads(tc, args, kwargs, "pallas_tpu")
    ref_out, ref_grads = out_and_grads(tc, args, kwargs, "reference")
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref_out) <= 1e-4
    for name, g, gr in zip("qkv", grads, ref_grads):
        assert g.shape == gr.shape and g.dtype == jnp.float32, name
        assert np.all(np.isfinite(g)), name
        if np.any(np.asarray(gr) != 0):
            assert rel_err(g, gr) <= 1e-3, name
        else:  # window 1: dq is exactly 0 in the reference, flash rounding (dp - di) leaves ~1e-8
            assert np.max(np.abs(g)) <= 1e-5, name


def test_empty_rows_and_unattended_keys_are_exactly_zero() -> None:
    tc = TpuCase(Case(20, L=40, density=0.6, seg=3, window=6, kv_short=True, q_pad=4, hq=2, hkv=1))
    args, kwargs = make_inputs(tc.case)
    q_pos, kv_pos = args[3], args[4]
    mask = numpy_mask(q_pos, kv_pos, tc.case.window, kwargs["q_segment_ids"], kwargs["kv_segment_ids"])
    keyless, unattended = ~mask.any(2), ~mask.any(1)  # (b, sq), (b, skv)
    assert (keyless & (q_pos >= 0)).any() and (q_pos < 0).any() and unattended.any()
    out, (dq, dk, dv) = (jax.tree.map(np.asarray, x) for x in out_and_grads(tc, args, kwargs, "pallas_tpu"))
    assert np.all(out[keyless] == 0.0) and np.all(np.abs(out[~keyless]).sum(-1) > 0)
    assert np.all(dq[keyless] == 0.0)
    assert np.all(dk[unattended] == 0.0) and np.all(dv[unattended] == 0.0)
    assert np.all(np.abs(dk[~unattended]).sum(-1) > 0)


def test_repeated_positions_are_exact() -> None:
    """Repeated q and kv positions (several streams per token): pallas_tpu matches the reference."""
    case = Case(70, L=24, sq=12, window=5, hkv=2, seg=2)
    args, kwargs = make_inputs(case)
    rng = np.random.RandomState(7)
    q_pos = np.sort(rng.randint(0, case.L, size=args[3].shape), axis=1).astype(np.int32)
    kv_pos = np.sort(rng.randint(0, case.L, size=args[4].shape), axis=1).astype(np.int32)
    q_pos[1, -2:] = -1
    kv_pos[0, -3:] = -1
    assert (np.diff(kv_pos[1]) == 0).any()
    seg = lambda p: np.where(p >= 0, np.maximum(p, 0) // 9, 0).astype(np.int32)  # noqa: E731
    kwargs.update(q_segment_ids=seg(q_pos), kv_segment_ids=seg(kv_pos))
    args = (*args[:3], q_pos, kv_pos)
    assert rel_err(attend(case, args, kwargs, "pallas_tpu"), attend(case, args, kwargs, "reference")) <= 1e-4


def test_bf16_inputs() -> None:
    case = Case(10, L=48, density=0.6, kv="selected", seg=3, q_pad=5, kv_pad=2, window=12, hkv=2)
    args, kwargs = make_inputs(case)
    qkv = tuple(jnp.asarray(a, jnp.bfloat16) for a in args[:3])
    out = attend(case, (*qkv, *args[3:]), kwargs, "pallas_tpu")
    assert out.dtype == jnp.bfloat16
    ref = attend(case, (*(a.astype(jnp.float32) for a in qkv), *args[3:]), kwargs, "reference")
    assert rel_err(out, ref) <= 2e-2


# --------------------------------------------------------------------------- block-visiting plan


def test_plan_covers_every_admissible_pair_and_skips_the_rest() -> None:
    """Each q block visits exactly the kv blocks meeting its position window, and vice versa."""
    case = Case(30, b=2, L=256, density=0.15, window=24, seg=3, q_pad=4, kv_pad=9)
    (_, _, _, q_pos, kv_pos), kwargs = make_inputs(case)
    bq, bkv = 8, 16
    qp = np.pad(q_pos, [(0, 0), (0, -q_pos.shape[1] % bq)], constant_values=-1)
    kp = np.pad(kv_pos, [(0, 0), (0, -kv_pos.shape[1] % bkv)], constant_values=-1)
    nq, nkv = qp.shape[1] // bq, kp.shape[1] // bkv
    kv_first, kv_count = (np.asarray(a).reshape(2, nq) for a in ga_tpu.kv_blocks_per_q_block(
        jnp.asarray(qp), jnp.asarray(kp), case.window, bq, bkv))
    q_first, q_count = (np.asarray(a).reshape(2, nkv) for a in ga_tpu.q_blocks_per_kv_block(
        jnp.asarray(qp), jnp.asarray(kp), case.window, bq, bkv))
    pos_mask = numpy_mask(qp, kp, case.window)  # positions only: what the plan relies on
    needed = pos_mask.reshape(2, nq, bq, nkv, bkv).any(axis=(2, 4))  # (b, nq, nkv) block pairs with work

    def hull(row: np.ndarray) -> np.ndarray:  # contiguous hull of the True entries
        idx = np.flatnonzero(row)
        out = np.zeros_like(row)
        if idx.size:
            out[idx[0]:idx[-1] + 1] = True
        return out

    def visited(first: int, count: int, n: int) -> np.ndarray:
        out = np.zeros(n, bool)
        out[first:first + count] = True
        return out

    # kv_pos = arange(L) (contiguous): the visited ranges are exactly the hulls of the needed blocks.
    for bi in range(2):
        for i in range(nq):
            assert np.array_equal(visited(kv_first[bi, i], kv_count[bi, i], nkv), hull(needed[bi, i])), (bi, i)
        for c in range(nkv):
            assert np.array_equal(visited(q_first[bi, c], q_count[bi, c], nq), hull(needed[bi, :, c])), (bi, c)
    assert kv_count.sum() < 0.5 * 2 * nq * nkv  # sparse queries + short window: most kv blocks skipped
    assert (q_count == 0).any()  # padding kv blocks visit nothing


# --------------------------------------------------------------------------- dispatch and config


def test_auto_picks_pallas_tpu_on_tpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ga_api, "default_backend", lambda: "tpu")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    args, kwargs = make_inputs(Case(60, L=40, density=0.6, seg=2, window=7, hkv=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gathered_attention(*args, **kwargs, impl="auto", interpret=True)
    np.testing.assert_array_equal(out, gathered_attention(*args, **kwargs, impl="pallas_tpu", interpret=True))
    assert rel_err(out, gathered_attention(*args, **kwargs, impl="reference")) <= 1e-4


def test_auto_falls_back_with_reason_on_tpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ga_api, "default_backend", lambda: "tpu")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    args, kwargs = make_inputs(Case(61, L=10))
    q16 = args[0].astype(np.float16)
    with pytest.warns(UserWarning, match="Pallas TPU kernel cannot run.*float16.*'xla'"):
        out = gathered_attention(q16, *args[1:], **kwargs, impl="auto")
    assert out.dtype == jnp.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gathered_attention(q16, *args[1:], **kwargs, impl="auto")
    with pytest.raises(ValueError, match=r"^impl='pallas_tpu'.*float16"):
        gathered_attention(q16, *args[1:], **kwargs, impl="pallas_tpu", interpret=True)


def test_block_sizes_config() -> None:
    sizes = GatheredAttentionBlockSizes()
    assert (sizes.block_q, sizes.block_kv) == (128, 128)
    assert GatheredAttentionBlockSizes(block_q=8, block_kv=16).block_kv == 16
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=r"^block_kv\b"):
            GatheredAttentionBlockSizes(block_kv=bad)


# --------------------------------------------------------------------------- AOT lowering for TPU

_S = jax.ShapeDtypeStruct


def _lower_for_tpu(fn, *shapes) -> str:
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_tpu(dtype) -> None:
    """b=1, sq=512, skv=4096, 4 heads, d=128, window 2048, blocks 128: forward (1 Mosaic kernel)
    and forward + backward (3: fwd, dq, dk/dv) lower to ``tpu_custom_call`` on this CPU machine."""
    b, sq, skv, hq, hkv, d = 1, 512, 4096, 4, 4 if dtype == jnp.bfloat16 else 2, 128
    shapes = (_S((b, sq, hq, d), dtype), _S((b, skv, hkv, d), dtype), _S((b, skv, hkv, d), dtype),
              _S((b, sq), jnp.int32), _S((b, skv), jnp.int32), _S((b, sq), jnp.int32), _S((b, skv), jnp.int32))

    def fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return ga_api._gathered_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, 1 / math.sqrt(d), window=2048,
                                          impl="pallas_tpu", block_sizes=GatheredAttentionBlockSizes(128, 128))

    def grad(q, k, v, *rest):
        return jax.grad(lambda *qkv: jnp.sum(fwd(*qkv, *rest).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    assert _lower_for_tpu(fwd, *shapes).count("@tpu_custom_call(") == 1
    assert _lower_for_tpu(grad, *shapes).count("@tpu_custom_call(") == 3


def test_tpu_tiling_rule_is_checked() -> None:
    shapes = (_S((1, 512, 2, 128), jnp.float32), _S((1, 1024, 2, 128), jnp.float32),
              _S((1, 1024, 2, 128), jnp.float32), _S((1, 512), jnp.int32), _S((1, 1024), jnp.int32))

    def fwd(q, k, v, q_pos, kv_pos):
        return ga_api._gathered_attention(q, k, v, q_pos, kv_pos, None, None, 0.1, window=64, impl="pallas_tpu",
                                          block_sizes=GatheredAttentionBlockSizes(block_q=128, block_kv=64))

    with pytest.raises(ValueError, match=r"^block_kv=64 must be a multiple of 128"):
        _lower_for_tpu(fwd, *shapes)
