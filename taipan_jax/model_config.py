"""Typed, validated model configuration (built from the ``model`` section of an ml_collections config).

The model is configured by plain frozen dataclasses so it can be used from notebooks without
ml_collections; :func:`ModelConfig.from_dict` builds one from ``config.model.to_dict()`` and
rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

BLOCK_TYPES = ("mamba2",)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check_keys(cls, d: Mapping[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {unknown}; known keys: {sorted(names)}")


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    D_has_hdim: bool = False
    conv_bias: bool = True
    bias: bool = False
    ssd_impl: str = "auto"

    def validate(self) -> None:
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.mamba.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"model.mamba.dt_min/dt_max must satisfy 0 < dt_min <= dt_max")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    num_groups: int
    block_pattern: str = "mamba2"
    pad_vocab_multiple: int = 128
    tie_embeddings: bool = True
    d_intermediate: int = 0  # SwiGLU hidden size after each mixer; 0 = no MLP (mamba_ssm semantics)
    norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # none | full
    mamba: Mamba2Config = dataclasses.field(default_factory=Mamba2Config)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        _check_keys(cls, d, "config.model")
        mamba = d.pop("mamba", {}) or {}
        _check_keys(Mamba2Config, mamba, "config.model.mamba")
        mamba = {k: tuple(v) if isinstance(v, list) else v for k, v in mamba.items()}
        cfg = cls(**d, mamba=Mamba2Config(**mamba))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived -------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def group(self) -> tuple[str, ...]:
        return parse_block_pattern(self.block_pattern)

    @property
    def blocks(self) -> tuple[str, ...]:
        return self.group * self.num_groups

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def validate(self) -> None:
        if self.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be > 0, got {self.vocab_size}")
        if self.d_model <= 0:
            raise ValueError(f"model.d_model must be > 0, got {self.d_model}")
        if self.num_groups <= 0:
            raise ValueError(f"model.num_groups must be > 0, got {self.num_groups}")
        if self.pad_vocab_multiple <= 0:
            raise ValueError("model.pad_vocab_multiple must be > 0")
        if self.d_intermediate < 0:
            raise ValueError("model.d_intermediate must be >= 0")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"model.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        if self.remat not in ("none", "full"):
            raise ValueError(f"model.remat must be 'none' or 'full', got {self.remat!r}")
        self.group  # parses and validates the pattern
        self.mamba.validate()


def parse_block_pattern(pattern: str) -> tuple[str, ...]:
    """``"mamba2*6,sal"`` -> ``("mamba2",) * 6 + ("sal",)``. Unknown block types raise ValueError."""
    out: list[str] = []
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"model.block_pattern must be a non-empty string, got {pattern!r}")
    for item in pattern.split(","):
        item = item.strip()
        name, _, count = item.partition("*")
        name = name.strip()
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"model.block_pattern: bad repeat count in {item!r}") from None
        if n <= 0:
            raise ValueError(f"model.block_pattern: repeat count must be > 0 in {item!r}")
        if name not in BLOCK_TYPES:
            raise ValueError(
                f"model.block_pattern: unknown block type {name!r}; known types: {list(BLOCK_TYPES)}"
            )
        out.extend([name] * n)
    return tuple(out)
