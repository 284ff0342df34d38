"""The gate's runtime checks (issue 12): running turns under a live exclusive
lease, no turn on a quarantined session, every provider process owned by a
non-closed session, none left from a dead server, the scratch of running
providers intact.  Each check has a passing and a failing case, built from
real ledger mutations and real processes carrying the workspace's scratch
marker (killed in a ``finally``); one test runs a real server with a turn in
flight.  The gate never writes to flow/state."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import T0, commit_ok, snapshot

import relay

REPO = Path(__file__).resolve().parent.parent
RUNTIME_IDS = ("running_turns_leased", "no_turn_on_quarantined_session", "provider_processes_owned",
               "no_orphan_provider_processes", "provider_scratch_intact")


def run_gate(root: Path, now: float = T0 + 60, served: bool = False) -> dict[str, relay.Check]:
    """The runtime checks only; flow/state is the same before and after (unless
    a server writes to it meanwhile)."""
    before = {k: v for k, v in snapshot(root).items() if k.startswith("flow/state")}
    store = relay.Store(root)
    checks = relay.gate(store, relay.load_config(store.flow), now=now, only=RUNTIME_IDS)
    assert served or {k: v for k, v in snapshot(root).items() if k.startswith("flow/state")} == before
    assert [c.id for c in checks] == list(RUNTIME_IDS)
    return {c.id: c for c in checks}


def assert_checks(checks: dict[str, relay.Check], fail: tuple[str, ...] = ()) -> None:
    got = {ident: c.result for ident, c in checks.items()}
    assert got == {ident: "fail" if ident in fail else "pass" for ident in RUNTIME_IDS}, checks
    for ident in fail:
        assert checks[ident].evidence and checks[ident].repair, checks[ident]


def workspace_with_turn(root: Path) -> tuple[relay.Store, str, str]:
    """A pooled profile, sessions s1 (a lease and a running turn) and s2 (idle):
    (store, lease id, turn id)."""
    store = relay.Store(root)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    for sid in ("s1", "s2"):
        commit_ok(store, "CreateSession", profile="cx", session_id=sid)
    lease = commit_ok(store, "GrantLease", session_id="s1", holder="ci", mode="exclusive-write",
                      ttl_seconds=600).lease
    turn = commit_ok(store, "StartTurn", session_id="s1", lease_id=lease.lease_id,
                     fencing_token=lease.fencing_token, input="hello").turn
    return store, lease.lease_id, turn.turn_id


@contextlib.contextmanager
def provider_like(root: Path, sid: str, *, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A real process in its own group carrying the workspace's scratch marker
    for ``sid`` (what the runtime puts in a provider's environment)."""
    scratch = relay.make_scratch(relay.Store(root).tmp_dir, sid)["root"]
    env = dict(os.environ, FLOW_RELAY_SCRATCH=str(scratch), FLOW_RELAY_SESSION=sid)
    proc = subprocess.Popen(["sleep", "60"], env=env, cwd=str(cwd or scratch / "work"),
                            start_new_session=True)
    try:
        # Popen returns once exec began; the new environment shows in /proc a
        # moment later (the kernel sets it up after closing the exec pipe).
        marker, deadline = f"FLOW_RELAY_SCRATCH={scratch}".encode(), time.monotonic() + 5
        while marker not in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"):
            assert time.monotonic() < deadline, "the child never showed its environment"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def write_record(root: Path, server_pid: int, procs: dict[str, subprocess.Popen],
                 **scratch: str) -> None:
    """flow/tmp/relay/providers.json as a server with ``server_pid`` writes it
    for ``procs`` (session id -> process)."""
    tmp_dir = relay.Store(root).tmp_dir
    rows = [{"pid": proc.pid, "pgid": proc.pid, "session_id": sid,
             "scratch": scratch.get(sid, str(tmp_dir / "sessions" / sid))}
            for sid, proc in procs.items()]
    relay._write_record(tmp_dir, rows)
    path = tmp_dir / "providers.json"
    doc = json.loads(path.read_text())
    doc["server_pid"] = server_pid
    path.write_text(json.dumps(doc))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- turns --------------------------------------------------------------------------


def test_running_turn_under_its_live_lease_passes(tmp_path):
    workspace_with_turn(tmp_path)
    assert_checks(run_gate(tmp_path))


@pytest.mark.parametrize("how", ["released", "expired", "gone"])
def test_running_turn_without_a_live_lease_fails(tmp_path, how):
    store, lease_id, turn_id = workspace_with_turn(tmp_path)
    now = T0 + 60
    if how == "released":
        commit_ok(store, "ReleaseLease", lease_id=lease_id)
    elif how == "expired":
        now = T0 + 3600  # the lease ran out (ttl 600 s); nothing marked it yet
    else:
        ledger = store.read()
        leases = {k: v for k, v in ledger.leases.items() if k != lease_id}
        store.ledger_path.write_bytes(relay.encode_ledger(relay.attrs.evolve(ledger, leases=leases)))
    checks = run_gate(tmp_path, now)
    assert_checks(checks, fail=("running_turns_leased",))
    check = checks["running_turns_leased"]
    want = {"released": "is released", "expired": "is expired", "gone": "is not in the ledger"}[how]
    assert check.evidence == f"running turn {turn_id} on s1: its lease {lease_id} {want}"
    assert check.repair.startswith(f"python -m relay serve (a starting server fails turn {turn_id}")


def test_quarantined_session_serving_a_turn_fails(tmp_path):
    store, _, turn_id = workspace_with_turn(tmp_path)
    commit_ok(store, "QuarantineSession", session_id="s1", reason="provider_exited: exit status -9")
    checks = run_gate(tmp_path)
    # The quarantine revoked the lease too: both turn checks name the turn.
    assert_checks(checks, fail=("running_turns_leased", "no_turn_on_quarantined_session"))
    assert checks["no_turn_on_quarantined_session"].evidence == (
        f"session s1 is quarantined (provider_exited: exit status -9) but runs turn {turn_id}")
    assert turn_id in checks["no_turn_on_quarantined_session"].repair


def test_a_quarantined_session_whose_turn_ended_passes(tmp_path):
    store, _, turn_id = workspace_with_turn(tmp_path)
    commit_ok(store, "QuarantineSession", session_id="s1", reason="provider_exited: exit status -9")
    relay.commit_one(store, relay.Mutation(lambda led, ctx: relay.end_turn(
        led, turn_id, "failed", "", "provider_exited", None, ctx), "end_turn"), relay.Config())
    assert_checks(run_gate(tmp_path, now=relay.time.time()))


# -- provider processes --------------------------------------------------------------


def test_provider_of_a_ready_session_under_a_live_server_passes(tmp_path):
    workspace_with_turn(tmp_path)
    with provider_like(tmp_path, "s1") as proc:
        write_record(tmp_path, os.getpid(), {"s1": proc})  # we are its parent: a live "server"
        checks = run_gate(tmp_path)
        assert_checks(checks)
        assert "1 provider processes" in checks["no_orphan_provider_processes"].evidence
        assert "running providers" in checks["provider_scratch_intact"].evidence


@pytest.mark.parametrize("whose", ["unknown session", "closed session"])
def test_provider_process_of_no_live_session_fails(tmp_path, whose):
    store, _, _ = workspace_with_turn(tmp_path)
    sid = "s-gone" if whose == "unknown session" else "s2"
    if whose == "closed session":
        relay.commit(store, [relay.Mutation(lambda led, ctx: relay.close_session(
            led, "s2", "test", ctx), "close_session")], relay.Config(), T0 + 1)
    with provider_like(tmp_path, sid) as proc:
        write_record(tmp_path, os.getpid(), {sid: proc})
        checks = run_gate(tmp_path)
        assert_checks(checks, fail=("provider_processes_owned",))
        what = "not in the ledger" if whose == "unknown session" else "closed"
        assert checks["provider_processes_owned"].evidence == (
            f"pid {proc.pid} (group {proc.pid}) runs for session {sid}, which is {what}")
        assert checks["provider_processes_owned"].repair.startswith(f"kill -TERM -- -{proc.pid}")


@pytest.mark.parametrize("spelling", ["relative", "through a link"])
def test_the_workspace_is_found_however_its_root_is_spelled(tmp_path, monkeypatch, spelling):
    workspace_with_turn(tmp_path / "ws")
    with provider_like(tmp_path / "ws", "s-gone"):
        if spelling == "relative":
            monkeypatch.chdir(tmp_path)
            root = Path("ws")
        else:
            root = tmp_path / "link"
            root.symlink_to(tmp_path / "ws")
        checks = run_gate(root)
        assert_checks(checks, fail=("provider_processes_owned", "no_orphan_provider_processes"))


def test_other_workspaces_providers_are_not_this_gates(tmp_path):
    """A process marked with another workspace's scratch (a prefix of ours, even)
    is none of this gate's business."""
    workspace_with_turn(tmp_path / "ws")
    with provider_like(tmp_path / "ws-other", "s-gone"):
        assert_checks(run_gate(tmp_path / "ws"))


def test_provider_left_by_a_dead_server_fails_until_serve_reaps_it(tmp_path):
    workspace_with_turn(tmp_path)
    with provider_like(tmp_path, "s1") as proc:
        dead = dead_pid()
        write_record(tmp_path, dead, {"s1": proc})
        checks = run_gate(tmp_path)
        assert_checks(checks, fail=("no_orphan_provider_processes",))
        check = checks["no_orphan_provider_processes"]
        assert check.evidence == (f"pid {proc.pid} (session s1, group {proc.pid}) outlived its "
                                  f"server: providers.json names server pid {dead}, which is gone")
        assert check.repair.startswith("python -m relay serve (at start it kills")
        # the repair: what serve runs first
        assert relay.reap_orphans(relay.Store(tmp_path).tmp_dir) == 1
        proc.wait(timeout=5)
        assert_checks(run_gate(tmp_path))


def test_a_reused_server_pid_is_not_a_live_server(tmp_path):
    """providers.json names a live pid that is not its providers' parent: the
    server died and its pid was reused."""
    workspace_with_turn(tmp_path)
    with provider_like(tmp_path, "s1") as proc, provider_like(tmp_path, "s2") as impostor:
        write_record(tmp_path, impostor.pid, {"s1": proc})
        checks = run_gate(tmp_path)
        assert_checks(checks, fail=("no_orphan_provider_processes",))
        assert f"pid {proc.pid} (session s1" in checks["no_orphan_provider_processes"].evidence


def test_unrecorded_provider_with_no_server_fails_naming_a_kill(tmp_path):
    workspace_with_turn(tmp_path)
    with provider_like(tmp_path, "s1") as proc:
        checks = run_gate(tmp_path)
        assert_checks(checks, fail=("no_orphan_provider_processes",))
        check = checks["no_orphan_provider_processes"]
        assert "no live server records its group" in check.evidence
        assert check.repair == f"kill -KILL -- -{proc.pid} (no record names it, so serve will not)"


# -- scratch -----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["scratch removed", "work replaced", "home a link",
                                    "record disagrees"])
def test_damaged_scratch_of_a_running_provider_fails(tmp_path, damage):
    workspace_with_turn(tmp_path)
    scratch = relay.Store(tmp_path).tmp_dir / "sessions" / "s1"
    with provider_like(tmp_path, "s1") as proc:
        write_record(tmp_path, os.getpid(), {"s1": proc},
                     **({"s1": str(scratch) + "-old"} if damage == "record disagrees" else {}))
        if damage == "scratch removed":
            shutil.rmtree(scratch)
        elif damage == "work replaced":
            shutil.rmtree(scratch / "work")
            (scratch / "work").mkdir()
        elif damage == "home a link":
            shutil.rmtree(scratch / "home")
            (scratch / "home").symlink_to(tmp_path)
        checks = run_gate(tmp_path)
        assert_checks(checks, fail=("provider_scratch_intact",))
        evidence = checks["provider_scratch_intact"].evidence
        assert evidence.startswith(f"session s1 (pid {proc.pid}): ")
        assert {"scratch removed": f"{scratch} is missing",
                "work replaced": f"its working directory {scratch / 'work'} was removed under it",
                "home a link": f"{scratch / 'home'} is a link",
                "record disagrees": "providers.json records scratch"}[damage] in evidence
        assert "tmp_corrupted" in checks["provider_scratch_intact"].repair


# -- a real server with a turn in flight -----------------------------------------------


async def test_a_served_workspace_with_a_turn_in_flight_passes(tmp_path):
    """A real server, two warm stand-in sessions, one stalled mid-turn under its
    lease: every runtime check passes; once serve is gone (graceful stop) too."""
    from serve_helpers import (STAND_IN, borrow_lease, profile_sessions, serving, start_turn,
                               until_runtime, warm_sessions)

    config = relay.Config(stop_stdin_seconds=1.0, stop_term_seconds=1.0, stop_kill_seconds=1.0)
    with trio.fail_after(30):
        async with serving(tmp_path, config) as r:
            await r.ok("RegisterProfile", name="cx", provider="codex", mode="pooled", pool_size=2,
                       command=[*STAND_IN, "--provider", "codex"])
            await warm_sessions(r, "cx", 2)
            lease = await borrow_lease(r, "cx", "ci")
            await start_turn(r, lease, "@stall wait here")
            live = r.server.service.runtime.sessions[lease["session_id"]]
            await live.proc.wait_stderr("stalled:")

            async def refilled():  # the pool back to 2 idle besides the leased one
                rows = [s for s in await profile_sessions(r, "cx") if s["process"]["state"] == "running"]
                return len(rows) >= 3
            await until_runtime(r, refilled)
            checks = await trio.to_thread.run_sync(run_gate, tmp_path, relay.time.time(), True)
            assert_checks(checks)
            assert "1 running turns" in checks["running_turns_leased"].evidence
            # 3 providers, all of this server
            assert checks["no_orphan_provider_processes"].evidence.startswith("3 provider processes")
    assert_checks(run_gate(tmp_path, relay.time.time()))


# A known httpx2 limitation, as in test_runtime.py: lease.run's SSE iterators are nested
# async generators that an early close leaves to the garbage collector.
@pytest.mark.filterwarnings(r"ignore:Async generator '(httpx2|httpcore2)\.:ResourceWarning")
@pytest.mark.slow
async def test_a_sigkilled_server_leaves_a_command_behind_until_the_next_serve(tmp_path):
    """SIGKILL of ``serve`` takes its provider along (PDEATHSIG), but a command
    the agent detached into its group survives: no_orphan_provider_processes
    fails naming it and ``serve``; the next ``serve`` kills it at start and the
    gate passes."""
    import sys

    import relay_client as rc
    from serve_helpers import STAND_IN, process_alive, serving

    env = dict(os.environ, PYTHONPATH=str(REPO))
    root = str(tmp_path)
    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", now=relay.time.time(), name="cx", provider="codex",
              mode="pooled", command=(*STAND_IN, "--provider", "codex"))
    commit_ok(store, "CreateSession", now=relay.time.time(), profile="cx", session_id="s1")
    detached = 0
    try:
        with trio.fail_after(30):
            server = await trio.lowlevel.open_process(
                [sys.executable, "-m", "relay", "--root", root, "serve", "--port", "0", "--json"],
                stdout=subprocess.PIPE, env=env)
            line = b""
            while not line.endswith(b"\n"):
                line += await server.stdout.receive_some(4096)
            async with rc.AsyncRelayStub(json.loads(line)["endpoint"]) as stub:
                lease = rc.AsyncBorrowedLease(stub, (await stub.borrow(session_id="s1", holder="ci")).lease)
                turn = await lease.run("@detach leave something running")  # StartTurn waits for the start
                detached = int(turn.output_text.rsplit("[detach pid ", 1)[1].split("]")[0])
                (row,) = [x for x in (await stub.list_sessions()).sessions if x.session_id == "s1"]
            provider = os.pidfd_open(row.process.pid)
            server.kill()
            await server.wait()
            await trio.lowlevel.wait_readable(provider)  # PDEATHSIG: the provider is gone
            os.close(provider)
            await server.stdout.aclose()
        assert process_alive(detached)
        checks = run_gate(tmp_path, relay.time.time())
        assert checks["no_orphan_provider_processes"].result == "fail", checks
        check = checks["no_orphan_provider_processes"]
        assert check.evidence.startswith(f"pid {detached} (session s1, group {row.process.pid}) outlived")
        assert check.repair.startswith("python -m relay serve")
        with trio.fail_after(30):
            async with serving(tmp_path):  # its runtime reaps what the dead server recorded
                gone = os.pidfd_open(detached)
                await trio.lowlevel.wait_readable(gone)
                os.close(gone)
                checks = await trio.to_thread.run_sync(run_gate, tmp_path, relay.time.time(), True)
                assert checks["no_orphan_provider_processes"].result == "pass", checks
    finally:
        if detached and process_alive(detached):
            os.kill(detached, 9)


async def test_the_next_serve_repairs_a_turn_left_running(tmp_path):
    """A running turn whose lease is gone (a server died under it) fails
    running_turns_leased naming serve; a starting serve fails the turn
    (relay_restarted) and the gate passes."""
    from serve_helpers import serving

    store, lease_id, turn_id = workspace_with_turn(tmp_path)
    commit_ok(store, "ReleaseLease", lease_id=lease_id)
    checks = run_gate(tmp_path)
    assert checks["running_turns_leased"].result == "fail"
    assert checks["running_turns_leased"].repair.startswith("python -m relay serve")
    with trio.fail_after(30):
        async with serving(tmp_path):
            pass
    turn = relay.Store(tmp_path).read().turns[turn_id]
    assert turn.state == "failed" and turn.error.startswith("relay_restarted"), turn
    assert_checks(run_gate(tmp_path, relay.time.time()))
