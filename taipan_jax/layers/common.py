"""Small NNX layers shared by every block: parameters with logical axes, dense, norms, SwiGLU.

Parameters are stored in ``param_dtype`` (float32 by default) and cast to the compute ``dtype``
(bfloat16 for real runs) where they are used, so master weights stay in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from taipan_jax.sharding import constrain

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def make_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
    **metadata,
) -> nnx.Param:
    """An ``nnx.Param`` whose ``out_sharding`` metadata names its logical axes."""
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {shape}")
    return nnx.Param(
        init(rngs.params(), shape, dtype),
        out_sharding=tuple(axes),
        eager_sharding=False,
        **metadata,
    )


def torch_linear_init(fan_in: int) -> Initializer:
    """PyTorch's default Linear / Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def scaled(init: Initializer, factor: float) -> Initializer:
    def f(key, shape, dtype):
        return init(key, shape, dtype) * factor

    return f


def constant(value: float) -> Initializer:
    def f(key, shape, dtype):
        del key
        return jnp.full(shape, value, dtype)

    return f


def from_values(values) -> Initializer:
    """Initialise to fixed values (broadcast to the requested shape)."""

    def f(key, shape, dtype):
        del key
        return jnp.broadcast_to(jnp.asarray(values, dtype), shape)

    return f


def normal(stddev: float) -> Initializer:
    def f(key, shape, dtype):
        return jax.random.normal(key, shape, dtype) * stddev

    return f


class Dense(nnx.Module):
    """``y = x @ W (+ b)`` over the last axis of x; W has shape ``(in, *out)``.

    ``out_features`` may be a tuple (e.g. ``(heads, head_dim)``), producing a multi-axis output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        *,
        axes: Sequence[str | None],
        rngs: nnx.Rngs,
        use_bias: bool = False,
        kernel_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        out = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.in_features = in_features
        self.out_features = out
        self.dtype = dtype
        init = kernel_init or torch_linear_init(in_features)
        self.kernel = make_param(rngs, init, (in_features, *out), axes, param_dtype)
        if use_bias:
            self.bias = make_param(
                rngs, bias_init or torch_linear_init(in_features), out, axes[1:], param_dtype,
                weight_decay=False,
            )
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...].astype(self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), w, axes=((x.ndim - 1,), (0,)))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32; returns float32."""
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(
        self,
        dim: int,
        *,
        rngs: nnx.Rngs,
        eps: float = 1e-5,
        axis_name: str = "embed",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        self.weight = make_param(rngs, constant(1.0), (dim,), (axis_name,), param_dtype, weight_decay=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps).astype(self.dtype)


class GatedRMSNorm(nnx.Module):
    """mamba_ssm's ``RMSNormGated(norm_before_gate=False)``: ``norm(y * silu(z)) * w``.

    The RMS statistic is taken per group of ``group_size`` channels (``d_ssm // ngroups``), as in
    Mamba-2 (it keeps the norm local to a tensor-parallel shard).
    """

    def __init__(
        self,
        dim: int,
        group_size: int,
        *,
        rngs: nnx.Rngs,
        eps: float = 1e-5,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: dim {dim} not divisible by group_size {group_size}")
        self.group_size = group_size
        self.eps = eps
        self.dtype = dtype
        self.weight = make_param(rngs, constant(1.0), (dim,), ("ssm_inner",), param_dtype, weight_decay=False)

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        y = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        shape = y.shape
        g = y.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        var = jnp.mean(jnp.square(g), axis=-1, keepdims=True)
        g = g * jax.lax.rsqrt(var + self.eps)
        return (g.reshape(shape) * self.weight[...].astype(jnp.float32)).astype(self.dtype)


def swiglu_hidden(d_model: int, multiple: int = 128) -> int:
    """mamba_ssm GatedMLP width: ``int(8 * d / 3)`` rounded up to a multiple of ``multiple``."""
    h = int(8 * d_model / 3)
    return (h + multiple - 1) // multiple * multiple


class SwiGLU(nnx.Module):
    """``fc2(fc1_y * silu(fc1_gate))`` without biases (LLaMA / mamba_ssm GatedMLP)."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        rngs: nnx.Rngs,
        out_scale: float = 1.0,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.dtype = dtype
        self.wi = Dense(
            d_model, (2, hidden), axes=("embed", None, "mlp"), rngs=rngs,
            kernel_init=torch_linear_init(d_model), dtype=dtype, param_dtype=param_dtype,
        )
        self.wo = Dense(
            hidden, d_model, axes=("mlp", "embed"), rngs=rngs,
            kernel_init=scaled(torch_linear_init(hidden), out_scale),
            dtype=dtype, param_dtype=param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.wi(x)  # (..., 2, hidden)
        h = constrain(h, ("batch", "length", None, "mlp")) if h.ndim == 4 else h
        y, gate = h[..., 0, :], h[..., 1, :]
        return self.wo(y * jax.nn.silu(gate))
