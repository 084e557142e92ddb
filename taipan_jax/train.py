"""``python -m taipan_jax.train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]``

Trains a language model from an ml_collections config, checkpoints with orbax (resuming from the
latest checkpoint in ``--workdir``), reports held-out bits per byte, and prints a short sample.
With no ``--config`` the embedded default (``configs/tiny.py``) is used.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from taipan_jax.checkpointing import Checkpointer
from taipan_jax.data import HeldoutWindows, RandomWindowStream, load_corpus
from taipan_jax.data.vocab import get_vocabulary
from taipan_jax.model_config import ModelConfig
from taipan_jax.sampling import generate
from taipan_jax.training import Trainer, make_mesh

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


class NonFiniteLossError(RuntimeError):
    pass


def evaluate_heldout(trainer: Trainer, params, windows: HeldoutWindows, vocab) -> dict:
    nats, tokens, nbytes = 0.0, 0.0, 0
    for batch in windows:
        out = trainer.eval_step(params, batch)
        nats += float(out["nats"])
        tokens += float(out["tokens"])
        nbytes += int(vocab.bytes_per_token(batch["targets"]).sum())
    return {
        "heldout_loss": nats / tokens,
        "heldout_ppl": math.exp(min(nats / tokens, 50.0)),
        "heldout_bpb": nats / math.log(2) / max(nbytes, 1),
    }


class _Preemption:
    """Turns SIGTERM into a flag the loop checks: save a checkpoint and exit 0."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a notebook thread)
            pass

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def run(config, workdir: str) -> dict:
    """Train per ``config`` in ``workdir``; returns the final metrics."""
    os.makedirs(workdir, exist_ok=True)
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    tc, dc = config.train, config.data
    vocab = get_vocabulary(dc.vocab)
    if vocab.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the {dc.vocab!r} "
            f"vocabulary ({vocab.vocab_size})"
        )
    train_tokens = vocab.encode(load_corpus(dc.train_corpus))
    heldout_tokens = vocab.encode(load_corpus(dc.heldout_corpus))
    stream = RandomWindowStream(
        train_tokens, seq_len=dc.seq_len, global_batch_size=tc.global_batch_size, seed=tc.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    heldout = HeldoutWindows(heldout_tokens, seq_len=dc.seq_len, batch_size=tc.eval_batch_size, num_batches=tc.eval_batches)

    mesh = make_mesh(config.mesh.shape.to_dict())
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.global_batch_size % dp:
        raise ValueError(
            f"config.train.global_batch_size={tc.global_batch_size} is not divisible by the "
            f"data-parallel size {dp} (mesh data x fsdp)"
        )
    trainer = Trainer(model_cfg, tc, mesh, config.mesh.rules)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep)
    meta_base = {"model_config": model_cfg.to_dict(), "data": {"stream": "random_windows", "seed": tc.seed}}

    latest = ckpt.latest_step()
    if latest is not None:
        ckpt.check_compatible(meta_base["model_config"], latest)
        state, _ = ckpt.restore(trainer.abstract_state, latest)
        _log(f"resumed from checkpoint step {latest} in {ckpt.directory}")
    else:
        state = trainer.init_state(tc.seed)
    start = int(state["step"])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    _log(f"model: {len(model_cfg.blocks)} blocks ({model_cfg.block_pattern} x {model_cfg.num_groups}), "
         f"d_model={model_cfg.d_model}, params={n_params:,}; mesh={dict(mesh.shape)}; steps {start}->{tc.steps}")

    base_key = jax.random.key(tc.seed)
    preempt = _Preemption()
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    history = []
    t0, tokens_since = time.time(), 0
    step = start
    last = {}
    while step < tc.steps:
        batch = stream.batch(step)
        state, metrics = trainer.train_step(state, batch, jax.random.fold_in(base_key, step))
        step += 1
        tokens_since += batch["inputs"].size * jax.process_count()
        if step % tc.log_every == 0 or step == tc.steps or step == start + 1:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(m["loss"]):
                raise NonFiniteLossError(
                    f"loss is {m['loss']} at step {step}; not checkpointing it (last good checkpoint: "
                    f"{ckpt.latest_step()})"
                )
            dt = time.time() - t0
            m.update(step=step, tokens_per_sec=tokens_since / max(dt, 1e-9))
            t0, tokens_since = time.time(), 0
            history.append(m)
            last = m
            sel = [v for k, v in m.items() if k.endswith("sal/selected_frac")]
            sal = (f"  sel {np.mean(sel):.3f} ({' '.join(f'{v:.2f}' for v in sel)})  budget {m['budget_loss']:.4f}"
                   if sel else "")
            _log(f"step {step:6d}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  gnorm {m['grad_norm']:.3f}  "
                 f"tok/s {m['tokens_per_sec']:,.0f}{sal}")
            if jax.process_index() == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
            ev = evaluate_heldout(trainer, state["params"], heldout, vocab)
            _log(f"step {step:6d}  heldout loss {ev['heldout_loss']:.4f}  bpb {ev['heldout_bpb']:.4f}")
        if step % config.checkpoint.every_steps == 0 or step == tc.steps or preempt.requested:
            if not math.isfinite(float(metrics["loss"])):
                raise NonFiniteLossError(f"loss is not finite at step {step}; not checkpointing it")
            ckpt.save(step, state, {**meta_base, "step": step}, force=True)
        if preempt.requested:
            ckpt.close()
            _log(f"SIGTERM: checkpoint saved at step {step}; exiting")
            return {"preempted": True, "step": step}

    ckpt.close()
    result = {"step": step, "train_loss": last.get("loss"), "first_loss": history[0]["loss"] if history else None}
    result.update(evaluate_heldout(trainer, state["params"], heldout, vocab))
    _log(f"held-out ({dc.heldout_corpus}): loss {result['heldout_loss']:.4f} nats/token, "
         f"bits/byte {result['heldout_bpb']:.4f}")

    sc = config.sample
    if sc.num_tokens > 0:
        prompt = vocab.encode(sc.prompt)[None]
        out = generate(trainer.model(state["params"]), prompt, num_tokens=sc.num_tokens,
                       key=jax.random.key(sc.seed), temperature=sc.temperature, top_k=sc.top_k)
        text = vocab.decode(out[0])
        result["sample"] = sc.prompt + text
        _log("sample:\n" + sc.prompt + text)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def main() -> None:
    """Command-line entry point (flags are defined here so importing this module defines none)."""
    config_flag = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG, "Path to a configs/*.py file.", lock_config=True
    )
    workdir_flag = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not workdir_flag.value:
            raise app.UsageError("--workdir is required")
        logging.set_verbosity(logging.WARNING)
        run(config_flag.value, workdir_flag.value)

    app.run(_main)


if __name__ == "__main__":
    main()
