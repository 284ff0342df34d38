"""Issue 14's serving and start-up work: SSE fan-out by direct writes (live frames written by
the hub straight to each subscriber's socket as HTTP/1.1 chunks, the held backlog of a full
socket, the ASGI fallback), replay frames built from the log lines, and attrs classes built on
first use (relay_client's deferred ``attrs``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

import trio
import trio.testing

import relay
import relay_client as rc
from conftest import ROOT, T0, mutation
from serve_helpers import PATIENCE, serving

def _hub(r) -> relay.EventHub:
    return r.server.service.hub


async def _settled(r) -> relay.HubStatistics:
    """The hub's statistics once every task of this process (server and client) is blocked."""
    await trio.testing.wait_all_tasks_blocked()
    return _hub(r).statistics()


async def test_live_frames_go_straight_to_the_socket_as_chunks_a_strict_client_reads(workspace):
    """Once the replay is out, a plain HTTP/1.1 subscriber is written to by the hub itself
    (``direct`` counts it); h11 on the client side parses every frame, in order, with the ids a
    resume needs; closing the stream ends the direct subscription."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed(sessions=1)
            await r.ok("AppendEvent", session_id="s1", kind="before")
            base = (await _settled(r)).subscribers  # the runtime's own feed subscription
            async with r.sse({"session": "s1"}, Last_Event_ID="s1:0") as stream:
                (replayed,) = await stream.take(1)
                assert (await _settled(r)).direct == 1
                for n in range(3):
                    await r.ok("AppendEvent", session_id="s1", kind="live", data={"n": n, "t": "é"})
                live = await stream.take(3)
            stats = await _settled(r)
    assert (stats.subscribers, stats.direct) == (base, 0)
    assert replayed["id"] == "s1:1" and [e["id"] for e in live] == ["s1:2", "s1:3", "s1:4"]
    assert [e["data"]["data"] for e in live] == [{"n": n, "t": "é"} for n in range(3)]


async def test_a_full_socket_holds_frames_in_order_then_drops_and_resume_has_no_gap(workspace):
    """A subscriber that stops reading: the kernel takes what it can, the relay holds the rest in
    order (at most ``subscriber_buffer`` frames), then drops it with a resource_exhausted event
    (no id). Everything written before the error is whole and in order, and resuming from the last
    id delivers the rest exactly once."""
    config = relay.Config(subscriber_buffer=4)
    blob = "x" * 60_000
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            await r.seed(sessions=1)
            host, port = r.server.endpoint.removeprefix("http://").split(":")
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((host, int(port)))
            stream = trio.SocketStream(sock)
            async with stream:
                await stream.send_all(f"GET /events?session=s1 HTTP/1.1\r\nHost: {host}:{port}\r\n"
                                      "Accept: text/event-stream\r\n\r\n".encode())
                head = b""
                while b": connected\n\n\r\n" not in head:  # the head and the first chunk
                    head += await stream.receive_some(4096)
                assert (await _settled(r)).direct == 1
                sent = 0
                while _hub(r).statistics().dropped == 0:
                    sent += 1
                    assert sent < 2_000, "never fell behind"
                    await r.ok("AppendEvent", session_id="s1", kind="big", data=blob)
                raw = head.partition(b": connected\n\n\r\n")[2]
                while not raw.endswith(b"\r\n0\r\n\r\n"):  # the body's last chunk
                    raw += await stream.receive_some(1 << 20)
            events = _parse_sse(_dechunk(raw))
            got = events[:-1]
            assert events[-1]["event"] == "error" and "id" not in events[-1]
            assert events[-1]["data"]["code"] == "resource_exhausted"
            assert [e["id"] for e in got] == [f"s1:{n}" for n in range(1, len(got) + 1)]
            assert 0 < len(got) < sent
            async with r.sse({"session": "s1"}, Last_Event_ID=got[-1]["id"]) as resumed:
                rest = await resumed.take(sent - len(got))
    assert [e["id"] for e in rest] == [f"s1:{n}" for n in range(len(got) + 1, sent + 1)]


async def test_an_http_1_0_subscriber_keeps_the_asgi_path_and_gets_bursts_whole(workspace):
    """HTTP/1.0 has no chunked body, so its stream stays on ASGI (``direct`` is 0); a burst
    queued while it waits arrives in one piece, every frame once, in order."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed(sessions=1)
            host, port = r.server.endpoint.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(f"GET /events?session=s1 HTTP/1.0\r\nHost: {host}:{port}\r\n"
                                      "\r\n".encode())
                raw = b""
                while b": connected" not in raw:
                    raw += await stream.receive_some(65536)
                for n in range(5):
                    await r.ok("AppendEvent", session_id="s1", kind="k", data=n)
                while raw.count(b"\nid: ") < 5:
                    raw += await stream.receive_some(65536)
                direct = _hub(r).statistics().direct
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
    assert direct == 0
    assert [e["id"] for e in _parse_sse(body)] == [f"s1:{n}" for n in range(1, 6)]


async def test_a_subscriber_that_disconnects_is_dropped_and_the_others_keep_receiving(workspace):
    """A direct subscriber whose connection goes away is removed (its write fails or its task
    ends); the next frame still reaches every other subscriber."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed(sessions=1)
            base = (await _settled(r)).subscribers
            async with r.sse({"session": "s1"}) as keep:
                await keep.until_comment("connected")
                async with r.sse({"session": "s1"}) as gone:
                    await gone.until_comment("connected")
                    assert (await _settled(r)).direct == 2
                await r.ok("AppendEvent", session_id="s1", kind="k")
                (first,) = await keep.take(1)
                assert (await _settled(r)).subscribers == base + 1
                await r.ok("AppendEvent", session_id="s1", kind="k")
                (second,) = await keep.take(1)
    assert (first["id"], second["id"]) == ("s1:1", "s1:2")


def test_only_hypercorn_h11_chunked_get_responses_qualify_for_direct_writes():
    """``_h11_socket`` answers None for anything it cannot vouch for: no server send, a send
    that is not hypercorn's, HEAD, HTTP/1.0 or HTTP/2."""

    async def send(message):  # an ASGI server's send with no hypercorn behind it
        return None

    get = {"type": "http", "method": "GET", "http_version": "1.1"}
    assert relay._h11_socket(None, get) is None
    assert relay._h11_socket(send, get) is None
    for scope in ({**get, "method": "HEAD"}, {**get, "http_version": "1.0"}, {**get, "http_version": "2"}):
        assert relay._h11_socket(send, scope) is None


def test_a_frame_is_framed_once_as_the_chunk_h11_would_write():
    """``Frame.chunk`` is byte for byte what h11's chunked writer sends for ``Frame.sse``."""
    import h11

    frame = relay.Frame.make("s1:1", "event", {"k": "é", "n": 1}, 1)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    conn.send(h11.Response(status_code=200, headers=[]))
    assert conn.send(h11.Data(data=frame.sse)) == frame.chunk


def _log_with(root, records: list) -> relay.Store:
    """A store whose session s1 has these events, in one commit."""
    store = relay.Store(root)
    muts = [mutation("RegisterProfile", name="p", provider="codex", mode="pooled"),
            mutation("CreateSession", profile="p", session_id="s1")]
    muts += [mutation("AppendEvent", session_id="s1", kind="k", data=d) for d in records]
    config = relay.Config(max_record_bytes=2 * relay.REPLAY_BLOCK)  # a record longer than a block
    results, _ = relay.commit(store, muts, config, T0)
    assert not any(isinstance(x, relay.RelayError) for x in results), results
    return store


def _made(store: relay.Store, after: int, limit: int, committed: int = 0) -> list[relay.Frame]:
    committed = committed or store.read().cursors["s1"].events_bytes
    return [relay.Frame.make(f"s1:{r.seq}", "event", relay.to_json(r), r.seq)
            for r in store.read_records("s1", "events", committed, after, limit)]


def test_replay_frames_are_the_frames_make_builds_from_each_record(workspace):
    """Replay builds frames from the log lines themselves: every frame (SSE bytes, WebSocket text,
    data, id) equals what ``Frame.make`` makes from the decoded record, for ASCII and non-ASCII
    data, a record longer than a read block, and from any starting point; the offset it returns
    continues the range with no search."""
    data = [{"n": 1}, "é ✓", None, "x" * (relay.REPLAY_BLOCK + 100), [1.5, True], {"deep": [[]]}]
    data += list(range(40))
    store = _log_with(workspace, data)
    cursor = store.read().cursors["s1"]
    for after in (0, 1, 3, 4, 30, len(data) - 1):
        frames, _ = relay.replay_frames(store, "s1", "events", cursor.events_bytes, after, 1000)
        assert frames == _made(store, after, 1000)
    first, offset = relay.replay_frames(store, "s1", "events", cursor.events_bytes, 0, 7)
    rest, end = relay.replay_frames(store, "s1", "events", cursor.events_bytes, 7, 1000, offset)
    assert first + rest == _made(store, 0, 1000) and end == cursor.events_bytes
    assert relay.replay_frames(store, "s1", "events", 0, 0, 10) == ([], 0)


def test_a_record_written_before_a_field_existed_is_encoded_again(workspace):
    """A log line without a field the record has today (older writers) is not a frame's payload as
    it stands: the frame is encoded from the record, defaults included, as Frame.make does."""
    store = _log_with(workspace, ["a", "b"])
    path = store.stream_path("s1", "events")
    old = json.loads(path.read_bytes().split(b"\n")[0][9:])
    del old["appended_at"]
    body = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    line = b"%08x " % relay.zlib.crc32(body) + body + b"\n"
    second = path.read_bytes().split(b"\n", 1)[1]
    path.write_bytes(line + second)
    frames, _ = relay.replay_frames(store, "s1", "events", len(line + second), 0, 10)
    assert frames == _made(store, 0, 10, len(line + second))
    assert frames[0].data["appended_at"] == "" and b'"appended_at":""' in frames[0].sse


@pytest.mark.parametrize("damage", ["checksum", "torn", "not json", "bad type"])
def test_a_damaged_line_fails_the_replay_as_decode_record_does(workspace, damage):
    """Any line ``decode_record`` refuses makes ``replay_frames`` raise ValueError (the replay then
    ends with a data_loss event)."""
    store = _log_with(workspace, ["a", "b"])
    path = store.stream_path("s1", "events")
    first, second = path.read_bytes().split(b"\n", 1)

    def framed(body: bytes) -> bytes:
        return b"%08x " % relay.zlib.crc32(body) + body

    bad = {"checksum": b"0" * 8 + first[8:], "torn": first[:20],
           "not json": framed(b"{nope"), "bad type": framed(first[9:].replace(b'"seq":1', b'"seq":"1"'))}
    data = bad[damage] + b"\n" + second
    path.write_bytes(data)
    with pytest.raises(ValueError):
        relay.decode_record(bad[damage] + b"\n")
    with pytest.raises(ValueError):
        relay.replay_frames(store, "s1", "events", len(data), 0, 10)


def test_strict_loads_with_one_decoder_refuses_what_json_loads_refused():
    """``rc.strict_loads`` reuses its decoder: bytes and str alike, NaN/Infinity, out-of-range
    numbers and a BOM in text are refused with ValueError, and values (bytes with a BOM too) come
    back as json.loads gives them."""
    for text in ('{"a":[1,2.5,"é"]}', b'{"a":[1,2.5,"\xc3\xa9"]}', "[]", b"7", b"\xef\xbb\xbf{}"):
        assert rc.strict_loads(text) == json.loads(text)
    for bad in ("NaN", "[Infinity]", "1e400", "\ufeff{}", "{", b""):
        with pytest.raises(ValueError):
            rc.strict_loads(bad)


def _dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body -> its bytes; asserts every chunk is whole."""
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        assert rest[n:n + 2] == b"\r\n", "a chunk was cut or interleaved"
        out, body = out + rest[:n], rest[n + 2:]
    return out


def _parse_sse(body: bytes) -> list[dict]:
    events = []
    for block in body.decode().split("\n\n"):
        event = {}
        for line in block.split("\n"):
            if not line or line.startswith(":") or line.startswith("retry:"):
                continue
            field, _, value = line.partition(": ")
            event[field] = json.loads(value) if field == "data" else value
        if event:
            events.append(event)
    return events


# -- attrs classes built on first use -------------------------------------------------------------


def _deferred_classes():
    attrs = rc.attrs

    @attrs.frozen
    class Point:
        x: int
        y: int = 0
        tags: tuple = attrs.field(factory=tuple)

    @attrs.frozen(kw_only=True)
    class Named(Point):
        name: str = ""

        def __attrs_post_init__(self):
            if self.name == "bad":
                raise ValueError("bad name")

    @attrs.define(eq=False)
    class Box:
        items: list = attrs.Factory(list)

    return Point, Named, Box


def test_a_deferred_class_is_built_on_first_use_and_behaves_as_attrs_builds_it():
    """``rc.attrs.frozen`` / ``define`` leave the class waiting; its first instance, or the first
    look at its fields, builds it in place (the same class object), with attrs' __init__, repr,
    eq, hash, frozenness, evolve, inheritance, kw_only and post-init hooks."""
    import attrs as real

    Point, Named, Box = _deferred_classes()
    assert {Point, Named, Box} <= set(rc._UNBUILT)
    assert real.has(Point) and [f.name for f in real.fields(Point)] == ["x", "y", "tags"]
    assert Point not in rc._UNBUILT and Named in rc._UNBUILT
    p = Point(1)
    assert (p, repr(p), hash(p) == hash(Point(1))) == (Point(1, 0, ()), "Point(x=1, y=0, tags=())", True)
    with pytest.raises(real.exceptions.FrozenInstanceError):
        p.x = 2
    assert real.evolve(p, y=5) == Point(1, 5)
    n = Named(x=1, name="n")  # builds Named (its base is built already)
    assert isinstance(n, Point) and [f.name for f in real.fields(Named)] == ["x", "y", "tags", "name"]
    with pytest.raises(TypeError):
        Named(1, 0, (), "n")  # name is keyword-only
    with pytest.raises(ValueError):
        Named(x=1, name="bad")
    box = Box()
    box.items.append(1)
    assert box.items == [1] and Box() != Box() and type(Box()) is Box


def test_deferred_classes_build_once_when_threads_race():
    """Threads that use a waiting class at once all get working instances of one built class."""
    Point, _, _ = _deferred_classes()
    out, errors = [], []
    start = threading.Barrier(16)

    def use():
        start.wait()
        try:
            out.append(Point(1, 2))
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(16)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: mid-build too
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and out == [Point(1, 2)] * 16 and Point not in rc._UNBUILT


def test_every_message_and_model_class_builds():
    """``build_deferred`` (the server runs it before serving) builds every waiting class of
    relay and relay_client without error; afterwards none waits."""
    import attrs as real

    rc.build_deferred()
    classes = [c for m in (rc, relay) for c in vars(m).values() if isinstance(c, type) and real.has(c)]
    assert not rc._UNBUILT and len(classes) > 50
    assert all(real.fields(c) is not None for c in classes)


def test_a_cli_mutation_builds_few_classes_and_imports_no_server_stack(tmp_path):
    """One CLI mutation builds only the classes it touches (most stay waiting), imports neither
    logging nor the server stack, and still runs atexit hooks on its way out."""
    probe = (
        "import atexit, json, sys\n"
        "import relay, relay_client as rc\n"
        "atexit.register(lambda: sys.stderr.write('PROBE ' + json.dumps([len(rc._UNBUILT),"
        " sorted(m for m in ('logging', 'trio', 'quart', 'hypercorn') if m in sys.modules"
        " and type(sys.modules[m]).__name__ == 'module')]) + '\\n'))\n"
        "relay._exit_now(relay.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*args):
        return subprocess.run([sys.executable, "-c", probe, "--root", str(tmp_path), *args],
                              capture_output=True, text=True, env=env, check=False)

    assert run("profile", "register", "p", "--provider", "codex", "--mode", "pooled").returncode == 0
    assert run("session", "create", "--profile", "p", "--session-id", "s1").returncode == 0
    proc = run("event", "append", "--session", "s1", "--kind", "k", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["record"]["seq"] == 1
    waiting, loaded = json.loads(next(x for x in proc.stderr.splitlines()
                                      if x.startswith("PROBE "))[len("PROBE "):])
    assert waiting > 50 and loaded == []
