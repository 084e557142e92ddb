"""Model presets: Taipan and its baselines at 190M / 450M / 1.3B parameters.

The Taipan paper gives the sizes but no shapes (docs/assumptions.md). All four families share one
width per size, the Llama-3 vocabulary (128,256), tied embeddings and the Mamba-2 defaults; depth
is chosen so each model lands within 3% of its nominal size (checked by tests/test_presets.py).

| size | d_model | taipan / jamba_style groups | mamba2 layers | transformer_pp layers | attention heads x dim |
|------|---------|-----------------------------|---------------|-----------------------|-----------------------|
| 190m | 768     | 3 x (6 mamba2 + 1)          | 24            | 13                    | 12 x 64               |
| 450m | 1024    | 6 x (6 mamba2 + 1)          | 48            | 25                    | 16 x 64               |
| 1_3b | 2048    | 5 x (6 mamba2 + 1)          | 40            | 21                    | 16 x 128              |
"""

from __future__ import annotations

import ml_collections

from taipan_jax.config import base_config

LLAMA3_VOCAB = 128_256

SIZES = {
    "190m": dict(d_model=768, groups=3, mamba2_layers=24, tpp_layers=13, heads=12, head_dim=64),
    "450m": dict(d_model=1024, groups=6, mamba2_layers=48, tpp_layers=25, heads=16, head_dim=64),
    "1_3b": dict(d_model=2048, groups=5, mamba2_layers=40, tpp_layers=21, heads=16, head_dim=128),
}
FAMILIES = ("taipan", "mamba2", "transformer_pp", "jamba_style")


def preset_config(family: str, size: str) -> ml_collections.ConfigDict:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    s = SIZES[size]
    c = base_config()
    m = c.model
    m.vocab_size = LLAMA3_VOCAB
    m.d_model = s["d_model"]
    m.tie_embeddings = True
    for sub in (m.attention, m.sal):
        sub.num_heads = s["heads"]
        sub.num_kv_heads = s["heads"]
        sub.head_dim = s["head_dim"]
    if family == "taipan":
        m.block_pattern, m.num_groups = "mamba2*6,sal", s["groups"]
    elif family == "jamba_style":
        m.block_pattern, m.num_groups = "mamba2*6,attention", s["groups"]
    elif family == "mamba2":
        m.block_pattern, m.num_groups = "mamba2", s["mamba2_layers"]
    else:
        m.block_pattern, m.num_groups = "attention", s["tpp_layers"]
    # Taipan §4: 4096-token context, 0.5M tokens per step (128 x 4096).
    c.data.seq_len = 4096
    c.train.global_batch_size = 128
    return c
