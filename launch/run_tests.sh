#!/usr/bin/env bash
# README command 2: set up the venv and run the whole test suite (CPU; no network).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash launch/setup_venv.sh | tail -n 1)
export TAIPAN_LIBTPU_DIR="$VENV/libtpu"
# One persistent compilation cache for this run's processes (pytest workers and the trainer
# subprocesses the tests start), fresh each run: identical train-step compiles are done once.
JAX_COMPILATION_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/taipan_jax_cache.XXXXXX")
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
set +e
# Two workers (the machine has 2 cores); one file per worker keeps module fixtures single.
"$VENV/bin/python" -m pytest -q -n 2 --dist loadfile tests "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass.
if [ $rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit $rc
