#!/usr/bin/env bash
# The project's one test command: sets up what is missing, then lint, type check, all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
venv/bin/ruff check .
venv/bin/ruff format --check .
venv/bin/mypy
venv/bin/python -m pytest "$@"
