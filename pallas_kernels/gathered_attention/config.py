"""Tiling configuration for the gathered (windowed, position-masked) attention implementations."""

from __future__ import annotations

import dataclasses
import numbers


@dataclasses.dataclass(frozen=True)
class GatheredAttentionBlockSizes:
    """Block sizes for the blocked gathered-attention algorithms (hashable, usable as a static jit argument).

    Attributes:
        block_q: queries per chunk of the ``"xla"`` implementation (a positive int). Any
            number of queries is accepted; they are padded internally to a multiple of it.
            Peak memory per chunk is about ``b * block_q * min(window, skv) * (2 * hkv * d + hq)``
            floats (the gathered keys/values plus the scores).
    """

    block_q: int = 128

    def __post_init__(self) -> None:
        size = self.block_q
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"block_q must be a positive int, got {size!r}.")
        object.__setattr__(self, "block_q", int(size))
