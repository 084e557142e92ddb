"""Run lm-evaluation-harness tasks against a trainer workdir.

    python -m taipan_jax.eval.lm_eval --workdir=DIR --tasks=hellaswag,arc_easy \\
        [--include_path=DIR [--noinclude_defaults]] [--limit=N] [--num_fewshot=K] [--batch_size=8] \\
        [--max_length=2048] [--output=results.json] [--nooffline]

Prints lm-eval's results table and, with ``--output``, writes the results (JSON). Offline by
default (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``): a task's dataset must already be in the
Hugging Face cache or be local files (``dataset_path: json`` + ``data_files``, see ``--include_path``);
``--nooffline`` lets the datasets library download. Needs the ``eval`` extra (lm-eval).
"""

from __future__ import annotations

import json
import os

from absl import app, flags


def main() -> None:
    workdir = flags.DEFINE_string("workdir", None, "A training workdir (its latest checkpoint unless --step).")
    tasks = flags.DEFINE_list("tasks", None, "lm-eval task (or group) names, comma separated.")
    include_path = flags.DEFINE_multi_string("include_path", [], "Folders with extra task YAMLs (repeatable).")
    include_defaults = flags.DEFINE_boolean("include_defaults", True,
                                            "Index lm-eval's own tasks too (--noinclude_defaults: only --include_path).")
    limit = flags.DEFINE_float("limit", None, "At most this many documents per task (< 1: a fraction).")
    num_fewshot = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).")
    batch_size = flags.DEFINE_integer("batch_size", 8, "Rows per model call.")
    max_length = flags.DEFINE_integer("max_length", 2048, "Most tokens the model reads per request.")
    max_gen_toks = flags.DEFINE_integer("max_gen_toks", 256, "Default generation length (generate_until).")
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    add_bos = flags.DEFINE_boolean("add_bos", True, "Start every context with the vocabulary's BOS id.")
    sal_attention = flags.DEFINE_enum("sal_attention", "dense", ["dense", "gathered", "as_trained"],
                                      "How the SALs run (dense: padding-independent).")
    bootstrap_iters = flags.DEFINE_integer("bootstrap_iters", 1000, "Bootstrap resamples for stderr (0 = none).")
    seed = flags.DEFINE_integer("seed", 0, "Seed (sampling, few-shot order).")
    output = flags.DEFINE_string("output", None, "Write the results here (JSON).")
    offline = flags.DEFINE_boolean("offline", True, "Never download datasets (HF_DATASETS_OFFLINE=1).")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not workdir.value or not tasks.value:
            raise app.UsageError("--workdir and --tasks are required")
        if offline.value:  # before the datasets library is imported: it reads these once
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            os.environ["HF_HUB_OFFLINE"] = "1"
        result = run(workdir.value, tasks.value, include_path=include_path.value,
                     include_defaults=include_defaults.value, limit=limit.value,
                     num_fewshot=num_fewshot.value, bootstrap_iters=bootstrap_iters.value, seed=seed.value,
                     lm_kwargs=dict(step=step.value, batch_size=batch_size.value, max_length=max_length.value,
                                    max_gen_toks=max_gen_toks.value, add_bos=add_bos.value,
                                    sal_attention=sal_attention.value, seed=seed.value))
        from lm_eval.utils import make_table

        print(f"# {workdir.value}, checkpoint step {result['taipan_jax']['step']}")
        print(make_table(result))
        if "groups" in result:
            print(make_table(result, "groups"))
        if output.value:
            with open(output.value, "w") as f:
                json.dump(result, f, indent=2, default=str)
            print(f"wrote {output.value}")

    app.run(_main)


def run(workdir_or_lm, tasks, *, include_path=(), include_defaults=True, limit=None, num_fewshot=None,
        bootstrap_iters=1000, seed=0, lm_kwargs=None, log_samples=False) -> dict:
    """lm-eval's ``simple_evaluate`` of ``tasks`` for a workdir (or a ready :class:`TaipanLM`).

    ``include_defaults=False`` skips indexing lm-eval's own ~15K tasks (seconds) when every task is
    under ``include_path``. Returns lm-eval's results dict (``results``: metrics per task, ...) with
    ``taipan_jax`` (workdir, step) added.
    """
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from taipan_jax.eval.lm_eval_adapter import TaipanLM

    if isinstance(workdir_or_lm, TaipanLM):
        lm, where = workdir_or_lm, None
    else:
        kw = {k: v for k, v in (lm_kwargs or {}).items() if v is not None}
        lm, where = TaipanLM(workdir=workdir_or_lm, **kw), workdir_or_lm
    manager = TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)
    if limit is not None and limit >= 1:
        limit = int(limit)
    out = evaluator.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:  # a non-zero rank in a distributed lm-eval run
        return {}
    out.pop("config", None)  # holds the model object
    out["taipan_jax"] = {"workdir": where, "step": lm.step}
    return out


if __name__ == "__main__":
    main()
