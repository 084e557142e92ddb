"""An lm-evaluation-harness model class for taipan_jax models (registered as ``taipan_jax``).

From a trainer workdir (its latest checkpoint, or ``step=``) or an in-memory model::

    import lm_eval
    from lm_eval.tasks import TaskManager
    from taipan_jax.eval.lm_eval_adapter import TaipanLM

    lm = TaipanLM(workdir="workdir_tiny", batch_size=16)                  # or TaipanLM(model=m, vocab=v)
    out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], task_manager=TaskManager())
    # CLI: python -m taipan_jax.eval.lm_eval --workdir=DIR --tasks=hellaswag,arc_easy [--limit=N]
    # lm-eval's own CLI, after `import taipan_jax.eval.lm_eval_adapter`: --model taipan_jax
    #   --model_args workdir=DIR,batch_size=16

Semantics (as lm-eval's Hugging Face backend, with the trainer's document layout):

* Text <-> tokens through the workdir's vocabulary (checkpoint meta ``vocab``). A context is
  ``[BOS] + encode(context)`` (``add_bos=True``, the default: every training document starts with
  the vocabulary's BOS id); an empty context is just ``[BOS]``. Trailing spaces of a context move
  to the continuation and the continuation's tokens are ``encode(context + continuation)`` minus
  ``encode(context)`` (lm-eval's ``TemplateLM``).
* ``loglikelihood``: the float64 sum of the float32 per-token log-probabilities of the
  continuation, and whether every continuation token is the argmax (``is_greedy``). At most
  ``max_length`` tokens are read (the oldest context tokens are dropped).
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, the first
  predicted from ``[BOS]``; the sum over every token of the text.
* ``generate_until``: greedy (or sampled when ``do_sample``) continuations of at most
  ``max_gen_toks`` tokens, cut at the first stop string (``until``) or EOS; the prompt keeps its
  last ``max_length - max_gen_toks`` tokens. Prompts of different lengths share a batch: the
  common prefix is prefilled, then constant-memory single-token steps (``model.step``).

Batches have ``batch_size`` rows and bucketed lengths (``taipan_jax.eval.common``), longest
first, so a run compiles once per bucket. Single device.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from taipan_jax.data.vocab import get_vocabulary
from taipan_jax.eval.common import ModelRunner, load_for_eval, log_likelihoods, prepare_model

log = logging.getLogger(__name__)


def _bool(v) -> bool:
    if isinstance(v, str):
        if v.lower() in ("true", "1", "yes"):
            return True
        if v.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    return bool(v)


@register_model("taipan_jax")
class TaipanLM(TemplateLM):
    """lm-eval model over a taipan_jax workdir (``workdir=``) or model (``model=``, ``vocab=``)."""

    def __init__(
        self,
        workdir: str | None = None,
        *,
        model=None,
        vocab=None,
        step: int | None = None,
        batch_size: int | str = 8,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        add_bos: bool | str = True,
        sal_attention: str = "dense",
        seed: int = 0,
        **kwargs,
    ):
        super().__init__()
        # lm-eval passes these to every model; they mean nothing on a single JAX device.
        for k in ("device", "max_batch_size"):
            kwargs.pop(k, None)
        if kwargs:
            raise TypeError(f"TaipanLM: unknown argument(s) {sorted(kwargs)}")
        if (workdir is None) == (model is None):
            raise ValueError("give exactly one of workdir= or model=")
        if workdir is not None:
            model, loaded_vocab, self.step = load_for_eval(workdir, step=None if step is None else int(step),
                                                           sal_attention=sal_attention)
            vocab = loaded_vocab if vocab is None else vocab
        else:
            model, self.step = prepare_model(model, sal_attention), step
        if vocab is None or isinstance(vocab, str):
            vocab = get_vocabulary(vocab or "bytes")
        if vocab.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"vocabulary of {vocab.vocab_size} ids does not fit the model's {model.cfg.vocab_size}")
        if isinstance(batch_size, str):
            if batch_size.startswith("auto"):
                raise ValueError("batch_size=auto is not supported; give a number")
            batch_size = int(batch_size)
        self.vocab = vocab
        self.model = model
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = _bool(add_bos)
        self.seed = int(seed)
        self.runner = ModelRunner(model, batch_size=int(batch_size), pad_id=vocab.pad_id)

    # -- TemplateLM's hooks --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.vocab.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.vocab.bos_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return [int(t) for t in self.vocab.encode(string)]

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.vocab.decode(np.asarray(tokens, np.int32))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for (context, _), ctx, cont in requests:
            ctx = list(ctx)
            # TemplateLM puts [prefix] before an empty context itself; others get BOS here.
            if self.add_bos and context not in ("", None):
                ctx = [self.prefix_token_id] + ctx
            pairs.append((ctx, list(cont)))
        out = log_likelihoods(self.runner, pairs, self.max_length)
        for (strings, _, _), res in zip(requests, out):
            if strings[0] is not None:
                self.cache_hook.add_partial("loglikelihood", strings, res)
        return out

    # -- lm-eval's request types ---------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, req in enumerate(tqdm(requests, desc="rolling windows", disable=disable_tqdm)):
            (string,) = req.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for w in windows:
                ctx, cont = make_disjoint_window(w)
                pairs.append((list(ctx), list(cont)))
                owner.append(i)
        scored = log_likelihoods(self.runner, pairs, self.max_length)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scored):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        parsed = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            opts = self._gen_options(gen_kwargs)
            parsed.append((context, opts))
            groups[repr(sorted(opts.items()))].append(i)
        results: list = [None] * len(requests)
        for members in tqdm(groups.values(), desc="generate_until groups", disable=disable_tqdm):
            opts = parsed[members[0]][1]
            n_new = opts["max_gen_toks"]
            keep = max(self.max_length - n_new, 1)
            prompts = []
            for i in members:
                ids = ([self.prefix_token_id] if self.add_bos else []) + self.tok_encode(parsed[i][0])
                prompts.append(np.asarray((ids or [self.prefix_token_id])[-keep:], np.int32))
            until = opts["until"]

            def cut(tokens: np.ndarray) -> tuple[str, bool]:
                tokens = np.asarray(tokens)
                eos = np.nonzero(tokens == self.eot_token_id)[0]
                stopped = eos.size > 0
                text = self.tok_decode(tokens[: eos[0]] if stopped else tokens)
                hits = [text.find(s) for s in until if s and s in text]
                if hits:
                    return text[: min(hits)], True
                return text, stopped

            gens = self.runner.generate(
                prompts, max_new_tokens=n_new, temperature=opts["temperature"], top_k=opts["top_k"],
                top_p=opts["top_p"], seed=self.seed, done=lambda j, toks: cut(toks)[1])
            for i, g in zip(members, gens):
                text = cut(g)[0]
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _gen_options(self, gen_kwargs) -> dict:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [] if until is None else [until] if isinstance(until, str) else list(until)
        n = None
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
            v = kw.pop(alias, None)
            if v is not None and n is None:
                n = int(v)
        n = self.max_gen_toks if n is None else n
        if n < 1 or n >= self.max_length:
            raise ValueError(f"max_gen_toks={n} must be in [1, max_length={self.max_length})")
        do_sample = _bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        if not do_sample:
            temperature = 0.0
        opts = {"until": until, "max_gen_toks": n, "temperature": temperature,
                "top_k": int(kw.pop("top_k", 0) or 0), "top_p": float(kw.pop("top_p", 1.0) or 1.0)}
        if kw:
            log.warning("taipan_jax: ignoring generation arguments %s", sorted(kw))
        return opts
