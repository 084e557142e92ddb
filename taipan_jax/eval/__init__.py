"""Evaluations of a trained taipan_jax model (a trainer workdir or an in-memory model).

* :mod:`taipan_jax.eval.lm_eval_adapter` — an lm-evaluation-harness model class (``taipan_jax``):
  ``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``; needs the ``eval`` extra.
  CLI: ``python -m taipan_jax.eval.lm_eval --workdir=DIR --tasks=hellaswag,arc_easy``.
* :mod:`taipan_jax.eval.retrieval` — in-context retrieval: MQAR accuracy by sequence length and
  number of key-value pairs, and a synthetic SWDE/FDA-style attribute extraction task, for any
  predictor (oracles included). CLI: ``python -m taipan_jax.eval.retrieval --workdir=DIR --task=mqar``.
* :mod:`taipan_jax.eval.common` — loading for evaluation, bucketed lengths, jitted scoring.

Nothing here is imported by ``taipan_jax`` itself, and lm-eval is imported only by the adapter.
"""
