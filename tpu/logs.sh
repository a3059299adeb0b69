#!/usr/bin/env bash
# Shows the training log of one worker (default 0, the process that writes metrics) or of all.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE [--worker N|all] [--lines N] [--follow] [--remote-dir DIR]
             [--project ID] [--dry-run]

Prints the end of ~/DIR/logs/train.log (written by tpu/launch.sh) on the chosen worker(s).
  --worker N|all    which worker (default 0; process 0 writes metrics and the progress bar)
  --lines N         how many lines (default 100)
  --follow          keep printing new lines (tail -F) until interrupted
  --remote-dir DIR  the checkout on the workers, relative to home (default ruscarl_jax)
  --name, --zone, --project, --dry-run: see tpu/common.sh
USAGE
}

WORKER=0
LINES=100
FOLLOW=0
split_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case "$1" in
    --worker) WORKER="$(value "$@")"; shift 2 ;;
    --lines) LINES="$(value "$@")"; shift 2 ;;
    --follow | -f) FOLLOW=1; shift ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

require_location
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker '$WORKER' must be a number or 'all'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines '$LINES' must be a number"

tail_cmd="tail -n $LINES"
if [[ $FOLLOW == 1 ]]; then tail_cmd="$tail_cmd -F"; fi
tpu_ssh "$WORKER" "$tail_cmd $(quote "$REMOTE_DIR/logs/train.log")"
