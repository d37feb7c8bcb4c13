#!/usr/bin/env bash
# The project's test command (README): set up .venv, then run the whole suite
# on both cores with coverage.  Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
cd "$root"
export NEURAL_ARCH_CACHE_DIR="${NEURAL_ARCH_CACHE_DIR:-$root/.cache/neural_arch}"
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --cov=neural_arch --cov-report=term:skip-covered "$@"
