"""Small helpers for tests and smoke runs of the evaluations: a model with random weights drawn in
numpy (no per-parameter XLA compilation: building a model with ``build_model`` compiles one
initialiser per parameter shape, ~10 s on a 2-core CPU) and a workdir written the way the trainer
writes its checkpoints (orbax ``state`` with ``params`` + JSON ``meta`` with the model config and
the vocabulary), so that ``taipan_jax.generate.load`` reads it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from taipan_jax.checkpointing import Checkpointer
from taipan_jax.model import LanguageModel, abstract_model
from taipan_jax.model_config import ModelConfig


def random_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.02) -> LanguageModel:
    """A model of ``cfg`` with weights ~ N(0, scale) (norm weights 1, biases 0, Mamba-2 A/dt/D as
    at initialisation). Not the trainer's initialisation; meant for tests of evaluation code."""
    rng = np.random.default_rng(seed)
    graphdef, abs_state = nnx.split(abstract_model(cfg))

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = leaf.shape, leaf.dtype
        if name == "A_log":
            x = np.log(rng.uniform(1.0, 16.0, shape))
        elif name == "D":
            x = np.ones(shape)
        elif name == "dt_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
            x = dt + np.log(-np.expm1(-dt))  # inverse softplus
        elif name == "weight":
            x = np.ones(shape)
        elif name == "bias" or name.endswith("_b"):
            x = np.zeros(shape)
        else:
            x = rng.normal(0.0, scale, shape)
        return jax.numpy.asarray(x, dtype)

    state = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abs_state))
    nnx.replace_by_pure_dict(abs_state, state)
    return nnx.merge(graphdef, abs_state)


def save_workdir(model: LanguageModel, workdir: str, *, vocab: str = "bytes", step: int = 1) -> str:
    """Write ``model``'s parameters as checkpoint ``step`` of ``workdir`` (the trainer's layout)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(step, {"step": np.int32(step), "params": params},
              {"model_config": model.cfg.to_dict(), "vocab": vocab, "step": step}, force=True)
    ckpt.close()
    return workdir
