"""Regression tests for defects found in review: each fails without its fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio

import relay
import relay_client as rc
from conftest import ROOT, T0, commit_ok
from serve_helpers import PATIENCE, cli_in_process, serving


def _lan_service(root) -> relay.Service:
    store, config = relay.Store(root), relay.Config()
    hub = relay.EventHub()
    owner = relay.LedgerOwner(store, config, hub)
    return relay.Service(store, config, owner, hub, serving_mode="trusted-lan")


async def test_trusted_lan_server_fails_closed_without_a_bound_token(tmp_path):
    """Off loopback, a ledger that lost its token binding (unbound, reset) locks everyone
    out instead of letting everyone in; on loopback no token means no auth."""
    service = _lan_service(tmp_path)
    assert service.owner.ledger.runtime.token_id == ""
    assert not service.authorized(None)
    assert not service.authorized("Bearer anything")
    service.serving_mode = "loopback"
    assert service.authorized(None)


def test_reset_moves_streams_aside_so_new_sessions_cannot_cut_old_logs(tmp_path):
    """state reset moves the stream logs with the damaged ledger: a fresh ledger's first
    session (which reuses the old id) starts a new log instead of truncating the old one."""
    commit_ok(relay.Store(tmp_path), "RegisterProfile", name="cx", provider="codex", mode="pooled")
    sid = commit_ok(relay.Store(tmp_path), "CreateSession", profile="cx").session.session_id
    for i in range(3):
        commit_ok(relay.Store(tmp_path), "AppendEvent", session_id=sid, kind="k", data=i)
    log = relay.Store(tmp_path).stream_path(sid, "events")
    old_log = log.read_bytes()
    ledger = tmp_path / relay.LEDGER_REL
    ledger.write_bytes(ledger.read_bytes()[:-5])
    assert relay.main(["--root", str(tmp_path), "state", "reset", "--owner", "relay", "--apply"]) == 0
    moved = list((tmp_path / "flow/state/relay/set-aside").glob(f"*/streams/{sid}/events.log"))
    assert [p.read_bytes() for p in moved] == [old_log]
    commit_ok(relay.Store(tmp_path), "RegisterProfile", name="cx", provider="codex", mode="pooled")
    again = commit_ok(relay.Store(tmp_path), "CreateSession", profile="cx").session.session_id
    assert again == sid  # the fresh ledger mints the same id...
    commit_ok(relay.Store(tmp_path), "AppendEvent", session_id=again, kind="k", data="new")
    assert moved[0].read_bytes() == old_log  # ...and the old history is untouched
    assert [r.data for r in relay.Store(tmp_path).scan_records(
        again, "events", relay.Store(tmp_path).read().cursors[again].events_bytes)] == ["new"]


def test_minted_session_ids_skip_ids_a_caller_chose():
    """A generated session id never collides with one a caller picked earlier."""
    ledger = relay.Ledger(profiles={"cx": rc.Profile("cx", "codex", "pooled")})
    ledger, _ = relay.create_session(ledger, rc.CreateSessionRequest("cx", "ses-7"), relay.Ctx(T0, 6))
    ledger, reply = relay.create_session(ledger, rc.CreateSessionRequest("cx"), relay.Ctx(T0, 7))
    assert reply.session.session_id == "ses-7-2"


@pytest.mark.parametrize("endpoint", ["http://[::1", "http://127.0.0.1:99999", "ftp://127.0.0.1"])
def test_bootstrap_refuses_malformed_endpoints(tmp_path, endpoint, capsys):
    """A malformed endpoint is invalid_argument, not an internal error, and writes nothing."""
    code = relay.main(["--root", str(tmp_path), "bootstrap", "--endpoint", endpoint, "--json"])
    assert code == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "invalid_argument"
    assert not (tmp_path / relay.LEDGER_REL).exists()


async def test_bad_connect_timeout_header_is_invalid_argument(workspace):
    """Connect-Timeout-Ms that is not plain digits (even a Unicode digit) is a 400, not a 500."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            for value in ("²", "-5", "soon"):
                response = await r.client.post(f"/{rc.SERVICE}/GetStatus", content=b"{}", headers={
                    "Content-Type": "application/json", "Connect-Timeout-Ms": value.encode("latin-1")
                    if value == "²" else value})
                assert response.status_code == 400, (value, response.text)
                assert response.json()["code"] == "invalid_argument"


async def test_idempotent_replay_is_not_announced_again(workspace):
    """A retried mutation (same request_id) that shares a group commit with a real change
    replays its reply without a second, out-of-order feed notice."""
    grant = rc.GrantLeaseRequest("s1", "h", "shared-read", request_id="retry-1")
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            service = r.server.service
            await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled")
            await r.ok("CreateSession", profile="cx", session_id="s1")
            async with r.sse({"feed": "relay"}) as feed:
                first = await service.call("GrantLease", grant)
                async with trio.open_nursery() as nursery:  # both queued before the owner runs
                    nursery.start_soon(service.call, "GrantLease", grant)
                    nursery.start_soon(service.call, "CreateSession", rc.CreateSessionRequest("cx", "s2"))
                await r.ok("ReleaseLease", lease_id=first.lease.lease_id)
                notices = await feed.take(2)
    assert [n["event"] for n in notices] == ["lease.granted", "lease.released"]


async def test_a_damaged_stream_log_does_not_take_the_server_down(workspace):
    """Another process's records that cannot be read are skipped with a log line; the
    server keeps committing and serving, and replaying that log ends with data_loss."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled")
            await r.ok("CreateSession", profile="cx", session_id="s1")
            await trio.to_thread.run_sync(cli_in_process, workspace, "event", "append",
                                          "--session", "s1", "--kind", "k")
            log = relay.Store(workspace).stream_path("s1", "events")
            data = bytearray(log.read_bytes())
            data[12] ^= 0x01  # inside the committed record's JSON: its CRC no longer matches
            log.write_bytes(bytes(data))
            reply = await r.ok("CreateSession", profile="cx", session_id="s2")  # absorbs s1's log
            assert reply["session"]["session_id"] == "s2"
            assert (await r.client.get("/health")).status_code == 200
            async with r.sse({"session": "s1"}, Last_Event_ID="s1:0") as stream:
                (event,) = await stream.take(1)
    assert event["event"] == "error" and event["data"]["code"] == "data_loss"


def test_serve_on_a_taken_port_is_one_line_not_a_traceback(tmp_path):
    """A port in use is refused with one clear line and exit 1."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "relay", "--root", str(tmp_path), "serve", "--port", str(port)],
            capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in proc.stderr
    assert "--port" in proc.stderr


async def test_borrowed_refuses_a_lease_that_is_only_waiting(workspace):
    """borrowed() never runs its block on a waiting (ungranted) writer lease: it withdraws
    the request and raises FailedPrecondition, and the readers keep the session."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled")
            await r.ok("CreateSession", profile="cx", session_id="s1")
            await r.ok("GrantLease", session_id="s1", holder="reader", mode="shared-read")
            ran = []
            async with rc.AsyncRelayStub(r.server.endpoint) as stub:
                with pytest.raises(rc.FailedPrecondition, match="waiting"):
                    async with stub.borrowed(session_id="s1", holder="writer"):
                        ran.append(True)
                leases = (await stub.list_leases(session_id="s1")).leases
    assert ran == []
    assert sorted((x.holder, x.state) for x in leases) == [("reader", "active"), ("writer", "released")]
