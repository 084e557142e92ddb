"""Orbax checkpoints of the train state, with the run's identity stored beside it.

* Saves are atomic (orbax writes to a temporary directory and renames it on commit), so a crash
  mid-save leaves the previous checkpoint as the latest usable one.
* Each checkpoint holds ``state`` (step, params, optimizer state) and ``meta`` (JSON: the model
  config, the data position and run info). A workdir whose checkpoints were written for a different
  model config is refused with a clear error instead of being overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class IncompatibleCheckpointError(ValueError):
    pass


def _normalise(obj: Any) -> Any:
    """JSON round trip so tuples/lists and float('inf') compare equal after a save/restore."""
    return json.loads(json.dumps(obj))


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_period: int | None = None, async_save: bool = True):
        # Cloud URLs (gs://...) go to orbax / tensorstore as they are.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        r = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return r.meta

    def check_compatible(self, model_config: dict, step: int | None = None) -> None:
        meta = self.read_meta(step)
        saved = meta.get("model_config")
        if _normalise(saved) != _normalise(model_config):
            saved = saved or {}
            diff = sorted(
                k for k in set(saved) | set(model_config)
                if _normalise(saved.get(k)) != _normalise(model_config.get(k))
            )
            raise IncompatibleCheckpointError(
                f"{self.directory} holds checkpoints of a different model (differing keys: {diff}); "
                "refusing to resume or overwrite it — use another --workdir"
            )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore onto the shardings carried by ``abstract_state`` (any mesh / device count)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        r = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return r.state, r.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
