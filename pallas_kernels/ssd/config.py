"""Tiling configuration for the SSD implementations.

TPU VMEM per TensorCore, by chip generation
===========================================

Used by the ``"pallas_tpu"`` kernel (:mod:`pallas_kernels.ssd.pallas_tpu`) to pick
default block sizes and to decide whether a call fits on chip.

=========  ==============  ====================  =====================  ============
chip       physical VMEM   XLA default scoped    budget used here       MXU width
           per TensorCore  VMEM limit            (``vmem_budget``)      (lanes)
=========  ==============  ====================  =====================  ============
v4         16 MiB          16 MiB (unconfirmed)  16 MiB                 128
v5e        128 MiB         16 MiB (unconfirmed)  96 MiB                 128
v5p        64 MiB [*]      16 MiB (unconfirmed)  48 MiB                 128
v6e        128 MiB         32 MiB                96 MiB                 256
=========  ==============  ====================  =====================  ============

Sources:

* Physical VMEM and MXU width: ``jax._src.tpu_info._get_tpu_info_impl`` in the
  installed jax 0.11.2 (``vmem_capacity_bytes``: v4 ``16 * 1024 * 1024``, v5e
  ``128 * 1024 * 1024``, v5p ``64 * 1024 * 1024``, v6e ``128 * 1024 * 1024``, all
  commented "per core"; ``mxu_column_size`` 128 before generation 6, 256 from 6).
  The same function renders the table on https://docs.jax.dev/en/latest/pallas/tpu/hardware.html
  ("TPU Hardware Reference", per-TensorCore figures).
* [*] v5p conflict: the Pallas "Software Pipelining" tutorial
  (https://docs.jax.dev/en/latest/pallas/pipelining.html) says "TPU v5p contains
  96MB of VMEM", while jax's own ``tpu_info`` says 64 MiB per core. Not resolved
  here; the smaller figure is used.
* Default scoped-VMEM limit (``--xla_tpu_scoped_vmem_limit_kib``): 32 MiB on v6e
  (and 7x) is confirmed by the compile errors quoted in
  vllm-project/tpu-inference PR #3407 ("limit 32.00M" on tpu6e/tpu7x) and PR #3194
  ("XLA's 32 MiB default"). The 16 MiB figure for v4 / v5e / v5p is the commonly
  quoted value but I could not confirm it from a primary source; treat it as
  unconfirmed. Kernels may raise the limit with
  ``pltpu.CompilerParams(vmem_limit_bytes=...)`` up to the physical capacity.
* "budget used here" is this package's choice (not a hardware fact): the whole VMEM
  on v4, ~3/4 of it elsewhere, leaving room for Mosaic's internal scratch and
  register spills. The kernel only asks for more than 16 MiB (via
  ``vmem_limit_bytes``) when its own estimate exceeds 16 MiB.

No number above was measured on hardware (no TPU was available when this was
written).
"""

from __future__ import annotations

import dataclasses
import numbers

_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TPUGenerationDefaults:
    """Per-generation facts and defaults for the Pallas TPU SSD kernel (see the module table).

    Attributes:
        vmem_capacity_bytes: physical VMEM per TensorCore.
        vmem_budget_bytes: most VMEM the kernel will ask for (``vmem_limit_bytes``).
        mxu_lanes: MXU width; the default ``tpu_heads_per_block`` makes a block at
            least this many lanes wide (``heads_per_block * headdim >= mxu_lanes``).
    """

    vmem_capacity_bytes: int
    vmem_budget_bytes: int
    mxu_lanes: int


#: Keys are ``str(pltpu.ChipVersion)`` values; ``None`` is used when the chip is
#: unknown (e.g. lowering for TPU on a CPU host) and takes the most conservative
#: entry (v4).
TPU_GENERATION_DEFAULTS: dict[str | None, TPUGenerationDefaults] = {
    "v4": TPUGenerationDefaults(vmem_capacity_bytes=16 * _MIB, vmem_budget_bytes=16 * _MIB, mxu_lanes=128),
    "v5e": TPUGenerationDefaults(vmem_capacity_bytes=128 * _MIB, vmem_budget_bytes=96 * _MIB, mxu_lanes=128),
    "v5p": TPUGenerationDefaults(vmem_capacity_bytes=64 * _MIB, vmem_budget_bytes=48 * _MIB, mxu_lanes=128),
    "v6e": TPUGenerationDefaults(vmem_capacity_bytes=128 * _MIB, vmem_budget_bytes=96 * _MIB, mxu_lanes=256),
    None: TPUGenerationDefaults(vmem_capacity_bytes=16 * _MIB, vmem_budget_bytes=16 * _MIB, mxu_lanes=128),
}

#: VMEM a kernel may use without setting ``vmem_limit_bytes`` (the smallest default
#: scoped limit in the table above).
TPU_DEFAULT_SCOPED_VMEM_BYTES = 16 * _MIB


def tpu_generation_defaults(chip: str | None) -> TPUGenerationDefaults:
    """Defaults for ``chip`` (``"v4"``, ``"v5e"``, ``"v5p"``, ``"v6e"``); unknown chips get the v4 entry."""
    return TPU_GENERATION_DEFAULTS.get(chip, TPU_GENERATION_DEFAULTS[None])


def _check_optional_positive_int(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SSDBlockSizes:
    """Block sizes for the chunked SSD algorithm (hashable, usable as a static jit argument).

    Attributes:
        chunk_size: tokens per chunk ``Q`` (a positive int). Any sequence length
            is accepted; the sequence is padded internally to a multiple of it.
        tpu_heads_per_block: heads handled per grid step by the ``"pallas_tpu"``
            kernel (must divide ``h // g``). ``None``: per-generation default, the
            smallest divisor ``k`` of ``h // g`` with ``k * headdim`` a multiple of 128
            and at least the chip's MXU width (table above), shrunk if the VMEM
            estimate exceeds the budget.
        tpu_vmem_limit_bytes: ``vmem_limit_bytes`` passed to Mosaic. ``None``: left
            to the compiler when the kernel's VMEM estimate is under 16 MiB, else
            ``min(2 * estimate, per-generation budget)``.
        gpu_chunk: tokens per chunk of the ``"pallas_gpu"`` kernel (a positive multiple
            of 64). That kernel fuses the inter-chunk scan, so its chunk is independent
            of ``chunk_size`` (results agree to rounding); 64 keeps the ``T x T`` decay
            block and the float32 state in one warpgroup's registers.
        gpu_block_v: value columns per CTA of the ``"pallas_gpu"`` kernel (``p`` in the
            forward, ``n`` in the backward's ``dB`` / ``dC`` scans; a positive multiple
            of 64). State rows are independent, so value blocks run in parallel.
        gpu_stages: input buffers per CTA of the ``"pallas_gpu"`` kernel: 1 loads chunk
            ``c + 1`` once chunk ``c`` is done (less shared memory, two CTAs per SM), 2
            prefetches one chunk ahead. ``None``: 1 for an inference forward without a
            sequence split, else 2 (where shared memory allows).
        gpu_seq_split: segments each sequence is cut into for the ``"pallas_gpu"``
            kernel, run by separate CTAs (a states-only pre-pass links them). ``None``:
            automatic, doubling while there are fewer than two CTAs per SM and segments
            keep at least 16 chunks; ``1``: off. Ignored when it does not divide the
            number of chunks.
    """

    chunk_size: int = 256
    tpu_heads_per_block: int | None = None
    tpu_vmem_limit_bytes: int | None = None
    gpu_chunk: int = 64
    gpu_block_v: int = 64
    gpu_stages: int | None = None
    gpu_seq_split: int | None = None

    def __post_init__(self) -> None:
        size = self.chunk_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {size!r}.")
        object.__setattr__(self, "chunk_size", int(size))
        for name in ("tpu_heads_per_block", "tpu_vmem_limit_bytes"):
            value = getattr(self, name)
            _check_optional_positive_int(name, value)
            if value is not None:
                object.__setattr__(self, name, int(value))
        for name in ("gpu_chunk", "gpu_block_v"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0 or value % 64:
                raise ValueError(f"{name} must be a positive multiple of 64, got {value!r}.")
            object.__setattr__(self, name, int(value))
        if self.gpu_stages is not None and (isinstance(self.gpu_stages, bool) or self.gpu_stages not in (1, 2)):
            raise ValueError(f"gpu_stages must be 1 or 2, got {self.gpu_stages!r}.")
        _check_optional_positive_int("gpu_seq_split", self.gpu_seq_split)
