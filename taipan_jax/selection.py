"""Token-selection views: which tokens each SAL selects for a text, and with what alpha.

    python -m taipan_jax.selection --workdir=DIR --text="ROMEO: ..." [--text_file=F] --out=FILE.html|FILE.png \\
        [--segment=N] [--step=N]

From a notebook::

    from taipan_jax.selection import selections, selection_html
    sel = selections(model, tokens)      # {"group0/2_sal": {"selected": (b, l) bool, "alpha": (b, l) f32}, ...}
    html = selection_html(vocab, tokens[0], sel)

Evaluation-mode selection (``model.sal.eval_selection``): by default the hard Gumbel sample of
training with noise keyed by the token's position (deterministic; ``"threshold"``: ``s1 > s0``);
``alpha = softmax(s)[1]`` is the weight of the attention output in Eq. 5 (only selected tokens use
it). A SAL is named ``group<g>/<index in group>_sal``, as in the trainer's metrics. Texts longer
than ``segment`` tokens are fed in segments through the caches (same result as one pass).
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from taipan_jax.model import LanguageModel


def selections(model: LanguageModel, tokens, *, segment: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per SAL, the hard evaluation-mode selection and alpha of every token of ``tokens``.

    ``tokens``: ``(b, l)`` or ``(l,)`` ints. Returns ``{name: {"selected": (b, l) bool, "alpha": (b, l)
    float32}}`` (``(l,)`` arrays for 1-d input); empty for a model without SALs.
    """
    toks = np.asarray(tokens, np.int32)
    squeeze = toks.ndim == 1
    toks = toks[None] if squeeze else toks
    if toks.ndim != 2 or toks.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty (length,) or (batch, length) array, got shape {np.shape(tokens)}")
    b, n = toks.shape
    seg = n if not segment or segment >= n else segment
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, cache, t):
        m = nnx.merge(graphdef, state)
        if cache is None:
            _, aux = m(t, return_selection=True)
            new = None
        else:
            _, aux, new = m(t, cache=cache, return_cache=True, return_selection=True)
        return {k: v for k, v in aux.items() if k.endswith("/selected") or k.endswith("/alpha")}, new

    parts = []
    if seg == n:
        parts.append(run(state, None, jnp.asarray(toks))[0])
    else:
        cache = model.init_cache(b, kv_len=n)
        for start in range(0, n, seg):
            aux, cache = run(state, cache, jnp.asarray(toks[:, start:start + seg]))
            parts.append(aux)
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in sorted(parts[0]):
        prefix, what = key.rsplit("/", 1)
        arr = np.concatenate([np.asarray(p[key]) for p in parts], axis=-1)  # (groups, b, n)
        for g in range(arr.shape[0]):
            v = arr[g] > 0 if what == "selected" else arr[g].astype(np.float32)
            out.setdefault(f"group{g}/{prefix}", {})[what] = v[0] if squeeze else v
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(name: str) -> tuple[int, int]:
    g, rest = name.split("/", 1)
    return int(g[len("group"):]), int(rest.split("_", 1)[0])


def token_texts(vocab, tokens) -> list[str]:
    """The text of each token (bytes of a split UTF-8 character show as U+FFFD)."""
    return [vocab.decode(np.asarray([t])) for t in np.asarray(tokens).reshape(-1)]


def _colour(alpha: float) -> str:
    # White (alpha 0) to red (alpha 1).
    c = int(round(255 * (1.0 - float(np.clip(alpha, 0.0, 1.0)))))
    return f"rgb(255,{c},{c})"


def selection_html(vocab, tokens, sel: Mapping[str, Mapping[str, np.ndarray]], *, title: str = "SAL token selection") -> str:
    """A self-contained HTML page: per SAL, the text with each token shaded by alpha (white 0 -> red 1),
    selected tokens boxed; hovering a token shows its index, alpha and selection. ``tokens`` is 1-d and
    ``sel``'s arrays are ``(l,)`` (one row of :func:`selections`). Text is HTML-escaped."""
    toks = np.asarray(tokens).reshape(-1)
    texts = token_texts(vocab, toks)
    esc = lambda s: html.escape(s, quote=True)
    out = [
        "<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:70em}"
        ".text{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ccc;padding:.6em}"
        ".tok{padding:1px 0}.sel{outline:1.5px solid #000;outline-offset:-1px;font-weight:bold}"
        ".nl{color:#999}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(toks)} tokens. Background: alpha = softmax(gate)[1] from white (0) to red (1); "
        "<span class=\"tok sel\">boxed</span> tokens are selected (s<sub>1</sub> &gt; s<sub>0</sub>) and attend; "
        "hover for values.</p>",
    ]
    if not sel:
        out.append("<p>This model has no selective attention layer.</p>")
    for name, arrays in sel.items():
        selected = np.asarray(arrays["selected"]).reshape(-1)
        alpha = np.asarray(arrays["alpha"]).reshape(-1)
        if selected.shape[0] != len(toks) or alpha.shape[0] != len(toks):
            raise ValueError(f"{name}: {selected.shape[0]} selections for {len(toks)} tokens")
        sel_alpha = f"{alpha[selected].mean():.3f}" if selected.any() else "-"
        out.append(f"<h2>{esc(name)}</h2><p>selected {int(selected.sum())} of {len(toks)} "
                   f"({selected.mean():.1%}), mean alpha {alpha.mean():.3f} (max {alpha.max():.3f}), "
                   f"mean alpha of the selected {sel_alpha}</p>")
        spans = []
        for i, (t, a, s) in enumerate(zip(texts, alpha, selected)):
            shown = esc(t).replace("\n", "<span class=\"nl\">\u21b5</span>\n")
            cls = "tok sel" if s else "tok"
            tip = esc(f"#{i} id {int(toks[i])} {t!r} alpha={float(a):.3f}" + (" selected" if s else ""))
            spans.append(f"<span class=\"{cls}\" style=\"background:{_colour(a)}\" title=\"{tip}\">{shown}</span>")
        out.append("<div class=\"text\">" + "".join(spans) + "</div>")
    out.append("</body></html>")
    return "\n".join(out)


def selection_png(vocab, tokens, sel: Mapping[str, Mapping[str, np.ndarray]], path: str, *, max_tokens: int = 400) -> str:
    """A heat map (one row per SAL, one column per token, colour = alpha, dot = selected) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    toks = np.asarray(tokens).reshape(-1)[:max_tokens]
    names = list(sel)
    alpha = np.stack([np.asarray(sel[k]["alpha"]).reshape(-1)[: len(toks)] for k in names]) if names else np.zeros((1, len(toks)))
    fig, ax = plt.subplots(figsize=(min(2 + 0.12 * len(toks), 40), 1 + 0.5 * max(len(names), 1)), dpi=100)
    im = ax.imshow(alpha, aspect="auto", cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
    for r, k in enumerate(names):
        cols = np.nonzero(np.asarray(sel[k]["selected"]).reshape(-1)[: len(toks)])[0]
        ax.scatter(cols, np.full(cols.shape, r), s=6, c="black")
    ax.set_yticks(range(len(names)), names or ["(no SAL)"])
    labels = [t if t.isprintable() else repr(t)[1:-1] for t in token_texts(vocab, toks)]
    ax.set_xticks(range(len(toks)), labels, fontsize=6, fontfamily="monospace")
    fig.colorbar(im, ax=ax, label="alpha", fraction=0.02)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_view(workdir: str, text: str, out: str, *, segment: int | None = None, step: int | None = None) -> dict:
    """The CLI's work: load a workdir, select on ``text``, write ``out`` (.html or .png)."""
    from taipan_jax.generate import load

    model, vocab, at = load(workdir, step)
    tokens = np.asarray(vocab.encode(text), np.int32)
    if tokens.size == 0:
        raise ValueError("the text encodes to no tokens")
    sel = selections(model, tokens, segment=segment)
    if out.endswith(".png"):
        selection_png(vocab, tokens, sel, out)
    else:
        page = selection_html(vocab, tokens, sel, title=f"SAL token selection: {os.path.basename(os.path.normpath(workdir))}"
                                                        f", step {at}")
        with open(out, "w", encoding="utf-8") as f:
            f.write(page)
    return sel


def main() -> None:
    workdir = flags.DEFINE_string("workdir", None, "A training workdir (its latest checkpoint unless --step).")
    text = flags.DEFINE_string("text", None, "The text to show.")
    text_file = flags.DEFINE_string("text_file", None, "Read the text from this file instead.")
    out = flags.DEFINE_string("out", "selection.html", "Output: .html (text heat map) or .png (heat map).")
    segment = flags.DEFINE_integer("segment", None, "Feed long texts in segments of this many tokens.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not workdir.value:
            raise app.UsageError("--workdir is required")
        if (text.value is None) == (text_file.value is None):
            raise app.UsageError("give exactly one of --text and --text_file")
        t = text.value
        if text_file.value is not None:
            with open(text_file.value, encoding="utf-8") as f:
                t = f.read()
        sel = write_view(workdir.value, t, out.value, segment=segment.value, step=step.value)
        for name, a in sel.items():
            print(f"{name}: selected {int(a['selected'].sum())}/{a['selected'].size} "
                  f"({a['selected'].mean():.1%}), mean alpha {a['alpha'].mean():.3f}")
        print(f"wrote {out.value}")

    app.run(_main)


if __name__ == "__main__":
    main()
