"""Analytic per-device memory of one training step, for sizing a launch without compiling it.

``estimate(config, mesh_sizes, platform=...)`` -> :class:`MemoryEstimate`: parameters, AdamW state,
the activations the forward pass saves for the backward pass, and the temporaries of the step's
three peaks (inside the backward pass, at the loss head, in the optimizer update), each with the
assumption behind it (``.assumptions``). ``python -m taipan_jax.compile_check`` prints it beside
the bytes XLA allocates for the compiled step, with the ratio (``docs/launch.md`` lists them).

What is exact and what is modelled:

* **exact** — parameter and AdamW-state bytes per device: every parameter's shard comes from the
  same logical-axis rules the trainer uses (``taipan_jax.sharding``), applied to the abstract
  model (no weights are allocated).
* **modelled** — everything that depends on how XLA schedules the step. Every term below is a
  class of buffers seen live at the peak of XLA's buffer assignment (``XLA_FLAGS=--xla_dump_to=DIR``
  dumps ``*buffer-assignment.txt`` and ``*live-range.txt``) of the compiled step, for
  ``taipan_190m`` (XLA:CPU and XLA:TPU v5e, data and FSDP meshes), ``taipan_1_3b`` (TPU v5e-256,
  remat) and ``tiny`` (CPU and TPU); where the two compilers differ the model takes the target's
  ``platform``.

The step is a ``lax.scan`` over the groups of blocks, so its memory has three candidate peaks:

1. **backward pass** (inside the backward scan): the residuals saved by the forward scan for *all*
   groups, plus the backward of *one* group (its working set), plus the gradient accumulators and
   the loss head's leftovers (the tied embedding's gradient, the dlogits);
2. **loss head** (between the two scans): the residuals, the logits and the head's gradient (and
   under FSDP the all-gathered embedding);
3. **optimizer update** (after the backward pass, residuals freed): gradients, new moments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

GiB = 1024**3
MiB = 1024**2

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# On-chip VMEM per TensorCore, from jax/_src/tpu_info.py (vmem_capacity_bytes). XLA:TPU's memory-space
# assignment (MSA) places temporaries there instead of HBM; of v5e's 128 MiB it used exactly 112 MiB
# (the VMEM allocation of every buffer assignment we dumped; 128 MiB less a 16 MiB scoped region),
# and at the HBM peak of `tiny` it held 100 MiB of the step's live temporaries (73 MiB, all of them,
# at 2 x 128 tokens). Only v5e was checked; the other chips use the same rule (capacity - 16 MiB).
_TPU_VMEM_MIB = {"v2": 16, "v3": 16, "v4": 16, "v5e": 128, "v5p": 64, "v6e": 128}
_SCOPED_VMEM_MIB = 16


@dataclasses.dataclass
class MemoryEstimate:
    """Per-device bytes of one training step (see the module docstring).

    ``total = state + copies + max(activations + weight_copies + max(backward, loss_head) - vmem,
    update)``: the temporaries of the step's three peaks (the first two with the saved activations),
    less what XLA:TPU keeps in VMEM, on top of the state (params and AdamW moments, the donated
    arguments) and, on XLA:CPU, the copies it makes of the donated moments.
    """

    params: int
    optimizer: int
    weight_copies: int
    activations: int
    backward: int
    loss_head: int
    update: int
    assumptions: list[str]
    micro_batch: int  # sequences per device per micro-batch
    seq_len: int
    platform: str = "cpu"
    state_copies: int = 0  # XLA:CPU: copies of the donated AdamW moments
    vmem: int = 0  # XLA:TPU: temporaries held in VMEM rather than HBM at the peak

    @property
    def state(self) -> int:
        """What persists between steps (the donated train state)."""
        return self.params + self.optimizer

    @property
    def grads(self) -> int:  # the update peak's name before the three-peak model
        return self.update

    @property
    def temporaries(self) -> int:
        saved = self.activations + self.weight_copies
        return self.state_copies + max(saved + max(self.backward, self.loss_head) - self.vmem, self.update, 0)

    @property
    def total(self) -> int:
        return self.state + self.temporaries

    def rows(self) -> list[tuple[str, int]]:
        rows = [
            ("params", self.params),
            ("optimizer state (AdamW mu, nu)", self.optimizer),
        ]
        if self.state_copies:
            rows.append(("XLA:CPU copies of the donated mu, nu", self.state_copies))
        rows += [
            ("activations saved for backward (all groups)", self.activations),
            ("weight copies (compute dtype)", self.weight_copies),
            ("backward of one group + grads (peak a)", self.backward),
            ("loss head: logits, head gradient (peak b)", self.loss_head),
            ("optimizer update, no activations (peak c)", self.update),
        ]
        if self.vmem:
            rows.append(("held in TPU VMEM, not HBM (subtracted)", self.vmem))
        rows.append(("total = state + peak (a, b or c)", self.total))
        return rows

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
            shape=tuple(v.shape), size=math.prod(v.shape), itemsize=v.dtype.itemsize, ndim=len(v.shape),
            shards=shards, tp_shards=_shard_factor(spec, no_fsdp),
        ))
    return rows


def _div(n: int, k: int) -> int:
    """``n / k`` if ``k`` divides ``n`` (the dimension is sharded), else ``n`` (replicated)."""
    return n // k if k > 1 and n % k == 0 else n


def _lanes(n: int, tpu: bool) -> int:
    """The minor dimension of a buffer as XLA:TPU stores it: padded to whole 128-lane tiles."""
    return math.ceil(n / 128) * 128 if tpu else n


def block_bytes_per_token(kind: str, cfg, seq_len: int, tp: int, remat: bool = False,
                          tpu: bool = False) -> tuple[float, str]:
    """Bytes one block saves per token for its backward pass, and how they add up.

    The counts are the tensors JAX's autodiff saves for the block (``jax.ad_checkpoint``'s saved
    residuals of the code as written) that survive XLA's fusion, as listed in the buffer assignment
    of the compiled step (taipan_190m on 8 CPU devices; the TPU v5e compile agrees within 10%).
    ``tpu``: the SSD's (chunk x chunk) matrices and the attention scores have the chunk / the keys
    as their minor dimension, which XLA:TPU pads to 128 lanes (seen in tiny, chunk 64: those buffers
    are twice their size; XLA:TPU lays out the other tensors so that they are not padded: 0.1% of
    the live bytes at 190M). ``remat=True`` is the older, smaller count of a recomputed group
    (contraction outputs only); :func:`estimate` no longer uses it (XLA keeps the recomputed
    group's residuals as without remat).
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
        qq = 3 * h * _lanes(q, tpu)  # per token: exp(segsum) decay, C.B^T and their product, (heads, Q, Q)
        f32 = (
            20 * d_in  # conv taps (4) and pre-activation, SiLU, SSD x / y / D*x, gated norm (y, silu z, ...)
            + 7 * 2 * gn  # B|C: conv taps and activations
            + 3 * d  # residual stream in, RMSNorm statistics / output
            + pad * (qq
                     + 2 * h * m.d_state  # B, C broadcast to the heads
                     + h * m.headdim * m.d_state / q)  # the state entering each chunk
        )
        low = c * (d_in + d)  # in_proj input and out_proj input in the compute dtype
        total = 4 * f32 + low
        ssd = 4 * pad * (qq + 2 * h * m.d_state)
        if remat:
            # Recomputed inside the backward scan (remat=full), XLA fuses the elementwise chains into
            # their consumers; taipan_1_3b on v5e-256 keeps per block two (heads, Q, Q) chunk
            # matrices, B and C per head, 9 f32 d_inner-wide tensors (x, dt * x, y per chunk, ...)
            # and the in_proj outputs in the compute dtype.
            rec = 4 * pad * (2 * h * _lanes(q, tpu) + 2 * h * m.d_state) + 4 * 9 * d_in + c * (3 * d_in + 2 * gn + h)
            return rec, "mamba2 (recomputed): 2 SSD chunk matrices, B/C per head, 9 f32 d_inner-wide, in_proj outputs"
        kernel = " (this assumes the chunked xla SSD; a Pallas kernel keeps less)" if m.ssd_impl.startswith("pallas") else ""
        lanes = f", chunk {q} padded to {_lanes(q, tpu)} lanes" if tpu and _lanes(q, tpu) != q else ""
        return total, (
            f"mamba2{kernel}: {(total - ssd) / 1e3:.1f} KB/token (20 f32 d_inner-wide + 7 f32 B|C-wide + 3 f32 d_model-wide "
            f"+ d_inner and d_model in {cfg.dtype}) + {ssd / 1e3:.1f} KB/token in the chunked SSD "
            f"(3 f32 heads x chunk matrices{lanes}, B and C per head)"
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
        scores = frac * hq * _lanes(keys, tpu) * (4 + c)  # softmax in f32 + probabilities in the compute dtype
        if remat:
            return scores + c * (hq + 2 * hkv) * hd + c * 2 * f, f"{kind} (recomputed): scores, q/k/v, SwiGLU fc1"
        return dense + scores, (
            f"{kind}: {dense / 1e3:.1f} KB/token (8 f32 d_model-wide, 3 d_model + q/k/v + 6 SwiGLU-wide in "
            f"{cfg.dtype}) + {scores / 1e3:.1f} KB/token of attention scores "
            f"({'gathered: selected queries x window' if gathered else 'dense: every query x all L keys, as XLA materialises them'})"
        )
    raise ValueError(f"unknown block type {kind!r}")


def tpu_vmem_bytes(generation: str | None) -> int:
    """VMEM that XLA:TPU's memory-space assignment fills with temporaries (see ``_TPU_VMEM_MIB``)."""
    if not generation:
        return 0
    return max(_TPU_VMEM_MIB.get(generation, 0) - _SCOPED_VMEM_MIB, 0) * MiB


def estimate(config, mesh_sizes: Mapping[str, int], model_cfg=None, platform: str = "tpu",
             tpu_generation: str | None = None) -> MemoryEstimate:
    """Per-device memory of ``Trainer._train_step`` for ``config`` on a mesh of ``mesh_sizes``.

    ``platform``: the compiler the step is for: ``"cpu"`` (XLA:CPU, ``compile_check --topology=cpu:N``),
    ``"tpu"`` (with ``tpu_generation`` such as ``"v5e"`` for its VMEM), or ``"gpu"`` (XLA:GPU, not
    compiled here: the TPU model without VMEM and tiling).
    """
    from taipan_jax.model_config import ModelConfig

    if platform not in ("cpu", "tpu", "gpu"):
        raise ValueError(f"platform must be cpu, tpu or gpu, not {platform!r}")
    cpu, tpu = platform == "cpu", platform == "tpu"
    cfg = model_cfg or ModelConfig.from_dict(config.model.to_dict())
    rules = tuple(map(tuple, config.mesh.rules))
    tc, L = config.train, int(config.data.seq_len)
    sizes = {k: int(mesh_sizes.get(k, 1)) for k in ("data", "fsdp", "tensor")}
    dp, tp, fsdp = sizes["data"] * sizes["fsdp"], sizes["tensor"], sizes["fsdp"]
    accum = int(tc.grad_accum_steps)
    b = max(int(tc.global_batch_size) // (dp * accum), 1)
    tokens = b * L
    c = _DTYPE_BYTES[cfg.dtype]
    pdt = _DTYPE_BYTES[cfg.param_dtype]
    G = cfg.num_groups
    target = {"cpu": "XLA:CPU", "gpu": "XLA:GPU (not compiled here; the TPU model without VMEM and tiling)",
              "tpu": f"XLA:TPU {tpu_generation or ''}".strip()}[platform]
    notes: list[str] = [
        f"mesh data={sizes['data']} fsdp={fsdp} tensor={tp}; per device per micro-batch: {b} sequences x {L} "
        f"tokens (global batch {tc.global_batch_size} / data-parallel {dp} / grad_accum {accum})",
        f"compute dtype {cfg.dtype}, param dtype {cfg.param_dtype}, remat={cfg.remat}; compiler {target}",
    ]

    # -- state (exact) -------------------------------------------------------------------------
    rows = param_layout(cfg, rules, sizes)

    def local(r, shards=None):
        return math.ceil(r["size"] / (shards or r["shards"])) * r["itemsize"]

    params = sum(local(r) for r in rows)
    optimizer = 2 * params  # optax.adamw: mu and nu in the parameters' dtype
    notes.append("params and AdamW mu/nu: exact per-device shards from the logical-axis rules")
    group_rows = [r for r in rows if r["path"].startswith("groups")]
    group_params = sum(local(r) for r in group_rows)
    embed = next((r for r in rows if r["path"].startswith("embed")), None)
    embed_shard = 0 if embed is None else local(embed)
    # The head's gradient of the tied embedding, (vocab / tensor) x d_model in f32, is whole over
    # fsdp until it is reduce-scattered.
    embed_whole = 0 if embed is None else math.ceil(embed["size"] / embed["tp_shards"]) * 4

    # -- XLA:CPU: copies of the donated moments ------------------------------------------------
    state_copies = 0
    if cpu:
        # XLA:CPU copies every donated mu and nu leaf (`copy(param)`, 2 x params at 190M) at the start
        # of the step and keeps the copies until the update; the freed argument buffers then hold
        # gradient accumulators (seen: the backward scan's carry in `parameter` allocations).
        state_copies = optimizer
        notes.append("XLA:CPU: copies of all of mu and nu, made at the start and kept to the update "
                     "(the donated buffers they free hold gradients)")

    # -- activations saved by the forward scan (all groups) -------------------------------------
    per_block: dict[str, float] = {}
    for kind in sorted(set(cfg.group)):
        per_block[kind], note = block_bytes_per_token(kind, cfg, L, tp, tpu=tpu)
        notes.append(note)
    group_bytes = tokens * sum(per_block[k] for k in cfg.group)  # one group's residuals
    edge = tokens * 4 * cfg.d_model * 2  # embedding output, final norm (f32)
    if cfg.remat == "full":
        activations = tokens * G * 4 * cfg.d_model + edge
        notes.append(f"remat=full: {G} group inputs (f32 residual stream) saved; the group being differentiated "
                     f"is recomputed with its residuals ({fmt_bytes(group_bytes)}, counted in peak a)")
    else:
        activations = G * group_bytes + edge
        notes.append(f"remat=none: every block's residuals for all {G} groups ({fmt_bytes(group_bytes)} per group)")

    # Weights used by the matmuls in the compute dtype, saved by the forward scan for the backward
    # (stacked over the groups, as stored: sharded over fsdp, gathered again in the backward pass).
    weight_copies = 0
    if c != pdt:
        weight_copies = sum(math.ceil(r["size"] / r["shards"]) * c for r in group_rows if r["ndim"] >= 3)
        notes.append(f"weight copies: every group matrix in {cfg.dtype} (sharded as stored), saved by the "
                     "forward scan for the backward")

    # -- peak a: inside the backward scan --------------------------------------------------------
    v_local = _div(cfg.padded_vocab_size, tp)
    logits = tokens * v_local * 4  # one f32 (tokens x vocab / tensor) buffer
    # The backward of one group: with remat=none XLA:CPU copies the group's slices of the residual
    # stacks and builds cotangents of the same shapes (0.8-1.05 x the group's residuals at 190M /
    # tiny); XLA:TPU reads the slices in place (0.25-0.6 x, partly in VMEM). With remat=full the
    # recomputed group keeps its residuals as without remat (taipan_1_3b on v5e-256: the six SSD
    # blocks' chunk matrices, the attention scores). One group's residuals either way.
    backward = group_bytes
    if cfg.remat == "full":
        backward = tokens * sum(block_bytes_per_token(k, cfg, L, tp, remat=True, tpu=tpu)[0] for k in cfg.group)
    if cpu:
        # The gradient accumulators are in the donated buffers (above); the embedding lookup's
        # scatter-add buffer, (vocab x d) f32 zero-initialised at the start, receives both gradients
        # of the tied embedding.
        backward += embed_whole
        notes.append("peak a (XLA:CPU): one group's backward (its residuals again) + the embedding's f32 "
                     "gradient buffer (the lookup's scatter-add, also the head's gradient)")
    else:
        # XLA:TPU: the stacked gradient accumulators of the groups' parameters (f32, sharded as the
        # parameters: the backward scan's carry), the embedding's gradient (reduce-scattered under
        # fsdp) and the f32 dlogits, kept until the embedding gradient is complete.
        backward += group_params * 4 // pdt + embed_shard * 4 // pdt + logits
        notes.append("peak a (XLA:TPU): one group's backward (its residuals again) + the groups' f32 gradient "
                     "accumulators + the embedding's gradient + the f32 dlogits (tokens x vocab)")
    if accum > 1:
        backward += params * 4 // pdt  # the gradient accumulated over micro-batches
        notes.append("grad_accum > 1: a param-sized f32 gradient accumulator across micro-batches")

    # -- peak b: the loss head (after the forward scan) ------------------------------------------
    loss_head = embed_whole + logits * (2 if cpu else 1)
    if fsdp > 1 and embed is not None:
        loss_head += math.ceil(embed["size"] / embed["tp_shards"]) * c  # the all-gathered embedding
        if tpu and (embed["shape"][-1] // fsdp) % 128:
            # XLA:TPU keeps a (vocab, d / fsdp) shard whose minor dimension is not a multiple of 128
            # lanes transposed (no padding) and copies the embedding, its mu and its nu into the
            # padded layout for the head / the update (taipan_190m fsdp=8, d / fsdp = 96).
            loss_head += 3 * math.ceil(embed["size"] / embed["shards"] / (embed["shape"][-1] // fsdp)) \
                * _lanes(embed["shape"][-1] // fsdp, True) * 4
    notes.append(f"peak b (loss head): the head's f32 gradient of the tied embedding (whole over fsdp) + "
                 f"{'logits and dlogits' if cpu else 'the logits'} in f32 ({v_local} vocab entries per device)"
                 + (" + the all-gathered embedding in the compute dtype" if fsdp > 1 else ""))

    # -- peak c: the optimizer update (no activations) ---------------------------------------------
    # Gradients in the parameters' dtype (XLA:CPU: in the donated buffers its moment copies freed).
    update = (0 if cpu else params) + (params if accum > 1 else 0)
    # The non-finite guard selects between old and new state: XLA materialises new AdamW moments of
    # the largest leaf before the select; the tied embedding's two gradients are whole over fsdp.
    largest = max(local(r) for r in rows)
    update += 2 * largest + (embed_whole - embed_shard if cfg.tie_embeddings and embed is not None else 0)
    notes.append(f"peak c (update): {'new' if cpu else 'gradients + new'} mu and nu of the largest leaf "
                 f"({fmt_bytes(largest)}) before the guard's select"
                 + (" (XLA:CPU: the gradients are in the donated buffers)" if cpu else ""))

    vmem = 0
    if tpu:
        vmem = tpu_vmem_bytes(tpu_generation)
        if vmem:
            notes.append(f"XLA:TPU memory-space assignment: up to {fmt_bytes(vmem)} of the temporaries live in "
                         f"VMEM ({tpu_generation}), not HBM")
        notes.append("XLA:TPU layouts: the SSD's chunk matrices and the attention scores padded to 128 lanes")
    return MemoryEstimate(params=params, optimizer=optimizer, weight_copies=int(weight_copies),
                          activations=int(activations), backward=int(backward), loss_head=int(loss_head),
                          update=int(update), assumptions=notes, micro_batch=b, seq_len=L, platform=platform,
                          state_copies=int(state_copies), vmem=int(vmem))
