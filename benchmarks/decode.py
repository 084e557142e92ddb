"""Decoding latency and cache memory by context length, and streaming-evaluation throughput.

    python benchmarks/decode.py [--config=taipan_1_3b,mamba2_1_3b,transformer_pp_1_3b] \
        [--contexts=1024,32768,262144,1048576] [--batch=1] [--steps=64] [--warmup=4] \
        [--stream_tokens=1048576] [--segment=8192] [--out=DIR]
    # on a CPU, to check that it runs:
    python benchmarks/decode.py --config=configs/tiny.py --contexts=256,1024 --steps=8 --stream_tokens=2048 --segment=512

For each model (a preset name from configs/ or a config file; random initialisation, the preset's
dtypes) and each context C:

* the cache is **synthesised as if C tokens had been consumed**: ring buffers / KV caches hold
  keys and values (random) at the positions of the last tokens, ``t = count = C``, Mamba-2 SSM
  states random. A decode step's work and memory depend only on the cache's shapes and on which
  slots are filled, not on the values, and prefilling 1M tokens per configuration would dominate
  the run. Full-attention (Transformer++) KV caches are sized ``C + steps``;
* ``latency`` = median wall time of one jitted ``model.step`` (blocked on its result; includes
  dispatch), ``scan`` = mean time per step of ``steps`` steps inside one ``lax.scan`` (no host in
  the loop, as in :func:`taipan_jax.sampling.generate`);
* memory: the cache pytree's bytes (exact, from shapes) and the device's peak bytes in use where
  the backend reports it. A context whose allocation fails is reported as OOM and larger contexts of
  that model are skipped.

Streaming evaluation: :func:`taipan_jax.evaluate.streaming_losses` over ``stream_tokens`` random
tokens in segments of ``segment`` (tokens/s without the first segment's compilation).

Prints a table and writes ``decode_bench.json`` to ``--out`` (default ``$OUT``, else
``/tmp/decode_bench``). Results, with date and device: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from taipan_jax.evaluate import cache_bytes, streaming_losses  # noqa: E402
from taipan_jax.model import LanguageModel, build_model, count_params, has_full_attention  # noqa: E402
from taipan_jax.model_config import ModelConfig  # noqa: E402


def load_config(name: str):
    """A preset name (``configs/<name>.py``) or a path to a config file with ``get_config()``."""
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(f"configs.{name}")
    return mod.get_config()


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text.lower()


def synthetic_cache(model: LanguageModel, batch: int, context: int, extra: int, seed: int = 0):
    """The cache after ``context`` tokens (shapes and filled slots exact, values random)."""
    kv_len = context + extra if has_full_attention(model) else None
    cache = model.init_cache(batch, kv_len=kv_len)
    key = iter(jax.random.split(jax.random.key(seed), 4096))

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        last = name.rsplit("'", 2)[-2] if "'" in name else name
        if last in ("k", "v"):
            # drawn in the cache's dtype: a float32 draw of a 256K-token Transformer++ cache
            # (all layers stacked) would need twice its bytes again, a benchmark artefact
            return jax.random.normal(next(key), x.shape, x.dtype) * jnp.asarray(0.5, x.dtype)
        if last == "ssm":
            return 0.1 * jax.random.normal(next(key), x.shape, x.dtype)
        if last in ("t", "count"):
            return jnp.full(x.shape, context, x.dtype)
        if last == "pos":  # slot s holds the latest write index n < context with n % size == s
            size = x.shape[-1]
            s = jnp.arange(size, dtype=jnp.int32)
            n = (context - 1) - ((context - 1 - s) % size)
            return jnp.broadcast_to(jnp.where(n >= 0, n, -1), x.shape).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(fill, cache)


def peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 -- backends without memory stats
        return None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def decode_fns(model: LanguageModel, args):
    """``(state, step, scan)``: one jitted decode step and ``args.steps`` steps in a ``lax.scan``.

    Made once per model, so contexts with equal cache shapes (every context of Taipan and
    Mamba-2) reuse the compilation."""
    graphdef, state = nnx.split(model)
    donate = (2,) if jax.default_backend() != "cpu" else ()

    def one(state, tok, cache):
        return nnx.merge(graphdef, state).step(tok, cache)

    step = jax.jit(one, donate_argnums=donate)

    def many(state, tok, cache):
        m = nnx.merge(graphdef, state)

        def body(carry, _):
            tok, cache = carry
            logits, cache = m.step(tok, cache)
            return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None

        (tok, cache), _ = jax.lax.scan(body, (tok, cache), None, length=args.steps)
        return tok, cache

    scan = jax.jit(many, donate_argnums=donate)
    return state, step, scan


def bench_decode(model: LanguageModel, fns, context: int, args) -> dict:
    state, step, scan = fns
    extra = 2 * (args.steps + args.warmup) + 2
    cache = synthetic_cache(model, args.batch, context, extra)
    size = cache_bytes(cache)
    tok = jnp.zeros((args.batch,), jnp.int32)
    t0 = time.perf_counter()
    logits, cache = step(state, tok, cache)  # compile (or cached)
    jax.block_until_ready(logits)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        logits, cache = step(state, tok, cache)
    jax.block_until_ready(logits)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        logits, cache = step(state, tok, cache)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    tok2, cache = scan(state, tok, cache)  # compile (or cached)
    jax.block_until_ready(tok2)
    compile_s += time.perf_counter() - t0
    t = time.perf_counter()
    tok2, cache = scan(state, tok, cache)
    jax.block_until_ready(tok2)
    scan_s = (time.perf_counter() - t) / args.steps
    assert np.all(np.isfinite(np.asarray(logits)))
    return {"context": context, "latency_ms": 1e3 * statistics.median(times), "latency_min_ms": 1e3 * min(times),
            "scan_ms_per_token": 1e3 * scan_s, "compile_s": compile_s, "cache_bytes": size,
            "peak_bytes": peak_bytes()}


def bench_stream(model: LanguageModel, args) -> dict:
    rng = np.random.default_rng(0)
    toks = rng.integers(3, model.cfg.vocab_size, size=(args.batch, args.stream_tokens + 1), dtype=np.int32)
    _, st = streaming_losses(model, toks, segment=args.segment, return_stats=True)
    tps = st["tokens_after_first"] / st["seconds_after_first"] if st["tokens_after_first"] else None
    return {"stream_tokens": args.stream_tokens, "segment": args.segment, "tokens_per_s": tps,
            "seconds": st["seconds"], "cache_bytes": st["cache_bytes"], "peak_bytes": peak_bytes()}


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="taipan_1_3b,mamba2_1_3b,transformer_pp_1_3b",
                   help="comma-separated preset names or config files")
    p.add_argument("--contexts", default="1024,32768,262144,1048576")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--stream_tokens", type=int, default=1 << 20, help="0 = skip the streaming benchmark")
    p.add_argument("--segment", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/decode_bench"))
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    results = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
               "date": time.strftime("%Y-%m-%d"), "args": vars(args), "models": []}
    print(f"# {results['device']} ({results['backend']}), batch {args.batch}, {args.steps} steps")
    for name in args.config.split(","):
        config = load_config(name)
        cfg = ModelConfig.from_dict(config.model.to_dict())
        model = build_model(cfg, seed=args.seed)
        entry = {"name": name, "block_pattern": cfg.block_pattern, "num_groups": cfg.num_groups,
                 "params": count_params(model), "decode": [], "stream": None}
        print(f"\n## {name}: {cfg.block_pattern} x {cfg.num_groups}, {entry['params'] / 1e6:.1f}M params, "
              f"dtype {cfg.dtype}")
        print(f"{'context':>9} {'latency ms':>11} {'scan ms/tok':>12} {'cache':>12} {'peak mem':>12} {'compile s':>10}")
        fns = decode_fns(model, args)
        for c in contexts:
            try:
                r = bench_decode(model, fns, c, args)
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                entry["decode"].append({"context": c, "oom": True, "error": str(e)[:300]})
                print(f"{c:>9} {'OOM':>11}  (larger contexts skipped)")
                break
            entry["decode"].append(r)
            print(f"{c:>9} {r['latency_ms']:>11.3f} {r['scan_ms_per_token']:>12.3f} {_fmt_bytes(r['cache_bytes']):>12} "
                  f"{_fmt_bytes(r['peak_bytes']):>12} {r['compile_s']:>10.1f}")
        if args.stream_tokens > 0:
            try:
                s = bench_stream(model, args)
                print(f"streaming evaluation: {args.stream_tokens} tokens in segments of {args.segment}: "
                      f"{s['tokens_per_s']:.0f} tokens/s, cache {_fmt_bytes(s['cache_bytes'])}, "
                      f"peak {_fmt_bytes(s['peak_bytes'])}")
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                s = {"stream_tokens": args.stream_tokens, "oom": True, "error": str(e)[:300]}
                print(f"streaming evaluation of {args.stream_tokens} tokens: OOM")
            entry["stream"] = s
        results["models"].append(entry)
        del model, fns
        path = write_results(results, args.out)  # after every model: a later failure keeps these
    print(f"\nwrote {path}")


def write_results(results: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "decode_bench.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return path


if __name__ == "__main__":
    main()
