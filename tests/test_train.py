"""End to end: the README's main job (shortened), resume, refusal of a foreign workdir, bad input."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from taipan_jax.checkpointing import IncompatibleCheckpointError
from taipan_jax.train import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "taipan_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


SHORT = [
    "--config=configs/tiny.py", "--config.train.steps=40", "--config.checkpoint.every_steps=20",
    "--config.train.log_every=10", "--config.train.eval_every=0", "--config.train.eval_batches=1",
    "--config.sample.num_tokens=24",
    # Start the SALs far from the budget (P(select) = 0.5) to see the budget loss pull toward C.
    "--config.model.sal.gate_init_frac=0.5",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tiny"))
    proc = _cli(*SHORT, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


def test_tiny_taipan_learns_checkpoints_evaluates_and_samples(trained):
    workdir, out = trained
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    first, last = rows[0]["ce"], rows[-1]["ce"]
    assert rows[-1]["step"] == 40
    assert last <= 0.7 * first, (first, last)  # loss falls by >= 30%
    # Both SALs' selected fractions move from ~0.5 toward C = 0.15.
    sel_keys = sorted(k for k in rows[0] if k.endswith("sal/selected_frac"))
    assert len(sel_keys) == 2
    for k in sel_keys:
        assert rows[0][k] > 0.3 and abs(rows[-1][k] - 0.15) < abs(rows[0][k] - 0.15) - 0.15, (k, rows[0][k], rows[-1][k])
    assert "sel " in out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)[-2:] == ["20", "40"]
    result = json.load(open(os.path.join(workdir, "result.json")))
    assert 0 < result["heldout_bpb"] < 8.0  # below a uniform byte model
    assert "held-out (kjv)" in out and "bits/byte" in out
    assert result["sample"].startswith("ROMEO:\n") and len(result["sample"]) > len("ROMEO:\n")
    assert "sample:" in out


def test_resume_continues_from_latest_checkpoint(trained, tmp_path):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained[0], workdir)
    config = tiny.get_config()
    config.model.sal.gate_init_frac = 0.5  # as in SHORT
    config.train.steps = 43
    config.train.eval_batches = 1
    config.sample.num_tokens = 0
    result = run(config, workdir)
    assert result["step"] == 43
    assert "43" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_workdir_of_another_model_is_refused_untouched(trained, tmp_path):
    import shutil

    workdir = str(tmp_path / "other")
    shutil.copytree(trained[0], workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    config = tiny.get_config()
    config.model.d_model = 64
    with pytest.raises(IncompatibleCheckpointError, match="different model.*d_model"):
        run(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_unknown_config_key_is_named(tmp_path):
    proc = _cli("--config=configs/tiny.py", "--config.train.stepz=3", f"--workdir={tmp_path}")
    assert proc.returncode != 0
    assert "stepz" in proc.stderr


def test_generate_from_workdir_cli_and_api(trained):
    import jax
    import numpy as np

    from taipan_jax.generate import generate_text, load
    from taipan_jax.sampling import sample_logits

    workdir, _ = trained
    model, vocab, step = load(workdir)
    assert step == 40
    greedy = generate_text(model, vocab, ["ROMEO:", "KING"], num_tokens=12, temperature=0.0)
    again = generate_text(model, vocab, ["KING", "ROMEO:"], num_tokens=12, temperature=0.0)
    assert greedy == again[::-1] and all(len(t) > 0 for t in greedy)
    # Nucleus sampling with a tiny mass keeps only the most likely token: greedy.
    assert generate_text(model, vocab, ["ROMEO:"], num_tokens=12, temperature=1.0, top_p=1e-6) == greedy[:1]
    stop = greedy[0][3:5]
    cut = generate_text(model, vocab, ["ROMEO:"], num_tokens=12, temperature=0.0, stop=[stop])[0]
    assert cut == greedy[0][: greedy[0].find(stop)] and len(cut) <= 3
    logits = jax.numpy.asarray(np.log(np.array([[0.5, 0.3, 0.2]])))
    picks = {int(sample_logits(logits, jax.random.key(i), temperature=1.0, top_p=0.6)[0]) for i in range(50)}
    assert picks == {0, 1}  # 0.5 < 0.6, so the second token is kept; the third never
    proc = subprocess.run(
        [sys.executable, "-m", "taipan_jax.generate", f"--workdir={workdir}", "--prompt=ROMEO:", "--prompt=KING",
         "--num_tokens=12", "--temperature=0"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"ROMEO:{greedy[0]}" in proc.stdout and f"KING{greedy[1]}" in proc.stdout
