"""In-context retrieval evals (taipan_jax.eval.retrieval): oracles score 100%, random guessers score
their analytic chance level, the SWDE-style documents are well-formed (bytes and a BPE vocabulary),
and a model-backed run works end to end (API and CLI)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from taipan_jax.data.vocab import get_vocabulary
from taipan_jax.eval import retrieval as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _within_chance(hits: float, n: int, p: float, sigmas: float = 4.0) -> bool:
    """|hits/n - p| within `sigmas` binomial standard deviations (fixed seeds: deterministic)."""
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_mqar_oracle_is_perfect_and_uniform_guesser_is_at_chance():
    V = 64
    rows = R.evaluate_mqar(R.mqar_oracle, lengths=[32, 64, 128], num_pairs=[2, 4, 8, 16], vocab_size=V,
                           num_examples=24, seed=3)
    ran = [r for r in rows if "skipped" not in r]
    assert {(r["seq_len"], r["num_pairs"]) for r in rows if "skipped" in r} == {(32, 16)}  # 2P + 2Q - 1 > 32
    assert len(ran) == 11 and all(r["accuracy"] == 1.0 and r["exact_match"] == 1.0 for r in ran)
    # Zoology's other filler (zeros) too.
    (r,) = R.evaluate_mqar(R.mqar_oracle, lengths=[64], num_pairs=[8], vocab_size=V, num_examples=8,
                           random_non_queries=False)
    assert r["accuracy"] == 1.0

    rows = R.evaluate_mqar(R.uniform_guesser(V // 2, V, seed=1), lengths=[64, 128], num_pairs=[4, 8], vocab_size=V,
                           num_examples=100, seed=3)
    n = sum(r["scored_positions"] for r in rows)
    hits = sum(r["accuracy"] * r["scored_positions"] for r in rows)
    assert rows[0]["chance_uniform"] == 2 / V
    assert n == 100 * (4 + 8) * 2 and _within_chance(hits, n, 2 / V), hits / n
    # Batched calls give the same scores as one call (the predictor sees row slices).
    b = R.mqar_batch(64, 4, vocab_size=V, num_examples=10)
    assert R.evaluate_predictor(R.mqar_oracle, b, batch_size=3)["accuracy"] == 1.0


def test_scoring_counts_positions_and_whole_examples():
    targets = np.array([[1, 2, 3], [4, 5, 6]])
    weights = np.array([[0, 1, 1], [1, 0, 0]])
    s = R.score_predictions(np.array([[9, 2, 0], [4, 0, 0]]), targets, weights)
    assert s["accuracy"] == 2 / 3 and s["exact_match"] == 0.5 and s["scored_positions"] == 3
    with pytest.raises(ValueError, match="no scored position"):
        R.score_predictions(targets, targets, np.array([[0, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="returned shape"):
        R.evaluate_predictor(lambda x: x[:, :-1], R.mqar_batch(16, 2, vocab_size=16, num_examples=2))


def _bpe_vocab(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bytes_vocab = get_vocabulary("bytes")
    texts = [R.swde_example(R.SWDEConfig(512, 8), bytes_vocab, 99, i)["text"] for i in range(20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    return get_vocabulary(f"hf:{tmp_path / 'tokenizer.json'}")


def test_swde_examples_are_well_formed(tmp_path):
    bpe = _bpe_vocab(tmp_path)
    for vocab in (get_vocabulary("bytes"), bpe):
        for L, K in [(192, 2), (512, 8), (2048, 20)]:
            cfg = R.SWDEConfig(seq_len=L, num_fields=K)
            queried = set()
            for i in range(25):
                ex = R.swde_example(cfg, vocab, seed=0, index=i)
                R.check_swde_example(ex, cfg, vocab)  # value once, labels once, tokens decode to the text
                assert ex["tokens"].size == L + 1  # filled to the length exactly (a space is one token)
                queried.add(ex["attribute"])
            assert len(queried) > 1
        b = R.swde_batch(256, 4, vocab, num_examples=6, seed=5)
        again = R.swde_batch(256, 4, vocab, num_examples=6, seed=5)
        assert np.array_equal(b.inputs, again.inputs) and np.array_equal(b.inputs[:, 1:], b.targets[:, :-1])
        assert not np.array_equal(b.inputs, R.swde_batch(256, 4, vocab, num_examples=6, seed=6).inputs)
        assert ((b.weights > 0).sum(1) == [len(vocab.encode(" " + e["value"])) + len(vocab.encode("\n"))
                                           for e in b.examples]).all()
    # The fields are spread over the document, not bunched at its start.
    ex = R.swde_example(R.SWDEConfig(4096, 4), get_vocabulary("bytes"), 0, 0)
    last = max(ex["text"].find(f"<th>{a}</th>") for a in ex["fields"])
    assert last > len(ex["text"]) // 3
    with pytest.raises(ValueError, match="too short"):
        R.swde_example(R.SWDEConfig(64, 8), get_vocabulary("bytes"), 0, 0)


def test_swde_oracle_is_perfect_and_field_guesser_is_at_chance(tmp_path):
    vocab = get_vocabulary("bytes")
    rows = R.evaluate_swde(R.swde_oracle(vocab), vocab, lengths=[384, 1024], num_fields=[2, 6], num_examples=20)
    assert len(rows) == 4 and all(r["exact_match"] == 1.0 and r["accuracy"] == 1.0 for r in rows)
    bpe = _bpe_vocab(tmp_path)
    (r,) = R.evaluate_swde(R.swde_oracle(bpe), bpe, lengths=[512], num_fields=[8], num_examples=20)
    assert r["exact_match"] == 1.0

    for K in (4, 8):
        (r,) = R.evaluate_swde(R.swde_field_guesser(vocab, seed=K), vocab, lengths=[512], num_fields=[K],
                               num_examples=300, seed=1)
        assert r["chance_field"] == 1 / K
        assert _within_chance(r["exact_match"] * 300, 300, 1 / K), (K, r["exact_match"])
    # A predictor that never answers scores 0.
    (r,) = R.evaluate_swde(lambda x: np.zeros_like(x), vocab, lengths=[256], num_fields=[4], num_examples=5)
    assert r["exact_match"] == 0.0 and r["accuracy"] == 0.0


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    import small_config

    from taipan_jax.eval.testing import random_model, save_workdir
    from taipan_jax.model_config import ModelConfig

    cfg = ModelConfig.from_dict(small_config.get_config().model.to_dict())
    model = random_model(cfg, seed=0)
    return save_workdir(model, str(tmp_path_factory.mktemp("retrieval_wd"))), model


def test_model_backed_run_end_to_end(tiny_workdir, tmp_path):
    import jax.numpy as jnp

    workdir, model = tiny_workdir
    vocab = get_vocabulary("bytes")
    predictor = R.model_predictor(model, batch_size=4)
    rows = R.evaluate_mqar(predictor, lengths=[48], num_pairs=[4], vocab_size=64, num_examples=6)
    rows += R.evaluate_swde(predictor, vocab, lengths=[320], num_fields=[4], num_examples=6)
    assert len(rows) == 2
    for r in rows:
        assert "skipped" not in r and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["exact_match"] <= 1.0, r
    # The predictor is the model's argmax (rows padded to a bucket and batched).
    b = R.mqar_batch(48, 4, vocab_size=64, num_examples=6)
    logits, _ = model(jnp.asarray(b.inputs[:2]))
    direct = np.asarray(jnp.argmax(logits, -1))
    got = predictor(b.inputs[:2])
    assert (got == direct).mean() > 0.99  # equal up to float ties between padded / unpadded calls

    out = tmp_path / "swde.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "taipan_jax.eval.retrieval", f"--workdir={workdir}", "--task=swde", "--lengths=320",
         "--num_fields=4", "--num_examples=4", "--batch_size=4", f"--output={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["task"] == "swde" and row["predictor"] == "model" and 0.0 <= row["exact_match"] <= 1.0
    assert "exact_match" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "taipan_jax.eval.retrieval", "--task=mqar", "--predictor=oracle", "--lengths=64",
         "--num_pairs=4,8", "--vocab_size=64", "--num_examples=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\t1.0000\t1.0000\t") == 2, proc.stdout
