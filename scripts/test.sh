#!/usr/bin/env bash
# Set up .venv (with the test extra), lint with ruff, then run the whole test suite (two pytest-xdist
# workers, see DEVELOPERS.md). Extra args go to pytest (e.g. -k convert, or -n 0 for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
source scripts/openblas.sh
# Two pytest-xdist workers, each given whole test files (a file's module fixtures are built once),
# share the two cores: one OpenBLAS thread each (more would fight over the cores). See DEVELOPERS.md.
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
