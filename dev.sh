#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv on first use (pinned by requirements.lock), then
#   ./dev.sh train [flags]   runs the RuscaRL trainer (default: configs/tiny.py on the CPU)
#   ./dev.sh test [args]     runs the whole test suite (args go to pytest)
#   ./dev.sh python ...      any command inside the environment
#   ./dev.sh vllm-venv       creates .venv-vllm, the real vLLM judge server's environment (tests/test_vllm_judge.py)
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = vllm-venv ]; then shift; exec scripts/install_vllm_venv.sh "$@"; fi  # its own venv, not .venv
VENV="${RUSCARL_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "dev.sh: setting up $VENV (first use, or the pins changed)" >&2
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c requirements.lock -e ".[test]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
cmd="${1:-}"; shift || true
case "$cmd" in
  train) exec "$VENV/bin/python" scripts/train.py "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest "$@" ;;
  python) exec "$VENV/bin/python" "$@" ;;
  *) echo "usage: ./dev.sh train|test|python|vllm-venv [args...]" >&2; exit 2 ;;
esac
