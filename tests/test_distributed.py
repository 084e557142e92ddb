"""The sharded trainer on fake CPU devices and on two processes: equality, restore, resume, signals."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = os.path.join(HERE, "small_config.py")


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _worker(tmp_path, scenario, *args, devices=8):
    out = str(tmp_path / f"{scenario}.json")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dist_worker.py"), scenario, out, *args],
                          env=_env(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.load(open(out))


def _train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "taipan_jax.train", f"--config={SMALL}", f"--workdir={workdir}", *overrides]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r}


def _final_params(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    tree = ocp.StandardCheckpointer().restore(path)
    return tree


@pytest.mark.parametrize("args", [
    ("never", "xla", "0"),  # XLA partitions the plain-JAX SSD
    ("always", "pallas_tpu", "1"),  # the Pallas TPU kernel (interpret mode) under jax.shard_map
], ids=["xla-partitioned", "pallas-shard_map"])
def test_mesh_2x2x2_matches_one_device(tmp_path, args):
    r = _worker(tmp_path, "equal", *args)
    assert r["n_devices"] == 8
    assert r["loss_rel"] <= 1e-5 and r["grad_rel_max"] <= 1e-5, r


def test_checkpoint_restores_onto_8_4_1_devices(tmp_path):
    r = _worker(tmp_path, "restore", str(tmp_path / "ckpt"))
    assert r["4"]["bitwise_equal"] and r["1"]["bitwise_equal"]
    assert len(r["4"]["devices"]) == 4 and len(r["1"]["devices"]) == 1
    assert r["4"]["step"] == r["1"]["step"] == 2
    assert r["4"]["loss_rel_vs_8"] <= 1e-5 and r["1"]["loss_rel_vs_8"] <= 1e-5


def test_mesh_and_batch_errors_are_named(tmp_path):
    r = _worker(tmp_path, "errors")
    assert "needs 3 devices, but 8 are available" in r["mesh"]
    assert "global_batch_size=4 is not divisible by the data-parallel size 8" in r["batch"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_and_share_checkpoints(tmp_path):
    mesh = ["--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2", "--config.mesh.shape.tensor=2",
            "--config.train.steps=4", "--config.checkpoint.every_steps=2"]
    single = tmp_path / "single"
    proc = subprocess.run(_train_cmd(single, *mesh), env=_env(8), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def launch(workdir, steps):
        port = _free_port()
        procs = [
            subprocess.Popen(
                _train_cmd(workdir, *mesh, f"--config.train.steps={steps}",
                           f"--config.distributed.coordinator_address=localhost:{port}",
                           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                env=_env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)
        ]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (o, e) in zip(procs, outs):
            assert p.returncode == 0, e[-3000:]
        return outs

    multi = tmp_path / "multi"
    outs = launch(multi, 4)
    assert "2 processes" in outs[0][0]
    one, two = _losses(single), _losses(multi)
    assert sorted(two) == sorted(one) == list(range(1, 5))
    for s in one:
        assert abs(one[s] - two[s]) <= 1e-5 * abs(one[s]), (s, one[s], two[s])
    assert sorted(os.listdir(multi / "checkpoints"), key=int)[-1] == "4"
    # Both processes restore the shared checkpoint and continue.
    outs = launch(multi, 5)
    assert "resumed from checkpoint step 4" in outs[0][0]
    assert max(_losses(multi)) == 5


def test_resume_after_kill_9_is_bitwise_identical(tmp_path):
    """k steps, kill -9, resume to N  ==  N steps straight (same device count), bit for bit."""
    from taipan_jax.checkpointing import Checkpointer

    horizon = "--config.train.schedule_steps=1000"  # the same LR schedule for every run below
    killed = tmp_path / "killed"
    p = subprocess.Popen(_train_cmd(killed, horizon, "--config.train.steps=1000"), env=_env(1), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(killed / "checkpoints" / "4" / "commit_success.txt"):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    k = Checkpointer(str(killed / "checkpoints"), async_save=False).latest_step()
    assert k is not None and k >= 4
    n = f"--config.train.steps={k + 4}"
    proc = subprocess.run(_train_cmd(killed, horizon, n), env=_env(1), capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from checkpoint step {k}" in proc.stdout
    straight = tmp_path / "straight"
    proc = subprocess.run(_train_cmd(straight, horizon, n), env=_env(1), capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final_params(straight, k + 4), _final_params(killed, k + 4)
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_kill_during_async_saves_leaves_a_usable_checkpoint(tmp_path):
    workdir = tmp_path / "wd"
    rng = np.random.RandomState(0)
    for attempt in range(2):
        p = subprocess.Popen(_train_cmd(workdir, "--config.train.steps=100000", "--config.checkpoint.every_steps=1"),
                             env=_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # Wait for training to run, then kill at a random moment (saves happen every step, async).
        for line in p.stdout:
            if line.startswith("step"):
                break
        time.sleep(rng.uniform(0.5, 2.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
    proc = subprocess.run(_train_cmd(workdir, "--config.train.steps=0"), env=_env(1), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint step" in proc.stdout


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
    workdir = tmp_path / "wd"
    p = subprocess.Popen(_train_cmd(workdir, "--config.train.steps=100000", "--config.checkpoint.every_steps=100000"),
                         env=_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith("step"):
            break
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0
    assert "SIGTERM: checkpoint saved at step" in out
    step = int(out.split("SIGTERM: checkpoint saved at step")[1].split(";")[0])
    assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()
