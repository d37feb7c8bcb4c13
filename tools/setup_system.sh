#!/usr/bin/env bash
# System packages the tools and their tests use, installed when missing and apt is usable:
#   chromium  - headless browser the HTML report test loads (tests/test_tools_dump.py)
#   graphviz  - `dot`, for `narch dump --format svg` and the HTML report's cluster layout
# Never fatal: without them the SVG format says how to get dot, the report uses its built-in
# layout, and the browser test skips with the reason printed.
set -uo pipefail
want=()
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v dot >/dev/null 2>&1 || want+=(graphviz)
if [ ${#want[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_system: apt-get is not available; not installing ${want[*]}" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup_system: not root; to install: sudo apt-get install -y ${want[*]}" >&2
  exit 0
fi
echo "setup_system: installing ${want[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q >/dev/null && apt-get install -y -q "${want[@]}" >/dev/null; }; then
  echo "setup_system: apt-get install ${want[*]} failed; the browser test will skip and say why" >&2
fi
exit 0
