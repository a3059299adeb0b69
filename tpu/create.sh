#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice with `gcloud compute tpus tpu-vm create`.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME
             [--project ID] [--spot] [--dry-run] [-- EXTRA_GCLOUD_FLAGS...]

Creates the TPU VM (one host) or pod slice (several hosts, one TPU VM "worker" each).
  --accelerator-type TYPE   e.g. v4-32, v5litepod-64, v5p-16, v6e-8
  --version RUNTIME         TPU software version, e.g. tpu-ubuntu2204-base (v4),
                            v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  --spot                    a Spot TPU (cheaper, can be preempted at any time; see tpu/README.md)
  --name, --zone, --project, --dry-run: see tpu/common.sh (defaults TPU_NAME, TPU_ZONE, TPU_PROJECT)
Words after -- go to gcloud unchanged (e.g. -- --network=my-net --reserved).
USAGE
}

ACCELERATOR_TYPE=""
RUNTIME_VERSION=""
SPOT=0
EXTRA=()
split_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case "$1" in
    --accelerator-type) ACCELERATOR_TYPE="$(value "$@")"; shift 2 ;;
    --version | --runtime-version) RUNTIME_VERSION="$(value "$@")"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

require_location
require "$ACCELERATOR_TYPE" "--accelerator-type (e.g. v4-32)"
require "$RUNTIME_VERSION" "--version (the TPU runtime version, e.g. tpu-ubuntu2204-base)"
[[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "--accelerator-type '$ACCELERATOR_TYPE' is not of the form v<generation>-<size>, e.g. v4-32"

cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_LOC[@]}"
  "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
if [[ $SPOT == 1 ]]; then cmd+=(--spot); fi
run "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
