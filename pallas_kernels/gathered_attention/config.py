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

    For ``"pallas_tpu"`` on a real TPU, a block smaller than its (8-rounded) axis must be a
    multiple of 128 (Mosaic's (8, 128) tiling rule); a block at least as long as the axis is
    shrunk to the whole axis. Interpret mode accepts any size.
    """

    block_q: int = 128
    block_kv: int = 128

    def __post_init__(self) -> None:
        for name in ("block_q", "block_kv"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
                raise ValueError(f"{name} must be a positive int, got {size!r}.")
            object.__setattr__(self, name, int(size))
