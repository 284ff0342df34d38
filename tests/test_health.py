"""Code-health rules of issue 10: the error hierarchy, the public surface,
the clock seam, logging and the lease object of the sync client."""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import os
import signal
import subprocess
import sys
import types

import attrs
import pytest
import trio

import relay
import relay_client as rc
from conftest import ROOT, T0
from serve_helpers import PATIENCE, metric, serving, ws_send, ws_until


def test_every_status_code_has_its_own_documented_class():
    """Each Connect code maps to one RelayError subclass, written out with a docstring."""
    by_code = {cls.code: cls for cls in vars(rc).values()
               if isinstance(cls, type) and issubclass(cls, rc.RelayError)
               and cls not in (rc.RelayError, rc.LeaseLost)}
    assert set(by_code) == set(rc.Code)
    for code, cls in by_code.items():
        assert cls.__name__ == "".join(w.capitalize() for w in code.value.split("_")), cls
        assert cls.__doc__ and "\n" not in cls.__doc__.strip(), cls
        assert rc.RelayError.from_json({"code": code.value, "message": "m"}).__class__ is cls


def test_lease_lost_is_a_failed_precondition():
    """LeaseLost carries FAILED_PRECONDITION and callers can catch it as one."""
    assert issubclass(rc.LeaseLost, rc.FailedPrecondition)
    assert rc.LeaseLost().code is rc.Code.FAILED_PRECONDITION


def test_public_surface_is_declared():
    """Both modules list their public names in __all__, each one defined; relay_client
    (the generated-module part) exports every name without a leading underscore."""
    for module in (relay, rc):
        assert len(set(module.__all__)) == len(module.__all__)
        assert [n for n in module.__all__ if not hasattr(module, n)] == []
    public = {n for n, v in vars(rc).items() if not n.startswith("_")
              and not isinstance(v, types.ModuleType) and getattr(v, "__module__", rc.__name__)
              in (rc.__name__, "typing") and n not in ("annotations", "Any", "ClassVar", "Final")}
    assert public - set(rc.__all__) == set()


def test_task_status_defaults_do_not_load_trio():
    """Importing relay leaves trio unloaded although every startable task's
    ``task_status`` has a TASK_STATUS_IGNORED-like default that does nothing."""
    code = ("import sys, inspect, relay\n"
            "kind = type(sys.modules.get('trio')).__name__\n"
            "default = inspect.signature(relay.serve).parameters['task_status'].default\n"
            "print(kind, repr(default), default.started(object()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    assert out.split() == ["_LazyModule", "TASK_STATUS_IGNORED", "None"]


async def test_async_borrowed_release_is_bounded(workspace, monkeypatch):
    """A relay that never answers the release cannot hold a finished block
    forever: the shielded release gives up after its bound (the lease is left
    to expire)."""
    async def never_answers(self, **fields):
        await trio.sleep_forever()

    monkeypatch.setattr(rc, "_CLEANUP_SECONDS", 0.01, raising=False)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            async with rc.AsyncRelayStub(r.server.endpoint) as stub:
                monkeypatch.setattr(rc.AsyncRelayStub, "release_lease", never_answers)
                async with stub.borrowed(holder="job", profile="codex-main") as lease:
                    pass
            (still,) = (await r.ok("ListLeases"))["leases"]
    assert (still["lease_id"], still["state"]) == (lease.lease_id, "active")


async def test_release_on_disconnect_is_bounded(workspace, monkeypatch):
    """A release-on-disconnect whose commit never comes back does not keep the
    connection's handler (and so a graceful stop) waiting forever."""
    monkeypatch.setattr(relay, "CLEANUP_SECONDS", 0.01, raising=False)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            lease = (await r.ok("GrantLease", session_id=sid, holder="h", mode="exclusive-write",
                                ttl_seconds=600))["lease"]
            submit = relay.LedgerOwner.submit

            async def stuck_release(owner, mutation):
                if mutation.method == "ReleaseLease":
                    await trio.sleep_forever()
                return await submit(owner, mutation)

            monkeypatch.setattr(relay.LedgerOwner, "submit", stuck_release)
            async with r.ws() as ws:
                await ws_send(ws, type="hold", id=1, lease_id=lease["lease_id"],
                              release_on_disconnect=True)
                await ws_until(ws, lambda f: f["type"] == "held")
    assert relay.Store(workspace).read().leases[lease["lease_id"]].state == "active"


async def test_an_internal_error_is_logged_with_its_traceback_not_sent(workspace, monkeypatch, caplog):
    """An unexpected exception in a request is logged on relay.serve with its
    traceback; the caller gets `internal` with no traceback, and no record
    holds the bearer token the request carried."""
    def broken(self):
        raise RuntimeError("boom in the status projection")

    monkeypatch.setattr(relay.Service, "_status_doc", broken)
    caplog.set_level("INFO", logger="relay")
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            response = await r.client.get("/api/relay/status",
                                          headers={"Authorization": "Bearer tok-secret-123"})
    assert response.status_code == 500 and response.json()["code"] == "internal"
    assert "boom" not in response.text and "Traceback" not in response.text
    (record,) = [x for x in caplog.records if x.name == "relay.serve" and x.levelname == "ERROR"]
    assert record.exc_info and "boom in the status projection" in caplog.text
    assert "tok-secret-123" not in caplog.text


async def test_a_failed_commit_is_logged_on_relay_store(workspace, monkeypatch, caplog):
    """A bug in the commit answers `internal` and logs the traceback on relay.store."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            def broken(*args, **kwargs):
                raise RuntimeError("boom in commit")

            monkeypatch.setattr(relay, "commit", broken)
            await r.refused("RegisterProfile", "internal", name="p", provider="codex", mode="pooled")
            monkeypatch.undo()
            stats = r.server.service.owner.statistics()
    (record,) = [x for x in caplog.records if x.name == "relay.store"]
    assert record.levelname == "ERROR" and record.exc_info
    assert stats.failed_commits == 1


def test_log_level_setting_is_checked(workspace):
    """`[serve] log_level` takes debug/info/warning/error and refuses anything else."""
    flow = workspace / "flow"
    flow.mkdir()
    (flow / "relay.toml").write_text('[serve]\nlog_level = "debug"\n')
    assert relay.load_config(flow).log_level == "debug"
    (flow / "relay.toml").write_text('[serve]\nlog_level = "loud"\n')
    with pytest.raises(rc.InvalidArgument, match="log_level must be one of"):
        relay.load_config(flow)


async def test_serve_log_level_filters_the_server_log(workspace):
    """`serve --log-level warning` keeps the info line about a signal out of stderr;
    the default (info) writes it, as `relay: relay.serve INFO: ...`."""
    import sys



    async def serve_and_stop(*extra: str) -> str:
        argv = [sys.executable, "-m", "relay", "--root", str(workspace), "serve", "--port", "0",
                *extra]
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(functools.partial(
                trio.run_process, argv, stdout=-1, stderr=-1, check=False,
                env=dict(os.environ, PYTHONPATH=str(ROOT))))
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "serve exited before printing its endpoint"
                line += chunk
            proc.send_signal(signal.SIGTERM)
            err = b""
            while chunk := await proc.stderr.receive_some(65536):
                err += chunk
            await proc.wait()
        assert proc.returncode == 0, err
        return err.decode()

    with trio.fail_after(PATIENCE):
        quiet = await serve_and_stop("--log-level", "warning")
        chatty = await serve_and_stop()
    assert "finishing in-flight requests" not in quiet
    assert "relay: relay.serve INFO: SIGTERM: finishing in-flight requests" in chatty


async def test_statistics_are_frozen_snapshots_on_metrics(workspace):
    """The ledger owner's and the event hub's statistics() are frozen snapshots,
    and /metrics exposes their fields."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            async with r.sse({"feed": "relay"}) as feed:
                await feed.until_comment("connected")
                owner = r.server.service.owner.statistics()
                hub = r.server.service.hub.statistics()
                text = (await r.client.get("/metrics")).text
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        owner.commits = 0
    assert owner.commits >= 2 and owner.mutations >= 3 and owner.failed_commits == 0
    assert hub.subscribers >= 1 and hub.topics >= 1
    assert metric(text, "relay_owner_commits_total") == owner.commits
    assert metric(text, "relay_owner_revision") == owner.revision
    assert metric(text, "relay_hub_subscribers") == hub.subscribers


################################################################
# Lease keep-alive policy on trio's clock (autojump, no real time)
################################################################

#: Seconds of virtual time any one clocked test may take.
VIRTUAL_PATIENCE = 10_000


class WsPeer:
    """Both ends of ``Service.websocket`` as memory channels: frames in, frames out."""
    def __init__(self) -> None:
        self.to_server, self._server_in = trio.open_memory_channel(100)
        self._server_out, self.from_server = trio.open_memory_channel(100)

    async def send(self, **frame) -> None:
        await self.to_server.send(json.dumps(frame))

    async def until(self, predicate):
        async for text in self.from_server:
            frame = json.loads(text)
            if predicate(frame):
                return frame
        raise AssertionError("the server closed the socket")

    async def rpc(self, ident: str, method: str, **request):
        await self.send(type="rpc", id=ident, method=method, request=request)
        frame = await self.until(lambda f: f.get("id") == ident)
        assert frame["type"] == "reply", frame
        return frame["reply"]

    # What relay_client's keeper uses of a trio-websocket connection:
    async def send_message(self, text: str) -> None:
        await self.to_server.send(text)

    async def get_message(self) -> str:
        return await self.from_server.receive()


@contextlib.asynccontextmanager
async def on_the_trio_clock(root, monkeypatch):
    """A Service whose every clock is trio's: the ledger's wall time is
    ``T0 + trio.current_time()`` (one clock, so the autojump clock moves both),
    and worker-thread hops run inline (autojump cannot see threads).  Yields a
    WebSocket peer already connected to it (``peer.connect()`` opens another)."""
    async def inline(fn, *args, **kwargs):
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)

    def now() -> float:
        return T0 + trio.current_time()

    store, config, hub = relay.Store(root), relay.Config(), relay.EventHub()
    owner = relay.LedgerOwner(store, config, hub, now)
    service = relay.Service(store, config, owner, hub, now)
    async with trio.open_nursery() as nursery:

        def connect() -> WsPeer:
            peer = WsPeer()
            nursery.start_soon(service.websocket, peer._server_in.receive, peer._server_out.send)
            return peer

        peer = connect()
        peer.connect = connect
        await nursery.start(owner.run)
        await peer.rpc("p", "RegisterProfile", name="p", provider="codex", mode="pooled")
        await peer.rpc("s", "CreateSession", profile="p", session_id="s1")
        yield peer
        nursery.cancel_scope.cancel()


async def grant_and_hold(peer: WsPeer, ttl: int) -> tuple[dict, float]:
    """Grant an exclusive lease with ``ttl``, hold it, subscribe to the feed;
    the lease and the trio time of the hold."""

    lease = (await peer.rpc("g", "GrantLease", session_id="s1", holder="h", mode="exclusive-write",
                            ttl_seconds=ttl))["lease"]
    await peer.send(type="subscribe", id="f", feed="relay")
    await peer.rpc("sync", "GetStatus")  # the feed subscription is in place by now
    await peer.send(type="hold", id="h", lease_id=lease["lease_id"])
    await peer.until(lambda f: f["type"] == "held")
    return lease, trio.current_time()


async def test_heartbeats_keep_a_held_lease_renewed_far_past_its_ttl(workspace, monkeypatch,
                                                                     autojump_clock):
    """While heartbeats arrive (every ttl/4), the relay keeps renewing a held
    lease: ten ttls later it is still active, renewed within the last ttl/3."""
    ttl = 60
    with trio.fail_after(VIRTUAL_PATIENCE):
        async with on_the_trio_clock(workspace, monkeypatch) as peer:
            lease, held_at = await grant_and_hold(peer, ttl)
            while trio.current_time() < held_at + 10 * ttl:
                await trio.sleep(ttl / 4)
                await peer.send(type="heartbeat")
            (now_lease,) = (await peer.rpc("l", "ListLeases"))["leases"]
            now = T0 + trio.current_time()
    assert now_lease["state"] == "active"
    assert relay.parse_iso(now_lease["expires_at"]) > now
    assert now - relay.parse_iso(now_lease["last_renewed_at"]) <= ttl / 3 + 1
    assert now - relay.parse_iso(lease["expires_at"]) >= 9 * ttl


async def test_no_heartbeat_for_half_a_ttl_stops_renewal(workspace, monkeypatch, autojump_clock):
    """The contract's rule: a hold with no heartbeat for ttl/2 is no longer
    renewed and runs out -- every renewal falls within ttl/2 of the last
    heartbeat (here: the hold), and the holder then hears lease_lost, expired."""
    ttl = 60
    with trio.fail_after(VIRTUAL_PATIENCE):
        async with on_the_trio_clock(workspace, monkeypatch) as peer:
            lease, held_at = await grant_and_hold(peer, ttl)
            renewals = []
            frame = await peer.until(lambda f: f["type"] in ("lease.renewed", "lease_lost"))
            while frame["type"] == "lease.renewed":
                renewals.append(relay.parse_iso(frame["data"]["last_renewed_at"]) - T0)
                frame = await peer.until(lambda f: f["type"] in ("lease.renewed", "lease_lost"))
            lost_at = trio.current_time()
            (after,) = (await peer.rpc("l", "ListLeases"))["leases"]
    assert renewals and all(t - held_at <= ttl / 2 for t in renewals), (held_at, renewals)
    assert (frame["lease_id"], frame["state"]) == (lease["lease_id"], "expired")
    assert after["state"] == "expired"
    assert lost_at <= max(renewals) + ttl + ttl / 3 + 1  # ran out, not kept alive


@pytest.mark.parametrize("header", ["Bearer probe-secret", "Bearer x", "Bearer " + "y" * 300, None])
def test_the_probe_token_is_compared_as_digests(workspace, monkeypatch, header):
    """The gate's probe compares SHA-256 digests of equal length, so a presented
    token of any length costs the same comparison; only the right one passes."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    store, config, hub = relay.Store(workspace), relay.Config(), relay.EventHub()
    service = relay.Service(store, config, relay.LedgerOwner(store, config, hub), hub,
                            probe_token="probe-secret")
    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert service.authorized(header) is (header == "Bearer probe-secret")
    assert [(len(a), len(b)) for a, b in calls] == [(64, 64)]


def test_the_leak_check_sees_open_descriptors_and_children():
    """serve_helpers.no_leaks fails a block that leaves a descriptor open or a child unreaped."""
    from serve_helpers import no_leaks

    r, w = -1, -1
    with pytest.raises(AssertionError, match="file descriptors left open"), no_leaks():
        r, w = os.pipe()
    os.close(r)
    os.close(w)
    child = None
    try:
        with pytest.raises(AssertionError, match="child processes left behind"), no_leaks():
            child = subprocess.Popen(["true"])
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited: a zombie now
    finally:
        if child is not None:
            child.wait()


def test_readme_tour_runs_in_a_workspace_that_has_history(workspace):
    """The README's 60-second tour runs as written (every command exits 0),
    also where the relay has committed before, so no id in it is hard-coded."""
    from conftest import run_cli

    run_cli(workspace, "profile", "register", "older", "--provider", "codex", "--mode", "pooled")
    run_cli(workspace, "session", "create", "--profile", "older")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## A 60-second tour", 1)[1].split("\n\n", 2)[1]
    lines = [line[4:] for line in block.splitlines()]
    assert lines[0].startswith("alias relay=")
    script = "\n".join(["set -euo pipefail", f'relay() {{ "{sys.executable}" -m relay "$@"; }}',
                        *lines[1:]])
    proc = subprocess.run(["bash", "-c", script], cwd=workspace, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), FLOW_ROOT=str(workspace)))
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    ledger = relay.Store(workspace).read()
    assert ledger.sessions["ses-ci"].state == "failed"  # quarantined at the end of the tour
    assert {x.state for x in ledger.leases.values()} == {"released"}


async def test_the_client_keeper_holds_a_lease_on_the_trio_clock(workspace, monkeypatch,
                                                                 autojump_clock):
    """relay_client's keeper (the hold, then a heartbeat every ttl/4) keeps a
    lease renewed for ten ttls; once it stops, the lease runs out."""
    ttl = 60
    with trio.fail_after(VIRTUAL_PATIENCE):
        async with on_the_trio_clock(workspace, monkeypatch) as peer:

            @contextlib.asynccontextmanager
            async def over_memory(core):
                yield peer.connect()

            monkeypatch.setattr(rc, "_open_websocket", over_memory)
            granted = (await peer.rpc("g", "GrantLease", session_id="s1", holder="job",
                                      mode="exclusive-write", ttl_seconds=ttl))["lease"]
            lease, lost = rc.from_json(rc.Lease, granted), []
            with trio.CancelScope() as block:
                async with trio.open_nursery() as nursery:
                    await nursery.start(rc._hold_lease, rc._Core("http://relay"), lease, lost, block)
                    await trio.sleep(10 * ttl)
                    (held,) = (await peer.rpc("l1", "ListLeases"))["leases"]
                    nursery.cancel_scope.cancel()
            await trio.sleep(2 * ttl)
            (after,) = (await peer.rpc("l2", "ListLeases"))["leases"]
    assert lost == [] and not block.cancel_called
    assert held["state"] == "active"
    assert relay.parse_iso(held["expires_at"]) - relay.parse_iso(granted["expires_at"]) >= 9 * ttl
    assert after["state"] == "expired"
