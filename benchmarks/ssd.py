"""SSD scan on one GPU: ours (pallas_gpu), our xla path and the two public peers, checked then timed.

    python benchmarks/ssd.py                      # everything below, then the table
    python benchmarks/ssd.py --impls ours,xla --shapes 4x8192   # a subset

For every shape ``b x L`` (H=64, P=64, N=128, g=1, bf16 x/B/C, float32 dt/A, no D, no initial
state, no segments -- what both peers support):

1. a jax process makes the inputs (jax.random, the peers' bench distribution), computes the
   reference ``y`` with our chunked ``xla`` path in float32 on the upcast inputs (HIGHEST
   precision; the tests hold it to 1e-5 of the sequential oracle), checks every jax impl's
   output against it (relative L2), then times forward and forward+backward (grad of
   ``sum(y * gy)`` w.r.t. x, dt, A, B, C) of: ``ours`` = ``ssd(impl="pallas_gpu")``
   (``ours_f32``: the same on float32 copies of x/B/C, the three-part split path),
   ``xla`` = ``ssd(impl="xla")``, ``jla`` = jax-linear-attention 0.1.0's Mosaic GPU
   ``simple_gla`` (``q=C, k=B, v=dt*x, g=dt*A, scale=1``), if importable. It saves the
   inputs and reference for step 2.
2. a torch process (separate, so the two frameworks never share the card) checks and times
   mamba_ssm's Triton ``mamba_chunk_scan_combined`` (chunk 256), if importable.
3. the table: median ms, ratios peer / ours, and our achieved TFLOP/s and GB/s against the
   card's measured ceilings.

``--grad-check 16x2048`` also compares our gradients (x, dt, A, B, C) with the float32 xla
path's at that shape. ``--gpus 2`` spreads the shapes over two GPUs (one process each, run
side by side; every timing still uses one GPU).

Timing: jax impls as in shared/bench/ssd_peers.py (jit, 3 warm-ups, then the smaller of the
median of synchronised single calls and the mean of a back-to-back batch); Triton with
``triton.testing.do_bench`` (median). Inputs are several times the 60 MB L2.

Model FLOPs (``flops_fwd``) count what the chunked algorithm needs at our chunk T=64,
``b*L*H*(2*T*(N+P) + 4*N*P)``; fwd+bwd counts 4x that (our backward is three scans of the same
size). Bytes are the minimum traffic: each input read once, each output written once.
Peers and the ``--out`` folder (default ``$OUT`` or /tmp/ssd_bench) stay outside the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

H, P, N, G = 64, 64, 128, 1
SHAPES = [(4, 8192), (1, 32768), (16, 2048), (1, 131072)]
CEIL_TFLOPS, CEIL_GBS = 686.0, 4274.0  # measured on an H200 of this workplace (bf16 matmul, copy)
T_MODEL = 64


def log(*a):
    print(*a, flush=True)


def shape_key(b, L):
    return f"{b}x{L}"


def model_flops(b, L, bwd):
    f = b * L * H * (2 * T_MODEL * (N + P) + 4 * N * P)
    return 4 * f if bwd else f


def model_bytes(b, L, bwd):
    X = b * L * H * P * 2  # x or y (bf16)
    BC = b * L * G * N * 2
    DT = b * L * H * 4
    fwd = 2 * X + 2 * BC + DT  # read x, B, C, dt; write y
    if not bwd:
        return fwd
    return fwd + 3 * X + 4 * BC + 2 * DT  # read dy, x; write dx; read B, C; write dB, dC; dt, ddt


# --------------------------------------------------------------------------------------- jax


def run_jax(args):
    import numpy as np
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import _timing
    from pallas_kernels import ssd
    from pallas_kernels.ssd import pallas_gpu as ssd_gpu
    from pallas_kernels.ssd.config import SSDBlockSizes

    res = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    log("jax", jax.__version__, jax.devices())

    def jtime(fn, fargs, n_target=args.seconds):
        return _timing.jtime(fn, fargs, n_target)

    # Ceilings, measured again here.
    try:
        a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
        mm = jax.jit(lambda a, b: a @ b)
        res["ceil_matmul_tflops"] = 2 * 8192 ** 3 / (jtime(mm, (a, a), 0.3) * 1e-3) / 1e12
        z = jax.random.normal(jax.random.PRNGKey(1), (1024, 1024, 1024), jnp.bfloat16)
        cp = jax.jit(lambda z: z + jnp.bfloat16(1))
        res["ceil_copy_gbs"] = 2 * z.size * 2 / (jtime(cp, (z,), 0.3) * 1e-3) / 1e9
        del a, z
        log("ceilings", res["ceil_matmul_tflops"], "TFLOP/s", res["ceil_copy_gbs"], "GB/s")
    except Exception:
        traceback.print_exc()

    try:
        from jla import ops as jla_ops
        have_jla = "jla" in args.impls
    except Exception as e:  # not carried
        log("jla not importable:", e)
        have_jla = False

    def inputs(b, L, seed=1):
        ks = jax.random.split(jax.random.PRNGKey(seed), 6)
        x = jax.random.normal(ks[0], (b, L, H, P), jnp.bfloat16)
        dt = jnp.exp(jax.random.uniform(ks[1], (b, L, H), jnp.float32, math.log(1e-3), math.log(0.1)))
        A = -jax.random.uniform(ks[2], (H,), jnp.float32, 1.0, 16.0)
        B = jax.random.normal(ks[3], (b, L, G, N), jnp.bfloat16)
        C = jax.random.normal(ks[4], (b, L, G, N), jnp.bfloat16)
        gy = jax.random.normal(ks[5], (b, L, H, P), jnp.bfloat16)
        return (x, dt, A, B, C), gy

    def impl_fn(name, variant=None):
        if name in ("ours", "xla"):
            impl = "pallas_gpu" if name == "ours" else "xla"
            if variant is None:
                return lambda x, dt, A, B, C: ssd(x, dt, A, B, C, impl=impl)
            bs = SSDBlockSizes(**variant)

            def direct(x, dt, A, B, C):  # the kernel entry point with non-default GPU blocks
                b, L = x.shape[:2]
                y, _ = ssd_gpu.ssd_pallas_gpu(x, dt, A, B, C, None, jnp.zeros((b, H, P, N), jnp.float32),
                                              jnp.zeros((b, L), jnp.int32), bs)
                return y
            return direct
        if name == "ours_f32":  # float32 x/B/C: the three-part bf16 split (upcast inside the timing)
            f32 = jnp.float32
            return lambda x, dt, A, B, C: ssd(x.astype(f32), dt, A, B.astype(f32), C.astype(f32),
                                              impl="pallas_gpu").astype(x.dtype)
        if name == "jla":
            def f(x, dt, A, B, C):
                v = (x.astype(jnp.float32) * dt[..., None]).astype(x.dtype)
                o, _ = jla_ops.linear_attention("simple_gla", C, B, v, g=dt * A, scale=1.0, impl="mosaic_gpu")
                return o
            return f
        raise ValueError(name)

    rel = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel()) / jnp.linalg.norm(b.ravel()))  # noqa: E731
    ref_fn = jax.jit(lambda x, dt, A, B, C: ssd(x.astype(jnp.float32), dt, A, B.astype(jnp.float32),
                                                  C.astype(jnp.float32), impl="xla"))
    names = [n for n in ("ours", "ours_f32", "xla") if n in args.impls] + (["jla"] if have_jla else [])
    variants = [json.loads(v) for v in args.variants] if args.variants else []
    os.makedirs(args.tmp, exist_ok=True)
    for b, L in args.shapes:
        key = shape_key(b, L)
        r = res.setdefault(key, {})
        try:
            fargs, gy = inputs(b, L)
            y_ref = ref_fn(*fargs)
            jax.block_until_ready(y_ref)
        except Exception as e:
            traceback.print_exc()
            r["error"] = f"reference: {type(e).__name__}: {str(e)[:200]}"
            continue
        if "triton" in args.impls:
            import ml_dtypes  # noqa: F401
            u16 = lambda a: np.asarray(a).view(np.uint16)  # noqa: E731
            x, dt, A, B, C = fargs
            np.savez(os.path.join(args.tmp, f"{key}.npz"), x=u16(x), dt=np.asarray(dt), A=np.asarray(A),
                     B=u16(B), C=u16(C), gy=u16(gy), y_ref=u16(y_ref.astype(jnp.bfloat16)))
        todo = [(n, None) for n in names] + [(f"ours{json.dumps(v, sort_keys=True)}", v) for v in variants]
        for name, variant in todo:
            base = "ours" if variant is not None else name
            try:
                f = impl_fn(base, variant)
                fwd = jax.jit(f)
                t0 = time.time()
                y = jax.block_until_ready(fwd(*fargs))
                c_fwd = time.time() - t0
                err = rel(y, y_ref)
                del y
                ok = bool(err <= 2e-2)
                loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * gy.astype(jnp.float32))  # noqa: E731
                fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
                t0 = time.time()
                jax.block_until_ready(fb(*fargs))
                c_fb = time.time() - t0
                entry = dict(rel_err=err, check_ok=ok, compile_fwd_s=c_fwd, compile_fwdbwd_s=c_fb)
                if ok:
                    entry["fwd_ms"] = jtime(fwd, fargs)
                    entry["fwdbwd_ms"] = jtime(fb, fargs)
                r[name] = entry
                log(key, name, entry)
            except Exception as e:
                traceback.print_exc()
                r[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(key, name, "ERROR", r[name]["error"])
        if (b, L) in args.grad_check and "ours" in names:
            try:
                f32 = jnp.float32
                up = lambda a: a.astype(f32)  # noqa: E731
                loss_ref = lambda x, dt, A, B, C: jnp.sum(ssd(up(x), dt, A, up(B), up(C), impl="xla") * up(gy))  # noqa: E731
                loss_ours = lambda x, dt, A, B, C: jnp.sum(ssd(x, dt, A, B, C, impl="pallas_gpu").astype(f32) * up(gy))  # noqa: E731
                g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4)))(*fargs)
                g_ours = jax.jit(jax.grad(loss_ours, argnums=(0, 1, 2, 3, 4)))(*fargs)
                r["ours_grad_rel_err"] = {k: rel(a, b_.astype(f32)) for k, a, b_ in zip("x dt A B C".split(), g_ours, g_ref)}
                log(key, "ours grad rel err vs float32 xla", r["ours_grad_rel_err"])
                del g_ref, g_ours
            except Exception as e:
                traceback.print_exc()
                r["ours_grad_rel_err"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        del fargs, gy, y_ref
        json.dump(res, open(os.path.join(args.parts, f"ssd_jax{args.tag}.json"), "w"), indent=1)
    json.dump(res, open(os.path.join(args.parts, f"ssd_jax{args.tag}.json"), "w"), indent=1)


# ------------------------------------------------------------------------------------- torch


def run_torch(args):
    import numpy as np
    import torch
    from triton.testing import do_bench

    res = {}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as f
    except Exception as e:
        log("mamba_ssm not importable:", e)
        return
    dev = "cuda"
    for b, L in args.shapes:
        key = shape_key(b, L)
        path = os.path.join(args.tmp, f"{key}.npz")
        if not os.path.exists(path):
            continue
        try:
            d = np.load(path)
            bf = lambda a: torch.from_numpy(d[a]).view(torch.bfloat16).to(dev)  # noqa: E731
            x, B, C, gy, y_ref = bf("x"), bf("B"), bf("C"), bf("gy"), bf("y_ref").float()
            dt = torch.from_numpy(d["dt"]).to(dev)
            A = torch.from_numpy(d["A"]).to(dev)
            t0 = time.time()
            with torch.no_grad():
                y = f(x, dt, A, B, C, 256)
            torch.cuda.synchronize()
            first = time.time() - t0
            err = float(torch.linalg.vector_norm(y.float() - y_ref) / torch.linalg.vector_norm(y_ref))
            ok = err <= 2e-2
            entry = dict(rel_err=err, check_ok=ok, first_call_s=first)
            if ok:
                with torch.no_grad():
                    entry["fwd_ms"] = do_bench(lambda: f(x, dt, A, B, C, 256), warmup=100, rep=400,
                                               return_mode="median")
                for t in (x, dt, A, B, C):
                    t.requires_grad_(True)
                entry["fwdbwd_ms"] = do_bench(lambda: f(x, dt, A, B, C, 256).backward(gy), warmup=100, rep=400,
                                              grad_to_none=[x, dt, A, B, C], return_mode="median")
            res[key] = {"triton": entry}
            log(key, "triton", entry)
            del x, dt, A, B, C, gy, y_ref, y
            torch.cuda.empty_cache()
        except Exception as e:
            traceback.print_exc()
            res[key] = {"triton": {"error": f"{type(e).__name__}: {str(e)[:300]}"}}
    json.dump(res, open(os.path.join(args.parts, f"ssd_torch{args.tag}.json"), "w"), indent=1)


# ----------------------------------------------------------------------------------- summary


def summary(args):
    res = {}
    parts = sorted(f for f in os.listdir(args.parts) if f.startswith(("ssd_jax", "ssd_torch")) and f.endswith(".json"))
    for part in parts:
        for k, v in json.load(open(os.path.join(args.parts, part))).items():
            if isinstance(v, dict):
                res.setdefault(k, {}).update(v)
            else:
                res.setdefault(k, v)
    ceil_tf = res.get("ceil_matmul_tflops") or CEIL_TFLOPS
    ceil_gb = res.get("ceil_copy_gbs") or CEIL_GBS
    lines = [f"device: {res.get('device')}  jax {res.get('jax')}  ceilings measured now: "
             f"{ceil_tf:.0f} TFLOP/s bf16 matmul, {ceil_gb:.0f} GB/s copy (workplace: {CEIL_TFLOPS:.0f}, {CEIL_GBS:.0f})",
             "median ms; H=64 P=64 N=128 g=1 bf16; check = rel L2 vs float32 xla reference (<= 2e-2 to be timed)"]
    impls = ["ours", "xla", "jla", "triton"]
    extra = sorted({n for k, v in res.items() if isinstance(v, dict) for n in v
                    if n.startswith("ours{") or n == "ours_f32"})
    for mode, label in (("fwd_ms", "forward"), ("fwdbwd_ms", "forward+backward")):
        lines.append("")
        lines.append(f"{label}:")
        hdr = f"{'b x L':>9} | " + " ".join(f"{n:>8}" for n in impls) + " | triton/ours jla/ours | ours TFLOP/s  GB/s  (%peak)"
        lines.append(hdr)
        for b, L in args.shapes:
            k = shape_key(b, L)
            r = res.get(k, {})
            ms = {n: r.get(n, {}).get(mode) for n in impls}
            cells = " ".join(f"{ms[n]:8.3f}" if ms[n] else f"{'-':>8}" for n in impls)
            ratio = lambda p: f"{ms[p] / ms['ours']:6.2f}" if ms[p] and ms["ours"] else f"{'-':>6}"  # noqa: E731
            perf = ""
            if ms["ours"]:
                tf = model_flops(b, L, mode == "fwdbwd_ms") / (ms["ours"] * 1e-3) / 1e12
                gb = model_bytes(b, L, mode == "fwdbwd_ms") / (ms["ours"] * 1e-3) / 1e9
                perf = f"{tf:8.1f} {gb:7.0f}  ({100 * tf / ceil_tf:4.1f}% / {100 * gb / ceil_gb:4.1f}%)"
            lines.append(f"{k:>9} | {cells} | {ratio('triton'):>11} {ratio('jla'):>8} | {perf}")
        for v in extra:
            row = " ".join(f"{res.get(shape_key(b, L), {}).get(v, {}).get(mode) or float('nan'):8.3f}"
                           for b, L in args.shapes)
            lines.append(f"  variant {v}: {row}")
    lines.append("")
    lines.append("checks (rel L2 vs reference):")
    for b, L in args.shapes:
        k = shape_key(b, L)
        r = res.get(k, {})
        cells = []
        for n in impls + extra:
            e = r.get(n, {})
            if "error" in e:
                cells.append(f"{n}=ERROR({e['error'][:60]})")
            elif "rel_err" in e:
                cells.append(f"{n}={e['rel_err']:.2e}{'' if e.get('check_ok') else ' FAIL'}")
        lines.append(f"  {k}: " + "  ".join(cells))
        ge = r.get("ours_grad_rel_err")
        if ge:
            lines.append(f"  {k}: ours gradients vs float32 xla: " + "  ".join(
                f"{n}={v:.2e}" if isinstance(v, float) else f"{n}={v}" for n, v in ge.items()))
    text = "\n".join(lines)
    print(text)
    open(os.path.join(args.out, "ssd_table.txt"), "w").write(text + "\n")
    json.dump(res, open(os.path.join(args.out, "ssd_bench.json"), "w"), indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "jax", "torch", "summary"], default="all")
    ap.add_argument("--impls", default="ours,xla,jla,triton")
    ap.add_argument("--shapes", default=",".join(shape_key(b, L) for b, L in SHAPES))
    ap.add_argument("--variants", nargs="*", default=[],
                    help='extra SSDBlockSizes for ours as JSON, e.g. \'{"gpu_stages": 2}\'')
    ap.add_argument("--seconds", type=float, default=0.5, help="target timing time per measurement")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "ssd_bench"))
    ap.add_argument("--tmp", default=os.path.join(tempfile.gettempdir(), "ssd_bench_inputs"))
    ap.add_argument("--parts", default=os.path.join(tempfile.gettempdir(), "ssd_bench_parts"),
                    help="folder for the per-process JSON parts")
    ap.add_argument("--tag", default="")
    ap.add_argument("--grad-check", default="", help="shapes (b x L, comma separated) whose gradients to check")
    ap.add_argument("--gpus", type=int, default=1, help="run the shapes on this many GPUs side by side")
    args = ap.parse_args()
    args.impls = set(args.impls.split(","))
    parse = lambda v: [tuple(int(t) for t in s.split("x")) for s in v.split(",") if s]  # noqa: E731
    args.shapes, args.grad_check = parse(args.shapes), parse(args.grad_check)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.parts, exist_ok=True)
    if args.part == "jax":
        run_jax(args)
    elif args.part == "torch":
        run_torch(args)
    elif args.part == "summary":
        summary(args)
    else:
        for f in os.listdir(args.parts):
            if f.startswith(("ssd_jax", "ssd_torch")):
                os.remove(os.path.join(args.parts, f))
        lanes = [[] for _ in range(max(1, args.gpus))]
        cost = lambda s: 1.0 + s[0] * s[1] / 65536  # compiles dominate small shapes  # noqa: E731
        for shp in sorted(args.shapes, key=cost, reverse=True):  # largest first, to the lightest lane
            min(lanes, key=lambda ln: sum(map(cost, ln))).append(shp)
        lanes = [ln for ln in lanes if ln]

        def cmd(i, lane, part):
            c = [sys.executable, os.path.abspath(__file__), "--impls", ",".join(sorted(args.impls)),
                 "--shapes", ",".join(shape_key(b, L) for b, L in lane), "--seconds", str(args.seconds),
                 "--out", args.out, "--tmp", args.tmp, "--parts", args.parts, "--tag", f"_{i}",
                 "--grad-check", ",".join(shape_key(b, L) for b, L in args.grad_check), "--part", part]
            return c + (["--variants", *args.variants] if args.variants else [])

        def run_lanes(part):
            procs = []
            for i, lane in enumerate(lanes):
                env = dict(os.environ)
                if len(lanes) > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(i)
                procs.append(subprocess.Popen(cmd(i, lane, part), env=env))
            for pr in procs:
                pr.wait()

        run_lanes("jax")
        if "triton" in args.impls:
            run_lanes("torch")
        summary(args)


if __name__ == "__main__":
    main()
