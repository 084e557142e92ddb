"""Logical axis names and their mapping onto a device mesh.

Every parameter and every large activation in taipan_jax names its axes with *logical* names
(``batch``, ``length``, ``embed``, ``heads``, ``mlp``, ``vocab``, ...). One rules table (in the
config, ``config.mesh.rules``) maps each logical name to zero or more mesh axes. The model code
never mentions mesh axes; only this module and the trainer do.

Parameters carry their logical names as the ``out_sharding`` metadata of their ``nnx.Param``
(with ``eager_sharding=False``, so creating a model needs no mesh). Activations are annotated with
:func:`constrain`, which is a no-op unless :func:`logical_rules` is active and a mesh is set.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

# Logical axis names used by the model. Adding a name here documents it; the rules table decides
# where it lives on the mesh.
LOGICAL_AXES = (
    "batch",  # examples
    "length",  # sequence positions (activations)
    "embed",  # model width d_model
    "mlp",  # SwiGLU hidden width
    "heads",  # attention query heads
    "kv_heads",  # attention key/value heads
    "head_dim",  # per-head width (attention)
    "ssm_inner",  # Mamba-2 d_inner = ssm_heads * ssm_head_dim
    "ssm_heads",  # Mamba-2 heads
    "ssm_head_dim",  # Mamba-2 head width P
    "ssm_state",  # Mamba-2 state size N (and groups x N for B, C)
    "ssm_groups",  # Mamba-2 B/C groups (sharded like the heads when divisible)
    "conv_kernel",  # depthwise conv taps
    "vocab",  # vocabulary
    "layers",  # stacked (scanned) repeats of a block group
    "gate",  # the SAL gate's 2 logits
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# Default rules: data parallel + FSDP over params' embed axis + tensor parallel over heads / mlp.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_head_dim", None),
    ("ssm_state", None),
    ("ssm_groups", "tensor"),
    ("conv_kernel", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("gate", None),
)


class _RulesContext(threading.local):
    rules: tuple | None = None


_CTX = _RulesContext()


@contextlib.contextmanager
def logical_rules(rules: Rules) -> Iterator[None]:
    """Activate a logical->mesh rules table for :func:`constrain` (thread-local)."""
    previous = _CTX.rules
    _CTX.rules = tuple((k, v) for k, v in rules)
    try:
        yield
    finally:
        _CTX.rules = previous


def current_rules() -> tuple | None:
    return _CTX.rules


def _rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, target in rules:
        if name in out:
            raise ValueError(f"logical axis {name!r} appears twice in the rules table")
        if target is None:
            out[name] = ()
        elif isinstance(target, str):
            out[name] = (target,)
        else:
            out[name] = tuple(target)
    return out


def logical_to_mesh(
    logical: Sequence[str | None] | None,
    rules: Rules,
    *,
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec``.

    A mesh axis is used at most once per spec (the first logical axis to claim it wins). When
    ``shape`` and ``mesh_shape`` are given, a mesh axis that does not divide the dimension is
    dropped (that dimension is replicated over it) rather than producing an invalid sharding.
    Unknown logical names raise ``ValueError``.
    """
    if logical is None:
        return PartitionSpec()
    table = _rules_dict(rules)
    used: set[str] = set()
    spec: list = []
    for i, name in enumerate(logical):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no entry in the rules table; known: {sorted(table)}"
            )
        axes = []
        size = None if shape is None else shape[i]
        for ax in table[name]:
            if ax in used:
                continue
            if mesh_shape is not None:
                if ax not in mesh_shape:
                    raise ValueError(f"rules map {name!r} to mesh axis {ax!r}, not in the mesh")
                n = mesh_shape[ax]
                total = n
                for a in axes:
                    total *= mesh_shape[a]
                if size is not None and size % total != 0:
                    continue
            axes.append(ax)
            used.add(ax)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op without active rules and mesh."""
    rules = _CTX.rules
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_mesh(logical, rules, shape=x.shape, mesh_shape=dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def shard_map_by_logical(fn, args: tuple, in_logical: tuple, out_logical, *, check_vma: bool = False):
    """Run ``fn(*args)`` under ``jax.shard_map`` with specs derived from logical axis names.

    Pallas kernels are custom calls that XLA cannot partition; running them per shard over the
    batch and head axes keeps them local. ``in_logical`` gives one tuple of logical names (or None
    for a replicated / absent argument) per argument; ``out_logical`` the same for the outputs
    (a tuple of tuples for several outputs). Without active rules and a mesh of more than one
    device, ``fn`` is simply called.
    """
    rules = _CTX.rules
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty or mesh.size == 1:
        return fn(*args)
    mesh_shape = dict(mesh.shape)

    def spec(names, shape):
        if names is None or shape is None:
            return PartitionSpec()
        return logical_to_mesh(names, rules, shape=shape, mesh_shape=mesh_shape)

    in_specs = tuple(spec(n, None if a is None else a.shape) for n, a in zip(in_logical, args))
    out_shapes = jax.eval_shape(fn, *args)
    multiple = isinstance(out_shapes, (tuple, list))
    outs = out_shapes if multiple else (out_shapes,)
    out_names = out_logical if multiple else (out_logical,)
    out_specs = tuple(spec(n, o.shape) for n, o in zip(out_names, outs))
    # Every dimension must be sharded identically in and out: derive each axis' mesh axes once.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs if multiple else out_specs[0],
                         check_vma=check_vma)(*args)
