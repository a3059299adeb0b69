#!/usr/bin/env bash
# Installs the project on every worker of the TPU VM / pod slice: sources, a venv, jax[tpu].
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE [--repo-url URL [--ref REF]] [--python PY] [--remote-dir DIR]
             [--project ID] [--dry-run]

Puts the sources in ~/DIR on every worker (--worker=all) and installs them into ~/DIR/.venv with
  pip install -c requirements.lock -e '.[tpu]'
Sources: by default this checkout (tracked and untracked-but-not-ignored files, so local edits
travel), packed with git and copied with 'gcloud compute tpus tpu-vm scp'; with --repo-url each
worker clones/fetches the repository itself (REF: a branch, tag or commit; default: HEAD).
An existing ~/DIR/.venv is kept, so running setup again after an edit only syncs and reinstalls.
  --python PY       interpreter for the venv (default python3.11; installed with apt if missing,
                    since the TPU images ship Ubuntu 22.04 with Python 3.10)
  --remote-dir DIR  the checkout on the workers, relative to home (default ruscarl_jax)
  --name, --zone, --project, --dry-run: see tpu/common.sh
USAGE
}

REPO_URL=""
REF="HEAD"
PYTHON="python3.11"
split_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case "$1" in
    --repo-url) REPO_URL="$(value "$@")"; shift 2 ;;
    --ref) REF="$(value "$@")"; shift 2 ;;
    --python) PYTHON="$(value "$@")"; shift 2 ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

require_location
[[ $PYTHON =~ ^python3(\.[0-9]+)?$ ]] || die "--python '$PYTHON' must look like python3.11"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$REMOTE_DIR"
ARCHIVE_NAME="ruscarl_jax-src.tar.gz"

if [[ -z $REPO_URL ]]; then
  git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$ROOT is not a git checkout; pass --repo-url to clone on the workers instead"
  if [[ $DRY_RUN == 1 ]]; then
    ARCHIVE="${TMPDIR:-/tmp}/ruscarl_jax-setup/$ARCHIVE_NAME"  # not created under --dry-run
    echo "git -C $(quote "$ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$ARCHIVE") --null -T -"
  else
    PACK_DIR="$(mktemp -d)"
    trap 'rm -rf "$PACK_DIR"' EXIT
    ARCHIVE="$PACK_DIR/$ARCHIVE_NAME"
    info "packing $ROOT into $ARCHIVE"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done |
      tar -czf "$ARCHIVE" --null -T -)
  fi
  tpu_scp all "$ARCHIVE" "$ARCHIVE_NAME"
  # Replace everything but the venv and the logs, so files deleted here disappear there too.
  fetch="mkdir -p $DIR && find $DIR -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} + &&"
  fetch="$fetch tar -xzf $ARCHIVE_NAME -C $DIR && rm -f $ARCHIVE_NAME"
else
  url="$(quote "$REPO_URL")"
  fetch="{ [ -d $DIR/.git ] || git clone -q $url $DIR; } && git -C $DIR fetch -q $url $(quote "$REF")"
  fetch="$fetch && git -C $DIR checkout -q --detach FETCH_HEAD"
fi

install="{ command -v $PYTHON >/dev/null || { sudo apt-get update -q &&"
install="$install sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $PYTHON $PYTHON-venv; }; }"
install="$install && cd $DIR && { [ -x .venv/bin/python ] || $PYTHON -m venv .venv; }"
install="$install && .venv/bin/pip install -q --upgrade pip"
install="$install && .venv/bin/pip install -q -c requirements.lock -e '.[tpu]'"
# A check that every worker joins the slice: all run it at once, as jax.distributed needs.
check="from ruscarl_jax.trainer.distributed import initialize, process_info; initialize(); import jax;"
check="$check print('process, count:', process_info(), 'devices:', jax.device_count(), jax.devices()[0].device_kind)"
install="$install && RUSCARL_COORDINATOR_ADDRESS=auto .venv/bin/python -c \"$check\""

tpu_ssh all "set -e; $fetch && $install"
info "done; next: tpu/launch.sh --name $TPU_NAME --zone $TPU_ZONE --config=... --workdir=gs://..."
