"""The live runtime: provider processes under supervision, pools, turns, fencing,
approvals and the pooled hand-over, driven with the stand-in provider (real
processes, synchronised on events; every wait bounded by trio.fail_after)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio

import relay
import relay_client as rc

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = [sys.executable, str(ROOT / "scripts" / "stand_in_provider.py")]
FAST = relay.Config(stop_stdin_seconds=1.0, stop_term_seconds=1.0, stop_kill_seconds=1.0,
                    startup_timeout_seconds=5.0, handover_timeout_seconds=2.0,
                    approval_timeout_seconds=30.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


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
    assert not _alive(proc.pid)
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
            await _next(proc, "item.delta")  # wedged from here on
            started = trio.current_time()
            await proc.stop("test")
            took = trio.current_time() - started
    assert proc.returncode == -signal.SIGKILL
    assert 2.0 <= took < 4.0  # stdin wait + SIGTERM wait, then SIGKILL at once
    assert not _alive(proc.pid)


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

from serve_helpers import serving  # noqa: E402

CODEX = ["--command", " ".join([*STAND_IN, "--provider", "codex"])]


async def _until(r, predicate, what: str = "the condition"):
    """Wait (bounded by the caller's fail_after) until ``predicate()`` holds."""
    runtime = r.server.service.runtime
    while True:
        value = await predicate()
        if value:
            return value
        with trio.move_on_after(0.2):  # a reconcile or process change wakes us sooner
            await runtime.wait_changed()


async def _sessions(r, profile: str) -> list[dict]:
    return (await r.ok("ListSessions", profile=profile))["sessions"]


async def _warm(r, profile: str, n: int = 1) -> list[dict]:
    async def ready():
        rows = [s for s in await _sessions(r, profile)
                if s["state"] == "ready" and s["process"]["state"] == "running"]
        return rows if len(rows) >= n else None
    return await _until(r, ready)


async def _register(r, name: str, provider: str = "codex", mode: str = "pooled", *,
                    command: list[str] | None = None, **fields):
    argv = command or [*STAND_IN, "--provider", provider]
    await r.ok("RegisterProfile", name=name, provider=provider, mode=mode, command=argv, **fields)


async def _borrow(r, profile: str, holder: str, session: str = "") -> dict:
    body = {"holder": holder, **({"session_id": session} if session else {"profile": profile})}
    return (await r.ok("Borrow", **body))["lease"]


async def _turn(r, lease: dict, text: str, **extra) -> dict:
    return (await r.ok("StartTurn", session_id=lease["session_id"], lease_id=lease["lease_id"],
                       fencing_token=lease["fencing_token"], input=text, **extra))["turn"]


async def _ended(r, turn_id: str) -> dict:
    async def done():
        turn = (await r.ok("GetTurn", turn_id=turn_id))["turn"]
        return turn if turn["state"] != "running" else None
    return await _until(r, done)


async def _events(r, sid: str) -> list[dict]:
    return (await r.ok("ListEvents", session_id=sid, limit=10000))["records"]


async def test_pool_keeps_warm_handshaken_sessions(tmp_path):
    """A pooled profile gets pool_size ready sessions, each with a live,
    handshaken process shown in the session projection."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx", pool_size=2)
            rows = await _warm(r, "cx", 2)
            assert {s["process"]["provider_version"] for s in rows} == {"0.163.0-standin"}
            pids = {s["process"]["pid"] for s in rows}
            assert len(pids) == 2 and all(_alive(p) for p in pids)
            for s in rows:  # each in its own group, with its own scratch
                assert os.getpgid(s["process"]["pid"]) == s["process"]["pid"]
                assert (tmp_path / "flow/tmp/relay/sessions" / s["session_id"] / "home").is_dir()
        # serve stopped: no provider outlives it, and none is left recorded
        assert not any(_alive(p) for p in pids)
        assert '"processes": []' in (tmp_path / "flow/tmp/relay/providers.json").read_text()


async def test_turn_streams_events_deltas_and_one_result(tmp_path):
    """A turn is answered running, streams live deltas, and leaves durable
    provider-neutral events (native frame kept) and exactly one result."""
    with trio.fail_after(30):
        async with serving(tmp_path, FAST) as r:
            await _register(r, "cx")
            (row,) = await _warm(r, "cx")
            lease = await _borrow(r, "cx", "ci-1")
            async with r.sse({"session": row["session_id"]}) as sse:
                turn = await _turn(r, lease, "say hi", task_ref="task/42")
                assert turn["state"] == "running" and turn["task_ref"] == "task/42"
                seen = []
                while not seen or seen[-1]["event"] != "event" or \
                        seen[-1]["data"]["kind"] != "turn.completed":
                    seen.append(await sse.next())
            deltas = [e for e in seen if e["event"] == "delta"]
            assert deltas and "id" not in deltas[0]
            assert "".join(d["data"]["delta"] for d in deltas).startswith("Hello from stand-in")
            done = await _ended(r, turn["turn_id"])
            assert done["state"] == "completed"
            assert done["output_text"] == "Hello from stand-in #1 (history 0): say hi"
            kinds = [e["kind"] for e in await _events(r, row["session_id"])]
            assert kinds[0] == "turn.started" and kinds[-1] == "turn.completed"
            assert "item.completed" in kinds
            item = next(e for e in await _events(r, row["session_id"])
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
