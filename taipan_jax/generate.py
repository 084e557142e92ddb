"""Text generation from a trained workdir, for notebooks and the command line.

    python -m taipan_jax.generate --workdir=DIR --prompt="ROMEO:" [--prompt=...] \\
        [--num_tokens=200] [--temperature=0.8] [--top_k=0] [--top_p=1.0] [--stop="\\n\\n"] [--seed=0]

From Python::

    from taipan_jax.generate import load, generate_text
    model, vocab, step = load("workdir_tiny")
    print(generate_text(model, vocab, ["ROMEO:", "JULIET:"], num_tokens=100, temperature=0.8))

Each prompt is prefilled once and continued with constant-memory single-token steps
(:func:`taipan_jax.sampling.generate`); prompts of equal length share a batch. A ``stop`` string
ends a continuation where it first appears (the text before it is returned).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx

from taipan_jax.checkpointing import Checkpointer
from taipan_jax.data.vocab import get_vocabulary
from taipan_jax.model import LanguageModel, abstract_model
from taipan_jax.model_config import ModelConfig
from taipan_jax.sampling import generate


def load(workdir: str, step: int | None = None) -> tuple[LanguageModel, object, int]:
    """The model (with its trained weights), its vocabulary and the checkpoint step of ``workdir``.

    The model config and vocabulary come from the checkpoint itself; only the parameters are read.
    """
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (python -m taipan_jax.train)")
    meta = ckpt.read_meta(step)
    ckpt.close()
    cfg = ModelConfig.from_dict(meta["model_config"])
    graphdef, abs_params = nnx.split(abstract_model(cfg), nnx.Param)
    target = {"params": jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                     nnx.to_pure_dict(abs_params))}
    path = os.path.join(ckpt.directory, str(step), "state")
    with ocp.PyTreeCheckpointer() as reader:  # only the parameters, not the optimizer state
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    params = nnx.State(restored["params"])
    model = nnx.merge(graphdef, params)
    return model, get_vocabulary(meta.get("vocab", "bytes")), step


def generate_text(
    model: LanguageModel,
    vocab,
    prompts: Sequence[str],
    *,
    num_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int = 0,
) -> list[str]:
    """Continuations (without the prompts) of each prompt, in order."""
    if not prompts:
        raise ValueError("give at least one prompt")
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    encoded = [vocab.encode(p) for p in prompts]
    for p, e in zip(prompts, encoded):
        if e.size == 0:
            raise ValueError(f"prompt {p!r} encodes to no tokens")
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(encoded):
        by_len[e.size].append(i)
    out: list[str] = [""] * len(prompts)
    key = jax.random.key(seed)
    for n, idx in sorted(by_len.items()):
        key, sub = jax.random.split(key)
        toks = generate(model, np.stack([encoded[i] for i in idx]), num_tokens=num_tokens, key=sub,
                        temperature=temperature, top_k=top_k, top_p=top_p)
        for row, i in zip(toks, idx):
            text = vocab.decode(row)
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            out[i] = text if cut < 0 else text[:cut]
    return out


def main() -> None:
    workdir = flags.DEFINE_string("workdir", None, "A training workdir (its latest checkpoint is used).")
    prompt = flags.DEFINE_multi_string("prompt", ["ROMEO:\n"], "Prompt(s); repeat the flag for a batch.")
    num_tokens = flags.DEFINE_integer("num_tokens", 200, "Tokens to generate per prompt.")
    temperature = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
    top_k = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
    top_p = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
    stop = flags.DEFINE_multi_string("stop", [], "Stop strings (repeatable).")
    seed = flags.DEFINE_integer("seed", 0, "Sampling seed.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not workdir.value:
            raise app.UsageError("--workdir is required")
        model, vocab, at = load(workdir.value, step.value)
        texts = generate_text(model, vocab, prompt.value, num_tokens=num_tokens.value,
                              temperature=temperature.value, top_k=top_k.value, top_p=top_p.value,
                              stop=stop.value, seed=seed.value)
        print(f"# {workdir.value}, checkpoint step {at}")
        for p, t in zip(prompt.value, texts):
            print(f"--- prompt: {p!r}\n{p}{t}")

    app.run(_main)


if __name__ == "__main__":
    main()
