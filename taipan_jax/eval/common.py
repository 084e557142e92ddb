"""Shared pieces of the evaluations: loading a model for evaluation, bucketed shapes, jitted scoring
and ragged-prompt generation.

Shapes: every jitted call sees ``(batch_size, bucket)`` arrays, where ``bucket`` is the smallest
length of the ladder 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x powers of two) that holds
the row, so a run compiles once per bucket (padding wastes at most a third) and rows are padded on
the right. Every model here is causal, so right padding never changes the logits of the real
positions; the numbers can differ from an unpadded call in the last bits (XLA picks different
tilings for different shapes), about 1e-6 relative in float32.

SAL execution: ``attention="gathered"`` keeps at most ``capacity_factor * C * L`` selected tokens
*per sequence*, so with it the padding (and the bucket length) could change which real tokens
overflow. :func:`prepare_model` therefore switches the SALs to ``attention="dense"`` by default:
the same weights and, without overflow, the same function (``sal_attention="as_trained"`` keeps
the trained setting).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taipan_jax.model import LanguageModel, abstract_model, check_decode_room
from taipan_jax.model_config import ModelConfig
from taipan_jax.sampling import sample_logits

MIN_BUCKET = 16


def bucket_length(n: int, min_bucket: int = MIN_BUCKET) -> int:
    """The smallest ladder length >= ``n`` (ladder: ``min_bucket`` then 2^k and 3 * 2^(k-1))."""
    if n <= min_bucket:
        return min_bucket
    p = 1 << (int(n) - 1).bit_length()  # smallest power of two >= n
    three_q = 3 * p // 4
    return three_q if three_q >= n and three_q >= min_bucket else p


def bucket_floor(n: int, min_bucket: int = MIN_BUCKET) -> int:
    """The largest ladder length <= ``n`` (``n`` itself when ``n < min_bucket``)."""
    if n < min_bucket:
        return max(int(n), 1)
    p = 1 << (int(n).bit_length() - 1)  # largest power of two <= n
    return 3 * p // 2 if 3 * p // 2 <= n else p


def prepare_model(model: LanguageModel, sal_attention: str = "dense") -> LanguageModel:
    """``model`` with its SALs executed as ``sal_attention`` ("dense" | "gathered" | "as_trained").

    The parameters are shared (no copy); only the static structure changes.
    """
    if sal_attention not in ("dense", "gathered", "as_trained"):
        raise ValueError(f"sal_attention must be dense, gathered or as_trained, got {sal_attention!r}")
    cfg = model.cfg
    if sal_attention == "as_trained" or "sal" not in cfg.group or cfg.sal.attention == sal_attention:
        return model
    d = cfg.to_dict()
    d["sal"] = dict(d["sal"], attention=sal_attention)
    graphdef, _ = nnx.split(abstract_model(ModelConfig.from_dict(d)))
    return nnx.merge(graphdef, nnx.state(model))


def load_for_eval(workdir: str, *, step: int | None = None, sal_attention: str = "dense"):
    """``(model, vocab, step)`` of a trainer workdir (its parameters only), ready for evaluation."""
    from taipan_jax.generate import load

    model, vocab, at = load(workdir, step)
    return prepare_model(model, sal_attention), vocab, at


# -- jitted functions, shared by every runner of the same model structure -------------------------
@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, inputs, targets):
    model = nnx.merge(graphdef, state)
    logits, _ = model(inputs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return token_logp, greedy


@functools.partial(jax.jit, static_argnums=0)
def _argmax(graphdef, state, inputs):
    logits, _ = nnx.merge(graphdef, state)(inputs)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, tokens):
    logits, _, cache = nnx.merge(graphdef, state)(tokens, return_cache=True)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10, 11))
def _decode(graphdef, state, cache, last_logits, prompts, lengths, start, key, n_steps, temperature, top_k, top_p):
    """``n_steps`` single-token steps from absolute position ``start``.

    Row r is fed its own prompt token at positions < lengths[r] and its sampled token after that,
    so prompts of different lengths share one batch without padding inside the sequence.
    """
    model = nnx.merge(graphdef, state)
    width = prompts.shape[1]

    def body(carry, inp):
        logits, cache = carry
        j, k = inp
        pos = start + j
        sampled = sample_logits(logits, k, temperature=temperature, top_k=top_k, top_p=top_p)
        from_prompt = jax.lax.dynamic_index_in_dim(prompts, jnp.minimum(pos, width - 1), axis=1, keepdims=False)
        fed = jnp.where(pos < lengths, from_prompt, sampled).astype(jnp.int32)
        logits, cache = model.step(fed, cache)
        return (logits, cache), fed

    (last_logits, cache), fed = jax.lax.scan(
        body, (last_logits, cache), (jnp.arange(n_steps), jax.random.split(key, n_steps)))
    return cache, last_logits, fed.T


class ModelRunner:
    """Batched, bucketed, jitted scoring and generation with one model (single device)."""

    def __init__(self, model: LanguageModel, *, batch_size: int = 8, pad_id: int = 0, min_bucket: int = MIN_BUCKET,
                 decode_chunk: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.batch_size, self.pad_id, self.min_bucket = int(batch_size), int(pad_id), int(min_bucket)
        self.decode_chunk = int(decode_chunk)
        self.vocab_size = model.cfg.vocab_size

    # -- teacher-forced scoring ---------------------------------------------------------------
    def _batches(self, lengths: Sequence[int]):
        """Row indices in batches, longest first (similar lengths share a bucket)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for lo in range(0, len(order), self.batch_size):
            yield order[lo: lo + self.batch_size]

    def _pack(self, rows: Sequence[np.ndarray], idx: Sequence[int], fill: int) -> np.ndarray:
        width = bucket_length(max(rows[i].size for i in idx), self.min_bucket)
        out = np.full((self.batch_size, width), fill, np.int32)
        for r, i in enumerate(idx):
            out[r, : rows[i].size] = rows[i]
        return out

    def score(self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row: ``(log p(targets[t] | inputs[:t+1]) float32, targets[t] == argmax)`` for every t."""
        if len(inputs) != len(targets):
            raise ValueError("inputs and targets differ in number")
        inputs = [np.asarray(x, np.int32).reshape(-1) for x in inputs]
        targets = [np.asarray(y, np.int32).reshape(-1) for y in targets]
        for x, y in zip(inputs, targets):
            if x.size != y.size or x.size == 0:
                raise ValueError(f"each row needs equally long, non-empty inputs and targets; got {x.size}, {y.size}")
            self._check_ids(x)
            self._check_ids(y)
        out: list = [None] * len(inputs)
        for idx in self._batches([x.size for x in inputs]):
            lp, gr = _score(self.graphdef, self.state, self._pack(inputs, idx, self.pad_id),
                            self._pack(targets, idx, 0))
            lp, gr = np.asarray(lp), np.asarray(gr)
            for r, i in enumerate(idx):
                n = inputs[i].size
                out[i] = (lp[r, :n], gr[r, :n])
        return out

    def argmax(self, inputs: np.ndarray) -> np.ndarray:
        """``inputs (b, l) int32`` -> the model's argmax next token at every position, ``(b, l)``."""
        inputs = np.asarray(inputs, np.int32)
        if inputs.ndim != 2 or inputs.shape[1] == 0:
            raise ValueError(f"inputs must be a non-empty (batch, length) array, got {inputs.shape}")
        self._check_ids(inputs)
        b, l = inputs.shape
        width = bucket_length(l, self.min_bucket)
        out = np.zeros((b, l), np.int32)
        for lo in range(0, b, self.batch_size):
            chunk = np.full((self.batch_size, width), self.pad_id, np.int32)
            part = inputs[lo: lo + self.batch_size]
            chunk[: part.shape[0], :l] = part
            out[lo: lo + part.shape[0]] = np.asarray(_argmax(self.graphdef, self.state, chunk))[: part.shape[0], :l]
        return out

    def _check_ids(self, x: np.ndarray) -> None:
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise ValueError(f"token id out of the model's range [0, {self.vocab_size}): min {x.min()}, max {x.max()}")

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[np.ndarray],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        done: Callable[[int, np.ndarray], bool] | None = None,
    ) -> list[np.ndarray]:
        """Continuations (up to ``max_new_tokens`` tokens) of prompts of any lengths.

        A batch prefills its common bucketed prefix with the whole-sequence forward, then runs
        single-token steps in chunks of ``decode_chunk``; ``done(i, tokens_so_far)`` (checked after
        each chunk) lets the caller stop early, e.g. at a stop string. Greedy when
        ``temperature == 0``.
        """
        prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for p in prompts:
            if p.size == 0:
                raise ValueError("every prompt needs at least one token")
            self._check_ids(p)
        out: list = [None] * len(prompts)
        key = jax.random.key(seed)
        for idx in self._batches([p.size for p in prompts]):
            lens = np.array([prompts[i].size for i in idx] + [prompts[idx[-1]].size] * (self.batch_size - len(idx)))
            rows = list(idx) + [idx[-1]] * (self.batch_size - len(idx))  # filler rows repeat the last prompt
            packed = self._pack(prompts, rows, self.pad_id)
            start = bucket_floor(int(lens.min()), self.min_bucket)
            total = int(lens.max()) + max_new_tokens - start  # steps until every row has its tokens
            check_decode_room(self.model, start + -(-total // self.decode_chunk) * self.decode_chunk,
                              "generation (prompts + max_gen_toks, in decode chunks)",
                              hint="shorten the prompts (max_length) or max_gen_toks")
            logits, cache = _prefill(self.graphdef, self.state, packed[:, :start])
            fed = np.zeros((self.batch_size, 0), np.int32)
            pos = start
            while pos < start + total:
                key, sub = jax.random.split(key)
                cache, logits, new = _decode(self.graphdef, self.state, cache, logits, packed, lens, np.int32(pos), sub,
                                             self.decode_chunk, float(temperature), int(top_k), float(top_p))
                fed = np.concatenate([fed, np.asarray(new)], axis=1)
                pos += self.decode_chunk
                gens = [fed[r, lens[r] - start: lens[r] - start + max_new_tokens] for r in range(len(idx))]
                if done is not None and all(g.size == max_new_tokens or done(i, g) for i, g in zip(idx, gens)):
                    break
            for r, i in enumerate(idx):
                out[i] = fed[r, lens[r] - start: lens[r] - start + max_new_tokens].copy()
        return out


def log_likelihoods(runner: ModelRunner, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                    max_length: int | None = None) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), every continuation token is the argmax)`` per pair.

    The model reads ``context + continuation[:-1]``; with ``max_length`` the oldest context tokens are
    dropped so that it reads at most ``max_length`` tokens. Sums are float64 over float32 terms.
    """
    inputs, targets, spans = [], [], []
    for ctx, cont in pairs:
        ctx, cont = list(ctx), list(cont)
        if not cont:
            spans.append(0)
            inputs.append(None)
            targets.append(None)
            continue
        if not ctx:
            raise ValueError("a context needs at least one token (e.g. BOS)")
        full = ctx + cont
        if max_length is not None:
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens is longer than max_length={max_length}")
            full = full[-(max_length + 1):]
        inputs.append(np.asarray(full[:-1], np.int32))
        targets.append(np.asarray(full[1:], np.int32))
        spans.append(len(cont))
    live = [i for i, x in enumerate(inputs) if x is not None]
    scored = runner.score([inputs[i] for i in live], [targets[i] for i in live]) if live else []
    result = [(0.0, True)] * len(pairs)
    for i, (lp, gr) in zip(live, scored):
        n = spans[i]
        result[i] = (float(np.sum(lp[-n:].astype(np.float64))), bool(np.all(gr[-n:])))
    return result
