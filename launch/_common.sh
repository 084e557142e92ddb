# Helpers sourced by the launch scripts (tpu_pod.sh, xpk_example.sh, slurm_gpu.sbatch).
# The caller sets ME (its name, for messages) and DRY (1: print commands, run nothing).

die() { echo "$ME: error: $*" >&2; exit 1; }
warn() { echo "$ME: warning: $*" >&2; }
quote() {  # shell-quote each argument for display / for a remote command line
  local a out=""
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}
run() { echo "+ $(quote "$@")"; if [ "$DRY" = 0 ]; then "$@"; fi; }
# The calling script's header comment (line 2 up to `set -euo`), as --help.
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[${#BASH_SOURCE[@]}-1]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
# need_tool NAME DRY_RUN_WARNING ERROR: a missing tool is a warning in a dry run, else an error.
need_tool() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$DRY" = 1 ]; then warn "$2"; else die "$3"; fi
}
