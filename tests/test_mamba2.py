"""The Mamba-2 mixer against an independent token-by-token implementation, and its cache paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taipan_jax.layers.mamba2 import Mamba2Mixer


def _np(x):
    return np.asarray(x, dtype=np.float64)


def oracle_mixer(m: Mamba2Mixer, u: np.ndarray, segment_ids=None) -> np.ndarray:
    """mamba_ssm ``Mamba2.step`` semantics, one token at a time, in float64 numpy.

    Rebuilds mamba_ssm's single ``in_proj`` ([z | x | B | C | dt]) and single depthwise conv over
    xBC from the module's parameters, then runs the recurrence token by token. With segment_ids,
    both the conv window and the SSM state restart at each change of id.
    """
    H, P, N, G, k = m.nheads, m.headdim, m.d_state, m.ngroups, m.d_conv
    d_inner = m.d_inner
    wzx, wbc, wdt = _np(m.in_proj_zx.kernel[...]), _np(m.in_proj_bc.kernel[...]), _np(m.in_proj_dt.kernel[...])
    w_in = np.concatenate([wzx[:, 0], wzx[:, 1], wbc[:, 0], wbc[:, 1], wdt], axis=1)
    conv_w = np.concatenate([_np(m.conv_x_w[...]), _np(m.conv_bc_w[...])[:, 0], _np(m.conv_bc_w[...])[:, 1]], axis=1)
    conv_b = np.concatenate([_np(m.conv_x_b[...]), _np(m.conv_bc_b[...])[0], _np(m.conv_bc_b[...])[1]])
    dt_bias, A = _np(m.dt_bias[...]), -np.exp(_np(m.A_log[...]))
    D = _np(m.D[...])
    D = np.repeat(D[:, None], P, axis=1) if D.ndim == 1 else D
    norm_w, w_out = _np(m.norm.weight[...]), _np(m.out_proj.kernel[...])
    silu = lambda v: v / (1 + np.exp(-v))
    softplus = lambda v: np.log1p(np.exp(v))
    b, l, _ = u.shape
    out = np.zeros((b, l, w_out.shape[1]))
    for bi in range(b):
        conv_state = np.zeros((k, conv_w.shape[1]))
        ssm = np.zeros((H, P, N))
        for t in range(l):
            if segment_ids is not None and t > 0 and segment_ids[bi, t] != segment_ids[bi, t - 1]:
                conv_state[:] = 0
                ssm[:] = 0
            zxbcdt = _np(u[bi, t]) @ w_in
            z = zxbcdt[:d_inner]
            xbc = zxbcdt[d_inner : 2 * d_inner + 2 * G * N]
            dt = zxbcdt[2 * d_inner + 2 * G * N :]
            conv_state = np.roll(conv_state, -1, axis=0)
            conv_state[-1] = xbc
            xbc = silu((conv_state * conv_w).sum(0) + conv_b)
            x = xbc[:d_inner].reshape(H, P)
            B = xbc[d_inner : d_inner + G * N].reshape(G, N)
            C = xbc[d_inner + G * N :].reshape(G, N)
            dt = softplus(dt + dt_bias)
            y = np.zeros((H, P))
            for h in range(H):
                g = h // (H // G)
                ssm[h] = np.exp(dt[h] * A[h]) * ssm[h] + dt[h] * np.outer(x[h], B[g])
                y[h] = ssm[h] @ C[g] + D[h] * x[h]
            y = y.reshape(-1) * silu(z)
            gs = d_inner // G
            yg = y.reshape(G, gs)
            yg = yg / np.sqrt((yg**2).mean(-1, keepdims=True) + 1e-5)
            out[bi, t] = (yg.reshape(-1) * norm_w) @ w_out
    return out


def _mixer(seed=0, **kw):
    args = dict(d_state=8, headdim=8, expand=2, chunk_size=8, ngroups=1)
    args.update(kw)
    return Mamba2Mixer(16, rngs=nnx.Rngs(params=seed), **args)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CASES = [
    dict(),
    dict(ngroups=2),
    dict(D_has_hdim=True, d_conv=3),
    dict(headdim=4, d_state=5, chunk_size=5),
]


@pytest.mark.parametrize("kw", CASES)
def test_mixer_matches_independent_token_loop(kw):
    m = _mixer(seed=1, **kw)
    # Give D (and, per channel, its shape) non-trivial values so the skip path is checked.
    m.D[...] = jax.random.normal(jax.random.key(5), m.D[...].shape)
    u = np.random.RandomState(0).randn(2, 19, 16).astype(np.float32)
    y = m(jnp.asarray(u))
    assert _rel(y, oracle_mixer(m, u)) <= 1e-4


def test_mixer_segments_match_independent_token_loop():
    m = _mixer(seed=2, ngroups=2)
    u = np.random.RandomState(1).randn(2, 21, 16).astype(np.float32)
    seg = np.array([[0] * 5 + [1] * 8 + [2] * 8, [3] * 8 + [0] * 2 + [3] * 11], np.int32)
    y = m(jnp.asarray(u), segment_ids=jnp.asarray(seg))
    assert _rel(y, oracle_mixer(m, u, seg)) <= 1e-4


@pytest.mark.parametrize("kw,split", [(dict(), 7), (dict(ngroups=2, D_has_hdim=True), 1), (dict(d_conv=4), 2)])
def test_forward_equals_prefill_then_steps(kw, split):
    m = _mixer(seed=3, **kw)
    u = jnp.asarray(np.random.RandomState(2).randn(2, 17, 16).astype(np.float32))
    full = m(u)
    _, cache = m(u[:, :split], return_cache=True)
    outs = []
    step = jax.jit(lambda m, x, c: m.step(x, c))
    for t in range(split, u.shape[1]):
        o, cache = step(m, u[:, t], cache)
        outs.append(o)
    assert _rel(jnp.stack(outs, 1), full[:, split:]) <= 1e-4


def test_forward_continues_from_cache():
    """Two whole-sequence calls chained through the cache equal one call (streaming evaluation)."""
    m = _mixer(seed=4, ngroups=2)
    u = jnp.asarray(np.random.RandomState(3).randn(1, 30, 16).astype(np.float32))
    full = m(u)
    a, cache = m(u[:, :13], return_cache=True)
    b, _ = m(u[:, 13:], cache=cache, return_cache=True)
    assert _rel(jnp.concatenate([a, b], 1), full) <= 1e-5


def test_step_from_empty_cache_equals_forward():
    m = _mixer(seed=5)
    u = jnp.asarray(np.random.RandomState(4).randn(3, 6, 16).astype(np.float32))
    cache = m.init_cache(3)
    outs = []
    for t in range(6):
        o, cache = m.step(u[:, t], cache)
        outs.append(o)
    assert _rel(jnp.stack(outs, 1), m(u)) <= 1e-4


def test_initialisation_follows_mamba_ssm():
    m = Mamba2Mixer(64, rngs=nnx.Rngs(params=0), d_state=16, headdim=8, expand=2)  # 16 heads
    A = np.exp(np.asarray(m.A_log[...]))
    assert A.min() >= 1.0 and A.max() <= 16.0
    dt = np.log1p(np.exp(np.asarray(m.dt_bias[...])))  # softplus(dt_bias) = initial dt
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    np.testing.assert_array_equal(np.asarray(m.D[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(m.norm.weight[...]), 1.0)
    bound = 1 / np.sqrt(64)
    w = np.asarray(m.in_proj_zx.kernel[...])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound


def test_invalid_shapes_raise():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Mixer(10, rngs=nnx.Rngs(0), headdim=3)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2Mixer(16, rngs=nnx.Rngs(0), headdim=8, ngroups=3)
