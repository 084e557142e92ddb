"""Autoregressive sampling: prefill the prompt once, then jitted single-token steps (constant memory)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taipan_jax.model import LanguageModel, check_decode_room


def sample_logits(
    logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Greedy when ``temperature == 0``; otherwise softmax sampling, optionally top-k and/or top-p.

    top-p (nucleus) keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token is always kept).
    """
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of strictly better tokens
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: LanguageModel,
    prompt: np.ndarray,
    *,
    num_tokens: int,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """``prompt (b, l) int32`` -> ``(b, num_tokens)`` sampled continuations."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (batch, length) array, got shape {prompt.shape}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    check_decode_room(model, prompt.shape[1] + int(num_tokens) - 1,
                      f"prompt of {prompt.shape[1]} tokens + {num_tokens} new tokens")
    graphdef, state = nnx.split(model)
    return np.asarray(_generate(graphdef, state, prompt, key, int(num_tokens), float(temperature), int(top_k),
                                float(top_p)))


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, prompt, key, num_tokens, temperature, top_k, top_p):
    """Prefill, then ``num_tokens`` sampled single-token steps (compiled once per model structure,
    prompt shape and sampling settings)."""
    m = nnx.merge(graphdef, state)
    logits, _, cache = m(prompt, return_cache=True)
    k0, key = jax.random.split(key)
    first = sample_logits(logits[:, -1], k0, temperature=temperature, top_k=top_k, top_p=top_p)

    def body(carry, k):
        tok, cache = carry
        lg, cache = m.step(tok, cache)
        nxt = sample_logits(lg, k, temperature=temperature, top_k=top_k, top_p=top_p)
        return (nxt, cache), tok

    (_, _), toks = jax.lax.scan(body, (first, cache), jax.random.split(key, num_tokens))
    return toks.T
