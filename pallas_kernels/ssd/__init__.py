"""Mamba-2 state space duality (SSD) scan: ``mamba_chunk_scan_combined`` semantics."""

from pallas_kernels.ssd.api import ssd
from pallas_kernels.ssd.config import SSDBlockSizes

__all__ = ["SSDBlockSizes", "ssd"]
