"""Public SSD entry point: validation, ``dt`` preprocessing and implementation dispatch."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import default_backend, validate_impl, warn_once
from pallas_kernels.ssd import pallas_gpu as _pallas_gpu
from pallas_kernels.ssd import pallas_tpu as _pallas_tpu
from pallas_kernels.ssd.config import SSDBlockSizes
from pallas_kernels.ssd.reference import ssd_reference
from pallas_kernels.ssd.xla import ssd_xla

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")


def ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    chunk_size: int = 256,
    D: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = False,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Mamba-2 SSD scan with the semantics of mamba_ssm's ``mamba_chunk_scan_combined``.

    Shapes: ``x (b, l, h, p)``, ``dt (b, l, h)``, ``A (h,)``, ``B, C (b, l, g, n)`` with
    ``h % g == 0`` (head ``j`` uses group ``j // (h // g)``), ``D (h,)`` or ``(h, p)``,
    ``dt_bias (h,)``, ``initial_state (b, h, p, n)``, ``segment_ids (b, l)`` integer.

    With ``dt' = clip(softplus(dt + dt_bias) if dt_softplus else dt + dt_bias, dt_min, dt_max)``::

        state_t = exp(dt'_t A) state_{t-1} + dt'_t outer(x_t, B_t)      # (p, n) per head
        y_t     = state_t @ C_t + D x_t

    ``initial_state`` (default zeros) is the state before ``t = 0``. Wherever
    ``segment_ids[t] != segment_ids[t-1]`` the state restarts from zero (packed
    documents; any change counts, including a return to an earlier id).

    Any ``l`` is accepted (padded internally to a multiple of ``chunk_size`` without
    affecting the outputs). Math runs in float32 (float64 if any float input is
    float64); ``y`` is returned in ``x.dtype`` and ``final_state`` in the compute
    dtype (float32 unless float64 inputs).

    Args:
        chunk_size: tokens per chunk of the chunked algorithms.
        return_final_state: also return the state after the last token.
        impl: ``"reference"`` (sequential scan, the oracle), ``"xla"`` (chunked, plain
            JAX), ``"pallas_tpu"`` (Mosaic TPU Pallas kernels, forward and backward;
            float32 compute only; bfloat16 ``x``/``B``/``C`` are fed to the kernel as is),
            ``"pallas_gpu"`` (Mosaic GPU Pallas kernel for Hopper, forward and backward;
            see :mod:`pallas_kernels.ssd.pallas_gpu`), or ``"auto"``: ``"pallas_gpu"`` on a
            GPU backend when :func:`pallas_kernels.ssd.pallas_gpu.unsupported_reason`
            allows the call, ``"pallas_tpu"`` on a
            TPU backend when the call is supported (see
            :func:`pallas_kernels.ssd.pallas_tpu.unsupported_reason`), otherwise ``"xla"``
            with a one-time warning giving the reason.
        interpret: run Pallas kernels in interpret mode (``"pallas_tpu"``: TPU
            interpret mode, ``pltpu.InterpretParams()``, on any backend); ignored by
            ``"reference"`` and ``"xla"``.

    Returns:
        ``y`` of shape ``(b, l, h, p)``, or ``(y, final_state)`` if ``return_final_state``.

    Raises:
        ValueError: on bad shapes, ``h % g != 0``, ``chunk_size <= 0``, non-integer
            ``segment_ids`` or an unknown ``impl``; the message names the argument.
            ``impl="pallas_tpu"`` compiled for TPU (``interpret=False``) also raises it
            for shapes that break the TPU tiling rules.
        NotImplementedError: for ``impl="pallas_gpu"`` on calls it does not support
            (float64; see ``unsupported_reason``) or without a GPU backend and
            ``interpret=False``, and for ``impl="pallas_tpu"``
            with float64 inputs.
    """
    impl = validate_impl(impl, IMPLS)
    block_sizes = SSDBlockSizes(chunk_size=chunk_size)
    x, dt, A, B, C = (jnp.asarray(a) for a in (x, dt, A, B, C))
    D, dt_bias, initial_state, segment_ids = (
        None if a is None else jnp.asarray(a) for a in (D, dt_bias, initial_state, segment_ids)
    )
    _validate(x, dt, A, B, C, D, dt_bias, initial_state, segment_ids)
    impl = _resolve_impl(impl, interpret)
    if impl == "auto" and default_backend() == "gpu":
        impl = _resolve_auto_gpu(x, B, C, block_sizes, _compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state))
    if impl == "auto":
        impl = _resolve_auto_tpu(x, B, C, block_sizes, _compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state))
    if impl == "pallas_gpu":
        reason = _pallas_gpu_unsupported_reason(
            x, B, C, block_sizes, _compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state))
        if reason is not None:
            raise NotImplementedError(f"ssd impl='pallas_gpu' does not support this call: {reason}.")

    y, final_state = _ssd(
        x, dt, A, B, C, D, dt_bias, initial_state, segment_ids, dt_min, dt_max,
        dt_softplus=bool(dt_softplus), impl=impl, block_sizes=block_sizes,
        interpret=bool(interpret) and impl in ("pallas_tpu", "pallas_gpu"),
    )
    return (y, final_state) if return_final_state else y


def _resolve_impl(impl: str, interpret: bool) -> str:
    """Map ``impl`` to a concrete implementation name; ``"auto"`` on TPU is left to ``_resolve_auto_tpu``."""
    if impl == "pallas_gpu" and not interpret and default_backend() != "gpu":
        raise NotImplementedError(
            f"ssd impl='pallas_gpu' needs a GPU backend (default backend is {default_backend()!r}); "
            "pass interpret=True to run the kernel in Mosaic GPU interpret mode."
        )
    if impl == "auto":
        backend = default_backend()
        if backend in ("tpu", "gpu"):
            return "auto"
        return "xla"
    return impl


def _pallas_gpu_unsupported_reason(
    x: jax.Array, B: jax.Array, C: jax.Array, block_sizes: SSDBlockSizes, cdt: jnp.dtype
) -> str | None:
    if cdt == jnp.float64:
        return "float64 inputs (the kernel computes in float32)"
    return _pallas_gpu.unsupported_reason(x, B, C, block_sizes)


def _resolve_auto_gpu(x: jax.Array, B: jax.Array, C: jax.Array, block_sizes: SSDBlockSizes, cdt: jnp.dtype) -> str:
    """``impl="auto"`` on a GPU backend: the Mosaic GPU kernel when it supports the call, else ``"xla"``."""
    reason = _pallas_gpu_unsupported_reason(x, B, C, block_sizes, cdt)
    if reason is None:
        return "pallas_gpu"
    warn_once(
        ("ssd", "auto", "gpu", reason),
        f"ssd: the Pallas GPU kernel does not support this call ({reason}); "
        "impl='auto' uses the chunked 'xla' implementation.",
    )
    return "xla"


def _resolve_auto_tpu(x: jax.Array, B: jax.Array, C: jax.Array, block_sizes: SSDBlockSizes, cdt: jnp.dtype) -> str:
    """``impl="auto"`` on a TPU backend: the Pallas TPU kernel when it supports the call, else ``"xla"``."""
    reason = _pallas_tpu.unsupported_reason(
        tuple(x.shape), tuple(B.shape), block_sizes, cdt, *_pallas_tpu_io_dtypes(x, B, C, cdt)
    )
    if reason is None:
        return "pallas_tpu"
    warn_once(
        ("ssd", "auto", "tpu", reason),
        f"ssd: the Pallas TPU kernel does not support this call ({reason}); "
        "impl='auto' uses the chunked 'xla' implementation.",
    )
    return "xla"


def _pallas_tpu_io_dtypes(x: jax.Array, B: jax.Array, C: jax.Array, cdt: jnp.dtype) -> tuple[jnp.dtype, jnp.dtype]:
    """Dtypes the TPU kernel reads ``x`` and ``B``/``C`` in: bfloat16 stays bfloat16 (an exact
    subset of float32, upcast inside the kernel) when the math is float32; else ``cdt``."""
    bf16 = cdt == jnp.float32 and x.dtype == jnp.bfloat16
    bc_bf16 = cdt == jnp.float32 and B.dtype == C.dtype == jnp.bfloat16
    return (jnp.dtype(jnp.bfloat16) if bf16 else cdt), (jnp.dtype(jnp.bfloat16) if bc_bf16 else cdt)


def _check_shape(name: str, arr: jax.Array, expected: tuple[int, ...], spec: str) -> None:
    if tuple(arr.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {spec} = {expected}.")


def _validate(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    dt_bias: jax.Array | None,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
) -> None:
    """Raise ``ValueError`` naming the first argument whose shape or dtype is invalid."""
    if x.ndim != 4:
        raise ValueError(f"x has shape {x.shape}, expected rank 4 (b, l, h, p).")
    b, l, h, p = x.shape
    if B.ndim != 4:
        raise ValueError(f"B has shape {B.shape}, expected rank 4 (b, l, g, n).")
    g, n = B.shape[2:]
    if g == 0 or h % g != 0:
        raise ValueError(f"B has {g} groups, which must divide the number of heads h = {h} (h % g == 0).")
    _check_shape("dt", dt, (b, l, h), "(b, l, h)")
    _check_shape("A", A, (h,), "(h,)")
    _check_shape("B", B, (b, l, g, n), "(b, l, g, n)")
    _check_shape("C", C, (b, l, g, n), "(b, l, g, n)")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D has shape {D.shape}, expected (h,) = {(h,)} or (h, p) = {(h, p)}.")
    if dt_bias is not None:
        _check_shape("dt_bias", dt_bias, (h,), "(h,)")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (b, h, p, n), "(b, h, p, n)")
    if segment_ids is not None:
        _check_shape("segment_ids", segment_ids, (b, l), "(b, l)")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}.")


def _compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """float64 if any given array is float64, else float32."""
    if any(a is not None and a.dtype == jnp.float64 for a in arrays):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def document_index(segment_ids: jax.Array | None, b: int, l: int) -> jax.Array:
    """Monotonic int32 document index: ``doc[:, 0] = 0``, +1 wherever ``segment_ids`` changes."""
    if segment_ids is None:
        return jnp.zeros((b, l), jnp.int32)
    changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(changes, axis=1)], axis=1)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "impl", "block_sizes", "interpret"))
def _ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    dt_bias: jax.Array | None,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
    dt_min: Any,
    dt_max: Any,
    *,
    dt_softplus: bool,
    impl: str,
    block_sizes: SSDBlockSizes,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Preprocess validated inputs and run ``impl``; returns ``(y in x.dtype, final_state)``."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    cdt = _compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state)
    x_c, A_c, B_c, C_c = (a.astype(cdt) for a in (x, A, B, C))

    dt_c = dt.astype(cdt)
    if dt_bias is not None:
        dt_c = dt_c + dt_bias.astype(cdt)
    if dt_softplus:
        dt_c = jax.nn.softplus(dt_c)
    dt_c = jnp.clip(dt_c, jnp.asarray(dt_min, cdt), jnp.asarray(dt_max, cdt))

    D_c = None if D is None else jnp.broadcast_to(D.astype(cdt).reshape(h, -1), (h, p))
    state0 = jnp.zeros((b, h, p, n), cdt) if initial_state is None else initial_state.astype(cdt)
    doc = document_index(segment_ids, b, l)

    if impl == "reference":
        y, final_state = ssd_reference(x_c, dt_c, A_c, B_c, C_c, D_c, state0, doc)
    elif impl == "pallas_gpu":
        # x, B, C keep their dtype: bfloat16 feeds bf16 wgmma operands, others the three-part bf16 split.
        y, final_state = _pallas_gpu.ssd_pallas_gpu(
            x, dt_c, A_c, B, C, D_c, state0, doc, block_sizes, interpret=interpret,
        )
    elif impl == "pallas_tpu":
        x_dtype, bc_dtype = _pallas_tpu_io_dtypes(x, B, C, cdt)
        y, final_state = _pallas_tpu.ssd_pallas_tpu(
            x.astype(x_dtype), dt_c, A_c, B.astype(bc_dtype), C.astype(bc_dtype), D_c, state0, doc,
            block_sizes, interpret=interpret,
        )
    else:
        y, final_state = ssd_xla(x_c, dt_c, A_c, B_c, C_c, D_c, state0, doc, block_sizes)
    return y.astype(x.dtype), final_state
