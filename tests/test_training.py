"""Trainer pieces: mesh construction, logical->mesh rules, schedule, optimizer masking."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from taipan_jax.sharding import DEFAULT_RULES, logical_to_mesh
from taipan_jax.training import lr_schedule, make_mesh


def test_make_mesh_fills_and_validates():
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 2 devices"):
        make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown axes"):
        make_mesh({"data": 1, "pipeline": 1})
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})


def test_logical_rules_map_and_respect_divisibility():
    mesh_shape = {"data": 2, "fsdp": 4, "tensor": 2}
    assert logical_to_mesh(("batch", "length", "embed"), DEFAULT_RULES) == P(("data", "fsdp"), None, None)
    # A mesh axis is used once per spec: batch takes data+fsdp, so embed is left replicated.
    assert logical_to_mesh(("batch", "length", "embed"), DEFAULT_RULES, shape=(8, 16, 32), mesh_shape=mesh_shape) == P(
        ("data", "fsdp"), None, None)
    assert logical_to_mesh(("embed", "mlp"), DEFAULT_RULES, shape=(64, 128), mesh_shape=mesh_shape) == P("fsdp", "tensor")
    # 6 is not divisible by fsdp=4: replicate rather than fail.
    assert logical_to_mesh(("embed", "mlp"), DEFAULT_RULES, shape=(6, 128), mesh_shape=mesh_shape) == P(None, "tensor")
    with pytest.raises(ValueError, match="no entry in the rules table"):
        logical_to_mesh(("nonsense",), DEFAULT_RULES)


def test_schedule_warmup_then_cosine_to_floor():
    c = tiny.get_config().train
    c.steps, c.warmup_steps, c.lr, c.min_lr = 100, 10, 1e-3, 1e-5
    s = lr_schedule(c)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    assert float(s(55)) < 1e-3
    np.testing.assert_allclose(float(s(100)), 1e-5, rtol=1e-4)
