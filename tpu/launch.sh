#!/usr/bin/env bash
# Starts the same training command on every worker (--worker=all), detached, logging to a file.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE --config FILE --workdir DIR
             [--judge-base-url URL] [--api-key-env VAR | --no-api-key] [--remote-dir DIR]
             [--project ID] [--dry-run] [-- EXTRA_TRAIN_FLAGS...]

Runs on every worker, in ~/DIR (default ruscarl_jax, installed by tpu/setup.sh):
  python scripts/train.py --config=FILE --workdir=DIR [EXTRA_TRAIN_FLAGS...]
detached (setsid), appending to ~/DIR/logs/train.log (see tpu/logs.sh), pid in logs/train.pid.
Each worker joins the slice through jax.distributed (RUSCARL_COORDINATOR_ADDRESS=auto).
  --config FILE        ml_collections config, relative to the repository (e.g. configs/qwen7b.py)
  --workdir DIR        checkpoints, metrics and rollout records; use gs://BUCKET/PATH on a pod slice
                       (a local path is per worker). Relaunching with the same workdir resumes.
  --judge-base-url URL the judge endpoint, exported as JUDGE_BASE_URL on the workers
                       (default: \$JUDGE_BASE_URL here; unset: the config's own setting)
Config variables set here are exported on the workers too: $FORWARDED.
Data must reach every worker: data paths (HEALTHBENCH_*_PATH, --config.data.*_path=) are gs:// URLs
or files inside the repository checkout (which tpu/setup.sh copies); other local paths are refused.
The config file travels with the checkout (tpu/setup.sh); the run writes its resolved config and
tokenizer to the workdir (config.json, tokenizer/), and a relaunch resumes with them.
  --api-key-env VAR    the variable holding the judge API key, as named by the config's
                       judge.api_key_env (default RUSCARL_JUDGE_API_KEY, the name every config uses). Its value is copied to each
                       worker in a 0600 file that the worker reads into VAR and deletes at start:
                       it never appears on a command line or in output.
  --no-api-key         the judge needs no key (e.g. a vLLM server inside the VPC)
  --name, --zone, --project, --dry-run: see tpu/common.sh
Words after -- go to scripts/train.py (e.g. -- --config.trainer.total_steps=350).
USAGE
}

FORWARDED="JUDGE_MODEL QWEN7B_DIR HEALTHBENCH_TRAIN_PATH HEALTHBENCH_VAL_PATH"
CONFIG=""
WORKDIR=""
JUDGE_URL="${JUDGE_BASE_URL:-}"
API_KEY_ENV="RUSCARL_JUDGE_API_KEY"
NO_API_KEY=0
EXTRA=()
split_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case "$1" in
    --config) CONFIG="$(value "$@")"; shift 2 ;;
    --workdir) WORKDIR="$(value "$@")"; shift 2 ;;
    --judge-base-url) JUDGE_URL="$(value "$@")"; shift 2 ;;
    --api-key-env) API_KEY_ENV="$(value "$@")"; shift 2 ;;
    --no-api-key) NO_API_KEY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

require_location
require "$CONFIG" "--config (e.g. configs/qwen7b.py)"
require "$WORKDIR" "--workdir (e.g. gs://my-bucket/ruscarl/run1)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$ROOT/${CONFIG%%:*}" ]]; then
  info "warning: ${CONFIG%%:*} is not in this checkout; the workers must have it"
fi
if [[ $WORKDIR != gs://* ]]; then
  info "warning: --workdir '$WORKDIR' is not on GCS: on a pod slice every worker writes its own copy," \
    "and a multi-host checkpoint cannot be restored from it; use gs://BUCKET/PATH"
fi

# data_path NAME VALUE: refuses a data path that the workers cannot read (not gs://, not in the checkout).
data_path() {
  case "$2" in
    gs://* | "") ;;
    /* | '~'* | ../* | *'/../'*) die "$1=$2 is a local path outside the checkout: the workers cannot read it;" \
      "copy it to a bucket (gcloud storage cp FILE gs://BUCKET/...) and pass the gs:// URL" ;;
    *) [[ -f $ROOT/$2 ]] || info "warning: $1=$2 is not in this checkout; the workers must have it" ;;
  esac
}

# The worker keeps its own RUSCARL_COORDINATOR_ADDRESS when it has one; a TPU VM has none: auto-detect.
# shellcheck disable=SC2016  # expanded on the worker, not here
env_words='RUSCARL_COORDINATOR_ADDRESS="${RUSCARL_COORDINATOR_ADDRESS:-auto}" PYTHONUNBUFFERED=1'
if [[ -n $JUDGE_URL ]]; then env_words="$env_words JUDGE_BASE_URL=$(quote "$JUDGE_URL")"; fi
for name in $FORWARDED; do
  if [[ -n ${!name:-} ]]; then
    if [[ $name == *_PATH ]]; then data_path "$name" "${!name}"; fi
    env_words="$env_words $name=$(quote "${!name}")"
  fi
done
for word in ${EXTRA[@]+"${EXTRA[@]}"}; do
  if [[ $word =~ ^--config\.data\.[a-z_]*path= ]]; then data_path "${word%%=*}" "${word#*=}"; fi
done

secret=""
if [[ $NO_API_KEY == 0 ]]; then
  [[ $API_KEY_ENV =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
    die "--api-key-env '$API_KEY_ENV' is not a variable name"
  [[ -n ${!API_KEY_ENV:-} ]] ||
    die "$API_KEY_ENV is not set here; export it, name another variable with --api-key-env," \
      "or pass --no-api-key"
  key_file=".ruscarl_secret_$API_KEY_ENV"  # in the worker's home, deleted once read
  if [[ $DRY_RUN == 1 ]]; then
    tpu_scp all "<a 0600 temp file holding \$$API_KEY_ENV>" "$key_file"
  else
    local_key="$(mktemp)"  # mktemp creates it 0600
    trap 'rm -f "$local_key"' EXIT
    printf '%s' "${!API_KEY_ENV}" >"$local_key"  # printf is a builtin: the value is in no argv
    tpu_scp all "$local_key" "$key_file"
    rm -f "$local_key"
  fi
  # shellcheck disable=SC2016  # expanded on the worker, not here
  secret='if [ -f ~/'"$key_file"' ]; then '"$API_KEY_ENV"'="$(cat ~/'"$key_file"')"; rm -f ~/'"$key_file"'; export '"$API_KEY_ENV"'; fi; '
fi

train=".venv/bin/python scripts/train.py --config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR")"
for word in ${EXTRA[@]+"${EXTRA[@]}"}; do train="$train $(quote "$word")"; done

# shellcheck disable=SC2016  # expanded on the worker, not here
guard='if [ -f logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null; then echo "$(hostname): a run is already going (pid $(cat logs/train.pid)); stop it with tpu/stop.sh" >&2; exit 1; fi; '
# shellcheck disable=SC2016  # expanded on the worker, not here
start='echo "$!" > logs/train.pid; echo "$(hostname): started pid $! (log: '"$REMOTE_DIR"'/logs/train.log)"'
remote="set -e; cd $REMOTE_DIR; mkdir -p logs; $secret$guard"  # the key file goes, whatever happens
remote="${remote}export $env_words; setsid $train >> logs/train.log 2>&1 < /dev/null & $start"
tpu_ssh all "$remote"
