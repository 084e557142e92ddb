"""Chunked SSD algorithm in plain JAX (Mamba-2 paper, section 6; ``ssd_minimal.py``).

Inputs are preprocessed by :func:`pallas_kernels.ssd.api.ssd` exactly as for
:func:`pallas_kernels.ssd.reference.ssd_reference`. Differentiable by ordinary
autodiff. Every masked exponent is set to ``-inf`` *before* ``exp`` so that
masked entries contribute exact zeros to values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.config import SSDBlockSizes

_HIGHEST = jax.lax.Precision.HIGHEST


def _segsum(a: jax.Array) -> jax.Array:
    """Stable segment sum: ``out[..., i, j] = sum(a[..., j+1 : i+1])`` for ``i >= j``, ``-inf`` above.

    Built by cumulative sums of a masked repeat of ``a`` rather than as a
    difference of cumulative sums, so it does not lose precision.
    """
    q = a.shape[-1]
    a_rep = jnp.repeat(a[..., None], q, axis=-1)  # a_rep[..., i, j] = a[..., i]
    a_rep = jnp.where(jnp.tri(q, k=-1, dtype=bool), a_rep, 0)
    out = jnp.cumsum(a_rep, axis=-2)
    return jnp.where(jnp.tri(q, dtype=bool), out, -jnp.inf)


def _masked_exp(mask: jax.Array, exponent: jax.Array) -> jax.Array:
    """``exp(exponent)`` where ``mask`` holds, exactly 0 (with zero gradient) elsewhere."""
    return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


def ssd_xla(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    initial_state: jax.Array,
    doc: jax.Array,
    block_sizes: SSDBlockSizes,
) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD with the same contract as :func:`~pallas_kernels.ssd.reference.ssd_reference`.

    The sequence is padded to a multiple of ``Q = block_sizes.chunk_size`` with
    ``dt = 0`` (decay 1, no input), zero ``x``/``B``/``C`` and the last document
    index continued, so padding changes neither ``y`` nor the final state.

    Per chunk ``c`` with in-chunk cumulative log-decay ``cs = cumsum(dt * A)``:

    * diagonal block: ``y_i += sum_{j<=i, doc_j == doc_i} exp(segsum_ij) (C_i.B_j) dt_j x_j``;
    * chunk state: ``local_c = sum_{s: doc_s == doc_last} exp(cs_last - cs_s) dt_s x_s (x) B_s``;
    * recurrence (``lax.scan``): ``S_c = [doc_last_c == doc_last_{c-1}] exp(cs_last) S_{c-1} + local_c``
      starting from ``S_{-1} = initial_state`` whose document is 0;
    * off-diagonal: ``y_t += [doc_t == doc_last_{c-1}] exp(cs_t) C_t . S_{c-1}``;
    * ``y += D * x``.

    Returns:
        ``(y, final_state)``: ``(b, l, h, p)`` and ``(b, h, p, n)`` in the compute dtype.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    q = block_sizes.chunk_size
    pad = -l % q
    if pad:
        x, dt, B, C = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (x, dt, B, C))
        doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
    c = (l + pad) // q

    B_h = jnp.repeat(B, h // g, axis=2).reshape(b, c, q, h, n)
    C_h = jnp.repeat(C, h // g, axis=2).reshape(b, c, q, h, n)
    x_c = x.reshape(b, c, q, h, p)
    dt_c = jnp.transpose(dt.reshape(b, c, q, h), (0, 3, 1, 2))  # (b, h, c, q)
    doc_c = doc.reshape(b, c, q)
    dA = dt_c * A[None, :, None, None]
    cs = jnp.cumsum(dA, axis=-1)  # (b, h, c, q)

    doc_last = doc_c[:, :, -1]  # (b, c)
    doc_prev_last = jnp.concatenate([jnp.zeros((b, 1), doc.dtype), doc_last[:, :-1]], axis=1)

    # 1. Diagonal blocks: (b, h, c, q_i, q_j).
    same_doc = (doc_c[:, :, :, None] == doc_c[:, :, None, :])[:, None]
    L = _masked_exp(same_doc, _segsum(dA))
    CB = jnp.einsum("bcihn,bcjhn->bhcij", C_h, B_h, precision=_HIGHEST)
    y_diag = jnp.einsum("bhcij,bhcj,bcjhp->bcihp", CB * L, dt_c, x_c, precision=_HIGHEST)

    # 2. Per-chunk state contributions, restricted to the chunk's last document.
    decay_to_end = _masked_exp((doc_c == doc_last[:, :, None])[:, None], cs[..., -1:] - cs)
    local = jnp.einsum("bcjhn,bhcj,bcjhp->bchpn", B_h, decay_to_end * dt_c, x_c, precision=_HIGHEST)

    # 3. Inter-chunk recurrence over carried-in states.
    chunk_decay = _masked_exp((doc_last == doc_prev_last)[:, None], cs[..., -1])  # (b, h, c)

    def step(state: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        decay, local_c = inputs
        return decay[:, :, None, None] * state + local_c, state

    final_state, prev_states = jax.lax.scan(
        step, initial_state, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(local, 1, 0))
    )  # prev_states: (c, b, h, p, n), the state entering each chunk

    # 4. Off-diagonal output from the carried-in state.
    decay_from_start = _masked_exp((doc_c == doc_prev_last[:, :, None])[:, None], cs)
    y_off = jnp.einsum(
        "bcihn,cbhpn,bhci->bcihp", C_h, prev_states, decay_from_start, precision=_HIGHEST
    )

    y = (y_diag + y_off).reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        y = y + D * x[:, :l]
    return y, final_state
