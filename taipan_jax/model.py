"""The language model: embedding -> repeated block groups -> final RMSNorm -> (tied) head.

The stack is ``num_groups`` repeats of one *group* of blocks given by ``model.block_pattern``
(e.g. ``"mamba2"`` or, with the SAL, ``"mamba2*6,sal"``). With ``scan_layers=True`` the groups'
parameters are stacked on a leading ``layers`` axis and applied with ``nnx.scan``, so compile
time does not grow with depth.

Three entry points share the weights:
* ``model(tokens, ...) -> (logits, aux)`` — training / scoring; optionally continue from and/or
  return a cache (prefill, streaming evaluation: a text fed in segments, each call continuing
  from the previous call's cache, gives the logits of one pass over the whole text);
* ``model.step(token, cache) -> (logits, cache)`` — one token per sequence, constant memory;
* ``model.init_cache(batch, kv_len=None)`` (``kv_len`` sizes full-attention KV caches).
Logits are float32 with the padded vocabulary entries set to a large negative number.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from taipan_jax.layers.common import RMSNorm, SwiGLU, make_param, normal
from taipan_jax.layers.mamba2 import Mamba2Mixer, mamba2_kwargs
from taipan_jax.layers.sal import AttentionBlock, SALBlock, check_cache_room
from taipan_jax.model_config import ModelConfig
from taipan_jax.sharding import constrain

NEG_INF_LOGIT = -1e9


class Mamba2Block(nnx.Module):
    """Pre-norm residual Mamba-2 block: ``h += mixer(norm(h))``, then optionally ``h += mlp(norm(h))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt, pdt = cfg.compute_dtype, cfg.weight_dtype
        n_res = 2 if cfg.d_intermediate > 0 else 1
        # GPT-2 / mamba_ssm rescale of output projections: 1/sqrt(n_residuals * n_layers).
        out_scale = 1.0 / math.sqrt(n_res * len(cfg.blocks))
        self.norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        self.mixer = Mamba2Mixer(
            cfg.d_model, rngs=rngs, norm_eps=cfg.norm_eps, out_scale=out_scale, dtype=dt,
            param_dtype=pdt, **mamba2_kwargs(cfg.mamba),
        )
        if cfg.d_intermediate > 0:
            self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
            self.mlp = SwiGLU(cfg.d_model, cfg.d_intermediate, rngs=rngs, out_scale=out_scale, dtype=dt, param_dtype=pdt)
        else:
            self.mlp_norm = self.mlp = None

    def init_cache(self, batch: int, kv_len: int | None = None):
        del kv_len
        return self.mixer.init_cache(batch)

    def _mlp(self, h):
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h)).astype(h.dtype)
        return h

    def __call__(self, h, *, segment_ids=None, cache=None, return_cache=False, key=None, train=False, step=None,
                 return_selection=False):
        del key, train, step, return_selection
        out = self.mixer(self.norm(h), segment_ids=segment_ids, cache=cache, return_cache=return_cache)
        out, new_cache = out if return_cache else (out, None)
        h = self._mlp(h + out.astype(h.dtype))
        return h, new_cache, {}

    def step(self, h, cache, key=None):
        del key
        out, cache = self.mixer.step(self.norm(h), cache)
        h = h + out.astype(h.dtype)
        return self._mlp(h), cache


BLOCKS = {"mamba2": Mamba2Block, "sal": SALBlock, "attention": AttentionBlock}


class BlockGroup(nnx.Module):
    """One repeat of ``model.block_pattern``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.names = cfg.group
        self.blocks = nnx.List([BLOCKS[name](cfg, rngs=rngs) for name in cfg.group])

    def init_cache(self, batch: int, kv_len: int | None = None):
        return [b.init_cache(batch, kv_len) for b in self.blocks]

    def _block_keys(self, key):
        return [None] * len(self.blocks) if key is None else list(jax.random.split(key, len(self.blocks)))

    def __call__(self, h, *, segment_ids=None, cache=None, return_cache=False, key=None, train=False, step=None,
                 return_selection=False):
        caches, aux = [], {}
        keys = self._block_keys(key)
        for i, block in enumerate(self.blocks):
            h, c, a = block(
                h, segment_ids=segment_ids, cache=None if cache is None else cache[i],
                return_cache=return_cache, key=keys[i], train=train, step=step, return_selection=return_selection,
            )
            caches.append(c)
            for k, v in a.items():
                aux[f"{i}_{self.names[i]}/{k}"] = v
            h = constrain(h, ("batch", "length", "embed"))
        return h, (caches if return_cache else None), aux

    def step(self, h, cache, key=None):
        new = []
        for i, (block, k) in enumerate(zip(self.blocks, self._block_keys(key))):
            h, c = block.step(h, cache[i], key=k)
            new.append(c)
        return h, new


def has_full_attention(model: "LanguageModel") -> bool:
    """True when a block keeps a KV cache that grows with the text (attention with window 0)."""
    return "attention" in model.cfg.group and model.cfg.attention.window == 0


def check_decode_room(model: "LanguageModel", positions: int, what: str, hint: str = "raise max_decode_len") -> None:
    """Refuse a decode that needs more than the ``max_decode_len`` slots of a full-attention KV
    cache (inside jit the ring buffer would silently overwrite its oldest keys)."""
    cap = model.cfg.attention.max_decode_len
    if has_full_attention(model) and positions > cap:
        raise ValueError(f"{what} needs {positions} KV-cache positions, more than "
                         f"model.attention.max_decode_len={cap} (full attention); {hint}")


_SCAN_META = {nnx.PARTITION_NAME: "layers"}  # stacked groups gain a leading 'layers' axis


class LanguageModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = cfg.compute_dtype, cfg.weight_dtype
        self.embed = make_param(rngs, normal(0.02), (cfg.padded_vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_groups)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=_SCAN_META)
            def make_groups(rngs):
                return BlockGroup(cfg, rngs=rngs)

            self.groups = make_groups(rngs)
        else:
            self.groups = nnx.List([BlockGroup(cfg, rngs=rngs) for _ in range(cfg.num_groups)])
        self.norm_f = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=jnp.float32, param_dtype=pdt)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = make_param(
                rngs, normal(1.0 / math.sqrt(cfg.d_model)), (cfg.d_model, cfg.padded_vocab_size),
                ("embed", "vocab"), pdt,
            )

    # -- pieces ------------------------------------------------------------------------------
    def _embed(self, tokens):
        h = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)
        return constrain(h, ("batch", "length", "embed"))

    def _logits(self, h):
        dt = self.cfg.compute_dtype
        h = self.norm_f(h).astype(dt)
        if self.lm_head is None:
            logits = jnp.einsum("...d,vd->...v", h, self.embed[...].astype(dt), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(dt), preferred_element_type=jnp.float32)
        vocab_ok = jnp.arange(logits.shape[-1]) < self.cfg.vocab_size
        return jnp.where(vocab_ok, logits, NEG_INF_LOGIT)

    def _scan_groups(self, fn, carry, xs):
        """``jax.lax.scan`` of ``fn(group, carry, x) -> (carry, y)`` over the stacked groups.

        Functional (split, then merge inside the body) rather than ``nnx.scan``, so the model can be
        called under any enclosing transform (jit, lax.scan in sampling, grad, shard_map).
        """
        graphdef, state = nnx.split(self.groups)

        def body(carry, inp):
            st, x = inp
            return fn(nnx.merge(graphdef, st), carry, x)

        return jax.lax.scan(body, carry, (state, xs))

    def init_cache(self, batch: int, kv_len: int | None = None):
        """Empty caches. ``kv_len`` sizes the KV cache of full-attention blocks (Transformer++,
        Jamba-style; default ``attention.max_decode_len``): it must hold the whole text a stream or
        a decode will reach. Mamba-2 states and SAL / windowed ring buffers do not depend on it."""
        if self.cfg.scan_layers:

            @nnx.vmap(in_axes=0, out_axes=0)
            def make(group):
                return group.init_cache(batch, kv_len)

            return make(self.groups)
        return [g.init_cache(batch, kv_len) for g in self.groups]

    # -- whole sequences -----------------------------------------------------------------------
    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        cache: Any = None,
        return_cache: bool = False,
        key: jax.Array | None = None,
        train: bool = False,
        step: jax.Array | None = None,
        return_selection: bool = False,
    ):
        """``tokens (b, l) int32`` -> ``(logits (b, l, V_pad) f32, aux)`` [+ cache].

        ``train=True`` samples the SALs' Gumbel noise from ``key`` (and anneals tau by ``step``);
        evaluation selects deterministically (``sal.eval_selection``: by default the training
        distribution's hard sample with noise keyed by token position). ``aux`` maps metric names
        (``"<index in group>_<block type>/<metric>"``) to arrays stacked over the ``num_groups`` axis.
        ``return_selection=True`` adds each SAL's per-token ``selected`` (hard, 0/1) and ``alpha``
        (``(num_groups, b, l)`` float32). With ``cache`` the tokens continue the cached text
        (``segment_ids`` must then be None).
        """
        cfg = self.cfg
        if cache is not None:
            self._check_kv_room(cache, tokens.shape[1])
        h = self._embed(tokens)
        keys = self._group_keys(key, train)

        def run_group(group, h, c, k):
            return group(h, segment_ids=segment_ids, cache=c, return_cache=return_cache, key=k, train=train,
                         step=step, return_selection=return_selection)

        if cfg.remat == "full":
            run_group = nnx.remat(run_group)

        if cfg.scan_layers:
            h, (new_cache, aux) = self._scan_groups(
                lambda g, h, xs: (lambda r: (r[0], (r[1], r[2])))(run_group(g, h, *xs)), h, (cache, keys)
            )
        else:
            caches, auxes = [], []
            for i, group in enumerate(self.groups):
                h, c, a = run_group(group, h, None if cache is None else cache[i], None if keys is None else keys[i])
                caches.append(c)
                auxes.append(a)
            new_cache = caches if return_cache else None
            aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes and auxes[0] else {}
        logits = self._logits(h)
        if return_cache:
            return logits, aux, new_cache
        return logits, aux

    def _check_kv_room(self, cache, length: int) -> None:
        """Full-attention KV caches must hold the text so far plus ``length`` (checked when concrete)."""
        if self.cfg.attention.window:
            return
        for i, name in enumerate(self.cfg.group):
            if name != "attention":
                continue
            for c in ([cache] if self.cfg.scan_layers else cache):
                check_cache_room(c[i], length, f"block {i} (attention)")

    def _group_keys(self, key, train: bool):
        """Per-group keys: from ``key`` (training noise), or at evaluation the SALs' fixed
        evaluation-noise key ``key(sal.eval_seed)`` (``eval_selection="sampled"``); ``None`` if
        no block needs one. ``__call__`` and ``step`` derive every SAL's key the same way, so
        decoding selects exactly the tokens a full forward selects."""
        cfg = self.cfg
        if key is None and not train and "sal" in cfg.group and cfg.sal.eval_selection == "sampled":
            key = jax.random.key(cfg.sal.eval_seed)
        return None if key is None else jax.random.split(key, cfg.num_groups)

    # -- one token -----------------------------------------------------------------------------
    def step(self, tokens: jax.Array, cache: Any):
        """``tokens (b,) int32`` -> ``(logits (b, V_pad) f32, new cache)``."""
        h = self._embed(tokens[:, None])[:, 0]
        keys = self._group_keys(None, train=False)
        if self.cfg.scan_layers:
            h, cache = self._scan_groups(lambda g, h, xs: g.step(h, xs[0], key=xs[1]), h, (cache, keys))
        else:
            new = []
            for i, (g, c) in enumerate(zip(self.groups, cache)):
                h, c = g.step(h, c, key=None if keys is None else keys[i])
                new.append(c)
            cache = new
        return self._logits(h), cache


# -- parameter utilities ---------------------------------------------------------------------
def build_model(cfg: ModelConfig, seed: int = 0) -> LanguageModel:
    return LanguageModel(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> LanguageModel:
    """The model with ``ShapeDtypeStruct`` leaves: no weights are allocated."""
    return nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(params=0)))


def count_params(model: nnx.Module) -> int:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(math.prod(x.shape) for x in leaves))


def sal_budget_loss(aux: dict) -> jax.Array:
    """Sum over every SAL of its budget term (Eq. 7's sum over N SALs)."""
    terms = [jnp.sum(v) for k, v in aux.items() if k.endswith("sal/budget_loss")]
    return sum(terms) if terms else jnp.zeros((), jnp.float32)


def weight_decay_mask(params_state: nnx.State) -> Any:
    """A pytree of bools matching ``params_state``: True where weight decay applies.

    Parameters created with ``weight_decay=False`` metadata (A_log, dt_bias, D, norms, biases) get
    none; everything else (projections, convolution taps, embeddings) does.
    """

    def decide(v):
        return bool(v.get_metadata().get("weight_decay", True))

    return jax.tree.map(decide, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
