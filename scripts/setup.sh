#!/usr/bin/env bash
# Create .venv with mlx-gemma-tune and the offline demo model installed (editable).
# With --test, also the test tools.
# Works offline-first: every package comes from the configured package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # torch first and exactly this version: on Linux it is a local CPU wheel, any other
  # spec would pull several GB of CUDA packages.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[test,demo]'
else
  .venv/bin/python -m pip install -q -e '.[demo]'
fi
