"""Tests for ssd(impl="pallas_tpu"): the Mosaic TPU kernels in TPU interpret mode on CPU against
impl="reference" (forward and every gradient), race detection, dispatch, and AOT lowering for TPU."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import SSDBlockSizes, _dispatch, ssd
from pallas_kernels.ssd import api as ssd_api
from pallas_kernels.ssd import config as ssd_config
from pallas_kernels.ssd import pallas_tpu as ssd_tpu
from test_ssd import GRAD_NAMES, Case, make_inputs, rel_err


@pytest.fixture(autouse=True)
def _clean_interpreter_state():
    """TPU interpret mode keeps global state after an exception inside a kernel; reset it."""
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _preprocessed(case: Case, dtype=np.float32):
    """Inputs as the op receives them (what api._ssd hands to an implementation)."""
    args, kw = make_inputs(case, dtype)
    x, dt, A, B, C = (jnp.asarray(a) for a in args)
    b, l, h, p = x.shape
    dt = dt + (0.0 if kw.get("dt_bias") is None else jnp.asarray(kw["dt_bias"]))
    if kw.get("dt_softplus"):
        dt = jax.nn.softplus(dt)
    dt = jnp.clip(dt, kw.get("dt_min", 0.0), kw.get("dt_max", np.inf))
    D = None if kw.get("D") is None else jnp.broadcast_to(jnp.asarray(kw["D"]).reshape(h, -1), (h, p))
    s0 = jnp.asarray(kw["initial_state"]) if "initial_state" in kw else jnp.zeros((b, h, p, B.shape[-1]))
    doc = ssd_api.document_index(None if "segment_ids" not in kw else jnp.asarray(kw["segment_ids"]), b, l)
    return (x, dt, A, B, C, D, s0, doc), kw["chunk_size"]


# --------------------------------------------------------------------------- forward

FWD_CASES = [
    # (case, tpu_heads_per_block); None = the default plan (interpret mode: hb = h if g == 1, else 1)
    (Case(100, l=21, chunk=8, g=2, D="channel", init=True, seg="cross"), None),  # l % chunk != 0, g > 1
    (Case(101, l=37, chunk=16, D="head", dt_bias=True, dt_softplus=True, dt_limits=(0.02, 0.4), seg="edge"), None),
    (Case(102, l=29, chunk=8, g=4, init=True, seg="random"), None),  # one head per group
    (Case(103, l=5, chunk=8, init=True, seg="return", p=3, n=5), None),  # one padded chunk, odd p / n
    (Case(104, l=40, chunk=8, init=True, seg="edge", D="channel"), 2),  # 2 head blocks per group
    (Case(105, l=24, chunk=8, h=4, g=2, init=True, seg="return", dt_bias=True), 2),
    # The compiled kernel's tiling: p=64 -> 2 heads (128 lanes) per block, n=128, chunk 128.
    (Case(106, b=1, l=300, h=4, p=64, n=128, chunk=128, D="head", init=True, seg="cross"), None),
]


@pytest.mark.parametrize("case,hb", FWD_CASES, ids=lambda c: f"seed{c.seed}" if isinstance(c, Case) else f"hb{c}")
def test_forward_matches_reference(case: Case, hb: int | None) -> None:
    args, chunk = _preprocessed(case)
    y_ref, fs_ref = ssd_api.ssd_reference(*args)
    y, fs = ssd_tpu.ssd_pallas_tpu(*args, SSDBlockSizes(chunk, tpu_heads_per_block=hb), interpret=True)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert fs.shape == fs_ref.shape and fs.dtype == jnp.float32
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(fs, fs_ref) <= 1e-4


def test_public_api_float32_and_bf16() -> None:
    """Through ssd(): float32 inputs (<= 1e-4) and bfloat16 inputs (<= 2e-2, y in bf16)."""
    case = Case(110, l=37, chunk=16, g=2, D="channel", dt_bias=True, dt_softplus=True, init=True, seg="cross")
    args, kwargs = make_inputs(case)
    y_ref, fs_ref = ssd(*args, **kwargs, impl="reference", return_final_state=True)
    y, fs = ssd(*args, **kwargs, impl="pallas_tpu", interpret=True, return_final_state=True)
    assert rel_err(y, y_ref) <= 1e-4 and rel_err(fs, fs_ref) <= 1e-4

    bf = lambda a: jnp.asarray(a, jnp.bfloat16) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a  # noqa: E731
    args16, kwargs16 = tuple(map(bf, args)), {k: bf(v) for k, v in kwargs.items()}
    y16, fs16 = ssd(*args16, **kwargs16, impl="pallas_tpu", interpret=True, return_final_state=True)
    assert y16.dtype == jnp.bfloat16 and fs16.dtype == jnp.float32
    up = lambda a: jnp.asarray(a, jnp.float32) if isinstance(a, jax.Array) and a.dtype == jnp.bfloat16 else a  # noqa: E731
    y_ref16, fs_ref16 = ssd(*map(up, args16), **{k: up(v) for k, v in kwargs16.items()}, impl="reference",
                            return_final_state=True)
    assert rel_err(y16, y_ref16) <= 2e-2 and rel_err(fs16, fs_ref16) <= 2e-2


# --------------------------------------------------------------------------- gradients

GRAD_CASES = [
    Case(120, l=21, chunk=8, g=2, D="channel", dt_bias=True, dt_softplus=True, dt_limits=(0.02, 0.5),
         init=True, seg="cross"),
    Case(121, l=24, chunk=8, D="head", dt_bias=True, dt_softplus=True, init=True, seg="edge"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"seed{c.seed}")
def test_gradients_match_reference(case: Case) -> None:
    args, kwargs = make_inputs(case)
    rng = np.random.RandomState(case.seed + 1000)
    w = jnp.asarray(rng.randn(case.b, case.l, case.h, case.p), jnp.float32)
    w2 = jnp.asarray(rng.randn(case.b, case.h, case.p, case.n), jnp.float32)
    diff = dict(zip(GRAD_NAMES[:5], args)) | {k: kwargs.pop(k) for k in GRAD_NAMES[5:]}

    def loss(d, impl):
        y, fs = ssd(d["x"], d["dt"], d["A"], d["B"], d["C"], D=d["D"], dt_bias=d["dt_bias"],
                    initial_state=d["initial_state"], return_final_state=True, impl=impl, interpret=True,
                    **kwargs)
        return jnp.sum(y * w) + jnp.sum(fs * w2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref, g_tpu = grad(diff, "reference"), grad(diff, "pallas_tpu")
    for name in GRAD_NAMES:
        assert g_tpu[name].shape == np.shape(diff[name])
        assert rel_err(g_tpu[name], g_ref[name]) <= 1e-3, name


# --------------------------------------------------------------------------- race detection


def test_no_races_detected() -> None:
    """Forward and backward under the interpreter's race detector, with the parallel grid axes
    (batch, group) spread over two simulated TensorCores."""
    case = Case(130, l=16, chunk=8, g=2, init=True, seg="cross")
    args, chunk = _preprocessed(case)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    f = lambda *a: ssd_tpu.ssd_pallas_tpu(*a, *args[5:], SSDBlockSizes(chunk), interpret=params)  # noqa: E731
    (y, fs), vjp = jax.vjp(f, *args[:5])
    grads = vjp((jnp.ones_like(y), jnp.ones_like(fs)))
    jax.block_until_ready(grads)
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
    y_ref, fs_ref = ssd_api.ssd_reference(*args)
    assert rel_err(y, y_ref) <= 1e-4 and rel_err(fs, fs_ref) <= 1e-4


# --------------------------------------------------------------------------- lowering for TPU


@pytest.mark.parametrize("dtype,h,g,p", [(jnp.float32, 4, 1, 64), (jnp.bfloat16, 8, 2, 128)], ids=["f32", "bf16-g2"])
def test_lowers_for_tpu(dtype, h: int, g: int, p: int) -> None:
    """Forward and backward Mosaic kernels lower for TPU on this CPU host (Pallas -> Mosaic MLIR;
    Mosaic's own compilation needs libtpu and is not exercised here). b=1, L=1024, n=128, chunk 256."""
    b, l, n = 1, 1024, 128
    S = jax.ShapeDtypeStruct
    args = (S((b, l, h, p), dtype), S((b, l, h), dtype), S((h,), jnp.float32), S((b, l, g, n), dtype),
            S((b, l, g, n), dtype), S((h, p), jnp.float32), S((b, h, p, n), jnp.float32), S((b, l), jnp.int32))

    def loss(x, dt, A, B, C, D, s0, seg):
        y, fs = ssd(x, dt, A, B, C, D=D, initial_state=s0, segment_ids=seg, dt_softplus=True, chunk_size=256,
                    impl="pallas_tpu", return_final_state=True)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(fs)

    fwd = jax.jit(loss).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert fwd.count("tpu_custom_call") == 1
    bwd = jax.jit(jax.grad(loss, argnums=range(7))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert bwd.count("tpu_custom_call") == 2  # forward (saving states) + backward


def test_compiled_mode_rejects_untileable_shapes() -> None:
    """Without interpret mode, shapes that break TPU lane tiling raise a clear ValueError."""
    args, chunk = _preprocessed(Case(140, l=16, chunk=8, g=2, p=4, n=8))
    with pytest.raises(ValueError, match="cannot tile"):
        ssd_tpu.ssd_pallas_tpu(*args, SSDBlockSizes(chunk))
    with pytest.raises(ValueError, match="tpu_heads_per_block=3 must divide"):
        ssd_tpu.ssd_pallas_tpu(*args, SSDBlockSizes(chunk, tpu_heads_per_block=3), interpret=True)


# --------------------------------------------------------------------------- dispatch


def test_auto_on_tpu_picks_kernel_or_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssd_api, "default_backend", lambda: "tpu")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    x = jnp.zeros((1, 512, 4, 64))
    B = jnp.zeros((1, 512, 1, 128))
    assert ssd_api._resolve_impl("auto", False) == "auto"
    assert ssd_api._resolve_auto_tpu(x, B, B, SSDBlockSizes(256), jnp.dtype(jnp.float32)) == "pallas_tpu"
    assert ssd_api._resolve_auto_tpu(x.astype(jnp.bfloat16), B.astype(jnp.bfloat16), B.astype(jnp.bfloat16),
                                     SSDBlockSizes(256), jnp.dtype(jnp.float32)) == "pallas_tpu"
    # Unsupported call (chunk 8): falls back to xla with a one-time warning naming the reason; runs on CPU.
    args, kwargs = make_inputs(Case(150, l=10))
    with pytest.warns(UserWarning, match="Pallas TPU kernel does not support.*chunk_size=8"):
        y = ssd(*args, **kwargs)
    np.testing.assert_array_equal(y, ssd(*args, **kwargs, impl="xla"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ssd(*args, **kwargs)


def test_unsupported_reasons() -> None:
    f32 = jnp.dtype(jnp.float32)
    ok = ((2, 512, 8, 64), (2, 512, 2, 128))
    assert ssd_tpu.unsupported_reason(*ok, SSDBlockSizes(256), f32) is None
    assert "float64" in ssd_tpu.unsupported_reason(*ok, SSDBlockSizes(256), jnp.dtype(jnp.float64))
    assert "multiple of 128" in ssd_tpu.unsupported_reason(*ok, SSDBlockSizes(64), f32)
    assert "n=64" in ssd_tpu.unsupported_reason((2, 512, 8, 64), (2, 512, 2, 64), SSDBlockSizes(256), f32)
    assert "heads-per-block" in ssd_tpu.unsupported_reason((2, 512, 6, 40), (2, 512, 2, 128), SSDBlockSizes(256), f32)
    assert ssd_tpu.unsupported_reason((2, 512, 8, 40), (2, 512, 1, 64), SSDBlockSizes(256), f32) is None  # hb = h


def test_pallas_impls_errors() -> None:
    args, kwargs = make_inputs(Case(160, l=10))
    with pytest.raises(NotImplementedError, match="pallas_gpu"):
        ssd(*args, **kwargs, impl="pallas_gpu")  # no GPU here and not interpreting
    with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(a, jnp.float64) for a in args)
        with pytest.raises(NotImplementedError, match="float64"):
            ssd(*args64, **kwargs, impl="pallas_tpu", interpret=True)


# --------------------------------------------------------------------------- config


def test_block_size_fields_and_generation_table() -> None:
    assert SSDBlockSizes().tpu_heads_per_block is None and SSDBlockSizes().tpu_vmem_limit_bytes is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tpu_heads_per_block"):
            SSDBlockSizes(tpu_heads_per_block=bad)
    with pytest.raises(ValueError, match="tpu_vmem_limit_bytes"):
        SSDBlockSizes(tpu_vmem_limit_bytes=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SSDBlockSizes().tpu_heads_per_block = 2  # type: ignore[misc]
    mib = 1024 * 1024
    table = ssd_config.TPU_GENERATION_DEFAULTS
    assert {k: v.vmem_capacity_bytes // mib for k, v in table.items() if k} == {"v4": 16, "v5e": 128, "v5p": 64,
                                                                                 "v6e": 128}
    for chip, d in table.items():
        assert d.vmem_budget_bytes <= d.vmem_capacity_bytes
        if chip:  # agrees with jax's own hardware table
            info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(chip), 1)
            assert info.vmem_capacity_bytes == d.vmem_capacity_bytes and info.mxu_column_size == d.mxu_lanes
    # Default plan: the narrowest lane-aligned head block at least one MXU wide.
    plan = lambda chip: ssd_tpu._plan(8, 1, 64, 128, 256, 2, 2, SSDBlockSizes(256), chip, compiled=True)  # noqa: E731
    assert plan("v5e")[0] == 2 and plan("v6e")[0] == 4 and plan(None)[0] == 2
    assert plan("v5e")[2] is None
