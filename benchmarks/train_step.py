"""Train-step throughput and MFU on the local accelerator(s), several presets in one run.

    python benchmarks/train_step.py --configs=taipan_190m,mamba2_190m,transformer_pp_190m \
        --seq_len=4096 --batch_per_device=4 --steps=5 [--mesh=data=1,fsdp=1,tensor=1] [--remat=none]

For each preset: build the sharded trainer, compile the train step (timed), run warm-up steps,
then time ``--steps`` steps (device-synchronised). Prints tokens/s, tokens/s per device, MFU
(analytic FLOPs per token from taipan_jax/flops.py over the chip's dense bf16 peak) and peak memory;
writes JSON to ``--out``. Random tokens: throughput does not depend on the data.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from taipan_jax.flops import peak_tflops, train_flops_per_token  # noqa: E402
from taipan_jax.model_config import ModelConfig  # noqa: E402
from taipan_jax.training import Trainer, make_mesh  # noqa: E402


def parse_mesh(text: str) -> dict:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


def bench_one(name: str, args) -> dict:
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.remat = args.remat
    if args.ssd_impl:
        config.model.mamba.ssd_impl = args.ssd_impl
    if args.sal_attention:
        config.model.sal.attention = args.sal_attention
    cfg = ModelConfig.from_dict(config.model.to_dict())
    mesh = make_mesh(parse_mesh(args.mesh))
    n = mesh.size
    config.train.global_batch_size = args.batch_per_device * n
    config.data.seq_len = args.seq_len
    trainer = Trainer(cfg, config.train, mesh, config.mesh.rules)
    state = trainer.init_state(0)
    rng = np.random.default_rng(0)
    toks = rng.integers(3, cfg.vocab_size, size=(config.train.global_batch_size, args.seq_len + 1), dtype=np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    key = jax.random.key(0)
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, batch, key)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        state, m = trainer.train_step(state, batch, key)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = trainer.train_step(state, batch, key)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = config.train.global_batch_size * args.seq_len
    tps = tokens / step_s
    fpt = train_flops_per_token(cfg, args.seq_len)
    peak = peak_tflops(jax.devices()[0].device_kind)
    mem = jax.devices()[0].memory_stats() or {}
    return {
        "config": name, "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"])),
        "mesh": dict(mesh.shape), "devices": n, "global_batch": config.train.global_batch_size,
        "seq_len": args.seq_len, "remat": args.remat, "compile_s": compile_s, "step_ms": step_s * 1e3,
        "tokens_per_s": tps, "tokens_per_s_per_device": tps / n, "gflop_per_token": fpt / 1e9,
        "mfu": (tps * fpt / (peak * 1e12 * n)) if peak else None, "loss": float(m["loss"]),
        "peak_mem_gib": mem.get("peak_bytes_in_use", 0) / 2**30,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="taipan_190m,mamba2_190m,transformer_pp_190m")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--batch_per_device", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1")
    p.add_argument("--remat", default="none")
    p.add_argument("--ssd_impl", default="")
    p.add_argument("--sal_attention", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    print(f"devices: {jax.devices()}", flush=True)
    rows = []
    for name in args.configs.split(","):
        try:
            row = bench_one(name, args)
        except Exception as e:  # report and continue (e.g. out of memory at this batch size)
            row = {"config": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        jax.clear_caches()
    print(f"\n{'config':24s} {'dev':>3s} {'batch':>5s} {'step ms':>9s} {'tok/s':>10s} {'tok/s/dev':>10s} {'MFU':>6s} {'mem GiB':>8s} {'compile s':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:24s} ERROR {r['error'][:90]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['config']:24s} {r['devices']:3d} {r['global_batch']:5d} {r['step_ms']:9.1f} {r['tokens_per_s']:10,.0f} "
              f"{r['tokens_per_s_per_device']:10,.0f} {mfu:>6s} {r['peak_mem_gib']:8.1f} {r['compile_s']:9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
