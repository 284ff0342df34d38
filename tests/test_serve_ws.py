"""End-to-end tests of the relay's WebSocket channel (``/ws``).

Frames are JSON text: ``rpc`` -> ``reply``/``error`` matched by ``id``;
``subscribe`` -> stream frames with SSE's ids; ``hold`` + ``heartbeat`` keep a
lease renewed.  The ledger's clock is a ``FakeClock`` wherever leases must
expire; the server's timers run on the real clock, and the tests wait on
frames, never on sleeps.
"""

from __future__ import annotations

import functools
import json

import pytest
import trio
import trio_websocket

import relay
from serve_helpers import PATIENCE, FakeClock, open_ws, serving, ws_recv, ws_send, ws_until

FAST = relay.Config(reaper_interval_seconds=0.01, watch_interval_seconds=0.01)
LEASE_CHANGES = ("lease.renewed", "lease.expired", "lease.revoked", "lease.released", "lease_lost")


async def test_pipelined_rpcs_are_answered_by_id(workspace):
    """Many RPCs in flight on one socket each get exactly one reply or error carrying their id."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            async with r.ws() as ws:
                for i in range(120):
                    if i % 3 == 0:
                        await ws_send(ws, type="rpc", id=i, method="AppendEvent",
                                      request={"session_id": sid, "kind": "k", "data": i})
                    elif i % 3 == 1:
                        await ws_send(ws, type="rpc", id=i, method="ListLeases", request={})
                    else:
                        await ws_send(ws, type="rpc", id=i, method="GrantLease",
                                      request={"session_id": "ghost", "holder": "h", "mode": "shared-read"})
                await ws_send(ws, type="rpc", id="text-id", method="Frobnicate", request={})
                frames = [await ws_recv(ws) for _ in range(121)]
    by_id = {f["id"]: f for f in frames}
    assert len(by_id) == 121
    appended = sorted(by_id[i]["reply"]["record"]["seq"] for i in range(0, 120, 3))
    assert appended == list(range(1, 41))
    assert all(by_id[i]["type"] == "reply" and "leases" in by_id[i]["reply"] for i in range(1, 120, 3))
    assert {by_id[i]["error"]["code"] for i in range(2, 120, 3)} == {"not_found"}
    assert by_id["text-id"]["type"] == "error"
    assert by_id["text-id"]["error"]["code"] == "unimplemented"


async def test_bad_frames_get_error_frames_and_the_socket_lives_on(workspace):
    """Unparsable, non-object, unknown and invalid frames each get an error frame; the socket lives on."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            async with r.ws() as ws:
                unparsable = ("not json", "[1, 2]", "[" * 100_000, '{"type": "rpc", "id": 1, "x": NaN}',
                              '{"type": "rpc", "id": 1, "method": "AppendEvent", "request": '
                              '{"session_id": "s1", "kind": "k", "data": "\\ud800"}}')
                for text in unparsable:
                    await ws.send_message(text)
                    frame = await ws_recv(ws)
                    assert (frame["type"], frame["error"]["code"]) == ("error", "invalid_argument"), text
                bad = [
                    {"type": "dance", "id": 2},
                    {"type": "rpc", "id": 3, "method": "GetStatus", "request": "all"},
                    {"type": "rpc", "id": 4, "method": "CreateSession", "request": {"profile": 7}},
                    {"type": "hold", "id": 6, "lease_id": "lease-404"},
                ]
                for frame in bad:
                    await ws_send(ws, **frame)
                    answer = await ws_recv(ws)
                    assert (answer["type"], answer["id"]) == ("error", frame["id"]), answer
                for session in ("../etc", "a b"):
                    await ws_send(ws, type="subscribe", session=session)
                    answer = await ws_recv(ws)
                    assert (answer["type"], answer["data"]["code"]) == ("error", "invalid_argument")
                await ws_send(ws, type="rpc", id=99, method="GetStatus", request={})
                alive = await ws_recv(ws)
    assert (alive["type"], alive["id"], alive["reply"]["status"]) == ("reply", 99, "pass")


async def test_subscribe_resumes_after_an_id_then_streams_live(workspace):
    """Subscribing after S:1 replays S:2.. then live records; a relay feed subscription sees notices."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            for i in range(1, 4):
                await r.ok("AppendEvent", session_id=sid, kind="k", data=i)
            async with r.ws() as ws:
                await ws_send(ws, type="subscribe", session=sid, stream="events",
                              last_event_id=f"{sid}:1")
                replayed = [await ws_recv(ws) for _ in range(2)]
                await r.ok("AppendEvent", session_id=sid, kind="k", data=4)
                live = await ws_recv(ws)
                await ws_send(ws, type="subscribe", feed="relay")
                await ws_send(ws, type="rpc", id="sync", method="GetStatus", request={})
                await ws_until(ws, lambda f: f.get("id") == "sync")  # the feed is subscribed by now
                granted = await r.ok("GrantLease", session_id=sid, holder="h", mode="shared-read")
                notice = await ws_until(ws, lambda f: f["type"].startswith("lease."))
                await ws_send(ws, type="subscribe", session=sid, last_event_id=f"{sid}:9")
                ahead = await ws_until(ws, lambda f: f["type"] == "error")
    assert [(f["type"], f["id"], f["data"]["data"]) for f in replayed + [live]] == [
        ("event", f"{sid}:2", 2), ("event", f"{sid}:3", 3), ("event", f"{sid}:4", 4)]
    assert (notice["type"], notice["data"]["lease_id"]) == ("lease.granted", granted["lease"]["lease_id"])
    assert notice["id"] == f"{granted['revision']}.0"
    assert ahead["data"]["code"] == "out_of_range"


async def test_holder_hears_lease_lost_when_revoked_or_expired(workspace):
    """A held lease revoked underneath, or let expire without heartbeats, is reported as lease_lost."""
    clock = FakeClock()
    with trio.fail_after(PATIENCE):
        async with serving(workspace, FAST, now=clock) as r:
            s1, s2 = await r.seed(sessions=2)
            revoked = (await r.ok("GrantLease", session_id=s1, holder="h", mode="exclusive-write",
                                  ttl_seconds=600))["lease"]
            lapsing = (await r.ok("GrantLease", session_id=s2, holder="h", mode="exclusive-write",
                                  ttl_seconds=60))["lease"]
            async with r.ws() as ws:
                for lease in (revoked, lapsing):
                    await ws_send(ws, type="hold", id=lease["lease_id"], lease_id=lease["lease_id"])
                    await ws_until(ws, lambda f: f["type"] == "held")
                await r.ok("RevokeLease", lease_id=revoked["lease_id"], reason="operator says so")
                lost_revoked = await ws_until(ws, lambda f: f["type"] == "lease_lost")
                clock.advance(61)
                lost_lapsed = await ws_until(ws, lambda f: f["type"] == "lease_lost")
                await ws_send(ws, type="rpc", id="alive", method="GetStatus", request={})
                await ws_until(ws, lambda f: f.get("id") == "alive")
    assert lost_revoked == {"type": "lease_lost", "lease_id": revoked["lease_id"], "state": "revoked",
                            "reason": "operator says so"}
    assert (lost_lapsed["lease_id"], lost_lapsed["state"]) == (lapsing["lease_id"], "expired")


async def test_heartbeat_frames_are_acknowledged(workspace):
    """A heartbeat frame is echoed with its id, held lease or not."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            async with r.ws() as ws:
                await ws.send_message(json.dumps({"type": "heartbeat", "id": 7}))
                assert await ws_recv(ws) == {"type": "heartbeat", "id": 7}


async def test_stop_closes_sockets_cleanly_and_releases_what_they_asked(workspace, monkeypatch):
    """server.stop() closes sockets at once, cleanly, releasing holds marked
    release_on_disconnect: with hypercorn's graceful timeout longer than the
    test's patience, only an immediate close can pass."""
    monkeypatch.setattr(relay, "GRACEFUL_SECONDS", 4 * PATIENCE)
    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(
                relay.serve, relay.Store(workspace), FAST, host="127.0.0.1", port=0))
            async with open_ws(server.endpoint) as ws:
                await ws_send(ws, type="rpc", id=1, method="RegisterProfile",
                              request={"name": "p", "provider": "codex", "mode": "pooled"})
                await ws_send(ws, type="rpc", id=2, method="CreateSession",
                              request={"profile": "p", "session_id": "s1"})
                await ws_send(ws, type="rpc", id=3, method="GrantLease", request={
                    "session_id": "s1", "holder": "h", "mode": "exclusive-write", "ttl_seconds": 600})
                lease = (await ws_until(ws, lambda f: f.get("id") == 3))["reply"]["lease"]
                await ws_send(ws, type="hold", id=4, lease_id=lease["lease_id"], release_on_disconnect=True)
                await ws_until(ws, lambda f: f["type"] == "held")
                server.stop()
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws_until(ws, lambda f: False)
            # serve() has returned once the nursery exits
    assert closed.value.reason.code == 1000
    ledger = relay.Store(workspace).read()
    assert (ledger.runtime.status, ledger.leases[lease["lease_id"]].state) == ("stopped", "released")
