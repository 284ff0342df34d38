"""Repair with the real Codex binary (issue 12): ``serve`` owns the pinned
app-server against scripts/mock_model.py (as in tests/test_real_relay.py); a
SIGKILL mid-turn quarantines the session and revokes the holder's lease, and
RepairSession resumes the thread in a new process, so the next turn's model
request carries the earlier turn's history; the same for the real Claude Code
(--session-id chosen by the relay, then --resume)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

import relay
from provider_helpers import claude_binary, codex_binary, mock_model
from serve_helpers import (
    borrow_lease,
    process_alive,
    serving,
    start_turn,
    turn_ended,
    until_runtime,
    warm_sessions,
)
from test_real_relay import CONFIG, _register_command, point_at_the_mock


async def _killed_mid_turn(r, mock, profile: str, endpoint: str, remember: str):
    """Warm a session of ``profile``, let alice complete a turn saying ``remember``,
    start a slow one and SIGKILL the provider once the mock model streams it
    (``endpoint``: the mock's route the provider calls).  Returns the session id,
    the killed pid, the completed turn and the doomed one."""
    row = (await warm_sessions(r, profile))[0]
    sid, pid = row["session_id"], row["process"]["pid"]
    lease = await borrow_lease(r, profile, "alice", session=sid)
    first = await turn_ended(r, (await start_turn(r, lease, remember))["turn_id"])
    assert first["state"] == "completed" and first["thread_id"], first
    doomed = await start_turn(r, lease, "@slow doomed")

    async def streaming():
        return any(q["prompt"] == "@slow doomed" for q in mock.requests(endpoint))
    await until_runtime(r, streaming)
    os.killpg(pid, signal.SIGKILL)
    return sid, pid, first, doomed


@pytest.mark.slow
async def test_real_codex_killed_mid_turn_is_repaired_with_its_history(tmp_path, monkeypatch):
    """SIGKILL of the app-server mid-turn: the turn fails (provider_exited), the
    session is quarantined and the holder's lease revoked; `repair --apply`
    resumes the thread (thread/resume) in a new process, and the holder's next
    turn sends the model the earlier turns (the completed one and the killed one)."""
    work = tmp_path / "work"
    work.mkdir()
    with trio.fail_after(90):
        async with mock_model(tmp_path, "--hold-seconds", "30") as mock:
            point_at_the_mock(tmp_path, mock, monkeypatch)
            async with serving(tmp_path, CONFIG) as r:
                await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled",
                           command=_register_command(mock, work, [codex_binary(), "app-server"]),
                           cwd=str(work))
                sid, pid, first, doomed = await _killed_mid_turn(r, mock, "cx", "responses",
                                                                 "remember-gamma")
                failed = await turn_ended(r, doomed["turn_id"])
                assert failed["state"] == "failed" and failed["error"].startswith("provider_exited")
                (gone,) = (await r.ok("ListLeases", session_id=sid))["leases"]
                assert gone["state"] == "revoked" and "provider_exited" in gone["revoke_reason"]

                began = time.monotonic()
                repaired = await r.ok("RepairSession", session_id=sid, apply=True)
                print(f"real Codex: RepairSession --apply took {time.monotonic() - began:.3f} s")
                assert repaired["outcome"] == "repaired", repaired
                assert any(s["action"] == "resume_thread" and first["thread_id"] in s["reason"]
                           for s in repaired["steps"])
                (now,) = [s for s in (await r.ok("ListSessions"))["sessions"] if s["session_id"] == sid]
                assert now["state"] == "ready" and now["process"]["pid"] != pid
                assert not process_alive(pid)
                again = await borrow_lease(r, "cx", "alice", session=sid)
                after = await turn_ended(r, (await start_turn(r, again, "after-crash"))["turn_id"])
                assert after["state"] == "completed", after
                assert after["thread_id"] == first["thread_id"]
        last = mock.requests("responses")[-1]
        assert last["prompt"] == "after-crash"
        assert "remember-gamma" in last["user_texts"] and "@slow doomed" in last["user_texts"]
        assert mock.requests(None) == [] and mock.requests("dns") == []


@pytest.mark.slow
async def test_real_claude_killed_mid_turn_is_resumed_with_its_session_id(tmp_path, monkeypatch):
    """The real Claude runs under the --session-id the relay chose; after a
    SIGKILL mid-turn the repair starts it with --resume <that id>, and the
    same holder's next turn sends the model the earlier turns."""
    work = tmp_path / "work"
    work.mkdir()
    argv = [claude_binary(), *relay.DEFAULT_COMMANDS["claude"][1:]]
    with trio.fail_after(90):
        async with mock_model(tmp_path, "--hold-seconds", "30") as mock:
            point_at_the_mock(tmp_path, mock, monkeypatch)
            async with serving(tmp_path, CONFIG) as r:
                await r.ok("RegisterProfile", name="cl", provider="claude", mode="one-borrow",
                           command=_register_command(mock, work, argv), cwd=str(work))
                sid, pid, first, doomed = await _killed_mid_turn(r, mock, "cl", "messages",
                                                                 "remember-delta")
                assert (await turn_ended(r, doomed["turn_id"]))["state"] == "failed"
                began = time.monotonic()
                repaired = await r.ok("RepairSession", session_id=sid, apply=True)
                print(f"real Claude: RepairSession --apply took {time.monotonic() - began:.3f} s")
                assert repaired["outcome"] == "repaired", repaired
                again = await borrow_lease(r, "cl", "alice", session=sid)
                after = await turn_ended(r, (await start_turn(r, again, "after-crash"))["turn_id"])
                assert after["state"] == "completed", after
                assert after["thread_id"] == first["thread_id"]
        last = [m for m in mock.requests("messages") if m["prompt"] == "after-crash"][-1]
        assert "remember-delta" in last["user_texts"], last["user_texts"]
        assert mock.requests("dns") == []
