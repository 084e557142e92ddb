"""Streaming evaluation: per-token loss over long documents, fed in segments through the caches.

    python -m taipan_jax.evaluate --workdir=DIR [--data=kjv|shakespeare|files:GLOB[;field=f]|tfds:NAME[...]] \\
        [--context=1048576] [--segment=8192] [--num_docs=1] [--first_bucket=1024] [--out=DIR] \\
        [--compare=DIR2,FILE.json,...] [--step=N]

A document is fed ``segment`` tokens at a time; each call continues from the previous call's
caches (Mamba-2: conv + SSM states; SAL: the ring buffer of its last ``window`` keys / values;
full attention: a KV cache sized for the whole document), so the losses equal one pass over the
whole document while Taipan's and Mamba-2's memory does not grow with the context. Losses are
reported by context bucket — tokens at positions [0, 1K), [1K, 2K), [2K, 4K), ... up to
``context`` — as JSON and as a perplexity-vs-context PNG that overlays the ``--compare`` models.

Data (``--data``): ``kjv`` (default, the offline King James Bible), ``shakespeare``,
``files:<glob>[;field=f]`` or ``tfds:<name>[:version][;split=s][;field=f]`` (through seqio; needs
the ``data`` extra). With ``--join`` (default) the documents are concatenated (blank line between)
and cut into ``num_docs`` consecutive pieces of ``context`` tokens, each scored from a fresh cache
after the vocabulary's BOS; ``--nojoin`` scores the first ``num_docs`` documents one by one
(``[BOS, t1..tn]`` -> ``[t1..tn, EOS]``, truncated to ``context``).

From Python::

    from taipan_jax.evaluate import streaming_perplexity
    r = streaming_perplexity(model, tokens, segment=8192)     # tokens (b, L): predicts tokens[:, 1:]
    r["perplexity"], r["buckets"], r["losses"]
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from taipan_jax.model import LanguageModel, has_full_attention


# -- caches ------------------------------------------------------------------------------------
def cache_bytes(cache: Any) -> int:
    """Bytes of every array in a cache pytree (shapes and dtypes only: works on abstract caches)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


def cache_signature(cache: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """``(path, shape, dtype)`` of every array in a cache pytree."""
    flat = jax.tree_util.tree_flatten_with_path(cache)[0]
    return [(jax.tree_util.keystr(p), tuple(x.shape), str(jnp.dtype(x.dtype))) for p, x in flat]


# -- losses ------------------------------------------------------------------------------------
_SEGMENT_FNS: dict = {}


def make_segment_fn(model: LanguageModel, *, return_selection: bool = False):
    """``(state, run)``: the model's state and a jitted ``run(state, cache, inputs, targets, weights)
    -> (nll, cache, selected)`` for one segment.

    ``nll (b, l)`` float32 per-token negative log-likelihood; ``selected`` maps each SAL's aux key
    to its number of selected tokens per group (weighted by ``weights``). The cache is donated off
    CPU. ``run`` is shared by every model of the same structure (one compilation per shape).
    """
    graphdef, state = nnx.split(model)
    donate = (1,) if jax.default_backend() != "cpu" else ()
    key = (graphdef, return_selection, donate)
    if key in _SEGMENT_FNS:
        return state, _SEGMENT_FNS[key]

    def run(state, cache, inputs, targets, weights):
        m = nnx.merge(graphdef, state)
        logits, aux, cache = m(inputs, cache=cache, return_cache=True, return_selection=return_selection)
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        sel = {k: jnp.sum(v * weights, axis=(-2, -1)) for k, v in aux.items() if k.endswith("/selected")}
        return nll, cache, sel

    _SEGMENT_FNS[key] = jax.jit(run, donate_argnums=donate)
    return state, _SEGMENT_FNS[key]


def streaming_losses(
    model: LanguageModel,
    inputs: np.ndarray,
    targets: np.ndarray | None = None,
    *,
    segment: int = 8192,
    return_stats: bool = False,
):
    """Per-token losses of ``targets`` given ``inputs``, fed ``segment`` tokens at a time.

    ``inputs (b, L)``; ``targets (b, L)`` (default: ``inputs`` shifted, i.e. scores
    ``inputs[:, 1:]`` from ``inputs[:, :-1]``). The last segment is padded to ``segment`` (one
    compilation; padded positions are dropped). Returns ``nll (b, L')`` float32 and, with
    ``return_stats``, also a dict: ``selected`` (SAL aux key -> selected tokens per group),
    ``cache_bytes``, ``cache_signature``, ``seconds`` (total), ``seconds_after_first`` and
    ``tokens_after_first`` (throughput without the first segment's compilation).
    """
    inputs = np.asarray(inputs, np.int32)
    if targets is None:
        inputs, targets = inputs[:, :-1], inputs[:, 1:]
    targets = np.asarray(targets, np.int32)
    if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.shape[1] == 0:
        raise ValueError(f"inputs and targets must be equal non-empty (batch, length) arrays, got "
                         f"{inputs.shape} and {targets.shape}")
    if segment <= 0:
        raise ValueError(f"segment must be > 0, got {segment}")
    b, n = inputs.shape
    seg = min(segment, n)
    n_seg = -(-n // seg)
    padded = n_seg * seg
    pad = [(0, 0), (0, padded - n)]
    inputs_p, targets_p = np.pad(inputs, pad), np.pad(targets, pad)
    weights = np.pad(np.ones((b, n), np.float32), pad)
    kv_len = padded if has_full_attention(model) else None
    state, run = make_segment_fn(model, return_selection=return_stats and "sal" in model.cfg.group)
    cache = model.init_cache(b, kv_len=kv_len)
    out = np.zeros((b, padded), np.float32)
    selected: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    t1 = None
    for i in range(n_seg):
        s = slice(i * seg, (i + 1) * seg)
        nll, cache, sel = run(state, cache, jnp.asarray(inputs_p[:, s]), jnp.asarray(targets_p[:, s]),
                              jnp.asarray(weights[:, s]))
        out[:, s] = np.asarray(nll)  # also waits for the segment
        for k, v in sel.items():
            selected[k] = selected.get(k, 0) + np.asarray(v, np.float64)
        if i == 0:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    nll = out[:, :n]
    if not return_stats:
        return nll
    stats = {
        "selected": selected,
        "cache_bytes": cache_bytes(cache),
        "cache_signature": cache_signature(cache),
        "seconds": t2 - t0,
        "seconds_after_first": t2 - t1,
        "tokens_after_first": b * (n - seg),
    }
    return nll, stats


def bucket_edges(length: int, first: int = 1024) -> list[int]:
    """``[first, 2 first, 4 first, ..., length]``: the ends of the context buckets."""
    if first <= 0:
        raise ValueError(f"first bucket must be > 0, got {first}")
    edges, e = [], first
    while e < length:
        edges.append(e)
        e *= 2
    return edges + [length]


def bucket_stats(nll: np.ndarray, weights: np.ndarray | None = None, *, first: int = 1024,
                 bytes_per_token: np.ndarray | None = None) -> list[dict]:
    """Loss by position bucket ``[0, e0), [e0, e1), ...`` over ``nll (n_docs, L)``.

    Each bucket: ``start``, ``end``, ``tokens``, ``loss`` (mean nats), ``perplexity`` and
    ``cum_loss`` / ``cum_perplexity`` (positions ``[0, end)``); with ``bytes_per_token`` also
    ``bits_per_byte`` and ``cum_bits_per_byte``.
    """
    nll = np.asarray(nll, np.float64)
    w = np.ones_like(nll) if weights is None else np.asarray(weights, np.float64)
    bpt = None if bytes_per_token is None else np.asarray(bytes_per_token, np.float64) * w
    out, start = [], 0
    for end in bucket_edges(nll.shape[1], first):
        s = slice(start, end)
        tok = float(w[:, s].sum())
        if tok == 0:
            start = end
            continue
        loss = float((nll[:, s] * w[:, s]).sum() / tok)
        cum = float((nll[:, :end] * w[:, :end]).sum() / w[:, :end].sum())
        row = {"start": start, "end": end, "tokens": int(tok), "loss": loss, "perplexity": math.exp(loss),
               "cum_loss": cum, "cum_perplexity": math.exp(cum)}
        if bpt is not None:
            nb, cb = bpt[:, s].sum(), bpt[:, :end].sum()
            row["bits_per_byte"] = float((nll[:, s] * w[:, s]).sum() / math.log(2) / nb) if nb else None
            row["cum_bits_per_byte"] = float((nll[:, :end] * w[:, :end]).sum() / math.log(2) / cb) if cb else None
        out.append(row)
        start = end
    return out


def streaming_perplexity(
    model: LanguageModel,
    tokens: np.ndarray,
    *,
    segment: int = 8192,
    targets: np.ndarray | None = None,
    first_bucket: int = 1024,
) -> dict:
    """Streaming evaluation of ``tokens (b, L)`` (scores ``tokens[:, 1:]``, or ``targets`` if given).

    Returns ``loss`` (mean nats per token), ``perplexity``, ``tokens``, ``buckets``
    (:func:`bucket_stats`), ``losses`` (the per-token array), ``cache_bytes`` and ``tokens_per_s``.
    """
    nll, stats = streaming_losses(model, tokens, targets, segment=segment, return_stats=True)
    loss = float(np.mean(nll, dtype=np.float64))
    tps = stats["tokens_after_first"] / stats["seconds_after_first"] if stats["tokens_after_first"] else None
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(nll.size),
            "buckets": bucket_stats(nll, first=first_bucket), "losses": nll,
            "cache_bytes": stats["cache_bytes"], "tokens_per_s": tps}


# -- data ------------------------------------------------------------------------------------------
def load_token_documents(spec: str, vocab, *, max_docs: int | None = None) -> list[np.ndarray]:
    """Token arrays of the documents of ``spec`` (``tfds:`` through a seqio Task, split ``test``
    unless ``;split=`` says otherwise)."""
    from taipan_jax.data.vocab import parse_spec

    if parse_spec(spec)[0] == "tfds":
        from taipan_jax.data import seqio_tasks

        task = seqio_tasks.register_task("evaluate", spec, vocab, seq_len=1)
        docs = []
        for d in seqio_tasks.task_documents(task, seqio_tasks.split_of(spec, "test"), shuffle=False, seed=0):
            docs.append(d)
            if max_docs is not None and len(docs) >= max_docs:
                break
        return docs
    from taipan_jax.data import corpora

    texts = corpora.load_documents(spec)
    if max_docs is not None:
        texts = texts[:max_docs]
    return [np.asarray(vocab.encode(t), np.int32) for t in texts]


def eval_documents(spec: str, vocab, *, context: int, num_docs: int, join: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(inputs, targets)`` pairs (1-d) to score; see the module docstring for the layout."""
    bos = vocab.bos_id if getattr(vocab, "bos_id", None) is not None else 0
    eos = vocab.eos_id
    if join:
        docs = load_token_documents(spec, vocab)
        sep = np.asarray(vocab.encode("\n\n"), np.int32)
        parts = []
        for i, d in enumerate(docs):
            parts += [sep, d] if i else [d]
        stream = np.concatenate(parts)
        if stream.size < context:
            logging.warning("%s has %d tokens in all: context reduced from %d to %d", spec, stream.size, context,
                            stream.size)
            context = int(stream.size)
        n = min(num_docs, stream.size // context)
        if n < num_docs:
            logging.warning("%s has room for %d piece(s) of %d tokens, not %d", spec, n, context, num_docs)
        out = []
        for i in range(n):
            piece = stream[i * context:(i + 1) * context]
            out.append((np.concatenate([[bos], piece[:-1]]).astype(np.int32), piece.astype(np.int32)))
        return out
    out = []
    for d in load_token_documents(spec, vocab, max_docs=num_docs)[:num_docs]:
        full = np.concatenate([[bos], d, [eos]]).astype(np.int32)[: context + 1]
        out.append((full[:-1], full[1:]))
    return out


# -- results and plots -------------------------------------------------------------------------
def evaluate_workdir(workdir: str, *, data: str = "kjv", context: int = 1 << 20, segment: int = 8192,
                     num_docs: int = 1, join: bool = True, first_bucket: int = 1024, step: int | None = None) -> dict:
    """Load a trainer workdir's parameters and evaluate them by streaming (the CLI's work)."""
    from taipan_jax.generate import load

    model, vocab, at = load(workdir, step)
    docs = eval_documents(data, vocab, context=context, num_docs=num_docs, join=join)
    if not docs:
        raise ValueError(f"no document to evaluate in {data!r}")
    length = max(len(t) for _, t in docs)
    nll = np.zeros((len(docs), length), np.float64)
    w = np.zeros_like(nll)
    bpt = np.zeros_like(nll)
    selected: dict[str, np.ndarray] = {}
    seconds = tokens_timed = 0.0
    cache_b = 0
    for i, (inp, tgt) in enumerate(docs):
        losses, st = streaming_losses(model, inp[None], tgt[None], segment=segment, return_stats=True)
        nll[i, : len(tgt)] = losses[0]
        w[i, : len(tgt)] = 1
        bpt[i, : len(tgt)] = vocab.bytes_per_token(tgt)
        for k, v in st["selected"].items():
            selected[k] = selected.get(k, 0) + v
        seconds += st["seconds_after_first"]
        tokens_timed += st["tokens_after_first"]
        cache_b = max(cache_b, st["cache_bytes"])
        logging.info("document %d/%d: %d tokens, loss %.4f", i + 1, len(docs), len(tgt), float(losses.mean()))
    total = float(w.sum())
    loss = float((nll * w).sum() / total)
    nbytes = float(bpt.sum())
    sal = {}
    for k, v in selected.items():
        for g, n in enumerate(np.atleast_1d(v)):
            sal[f"group{g}/{k.rsplit('/', 1)[0]}/selected_frac"] = float(n / total)
    cfg = model.cfg
    return {
        "name": os.path.basename(os.path.normpath(workdir)),
        "workdir": os.path.abspath(workdir),
        "step": int(at),
        "block_pattern": cfg.block_pattern,
        "num_groups": cfg.num_groups,
        "data": data,
        "join": join,
        "context": length,
        "segment": segment,
        "num_docs": len(docs),
        "tokens": int(total),
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss * total / math.log(2) / nbytes if nbytes else None,
        "buckets": bucket_stats(nll, w, first=first_bucket, bytes_per_token=bpt),
        "sal_selected_frac": sal,
        "cache_bytes": cache_b,
        "tokens_per_s": tokens_timed / seconds if tokens_timed and seconds else None,
        "backend": jax.default_backend(),
    }


def _human(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def format_table(result: dict) -> str:
    bpb = any(b.get("bits_per_byte") is not None for b in result["buckets"])
    lines = [f"{'positions':>16} {'tokens':>10} {'loss':>8} {'ppl':>10}" + (f" {'bpb':>7}" if bpb else "")
             + f" {'cum ppl':>10}"]
    for b in result["buckets"]:
        row = (f"{_human(b['start']) + '-' + _human(b['end']):>16} {b['tokens']:>10} {b['loss']:>8.4f} "
               f"{b['perplexity']:>10.4f}")
        if bpb:
            row += f" {b['bits_per_byte']:>7.4f}" if b.get("bits_per_byte") is not None else f" {'-':>7}"
        lines.append(row + f" {b['cum_perplexity']:>10.4f}")
    return "\n".join(lines)


def plot_perplexity(results: Sequence[dict], path: str, *, title: str | None = None) -> str:
    """Perplexity (per bucket) against context position, one line per result; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    several_data = len({r.get("data") for r in results}) > 1
    for r in results:
        xs = [b["end"] for b in r["buckets"]]
        ys = [b["perplexity"] for b in r["buckets"]]
        label = f"{r.get('name', '?')} ({r.get('block_pattern', '')}, step {r.get('step', '?')})"
        if several_data:
            label += f" on {r.get('data')}"
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _human(int(round(x)))))
    ax.set_xlabel("context position (bucket end, tokens)")
    ax.set_ylabel("perplexity of the tokens in the bucket")
    ax.set_title(title or f"streaming perplexity vs context ({results[0].get('data', '')})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def result_name(data: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in data)
    return f"streaming_{safe}.json"


def _compare_result(item: str, out_dir: str, settings: dict) -> dict:
    """A result to overlay: a JSON file, a workdir's saved result, or a workdir evaluated now."""
    if item.endswith(".json"):
        with open(item) as f:
            return json.load(f)
    saved = os.path.join(item, "eval", result_name(settings["data"]))
    if os.path.exists(saved):
        with open(saved) as f:
            r = json.load(f)
        if r.get("context") == settings["context"] and r.get("join") == settings["join"]:
            return r
    r = evaluate_workdir(item, **settings)
    with open(os.path.join(out_dir, f"compare_{r['name']}_{result_name(settings['data'])}"), "w") as f:
        json.dump(r, f, indent=1)
    return r


def main() -> None:
    workdir = flags.DEFINE_string("workdir", None, "A training workdir (its latest checkpoint unless --step).")
    data = flags.DEFINE_string("data", "kjv", "kjv | shakespeare | files:<glob>[;field=f] | tfds:<name>[;split=s].")
    context = flags.DEFINE_integer("context", 1 << 20, "Tokens per scored piece (the longest context).")
    segment = flags.DEFINE_integer("segment", 8192, "Tokens per call; the caches carry the rest.")
    num_docs = flags.DEFINE_integer("num_docs", 1, "Pieces (--join) or documents (--nojoin) to score.")
    join = flags.DEFINE_boolean("join", True, "Concatenate the documents and cut pieces of --context tokens.")
    first_bucket = flags.DEFINE_integer("first_bucket", 1024, "End of the first context bucket.")
    out = flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/eval).")
    compare = flags.DEFINE_list("compare", [], "Other workdirs or result JSON files to overlay in the plot.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not workdir.value:
            raise app.UsageError("--workdir is required")
        out_dir = out.value or os.path.join(workdir.value, "eval")
        os.makedirs(out_dir, exist_ok=True)
        settings = dict(data=data.value, context=context.value, segment=segment.value, num_docs=num_docs.value,
                        join=join.value, first_bucket=first_bucket.value)
        r = evaluate_workdir(workdir.value, step=step.value, **settings)
        path = os.path.join(out_dir, result_name(data.value))
        with open(path, "w") as f:
            json.dump(r, f, indent=1)
        print(f"# {workdir.value} (step {r['step']}, {r['block_pattern']} x {r['num_groups']}) on {r['data']}: "
              f"{r['num_docs']} {'piece' if r['join'] else 'document'}(s) of up to {r['context']} tokens, "
              f"segment {r['segment']}")
        print(format_table(r))
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.4f}"
              + (f"  bits/byte {r['bits_per_byte']:.4f}" if r["bits_per_byte"] else "")
              + f"  cache {r['cache_bytes'] / 2**20:.2f} MiB  {tps} tokens/s")
        results = [r]
        for item in compare.value:
            results.append(_compare_result(item, out_dir, {**settings, "context": r["context"]}))
        png = plot_perplexity(results, os.path.join(out_dir, "perplexity_vs_context.png"))
        print(f"wrote {path} and {png}")

    app.run(_main)


if __name__ == "__main__":
    main()
