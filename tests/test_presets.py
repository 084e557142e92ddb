"""Every preset: abstract init, parameter count within 3% of its name; the 1.3B train step lowers on CPU."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from taipan_jax.describe import describe
from taipan_jax.model_config import ModelConfig
from taipan_jax.presets import FAMILIES, SIZES

NOMINAL = {"190m": 190e6, "450m": 450e6, "1_3b": 1.3e9}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", sorted(SIZES))
def test_preset_parameter_count_within_3_percent(family, size):
    config = importlib.import_module(f"configs.{family}_{size}").get_config()
    cfg = ModelConfig.from_dict(config.model.to_dict())
    text, total = describe(cfg)
    assert abs(total - NOMINAL[size]) / NOMINAL[size] <= 0.03, (family, size, total)
    assert text.splitlines()[-1] == f"total_params={total}"
    assert cfg.vocab_size == 128_256
    if family == "taipan":
        assert cfg.group == ("mamba2",) * 6 + ("sal",)
        assert cfg.sal.capacity == 0.15 and cfg.sal.window == 2048 and cfg.sal.positional == "none"


def test_taipan_1_3b_train_step_lowers_on_cpu():
    from taipan_jax.training import Trainer, make_mesh

    config = importlib.import_module("configs.taipan_1_3b").get_config()
    cfg = ModelConfig.from_dict(config.model.to_dict())
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    trainer = Trainer(cfg, config.train, mesh, config.mesh.rules)
    n = sum(x.size for x in jax.tree.leaves(trainer.abstract_state["params"]))
    assert abs(n - 1.3e9) / 1.3e9 <= 0.03
    batch = {k: jax.ShapeDtypeStruct((1, 4096), jnp.int32) for k in ("inputs", "targets")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    with trainer._context():
        lowered = trainer._train_step.lower(trainer.abstract_state, batch, key)
    text = lowered.as_text()
    assert "stablehlo" in text or "func.func" in text
