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

BLOCK_TYPES = ("mamba2", "sal", "attention")

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
    ssd_interpret: bool = False  # run a Pallas impl in interpret mode (tests on CPU)
    ssd_shard_map: str = "auto"  # auto (when the impl is a Pallas kernel) | always | never

    def validate(self) -> None:
        if self.ssd_shard_map not in ("auto", "always", "never"):
            raise ValueError(f"model.mamba.ssd_shard_map must be auto|always|never, got {self.ssd_shard_map!r}")
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.mamba.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"model.mamba.dt_min/dt_max must satisfy 0 < dt_min <= dt_max")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The ``attention`` block (Transformer++ layer / Jamba-style attention): RoPE, full causal."""

    num_heads: int = 12
    num_kv_heads: int = 12
    head_dim: int = 64
    positional: str = "rope"  # rope | none
    rope_theta: float = 10_000.0
    window: int = 0  # 0 = full causal attention
    d_intermediate: int = 0  # SwiGLU width; 0 = int(8 d / 3) rounded up to 128
    impl: str = ""  # jax.nn.dot_product_attention implementation: "" (best available) | xla | cudnn
    max_decode_len: int = 8192  # KV-cache length for decoding when window == 0

    def validate(self, where: str = "model.attention") -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{where}.num_heads must be a multiple of num_kv_heads")
        if self.positional not in ("rope", "none"):
            raise ValueError(f"{where}.positional must be 'rope' or 'none', got {self.positional!r}")
        if self.window < 0:
            raise ValueError(f"{where}.window must be >= 0 (0 = full causal), got {self.window}")
        if self.impl not in ("", "xla", "cudnn"):
            raise ValueError(f"{where}.impl must be '', 'xla' or 'cudnn', got {self.impl!r}")
        if self.max_decode_len <= 0:
            raise ValueError(f"{where}.max_decode_len must be > 0")


@dataclasses.dataclass(frozen=True)
class SALConfig:
    """The Selective Attention Layer. Defaults and reasons: docs/assumptions.md."""

    capacity: float = 0.15  # C: target fraction of tokens that attend
    budget_weight: float = 1.0  # lambda of the budget loss
    tau: float = 1.0  # Gumbel-softmax temperature
    tau_min: float = 0.5
    tau_anneal_rate: float = 0.0  # tau_t = max(tau_min, tau * exp(-rate * step)); 0 = constant
    gate: str = "linear"  # linear | mlp
    gate_hidden: int = 0  # mlp gate width (0 = d_model // 4)
    num_heads: int = 12
    num_kv_heads: int = 12
    head_dim: int = 64
    window: int = 2048
    positional: str = "none"  # none | rope
    rope_theta: float = 10_000.0
    kv_source: str = "all"  # all | selected
    attention: str = "dense"  # dense | gathered
    capacity_factor: float = 2.0  # gathered mode buffer: k_max = ceil(capacity_factor * C * L)
    gate_init_frac: float = 0.0  # initial P(select) set through the gate bias; 0 = C
    d_intermediate: int = 0  # SwiGLU width; 0 = int(8 d / 3) rounded up to 128
    impl: str = "auto"  # pallas_kernels.gathered_attention impl (gathered mode)
    dense_impl: str = ""  # jax.nn.dot_product_attention implementation (dense mode): "" (jax picks) | xla | cudnn
    # evaluation / decoding selection: "sampled" = the training distribution's hard sample with
    # Gumbel noise keyed by (eval_seed, SAL, token position): deterministic, P(select) = alpha;
    # "threshold" = [s_1 > s_0]. Reasons: docs/assumptions.md.
    eval_selection: str = "sampled"
    eval_seed: int = 0

    def validate(self) -> None:
        w = "model.sal"
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"{w}.capacity (C) must be in (0, 1], got {self.capacity}")
        if self.window <= 0:
            raise ValueError(f"{w}.window must be > 0, got {self.window}")
        if self.budget_weight < 0:
            raise ValueError(f"{w}.budget_weight must be >= 0")
        if not 0 < self.tau_min <= self.tau:
            raise ValueError(f"{w}: need 0 < tau_min <= tau, got tau={self.tau}, tau_min={self.tau_min}")
        if self.gate not in ("linear", "mlp"):
            raise ValueError(f"{w}.gate must be 'linear' or 'mlp', got {self.gate!r}")
        if self.kv_source not in ("all", "selected"):
            raise ValueError(f"{w}.kv_source must be 'all' or 'selected', got {self.kv_source!r}")
        if self.attention not in ("dense", "gathered"):
            raise ValueError(f"{w}.attention must be 'dense' or 'gathered', got {self.attention!r}")
        if self.eval_selection not in ("sampled", "threshold"):
            raise ValueError(f"{w}.eval_selection must be 'sampled' or 'threshold', got {self.eval_selection!r}")
        if self.dense_impl not in ("", "xla", "cudnn"):
            raise ValueError(f"{w}.dense_impl must be '', 'xla' or 'cudnn', got {self.dense_impl!r}")
        if not 0.0 <= self.gate_init_frac < 1.0:
            raise ValueError(f"{w}.gate_init_frac must be in [0, 1) (0 = capacity), got {self.gate_init_frac}")
        if self.capacity_factor <= 0:
            raise ValueError(f"{w}.capacity_factor must be > 0")
        if self.positional not in ("rope", "none"):
            raise ValueError(f"{w}.positional must be 'rope' or 'none', got {self.positional!r}")
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{w}.{name} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{w}.num_heads must be a multiple of num_kv_heads")


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
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    sal: SALConfig = dataclasses.field(default_factory=SALConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        _check_keys(cls, d, "config.model")
        subs = {}
        for key, sub_cls in (("mamba", Mamba2Config), ("attention", AttentionConfig), ("sal", SALConfig)):
            sub = dict(d.pop(key, {}) or {})
            _check_keys(sub_cls, sub, f"config.model.{key}")
            subs[key] = sub_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()})
        cfg = cls(**d, **subs)
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
        group = self.group  # parses and validates the pattern
        self.mamba.validate()
        if "attention" in group:
            self.attention.validate()
        if "sal" in group:
            self.sal.validate()


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
