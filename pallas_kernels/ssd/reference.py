"""Token-by-token SSD recurrence: the oracle the other implementations are tested against.

Inputs are already preprocessed by :func:`pallas_kernels.ssd.api.ssd`: every
float array is in the compute dtype, ``dt`` is the final step size ``dt'``
(bias, softplus and clipping applied), ``D`` is ``(h, p)`` or ``None``, and
``doc`` is a monotonic per-token document index with ``doc[:, 0] == 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def ssd_reference(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    initial_state: jax.Array,
    doc: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Sequential SSD scan over time.

    For every token ``t`` (state is ``(p, n)`` per head, head ``j`` reads group
    ``j // (h // g)`` of ``B`` and ``C``)::

        state_t = 0 if doc_t != doc_{t-1}, else state_{t-1}   (state_{-1} = initial_state)
        state_t = exp(dt_t * A) * state_t + dt_t * outer(x_t, B_t)
        y_t     = state_t @ C_t + D * x_t

    Args:
        x: ``(b, l, h, p)``.
        dt: ``(b, l, h)`` preprocessed step sizes.
        A: ``(h,)``.
        B, C: ``(b, l, g, n)``.
        D: ``(h, p)`` or ``None``.
        initial_state: ``(b, h, p, n)``.
        doc: ``(b, l)`` int32 monotonic document index.

    Returns:
        ``(y, final_state)`` with shapes ``(b, l, h, p)`` and ``(b, h, p, n)`` in the
        compute dtype.
    """
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    B_h = jnp.repeat(B, heads_per_group, axis=2)  # (b, l, h, n)
    C_h = jnp.repeat(C, heads_per_group, axis=2)
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)

    def step(state: jax.Array, inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        x_t, dt_t, B_t, C_t, reset_t = inputs  # (b,h,p) (b,h) (b,h,n) (b,h,n) (b,)
        state = jnp.where(reset_t[:, None, None, None], jnp.zeros_like(state), state)
        decay = jnp.exp(dt_t * A)[:, :, None, None]
        state = decay * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", state, C_t, precision=_HIGHEST)
        return state, y_t

    time_major = [jnp.moveaxis(a, 1, 0) for a in (x, dt, B_h, C_h, reset)]
    final_state, y = jax.lax.scan(step, initial_state, time_major)
    y = jnp.moveaxis(y, 0, 1)
    if D is not None:
        y = y + D * x
    return y, final_state
