"""Streaming evaluation: segments through the caches equal one pass; Taipan's cache is flat; the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taipan_jax import evaluate
from taipan_jax.model import build_model
from taipan_jax.model_config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MAMBA = dict(d_state=8, headdim=16, chunk_size=8)
CONFIGS = {
    # SAL window 7 < document (40 tokens); segments of 11 are not aligned to the window.
    "taipan": dict(vocab_size=259, d_model=32, num_groups=2, block_pattern="mamba2,sal", mamba=_MAMBA,
                   sal=dict(num_heads=2, num_kv_heads=1, head_dim=16, window=7, gate_init_frac=0.5)),
    # (kv_source="selected" with RoPE streams in tests/test_model.py::test_prefill_streamed_prefill_and_steps...)
    "mamba2": dict(vocab_size=259, d_model=32, num_groups=2, mamba=_MAMBA),
    "transformer_pp": dict(vocab_size=259, d_model=32, num_groups=2, block_pattern="attention",
                           attention=dict(num_heads=2, num_kv_heads=1, head_dim=16, max_decode_len=16)),
}


def _single_pass_nll(model, tokens):
    gd, state = nnx.split(model)
    logits, aux = jax.jit(lambda st, t: nnx.merge(gd, st)(t))(state, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    return -np.asarray(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0], np.float64), aux


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streaming_perplexity_equals_single_pass(name):
    model = build_model(ModelConfig.from_dict(CONFIGS[name]), seed=1)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 259, (2, 41)), jnp.int32)
    ref, aux = _single_pass_nll(model, tokens)
    if "sal" in name:  # the selection is neither empty nor everything
        assert 0.2 < float(np.mean([np.mean(v) for k, v in aux.items() if k.endswith("selected_frac")])) < 0.8
    # Transformer++: the KV cache (max_decode_len 16) is sized for the document by streaming_losses.
    r = evaluate.streaming_perplexity(model, np.asarray(tokens), segment=11, first_bucket=8)
    got = r["losses"]
    assert got.shape == ref.shape == (2, 40)
    assert np.max(np.abs(got - ref) / np.abs(ref)) <= 1e-5
    assert abs(r["perplexity"] / np.exp(ref.mean()) - 1) <= 1e-5
    assert [(b["start"], b["end"]) for b in r["buckets"]] == [(0, 8), (8, 16), (16, 32), (32, 40)]
    np.testing.assert_allclose([b["loss"] for b in r["buckets"]],
                               [ref[:, a:e].mean() for a, e in [(0, 8), (8, 16), (16, 32), (32, 40)]], rtol=1e-5)


def test_streaming_rejects_a_kv_cache_that_is_too_small():
    model = build_model(ModelConfig.from_dict(CONFIGS["transformer_pp"]), seed=1)
    tokens = jnp.zeros((1, 12), jnp.int32)
    cache = model.init_cache(1)  # max_decode_len = 16
    _, _, cache = model(tokens, cache=cache, return_cache=True)
    with pytest.raises(ValueError, match="KV cache holds 16 tokens but 12 \\+ 12"):
        model(tokens, cache=cache, return_cache=True)


def test_taipan_cache_memory_is_the_same_at_10k_and_100k_tokens():
    """Measured on the cache pytrees' arrays (shapes x dtypes).

    10K: the real cache after streaming 10,240 tokens. 100K: the cache that one more call with
    92,160 tokens returns from it, obtained abstractly (``jax.eval_shape``: shapes only, nothing
    runs). Both equal the empty cache's. Transformer++ (for contrast) grows 10x.
    """
    model = build_model(ModelConfig.from_dict(CONFIGS["taipan"]), seed=1)
    empty = model.init_cache(1)
    tokens = np.random.RandomState(0).randint(0, 259, (1, 10_241)).astype(np.int32)
    nll, stats = evaluate.streaming_losses(model, tokens, segment=2048, return_stats=True)
    assert nll.shape == (1, 10_240) and np.all(np.isfinite(nll))
    at_10k = stats["cache_signature"]

    _, _, cache10k = model(jnp.asarray(tokens[:, :2048]), cache=empty, return_cache=True)
    more = jax.ShapeDtypeStruct((1, 92_160), jnp.int32)
    gd, state = nnx.split(model)
    abstract_100k = jax.eval_shape(lambda st, c, t: nnx.merge(gd, st)(t, cache=c, return_cache=True)[2],
                                   state, cache10k, more)
    assert at_10k == evaluate.cache_signature(abstract_100k) == evaluate.cache_signature(empty)
    assert stats["cache_bytes"] == evaluate.cache_bytes(abstract_100k) == evaluate.cache_bytes(empty)
    sizes = {p: s for p, s, _ in at_10k}
    assert any(s[-3:] == (7, 1, 16) for s in sizes.values())  # the SAL ring buffer: window x kv heads x dim

    tpp = build_model(ModelConfig.from_dict(CONFIGS["transformer_pp"]), seed=1)
    grow = [evaluate.cache_bytes(tpp.init_cache(1, kv_len=n)) for n in (10_240, 102_400)]
    assert grow[1] > 9 * grow[0]


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """A workdir as the trainer writes it (its Checkpointer, model config and vocabulary in the meta),
    holding a randomly initialised tiny Taipan: training one would cost ~20 s of CI for nothing this
    test checks (the trainer's own tests train; this run was also checked by hand on trained ones)."""
    from taipan_jax.checkpointing import Checkpointer

    cfg = ModelConfig.from_dict(dict(
        vocab_size=259, d_model=32, num_groups=2, block_pattern="mamba2,sal", mamba=_MAMBA,
        sal=dict(num_heads=2, num_kv_heads=1, head_dim=16, window=24, gate_init_frac=0.4)))
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, seed=0), nnx.Param))
    workdir = str(tmp_path_factory.mktemp("eval_tiny"))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(3, {"step": jnp.asarray(3, jnp.int32), "params": params},
              {"model_config": cfg.to_dict(), "vocab": "bytes", "step": 3}, force=True)
    ckpt.close()
    return workdir


def test_evaluate_cli_end_to_end(tiny_workdir, tmp_path):
    out = tmp_path / "out"
    other = tmp_path / "other.json"
    json.dump({"name": "fake", "block_pattern": "x", "step": 0, "buckets": [
        {"end": 64, "perplexity": 300.0}, {"end": 128, "perplexity": 250.0}, {"end": 300, "perplexity": 240.0}]},
        open(other, "w"))
    proc = subprocess.run(
        [sys.executable, "-m", "taipan_jax.evaluate", f"--workdir={tiny_workdir}", "--context=300", "--segment=64",
         "--first_bucket=64", "--num_docs=2", f"--out={out}", f"--compare={other}"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(out / "streaming_kjv.json"))
    assert r["num_docs"] == 2 and r["context"] == 300 and r["tokens"] == 600 and r["step"] == 3
    assert [(b["start"], b["end"]) for b in r["buckets"]] == [(0, 64), (64, 128), (128, 256), (256, 300)]
    assert sum(b["tokens"] for b in r["buckets"]) == 600
    assert 0 < r["bits_per_byte"] < 9 and np.isclose(r["perplexity"], np.exp(r["loss"]))
    assert np.isclose(r["buckets"][-1]["cum_loss"], r["loss"])
    assert set(r["sal_selected_frac"]) == {"group0/1_sal/selected_frac", "group1/1_sal/selected_frac"}
    assert all(0 <= v <= 1 for v in r["sal_selected_frac"].values())
    png = out / "perplexity_vs_context.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "perplexity" in proc.stdout and "256-300" in proc.stdout
