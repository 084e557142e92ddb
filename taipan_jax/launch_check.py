"""Check a config against a launch target before anything is created or submitted.

    python -m taipan_jax.launch_check --config=configs/X.py --devices=N [--processes=P] [--config.a.b=v ...]
    python -m taipan_jax.launch_check --config=configs/X.py --accelerator=v5litepod-256 [...]

Exits 0 and prints a summary when the config fits the target; exits 1 with one ``error:`` line per
problem otherwise. The launch scripts (``launch/tpu_pod.sh``, ``launch/xpk_example.sh``,
``launch/slurm_gpu.sbatch``) call it first, so there is one implementation of these rules:

* ``config.mesh.shape`` (data x fsdp x tensor, one size may be -1 = "the rest") must use exactly
  the target's devices: the fixed sizes divide the device count, and the product equals it;
* ``config.train.global_batch_size`` is divisible by the data-parallel size (data x fsdp) x
  ``grad_accum_steps``, and by the process count (each process feeds its own rows);
* ``config.train.eval_batch_size`` (the held-out evaluation, always run at the end) is divisible
  by the data-parallel size and the process count;
* the model config itself is valid (``ModelConfig.validate``);
* warnings (not errors): a tensor axis that does not divide the heads / widths it shards, an fsdp
  axis that does not divide ``d_model`` (those parameters are then replicated over that axis).

TPU accelerator types (the names ``gcloud compute tpus tpu-vm create --accelerator-type`` takes)
and the number of JAX devices they give:

* ``v5litepod-N``, ``v5e-N``, ``v6e-N``: N chips, one TensorCore each: **N devices**.
* ``v4-N``, ``v5p-N``: N counts TensorCores, two per chip, and JAX sees one device per chip
  (megacore): **N/2 devices** (``v4-32`` = 16 chips = 16 devices).
* ``v2-N``, ``v3-N``: N TensorCores, each its own JAX device: **N devices**.

Hosts (TPU VM workers): 4 chips each (v2/v3: 8 TensorCores), except single-host v5e / v6e slices
of up to 8 chips.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping

MESH_AXES = ("data", "fsdp", "tensor")
GiB = 1024**3

# HBM per JAX device, bytes. TPU numbers are jax/_src/tpu_info.py's per-chip hbm_capacity_bytes
# (v4 34.4e9 = 32 GiB, v5e 17.2e9 = 16 GiB, v5p 103e9 = 95.9 GiB, v6e 34.4e9 = 32 GiB; v2/v3 per
# TensorCore); GPU numbers are the datasheet sizes (nvidia-smi reports slightly less).
HBM_BYTES = {
    "v2": 8_000_000_000,
    "v3": 17_200_000_000,
    "v4": 34_400_000_000,
    "v5e": 17_200_000_000,
    "v5p": 103_000_000_000,
    "v6e": 34_400_000_000,
    "h100": 80 * GiB,
    "h200": 141 * GiB,
    "a100": 80 * GiB,
}

# generation -> (name as jax reports device_kind, TensorCores per JAX device, counts in the name are
# chips (True) or TensorCores (False), chips per host in multi-host slices)
_TPU = {
    "v2": ("TPU v2", 1, False, 4),
    "v3": ("TPU v3", 1, False, 4),
    "v4": ("TPU v4", 2, False, 4),
    "v5p": ("TPU v5", 2, False, 4),
    "v5e": ("TPU v5 lite", 1, True, 4),
    "v6e": ("TPU v6 lite", 1, True, 4),
}
_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v5p": "v5p"}


class LaunchCheckError(ValueError):
    """The config does not fit the target; ``.errors`` lists every problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str  # as given, e.g. "v5litepod-256"
    generation: str  # v2 | v3 | v4 | v5p | v5e | v6e
    devices: int  # JAX devices (= chips, except v2/v3 where each TensorCore is a device)
    chips: int
    hosts: int
    device_kind: str
    hbm_bytes: int  # per JAX device

    @property
    def topology(self) -> str:
        """libtpu's topology name for ``jax.experimental.topologies.get_topology_desc``."""
        return f"{self.generation}:{'x'.join(map(str, _chip_grid(self.generation, self.chips)))}"

    @property
    def topology_kwargs(self) -> dict:
        """The other arguments of ``get_topology_desc``: megacore chips, and the chips of one host."""
        if self.hosts == 1:
            grid = _chip_grid(self.generation, self.chips)
            bounds = (tuple(grid) + (1,) * 3)[:3]
        else:
            bounds = (2, 2, 1)
        return {"chip_config_name": "megacore" if self.generation in ("v4", "v5p") else "default",
                "chips_per_host_bounds": bounds}


def _chip_grid(generation: str, chips: int) -> tuple[int, ...]:
    """The physical chip grid of a slice: 2D for v2/v3/v5e/v6e, 3D (a x b x c) for v4/v5p."""
    dims = 3 if generation in ("v4", "v5p") else 2
    sizes = [1] * dims
    n, i = chips, 0
    while n > 1:  # powers of two, spread as evenly as possible, smallest first
        sizes[i % dims] *= 2
        n //= 2
        i += 1
    if dims == 3 and chips == 4:
        return (2, 2, 1)  # a v4-8 / v5p-8 host is 2x2x1
    return tuple(sorted(sizes))


def parse_tpu(name: str) -> TpuSlice:
    """``"v5litepod-256"`` -> a :class:`TpuSlice`; raises ``ValueError`` naming the rule broken."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(
            f"cannot parse TPU accelerator type {name!r}; expected <generation>-<count> such as "
            "v5litepod-256, v5e-256, v6e-64, v4-32, v5p-128"
        )
    gen, count = _TPU_ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if gen not in _TPU:
        raise ValueError(f"unknown TPU generation {m.group(1)!r} in {name!r}; known: "
                         f"{sorted(set(_TPU) | set(_TPU_ALIASES))}")
    kind, cores_per_device, counts_chips, chips_per_host = _TPU[gen]
    if count <= 0 or count & (count - 1):
        raise ValueError(f"TPU accelerator type {name!r}: the count must be a power of two")
    if counts_chips:
        chips = devices = count
        hosts = 1 if chips <= 8 else chips // chips_per_host
    else:  # the name counts TensorCores (2 per chip)
        if count < 8:
            raise ValueError(f"TPU accelerator type {name!r}: {gen} slices start at {gen}-8")
        chips = count // 2
        devices = count // cores_per_device
        hosts = max(chips // chips_per_host, 1)
    return TpuSlice(name=name, generation=gen, devices=devices, chips=chips, hosts=hosts,
                    device_kind=kind, hbm_bytes=HBM_BYTES[gen])


def resolve_mesh(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fill a -1 in ``config.mesh.shape`` and check it against ``n_devices`` (the trainer's rule)."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise LaunchCheckError([f"config.mesh.shape has unknown axes {unknown}; allowed: {list(MESH_AXES)}"])
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    if list(sizes.values()).count(-1) > 1:
        raise LaunchCheckError([f"config.mesh.shape: at most one axis may be -1, got {sizes}"])
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise LaunchCheckError([f"config.mesh.shape sizes must be positive or -1, got {sizes}"])
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fixed_desc = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != -1 and s != 1) or "1"
    if -1 in sizes.values():
        if n_devices % fixed:
            raise LaunchCheckError([
                f"config.mesh.shape {sizes}: the fixed axes ({fixed_desc} = {fixed}) do not divide the "
                f"target's {n_devices} devices"
            ])
        free = next(a for a, s in sizes.items() if s == -1)
        sizes[free] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise LaunchCheckError([
            f"config.mesh.shape {sizes} needs {math.prod(sizes.values())} devices, but the target has "
            f"{n_devices} (set one axis to -1, or make the product {n_devices})"
        ])
    return sizes


@dataclasses.dataclass
class CheckResult:
    mesh: dict[str, int]
    devices: int
    processes: int
    warnings: list[str]
    lines: list[str]


def check(config, n_devices: int, *, processes: int = 1, target: str = "", workdir: str = "") -> CheckResult:
    """Validate ``config`` for ``n_devices`` JAX devices over ``processes`` processes.

    Raises :class:`LaunchCheckError` listing every problem found.
    """
    from taipan_jax.model_config import ModelConfig

    target = target or f"{n_devices} devices"
    if n_devices <= 0:
        raise LaunchCheckError([f"the target must have at least one device, got {n_devices}"])
    if processes <= 0 or n_devices % processes:
        raise LaunchCheckError([f"{processes} processes cannot split {n_devices} devices evenly"])
    errors: list[str] = []
    warnings: list[str] = []
    try:
        mesh = resolve_mesh(config.mesh.shape.to_dict(), n_devices)
    except LaunchCheckError as e:
        errors += [f"{msg} [target: {target}]" for msg in e.errors]
        mesh = None
    try:
        model_cfg = ModelConfig.from_dict(config.model.to_dict())
    except (ValueError, TypeError) as e:
        errors.append(f"invalid model config: {e}")
        model_cfg = None

    tc = config.train
    gb, accum, eb = int(tc.global_batch_size), int(tc.grad_accum_steps), int(tc.eval_batch_size)
    if accum < 1:
        errors.append(f"config.train.grad_accum_steps must be >= 1, got {accum}")
        accum = 1
    if gb % processes:
        errors.append(f"config.train.global_batch_size={gb} is not divisible by the {processes} processes "
                      "(each process loads global_batch_size / processes rows)")
    if eb % processes:
        errors.append(f"config.train.eval_batch_size={eb} is not divisible by the {processes} processes")
    if mesh is not None:
        dp = mesh["data"] * mesh["fsdp"]
        if gb % (dp * accum):
            errors.append(
                f"config.train.global_batch_size={gb} is not divisible by the data-parallel size {dp} "
                f"(mesh data={mesh['data']} x fsdp={mesh['fsdp']}) x grad_accum_steps {accum} = {dp * accum}"
            )
        if eb % dp:
            errors.append(
                f"config.train.eval_batch_size={eb} is not divisible by the data-parallel size {dp} "
                f"(mesh data={mesh['data']} x fsdp={mesh['fsdp']}); the held-out evaluation shards it "
                "the same way (set --config.train.eval_batch_size to a multiple of it)"
            )
        if model_cfg is not None:
            warnings += _sharding_warnings(model_cfg, mesh)
    if workdir:
        warnings += _workdir_warnings(workdir, processes)
    if errors:
        raise LaunchCheckError(errors)

    dp = mesh["data"] * mesh["fsdp"]
    lines = [
        f"target: {target} = {n_devices} devices, {processes} process(es)",
        f"mesh: data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}",
        f"batch: global {gb} = {gb // (dp * accum)} per data-parallel rank x {dp} ranks x {accum} accumulation "
        f"step(s); {gb // processes} rows per process; {config.data.seq_len} tokens per row",
        f"eval batch: {eb} ({eb // dp} per data-parallel rank)",
    ]
    return CheckResult(mesh=mesh, devices=n_devices, processes=processes, warnings=warnings, lines=lines)


def _sharding_warnings(cfg, mesh: Mapping[str, int]) -> list[str]:
    out = []
    tp, fsdp = mesh["tensor"], mesh["fsdp"]
    if tp > 1:
        dims = {}
        if "mamba2" in cfg.group:
            dims["mamba heads"] = cfg.mamba.expand * cfg.d_model // cfg.mamba.headdim
        for kind, a in (("sal", cfg.sal), ("attention", cfg.attention)):
            if kind in cfg.group:
                dims[f"{kind} num_heads"] = a.num_heads
                dims[f"{kind} num_kv_heads"] = a.num_kv_heads
        dims["padded vocab"] = cfg.padded_vocab_size
        for what, n in dims.items():
            if n % tp:
                out.append(f"tensor={tp} does not divide {what} ({n}): those weights are replicated over "
                           "the tensor axis")
    if fsdp > 1 and cfg.d_model % fsdp:
        out.append(f"fsdp={fsdp} does not divide d_model ({cfg.d_model}): parameters are replicated over fsdp")
    return out


def _workdir_warnings(workdir: str, processes: int) -> list[str]:
    out = []
    if "://" not in workdir and processes > 1:
        out.append(f"workdir {workdir} is a local path and {processes} processes write checkpoints: it must be "
                   "on a filesystem every host shares (NFS, Lustre, ...)")
    return out


def hbm_bytes(target: str) -> int | None:
    """Per-device memory of a named chip (``v5e``, ``h100``, ...), or None if unknown."""
    key = target.lower()
    key = _TPU_ALIASES.get(key, key)
    return HBM_BYTES.get(key)


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    devices_flag = flags.DEFINE_integer("devices", None, "Number of JAX devices of the target.")
    accel_flag = flags.DEFINE_string("accelerator", None, "TPU accelerator type, e.g. v5litepod-256 (sets --devices).")
    procs_flag = flags.DEFINE_integer("processes", None, "Number of processes (hosts); default: 1, or the TPU slice's hosts.")
    slices_flag = flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice): devices and hosts are multiplied.")
    target_flag = flags.DEFINE_string("target", "", "A name for the target, used in messages.")
    quiet_flag = flags.DEFINE_bool("quiet", False, "Print only errors and warnings.")
    workdir_flag = flags.DEFINE_string("workdir", "", "The run's workdir (checked: shared / URL handling).")

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        if config_flag.value is None:
            raise app.UsageError("--config is required")
        target = target_flag.value
        n, procs = devices_flag.value, procs_flag.value
        if accel_flag.value:
            try:
                tpu = parse_tpu(accel_flag.value)
            except ValueError as e:
                print(f"launch_check: error: {e}", file=sys.stderr)
                sys.exit(1)
            k = slices_flag.value
            if n is not None and n != tpu.devices * k:
                print(f"launch_check: error: --devices={n} contradicts --accelerator={accel_flag.value} "
                      f"({tpu.devices * k} devices)", file=sys.stderr)
                sys.exit(1)
            n = tpu.devices * k
            procs = procs or tpu.hosts * k
            target = target or (f"{accel_flag.value}" + (f" x {k} slices" if k > 1 else "")
                                + f" ({tpu.device_kind}, {tpu.chips * k} chips, {tpu.hosts * k} hosts)")
        if n is None:
            raise app.UsageError("give --devices=N or --accelerator=TYPE")
        try:
            res = check(config_flag.value, n, processes=procs or 1, target=target, workdir=workdir_flag.value)
        except LaunchCheckError as e:
            for msg in e.errors:
                print(f"launch_check: error: {msg}", file=sys.stderr)
            sys.exit(1)
        for w in res.warnings:
            print(f"launch_check: warning: {w}", file=sys.stderr)
        if not quiet_flag.value:
            for line in res.lines:
                print(f"launch_check: {line}")
            print("launch_check: OK")

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
