"""Training pieces: mesh, parameter shardings, optimizer, loss, jitted train / eval steps.

The model is handled functionally: ``graphdef`` (static) + ``params`` (a pure nested dict of
arrays, FSDP/TP-sharded by the logical-axis rules). The train state is a plain dict
``{"step", "params", "opt_state"}`` so orbax saves and restores it as an ordinary pytree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from taipan_jax.model import LanguageModel, abstract_model, sal_budget_loss, weight_decay_mask
from taipan_jax.model_config import ModelConfig
from taipan_jax.sharding import logical_rules, logical_to_mesh

MESH_AXES = ("data", "fsdp", "tensor")


# -- mesh and shardings ------------------------------------------------------------------------
def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with explicit ``AxisType.Auto``; one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh.shape has unknown axes {unknown}; allowed: {list(MESH_AXES)}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh.shape: at most one axis may be -1, got {dict(shape)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh.shape sizes must be positive or -1, got {dict(shape)}")
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(
                f"config.mesh.shape {dict(shape)}: fixed axes ({fixed}) do not divide the "
                f"{len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh.shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def param_shardings(abs_params: nnx.State, mesh: Mesh, rules) -> Any:
    """NamedShardings (pure-dict tree) for parameters, from their logical-axis metadata."""

    def one(v):
        spec = logical_to_mesh(
            v.get_metadata().get("out_sharding"), rules, shape=v.shape, mesh_shape=dict(mesh.shape)
        )
        return NamedSharding(mesh, spec)

    tree = jax.tree.map(one, abs_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh(("batch", "length"), rules))


# -- optimizer ---------------------------------------------------------------------------------
def lr_schedule(tc) -> optax.Schedule:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr`` at ``schedule_steps`` (or ``steps``)."""
    warmup = max(int(tc.warmup_steps), 0)
    horizon = int(tc.get("schedule_steps", 0) or tc.steps)
    decay_steps = max(horizon - warmup, 1)
    cosine = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.min_lr / tc.lr if tc.lr else 0.0)
    if warmup == 0:
        return cosine
    return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), cosine], [warmup])


def make_optimizer(tc, decay_mask: Any) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(
            lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask
        ),
    )


# -- loss --------------------------------------------------------------------------------------
def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross entropy (nats), float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_and_metrics(model: LanguageModel, batch: Mapping[str, jax.Array], *, key=None, train=False, step=None):
    """Mean token cross entropy plus ``lambda * sum_SAL budget`` (the SAL budget loss, Eq. 7)."""
    logits, aux = model(batch["inputs"], segment_ids=batch.get("segment_ids"), key=key, train=train, step=step)
    losses = token_losses(logits, batch["targets"])
    weights = batch.get("weights")
    weights = jnp.ones_like(losses) if weights is None else weights.astype(jnp.float32)
    total = jnp.sum(weights)
    ce = jnp.sum(losses * weights) / jnp.maximum(total, 1.0)
    budget = sal_budget_loss(aux)
    loss = ce + model.cfg.sal.budget_weight * budget
    metrics = {"ce": ce, "tokens": total}
    if any(k.endswith("sal/budget_loss") for k in aux):
        metrics["budget_loss"] = budget
    return loss, metrics, aux


# -- the trainer's functional core -------------------------------------------------------------
class Trainer:
    """Builds the jitted init / train / eval functions for one model config on one mesh."""

    def __init__(self, model_cfg: ModelConfig, train_cfg, mesh: Mesh, rules):
        self.cfg, self.tc, self.mesh, self.rules = model_cfg, train_cfg, mesh, tuple(map(tuple, rules))
        self.accum = int(train_cfg.grad_accum_steps)
        if self.accum < 1:
            raise ValueError(f"config.train.grad_accum_steps must be >= 1, got {self.accum}")
        abs_model = abstract_model(model_cfg)
        self.graphdef, abs_params = nnx.split(abs_model, nnx.Param)
        self.abs_params = abs_params
        self.param_sharding = param_shardings(abs_params, mesh, self.rules)
        self.tx = make_optimizer(train_cfg, nnx.to_pure_dict(weight_decay_mask(abs_params)))
        self.data_sharding = batch_sharding(mesh, self.rules)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.schedule = lr_schedule(train_cfg)

        def init(seed):
            model = LanguageModel(model_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
                    "nonfinite_steps": jnp.zeros((), jnp.int32)}

        abs_state = jax.eval_shape(lambda: init(0))
        self.state_sharding = self._state_sharding(abs_state)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, self.state_sharding
        )
        with self._context():
            self._init = jax.jit(init, static_argnums=0, out_shardings=self.state_sharding)
        self._train_step = jax.jit(
            self._train_step_impl,
            in_shardings=(self.state_sharding, self.data_sharding, self.replicated),
            out_shardings=(self.state_sharding, self.replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            self._eval_step_impl,
            in_shardings=(self.param_sharding, self.data_sharding),
            out_shardings=self.replicated,
        )

    def _context(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(logical_rules(self.rules))
        return stack

    def _state_sharding(self, abs_state):
        """Params by their rules; optimizer moments mirror their params; scalars replicated."""
        param_treedef = jax.tree.structure(abs_state["params"])

        def shard_opt(node):
            if jax.tree.structure(node) == param_treedef:
                return self.param_sharding
            return jax.tree.map(lambda _: self.replicated, node)

        opt = jax.tree.map(
            shard_opt, abs_state["opt_state"],
            is_leaf=lambda n: jax.tree.structure(n) == param_treedef if isinstance(n, dict) else False,
        )
        return {"step": self.replicated, "params": self.param_sharding, "opt_state": opt,
                "nonfinite_steps": self.replicated}

    def model(self, params) -> LanguageModel:
        return nnx.merge(self.graphdef, nnx.State(params))

    def init_state(self, seed: int):
        with self._context():
            return self._init(int(seed))

    def _grads(self, params, batch, key, step):
        """Loss, metrics and gradients, accumulated over ``grad_accum_steps`` micro-batches."""

        def loss_fn(params, micro, key):
            model = self.model(params)
            loss, metrics, aux = loss_and_metrics(model, micro, key=key, train=True, step=step)
            metrics = dict(metrics)
            for k, v in aux.items():  # per block type in the group, stacked over groups
                for g in range(v.shape[0]):
                    metrics[f"group{g}/{k}"] = v[g]
            return loss, metrics

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        n = self.accum
        if n == 1:
            (loss, metrics), grads = grad_fn(params, batch, key)
            return loss, metrics, grads
        micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), dict(batch))

        def body(carry, inp):
            mb, k = inp
            (loss, metrics), grads = grad_fn(params, mb, k)
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        (loss_s, metrics_s), grads_s = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key)
        init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (loss_s, metrics_s, grads_s))
        (loss, metrics, grads), _ = jax.lax.scan(body, init, (micro, jax.random.split(key, n)))
        scale = 1.0 / n
        metrics = {k: (v if k == "tokens" else v * scale) for k, v in metrics.items()}
        return loss * scale, metrics, jax.tree.map(lambda g: g * scale, grads)

    def _train_step_impl(self, state, batch, key):
        loss, metrics, grads = self._grads(state["params"], batch, key, state["step"])
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A non-finite loss or gradient never reaches the parameters (so it is never checkpointed):
        # the update is skipped in-graph and counted; the host decides to halt or go on.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics = dict(metrics)
        metrics.update(loss=loss, grad_norm=grad_norm, lr=self.schedule(state["step"]),
                       nonfinite=(~finite).astype(jnp.float32))
        new_state = {
            "step": state["step"] + 1,
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32),
        }
        return new_state, metrics

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble this process's rows into global arrays sharded over the data axes."""
        return {k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(v)) for k, v in local.items()}

    def train_step(self, state, batch: Mapping[str, np.ndarray], key):
        with self._context():
            return self._train_step(state, self.global_batch(batch), key)

    def _eval_step_impl(self, params, batch):
        model = self.model(params)
        has_sal = "sal" in self.cfg.group
        logits, aux = model(batch["inputs"], segment_ids=batch.get("segment_ids"), return_selection=has_sal)
        losses = token_losses(logits, batch["targets"])
        w = batch.get("weights")
        w = jnp.ones_like(losses) if w is None else w.astype(jnp.float32)  # 0 = padding
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        out = {"nats": jnp.sum(losses * w), "tokens": jnp.sum(w), "correct": jnp.sum(correct * w)}
        if has_sal:  # evaluation-mode selection over weighted tokens, all SALs together
            sel = [v for k, v in aux.items() if k.endswith("sal/selected")]  # each (num_groups, b, l)
            out["selected"] = sum(jnp.sum(v * w[None]) for v in sel)
            out["selected_slots"] = sum(v.shape[0] for v in sel) * jnp.sum(w)
        return out

    def eval_step(self, params, batch):
        with self._context():
            return self._eval_step(params, self.global_batch(batch))
