#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, install this package on every worker,
# run the trainer on all workers with one config and a gs:// workdir, collect the logs, and delete
# the slice on request. Every gcloud command is printed ("+ ...") before it runs.
#
#   bash launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=v5litepod-256 \
#       --config=configs/taipan_1_3b.py --workdir=gs://BUCKET/runs/NAME [--config.a.b=v ...]
#
# Options:
#   --project=P          gcloud project (default: the configured one)
#   --version=V          TPU VM software version (default by generation: v5e v2-alpha-tpuv5-lite,
#                        v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v4/v3/v2 tpu-ubuntu2204-base;
#                        `gcloud compute tpus versions list --zone=ZONE` lists them)
#   --repo=URL[@REF]     git clone this URL on the workers instead of copying this checkout
#   --spot               create a Spot slice
#   --skip-install       reuse the package and venv already on the workers
#   --logs-dir=DIR       local copy of the workers' logs (default: tpu_logs/NAME)
#   --teardown           delete the slice after the run and the log collection
#   --delete-only        only delete the slice
#   --dry-run            validate and print every command; create, copy, run nothing (also DRY_RUN=1)
# Environment: TAIPAN_PYTHON, the local Python used for the validation (default: .venv/bin/python,
# else python3); it needs this package's dependencies (bash launch/setup_venv.sh).
#
# Before anything is created, `python -m taipan_jax.launch_check` validates the config against the
# slice (mesh vs device count, batch divisibility, process count); docs/launch.md walks through it.
set -euo pipefail
ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
ME=tpu_pod.sh

# shellcheck source=launch/_common.sh
source "$ROOT/launch/_common.sh"

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" CONFIG="" WORKDIR="" REPO_URL="" LOGS_DIR=""
DRY=${DRY_RUN:-0} SPOT=0 SKIP_INSTALL=0 TEARDOWN=0 DELETE_ONLY=0
OVERRIDES=()
for a in "$@"; do
  case "$a" in
    --name=*) NAME=${a#*=} ;;
    --zone=*) ZONE=${a#*=} ;;
    --accelerator=*|--accelerator-type=*) ACCEL=${a#*=} ;;
    --version=*) VERSION=${a#*=} ;;
    --project=*) PROJECT=${a#*=} ;;
    --config=*) CONFIG=${a#*=} ;;
    --workdir=*) WORKDIR=${a#*=} ;;
    --repo=*) REPO_URL=${a#*=} ;;
    --logs-dir=*) LOGS_DIR=${a#*=} ;;
    --config.*=*) OVERRIDES+=("$a") ;;
    --spot) SPOT=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --teardown) TEARDOWN=1 ;;
    --delete-only) DELETE_ONLY=1 ;;
    --dry-run|--dry_run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$a' (see --help)" ;;
  esac
done
[ "$DRY" = 1 ] || DRY=0

[ -n "$NAME" ] || die "--name is required"
[ -n "$ZONE" ] || die "--zone is required"
GC=(--zone="$ZONE")
[ -z "$PROJECT" ] || GC+=(--project="$PROJECT")

# -- tools --------------------------------------------------------------------------------------
need_tool gcloud "gcloud not found on PATH; dry run continues (a real run needs the Google Cloud CLI)" \
  "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), run 'gcloud auth login', or pass --dry-run"

if [ "$DELETE_ONLY" = 1 ]; then
  run gcloud compute tpus tpu-vm delete "$NAME" "${GC[@]}" --quiet
  exit 0
fi

[ -n "$ACCEL" ] || die "--accelerator is required (e.g. v5litepod-256)"
[ -n "$CONFIG" ] || die "--config is required (e.g. configs/taipan_1_3b.py)"
[ -n "$WORKDIR" ] || die "--workdir is required (a gs:// path)"
case "$WORKDIR" in
  gs://?*) ;;
  *) die "--workdir must be a gs:// path (the workers share no filesystem; orbax writes gs:// through tensorstore), got '$WORKDIR'" ;;
esac
case "$CONFIG" in /*) die "--config must be relative to the repository root (it is read on the workers), got '$CONFIG'" ;; esac
[ -f "$ROOT/$CONFIG" ] || die "no config file $ROOT/$CONFIG"

if [ -z "$VERSION" ]; then
  case "$ACCEL" in
    v5litepod-*|v5e-*|v5lite-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v4-*|v3-*|v2-*) VERSION=tpu-ubuntu2204-base ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

# -- validation (before anything is created) ------------------------------------------------------
PY=${TAIPAN_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
# Multi-host slices: every worker joins one jax.distributed job (Cloud TPU metadata gives the rest).
TRAIN_ARGS=(--config="$CONFIG" --workdir="$WORKDIR" --config.distributed.initialize=always "${OVERRIDES[@]}")
echo "# validate $CONFIG against $ACCEL"
(cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu \
  "$PY" -m taipan_jax.launch_check --config="$CONFIG" --accelerator="$ACCEL" --workdir="$WORKDIR" "${OVERRIDES[@]}") \
  || die "the config does not fit $ACCEL (see the launch_check errors above); nothing was created"

# -- slice ----------------------------------------------------------------------------------------
CREATE=(gcloud compute tpus tpu-vm create "$NAME" "${GC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
[ "$SPOT" = 0 ] || CREATE+=(--spot)
echo "# create the slice, or reuse it if it exists with the same accelerator type"
echo "+ $(quote gcloud compute tpus tpu-vm describe "$NAME" "${GC[@]}" --format='value(acceleratorType)')"
if [ "$DRY" = 1 ]; then
  echo "+ $(quote "${CREATE[@]}")    # only if the slice does not exist"
elif existing=$(gcloud compute tpus tpu-vm describe "$NAME" "${GC[@]}" --format='value(acceleratorType)' 2>/dev/null); then
  [ "$existing" = "$ACCEL" ] || die "slice $NAME exists with accelerator type '$existing', not '$ACCEL' (delete it with --delete-only, or pick another --name)"
  echo "# reusing slice $NAME ($existing)"
else
  run "${CREATE[@]}"
fi
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${GC[@]}" --worker=all)

# -- install ----------------------------------------------------------------------------------------
JAX_VERSION=""
while IFS= read -r line; do if [[ $line == jax==* ]]; then JAX_VERSION=${line#jax==}; fi; done < "$ROOT/ci/constraints.txt"
[ -n "$JAX_VERSION" ] || die "no jax== pin in ci/constraints.txt"
if [ "$SKIP_INSTALL" = 0 ]; then
  echo "# install the package on every worker"
  if [ -n "$REPO_URL" ]; then
    url=${REPO_URL%@*} ref=""
    [ "$url" = "$REPO_URL" ] || ref=${REPO_URL##*@}
    fetch="rm -rf ~/taipan_jax && git clone $(quote "$url") ~/taipan_jax"
    [ -z "$ref" ] || fetch+=" && git -C ~/taipan_jax checkout $(quote "$ref")"
    run "${SSH[@]}" --command="$fetch"
  else
    TARBALL=${TMPDIR:-/tmp}/taipan_src_$NAME.tgz
    # This checkout's tracked and untracked (not ignored) files.
    echo "+ (cd $(quote "$ROOT") && git ls-files -co --exclude-standard -z | tar czf $(quote "$TARBALL") --null -T -)"
    if [ "$DRY" = 0 ]; then
      (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar czf "$TARBALL" --null -T -)
    fi
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME":taipan_src.tgz "${GC[@]}" --worker=all
    run "${SSH[@]}" --command="rm -rf ~/taipan_jax && mkdir -p ~/taipan_jax && tar xzf ~/taipan_src.tgz -C ~/taipan_jax"
  fi
  # TPU VM images ship an older Python; uv provides 3.12 for launch/setup_venv.sh.
  run "${SSH[@]}" --command="cd ~/taipan_jax && python3 -m pip install --user -q uv && ~/.local/bin/uv python install 3.12 \
&& PYTHON=\$(~/.local/bin/uv python find 3.12) VENV=\$HOME/taipan_venv bash launch/setup_venv.sh \
&& ~/taipan_venv/bin/pip install -q -c ci/constraints.txt \"jax[tpu]==$JAX_VERSION\" gcsfs google-cloud-storage"
fi

# -- run --------------------------------------------------------------------------------------------
echo "# train on all workers (the log of each worker: ~/taipan_train.log)"
set +e
run "${SSH[@]}" --command="cd ~/taipan_jax && ~/taipan_venv/bin/python -m taipan_jax.train $(quote "${TRAIN_ARGS[@]}") 2>&1 | tee ~/taipan_train.log; exit \${PIPESTATUS[0]}"
rc=$?
set -e
[ "$rc" = 0 ] || warn "the training command exited with status $rc; collecting logs"

# -- logs -------------------------------------------------------------------------------------------
echo "# collect logs: every worker's log to $WORKDIR/logs/"
run "${SSH[@]}" --command="gcloud storage cp ~/taipan_train.log $(quote "$WORKDIR")/logs/\$(hostname).log"
LOGS_DIR=${LOGS_DIR:-tpu_logs/$NAME}
run mkdir -p "$LOGS_DIR"
run gcloud storage cp -r "$WORKDIR/logs/*" "$LOGS_DIR/"

# -- teardown ---------------------------------------------------------------------------------------
if [ "$TEARDOWN" = 1 ]; then
  echo "# delete the slice"
  run gcloud compute tpus tpu-vm delete "$NAME" "${GC[@]}" --quiet
else
  echo "# the slice is still running (and billed): delete it with: bash launch/tpu_pod.sh --name=$NAME --zone=$ZONE --delete-only"
fi
[ "$DRY" = 0 ] || echo "# dry run: nothing was created, copied or run"
exit "$rc"
