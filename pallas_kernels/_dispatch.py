"""Helpers shared by ops that choose between several implementations.

Each op exposes an ``impl`` argument (``"auto"``, ``"reference"``, ``"xla"``,
``"pallas_tpu"``, ``"pallas_gpu"``, ...). These helpers validate that string,
report the active backend and emit one-time warnings about fallbacks.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable

import jax

_WARNED: set[Hashable] = set()


def validate_impl(impl: object, allowed: Iterable[str]) -> str:
    """Return ``impl`` if it is one of ``allowed``.

    Raises:
        ValueError: naming ``impl`` and listing the allowed values when ``impl``
            is not a string in ``allowed``.
    """
    allowed = tuple(allowed)
    if not isinstance(impl, str) or impl not in allowed:
        raise ValueError(
            f"impl={impl!r} is not supported; expected one of {', '.join(map(repr, allowed))}."
        )
    return impl


def warn_once(key: Hashable, message: str) -> None:
    """Issue ``message`` as a ``UserWarning`` the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def default_backend() -> str:
    """Platform name of JAX's default backend: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()
