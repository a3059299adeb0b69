# shellcheck shell=bash
# Shared by the tpu/*.sh scripts (sourced, never run): flag parsing, checks and the --dry-run switch.
#
# Common flags (each has an environment default, so a session can `export TPU_NAME=... TPU_ZONE=...`):
#   --name NAME      TPU VM / pod slice name          (TPU_NAME)
#   --zone ZONE      e.g. us-central2-b                (TPU_ZONE)
#   --project ID     Google Cloud project; optional    (TPU_PROJECT; else gcloud's configured project)
#   --dry-run        print each command instead of running it (DRY_RUN=1 does the same)
#   -h, --help       print the script's usage
# Flags take their value as the next word or after '=' (--zone=us-central2-b).
# Written for bash >= 3.2 so that the scripts also run from a macOS laptop.

set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
DRY_RUN="${DRY_RUN:-0}"
# The remote checkout, relative to the worker's home directory (setup.sh, launch.sh, logs.sh, stop.sh).
REMOTE_DIR="${RUSCARL_REMOTE_DIR:-ruscarl_jax}"
PROG="$(basename "$0")"

die() {
  echo "$PROG: error: $*" >&2
  echo "$PROG: run '$PROG --help' for the flags" >&2
  exit 2
}

info() { echo "$PROG: $*" >&2; }

# Splits --flag=value into --flag value; everything after a bare -- is kept as is (it belongs to
# another program). The result is in the array ARGS.
split_args() {
  ARGS=()
  local passthrough=0 a
  for a in "$@"; do
    if [[ $passthrough == 0 && $a == --*=* ]]; then
      ARGS+=("${a%%=*}" "${a#*=}")
    else
      [[ $a == -- ]] && passthrough=1
      ARGS+=("$a")
    fi
  done
}

# value FLAG [VALUE]: prints VALUE, or fails with a message naming FLAG when it is missing.
value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
  printf '%s' "$2"
}

# common_flag ARGS...: handles a common flag at $1; sets SHIFT to how many words it used.
# shellcheck disable=SC2034  # SHIFT is read by the scripts that source this file
common_flag() {
  case "$1" in
    --name) TPU_NAME="$(value "$@")"; SHIFT=2 ;;
    --zone) TPU_ZONE="$(value "$@")"; SHIFT=2 ;;
    --project) TPU_PROJECT="$(value "$@")"; SHIFT=2 ;;
    --remote-dir) REMOTE_DIR="$(value "$@")"; SHIFT=2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
}

# require VALUE WHAT: fails with "WHAT is required" when VALUE is empty.
require() {
  [[ -n $1 ]] || die "$2 is required"
}

# Checks the flags every gcloud call needs and fills GCLOUD_LOC (--zone, --project).
require_location() {
  require "$TPU_NAME" "--name (or TPU_NAME)"
  require "$TPU_ZONE" "--zone (or TPU_ZONE)"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$TPU_NAME' must be lower-case letters, digits and '-', starting with a letter"
  [[ $REMOTE_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ ]] ||
    die "--remote-dir '$REMOTE_DIR' must be a plain path relative to the home directory"
  GCLOUD_LOC=("--zone=$TPU_ZONE")
  if [[ -n $TPU_PROJECT ]]; then GCLOUD_LOC+=("--project=$TPU_PROJECT"); fi
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud is not on PATH; install the Google Cloud CLI (or use --dry-run)"
  fi
}

# quote WORD: WORD as a shell word (single quotes only where needed, and for --flag=VALUE only
# around VALUE), so that a printed command can be read and pasted back into a shell.
quote() {
  local s="$1"
  if [[ $s =~ ^--[A-Za-z0-9._-]+= ]]; then
    printf '%s' "${s%%=*}="
    s="${s#*=}"
    [[ -z $s ]] && return 0
  fi
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    if [[ $s == *"'"* ]]; then s="$(printf '%s' "$s" | sed "s/'/'\\\\''/g")"; fi
    printf "'%s'" "$s"
  fi
}

print_cmd() {
  local line="" w
  for w in "$@"; do line="$line${line:+ }$(quote "$w")"; done
  printf '%s\n' "$line"
}

# run CMD...: runs CMD, or under --dry-run prints it (one line on stdout) and runs nothing.
run() {
  if [[ $DRY_RUN == 1 ]]; then print_cmd "$@"; else "$@"; fi
}

# The two remote verbs, on one worker or all of them (WORKER is a number or "all").
tpu_ssh() {  # tpu_ssh WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOC[@]}" "--worker=$1" "--command=$2"
}

tpu_scp() {  # tpu_scp WORKER LOCAL_FILE REMOTE_PATH
  run gcloud compute tpus tpu-vm scp "$2" "$TPU_NAME:$3" "${GCLOUD_LOC[@]}" "--worker=$1"
}
