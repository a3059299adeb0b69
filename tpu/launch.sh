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
  --api-key-env VAR    the variable holding the judge API key, as named by the config's
                       judge.api_key_env (default RUSCARL_JUDGE_API_KEY). Its value is copied to each
                       worker in a 0600 file that the worker reads into VAR and deletes at start:
                       it never appears on a command line or in output.
  --no-api-key         the judge needs no key (e.g. a vLLM server inside the VPC)
  --name, --zone, --project, --dry-run: see tpu/common.sh
Words after -- go to scripts/train.py (e.g. -- --config.trainer.total_steps=350).
USAGE
}

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

env_words="RUSCARL_COORDINATOR_ADDRESS=auto PYTHONUNBUFFERED=1"
if [[ -n $JUDGE_URL ]]; then env_words="$env_words JUDGE_BASE_URL=$(quote "$JUDGE_URL")"; fi

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
