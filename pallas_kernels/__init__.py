"""Standalone JAX kernels (XLA reference paths now, Pallas kernels later).

This package must never import ``taipan_jax``; it is usable on its own.
"""

from pallas_kernels.gathered_attention import GatheredAttentionBlockSizes, gathered_attention
from pallas_kernels.ssd import SSDBlockSizes, ssd

__all__ = ["GatheredAttentionBlockSizes", "SSDBlockSizes", "gathered_attention", "ssd"]
