"""relay_client against a real relay: both stubs, every RPC, every refusal
mapped to its exception, retries that never apply twice, watches that resume
across a restart, borrowed leases kept alive and given back, discovery, auth
and the scripting CLI.

Every server here is ``relay.serve`` on 127.0.0.1, port 0 (or the port a
restarted server takes over), inside the test's own trio run.  The blocking
stub is driven from worker threads (``InThread``), or it would deadlock the
loop that serves it.  These tests do real I/O, so they use the real clock and
guard every wait with ``trio.fail_after``; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
import trio

import relay
import relay_client as rc
from conftest import ROOT, commit_ok

#: Seconds any one test may take before it is failed (most take well under one).
LIMIT = 15

################################################################
# Helpers
################################################################


@pytest.fixture(autouse=True)
def _no_ambient_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery reads the environment: start every test from a clean one."""
    for name in ("RELAY_URL", "RELAY_TOKEN", "FLOW_ROOT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    return request.param


async def start_server(nursery: trio.Nursery, root: Path, port: int = 0) -> relay.Server:
    return await nursery.start(functools.partial(
        relay.serve, relay.Store(root), relay.Config(), host="127.0.0.1", port=port))


@contextlib.asynccontextmanager
async def running(root: Path, port: int = 0):
    """A relay serving ``root`` for the block; stopped (and drained) after it.
    Close stubs first: a graceful stop waits out idle keep-alive connections."""
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, root, port)
        try:
            yield server
        finally:
            server.stop()


class InThread:
    """A blocking ``RelayStub`` driven from trio: each call runs in a worker
    thread and is awaited, so one test body serves both flavours."""

    def __init__(self, stub: rc.RelayStub):
        self.stub = stub

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.stub, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await trio.to_thread.run_sync(functools.partial(method, *args, **kwargs))

        return call


@contextlib.asynccontextmanager
async def open_stub(flavour: str, url: str | None = None, **kwargs: Any):
    """A stub of ``flavour`` whose RPC methods are all awaitable."""
    if flavour == "async":
        async with rc.AsyncRelayStub(url, **kwargs) as stub:
            yield stub
    else:
        stub = rc.RelayStub(url, **kwargs)
        try:
            yield InThread(stub)
        finally:
            stub.close()


async def seed(stub: Any, session_id: str = "s1") -> None:
    """A pooled profile ``p1`` with one ready session."""
    await stub.register_profile(name="p1", provider="codex", mode="pooled")
    await stub.create_session(profile="p1", session_id=session_id)


async def lease_state(stub: Any, lease_id: str) -> str:
    (lease,) = [x for x in (await stub.list_leases()).leases if x.lease_id == lease_id]
    return lease.state


async def use_transport(stub: Any, transport: httpx2.BaseTransport | httpx2.AsyncBaseTransport) -> None:
    """Put ``transport`` under the stub's HTTP client (``stub._http``)."""
    if isinstance(stub, InThread):
        stub.stub._http.close()
        stub.stub._http = httpx2.Client(transport=transport)
    else:
        await stub._http.aclose()
        stub._http = httpx2.AsyncClient(transport=transport, timeout=None)


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


################################################################
# Import cost
################################################################


def test_import_leaves_the_heavy_stacks_unloaded():
    """Importing relay_client loads neither the server stack nor the HTTP or trio libraries."""
    heavy = ["quart", "hypercorn", "trio_websocket", "trio", "httpx2", "relay"]
    code = ("import json, sys, relay_client; "
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), check=True)
    assert json.loads(proc.stdout) == []


################################################################
# Every RPC through both stubs
################################################################


async def exercise_every_rpc(call: Any) -> None:
    """Call every RPC, in an order that gives each the state it needs."""
    reply = await call("RegisterProfile", name="p1", provider="codex", mode="pooled",
                       command=("codex", "app-server"))
    assert (reply.outcome, reply.profile.command) == ("registered", ("codex", "app-server"))
    reply = await call("CreateSession", profile="p1", session_id="s1")
    assert (reply.outcome, reply.session.state) == ("created", "ready")
    borrowed = await call("Borrow", holder="h1", profile="p1", ttl_seconds=60)
    assert (borrowed.outcome, borrowed.lease.session_id, borrowed.lease.fencing_token) == (
        "granted", "s1", 1)
    reply = await call("Release", lease_id=borrowed.lease.lease_id)
    assert reply.lease.state == "released"
    granted = await call("GrantLease", session_id="s1", holder="h2", mode="exclusive-write",
                         ttl_seconds=60)
    assert (granted.lease.state, granted.lease.fencing_token) == ("active", 2)
    reply = await call("RenewLease", lease_id=granted.lease.lease_id, ttl_seconds=120)
    assert (reply.outcome, reply.lease.ttl_seconds) == ("renewed", 120)
    reply = await call("ReleaseLease", lease_id=granted.lease.lease_id)
    assert reply.lease.state == "released"
    doomed = await call("GrantLease", session_id="s1", holder="h3", mode="shared-read")
    reply = await call("RevokeLease", lease_id=doomed.lease.lease_id, reason="tests")
    assert (reply.lease.state, reply.lease.revoke_reason) == ("revoked", "tests")
    reply = await call("RecordControl", request_id="ctl-1", session_id="s1", kind="interrupt",
                       payload={"why": "tests"})
    assert (reply.outcome, reply.control_request.payload) == ("recorded", {"why": "tests"})
    reply = await call("AppendEvent", session_id="s1", kind="prompt", data={"text": "hi"})
    assert (reply.record.seq, reply.record.data) == (1, {"text": "hi"})
    reply = await call("AppendResult", session_id="s1", kind="answer", data=[1, 2])
    assert (reply.record.seq, reply.record.data) == (1, [1, 2])
    reply = await call("QuarantineSession", session_id="s1", reason="flaky")
    assert (reply.outcome, reply.quarantine.state) == ("quarantined", "active")
    reply = await call("ClearQuarantine", session_id="s1")
    assert (reply.outcome, reply.quarantine.state) == ("cleared", "cleared")
    reply = await call("Recover")
    assert [x.session_id for x in reply.sessions] == ["s1"]
    reply = await call("GetStatus")
    assert (reply.status, reply.profiles, reply.sessions, reply.events, reply.results) == (
        "pass", 1, 1, 1, 1)
    assert reply.runtime.status == "serving"
    reply = await call("ListProfiles")
    assert [x.name for x in reply.profiles] == ["p1"]
    reply = await call("ListSessions", profile="p1")
    assert [x.session_id for x in reply.sessions] == ["s1"]
    reply = await call("ListLeases", session_id="s1")
    assert sorted(x.state for x in reply.leases) == ["released", "released", "revoked"]
    reply = await call("ListEvents", session_id="s1", after=0)
    assert [(x.seq, x.kind) for x in reply.records] == [(1, "prompt")]
    reply = await call("ListResults", session_id="s1", after=0, limit=10)
    assert (reply.last_seq, [x.data for x in reply.records]) == (1, [[1, 2]])
    assert (await call("ListTurns", session_id="s1")).turns == ()
    assert (await call("ListTasks")).tasks == ()
    reply = await call("CloseSession", session_id="s1", force=True, reason="the end")
    assert (reply.outcome, reply.session.state) == ("closed", "closed")


@pytest.mark.parametrize("style", ["message", "fields"])
async def test_every_rpc_returns_its_typed_reply(workspace, flavour, style):
    """Each entry of RPCS is a stub method taking a request message or its fields
    and returning the RPC's typed reply."""
    called: list[str] = []
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub(flavour, server.endpoint) as stub:

            async def call(name: str, /, **fields: Any) -> Any:
                rpc = rc.RPC_BY_NAME[name]
                method = getattr(stub, rpc.method)
                reply = await (method(rpc.request(**fields)) if style == "message"
                               else method(**fields))
                assert type(reply) is rpc.response
                called.append(name)
                return reply

            await exercise_every_rpc(call)
    # Starting, interrupting, approving or reading a turn needs a running provider:
    # tests/test_runtime.py calls each of them; the server streams: the watch tests.
    assert set(called) == {rpc.name for rpc in rc.RPCS if not rpc.streams} - relay.SERVER_RPCS - {"GetTurn"}


async def test_a_call_takes_a_message_or_fields_not_both():
    """Passing both a request message and fields, or the wrong message, is a TypeError."""
    url = f"http://127.0.0.1:{free_port()}"
    with rc.RelayStub(url) as stub:
        with pytest.raises(TypeError, match="not both"):
            stub.get_status(rc.GetStatusRequest(), extra=1)
        with pytest.raises(TypeError, match="needs a ReleaseLeaseRequest"):
            stub.release_lease(rc.GetStatusRequest())
    async with rc.AsyncRelayStub(url) as stub:
        with pytest.raises(TypeError, match="not both"):
            await stub.get_status(rc.GetStatusRequest(), extra=1)
        with pytest.raises(TypeError, match="needs a ReleaseLeaseRequest"):
            await stub.release_lease(rc.GetStatusRequest())
    for cls in (rc.RelayStub, rc.AsyncRelayStub):
        assert [rpc.method for rpc in rc.RPCS if not hasattr(cls, rpc.method)] == []


################################################################
# Errors
################################################################


async def test_each_refusal_raises_its_code_subclass(workspace, flavour):
    """A refusal arrives as the RelayError subclass of its Connect code, with
    the code, its HTTP status, the message and a hint."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub(flavour, server.endpoint) as stub:
            await seed(stub)
            lease = (await stub.borrow(holder="h1", profile="p1")).lease
            await stub.release_lease(lease_id=lease.lease_id)
            held = await stub.borrow(holder="h2", profile="p1")
            missing = rc.Rpc("NoSuchMethod", rc.GetStatusRequest, rc.StatusReply, kind=rc.READ,
                             cli=(), help="")
            cases = [
                (rc.NotFound, lambda: stub.create_session(profile="nope")),
                (rc.AlreadyExists, lambda: stub.create_session(profile="p1", session_id="s1")),
                (rc.FailedPrecondition, lambda: stub.release_lease(lease_id=lease.lease_id)),
                (rc.InvalidArgument, lambda: stub.create_session(profile="../etc")),
                (rc.ResourceExhausted, lambda: stub.borrow(holder="h3", profile="p1")),
                (rc.Unimplemented, lambda: stub._call(  # through the stub's own plumbing
                    missing, rc.GetStatusRequest(), *([None] if flavour == "sync" else []))),
            ]
            for cls, call in cases:
                with pytest.raises(cls) as caught:
                    await call()
                exc = caught.value
                assert isinstance(exc, rc.RelayError) and type(exc) is cls
                assert exc.code.http_status == cls.code.http_status
                assert exc.message
                assert cls is rc.Unimplemented or exc.hint
            assert await lease_state(stub, held.lease.lease_id) == "active"


async def test_unknown_method_over_raw_post_is_unimplemented(workspace):
    """A raw Connect POST to a method the relay lacks answers 501 unimplemented."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, httpx2.AsyncClient() as http:
            response = await http.post(f"{server.endpoint}/{rc.SERVICE}/NoSuchMethod", json={})
            assert response.status_code == 501
            exc = rc.RelayError.from_json(response.json(), http_status=response.status_code)
            assert type(exc) is rc.Unimplemented and "NoSuchMethod" in exc.message


class ZeroDeadline(httpx2.HTTPTransport):
    """Rewrites the deadline a request carries to 0 ms: the relay gives up at once."""

    sent = 0

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.sent += 1
        request.headers["Connect-Timeout-Ms"] = "0"
        return super().handle_request(request)


class AsyncZeroDeadline(httpx2.AsyncHTTPTransport):
    sent = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.sent += 1
        request.headers["Connect-Timeout-Ms"] = "0"
        return await super().handle_async_request(request)


async def test_relay_deadline_is_deadline_exceeded(workspace, flavour):
    """When the relay's share of the deadline runs out it answers 504, which
    the stub raises as DeadlineExceeded (and does not retry)."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub(flavour, server.endpoint) as stub:
            await seed(stub)
            transport = ZeroDeadline() if flavour == "sync" else AsyncZeroDeadline()
            await use_transport(stub, transport)
            with pytest.raises(rc.DeadlineExceeded):
                await stub.append_event(session_id="s1", kind="late")
            assert transport.sent == 1


@contextlib.contextmanager
def hung_relay():
    """A URL whose socket accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_sync_timeout_is_a_deadline(workspace):
    """The blocking stub's ``timeout=`` bounds the whole call, retries included:
    0 sends nothing, and against a relay that never answers every attempt gets
    only what is left of the one budget (socket timeout and Connect-Timeout-Ms)."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub("sync", server.endpoint) as stub:
            await seed(stub)
            before = (await stub.get_status()).revision
            with pytest.raises(rc.DeadlineExceeded):
                await stub.append_event(session_id="s1", kind="never", timeout=0)
            assert (await stub.get_status()).revision == before
        with hung_relay() as url:
            async with open_stub("sync", url) as stub:
                budgets: list[tuple[float, int]] = []
                post = stub.stub._http.post

                def recording_post(*args: Any, **kwargs: Any) -> Any:
                    budgets.append((kwargs["timeout"], int(kwargs["headers"]["Connect-Timeout-Ms"])))
                    return post(*args, **kwargs)

                stub.stub._http.post = recording_post
                with pytest.raises(rc.DeadlineExceeded):
                    await stub.get_status(timeout=0.2)
    assert budgets and all(0 < left <= 0.2 and 0 < ms <= 200 for left, ms in budgets), budgets
    assert [left for left, _ in budgets] == sorted((left for left, _ in budgets), reverse=True)


async def test_async_deadline_is_the_callers_cancel_scope(workspace):
    """The trio stub takes its deadline from the caller's scope (trio.TooSlowError
    under fail_after); a passed or cancelled one stops the call before it is sent."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, rc.AsyncRelayStub(server.endpoint) as stub:
            await seed(stub)
            before = (await stub.get_status()).revision
            with pytest.raises(trio.TooSlowError), trio.fail_after(0):
                await stub.append_event(session_id="s1", kind="never")
            with trio.CancelScope() as scope:
                scope.cancel()
                await stub.append_event(session_id="s1", kind="never")
            assert scope.cancelled_caught
            assert (await stub.get_status()).revision == before
        with hung_relay() as url:
            async with rc.AsyncRelayStub(url) as stub:
                with pytest.raises(trio.TooSlowError), trio.fail_after(0.2):
                    await stub.get_status()


async def test_unreachable_relay_is_unavailable(flavour):
    """Nothing listening: the stub retries, then raises Unavailable with a hint."""
    with trio.fail_after(LIMIT):
        async with open_stub(flavour, f"http://127.0.0.1:{free_port()}") as stub:
            with pytest.raises(rc.Unavailable) as caught:
                await stub.get_status()
    assert "relay serve" in caught.value.hint


def test_from_json_rebuilds_known_and_unknown_bodies():
    """Known codes become their subclass with hint and details; anything else is Unknown."""
    exc = rc.RelayError.from_json({"code": "not_found", "message": "no s9", "hint": "list them",
                                   "details": {"session": "s9"}}, http_status=404)
    assert (type(exc), exc.message, exc.hint, exc.details) == (
        rc.NotFound, "no s9", "list them", {"session": "s9"})
    assert exc.to_json() == {"code": "not_found", "message": "no s9", "hint": "list them"}
    for code, cls in rc._ERROR_BY_CODE.items():
        assert type(rc.RelayError.from_json({"code": code, "message": "m"})) is cls
    weird = rc.RelayError.from_json({"code": "gone_fishing", "message": "m", "hint": 3})
    assert (type(weird), weird.message, weird.hint) == (rc.Unknown, "m", "")
    for body in (None, [], "oops", {"code": 5}, {"message": "no code"}):
        exc = rc.RelayError.from_json(body, http_status=502)
        assert type(exc) is rc.Unknown and "HTTP 502" in exc.message


def test_non_connect_error_body_is_unknown():
    """A proxy's HTML error page reaches the caller as Unknown naming the HTTP status."""
    page = httpx2.MockTransport(lambda request: httpx2.Response(502, text="<html>bad gateway"))
    with rc.RelayStub("http://127.0.0.1:9") as stub:
        stub._http.close()
        stub._http = httpx2.Client(transport=page)
        with pytest.raises(rc.Unknown, match="HTTP 502"):
            stub.get_status()


################################################################
# Retries never apply twice
################################################################


class DropFirstAnswer(httpx2.HTTPTransport):
    """Forwards every request; the first answer is thrown away and ReadError
    raised, as if the connection dropped after the relay committed."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, Any]] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        self.sent.append(json.loads(request.content))
        if len(self.sent) == 1:
            response.read()
            response.close()
            raise httpx2.ReadError("connection dropped after the relay answered", request=request)
        return response


class AsyncDropFirstAnswer(httpx2.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        self.sent.append(json.loads(request.content))
        if len(self.sent) == 1:
            await response.aread()
            await response.aclose()
            raise httpx2.ReadError("connection dropped after the relay answered", request=request)
        return response


@pytest.mark.parametrize("method", ["append_event", "grant_lease"])
async def test_retry_after_a_dropped_answer_applies_once(workspace, flavour, method):
    """The retry of a committed mutation carries the same request id, gets the
    first answer back, and the ledger shows exactly one change."""
    fields = {"append_event": {"session_id": "s1", "kind": "once", "data": {"n": 1}},
              "grant_lease": {"session_id": "s1", "holder": "h1", "mode": "exclusive-write"}}
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub(flavour, server.endpoint) as stub:
            await seed(stub)
            before = (await stub.get_status()).revision
            transport = DropFirstAnswer() if flavour == "sync" else AsyncDropFirstAnswer()
            await use_transport(stub, transport)
            reply = await getattr(stub, method)(**fields[method])
            first, retry = transport.sent
            assert first == retry and first["request_id"]
            assert reply.revision == before + 1
            assert (await stub.get_status()).revision == before + 1
            if method == "append_event":
                assert (reply.outcome, reply.record.seq) == ("appended", 1)
                events = await stub.list_events(session_id="s1")
                assert [(x.seq, x.kind) for x in events.records] == [(1, "once")]
                again = await stub.append_event(**fields[method])  # a new logical call
                assert again.record.seq == 2
                assert transport.sent[-1]["request_id"] not in ("", first["request_id"])
            else:
                assert (reply.outcome, reply.lease.fencing_token) == ("granted", 1)
                leases = (await stub.list_leases(session_id="s1")).leases
                assert [x.lease_id for x in leases] == [reply.lease.lease_id]
                (session,) = (await stub.list_sessions()).sessions
                assert session.fencing_token == 1


################################################################
# Watching streams
################################################################


#: httpx2's async SSE iterator (EventSource.__aiter__ -> Response.aiter_text ->
#: aiter_bytes -> ... -> httpcore2's PoolByteStream.__aiter__) does not close
#: the async generators it nests, so when an async watch is left mid-stream
#: (the block ends, an error frame arrives) trio warns as each is garbage
#: collected.  The watch itself is no generator (no ``yield`` inside the
#: response's ``async with``) and closes the connection at once.  Ignored only
#: for httpx2's own generators, only where a watch is left early.
HTTPX2_SSE_GC = pytest.mark.filterwarnings(
    r"ignore:Async generator '(httpx2|httpcore2)\.:ResourceWarning")


def watch_in_thread(url: str, count: int, send: trio.MemorySendChannel) -> None:
    """The blocking flavour of a watcher: forward ``count`` records, then stop."""
    with rc.RelayStub(url) as stub, stub.watch_events(session="s1", after=0) as records:
        for record in records:
            trio.from_thread.run(send.send, record)
            count -= 1
            if not count:
                return


async def watch_in_task(url: str, send: trio.MemorySendChannel, scope: trio.CancelScope) -> None:
    with scope:
        async with rc.AsyncRelayStub(url) as stub, stub.watch_events(session="s1", after=0) as records:
            async for record in records:
                await send.send(record)


@pytest.mark.parametrize("stop", ["graceful", "crash"])
async def test_watch_events_resumes_across_a_restart(workspace, flavour, stop):
    """A watcher that loses its relay (stopped, or gone at once) reconnects to
    the next one on the same endpoint and yields every record exactly once, in
    order, including those committed while no relay was serving."""
    store = relay.Store(workspace)
    send, receive = trio.open_memory_channel(64)
    watching = trio.CancelScope()

    async def next_seqs(n: int) -> list[int]:
        return [(await receive.receive()).seq for _ in range(n)]

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as watchers:
            async with trio.open_nursery() as first:
                server = await start_server(first, workspace)
                # Writers close before each stop: an idle keep-alive connection
                # holds a graceful stop for seconds (see the report).
                async with rc.AsyncRelayStub(server.endpoint) as stub:
                    await seed(stub)
                    for n in range(3):
                        await stub.append_event(session_id="s1", kind="before", data=n)
                if flavour == "async":
                    watchers.start_soon(watch_in_task, server.endpoint, send, watching)
                else:
                    watchers.start_soon(functools.partial(
                        trio.to_thread.run_sync, watch_in_thread, server.endpoint, 7, send,
                        abandon_on_cancel=True))
                assert await next_seqs(3) == [1, 2, 3]
                if stop == "graceful":
                    server.stop()
                else:
                    first.cancel_scope.cancel()
            for _ in range(2):  # while no relay serves, the CLI path still commits
                await trio.to_thread.run_sync(functools.partial(
                    commit_ok, store, "AppendEvent", now=time.time(), session_id="s1", kind="offline"))
            async with running(workspace, port=urlsplit(server.endpoint).port) as second:
                assert second.endpoint == server.endpoint
                async with rc.AsyncRelayStub(second.endpoint) as stub:
                    await stub.append_event(session_id="s1", kind="after")
                    assert await next_seqs(3) == [4, 5, 6]
                    await stub.append_event(session_id="s1", kind="after")
                    assert await next_seqs(1) == [7]  # not a repeat of anything seen
                    records = (await stub.list_events(session_id="s1")).records
                assert [x.kind for x in records] == ["before"] * 3 + ["offline"] * 2 + ["after"] * 2
                watching.cancel()


@HTTPX2_SSE_GC
async def test_watch_of_a_missing_session_raises_not_found(workspace, flavour):
    """Resuming a watch on a session that does not exist raises NotFound."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server:
            if flavour == "async":
                async with rc.AsyncRelayStub(server.endpoint) as stub:
                    with pytest.raises(rc.NotFound):
                        async with stub.watch_events(session="nope", after=0) as records:
                            await anext(records)
            else:
                def watch() -> None:
                    with rc.RelayStub(server.endpoint) as stub, stub.watch_events(
                            session="nope", after=0) as records:
                        next(records)

                with pytest.raises(rc.NotFound):
                    await trio.to_thread.run_sync(watch)


@HTTPX2_SSE_GC
async def test_leaving_a_watch_closes_its_stream(workspace, flavour):
    """The iterator a watch hands out is closed when its block ends."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub(flavour, server.endpoint) as stub:
            await seed(stub)
            await stub.append_event(session_id="s1", kind="one")
            if flavour == "async":
                async with stub.watch_events(session="s1", after=0) as records:
                    assert (await anext(records)).seq == 1
                with pytest.raises(StopAsyncIteration):
                    await anext(records)
            else:
                def watch() -> None:
                    with stub.stub.watch_events(session="s1", after=0) as records:
                        assert next(records).seq == 1
                    with pytest.raises(StopIteration):
                        next(records)

                await trio.to_thread.run_sync(watch)


################################################################
# Borrowed leases
################################################################


class Boom(Exception):
    pass


async def test_borrowed_releases_on_normal_exit(workspace, flavour):
    """A borrowed block holds an active lease and gives it back when it ends."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub(flavour, server.endpoint) as stub:
            await seed(stub)
            if flavour == "async":
                async with stub.borrowed(holder="job", profile="p1", ttl_seconds=30) as lease:
                    assert await lease_state(stub, lease.lease_id) == "active"
            else:
                def job() -> rc.Lease:
                    with stub.stub.borrowed(holder="job", profile="p1", ttl_seconds=30) as lease:
                        assert stub.stub.list_leases().leases[0].state == "active"
                    return lease

                lease = await trio.to_thread.run_sync(job)
            assert (lease.holder, lease.session_id) == ("job", "s1")
            assert await lease_state(stub, lease.lease_id) == "released"


async def test_borrowed_releases_when_the_block_raises(workspace, flavour):
    """An exception leaves the block unwrapped, and the lease is released."""
    leases: list[rc.Lease] = []
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub(flavour, server.endpoint) as stub:
            await seed(stub)
            with pytest.raises(Boom):
                if flavour == "async":
                    async with stub.borrowed(holder="job", profile="p1") as lease:
                        leases.append(lease)
                        raise Boom
                else:
                    def job() -> None:
                        with stub.stub.borrowed(holder="job", profile="p1") as lease:
                            leases.append(lease)
                            raise Boom

                    await trio.to_thread.run_sync(job)
            assert await lease_state(stub, leases[0].lease_id) == "released"


async def test_async_borrowed_releases_when_cancelled(workspace):
    """Cancelling the block (an outer cancel scope) still releases the lease."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, rc.AsyncRelayStub(server.endpoint) as stub:
            await seed(stub)
            with trio.CancelScope() as scope:
                async with stub.borrowed(holder="job", profile="p1") as lease:
                    scope.cancel()
                    await trio.sleep_forever()
            assert scope.cancelled_caught
            assert await lease_state(stub, lease.lease_id) == "released"


async def test_async_borrowed_is_cancelled_with_lease_lost_when_revoked(workspace):
    """Revoking the lease underneath cancels the block and raises LeaseLost."""
    reached: list[str] = []
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, rc.AsyncRelayStub(server.endpoint) as stub:
            await seed(stub)
            with pytest.raises(rc.LeaseLost, match="revoked: operator") as caught:
                async with stub.borrowed(holder="job", profile="p1") as lease:
                    await stub.revoke_lease(lease_id=lease.lease_id, reason="operator")
                    await trio.sleep_forever()
                    reached.append("after")
            assert reached == []
            assert caught.value.code is rc.Code.FAILED_PRECONDITION and caught.value.hint
            assert await lease_state(stub, lease.lease_id) == "revoked"


async def test_sync_borrowed_is_told_its_lease_is_lost(workspace):
    """Revoking the lease underneath a blocking block sets ``lease.lost``;
    ``check()`` then raises LeaseLost, and so does the block's exit, though the
    block itself never raised."""
    borrowed = trio.Event()
    seen: list[Any] = []

    def job(stub: rc.RelayStub, token: trio.lowlevel.TrioToken) -> None:
        with stub.borrowed(holder="job", profile="p1") as lease:
            assert not lease.lost.is_set()
            lease.check()  # still held: no exception
            trio.from_thread.run_sync(borrowed.set, trio_token=token)
            seen.append(lease.lost.wait(LIMIT))
            with pytest.raises(rc.LeaseLost, match="revoked: operator"):
                lease.check()

    with trio.fail_after(LIMIT + 5):
        async with running(workspace) as server, rc.AsyncRelayStub(server.endpoint) as stub:
            await seed(stub)
            with rc.RelayStub(server.endpoint) as sync_stub:
                async with trio.open_nursery() as nursery:

                    async def run_job() -> None:
                        with pytest.raises(rc.LeaseLost, match="revoked: operator"):
                            await trio.to_thread.run_sync(
                                job, sync_stub, trio.lowlevel.current_trio_token())

                    nursery.start_soon(run_job)
                    await borrowed.wait()
                    (lease,) = (await stub.list_leases()).leases
                    await stub.revoke_lease(lease_id=lease.lease_id, reason="operator")
            assert seen == [True]
            assert await lease_state(stub, lease.lease_id) == "revoked"


async def test_borrowed_block_is_told_when_the_relay_goes_away(workspace, flavour):
    """If the relay dies mid-block, nothing renews the lease any more: the block
    is told (cancelled with LeaseLost in trio; ``lease.lost`` set in a blocking
    block, and LeaseLost raised at its exit)."""
    crash = trio.CancelScope()

    # task_status passes through to serve, which calls started().
    async def serve_until_crash(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:  # noqa: ASYNC128
        with crash:
            await relay.serve(relay.Store(workspace), relay.Config(), host="127.0.0.1", port=0,
                              task_status=task_status)

    def job(url: str, token: trio.lowlevel.TrioToken) -> None:
        with rc.RelayStub(url) as sync_stub, sync_stub.borrowed(holder="job", profile="p1") as lease:
            trio.from_thread.run_sync(borrowed.set, trio_token=token)
            assert lease.lost.wait(LIMIT)

    async def run_job(url: str) -> None:
        with pytest.raises(rc.LeaseLost, match="can no longer be renewed"):
            await trio.to_thread.run_sync(job, url, trio.lowlevel.current_trio_token())

    borrowed = trio.Event()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_until_crash)
            async with rc.AsyncRelayStub(server.endpoint) as stub:
                await seed(stub)
            if flavour == "async":
                async with rc.AsyncRelayStub(server.endpoint) as stub:
                    with pytest.raises(rc.LeaseLost, match="can no longer be renewed"):
                        async with stub.borrowed(holder="job", profile="p1"):
                            crash.cancel()
                            await trio.sleep_forever()
            else:
                nursery.start_soon(run_job, server.endpoint)
                await borrowed.wait()
                crash.cancel()
    gc.collect()  # a socket the keeper leaked would warn (an error) here


async def test_sync_borrowed_never_runs_the_block_unprotected(workspace, monkeypatch):
    """If the keep-alive channel cannot be opened, the block does not run, the
    caller gets Unavailable, and the lease is given back."""
    nowhere = f"ws://127.0.0.1:{free_port()}/ws"
    monkeypatch.setattr(rc._Core, "ws_url", lambda self: nowhere)
    ran: list[str] = []

    def job(stub: rc.RelayStub) -> None:
        with stub.borrowed(holder="job", profile="p1"):
            ran.append("block")

    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub("sync", server.endpoint) as stub:
            await seed(stub)
            with pytest.raises(rc.Unavailable, match="keep-alive channel"):
                await trio.to_thread.run_sync(job, stub.stub)
            assert ran == []
            (lease,) = (await stub.list_leases()).leases
            assert lease.state == "released"


async def wait_renewed_after_expiry(url: str, lease: rc.Lease) -> dict[str, Any]:
    """Wait on the relay feed (over the WebSocket) for a renewal of ``lease``
    stamped after its first expiry: a lease can only be renewed while live."""
    from trio_websocket import open_websocket_url

    async with open_websocket_url("ws" + url.removeprefix("http") + "/ws") as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "id": 1, "feed": "relay"}))
        while True:
            frame = json.loads(await ws.get_message())
            data = frame.get("data") or {}
            if (frame["type"] == "lease.renewed" and data["lease_id"] == lease.lease_id
                    and data["last_renewed_at"] > lease.expires_at):
                return data


async def test_a_held_lease_outlives_its_ttl(workspace):
    """While a blocking block runs, its keeper thread's WebSocket heartbeats keep
    a 1-second lease renewed well past its first expiry; it is released
    afterwards.  (Real time, end to end; the keeper's policy itself is tested on
    the autojump clock in test_health.py.)"""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, rc.AsyncRelayStub(server.endpoint) as stub:
            await seed(stub)
            proceed = threading.Event()
            ready = trio.Event()
            box: list[Any] = []

            def job(token: trio.lowlevel.TrioToken) -> None:
                with rc.RelayStub(server.endpoint) as sync_stub, sync_stub.borrowed(
                        holder="job", profile="p1", ttl_seconds=1) as lease:
                    box.append(lease)
                    trio.from_thread.run_sync(ready.set, trio_token=token)
                    assert proceed.wait(LIMIT)
                    box.append(sync_stub.list_leases(session_id="s1").leases[0].state)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(
                    trio.to_thread.run_sync, job, trio.lowlevel.current_trio_token(),
                    abandon_on_cancel=True))
                await ready.wait()
                await wait_renewed_after_expiry(server.endpoint, box[0])
                proceed.set()
            lease, state = box
            assert state == "active"
            assert await lease_state(stub, lease.lease_id) == "released"


################################################################
# Discovery and tokens
################################################################


def test_discovery_order_is_arguments_then_environment_then_ledger(workspace, monkeypatch, capsys):
    """Arguments beat RELAY_URL/RELAY_TOKEN, which beat the workspace ledger's endpoint."""
    assert relay.main(["--root", str(workspace), "bootstrap", "--endpoint",
                       "http://127.0.0.1:4567/"]) == 0
    capsys.readouterr()
    assert rc.discover(root=workspace) == ("http://127.0.0.1:4567", None)
    monkeypatch.setenv("FLOW_ROOT", str(workspace))
    assert rc.discover() == ("http://127.0.0.1:4567", None)
    monkeypatch.setenv("RELAY_URL", "http://127.0.0.1:2222")
    monkeypatch.setenv("RELAY_TOKEN", "env-secret")
    assert rc.discover(root=workspace) == ("http://127.0.0.1:2222", "env-secret")
    assert rc.discover("http://127.0.0.1:3333", "arg-secret", root=workspace) == (
        "http://127.0.0.1:3333", "arg-secret")
    assert rc.discover("http://127.0.0.1:3333") == ("http://127.0.0.1:3333", "env-secret")
    monkeypatch.delenv("RELAY_URL")
    monkeypatch.delenv("FLOW_ROOT")
    with pytest.raises(rc.Unavailable, match="no relay endpoint"):
        rc.discover(root=workspace / "elsewhere")


async def test_a_stub_finds_a_serving_relay_through_its_workspace(workspace, flavour):
    """``root=`` alone reaches the relay serving that workspace."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, open_stub(flavour, root=workspace) as stub:
            status = await stub.get_status()
            assert status.runtime.endpoint == server.endpoint


def test_repr_never_shows_the_token():
    """Neither stub's repr (nor its core's) contains the token."""
    for cls in (rc.RelayStub, rc.AsyncRelayStub):
        stub = cls("http://127.0.0.1:9", token="frt_sekrit")
        assert "frt_sekrit" not in repr(stub) + repr(stub._core)
        assert "127.0.0.1:9" in repr(stub)


@pytest.fixture
def token(workspace: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """A bearer token bound to the workspace's runtime; returns its secret."""
    root = ["--root", str(workspace)]
    assert relay.main([*root, "token", "create", "--label", "tests", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert relay.main([*root, "bootstrap", "--token-id", created["token"]["token_id"]]) == 0
    capsys.readouterr()
    return created["secret"]


async def test_a_bound_token_is_required(workspace, token, flavour):
    """With a token bound, calls, watches and borrowed blocks need it; with it
    they work (the keep-alive WebSocket sends it too)."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server:
            for wrong in (None, "frt_wrong"):
                async with open_stub(flavour, server.endpoint, token=wrong) as stub:
                    with pytest.raises(rc.Unauthenticated) as caught:
                        await stub.get_status()
                    assert token not in str(caught.value)
            async with rc.AsyncRelayStub(server.endpoint) as anonymous:
                with pytest.raises(rc.Unauthenticated):
                    async with anonymous.watch_events(session="s1", after=0) as records:
                        await anext(records)
            async with open_stub(flavour, server.endpoint, token=token) as stub:
                await seed(stub)
                if flavour == "async":
                    async with stub.borrowed(holder="job", profile="p1", ttl_seconds=30) as lease:
                        assert await lease_state(stub, lease.lease_id) == "active"
                else:
                    def job() -> rc.Lease:
                        with stub.stub.borrowed(holder="job", profile="p1") as lease:
                            return lease

                    lease = await trio.to_thread.run_sync(job)
                assert await lease_state(stub, lease.lease_id) == "released"


################################################################
# CLI
################################################################


async def run_client_cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await trio.run_process([sys.executable, "-m", "relay_client", *args], cwd=cwd,
                                  capture_stdout=True, capture_stderr=True, check=False,
                                  env=subprocess_env())
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def test_cli_exit_codes(workspace):
    """0 with the JSON reply, 1 with the error object when refused, 2 on usage errors."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server:
            url = ["--url", server.endpoint]
            code, out, _ = await run_client_cli(
                *url, "register_profile", "--name", "p1", "--provider", "codex", "--mode", "pooled",
                "--command", "codex app-server", cwd=workspace)
            assert code == 0
            reply = json.loads(out)
            assert (reply["outcome"], reply["profile"]["command"]) == ("registered", ["codex", "app-server"])
            code, out, _ = await run_client_cli(*url, "CreateSession", "--profile", "p1",
                                                "--session-id", "s1", cwd=workspace)
            assert (code, json.loads(out)["session"]["session_id"]) == (0, "s1")
            code, out, err = await run_client_cli(*url, "create_session", "--profile", "nope",
                                                  cwd=workspace)
            assert code == 1
            assert json.loads(out)["error"]["code"] == "not_found"
            assert "nope" in err
            for usage in (["create_session"], ["no_such_method"],
                          ["append_event", "--session-id", "s1", "--kind", "k", "--data", "{bad"]):
                code, out, err = await run_client_cli(*url, *usage, cwd=workspace)
                assert (code, out) == (2, ""), usage
                assert "usage" in err


async def test_cli_token_file_is_used_and_never_printed(workspace, token):
    """``--token-file`` authenticates; neither success nor refusal prints the token."""
    secret_file = workspace / "token"
    secret_file.write_text(token + "\n")
    with trio.fail_after(LIMIT):
        async with running(workspace) as server:
            code, out, err = await run_client_cli("--url", server.endpoint, "get_status",
                                                  cwd=workspace)
            assert (code, json.loads(out)["error"]["code"]) == (1, "unauthenticated")
            code, out, err2 = await run_client_cli("--url", server.endpoint, "--token-file",
                                                   str(secret_file), "get_status", cwd=workspace)
            assert (code, json.loads(out)["status"]) == (0, "pass")
            assert token not in out + err + err2


async def test_cli_watch_prints_json_lines(workspace):
    """``watch --session S --after N`` prints each later record as one JSON line, live ones too."""
    with trio.fail_after(LIMIT):
        async with running(workspace) as server, rc.AsyncRelayStub(server.endpoint) as stub:
            await seed(stub)
            for n in range(3):
                await stub.append_event(session_id="s1", kind="k", data=n)
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(functools.partial(
                    trio.run_process,
                    [sys.executable, "-m", "relay_client", "--url", server.endpoint,
                     "watch", "--session", "s1", "--after", "1"],
                    stdout=subprocess.PIPE, check=False, env=subprocess_env(), cwd=workspace))
                lines = []
                buffer = b""
                appended = False
                while len(lines) < 3:
                    chunk = await proc.stdout.receive_some()
                    assert chunk, "watch exited early"
                    buffer += chunk
                    *done, buffer = buffer.split(b"\n")
                    lines += [json.loads(x) for x in done]
                    if len(lines) == 2 and not appended:
                        await stub.append_event(session_id="s1", kind="live", data=3)
                        appended = True
                proc.kill()
            assert [(x["seq"], x["data"]) for x in lines] == [(2, 1), (3, 2), (4, 3)]
            assert lines[0]["session_id"] == "s1"


async def test_readme_automation_example_runs(workspace):
    """The README's automation example borrows, appends and watches against a real relay."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("## Automation", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    with trio.fail_after(LIMIT):
        async with running(workspace) as server:
            async with rc.AsyncRelayStub(server.endpoint) as stub:
                await stub.register_profile(name="codex-main", provider="codex", mode="pooled")
                await stub.create_session(profile="codex-main", session_id="ses-2")
            script = example.replace('"http://127.0.0.1:9876"', repr(server.endpoint))
            proc = await trio.run_process([sys.executable, "-c", script], cwd=workspace,
                                          capture_stdout=True, capture_stderr=True, check=False,
                                          env=subprocess_env())
            assert proc.returncode == 0, proc.stderr.decode()
            assert proc.stdout.decode().splitlines() == [
                "1 prompt {'text': 'fix the build'}",
                "2 prompt {'text': 'run the tests'}", "3 done None"]
