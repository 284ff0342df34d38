#!/usr/bin/env bash
# Create .venv and install flow-relay with its test tools (the real Codex CLI
# among them: openai-codex-cli-bin), and buf and Claude Code (npm @bufbuild/buf,
# @anthropic-ai/claude-code, pinned in scripts/node/package-lock.json) when npm exists.
# Safe to re-run: each step reinstalls only when its manifest changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: flow-relay needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=..." >&2
    exit 1
}
# The browser tests (tests/test_browser.py) drive Debian's Chromium, never a
# browser downloaded by Playwright; as root, install it when it is missing.
if [ "$(id -u)" = 0 ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's chromium for the browser tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || {
        echo "setup: could not install chromium (apt-get install -y chromium); the browser tests will fail" >&2
        exit 1
    }
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.flow-relay-installed
want=$(sha256sum pyproject.toml | cut -c1-64)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "$want" > "$stamp"
fi
# Bytecode for the two modules every CLI command loads.  This environment may
# set PYTHONDONTWRITEBYTECODE=1, which stops Python writing .pyc files but not
# reading them: without this step each spawn recompiles ~8,000 lines.  The
# default (timestamp) check makes Python ignore a .pyc whose source changed
# since, so a stale one is never used; re-running setup refreshes them.
.venv/bin/python -m compileall -q relay.py relay_client.py
# buf (buf lint, and buf curl in tests/test_third_party.py) and Claude Code
# (tests/test_real_providers.py): a project-local npm install, never global.
# Without npm the tests that need buf skip, and the Claude tests fail, naming this.
node=scripts/node
if command -v npm >/dev/null 2>&1; then
    nstamp=$node/node_modules/.flow-relay-installed
    nwant=$(sha256sum $node/package-lock.json | cut -c1-64)
    if [ "$(cat "$nstamp" 2>/dev/null)" != "$nwant" ] || [ ! -x $node/node_modules/.bin/buf ] \
        || [ ! -x $node/node_modules/.bin/claude ]; then
        (cd $node && npm ci --no-audit --no-fund --loglevel=error)
        echo "$nwant" > "$nstamp"
    fi
else
    echo "setup: npm not found; buf and Claude Code are not installed (tests that need them skip or fail)" >&2
fi
