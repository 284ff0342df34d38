"""Helpers for the end-to-end tests of ``python -m relay serve``.

Every server here listens on 127.0.0.1 port 0 inside the test's own trio run
and is talked to over real sockets (httpx2 for requests, a small h11 reader
for SSE, trio-websocket for ``/ws``), on the real clock: tests wait on lines,
frames and events, guarded by ``trio.fail_after``, never on sleeps.  The
ledger's wall clock is injected (``FakeClock``) where a test needs leases to
expire.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import h11
import httpx2
import trio
import trio_websocket

import relay
import relay_client as rc
from conftest import ROOT, T0

#: A guard for anything that waits on the server: generous, never reached by a
#: passing test.
PATIENCE = 15

JSON = {"Content-Type": "application/json"}


class FakeClock:
    """The ledger's wall clock (``serve(now=...)``): moves only when told."""

    def __init__(self, start: float = T0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@attrs.define
class Relay:
    """A running server and an HTTP client bound to it."""

    server: relay.Server
    client: httpx2.AsyncClient
    root: Path
    headers: dict[str, str]

    async def post(self, method: str, body: Any = None, **fields: Any) -> httpx2.Response:
        """POST a Connect unary call; ``body`` (any JSON value) or ``fields``."""
        return await self.client.post(f"/{rc.SERVICE}/{method}",
                                      json=fields if body is None else body)

    async def ok(self, method: str, **fields: Any) -> dict[str, Any]:
        """Call ``method``; assert HTTP 200 and return the reply."""
        response = await self.post(method, **fields)
        assert response.status_code == 200, (method, response.status_code, response.text)
        return response.json()

    async def refused(self, method: str, code: str, **fields: Any) -> dict[str, Any]:
        """Call ``method``; assert the Connect error ``code`` and its HTTP status."""
        response = await self.post(method, **fields)
        expect = rc.Code(code).http_status
        assert (response.status_code, response.json()["code"]) == (expect, code), (
            method, fields, response.status_code, response.text)
        return response.json()

    async def seed(self, sessions: int = 1, profile: str = "codex-main") -> list[str]:
        """A pooled Codex profile and ``sessions`` sessions; their ids."""
        await self.ok("RegisterProfile", name=profile, provider="codex", mode="pooled")
        return [(await self.ok("CreateSession", profile=profile, session_id=f"s{i}"))
                ["session"]["session_id"] for i in range(1, sessions + 1)]

    def ws(self, **headers: str) -> Any:
        """Open a WebSocket to ``/ws`` (an async context manager)."""
        return open_ws(self.server.endpoint, dict(self.headers, **headers))

    def sse(self, params: dict[str, str] | None = None, **headers: str) -> Any:
        """Open ``GET /events`` (an async context manager giving an SSEReader)."""
        wanted = dict(self.headers, **{k.replace("_", "-"): v for k, v in headers.items()})
        return open_sse(self.server.endpoint, params, wanted)


@contextlib.asynccontextmanager
async def serving(root: Path, config: relay.Config | None = None, *, now: Any = time.time,
                  token: str = "") -> AsyncIterator[Relay]:
    """Serve ``root`` on 127.0.0.1:0 for the body of the block, then stop
    gracefully (and wait until ``serve`` has returned)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(
            relay.serve, relay.Store(root), config or relay.Config(), host="127.0.0.1", port=0,
            now=now))
        try:
            async with httpx2.AsyncClient(base_url=server.endpoint, headers=headers,
                                          timeout=PATIENCE) as client:
                yield Relay(server, client, root, headers)
        finally:
            server.stop()


class SSEReader:
    """A minimal ``text/event-stream`` client over one TCP connection (h11).

    httpx2's streaming iterators are nested async generators, and closing a
    stream early leaves the inner ones to the garbage collector (a
    ResourceWarning under trio, an error here); SSE streams are endless, so
    the tests read them with h11 directly and close the socket themselves.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._conn = h11.Connection(h11.CLIENT)
        self._buffer = b""
        self._ended = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.comments: list[str] = []
        self.retry = 0

    async def _h11_event(self) -> Any:
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._conn.receive_data(await self._stream.receive_some(65536))

    async def _start(self, target: str, headers: dict[str, str], host: str = "relay") -> None:
        request = h11.Request(method="GET", target=target,
                              headers=[("Host", host), ("Accept", "text/event-stream"),
                                       *headers.items()])
        await self._stream.send_all(self._conn.send(request) + self._conn.send(h11.EndOfMessage()))
        response = await self._h11_event()
        assert isinstance(response, h11.Response), response
        self.status = response.status_code
        self.headers = {k.decode().lower(): v.decode() for k, v in response.headers}

    async def _line(self) -> str | None:
        while b"\n" not in self._buffer:
            if self._ended:
                return None
            event = await self._h11_event()
            if isinstance(event, h11.Data):
                self._buffer += bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                self._ended = True
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def body(self) -> bytes:
        """The whole (finite) body: for refusals answered with a JSON error."""
        while not self._ended:
            await self._line()
        return self._buffer

    async def next(self) -> dict[str, Any] | None:
        """The next event as ``{"id", "event", "data"}``; None once the stream ends."""
        event: dict[str, Any] = {}
        while (line := await self._line()) is not None:
            if not line:
                if event:
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "retry":  # sets the reconnection delay; dispatches no event
                self.retry = int(value)
                continue
            event[field] = json.loads(value) if field == "data" else value
        return event or None

    async def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            event = await self.next()
            assert event is not None, f"stream ended after {out}"
            out.append(event)
        return out

    async def until_comment(self, text: str) -> None:
        """Read until a comment line ``text`` has been seen (events are dropped)."""
        while text not in self.comments:
            line = await self._line()
            assert line is not None, f"stream ended before comment {text!r}"
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif line.startswith("retry:"):
                self.retry = int(line[6:])


@contextlib.asynccontextmanager
async def open_sse(endpoint: str, params: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> AsyncIterator[SSEReader]:
    """``GET /events`` on a fresh connection; the reader has seen the response head."""
    url = httpx2.URL(endpoint).join("/events").copy_merge_params(params or {})
    stream = await trio.open_tcp_stream(url.host, url.port)
    try:
        reader = SSEReader(stream)
        await reader._start(url.raw_path.decode(), headers or {}, f"{url.host}:{url.port}")
        yield reader
    finally:
        await stream.aclose()


@contextlib.asynccontextmanager
async def open_ws(endpoint: str, headers: dict[str, str] | None = None) -> AsyncIterator[Any]:
    """A trio-websocket client on ``/ws`` over a TCP stream this helper owns.

    trio-websocket 0.12 leaves its socket to the garbage collector when the
    server closes first (its reader stops at EOF without closing the stream),
    an unclosed-socket ResourceWarning here; so the stream is closed here.
    """
    url = httpx2.URL(endpoint)
    stream = await trio.open_tcp_stream(url.host, url.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, f"{url.host}:{url.port}", "/ws",
                extra_headers=[(k.encode(), v.encode()) for k, v in (headers or {}).items()])
            try:
                yield ws
            finally:
                await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


async def ws_send(ws: Any, **frame: Any) -> None:
    await ws.send_message(json.dumps(frame))


async def ws_recv(ws: Any) -> dict[str, Any]:
    return json.loads(await ws.get_message())


async def ws_until(ws: Any, predicate: Any) -> dict[str, Any]:
    """Receive frames until one satisfies ``predicate``; return it."""
    while True:
        frame = await ws_recv(ws)
        if predicate(frame):
            return frame


def cli_in_process(root: Path, *args: str) -> dict[str, Any]:
    """Run ``relay.main`` with --json (before any server runs); its one object."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = relay.main(["--root", str(root), *args, "--json"])
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue())


async def cli_process(root: Path, *args: str, check: int = 0) -> dict[str, Any]:
    """Run ``python -m relay ... --json`` as a separate process; its one object."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RELAY_FAILPOINT", None)
    proc = await trio.run_process(
        [sys.executable, "-m", "relay", "--root", str(root), *args, "--json"],
        capture_stdout=True, capture_stderr=True, check=False, env=env, cwd=str(root))
    assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def state_digest(root: Path) -> dict[str, str]:
    """Path -> SHA-256 of every file under ``flow/state``."""
    base = root / "flow" / "state"
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file()}


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus exposition (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        sample, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and got == want:
            return float(value)
    return 0.0


# -- leak checks around serving tests ------------------------------------------------


def open_fds() -> set[int]:
    """This process's open file descriptors."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def child_pids() -> set[int]:
    """This process's children, running or zombie (not yet reaped)."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
    return pids


@contextlib.contextmanager
def no_leaks() -> Any:
    """Fail if the block leaves file descriptors open or child processes behind
    (running or zombie).  Garbage is collected first, so only what is still
    referenced, or was never closed, counts."""
    import gc

    gc.collect()
    fds, children = open_fds(), child_pids()
    yield
    gc.collect()
    leaked_fds = open_fds() - fds
    targets = {}
    for fd in leaked_fds:
        with contextlib.suppress(OSError):
            targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
    assert not targets, f"file descriptors left open: {targets}"
    assert child_pids() - children == set(), "child processes left behind (running or zombie)"


#: The stand-in provider (scripts/stand_in_provider.py) as a --command prefix.
STAND_IN = [sys.executable, str(ROOT / "scripts" / "stand_in_provider.py")]


def process_alive(pid: int) -> bool:
    """True while ``pid`` is a process that has not exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# -- the live runtime in a served relay (tests/test_runtime.py, test_real_relay.py) --------


async def until_runtime(r: Any, predicate: Any) -> Any:
    """Wait (bounded by the caller's fail_after) until ``await predicate()`` is truthy;
    its value.  A runtime change (a reconcile, a process) wakes the wait early."""
    runtime = r.server.service.runtime
    while True:
        value = await predicate()
        if value:
            return value
        with trio.move_on_after(0.2):
            await runtime.wait_changed()


async def profile_sessions(r: Any, profile: str) -> list[dict]:
    return (await r.ok("ListSessions", profile=profile))["sessions"]


async def warm_sessions(r: Any, profile: str, n: int = 1) -> list[dict]:
    """At least ``n`` ready sessions of ``profile`` with a running process."""
    async def ready():
        rows = [s for s in await profile_sessions(r, profile)
                if s["state"] == "ready" and s["process"]["state"] == "running"]
        return rows if len(rows) >= n else None
    return await until_runtime(r, ready)


async def borrow_lease(r: Any, profile: str, holder: str, session: str = "") -> dict:
    body = {"holder": holder, **({"session_id": session} if session else {"profile": profile})}
    return (await r.ok("Borrow", **body))["lease"]


async def start_turn(r: Any, lease: dict, text: str, **extra: Any) -> dict:
    """StartTurn for the holder of ``lease`` (its fencing token carried)."""
    return (await r.ok("StartTurn", session_id=lease["session_id"], lease_id=lease["lease_id"],
                       fencing_token=lease["fencing_token"], input=text, **extra))["turn"]


async def turn_ended(r: Any, turn_id: str) -> dict:
    async def done():
        turn = (await r.ok("GetTurn", turn_id=turn_id))["turn"]
        return turn if turn["state"] != "running" else None
    return await until_runtime(r, done)


async def session_events(r: Any, sid: str) -> list[dict]:
    return (await r.ok("ListEvents", session_id=sid, limit=10000))["records"]
