"""What a long-running server keeps per unit of work must go with that work
(issue 14's 30-minute soak): each test runs many units and checks that the
state left behind does not grow with their number."""

from __future__ import annotations

import json

import relay


def lines(*frames: dict) -> bytes:
    return b"".join(json.dumps(f).encode() + b"\n" for f in frames)


def codex_ready() -> relay.CodexProtocol:
    p = relay.CodexProtocol()
    p.send_initialize()
    p.receive_data(lines({"id": 0, "result": {"userAgent": "mock"}}))
    p.data_to_send()
    return p


def lease_on(p: relay.CodexProtocol, n: int) -> list[relay.WireEvent]:
    """What one Codex lease does on a pooled process: a thread of its own, a
    turn with a usage update, then the thread archived at hand-over."""
    thread, turn = f"T{n}", f"U{n}"
    rid = p._next_id
    p.send_thread_start(cwd="/w")
    events = p.receive_data(lines({"id": rid, "result": {"thread": {"id": thread}}}))
    p.send_turn_start(thread, "hi")
    usage = {"total": {"totalTokens": 10 + n, "inputTokens": 10, "outputTokens": n}}
    events += p.receive_data(lines(
        {"id": rid + 1, "result": {"turn": {"id": turn, "status": "inProgress"}}},
        {"method": "turn/started", "params": {"threadId": thread, "turn": {"id": turn}}},
        {"method": "thread/tokenUsage/updated", "params": {"threadId": thread, "turnId": turn,
                                                           "tokenUsage": usage}},
        {"method": "turn/completed", "params": {"threadId": thread, "turn": {
            "id": turn, "items": [], "status": "completed"}}}))
    p.send_thread_archive(thread)
    events += p.receive_data(lines({"id": rid + 2, "result": {}}))
    return events


def test_codex_usage_of_archived_threads_is_not_kept():
    """A pooled Codex process runs a thread per lease; the token usage it
    reported for a thread is kept until that thread is archived, not for the
    life of the process (the soak's server held ~800 bytes more per turn)."""
    p = codex_ready()
    for n in range(2000):
        events = lease_on(p, n)
    completed = next(e for e in events if isinstance(e, relay.TurnCompleted))
    assert completed.usage == {"total": {"totalTokens": 2009, "inputTokens": 10, "outputTokens": 1999}}
    assert isinstance(events[-1], relay.ThreadArchived)
    assert p._usage == {} and p._pending == {} and p._turns == {}


def test_codex_usage_of_a_live_thread_stays_for_its_next_turn():
    """Dropping usage at archive only: a thread with turns still to come keeps
    its last usage (a later turn's end reports it even without a new update)."""
    p = codex_ready()
    rid = p._next_id
    p.send_thread_start(cwd="/w")
    p.receive_data(lines({"id": rid, "result": {"thread": {"id": "T"}}}))
    usage = {"total": {"totalTokens": 5}}
    p.receive_data(lines({"method": "thread/tokenUsage/updated",
                          "params": {"threadId": "T", "tokenUsage": usage}}))
    p.send_turn_start("T", "again")
    (ended,) = [e for e in p.receive_data(lines(
        {"id": rid + 1, "result": {"turn": {"id": "U", "status": "inProgress"}}},
        {"method": "turn/completed", "params": {"threadId": "T", "turn": {
            "id": "U", "status": "completed"}}})) if isinstance(e, relay.TurnCompleted)]
    assert ended.usage == usage
