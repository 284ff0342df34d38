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


# -- helpers for in-process tests of the pure operations and the commit --------

#: A fixed wall-clock instant in the past (2023-11-14) that pure operations and commits
#: take as ``now``; tests move time by adding seconds to it, never by sleeping.
T0 = 1_700_000_000.0


def mutation(name: str, /, **fields):
    """The Mutation for RPC ``name`` with a request built from ``fields``."""
    import relay
    import relay_client

    return relay.rpc_mutation(name, relay_client.RPC_BY_NAME[name].request(**fields))


def commit_ok(store, name: str, /, now: float = T0, config=None, **fields):
    """Commit one RPC mutation at ``now``; raise its error, return its reply."""
    import relay

    (result,), _ = relay.commit(store, [mutation(name, **fields)], config or relay.Config(), now)
    if isinstance(result, relay.RelayError):
        raise result
    return result


def snapshot(root: Path) -> dict:
    """Relative path -> (bytes, inode, mtime_ns) of every file under ``root/flow``: equal
    snapshots mean nothing was written, not even rewritten with the same bytes."""
    out = {}
    for dirpath, _, files in os.walk(root / "flow"):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), st.st_ino, st.st_mtime_ns)
    return out


#: Test modules that serve the relay (in-process, or as child processes): each
#: of their tests must close every socket and file and reap every child.
SERVING_MODULES = frozenset({"test_serve", "test_serve_ws", "test_client", "test_health", "test_cli"})


@pytest.fixture(autouse=True)
def _no_leaks_around_serving_tests(request: pytest.FixtureRequest):
    """Zombie and file-descriptor leak check around every serving test (but those
    sharing the module-scoped server, whose pooled connection outlives each)."""
    if request.module.__name__ not in SERVING_MODULES or "threaded_relay" in request.fixturenames:
        yield
        return
    from serve_helpers import no_leaks

    with no_leaks():
        yield
