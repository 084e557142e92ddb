"""The lm-evaluation-harness adapter (taipan_jax.eval.lm_eval_adapter) against a tiny Taipan workdir:
a local multiple-choice (and generation) task end to end through lm-eval's evaluator, offline and
with network access blocked; loglikelihood / loglikelihood_rolling / generate_until against direct
model computations; the CLI."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before the datasets library is imported (lm-eval imports it)
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from taipan_jax.eval.common import bucket_length  # noqa: E402
from taipan_jax.eval.lm_eval_adapter import TaipanLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# Every request fits the 48-token bucket (33..48 tokens with BOS): one compiled shape per batch size.
DOCS = [
    {"question": "What colour is the clear sky?", "choices": [" blue", " green", " red"], "label": 0},
    {"question": "Fire, when you touch it, is", "choices": [" cold", " hot"], "label": 1},
    {"question": "Two plus two is equal to", "choices": [" three", " four", " five", " six"], "label": 1},
    {"question": "The opposite of the word up is", "choices": [" down", " left"], "label": 0},
    {"question": "Ice, it is said, is made of", "choices": [" warm air", " frozen water", " rock"], "label": 1},
]
GEN_DOCS = [{"prompt": "ROMEO: What says", "answer": " she"}, {"prompt": "JULIET: O Romeo, Romeo,", "answer": " wherefore"}]


def _write_tasks(root) -> str:
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    cache = root / "hf_cache"
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'mc.jsonl'}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (tasks / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'gen.jsonl'}
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return str(tasks)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import small_config

    from taipan_jax.eval.testing import random_model, save_workdir
    from taipan_jax.model_config import ModelConfig

    root = tmp_path_factory.mktemp("lm_eval")
    cfg = ModelConfig.from_dict(small_config.get_config().model.to_dict())
    model = random_model(cfg, seed=1)
    workdir = save_workdir(model, str(root / "workdir"), vocab="bytes", step=7)
    return {"root": root, "workdir": workdir, "model": model, "tasks": _write_tasks(root)}


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection fails the test."""
    attempts = []
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test: network access attempted: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    yield attempts
    assert not attempts, attempts


_FORWARD = {}


def _direct_logprobs(model, tokens: list[int], width: int | None = None):
    """log p(tokens[t+1] | tokens[:t+1]) and the argmax, from one plain jitted forward of the row alone
    (right-padded to ``width``)."""
    from flax import nnx

    if id(model) not in _FORWARD:
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda state, x: jax.nn.log_softmax(nnx.merge(graphdef, state)(x)[0], axis=-1))
        _FORWARD[id(model)] = lambda x: np.asarray(fwd(state, x))
    n = len(tokens) - 1
    x = np.zeros((1, width or n), np.int32)
    x[0, :n] = tokens[:-1]
    logp = _FORWARD[id(model)](x)[0, :n]
    return logp[np.arange(n), tokens[1:]], logp.argmax(-1)


def _instance(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_local_multiple_choice_task_end_to_end(setup, no_network):
    from lm_eval import evaluator
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from taipan_jax.data.vocab import get_vocabulary

    assert get_model("taipan_jax") is TaipanLM
    # By registered name and model_args, as lm-eval's own CLI does.
    out = evaluator.simple_evaluate(
        model="taipan_jax", model_args={"workdir": setup["workdir"], "batch_size": 4},
        tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=setup["tasks"], include_defaults=False),
        bootstrap_iters=0, log_samples=False)
    res = out["results"]["tiny_mc"]
    acc, acc_norm = res["acc,none"], res["acc_norm,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and 0.0 <= acc_norm <= 1.0
    assert res["sample_len"] == len(DOCS)
    assert 0.0 <= out["results"]["tiny_gen"]["exact_match,none"] <= 1.0

    # The same accuracy from the model directly: [BOS] + context + " " (lm-eval's default
    # target_delimiter) + choice, argmax of the choice sums.
    vocab = get_vocabulary("bytes")
    right = 0
    for d in DOCS:
        ctx = [vocab.bos_id] + vocab.encode(f"Q: {d['question']}\nA:").tolist()
        scores = []
        for c in d["choices"]:
            cont = vocab.encode(" " + c).tolist()
            lp, _ = _direct_logprobs(setup["model"], ctx + cont, width=48)
            scores.append(lp[-len(cont):].astype(np.float64).sum())
        right += int(np.argmax(scores)) == d["label"]
    assert acc == right / len(DOCS)


def test_loglikelihood_matches_direct_model_computation(setup):
    model = setup["model"]
    lm = TaipanLM(model=model, vocab="bytes", batch_size=1)  # in memory (a notebook's model)
    from_dir = TaipanLM(workdir=setup["workdir"], batch_size=4)
    assert from_dir.step == 7 and lm.prefix_token_id == 0 and lm.eot_token_id == 1
    # SALs run dense for evaluation (padding-independent), whatever the model was trained with.
    from taipan_jax.eval.common import prepare_model

    gathered = prepare_model(model, "gathered")
    assert gathered.cfg.sal.attention == "gathered" and model.cfg.sal.attention == "dense"
    assert TaipanLM(model=gathered, vocab="bytes").model.cfg.sal.attention == "dense"
    with pytest.raises(ValueError, match="exactly one of"):
        TaipanLM(vocab="bytes")
    bos = lm.prefix_token_id
    reqs = [("Q: What colour is the clear sky?\nA:", " blue"), ("The quick brown fox", " jumps over the lazy dog"),
            ("", "Hello there, this is a long continuation"), ("Trailing space here and there ", "moves along"),
            ("a", "b" * 40)]
    got = lm.loglikelihood([_instance("loglikelihood", r) for r in reqs])
    batched = from_dir.loglikelihood([_instance("loglikelihood", r) for r in reqs])
    for (ctx, cont), (ll, greedy), (ll4, greedy4) in zip(reqs, got, batched):
        if ctx.endswith(" "):  # lm-eval moves a context's trailing spaces to the continuation
            ctx, cont = ctx.rstrip(" "), ctx[len(ctx.rstrip(" ")):] + cont
        toks = [bos] + lm.tok_encode(ctx) + lm.tok_encode(cont)
        n = len(lm.tok_encode(cont))
        assert bucket_length(len(toks) - 1) == 48
        lp, am = _direct_logprobs(model, toks, width=48)
        # Exact: the same row, alone, at the same padded width, summed in float64.
        assert ll == lp[-n:].astype(np.float64).sum() and math.isfinite(ll) and ll < 0
        assert greedy == bool((am[-n:] == np.asarray(toks)[-n:]).all())
        # Four rows of other lengths per call: the same up to float32 rounding (XLA tiles by shape).
        assert ll4 == pytest.approx(ll, rel=1e-5) and greedy4 == greedy
    # Right padding does not change the numbers beyond rounding (every block is causal).
    toks = [bos] + lm.tok_encode("The quick brown fox jumps over the lazy dog")
    lp, _ = _direct_logprobs(model, toks)
    assert got[1][0] == pytest.approx(lp[-24:].astype(np.float64).sum(), rel=1e-5)
    # A continuation the model would produce greedily is reported as greedy.
    prompt = [bos] + lm.tok_encode("The quick brown fox jumps over the")
    _, am = _direct_logprobs(model, prompt + [0], width=48)
    nxt = lm.tok_decode([am[len(prompt) - 1]])
    assert lm.loglikelihood([_instance("loglikelihood", ("The quick brown fox jumps over the", nxt))])[0][1] is True

    text = "It is the east, and Juliet is the sun."
    toks = lm.tok_encode(text)
    (rolled,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    lp, _ = _direct_logprobs(model, [bos] + toks, width=48)
    assert rolled == lp.astype(np.float64).sum()  # one window: the sum over every token of the text
    # Windows of 16 tokens (lm-eval's disjoint rolling windows): each token predicted once.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    short = TaipanLM(model=model, vocab="bytes", batch_size=1, max_length=16)
    (rolled16,) = short.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    total, count = 0.0, 0
    for w in get_rolling_token_windows(toks, prefix_token=bos, max_seq_len=16, context_len=1):
        ctx, cont = make_disjoint_window(w)
        lp, _ = _direct_logprobs(model, list(ctx) + list(cont), width=16)
        total += lp[-len(cont):].astype(np.float64).sum()
        count += len(cont)
    assert count == len(toks) and rolled16 == total and rolled16 != rolled


def _greedy_by_steps(model, prompt: list[int], n: int) -> np.ndarray:
    """Greedy decoding with single-token steps only (no prefill): an independent reference."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, tok, cache: nnx.merge(graphdef, state).step(tok, cache))
    cache = model.init_cache(1)
    for t in prompt:
        logits, cache = step(state, jnp.asarray([t], jnp.int32), cache)
    out = []
    for _ in range(n):
        out.append(int(jnp.argmax(logits[0])))
        logits, cache = step(state, jnp.asarray(out[-1:], jnp.int32), cache)
    return np.asarray(out)


def test_generate_until_is_greedy_decoding_cut_at_stop(setup):
    model = setup["model"]
    lm = TaipanLM(model=model, vocab="bytes", batch_size=4)
    prompts = [d["prompt"] for d in GEN_DOCS]  # 17 and 24 tokens with BOS: one ragged batch
    outs = lm.generate_until([_instance("generate_until", (p, {"until": ["\u0000never"], "max_gen_toks": 10}))
                              for p in prompts])
    for p, out in zip(prompts, outs):
        ref = _greedy_by_steps(model, [lm.prefix_token_id] + lm.tok_encode(p), 10)
        assert out == lm.tok_decode(ref[: np.argmax(ref == 1)] if (ref == 1).any() else ref)
    assert len(outs[1]) >= 5
    stop = outs[1][3:5]
    (cut,) = lm.generate_until([_instance("generate_until", (prompts[1], {"until": [stop], "max_gen_toks": 10}))])
    assert cut == outs[1][: outs[1].find(stop)]
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([_instance("generate_until", ("x", {"max_gen_toks": 5000}))])


def test_cli_runs_named_tasks_against_a_workdir(setup, tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=ROOT, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "taipan_jax.eval.lm_eval", f"--workdir={setup['workdir']}", "--tasks=tiny_mc",
         f"--include_path={setup['tasks']}", "--noinclude_defaults", "--limit=3", "--batch_size=4",
         "--bootstrap_iters=0", f"--output={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["taipan_jax"] == {"workdir": setup["workdir"], "step": 7}
    assert result["results"]["tiny_mc"]["sample_len"] == 3 and 0 <= result["results"]["tiny_mc"]["acc,none"] <= 1
    assert "tiny_mc" in proc.stdout and "acc" in proc.stdout
