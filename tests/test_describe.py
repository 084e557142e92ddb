"""``describe`` on every config: abstract init only, and the printed parameter counts."""

import os
import subprocess
import sys

import pytest

from taipan_jax.describe import describe
from taipan_jax.model_config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_cfg(name):
    import importlib

    return ModelConfig.from_dict(importlib.import_module(f"configs.{name}").get_config().model.to_dict())


def test_mamba2_130m_has_about_130m_parameters():
    text, total = describe(_model_cfg("mamba2_130m"))
    # 24 x (in_proj 768x3352 + conv 1792x4(+bias) + out_proj 1536x768 + norms + 72) + 50304x768 embedding.
    assert total == 129_001_920
    assert abs(total - 130e6) / 130e6 < 0.03
    assert text.splitlines()[-1] == f"total_params={total}"


def test_describe_cli_prints_total_params():
    env = dict(os.environ, PYTHONPATH=ROOT)
    for cfg in ("configs/tiny.py", "configs/mamba2_130m.py"):
        proc = subprocess.run([sys.executable, "-m", "taipan_jax.describe", f"--config={cfg}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith("total_params=") and int(last.split("=")[1]) > 0


def test_docs_models_table_matches_describe():
    import importlib
    import re

    table = open(os.path.join(ROOT, "docs", "models.md")).read()
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| ([\d,]+) \|$", table, flags=re.M))
    assert len(rows) >= 14
    for name, count in rows.items():
        cfg = ModelConfig.from_dict(importlib.import_module(f"configs.{name}").get_config().model.to_dict())
        assert describe(cfg)[1] == int(count.replace(",", "")), name
