"""Float32 accuracy from bfloat16 tensor cores: split a value into ``hi + lo`` bfloat16 parts.

The Mosaic GPU kernels run wgmma on bfloat16 operands; for float32 (or float16) inputs they
multiply ``hi.hi + hi.lo + lo.hi`` (three wgmmas), about 2^-16 relative error per product.
Usable inside kernels (Lane semantics) and in plain JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def truncate_to_bf16(a: jax.Array) -> jax.Array:
    """float32 ``a`` rounded (half away from zero) to the nearest bfloat16, kept in float32.

    Integer bit arithmetic rather than ``a.astype(bf16).astype(f32)``: XLA's
    excess-precision simplification may fold that round trip to ``a`` under jit, which
    would zero the ``lo`` part of the split below.
    """
    bits = lax.bitcast_convert_type(a, jnp.int32)
    bits = (bits + jnp.int32(0x8000)) & jnp.int32(-65536)
    return lax.bitcast_convert_type(bits, jnp.float32)


def split_bf16(a: jax.Array, nterm: int) -> tuple[jax.Array, ...]:
    """``nterm`` bfloat16 parts summing to ``a``: ``(bf16,)``, ``(hi, lo)`` (~2^-16 relative) or
    ``(hi, mid, lo)`` (~2^-24: float32 accuracy)."""
    if nterm == 1:
        return (a.astype(jnp.bfloat16),)
    rest = a.astype(jnp.float32)
    parts = []
    for _ in range(nterm - 1):
        part = truncate_to_bf16(rest)
        parts.append(part.astype(jnp.bfloat16))
        rest = rest - part
    return (*parts, rest.astype(jnp.bfloat16))
