"""Analytic per-device memory of one training step, for sizing a launch without compiling it.

``estimate(config, mesh_sizes)`` -> :class:`MemoryEstimate`: parameters, AdamW state, gradients,
working copies of the weights, activations saved for the backward pass (under ``model.remat``)
and the loss head, each with the assumption behind it (``.assumptions``). ``python -m
taipan_jax.compile_check`` prints it beside XLA's compiled numbers, with the ratio.

What is exact and what is modelled:

* **exact** — parameter and AdamW-state bytes per device (and the gradients' own buffer): every
  parameter's shard comes from the same logical-axis rules the trainer uses
  (``taipan_jax.sharding``), applied to the abstract model (no weights are allocated).
* **modelled** — everything that depends on how XLA schedules the step: gradient and update
  temporaries, the compute-dtype copies of the weights kept for the backward pass, the
  activations each block keeps per token, the logits buffers of the loss. The per-block counts
  are the tensors the block's backward reads that XLA keeps, counted in the buffer assignment of
  the compiled step; they are listed in ``.assumptions``, and ``docs/launch.md`` gives the ratios
  to XLA's compiled numbers (CPU and TPU) that they achieve.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

GiB = 1024**3
MiB = 1024**2

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class MemoryEstimate:
    """Per-device bytes of one training step (see the module docstring).

    ``total = params + optimizer + weight_copies + activations + max(grads, loss_head)``: the
    gradients (with the optimizer update's temporaries) and the loss head's logits are the two
    transient peaks of a step, at its two ends.
    """

    params: int
    optimizer: int
    weight_copies: int
    activations: int
    grads: int
    loss_head: int
    assumptions: list[str]
    micro_batch: int  # sequences per device per micro-batch
    seq_len: int

    @property
    def state(self) -> int:
        """What persists between steps (the donated train state)."""
        return self.params + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.weight_copies + self.activations + max(self.grads, self.loss_head)

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("params", self.params),
            ("optimizer state (AdamW mu, nu)", self.optimizer),
            ("weight copies (compute dtype / gathered)", self.weight_copies),
            ("activations saved for backward", self.activations),
            ("gradients + update temporaries (peak a)", self.grads),
            ("loss head: logits, dlogits (peak b)", self.loss_head),
            ("total = above, with max(peak a, peak b)", self.total),
        ]

    def table(self) -> str:
        return "\n".join(f"  {name:<44s} {fmt_bytes(v):>12s}" for name, v in self.rows())


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def _shard_factor(spec, mesh_sizes: Mapping[str, int]) -> int:
    f = 1
    for entry in spec:
        if entry is None:
            continue
        for ax in (entry,) if isinstance(entry, str) else entry:
            f *= int(mesh_sizes[ax])
    return f


def param_layout(model_cfg, rules, mesh_sizes: Mapping[str, int]) -> list[dict[str, Any]]:
    """One row per parameter: path, shape, dtype bytes, and the per-device shard divisors.

    ``shards`` divides the parameter over all its mesh axes (how it is stored); ``tp_shards`` over
    its non-``fsdp`` axes only (how it is held after an FSDP all-gather, for the matmuls).
    """
    import jax
    from flax import nnx

    from taipan_jax.model import abstract_model
    from taipan_jax.sharding import logical_to_mesh

    _, abs_params = nnx.split(abstract_model(model_cfg), nnx.Param)
    rows = []
    leaves = jax.tree_util.tree_leaves_with_path(abs_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, v in leaves:
        spec = logical_to_mesh(v.get_metadata().get("out_sharding"), rules, shape=v.shape,
                               mesh_shape=dict(mesh_sizes))
        shards = _shard_factor(spec, mesh_sizes)
        no_fsdp = {k: (1 if k == "fsdp" else s) for k, s in mesh_sizes.items()}
        rows.append(dict(
            path="/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path),
            size=math.prod(v.shape), itemsize=v.dtype.itemsize, ndim=len(v.shape),
            shards=shards, tp_shards=_shard_factor(spec, no_fsdp),
        ))
    return rows


def _div(n: int, k: int) -> int:
    """``n / k`` if ``k`` divides ``n`` (the dimension is sharded), else ``n`` (replicated)."""
    return n // k if k > 1 and n % k == 0 else n


def block_bytes_per_token(kind: str, cfg, seq_len: int, tp: int, remat: bool = False) -> tuple[float, str]:
    """Bytes one block keeps per token for its backward pass (remat none), and how they add up.

    The counts are the tensors JAX's autodiff saves for the block (``jax.ad_checkpoint``'s saved
    residuals of the code as written) that survive XLA's fusion, as listed in the buffer assignment
    of the compiled step (taipan_190m on 8 CPU devices; the TPU v5e compile agrees within a few %).
    With ``remat=True`` (a group recomputed inside its backward pass) the elementwise intermediates
    fuse into their consumers there, so only the outputs of contractions (matmuls, the SSD's
    chunk matrices, attention scores) are counted.
    """
    c = _DTYPE_BYTES[cfg.dtype]
    d = cfg.d_model
    if kind == "mamba2":
        m = cfg.mamba
        h = _div(m.expand * d // m.headdim, tp)  # heads on this device
        d_in = h * m.headdim
        gn = _div(m.ngroups, tp) * m.d_state
        q = m.chunk_size
        pad = math.ceil(seq_len / q) * q / seq_len  # the sequence is padded to whole chunks
        f32 = (
            20 * d_in  # conv taps (4) and pre-activation, SiLU, SSD x / y / D*x, gated norm (y, silu z, ...)
            + 7 * 2 * gn  # B|C: conv taps and activations
            + 3 * d  # residual stream in, RMSNorm statistics / output
            + pad * (3 * h * q  # per chunk: exp(segsum) decay, C.B^T and their product, (heads, Q, Q)
                     + 2 * h * m.d_state  # B, C broadcast to the heads
                     + h * m.headdim * m.d_state / q)  # the state entering each chunk
        )
        low = c * (d_in + d)  # in_proj input and out_proj input in the compute dtype
        total = 4 * f32 + low
        ssd = 4 * pad * (3 * h * q + 2 * h * m.d_state)
        if remat:  # recomputed in the backward pass: only contraction outputs are materialised
            return ssd + c * (2 * d_in + 2 * gn + h) + c * d_in, "mamba2 (recomputed): SSD matrices, in_proj outputs"
        kernel = " (this assumes the chunked xla SSD; a Pallas kernel keeps less)" if m.ssd_impl.startswith("pallas") else ""
        return total, (
            f"mamba2{kernel}: {(total - ssd) / 1e3:.1f} KB/token (20 f32 d_inner-wide + 7 f32 B|C-wide + 3 f32 d_model-wide "
            f"+ d_inner and d_model in {cfg.dtype}) + {ssd / 1e3:.1f} KB/token in the chunked SSD "
            f"(3 f32 heads x chunk matrices, B and C per head)"
        )
    if kind in ("sal", "attention"):
        a = cfg.sal if kind == "sal" else cfg.attention
        hq, hkv = _div(a.num_heads, tp), _div(a.num_kv_heads, tp)
        hd = a.head_dim
        from taipan_jax.layers.common import swiglu_hidden

        f = _div(a.d_intermediate or swiglu_hidden(d), tp)
        gathered = kind == "sal" and a.attention == "gathered"
        if gathered:
            k_max = min(seq_len, max(1, math.ceil(a.capacity_factor * a.capacity * seq_len)))
            frac = k_max / seq_len
            keys = min(a.window, seq_len)
        else:
            frac = 1.0
            keys = seq_len  # jax.nn.dot_product_attention (XLA) materialises the L x L scores
        dense = (
            4 * 8 * d  # residual stream, two RMSNorms, the SAL mix (f32)
            + c * 3 * d  # normed inputs, attention output (compute dtype)
            + c * (hq + 2 * hkv) * hd  # q, k, v
            + c * 6 * f  # SwiGLU: fc1 (y | gate), silu, product
        )
        scores = frac * hq * keys * (4 + c)  # softmax in f32 + probabilities in the compute dtype
        if remat:
            return scores + c * (hq + 2 * hkv) * hd + c * 2 * f, f"{kind} (recomputed): scores, q/k/v, SwiGLU fc1"
        return dense + scores, (
            f"{kind}: {dense / 1e3:.1f} KB/token (8 f32 d_model-wide, 3 d_model + q/k/v + 6 SwiGLU-wide in "
            f"{cfg.dtype}) + {scores / 1e3:.1f} KB/token of attention scores "
            f"({'gathered: selected queries x window' if gathered else 'dense: every query x all L keys, as XLA materialises them'})"
        )
    raise ValueError(f"unknown block type {kind!r}")


def estimate(config, mesh_sizes: Mapping[str, int], model_cfg=None) -> MemoryEstimate:
    """Per-device memory of ``Trainer._train_step`` for ``config`` on a mesh of ``mesh_sizes``."""
    from taipan_jax.model_config import ModelConfig

    cfg = model_cfg or ModelConfig.from_dict(config.model.to_dict())
    rules = tuple(map(tuple, config.mesh.rules))
    tc, L = config.train, int(config.data.seq_len)
    sizes = {k: int(mesh_sizes.get(k, 1)) for k in ("data", "fsdp", "tensor")}
    dp, tp, fsdp = sizes["data"] * sizes["fsdp"], sizes["tensor"], sizes["fsdp"]
    accum = int(tc.grad_accum_steps)
    b = max(int(tc.global_batch_size) // (dp * accum), 1)
    tokens = b * L
    c = _DTYPE_BYTES[cfg.dtype]
    notes: list[str] = [
        f"mesh data={sizes['data']} fsdp={fsdp} tensor={tp}; per device per micro-batch: {b} sequences x {L} "
        f"tokens (global batch {tc.global_batch_size} / data-parallel {dp} / grad_accum {accum})",
        f"compute dtype {cfg.dtype}, param dtype {cfg.param_dtype}, remat={cfg.remat}",
    ]

    rows = param_layout(cfg, rules, sizes)
    params = sum(math.ceil(r["size"] / r["shards"]) * r["itemsize"] for r in rows)
    n_local = sum(math.ceil(r["size"] / r["shards"]) for r in rows)
    del n_local
    optimizer = 2 * params  # optax.adamw: mu and nu in the parameters' dtype
    grads = params * (2 if accum > 1 else 1)  # gradients in the parameters' dtype
    notes.append("params and AdamW mu/nu: exact per-device shards from the logical-axis rules")
    notes.append("gradients: one param-sized buffer" + (" plus the accumulator (grad_accum > 1)" if accum > 1 else ""))
    # The optimizer update keeps old and new values of a leaf at once (the non-finite guard selects
    # between them): XLA materialises new AdamW moments of the largest leaf before the select.
    largest = max(math.ceil(r["size"] / r["shards"]) * r["itemsize"] for r in rows)
    grads += 2 * largest
    notes.append(f"update temporaries: new mu and nu of the largest leaf ({fmt_bytes(largest)}) before the guard's select")
    # The tied embedding receives two gradients (the lookup's scatter-add and the LM head's
    # matmul), each a (vocab, d) buffer before they are summed, and under fsdp each is whole
    # (over fsdp) until it is reduce-scattered.
    embed = next((r for r in rows if r["path"].startswith("embed")), None)
    embed_grad = 0 if embed is None else math.ceil(embed["size"] / embed["tp_shards"]) * embed["itemsize"]
    if cfg.tie_embeddings and embed is not None:
        grads += 2 * embed_grad - math.ceil(embed["size"] / embed["shards"]) * embed["itemsize"]
        notes.append("tied embedding: two (vocab x d) gradients (lookup's scatter-add, head's matmul), "
                     + ("whole over fsdp until reduce-scattered" if fsdp > 1 else "summed into one"))

    # Weights used by matmuls are converted to the compute dtype (and all-gathered over fsdp);
    # the backward pass needs them, so one copy of every matrix is alive at the peak.
    pdt = _DTYPE_BYTES[cfg.param_dtype]
    need_copy = c != pdt or fsdp > 1
    weight_copies = 0
    if need_copy:
        weight_copies = sum(math.ceil(r["size"] / r["tp_shards"]) * c for r in rows if r["ndim"] >= 2)
        notes.append(
            f"weight copies: every matrix in {cfg.dtype}" + (" gathered over fsdp" if fsdp > 1 else "")
            + ", kept for the backward pass"
        )

    remat = cfg.remat == "full"
    per_block: dict[str, float] = {}
    for kind in sorted(set(cfg.group)):
        per_block[kind], note = block_bytes_per_token(kind, cfg, L, tp)
        notes.append(note)
    group_bytes = sum(per_block[k] for k in cfg.group)  # one group, per token
    if remat:
        # Saved: each group's input (the f32 residual stream); one group is recomputed at a time.
        working = sum(block_bytes_per_token(k, cfg, L, tp, remat=True)[0] for k in cfg.group)
        activations = tokens * (cfg.num_groups * 4 * cfg.d_model + working)
        notes.append(
            f"remat=full: {cfg.num_groups} group inputs (f32 residual stream) + one group recomputed during its "
            f"backward, of which only contraction outputs are materialised ({working / 1e3:.0f} KB/token; "
            f"{group_bytes / 1e3:.0f} KB/token without remat)"
        )
    else:
        activations = tokens * cfg.num_groups * group_bytes
        notes.append(f"remat=none: every block's activations for all {cfg.num_groups} groups "
                     f"({group_bytes / 1e3:.0f} KB/token per group)")
    activations += tokens * 4 * cfg.d_model * 2  # embedding output, final norm (f32)

    v_local = _div(cfg.padded_vocab_size, tp)
    loss_head = tokens * v_local * 2 * 4 + embed_grad
    notes.append(
        f"loss head: logits and dlogits in f32 ({v_local} vocab entries per device) + the head's f32 weight gradient"
    )
    return MemoryEstimate(params=params, optimizer=optimizer, weight_copies=weight_copies,
                          activations=int(activations), grads=grads, loss_head=int(loss_head), assumptions=notes,
                          micro_batch=b, seq_len=L)
