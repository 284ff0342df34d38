#!/usr/bin/env bash
# Set everything up and serve the relay on the default workspace ./flow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m relay serve "$@"
