"""Tests for gathered_attention(impl="pallas_gpu"), the Mosaic GPU kernels (forward, dq, dk/dv).

* On a Hopper GPU (skipped elsewhere, with the reason): forward (float32 rel <= 1e-4, bf16 <= 2e-2)
  and dq / dk / dv (rel <= 1e-3) against impl="reference" on the suite's cases -- windows shorter
  and longer than a block, sparse and dense selections, GQA, padding, segments, repeated positions,
  rows without keys -- plus SAL-sized shapes (d = 128, thousands of tokens, multi-block ranges).
* Anywhere (CPU CI included): the same kernels in Mosaic GPU interpret mode on small cases,
  ahead-of-time lowering for CUDA, dispatch and validation.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import GatheredAttentionBlockSizes, _dispatch, gathered_attention
from pallas_kernels.gathered_attention import api as ga_api
from pallas_kernels.gathered_attention import pallas_gpu as ga_gpu
from test_gathered_attention import Case, make_inputs, numpy_mask, rel_err
from gpu_marks import _clean_interpreter_state, gpu  # noqa: F401 (autouse fixture)
from test_gathered_attention_pallas_tpu import CASES as TPU_CASES


def attend(args, kwargs, impl: str, interpret: bool = False, block_sizes=None) -> jax.Array:
    scale = 1.0 / math.sqrt(args[0].shape[-1]) if kwargs.get("sm_scale") is None else kwargs["sm_scale"]
    return ga_api._gathered_attention(
        *args, kwargs.get("q_segment_ids"), kwargs.get("kv_segment_ids"), scale,
        window=kwargs["window"], impl=impl, block_sizes=block_sizes or GatheredAttentionBlockSizes(),
        interpret=interpret,
    )


def out_and_grads(args, kwargs, impl: str, interpret: bool = False, seed: int = 0, block_sizes=None):
    """``(out, (dq, dk, dv))`` of ``sum(out * w)`` for a fixed random ``w``, in one jit."""
    q, k, v, q_pos, kv_pos = args
    w = jnp.asarray(np.random.RandomState(seed + 1000).randn(*q.shape), jnp.float32)

    @jax.jit
    def f(q, k, v):
        out, vjp = jax.vjp(lambda *qkv: attend((*qkv, q_pos, kv_pos), kwargs, impl, interpret, block_sizes),
                           q, k, v)
        return out, vjp(w.astype(out.dtype))

    return f(q, k, v)


def check(args, kwargs, interpret: bool = False, seed: int = 0, block_sizes=None) -> None:
    """float32: forward rel <= 1e-4 and dq / dk / dv rel <= 1e-3 against the dense reference."""
    out, grads = out_and_grads(args, kwargs, "pallas_gpu", interpret, seed, block_sizes)
    ref_out, ref_grads = out_and_grads(args, kwargs, "reference", seed=seed)
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref_out) <= 1e-4, rel_err(out, ref_out)
    for name, g, gr in zip("qkv", grads, ref_grads):
        assert g.shape == gr.shape and g.dtype == jnp.float32, name
        assert np.all(np.isfinite(g)), name
        if np.any(np.asarray(gr) != 0):
            assert rel_err(g, gr) <= 1e-3, (name, rel_err(g, gr))
        else:  # window 1: dq is exactly 0 in the reference; rounding of dp - di leaves ~1e-5
            assert np.max(np.abs(g)) <= 1e-4, name


# --------------------------------------------------------------------------- on a Hopper GPU

# SAL-like shapes: 128-wide heads, several 128-row tiles, windows shorter / longer than a block.
BIG_CASES = [
    Case(100, b=2, L=2048, density=0.15, hq=4, hkv=2, d=128, window=256),  # sparse, window > 2 blocks
    Case(101, b=1, L=1024, density=1.0, hq=2, hkv=2, d=64, window=48),  # dense, window < block
    Case(102, b=2, L=1536, density=0.3, hq=4, hkv=1, d=128, window=700, seg=5, q_pad=40, kv_pad=70),
    Case(103, b=1, L=777, density=0.15, hq=2, hkv=2, d=96, kv="selected", window=300, sm_scale=0.3),
    Case(104, b=1, L=8192, density=0.15, hq=2, hkv=1, d=128, window=2048),  # SAL setting: unmasked interior
]


@gpu
@pytest.mark.parametrize("tc", TPU_CASES + [type(TPU_CASES[0])(c) for c in BIG_CASES],
                         ids=lambda tc: f"seed{tc.case.seed}")
def test_gpu_matches_reference(tc) -> None:
    args, kwargs = make_inputs(tc.case)
    check(args, kwargs, seed=tc.case.seed)


@gpu
@pytest.mark.parametrize("block_kv,stages", [(64, 1), (128, 3), (192, 2)])
def test_gpu_block_variants(block_kv: int, stages: int) -> None:
    case = BIG_CASES[2]
    args, kwargs = make_inputs(case)
    check(args, kwargs, seed=case.seed, block_sizes=GatheredAttentionBlockSizes(gpu_block_kv=block_kv,
                                                                                gpu_stages=stages))


@gpu
@pytest.mark.parametrize("case", [BIG_CASES[0], BIG_CASES[2], TPU_CASES[9].case], ids=lambda c: f"seed{c.seed}")
def test_gpu_bf16(case: Case) -> None:
    """bf16 inputs: forward and gradients within 2e-2 of float32 math on the same (rounded) values."""
    args, kwargs = make_inputs(case)
    qkv = tuple(jnp.asarray(a, jnp.bfloat16) for a in args[:3])
    out, grads = out_and_grads((*qkv, *args[3:]), kwargs, "pallas_gpu", seed=case.seed)
    assert out.dtype == jnp.bfloat16
    ref_out, ref_grads = out_and_grads((*(a.astype(jnp.float32) for a in qkv), *args[3:]), kwargs, "reference",
                                       seed=case.seed)
    assert rel_err(out, ref_out) <= 2e-2
    for name, g, gr in zip("qkv", grads, ref_grads):
        assert rel_err(g, gr) <= 2e-2, (name, rel_err(g, gr))


@gpu
def test_gpu_empty_rows_and_unattended_keys_are_exactly_zero() -> None:
    case = Case(20, L=300, density=0.6, seg=3, window=6, kv_short=True, q_pad=4, hq=2, hkv=1, d=64)
    args, kwargs = make_inputs(case)
    q_pos, kv_pos = args[3], args[4]
    mask = numpy_mask(q_pos, kv_pos, case.window, kwargs["q_segment_ids"], kwargs["kv_segment_ids"])
    keyless, unattended = ~mask.any(2), ~mask.any(1)
    assert (q_pos < 0).any() and unattended.any()
    out, (dq, dk, dv) = (jax.tree.map(np.asarray, x) for x in out_and_grads(args, kwargs, "pallas_gpu"))
    assert np.all(out[keyless] == 0.0) and np.all(np.abs(out[~keyless]).sum(-1) > 0)
    assert np.all(dq[keyless] == 0.0)
    assert np.all(dk[unattended] == 0.0) and np.all(dv[unattended] == 0.0)


@gpu
def test_gpu_repeated_positions_are_exact() -> None:
    case = Case(70, L=400, sq=300, window=37, hkv=2, seg=2, d=64)
    args, kwargs = make_inputs(case)
    rng = np.random.RandomState(7)
    q_pos = np.sort(rng.randint(0, case.L, size=args[3].shape), axis=1).astype(np.int32)
    kv_pos = np.sort(rng.randint(0, case.L, size=args[4].shape), axis=1).astype(np.int32)
    q_pos[1, -2:] = -1
    kv_pos[0, -3:] = -1
    seg = lambda p: np.where(p >= 0, np.maximum(p, 0) // 90, 0).astype(np.int32)  # noqa: E731
    kwargs.update(q_segment_ids=seg(q_pos), kv_segment_ids=seg(kv_pos))
    check((*args[:3], q_pos, kv_pos), kwargs)


@gpu
def test_gpu_auto_picks_kernel() -> None:
    args, kwargs = make_inputs(BIG_CASES[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gathered_attention(*args, **kwargs, impl="auto")
    np.testing.assert_array_equal(out, gathered_attention(*args, **kwargs, impl="pallas_gpu"))


# --------------------------------------------------------------------------- anywhere (interpret mode)

INTERPRET_CASES = [
    Case(200, L=40, density=0.6, hq=2, hkv=1, window=16),  # GQA 2/1, one tile
    Case(201, L=150, density=1.0, hq=2, hkv=2, d=5, window=70, seg=3, q_pad=7, kv_pad=9),  # 2 tiles, segments
    Case(202, L=160, density=0.15, hq=1, hkv=1, window=200, kv="selected", sm_scale=0.4),  # window > sequence
    Case(203, b=1, L=384, density=1.0, hq=1, hkv=1, window=300),  # unmasked interior blocks, skipped blocks
]


@pytest.fixture
def on_cpu():
    """Interpret mode runs on the CPU device: its simulated warpgroups wait on each other's
    barriers inside host callbacks, which a GPU backend's callback thread would serialise."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: f"seed{c.seed}")
def test_interpret_matches_reference(case: Case) -> None:
    args, kwargs = make_inputs(case)
    check(args, kwargs, interpret=True, seed=case.seed)


@pytest.mark.usefixtures("on_cpu")
def test_interpret_bf16_forward() -> None:
    case = INTERPRET_CASES[1]
    args, kwargs = make_inputs(case)
    qkv = tuple(jnp.asarray(a, jnp.bfloat16) for a in args[:3])
    out = attend((*qkv, *args[3:]), kwargs, "pallas_gpu", interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = attend((*(a.astype(jnp.float32) for a in qkv), *args[3:]), kwargs, "reference")
    assert rel_err(out, ref) <= 2e-2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_lowers_for_cuda(dtype) -> None:
    """Mosaic GPU lowering (layouts, wgmma operands, shared-memory fit) of forward and backward."""
    b, sq, skv, hq, hkv, d = 1, 300, 2048, 4, 2, 128
    S = jax.ShapeDtypeStruct
    shapes = (S((b, sq, hq, d), dtype), S((b, skv, hkv, d), dtype), S((b, skv, hkv, d), dtype),
              S((b, sq), jnp.int32), S((b, skv), jnp.int32), S((b, sq), jnp.int32), S((b, skv), jnp.int32))

    def fwd(q, k, v, qp, kp, qs, ks):
        return ga_gpu.gathered_attention_pallas_gpu(q, k, v, qp, kp, qs, ks, window=512, sm_scale=0.1)

    def grad(q, k, v, *rest):
        return jax.grad(lambda *qkv: jnp.sum(fwd(*qkv, *rest).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    assert jax.jit(fwd).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text().count("mosaic_gpu") >= 1
    assert jax.jit(grad).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text().count("mosaic_gpu") >= 3


def test_unsupported_reasons_and_config() -> None:
    z = lambda *s, dt=jnp.float32: jnp.zeros(s, dt)  # noqa: E731
    assert ga_gpu.unsupported_reason(z(1, 8, 2, 128), z(1, 8, 2, 128), z(1, 8, 2, 128)) is None
    with jax.enable_x64(True):
        assert "float64" in ga_gpu.unsupported_reason(z(1, 8, 2, 8, dt=jnp.float64), z(1, 8, 2, 8), z(1, 8, 2, 8))
    assert "300 > 256" in ga_gpu.unsupported_reason(z(1, 8, 2, 300), z(1, 8, 2, 300), z(1, 8, 2, 300))
    bf = jnp.bfloat16
    assert ga_gpu.unsupported_reason(z(1, 8, 2, 256, dt=bf), z(1, 8, 2, 256, dt=bf), z(1, 8, 2, 256, dt=bf)) is None
    assert "shared memory" in ga_gpu.unsupported_reason(z(1, 8, 2, 256), z(1, 8, 2, 256), z(1, 8, 2, 256))
    assert GatheredAttentionBlockSizes().gpu_block_kv == 128
    with pytest.raises(ValueError, match=r"^gpu_block_kv"):
        GatheredAttentionBlockSizes(gpu_block_kv=96)
    with pytest.raises(ValueError, match=r"^gpu_stages"):
        GatheredAttentionBlockSizes(gpu_stages=0)


def test_pallas_gpu_needs_gpu_or_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ga_api, "default_backend", lambda: "cpu")
    args, kwargs = make_inputs(Case(62, L=10))
    with pytest.raises(NotImplementedError, match=r"pallas_gpu.*GPU backend.*interpret=True"):
        gathered_attention(*args, **kwargs, impl="pallas_gpu")
    with jax.enable_x64(True), pytest.raises(ValueError, match=r"^impl='pallas_gpu'.*float64"):
        gathered_attention(*(a.astype(np.float64) for a in args[:3]), *args[3:], **kwargs, impl="pallas_gpu",
                           interpret=True)


def test_auto_on_gpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """impl="auto" on a GPU backend picks pallas_gpu when supported, else xla with one warning."""
    monkeypatch.setattr(ga_api, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    z = lambda *s, dt=jnp.float32: jnp.zeros(s, dt)  # noqa: E731
    sizes = GatheredAttentionBlockSizes()
    assert ga_api._resolve_impl("auto", False, z(1, 8, 2, 64), z(1, 8, 2, 64), z(1, 8, 2, 64), sizes) == "pallas_gpu"
    big = z(1, 8, 2, 300)
    with pytest.warns(UserWarning, match=r"Pallas GPU kernel cannot run.*300 > 256.*'xla'"):
        assert ga_api._resolve_impl("auto", False, big, big, big, sizes) == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ga_api._resolve_impl("auto", False, big, big, big, sizes) == "xla"
