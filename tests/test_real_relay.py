"""The real tier through the relay: ``serve`` owns the pinned Codex and Claude
Code binaries, with ``[providers.<name>]`` in flow/relay.toml pointing at
scripts/mock_model.py (and, where the platform allows, the CLIs joining the
mock's loopback-only network namespace through their ``--command``).

Each test checks what the mock received; waits are on the relay's own change
notices and the mock's request log, each bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import relay
from provider_helpers import MOCK_KEY, MOCK_KEY_ENV, claude_binary, codex_binary, mock_model
from serve_helpers import (
    STAND_IN,
    borrow_lease,
    process_alive,
    profile_sessions,
    serving,
    session_events,
    start_turn,
    turn_ended,
    until_runtime,
    warm_sessions,
)

slow = pytest.mark.slow

CONFIG = relay.Config(stop_stdin_seconds=2.0, stop_term_seconds=2.0, stop_kill_seconds=2.0,
                      startup_timeout_seconds=20.0, handover_timeout_seconds=10.0,
                      approval_timeout_seconds=60.0)


def point_at_the_mock(root: Path, mock, monkeypatch) -> None:
    """``[providers.*]`` at the mock; the key variable holds a dummy (the runtime reads it at spawn)."""
    monkeypatch.setenv(MOCK_KEY_ENV, MOCK_KEY)
    (root / "flow").mkdir(parents=True, exist_ok=True)
    (root / "flow" / "relay.toml").write_text(
        f'[providers.codex]\nbase_url = "http://127.0.0.1:{mock.port}/v1"\napi_key_env = "{MOCK_KEY_ENV}"\n'
        f'[providers.claude]\nbase_url = "http://127.0.0.1:{mock.port}"\napi_key_env = "{MOCK_KEY_ENV}"\n')


def _fence(lease: dict) -> dict:
    return dict(session_id=lease["session_id"], lease_id=lease["lease_id"],
                fencing_token=lease["fencing_token"])


def _register_command(mock, cwd: Path, argv: list[str]) -> list[str]:
    """The real binary, joined to the mock's namespace when there is one (cwd given: nsenter needs it)."""
    return [*mock.prefix(cwd), *argv]


@slow
async def test_real_codex_pooled_reuse_approval_and_interrupt_through_the_relay(tmp_path, monkeypatch):
    """One pooled real Codex serves two borrowers in the same process (same pid)
    with none of the first one's prompt in the second one's model request; an
    approval the model asks for (@command) is answered accept through
    ResolveApproval and the command runs; an @slow turn is interrupted."""
    work = tmp_path / "work"
    work.mkdir()
    with trio.fail_after(50):
        async with mock_model(tmp_path, "--hold-seconds", "20") as mock:
            point_at_the_mock(tmp_path, mock, monkeypatch)
            async with serving(tmp_path, CONFIG) as r:
                await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled",
                           command=_register_command(mock, work, [codex_binary(), "app-server"]),
                           cwd=str(work), options=["approval_policy=on-request"])
                row = (await warm_sessions(r, "cx"))[0]
                sid, pid = row["session_id"], row["process"]["pid"]
                assert row["process"]["provider_version"] == "0.163.0"
                a = await borrow_lease(r, "cx", "a")
                first = await turn_ended(r, (await start_turn(r, a, "remember-alpha say hi"))["turn_id"])
                assert first["state"] == "completed", first
                assert first["output_text"] == "Hello from mock #1: remember-alpha say hi"
                await r.ok("ReleaseLease", lease_id=a["lease_id"])
                b = await borrow_lease(r, "cx", "b", session=sid)
                second = await turn_ended(r, (await start_turn(r, b, "what came before?"))["turn_id"])
                assert second["state"] == "completed", second
                asked = mock.requests("responses")[-1]
                assert asked["prompt"] == "what came before?"
                assert not any("remember-alpha" in t for t in asked["user_texts"])
                (now,) = [s for s in await profile_sessions(r, "cx") if s["session_id"] == sid]
                assert now["process"]["pid"] == pid and process_alive(pid)

                # an approval round trip: accept, and the command ran in the profile's cwd
                turn = await start_turn(r, b, "@command now")

                async def approval():
                    return next((e for e in await session_events(r, sid) if e["kind"] == "approval.requested"
                                 and e["data"]["turn_id"] == turn["turn_id"]), None)
                ask = await until_runtime(r, approval)
                assert "echo hi" in ask["data"]["command"]
                answer = await r.ok("ResolveApproval", **_fence(b), approval_id=ask["data"]["approval_id"],
                                    decision="accept")
                assert answer["outcome"] == "accepted"
                done = await turn_ended(r, turn["turn_id"])
                assert done["state"] == "completed" and "saw the command output" in done["output_text"]
                assert (work / "mock-hi.txt").read_text() == "hi\n"
                ran = [e for e in await session_events(r, sid) if e["kind"] == "item.completed"
                       and e["data"]["item_type"] == "command_execution"]
                assert ran[-1]["data"]["status"] == "completed"

                # an interrupt while the mock holds the @slow stream
                slow = await start_turn(r, b, "@slow story")

                async def streaming():
                    return any(q["prompt"] == "@slow story" for q in mock.requests("responses"))
                await until_runtime(r, streaming)
                ended = (await r.ok("InterruptTurn", **_fence(b), turn_id=slow["turn_id"]))["turn"]
                assert ended["state"] == "interrupted", ended
                kinds = [e["kind"] for e in await session_events(r, sid)]
                assert kinds[-1] == "turn.interrupted"
                await r.ok("ReleaseLease", lease_id=b["lease_id"])
            assert not process_alive(pid)
        prompts = [q["prompt"] for q in mock.requests("responses")]
        assert prompts == ["remember-alpha say hi", "what came before?", "@command now", "@command now",
                           "@slow story"]
        assert [q["reply"] for q in mock.requests("responses")][2:4] == ["command", "after_tool"]
        assert mock.requests(None) == [] and mock.requests("dns") == []


@slow
async def test_real_claude_one_borrow_session_through_the_relay(tmp_path, monkeypatch):
    """A one-borrow real Claude is pre-spawned warm, runs its holder's turn
    against the mock, and at release is stopped and its session closed; a
    fresh warm one (a new process) replaces it."""
    work = tmp_path / "work"
    work.mkdir()
    argv = [claude_binary(), *relay.DEFAULT_COMMANDS["claude"][1:]]
    with trio.fail_after(50):
        async with mock_model(tmp_path) as mock:
            point_at_the_mock(tmp_path, mock, monkeypatch)
            async with serving(tmp_path, CONFIG) as r:
                await r.ok("RegisterProfile", name="cl", provider="claude", mode="one-borrow",
                           command=_register_command(mock, work, argv), cwd=str(work))
                row = (await warm_sessions(r, "cl"))[0]
                assert mock.requests("messages") == []  # warm: Claude says nothing before its input
                lease = await borrow_lease(r, "cl", "ci")
                turn = await turn_ended(r, (await start_turn(r, lease, "hello claude"))["turn_id"])
                assert turn["state"] == "completed", turn
                assert turn["output_text"] == "Hello from mock #1: hello claude"
                await r.ok("ReleaseLease", lease_id=lease["lease_id"])

                async def replaced():
                    rows = {s["session_id"]: s for s in await profile_sessions(r, "cl")}
                    fresh = [s for s in rows.values() if s["session_id"] != row["session_id"]
                             and s["state"] == "ready" and s["process"]["state"] == "running"]
                    return (rows, fresh) if rows[row["session_id"]]["state"] == "closed" and fresh else None
                rows, fresh = await until_runtime(r, replaced)
                assert rows[row["session_id"]]["process"]["state"] == ""
                assert not process_alive(row["process"]["pid"])
                assert len(fresh) == 1 and fresh[0]["process"]["pid"] != row["process"]["pid"]
        messages = mock.requests("messages")
        assert [m["prompt"] for m in messages if m["prompt"] == "hello claude"], messages
        assert mock.requests("dns") == []


async def test_a_turns_records_share_group_commits(tmp_path):
    """The durable records of a turn (its events as the provider sends them,
    then its result and end event) reach the ledger owner back to back, so a
    turn costs a few group commits, not one per record (the relay overhead
    per turn that scripts/bench.py --only runtime measures)."""
    stand_in = [*STAND_IN, "--provider", "codex"]
    with trio.fail_after(30):
        async with serving(tmp_path, CONFIG) as r:
            await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled", command=stand_in)
            row = (await warm_sessions(r, "cx"))[0]
            lease = await borrow_lease(r, "cx", "a")
            turn = await start_turn(r, lease, "say hi")

            async def ended():  # the end event is the turn's last record
                events = [e for e in await session_events(r, row["session_id"])
                          if e["data"].get("turn_id") == turn["turn_id"]]
                return events if events and events[-1]["kind"] == "turn.completed" else None
            events = await until_runtime(r, ended)
            results = (await r.ok("ListResults", session_id=row["session_id"]))["records"]
            records = len(events) + len(results)
            kinds = [e["kind"] for e in events]
            assert kinds[0] == "turn.started" and kinds[-1] == "turn.completed" and len(results) == 1
            # A group commit stamps every record it carries with its one ``now``: the
            # distinct stamps are the commits that carried this turn's records.  One
            # commit per record (the old way) would give as many stamps as records;
            # the result and the end event always share theirs.
            commits = {x["appended_at"] for x in (*events, *results)}
            end_event = next(e for e in events if e["kind"] == "turn.completed")
            assert end_event["appended_at"] == results[0]["appended_at"], (kinds, results)
            assert records >= 5 and len(commits) < records, (commits, records, kinds)


async def test_a_warm_pooled_session_holds_a_spare_thread_for_the_next_lease(tmp_path):
    """A warm pooled Codex session has a fresh thread open before anyone
    borrows it; the lease's first turn runs on it, and the hand-over opens a
    new one (not the archived one) for the next lease, whose turn sees no
    history."""
    with trio.fail_after(30):
        async with serving(tmp_path, CONFIG) as r:
            await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled",
                       command=[*STAND_IN, "--provider", "codex"])
            row = (await warm_sessions(r, "cx"))[0]
            live = r.server.service.runtime.sessions[row["session_id"]]
            spare = live.spare_thread
            assert spare
            a = await borrow_lease(r, "cx", "a")
            first = await turn_ended(r, (await start_turn(r, a, "one"))["turn_id"])
            assert live.thread_id == spare and live.spare_thread == ""
            assert "(history 0)" in first["output_text"]
            await r.ok("ReleaseLease", lease_id=a["lease_id"])

            async def reopened():
                return live.spare_thread if live.spare_thread not in ("", spare) else None
            nxt = await until_runtime(r, reopened)
            b = await borrow_lease(r, "cx", "b", session=row["session_id"])
            second = await turn_ended(r, (await start_turn(r, b, "two"))["turn_id"])
            assert live.thread_id == nxt and "(history 0)" in second["output_text"]
