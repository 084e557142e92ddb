"""Gathered attention: sliding-window attention between tokens addressed by their positions."""

from pallas_kernels.gathered_attention.api import gathered_attention
from pallas_kernels.gathered_attention.config import GatheredAttentionBlockSizes

__all__ = ["GatheredAttentionBlockSizes", "gathered_attention"]
