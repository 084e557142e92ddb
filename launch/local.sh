#!/usr/bin/env bash
# README command 1: set up the venv, then train a tiny model on the offline corpus (Shakespeare),
# checkpoint it, evaluate held-out bits per byte (King James Bible) and print a sample.
# Usage: bash launch/local.sh [--config=configs/tiny.py] [--workdir=DIR] [--config.a.b=v ...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash launch/setup_venv.sh | tail -n 1)
args=("$@")
have_workdir=0; have_config=0
for a in "${args[@]}"; do
  case "$a" in --workdir=*) have_workdir=1;; --config=*) have_config=1;; esac
done
[ $have_config = 1 ] || args=(--config=configs/tiny.py "${args[@]}")
[ $have_workdir = 1 ] || args=(--workdir=workdir_tiny "${args[@]}")
exec "$VENV/bin/python" -m taipan_jax.train "${args[@]}"
