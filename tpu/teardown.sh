#!/usr/bin/env bash
# Deletes the TPU VM / pod slice. Checkpoints and records in a gs:// workdir are kept.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE [--project ID] [--yes] [--dry-run]

Deletes the TPU VM or pod slice (all its workers and their local disks). A gs:// workdir survives;
anything written to a worker's local disk is lost.
  --yes     do not ask for confirmation (passes --quiet to gcloud)
  --name, --zone, --project, --dry-run: see tpu/common.sh
USAGE
}

YES=0
split_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case "$1" in
    --yes | --quiet) YES=1; shift ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

require_location
cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_LOC[@]}")
if [[ $YES == 1 ]]; then cmd+=(--quiet); fi
run "${cmd[@]}"
