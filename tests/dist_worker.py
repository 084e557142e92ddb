"""Worker for tests/test_distributed.py: runs a scenario in a fresh process with fake CPU devices.

Usage: python tests/dist_worker.py SCENARIO OUT_JSON [args...]; XLA_FLAGS sets the device count.
"""

import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_config as small  # noqa: E402
from taipan_jax.checkpointing import Checkpointer  # noqa: E402
from taipan_jax.model_config import ModelConfig  # noqa: E402
from taipan_jax.training import Trainer, make_mesh  # noqa: E402


def small_config(**mamba):
    c = small.get_config()
    for k, v in mamba.items():
        setattr(c.model.mamba, k, v)
    return c


def batch_for(step, c):
    rs = np.random.RandomState(step)
    toks = rs.randint(3, 259, size=(c.train.global_batch_size, c.data.seq_len + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


def grads_on(mesh_shape, devices, c):
    cfg = ModelConfig.from_dict(c.model.to_dict())
    trainer = Trainer(cfg, c.train, make_mesh(mesh_shape, devices=devices), c.mesh.rules)
    state = trainer.init_state(0)
    batch = trainer.global_batch(batch_for(0, c))
    key = jax.random.key(1)
    with trainer._context():
        loss, metrics, grads = jax.jit(trainer._grads)(state["params"], batch, key, state["step"])
    return float(loss), jax.tree.map(np.asarray, grads)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def scenario_equal(out, shard_map_mode="never", impl="auto", interpret="0"):
    c = small_config(ssd_shard_map=shard_map_mode, ssd_impl=impl, ssd_interpret=interpret == "1")
    devs = jax.devices()
    loss8, g8 = grads_on({"data": 2, "fsdp": 2, "tensor": 2}, devs, c)
    loss1, g1 = grads_on({"data": 1, "fsdp": 1, "tensor": 1}, devs[:1], c)
    errs = jax.tree.leaves(jax.tree.map(rel, g8, g1))
    return {"loss8": loss8, "loss1": loss1, "loss_rel": abs(loss8 - loss1) / abs(loss1), "grad_rel_max": max(errs),
            "n_devices": len(devs)}


def scenario_restore(out, workdir):
    c = small_config()
    cfg = ModelConfig.from_dict(c.model.to_dict())
    devs = jax.devices()
    result = {}
    t8 = Trainer(cfg, c.train, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=devs), c.mesh.rules)
    state = t8.init_state(0)
    for step in range(2):
        state, _ = t8.train_step(state, batch_for(step, c), jax.random.key(step))
    ck = Checkpointer(workdir, async_save=True)
    ck.save(2, state, {"model_config": cfg.to_dict()}, force=True)
    ck.close()
    saved = jax.tree.map(np.asarray, state["params"])
    ref_state, ref_m = t8.train_step(state, batch_for(2, c), jax.random.key(2))
    for name, shape, d in (("4", {"data": 2, "fsdp": 2, "tensor": 1}, devs[:4]), ("1", {"data": 1, "fsdp": 1, "tensor": 1}, devs[:1])):
        t = Trainer(cfg, c.train, make_mesh(shape, devices=d), c.mesh.rules)
        ck = Checkpointer(workdir, async_save=False)
        restored, meta = ck.restore(t.abstract_state)
        ck.close()
        same = all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored["params"])))
        devices_used = {dev.id for x in jax.tree.leaves(restored["params"]) for dev in x.sharding.device_set}
        restored_step = int(restored["step"])  # before train_step, which donates (deletes) its input state
        new_state, m = t.train_step(restored, batch_for(2, c), jax.random.key(2))
        result[name] = {"bitwise_equal": same, "devices": sorted(devices_used), "step": restored_step,
                        "loss_rel_vs_8": abs(float(m["loss"]) - float(ref_m["loss"])) / abs(float(ref_m["loss"]))}
    return result


def scenario_errors(out):
    c = small_config()
    cfg = ModelConfig.from_dict(c.model.to_dict())
    errors = {}
    try:
        make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
    except ValueError as e:
        errors["mesh"] = str(e)
    from taipan_jax.train import run

    c.mesh.shape.data = 8
    c.train.global_batch_size = 4
    try:
        run(c, out + ".wd")
    except ValueError as e:
        errors["batch"] = str(e)
    return errors


def main():
    name, out, *args = sys.argv[1:]
    result = globals()[f"scenario_{name}"](out, *args)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
