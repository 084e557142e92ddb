"""Public gathered-attention entry point: validation and implementation dispatch."""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._dispatch import default_backend, validate_impl, warn_once
from pallas_kernels.gathered_attention import pallas_gpu, pallas_tpu
from pallas_kernels.gathered_attention.config import GatheredAttentionBlockSizes
from pallas_kernels.gathered_attention.reference import gathered_attention_reference
from pallas_kernels.gathered_attention.xla import gathered_attention_xla

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")


def gathered_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    *,
    window: int,
    sm_scale: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    impl: str = "auto",
    interpret: bool = False,
    block_sizes: GatheredAttentionBlockSizes | None = None,
) -> jax.Array:
    """Sliding-window softmax attention between tokens addressed by their positions.

    Shapes: ``q (b, sq, hq, d)``, ``k, v (b, skv, hkv, d)`` with ``hq % hkv == 0`` (query
    head ``j`` uses kv head ``j // (hq // hkv)``), ``q_pos (b, sq)``, ``kv_pos (b, skv)``
    and optional ``q_segment_ids (b, sq)``, ``kv_segment_ids (b, skv)``, all integer.

    Query ``i`` attends key ``j`` iff ``q_pos[i] >= 0``, ``kv_pos[j] >= 0``,
    ``0 <= q_pos[i] - kv_pos[j] < window`` and (when segment ids are given)
    ``q_segment_ids[i] == kv_segment_ids[j]``::

        out_i = sum_j softmax_j(sm_scale * q_i . k_j  |  i attends j) v_j

    Negative positions are padding. Valid positions are non-decreasing along each row
    with the padding at the end. A query without any admissible key -- in particular
    every padding query -- outputs exactly 0 and has zero gradient; keys that no query
    attends get zero gradient. The softmax runs in float32 (float64 if any of ``q, k, v``
    is float64; bf16 inputs are upcast) and the output has ``q.dtype``.

    The ``"xla"`` implementation (and therefore ``"auto"``) touches only ``min(window, skv)``
    keys per query (memory ``O(sq * window)``, not ``O(sq * skv)``); it is exact when the
    valid kv positions of each row are **distinct** (strictly increasing), which is the case
    for ``kv_pos = arange(L)`` with trailing ``-1`` and for the positions of selected tokens.
    With repeated kv positions it may drop admissible keys; use ``impl="reference"`` (or
    ``"pallas_tpu"``, which visits whole kv blocks and is exact for repeated positions) then.

    The ``"pallas_tpu"`` implementation is a Mosaic TPU flash-attention kernel (forward, dq and
    dk/dv kernels) that visits, for each block of queries, only the kv blocks that intersect
    the query block's position window; it supports float32 and bfloat16 ``q, k, v``. The
    ``"pallas_gpu"`` implementation is the same algorithm as Mosaic GPU kernels for Hopper
    (TMA, wgmma, a memory warpgroup streaming only the window's blocks to two compute
    warpgroups); float32 / bfloat16 / float16, head dim up to 256 (bf16) or 128 (others).

    Args:
        window: positive int; a key ``window`` or more positions behind a query is ignored.
        sm_scale: positive score scale; defaults to ``1 / sqrt(d)``.
        q_segment_ids, kv_segment_ids: document ids (packed sequences); give both or neither.
        impl: ``"reference"`` (dense masked softmax over all pairs, the oracle), ``"xla"``
            (blocked plain JAX over each query's window), ``"pallas_tpu"`` (the Mosaic TPU
            kernels), ``"pallas_gpu"`` (the Mosaic GPU kernels), or ``"auto"``: the Pallas
            kernel of a TPU / GPU backend when it supports the inputs, otherwise ``"xla"``
            (with a one-time warning naming the reason on an accelerator).
        block_sizes: tiling of the blocked implementations (``None``: the defaults of
            :class:`GatheredAttentionBlockSizes`).
        interpret: run Pallas kernels in interpret mode on CPU (``"pallas_tpu"``: TPU interpret
            mode, ``pltpu.InterpretParams()``; ``"pallas_gpu"``: Mosaic GPU interpret mode);
            ignored by ``"reference"`` and ``"xla"``.

    Returns:
        ``(b, sq, hq, d)`` in ``q.dtype``.

    Raises:
        ValueError: on bad shapes or ranks, ``hq % hkv != 0``, non-integer positions or
            segment ids, only one of the segment ids, ``window <= 0``, ``sm_scale <= 0`` or an
            unknown ``impl``; the message names the argument. Also for ``impl="pallas_tpu"``
            with float16/float64 inputs and ``impl="pallas_gpu"`` with float64 inputs or a head
            dim it cannot hold (message starting with ``impl``).
        NotImplementedError: for ``impl="pallas_gpu"`` without a GPU backend and
            ``interpret=False``.
    """
    impl = validate_impl(impl, IMPLS)
    if block_sizes is None:
        block_sizes = GatheredAttentionBlockSizes()
    elif not isinstance(block_sizes, GatheredAttentionBlockSizes):
        raise ValueError(f"block_sizes must be a GatheredAttentionBlockSizes or None, got {block_sizes!r}.")
    q, k, v, q_pos, kv_pos = (jnp.asarray(a) for a in (q, k, v, q_pos, kv_pos))
    q_seg, kv_seg = (None if a is None else jnp.asarray(a) for a in (q_segment_ids, kv_segment_ids))
    window = _validate_window(window)
    _validate(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else _validate_sm_scale(sm_scale)
    impl = _resolve_impl(impl, interpret, q, k, v, block_sizes)
    return _gathered_attention(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, sm_scale,
        window=window, impl=impl, block_sizes=block_sizes, interpret=bool(interpret),
    )


def _resolve_impl(impl: str, interpret: bool, q: jax.Array, k: jax.Array, v: jax.Array,
                  block_sizes: GatheredAttentionBlockSizes) -> str:
    """Map ``impl`` to a concrete implementation (``"reference"``, ``"xla"``, ``"pallas_tpu"``, ``"pallas_gpu"``)."""
    gpu_reason = functools.partial(pallas_gpu.unsupported_reason, q, k, v, block_sizes.gpu_block_kv,
                                   block_sizes.gpu_stages)
    if impl == "pallas_gpu":
        if not interpret and default_backend() != "gpu":
            raise NotImplementedError(
                f"gathered_attention impl='pallas_gpu' needs a GPU backend (default backend is "
                f"{default_backend()!r}); pass interpret=True to run the kernels in Mosaic GPU interpret mode."
            )
        reason = gpu_reason()
        if reason is not None:
            raise ValueError(f"impl='pallas_gpu' cannot run these inputs: {reason}; use impl='xla'.")
        return impl
    if impl == "pallas_tpu":
        reason = pallas_tpu.unsupported_reason(q, k, v)
        if reason is not None:
            raise ValueError(f"impl='pallas_tpu' cannot run these inputs: {reason}; use impl='xla'.")
        return impl
    if impl == "auto":
        backend = default_backend()
        if backend in ("tpu", "gpu"):
            reason = pallas_tpu.unsupported_reason(q, k, v) if backend == "tpu" else gpu_reason()
            if reason is None:
                return f"pallas_{backend}"
            warn_once(
                ("gathered_attention", "auto", backend, reason),
                f"gathered_attention: the Pallas {backend.upper()} kernel cannot run these inputs ({reason}); "
                "impl='auto' uses the blocked 'xla' implementation.",
            )
        return "xla"
    return impl


def _validate_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window <= 0:
        raise ValueError(f"window must be a positive int, got {window!r}.")
    return int(window)


def _validate_sm_scale(sm_scale: object) -> float:
    try:
        value = float(sm_scale)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ValueError(f"sm_scale must be a positive real number or None, got {sm_scale!r}.") from err
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"sm_scale must be a positive real number or None, got {sm_scale!r}.")
    return value


def _check_shape(name: str, arr: jax.Array, expected: tuple[int, ...], spec: str) -> None:
    if tuple(arr.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {spec} = {expected}.")


def _check_integer(name: str, arr: jax.Array) -> None:
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}.")


def _validate(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
) -> None:
    """Raise ``ValueError`` naming the first argument whose shape or dtype is invalid."""
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}, expected rank 4 (b, sq, hq, d).")
    b, sq, hq, d = q.shape
    if k.ndim != 4:
        raise ValueError(f"k has shape {k.shape}, expected rank 4 (b, skv, hkv, d).")
    skv, hkv = k.shape[1:3]
    _check_shape("k", k, (b, skv, hkv, d), "(b, skv, hkv, d)")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k has {hkv} heads, which must divide the number of query heads hq = {hq} (hq % hkv == 0).")
    _check_shape("v", v, (b, skv, hkv, d), "(b, skv, hkv, d)")
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {arr.dtype}.")
    _check_shape("q_pos", q_pos, (b, sq), "(b, sq)")
    _check_integer("q_pos", q_pos)
    _check_shape("kv_pos", kv_pos, (b, skv), "(b, skv)")
    _check_integer("kv_pos", kv_pos)
    if (q_seg is None) != (kv_seg is None):
        missing = "q_segment_ids" if q_seg is None else "kv_segment_ids"
        raise ValueError(f"{missing} is None but the other segment ids are given; give both or neither.")
    if q_seg is not None:
        _check_shape("q_segment_ids", q_seg, (b, sq), "(b, sq)")
        _check_integer("q_segment_ids", q_seg)
        _check_shape("kv_segment_ids", kv_seg, (b, skv), "(b, skv)")
        _check_integer("kv_segment_ids", kv_seg)


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """float64 if any given array is float64, else float32."""
    if any(a.dtype == jnp.float64 for a in arrays):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("window", "impl", "block_sizes", "interpret"))
def _gathered_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    sm_scale: float,
    *,
    window: int,
    impl: str,
    block_sizes: GatheredAttentionBlockSizes,
    interpret: bool = False,
) -> jax.Array:
    """Run ``impl`` on validated inputs; returns ``(b, sq, hq, d)`` in ``q.dtype``.

    ``interpret`` only affects the Pallas kernels (interpret mode on CPU).
    """
    if impl == "pallas_gpu":
        out = pallas_gpu.gathered_attention_pallas_gpu(
            q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window, sm_scale=sm_scale,
            block_kv=block_sizes.gpu_block_kv, stages=block_sizes.gpu_stages, interpret=interpret,
        )
        return out.astype(q.dtype)
    if impl == "pallas_tpu":
        out = pallas_tpu.gathered_attention_pallas_tpu(
            q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window, sm_scale=sm_scale,
            block_q=block_sizes.block_q, block_kv=block_sizes.block_kv,
            interpret=pltpu.InterpretParams() if interpret else False,
        )
        return out.astype(q.dtype)
    cdt = _compute_dtype(q, k, v)
    fn = gathered_attention_reference if impl == "reference" else functools.partial(
        gathered_attention_xla, block_sizes=block_sizes
    )
    out = fn(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window, sm_scale=sm_scale, compute_dtype=cdt)
    return out.astype(q.dtype)
