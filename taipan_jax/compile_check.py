"""Compile the real train step ahead of time for a target and report its per-device memory.

    python -m taipan_jax.compile_check --config=configs/X.py --topology=TARGET [--config.a.b=v ...]

TARGET is one of

* ``cpu:N`` — N host-platform CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``
  is set before jax starts): always compiles; CI runs it.
* a TPU slice — an accelerator type (``v5e-256``, ``v5litepod-256``, ``v6e-64``, ``v4-32``,
  ``v5p-128``; see ``taipan_jax.launch_check`` for the device counts) or a libtpu topology name
  (``v5e:16x16``, ``v4:2x2x4``). Compiling for it needs libtpu (``pip install 'jax[tpu]'``, or just
  ``libtpu`` matching jax) but no TPU: ``jax.experimental.topologies.get_topology_desc`` builds
  compile-only devices. Without libtpu only the analytic estimate is printed.
* a GPU node set — ``gpu:N`` (H100), ``h100:N``, ``h200:N``, ``a100:N``: the analytic estimate
  (compiling for a GPU needs the CUDA plugin and, in this jax, a GPU to describe the target).

Steps: ``launch_check`` (mesh vs devices, batch divisibility), the analytic estimate
(``taipan_jax.memory_estimate``), then ``Trainer._train_step.lower(abstract state, batch,
key).compile().memory_analysis()`` on a mesh of the target's devices, printed beside the estimate
with their ratio (to the buffers XLA allocates, see :func:`compiled_memory`) and the peak against the
chip's memory. Exit status: 0 fits (or no capacity known),
1 does not fit / config invalid, 2 usage error. ``--json=PATH`` writes the numbers.

Kernels chosen with ``impl="auto"`` resolve on *this* host's backend, so a TPU compile from a CPU
machine compiles the ``xla`` implementations; pass ``--config.model.mamba.ssd_impl=pallas_tpu`` to
compile the Pallas kernels instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

GiB = 1024**3

_GPUS = {"gpu": ("h100", "NVIDIA H100"), "h100": ("h100", "NVIDIA H100"), "h200": ("h200", "NVIDIA H200"),
         "a100": ("a100", "NVIDIA A100 80GB")}


@dataclasses.dataclass
class Target:
    spec: str
    platform: str  # cpu | tpu | gpu
    devices: int
    processes: int
    description: str
    hbm_bytes: int | None = None
    tpu_topology: str | None = None  # libtpu topology name
    tpu_accelerator: str | None = None
    tpu_kwargs: dict | None = None  # get_topology_desc's chip_config_name, chips_per_host_bounds


def parse_target(spec: str) -> Target:
    """``cpu:8`` / ``gpu:8`` / ``h200:16`` / ``v5e-256`` / ``v5e:16x16`` -> :class:`Target`."""
    from taipan_jax.launch_check import _TPU, _TPU_ALIASES, parse_tpu

    s = spec.strip().lower()
    m = re.fullmatch(r"(cpu|gpu|h100|h200|a100):(\d+)", s)
    if m:
        n = int(m.group(2))
        if n <= 0:
            raise ValueError(f"--topology={spec}: the device count must be positive")
        if m.group(1) == "cpu":
            return Target(spec, "cpu", n, 1, f"{n} CPU devices (this host)")
        from taipan_jax.launch_check import HBM_BYTES

        key, name = _GPUS[m.group(1)]
        return Target(spec, "gpu", n, n, f"{n} x {name} (one process per GPU)", HBM_BYTES[key])
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", s)
    if m:  # a libtpu topology name, e.g. v5e:16x16
        gen = _TPU_ALIASES.get(m.group(1), m.group(1))
        if gen not in _TPU:
            raise ValueError(f"--topology={spec}: unknown TPU generation {m.group(1)!r}")
        chips = 1
        for x in m.group(2).split("x"):
            chips *= int(x)
        cores = chips * 2 if gen in ("v2", "v3", "v4", "v5p") else chips
        tpu = parse_tpu(f"{gen}-{cores}")
        kwargs = tpu.topology_kwargs
        if tpu.hosts == 1:
            kwargs["chips_per_host_bounds"] = tuple(int(x) for x in (m.group(2).split("x") + ["1", "1"])[:3])
        return Target(spec, "tpu", tpu.devices, tpu.hosts,
                      f"TPU {gen} topology {m.group(2)} ({tpu.device_kind}, {tpu.devices} devices, {tpu.hosts} hosts)",
                      tpu.hbm_bytes, f"{gen}:{m.group(2)}", tpu.name, kwargs)
    tpu = parse_tpu(s)
    return Target(spec, "tpu", tpu.devices, tpu.hosts,
                  f"{tpu.name} ({tpu.device_kind}, {tpu.chips} chips, {tpu.devices} devices, {tpu.hosts} hosts)",
                  tpu.hbm_bytes, tpu.topology, tpu.name, tpu.topology_kwargs)


def _prescan_topology(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--topology="):
            return a.split("=", 1)[1]
        if a == "--topology" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _prepare_environment(target: Target) -> bool:
    """Set up jax's environment before it starts; False if this process must be re-executed."""
    if target.platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={target.devices}".strip()
    # CPU and TPU targets are host or compile-only devices: never start an accelerator for them.
    # (A GPU target may use this host's GPUs if it has enough.)
    if target.platform != "gpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if target.platform == "tpu":
        # libtpu looks for a Cloud TPU VM's metadata; tell it this is a single host without one.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.tpu_accelerator or "")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_WORKER_ID", "0")
        # libtpu takes /tmp/libtpu_lockfile for a process that owns TPU chips; compile-only
        # topologies own none, so several compiles (and other libtpu users) may run at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "jax" not in sys.modules:
        return True
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        import jax

        if target.platform == "cpu":
            jax.config.update("jax_num_cpu_devices", target.devices)
        return True
    import jax

    return target.platform != "cpu" or len(jax.devices("cpu")) >= target.devices


def target_devices(target: Target):
    """The target's (possibly compile-only) devices, or ``(None, reason)``."""
    import jax

    if target.platform == "cpu":
        devs = jax.devices("cpu")
        if len(devs) < target.devices:
            return None, f"only {len(devs)} CPU devices in this process (XLA_FLAGS was set too late)"
        return devs[: target.devices], None
    if target.platform == "tpu":
        try:
            from jax.experimental import topologies

            topo = topologies.get_topology_desc(target.tpu_topology, "tpu", **(target.tpu_kwargs or {}))
        except Exception as e:  # noqa: BLE001 - report whatever libtpu says
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return None, f"no TPU compiler here ({type(e).__name__}: {msg}); install libtpu to compile for TPU"
        devs = list(topo.devices)
        if len(devs) != target.devices:
            return None, f"libtpu topology {target.tpu_topology} has {len(devs)} devices, expected {target.devices}"
        return devs, None
    try:  # this host's GPUs, if it has enough
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if len(gpus) >= target.devices:
        return gpus[: target.devices], None
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="cuda")
        return list(topo.devices), None
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, (f"this host has {len(gpus)} GPUs and no compiler for a compile-only GPU target "
                      f"({type(e).__name__}: {msg})")


def compile_train_step(config, devices, mesh_shape=None):
    """Lower and compile ``Trainer._train_step`` on ``devices``; returns ``(compiled, seconds)``."""
    import jax
    import jax.numpy as jnp

    from taipan_jax.model_config import ModelConfig
    from taipan_jax.training import Trainer, make_mesh

    mesh = make_mesh(mesh_shape or config.mesh.shape.to_dict(), devices=devices)
    trainer = Trainer(ModelConfig.from_dict(config.model.to_dict()), config.train, mesh, config.mesh.rules)
    shape = (int(config.train.global_batch_size), int(config.data.seq_len))
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.data_sharding) for k in ("inputs", "targets")}
    key_aval = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key_aval.shape, key_aval.dtype, sharding=trainer.replicated)
    t0 = time.time()
    with trainer._context():
        compiled = trainer._train_step.lower(trainer.abstract_state, batch, key).compile()
    return compiled, time.time() - t0


def compiled_memory(compiled) -> dict[str, int]:
    """``memory_analysis()`` per device, with ``peak`` (XLA's bound) and ``allocated`` (its buffers).

    ``peak`` = arguments + outputs - aliased + temporaries + generated code, the bound XLA's
    ``CompiledMemoryStats`` documents. ``allocated`` = ``total_allocation_bytes``, the device-memory
    (HBM) buffers of XLA's buffer assignment: arguments, outputs and the temporary heap, without the
    code. On XLA:CPU the two agree (no code). On XLA:TPU libtpu's ``temp_size_in_bytes`` is larger
    than the temporary heap of its own buffer assignment (by 0.8 GiB at taipan_190m): libtpu's
    out-of-memory report (compile with ``LIBTPU_INIT_ARGS=--xla_tpu_max_hbm_size_mib=N``) splits its
    HBM need into arguments + global + scoped + HLO temp (= that heap) + overlays, and a step whose
    ``peak`` is 3.20 GiB compiles under a 2500 MiB limit; ``allocated`` is what the analytic
    estimate is compared with (docs/launch.md).
    """
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "generated_code": int(m.generated_code_size_in_bytes),
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated_code"]
    total = int(getattr(m, "total_allocation_bytes", 0) or 0)
    out["allocated"] = total if total > 0 else out["peak"] - out["generated_code"]
    return out


def run(config, target: Target, *, hbm_gib: float = 0.0, estimate_only: bool = False, out=print) -> dict:
    """Check, estimate, compile; returns the report dict (``fits`` is None if no capacity is known)."""
    from taipan_jax.launch_check import check
    from taipan_jax.memory_estimate import estimate, fmt_bytes

    res = check(config, target.devices, processes=target.processes, target=target.description)
    for w in res.warnings:
        out(f"launch_check: warning: {w}")
    for line in res.lines:
        out(f"launch_check: {line}")
    generation = (target.tpu_topology or "").split(":")[0] or None
    est = estimate(config, res.mesh, platform=target.platform, tpu_generation=generation)
    out("analytic estimate, per device:")
    out(est.table())
    out("  assumptions:")
    for a in est.assumptions:
        out(f"    - {a}")
    report = {"target": target.spec, "description": target.description, "devices": target.devices,
              "mesh": res.mesh, "estimate": dict(est.rows()), "compiled": None, "ratio": None}
    capacity = int(hbm_gib * GiB) if hbm_gib else target.hbm_bytes
    peak = est.total
    basis = "estimate"
    if not estimate_only:
        devices, reason = target_devices(target)
        if devices is None:
            out(f"compile: skipped: {reason}")
            report["compile_skipped"] = reason
        else:
            m = config.model
            if target.platform == "tpu" and "auto" in (m.mamba.ssd_impl, m.sal.impl):
                import jax

                out(f"compile: for {target.description} from this {jax.default_backend()} host; kernels with "
                    "impl='auto' resolve on this host (the xla paths): pass --config.model.mamba.ssd_impl="
                    "pallas_tpu to compile the Pallas SSD kernel")
            compiled, seconds = compile_train_step(config, devices, res.mesh)
            mem = compiled_memory(compiled)
            report["compiled"] = mem
            report["compile_seconds"] = round(seconds, 1)
            out(f"compiled (XLA, per device; lower + compile {seconds:.1f} s):")
            for name, label in (("arguments", "arguments (train state + batch)"), ("outputs", "outputs"),
                                ("aliased", "outputs aliased with arguments (donated)"),
                                ("temporaries", "temporaries"), ("generated_code", "generated code"),
                                ("peak", "peak = arguments + outputs - aliased + temporaries + code"),
                                ("allocated", "allocated buffers (total_allocation_bytes, no code)")):
                out(f"  {label:<58s} {fmt_bytes(mem[name]):>12s}")
            report["ratio"] = est.total / mem["allocated"]
            report["ratio_peak"] = est.total / mem["peak"]
            out(f"estimate / compiled allocation: {fmt_bytes(est.total)} / {fmt_bytes(mem['allocated'])} = "
                f"{report['ratio']:.3f} (/ peak: {report['ratio_peak']:.3f})")
            peak, basis = mem["peak"], "compiled"
    report["capacity"] = capacity
    if capacity:
        report["fits"] = peak <= capacity
        out(f"capacity: {fmt_bytes(capacity)} per device; {basis} peak {fmt_bytes(peak)} = "
            f"{peak / capacity:.1%} -> {'fits' if report['fits'] else 'DOES NOT FIT'}")
        if target.platform == "gpu":
            out("  note: JAX preallocates 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised "
                "(launch/slurm_gpu.sbatch sets 0.90)")
    else:
        report["fits"] = None
        out("capacity: unknown for this target (pass --hbm_gib to compare)")
    return report


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    spec = _prescan_topology(argv[1:])
    target = None
    if spec:
        try:
            target = parse_target(spec)
        except ValueError as e:
            print(f"compile_check: error: {e}", file=sys.stderr)
            sys.exit(2)
        if not _prepare_environment(target):
            # jax already started with too few CPU devices: run again in a fresh process.
            rc = subprocess.call([sys.executable, "-m", "taipan_jax.compile_check", *argv[1:]], env=os.environ)
            sys.exit(rc)

    from absl import app, flags
    from ml_collections import config_flags

    from taipan_jax.launch_check import LaunchCheckError

    config_flag = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    flags.DEFINE_string("topology", None, "cpu:N | gpu:N | h100:N | h200:N | v5e-256 | v5e:16x16 | v4-32 ...")
    hbm_flag = flags.DEFINE_float("hbm_gib", 0.0, "Per-device memory to compare against (default: the chip's).")
    est_flag = flags.DEFINE_bool("estimate_only", False, "Print the analytic estimate only; do not compile.")
    json_flag = flags.DEFINE_string("json", "", "Write the report as JSON to this path.")

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}", exitcode=2)
        if config_flag.value is None or target is None:
            raise app.UsageError("--config and --topology are required", exitcode=2)
        print(f"compile_check: {target.description}")
        try:
            report = run(config_flag.value, target, hbm_gib=hbm_flag.value, estimate_only=est_flag.value)
        except LaunchCheckError as e:
            for msg in e.errors:
                print(f"launch_check: error: {msg}", file=sys.stderr)
            sys.exit(1)
        if json_flag.value:
            with open(json_flag.value, "w") as f:
                json.dump(report, f, indent=1)
        if report["fits"] is False:
            sys.exit(1)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
