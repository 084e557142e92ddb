"""Tiling configuration for the SSD implementations."""

from __future__ import annotations

import dataclasses
import numbers


@dataclasses.dataclass(frozen=True)
class SSDBlockSizes:
    """Block sizes for the chunked SSD algorithm (hashable, usable as a static jit argument).

    Attributes:
        chunk_size: tokens per chunk ``Q`` (a positive int). Any sequence length
            is accepted; the sequence is padded internally to a multiple of it.
    """

    chunk_size: int = 256

    def __post_init__(self) -> None:
        size = self.chunk_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {size!r}.")
        object.__setattr__(self, "chunk_size", int(size))
