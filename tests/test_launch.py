"""Launching at scale: launch_check rules, the launch scripts' dry runs and failures, compile_check.

No cloud tool is needed: every script runs with a PATH that has none of gcloud / xpk / srun /
sbatch (dry runs warn, real runs fail naming the tool), or with a stub gcloud that logs its calls.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASH = "/bin/bash"
GS = "gs://bucket/runs/r1"


def _load(path, **overrides):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


def _script(tmp_path, script, *args, path=None, env=None):
    """Run a launch script with a PATH of only ``path`` (default: an empty directory)."""
    if path is None:
        path = tmp_path / "empty_bin"
        path.mkdir(exist_ok=True)
    e = {"PATH": str(path), "HOME": str(tmp_path), "TAIPAN_PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    e.update(env or {})
    return subprocess.run([BASH, os.path.join(ROOT, "launch", script), *args], env=e, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120)


def _commands(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


# -- launch_check ------------------------------------------------------------------------------
def test_tpu_accelerator_types():
    from taipan_jax.launch_check import parse_tpu

    cases = {  # name: (JAX devices, chips, hosts, libtpu topology)
        "v5litepod-256": (256, 256, 64, "v5e:16x16"),
        "v5e-256": (256, 256, 64, "v5e:16x16"),
        "v5litepod-8": (8, 8, 1, "v5e:2x4"),
        "v6e-64": (64, 64, 16, "v6e:8x8"),
        "v4-32": (16, 16, 4, "v4:2x2x4"),  # v4 / v5p names count TensorCores
        "v4-8": (4, 4, 1, "v4:2x2x1"),
        "v5p-128": (64, 64, 16, "v5p:4x4x4"),
        "v3-32": (32, 16, 4, "v3:4x4"),  # v2 / v3: every TensorCore is a device
    }
    for name, (devices, chips, hosts, topo) in cases.items():
        t = parse_tpu(name)
        assert (t.devices, t.chips, t.hosts, t.topology) == (devices, chips, hosts, topo), name
    for bad in ("v5litepod", "v9-8", "v4-12", "v4-4", "tpu-256"):
        with pytest.raises(ValueError):
            parse_tpu(bad)


def test_hbm_table_matches_jax_tpu_info():
    tpu_info = pytest.importorskip("jax._src.tpu_info")
    from taipan_jax.launch_check import HBM_BYTES

    C = tpu_info.ChipVersion
    for gen, chip, cores in (("v4", C.TPU_V4, 2), ("v5e", C.TPU_V5E, 1), ("v5p", C.TPU_V5P, 2), ("v6e", C.TPU_V6E, 1)):
        info = tpu_info.get_tpu_info_for_chip(chip, cores)
        assert HBM_BYTES[gen] == info.hbm_capacity_bytes * cores, gen  # per JAX device (megacore chip)


def test_check_rules():
    from taipan_jax.launch_check import LaunchCheckError, check, resolve_mesh

    assert resolve_mesh({"data": -1, "fsdp": 4, "tensor": 2}, 64) == {"data": 8, "fsdp": 4, "tensor": 2}
    with pytest.raises(LaunchCheckError, match="do not divide the target's 256 devices"):
        resolve_mesh({"data": -1, "fsdp": 1, "tensor": 3}, 256)
    with pytest.raises(LaunchCheckError, match="needs 16 devices, but the target has 32"):
        resolve_mesh({"data": 4, "fsdp": 4, "tensor": 1}, 32)
    cfg = _load("configs/tiny.py")
    res = check(cfg, 8)
    assert res.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(LaunchCheckError) as e:  # every problem at once
        check(_load("configs/tiny.py", **{"train.global_batch_size": 12, "train.eval_batch_size": 6}), 8,
              processes=4)
    msg = "\n".join(e.value.errors)
    assert "global_batch_size=12 is not divisible by the data-parallel size 8" in msg
    assert "eval_batch_size=6 is not divisible by the data-parallel size 8" in msg
    assert "eval_batch_size=6 is not divisible by the 4 processes" in msg
    with pytest.raises(LaunchCheckError, match="grad_accum_steps 2 = 16"):
        check(_load("configs/tiny.py", **{"train.grad_accum_steps": 2, "train.global_batch_size": 8}), 8)
    warn = check(_load("configs/tiny.py", **{"mesh.shape.tensor": 8, "mesh.shape.data": 1,
                                             "train.eval_batch_size": 8}), 8).warnings
    assert any("tensor=8 does not divide" in w for w in warn)


# -- the scripts' dry runs --------------------------------------------------------------------
def test_tpu_pod_dry_run(tmp_path):
    r = _script(tmp_path, "tpu_pod.sh", "--name=taipan-v5e", "--zone=us-west4-a", "--accelerator=v5litepod-256",
                "--config=configs/taipan_1_3b.py", f"--workdir={GS}", "--config.mesh.shape.fsdp=16",
                "--config.train.global_batch_size=256", "--config.train.eval_batch_size=256", "--dry-run",
                "--teardown")
    assert r.returncode == 0, r.stderr
    assert "tpu_pod.sh: warning: gcloud not found on PATH" in r.stderr
    assert "launch_check: mesh: data=16 fsdp=16 tensor=1" in r.stdout
    cmds = _commands(r.stdout)
    assert any(c.startswith("gcloud compute tpus tpu-vm describe taipan-v5e --zone=us-west4-a") for c in cmds)
    assert any(c.startswith("gcloud compute tpus tpu-vm create taipan-v5e") and "--accelerator-type=v5litepod-256"
               in c and "--version=v2-alpha-tpuv5-lite" in c for c in cmds)
    assert any("--worker=all" in c and "setup_venv.sh" in c and "jax[tpu]==" in c for c in cmds)
    train = [c for c in cmds if "taipan_jax.train" in c]
    assert len(train) == 1 and "--worker=all" in train[0] and f"--workdir={GS}" in train[0]
    assert "--config.mesh.shape.fsdp=16" in train[0] and "--config.distributed.initialize=always" in train[0]
    assert cmds[-1] == "gcloud compute tpus tpu-vm delete taipan-v5e --zone=us-west4-a --quiet"
    assert "nothing was created" in r.stdout


def test_xpk_dry_run(tmp_path):
    r = _script(tmp_path, "xpk_example.sh", "--cluster=c1", "--workload=taipan-1", "--tpu-type=v5litepod-16",
                "--num-slices=2", "--config=configs/taipan_190m.py", f"--workdir={GS}",
                "--config.train.eval_batch_size=32", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "xpk_example.sh: warning: xpk not found on PATH" in r.stderr
    assert "32 devices, 8 process(es)" in r.stdout  # 2 slices x 16 chips, 4 hosts each
    (cmd,) = _commands(r.stdout)
    assert cmd.startswith("xpk workload create --cluster=c1 --workload=taipan-1 --tpu-type=v5litepod-16 --num-slices=2")
    assert "taipan_jax.train --config=configs/taipan_190m.py" in cmd and "jax[tpu]==" in cmd


def test_slurm_dry_run(tmp_path):
    r = _script(tmp_path, "slurm_gpu.sbatch", "--config=configs/taipan_1_3b.py", "--workdir=/shared/runs/r1",
                "--config.mesh.shape.fsdp=8", "--config.train.eval_batch_size=32", env={"DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert "slurm_gpu.sbatch: warning: sbatch not found on PATH" in r.stderr
    assert "32 devices, 32 process(es)" in r.stdout and "mesh: data=4 fsdp=8 tensor=1" in r.stdout
    submit, srun = _commands(r.stdout)
    assert "sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8" in submit and "--dry-run" not in submit
    assert srun.startswith("srun --nodes=4 --ntasks=32 --ntasks-per-node=8")
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in srun and "NCCL_DEBUG=WARN" in srun
    assert "-m taipan_jax.train --config=configs/taipan_1_3b.py --workdir=/shared/runs/r1" in srun
    # Inside an allocation (SLURM's environment): the node count comes from it, no submission.
    r = _script(tmp_path, "slurm_gpu.sbatch", "--dry-run", "--config=configs/tiny.py", "--workdir=/shared/r",
                env={"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"})
    assert r.returncode == 0, r.stderr
    assert "srun not found on PATH" in r.stderr
    (srun,) = _commands(r.stdout)
    assert srun.startswith("srun --nodes=2 --ntasks=8 --ntasks-per-node=4")


def test_dry_runs_fail_on_mismatched_mesh_and_batch(tmp_path):
    r = _script(tmp_path, "tpu_pod.sh", "--name=n", "--zone=z", "--accelerator=v5litepod-16",
                "--config=configs/tiny.py", f"--workdir={GS}", "--config.mesh.shape.data=4",
                "--config.mesh.shape.fsdp=2", "--dry-run")
    assert r.returncode == 1
    assert "needs 8 devices, but the target has 16" in r.stderr and "nothing was created" in r.stderr
    assert not _commands(r.stdout)
    r = _script(tmp_path, "slurm_gpu.sbatch", "--dry-run", "--nodes=2", "--gpus-per-node=8",
                "--config=configs/tiny.py", "--workdir=/shared/r", "--config.train.global_batch_size=24")
    assert r.returncode == 1
    assert "global_batch_size=24 is not divisible by the data-parallel size 16" in r.stderr
    r = _script(tmp_path, "xpk_example.sh", "--cluster=c", "--workload=w", "--tpu-type=v4-32",
                "--config=configs/tiny.py", f"--workdir={GS}", "--config.mesh.shape.tensor=3", "--dry-run")
    assert r.returncode == 1 and "fixed axes (tensor=3 = 3) do not divide the target's 16 devices" in r.stderr


def test_missing_tools_are_named(tmp_path):
    common = ["--config=configs/tiny.py"]
    r = _script(tmp_path, "tpu_pod.sh", "--name=n", "--zone=z", "--accelerator=v5e-8", *common, f"--workdir={GS}")
    assert r.returncode == 1 and "tpu_pod.sh: error: gcloud not found on PATH" in r.stderr
    r = _script(tmp_path, "xpk_example.sh", "--cluster=c", "--workload=w", "--tpu-type=v5e-8", *common,
                f"--workdir={GS}")
    assert r.returncode == 1 and "xpk_example.sh: error: xpk not found on PATH" in r.stderr
    r = _script(tmp_path, "slurm_gpu.sbatch", *common, "--workdir=/shared/r")
    assert r.returncode == 1 and "slurm_gpu.sbatch: error: sbatch not found on PATH" in r.stderr
    r = _script(tmp_path, "slurm_gpu.sbatch", *common, "--workdir=/shared/r", env={"SLURM_JOB_ID": "7"})
    assert r.returncode == 1 and "slurm_gpu.sbatch: error: srun not found on PATH" in r.stderr


def test_tpu_pod_runs_the_printed_commands(tmp_path):
    """A real (non-dry) run against a stub gcloud that logs its calls: the same commands, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    stub = bin_dir / "gcloud"
    stub.write_text(f'#!{BASH}\nprintf "%s\\n" "$*" >> {log}\n[ "$4" = describe ] && exit 1\nexit 0\n')
    stub.chmod(0o755)
    os.symlink("/bin/mkdir", bin_dir / "mkdir")
    r = _script(tmp_path, "tpu_pod.sh", "--name=n1", "--zone=z1", "--accelerator=v5e-8", "--config=configs/tiny.py",
                f"--workdir={GS}", "--repo=https://example.com/taipan_jax.git@main", "--teardown", path=bin_dir)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[:4] for c in calls] == [
        ["compute", "tpus", "tpu-vm", "describe"], ["compute", "tpus", "tpu-vm", "create"],
        ["compute", "tpus", "tpu-vm", "ssh"], ["compute", "tpus", "tpu-vm", "ssh"], ["compute", "tpus", "tpu-vm", "ssh"],
        ["compute", "tpus", "tpu-vm", "ssh"], ["storage", "cp", "-r", f"{GS}/logs/*"],
        ["compute", "tpus", "tpu-vm", "delete"],
    ]
    assert "git clone https://example.com/taipan_jax.git ~/taipan_jax" in calls[2] and "checkout main" in calls[2]
    assert "taipan_jax.train" in calls[4]
    assert len(_commands(r.stdout)) == len(calls) + 1  # + the local mkdir of the logs directory


# -- memory estimate and compile_check -----------------------------------------------------------
def test_estimate_params_are_exact_and_shard():
    from taipan_jax.memory_estimate import estimate

    cfg = _load("configs/tiny.py")
    n_params = 914_404  # docs/models.md
    full = estimate(cfg, {"data": 8, "fsdp": 1, "tensor": 1})
    assert full.params == 4 * n_params and full.optimizer == 8 * n_params
    sharded = estimate(cfg, {"data": 1, "fsdp": 8, "tensor": 1})
    assert sharded.params < full.params / 4  # most weights shard their embed axis over fsdp
    remat = estimate(_load("configs/tiny.py", **{"model.remat": "full"}), {"data": 8, "fsdp": 1, "tensor": 1})
    assert remat.activations < full.activations / 2
    assert any("remat=full" in a for a in remat.assumptions)


# launch/setup_venv.sh installs libtpu (compile-only TPU topologies) into its own folder, kept off
# the test process's path so that no other test's JAX looks for a TPU; only these subprocesses see it.
LIBTPU_DIR = os.environ.get("TAIPAN_LIBTPU_DIR") if os.path.isdir(os.environ.get("TAIPAN_LIBTPU_DIR", "")) else ""


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (ROOT, LIBTPU_DIR, os.environ.get("PYTHONPATH", "")) if p)


def _compile_check(tmp_path, *args, env=None):
    out = tmp_path / "report.json"
    e = dict(os.environ, PYTHONPATH=_pythonpath())
    e.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile for real: the memory report is what is tested
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "taipan_jax.compile_check", *args, f"--json={out}"], env=e,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    return r, (json.loads(out.read_text()) if out.exists() else None)


def test_compile_check_taipan_190m_on_8_cpu_devices(tmp_path):
    """The real train step of the 190M preset, compiled for 8 fake CPU devices (1 x 256 tokens each).

    The analytic estimate is within 15% of the buffers XLA allocates here (measured 1.062; the
    state, 2.1 GiB, is exact; docs/launch.md lists the ratios of the other configs)."""
    r, rep = _compile_check(tmp_path, "--config=configs/taipan_190m.py", "--topology=cpu:8",
                            "--config.data.seq_len=256", "--config.train.global_batch_size=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled (XLA, per device" in r.stdout and "estimate / compiled allocation" in r.stdout
    mem = rep["compiled"]
    assert mem["arguments"] >= 187_520_022 * 12  # params + AdamW mu, nu (f32), replicated over data=8
    assert mem["aliased"] >= 187_520_022 * 12  # the state is donated
    assert mem["peak"] > mem["arguments"] + mem["temporaries"] - 1
    assert abs(mem["allocated"] - mem["peak"]) < 2**20  # XLA:CPU: no code on the device, one temporary heap
    assert 0.85 <= rep["ratio"] <= 1.15, rep["ratio"]
    assert rep["fits"] is None  # no capacity for CPU devices unless --hbm_gib


def test_compile_check_tiny_on_8_cpu_devices(tmp_path):
    """tiny (2 x 256 tokens per device, f32): the activations dominate, and with them the backward of
    one group (XLA:CPU copies the group's residual slices), which the estimate counts (measured 1.069)."""
    r, rep = _compile_check(tmp_path, "--config=configs/tiny.py", "--topology=cpu:8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert 0.85 <= rep["ratio"] <= 1.15, rep["ratio"]


def test_estimate_models_the_target_compiler():
    """The platform-specific terms: XLA:CPU's copies of the donated moments, XLA:TPU's VMEM and lanes."""
    from taipan_jax.memory_estimate import estimate, tpu_vmem_bytes

    cfg = _load("configs/tiny.py")
    mesh = {"data": 4, "fsdp": 1, "tensor": 1}
    cpu = estimate(cfg, mesh, platform="cpu")
    tpu = estimate(cfg, mesh, platform="tpu", tpu_generation="v5e")
    gpu = estimate(cfg, mesh, platform="gpu")
    assert cpu.state_copies == cpu.optimizer and tpu.state_copies == gpu.state_copies == 0
    assert tpu_vmem_bytes("v5e") == 112 * 2**20 and tpu.vmem == 112 * 2**20 and gpu.vmem == 0
    # tiny's 64-long SSD chunks are padded to 128 lanes on TPU: the chunk matrices double.
    assert tpu.activations > gpu.activations
    assert tpu.total == tpu.state + tpu.activations + tpu.weight_copies + max(tpu.backward, tpu.loss_head) - tpu.vmem
    # 2 x 128 tokens per chip fit in v5e's VMEM: only the optimizer update's temporaries are left in HBM.
    small = estimate(_load("configs/tiny.py", **{"data.seq_len": 128, "train.global_batch_size": 8}), mesh,
                     platform="tpu", tpu_generation="v5e")
    assert small.temporaries == small.update
    with pytest.raises(ValueError):
        estimate(cfg, mesh, platform="ipu")


def test_compile_check_gpu_target_estimates_without_a_gpu(tmp_path):
    r, rep = _compile_check(tmp_path, "--config=configs/taipan_1_3b.py", "--topology=h100:32",
                            "--config.mesh.shape.fsdp=8", "--config.train.eval_batch_size=32",
                            "--config.train.global_batch_size=32", "--config.model.remat=full")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert rep["compiled"] is None and "compile: skipped" in r.stdout
    assert rep["capacity"] == 80 * 2**30 and rep["fits"] is True
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in r.stdout
    # Without FSDP and remat on 16 GiB v5e chips: the state alone is 1.29e9 x 12 bytes.
    r, rep = _compile_check(tmp_path, "--config=configs/taipan_1_3b.py", "--topology=v5e-8", "--estimate_only",
                            "--config.train.global_batch_size=8", "--config.train.eval_batch_size=8")
    assert r.returncode == 1 and rep["fits"] is False and "DOES NOT FIT" in r.stdout


def _libtpu_available() -> bool:
    return (importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))
            or bool(LIBTPU_DIR))


@pytest.mark.skipif(not _libtpu_available(), reason=(
    "libtpu is not installed: compiling for a TPU slice needs it (pip install 'libtpu==0.0.48.*', the "
    "version jax[tpu] 0.11.2 pins); with it this compiles for v5e-4 on this CPU machine (docs/launch.md)"))
def test_compile_check_tpu_v5e_slice(tmp_path):
    # libtpu's compile-only topologies agree with launch_check's device and host counts.
    code = ("from taipan_jax import compile_check as cc\n"
            "for s in ['v5e-256', 'v5litepod-8', 'v4-32', 'v5p-16', 'v6e-16']:\n"
            "    t = cc.parse_target(s); cc._prepare_environment(t); d, why = cc.target_devices(t)\n"
            "    assert d is not None, why\n"
            "    assert (len(d), len({x.process_index for x in d})) == (t.devices, t.processes), s\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=_pythonpath()))
    assert r.returncode == 0, r.stderr[-3000:]
    r, rep = _compile_check(tmp_path, "--config=configs/tiny.py", "--topology=v5e-4", "--config.data.seq_len=128",
                            "--config.train.global_batch_size=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["compiled"]["peak"] > 0 and rep["fits"] is True
    assert rep["capacity"] == 17_200_000_000
