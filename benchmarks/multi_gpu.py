"""Several GPUs of one host: loss agreement with 1 GPU, N->1 checkpoint restore, scaling efficiency.

    python benchmarks/multi_gpu.py --config=taipan_450m --seq_len=4096 --global_batch=8 --steps=4

Runs the same ``--steps`` batches (fixed global batch, random tokens) on 1 GPU and on every mesh
of the local GPUs: pure data parallel, FSDP, tensor parallel (and FSDP x tensor with >= 4 GPUs).
Reports each mesh's losses against the 1-GPU run, tokens/s per GPU and strong-scaling efficiency
(tokens/s per GPU on N GPUs over tokens/s on 1 GPU, same global batch), then saves a checkpoint on
the FSDP mesh and restores it on 1 GPU to continue a step. Set NCCL_NVLS_ENABLE=0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from taipan_jax.checkpointing import Checkpointer  # noqa: E402
from taipan_jax.model_config import ModelConfig  # noqa: E402
from taipan_jax.training import Trainer, make_mesh  # noqa: E402


def batches(n, global_batch, seq_len, vocab):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        t = rng.integers(3, vocab, size=(global_batch, seq_len + 1), dtype=np.int32)
        out.append({"inputs": t[:, :-1], "targets": t[:, 1:]})
    return out


def run_mesh(cfg, config, shape, devices, data, timed_steps):
    trainer = Trainer(cfg, config.train, make_mesh(shape, devices=devices), config.mesh.rules)
    state = trainer.init_state(0)
    losses, times = [], []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        state, m = trainer.train_step(state, b, jax.random.key(i))
        losses.append(float(m["loss"]))  # synchronises
        times.append(time.perf_counter() - t0)
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        state, m = trainer.train_step(state, data[-1], jax.random.key(0))
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return trainer, state, losses, float(np.median(times[len(data):])) if timed_steps else float(np.median(times[1:]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="taipan_450m")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timed_steps", type=int, default=5)
    p.add_argument("--remat", default="full")
    p.add_argument("--ssd_impl", default="", help="override model.mamba.ssd_impl (e.g. xla)")
    p.add_argument("--only", default="", help="comma-separated mesh names to run (default: all)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    devs = jax.devices()
    n = len(devs)
    print(f"{n} devices: {[d.device_kind for d in devs]}", flush=True)
    config = importlib.import_module(f"configs.{args.config}").get_config()
    config.model.remat = args.remat
    if args.ssd_impl:
        config.model.mamba.ssd_impl = args.ssd_impl
    config.train.global_batch_size = args.global_batch
    config.data.seq_len = args.seq_len
    cfg = ModelConfig.from_dict(config.model.to_dict())
    data = batches(args.steps, args.global_batch, args.seq_len, cfg.vocab_size)
    tokens = args.global_batch * args.seq_len

    meshes = {"1 GPU": ({"data": 1, "fsdp": 1, "tensor": 1}, devs[:1])}
    meshes[f"data={n}"] = ({"data": n, "fsdp": 1, "tensor": 1}, devs)
    meshes[f"fsdp={n}"] = ({"data": 1, "fsdp": n, "tensor": 1}, devs)
    meshes[f"tensor={n}"] = ({"data": 1, "fsdp": 1, "tensor": n}, devs)
    if n >= 4:
        meshes[f"fsdp={n // 2} x tensor=2"] = ({"data": 1, "fsdp": n // 2, "tensor": 2}, devs)
    if args.only:
        wanted = {"1 GPU", *args.only.split(",")}
        meshes = {k: v for k, v in meshes.items() if k in wanted}
    rows, base = [], None
    keep = {}
    for name, (shape, d) in meshes.items():
        t0 = time.perf_counter()
        trainer, state, losses, step_s = run_mesh(cfg, config, shape, d, data, args.timed_steps)
        row = {"mesh": name, "devices": len(d), "losses": losses, "step_ms": step_s * 1e3,
               "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / len(d),
               "wall_s": time.perf_counter() - t0}
        if base is None:
            base = row
        row["max_loss_rel_vs_1gpu"] = max(abs(a - b) / abs(b) for a, b in zip(losses, base["losses"]))
        row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if len(d) > 1 else 1.0
        rows.append(row)
        print(json.dumps(row), flush=True)
        if name.startswith("1 GPU") or name.startswith("fsdp="):
            keep[name] = (trainer, state)
        jax.clear_caches()

    # Save on the FSDP mesh, restore on 1 GPU, continue one step on both.
    tr_n, st_n = keep[f"fsdp={n}"]
    tr_1, _ = keep["1 GPU"]
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(d)
        ck.save(int(st_n["step"]), st_n, {"model_config": cfg.to_dict()}, force=True)
        ck.close()
        restored, _ = Checkpointer(d).restore(tr_1.abstract_state)
    restored_step = int(restored["step"])  # read before the donating train step consumes it
    _, m_n = tr_n.train_step(st_n, data[0], jax.random.key(99))
    _, m_1 = tr_1.train_step(restored, data[0], jax.random.key(99))
    restore = {"restored_step": restored_step, "loss_after_restore_1gpu": float(m_1["loss"]),
               "loss_same_step_on_n": float(m_n["loss"]),
               "rel": abs(float(m_1["loss"]) - float(m_n["loss"])) / abs(float(m_n["loss"]))}
    print(json.dumps({"restore": restore}), flush=True)

    print(f"\n{args.config} seq {args.seq_len} global batch {args.global_batch} remat {args.remat}")
    print(f"{'mesh':22s} {'step ms':>9s} {'tok/s':>10s} {'tok/s/GPU':>10s} {'scaling':>8s} {'max loss rel':>12s}")
    for r in rows:
        print(f"{r['mesh']:22s} {r['step_ms']:9.1f} {r['tokens_per_s']:10,.0f} {r['tokens_per_s_per_gpu']:10,.0f} "
              f"{r['scaling_efficiency']:8.1%} {r['max_loss_rel_vs_1gpu']:12.2e}")
    print(f"checkpoint fsdp={n} -> 1 GPU: step {restore['restored_step']}, next loss {restore['loss_after_restore_1gpu']:.5f}"
          f" vs {restore['loss_same_step_on_n']:.5f} on {n} GPUs (rel {restore['rel']:.1e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "restore": restore}, f, indent=1)


if __name__ == "__main__":
    main()
