"""The language model: layer scan vs loop, prefill + steps, masking, remat, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taipan_jax.model import NEG_INF_LOGIT, LanguageModel, build_model, count_params, weight_decay_mask
from taipan_jax.model_config import ModelConfig, parse_block_pattern


def _cfg(**kw):
    base = dict(vocab_size=259, d_model=32, num_groups=3, mamba=dict(d_state=8, headdim=16, chunk_size=8))
    base.update(kw)
    return ModelConfig.from_dict(base)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _tokens(b, l, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 259, size=(b, l)), jnp.int32)


def test_scanned_stack_equals_python_loop():
    """Same weights laid out stacked (scan) and as a list (loop) give the same logits."""
    scanned = build_model(_cfg(d_intermediate=48), seed=0)
    looped = build_model(_cfg(d_intermediate=48, scan_layers=False), seed=1)
    stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    target = nnx.to_pure_dict(nnx.state(looped, nnx.Param))
    new = {k: v for k, v in stacked.items() if k != "groups"}
    new["groups"] = {i: jax.tree.map(lambda x: x[i], stacked["groups"]) for i in range(3)}
    assert jax.tree.structure(new) == jax.tree.structure(target)
    state = nnx.state(looped, nnx.Param)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(looped, state)
    toks = _tokens(2, 13)
    assert _rel(looped(toks)[0][..., :259], scanned(toks)[0][..., :259]) <= 1e-6


@pytest.mark.parametrize("scan", [True, False])
def test_forward_equals_prefill_then_steps(scan):
    m = build_model(_cfg(scan_layers=scan, d_intermediate=32), seed=2)
    toks = _tokens(2, 21, seed=1)
    full, _ = m(toks)
    _, _, cache = m(toks[:, :9], return_cache=True)
    step = jax.jit(lambda m, t, c: m.step(t, c))
    outs = []
    for t in range(9, 21):
        lg, cache = step(m, toks[:, t], cache)
        outs.append(lg)
    got = jnp.stack(outs, 1)[..., :259]
    assert _rel(got, full[:, 9:, :259]) <= 1e-4


def test_padded_vocab_is_masked_and_logits_float32():
    m = build_model(_cfg(), seed=0)
    logits, aux = m(_tokens(1, 5))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 5, 384)
    assert np.all(np.asarray(logits[..., 259:]) == NEG_INF_LOGIT)
    assert aux == {}


def test_bf16_compute_keeps_float32_params():
    m = build_model(_cfg(dtype="bfloat16"), seed=0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    logits, _ = m(_tokens(2, 16))
    ref = build_model(_cfg(), seed=0)(_tokens(2, 16))[0]
    assert logits.dtype == jnp.float32
    assert _rel(logits[..., :259], ref[..., :259]) <= 3e-2


def test_remat_gives_same_gradients():
    toks = _tokens(2, 12)
    grads = []
    for remat in ("none", "full"):
        m = build_model(_cfg(remat=remat), seed=3)
        gd, params = nnx.split(m, nnx.Param)

        def loss(p):
            return jnp.mean(nnx.merge(gd, p)(toks)[0][..., :259] ** 2)

        grads.append(jax.tree.leaves(jax.grad(loss)(params)))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_weight_decay_mask_and_logical_axes():
    m = build_model(_cfg(), seed=0)
    params = nnx.state(m, nnx.Param)
    mask = nnx.to_pure_dict(weight_decay_mask(params))
    mixer = mask["groups"]["blocks"][0]["mixer"]
    for name in ("A_log", "D", "dt_bias", "conv_x_b", "conv_bc_b"):
        assert mixer[name] is False, name
    assert mixer["norm"]["weight"] is False and mask["norm_f"]["weight"] is False
    assert mixer["in_proj_zx"]["kernel"] is True and mixer["conv_x_w"] is True and mask["embed"] is True
    for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata()["out_sharding"]
        assert len(axes) == len(v.shape)
    assert nnx.state(m, nnx.Param)["groups"]["blocks"][0]["mixer"]["A_log"].get_metadata()["out_sharding"] == (
        "layers", "ssm_heads")


def test_untied_head_adds_its_parameters():
    tied = count_params(build_model(_cfg(), seed=0))
    untied = count_params(build_model(_cfg(tie_embeddings=False), seed=0))
    assert untied - tied == 32 * 384


def test_block_pattern_parsing_and_errors():
    assert parse_block_pattern("mamba2*3") == ("mamba2",) * 3
    assert parse_block_pattern("mamba2, mamba2*2") == ("mamba2",) * 3
    with pytest.raises(ValueError, match="unknown block type 'mamba3'"):
        parse_block_pattern("mamba2*6,mamba3")
    with pytest.raises(ValueError, match="repeat count"):
        parse_block_pattern("mamba2*0")
    with pytest.raises(ValueError, match=r"unknown key\(s\) in config.model: \['d_modle'\]"):
        ModelConfig.from_dict(dict(vocab_size=10, d_model=8, num_groups=1, d_modle=3))
    with pytest.raises(ValueError, match="config.model.mamba"):
        ModelConfig.from_dict(dict(vocab_size=10, d_model=8, num_groups=1, mamba=dict(dstate=3)))
    with pytest.raises(ValueError, match="model.dtype"):
        _cfg(dtype="float8")
    with pytest.raises(ValueError, match="num_groups"):
        _cfg(num_groups=0)


@pytest.mark.parametrize("kind", ["tpp_full", "tpp_window5", "taipan_selected_kv"])
def test_prefill_streamed_prefill_and_steps_equal_full_forward(kind):
    """A 12-token prompt (longer than the window 5), prefilled once whole and once streamed as 7 + 5
    tokens, then single-token steps: the full forward's logits at every position. Transformer++
    (RoPE, GQA, full or windowed attention) and Taipan with kv_source="selected" and RoPE in the SAL
    (evaluation-mode selection; the defaults are covered in test_sal.py and test_evaluate.py)."""
    if kind.startswith("tpp"):
        cfg = _cfg(block_pattern="attention", num_groups=2, attention=dict(
            num_heads=4, num_kv_heads=2, head_dim=8, window=5 if kind == "tpp_window5" else 0, max_decode_len=32))
    else:
        cfg = _cfg(block_pattern="mamba2,sal", num_groups=2, sal=dict(
            num_heads=2, num_kv_heads=1, head_dim=16, window=5, kv_source="selected", positional="rope",
            gate_init_frac=0.6))
    m = build_model(cfg, seed=4)
    toks = _tokens(2, 26, seed=3)
    full, aux = m(toks)
    if kind.startswith("taipan"):
        assert 0.2 < float(jnp.mean(aux["1_sal/selected_frac"])) < 0.9
    step = jax.jit(lambda m, t, c: m.step(t, c))
    _, _, whole = m(toks[:, :12], return_cache=True)
    lg0, _, streamed = m(toks[:, :7], cache=m.init_cache(2), return_cache=True)
    lg1, _, streamed = m(toks[:, 7:12], cache=streamed, return_cache=True)
    assert _rel(jnp.concatenate([lg0, lg1], 1)[..., :259], full[:, :12, :259]) <= 1e-5
    for cache in (whole, streamed):
        outs = []
        for t in range(12, 26):
            lg, cache = step(m, toks[:, t], cache)
            outs.append(lg)
        assert _rel(jnp.stack(outs, 1)[..., :259], full[:, 12:, :259]) <= 1e-4


def test_generate_refuses_to_wrap_a_full_attention_kv_cache():
    """Transformer++ with full attention keeps max_decode_len KV slots: a prompt plus new tokens
    that need more positions is refused (it would overwrite the oldest keys), the exact fit runs."""
    from taipan_jax.sampling import generate

    cfg = _cfg(block_pattern="attention", num_groups=1, attention=dict(
        num_heads=2, num_kv_heads=1, head_dim=8, window=0, max_decode_len=16))
    m = build_model(cfg, seed=0)
    prompt = np.asarray(_tokens(1, 10))
    out = generate(m, prompt, num_tokens=7, key=jax.random.key(0), temperature=0.0)  # 10 + 7 - 1 = 16 slots
    assert out.shape == (1, 7)
    with pytest.raises(ValueError, match="needs 17 KV-cache positions.*max_decode_len=16"):
        generate(m, prompt, num_tokens=8, key=jax.random.key(0), temperature=0.0)
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        generate(m, prompt, num_tokens=0, key=jax.random.key(0))
