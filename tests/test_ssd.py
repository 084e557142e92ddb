"""Tests for pallas_kernels.ssd: numpy float64 oracle -> reference -> xla."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import SSDBlockSizes, _dispatch, ssd
from pallas_kernels.ssd import api as ssd_api


# --------------------------------------------------------------------------- oracle


def numpy_ssd(
    x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, dt_min=0.0, dt_max=np.inf,
    initial_state=None, segment_ids=None, **_: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 token-by-token loop implementing the ssd contract."""
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if dt_bias is not None:
        dt = dt + np.asarray(dt_bias, np.float64)
    if dt_softplus:
        dt = np.logaddexp(0.0, dt)
    dt = np.clip(dt, dt_min, dt_max)
    group = np.arange(h) // (h // g)
    y = np.zeros((b, l, h, p))
    final = np.zeros((b, h, p, n))
    for bi in range(b):
        state = np.zeros((h, p, n)) if initial_state is None else np.array(initial_state[bi], np.float64)
        for t in range(l):
            if segment_ids is not None and t > 0 and segment_ids[bi, t] != segment_ids[bi, t - 1]:
                state = np.zeros((h, p, n))
            Bt, Ct = B[bi, t, group], C[bi, t, group]  # (h, n)
            decay = np.exp(dt[bi, t] * A)[:, None, None]
            state = decay * state + dt[bi, t][:, None, None] * x[bi, t][:, :, None] * Bt[:, None, :]
            y[bi, t] = np.einsum("hpn,hn->hp", state, Ct)
        final[bi] = state
    if D is not None:
        D = np.asarray(D, np.float64)
        y = y + (D[:, None] if D.ndim == 1 else D) * x
    return y, final


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    b: int = 2
    l: int = 32
    h: int = 4
    p: int = 4
    g: int = 1
    n: int = 4
    chunk: int = 8
    D: str | None = None  # None | "head" | "channel"
    dt_bias: bool = False
    dt_softplus: bool = False
    dt_limits: tuple[float, float] | None = None
    init: bool = False
    seg: str | None = None  # None | "cross" | "edge" | "return" | "random"


def _segment_ids(kind: str, b: int, l: int, chunk: int, rng: np.random.RandomState) -> np.ndarray:
    seg = np.zeros((b, l), np.int32)
    if kind == "cross":  # boundaries strictly inside chunks
        for bi in range(b):
            for cut in sorted(rng.choice([t for t in range(1, l) if t % chunk], size=min(3, l - 1), replace=False)):
                seg[bi, cut:] += 1
    elif kind == "edge":  # changes exactly at t = k * chunk
        for cut in range(chunk, l, chunk):
            seg[:, cut:] += 1
    elif kind == "return":  # 0 -> 1 -> 0 -> 1 ...: every change returns to an earlier id
        seg = ((np.arange(l) // max(1, l // 5)) % 2).astype(np.int32)[None].repeat(b, 0)
        seg[-1, l // 2:] += 7
    elif kind == "random":  # many short documents, ids drawn from a small set
        seg = rng.randint(0, 3, size=(b, l)).astype(np.int32)
    else:
        raise AssertionError(kind)
    return seg


def make_inputs(case: Case, dtype=np.float32) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    rng = np.random.RandomState(case.seed)
    b, l, h, p, g, n = case.b, case.l, case.h, case.p, case.g, case.n
    x = rng.randn(b, l, h, p)
    dt_raw = rng.randn(b, l, h) - 2.0
    dt = dt_raw if case.dt_softplus else np.logaddexp(0.0, dt_raw)
    A = -np.exp(rng.uniform(-1.0, 1.0, size=h))
    B = rng.randn(b, l, g, n)
    C = rng.randn(b, l, g, n)
    kwargs: dict[str, Any] = {"chunk_size": case.chunk}
    if case.D == "head":
        kwargs["D"] = rng.randn(h)
    elif case.D == "channel":
        kwargs["D"] = rng.randn(h, p)
    if case.dt_bias:
        kwargs["dt_bias"] = 0.5 * rng.randn(h)
    if case.dt_softplus:
        kwargs["dt_softplus"] = True
    if case.dt_limits is not None:
        kwargs["dt_min"], kwargs["dt_max"] = case.dt_limits
    if case.init:
        kwargs["initial_state"] = rng.randn(b, h, p, n)
    if case.seg is not None:
        kwargs["segment_ids"] = _segment_ids(case.seg, b, l, case.chunk, rng)
    cast = lambda a: a.astype(dtype) if np.asarray(a).dtype == np.float64 else a  # noqa: E731
    return tuple(cast(a) for a in (x, dt, A, B, C)), {k: cast(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(args, kwargs, impl: str):
    return ssd(*args, **kwargs, impl=impl, return_final_state=True)


CASES = [
    Case(0),
    Case(1, l=37, chunk=16),
    Case(2, l=5, chunk=8),
    Case(3, l=1, chunk=8),
    Case(4, b=1, l=80, chunk=16),
    Case(5, g=2, h=4),
    Case(6, g=4, h=4, l=37, chunk=16),
    Case(7, p=3, n=5, l=37, chunk=16),
    Case(8, D="head"),
    Case(9, D="channel", p=3, n=5, l=21),
    Case(10, dt_bias=True, dt_softplus=True),
    Case(11, dt_bias=True, dt_softplus=True, dt_limits=(0.05, 0.2), l=37, chunk=16),
    Case(12, dt_bias=True, dt_limits=(0.0, 0.1)),
    Case(13, init=True),
    Case(14, init=True, l=37, chunk=16, g=2),
    Case(15, seg="cross", l=37, chunk=16),
    Case(16, seg="edge", l=40, chunk=8),
    Case(17, seg="edge", l=37, chunk=16, init=True),
    Case(18, seg="return", l=37, chunk=8, init=True),
    Case(19, seg="random", l=29, chunk=8, init=True, g=2),
    Case(20, seg="cross", init=True, g=2, p=3, n=5, D="channel", dt_bias=True, dt_softplus=True,
         dt_limits=(0.01, 0.5), l=45, chunk=16),
    Case(21, seg="edge", init=True, D="head", dt_bias=True, dt_softplus=True, l=33, chunk=8, g=4),
    Case(22, seg="return", l=80, chunk=16, h=2, p=8, n=8, init=True),
    Case(23, chunk=64, l=37, init=True),  # single padded chunk
]


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("case", [CASES[0], CASES[11], CASES[19], CASES[20]], ids=lambda c: f"seed{c.seed}")
def test_reference_matches_numpy_oracle(case: Case) -> None:
    args, kwargs = make_inputs(case)
    y, fs = run(args, kwargs, "reference")
    y_np, fs_np = numpy_ssd(*args, **kwargs)
    assert y.shape == y_np.shape and fs.shape == fs_np.shape
    assert y.dtype == jnp.float32 and fs.dtype == jnp.float32
    assert rel_err(y, y_np) <= 1e-5
    assert rel_err(fs, fs_np) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c.seed}")
def test_xla_matches_reference(case: Case) -> None:
    args, kwargs = make_inputs(case)
    y_ref, fs_ref = run(args, kwargs, "reference")
    y, fs = run(args, kwargs, "xla")
    assert y.shape == (case.b, case.l, case.h, case.p) and y.dtype == jnp.float32
    assert fs.shape == (case.b, case.h, case.p, case.n) and fs.dtype == jnp.float32
    assert rel_err(y, y_ref) <= 1e-5
    assert rel_err(fs, fs_ref) <= 1e-5


@pytest.mark.parametrize("case", [CASES[1], CASES[20]], ids=lambda c: f"seed{c.seed}")
def test_bf16_inputs(case: Case) -> None:
    args, kwargs = make_inputs(case)
    args_bf16 = tuple(jnp.asarray(a, jnp.bfloat16) for a in args)
    kwargs_bf16 = {k: jnp.asarray(v, jnp.bfloat16) if isinstance(v, np.ndarray) and v.dtype == np.float32 else v
                   for k, v in kwargs.items()}
    y, fs = run(args_bf16, kwargs_bf16, "xla")
    assert y.dtype == jnp.bfloat16 and fs.dtype == jnp.float32
    up = lambda a: jnp.asarray(a, jnp.float32) if isinstance(a, jax.Array) and a.dtype == jnp.bfloat16 else a  # noqa: E731
    y_ref, fs_ref = run(tuple(map(up, args_bf16)), {k: up(v) for k, v in kwargs_bf16.items()}, "reference")
    assert rel_err(y, y_ref) <= 2e-2
    assert rel_err(fs, fs_ref) <= 2e-2


GRAD_CASES = [
    Case(30, l=37, chunk=16, D="head", dt_bias=True, dt_softplus=True, init=True),
    Case(31, l=29, chunk=8, g=2, D="channel", dt_bias=True, init=True, seg="cross"),
    Case(32, l=40, chunk=8, p=3, n=5, D="head", dt_bias=True, dt_softplus=True, dt_limits=(0.02, 0.3),
         init=True, seg="edge"),
    Case(33, l=21, chunk=8, g=4, D="channel", dt_bias=True, dt_softplus=True, init=True, seg="random"),
]
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"seed{c.seed}")
def test_gradients_match_reference(case: Case) -> None:
    args, kwargs = make_inputs(case)
    rng = np.random.RandomState(case.seed + 1000)
    w = jnp.asarray(rng.randn(case.b, case.l, case.h, case.p), jnp.float32)
    w2 = jnp.asarray(rng.randn(case.b, case.h, case.p, case.n), jnp.float32)
    diff = dict(zip(GRAD_NAMES[:5], args)) | {k: kwargs.pop(k) for k in GRAD_NAMES[5:]}

    def loss(d, impl):
        y, fs = ssd(d["x"], d["dt"], d["A"], d["B"], d["C"], D=d["D"], dt_bias=d["dt_bias"],
                    initial_state=d["initial_state"], return_final_state=True, impl=impl, **kwargs)
        return jnp.sum(y * w) + jnp.sum(fs * w2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref, g_xla = grad(diff, "reference"), grad(diff, "xla")
    for name in GRAD_NAMES:
        assert g_xla[name].shape == np.shape(diff[name])
        assert rel_err(g_xla[name], g_ref[name]) <= 1e-4, name


def test_float64_matches_numpy_oracle() -> None:
    case = Case(40, l=37, chunk=16, g=2, D="channel", dt_bias=True, dt_softplus=True, init=True, seg="cross")
    args, kwargs = make_inputs(case, dtype=np.float64)
    y_np, fs_np = numpy_ssd(*args, **kwargs)
    with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(a, jnp.float64) for a in args)
        for impl in ("reference", "xla"):
            y, fs = run(args64, kwargs, impl)
            assert y.dtype == jnp.float64 and fs.dtype == jnp.float64
            assert rel_err(y, y_np) <= 1e-10, impl
            assert rel_err(fs, fs_np) <= 1e-10, impl


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_split_sequence_equals_single_call(impl: str) -> None:
    case = Case(50, l=37, chunk=8, g=2, D="head", dt_bias=True, dt_softplus=True, init=True)
    args, kwargs = make_inputs(case)
    split = 20
    seg = np.zeros((case.b, case.l), np.int32)
    seg[:, 7:] = 1
    seg[:, 14:] = 0
    seg[0, 27:] = 3  # no change at the split point itself
    y, fs = run(args, kwargs | {"segment_ids": seg}, impl)
    first = tuple(a[:, :split] if a.ndim > 1 else a for a in args)
    second = tuple(a[:, split:] if a.ndim > 1 else a for a in args)
    y1, fs1 = run(first, kwargs | {"segment_ids": seg[:, :split]}, impl)
    y2, fs2 = run(second, kwargs | {"segment_ids": seg[:, split:], "initial_state": fs1}, impl)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), y) <= 1e-5
    assert rel_err(fs2, fs) <= 1e-5


def test_returns_y_alone_by_default() -> None:
    args, kwargs = make_inputs(Case(60, l=10))
    y = ssd(*args, **kwargs, impl="xla")
    assert isinstance(y, jax.Array) and y.shape == (2, 10, 4, 4)


# --------------------------------------------------------------------------- dispatch


def test_auto_equals_xla_on_cpu() -> None:
    args, kwargs = make_inputs(CASES[15])
    y_auto, fs_auto = run(args, kwargs, "auto")
    y_xla, fs_xla = run(args, kwargs, "xla")
    np.testing.assert_array_equal(y_auto, y_xla)
    np.testing.assert_array_equal(fs_auto, fs_xla)


def test_auto_warns_once_on_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssd_api, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    args, kwargs = make_inputs(Case(61, l=10, p=320))  # p > 256: outside the GPU kernel's support
    with pytest.warns(UserWarning, match="Pallas GPU kernel does not support"):
        ssd(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ssd(*args, **kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU error")
def test_pallas_gpu_needs_gpu_or_interpret() -> None:
    args, kwargs = make_inputs(Case(62, l=10))
    with pytest.raises(NotImplementedError, match="pallas_gpu"):
        ssd(*args, **kwargs, impl="pallas_gpu")


def test_warn_once_and_validate_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    with pytest.warns(UserWarning, match="hello"):
        _dispatch.warn_once("k", "hello")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dispatch.warn_once("k", "hello")
    assert _dispatch.validate_impl("xla", ("xla", "reference")) == "xla"
    with pytest.raises(ValueError, match=r"impl=.*'xla', 'reference'"):
        _dispatch.validate_impl("nope", ("xla", "reference"))
    assert _dispatch.default_backend() == jax.default_backend()


def test_public_exports() -> None:
    assert {"ssd", "SSDBlockSizes"} <= set(pallas_kernels.__all__)
    assert SSDBlockSizes().chunk_size == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        SSDBlockSizes().chunk_size = 8  # type: ignore[misc]


# --------------------------------------------------------------------------- validation

_B, _L, _H, _P, _G, _N = 2, 6, 4, 3, 2, 5


def _valid() -> dict[str, Any]:
    z = np.zeros
    return dict(x=z((_B, _L, _H, _P)), dt=z((_B, _L, _H)), A=z(_H), B=z((_B, _L, _G, _N)), C=z((_B, _L, _G, _N)),
                D=z(_H), dt_bias=z(_H), initial_state=z((_B, _H, _P, _N)),
                segment_ids=z((_B, _L), np.int32), chunk_size=4)


BAD = [
    ("x", {"x": np.zeros((_B, _L, _H))}),
    ("dt", {"x": np.zeros((_B, _L + 1, _H, _P))}),  # x's l disagrees: reported on dt, the first array checked
    ("dt", {"dt": np.zeros((_B, _L, _H + 1))}),
    ("dt", {"dt": np.zeros((_B, _L))}),
    ("A", {"A": np.zeros((_H, 1))}),
    ("B", {"B": np.zeros((_B, _L, _G))}),
    ("B", {"B": np.zeros((_B + 1, _L, _G, _N))}),
    ("C", {"C": np.zeros((_B, _L, _G, _N + 1))}),
    ("C", {"C": np.zeros((_B, _L, 1, _N))}),
    ("D", {"D": np.zeros((_H + 1,))}),
    ("D", {"D": np.zeros((_H, _P + 1))}),
    ("dt_bias", {"dt_bias": np.zeros((_H, 1))}),
    ("initial_state", {"initial_state": np.zeros((_B, _H, _P, _N + 1))}),
    ("segment_ids", {"segment_ids": np.zeros((_B, _L + 1), np.int32)}),
    ("segment_ids", {"segment_ids": np.zeros((_B, _L), np.float32)}),
    ("chunk_size", {"chunk_size": 0}),
    ("chunk_size", {"chunk_size": -8}),
    ("impl", {"impl": "triton"}),
    ("B", {"B": np.zeros((_B, _L, 3, _N)), "C": np.zeros((_B, _L, 3, _N))}),  # h % g != 0
]


@pytest.mark.parametrize("name,override", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_validation_errors(name: str, override: dict[str, Any]) -> None:
    kw = _valid() | override
    args = [kw.pop(k) for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(ValueError, match=rf"^{name}\b") as info:
        ssd(*args, **kw)
    if name == "impl":
        assert "'xla'" in str(info.value) and "'reference'" in str(info.value)
    if np.ndim(args[3]) == 4 and np.shape(args[3])[2] == 3:
        assert "h % g" in str(info.value)
