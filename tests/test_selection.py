"""Token-selection views: the arrays are what the SALs compute; the HTML shows every token, escaped."""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taipan_jax.data.vocab import ByteVocabulary
from taipan_jax.model import build_model
from taipan_jax.model_config import ModelConfig
from taipan_jax.selection import selection_html, selection_png, selections, write_view

_MAMBA = dict(d_state=8, headdim=16, chunk_size=8)
_SAL = dict(num_heads=2, num_kv_heads=1, head_dim=16, window=6, gate_init_frac=0.4)


def _model(pattern="mamba2,sal", groups=2, seed=0):
    return build_model(ModelConfig.from_dict(dict(vocab_size=259, d_model=32, num_groups=groups, block_pattern=pattern,
                                                  mamba=_MAMBA, sal=_SAL)), seed=seed)


def _eval_noise(seed, num_groups, group, num_blocks, block, positions):
    """The model's evaluation noise for one SAL, written out: key(eval_seed) split over the groups,
    then over the group's blocks, then one Gumbel pair per position from fold_in(key, position)."""
    key = jax.random.split(jax.random.split(jax.random.key(seed), num_groups)[group], num_blocks)[block]
    return np.stack([np.asarray(jax.random.gumbel(jax.random.fold_in(key, int(p)), (2,), jnp.float32))
                     for p in positions])


@pytest.mark.parametrize("eval_selection", ["sampled", "threshold"])
def test_alpha_is_softmax_of_the_gate_and_selection_is_the_evaluation_rule(eval_selection):
    """A lone SAL sees the embeddings: recompute its gate in numpy from the weights."""
    m = build_model(ModelConfig.from_dict(dict(vocab_size=259, d_model=32, num_groups=1, block_pattern="sal",
                                               mamba=_MAMBA, sal=dict(_SAL, eval_selection=eval_selection))), seed=0)
    toks = np.random.RandomState(0).randint(0, 259, (2, 30)).astype(np.int32)
    sel = selections(m, toks)
    assert list(sel) == ["group0/0_sal"]
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    sal = jax.tree.map(lambda x: np.asarray(x[0], np.float64), params["groups"]["blocks"][0])
    h = np.asarray(params["embed"], np.float64)[toks]
    x = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-5) * sal["norm"]["weight"]
    s = x @ sal["gate_out"]["kernel"] + sal["gate_out"]["bias"]
    e = np.exp(s - s.max(-1, keepdims=True))
    alpha = (e / e.sum(-1, keepdims=True))[..., 1]
    np.testing.assert_allclose(sel["group0/0_sal"]["alpha"], alpha, rtol=1e-5, atol=1e-6)
    if eval_selection == "sampled":
        g = _eval_noise(0, 1, 0, 1, 0, range(30))
        s = s + g[None]
    assert np.array_equal(sel["group0/0_sal"]["selected"], s[..., 1] > s[..., 0])
    assert sel["group0/0_sal"]["selected"].dtype == bool and 0 < sel["group0/0_sal"]["selected"].mean() < 1


def test_selected_fraction_equals_aux_and_segments_equal_one_pass():
    m = _model()
    toks = np.random.RandomState(1).randint(0, 259, (2, 40)).astype(np.int32)
    sel = selections(m, toks)
    assert list(sel) == ["group0/1_sal", "group1/1_sal"]
    gd, state = nnx.split(m)
    _, aux = jax.jit(lambda st, t: nnx.merge(gd, st)(t))(state, jnp.asarray(toks))  # default aux: metrics only
    assert set(aux) == {"1_sal/selected_frac", "1_sal/budget_loss", "1_sal/overflow"}
    for g in range(2):
        assert sel[f"group{g}/1_sal"]["selected"].shape == (2, 40)
        np.testing.assert_allclose(sel[f"group{g}/1_sal"]["selected"].mean(), float(aux["1_sal/selected_frac"][g]),
                                   rtol=1e-6)
    streamed = selections(m, toks, segment=20)  # two segments, not aligned to the window (6)
    for k in sel:
        assert np.array_equal(streamed[k]["selected"], sel[k]["selected"])
        np.testing.assert_allclose(streamed[k]["alpha"], sel[k]["alpha"], rtol=1e-5, atol=1e-6)
    one = selections(m, toks[0])  # 1-d input gives 1-d arrays
    assert one["group0/1_sal"]["alpha"].shape == (40,)


def test_html_shows_every_token_escaped_and_png(tmp_path):
    vocab = ByteVocabulary()
    text = 'a<b>&"c\'\n<script>x</script>'
    toks = vocab.encode(text)
    rs = np.random.RandomState(2)
    sel = {"group0/1_sal": {"selected": rs.rand(len(toks)) > 0.5, "alpha": rs.rand(len(toks)).astype(np.float32)},
           "group1/1_sal": {"selected": np.zeros(len(toks), bool), "alpha": np.zeros(len(toks), np.float32)}}
    page = selection_html(vocab, toks, sel, title="t<i>")
    assert "<script>" not in page and "<i>" not in page
    assert ">&lt;</span>" in page and ">&amp;</span>" in page and ">&quot;</span>" in page and "t&lt;i&gt;" in page
    plain = page.replace('<span class="nl">\u21b5</span>', "")  # the newline marker inside a token's span
    spans = re.findall(r'<span class="(tok(?: sel)?)" style="[^"]*" title="[^"]*">(.*?)</span>', plain, re.S)
    assert len(spans) == 2 * len(toks)
    first = spans[: len(toks)]
    assert [c == "tok sel" for c, _ in first] == list(sel["group0/1_sal"]["selected"])
    import html as _html
    shown = "".join(_html.unescape(t) for _, t in first)
    assert shown == text
    assert f"selected {int(sel['group0/1_sal']['selected'].sum())} of {len(toks)}" in page
    png = selection_png(vocab, toks, sel, str(tmp_path / "s.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_function_on_a_workdir(tmp_path):
    from taipan_jax.checkpointing import Checkpointer

    m = _model()
    ckpt = Checkpointer(str(tmp_path / "wd" / "checkpoints"), async_save=False)
    ckpt.save(1, {"step": jnp.asarray(1, jnp.int32), "params": nnx.to_pure_dict(nnx.state(m, nnx.Param))},
              {"model_config": m.cfg.to_dict(), "vocab": "bytes", "step": 1}, force=True)
    ckpt.close()
    out = str(tmp_path / "view.html")
    sel = write_view(str(tmp_path / "wd"), "ROMEO: <3 & more", out)
    page = open(out, encoding="utf-8").read()
    assert ">&lt;</span>" in page and ">&amp;</span>" in page
    assert page.count('class="tok') == 2 * 16 + 1  # 16 tokens x 2 SALs + the legend's span
    assert list(sel) == ["group0/1_sal", "group1/1_sal"]
