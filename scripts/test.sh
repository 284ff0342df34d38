#!/usr/bin/env bash
# Set everything up, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# flake8-async checks what ruff's ASYNC rules do not (ASYNC123 raising a group's
# child, ASYNC128 a startable that never calls started(), ...).  Off: ASYNC114
# (asks for a config list), ASYNC124 (quart handlers must be async even when
# they never await) and the opt-in ASYNC9xx checkpoint rules.
.venv/bin/flake8-async --disable ASYNC114,ASYNC124,ASYNC9 relay.py relay_client.py tests/*.py scripts/*.py
.venv/bin/python -m pytest "$@"
