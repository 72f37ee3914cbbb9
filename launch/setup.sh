#!/usr/bin/env bash
# Create .venv if missing and install Scion; `--test` adds the test and parity extras.
# Idempotent: a stamp of the requirement files skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
files=(requirements.txt requirements-data.txt pyproject.toml)
[[ "${1:-}" == "--test" ]] && files+=(requirements-test.txt)
[[ -x .venv/bin/python ]] || python3.11 -m venv .venv
stamp=".venv/.scion-installed-$(cat "${files[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  req=requirements.txt
  [[ "${1:-}" == "--test" ]] && req=requirements-test.txt
  .venv/bin/pip install -q -r "$req"
  .venv/bin/pip install -q --no-deps -r requirements-data.txt
  .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi
