#!/usr/bin/env bash
# Create .venv and install flow-relay with its test tools.  Safe to re-run: it
# reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: flow-relay needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=..." >&2
    exit 1
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.flow-relay-installed
want=$(sha256sum pyproject.toml | cut -c1-64)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "$want" > "$stamp"
fi
