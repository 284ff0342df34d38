"""``/ws`` served in front of quart (issue 14): the frames, refusals and
close codes are those of quart's route, which the same conversation run with
the direct layer taken out (``relay._serve_ws_directly`` patched away) shows."""

from __future__ import annotations

import contextlib
import functools
import json
import re

import pytest
import trio
import trio_websocket
from quart.signals import websocket_received
from test_door import HANDSHAKE, _hostport, _raw
from test_serve import _bound_token

import relay
from serve_helpers import PATIENCE, FakeClock, open_ws, serving, ws_recv, ws_send, ws_until

GRANT = {"session_id": "s1", "holder": "h", "mode": "exclusive-write", "ttl_seconds": 600}


@contextlib.contextmanager
def _quart_frames(monkeypatch, direct: bool):
    """Serve ``/ws`` directly or through quart; yields a list counting the
    frames quart's receiver passed on (its ``websocket_received`` signal)."""
    if not direct:
        monkeypatch.setattr(relay, "_serve_ws_directly", lambda app, service: app)
    seen: list[object] = []

    async def count(message: object, **_: object) -> None:
        seen.append(message)

    websocket_received.connect(count)
    try:
        yield seen
    finally:
        websocket_received.disconnect(count)


def _normal(frames: list[dict], text: str) -> list[dict]:
    """The frames with each lease id replaced by its order of appearance."""
    ids: dict[str, str] = {}
    blob = json.dumps(frames, sort_keys=True)
    for found in re.findall(r'"lease_id": "([^"]+)"', blob):
        ids.setdefault(found, f"lease-{len(ids)}")
    for real, label in ids.items():
        blob = blob.replace(real, label)
    assert text in blob
    return json.loads(blob)


async def _conversation(root, monkeypatch, direct: bool) -> tuple[list[dict], int]:
    """Grant, release, errors, bad frames, a binary frame and a pipelined burst."""
    with _quart_frames(monkeypatch, direct) as seen, trio.fail_after(PATIENCE):
        async with serving(root, now=FakeClock()) as r:
            await r.seed()
            async with r.ws() as ws:
                await ws_send(ws, type="rpc", id=1, method="GrantLease", request=GRANT)
                frames = [await ws_recv(ws)]
                lease_id = frames[0]["reply"]["lease"]["lease_id"]
                await ws_send(ws, type="rpc", id=2, method="ReleaseLease", request={"lease_id": lease_id})
                frames.append(await ws_recv(ws))
                raw = ['{', '[1]', '{"type": "rpc", "id": [1]}',
                       json.dumps({"type": "rpc", "id": 3, "method": "ReleaseLease",
                                   "request": {"lease_id": "nope"}}),
                       json.dumps({"type": "rpc", "id": 4, "method": "GrantLease",
                                   "request": dict(GRANT, ttl_seconds="x")}),
                       json.dumps({"type": "rpc", "id": 5, "method": "NoSuch"}),
                       json.dumps({"type": "what", "id": 6}),
                       json.dumps({"type": "hold", "id": 7, "lease_id": "nope"}),
                       json.dumps({"type": "heartbeat", "id": 8})]
                for text in raw:
                    await ws.send_message(text)
                    frames.append(await ws_recv(ws))
                await ws.send_message(b'{"type": "heartbeat", "id": 9}')  # a binary frame
                frames.append(await ws_recv(ws))
                for i in range(10, 18):  # pipelined: one group commit's replies
                    await ws_send(ws, type="rpc", id=i, method="GrantLease",
                                  request=dict(GRANT, session_id="s1", mode="shared-read"))
                burst = [await ws_recv(ws) for _ in range(8)]
                frames += sorted(burst, key=lambda f: f["id"])
    return _normal(frames, '"type": "reply"'), len(seen)


async def test_direct_ws_answers_every_frame_as_quarts_route(tmp_path, monkeypatch):
    """Replies, errors, bad JSON and binary frames are the same frames either way; the
    direct layer passes none of them through quart."""
    direct, through_direct = await _conversation(tmp_path / "direct", monkeypatch, True)
    quart, through_quart = await _conversation(tmp_path / "quart", monkeypatch, False)
    assert direct == quart
    assert [f["type"] for f in direct[:2]] == ["reply", "reply"]
    assert {f["type"] for f in direct[2:11]} == {"error", "heartbeat"}
    assert (through_direct, through_quart) == (0, 20)


async def _handshakes(root, monkeypatch, direct: bool, secret: str) -> tuple[list, int, int]:
    with _quart_frames(monkeypatch, direct) as seen, trio.fail_after(PATIENCE):
        async with serving(root) as r:
            host = {"Host": _hostport(r)}
            refused = [await _raw(r, "GET", path, host | HANDSHAKE | extra) for path, extra in (
                ("/ws", {}), ("/ws", {"Authorization": "Bearer wrong"}),
                ("/ws", {"Authorization": f"Basic {secret}"}),
                ("/ws", {"Authorization": f"Bearer {secret}", "Origin": "http://evil.example"}),
                (f"/ws?token={secret}", {}))]
            served = []
            async with open_ws(r.server.endpoint, {"Authorization": f"Bearer {secret}"}) as ws:
                await ws_send(ws, type="heartbeat", id=1)
                served.append(await ws_recv(ws))
            through_bearer = len(seen)
    answers = [(x.status_code, x.headers.get("content-type"), x.headers.get("www-authenticate"),
                x.json()) for x in refused]
    return answers + served, through_bearer, len(refused)


async def test_direct_ws_refuses_and_accepts_upgrades_as_quart_does(tmp_path, monkeypatch):
    """With a bound token: no, a wrong or a non-Bearer credential, a foreign origin and a
    token in the URL get the same refusal either way; the bearer is served, directly."""
    _, secret = _bound_token(tmp_path)
    direct = await _handshakes(tmp_path, monkeypatch, True, secret)
    quart = await _handshakes(tmp_path, monkeypatch, False, secret)
    assert direct[0] == quart[0]
    assert [x[0] for x in direct[0][:5]] == [401, 401, 401, 403, 400]
    assert direct[0][5] == {"type": "heartbeat", "id": 1}
    assert (direct[1], quart[1]) == (0, 1)


async def _closed_by_stop(root, monkeypatch, direct: bool) -> tuple[int, str]:
    monkeypatch.setattr(relay, "GRACEFUL_SECONDS", 4 * PATIENCE)  # only an immediate close passes
    with _quart_frames(monkeypatch, direct), trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(
                relay.serve, relay.Store(root), relay.Config(), host="127.0.0.1", port=0))
            async with open_ws(server.endpoint) as ws:
                await ws_send(ws, type="heartbeat", id=1)
                await ws_recv(ws)
                server.stop()
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws_until(ws, lambda f: False)
    return closed.value.reason.code, closed.value.reason.reason


async def test_direct_ws_closes_on_shutdown_as_quart_does(tmp_path, monkeypatch):
    """server.stop() closes a direct connection at once with quart's close code."""
    direct = await _closed_by_stop(tmp_path / "direct", monkeypatch, True)
    quart = await _closed_by_stop(tmp_path / "quart", monkeypatch, False)
    assert direct == quart and direct[0] == 1000


async def test_a_client_that_leaves_releases_its_hold_on_the_direct_path(workspace, monkeypatch):
    """The client's going (``websocket.disconnect``) ends the direct connection and
    releases what it held with release_on_disconnect."""
    with _quart_frames(monkeypatch, True) as seen, trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            async with r.ws() as watcher, r.ws() as ws:
                await ws_send(watcher, type="subscribe", id="f", feed="relay")
                await ws_send(watcher, type="rpc", id="sync", method="GetStatus")
                await ws_until(watcher, lambda f: f.get("id") == "sync")  # subscribed by now
                await ws_send(ws, type="rpc", id=1, method="GrantLease", request=GRANT)
                lease_id = (await ws_recv(ws))["reply"]["lease"]["lease_id"]
                await ws_send(ws, type="hold", id=2, lease_id=lease_id, release_on_disconnect=True)
                assert (await ws_recv(ws))["type"] == "held"
                await ws.aclose()
                released = await ws_until(watcher, lambda f: f["type"] == "lease.released")
    assert released["data"]["lease_id"] == lease_id
    assert seen == []


def test_a_feed_notice_is_encoded_once_into_the_frame_frame_make_builds(monkeypatch):
    """The live frame of a notice is ``Frame.make``'s, byte for byte (a non-ASCII value
    included), from one JSON encoding of its data (the history's copy)."""
    data = {"lease_id": "L1", "holder": "h\u00e9 \u2603", "ttl_seconds": 60, "z": [1, None]}
    hub = relay.EventHub()
    live = hub.subscribe("relay")
    calls = []
    real = relay.json.dumps
    monkeypatch.setattr(relay.json, "dumps", lambda *a, **k: calls.append(a) or real(*a, **k))
    hub.notice(7, "lease.granted", data)
    monkeypatch.undo()
    frame, want = live.receive.receive_nowait(), relay.Frame.make("7.0", "lease.granted", data)
    assert (frame.id, frame.event, frame.data, frame.sse, frame.ws, frame.chunk, frame.seq) == (
        want.id, want.event, want.data, want.sse, want.ws, want.chunk, want.seq)
    assert len(calls) == 1
