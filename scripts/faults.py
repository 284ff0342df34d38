#!/usr/bin/env python3
"""The fault-injection run (issue 12): random provider faults under continuous turns.

    .venv/bin/python scripts/faults.py                  # 100 faults, 4 workers, pool of 4
    .venv/bin/python scripts/faults.py --faults 8 --seed 1 --json /tmp/f.json
    .venv/bin/python scripts/bench.py --only faults     # the same, as a bench section

A temporary workspace gets a pooled profile of ``--pool-size`` sessions on the
stand-in provider (``scripts/stand_in_provider.py --provider codex``, ``@slow``
turns), tiny ``[runtime]`` timeouts in ``flow/relay.toml``, and
``python -m relay serve`` as a child process on 127.0.0.1 port 0.  ``--workers``
trio tasks borrow with ``AsyncRelayStub.borrowed`` and run turns back to back
with ``lease.run``, borrowing again when a lease is lost.  An injector makes
``--faults`` faults one after another, each synchronised on what the relay
shows (never on a sleep): ``kill`` SIGKILLs the provider of a session whose
turn is running and has streamed its first delta (pid from ``ListSessions``);
``stall`` / ``hang`` (only when ``relay.Config`` has ``turn_stall_seconds``)
make a worker's next prompt carry the stand-in's ``@stall`` / ``@hang`` cue and
start the clock at that turn's first delta, after which the stand-in is silent
(``@hang`` also ignores the interrupt).

Per fault it records: detection (fault -> the quarantine record's
``quarantined_at``, or for a stall the relay ending the turn), the feed notice
(fault -> ``quarantine.set`` arriving on ``GET /events?feed=relay``), the holder
told (fault -> the worker's ``borrowed`` block ending on ``LeaseLost``) and repair
(fault -> the profile has as many healthy sessions as before: ready,
unquarantined, a running process).  Afterwards it checks, and reports: every
turn ended in a terminal state, no live lease on a failed session, the pool has
``pool_size`` idle healthy sessions and every ready session a running process,
no process carrying this workspace's ``FLOW_RELAY_SCRATCH`` outside the live
set (and none at all once ``serve`` stopped), and the gate's runtime checks
pass.  Results: a table on stdout and ``bench-results/faults.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import relay  # noqa: E402
import relay_client as rc  # noqa: E402

DEFAULT_JSON = REPO / "bench-results" / "faults.json"
LOOPBACK = "127.0.0.1"
PROFILE = "faults"
STAND_IN = [sys.executable, str(REPO / "scripts" / "stand_in_provider.py"), "--provider", "codex",
            "--slow-ms", "15"]
#: ``[runtime]`` settings of the run: every wait of a stop, start and hand-over short.
RUNTIME = {"stop_stdin_seconds": 0.25, "stop_term_seconds": 0.5, "stop_kill_seconds": 1.0,
           "startup_timeout_seconds": 5.0, "handover_timeout_seconds": 2.0}
#: Detection settings written only when this relay has them (issue 12's detection).
DETECTION = {"turn_stall_seconds": 0.75, "interrupt_grace_seconds": 0.25,
             "probe_interval_seconds": 0.5, "probe_timeout_seconds": 2.0}
#: The longest any single wait of the run may take (seconds).
PATIENCE = 30.0
#: A kill picks a turn whose first delta came at most this long ago (a turn lasts ~270 ms).
FRESH_SECONDS = 0.1
WORDS = " ".join(f"w{i}" for i in range(12))


class FaultRunError(Exception):
    """The run could not be carried out as designed."""


def stamp_seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def detection_settings() -> dict[str, float]:
    """The stall and probe settings this relay understands (none before issue 12's detection)."""
    names = {f.name for f in relay.attrs.fields(relay.Config)}
    return {k: v for k, v in DETECTION.items() if k in names and k in relay._CONFIG_KEYS}


def write_config(flow: Path, settings: dict[str, float]) -> None:
    import tomli_w

    tables: dict[str, dict[str, Any]] = {}
    for name, value in settings.items():
        section, key = relay._CONFIG_KEYS[name]
        tables.setdefault(section, {})[key] = value
    flow.mkdir(parents=True, exist_ok=True)
    (flow / "relay.toml").write_text(tomli_w.dumps(tables), encoding="utf-8")


# -- what the run observes -------------------------------------------------------------


@dataclass
class Fault:
    n: int
    cause: str  # kill | stall | hang
    session_id: str = ""
    turn_id: str = ""
    pid: int = 0
    injected_at: float = 0.0  # wall clock
    mid_turn: bool = False  # the turn was still running when the fault landed
    outcome: str = ""  # quarantined: CODE | turn interrupted | ... | undetected
    detected_s: float | None = None
    notice_s: float | None = None
    told_s: float | None = None  # fault -> the holder's borrowed block ended (LeaseLost)
    repaired_s: float | None = None
    #: Live leases on the session once it was quarantined (the quarantine revokes them all).
    leases_left: int = 0


@dataclass
class TurnSeen:
    session_id: str
    first_delta: float = 0.0
    ended: str = ""


@dataclass
class Observed:
    """What the SSE streams said: turns (their first delta, their end) and quarantines."""

    turns: dict[str, TurnSeen] = field(default_factory=dict)
    quarantines: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=dict)
    changed: Any = None  # trio.Event, replaced each time something arrives

    def poke(self) -> None:
        self.changed.set()
        import trio

        self.changed = trio.Event()


class Sse:
    """A minimal text/event-stream reader over one TCP connection (h11);
    ``scripts/bench.py`` reads its session streams with it too."""

    #: What a refused or ended stream raises.
    error: type[Exception] = FaultRunError

    def __init__(self, stream: Any) -> None:
        import h11

        self.stream, self.conn, self.buf = stream, h11.Connection(h11.CLIENT), b""

    @classmethod
    async def open(cls, port: int, target: str) -> Sse:
        import h11
        import trio

        self = cls(await trio.open_tcp_stream(LOOPBACK, port))
        request = h11.Request(method="GET", target=target, headers=[
            ("Host", f"{LOOPBACK}:{port}"), ("Accept", "text/event-stream")])
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        while b": connected" not in self.buf:
            await self._more()
        return self

    async def _more(self) -> None:
        import h11

        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise self.error(f"SSE refused: HTTP {event.status_code}")
            elif isinstance(event, h11.Data):
                self.buf += bytes(event.data)
                return
            else:
                raise self.error("an SSE stream ended")

    async def frames(self) -> Any:
        while True:
            while b"\n\n" not in self.buf:
                await self._more()
            frame, _, self.buf = self.buf.partition(b"\n\n")
            name, data = "message", None
            for line in frame.decode().splitlines():
                key, _, value = line.partition(":")
                if key == "event":
                    name = value.strip()
                elif key == "data":
                    data = json.loads(value)
            if data is not None:
                yield name, data, time.time()


async def watch_events(port: int, seen: Observed, *, task_status: Any) -> None:
    sse = await Sse.open(port, "/events")
    task_status.started()
    async for name, data, at in sse.frames():
        if name == "delta" and data.get("turn_id"):
            turn = seen.turns.setdefault(data["turn_id"], TurnSeen(data["session_id"]))
            if not turn.first_delta:
                turn.first_delta = at
                seen.poke()
        elif data.get("kind") in rc.TURN_END_KINDS and isinstance(data.get("data"), dict):
            tid = data["data"].get("turn_id")
            if tid:
                seen.turns.setdefault(tid, TurnSeen(data["session_id"])).ended = data["kind"]
                seen.poke()


async def watch_feed(port: int, seen: Observed, *, task_status: Any) -> None:
    sse = await Sse.open(port, "/events?feed=relay")
    task_status.started()
    async for name, data, at in sse.frames():
        if name == "quarantine.set":
            seen.quarantines.setdefault(data["session_id"], []).append((at, data))
            seen.poke()


# -- the run ------------------------------------------------------------------------


class Run:
    def __init__(self, url: str, tmp_dir: Path, args: argparse.Namespace, causes: list[str]) -> None:
        import httpx2

        self.url, self.port, self.tmp_dir, self.args, self.causes = (
            url, int(url.rsplit(":", 1)[1]), tmp_dir, args, causes)
        self.http = httpx2.AsyncClient(base_url=url, timeout=PATIENCE)
        self.rng = random.Random(args.seed)
        self.seen = Observed()
        self.stopping = False
        self.cues: dict[int, str] = {}  # worker -> cue of its next prompt
        self.turns: dict[str, int] = {}  # terminal state -> count, as the workers saw them
        self.lost = 0
        self.told: dict[str, float] = {}  # session -> when its holder's block ended on an error
        self.borrow_refused = 0
        self.faults: list[Fault] = []

    async def call(self, method: str, **fields: Any) -> dict[str, Any]:
        response = await self.http.post(f"/{rc.SERVICE}/{method}", json=fields)
        if response.status_code != 200:
            raise FaultRunError(f"{method}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    async def sessions(self) -> list[dict[str, Any]]:
        return (await self.call("ListSessions", profile=PROFILE))["sessions"]

    async def healthy(self) -> list[dict[str, Any]]:
        return [s for s in await self.sessions() if s["state"] == "ready"
                and s["process"]["state"] == "running"]

    async def until(self, predicate: Any, what: str, patience: float | None = None) -> Any:
        """Poll ``await predicate()`` (20 ms apart, or sooner when a stream says something)."""
        import trio

        patience = self.args.patience if patience is None else patience
        with trio.move_on_after(patience):
            while True:
                value = await predicate()
                if value:
                    return value
                with trio.move_on_after(0.02):
                    await self.seen.changed.wait()
        raise FaultRunError(f"gave up after {patience:.0f} s waiting for {what}")

    # -- workers

    async def worker(self, i: int) -> None:
        import trio

        async with rc.AsyncRelayStub(self.url) as stub:
            k = 0
            while not self.stopping:
                held = ""
                try:
                    async with stub.borrowed(profile=PROFILE, holder=f"worker-{i}") as lease:
                        held = lease.session_id
                        while not self.stopping:
                            k += 1
                            cue = self.cues.pop(i, "")
                            turn = await lease.run(f"@slow {cue} w{i}-t{k} {WORDS}")
                            self.turns[turn.state] = self.turns.get(turn.state, 0) + 1
                except rc.RelayError as exc:
                    if held:  # the holder learnt: LeaseLost, or a refusal that came first
                        self.told.setdefault(held, time.time())
                        self.seen.poke()
                    if isinstance(exc, rc.LeaseLost):
                        self.lost += 1
                    else:  # no free session for a moment, a process not running yet
                        self.borrow_refused += 1
                        await trio.sleep(0.05)

    # -- faults

    async def inject(self, n: int, cause: str) -> Fault:
        fault = Fault(n, cause)
        before = len(await self.healthy())
        if cause == "kill":
            def running() -> list[tuple[str, TurnSeen]]:
                # turns that began streaming a moment ago: most of each is still to come
                fresh = time.time() - FRESH_SECONDS
                return [(tid, t) for tid, t in self.seen.turns.items()
                        if t.first_delta > fresh and not t.ended]

            async def target() -> Any:
                picks = running()
                if not picks:
                    return None
                tid, turn = self.rng.choice(sorted(picks, key=lambda x: x[0]))
                rows = {s["session_id"]: s for s in await self.sessions()}
                process = rows.get(turn.session_id, {}).get("process", {})
                # its session may have just lost its process (a turn's end not yet seen)
                return (tid, turn, process["pid"]) if process.get("state") == "running" else None

            fault.turn_id, turn, fault.pid = await self.until(target, "a running turn with a delta")
            fault.session_id = turn.session_id
            fault.injected_at = time.time()
            with contextlib.suppress(ProcessLookupError):
                os.kill(fault.pid, signal.SIGKILL)
        else:
            worker = self.rng.randrange(self.args.workers)
            tag = f"@{cause} fault-{n}"
            self.cues[worker] = tag

            async def cued() -> Any:
                turns = (await self.call("ListTurns", state="running"))["turns"]
                for t in turns:
                    seen = self.seen.turns.get(t["turn_id"])
                    if tag in t["input"] and seen is not None and seen.first_delta:
                        return t, seen
                return None

            turn, seen = await self.until(cued, f"the {cause} turn's first delta")
            fault.turn_id, fault.session_id = turn["turn_id"], turn["session_id"]
            fault.injected_at, fault.mid_turn = seen.first_delta, True  # silent from then on
        await self.detect(fault)
        if cause == "kill":  # the kill landed mid-turn if the turn did not complete
            turn = (await self.call("GetTurn", turn_id=fault.turn_id))["turn"]
            fault.mid_turn = turn["state"] != "completed"
        if fault.outcome.startswith("quarantined"):
            async def repaired() -> Any:
                return len(await self.healthy()) >= before

            await self.until(repaired, f"the pool to heal after fault {n}")
            fault.repaired_s = time.time() - fault.injected_at
        return fault

    async def detect(self, fault: Fault) -> None:
        """Until the relay acted on the fault: a quarantine of the session, or
        (a stall the interrupt ended) the turn's end."""
        async def acted() -> Any:
            notices = [(at, q) for at, q in self.seen.quarantines.get(fault.session_id, [])
                       if at >= fault.injected_at - 1]
            if notices:
                return notices[0]
            ended = self.seen.turns.get(fault.turn_id)
            if fault.cause == "stall" and ended is not None and ended.ended:
                return ended
            return None

        try:
            got = await self.until(acted, f"the relay to act on fault {fault.n}")
        except FaultRunError:
            fault.outcome = "undetected"
            return
        if isinstance(got, TurnSeen):
            turn = (await self.call("GetTurn", turn_id=fault.turn_id))["turn"]
            fault.outcome = f"turn {turn['state']}"
            fault.detected_s = stamp_seconds(turn["ended_at"]) - fault.injected_at
            return
        arrived, quarantine = got
        code = quarantine.get("code") or quarantine["reason"].split(":", 1)[0]
        fault.outcome = f"quarantined: {code}"
        fault.detected_s = stamp_seconds(quarantine["quarantined_at"]) - fault.injected_at
        fault.notice_s = arrived - fault.injected_at
        fault.leases_left = len([x for x in await live_leases(self) if x["session_id"] == fault.session_id])

        async def told() -> Any:
            return self.told.get(fault.session_id)

        with contextlib.suppress(FaultRunError):  # a session nobody held has nobody to tell
            fault.told_s = await self.until(told, "the holder to learn", 5.0) - fault.injected_at

    async def injector(self) -> None:
        import trio

        for n in range(1, self.args.faults + 1):
            cause = self.rng.choice(self.causes)
            fault = await self.inject(n, cause)
            self.faults.append(fault)
            print(f"faults: {n:3d}/{self.args.faults} {cause:5s} {fault.session_id:12s} "
                  f"{fault.outcome:28s} detected {_ms(fault.detected_s)} repaired "
                  f"{_ms(fault.repaired_s)}", file=sys.stderr, flush=True)
            await trio.sleep(self.rng.uniform(0.0, 0.2))  # a benchmark's pacing, not a sync point


def _ms(seconds: float | None) -> str:
    return "      -" if seconds is None else f"{seconds * 1e3:7.1f} ms"


async def drive(url: str, root: Path, args: argparse.Namespace, causes: list[str]) -> dict[str, Any]:
    import trio

    store = relay.Store(root)
    run = Run(url, store.tmp_dir, args, causes)
    run.seen.changed = trio.Event()
    try:
        await run.until(lambda: _at_least(run, args.pool_size), "the pool to warm up",
                        max(args.patience, 60))
        async with trio.open_nursery() as watchers:
            await watchers.start(watch_events, run.port, run.seen)
            await watchers.start(watch_feed, run.port, run.seen)
            async with trio.open_nursery() as workers:
                for i in range(args.workers):
                    workers.start_soon(run.worker, i)
                started = time.time()
                await run.injector()
                took = time.time() - started
                run.stopping = True  # each worker ends its turn and releases its lease
            watchers.cancel_scope.cancel()
        checks = await final_checks(run, store, args)
    finally:
        await run.http.aclose()
    return {"faults": run.faults, "seconds": took, "turns": run.turns, "leases_lost": run.lost,
            "borrow_retries": run.borrow_refused, "checks": checks}


async def _at_least(run: Run, n: int) -> bool:
    return len(await run.healthy()) >= n


async def final_checks(run: Run, store: relay.Store, args: argparse.Namespace) -> dict[str, Any]:
    """The invariants after the run (each waited for, bounded, while the pool settles)."""
    import trio

    out: dict[str, Any] = {}

    async def no_running() -> Any:
        return not (await run.call("ListTurns", state="running"))["turns"]

    await run.until(no_running, "every turn to end")
    turns = (await run.call("ListTurns"))["turns"]
    out["turns_not_terminal"] = sum(t["state"] not in ("completed", "failed", "interrupted") for t in turns)
    out["turns"] = len(turns)

    async def settled() -> Any:
        rows = await run.sessions()
        idle = [s for s in rows if s["state"] == "ready" and s["process"]["state"] == "running"
                and not any(x["session_id"] == s["session_id"] for x in await live_leases(run))]
        unstarted = [s for s in rows if s["state"] == "ready" and s["process"]["state"] != "running"]
        return (rows, idle) if len(idle) >= args.pool_size and not unstarted else None

    rows, idle = await run.until(settled, "the pool to settle")
    by_id = {s["session_id"]: s for s in rows}
    leases = await live_leases(run)
    out["leases_on_failed_sessions"] = sum(by_id.get(x["session_id"], {}).get("state") != "ready"
                                           for x in leases)
    out["idle_healthy_sessions"] = len(idle)
    out["pool_size"] = args.pool_size
    out["quarantined_sessions"] = sum(s["state"] == "failed" for s in rows)
    live = {s["process"]["pid"] for s in rows if s["process"]["pid"]}
    marked = await trio.to_thread.run_sync(relay.marked_processes, store.tmp_dir)
    out["orphan_processes"] = sorted(p.pid for p in marked if p.pgid not in live)
    checks = await trio.to_thread.run_sync(lambda: relay.gate(
        store, relay.load_config(store.flow), only=GATE_IDS))
    out["gate"] = {c.id: c.result if c.result == "pass" else f"{c.result}: {c.evidence}" for c in checks}
    return out


GATE_IDS = ("quarantined_sessions_failed", "no_lease_on_failed_session", "running_turns_leased",
            "no_turn_on_quarantined_session", "provider_processes_owned",
            "no_orphan_provider_processes", "provider_scratch_intact")


async def live_leases(run: Run) -> list[dict[str, Any]]:
    rows = (await run.call("ListLeases"))["leases"]
    stamp = relay.iso(time.time())
    return [x for x in rows if x["state"] in ("active", "waiting") and x["expires_at"] > stamp]


# -- serve as a child process ------------------------------------------------------------


@contextlib.contextmanager
def served(root: Path, env: dict[str, str]) -> Any:
    log = root / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "--root", str(root), "serve",
                                 "--host", LOOPBACK, "--port", "0", "--json"],
                                cwd=root, env=env, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        if not line:
            raise FaultRunError(f"serve exited with {proc.wait()}: {log.read_text()[-800:]}")
        yield json.loads(line)["endpoint"], proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()


def fault_run(args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh workspace; the report (JSON-able)."""
    import trio

    settings = detection_settings()
    causes = args.causes or (["kill", "stall", "hang"] if settings else ["kill"])
    missing = sorted({"stall", "hang"} & set(causes)) if not settings else []
    if missing:
        raise FaultRunError(f"cause {missing[0]} needs the stall settings (turn_stall_seconds), "
                            "which this relay does not have")
    parent = tempfile.mkdtemp(prefix="relay-faults-", dir=args.dir)
    root = Path(parent)
    try:
        write_config(root / "flow", {**RUNTIME, **settings})
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-m", "relay", "--root", str(root), "profile", "register",
                        PROFILE, "--provider", "codex", "--mode", "pooled", "--pool-size",
                        str(args.pool_size), "--command", " ".join(STAND_IN)],
                       env=env, check=True, capture_output=True)
        with served(root, env) as (url, server):
            result = trio.run(drive, url, root, args, causes)
        # serve stopped (SIGTERM): none of its providers may outlive it
        left = relay.marked_processes(relay.Store(root).tmp_dir)
        result["checks"]["processes_after_serve_stopped"] = [p.pid for p in left]
        result["checks"]["serve_exit_code"] = server.returncode
    finally:
        for p in relay.marked_processes(relay.Store(root).tmp_dir):  # never leave one behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pgid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)
    return report(result, args, causes, settings, parent if args.keep else "")


def _pct(xs: list[float], q: int) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def report(result: dict[str, Any], args: argparse.Namespace, causes: list[str],
           settings: dict[str, float], kept: str) -> dict[str, Any]:
    faults: list[Fault] = result["faults"]
    summary = {}
    for cause in causes:
        mine = [f for f in faults if f.cause == cause]
        stats: dict[str, Any] = {"n": len(mine), "mid_turn": sum(f.mid_turn for f in mine),
                                 "outcomes": {}}
        for f in mine:
            stats["outcomes"][f.outcome] = stats["outcomes"].get(f.outcome, 0) + 1
        for key in ("detected_s", "notice_s", "told_s", "repaired_s"):
            xs = [getattr(f, key) for f in mine if getattr(f, key) is not None]
            stats[key] = {"n": len(xs), "p50": _pct(xs, 50), "p99": _pct(xs, 99),
                          "max": max(xs) if xs else None,
                          "mean": statistics.mean(xs) if xs else None}
        summary[cause] = stats
    checks = result["checks"]
    problems = []
    if checks["turns_not_terminal"]:
        problems.append(f"{checks['turns_not_terminal']} turns not in a terminal state")
    if checks["leases_on_failed_sessions"]:
        problems.append(f"{checks['leases_on_failed_sessions']} live leases on failed sessions")
    if checks["idle_healthy_sessions"] < args.pool_size:
        problems.append(f"only {checks['idle_healthy_sessions']} idle healthy sessions")
    if checks["orphan_processes"]:
        problems.append(f"orphan provider processes {checks['orphan_processes']}")
    if checks["processes_after_serve_stopped"]:
        problems.append(f"processes outlived serve: {checks['processes_after_serve_stopped']}")
    problems += [f"gate {ident}: {v}" for ident, v in checks["gate"].items() if v != "pass"]
    problems += [f"fault {f.n} ({f.cause}) undetected" for f in faults if f.outcome == "undetected"]
    problems += [f"fault {f.n}: {f.leases_left} live leases on its quarantined session"
                 for f in faults if f.leases_left]
    return {
        "run": {"faults": args.faults, "workers": args.workers, "pool_size": args.pool_size,
                "seed": args.seed, "causes": causes, "settings": {**RUNTIME, **settings},
                "seconds": result["seconds"], "workspace": kept},
        "turns_seen_by_workers": result["turns"], "leases_lost": result["leases_lost"],
        "borrow_retries": result["borrow_retries"],
        "summary": summary, "checks": checks, "problems": problems, "ok": not problems,
        "faults": [asdict(f) for f in faults],
    }


def table(doc: dict[str, Any]) -> str:
    run = doc["run"]
    rows = [f"fault-injection run: {run['faults']} faults, {run['workers']} workers, pool of "
            f"{run['pool_size']}, seed {run['seed']}, {run['seconds']:.1f} s",
            f"{'cause':6s} {'n':>4s}" + "".join(f"  {name + ' p50':>10s} {'p99':>8s}" for name in (
                "detect", "notice", "holder", "repair")) + "  outcomes"]

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.0f} ms"

    for cause, s in doc["summary"].items():
        cells = "".join(f"  {ms(s[key]['p50']):>10s} {ms(s[key]['p99']):>8s}"
                        for key in ("detected_s", "notice_s", "told_s", "repaired_s"))
        rows.append(f"{cause:6s} {s['n']:4d}{cells}  {s['mid_turn']} mid-turn; "
                    + ", ".join(f"{k} x{v}" for k, v in sorted(s["outcomes"].items())))
    c = doc["checks"]
    left = sum(f["leases_left"] for f in doc["faults"])
    rows.append(f"live leases on a session once quarantined: {left}; leases lost by workers: "
                f"{doc['leases_lost']}; turns the workers ran: {doc['turns_seen_by_workers']}")
    rows.append(f"turns: {c['turns']} recorded, {c['turns_not_terminal']} not terminal; live leases on "
                f"failed sessions: {c['leases_on_failed_sessions']}; idle healthy sessions: "
                f"{c['idle_healthy_sessions']} (pool_size {c['pool_size']}); quarantined kept: "
                f"{c['quarantined_sessions']}; orphan processes: {len(c['orphan_processes'])}; after "
                f"serve stopped: {len(c['processes_after_serve_stopped'])}")
    rows.append("gate: " + ", ".join(f"{k} {v}" for k, v in c["gate"].items()))
    rows.append("result: " + ("PASS" if doc["ok"] else "FAIL: " + "; ".join(doc["problems"])))
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=100, help="how many faults (default 100)")
    p.add_argument("--workers", type=int, default=4, help="borrowing clients (default 4)")
    p.add_argument("--pool-size", type=int, default=4, help="the profile's pool_size (default 4)")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--cause", dest="causes", action="append", choices=("kill", "stall", "hang"),
                   help="only these causes (repeatable); default every cause this relay detects")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    p.add_argument("--patience", type=float, default=PATIENCE,
                   help=f"the longest any one wait may take, seconds (default {PATIENCE:.0f})")
    p.add_argument("--dir", help="parent of the temporary workspace")
    p.add_argument("--keep", action="store_true", help="keep the workspace (its path is in the JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        doc = fault_run(args)
    except (FaultRunError, BaseExceptionGroup) as exc:
        found = exc.subgroup(FaultRunError) if isinstance(exc, BaseExceptionGroup) else exc
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        if found is None:
            raise
        print(f"faults: {found}", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(table(doc))
    print(f"results: {args.json}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
