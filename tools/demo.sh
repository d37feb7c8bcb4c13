#!/usr/bin/env bash
# The project's main job (README): set up .venv, then run the demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
exec "$root/.venv/bin/narch" demo "$@"
