"""Repair (issue 12): RepairSession resumes a crashed session's conversation in
a fresh process for the holder whose lease was revoked, or starts a
replacement; CloseSession ends a session; ``recover --apply`` performs what
``recover`` classifies; the next ``serve`` repairs what a dead server left.
Driven with the stand-in provider (real processes, every wait bounded by
trio.fail_after, synchronised on the runtime's change notices)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs
import trio

import relay
import relay_client as rc
from conftest import T0
from serve_helpers import (
    STAND_IN,
    borrow_lease,
    cli_in_process,
    cli_process,
    process_alive,
    profile_sessions,
    serving,
    start_turn,
    state_digest,
    turn_ended,
    until_runtime,
    warm_sessions,
)

FAST = relay.Config(stop_stdin_seconds=1.0, stop_term_seconds=1.0, stop_kill_seconds=1.0,
                    startup_timeout_seconds=5.0, handover_timeout_seconds=2.0,
                    approval_timeout_seconds=30.0)


async def _register(r, name: str, provider: str = "codex", mode: str = "pooled", **fields):
    await r.ok("RegisterProfile", name=name, provider=provider, mode=mode,
               command=[*STAND_IN, "--provider", provider], **fields)


async def _session(r, sid: str) -> dict:
    (row,) = [s for s in (await r.ok("ListSessions"))["sessions"] if s["session_id"] == sid]
    return row


async def _crash(r, profile: str, holder: str, first: str = "first hello") -> tuple[dict, dict]:
    """A warm session of ``profile`` runs one completed turn for ``holder``,
    then crashes mid-turn; (its row before the crash, the completed turn)."""
    (row,) = (await warm_sessions(r, profile))[:1]
    lease = await borrow_lease(r, profile, holder, row["session_id"])
    done = await turn_ended(r, (await start_turn(r, lease, first))["turn_id"])
    assert done["state"] == "completed" and "(history 0)" in done["output_text"], done
    crashed = await turn_ended(r, (await start_turn(r, lease, "@crash now"))["turn_id"])
    assert crashed["state"] == "failed" and crashed["error"].startswith("provider_exited"), crashed
    assert crashed["thread_id"] == done["thread_id"] != ""
    (gone,) = (await r.ok("ListLeases", session_id=row["session_id"]))["leases"]
    assert gone["state"] == "revoked"
    return row, done


async def _settled(r, profile: str, n: int) -> None:
    """The pool has healed: ``n`` ready sessions with a running process, and
    the ledger's revision stays put over two reconcile passes."""
    await warm_sessions(r, profile, n)
    runtime = r.server.service.runtime
    while True:
        revision = runtime.owner.ledger.revision
        for _ in range(2):
            await runtime.wait_changed()
        if runtime.owner.ledger.revision == revision:
            return


async def _turn_text(r, lease: dict, text: str) -> str:
    turn = await turn_ended(r, (await start_turn(r, lease, text))["turn_id"])
    assert turn["state"] == "completed", turn
    return turn["output_text"]


# -- RepairSession ------------------------------------------------------------------


async def test_crashed_codex_session_is_repaired_and_the_holder_continues_its_thread(tmp_path):
    """After a crash mid-turn, the dry run says what it would do and changes no
    byte of flow/state; --apply stops what is left, rebuilds the scratch
    (the old one kept as evidence), resumes the thread in a new process and
    clears the quarantine; the holder of the revoked lease continues with its
    history, another holder gets a fresh thread.  A retry with the same
    request id returns the first answer and repairs nothing again."""
    with trio.fail_after(60):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            row, done = await _crash(r, "cx", "alice")
            sid, old_pid = row["session_id"], row["process"]["pid"]
            await _settled(r, "cx", 1)  # the pool started a replacement; the ledger is quiet now
            before = state_digest(tmp_path)
            plan = await r.ok("RepairSession", session_id=sid)
            assert state_digest(tmp_path) == before
            assert (plan["outcome"], plan["applied"]) == ("planned", False)
            actions = [s["action"] for s in plan["steps"]]
            assert actions[:4] == ["stop_process", "rebuild_scratch", "start_process", "resume_thread"]
            assert done["thread_id"] in plan["steps"][3]["reason"] and "alice" in plan["steps"][3]["reason"]
            assert not any(s["done"] for s in plan["steps"])

            repaired = await r.ok("RepairSession", session_id=sid, apply=True, request_id="fix-1")
            assert (repaired["outcome"], repaired["applied"]) == ("repaired", True), repaired
            assert all(s["done"] for s in repaired["steps"])
            now = await _session(r, sid)
            assert now["state"] == "ready" and now["process"]["state"] == "running"
            assert now["process"]["pid"] != old_pid and not process_alive(old_pid)
            quarantine = (await r.ok("Recover", session_id=sid))["sessions"][0]
            assert quarantine["classification"] != "quarantine_repair"
            scratch = tmp_path / "flow" / "tmp" / "relay" / "sessions" / sid
            assert (scratch / "evidence-1" / "home" / "config.toml").is_file()
            assert (scratch / "home" / "config.toml").is_file()

            again = await r.ok("RepairSession", session_id=sid, apply=True, request_id="fix-1")
            assert again == repaired
            assert (await _session(r, sid))["process"]["pid"] == now["process"]["pid"]

            alice = await borrow_lease(r, "cx", "alice", sid)
            text = await _turn_text(r, alice, "after the repair")
            assert "(history 1)" in text, text  # the first turn completed; the crashed one did not
            await r.ok("ReleaseLease", lease_id=alice["lease_id"])
            bob = await borrow_lease(r, "cx", "bob", sid)
            assert "(history 0)" in await _turn_text(r, bob, "someone else")


async def test_another_holder_after_a_repair_gets_a_fresh_thread(tmp_path):
    """The resumed thread is kept only for the holder of the revoked lease: a
    different holder borrowing the repaired session first starts from nothing."""
    with trio.fail_after(60):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            row, done = await _crash(r, "cx", "alice")
            await r.ok("RepairSession", session_id=row["session_id"], apply=True)
            bob = await borrow_lease(r, "cx", "bob", row["session_id"])
            turn = await turn_ended(r, (await start_turn(r, bob, "mine"))["turn_id"])
            assert "(history 0)" in turn["output_text"] and turn["thread_id"] != done["thread_id"]


async def test_claude_runs_under_a_session_id_the_relay_chose_and_is_resumed(tmp_path):
    """A one-borrow Claude process is spawned with --session-id (the turn
    records it); after a crash the repair resumes it with --resume in a new
    process, for the same holder (history 1); the conversation is the same."""
    with trio.fail_after(60):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cl", provider="claude", mode="one-borrow")
            row, done = await _crash(r, "cl", "alice")
            sid = row["session_id"]
            assert re.fullmatch(r"[0-9a-f-]{36}", done["thread_id"])
            store = tmp_path / "flow" / "tmp" / "relay" / "sessions" / sid / "home" / ".claude-standin"
            assert (store / "sessions" / f"{done['thread_id']}.json").is_file()
            repaired = await r.ok("RepairSession", session_id=sid, apply=True)
            assert repaired["outcome"] == "repaired", repaired
            alice = await borrow_lease(r, "cl", "alice", sid)
            turn = await turn_ended(r, (await start_turn(r, alice, "continue"))["turn_id"])
            assert "(history 1)" in turn["output_text"] and turn["thread_id"] == done["thread_id"]


async def test_claude_resumed_for_one_holder_is_respawned_fresh_for_another(tmp_path):
    """Claude holds one conversation per process: another holder's first turn
    on a repaired session gets a fresh process (new pid, new session id)."""
    with trio.fail_after(60):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cl", provider="claude", mode="one-borrow")
            row, done = await _crash(r, "cl", "alice")
            sid = row["session_id"]
            await r.ok("RepairSession", session_id=sid, apply=True)
            resumed_pid = (await _session(r, sid))["process"]["pid"]
            bob = await borrow_lease(r, "cl", "bob", sid)
            turn = await turn_ended(r, (await start_turn(r, bob, "mine"))["turn_id"])
            assert "(history 0)" in turn["output_text"] and turn["thread_id"] != done["thread_id"]
            assert (await _session(r, sid))["process"]["pid"] != resumed_pid


async def test_unrepairable_session_is_replaced_and_closed(tmp_path):
    """When the thread cannot be resumed (its store is gone), the repair
    starts a replacement session (replaces / replaced_by on both) and closes
    the old one; repairing the old one again is refused, naming the new."""
    with trio.fail_after(60):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            row, done = await _crash(r, "cx", "alice")
            sid = row["session_id"]
            home = tmp_path / "flow" / "tmp" / "relay" / "sessions" / sid / "home"
            (home / "standin-threads" / f"{done['thread_id']}.json").unlink()
            reply = await r.ok("RepairSession", session_id=sid, apply=True)
            assert reply["outcome"] == "replaced", reply
            new = reply["replacement_session_id"]
            assert "no rollout found" in json.dumps(reply["steps"])
            old, fresh = await _session(r, sid), await _session(r, new)
            assert (old["state"], old["replaced_by"]) == ("closed", new)
            assert (fresh["replaces"], fresh["state"]) == (sid, "ready")
            assert fresh["process"]["state"] == "running"
            again = await r.ok("RepairSession", session_id=sid, apply=True)
            assert (again["outcome"], again["replacement_session_id"]) == ("refused", new)


async def test_repair_dry_run_without_a_server_reads_the_ledger_and_apply_is_unavailable(tmp_path):
    """With no server, `repair S` plans from the ledger (no byte of flow/state
    changes); `repair S --apply` is unavailable, naming the command to run."""
    cli_in_process(tmp_path, "profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    cli_in_process(tmp_path, "session", "create", "--profile", "cx", "--session-id", "s1")
    cli_in_process(tmp_path, "quarantine", "session", "s1", "--reason", "provider_exited: status -9")
    before = state_digest(tmp_path)
    plan = await cli_process(tmp_path, "repair", "s1")
    assert plan["outcome"] == "planned" and plan["steps"][3]["action"] == "no_thread"
    refused = await cli_process(tmp_path, "repair", "s1", "--apply", check=1)
    assert refused["error"]["code"] == "unavailable"
    assert "python -m relay serve" in refused["error"]["hint"]
    assert "repair s1 --apply" in refused["error"]["hint"]
    assert state_digest(tmp_path) == before
    assert cli_in_process(tmp_path, "repair", "s1")["outcome"] == "planned"


# -- CloseSession -------------------------------------------------------------------


def test_close_is_refused_with_a_live_lease_and_force_revokes_it(tmp_path):
    """CloseSession is failed_precondition (naming the lease and --force) while
    a lease is live, and changes nothing; --force revokes it with the reason
    and closes the session (its quarantine, if any, ends with it)."""
    cli_in_process(tmp_path, "profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    cli_in_process(tmp_path, "session", "create", "--profile", "cx", "--session-id", "s1")
    lease = cli_in_process(tmp_path, "borrow", "--session", "s1", "--holder", "h")["lease"]
    before = state_digest(tmp_path)
    store = relay.Store(tmp_path)
    try:
        relay.commit_one(store, relay.rpc_mutation("CloseSession", rc.CloseSessionRequest("s1")),
                         relay.Config())
        raise AssertionError("not refused")
    except rc.FailedPrecondition as exc:
        assert lease["lease_id"] in exc.message and "--force" in exc.hint
    assert state_digest(tmp_path) == before
    closed = cli_in_process(tmp_path, "session", "close", "s1", "--force", "--reason", "done")
    assert closed["outcome"] == "closed" and closed["revoked_lease_ids"] == [lease["lease_id"]]
    ledger = store.read()
    assert ledger.sessions["s1"].state == "closed"
    assert ledger.leases[lease["lease_id"]].revoke_reason == "session closed: done"
    assert cli_in_process(tmp_path, "session", "close", "s1")["outcome"] == "closed"


def test_closed_sessions_leave_the_ledger_after_retention_with_their_logs(tmp_path):
    """A closed session, its cursor and quarantine are archived to
    archive/sessions.jsonl after lease_retention_seconds, with its leases;
    its stream logs move to archive/streams/<id>.<revision>/ and stay
    readable; a new session given the same id starts fresh logs."""
    store, config = relay.Store(tmp_path), relay.Config()

    def do(rpc: str, request, now: float):
        (reply,), _ = relay.commit(store, [relay.rpc_mutation(rpc, request)], config, now=now)
        assert not isinstance(reply, rc.RelayError), reply
        return reply

    do("RegisterProfile", rc.RegisterProfileRequest("cx", "codex", "pooled"), T0)
    do("CreateSession", rc.CreateSessionRequest("cx", "s1"), T0)
    do("CreateSession", rc.CreateSessionRequest("cx", "s2"), T0)
    do("AppendEvent", rc.AppendRecordRequest("s1", "note", {"n": 1}), T0)
    do("QuarantineSession", rc.QuarantineSessionRequest("s1", "provider_exited: -9"), T0)
    do("CloseSession", rc.CloseSessionRequest("s1"), T0 + 1)
    ledger = store.read()
    assert ledger.quarantines["s1"].state == "cleared"  # a closed session is no longer failed
    later = T0 + config.lease_retention_seconds + config.compact_interval_seconds + 10
    do("CreateSession", rc.CreateSessionRequest("cx", "s3"), later)
    ledger = store.read()
    assert "s1" not in ledger.sessions and "s1" not in ledger.cursors
    assert "s1" not in ledger.quarantines and {"s2", "s3"} <= set(ledger.sessions)
    archive = tmp_path / "flow" / "state" / "relay" / "archive"
    (row,) = [json.loads(line) for line in (archive / "sessions.jsonl").read_text().splitlines()]
    assert row["session_id"] == "s1" and row["state"] == "closed"
    assert row["cursor"]["events"] == 1 and row["quarantine"]["state"] == "cleared"
    (logs,) = list((archive / "streams").iterdir())
    assert logs.name.startswith("s1.")
    assert relay.decode_record((logs / "events.log").read_bytes()).data == {"n": 1}
    assert not (tmp_path / "flow" / "state" / "relay" / "streams" / "s1").exists()
    do("CreateSession", rc.CreateSessionRequest("cx", "s1"), later)  # the id is free again
    do("AppendEvent", rc.AppendRecordRequest("s1", "note", {"n": 2}), later)
    assert relay.decode_record((logs / "events.log").read_bytes()).data == {"n": 1}


async def test_closing_a_session_stops_its_process(tmp_path):
    """CloseSession through a running server: the session is closed at once,
    and the runtime stops its process at its next reconcile."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            pid = row["process"]["pid"]
            closed = await r.ok("CloseSession", session_id=row["session_id"])
            assert closed["session"]["state"] == "closed"

            async def stopped():
                return (await _session(r, row["session_id"]))["process"]["state"] == ""
            await until_runtime(r, stopped)
            assert not process_alive(pid)


# -- recover --apply ----------------------------------------------------------------


async def test_recover_apply_performs_each_classification_and_plain_recover_writes_nothing(tmp_path):
    """`recover` changes no byte of flow/state; `recover --apply` prints one
    step per session: the quarantined one repaired through the server, the
    closed one replaced, the held one left to its live holder; afterwards
    no session needs a repair and the closed one is replaced."""
    with trio.fail_after(60):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx", pool_size=2)
            await r.ok("RegisterProfile", name="ledger-only", provider="kimi", mode="one-borrow",
                       command=["/nonexistent/kimi"])
            await r.ok("CreateSession", profile="ledger-only", session_id="k1")
            await r.ok("CloseSession", session_id="k1")
            row, _ = await _crash(r, "cx", "alice")
            await _settled(r, "cx", 2)
            held = await borrow_lease(r, "cx", "carol")
            await _settled(r, "cx", 3)  # carol's, and the pool's two idle ones
            before = state_digest(tmp_path)
            plain = await cli_process(tmp_path, "recover")
            assert state_digest(tmp_path) == before
            kinds = {x["session_id"]: x["classification"] for x in plain["sessions"]}
            assert kinds[row["session_id"]] == "quarantine_repair"
            assert kinds["k1"] == "replacement_start" and kinds[held["session_id"]] == "lease_block"

            applied = await cli_process(tmp_path, "recover", "--apply")
            steps = {x["session_id"]: x for x in applied["steps"]}
            assert (steps[row["session_id"]]["action"], steps[row["session_id"]]["outcome"]) == (
                "repair", "done"), steps
            assert (steps["k1"]["action"], steps["k1"]["outcome"]) == ("start_replacement", "done")
            assert (steps[held["session_id"]]["action"], steps[held["session_id"]]["outcome"]) == (
                "keep_lease", "skipped")
            after = {x["session_id"]: x["classification"] for x in applied["sessions"]}
            assert "quarantine_repair" not in after.values()
            assert (await r.ok("ListLeases", session_id=held["session_id"]))["leases"][0]["state"] == "active"
            replaced_by = (await _session(r, "k1"))["replaced_by"]
            assert replaced_by and (await _session(r, replaced_by))["replaces"] == "k1"
            again = await cli_process(tmp_path, "recover", "--apply")
            assert {x["session_id"]: x["outcome"] for x in again["steps"]}["k1"] == "skipped"
            human = await trio.run_process(
                [*_relay(tmp_path), "recover", "--apply"], capture_stdout=True, check=False,
                env=_env())
            assert human.returncode == 0 and b"k1\treplacement_start\tnone\tskipped" in human.stdout


def _relay(root: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "relay", "--root", str(root)]


def _env() -> dict[str, str]:
    import os

    from conftest import ROOT

    return dict(os.environ, PYTHONPATH=str(ROOT))


# -- the relay restarting, and the pool ----------------------------------------------


async def test_next_serve_repairs_sessions_quarantined_relay_restarted(tmp_path):
    """A turn a dead server left running ends failed and its session is
    quarantined `relay_restarted` when the next serve starts, which then
    repairs it: resumed in a fresh process, its quarantine cleared, the
    holder continuing its history."""
    with trio.fail_after(60):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cx", "alice", sid)
            done = await turn_ended(r, (await start_turn(r, lease, "before the restart"))["turn_id"])
        store = relay.Store(tmp_path)

        def died_mid_turn(ledger, ctx):  # what a SIGKILLed server leaves: the turn running
            turn = attrs.evolve(ledger.turns[done["turn_id"]], state="running", ended_at="")
            return attrs.evolve(ledger, turns=relay._put(ledger.turns, turn.turn_id, turn)), None
        relay.commit_one(store, relay.Mutation(died_mid_turn, "test"), relay.Config())
        async with serving(tmp_path, FAST) as r:
            now = await _session(r, sid)
            assert now["state"] == "ready" and now["process"]["state"] == "running", now
            assert store.read().quarantines[sid].code == "relay_restarted"
            assert store.read().quarantines[sid].state == "cleared"
            alice = await borrow_lease(r, "cx", "alice", sid)
            assert "(history 1)" in await _turn_text(r, alice, "after the restart")


async def test_pool_heals_around_a_quarantined_session_and_keeps_it_for_inspection(tmp_path):
    """A pooled profile of pool_size 2 with one session crashed is back to two
    ready, running sessions; the quarantined one stays failed, with its
    scratch, until it is repaired or closed."""
    with trio.fail_after(60):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx", pool_size=2)
            await warm_sessions(r, "cx", 2)
            row, _ = await _crash(r, "cx", "alice")
            await _settled(r, "cx", 2)
            rows = {s["session_id"]: s for s in await profile_sessions(r, "cx")}
            assert rows[row["session_id"]]["state"] == "failed" and len(rows) == 3
            scratch = tmp_path / "flow" / "tmp" / "relay" / "sessions" / row["session_id"]
            assert (scratch / "home" / "config.toml").is_file()
            recovery = (await r.ok("Recover", session_id=row["session_id"]))["sessions"][0]
            assert recovery["classification"] == "quarantine_repair"


# -- pure pieces ----------------------------------------------------------------------


def test_quarantine_code_reads_the_field_or_the_reason_prefix():
    """quarantine_code: ``code`` when the record has it, else the reason's
    ``code:`` prefix, else ``operator``."""
    q = rc.Quarantine("s1", "relay_restarted: died", code="relay_restarted")
    assert relay.quarantine_code(q) == "relay_restarted"
    assert relay.quarantine_code(attrs.evolve(q, code="operator")) == "operator"

    @attrs.frozen
    class Uncoded:  # a record of before the code field: the reason's prefix says it
        reason: str

    assert relay.quarantine_code(Uncoded("relay_restarted: died")) == "relay_restarted"
    assert relay.quarantine_code(Uncoded("disk full: the operator says")) == "operator"
    assert relay.quarantine_code(Uncoded("flaky")) == "operator"


def test_an_older_ledger_without_the_new_fields_still_reads(tmp_path):
    """Sessions without replaces/replaced_by and turns without thread_id (a
    ledger and stored replies written before them) read with "" for each."""
    store = relay.Store(tmp_path)
    relay.commit_one(store, relay.rpc_mutation("RegisterProfile", rc.RegisterProfileRequest(
        "cx", "codex", "pooled")), relay.Config())
    relay.commit_one(store, relay.rpc_mutation("CreateSession", rc.CreateSessionRequest(
        "cx", "s1", request_id="r1")), relay.Config())
    ledger = store.read()
    turn = rc.Turn("t1", "s1", "l1", "completed", "hi")
    ledger = attrs.evolve(ledger, turns={"t1": turn})
    doc = relay.to_json(ledger)
    for record in doc["sessions"].values():
        del record["replaces"], record["replaced_by"]
    for record in doc["turns"].values():
        del record["thread_id"]
    for record in doc["requests"].values():
        record["reply"]["session"].pop("replaces", None)
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    import hashlib

    data = body[:-1] + b',"checksum":"sha256:' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'
    back = relay.decode_ledger(data)
    assert back.sessions["s1"].replaces == "" and back.turns["t1"].thread_id == ""


async def test_relay_client_recover_apply_goes_through_the_server(tmp_path):
    """`python -m relay_client recover --apply` runs the same steps through the
    stubs (RepairSession, CreateSession with replaces)."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await r.ok("RegisterProfile", name="ledger-only", provider="kimi", mode="one-borrow",
                       command=["/nonexistent/kimi"])
            await r.ok("CreateSession", profile="ledger-only", session_id="k1")
            await r.ok("CloseSession", session_id="k1")
            proc = await trio.run_process(
                [_relay(tmp_path)[0], "-m", "relay_client", "--root", str(tmp_path), "recover", "--apply"],
                capture_stdout=True, check=False, env=_env())
            assert proc.returncode == 0, proc.stdout
            (step,) = json.loads(proc.stdout)["steps"]
            assert (step["action"], step["outcome"]) == ("start_replacement", "done")
            assert (await _session(r, "k1"))["replaced_by"]
