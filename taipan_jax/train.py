"""``python -m taipan_jax.train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]``

The trainer: builds the mesh from ``config.mesh`` (data x fsdp x tensor, logical-axis rules),
initialises or resumes (orbax, the latest checkpoint in ``--workdir``), trains with a jitted,
sharded, donated train step, logs to the console, ``metrics.jsonl`` and TensorBoard (process 0
only), evaluates held-out bits per byte, and samples. SIGTERM saves a checkpoint and exits 0.
With no ``--config`` the embedded default (``configs/tiny.py``) is used.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from taipan_jax.checkpointing import Checkpointer
from taipan_jax.data.streams import build_streams
from taipan_jax.data.vocab import get_vocabulary
from taipan_jax.flops import peak_tflops, train_flops_per_token
from taipan_jax.model_config import ModelConfig
from taipan_jax.sampling import generate
from taipan_jax.training import Trainer, make_mesh

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


class NonFiniteLossError(RuntimeError):
    pass


def initialize_distributed(dc) -> None:
    """``jax.distributed.initialize`` from explicit settings or the cluster's environment."""
    mode = dc.initialize
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"config.distributed.initialize must be auto|always|never, got {mode!r}")
    explicit = bool(dc.coordinator_address)
    if mode == "never" or (mode == "auto" and not explicit and not any(k in os.environ for k in _CLUSTER_ENV)):
        return
    if jax.distributed.is_initialized():
        return
    # CPU-only clusters (and tests) need a collectives implementation; GPUs/TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=dc.coordinator_address, num_processes=dc.num_processes,
                      process_id=dc.process_id)
    jax.distributed.initialize(**kwargs)


def evaluate_heldout(trainer: Trainer, params, heldout, vocab) -> dict:
    """Per-token loss, perplexity, bits per byte and token accuracy over the held-out batches.

    ``heldout`` yields ``(local batch, global batch)``; tokens with weight 0 (padding) do not count.
    Bits per byte use the vocabulary's bytes per target token (0 for special ids such as EOS);
    ``heldout_accuracy`` is the argmax accuracy over weighted tokens (the MQAR metric for MQAR data);
    ``heldout_selected_frac`` (models with SALs) the fraction of weighted tokens that the SALs
    select in evaluation mode, over all SALs (for MQAR: of the query tokens).
    """
    nats, tokens, correct, nbytes = 0.0, 0.0, 0.0, 0
    selected, slots = 0.0, 0.0
    for batch, full in heldout:
        out = trainer.eval_step(params, batch)
        nats += float(out["nats"])
        tokens += float(out["tokens"])
        correct += float(out["correct"])
        selected += float(out.get("selected", 0.0))
        slots += float(out.get("selected_slots", 0.0))
        w = full.get("weights")
        per_tok = vocab.bytes_per_token(full["targets"]) if vocab is not None else np.zeros(full["targets"].shape)
        nbytes += int((per_tok * (1 if w is None else w)).sum())
    loss = nats / max(tokens, 1.0)
    result = {
        "heldout_loss": loss,
        "heldout_ppl": math.exp(min(loss, 50.0)),
        "heldout_bpb": nats / math.log(2) / nbytes if nbytes else float("nan"),
        "heldout_accuracy": correct / max(tokens, 1.0),
        "heldout_tokens": tokens,
    }
    if slots:
        result["heldout_selected_frac"] = selected / slots  # evaluation-mode selection, all SALs
    return result


class _Preemption:
    """SIGTERM sets a flag; the loop then saves a checkpoint and exits 0."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook thread)
            pass

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True


class _Writer:
    """metrics.jsonl + TensorBoard (tensorboardX, if installed), process 0 only."""

    def __init__(self, workdir: str, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.tb = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                logging.warning("tensorboardX is not installed: no TensorBoard event files")
            else:
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run(config, workdir: str) -> dict:
    """Train per ``config`` in ``workdir``; returns the final metrics."""
    initialize_distributed(config.distributed)
    # Local paths or cloud URLs (gs://bucket/run: orbax writes through tensorstore, the small
    # files through etils.epath).
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    tc, dc = config.train, config.data
    if tc.nan_policy not in ("halt", "skip"):
        raise ValueError(f"config.train.nan_policy must be 'halt' or 'skip', got {tc.nan_policy!r}")
    vocab = get_vocabulary(dc.vocab)
    synthetic = str(dc.train_corpus).startswith("mqar")  # MQAR has its own token ids; no text vocabulary
    if synthetic:
        vocab = None
    elif vocab.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the {dc.vocab!r} "
            f"vocabulary ({vocab.vocab_size})"
        )
    mesh = make_mesh(config.mesh.shape.to_dict())
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.global_batch_size % (dp * tc.grad_accum_steps):
        raise ValueError(
            f"config.train.global_batch_size={tc.global_batch_size} is not divisible by the "
            f"data-parallel size {dp} (mesh data x fsdp) x grad_accum_steps {tc.grad_accum_steps}"
        )
    pi, pc = jax.process_index(), jax.process_count()
    # The batch at step s is a pure function of (seed, s) for every pipeline (taipan_jax/data/streams.py).
    stream, heldout = build_streams(dc, tc, vocab, model_vocab_size=model_cfg.vocab_size, process_index=pi,
                                    process_count=pc)
    trainer = Trainer(model_cfg, tc, mesh, config.mesh.rules)
    ck = config.checkpoint
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=ck.max_to_keep,
                        keep_period=ck.keep_every or None, async_save=ck.async_save)
    meta_base = {"model_config": model_cfg.to_dict(), "vocab": dc.vocab}

    latest = ckpt.latest_step()
    if latest is not None:
        ckpt.check_compatible(meta_base["model_config"], latest)
        state, _ = ckpt.restore(trainer.abstract_state, latest)
        _log(f"resumed from checkpoint step {latest} in {ckpt.directory}")
    else:
        state = trainer.init_state(tc.seed)
    start = int(state["step"])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    flops_per_token = train_flops_per_token(model_cfg, dc.seq_len)
    peak = tc.peak_tflops or peak_tflops(jax.devices()[0].device_kind)
    _log(f"model: {len(model_cfg.blocks)} blocks ({model_cfg.block_pattern} x {model_cfg.num_groups}), "
         f"d_model={model_cfg.d_model}, params={n_params:,}; mesh={dict(mesh.shape)} over {jax.device_count()} "
         f"devices / {pc} processes; steps {start}->{tc.steps}; {flops_per_token / 1e9:.3f} GFLOP/token (train)")

    base_key = jax.random.key(tc.seed)
    preempt = _Preemption()
    writer = _Writer(workdir, tc.tensorboard)
    history: list[dict] = []
    t_start = t0 = time.time()
    tokens_since, step = 0, start

    def save(step, state):
        ckpt.save(step, state, {**meta_base, "step": step,
                                "data": {"stream": type(stream).__name__, "pipeline": dc.pipeline,
                                         "train": dc.train_corpus, "seed": tc.seed, "next_step": step}}, force=True)

    try:
        while step < tc.steps:
            state, metrics = trainer.train_step(state, stream.batch(step), jax.random.fold_in(base_key, step))
            step += 1
            tokens_since += tc.global_batch_size * dc.seq_len
            boundary = step % tc.log_every == 0 or step == tc.steps or step == start + 1
            stop = preempt.requested  # read once: a SIGTERM after this line is handled next step
            will_save = step % ck.every_steps == 0 or step == tc.steps or stop
            if boundary or will_save:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if m["nonfinite"] and tc.nan_policy == "halt":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step} (loss={m['loss']}); the update was not "
                        f"applied and will not be checkpointed. Last checkpoint: {ckpt.latest_step()}. "
                        "Set --config.train.nan_policy=skip to skip such steps instead."
                    )
            if boundary:
                dt = time.time() - t0
                tps = tokens_since / max(dt, 1e-9)
                m.update(tokens_per_sec=tps, tokens_per_sec_per_device=tps / jax.device_count(),
                         nonfinite_steps=float(state["nonfinite_steps"]))
                if peak:
                    m["mfu"] = tps * flops_per_token / (peak * 1e12 * jax.device_count())
                t0, tokens_since = time.time(), 0
                history.append({"step": step, **m})
                writer.write(step, m)
                sel = [v for k, v in m.items() if k.endswith("sal/selected_frac")]
                sal = (f"  sel {np.mean(sel):.3f} ({' '.join(f'{v:.2f}' for v in sel)})  budget {m['budget_loss']:.4f}"
                       if sel else "")
                mfu = f"  mfu {m['mfu']:.1%}" if "mfu" in m else ""
                eta = (time.time() - t_start) / max(step - start, 1) * (tc.steps - step)
                _log(f"step {step:6d}/{tc.steps} [{100 * step / tc.steps:3.0f}%]  loss {m['loss']:.4f}  "
                     f"lr {m['lr']:.2e}  gnorm {m['grad_norm']:.3f}  tok/s {tps:,.0f}{mfu}{sal}  eta {_eta(eta)}")
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                ev = evaluate_heldout(trainer, state["params"], heldout, vocab)
                writer.write(step, ev)
                sel = f"  sel {ev['heldout_selected_frac']:.3f}" if "heldout_selected_frac" in ev else ""
                _log(f"step {step:6d}  heldout loss {ev['heldout_loss']:.4f}  bpb {ev['heldout_bpb']:.4f}  "
                     f"acc {ev['heldout_accuracy']:.4f}{sel}")
            if will_save:
                save(step, state)
            if stop:
                ckpt.close()
                _log(f"SIGTERM: checkpoint saved at step {step}; exiting")
                return {"preempted": True, "step": step}
    finally:
        writer.close()

    ckpt.close()
    result = {"step": step, "train_loss": history[-1]["loss"] if history else None,
              "first_loss": history[0]["loss"] if history else None,
              "nonfinite_steps": int(state["nonfinite_steps"])}
    result.update(evaluate_heldout(trainer, state["params"], heldout, vocab))
    sel = (f", SAL selected {result['heldout_selected_frac']:.3f} (evaluation mode)"
           if "heldout_selected_frac" in result else "")
    _log(f"held-out ({dc.heldout_corpus}): loss {result['heldout_loss']:.4f} nats/token, "
         f"ppl {result['heldout_ppl']:.3f}, bits/byte {result['heldout_bpb']:.4f}, "
         f"accuracy {result['heldout_accuracy']:.4f}{sel}")

    sc = config.sample
    if sc.num_tokens > 0 and vocab is not None:
        prompt = vocab.encode(sc.prompt)[None]
        out = generate(trainer.model(state["params"]), prompt, num_tokens=sc.num_tokens,
                       key=jax.random.key(sc.seed), temperature=sc.temperature, top_k=sc.top_k)
        text = vocab.decode(out[0])
        result["sample"] = sc.prompt + text
        _log("sample:\n" + sc.prompt + text)
    if jax.process_index() == 0:
        (epath.Path(workdir) / "result.json").write_text(json.dumps(result, indent=1))
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
