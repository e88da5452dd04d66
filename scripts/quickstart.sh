#!/usr/bin/env bash
# Set everything up and run the offline quickstart (extra args go to `mlx-gemma-tune quickstart`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/openblas.sh
exec .venv/bin/mlx-gemma-tune quickstart "$@"
