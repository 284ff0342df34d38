"""The live runtime: provider processes under supervision, pools, turns, fencing,
approvals and the pooled hand-over, driven with the stand-in provider (real
processes, synchronised on events; every wait bounded by trio.fail_after)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import attrs
import pytest
import trio

import relay
import relay_client as rc

ROOT = Path(__file__).resolve().parent.parent
FAST = relay.Config(stop_stdin_seconds=1.0, stop_term_seconds=1.0, stop_kill_seconds=1.0,
                    startup_timeout_seconds=5.0, handover_timeout_seconds=2.0,
                    approval_timeout_seconds=30.0)


def _proc(tmp_path: Path, *args: str, provider: str = "codex") -> relay.ProviderProcess:
    dirs = relay.make_scratch(tmp_path / "flow" / "tmp" / "relay", "s1")
    env = dict(os.environ, HOME=str(dirs["home"]), CODEX_HOME=str(dirs["home"]),
               TMPDIR=str(dirs["tmp"]), FLOW_RELAY_SCRATCH=str(dirs["root"]))
    proto = relay._PROTOCOLS[provider]()
    return relay.ProviderProcess("s1", [*STAND_IN, "--provider", provider, *args], env,
                                 str(dirs["work"]), proto, FAST)


async def _next(proc: relay.ProviderProcess, kind: str) -> relay.WireEvent:
    async for batch in proc.events:
        for event in batch:
            if event.kind == kind:
                return event
    raise AssertionError(f"stdout ended before {kind}")


# -- the process supervisor ------------------------------------------------------


async def test_provider_runs_in_its_own_group_and_stops_on_stdin_close(tmp_path):
    """A provider is spawned in its own process group with the scratch as its
    cwd, handshakes over its pipes, and exits when its stdin closes (no zombie)."""
    proc = _proc(tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            proc.spawn(0.0)
            await nursery.start(proc.run)
            assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
            await proc.write(proc.protocol.send_initialize())
            done = await _next(proc, "handshake.completed")
            assert done.provider_version == "0.163.0-standin"
            await proc.stop("test")
    assert proc.state == "exited" and proc.returncode == 0
    assert not process_alive(proc.pid)
    assert any("pid" in line for line in proc.stderr)


async def test_stop_escalates_to_sigkill_of_the_group(tmp_path):
    """A provider that ignores stdin EOF and SIGTERM (wedged) is SIGKILLed with
    its whole group, each step bounded by the [runtime] settings."""
    proc = _proc(tmp_path, "--fault", "ignore-term", "--fault", "wedge")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            proc.spawn(0.0)
            await nursery.start(proc.run)
            await proc.write(proc.protocol.send_initialize())
            await _next(proc, "handshake.completed")
            await proc.write(proc.protocol.send_thread_start(cwd=proc.cwd))
            thread = await _next(proc, "thread.started")
            await proc.write(proc.protocol.send_turn_start(thread.thread_id, "hello"))
            await proc.wait_stderr("wedged:")
            started = trio.current_time()
            await proc.stop("test")
            took = trio.current_time() - started
    assert proc.returncode == -signal.SIGKILL
    assert 2.0 <= took < 4.0  # stdin wait + SIGTERM wait, then SIGKILL at once
    assert not process_alive(proc.pid)


def test_orphans_of_a_dead_server_are_killed(tmp_path):
    """Provider groups recorded by a server that died are killed at the next
    start; other processes in no recorded group are left alone."""
    import subprocess

    tmp_dir = tmp_path / "flow" / "tmp" / "relay"
    scratch = tmp_dir / "sessions" / "s1"
    scratch.mkdir(parents=True)
    env = dict(os.environ, FLOW_RELAY_SCRATCH=str(scratch))
    orphan = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        relay._write_record(tmp_dir, [{"pid": orphan.pid, "pgid": orphan.pid, "session_id": "s1",
                                       "scratch": str(scratch)},
                                      {"pid": bystander.pid, "pgid": bystander.pid,
                                       "session_id": "s2", "scratch": str(tmp_dir / "other")}])
        doc = (tmp_dir / "providers.json").read_text().replace(str(os.getpid()), str(dead.pid), 1)
        (tmp_dir / "providers.json").write_text(doc)
        assert relay.reap_orphans(tmp_dir) == 1
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait()


# -- the runtime in a real server ----------------------------------------------------

from serve_helpers import (  # noqa: E402
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

CODEX = ["--command", " ".join([*STAND_IN, "--provider", "codex"])]


async def _register(r, name: str, provider: str = "codex", mode: str = "pooled", *,
                    command: list[str] | None = None, **fields):
    argv = command or [*STAND_IN, "--provider", provider]
    await r.ok("RegisterProfile", name=name, provider=provider, mode=mode, command=argv, **fields)


async def test_pool_keeps_warm_handshaken_sessions(tmp_path):
    """A pooled profile gets pool_size ready sessions, each with a live,
    handshaken process shown in the session projection."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx", pool_size=2)
            rows = await warm_sessions(r, "cx", 2)
            assert {s["process"]["provider_version"] for s in rows} == {"0.163.0-standin"}
            pids = {s["process"]["pid"] for s in rows}
            assert len(pids) == 2 and all(process_alive(p) for p in pids)
            for s in rows:  # each in its own group, with its own scratch
                assert os.getpgid(s["process"]["pid"]) == s["process"]["pid"]
                assert (tmp_path / "flow/tmp/relay/sessions" / s["session_id"] / "home").is_dir()
        # serve stopped: no provider outlives it, and none is left recorded
        assert not any(process_alive(p) for p in pids)
        assert '"processes": []' in (tmp_path / "flow/tmp/relay/providers.json").read_text()


async def test_turn_streams_events_deltas_and_one_result(tmp_path):
    """A turn is answered running, streams live deltas, and leaves durable
    provider-neutral events (native frame kept) and exactly one result."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            lease = await borrow_lease(r, "cx", "ci-1")
            async with r.sse({"session": row["session_id"]}) as sse:
                turn = await start_turn(r, lease, "say hi", task_ref="task/42")
                assert turn["state"] == "running" and turn["task_ref"] == "task/42"
                seen = []
                while not seen or seen[-1]["event"] != "event" or \
                        seen[-1]["data"]["kind"] != "turn.completed":
                    seen.append(await sse.next())
            deltas = [e for e in seen if e["event"] == "delta"]
            assert deltas and "id" not in deltas[0]
            assert "".join(d["data"]["delta"] for d in deltas).startswith("Hello from stand-in")
            done = await turn_ended(r, turn["turn_id"])
            assert done["state"] == "completed"
            assert done["output_text"] == "Hello from stand-in #1 (history 0): say hi"
            kinds = [e["kind"] for e in await session_events(r, row["session_id"])]
            assert kinds[0] == "turn.started" and kinds[-1] == "turn.completed"
            assert "item.completed" in kinds
            item = next(e for e in await session_events(r, row["session_id"])
                        if e["kind"] == "item.completed" and e["data"]["item_type"] == "agent_message")
            assert item["data"]["turn_id"] == turn["turn_id"]
            assert item["data"]["native"]["method"] == "item/completed"
            results = (await r.ok("ListResults", session_id=row["session_id"]))["records"]
            assert [x["kind"] for x in results] == ["turn.completed"]
            assert results[0]["data"]["output_text"] == done["output_text"]
            tasks = (await r.client.get("/api/relay/tasks")).json()["tasks"]
            assert [(t["task_ref"], t["completed"]) for t in tasks] == [("task/42", 1)]
            listed = (await r.client.get("/api/relay/turns", params={"task_ref": "task/42"})).json()
            assert [t["turn_id"] for t in listed["turns"]] == [turn["turn_id"]]


async def test_fencing_refuses_a_stale_holder_racing_the_new_one(tmp_path):
    """After a hand-over the old holder's token is refused (naming the current
    one) while the new holder's turn, sent at the same moment, runs; a second
    turn while one runs is refused naming it; a reader lease cannot start one."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            old = await borrow_lease(r, "cx", "old")
            await r.ok("ReleaseLease", lease_id=old["lease_id"])
            new = await borrow_lease(r, "cx", "new", session=row["session_id"])
            assert new["fencing_token"] == old["fencing_token"] + 1
            answers: dict[str, object] = {}

            async def start(name, lease, text):
                answers[name] = await r.post("StartTurn", session_id=lease["session_id"],
                                             lease_id=lease["lease_id"],
                                             fencing_token=lease["fencing_token"], input=text)

            async with trio.open_nursery() as race:
                race.start_soon(start, "old", old, "stale write")
                race.start_soon(start, "new", new, "@stall fresh write")
            stale = answers["old"].json()
            assert answers["old"].status_code == 400 and stale["code"] == "failed_precondition"
            assert f"current fencing token of {row['session_id']!r} is {new['fencing_token']}" \
                in stale["message"]
            running = answers["new"].json()["turn"]
            # the new holder with a made-up older token is refused too
            refused = await r.refused("StartTurn", "failed_precondition", session_id=row["session_id"],
                                      lease_id=new["lease_id"], fencing_token=old["fencing_token"],
                                      input="x")
            assert f"stale fencing token {old['fencing_token']}; current {new['fencing_token']}" \
                in refused["message"]
            busy = await r.refused("StartTurn", "failed_precondition", session_id=row["session_id"],
                                   lease_id=new["lease_id"], fencing_token=new["fencing_token"],
                                   input="second")
            assert running["turn_id"] in busy["message"]
            # the stale holder cannot interrupt it either; the current one can
            await r.refused("InterruptTurn", "failed_precondition", session_id=row["session_id"],
                            lease_id=old["lease_id"], fencing_token=old["fencing_token"],
                            turn_id=running["turn_id"])
            done = (await r.ok("InterruptTurn", session_id=row["session_id"], lease_id=new["lease_id"],
                               fencing_token=new["fencing_token"], turn_id=running["turn_id"]))["turn"]
            assert done["state"] == "interrupted"
            kinds = [e["kind"] for e in await session_events(r, row["session_id"])]
            assert kinds[-1] == "turn.interrupted" and "stale write" not in str(kinds)
            await r.ok("ReleaseLease", lease_id=new["lease_id"])
            reader = (await r.ok("GrantLease", session_id=row["session_id"], holder="rd",
                                 mode="shared-read"))["lease"]
            refused = await r.refused("StartTurn", "failed_precondition", session_id=row["session_id"],
                                      lease_id=reader["lease_id"], fencing_token=reader["fencing_token"],
                                      input="read only")
            assert "shared-read" in refused["message"]


async def test_approval_round_trip_and_timeout_decline(tmp_path):
    """An approval the agent asks for is recorded and answered by the holder;
    one left unanswered is declined after approval_timeout_seconds."""
    config = relay.Config(**{**{f: getattr(FAST, f) for f in (
        "stop_stdin_seconds", "stop_term_seconds", "stop_kill_seconds", "startup_timeout_seconds",
        "handover_timeout_seconds")}, "approval_timeout_seconds": 0.5})
    with trio.fail_after(30):
        async with serving(tmp_path, config) as r:
            await _register(r, "cx", options=["approval_policy=untrusted"])
            (row,) = await warm_sessions(r, "cx")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cx", "ci")
            turn = await start_turn(r, lease, "@approve touch it")

            async def asked():
                return next((e for e in await session_events(r, sid) if e["kind"] == "approval.requested"),
                            None)
            ask = await until_runtime(r, asked)
            assert ask["data"]["approval_kind"] == "command" and ask["data"]["turn_id"] == turn["turn_id"]
            answer = await r.ok("ResolveApproval", session_id=sid, lease_id=lease["lease_id"],
                                fencing_token=lease["fencing_token"],
                                approval_id=ask["data"]["approval_id"], decision="accept")
            assert answer["outcome"] == "accepted"
            assert (await turn_ended(r, turn["turn_id"]))["state"] == "completed"
            command = [e for e in await session_events(r, sid) if e["kind"] == "item.completed"
                       and e["data"]["item_type"] == "command_execution"]
            assert command[-1]["data"]["status"] == "completed"
            # unanswered: declined by the timer, and the turn goes on
            turn = await start_turn(r, lease, "@approve again")
            assert (await turn_ended(r, turn["turn_id"]))["state"] == "completed"
            events = await session_events(r, sid)
            resolved = [e for e in events if e["kind"] == "approval.resolved" and "by" in e["data"]]
            assert resolved[-1]["data"]["decision"] == "decline"
            assert resolved[-1]["data"]["by"].startswith("timeout")
            command = [e for e in events if e["kind"] == "item.completed"
                       and e["data"]["item_type"] == "command_execution"]
            assert command[-1]["data"]["status"] == "declined"


async def test_pooled_hand_over_leaks_no_history_or_processes(tmp_path):
    """The next borrower of a pooled session sees a fresh thread (no history,
    the configured cwd), the last one's background commands are gone (killed
    by the thread's archive), and a process whose group still holds what the
    borrower started is recycled (a new pid) before the next turn runs."""
    with trio.fail_after(40):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            sid, first_pid = row["session_id"], row["process"]["pid"]
            a = await borrow_lease(r, "cx", "a")
            t1 = await turn_ended(r, (await start_turn(r, a, "one"))["turn_id"])
            t2 = await turn_ended(r, (await start_turn(r, a, "two @background @pwd"))["turn_id"])
            assert "(history 1)" in t2["output_text"] and "(history 0)" in t1["output_text"]
            bg = int(t2["output_text"].split("[background pid ")[1].split("]")[0])
            assert process_alive(bg)
            await r.ok("ReleaseLease", lease_id=a["lease_id"])
            b = await borrow_lease(r, "cx", "b", session=sid)
            t3 = await turn_ended(r, (await start_turn(r, b, "three @pwd"))["turn_id"])
            assert "(history 0)" in t3["output_text"]  # a fresh thread: none of a's history
            assert t3["output_text"].split("[cwd ")[1] == t2["output_text"].split("[cwd ")[1]
            assert not process_alive(bg)
            (now,) = [s for s in await profile_sessions(r, "cx") if s["session_id"] == sid]
            assert now["process"]["pid"] == first_pid  # archive sufficed: no recycle
            # a command that survives its thread's archive: the process is recycled
            t4 = await turn_ended(r, (await start_turn(r, b, "four @detach"))["turn_id"])
            detached = int(t4["output_text"].split("[detach pid ")[1].split("]")[0])
            await r.ok("ReleaseLease", lease_id=b["lease_id"])
            c = await borrow_lease(r, "cx", "c", session=sid)
            t5 = await turn_ended(r, (await start_turn(r, c, "five"))["turn_id"])
            assert t5["state"] == "completed" and "(history 0)" in t5["output_text"]
            assert not process_alive(detached) and not process_alive(first_pid)
            (now,) = [s for s in await profile_sessions(r, "cx") if s["session_id"] == sid]
            assert now["process"]["state"] == "running" and now["process"]["pid"] != first_pid


async def test_one_borrow_session_serves_one_lease_and_is_replaced(tmp_path):
    """A one-borrow Claude session is pre-spawned warm, runs its holder's turns,
    and is stopped and closed at release; a fresh warm one replaces it."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cl", "claude", "one-borrow",
                            command=[*STAND_IN, "--provider", "claude"])
            (row,) = await warm_sessions(r, "cl")
            lease = await borrow_lease(r, "cl", "ci")
            turn = await turn_ended(r, (await start_turn(r, lease, "hello claude"))["turn_id"])
            assert turn["state"] == "completed"
            assert turn["output_text"] == "Hello from stand-in #1 (history 0): hello claude"
            deltas_live = [e for e in await session_events(r, row["session_id"])
                           if e["kind"] == "item.completed"]
            assert deltas_live
            await r.ok("ReleaseLease", lease_id=lease["lease_id"])

            async def replaced():
                rows = {s["session_id"]: s for s in await profile_sessions(r, "cl")}
                fresh = [s for s in rows.values() if s["session_id"] != row["session_id"]
                         and s["process"]["state"] == "running"]
                return (rows, fresh) if rows[row["session_id"]]["state"] == "closed" and fresh else None
            rows, fresh = await until_runtime(r, replaced)
            assert rows[row["session_id"]]["process"]["state"] == ""
            assert not process_alive(row["process"]["pid"])
            assert len(fresh) == 1


async def test_provider_crash_fails_the_turn_and_quarantines(tmp_path):
    """A provider that dies mid-turn fails its turn (provider_exited), the
    session is quarantined with the holder's lease revoked, and the pool
    starts a replacement."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            lease = await borrow_lease(r, "cx", "ci")
            turn = await turn_ended(r, (await start_turn(r, lease, "@crash now"))["turn_id"])
            assert turn["state"] == "failed" and turn["error"].startswith("provider_exited")
            leases = (await r.ok("ListLeases", session_id=row["session_id"]))["leases"]
            assert leases[0]["state"] == "revoked" and "provider_exited" in leases[0]["revoke_reason"]

            async def replaced():
                rows = await profile_sessions(r, "cx")
                return [s for s in rows if s["session_id"] != row["session_id"]
                        and s["process"]["state"] == "running"]
            assert await until_runtime(r, replaced)
            (failed,) = [s for s in await profile_sessions(r, "cx") if s["session_id"] == row["session_id"]]
            assert failed["state"] == "failed"


# A known httpx2 limitation, as in test_client.py: its SSE iterators are nested
# async generators that an early close leaves to the garbage collector.
@pytest.mark.filterwarnings(r"ignore:Async generator '(httpx2|httpcore2)\.:ResourceWarning")
async def test_stubs_run_and_stream_turns_with_the_fencing_token_carried(tmp_path):
    """``lease.run`` (sync) and ``lease.stream`` (trio) on the lease ``borrowed``
    yields run turns with the lease's token; GetTurn answers both codecs."""
    with trio.fail_after(40):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx", pool_size=2)
            await warm_sessions(r, "cx", 2)

            def sync_job():
                with rc.RelayStub(r.server.endpoint) as stub, \
                        stub.borrowed(profile="cx", holder="ci-17") as lease:
                    return lease.run("fix the build", task_ref="build/1"), lease.lease_id

            turn, lease_id = await trio.to_thread.run_sync(sync_job)
            assert (turn.state, turn.lease_id, turn.task_ref) == ("completed", lease_id, "build/1")
            assert turn.output_text.endswith("fix the build")
            async with rc.AsyncRelayStub(r.server.endpoint) as stub:
                async with stub.borrowed(profile="cx", holder="ci-18") as lease:
                    async with lease.stream("stream it") as events:
                        kinds = [e.kind async for e in events]
            assert kinds[0] == "turn.started" and kinds[-1] == "turn.completed"
            assert "item.completed" in kinds
            body = rc.json_to_proto("GetTurnRequest", {"turn_id": turn.turn_id})
            binary = await r.client.post(f"/{rc.SERVICE}/GetTurn", content=body,
                                         headers={"Content-Type": "application/proto"})
            as_json = await r.ok("GetTurn", turn_id=turn.turn_id)
            assert rc.proto_to_json("TurnReply", binary.content, defaults=True) == as_json


async def _cli(root, *args, module="relay"):
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", module, *(("--root", str(root)) if module == "relay" else
                                           ("--root", str(root))), *args]
    return await trio.to_thread.run_sync(lambda: subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=str(root), timeout=30))


async def test_turn_cli_goes_through_the_running_server(tmp_path):
    """``turn start --wait`` streams the turn and exits 0 when it completed, 1
    when it failed; ``turn show|list`` and relay_client's table-made commands
    reach the same server, found through the ledger's runtime record."""
    import json

    with trio.fail_after(40):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            (row,) = await warm_sessions(r, "cx")
            lease = await borrow_lease(r, "cx", "cli")
            fence = ["--session", row["session_id"], "--lease", lease["lease_id"],
                     "--fencing-token", str(lease["fencing_token"])]
            done = await _cli(tmp_path, "turn", "start", *fence, "--input", "from the cli", "--wait")
            assert done.returncode == 0, done.stderr
            assert "turn.completed" in done.stdout and "from the cli" in done.stdout
            failed = await _cli(tmp_path, "turn", "start", *fence, "--input", "@error", "--wait")
            assert failed.returncode == 1 and "turn.failed" in failed.stdout
            listed = await _cli(tmp_path, "turn", "list", "--session", row["session_id"], "--json")
            turns = json.loads(listed.stdout)["turns"]
            assert [t["state"] for t in turns] == ["completed", "failed"]
            shown = await _cli(tmp_path, "turn", "show", turns[0]["turn_id"], "--json")
            assert json.loads(shown.stdout)["turn"]["output_text"].endswith("from the cli")
            stale = await _cli(tmp_path, "turn", "start", *fence[:-1], "99", "--input", "x")
            assert stale.returncode == 1 and "stale fencing token 99" in stale.stderr
            via_client = await _cli(tmp_path, "list_turns", "--state", "failed", module="relay_client")
            assert via_client.returncode == 0, via_client.stderr
            assert [t["turn_id"] for t in json.loads(via_client.stdout)["turns"]] == [turns[1]["turn_id"]]


@pytest.mark.slow
async def test_no_provider_outlives_a_sigkilled_relay(tmp_path):
    """SIGKILL of ``serve`` takes its provider processes along (PDEATHSIG), and
    the next ``serve`` finds nothing recorded left running."""
    import json
    import time

    import httpx2

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = " ".join([*STAND_IN, "--provider", "codex"])
    reg = await _cli(tmp_path, "profile", "register", "cx", "--provider", "codex", "--mode",
                     "pooled", "--command", command)
    assert reg.returncode == 0, reg.stderr
    with trio.fail_after(30):
        server = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relay", "--root", str(tmp_path), "serve", "--port", "0", "--json"],
            stdout=-1, env=env)
        line = b""
        while not line.endswith(b"\n"):
            line += await server.stdout.receive_some(4096)
        endpoint = json.loads(line)["endpoint"]
        pid = 0
        async with httpx2.AsyncClient(base_url=endpoint) as client:
            while not pid:
                rows = (await client.post(f"/{rc.SERVICE}/ListSessions", json={})).json()["sessions"]
                pid = next((s["process"]["pid"] for s in rows if s["process"]["state"] == "running"), 0)
                if not pid:
                    await trio.sleep(0.05)  # the server runs in another process: nothing to await
        pidfd = os.pidfd_open(pid)
        server.kill()
        killed = time.monotonic()
        await server.wait()
        await trio.lowlevel.wait_readable(pidfd)
        os.close(pidfd)
        assert time.monotonic() - killed < 2.0
        assert not process_alive(pid)
        assert relay.reap_orphans(tmp_path / "flow" / "tmp" / "relay") == 0


def test_turn_records_and_their_idempotency_records_read_back(tmp_path):
    """A turn and StartTurn's idempotency record, committed as the runtime
    commits them, validate against the schema and the strict reader; a retry
    with the same request id gets the first turn back."""
    import json

    import jsonschema

    from conftest import commit_ok

    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled",
              options=("approval_policy=untrusted", "sandbox=workspace-write"), pool_size=2,
              env=("FOO=bar",))
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    lease = commit_ok(store, "GrantLease", session_id="s1", holder="h", mode="exclusive-write").lease
    fields = dict(session_id="s1", lease_id=lease.lease_id, fencing_token=lease.fencing_token,
                  input="hi", task_ref="t/1", request_id="rq-1")
    first = commit_ok(store, "StartTurn", **fields).turn
    assert commit_ok(store, "StartTurn", **fields).turn == first
    relay.commit_one(store, relay.Mutation(lambda led, ctx: relay.end_turn(
        led, first.turn_id, "completed", "x" * (relay.TURN_TEXT_KEPT + 10), "", {"total": 3}, ctx),
        "end_turn"), relay.Config())
    ledger = relay.decode_ledger(store.ledger_path.read_bytes())
    turn = ledger.turns[first.turn_id]
    assert turn.state == "completed" and turn.output_text.endswith("the result stream has it whole]")
    schema = json.loads((ROOT / "specs" / "relay-state.schema.json").read_text())
    jsonschema.validate(json.loads(store.ledger_path.read_bytes()), schema)
    rows = [json.loads(line[9:]) for path in (store.state_dir / "requests").glob("*/*.log")
            for line in path.read_bytes().splitlines()]
    start = next(row for row in rows if row["key"] == "rq-1")
    assert start["method"] == "StartTurn"
    jsonschema.validate(start, {"$ref": "#/$defs/RequestLogRecord", "$defs": schema["$defs"]})
    # refusals: a bad option, a reserved env name
    with pytest.raises(relay.InvalidArgument, match="has no option"):
        commit_ok(store, "RegisterProfile", name="c2", provider="claude", mode="one-borrow",
                  options=("sandbox=read-only",))
    with pytest.raises(relay.InvalidArgument, match="set by the runtime"):
        commit_ok(store, "RegisterProfile", name="c3", provider="codex", mode="pooled",
                  env=("HOME=/tmp",))


async def test_claude_approval_and_interrupt_over_stream_json(tmp_path):
    """A Claude tool approval (can_use_tool over stdio) reaches the holder and
    is answered; an interrupt ends a stalled turn ``interrupted`` and the same
    process takes the next turn."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cl", "claude", "one-borrow",
                            command=[*STAND_IN, "--provider", "claude"])
            (row,) = await warm_sessions(r, "cl")
            sid = row["session_id"]
            lease = await borrow_lease(r, "cl", "ci")
            fence = dict(session_id=sid, lease_id=lease["lease_id"], fencing_token=lease["fencing_token"])
            turn = await start_turn(r, lease, "@approve please")

            async def asked():
                return next((e for e in await session_events(r, sid) if e["kind"] == "approval.requested"),
                            None)
            ask = await until_runtime(r, asked)
            assert (ask["data"]["tool_name"], ask["data"]["command"]) == ("Bash", "touch standin.txt")
            await r.ok("ResolveApproval", **fence, approval_id=ask["data"]["approval_id"],
                       decision="accept")
            done = await turn_ended(r, turn["turn_id"])
            assert done["state"] == "completed"
            tool = [e for e in await session_events(r, sid) if e["kind"] == "item.completed"
                    and e["data"]["item_type"] == "command_execution"]
            assert tool[-1]["data"]["output"] == "ran: touch standin.txt"
            stalled = await start_turn(r, lease, "@stall forever")
            ended = (await r.ok("InterruptTurn", **fence, turn_id=stalled["turn_id"]))["turn"]
            assert ended["state"] == "interrupted"
            again = await turn_ended(r, (await start_turn(r, lease, "still there?"))["turn_id"])
            assert again["state"] == "completed" and "(history 1)" in again["output_text"]
            (now,) = [s for s in await profile_sessions(r, "cl") if s["session_id"] == sid]
            assert now["process"]["pid"] == row["process"]["pid"]


@pytest.mark.slow
async def test_deltas_reach_a_subscriber_promptly(tmp_path):
    """Token deltas go from the provider's stdout to an SSE subscriber at once
    (not after the turn): each frame's lag behind the time the stand-in wrote
    it is measured, and the p99 stays well under the 50 ms target even on a
    loaded test machine (the bound here is generous: 250 ms)."""
    import time

    with trio.fail_after(40):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx", command=[*STAND_IN, "--provider", "codex", "--slow-ms", "10"])
            (row,) = await warm_sessions(r, "cx")
            lease = await borrow_lease(r, "cx", "bench")
            lags = []
            async with r.sse({"session": row["session_id"]}) as sse:
                await start_turn(r, lease, "@stamp @slow " + "w " * 20)  # about 30 tokens, 10 ms apart
                while True:
                    frame = await sse.next()
                    if frame["event"] == "delta":
                        now = time.time()
                        lags += [now - float(x) for x in frame["data"]["delta"].split()]
                    elif frame["data"].get("kind") == "turn.completed":
                        break
    assert len(lags) >= 20
    lags.sort()
    p50, p99 = lags[len(lags) // 2], lags[int(len(lags) * 0.99) - 1]
    print(f"delta lag over {len(lags)} tokens: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.25, (p50, p99)


def test_state_cleanup_keeps_live_session_scratch_and_the_process_record(tmp_path):
    """`state cleanup --apply` removes the scratch of closed sessions only: a ready or
    quarantined session's home (its running agent, its post-mortem) and the record of
    provider process groups (what the next serve reaps) stay; other scratch goes."""
    from conftest import T0, commit_ok, run_json

    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="cl", provider="claude", mode="one-borrow")
    for sid in ("live", "sick", "gone"):
        commit_ok(store, "CreateSession", profile="cl", session_id=sid)
    commit_ok(store, "QuarantineSession", session_id="sick", reason="provider_exited")
    ledger = store.read()
    closed, _ = relay.close_session(ledger, "gone", "lease ended", relay.Ctx(T0, ledger.revision + 1))
    store.write(attrs.evolve(closed, revision=ledger.revision + 1))
    for sid in ("live", "sick", "gone"):
        (relay.make_scratch(store.tmp_dir, sid)["home"] / "config.toml").write_text("x")
    record = store.tmp_dir / relay.PROVIDERS_RECORD
    record.write_text("[]")
    stray = store.tmp_dir / "leftover.txt"
    stray.write_text("x")
    plan = run_json(tmp_path, "state", "cleanup", "--owner", "relay", "--apply")
    assert plan["applied"]
    sessions = store.tmp_dir / relay.SESSIONS_DIR
    assert (sessions / "live" / "home" / "config.toml").exists()
    assert (sessions / "sick" / "home" / "config.toml").exists()
    assert not (sessions / "gone" / "home" / "config.toml").exists()
    assert record.exists() and not stray.exists() and store.lock_path.exists()
