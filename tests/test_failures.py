"""Failure detection in the live runtime (issue 12): each way a provider
fails -- crash, stall, hang, wedge, a failed start, damaged scratch, a dead
relay -- is detected, the session quarantined with its code and evidence, the
running turn failed, the holder's lease revoked, and the profile's health
counted.  The stand-in provider misbehaves on cue; the timers are the
runtime's own (trio time) with tiny settings, and every wait is on an event or
a state, bounded by trio.fail_after (no sleeps)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import httpx2
import pytest
import trio

import relay
import relay_client as rc
from conftest import ROOT, commit_ok
from serve_helpers import (
    STAND_IN,
    borrow_lease,
    metric,
    process_alive,
    profile_sessions,
    serving,
    session_events,
    start_turn,
    turn_ended,
    until_runtime,
    warm_sessions,
)

#: Quick stops, and every detector off (huge) unless a test turns it on.
QUIET = relay.Config(stop_stdin_seconds=0.5, stop_term_seconds=0.5, stop_kill_seconds=1.0,
                     startup_timeout_seconds=5.0, handover_timeout_seconds=2.0,
                     approval_timeout_seconds=60.0, turn_stall_seconds=600.0,
                     interrupt_grace_seconds=5.0, probe_interval_seconds=600.0,
                     probe_timeout_seconds=5.0)


def cfg(**settings) -> relay.Config:
    return attrs.evolve(QUIET, **settings)


async def _register(r, name: str, provider: str = "codex", mode: str = "pooled", *args: str,
                    command: list[str] | None = None, **fields) -> None:
    argv = command or [*STAND_IN, "--provider", provider, *args]
    await r.ok("RegisterProfile", name=name, provider=provider, mode=mode, command=argv, **fields)


def _quarantine(r, sid: str) -> rc.Quarantine | None:
    q = r.server.service.owner.ledger.quarantines.get(sid)
    return q if q is not None and q.state == "active" else None


async def quarantined(r, sid: str) -> rc.Quarantine:
    async def found():
        return _quarantine(r, sid)
    return await until_runtime(r, found)


async def health(r, profile: str) -> dict:
    """The profile's row of GET /api/relay/runtime (the exported health)."""
    doc = (await r.client.get("/api/relay/runtime")).json()
    return next((h for h in doc["providers"] if h["profile"] == profile), {})


async def assert_failed(r, q: rc.Quarantine, lease: dict | None, turn_id: str | None) -> None:
    """The turn ended failed with the quarantine's reason, and the lease was revoked with it."""
    assert q.reason.startswith(f"{q.code}: ") and "\n" not in q.reason
    if turn_id is not None:
        assert q.evidence["turn_id"] == turn_id
        turn = await turn_ended(r, turn_id)
        assert (turn["state"], turn["error"]) == ("failed", q.reason)
    if lease is not None:
        (now,) = [x for x in (await r.ok("ListLeases", session_id=q.session_id))["leases"]
                  if x["lease_id"] == lease["lease_id"]]
        assert (now["state"], now["revoke_reason"]) == ("revoked", f"quarantined: {q.reason}")


async def _running_pid(r, sid: str) -> int:
    (row,) = [s for s in await profile_sessions(r, "cx") if s["session_id"] == sid]
    return row["process"]["pid"]


# -- crash -----------------------------------------------------------------------------


async def test_crash_mid_turn_is_provider_exited_with_the_signal_and_stderr(tmp_path):
    """A provider killed mid-turn: quarantine ``provider_exited`` naming the
    signal and the turn, its last stderr lines kept; the turn fails with the
    reason, the lease is revoked; crashes and failed turns are counted and
    exported (runtime route, GetStatus, /metrics)."""
    with trio.fail_after(30):
        async with serving(tmp_path, QUIET) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cx", "ci")
            turn = await start_turn(r, lease, "@crash now")
            q = await quarantined(r, sid)
            assert q.code == "provider_exited"
            assert q.reason == f"provider_exited: exit status -9 (SIGKILL) during turn {turn['turn_id']}"
            ev = q.evidence
            assert (ev["exit_status"], ev["signal"], ev["pid"]) == (-9, "SIGKILL", row["process"]["pid"])
            assert any("crashing (SIGKILL)" in line for line in ev["stderr"]) and len(ev["stderr"]) <= 10
            await assert_failed(r, q, lease, turn["turn_id"])
            h = await health(r, "cx")
            assert (h["crashes"], h["failed_turns"], h["state"]) == (1, 1, "healthy")
            assert h["quarantines"] == {"provider_exited": 1} and h["last_error"] == q.reason
            status = await r.ok("GetStatus")
            assert [(p["profile"], p["crashes"]) for p in status["providers"]] == [("cx", 1)]
            text = (await r.client.get("/metrics")).text
            assert metric(text, "relay_provider_quarantines_total", profile="cx",
                          cause="provider_exited") == 1
            assert metric(text, "relay_provider_events_total", profile="cx", event="crashes") == 1
            # the feed carried it: the quarantine record with its code is in the ledger's projection
            inspect = relay.inspect_relay(relay.Store(tmp_path), relay.Config(), time.time())
            assert inspect["detail"]["quarantine_codes"] == {"cx": {"provider_exited": 1}}


async def test_a_codex_killed_idle_soon_after_its_start_is_provider_exited(tmp_path):
    """A pooled Codex that handshook and served a turn, killed while idle within
    startup_timeout_seconds of its spawn, crashed: ``provider_exited``, never a
    failed start (the time window is for CLIs without a handshake), so no backoff."""
    with trio.fail_after(30):
        async with serving(tmp_path, cfg(startup_timeout_seconds=30.0)) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cx", "ci")
            turn = await turn_ended(r, (await start_turn(r, lease, "hello"))["turn_id"])
            assert turn["state"] == "completed"
            # As for a process recycled at a hand-over whose next borrower's StartTurn came
            # before the reconcile pass saw the lease: the runtime never marked it used.
            r.server.service.runtime.sessions[sid].used = False
            os.kill(await _running_pid(r, sid), signal.SIGKILL)
            q = await quarantined(r, sid)
            assert (q.code, q.evidence["signal"]) == ("provider_exited", "SIGKILL")
            h = await health(r, "cx")
            assert (h["crashes"], h["start_failures"]) == (1, 0)


async def test_a_flood_bad_lines_and_a_huge_line_are_no_failure(tmp_path):
    """Misbehaviour that is not a failure: 5,000 deltas in one turn, unparseable
    lines, a 1 MiB line.  Each turn completes with its whole text, the probe
    keeps being answered, and nothing is quarantined or counted against the
    profile (the stdout reader keeps up; the stall timer sees the output)."""
    with trio.fail_after(60):
        async with serving(tmp_path, cfg(turn_stall_seconds=5.0, probe_interval_seconds=0.5,
                                         probe_timeout_seconds=5.0)) as r:
            await _register(r, "cx", "codex", "pooled", "--flood-count", "5000")
            (row,) = await warm_sessions(r, "cx")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cx", "ci")
            for prompt in ("@flood go", "@bad-json go", "@huge go"):
                turn = await turn_ended(r, (await start_turn(r, lease, prompt))["turn_id"])
                assert (turn["state"], turn["error"]) == ("completed", ""), turn
                assert turn["output_text"], turn
            assert _quarantine(r, sid) is None
            assert await _running_pid(r, sid) == row["process"]["pid"]  # the same process throughout
            h = await health(r, "cx")
            assert (h["crashes"], h["stalls"], h["probe_failures"], h["failed_turns"]) == (0, 0, 0, 0)


# -- stall --------------------------------------------------------------------------------


async def test_a_stall_ended_by_the_interrupt_is_an_interrupted_turn_not_a_quarantine(tmp_path):
    """Silence during a turn past turn_stall_seconds: the relay interrupts it;
    a provider that ends the turn within the grace leaves it ``interrupted``
    (error naming the stall), the session unquarantined, the process and the
    lease kept, one stall counted.  Probes meanwhile are answered."""
    with trio.fail_after(30):
        async with serving(tmp_path, cfg(turn_stall_seconds=1.0, probe_interval_seconds=0.2)) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cx", "ci")
            turn = await turn_ended(r, (await start_turn(r, lease, "@stall please"))["turn_id"])
            assert turn["state"] == "interrupted"
            assert turn["error"].startswith("stalled: no output for ")
            assert "interrupted by the relay" in turn["error"]
            assert _quarantine(r, sid) is None
            assert await _running_pid(r, sid) == row["process"]["pid"]
            again = await turn_ended(r, (await start_turn(r, lease, "still there?"))["turn_id"])
            assert again["state"] == "completed"
            h = await health(r, "cx")
            assert (h["stalls"], h["failed_turns"], h["quarantines"]) == (1, 0, {})

            async def probed():
                doc = (await r.client.get("/api/relay/runtime")).json()
                (proc,) = [p for p in doc["processes"] if p["session_id"] == sid]
                return proc if proc["last_probe_answered_at"] else None
            proc = await until_runtime(r, probed)
            assert proc["pid"] == row["process"]["pid"] and proc["last_output_at"]


async def test_a_hang_that_ignores_the_interrupt_is_heartbeat_lost(tmp_path):
    """A turn that stays silent after the interrupt (acknowledged, then
    ignored): after interrupt_grace_seconds the process is stopped and the
    session quarantined ``heartbeat_lost``."""
    with trio.fail_after(30):
        async with serving(tmp_path, cfg(turn_stall_seconds=0.5, interrupt_grace_seconds=0.5)) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cx", "ci")
            turn = await start_turn(r, lease, "@hang here")
            q = await quarantined(r, sid)
            assert q.code == "heartbeat_lost"
            assert "the interrupt did not end it within 0.5 s" in q.reason
            assert q.evidence["pid"] == row["process"]["pid"]
            assert any("hang: ignoring interrupt" in line for line in q.evidence["stderr"])
            await assert_failed(r, q, lease, turn["turn_id"])
            h = await health(r, "cx")
            assert (h["stalls"], h["quarantines"], h["crashes"]) == (1, {"heartbeat_lost": 1}, 0)
            assert not process_alive(row["process"]["pid"])


async def test_a_stall_without_an_interrupt_kimi_is_heartbeat_lost(tmp_path):
    """Kimi has no interrupt: a stalled Kimi turn is ``heartbeat_lost`` at once."""
    with trio.fail_after(30):
        async with serving(tmp_path, cfg(turn_stall_seconds=0.5)) as r:
            await _register(r, "km", "kimi", "one-borrow")
            (row,) = await warm_sessions(r, "km")
            sid = row["session_id"]
            lease = await borrow_lease(r, "km", "ci")
            turn = await start_turn(r, lease, "@stall forever")
            q = await quarantined(r, sid)
            assert q.code == "heartbeat_lost" and "Kimi has no interrupt" in q.reason
            await assert_failed(r, q, lease, turn["turn_id"])
            assert (await health(r, "km"))["stalls"] == 1


async def test_an_open_approval_or_command_is_no_stall(autojump_clock):
    """The stall timer counts silence only while the turn could be making
    output: not while an approval waits for the holder or a command runs, and
    from the later of the last output and the last work the relay gave it."""
    proc = relay.ProviderProcess("s1", ["true"], {}, "/", relay.CodexProtocol(), QUIET)
    proc.state = "running"
    live = relay.LiveSession("s1", rc.Profile("cx", "codex", "pooled"), proc)
    runtime = relay.Runtime(None, None, None, QUIET)
    assert runtime._stalled_for(live) == 0.0  # no turn
    live.turn = relay._TurnRun(rc.Turn("t1", "s1", "l1", "running"))
    live.activity_at = trio.current_time()
    await trio.sleep(5)
    assert runtime._stalled_for(live) == pytest.approx(5)
    live.output_at = trio.current_time()
    await trio.sleep(2)
    assert runtime._stalled_for(live) == pytest.approx(2)
    live.open_items.add("call_1")
    assert runtime._stalled_for(live) == 0.0
    live.open_items.clear()
    live.approvals["a1"] = trio.CancelScope()
    assert runtime._stalled_for(live) == 0.0


# -- wedge ---------------------------------------------------------------------------------


async def test_a_wedged_process_mid_turn_is_unresponsive(tmp_path):
    """A process that answers nothing any more (not even the probe) is
    stopped after probe_timeout_seconds and quarantined ``unresponsive``."""
    with trio.fail_after(30):
        async with serving(tmp_path, cfg(probe_interval_seconds=0.3, probe_timeout_seconds=0.5)) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cx", "ci")
            turn = await start_turn(r, lease, "@wedge now")
            q = await quarantined(r, sid)
            assert q.code == "unresponsive"
            assert q.reason == "unresponsive: no answer to the liveness probe within 0.5 s"
            assert any("wedged:" in line for line in q.evidence["stderr"])
            await assert_failed(r, q, lease, turn["turn_id"])
            h = await health(r, "cx")
            assert (h["probe_failures"], h["quarantines"]) == (1, {"unresponsive": 1})


async def test_an_idle_process_that_stops_answering_the_probe_is_unresponsive(tmp_path):
    """The probe runs on idle processes too (a warm Claude here): one that
    leaves it unanswered is quarantined ``unresponsive`` with no turn."""
    with trio.fail_after(30):
        async with serving(tmp_path, cfg(probe_interval_seconds=0.2, probe_timeout_seconds=0.3)) as r:
            await _register(r, "cl", "claude", "one-borrow", "--fault", "no-probe")
            (row,) = await warm_sessions(r, "cl")
            q = await quarantined(r, row["session_id"])
            assert q.code == "unresponsive"
            assert any("no-probe: not answering mcp_status" in x for x in q.evidence["stderr"])
            await assert_failed(r, q, None, None)
            assert q.evidence["turn_id"] is None
            assert (await health(r, "cl"))["probe_failures"] >= 1


# -- start failure ------------------------------------------------------------------------------


async def test_start_failures_back_off_degrade_the_profile_and_recover(tmp_path, monkeypatch):
    """A provider that exits before its handshake: each session quarantined
    ``start_failed`` (exit status, stderr), the next start waits 1x, 2x, ...
    the first backoff; after degraded_after_failures in a row the profile is
    ``degraded`` and tries once per SPAWN_BACKOFF_MAX_SECONDS; once a start
    succeeds it is healthy again and the pool fills."""
    monkeypatch.setattr(relay, "SPAWN_BACKOFF_FIRST_SECONDS", 0.2)
    monkeypatch.setattr(relay, "SPAWN_BACKOFF_MAX_SECONDS", 1.0)
    broken = tmp_path / "broken"
    broken.write_text("x")
    with trio.fail_after(40):
        async with serving(tmp_path, cfg(degraded_after_failures=3)) as r:
            await _register(r, "cx", "codex", "pooled", "--fault", "exit-before-handshake",
                            "--fail-while", str(broken))

            async def degraded():
                h = await health(r, "cx")
                return h if h.get("state") == "degraded" else None
            h = await until_runtime(r, degraded)
            broken.unlink()
            assert h["start_failures"] == h["consecutive_failures"] == 3
            text = (await r.client.get("/metrics")).text
            assert metric(text, "relay_provider_degraded", profile="cx") == 1
            (warm,) = await warm_sessions(r, "cx")
            ledger = r.server.service.owner.ledger
            failed = sorted((q for q in ledger.quarantines.values() if q.code == "start_failed"),
                            key=lambda q: q.quarantined_at)
            assert len(failed) >= 3
            q = failed[0]
            assert q.reason == "start_failed: exited with status 1 before the handshake"
            assert q.evidence["exit_status"] == 1 and q.evidence["turn_id"] is None
            assert any("failing before the handshake" in x for x in q.evidence["stderr"])
            at = [relay.parse_iso(x.quarantined_at) for x in failed]
            # 1x, 2x the first backoff (less a commit's delay: the stamps are the commits')
            assert at[1] - at[0] >= 0.15 and at[2] - at[1] >= 0.35
            started = relay.parse_iso(ledger.sessions[warm["session_id"]].created_at)
            assert started - at[-1] >= 0.9  # degraded: one try per SPAWN_BACKOFF_MAX_SECONDS
            h = await health(r, "cx")
            assert (h["state"], h["consecutive_failures"]) == ("healthy", 0)
            assert h["start_failures"] == len(failed)


async def test_no_handshake_in_time_and_a_claude_error_before_its_input_are_start_failed(tmp_path):
    """A Codex command that never answers ``initialize`` is stopped after
    startup_timeout_seconds; a Claude that prints an error result and exits
    before its first input: both ``start_failed``."""
    with trio.fail_after(30):
        async with serving(tmp_path, cfg(startup_timeout_seconds=0.5)) as r:
            await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled",
                       command=["sleep", "60"])
            await _register(r, "cl", "claude", "one-borrow", "--fault", "exit-before-handshake")

            async def both():
                codes = {}
                for q in r.server.service.owner.ledger.quarantines.values():
                    s = r.server.service.owner.ledger.sessions[q.session_id]
                    codes.setdefault(s.profile, q)
                return codes if len(codes) == 2 else None
            found = await until_runtime(r, both)
            cx, cl = found["cx"], found["cl"]
            assert cx.code == cl.code == "start_failed"
            assert cx.reason == "start_failed: no handshake within 0.5 s"
            assert cx.evidence["signal"] == "SIGTERM"  # `sleep` ignores stdin's end, not SIGTERM
            assert cl.reason == "start_failed: stand-in: failing before the handshake"
            assert cl.evidence["exit_status"] == 1
            assert (await health(r, "cl"))["start_failures"] >= 1


# -- scratch corruption --------------------------------------------------------------------------


async def test_damaged_scratch_is_tmp_corrupted(tmp_path):
    """A live session's scratch removed, replaced by another directory, or
    its provider config edited under the relay: each ``tmp_corrupted``, the
    process stopped; a turn asked for on a damaged session is refused."""
    with trio.fail_after(30):
        async with serving(tmp_path, QUIET) as r:
            await _register(r, "cx", pool_size=4)
            rows = await warm_sessions(r, "cx", 4)
            removed, replaced, edited, turned = (s["session_id"] for s in rows[:4])
            base = tmp_path / "flow" / "tmp" / "relay" / "sessions"
            lease = await borrow_lease(r, "cx", "ci", session=turned)
            (base / turned / "home" / "config.toml").write_text("# edited\n")
            refused = await r.post("StartTurn", session_id=turned, lease_id=lease["lease_id"],
                                   fencing_token=lease["fencing_token"], input="hi")
            assert refused.status_code != 200 and "tmp_corrupted" in refused.json()["message"]
            shutil.rmtree(base / removed)
            (base / replaced).rename(tmp_path / "elsewhere")
            (base / replaced).mkdir()
            (base / edited / "home" / "config.toml").write_text("model = 'other'\n")
            want = {removed: "is missing", replaced: "was replaced",
                    edited: "changed under the relay", turned: "changed under the relay"}
            for sid, text in want.items():
                q = await quarantined(r, sid)
                assert q.code == "tmp_corrupted" and text in q.reason, (sid, q.reason)
            await assert_failed(r, _quarantine(r, turned), lease, None)
            assert (await health(r, "cx"))["tmp_corrupted"] == 4
            for row in rows[:4]:
                async def gone(pid=row["process"]["pid"]):
                    return not process_alive(pid)
                await until_runtime(r, gone)


# -- relay restart --------------------------------------------------------------------------------


async def test_turns_a_dead_relay_left_running_fail_relay_restarted(tmp_path):
    """A ledger with a turn ``running`` (its server died): the next serve
    fails it ``relay_restarted`` (turn, result, end event), quarantines its
    session (lease revoked), and then repairs it before its first reconcile
    (tests/test_repair.py): the quarantine is cleared and s1 runs again."""
    store = relay.Store(tmp_path)
    command = (*STAND_IN, "--provider", "codex")
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled", command=command)
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    lease = commit_ok(store, "GrantLease", session_id="s1", holder="h", mode="exclusive-write",
                      ttl_seconds=3600).lease
    turn = commit_ok(store, "StartTurn", session_id="s1", lease_id=lease.lease_id,
                     fencing_token=lease.fencing_token, input="hi").turn
    with trio.fail_after(30):
        async with serving(tmp_path, QUIET) as r:
            q = r.server.service.owner.ledger.quarantines["s1"]  # recorded, then cleared by the repair
            assert q.code == "relay_restarted" and q.evidence["turn_id"] == turn.turn_id
            assert q.state == "cleared"
            await assert_failed(r, q, None, None)
            done = (await r.ok("GetTurn", turn_id=turn.turn_id))["turn"]
            assert done["state"] == "failed" and done["error"].startswith("relay_restarted: ")
            results = (await r.ok("ListResults", session_id="s1"))["records"]
            assert [(x["kind"], x["data"]["turn_id"]) for x in results] == [("turn.failed", turn.turn_id)]
            assert (await session_events(r, "s1"))[-1]["kind"] == "turn.failed"
            warm = await warm_sessions(r, "cx")
            assert "s1" in {s["session_id"] for s in warm}
            assert (await health(r, "cx"))["failed_turns"] == 1


def to_dict(lease: rc.Lease) -> dict:
    return rc.to_json(lease)


# -- real processes: SIGKILL of the provider, of the relay -----------------------------------------


@contextlib.asynccontextmanager
async def serve_process(root: Path, runtime: dict | None = None):
    """``python -m relay serve`` as a child process; yields (process, endpoint)."""
    if runtime:
        lines = ["[runtime]"] + [f"{k} = {v}" for k, v in runtime.items()]
        (root / "flow").mkdir(exist_ok=True)
        (root / "flow" / "relay.toml").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await trio.lowlevel.open_process(  # stderr: a pipe nobody reads would fill
        [sys.executable, "-m", "relay", "--root", str(root), "serve", "--port", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, "serve exited before printing its endpoint"
            line += chunk
        yield proc, json.loads(line)["endpoint"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True):
            await proc.wait()
            await proc.stdout.aclose()


async def _cli_register(root: Path, *argv: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = await trio.run_process([sys.executable, "-m", "relay", "--root", str(root), "profile",
                                   "register", *argv], env=env, capture_stdout=True,
                                  capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr


async def _rows(client: httpx2.AsyncClient) -> list[dict]:
    return (await client.post(f"/{rc.SERVICE}/ListSessions", json={})).json()["sessions"]


async def _poll(client, predicate):
    """The server is another process: nothing to await but its answers."""
    while True:
        value = predicate(await _rows(client))
        if value:
            return value
        await trio.sleep(0.05)


@pytest.mark.slow
async def test_sigkill_of_the_provider_mid_turn_reaches_the_borrowed_holder(tmp_path):
    """A real serve: the provider of a turn held under ``borrowed()`` is
    SIGKILLed; the holder's block is cancelled with LeaseLost naming the
    quarantine, recorded ``provider_exited`` with SIGKILL and the turn."""
    await _cli_register(tmp_path, "cx", "--provider", "codex", "--mode", "pooled", "--command",
                        " ".join([*STAND_IN, "--provider", "codex"]))
    with trio.fail_after(40):
        async with serve_process(tmp_path) as (_, endpoint), \
                httpx2.AsyncClient(base_url=endpoint) as client:
            await _poll(client, lambda rows: [s for s in rows if s["process"]["state"] == "running"])
            turn = None
            async with rc.AsyncRelayStub(endpoint) as stub:
                with pytest.raises(rc.LeaseLost, match="quarantined: provider_exited"):
                    async with stub.borrowed(profile="cx", holder="job-1") as lease:
                        turn = await lease.start("@stall long work")
                        (row,) = [s for s in await _rows(client) if s["session_id"] == lease.session_id]
                        os.kill(row["process"]["pid"], signal.SIGKILL)
                        await trio.sleep_forever()  # the lost lease cancels the block
            ledger = await _poll(client, lambda _: (lambda led: led if led.turns[
                turn.turn_id].state != "running" else None)(relay.Store(tmp_path).read()))
            q = ledger.quarantines[turn.session_id]
            assert (q.code, q.evidence["signal"], q.evidence["turn_id"]) == (
                "provider_exited", "SIGKILL", turn.turn_id)
            assert ledger.turns[turn.turn_id].error == q.reason


@pytest.mark.slow
async def test_sigkill_of_the_provider_mid_handshake_is_start_failed(tmp_path):
    """A real serve: a Codex process that has not answered ``initialize`` yet
    is SIGKILLed; the start fails at once (not at the startup timeout)."""
    with trio.fail_after(20):
        async with serve_process(tmp_path, {"startup_timeout_seconds": 60.0}) as (_, endpoint), \
                httpx2.AsyncClient(base_url=endpoint) as client:
            # registered once serving (serve's first pass would wait for the handshake)
            await client.post(f"/{rc.SERVICE}/RegisterProfile", json={
                "name": "cx", "provider": "codex", "mode": "pooled", "command": ["sleep", "60"]})
            row = await _poll(client, lambda rows: next(
                (s for s in rows if s["process"]["state"] == "starting"), None))
            os.kill(row["process"]["pid"], signal.SIGKILL)

            def failed(_rows):
                q = relay.Store(tmp_path).read().quarantines.get(row["session_id"])
                return q
            q = await _poll(client, failed)
            assert q.code == "start_failed"
            assert q.reason == "start_failed: exited with status -9 before the handshake"
            assert q.evidence["signal"] == "SIGKILL"


@pytest.mark.slow
async def test_sigkill_of_the_relay_kills_its_providers_and_the_next_serve_reconciles(tmp_path):
    """SIGKILL of ``serve`` with two turns running: every provider is gone
    within moments (PDEATHSIG; the time is printed), and the next serve fails
    both turns ``relay_restarted``, quarantines their sessions and repairs
    them (their threads resumed in fresh processes)."""
    await _cli_register(tmp_path, "cx", "--provider", "codex", "--mode", "pooled", "--pool-size",
                        "2", "--command", " ".join([*STAND_IN, "--provider", "codex"]))
    turns = []
    with trio.fail_after(60):
        async with serve_process(tmp_path) as (server, endpoint), \
                httpx2.AsyncClient(base_url=endpoint) as client:
            await _poll(client, lambda rows: sum(s["process"]["state"] == "running" for s in rows) >= 2)
            async with rc.AsyncRelayStub(endpoint) as stub:
                for holder in ("a", "b"):
                    lease = (await stub.borrow(profile="cx", holder=holder, ttl_seconds=3600)).lease
                    turns.append((await stub.start_turn(
                        session_id=lease.session_id, lease_id=lease.lease_id,
                        fencing_token=lease.fencing_token, input="@stall work")).turn)
            pids = [s["process"]["pid"] for s in await _rows(client)
                    if s["session_id"] in {t.session_id for t in turns}]
            pidfds = [os.pidfd_open(pid) for pid in pids]
            server.kill()
            killed = time.monotonic()
            for fd in pidfds:
                await trio.lowlevel.wait_readable(fd)
            took = time.monotonic() - killed
            for fd in pidfds:
                os.close(fd)
            await server.wait()
        print(f"providers gone {took * 1000:.1f} ms after SIGKILL of serve")
        assert took < 2.0 and not any(process_alive(p) for p in pids)
        async with serving(tmp_path, QUIET) as r:
            for t in turns:
                q = r.server.service.owner.ledger.quarantines[t.session_id]
                assert q.code == "relay_restarted" and q.evidence["turn_id"] == t.turn_id
                assert q.state == "cleared"  # repaired at start
                done = (await r.ok("GetTurn", turn_id=t.turn_id))["turn"]
                assert done["state"] == "failed" and done["error"].startswith("relay_restarted")
            warm = await warm_sessions(r, "cx", 2)
            assert {t.session_id for t in turns} <= {s["session_id"] for s in warm}
            assert not {s["process"]["pid"] for s in warm} & set(pids)


def test_a_quarantine_recorded_before_codes_reads_as_an_operators(tmp_path):
    """A ledger (and a stored QuarantineSession reply) written before
    ``code`` and ``evidence`` existed reads as ``operator`` / null; the
    operator's RPC records ``operator``, the domain function any code."""
    import hashlib

    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    commit_ok(store, "CreateSession", profile="cx", session_id="s2")
    reply = commit_ok(store, "QuarantineSession", session_id="s1", reason="disk full")
    assert (reply.quarantine.code, reply.quarantine.evidence) == ("operator", None)
    ledger = store.read()
    ledger, made = relay.quarantine(ledger, "s2", "heartbeat_lost", "heartbeat_lost: quiet",
                                    {"turn_id": "t1"}, relay.Ctx(time.time(), 99))
    assert (made.quarantine.code, made.quarantine.evidence) == ("heartbeat_lost", {"turn_id": "t1"})
    with pytest.raises(relay.InvalidArgument, match="is not one of"):
        relay.quarantine(ledger, "s2", "bogus", "x", None, relay.Ctx(time.time(), 99))
    doc = json.loads(store.ledger_path.read_bytes())
    for q in doc["quarantines"].values():
        del q["code"], q["evidence"]
    for record in doc["requests"].values():
        if isinstance(record.get("reply"), dict) and "quarantine" in record["reply"]:
            del record["reply"]["quarantine"]["code"], record["reply"]["quarantine"]["evidence"]
    body = {k: v for k, v in doc.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    sealed = text[:-1] + b',"checksum":"sha256:' + hashlib.sha256(text).hexdigest().encode() + b'"}\n'
    old = relay.decode_ledger(sealed)
    assert (old.quarantines["s1"].code, old.quarantines["s1"].evidence) == ("operator", None)


# -- the watchdog's timers on trio's virtual clock (default settings) -------------------------


@attrs.define(eq=False)
class _FakeProcess:
    """What the watchdog uses of a ProviderProcess: writes recorded, stop noted."""

    protocol: object
    state: str = "running"
    returncode: int | None = None
    pid: int = 4242
    stderr: list = attrs.Factory(lambda: ["stand-in: last words"])
    written: list = attrs.Factory(list)
    wrote: object = attrs.Factory(trio.Event)
    stopped: str = ""
    stopped_at: float = 0.0
    exited: object = attrs.Factory(trio.Event)

    async def write(self, data: bytes) -> None:
        self.written.append(data)
        self.wrote.set()
        self.wrote = trio.Event()

    async def stop(self, reason: str) -> None:
        self.stopped, self.stopped_at, self.state = reason, trio.current_time(), "stopping"
        self.returncode = -15
        self.exited.set()


class _Owner:
    """A ledger owner in memory: each mutation applied at once, at T0 + trio time."""

    def __init__(self, ledger: relay.Ledger) -> None:
        self.ledger = ledger

    async def submit(self, mutation: relay.Mutation):
        from conftest import T0

        ctx = relay.Ctx(T0 + trio.current_time(), self.ledger.revision + 1)
        ledger, reply = mutation.apply(self.ledger, ctx)
        self.ledger = attrs.evolve(ledger, revision=ctx.revision)
        return reply


def _watched(tmp_path: Path, config: relay.Config, with_turn: bool):
    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="cl", provider="claude", mode="one-borrow")
    commit_ok(store, "CreateSession", profile="cl", session_id="s1")
    lease = commit_ok(store, "GrantLease", session_id="s1", holder="h", mode="exclusive-write",
                      ttl_seconds=3600).lease
    owner = _Owner(store.read())
    runtime = relay.Runtime(owner, None, store, config)
    proc = _FakeProcess(relay.ClaudeProtocol())
    live = relay.LiveSession("s1", owner.ledger.profiles["cl"], proc, started=True)
    if with_turn:
        turn = commit_ok(store, "StartTurn", session_id="s1", lease_id=lease.lease_id,
                         fencing_token=lease.fencing_token, input="hi").turn
        owner.ledger = store.read()
        live.turn = relay._TurnRun(turn)
        live.turn.started.set()
    return runtime, owner, proc, live, lease


async def test_probe_timer_with_default_settings(autojump_clock, tmp_path):
    """Defaults on virtual time: a probe every 30 s, idle; answered ones keep
    the process; the first left unanswered stops it 10 s later, unresponsive."""
    runtime, owner, proc, live, lease = _watched(tmp_path, relay.Config(), with_turn=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runtime._watch, live)
        for k in (1, 2):
            await proc.wrote.wait()
            assert trio.current_time() == pytest.approx(30 * k) and b"mcp_status" in proc.written[-1]
            live.resolve("probe", "answered")
        await proc.exited.wait()
    assert proc.stopped_at == pytest.approx(100)  # the third probe at 90 s, unanswered for 10 s
    assert proc.stopped == "unresponsive: no answer to the liveness probe within 10.0 s"
    q = owner.ledger.quarantines["s1"]
    assert (q.code, q.evidence["pid"], q.evidence["stderr"]) == ("unresponsive", 4242,
                                                                 ["stand-in: last words"])
    assert owner.ledger.leases[lease.lease_id].state == "revoked"
    assert runtime.health["cl"].probe_failures == 1 and live.probe_answered_at


async def test_stall_timer_with_default_settings(autojump_clock, tmp_path):
    """Defaults on virtual time: 120 s of silence in a turn sends the
    interrupt; no end within 10 s more stops the process, heartbeat_lost."""
    config = attrs.evolve(relay.Config(), probe_interval_seconds=10_000.0)
    runtime, owner, proc, live, lease = _watched(tmp_path, config, with_turn=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runtime._watch, live)
        await proc.wrote.wait()
        assert trio.current_time() == pytest.approx(120) and b'"interrupt"' in proc.written[-1]
        await proc.exited.wait()
    assert proc.stopped_at == pytest.approx(130)
    assert proc.stopped.startswith("heartbeat_lost: no output for 120.0 s during turn ")
    q = owner.ledger.quarantines["s1"]
    assert q.code == "heartbeat_lost" and q.evidence["turn_id"] == live.turn.turn.turn_id
    assert runtime.health["cl"].stalls == 1
