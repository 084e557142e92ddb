"""Analytic FLOPs per token, for tokens/s -> MFU. Counted per architecture; see docs/assumptions.md.

Training FLOPs per token = 3 x forward (forward + backward's two matmuls per forward matmul):

* every matmul weight (projections, SwiGLU, LM head — tied or not; not the embedding lookup):
  2 FLOPs per weight per token forward;
* Mamba-2 SSD (chunked algorithm as executed, chunk Q, per head): intra-chunk C·Bᵀ and its
  product with x computed densely over the chunk, 2·Q·(N + P); chunk states Bᵀx and the
  state-to-output C·S, 2·N·P each: per token 2·Q·(N+P) + 4·N·P per head;
* softmax attention: 4·d_head per (query, key) pair per head (QKᵀ and PV), with the average number
  of keys per query under the causal window; a SAL in dense mode pays for every query, in gathered
  mode for C of them (selected queries at the budget).

Elementwise work (norms, gates, convolutions, softmax exponentials) is not counted, as is usual
for MFU.
"""

from __future__ import annotations

from taipan_jax.model_config import ModelConfig


def _avg_keys(seq_len: int, window: int) -> float:
    """Mean over query positions i in [0, L) of min(i + 1, window)."""
    w = min(window, seq_len) if window > 0 else seq_len
    # positions 0..w-1 see i+1 keys; positions w..L-1 see w keys
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def matmul_params(cfg: ModelConfig) -> int:
    """Weights used in matmuls, per token, counted once per use."""
    d = cfg.d_model
    m = cfg.mamba
    total = 0
    for name in cfg.blocks:
        if name == "mamba2":
            d_inner = m.expand * d
            h = d_inner // m.headdim
            total += d * (2 * d_inner + 2 * m.ngroups * m.d_state + h) + d_inner * d
            if cfg.d_intermediate:
                total += 3 * d * cfg.d_intermediate
        elif name in ("sal", "attention"):
            a = cfg.sal if name == "sal" else cfg.attention
            hidden = a.d_intermediate or _swiglu(d)
            total += d * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + a.num_heads * a.head_dim * d
            total += 3 * d * hidden
            if name == "sal":
                total += 2 * d
    total += d * cfg.padded_vocab_size  # LM head
    return total


def _swiglu(d: int) -> int:
    from taipan_jax.layers.common import swiglu_hidden

    return swiglu_hidden(d)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    flops = 2.0 * matmul_params(cfg)
    m = cfg.mamba
    for name in cfg.blocks:
        if name == "mamba2":
            h = m.expand * cfg.d_model // m.headdim
            q = min(m.chunk_size, seq_len)
            flops += h * (2 * q * (m.d_state + m.headdim) + 4 * m.d_state * m.headdim)
        elif name == "sal":
            s = cfg.sal
            frac = 1.0 if s.attention == "dense" else s.capacity
            flops += frac * 4 * s.head_dim * s.num_heads * _avg_keys(seq_len, s.window)
        elif name == "attention":
            a = cfg.attention
            flops += 4 * a.head_dim * a.num_heads * _avg_keys(seq_len, a.window)
    return flops


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, seq_len)


# Dense bf16 peak per chip (vendor datasheets), for MFU.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None
