"""The Selective Attention Layer against the paper's formulas, written out here independently."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import taipan_jax.layers.sal as sal_mod
from taipan_jax.layers.sal import SALBlock, budget_loss, straight_through_gumbel
from taipan_jax.model_config import ModelConfig

L, D = 24, 32


def _cfg(**sal):
    base = dict(num_heads=4, num_kv_heads=2, head_dim=8, window=6, capacity=0.25)
    base.update(sal)
    return ModelConfig.from_dict(dict(vocab_size=259, d_model=D, num_groups=1, block_pattern="sal", sal=base))


def _block(seed=0, **sal):
    return SALBlock(_cfg(**sal), rngs=nnx.Rngs(params=seed))


def _inputs(seed=0, b=2, frac=0.4):
    rs = np.random.RandomState(seed)
    h = rs.randn(b, L, D).astype(np.float32)
    # Gate logits with roughly `frac` of tokens selected (s1 > s0).
    s = np.stack([np.zeros((b, L)), rs.randn(b, L) + math.log(frac / (1 - frac))], -1).astype(np.float32)
    return jnp.asarray(h), jnp.asarray(s)


def _np(x):
    return np.asarray(x, np.float64)


def paper_sal(block: SALBlock, h, s, selected, segment_ids=None):
    """Taipan Eq. 4-6 in numpy float64, from the block's weights (queries from selected tokens)."""
    sc = block.sc
    h = _np(h)
    b, l, d = h.shape

    def rms(x, w):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * _np(w)

    x = rms(h, block.norm.weight[...])
    wq, wkv, wo = _np(block.attn.wq.kernel[...]), _np(block.attn.wkv.kernel[...]), _np(block.attn.wo.kernel[...])
    q = np.einsum("bld,dhk->blhk", x, wq)
    k = np.einsum("bld,dhk->blhk", x, wkv[:, 0])
    v = np.einsum("bld,dhk->blhk", x, wkv[:, 1])
    rep = sc.num_heads // sc.num_kv_heads
    alpha = 1 / (1 + np.exp(-(_np(s)[..., 1] - _np(s)[..., 0])))
    out = h.copy()
    for bi in range(b):
        for i in range(l):
            if not selected[bi, i]:
                continue  # unselected tokens keep their Mamba-2 representation
            o = np.zeros((sc.num_heads, sc.head_dim))
            for hh in range(sc.num_heads):
                js = [j for j in range(max(0, i - sc.window + 1), i + 1)
                      if (sc.kv_source == "all" or selected[bi, j])
                      and (segment_ids is None or segment_ids[bi, j] == segment_ids[bi, i])]
                sc_ = np.array([q[bi, i, hh] @ k[bi, j, hh // rep] for j in js]) / math.sqrt(sc.head_dim)
                p = np.exp(sc_ - sc_.max())
                p /= p.sum()
                o[hh] = sum(pj * v[bi, j, hh // rep] for pj, j in zip(p, js))
            o = o.reshape(-1) @ wo
            out[bi, i] = (1 - alpha[bi, i]) * h[bi, i] + alpha[bi, i] * o  # Eq. 5
    x2 = rms(out, block.mlp_norm.weight[...])
    wi, w2 = _np(block.mlp.wi.kernel[...]), _np(block.mlp.wo.kernel[...])
    a, g = x2 @ wi[:, 0], x2 @ wi[:, 1]
    return out + (a * (g / (1 + np.exp(-g)))) @ w2  # Eq. 6


def _rel(a, b):
    return np.linalg.norm(_np(a) - _np(b)) / np.linalg.norm(_np(b))


def _eval_noise(seed, positions):
    """The evaluation noise written out per token: Gumbel draws from fold_in(key(seed), position)."""
    key = jax.random.key(seed)
    return np.stack([np.asarray(jax.random.gumbel(jax.random.fold_in(key, int(p)), (2,), jnp.float32))
                     for p in np.asarray(positions).reshape(-1)]).reshape(*np.shape(positions), 2)


@pytest.mark.parametrize("mode", ["dense", "gathered"])
@pytest.mark.parametrize("kv_source", ["all", "selected"])
@pytest.mark.parametrize("eval_selection", ["sampled", "threshold"])
def test_eval_output_equals_paper_formula(mode, kv_source, eval_selection):
    blk = _block(attention=mode, kv_source=kv_source, capacity_factor=4.0, eval_selection=eval_selection,
                 eval_seed=3)
    h, s = _inputs()
    out, _, aux = blk(h, gate_logits=s)
    if eval_selection == "threshold":
        selected = np.asarray(s[..., 1] > s[..., 0])
    else:  # the hard Gumbel sample, noise keyed by position (the same in both rows)
        g = _eval_noise(3, np.broadcast_to(np.arange(L), s.shape[:2]))
        selected = np.asarray(s)[..., 1] + g[..., 1] > np.asarray(s)[..., 0] + g[..., 0]
        assert not np.array_equal(selected, np.asarray(s[..., 1] > s[..., 0]))
    assert _rel(out, paper_sal(blk, h, s, selected)) <= 1e-5
    np.testing.assert_allclose(float(aux["selected_frac"]), selected.mean(), rtol=1e-6)
    assert float(aux["overflow"]) == 0


def test_train_mode_selection_is_the_gumbel_argmax_and_formula_holds():
    blk = _block()
    h, s = _inputs(seed=1)
    key = jax.random.key(7)
    out, _, aux = blk(h, gate_logits=s, key=key, train=True)
    g = np.asarray(jax.random.gumbel(key, s.shape, jnp.float32))
    selected = np.argmax(np.asarray(s) + g, -1) == 1
    assert _rel(out, paper_sal(blk, h, s, selected)) <= 1e-5
    m = selected.astype(np.float64)
    expected_budget = np.mean((blk.sc.capacity - m.mean(-1)) ** 2)
    np.testing.assert_allclose(float(aux["budget_loss"]), expected_budget, rtol=1e-6)


def test_segments_and_rope_dense_equals_gathered():
    seg = jnp.asarray(np.repeat(np.array([[0, 1, 2], [5, 5, 6]]), [10, 6, 8], axis=1).astype(np.int32))
    h, s = _inputs(seed=2)
    outs = []
    for mode in ("dense", "gathered"):
        blk = _block(seed=3, attention=mode, positional="rope", capacity_factor=4.0, eval_selection="threshold")
        outs.append(np.asarray(blk(h, gate_logits=s, segment_ids=seg)[0]))
    assert _rel(outs[1], outs[0]) <= 1e-5
    blk = _block(seed=3, attention="dense", capacity_factor=4.0, eval_selection="threshold")
    selected = np.asarray(s[..., 1] > s[..., 0])
    out = blk(h, gate_logits=s, segment_ids=seg)[0]
    assert _rel(out, paper_sal(blk, h, s, selected, np.asarray(seg))) <= 1e-5


@pytest.mark.parametrize("mode", ["dense", "gathered"])
def test_unselected_tokens_reach_the_swiglu_bit_for_bit(mode):
    blk = _block(attention=mode, capacity_factor=4.0, eval_selection="threshold")
    blk.mlp.wo.kernel[...] = jnp.zeros_like(blk.mlp.wo.kernel[...])  # block output = SwiGLU input
    h, s = _inputs(seed=4)
    out = np.asarray(blk(h, gate_logits=s)[0])
    unselected = ~np.asarray(s[..., 1] > s[..., 0])
    assert unselected.sum() > 10
    assert np.array_equal(out[unselected], np.asarray(h)[unselected])
    assert not np.array_equal(out[~unselected], np.asarray(h)[~unselected])


def test_overflow_drops_lowest_margin_and_is_counted():
    blk = _block(attention="gathered", capacity=0.125, capacity_factor=1.0,  # k_max = 3 of 24
                 eval_selection="threshold")
    blk.mlp.wo.kernel[...] = jnp.zeros_like(blk.mlp.wo.kernel[...])
    h, s = _inputs(seed=5, frac=0.5)
    out, _, aux = blk(h, gate_logits=s)
    margin = np.asarray(s[..., 1] - s[..., 0])
    n_sel = (margin > 0).sum(-1)
    assert float(aux["overflow"]) == np.maximum(n_sel - 3, 0).sum() > 0
    for bi in range(2):
        kept = np.argsort(-np.where(margin[bi] > 0, margin[bi], -np.inf))[:3]
        changed = np.where(np.any(np.asarray(out[bi]) != np.asarray(h[bi]), -1))[0]
        assert set(changed) == set(kept)
    # The kept tokens match the paper's formula restricted to them.
    kept_mask = np.zeros_like(margin, bool)
    for bi in range(2):
        kept_mask[bi, np.argsort(-np.where(margin[bi] > 0, margin[bi], -np.inf))[:3]] = True
    assert _rel(out, paper_sal(blk, h, s, kept_mask)) <= 1e-5


def test_straight_through_estimator_forward_hard_backward_soft():
    s = jnp.asarray(np.random.RandomState(0).randn(50, 2).astype(np.float32))
    key, tau, w = jax.random.key(3), 0.7, jnp.asarray(np.random.RandomState(1).randn(50).astype(np.float32))
    m, hard = straight_through_gumbel(s, key, tau)
    assert np.array_equal(np.asarray(m), np.asarray(hard)) and set(np.unique(np.asarray(m))) <= {0.0, 1.0}
    grad = jax.grad(lambda s: jnp.sum(w * straight_through_gumbel(s, key, tau)[0]))(s)
    g = jax.random.gumbel(key, s.shape, jnp.float32)
    soft = lambda s: jnp.sum(w * jax.nn.softmax((s + g) / tau, -1)[:, 1])
    eps = 1e-3
    for i, c in [(0, 0), (3, 1), (17, 0), (42, 1)]:
        e = jnp.zeros_like(s).at[i, c].set(eps)
        fd = (soft(s + e) - soft(s - e)) / (2 * eps)
        np.testing.assert_allclose(float(grad[i, c]), float(fd), rtol=2e-2, atol=1e-4)


def test_block_gate_gradient_matches_finite_differences_of_relaxed_surrogate(monkeypatch):
    """d(out)/d(s) of the block equals FD of the surrogate m = hard + soft(s) - soft(s0)."""
    blk = _block(seed=6)
    h, s0 = _inputs(seed=6, b=1)
    key, tau = jax.random.key(11), blk.sc.tau
    w = jnp.asarray(np.random.RandomState(2).randn(1, L, D).astype(np.float32))
    st_grad = jax.grad(lambda s: jnp.sum(w * blk(h, gate_logits=s, key=key, train=True)[0]))(s0)
    g = jax.random.gumbel(key, s0.shape, jnp.float32)
    hard0 = (jnp.argmax(s0 + g, -1) == 1).astype(jnp.float32)
    soft = lambda s: jax.nn.softmax((s + g) / tau, -1)[..., 1]

    def surrogate(s, key_, tau_):
        return hard0 + soft(s) - soft(s0), hard0

    monkeypatch.setattr(sal_mod, "straight_through_gumbel", surrogate)
    f = lambda s: float(jnp.sum(w * blk(h, gate_logits=s, key=key, train=True)[0]))
    eps = 1e-2
    for i in range(0, L, 3):
        for c in (0, 1):
            e = jnp.zeros_like(s0).at[0, i, c].set(eps)
            fd = (f(s0 + e) - f(s0 - e)) / (2 * eps)
            np.testing.assert_allclose(float(st_grad[0, i, c]), fd, rtol=3e-2, atol=3e-3)


def test_budget_loss_function():
    m = jnp.asarray([[1.0, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(float(budget_loss(m, 0.15)), ((0.15 - 0.25) ** 2 + (0.15 - 0.5) ** 2) / 2, rtol=1e-6)


def test_eval_sampled_selection_has_the_training_rate_and_depends_only_on_position():
    """Training's hard sample selects with probability alpha (for any tau); so does the
    evaluation sample, while threshold selection (s1 > s0) picks nothing when alpha < 0.5
    everywhere (a gate that meets the budget C = 0.15 with alpha ~ C)."""
    n = 8192
    for alpha in (0.15, 0.6):
        s = jnp.zeros((2, n, 2)).at[..., 1].set(math.log(alpha / (1 - alpha)))
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (2, n))
        _, hard, _ = _block(eval_selection="sampled").select(s, key=None, train=False, positions=pos)
        hard = np.asarray(hard)
        assert np.array_equal(hard[0], hard[1])  # position-keyed: same token, same draw
        sigma = math.sqrt(alpha * (1 - alpha) / n)
        assert abs(hard[0].mean() - alpha) < 4 * sigma, (alpha, hard[0].mean())
        _, train_hard = straight_through_gumbel(s, jax.random.key(1), 1.0)
        assert abs(float(np.asarray(train_hard).mean()) - alpha) < 4 * sigma / math.sqrt(2)
        _, thr, _ = _block(eval_selection="threshold").select(s, key=None, train=False, positions=pos)
        assert float(np.asarray(thr).mean()) == (1.0 if alpha > 0.5 else 0.0)
    # shifted positions (a later segment of a stream) see the same noise as in one pass
    s = jnp.asarray(np.random.RandomState(0).randn(1, 64, 2), jnp.float32)
    blk = _block(eval_selection="sampled")
    whole = blk.select(s, key=None, train=False, positions=jnp.arange(64, dtype=jnp.int32)[None])[1]
    tail = blk.select(s[:, 40:], key=None, train=False, positions=jnp.arange(40, 64, dtype=jnp.int32)[None])[1]
    assert np.array_equal(np.asarray(whole)[:, 40:], np.asarray(tail))
    g = _eval_noise(0, np.arange(64))
    np.testing.assert_array_equal(np.asarray(whole)[0], (np.asarray(s[0, :, 1]) + g[:, 1] > np.asarray(s[0, :, 0]) + g[:, 0]))


def test_decode_steps_equal_full_forward_with_prompt_longer_than_window():
    """With the default (sampled, position-keyed) evaluation selection: decode steps select
    exactly what the full forward selects. (``threshold`` shares the code path without noise.)"""
    from taipan_jax.model import build_model

    for kv_source in ("all", "selected"):
        cfg = ModelConfig.from_dict(dict(
            vocab_size=259, d_model=32, num_groups=2, block_pattern="mamba2,sal",
            mamba=dict(d_state=8, headdim=16, chunk_size=8),
            sal=dict(num_heads=2, num_kv_heads=1, head_dim=16, window=5, kv_source=kv_source, gate_init_frac=0.6)))
        m = build_model(cfg, seed=1)
        toks = jnp.asarray(np.random.RandomState(0).randint(0, 259, (2, 26)), jnp.int32)
        full, aux = m(toks)
        assert 0.2 < float(jnp.mean(aux["1_sal/selected_frac"])) < 0.9
        _, _, cache = m(toks[:, :12], return_cache=True)  # prompt (12) longer than the window (5)
        step = jax.jit(lambda m, t, c: m.step(t, c))
        outs = []
        for t in range(12, 26):
            lg, cache = step(m, toks[:, t], cache)
            outs.append(lg)
        assert _rel(jnp.stack(outs, 1)[..., :259], full[:, 12:, :259]) <= 1e-4


@pytest.mark.parametrize("sal,match", [
    (dict(window=0), "window must be > 0"),
    (dict(capacity=0.0), r"capacity \(C\) must be in \(0, 1\]"),
    (dict(capacity=1.5), r"capacity \(C\) must be in \(0, 1\]"),
    (dict(kv_source="some"), "kv_source"),
    (dict(attention="sparse"), "attention must be"),
    (dict(gate="conv"), "gate must be"),
    (dict(eval_selection="topk"), "eval_selection must be"),
])
def test_bad_sal_configs_are_named(sal, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**sal)
