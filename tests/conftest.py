"""Shared fixtures: a fresh workspace and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """An empty workspace root (its flow/ is created on first write)."""
    return tmp_path


def run_cli(root: Path, *args: str, env: dict | None = None, check: int | None = 0):
    """Run ``python -m relay`` in a subprocess; returns (exit code, stdout, stderr)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    full_env.pop("RELAY_FAILPOINT", None) if not env or "RELAY_FAILPOINT" not in env else None
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "--root", str(root), *args],
        capture_output=True, text=True, env=full_env, cwd=str(root),
    )
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc.returncode, proc.stdout, proc.stderr


def run_json(root: Path, *args: str, check: int | None = 0) -> dict:
    """Run a CLI command with --json and return its one JSON object."""
    _, out, _ = run_cli(root, *args, "--json", check=check)
    return json.loads(out)
