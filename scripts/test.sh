#!/usr/bin/env bash
# Set up .venv (with the test extra) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
source scripts/openblas.sh
exec .venv/bin/python -m pytest "$@"
