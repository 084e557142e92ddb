"""Tests for pallas_kernels.gathered_attention: numpy float64 oracle -> reference -> xla."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import GatheredAttentionBlockSizes, _dispatch, gathered_attention
from pallas_kernels.gathered_attention import api as ga_api

# --------------------------------------------------------------------------- oracle


def numpy_mask(q_pos, kv_pos, window, q_seg=None, kv_seg=None) -> np.ndarray:
    """(b, sq, skv) bool: query i attends key j, written out pair by pair."""
    b, sq = q_pos.shape
    skv = kv_pos.shape[1]
    mask = np.zeros((b, sq, skv), bool)
    for bi in range(b):
        for i in range(sq):
            for j in range(skv):
                qp, kp = int(q_pos[bi, i]), int(kv_pos[bi, j])
                ok = qp >= 0 and kp >= 0 and 0 <= qp - kp < window
                if q_seg is not None:
                    ok = ok and q_seg[bi, i] == kv_seg[bi, j]
                mask[bi, i, j] = ok
    return mask


def numpy_attention(q, k, v, q_pos, kv_pos, *, window, sm_scale=None, q_segment_ids=None,
                    kv_segment_ids=None, **_: Any) -> np.ndarray:
    """Independent float64 loop implementing the gathered_attention contract."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, sq, hq, d = q.shape
    group = hq // k.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    mask = numpy_mask(q_pos, kv_pos, window, q_segment_ids, kv_segment_ids)
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(sq):
            keys = np.flatnonzero(mask[bi, i])
            if keys.size == 0:
                continue
            for h in range(hq):
                s = scale * (k[bi, keys, h // group] @ q[bi, i, h])
                p = np.exp(s - s.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, keys, h // group]
    return out


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    b: int = 2
    L: int = 32  # length of the underlying token sequence (positions 0..L-1)
    density: float = 1.0  # fraction of positions selected as queries (sq = round(density * L))
    sq: int | None = None  # overrides density
    hq: int = 4
    hkv: int = 4
    d: int = 8
    window: int = 8
    block_q: int | None = 8  # None: the public API with its default block sizes
    kv: str = "full"  # "full": kv_pos = arange(L); "selected": kv_pos = q_pos
    kv_pad: int = 0  # trailing -1 kv columns
    kv_short: bool = False  # row 0 has only L // 2 valid keys (more padding)
    q_pad: int = 0  # trailing -1 queries in the last row
    seg: int = 0  # number of packed documents (0: no segment ids)
    sm_scale: float | None = None


def make_inputs(case: Case, dtype=np.float32) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    """``(q, k, v, q_pos, kv_pos), kwargs`` for :func:`gathered_attention`."""
    rng = np.random.RandomState(case.seed)
    b, L = case.b, case.L
    sq = case.sq if case.sq is not None else max(1, round(case.density * L))
    q_pos = np.full((b, sq), -1, np.int32)
    for bi in range(b):
        count = sq - (case.q_pad if bi == b - 1 else 0)
        q_pos[bi, :count] = np.sort(rng.choice(L, size=count, replace=False))
    if case.kv == "full":
        kv_pos = np.tile(np.arange(L, dtype=np.int32), (b, 1))
        if case.kv_short:
            kv_pos[0, L // 2:] = -1
    else:
        assert case.kv == "selected" and not case.kv_short
        kv_pos = q_pos.copy()
    kv_pos = np.concatenate([kv_pos, np.full((b, case.kv_pad), -1, np.int32)], axis=1)
    skv = kv_pos.shape[1]
    q = rng.randn(b, sq, case.hq, case.d).astype(dtype)
    k = rng.randn(b, skv, case.hkv, case.d).astype(dtype)
    v = rng.randn(b, skv, case.hkv, case.d).astype(dtype)
    kwargs: dict[str, Any] = {"window": case.window, "sm_scale": case.sm_scale}
    if case.seg:
        doc = np.zeros((b, L), np.int32)
        for bi in range(b):
            for cut in rng.choice(np.arange(1, L), size=case.seg - 1, replace=False):
                doc[bi, cut:] += 1
        doc = 3 * doc + 5  # arbitrary labels
        for name, pos in (("q_segment_ids", q_pos), ("kv_segment_ids", kv_pos)):  # padding gets random ids
            garbage = rng.randint(0, 9, size=pos.shape).astype(np.int32)
            kwargs[name] = np.where(pos >= 0, np.take_along_axis(doc, np.maximum(pos, 0), 1), garbage)
    return (q, k, v, q_pos, kv_pos), kwargs


def run(case: Case, args, kwargs, impl: str) -> jax.Array:
    """Public API when ``case.block_q`` is None, else the jitted core with ``block_q`` (same dispatch)."""
    if case.block_q is None:
        return gathered_attention(*args, **kwargs, impl=impl)
    scale = 1.0 / math.sqrt(args[0].shape[-1]) if kwargs["sm_scale"] is None else kwargs["sm_scale"]
    return ga_api._gathered_attention(
        *args, kwargs.get("q_segment_ids"), kwargs.get("kv_segment_ids"), scale,
        window=kwargs["window"], impl=impl, block_sizes=GatheredAttentionBlockSizes(block_q=case.block_q),
    )


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CASES = [
    Case(0, L=32, density=1.0, window=8, block_q=8),  # every position is a query
    Case(1, L=64, density=0.15, window=16, hkv=2, block_q=4, kv_pad=5),  # sparse queries, GQA 4/2
    Case(2, L=48, density=0.6, window=12, hkv=1, block_q=8, q_pad=6, kv_short=True),  # GQA 4/1, padding
    Case(3, L=24, density=1.0, window=1, block_q=8),  # window 1: only the key at the same position
    Case(4, L=30, density=0.6, window=1000, block_q=8, kv_pad=3),  # window longer than the sequence
    Case(5, L=40, density=0.6, window=3, block_q=16),  # window shorter than block_q
    Case(6, L=13, sq=7, d=5, hq=2, hkv=1, window=4, block_q=3),  # odd sizes: sq=7, skv=13, d=5
    Case(7, L=48, density=0.6, kv="selected", window=10, block_q=4),  # kv = the selected tokens
    Case(8, L=40, density=1.0, seg=3, window=16, block_q=8),  # packed documents
    Case(9, L=64, density=0.15, seg=4, hkv=1, window=24, block_q=4, q_pad=3, kv_pad=2),
    Case(10, L=48, density=0.6, kv="selected", seg=3, q_pad=5, kv_pad=2, window=12, hkv=2, block_q=8),
    Case(11, L=32, density=0.6, window=32, block_q=5, kv_short=True, q_pad=19),  # a fully padded query row
    Case(12, L=20, density=1.0, window=20, block_q=64),  # window == skv, a single chunk
    Case(13, b=1, L=130, density=1.0, window=16, block_q=None),  # public API: default block_q, 2 chunks
    Case(14, L=80, density=0.15, window=40, kv="selected", seg=2, block_q=2, sm_scale=0.7),
]


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[10], CASES[14]], ids=lambda c: f"seed{c.seed}")
def test_reference_matches_numpy_oracle(case: Case) -> None:
    args, kwargs = make_inputs(case)
    out = gathered_attention(*args, **kwargs, impl="reference")
    expected = numpy_attention(*args, **kwargs)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c.seed}")
def test_xla_matches_reference(case: Case) -> None:
    args, kwargs = make_inputs(case)
    ref = run(case, args, kwargs, "reference")
    out = run(case, args, kwargs, "xla")
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref) <= 1e-5


def test_rows_without_keys_and_padding_queries_are_zero() -> None:
    case = Case(20, L=40, density=0.6, seg=3, window=6, kv_short=True, q_pad=4, block_q=4, hkv=2)
    args, kwargs = make_inputs(case)
    q_pos = args[3]
    empty = ~numpy_mask(q_pos, args[4], case.window, kwargs["q_segment_ids"], kwargs["kv_segment_ids"]).any(-1)
    assert (q_pos < 0).any() and (empty & (q_pos >= 0)).any() and (~empty).any()
    for impl in ("reference", "xla"):
        out = np.asarray(run(case, args, kwargs, impl))
        assert np.all(out[empty] == 0.0), impl
        assert np.all(np.abs(out[~empty]).sum(-1) > 0), impl


GRAD_CASES = [CASES[2], CASES[9], CASES[10], CASES[11]]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"seed{c.seed}")
def test_gradients_match_reference(case: Case) -> None:
    (q, k, v, q_pos, kv_pos), kwargs = make_inputs(case)
    w = jnp.asarray(np.random.RandomState(case.seed + 1000).randn(*q.shape), jnp.float32)

    def loss(qkv, impl):
        return jnp.sum(run(case, (*qkv, q_pos, kv_pos), kwargs, impl) * w)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref, g_xla = grad((q, k, v), "reference"), grad((q, k, v), "xla")
    mask = numpy_mask(q_pos, kv_pos, case.window, kwargs.get("q_segment_ids"), kwargs.get("kv_segment_ids"))
    unattended, keyless = ~mask.any(1), ~mask.any(2)  # (b, skv), (b, sq)
    assert unattended.any() and keyless.any()
    for name, gr, gx in zip("qkv", g_ref, g_xla):
        assert np.all(np.isfinite(gx)), name
        assert rel_err(gx, gr) <= 1e-4, name
    for g in (g_ref, g_xla):
        assert np.all(np.asarray(g[0])[keyless] == 0.0)
        assert np.all(np.asarray(g[1])[unattended] == 0.0)
        assert np.all(np.asarray(g[2])[unattended] == 0.0)


@pytest.mark.parametrize("case", [CASES[1], CASES[10]], ids=lambda c: f"seed{c.seed}")
def test_bf16_inputs(case: Case) -> None:
    args, kwargs = make_inputs(case)
    qkv_bf16 = tuple(jnp.asarray(a, jnp.bfloat16) for a in args[:3])
    out = run(case, (*qkv_bf16, *args[3:]), kwargs, "xla")
    assert out.dtype == jnp.bfloat16
    ref = run(case, (*(a.astype(jnp.float32) for a in qkv_bf16), *args[3:]), kwargs, "reference")
    assert rel_err(out, ref) <= 2e-2


def test_float64_matches_numpy_oracle() -> None:
    case = Case(40, L=48, density=0.6, kv="selected", seg=3, q_pad=5, kv_pad=2, window=12, hkv=2, block_q=8)
    args, kwargs = make_inputs(case, dtype=np.float64)
    expected = numpy_attention(*args, **kwargs)
    with jax.enable_x64(True):
        for impl in ("reference", "xla"):
            out = run(case, args, kwargs, impl)
            assert out.dtype == jnp.float64
            assert rel_err(out, expected) <= 1e-10, impl


def test_xla_memory_is_window_bounded() -> None:
    """sq=64, skv=4096, window=64: the xla path never materialises (sq, skv) scores."""
    b, sq, skv, hq, hkv, d, window = 1, 64, 4096, 4, 2, 8, 64
    shapes = [jax.ShapeDtypeStruct(s, dt) for s, dt in (
        ((b, sq, hq, d), jnp.float32), ((b, skv, hkv, d), jnp.float32), ((b, skv, hkv, d), jnp.float32),
        ((b, sq), jnp.int32), ((b, skv), jnp.int32))]
    dense_bytes = sq * skv * hq * 4

    def temp_bytes(impl: str, block_q: int, grad: bool) -> int:
        def attend(q, k, v, q_pos, kv_pos):
            return ga_api._gathered_attention(q, k, v, q_pos, kv_pos, None, None, 0.5, window=window, impl=impl,
                                              block_sizes=GatheredAttentionBlockSizes(block_q=block_q))
        f = jax.grad(lambda *a: jnp.sum(attend(*a)), argnums=(0, 1, 2)) if grad else attend
        stats = jax.jit(f).lower(*shapes).compile().memory_analysis()
        if stats is None or not hasattr(stats, "temp_size_in_bytes"):
            pytest.skip("compiled.memory_analysis() reports nothing on this backend")
        return int(stats.temp_size_in_bytes)

    ref_fwd = temp_bytes("reference", 128, False)
    xla_fwd_default = temp_bytes("xla", GatheredAttentionBlockSizes().block_q, False)  # one chunk of 64
    xla_fwd, xla_grad = temp_bytes("xla", 16, False), temp_bytes("xla", 16, True)
    assert ref_fwd >= dense_bytes  # sanity: the dense path does hold (sq, skv) scores per head
    assert xla_fwd_default < dense_bytes / 4
    assert xla_fwd < dense_bytes / 16
    assert xla_grad < dense_bytes / 4
    assert xla_fwd < xla_fwd_default  # smaller query chunks -> smaller intermediates


# --------------------------------------------------------------------------- dispatch


def test_auto_equals_xla_on_cpu() -> None:
    args, kwargs = make_inputs(CASES[8])
    np.testing.assert_array_equal(gathered_attention(*args, **kwargs, impl="auto"),
                                  gathered_attention(*args, **kwargs, impl="xla"))


def test_auto_warns_once_on_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU backend, float64 inputs (no Pallas kernel takes them) fall back to xla, warning once."""
    monkeypatch.setattr(ga_api, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    args, kwargs = make_inputs(Case(61, L=10), dtype=np.float64)
    with jax.enable_x64(True):
        with pytest.warns(UserWarning, match="Pallas GPU kernel cannot run.*float64"):
            gathered_attention(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gathered_attention(*args, **kwargs)


def test_public_exports_and_block_sizes() -> None:
    assert {"gathered_attention", "GatheredAttentionBlockSizes"} <= set(pallas_kernels.__all__)
    assert GatheredAttentionBlockSizes().block_q == 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        GatheredAttentionBlockSizes().block_q = 8  # type: ignore[misc]
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=r"^block_q\b"):
            GatheredAttentionBlockSizes(block_q=bad)


# --------------------------------------------------------------------------- validation

_B, _SQ, _SKV, _HQ, _HKV, _D = 2, 5, 7, 4, 2, 3


def _valid() -> dict[str, Any]:
    z = np.zeros
    return dict(q=z((_B, _SQ, _HQ, _D), np.float32), k=z((_B, _SKV, _HKV, _D), np.float32),
                v=z((_B, _SKV, _HKV, _D), np.float32), q_pos=z((_B, _SQ), np.int32), kv_pos=z((_B, _SKV), np.int32),
                window=4, q_segment_ids=z((_B, _SQ), np.int32), kv_segment_ids=z((_B, _SKV), np.int32))


BAD = [
    ("q", {"q": np.zeros((_B, _SQ, _HQ))}),
    ("k", {"k": np.zeros((_B, _SKV, _HKV))}),
    ("k", {"k": np.zeros((_B + 1, _SKV, _HKV, _D))}),
    ("k", {"k": np.zeros((_B, _SKV, _HKV, _D + 1))}),
    ("k", {"k": np.zeros((_B, _SKV, 3, _D)), "v": np.zeros((_B, _SKV, 3, _D))}),  # hq % hkv != 0
    ("v", {"v": np.zeros((_B, _SKV + 1, _HKV, _D))}),
    ("v", {"v": np.zeros((_B, _SKV, _HKV))}),
    ("q_pos", {"q_pos": np.zeros((_B, _SQ + 1), np.int32)}),
    ("q_pos", {"q_pos": np.zeros((_B, _SQ), np.float32)}),
    ("kv_pos", {"kv_pos": np.zeros((_B, _SKV - 1), np.int32)}),
    ("kv_pos", {"kv_pos": np.zeros((_B, _SKV, 1), np.int32)}),
    ("kv_pos", {"kv_pos": np.zeros((_B, _SKV), np.float32)}),
    ("q_segment_ids", {"q_segment_ids": None}),
    ("kv_segment_ids", {"kv_segment_ids": None}),
    ("q_segment_ids", {"q_segment_ids": np.zeros((_B, _SKV), np.int32)}),
    ("kv_segment_ids", {"kv_segment_ids": np.zeros((_B, _SKV), np.float32)}),
    ("window", {"window": 0}),
    ("window", {"window": -3}),
    ("window", {"window": 2.5}),
    ("sm_scale", {"sm_scale": 0.0}),
    ("sm_scale", {"sm_scale": -1.0}),
    ("impl", {"impl": "triton"}),
]


@pytest.mark.parametrize("name,override", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_validation_errors(name: str, override: dict[str, Any]) -> None:
    kw = _valid() | override
    args = [kw.pop(a) for a in ("q", "k", "v", "q_pos", "kv_pos")]
    with pytest.raises(ValueError, match=rf"^{name}\b") as info:
        gathered_attention(*args, **kw)
    if name == "impl":
        assert "'xla'" in str(info.value) and "'reference'" in str(info.value)
    if np.shape(args[1])[2:3] == (3,):
        assert "hq % hkv" in str(info.value)


def test_repeated_query_positions() -> None:
    """Query positions need only be non-decreasing (e.g. several heads/streams per token)."""
    case = Case(70, L=24, sq=12, window=5, hkv=2, block_q=4, seg=2)
    args, kwargs = make_inputs(case)
    q_pos = np.sort(np.random.RandomState(7).randint(0, case.L, size=args[3].shape), axis=1).astype(np.int32)
    q_pos[1, -2:] = -1
    assert (np.diff(q_pos[0]) == 0).any()
    kv_seg = kwargs["kv_segment_ids"]  # kv_pos = arange(L): kv_seg[:, p] is the document of position p
    kwargs["q_segment_ids"] = np.where(q_pos >= 0, np.take_along_axis(kv_seg, np.maximum(q_pos, 0), 1), 0)
    args = (*args[:3], q_pos, args[4])
    expected = numpy_attention(*args, **kwargs)
    assert rel_err(run(case, args, kwargs, "reference"), expected) <= 1e-5
    assert rel_err(run(case, args, kwargs, "xla"), expected) <= 1e-5
