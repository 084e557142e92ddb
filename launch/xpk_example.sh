#!/usr/bin/env bash
# Train on TPU slices of a GKE cluster with xpk (https://github.com/AI-Hypercomputer/xpk): one
# `xpk workload create` whose container installs this checkout and runs the trainer on every host.
# An example: adapt the image and the cluster to yours. Every command is printed ("+ ...").
#
#   bash launch/xpk_example.sh --cluster=CLUSTER --workload=NAME --tpu-type=v5litepod-256 \
#       --config=configs/taipan_1_3b.py --workdir=gs://BUCKET/runs/NAME [--config.a.b=v ...]
#
# Options:
#   --project=P --zone=Z        passed to xpk (default: gcloud's configured ones)
#   --num-slices=K              multislice: K slices of --tpu-type (devices and hosts x K)
#   --docker-image=IMG          an image that already has this package installed (see docs/launch.md);
#                               default: build from --base-docker-image with this checkout (xpk --script-dir)
#   --base-docker-image=IMG     default python:3.12-slim
#   --delete                    delete the workload instead of creating it
#   --dry-run                   validate and print the commands; submit nothing (also DRY_RUN=1)
# Environment: TAIPAN_PYTHON, the local Python for the validation (default .venv/bin/python, python3).
#
# The cluster must exist (xpk cluster create ...; docs/launch.md). Before submitting,
# `python -m taipan_jax.launch_check` validates the config against K x --tpu-type.
set -euo pipefail
ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
ME=xpk_example.sh

# shellcheck source=launch/_common.sh
source "$ROOT/launch/_common.sh"

CLUSTER="" WORKLOAD="" TPU_TYPE="" PROJECT="" ZONE="" CONFIG="" WORKDIR="" IMAGE=""
BASE_IMAGE=python:3.12-slim SLICES=1 DELETE=0 DRY=${DRY_RUN:-0}
OVERRIDES=()
for a in "$@"; do
  case "$a" in
    --cluster=*) CLUSTER=${a#*=} ;;
    --workload=*) WORKLOAD=${a#*=} ;;
    --tpu-type=*|--accelerator=*) TPU_TYPE=${a#*=} ;;
    --project=*) PROJECT=${a#*=} ;;
    --zone=*) ZONE=${a#*=} ;;
    --num-slices=*) SLICES=${a#*=} ;;
    --docker-image=*) IMAGE=${a#*=} ;;
    --base-docker-image=*) BASE_IMAGE=${a#*=} ;;
    --config=*) CONFIG=${a#*=} ;;
    --workdir=*) WORKDIR=${a#*=} ;;
    --config.*=*) OVERRIDES+=("$a") ;;
    --delete) DELETE=1 ;;
    --dry-run|--dry_run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$a' (see --help)" ;;
  esac
done
[ "$DRY" = 1 ] || DRY=0

[ -n "$CLUSTER" ] || die "--cluster is required"
[ -n "$WORKLOAD" ] || die "--workload is required"
XPK_COMMON=(--cluster="$CLUSTER")
[ -z "$PROJECT" ] || XPK_COMMON+=(--project="$PROJECT")
[ -z "$ZONE" ] || XPK_COMMON+=(--zone="$ZONE")

need_tool xpk "xpk not found on PATH; dry run continues (a real run needs 'pip install xpk', gcloud and kubectl)" \
  "xpk not found on PATH: pip install xpk (it also needs gcloud and kubectl), or pass --dry-run"

if [ "$DELETE" = 1 ]; then
  run xpk workload delete "${XPK_COMMON[@]}" --workload="$WORKLOAD"
  exit 0
fi

[ -n "$TPU_TYPE" ] || die "--tpu-type is required (e.g. v5litepod-256)"
[ -n "$CONFIG" ] || die "--config is required"
[ -n "$WORKDIR" ] || die "--workdir is required (a gs:// path)"
case "$WORKDIR" in gs://?*) ;; *) die "--workdir must be a gs:// path (the pods share no filesystem), got '$WORKDIR'" ;; esac
case "$CONFIG" in /*) die "--config must be relative to the repository root, got '$CONFIG'" ;; esac
[ -f "$ROOT/$CONFIG" ] || die "no config file $ROOT/$CONFIG"
[[ $SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$SLICES'"

PY=${TAIPAN_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
echo "# validate $CONFIG against $SLICES x $TPU_TYPE"
(cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu \
  "$PY" -m taipan_jax.launch_check --config="$CONFIG" --accelerator="$TPU_TYPE" --num_slices="$SLICES" \
  --workdir="$WORKDIR" "${OVERRIDES[@]}") \
  || die "the config does not fit $SLICES x $TPU_TYPE (see the launch_check errors above); nothing was submitted"

JAX_VERSION=""
while IFS= read -r line; do if [[ $line == jax==* ]]; then JAX_VERSION=${line#jax==}; fi; done < "$ROOT/ci/constraints.txt"
TRAIN="python -m taipan_jax.train $(quote --config="$CONFIG" --workdir="$WORKDIR" --config.distributed.initialize=always "${OVERRIDES[@]}")"
CREATE=(xpk workload create "${XPK_COMMON[@]}" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" --num-slices="$SLICES")
if [ -n "$IMAGE" ]; then
  CREATE+=(--docker-image="$IMAGE" --command="$TRAIN")
else
  # xpk builds an image: the base image plus this directory (the container starts in it).
  CREATE+=(--base-docker-image="$BASE_IMAGE" --script-dir="$ROOT"
           --command="pip install -q -c ci/constraints.txt -e . \"jax[tpu]==$JAX_VERSION\" && $TRAIN")
fi
echo "# submit the workload"
run "${CREATE[@]}"
echo "# follow it: xpk workload list $(quote "${XPK_COMMON[@]}"); logs: the Cloud Logging link xpk prints, or kubectl logs"
echo "# delete it: bash launch/xpk_example.sh --cluster=$CLUSTER --workload=$WORKLOAD --delete"
[ "$DRY" = 0 ] || echo "# dry run: nothing was submitted"
