"""Running the real provider CLIs against scripts/mock_model.py, for tests/test_real_providers.py.

The mock and every CLI run inside one loopback-only network namespace when the
platform allows it (root: ``unshare -n -m``, then ``ip link set lo up``; each
CLI joins it with ``nsenter --net --mount``), so nothing but the mock is
reachable, and a private /etc/resolv.conf sends every DNS query to the mock's
sink, so a test sees any outside host a CLI tries; the offline settings of
relay.py's "Provider settings" section apply always.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import relay

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "scripts" / "mock_model.py"
CLAUDE = ROOT / "scripts" / "node" / "node_modules" / ".bin" / "claude"
MOCK_KEY_ENV = "FLOW_RELAY_MOCK_KEY"
MOCK_KEY = "mock-key-not-a-secret"

#: Any single wait on a real child (seconds, real clock: autojump cannot see subprocesses).
WAIT_SECONDS = 30


def codex_binary() -> str:
    """The pinned Codex binary (``openai-codex-cli-bin`` in the test extra); fails loudly without it."""
    try:
        import codex_cli_bin
    except ImportError:
        pytest.fail("openai-codex-cli-bin is not installed: run scripts/setup.sh (it is in the test extra)")
    return str(codex_cli_bin.bundled_codex_path())


def claude_binary() -> str:
    """The pinned Claude Code binary (scripts/node, by ``npm ci``); fails loudly without it."""
    if not os.access(CLAUDE, os.X_OK):
        pytest.fail(f"{CLAUDE} is missing: run scripts/setup.sh (npm ci in scripts/node)")
    return str(CLAUDE)


def netns_reason() -> str | None:
    """Why the CLIs cannot run in a loopback-only namespace here, or None when they can."""
    if os.geteuid() != 0:
        return "not root: unshare -n needs CAP_SYS_ADMIN"
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare -n fails: {probe.stderr.decode().strip()}"


def base_env() -> dict[str, str]:
    """A scrubbed environment: no key, proxy or home of the test runner leaks into a CLI."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


class MockModel:
    """A running scripts/mock_model.py: its port, its request log, and how CLIs reach it."""

    def __init__(self, proc: trio.Process, port: int, log: Path, netns: bool) -> None:
        self.proc, self.port, self.log, self.netns = proc, port, log, netns

    def prefix(self, cwd: Path | str = "/") -> list[str]:
        """argv prefix that runs a command in ``cwd`` in the mock's namespaces (none without them):
        its network, and its mounts, where /etc/resolv.conf sends every DNS query to the mock.
        (Entering a mount namespace moves nsenter to its root unless told a directory.)"""
        if not self.netns:
            return []
        ns = f"/proc/{self.proc.pid}/ns"
        return ["nsenter", f"--net={ns}/net", f"--mount={ns}/mnt", f"--wd={cwd}", "--"]

    def endpoint(self, provider: str) -> relay.ProviderEndpoint:
        base = f"http://127.0.0.1:{self.port}" + ("/v1" if provider == "codex" else "")
        return relay.provider_endpoint(provider, {"base_url": base, "api_key_env": MOCK_KEY_ENV}, environ={})

    def requests(self, route: str | None = "*") -> list[dict]:
        """Every request the mock recorded (from its log file, which crosses namespaces)."""
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return rows if route == "*" else [r for r in rows if r["route"] == route]

    async def release(self) -> None:
        await self.proc.stdin.send_all(b"release\n")


async def mock_port(proc: trio.Process) -> int:
    """The port from the mock's first stdout line, ``PORT <n>`` (read byte by byte: nothing past it)."""
    line = b""
    with trio.fail_after(WAIT_SECONDS):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            assert chunk, "the mock exited before printing its port"
            line += chunk
    word, port = line.split()
    assert word == b"PORT", line
    return int(port)


@contextlib.asynccontextmanager
async def mock_model(tmp_path: Path, *args: str):
    """The mock, in a fresh loopback-only network namespace when root; synced on its ``PORT`` line."""
    log = tmp_path / "mock-requests.jsonl"
    log.touch()
    argv = [sys.executable, str(MOCK), "--log", str(log), *args]
    netns = netns_reason() is None
    if netns:
        # Its own network (only lo) and mounts (a private /etc/resolv.conf naming the mock's DNS sink).
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
        script = 'ip link set lo up && mount --bind "$RESOLV" /etc/resolv.conf && exec "$@" --dns-port 53'
        argv = ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
    env = dict(os.environ, RESOLV=str(tmp_path / "resolv.conf"))
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        yield MockModel(proc, await mock_port(proc), log, netns)
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
            await proc.stdin.aclose()
            await proc.stdout.aclose()


class RealChild:
    """A real CLI process and the protocol object that speaks to it (stderr goes to a file)."""

    def __init__(self, proc: trio.Process, proto, stderr: Path) -> None:
        self.proc, self.proto, self.stderr_path = proc, proto, stderr
        self.events: list = []
        self.eof = False
        self._pos = 0

    async def send(self, data: bytes) -> None:
        await self.proc.stdin.send_all(data)

    async def until(self, match) -> list:
        """Read stdout until an event of kind ``match`` (or for which ``match(event)``); the events since."""
        test = match if callable(match) else (lambda e: e.kind == match)
        start = self._pos
        with trio.fail_after(WAIT_SECONDS):
            while True:
                for i in range(self._pos, len(self.events)):
                    if test(self.events[i]):
                        self._pos = i + 1
                        return self.events[start:self._pos]
                self._pos = len(self.events)
                if self.eof:
                    seen = [e.kind for e in self.events[start:]]
                    tail = self.stderr()[-2000:]
                    raise AssertionError(f"stdout ended before {match}: {seen}\nstderr: {tail}")
                data = await self.proc.stdout.receive_some(1 << 16)
                self.eof = not data
                self.events += self.proto.receive_data(data) if data else self.proto.receive_eof()
                if out := self.proto.data_to_send():
                    await self.send(out)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait(self) -> int:
        with trio.fail_after(WAIT_SECONDS):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def real_cli(mock: MockModel, home: Path, argv: list[str], proto, *, cwd: Path, tamper=None,
                   **codex_options):
    """A real CLI on ``mock``: its home written by ``provider_home_files``, its env by ``provider_env``.

    ``tamper(files, env)``, if given, may change both first (to show what a setting prevents).
    """
    provider = "codex" if isinstance(proto, relay.CodexProtocol) else "claude"
    endpoint = mock.endpoint(provider)
    tmpdir = home.parent / (home.name + "-tmp")
    for directory in (home, tmpdir, cwd):
        directory.mkdir(parents=True, exist_ok=True)
    files = relay.provider_home_files(endpoint, **codex_options)
    env = {**base_env(), **relay.provider_env(endpoint, home=str(home), tmpdir=str(tmpdir), api_key=MOCK_KEY)}
    if tamper is not None:
        tamper(files, env)
    for rel, data in files.items():
        (home / rel).write_bytes(data)
    stderr_path = home.parent / (home.name + ".stderr")
    fds = set(os.listdir("/proc/self/fd"))
    stderr = await trio.to_thread.run_sync(open, stderr_path, "wb")
    with stderr:
        proc = await trio.lowlevel.open_process(
            [*mock.prefix(cwd), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            env=env, cwd=str(cwd), start_new_session=True,
        )
    try:
        yield RealChild(proc, proto, stderr_path)
    finally:
        with trio.CancelScope(shield=True):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
            await proc.wait()
            await proc.stdin.aclose()
            await proc.stdout.aclose()
    with pytest.raises(ChildProcessError):  # reaped: no zombie left
        os.waitpid(proc.pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
    assert set(os.listdir("/proc/self/fd")) <= fds, "a pipe to the CLI was left open"


def codex_argv() -> list[str]:
    return [codex_binary(), "app-server"]


def claude_argv(*extra: str) -> list[str]:
    return [claude_binary(), "-p", "--input-format", "stream-json", "--output-format", "stream-json",
            "--verbose", *extra]
