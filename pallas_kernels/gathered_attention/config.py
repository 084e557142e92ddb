"""Tiling configuration for the gathered (windowed, position-masked) attention implementations."""

from __future__ import annotations

import dataclasses
import numbers


@dataclasses.dataclass(frozen=True)
class GatheredAttentionBlockSizes:
    """Block sizes for the blocked gathered-attention algorithms (hashable, usable as a static jit argument).

    Attributes:
        block_q: queries per chunk of the ``"xla"`` implementation and per block of the
            ``"pallas_tpu"`` kernels (a positive int). Any number of queries is accepted;
            they are padded internally to a multiple of it. Peak memory per ``"xla"`` chunk
            is about ``b * block_q * min(window, skv) * (2 * hkv * d + hq)`` floats (the
            gathered keys/values plus the scores).
        block_kv: keys per block of the ``"pallas_tpu"`` kernels (a positive int; unused by
            ``"xla"``). Keys are padded internally to a multiple of it.

        gpu_block_kv: keys per streamed block of the ``"pallas_gpu"`` forward and dq kernels (a
            positive multiple of 64; float32 / float16 inputs, which run the hi/lo bfloat16
            split, use at most 64). The GPU kernels' query tiles are fixed by the hardware:
            64 rows per compute warpgroup, two warpgroups per CTA (see ``pallas_gpu``).
        gpu_stages: shared-memory pipeline slots of the ``"pallas_gpu"`` kernels (1 to 4;
            fewer are used where they do not fit in the 227 KiB per CTA).

    For ``"pallas_tpu"`` on a real TPU, a block smaller than its (8-rounded) axis must be a
    multiple of 128 (Mosaic's (8, 128) tiling rule); a block at least as long as the axis is
    shrunk to the whole axis. Interpret mode accepts any size.
    """

    block_q: int = 128
    block_kv: int = 128
    gpu_block_kv: int = 128
    gpu_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_q", "block_kv"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
                raise ValueError(f"{name} must be a positive int, got {size!r}.")
            object.__setattr__(self, name, int(size))
        g = self.gpu_block_kv
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g <= 0 or g % 64:
            raise ValueError(f"gpu_block_kv must be a positive multiple of 64, got {g!r}.")
        st = self.gpu_stages
        if isinstance(st, bool) or not isinstance(st, numbers.Integral) or not 1 <= st <= 4:
            raise ValueError(f"gpu_stages must be an int in [1, 4], got {st!r}.")
        object.__setattr__(self, "gpu_block_kv", int(g))
        object.__setattr__(self, "gpu_stages", int(st))
