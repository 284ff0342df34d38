"""Issue 14: the hub's one-loop fan-out (``FanOut``): direct SSE subscribers whose sockets took
every byte so far are written to by ``EventHub.publish`` in one loop over their sockets; one whose
socket is full falls back to holding frames, in order, without delaying the others, and rejoins
once it has caught up; a connection that goes away (reset, closed, closed mid-frame) is removed.

These drive ``_DirectSse`` over real loopback TCP connections, with no HTTP server: the sink
writes HTTP/1.1 chunks, which the tests decode."""

from __future__ import annotations

import json
import socket

import pytest

import trio
import trio.testing

import relay

TOPIC = "events:s1"
_OPEN: list[trio.socket.SocketType] = []


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _OPEN:  # after the test's trio run: no task can be waiting on them
        _OPEN.pop()._sock.close()


async def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """(server side, client side) of one loopback TCP connection, both trio sockets."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    _OPEN.extend((server, client))
    return server, client


def _frame(seq: int, size: int = 10) -> relay.Frame:
    return relay.Frame.make(f"s1:{seq}", "event", {"session_id": "s1", "seq": seq, "pad": "x" * size}, seq)


class Client:
    """The reading end of one subscription: bytes in, decoded SSE events out."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock, self.raw = sock, b""
        self.ended = trio.Event()  # the relay side's task has returned

    async def read_until(self, done) -> list[dict]:
        with trio.fail_after(10):
            while not done(events := _events(self.raw)):
                data = await self.sock.recv(1 << 20)
                assert data, f"connection closed after {events}"
                self.raw += data
        return events


def _events(raw: bytes) -> list[dict]:
    """Whole chunks of ``raw`` (asserting none is cut or interleaved) -> their SSE events."""
    body = b""
    while b"\r\n" in raw:
        size, _, rest = raw.partition(b"\r\n")
        n = int(size, 16)
        if len(rest) < n + 2:
            break
        assert rest[n:n + 2] == b"\r\n", "a chunk was cut or interleaved"
        body, raw = body + rest[:n], rest[n + 2:]
    out = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            out.append({**fields, "data": json.loads(fields["data"])} if "data" in fields else fields)
    return out


def _ids(events: list[dict]) -> list[str]:
    return [e["id"] for e in events if "id" in e]


async def _attach(nursery, hub: relay.EventHub, last: dict | None = None, keepalive: float = 3600,
                  rcvbuf: int = 0) -> tuple[relay.Subscriber, relay._DirectSse, Client]:
    """A direct subscriber of TOPIC on a fresh connection, its task running."""
    server, client = await _pair()
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    return _attach_now(nursery, hub, server, client, last, keepalive)


def _attach_now(nursery, hub, server, client, last=None, keepalive=3600.0):
    """``_attach`` on a connection at hand, with no checkpoint (as ``_sse_body`` runs it)."""
    sub = hub.subscribe(TOPIC)
    sink = relay._DirectSse.attach(sub, server, hub, last or {}, hub.buffer)

    reader = Client(client)

    async def body() -> None:
        try:
            await sink.run(keepalive)
        finally:
            hub.unsubscribe(sub)
            reader.ended.set()

    nursery.start_soon(body)
    return sub, sink, reader


def _fast(hub: relay.EventHub) -> set[relay.Subscriber]:
    fast = hub._fast.get(TOPIC)
    return set(fast.members.values()) if fast is not None else set()


async def test_a_full_socket_holds_its_frames_in_order_while_the_others_get_theirs_at_once():
    """One subscriber stops reading: its socket fills, it leaves the hub's loop and holds the
    rest, in order; the other keeps getting every frame as it is published (it has all of them
    before the stalled one reads a byte). Once the stalled one reads, it gets every frame whole
    and in order, and rejoins the loop."""
    hub = relay.EventHub(buffer=256)
    async with trio.open_nursery() as nursery:
        stalled, stalled_sink, slow = await _attach(nursery, hub, rcvbuf=4096)
        other, _, quick = await _attach(nursery, hub)
        assert _fast(hub) == {stalled, other}
        n = 0
        while stalled in _fast(hub):  # until its socket refuses part of a frame
            n += 1
            assert n < 500, "the socket never filled"
            hub.publish(TOPIC, _frame(n, 20_000))
            await trio.testing.wait_all_tasks_blocked()
        for _ in range(5):  # more frames while it holds a backlog: queued behind it
            n += 1
            hub.publish(TOPIC, _frame(n, 20_000))
            await trio.testing.wait_all_tasks_blocked()
        assert stalled_sink.pending and _fast(hub) == {other}
        got = await quick.read_until(lambda ev: len(ev) == n)
        assert _ids(got) == [f"s1:{i}" for i in range(1, n + 1)]
        late = await slow.read_until(lambda ev: len(ev) == n)
        assert _ids(late) == [f"s1:{i}" for i in range(1, n + 1)]
        assert [e["data"]["seq"] for e in late] == list(range(1, n + 1))
        await trio.testing.wait_all_tasks_blocked()
        assert _fast(hub) == {stalled, other} and not stalled_sink.pending
        hub.publish(TOPIC, _frame(n + 1))
        for client in (slow, quick):
            assert _ids(await client.read_until(lambda ev: len(ev) == n + 1))[-1] == f"s1:{n + 1}"
        hub.close()
    assert hub.statistics().subscribers == 0 and not hub._fast


async def test_a_subscriber_that_disconnects_mid_frame_is_removed_and_the_others_keep_receiving():
    """A stalled subscriber holding the rest of a frame whose client goes away: its task finds
    the connection gone and ends, the hub no longer has it, and the next frame reaches the other."""
    hub = relay.EventHub(buffer=256)
    async with trio.open_nursery() as nursery:
        stalled, sink, slow = await _attach(nursery, hub, rcvbuf=4096)
        other, _, quick = await _attach(nursery, hub)
        n = 0
        while not sink.pending:
            n += 1
            assert n < 500, "the socket never filled"
            hub.publish(TOPIC, _frame(n, 20_000))
            await trio.testing.wait_all_tasks_blocked()
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        slow.sock.close()  # unread data and linger 0: a reset
        with trio.fail_after(10):
            await slow.ended.wait()  # its flush met the reset
        assert sink.broken and stalled not in _fast(hub) and stalled.wire is None
        hub.publish(TOPIC, _frame(n + 1))
        assert _ids(await quick.read_until(lambda ev: len(ev) == n + 1))[-1] == f"s1:{n + 1}"
        assert hub.statistics().subscribers == 1 and _fast(hub) == {other}
        hub.close()


async def test_a_reset_connection_leaves_the_loop_at_its_next_frame():
    """A subscriber in the hub's loop whose client resets the connection: the next publish's
    write fails, it is removed at once, and that frame still reaches the other subscriber."""
    hub = relay.EventHub(buffer=256)
    async with trio.open_nursery() as nursery:
        gone, sink, client = await _attach(nursery, hub)
        _, _, quick = await _attach(nursery, hub)
        hub.publish(TOPIC, _frame(1))
        await client.read_until(lambda ev: len(ev) == 1)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await client.sock.send(b"x")  # unread by the relay: the close resets
        client.sock.close()  # on loopback the reset has arrived when close returns
        hub.publish(TOPIC, _frame(2))
        hub.publish(TOPIC, _frame(3))  # were the first write to succeed, the second fails
        assert gone not in _fast(hub) and sink.broken and hub.statistics().subscribers == 1
        assert _ids(await quick.read_until(lambda ev: len(ev) == 3)) == ["s1:1", "s1:2", "s1:3"]
        hub.close()


async def test_a_socket_closed_under_the_hub_is_never_written_through_a_reused_descriptor():
    """The server closes a subscriber's socket (as hypercorn does when a connection ends) and a
    new connection takes the same descriptor number before the subscriber's task has run: the
    hub's write fails on the closed socket object and removes it; the new connection gets nothing."""
    hub = relay.EventHub(buffer=256)
    async with trio.open_nursery() as nursery:
        sub, sink, _ = await _attach(nursery, hub)
        fd = sink.sock.fileno()
        sink.sock.close()
        newcomer, peer = await _pair()
        assert fd in (newcomer.fileno(), peer.fileno())  # the number was reused
        hub.publish(TOPIC, _frame(1))
        assert sub.wire is None and hub.statistics().subscribers == 0
        for end in (newcomer, peer):  # a loopback write is in the peer's buffer once it returns
            with pytest.raises(BlockingIOError):
                end._sock.recv(100, socket.MSG_DONTWAIT)
        hub.close()


async def test_falling_behind_in_the_loop_counts_what_each_member_was_handed_this_tick():
    """More than ``buffer`` frames in one tick drop a member with the resource_exhausted notice;
    one that joined the loop in mid-tick counts only the frames handed to it, so it is dropped
    later, after exactly ``buffer`` frames of its own."""
    hub = relay.EventHub(buffer=3)
    async with trio.open_nursery() as nursery:
        early, _, first = await _attach(nursery, hub)
        connection = await _pair()
        hub.publish(TOPIC, _frame(1))
        hub.publish(TOPIC, _frame(2))
        late, _, second = _attach_now(nursery, hub, *connection)  # same tick: no checkpoint since
        hub.publish(TOPIC, _frame(3))
        assert _fast(hub) == {early, late}
        hub.publish(TOPIC, _frame(4))  # early's fourth
        assert early.dropped and not late.dropped and _fast(hub) == {late}
        hub.publish(TOPIC, _frame(5))
        hub.publish(TOPIC, _frame(6))  # late's fourth
        assert late.dropped and not _fast(hub)
        a = await first.read_until(lambda ev: ev and ev[-1].get("event") == "error")
        b = await second.read_until(lambda ev: ev and ev[-1].get("event") == "error")
    assert _ids(a) == ["s1:1", "s1:2", "s1:3"] and _ids(b) == ["s1:3", "s1:4", "s1:5"]
    for events in (a, b):
        assert events[-1]["data"]["code"] == "resource_exhausted" and "id" not in events[-1]
    assert hub.statistics().dropped == 2


async def test_frames_a_replay_already_sent_are_skipped_in_the_loop_for_that_member_only():
    """A member whose replay went up to s1:5 does not get a live s1:5 again; the others do."""
    hub = relay.EventHub(buffer=256)
    async with trio.open_nursery() as nursery:
        resumed, _, a = await _attach(nursery, hub, last={"s1": 5})
        fresh, _, b = await _attach(nursery, hub)
        assert _fast(hub) == {resumed, fresh}
        for seq in (5, 6):
            hub.publish(TOPIC, _frame(seq))
        assert _ids(await a.read_until(lambda ev: len(ev) == 1)) == ["s1:6"]
        assert _ids(await b.read_until(lambda ev: len(ev) == 2)) == ["s1:5", "s1:6"]
        hub.close()


async def test_a_keepalive_takes_the_member_out_of_the_loop_and_back(autojump_clock):
    """An idle member's own task writes the keep-alive: it leaves the loop for that write and
    rejoins once it is out, so the next frame comes whole after the comment."""
    hub = relay.EventHub(buffer=256)
    async with trio.open_nursery() as nursery:
        sub, _, client = await _attach(nursery, hub, keepalive=15)
        await trio.sleep(16)
        while b": keep-alive" not in client.raw:
            client.raw += await client.sock.recv(1000)
        await trio.testing.wait_all_tasks_blocked()
        assert _fast(hub) == {sub}
        hub.publish(TOPIC, _frame(1))
        assert _ids(await client.read_until(lambda ev: len(ev) == 1)) == ["s1:1"]
        hub.close()
