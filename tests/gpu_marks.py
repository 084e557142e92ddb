"""Shared by the Mosaic GPU kernel test files: the Hopper skip mark and the interpreter reset."""

from __future__ import annotations

import jax
import pytest


def hopper() -> bool:
    """A GPU backend whose first device is sm_90 or newer (TMA and wgmma)."""
    if jax.default_backend() != "gpu":
        return False
    cc = getattr(jax.devices()[0], "compute_capability", "0.0")
    return tuple(int(v) for v in str(cc).split(".")[:1]) >= (9,)


gpu = pytest.mark.skipif(
    not hopper(), reason="needs a Hopper (sm_90+) GPU backend: the Mosaic GPU kernels use TMA and wgmma"
)


@pytest.fixture(autouse=True)
def _clean_interpreter_state():
    """GPU interpret mode keeps global state after an exception inside a kernel; reset it."""
    yield
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret

    gpu_interpret.reset_gpu_interpret_mode_state()
