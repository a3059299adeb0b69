#!/usr/bin/env bash
# Sends SIGTERM to the training process on every worker: the trainer saves a checkpoint and exits,
# exactly as on a preemption; tpu/launch.sh with the same --workdir resumes from it.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE [--remote-dir DIR] [--project ID] [--dry-run]

Sends SIGTERM to the pid in ~/DIR/logs/train.pid on every worker (written by tpu/launch.sh).
  --remote-dir DIR  the checkout on the workers, relative to home (default ruscarl_jax)
  --name, --zone, --project, --dry-run: see tpu/common.sh
USAGE
}

split_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do common_flag "$@"; shift "$SHIFT"; done

require_location
# shellcheck disable=SC2016  # expanded on the worker, not here
signal='if [ -f logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null; then kill -TERM "$(cat logs/train.pid)"; echo "$(hostname): sent SIGTERM to pid $(cat logs/train.pid)"; else echo "$(hostname): no run is going"; fi'
tpu_ssh all "cd $REMOTE_DIR && $signal"
