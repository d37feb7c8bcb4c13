#!/usr/bin/env bash
# The project's main job (README): set up .venv, then train a character-level GPT-2,
# compiled, on the Python standard library's sources.  Extra arguments go to
# `narch train gpt2` (see `narch train --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
cd "$root"
export NEURAL_ARCH_CACHE_DIR="${NEURAL_ARCH_CACHE_DIR:-$root/.cache/neural_arch}"
exec "$root/.venv/bin/narch" train gpt2 "$@"
