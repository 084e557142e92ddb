"""Gathered SAL attention on one GPU: ours (pallas_gpu) vs cuDNN sliding-window vs our xla path.

    python benchmarks/sal_attention.py                       # everything, then the table
    python benchmarks/sal_attention.py --lengths 32768 --fwd-only-lengths "" --layer-lengths ""

Setting (issue 5): one sequence of ``L`` tokens, 16 heads of 128, bf16, window 2048, capacity
C = 0.15: the selected query positions are a uniform random ``round(C * L)``-subset of
``0..L-1``; keys and values are all ``L`` tokens (SAL ``kv_source="all"``).

* ``ours``: ``gathered_attention(impl="pallas_gpu")`` on the S selected queries;
* ``xla``: ``gathered_attention(impl="xla")`` (the blocked plain-JAX path, same work);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True,
  local_window_size=(2047, 0))`` over all L queries -- what a dense SAL (or a sliding-window
  transformer layer) pays.

Before timing, ours is checked against the dense float32 reference (``impl="reference"``) at
lengths where it fits (``--check-max``), else against ``xla`` (exact for distinct positions;
tested against the reference in the suite): forward, and gradients at the first length.

Useful FLOPs count exactly the admissible (query, key) pairs, 4 * d * H per pair forward
(QK^T and PV), 3.5x that forward + backward (the 2 forward and 5 backward matmuls of flash
attention, no recomputation counted). ``speedup`` = cuDNN time / ours; ``util`` = our useful
TFLOP/s / cuDNN's useful TFLOP/s (goals: >= 5x and >= 0.8 at L >= 32K, forward + backward).

``--layer-lengths``: the whole SAL layer (gate, Gumbel selection, projections, attention,
mix-back, SwiGLU; d_model 2048, train mode, forward + backward of a scalar loss) in
``attention="dense"`` (cuDNN) vs ``attention="gathered"`` (pallas_gpu) mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

H, D, WINDOW, CAP = 16, 128, 2048, 0.15


def log(*a):
    print(*a, flush=True)


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8192,32768,131072", help="forward + backward lengths")
    ap.add_argument("--fwd-only-lengths", default="1048576")
    ap.add_argument("--layer-lengths", default="8192,32768")
    ap.add_argument("--impls", default="ours,cudnn,xla")
    ap.add_argument("--check-max", type=int, default=8192, help="largest L checked against the dense reference")
    ap.add_argument("--seconds", type=float, default=0.3)
    ap.add_argument("--variants", default="64x2,128x3,192x2",
                    help="extra (gpu_block_kv x gpu_stages) settings of ours, timed at every length")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/sal_attention_bench"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import _timing
    from pallas_kernels import GatheredAttentionBlockSizes, gathered_attention

    impls = args.impls.split(",")
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": [], "layer": []}
    log("jax", jax.__version__, jax.devices())

    def jtime(fn, fargs):
        return _timing.jtime(fn, fargs, args.seconds)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def inputs(L, seed=0):
        rng = np.random.RandomState(seed)
        S = round(CAP * L)
        q_pos = np.sort(rng.choice(L, size=S, replace=False)).astype(np.int32)[None]
        kv_pos = np.arange(L, dtype=np.int32)[None]
        ks = jax.random.split(jax.random.PRNGKey(seed), 5)
        q = jax.random.normal(ks[0], (1, S, H, D), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, L, H, D), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, L, H, D), jnp.bfloat16)
        qf = jax.random.normal(ks[3], (1, L, H, D), jnp.bfloat16)
        return q, k, v, jnp.asarray(q_pos), jnp.asarray(kv_pos), qf, q_pos

    def pairs(pos):  # admissible (query, key) pairs with kv = arange(L): min(pos + 1, window) each
        return int(np.minimum(np.asarray(pos, np.int64) + 1, WINDOW).sum())

    def ga(impl, bs=None):
        return jax.jit(lambda q, k, v, qp, kp: gathered_attention(q, k, v, qp, kp, window=WINDOW, impl=impl,
                                                                  block_sizes=bs))

    def ga_grad(impl, bs=None):
        def loss(q, k, v, qp, kp):
            return jnp.sum(gathered_attention(q, k, v, qp, kp, window=WINDOW, impl=impl,
                                              block_sizes=bs).astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    variants = [tuple(int(x) for x in v.split("x")) for v in args.variants.split(",") if v.strip()]

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(WINDOW - 1, 0),
                                            implementation="cudnn")

    cudnn_f = jax.jit(cudnn)
    cudnn_g = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(cudnn(q, k, v).astype(jnp.float32)),
                                         argnums=(0, 1, 2)))

    first = True
    for L, bwd in [(L, True) for L in ints(args.lengths)] + [(L, False) for L in ints(args.fwd_only_lengths)]:
        row = {"L": L, "bwd": bwd}
        try:
            q, k, v, qp, kp, qf, q_pos_np = inputs(L)
            S = q.shape[1]
            row["S"] = S
            useful = 4 * D * H * pairs(q_pos_np[0]) * (3.5 if bwd else 1.0)
            useful_dense = 4 * D * H * pairs(np.arange(L)) * (3.5 if bwd else 1.0)
            row["useful_gflop"], row["useful_gflop_cudnn"] = useful / 1e9, useful_dense / 1e9
            # correctness of ours
            if "ours" in impls:
                oracle = "reference" if L <= args.check_max else "xla"
                o_ours = ga("pallas_gpu")(q, k, v, qp, kp)
                o_ref = ga(oracle)(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), qp, kp)
                row["fwd_rel_err_vs_" + oracle] = rel(o_ours, o_ref)
                if bwd and first:
                    g_ours = ga_grad("pallas_gpu")(q, k, v, qp, kp)[1]
                    g_ref = ga_grad(oracle)(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                           qp, kp)[1]
                    row["grad_rel_err"] = {n: rel(a, b) for n, a, b in zip("qkv", g_ours, g_ref)}
                    first = False
                log(f"L={L} S={S} check vs {oracle}:", row.get("fwd_rel_err_vs_" + oracle), row.get("grad_rel_err"))
                del o_ref
            for impl in impls:
                try:
                    if impl == "cudnn":
                        fn, fargs = (cudnn_g if bwd else cudnn_f), (qf, k, v)
                    else:
                        name = "pallas_gpu" if impl == "ours" else impl
                        fn, fargs = (ga_grad(name) if bwd else ga(name)), (q, k, v, qp, kp)
                    ms = jtime(fn, fargs)
                    row[impl + "_ms"] = ms
                    flops = useful_dense if impl == "cudnn" else useful
                    row[impl + "_tflops"] = flops / (ms * 1e-3) / 1e12
                    log(f"  L={L} {'fwd+bwd' if bwd else 'fwd'} {impl}: {ms:.3f} ms, "
                        f"{row[impl + '_tflops']:.1f} useful TFLOP/s")
                except Exception as e:
                    row[impl + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    log(f"  L={L} {impl} failed: {row[impl + '_error']}")
            if "ours" in impls:
                for bkv, st in variants:
                    name = f"ours_{bkv}x{st}"
                    try:
                        bs = GatheredAttentionBlockSizes(gpu_block_kv=bkv, gpu_stages=st)
                        fn = ga_grad("pallas_gpu", bs) if bwd else ga("pallas_gpu", bs)
                        row[name + "_ms"] = jtime(fn, (q, k, v, qp, kp))
                        log(f"  L={L} {name}: {row[name + '_ms']:.3f} ms")
                    except Exception as e:
                        row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        log(f"  L={L} {name} failed: {row[name + '_error']}")
            if "ours_ms" in row and "cudnn_ms" in row:
                row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["ours_ms"]
                row["util_vs_cudnn"] = row["ours_tflops"] / row["cudnn_tflops"]
            if "ours_ms" in row and "xla_ms" in row:
                row["speedup_vs_xla"] = row["xla_ms"] / row["ours_ms"]
        except Exception:
            traceback.print_exc()
            row["error"] = traceback.format_exc(limit=2)[-300:]
        res["rows"].append(row)
        del q, k, v, qf

    for L in ints(args.layer_lengths):
        res["layer"].append(layer_bench(L, jtime, log))

    log("\n| L | pass | S | ours ms | cuDNN window ms | xla ms | speedup vs cuDNN | ours useful TF/s | cuDNN TF/s | util |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        f = lambda key, fmt="{:.3f}": fmt.format(r[key]) if key in r else "–"  # noqa: E731
        log(f"| {r['L']} | {'fwd+bwd' if r['bwd'] else 'fwd'} | {r.get('S', '')} | {f('ours_ms')} | {f('cudnn_ms')} | "
            f"{f('xla_ms')} | {f('speedup_vs_cudnn', '{:.2f}x')} | {f('ours_tflops', '{:.0f}')} | "
            f"{f('cudnn_tflops', '{:.0f}')} | {f('util_vs_cudnn', '{:.2f}')} |")
    if res["layer"]:
        log("\n| L | SAL layer fwd+bwd: dense (cuDNN) ms | gathered (pallas_gpu) ms | ratio |")
        log("|---|---|---|---|")
        for r in res["layer"]:
            ratio = f"{r['dense_ms'] / r['gathered_ms']:.2f}x" if "dense_ms" in r and "gathered_ms" in r else "–"
            log(f"| {r['L']} | {r.get('dense_ms', r.get('dense_error', '–'))} | "
                f"{r.get('gathered_ms', r.get('gathered_error', '–'))} | {ratio} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sal_attention.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)


def layer_bench(L: int, jtime, log) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from taipan_jax.layers.sal import SALBlock
    from taipan_jax.model_config import ModelConfig

    out = {"L": L}
    for mode in ("dense", "gathered"):
        try:
            cfg = ModelConfig.from_dict(dict(
                vocab_size=256, d_model=2048, num_groups=1, block_pattern="sal", dtype="bfloat16",
                param_dtype="float32",
                sal=dict(num_heads=H, num_kv_heads=H, head_dim=D, window=WINDOW, capacity=CAP, attention=mode,
                         impl="pallas_gpu", dense_impl="cudnn"),
            ))
            block = SALBlock(cfg, rngs=nnx.Rngs(params=0))
            graphdef, params = nnx.split(block)
            h = jax.random.normal(jax.random.PRNGKey(1), (1, L, 2048), jnp.bfloat16)

            @jax.jit
            def step(params, h, key):
                def loss(params, h):
                    blk = nnx.merge(graphdef, params)
                    y, _, aux = blk(h, key=key, train=True)
                    return jnp.mean(y.astype(jnp.float32) ** 2) + aux["budget_loss"]
                return jax.value_and_grad(loss, argnums=(0, 1))(params, h)

            ms = jtime(step, (params, h, jax.random.PRNGKey(2)))
            out[mode + "_ms"] = round(ms, 3)
            log(f"  SAL layer L={L} {mode}: {ms:.3f} ms (fwd+bwd)")
        except Exception as e:
            out[mode + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            log(f"  SAL layer L={L} {mode} failed: {out[mode + '_error']}")
    return out


if __name__ == "__main__":
    main()
