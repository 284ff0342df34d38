#!/usr/bin/env python3
"""flow-relay benchmarks (first version).

Every figure is a ratio to a baseline measured in the same run, on the same
machine, interleaved with the subject (baseline, subject, baseline, subject,
...; the order rotates each round) and summarised by medians, so a noisy
machine moves both sides alike.

    .venv/bin/python scripts/bench.py                 # all sections, full size
    .venv/bin/python scripts/bench.py --quick         # smoke run, few repetitions
    .venv/bin/python scripts/bench.py --only history  # one section (repeatable)
    .venv/bin/python scripts/bench.py --list          # the sections
    .venv/bin/python scripts/bench.py --only runtime  # the live runtime (stand-in and real Codex vs the mock)
    .venv/bin/python scripts/bench.py --only faults   # the fault-injection run (scripts/faults.py)
    .venv/bin/python scripts/bench.py --scale         # N = 10 .. 10,000 scaling table (~4 min)
    .venv/bin/python scripts/bench.py --only http_status --only http_mutations \
        --only ws_leases --only sse_fanout --only sse_replay --only sse_memory   # serving

Results: a human table on stdout (progress on stderr) and one JSON document,
``bench-results/bench.json`` by default (``--json PATH``).  Workspaces live in
temporary directories (``--dir`` picks their parent: fsync figures depend on
the filesystem) and are removed afterwards.

The serving sections (issue 3) run servers as child processes bound to
127.0.0.1 only: the relay (``python -m relay serve --port 0``), a bare
quart-trio hello-world app written to the workspace at run time, and etcd; the
load comes from wrk and from Python clients in this process, never from inside
a server.  Every child is stopped (SIGTERM, then SIGKILL) when its section
ends, however it ends.  wrk and etcd (Debian ``wrk``, ``etcd-server``) are
optional: without them the figures that need them are reported as SKIP with a
note.  ``--profile-servers DIR`` runs the relay servers under cProfile (one
``.prof`` per section) to see where server time goes.  Nothing leaves the
loopback interface.

Adding a section: write ``def name(bench: Bench) -> list[Figure]`` and decorate
it with ``@section("name", "title")``; it then appears in ``--list``,
``--only``, the table and the JSON.  Use ``interleave`` for timings and give
every figure a baseline from the same section.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import attrs  # noqa: E402

import relay  # noqa: E402
import relay_client as rc  # noqa: E402

DEFAULT_JSON = REPO / "bench-results" / "bench.json"

# Modules the ``status`` read path must not import (issue 2: "so the read path
# imports neither trio nor the server stack").
SERVER_STACK = ("trio", "quart", "quart_trio", "hypercorn", "trio_websocket", "httpx", "httpx2")


class BenchError(Exception):
    """A benchmark could not run as designed (a command failed, a reply was an error)."""


################################################################
# Figures and the section registry
################################################################


@dataclass
class Figure:
    """One reported number, its same-run baseline and, optionally, a target.

    ``ratio`` is ``value / baseline``.  ``target`` is ``"<= 4"``, ``">= 0.5"``
    or ``"== 0"``; it applies to the ratio (``on="ratio"``) or to the value
    itself (``on="value"``, for checks that have no baseline).  A figure with no
    target is information only.
    """

    key: str
    label: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    target: str = ""
    on: str = "ratio"
    note: str = ""
    samples: dict[str, Any] = field(default_factory=dict)
    #: Why the figure could not be measured here (a missing tool); result SKIP.
    skipped: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0 or not math.isfinite(self.value):
            return None
        return self.value / self.baseline

    @property
    def result(self) -> str:
        if self.skipped:
            return "SKIP"
        if not self.target:
            return "info"
        op, bound = self.target.split()
        x = self.ratio if self.on == "ratio" else self.value
        if x is None:
            return "MISS"
        ok = {"<=": x <= float(bound), ">=": x >= float(bound), "==": x == float(bound)}[op]
        return "PASS" if ok else "MISS"

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "label": self.label,
            "value": self.value if math.isfinite(self.value) else None, "unit": self.unit,
            "baseline": self.baseline, "baseline_label": self.baseline_label,
            "ratio": self.ratio, "target": self.target or None, "target_on": self.on,
            "result": self.result, "note": self.note, "samples": self.samples,
            "skipped": self.skipped or None,
        }


@dataclass
class Bench:
    """What every section gets: the run's settings and helpers for children."""

    quick: bool
    python: str
    env: dict[str, str]
    tmp_parent: str | None
    notes: list[str] = field(default_factory=list)
    #: With ``--profile-servers DIR``: relay servers run under cProfile, one file each.
    profile_dir: Path | None = None

    def reps(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    run: Callable[[Bench], list[Figure]]


SECTIONS: dict[str, Section] = {}


def section(name: str, title: str) -> Callable[[Callable[[Bench], list[Figure]]],
                                                Callable[[Bench], list[Figure]]]:
    """Register a measurement; sections run in registration order."""
    def register(fn: Callable[[Bench], list[Figure]]) -> Callable[[Bench], list[Figure]]:
        SECTIONS[name] = Section(name, title, fn)
        return fn
    return register


################################################################
# Measurement helpers
################################################################


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def summarize(samples: list[float], scale: float = 1.0) -> dict[str, Any]:
    """Median and spread of ``samples`` (multiplied by ``scale``)."""
    xs = sorted(x * scale for x in samples)
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0], xs[0], xs[0]]
    return {"n": len(xs), "median": statistics.median(xs), "p25": q[0], "p75": q[2],
            "min": xs[0], "max": xs[-1]}


def interleave(subjects: dict[str, Callable[[], float]], n: int, warmup: int = 0,
               rng: random.Random | None = None) -> dict[str, list[float]]:
    """Run each callable ``warmup + n`` times, round-robin with the starting
    subject rotating every round (or, with ``rng``, in a fresh random order
    each round, so that no subject always follows the same one); each
    callable returns its own duration in seconds.  Returns the ``n`` kept
    durations per subject."""
    names = list(subjects)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + n):
        k = i % len(names)
        for name in rng.sample(names, len(names)) if rng else names[k:] + names[:k]:
            took = subjects[name]()
            if i >= warmup:
                out[name].append(took)
    return out


def child_env() -> dict[str, str]:
    """The environment for ``python`` children: ours minus what changes the relay's behaviour."""
    env = dict(os.environ)
    for name in ("FLOW_ROOT", "RELAY_FAILPOINT", "PYTHONPROFILEIMPORTTIME", "PYTHONTRACEMALLOC",
                 "PYTHONDEVMODE", "PYTHONINSPECT", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


def spawn(bench: Bench, argv: list[str], cwd: Path) -> float:
    """Seconds from spawning ``python ARGV`` to its exit; a non-zero exit is an error."""
    start = time.perf_counter()
    proc = subprocess.run([bench.python, *argv], cwd=cwd, env=bench.env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        again = subprocess.run([bench.python, *argv], cwd=cwd, env=bench.env, capture_output=True,
                               text=True, check=False)
        raise BenchError(f"`python {' '.join(argv)}` exited {proc.returncode}: "
                         f"{again.stdout.strip()} {again.stderr.strip()}")
    return took


def cli(bench: Bench, root: Path, *args: str) -> dict[str, Any]:
    """Run ``python -m relay ARGS --json`` in ``root``; its JSON object, or BenchError."""
    proc = subprocess.run([bench.python, "-m", "relay", *args, "--json"], cwd=root, env=bench.env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"`relay {' '.join(args)}` exited {proc.returncode}: "
                         f"{proc.stdout.strip()} {proc.stderr.strip()}")
    return json.loads(proc.stdout)


@contextlib.contextmanager
def workspace(bench: Bench) -> Iterator[Path]:
    """A fresh, empty workspace root, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="relay-bench-", dir=bench.tmp_parent) as tmp:
        yield Path(tmp)


def prepare_workspace(bench: Bench, root: Path) -> None:
    """A small but realistic ledger, built through the CLI: three profiles,
    four sessions, three live leases, a control request, a few records."""
    steps = [
        ("profile", "register", "pool-codex", "--provider", "codex", "--mode", "pooled"),
        ("profile", "register", "solo-claude", "--provider", "claude", "--mode", "one-borrow"),
        ("profile", "register", "solo-kimi", "--provider", "kimi", "--mode", "one-borrow"),
        ("session", "create", "--profile", "pool-codex", "--session-id", "s1"),
        ("session", "create", "--profile", "pool-codex", "--session-id", "s2"),
        ("session", "create", "--profile", "solo-claude", "--session-id", "s3"),
        ("session", "create", "--profile", "solo-kimi", "--session-id", "s4"),
        ("lease", "grant", "--session", "s1", "--holder", "reader-a", "--mode", "shared-read",
         "--ttl", "3600"),
        ("lease", "grant", "--session", "s1", "--holder", "reader-b", "--mode", "shared-read",
         "--ttl", "3600"),
        ("lease", "grant", "--session", "s2", "--holder", "writer-a", "--mode", "exclusive-write",
         "--ttl", "3600"),
        ("control", "record", "--request-id", "req-1", "--session", "s1", "--kind", "interrupt",
         "--payload", '{"why": "bench"}'),
        ("event", "append", "--session", "s1", "--kind", "started", "--data", '{"turn": 1}'),
        ("event", "append", "--session", "s2", "--kind", "started"),
        ("result", "append", "--session", "s2", "--kind", "done", "--data", '{"ok": true}'),
    ]
    for step in steps:
        cli(bench, root, *step)


def store_for(root: Path) -> tuple[relay.Store, relay.Config]:
    store = relay.Store(root)
    return store, relay.load_config(store.flow)


def commit_ok(store: relay.Store, config: relay.Config, mutations: list[relay.Mutation]) -> list[Any]:
    """``relay.commit`` that turns a refused mutation into a BenchError."""
    results, _ = relay.commit(store, mutations, config)
    for result in results:
        if isinstance(result, rc.RelayError):
            raise BenchError(f"commit refused: {result.code.value}: {result.message}")
    return results


def append_mutation(session_id: str, n: int = 0) -> relay.Mutation:
    return relay.rpc_mutation("AppendEvent", rc.AppendRecordRequest(
        session_id=session_id, kind="bench", data={"n": n}))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: About one journal record of an AppendEvent commit (its cursor, revision and stamps).
RAW_RECORD_BYTES = 580


def raw_durable_append(path: Path, data: bytes) -> float:
    """The machine's floor for one durable append: write at the end, fdatasync."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def raw_durable_write(directory: Path, data: bytes, dir_fsync: bool) -> float:
    """The machine's floor for one durable replace: temp write, fsync, rename
    (and, with ``dir_fsync``, fsync of the directory).  Returns seconds."""
    tmp, final = directory / "raw.json.tmp", directory / "raw.json"
    start = time.perf_counter()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    if dir_fsync:
        fsync_dir(directory)
    return time.perf_counter() - start


def imported_modules(bench: Bench, argv: list[str], cwd: Path) -> set[str]:
    """Top-level names of every module ``python -X importtime ARGV`` imports."""
    proc = subprocess.run([bench.python, "-X", "importtime", *argv], cwd=cwd, env=bench.env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"`python -X importtime {' '.join(argv)}` exited {proc.returncode}")
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    return names


def time_figure(key: str, label: str, subject: list[float], base: list[float], baseline_label: str,
                target: str = "", note: str = "") -> Figure:
    """A latency figure in ms: median subject vs median baseline."""
    s, b = summarize(subject, 1e3), summarize(base, 1e3)
    return Figure(key, label, s["median"], "ms", b["median"], baseline_label, target, note=note,
                  samples={"subject_ms": s, "baseline_ms": b})


def rate_figure(key: str, label: str, subject: list[float], base: list[float], baseline_label: str,
                target: str = "", note: str = "") -> Figure:
    """A throughput figure in ops/s, from median per-operation latencies."""
    s, b = summarize(subject, 1e3), summarize(base, 1e3)
    return Figure(key, label, 1e3 / s["median"], "ops/s", 1e3 / b["median"], baseline_label, target,
                  note=note, samples={"subject_ms": s, "baseline_ms": b})


def imports_figure(key: str, label: str, modules: set[str], target: str = "") -> Figure:
    """A check (no baseline): how many server-stack modules a command imported."""
    heavy = sorted(modules & set(SERVER_STACK))
    note = ("imported: " + ", ".join(heavy)) if heavy else "none of " + ", ".join(SERVER_STACK)
    note += "; attrs " + ("imported" if "attrs" in modules else "not imported")
    return Figure(key, label, len(heavy), "modules", target=target, on="value", note=note)


################################################################
# Sections
################################################################


@section("cold_start", "read path cold start: python -m relay status --json vs python -c pass")
def cold_start(bench: Bench) -> list[Figure]:
    n, warmup = bench.reps(40, 5), bench.reps(3, 1)
    with workspace(bench) as root:
        prepare_workspace(bench, root)
        status = cli(bench, root, "status")
        if status.get("status") != "pass" or status.get("sessions") != 4:
            raise BenchError(f"prepared workspace looks wrong: {status}")
        ledger_bytes = (root / relay.LEDGER_REL).stat().st_size
        progress(f"cold_start: {n} rounds of pass / status / inspect (ledger {ledger_bytes} B)")
        runs = interleave({
            "pass": lambda: spawn(bench, ["-c", "pass"], root),
            "status": lambda: spawn(bench, ["-m", "relay", "status", "--json"], root),
            "inspect": lambda: spawn(bench, ["-m", "relay", "inspect", "relay", "--json"], root),
        }, n, warmup)
        status_mods = imported_modules(bench, ["-m", "relay", "status", "--json"], root)
        inspect_mods = imported_modules(bench, ["-m", "relay", "inspect", "relay", "--json"], root)
    base = "python -c pass"
    return [
        time_figure("cold_start.status", "status --json, spawn to exit", runs["status"], runs["pass"],
                    base, "<= 2", note=f"prepared ledger {ledger_bytes} B, built via the CLI"),
        time_figure("cold_start.inspect", "inspect relay --json (full path)", runs["inspect"],
                    runs["pass"], base, note="typed model; information only"),
        imports_figure("cold_start.status_server_imports", "server-stack modules imported by status",
                       status_mods, "== 0"),
        imports_figure("cold_start.inspect_server_imports", "server-stack modules imported by inspect",
                       inspect_mods),
    ]


@section("cli_mutation", "one CLI mutation, spawn to exit: event append vs python -c pass")
def cli_mutation(bench: Bench) -> list[Figure]:
    n, warmup = bench.reps(40, 5), bench.reps(3, 1)
    with workspace(bench) as root:
        prepare_workspace(bench, root)
        progress(f"cli_mutation: {n} rounds of pass / event append")
        runs = interleave({
            "pass": lambda: spawn(bench, ["-c", "pass"], root),
            "append": lambda: spawn(bench, ["-m", "relay", "event", "append", "--session", "s1",
                                            "--kind", "k"], root),
        }, n, warmup)
        last = cli(bench, root, "event", "list", "--session", "s1", "--after", "0", "--limit", "1")
        expected = 1 + warmup + n
        if last["last_seq"] != expected:
            raise BenchError(f"expected {expected} events on s1, the log says {last['last_seq']}")
    return [time_figure("cli_mutation.event_append", "event append, spawn to exit", runs["append"],
                        runs["pass"], "python -c pass", "<= 4",
                        note="full CLI: parse, lock, stream append+fsync, ledger write+fsync+rename")]


def durable_loop(bench: Bench, n: int, make: Callable[[relay.Store, relay.Config], Callable[[], float]],
                 ) -> tuple[dict[str, list[float]], tuple[int, int]]:
    """In a fresh prepared workspace, interleave ``n`` commits (``make`` builds
    the timed callable) with raw durable writes of the ledger's current size,
    with and without a directory fsync.  Returns the runs and the ledger's
    size at the start and the end."""
    with workspace(bench) as root:
        prepare_workspace(bench, root)
        store, config = store_for(root)
        commit_ok(store, config, [relay.rpc_mutation("CreateSession", rc.CreateSessionRequest(
            profile="pool-codex", session_id="bench"))])
        raw_dir = root / "raw"  # same filesystem as the ledger, outside the relay's trees
        raw_dir.mkdir()
        pool = os.urandom(1 << 20)

        def ledger_sized() -> bytes:
            size = store.ledger_path.stat().st_size
            return pool[:size] if size <= len(pool) else os.urandom(size)

        start_size = store.ledger_path.stat().st_size
        runs = interleave({
            "raw": lambda: raw_durable_write(raw_dir, ledger_sized(), dir_fsync=False),
            "raw_dir": lambda: raw_durable_write(raw_dir, ledger_sized(), dir_fsync=True),
            "subject": make(store, config),
        }, n, warmup=bench.reps(10, 3))
        return runs, (start_size, store.ledger_path.stat().st_size)


def timed_append(store: relay.Store, config: relay.Config) -> Callable[[], float]:
    counter = iter(range(1 << 62))

    def run() -> float:
        mutation = append_mutation("bench", next(counter))
        start = time.perf_counter()
        commit_ok(store, config, [mutation])
        return time.perf_counter() - start
    return run


def timed_lease(store: relay.Store, config: relay.Config) -> Callable[[], float]:
    """Alternately grant and release one exclusive lease (one commit per call)."""
    live: list[str] = []

    def run() -> float:
        if live:
            mutation = relay.rpc_mutation("ReleaseLease", rc.ReleaseLeaseRequest(lease_id=live.pop()))
        else:
            mutation = relay.rpc_mutation("GrantLease", rc.GrantLeaseRequest(
                session_id="bench", holder="bench", mode="exclusive-write", ttl_seconds=600))
        start = time.perf_counter()
        (reply,) = commit_ok(store, config, [mutation])
        took = time.perf_counter() - start
        if reply.outcome == "granted":
            live.append(reply.lease.lease_id)
        return took
    return run


@section("durable_mutations", "in-process durable mutations/s vs raw temp+fsync+rename of the ledger's size")
def durable_mutations(bench: Bench) -> list[Figure]:
    n = bench.reps(400, 40)
    progress(f"durable_mutations: {n} rounds of raw / raw+dir fsync / AppendEvent commit")
    appends, append_sizes = durable_loop(bench, n, timed_append)
    progress(f"durable_mutations: {n} rounds of raw / raw+dir fsync / GrantLease|ReleaseLease commit")
    leases, lease_sizes = durable_loop(bench, n, timed_lease)
    base, base_dir = "temp write+fsync+rename, ledger-sized", "temp write+fsync+rename+dir fsync"
    append_note = f"ledger {append_sizes[0]:,}..{append_sizes[1]:,} B; the baseline writes the current size"
    lease_note = (f"ledger grew {lease_sizes[0]:,}..{lease_sizes[1]:,} B: released leases stay until "
                  "lease_retention_seconds; the baseline writes the current size")
    return [
        rate_figure("durable_mutations.append", "AppendEvent commits/s", appends["subject"],
                    appends["raw"], base, ">= 0.5", note=append_note),
        rate_figure("durable_mutations.lease", "GrantLease/ReleaseLease commits/s", leases["subject"],
                    leases["raw"], base, ">= 0.5", note=lease_note),
        rate_figure("durable_mutations.append_vs_dirsync", "AppendEvent commits/s (vs +dir fsync)",
                    appends["subject"], appends["raw_dir"], base_dir,
                    note="information: the baseline also fsyncs the directory, as the ledger write does"),
        rate_figure("durable_mutations.lease_vs_dirsync", "lease commits/s (vs +dir fsync)",
                    leases["subject"], leases["raw_dir"], base_dir, note="information"),
    ]


@section("history", "event append at 100k events of history vs 1k; ledger size; event list --after")
def history(bench: Bench) -> list[Figure]:
    small, big, batch = "hist-1k", "hist-100k", 1000
    big_total = 100_000
    n_commit, n_cli, n_read = bench.reps(200, 20), bench.reps(20, 3), bench.reps(300, 30)
    with workspace(bench) as root:
        prepare_workspace(bench, root)
        store, config = store_for(root)
        commit_ok(store, config, [relay.rpc_mutation("CreateSession", rc.CreateSessionRequest(
            profile="pool-codex", session_id=sid)) for sid in (small, big)])
        # Both sessions get 1k events (group commit: one commit call per batch).
        commit_ok(store, config, [append_mutation(small, i) for i in range(batch)])
        commit_ok(store, config, [append_mutation(big, i) for i in range(batch)])
        ledger_at_1k = store.ledger_path.stat().st_size
        progress(f"history: building {big_total} events on {big} in commits of {batch}")
        build_start = time.perf_counter()
        for first in range(batch, big_total, batch):
            commit_ok(store, config, [append_mutation(big, i) for i in range(first, first + batch)])
        build_seconds = time.perf_counter() - build_start
        ledger_at_100k = store.ledger_path.stat().st_size
        log_bytes = {sid: store.stream_path(sid, "events").stat().st_size for sid in (small, big)}
        cursors = store.read().cursors
        if cursors[small].events != batch or cursors[big].events != big_total:
            raise BenchError(f"histories are {cursors[small].events} and {cursors[big].events}")

        def single(sid: str) -> Callable[[], float]:
            def run() -> float:
                mutation = append_mutation(sid)
                start = time.perf_counter()
                commit_ok(store, config, [mutation])
                return time.perf_counter() - start
            return run

        progress(f"history: {n_commit} rounds of single-event commits on {small} / {big}")
        commits = interleave({"small": single(small), "big": single(big)}, n_commit,
                             warmup=bench.reps(10, 2))

        cursors = store.read().cursors
        last = {sid: cursors[sid].events for sid in (small, big)}

        def read(sid: str) -> Callable[[], float]:
            request = rc.ListRecordsRequest(session_id=sid, after=last[sid] - 10, limit=100)

            def run() -> float:
                start = time.perf_counter()
                reply = relay.read_rpc(store, "ListEvents", request, time.time())
                took = time.perf_counter() - start
                if len(reply.records) != 10:
                    raise BenchError(f"event list on {sid} returned {len(reply.records)} records")
                return took
            return run

        def list_cli(sid: str) -> Callable[[], float]:
            argv = ["-m", "relay", "event", "list", "--session", sid, "--after", str(last[sid] - 10),
                    "--json"]
            return lambda: spawn(bench, argv, root)

        progress(f"history: {n_read} in-process and {n_cli} CLI event list --after reads per log")
        reads = interleave({"small": read(small), "big": read(big)}, n_read, warmup=5)
        lists = interleave({"small": list_cli(small), "big": list_cli(big)}, n_cli, warmup=1)
    group_rate = (big_total - batch) / build_seconds
    single_rate = 1 / statistics.median(commits["big"])
    return [
        time_figure("history.append_100k_vs_1k", "single-event commit at 100k history",
                    commits["big"], commits["small"], "same, at 1k history", "<= 1.2",
                    note=f"event logs {log_bytes[big]:,} B vs {log_bytes[small]:,} B"),
        Figure("history.ledger_bytes", "ledger size at 100k events", ledger_at_100k, "B",
               ledger_at_1k, "ledger size at 1k events", "<= 1.01",
               note=f"grew {ledger_at_100k - ledger_at_1k:+d} B over 99k appends (digits of counters)"),
        time_figure("history.list_cli", "event list --after last-10 (CLI), 100k log",
                    lists["big"], lists["small"], "same on the 1k log",
                    note="spawn to exit; information"),
        time_figure("history.list_inproc", "ListEvents after last-10 (in-process), 100k log",
                    reads["big"], reads["small"], "same on the 1k log",
                    note="binary search over the log; information"),
        Figure("history.group_commit", "group-commit append rate (batches of 1000)", group_rate,
               "ops/s", single_rate, "single-event commits/s, same log",
               note=f"{big_total - batch:,} events in {build_seconds:.2f} s; information",
               samples={"build_seconds": build_seconds}),
    ]


################################################################
# Serving (issue 3): the relay, its baselines and the load as loopback processes
################################################################

# Every server here is a child process bound to 127.0.0.1 (port 0 where the
# server can pick its own) and is stopped in a ``finally`` (SIGTERM, then
# SIGKILL).  The load generators are wrk (HTTP) and Python clients in this
# process (trio, httpx2, trio-websocket): never in the server's process, so the
# server never shares a GIL with its load.  The machine's cores are shared by
# both sides, as they would be on one small host.  Missing tools (wrk, etcd)
# turn a figure into SKIP with a note; they never fail the run.

LOOPBACK = "127.0.0.1"
WRK_MISSING = "install wrk (Debian: apt-get install wrk)"

#: The baseline web app: quart-trio's hello world, served as the relay serves
#: (``hypercorn.trio.serve`` inside ``trio.run``, access and error logs off).
HELLO_APP = '''\
"""bench.py baseline: a bare quart-trio hello-world app, served like the relay."""
import json
import os
import sys

import hypercorn.config
import hypercorn.trio
import trio
from quart_trio import QuartTrio

app = QuartTrio("hello")


@app.get("/")
async def hello():
    return "hello, world"


async def main():
    config = hypercorn.config.Config()
    config.bind = [sys.argv[1]]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(hypercorn.trio.serve, app, config)
        print(json.dumps({"endpoint": urls[0], "pid": os.getpid()}), flush=True)


trio.run(main)
'''

#: wrk script: AppendEvent over Connect/JSON, rotating over four sessions.
APPEND_LUA = '''\
local sessions = {"s1", "s2", "s3", "s4"}
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil,
    '{"session_id":"' .. sessions[n % 4 + 1] .. '","kind":"bench","data":{"n":' .. n .. '}}')
end
'''

#: wrk script: etcd lease grant, then revoke of a granted id (ids from grant replies queue for
#: revokes, so each connection alternates about evenly); pairs/s is half the requests/s.
ETCD_PAIRS_LUA = '''\
local ids = {}
request = function()
  local id = table.remove(ids)
  if id then
    return wrk.format("POST", "/v3/lease/revoke", {["Content-Type"] = "application/json"},
                      '{"ID":"' .. id .. '"}')
  end
  return wrk.format("POST", "/v3/lease/grant", {["Content-Type"] = "application/json"}, '{"TTL":60}')
end
response = function(status, headers, body)
  local id = body:match('"ID":"(%d+)"')
  if id then table.insert(ids, id) end
end
'''

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Served:
    """A server child process: its base URL (``http://127.0.0.1:PORT``) and pid."""

    url: str
    pid: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def log_tail(log: Path, chars: int = 600) -> str:
    try:
        return log.read_text(errors="replace")[-chars:].strip() or "(no output)"
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes], grace: float = 8.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; always reaps the child."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def child_process(argv: list[str], cwd: Path, env: dict[str, str], log: Path,
                  ) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` (stdout piped, stderr to ``log``); stopped however the block ends."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err)
    try:
        yield proc
    finally:
        stop_process(proc)


def first_line(proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 30.0) -> str:
    """The child's first stdout line, within ``timeout`` seconds, or BenchError."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise BenchError(f"{what} did not report its endpoint within {timeout:.0f} s: "
                             f"{log_tail(log)}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise BenchError(f"{what} exited with {proc.wait()} before listening: {log_tail(log)}")
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


@contextlib.contextmanager
def served_child(bench: Bench, argv: list[str], cwd: Path, log: Path, what: str) -> Iterator[Served]:
    """A server that prints ``{"endpoint": ..., "pid": ...}`` once it listens."""
    with child_process([bench.python, *argv], cwd, bench.env, log) as proc:
        line = first_line(proc, what, log)
        try:
            doc = json.loads(line)
            url = str(doc["endpoint"]).rstrip("/")
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"{what} printed {line!r}, not its endpoint") from None
        if not url.startswith(f"http://{LOOPBACK}:"):
            raise BenchError(f"{what} serves on {url}, not on {LOOPBACK}")
        yield Served(url, int(doc.get("pid") or proc.pid), proc, log)


def relay_server(bench: Bench, root: Path, tag: str) -> contextlib.AbstractContextManager[Served]:
    """``python -m relay serve --host 127.0.0.1 --port 0 --json`` in ``root``
    (under cProfile with ``--profile-servers DIR``)."""
    argv = ["-m", "relay", "serve", "--host", LOOPBACK, "--port", "0", "--json"]
    if bench.profile_dir is not None:
        bench.profile_dir.mkdir(parents=True, exist_ok=True)
        out = bench.profile_dir / f"{tag}.prof"
        bench.notes.append(f"relay server for {tag} ran under cProfile: {out}")
        # Not ``-m cProfile -m relay``: relay must be imported as ``relay``, not
        # run as ``__main__`` (its messages resolve type hints in their module).
        argv = ["-c", "import cProfile, sys, relay; cProfile.run('relay.main(sys.argv[2:])', sys.argv[1])",
                str(out), *argv[2:]]
    return served_child(bench, argv, root, root / f"relay-{tag}.log", f"relay serve ({tag})")


def hello_server(bench: Bench, parent: Path) -> contextlib.AbstractContextManager[Served]:
    script = parent / "hello_app.py"
    script.write_text(HELLO_APP, encoding="utf-8")
    return served_child(bench, [str(script), f"{LOOPBACK}:0"], parent, parent / "hello.log",
                        "hello-world app")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def etcd_server(etcd: str, parent: Path) -> Iterator[Served]:
    """A one-member etcd on loopback ports with its data dir under ``parent``."""
    client, peer = f"http://{LOOPBACK}:{free_port()}", f"http://{LOOPBACK}:{free_port()}"
    argv = [etcd, "--name", "bench", "--data-dir", str(parent / "etcd-data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    log = parent / "etcd.log"
    with child_process(argv, parent, env, log) as proc:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise BenchError(f"etcd exited with {proc.returncode}: {log_tail(log)}")
            with contextlib.suppress(OSError, ValueError):
                if json.loads(http_get(client + "/health", timeout=2)).get("health") == "true":
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"etcd was not healthy within 20 s: {log_tail(log)}")
            time.sleep(0.1)
        yield Served(client, proc.pid, proc, log)


def http_get(url: str, timeout: float = 10.0) -> bytes:
    """GET without any proxy from the environment (the servers are on loopback)."""
    with _NO_PROXY.open(url, timeout=timeout) as response:
        return response.read()


def prom_values(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def run_wrk(wrk: str, url: str, connections: int, seconds: float, script: Path | None = None,
            problems: list[str] | None = None) -> float:
    """``wrk -t1 -cN -dSs [-s script] URL``; seconds per request (1 / requests/s).
    A non-2xx response is an error; socket errors are collected in ``problems``."""
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
            *(["-s", str(script)] if script else []), url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    out = proc.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode != 0 or rate is None or float(rate.group(1)) <= 0:
        raise BenchError(f"`{' '.join(argv)}` exited {proc.returncode}: {out.strip()} {proc.stderr.strip()}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise BenchError(f"wrk got {bad.group(1)} non-2xx responses from {url}")
    errors = re.search(r"Socket errors:(.*)", out)
    if errors and problems is not None:
        problems.append(f"{url} c{connections}: socket errors{errors.group(1)}")
    return 1.0 / float(rate.group(1))


def commit_figures(key: str, what: str, before: dict[str, float], after: dict[str, float]) -> list[Figure]:
    """Mean group-commit batch size and latency between two /metrics scrapes
    (information figures: they explain a rate, they are not targets)."""
    commits = after["relay_commit_batch_size_count"] - before["relay_commit_batch_size_count"]
    if commits <= 0:
        raise BenchError(f"/metrics counted no commits during the {what}")
    batched = after["relay_commit_batch_size_sum"] - before["relay_commit_batch_size_sum"]
    seconds = after["relay_commit_seconds_sum"] - before["relay_commit_seconds_sum"]
    return [
        Figure(f"{key}.batch_size", f"mean group-commit batch ({what})", batched / commits, "mutations",
               note=f"relay_commit_batch_size_sum/_count over the measured rounds: {batched:,.0f} "
                    f"mutations in {commits:,.0f} commits; information"),
        Figure(f"{key}.commit_ms", f"mean group-commit latency ({what})", seconds / commits * 1e3, "ms",
               note="relay_commit_seconds_sum/_count: apply, stream append, ledger write, fsyncs; "
                    "information"),
    ]


def scrape(server: Served) -> dict[str, float]:
    return prom_values(http_get(server.url + "/metrics").decode())


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float:
    """``cpu_seconds`` at nanosecond resolution: the process's CPU clock
    (``clock_getcpuclockid``: every thread's user + system time, exited ones
    too), where /proc's utime+stime come in 10 ms ticks."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # CPUCLOCK_SCHED of the whole process
    except OSError:  # pragma: no cover - not Linux, or not ours to read
        return cpu_seconds(pid)


class CpuShare:
    """Wraps timed callables to add up, per subject, the wall time and the CPU
    seconds a server process and this (client) process used meanwhile."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def wrap(self, name: str, pid: int, fn: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            server, client, start = cpu_seconds(pid), time.process_time(), time.perf_counter()
            took = fn()
            row = self.totals.setdefault(name, [0.0, 0.0, 0.0])
            row[0] += time.perf_counter() - start
            row[1] += cpu_seconds(pid) - server
            row[2] += time.process_time() - client
            return took
        return run

    def describe(self, name: str, client: bool = True) -> str:
        wall, server, mine = self.totals[name]
        text = f"{name} server {server / wall:.0%} of a core"
        return text + (f", the Python client {mine / wall:.0%}" if client else "")


def run_trio(fn: Callable[..., Any], *args: Any) -> Any:
    """``trio.run``, re-raising the one real error out of nested nursery groups."""
    import trio

    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise copy.copy(leaf) from group


def percentile(xs: list[float], pct: int) -> float:
    """The ``pct``-th percentile (inclusive method); the max when there are few samples."""
    if len(xs) < 2:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[pct - 1]


def seed_sessions(root: Path, session_ids: list[str], profile: str = "pool-codex") -> None:
    """A workspace with one pooled profile and these sessions, in one commit
    (before any server starts; the CLI would cost ~0.3 s per session)."""
    store, config = store_for(root)
    commit_ok(store, config, [relay.rpc_mutation("RegisterProfile", rc.RegisterProfileRequest(
        name=profile, provider="codex", mode="pooled"))] + [
        relay.rpc_mutation("CreateSession", rc.CreateSessionRequest(profile=profile, session_id=sid))
        for sid in session_ids])


def raise_fd_limit(want: int) -> int:
    """Raise this process's (and so its children's) soft fd limit toward ``want``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no VmRSS")


def skipped_figure(key: str, label: str, unit: str, why: str, value: float = math.nan,
                   note: str = "") -> Figure:
    return Figure(key, label, value, unit, note=note, skipped=why)


def reply_json(response: Any, what: str) -> dict[str, Any]:
    """The JSON body of a 200 reply, or BenchError with the error body."""
    if response.status_code != 200:
        raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


# -- HTTP sections ----------------------------------------------------------------


@section("http_status", "GET /api/relay/status requests/s vs a bare quart-trio hello-world (wrk -c16)")
def http_status(bench: Bench) -> list[Figure]:
    label = "GET /api/relay/status requests/s, wrk -c16"
    wrk = shutil.which("wrk")
    if wrk is None:
        return [skipped_figure("http_status.rps", label, "ops/s", WRK_MISSING)]
    seconds, rounds = bench.reps(3, 2), bench.reps(5, 2)
    problems: list[str] = []
    with workspace(bench) as root, contextlib.ExitStack() as stack:
        prepare_workspace(bench, root)
        server = stack.enter_context(relay_server(bench, root, "http_status"))
        hello = stack.enter_context(hello_server(bench, root))
        status_url, hello_url = server.url + "/api/relay/status", hello.url + "/"
        doc = json.loads(http_get(status_url))
        if doc.get("status") != "pass" or doc.get("sessions") != 4:
            raise BenchError(f"status over HTTP looks wrong: {doc}")
        progress(f"http_status: warm-up, then {rounds} interleaved rounds of wrk -c16 -d{seconds}s")
        run_wrk(wrk, hello_url, 16, 1)
        run_wrk(wrk, status_url, 16, 1)
        cpu = CpuShare()
        runs = interleave({
            "hello": cpu.wrap("hello", hello.pid,
                              lambda: run_wrk(wrk, hello_url, 16, seconds, problems=problems)),
            "status": cpu.wrap("relay", server.pid,
                               lambda: run_wrk(wrk, status_url, 16, seconds, problems=problems)),
        }, rounds)
    note = (f"wrk -t1 -c16 -d{seconds}s, {rounds} interleaved rounds, median round; wrk and the server "
            f"share the machine's {os.cpu_count()} cores; CPU: {cpu.describe('relay', False)}, "
            f"{cpu.describe('hello', False)}; the relay tunes its collector while serving "
            f"(gc.freeze, a higher gen0 threshold), the bare app keeps Python's defaults")
    return [rate_figure("http_status.rps", label, runs["status"], runs["hello"],
                        "bare quart-trio hello-world GET /, served the same way", ">= 0.9",
                        note="; ".join([note, *problems]))]


def borrow_latencies(relay_url: str, hello_url: str, n: int, warmup: int) -> dict[str, list[float]]:
    """Concurrency 1, one keep-alive httpx2 client for both servers: time each
    ``Borrow`` (then an untimed ``Release`` frees the session again) and each
    hello-world ``GET /``, interleaved."""
    import httpx2

    with httpx2.Client(trust_env=False, timeout=10) as http:
        def borrow() -> float:
            start = time.perf_counter()
            response = http.post(f"{relay_url}/relay.v1.Relay/Borrow",
                                 json={"holder": "bench-borrow", "profile": "borrow-pool"})
            took = time.perf_counter() - start
            reply = reply_json(response, "Borrow")
            if reply.get("outcome") != "granted":
                raise BenchError(f"Borrow answered {reply}")
            reply_json(http.post(f"{relay_url}/relay.v1.Relay/Release",
                                 json={"lease_id": reply["lease"]["lease_id"]}), "Release")
            return took

        def hello() -> float:
            start = time.perf_counter()
            response = http.get(hello_url)
            took = time.perf_counter() - start
            if response.status_code != 200:
                raise BenchError(f"hello-world answered {response.status_code}")
            return took

        return interleave({"hello": hello, "borrow": borrow}, n, warmup)


@section("http_mutations", "durable AppendEvent RPCs/s at concurrency 64 vs hello-world; Borrow p99 at c1")
def http_mutations(bench: Bench) -> list[Figure]:
    seconds, rounds = bench.reps(3, 2), bench.reps(5, 2)
    n_borrow, borrow_warmup = bench.reps(300, 40), bench.reps(20, 5)
    wrk = shutil.which("wrk")
    figures: list[Figure] = []
    problems: list[str] = []
    with workspace(bench) as root, contextlib.ExitStack() as stack:
        prepare_workspace(bench, root)
        cli(bench, root, "profile", "register", "borrow-pool", "--provider", "codex", "--mode", "pooled")
        for i in range(4):
            cli(bench, root, "session", "create", "--profile", "borrow-pool", "--session-id", f"b{i}")
        server = stack.enter_context(relay_server(bench, root, "http_mutations"))
        hello = stack.enter_context(hello_server(bench, root))
        hello_url = hello.url + "/"
        label = "AppendEvent RPCs/s (durable), wrk -c64"
        if wrk is None:
            figures.append(skipped_figure("http_mutations.append_rps", label, "ops/s", WRK_MISSING))
        else:
            script = root / "append.lua"
            script.write_text(APPEND_LUA, encoding="utf-8")
            append_url = server.url + "/relay.v1.Relay/AppendEvent"
            progress(f"http_mutations: warm-up, then {rounds} interleaved rounds of wrk -c64 -d{seconds}s")
            run_wrk(wrk, hello_url, 64, 1)
            run_wrk(wrk, append_url, 64, 1, script)
            before = scrape(server)
            cpu = CpuShare()
            runs = interleave({
                "hello": cpu.wrap("hello", hello.pid,
                                  lambda: run_wrk(wrk, hello_url, 64, seconds, problems=problems)),
                "append": cpu.wrap("relay", server.pid,
                                   lambda: run_wrk(wrk, append_url, 64, seconds, script, problems)),
            }, rounds)
            after = scrape(server)
            note = (f"wrk -t1 -c64 -d{seconds}s, {rounds} interleaved rounds, median round; POST "
                    "Connect/JSON AppendEvent over 4 sessions, each acknowledged only once durable; "
                    f"CPU: {cpu.describe('relay', False)}, {cpu.describe('hello', False)}")
            figures += [
                rate_figure("http_mutations.append_rps", label, runs["append"], runs["hello"],
                            "bare quart-trio hello-world GET /, wrk -c64", ">= 0.8",
                            note="; ".join([note, *problems])),
                *commit_figures("http_mutations", "AppendEvent rounds", before, after),
            ]
        progress(f"http_mutations: {n_borrow} interleaved Borrow / hello-world GET at concurrency 1")
        lat = borrow_latencies(server.url, hello_url, n_borrow, borrow_warmup)
    b99, h99 = percentile(lat["borrow"], 99) * 1e3, percentile(lat["hello"], 99) * 1e3
    b50, h50 = statistics.median(lat["borrow"]) * 1e3, statistics.median(lat["hello"]) * 1e3
    figures.append(Figure(
        "http_mutations.borrow_p99", "Borrow p99 latency, concurrency 1", b99, "ms", h99,
        "hello-world GET / p99, same keep-alive httpx2 client, interleaved", "<= 5",
        note=f"{n_borrow} Borrows by profile (4 free sessions; an untimed Release after each); "
             f"medians {b50:.2f} ms vs {h50:.2f} ms",
        samples={"subject_ms": summarize(lat["borrow"], 1e3), "baseline_ms": summarize(lat["hello"], 1e3)}))
    return figures


# -- WebSocket leases vs etcd -----------------------------------------------------

#: etcd 3.4's lease grant+revoke pair at concurrency 1 as issue 14 states it (ms): the baseline
#: of ``ws_leases.pair_c1`` when etcd is not installed (labelled as not measured in the run).
ETCD_C1_PUBLISHED_MS = 3.3


async def ws_lease_pairs(url: str, sessions: list[str], seconds: float) -> float:
    """GrantLease + ReleaseLease pairs over one ``/ws`` socket, one worker per
    session (so ``len(sessions)`` RPCs in flight); seconds per pair."""
    import trio
    import trio_websocket

    ws_url = "ws" + url[len("http"):] + "/ws"
    waiting: dict[int, list[Any]] = {}
    ids = itertools.count(1)
    pairs = 0
    with trio.fail_after(seconds + 30):
        async with trio_websocket.open_websocket_url(ws_url) as ws:

            async def reader() -> None:
                while True:
                    msg = json.loads(await ws.get_message())
                    slot = waiting.pop(msg.get("id"), None)
                    if slot is not None:
                        slot[1] = msg
                        slot[0].set()

            async def call(method: str, request: dict[str, Any]) -> dict[str, Any]:
                ident = next(ids)
                slot = waiting[ident] = [trio.Event(), None]
                await ws.send_message(json.dumps({"type": "rpc", "id": ident, "method": method,
                                                  "request": request}))
                await slot[0].wait()
                if slot[1].get("type") != "reply":
                    raise BenchError(f"/ws {method} answered {slot[1]}")
                return slot[1]["reply"]

            async def worker(session_id: str, deadline: float) -> None:
                nonlocal pairs
                while trio.current_time() < deadline:
                    reply = await call("GrantLease", {"session_id": session_id, "holder": f"h-{session_id}",
                                                      "mode": "exclusive-write", "ttl_seconds": 600})
                    if reply.get("outcome") != "granted":
                        raise BenchError(f"GrantLease on {session_id} answered {reply}")
                    await call("ReleaseLease", {"lease_id": reply["lease"]["lease_id"]})
                    pairs += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await call("GetStatus", {})
                start = trio.current_time()
                async with trio.open_nursery() as workers:
                    for sid in sessions:
                        workers.start_soon(worker, sid, start + seconds)
                elapsed = trio.current_time() - start
                nursery.cancel_scope.cancel()
    if not pairs:
        raise BenchError("no lease pair completed over /ws")
    return elapsed / pairs


async def etcd_lease_pairs(url: str, workers: int, seconds: float) -> float:
    """etcd v3 JSON gateway: ``workers`` concurrent tasks of lease grant then
    revoke, one keep-alive httpx2.AsyncClient; seconds per pair."""
    import httpx2
    import trio

    pairs = 0
    limits = httpx2.Limits(max_connections=workers, max_keepalive_connections=workers)
    with trio.fail_after(seconds + 30):
        async with httpx2.AsyncClient(base_url=url, trust_env=False, timeout=10, limits=limits) as http:

            async def warm() -> None:
                reply_json(await http.get("/health"), "etcd /health")

            async def worker(deadline: float) -> None:
                nonlocal pairs
                while trio.current_time() < deadline:
                    grant = reply_json(await http.post("/v3/lease/grant", json={"TTL": 60}), "lease grant")
                    reply_json(await http.post("/v3/lease/revoke", json={"ID": grant["ID"]}), "lease revoke")
                    pairs += 1

            async with trio.open_nursery() as nursery:  # open the keep-alive connections first
                for _ in range(workers):
                    nursery.start_soon(warm)
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(worker, start + seconds)
            elapsed = trio.current_time() - start
    if not pairs:
        raise BenchError("no etcd lease pair completed")
    return elapsed / pairs


@section("ws_leases", "lease grant+release pairs/s over /ws (pipelined) vs etcd lease grant+revoke pairs/s")
def ws_leases(bench: Bench) -> list[Figure]:
    workers, seconds, rounds = 64, bench.reps(3, 2), bench.reps(5, 2)
    sessions = [f"wl-{i:02d}" for i in range(workers)]
    label = f"GrantLease+ReleaseLease pairs/s over /ws, {workers} in flight"
    etcd = shutil.which("etcd")
    with workspace(bench) as root, contextlib.ExitStack() as stack:
        seed_sessions(root, sessions)
        server = stack.enter_context(relay_server(bench, root, "ws_leases"))

        cpu = CpuShare()

        def relay_pairs(span: float) -> Callable[[], float]:
            return lambda: run_trio(ws_lease_pairs, server.url, sessions, span)
        subjects = {"relay": cpu.wrap("relay", server.pid, relay_pairs(seconds)),
                    "relay_c1": lambda: run_trio(ws_lease_pairs, server.url, sessions[:1], seconds)}
        warm = [relay_pairs(1.0)]
        if etcd is not None:
            etcd_dir = root / "etcd"
            etcd_dir.mkdir()
            etcd_srv = stack.enter_context(etcd_server(etcd, etcd_dir))

            def etcd_pairs(span: float) -> Callable[[], float]:
                return lambda: run_trio(etcd_lease_pairs, etcd_srv.url, workers, span)
            subjects["etcd"] = cpu.wrap("etcd", etcd_srv.pid, etcd_pairs(seconds))
            subjects["etcd_c1"] = lambda: run_trio(etcd_lease_pairs, etcd_srv.url, 1, seconds)
            warm.append(etcd_pairs(1.0))
        progress(f"ws_leases: warm-up, then {rounds} interleaved rounds of {seconds}s "
                 f"({', '.join(subjects)})")
        for run in warm:
            run()
        before = scrape(server)
        runs = interleave(subjects, rounds)
        after = scrape(server)
        ledger_bytes = (root / relay.LEDGER_REL).stat().st_size
        wrk = shutil.which("wrk")
        etcd_wrk: dict[int, float] = {}
        if etcd is not None and wrk is not None:  # etcd's own capacity, without a Python client
            script = root / "etcd_pairs.lua"
            script.write_text(ETCD_PAIRS_LUA, encoding="utf-8")
            for conns in (workers, 1):
                etcd_wrk[conns] = 2 * run_wrk(wrk, etcd_srv.url, conns, seconds, script)
    note = (f"{rounds} rounds of {seconds}s, median round; relay: one WebSocket, {workers} "
            f"workers each pairing GrantLease(exclusive-write) and ReleaseLease on its own session, "
            f"replies matched by id (trio-websocket); ledger {ledger_bytes:,} B at the end (released "
            f"leases are kept until compaction); CPU during the rounds: "
            + "; ".join(cpu.describe(name) for name in ("relay", "etcd") if name in subjects))
    c1_ms = statistics.median(runs["relay_c1"]) * 1e3
    c1_label = "GrantLease+ReleaseLease pair over /ws, 1 in flight"
    c1_note = (f"{rounds} rounds of {seconds}s, median round; one worker on one session, each pair "
               "GrantLease then ReleaseLease, each awaited; issue 14 target: within 2x of etcd's "
               "grant+revoke at concurrency 1")
    if etcd is None:
        rate = 1 / statistics.median(runs["relay"])
        return [skipped_figure("ws_leases.pairs", label, "ops/s",
                               "install etcd (Debian: apt-get install etcd-server) for the baseline",
                               value=rate, note=note),
                Figure("ws_leases.pair_c1", c1_label + " (vs etcd: NOT same-run)", c1_ms, "ms",
                       ETCD_C1_PUBLISHED_MS, "etcd 3.4 lease grant+revoke at concurrency 1 as issue 14 "
                       "reports it (measured in an earlier session, not in this run: etcd is not "
                       "installed here)", "<= 2", note=c1_note),
                *commit_figures("ws_leases", "lease rounds", before, after)]
    version = subprocess.run([etcd, "--version"], capture_output=True, text=True, check=False)
    etcd_version = (version.stdout.split("\n", 1)[0].strip() or "etcd").replace("Version: ", "")
    note += (f"; {etcd_version}, single member on loopback, v3 JSON gateway POST /v3/lease/grant "
             f"{{TTL: 60}} then /v3/lease/revoke, {workers} concurrent tasks on one keep-alive "
             f"httpx2.AsyncClient under trio. Both sides are driven by a Python client in this "
             f"process, so the client overhead is shared (HTTP/1.1 per call for etcd, one "
             f"WebSocket frame per call for the relay); the CPU shares above show which side limits "
             f"each rate")
    return [rate_figure("ws_leases.pairs", label, runs["relay"], runs["etcd"],
                        "etcd lease grant+revoke pairs/s, same concurrency", ">= 2", note=note),
            time_figure("ws_leases.pair_c1", c1_label, runs["relay_c1"], runs["etcd_c1"],
                        "etcd lease grant+revoke pair at concurrency 1, same run", "<= 2", note=c1_note),
            *etcd_capacity_figures(runs, etcd_wrk, workers, seconds),
            *commit_figures("ws_leases", "lease rounds", before, after)]


def etcd_capacity_figures(runs: dict[str, list[float]], etcd_wrk: dict[int, float], workers: int,
                          seconds: float) -> list[Figure]:
    """Information: the relay's pairs against etcd driven by wrk instead of the Python client
    (the Python client, not etcd, bounds the etcd baseline of ``ws_leases.pairs``)."""
    if not etcd_wrk:
        return []
    note = (f"wrk -t1 -c{{n}} -d{seconds}s, a Lua script pairing POST /v3/lease/grant with "
            "/v3/lease/revoke of a granted id (pairs = requests / 2), one run after the rounds; "
            "information: how far the Python client bounds the etcd baseline above")
    return [
        Figure("ws_leases.pairs_vs_etcd_wrk", f"GrantLease+ReleaseLease pairs/s over /ws, {workers} "
               "in flight, vs etcd driven by wrk", 1 / statistics.median(runs["relay"]), "ops/s",
               1 / etcd_wrk[workers], f"etcd grant+revoke pairs/s, wrk -c{workers}",
               note=note.format(n=workers)),
        Figure("ws_leases.pair_c1_vs_etcd_wrk", "GrantLease+ReleaseLease pair over /ws, 1 in flight, "
               "vs etcd driven by wrk", statistics.median(runs["relay_c1"]) * 1e3, "ms",
               etcd_wrk[1] * 1e3, "etcd grant+revoke pair, wrk -c1", note=note.format(n=1)),
    ]


# -- SSE fan-out and memory -------------------------------------------------------


async def sse_subscriber(port: int, session: str, limiter: Any, ready: Callable[[], None]) -> None:
    """One idle SSE subscriber on a raw socket (``sse_memory``): ``GET
    /events?session=``; calls ``ready`` once the ``: connected`` comment
    arrives, then reads and drops whatever comes (the fan-out's subscribers
    are ``sse_receiver_main``'s)."""
    import trio

    async with limiter:  # bound the connection burst (listen backlog)
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        await stream.send_all(f"GET /events?session={session} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
                              "Accept: text/event-stream\r\n\r\n".encode())
        buf = b""
        while b": connected" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise BenchError(f"SSE subscription closed before connecting: {buf[:200]!r}")
            buf += chunk
        if not buf.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"SSE subscription refused: {buf[:200]!r}")
    ready()
    async with stream:
        while await stream.receive_some(65536):
            pass


async def open_subscribers(nursery: Any, port: int, groups: dict[str, int], patience: float = 60) -> None:
    """Start ``groups[session]`` subscribers per session; return once all are
    connected (BenchError after ``patience`` seconds)."""
    import trio

    total, count, all_ready = sum(groups.values()), 0, trio.Event()

    def ready() -> None:
        nonlocal count
        count += 1
        if count == total:
            all_ready.set()

    limiter = trio.CapacityLimiter(50)
    for session, n in groups.items():
        for _ in range(n):
            nursery.start_soon(sse_subscriber, port, session, limiter, ready)
    with trio.move_on_after(patience):
        await all_ready.wait()
    if not all_ready.is_set():
        raise BenchError(f"only {count} of {total} SSE subscribers connected within {patience:.0f} s")


def sse_receiver_main(argv: list[str]) -> None:
    """A fan-out receiver process: ``PORT SESSION=N [SESSION=N ...]``.

    It opens N plain SSE subscriptions per session (``GET /events?session=``,
    raw sockets, at most 50 connecting at once), prints ``ready`` once every one
    has its ``: connected`` comment, then reads all of them from one epoll loop
    (no per-socket task, collector off, so what it measures is the server's
    delivery, not its own scheduling).  For each ``id: SESSION:SEQ`` line it
    notes CLOCK_MONOTONIC right after the ``recv`` that brought it; once every
    subscription of SESSION has had SEQ it prints ``SESSION SEQ FIRST LAST``
    (seconds).  It exits when stdin closes."""
    gc.disable()
    port, groups = int(argv[0]), [(g.rpartition("=")[0], int(g.rpartition("=")[2])) for g in argv[1:]]
    clock, mono = time.clock_gettime, time.CLOCK_MONOTONIC
    ep = select.epoll()
    owner: dict[int, tuple[socket.socket, bytes]] = {}
    pending = [session for session, n in groups for _ in range(n)]
    while pending:  # connect in batches (the listen backlog), each to its ": connected"
        batch, pending = pending[:50], pending[50:]
        heads: dict[int, tuple[socket.socket, str, bytes]] = {}
        for session in batch:
            sock = socket.create_connection((LOOPBACK, port))
            sock.sendall(f"GET /events?session={session} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
                         "Accept: text/event-stream\r\n\r\n".encode())
            sock.setblocking(False)
            heads[sock.fileno()] = (sock, session, b"")
            ep.register(sock.fileno(), select.EPOLLIN)
        deadline = time.monotonic() + 60
        while heads:
            if time.monotonic() > deadline:
                raise BenchError(f"{len(heads)} SSE subscriptions did not connect within 60 s")
            for fd, _ in ep.poll(1.0):
                if fd not in heads:
                    continue
                sock, session, buf = heads[fd]
                data = sock.recv(65536)
                if not data:
                    raise BenchError(f"SSE subscription closed before connecting: {buf[:200]!r}")
                buf += data
                if b": connected" not in buf:
                    heads[fd] = (sock, session, buf)
                    continue
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise BenchError(f"SSE subscription refused: {buf[:200]!r}")
                del heads[fd]
                owner[fd] = (sock, f"id: {session}:".encode())
    wanted = dict(groups)
    tails = dict.fromkeys(owner, b"")
    seen: dict[tuple[str, int], list[float]] = {}  # (session, seq) -> [count, first, last]
    ep.register(sys.stdin.fileno(), select.EPOLLIN)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    while True:
        for fd, _ in ep.poll():
            if fd not in owner:  # stdin: closed by the bench when it is done
                return
            sock, prefix = owner[fd]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            now = clock(mono)
            if not data:
                ep.unregister(fd)
                del owner[fd]
                continue
            lines = (tails[fd] + data).split(b"\n")
            tails[fd] = lines.pop()
            for line in lines:
                if line.startswith(prefix):
                    session = prefix[4:-1].decode()
                    key = (session, int(line[len(prefix):]))
                    got = seen.get(key)
                    if got is None:
                        got = seen[key] = [0, now, now]
                    got[0] += 1
                    got[2] = now
                    if got[0] == wanted[session]:
                        del seen[key]
                        out.write(f"{session} {key[1]} {got[1]!r} {got[2]!r}\n")
                        out.flush()


class Receivers:
    """The fan-out's subscribers: ``procs`` receiver processes
    (``sse_receiver_main``), each holding an equal share of every group."""

    def __init__(self, python: str, port: int, groups: dict[str, int], procs: int) -> None:
        self.python, self.port, self.groups, self.procs = python, port, groups, procs
        self.children: list[Any] = []
        self.arrived: dict[tuple[str, int], list[tuple[float, float]]] = {}
        self.events: dict[tuple[str, int], Any] = {}

    async def start(self, nursery: Any) -> None:
        import trio

        code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench; "
                "bench.sse_receiver_main(sys.argv[2:])")
        for i in range(self.procs):
            share = [f"{sid}={n // self.procs + (i < n % self.procs)}" for sid, n in self.groups.items()]
            proc = await trio.lowlevel.open_process(
                [self.python, "-c", code, str(SCRIPTS), str(self.port), *share],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.children.append(proc)
        ready = [trio.Event() for _ in self.children]
        for proc, event in zip(self.children, ready, strict=True):
            nursery.start_soon(self._read, proc, event)
        with trio.move_on_after(120):
            for event in ready:
                await event.wait()
        if not all(event.is_set() for event in ready):
            raise BenchError("the SSE receiver processes did not connect within 120 s")

    async def _read(self, proc: Any, ready: Any) -> None:
        buf = b""
        while True:
            data = await proc.stdout.receive_some(65536)
            if not data:
                if not ready.is_set():
                    raise BenchError(f"an SSE receiver process exited ({await proc.wait()})")
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line == b"ready":
                    ready.set()
                    continue
                session, seq, first, last = line.decode().split()
                key = (session, int(seq))
                self.arrived.setdefault(key, []).append((float(first), float(last)))
                if len(self.arrived[key]) == self.procs and key in self.events:
                    self.events[key].set()

    def cpu_seconds(self) -> float:
        """CPU time the receiver processes used so far."""
        return sum(server_cpu_seconds(proc.pid) for proc in self.children)

    def expect(self, key: tuple[str, int]) -> Any:
        import trio

        self.events[key] = done = trio.Event()
        if len(self.arrived.get(key, ())) == self.procs:
            done.set()
        return done

    def times(self, key: tuple[str, int]) -> tuple[float, float] | None:
        """(first, last) arrival of ``key`` over every subscriber; None if not all had it."""
        self.events.pop(key, None)
        got = self.arrived.pop(key, [])
        if len(got) < self.procs:
            return None
        return min(first for first, _ in got), max(last for _, last in got)

    async def stop(self) -> None:
        for proc in self.children:
            with contextlib.suppress(OSError):
                await proc.stdin.aclose()
        for proc in self.children:
            await proc.wait()


#: Fan-out receiver processes (``sse_receiver_main``): one epoll loop each
#: (``BENCH_FANOUT_RECEIVERS=2`` splits every group between two).
FANOUT_RECEIVERS = int(os.environ.get("BENCH_FANOUT_RECEIVERS", "1"))


async def fanout_run(python: str, url: str, port: int, pid: int, groups: dict[str, int], publishes: int,
                     warmup: int, gap: float) -> dict[str, list[dict[str, float]]]:
    """Connect the subscribers (receiver processes), then publish (POST
    AppendEvent) to each group in turn and time publish -> received by every
    subscriber of that group."""
    import httpx2
    import trio

    out: dict[str, list[dict[str, float]]] = {sid: [] for sid in groups}
    async with trio.open_nursery() as nursery:
        receivers = Receivers(python, port, groups, FANOUT_RECEIVERS)
        await receivers.start(nursery)
        async with httpx2.AsyncClient(base_url=url, trust_env=False, timeout=10) as http:
            # Our own collector must not pause the publisher mid-measurement.
            gc.collect()
            gc.freeze()
            gc.disable()
            try:
                await fanout_publishes(http, receivers, pid, groups, publishes, warmup, gap, out)
            finally:
                gc.enable()
                gc.unfreeze()
        await receivers.stop()
        nursery.cancel_scope.cancel()
    return out


async def fanout_publishes(http: Any, receivers: Receivers, pid: int, groups: dict[str, int],
                           publishes: int, warmup: int, gap: float,
                           out: dict[str, list[dict[str, float]]]) -> None:
    """``fanout_run``'s timed loop: each publish, its receipt by all, its CPU."""
    import trio

    seqs = dict.fromkeys(groups, 0)
    clock, mono = time.clock_gettime, time.CLOCK_MONOTONIC  # the receivers' clock
    for i in range(warmup + publishes):
        order = list(groups)
        order = order[i % len(order):] + order[:i % len(order)]
        for sid in order:
            seqs[sid] += 1
            key = (sid, seqs[sid])
            done = receivers.expect(key)
            server_cpu, client_cpu, receivers_cpu = (server_cpu_seconds(pid), time.process_time(),
                                                     receivers.cpu_seconds())
            start = clock(mono)
            reply = reply_json(await http.post("/relay.v1.Relay/AppendEvent", json={
                "session_id": sid, "kind": "fanout", "data": {"n": i}}), "AppendEvent")
            replied = clock(mono)
            if reply["record"]["seq"] != seqs[sid]:
                raise BenchError(f"expected seq {seqs[sid]} on {sid}, got {reply['record']}")
            with trio.move_on_after(10):
                await done.wait()
            server_cpu = server_cpu_seconds(pid) - server_cpu
            receivers_cpu = receivers.cpu_seconds() - receivers_cpu
            times = receivers.times(key)
            if times is None:
                raise BenchError(f"event {sid}:{key[1]} did not reach all {groups[sid]} "
                                 "subscribers within 10 s")
            if i >= warmup:
                out[sid].append({"all": times[1] - start, "first": times[0] - start,
                                 "reply": replied - start, "server_cpu": server_cpu,
                                 "client_cpu": time.process_time() - client_cpu,
                                 "receivers_cpu": receivers_cpu})
            await trio.sleep(gap)


@section("sse_fanout", "SSE publish -> received by all subscribers, 100 and 1000 on one session stream")
def sse_fanout(bench: Bench) -> list[Figure]:

    publishes, warmup, gap = bench.reps(30, 8), bench.reps(3, 1), 0.05
    groups = {"fan-100": 100, "fan-1000": 1000}
    limit = raise_fd_limit(4096)
    if limit < 2 * sum(groups.values()) + 100:
        raise BenchError(f"the fd limit is {limit}; the fan-out needs about {2 * sum(groups.values())}")
    with workspace(bench) as root, contextlib.ExitStack() as stack:
        seed_sessions(root, list(groups))
        server = stack.enter_context(relay_server(bench, root, "sse_fanout"))
        progress(f"sse_fanout: {sum(groups.values())} subscribers, then {publishes} publishes per group "
                 f"(interleaved)")
        res = run_trio(fanout_run, bench.python, server.url, server.port, server.pid, groups, publishes,
                       warmup, gap)

    def ms(sid: str, what: str) -> list[float]:
        return [r[what] * 1e3 for r in res[sid]]

    def stats(sid: str) -> dict[str, Any]:
        return {what: summarize(ms(sid, what)) for what in ("all", "first", "reply")}

    big, small = ms("fan-1000", "all"), ms("fan-100", "all")
    p99_big, p99_small = percentile(big, 99), percentile(small, 99)

    def p50(sid: str, what: str) -> float:
        return statistics.median(ms(sid, what))

    def spread(sid: str) -> list[float]:
        return [(r["all"] - r["first"]) * 1e3 for r in res[sid]]

    def cpu(sid: str) -> str:
        return (f"{statistics.fmean(ms(sid, 'server_cpu')):.1f} ms server, "
                f"{statistics.fmean(ms(sid, 'receivers_cpu')):.1f} ms receivers' and "
                f"{statistics.fmean(ms(sid, 'client_cpu')):.1f} ms publisher's CPU per publish to "
                f"{groups[sid]}")

    how = (f"{publishes} publishes per group, the two groups interleaved on one server (1100 "
           f"subscribers connected, 100 on one session and 1000 on another), {gap * 1e3:.0f} ms apart; "
           "publish = POST AppendEvent (durable) sent, received = the event id read by the last "
           f"subscriber (CLOCK_MONOTONIC, shared by the processes); subscribers are raw sockets in "
           f"{FANOUT_RECEIVERS} receiver process(es) reading them from one epoll loop each (not one "
           "trio task per socket in the publishing process, whose own scheduling delay was most of "
           f"the figure), the server a separate process; with {publishes} samples p99 is close to "
           f"the max; load average {os.getloadavg()[0]:.1f} at the end; {cpu('fan-1000')}, "
           f"{cpu('fan-100')}")
    cpu_big = statistics.fmean(ms("fan-1000", "server_cpu"))
    return [
        Figure("sse_fanout.p99_1000", "publish -> all 1000 subscribers, p99", p99_big, "ms", p99_small,
               "same, 100 subscribers (p99)", "<= 50", on="value",
               note="target from issue 14 applies to the value (50 ms budget); the ratio shows how "
                    "delivery scales from 100 to 1000 subscribers; " + how,
               samples={"fan-1000": stats("fan-1000"), "fan-100": stats("fan-100")}),
        Figure("sse_fanout.cpu_1000", "server CPU per publish to 1000 subscribers (mean)", cpu_big, "ms",
               statistics.fmean(ms("fan-100", "server_cpu")), "same, publish to 100", "<= 15", on="value",
               note="issue 14 target on the value; the server process's CPU clock (user + system, all "
                    "threads, ns resolution; /proc's utime+stime tick at 10 ms) from the "
                    "POST to the last subscriber's receipt: the durable AppendEvent itself and the "
                    "fan-out (one socket write per subscriber; the kernel's loopback TCP is most of it)"),
        Figure("sse_fanout.p50_1000", "publish -> all 1000 subscribers, p50", p50("fan-1000", "all"), "ms",
               p50("fan-100", "all"), "same, 100 subscribers (p50)", note="information"),
        Figure("sse_fanout.first_1000", "publish -> first of 1000 subscribers, p50", p50("fan-1000", "first"),
               "ms", p50("fan-100", "first"), "same, 100 subscribers",
               note="information: the durable commit plus the first delivery; all - first is the "
                    "fan-out itself"),
        Figure("sse_fanout.spread_1000", "first -> last of 1000 subscribers (the fan-out itself), p99",
               percentile(spread("fan-1000"), 99), "ms", percentile(spread("fan-100"), 99),
               "same, 100 subscribers (p99)",
               note="information: publish -> all less publish -> first of the same publish, so the "
                    "durable commit's own tail (it comes before any subscriber is written) is left out"),
        Figure("sse_fanout.reply_1000", "AppendEvent reply latency while fanning out to 1000, p50",
               p50("fan-1000", "reply"), "ms", p50("fan-100", "reply"), "same, fanning out to 100",
               note="information: how long the publisher waits for its acknowledgement"),
    ]


async def memory_run(port: int, pid: int, session: str, n: int) -> dict[str, int]:
    """RSS of the server idle (after a small warm-up), with n/2 and with n idle subscribers."""
    import trio

    rss: dict[str, int] = {}
    async with trio.open_nursery() as warm:  # first-use allocations are not per subscriber
        await open_subscribers(warm, port, {session: 20})
        warm.cancel_scope.cancel()
    await trio.sleep(1.0)
    rss["idle"] = rss_kib(pid)
    async with trio.open_nursery() as nursery:
        await open_subscribers(nursery, port, {session: n // 2})
        await trio.sleep(1.0)
        rss["half"] = rss_kib(pid)
        await open_subscribers(nursery, port, {session: n - n // 2})
        await trio.sleep(1.0)
        rss["full"] = rss_kib(pid)
        nursery.cancel_scope.cancel()
    return rss


@section("sse_memory", "server RSS per idle SSE subscriber (1000 subscribers)")
def sse_memory(bench: Bench) -> list[Figure]:

    n = 1000
    raise_fd_limit(4096)
    with workspace(bench) as root, contextlib.ExitStack() as stack:
        seed_sessions(root, ["mem"])
        server = stack.enter_context(relay_server(bench, root, "sse_memory"))
        progress(f"sse_memory: server RSS idle, with {n // 2} and with {n} idle subscribers")
        rss = run_trio(memory_run, server.port, server.pid, "mem", n)
    per = (rss["full"] - rss["idle"]) / n
    first, second = (rss["half"] - rss["idle"]) / (n // 2), (rss["full"] - rss["half"]) / (n - n // 2)
    return [
        Figure("sse_memory.per_subscriber", f"server RSS per idle SSE subscriber ({n})", per, "KiB",
               rss["idle"], "server idle RSS (KiB, after a 20-subscriber warm-up)", "<= 35", on="value",
               note=f"(VmRSS with {n} - idle) / {n}; first {n // 2}: {first:.1f} KiB each, next "
                    f"{n - n // 2}: {second:.1f} KiB each; issue 14 target on the value",
               samples={"rss_kib": rss}),
        Figure("sse_memory.rss_1000", f"server RSS with {n} idle subscribers", rss["full"], "KiB",
               rss["idle"], "server idle RSS", note="information"),
    ]


REPLAY_EVENTS = 100_000


async def replay_run(port: int, session: str, last_seq: int) -> tuple[float, int]:
    """``GET /events?session=`` with ``Last-Event-ID: SESSION:0`` on a raw socket: seconds from
    sending the request until the id ``SESSION:last_seq`` has arrived, and the bytes read."""
    import trio

    stream = await trio.open_tcp_stream(LOOPBACK, port)
    want, tail, total = f"id: {session}:{last_seq}\n".encode(), b"", 0
    async with stream:
        start = time.perf_counter()
        await stream.send_all(f"GET /events?session={session} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
                              f"Accept: text/event-stream\r\nLast-Event-ID: {session}:0\r\n\r\n".encode())
        while True:
            data = await stream.receive_some(1 << 20)
            if not data:
                raise BenchError(f"the replay ended after {total:,} bytes without {want!r}")
            total += len(data)
            if want in tail + data:
                return time.perf_counter() - start, total
            tail = data[-len(want):]


@section("sse_replay", "SSE replay from seq 0 of a 100k-event log: events/s")
def sse_replay(bench: Bench) -> list[Figure]:
    n, rounds = REPLAY_EVENTS, bench.reps(3, 1)
    sid, batch = "replay", 1000
    with workspace(bench) as root, contextlib.ExitStack() as stack:
        seed_sessions(root, [sid])
        store, config = store_for(root)
        progress(f"sse_replay: building {n:,} events in commits of {batch}")
        for first in range(0, n, batch):
            commit_ok(store, config, [append_mutation(sid, i) for i in range(first, first + batch)])
        log = store.stream_path(sid, "events")
        log_bytes = log.stat().st_size
        server = stack.enter_context(relay_server(bench, root, "sse_replay"))

        def raw_read() -> float:
            start = time.perf_counter()
            with open(log, "rb") as f:
                lines = sum(1 for _ in f)
            if lines != n:
                raise BenchError(f"the log has {lines} lines, not {n}")
            return time.perf_counter() - start

        progress(f"sse_replay: {rounds} interleaved rounds of replay-from-0 / raw log read")
        sizes: list[int] = []

        def replay() -> float:
            took, size = run_trio(replay_run, server.port, sid, n)
            sizes.append(size)
            return took
        runs = interleave({"replay": replay, "raw": raw_read}, rounds, warmup=1)
    rate, raw_rate = n / statistics.median(runs["replay"]), n / statistics.median(runs["raw"])
    return [Figure("sse_replay.rate", f"SSE replay from seq 0 of {n:,} events", rate, "ops/s", raw_rate,
                   "reading the same log's lines (Python file iteration, no parsing)", ">= 60000",
                   on="value",
                   note=f"issue 14 target on the value; {rounds} rounds, median; request sent -> the "
                        f"last id read by a raw trio socket in the bench process; log {log_bytes:,} B, "
                        f"SSE body {sizes[-1]:,} B; the server reads the log in chunks of "
                        f"{relay.REPLAY_CHUNK} records (checksummed, parsed, validated)",
                   samples={"replay_s": summarize(runs["replay"]), "raw_s": summarize(runs["raw"])})]


################################################################
# The live runtime (issue 11): warm pools, turns, deltas, overhead, RSS
################################################################

# One relay server child (``[providers.*]`` in its flow/relay.toml pointing at
# scripts/mock_model.py, a child too) owns every provider process here: the
# pinned real Codex (``openai-codex-cli-bin``) where a figure is about the real
# CLI, scripts/stand_in_provider.py where it is about the relay's own
# throughput and latency.  The baselines drive the same binaries directly with
# relay.py's protocol classes, with the same home files and environment
# (``provider_home_files`` / ``provider_env``), in the same run, interleaved.

RUNTIME_KEY_ENV = "FLOW_RELAY_BENCH_MOCK_KEY"
STAND_IN = [sys.executable, str(REPO / "scripts" / "stand_in_provider.py")]
#: Any single wait in the runtime section (seconds).
RUNTIME_PATIENCE = 60.0


def codex_path() -> str | None:
    try:
        import codex_cli_bin
    except ImportError:
        return None
    return str(codex_cli_bin.bundled_codex_path())


@contextlib.contextmanager
def mock_model_child(parent: Path) -> Iterator[int]:
    """scripts/mock_model.py on 127.0.0.1; yields its port."""
    log = parent / "mock.log"
    argv = [sys.executable, str(REPO / "scripts" / "mock_model.py"), "--hold-seconds", "30"]
    with child_process(argv, parent, dict(os.environ), log) as proc:
        line = first_line(proc, "mock_model", log)
        word, port = line.split()
        if word != "PORT":
            raise BenchError(f"mock_model printed {line!r}")
        yield int(port)


def pgroup_rss_kib(pgid: int) -> int:
    """VmRSS summed over the processes of group ``pgid`` (a CLI and its helpers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
            if int(stat[2]) == pgid:
                total += rss_kib(int(entry.name))
        except (OSError, BenchError, IndexError, ValueError):
            continue
    return total


class DirectCli:
    """A provider CLI driven directly with a relay.py protocol object (the baselines)."""

    def __init__(self, proc: Any, proto: Any) -> None:
        self.proc, self.proto, self.events = proc, proto, []

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str], cwd: Path, proto: Any) -> DirectCli:
        import trio

        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL, env=env, cwd=str(cwd),
                                                start_new_session=True)
        return cls(proc, proto)

    async def send(self, data: bytes) -> None:
        await self.proc.stdin.send_all(data)

    async def until(self, test: Callable[[Any], bool], on_data: Callable[[Any], None] | None = None) -> Any:
        """Read stdout until an event passes ``test``; ``on_data(event)`` sees each event as it arrives."""
        import trio

        with trio.fail_after(RUNTIME_PATIENCE):
            while True:
                while self.events:
                    event = self.events.pop(0)
                    if on_data is not None:
                        on_data(event)
                    if test(event):
                        return event
                data = await self.proc.stdout.receive_some(1 << 16)
                if not data:
                    raise BenchError("the provider's stdout ended")
                self.events += self.proto.receive_data(data)
                if out := self.proto.data_to_send():
                    await self.send(out)

    async def codex_open(self, cwd: Path) -> str:
        await self.send(self.proto.send_initialize())
        await self.until(lambda e: e.kind == "handshake.completed")
        await self.send(self.proto.send_thread_start(cwd=str(cwd)))
        return (await self.until(lambda e: e.kind == "thread.started")).thread_id

    async def aclose(self) -> None:
        import trio

        with trio.CancelScope(shield=True):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
            await self.proc.stdin.aclose()
            await self.proc.stdout.aclose()


def _ended(event: Any) -> bool:
    return event.kind in ("turn.completed", "turn.failed", "turn.interrupted")


def _session_sse_base() -> type:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    from faults import Sse

    return Sse


class SessionSse(_session_sse_base()):
    """``GET /events?session=SID`` over one connection: frames with their arrival time
    (the fault run's reader, ``scripts/faults.py``, raising BenchError)."""

    error = BenchError

    @classmethod
    async def open(cls, port: int, sid: str) -> SessionSse:  # type: ignore[override]
        return await super().open(port, f"/events?session={sid}")

    async def next(self) -> tuple[str, dict[str, Any], float]:
        """The next frame: (event name, data, wall-clock time at arrival: the stand-in stamps with it)."""
        if not hasattr(self, "_frames"):
            self._frames = self.frames()
        return await self._frames.__anext__()

    async def until_end(self, turn_id: str, on_delta: Callable[[dict[str, Any], float], None] | None = None
                        ) -> dict[str, Any]:
        import trio

        with trio.fail_after(RUNTIME_PATIENCE):
            while True:
                name, data, arrived = await self.next()
                if name == "delta" and on_delta is not None:
                    on_delta(data, arrived)
                elif data.get("kind") in rc.TURN_END_KINDS and data["data"].get("turn_id") == turn_id:
                    return data

    async def aclose(self) -> None:
        await self.stream.aclose()


class RuntimeRun:
    """The relay server's HTTP face for the runtime section."""

    def __init__(self, client: Any, port: int) -> None:
        self.client, self.port = client, port

    async def call(self, method: str, **fields: Any) -> dict[str, Any]:
        return reply_json(await self.client.post(f"/{rc.SERVICE}/{method}", json=fields), method)

    async def warm(self, profile: str, n: int) -> list[dict[str, Any]]:
        import trio

        with trio.fail_after(RUNTIME_PATIENCE):
            while True:
                rows = [s for s in (await self.call("ListSessions", profile=profile))["sessions"]
                        if s["state"] == "ready" and s["process"]["state"] == "running"]
                if len(rows) >= n:
                    return rows
                await trio.sleep(0.05)

    async def lendable(self, sid: str) -> None:
        """Until ``sid`` is warm and unleased again (the hand-over at release is done)."""
        import trio

        with trio.fail_after(RUNTIME_PATIENCE):
            while True:
                (row,) = [s for s in (await self.call("ListSessions"))["sessions"] if s["session_id"] == sid]
                if row["state"] == "ready" and row["process"]["state"] == "running":
                    await trio.sleep(0.3)  # the archive of the last thread (no projection shows it)
                    return
                await trio.sleep(0.05)

    async def turn(self, lease: dict[str, Any], text: str) -> dict[str, Any]:
        return (await self.call("StartTurn", session_id=lease["session_id"], lease_id=lease["lease_id"],
                                fencing_token=lease["fencing_token"], input=text))["turn"]


def codex_home(parent: Path, name: str, endpoint: Any) -> tuple[dict[str, str], Path]:
    """A direct Codex run's home and environment, as the runtime writes them."""
    home, tmp, work = parent / name / "home", parent / name / "tmp", parent / name / "work"
    for d in (home, tmp, work):
        d.mkdir(parents=True, exist_ok=True)
    for rel, data in relay.provider_home_files(endpoint).items():
        (home / rel).write_bytes(data)
    env = {**os.environ, **relay.provider_env(endpoint, home=str(home), tmpdir=str(tmp),
                                              api_key="mock-key-not-a-secret")}
    return env, work


async def runtime_run(bench: Bench, root: Path, server: Served, mock_port: int, codex: str | None
                      ) -> dict[str, Any]:
    import httpx2
    import trio

    out: dict[str, Any] = {}
    n = bench.reps(12, 3)
    async with httpx2.AsyncClient(base_url=server.url, timeout=RUNTIME_PATIENCE) as client:
        r = RuntimeRun(client, server.port)
        standin = [*STAND_IN, "--provider", "codex"]
        await r.call("RegisterProfile", name="s1", provider="codex", mode="pooled", command=standin)
        await r.call("RegisterProfile", name="s4", provider="codex", mode="pooled", command=standin,
                     pool_size=4)
        await r.call("RegisterProfile", name="st", provider="codex", mode="pooled",
                     command=[*standin, "--slow-ms", "10"])
        if codex:
            await r.call("RegisterProfile", name="cx", provider="codex", mode="pooled",
                         command=[codex, "app-server"], pool_size=2)

        # -- turn throughput: 4 pooled stand-in sessions vs 1
        async def throughput(profile: str, sessions: int, turns: int) -> float:
            rows = await r.warm(profile, sessions)
            leases = [(await r.call("Borrow", holder=f"tp-{s['session_id']}",
                                    session_id=s["session_id"]))["lease"] for s in rows[:sessions]]
            streams = [await SessionSse.open(r.port, lease["session_id"]) for lease in leases]

            async def worker(lease: dict[str, Any], sse: SessionSse) -> None:
                for i in range(turns):
                    await sse.until_end((await r.turn(lease, f"turn {i}"))["turn_id"])

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for lease, sse in zip(leases, streams, strict=True):
                    nursery.start_soon(worker, lease, sse)
            took = time.perf_counter() - started
            for lease, sse in zip(leases, streams, strict=True):
                await sse.aclose()
                await r.call("ReleaseLease", lease_id=lease["lease_id"])
            return sessions * turns / took

        k = bench.reps(40, 8)
        progress(f"runtime: throughput, {k} turns per session on 1 and on 4 pooled stand-in sessions")
        out["tp1"], out["tp4"] = [], []
        for _ in range(bench.reps(3, 1)):
            out["tp1"].append(await throughput("s1", 1, k))
            out["tp4"].append(await throughput("s4", 4, k))

        # -- delta latency: stand-in stdout -> SSE subscriber, vs -> a direct reader
        progress("runtime: delta latency, @stamp turns through the relay and read directly")
        text = "@stamp @slow " + "w " * bench.reps(100, 30)
        (row,) = await r.warm("st", 1)
        lease = (await r.call("Borrow", holder="lat", session_id=row["session_id"]))["lease"]
        sse = await SessionSse.open(r.port, row["session_id"])
        relayed: list[float] = []
        direct: list[float] = []

        def lag_of(into: list[float], delta: str, arrived: float) -> None:
            into += [arrived - float(x) for x in delta.split()]

        env, work = codex_home(root, "standin-direct", relay.provider_endpoint(
            "codex", {"base_url": f"http://{LOOPBACK}:{mock_port}/v1", "api_key_env": RUNTIME_KEY_ENV},
            environ={}))
        cli = await DirectCli.start([*standin, "--slow-ms", "10"], env, work, relay.CodexProtocol())
        try:
            thread_id = await cli.codex_open(work)
            for _ in range(bench.reps(3, 1)):
                turn = await r.turn(lease, text)
                await sse.until_end(turn["turn_id"], lambda d, t: lag_of(relayed, d["delta"], t))
                await cli.send(cli.proto.send_turn_start(thread_id, text))
                await cli.until(_ended, lambda e: lag_of(direct, e.delta, time.time())
                                if isinstance(e, relay.ItemDelta) else None)
        finally:
            await cli.aclose()
            await sse.aclose()
        await r.call("ReleaseLease", lease_id=lease["lease_id"])
        out["lag_relay"], out["lag_direct"] = relayed, direct

        if not codex:
            return out
        endpoint = relay.provider_endpoint("codex", {"base_url": f"http://{LOOPBACK}:{mock_port}/v1",
                                                     "api_key_env": RUNTIME_KEY_ENV}, environ={})
        rows = await r.warm("cx", 2)
        sid = rows[0]["session_id"]
        out["rss_warm"] = [pgroup_rss_kib(s["process"]["pid"]) for s in rows]
        env, work = codex_home(root, "rss", endpoint)
        cli = await DirectCli.start([codex, "app-server"], env, work, relay.CodexProtocol())
        try:  # the same point as a warm session: handshaken, with its spare thread open
            await cli.codex_open(work)
            out["rss_direct"] = pgroup_rss_kib(cli.proc.pid)
        finally:
            await cli.aclose()
        sse = await SessionSse.open(r.port, sid)

        # -- borrow-to-first-token: warm pooled session vs the CLI spawned cold
        async def warm_once() -> float:
            await r.lendable(sid)
            first: list[float] = []
            started = time.time()
            lease = (await r.call("Borrow", holder="warm", session_id=sid))["lease"]
            borrowed = time.time()
            turn = await r.turn(lease, "first token please")
            accepted = time.time()
            await sse.until_end(turn["turn_id"], lambda d, t: first.append(t) if not first else None)
            await r.call("ReleaseLease", lease_id=lease["lease_id"])
            if not first:
                raise BenchError("the warm turn streamed no delta")
            split["borrow"].append(borrowed - started)
            split["start"].append(accepted - borrowed)
            split["token"].append(first[0] - accepted)
            return first[0] - started

        split: dict[str, list[float]] = {"borrow": [], "start": [], "token": []}

        counter = itertools.count()

        async def cold_once() -> float:
            env, work = codex_home(root, f"cold-{next(counter)}", endpoint)
            started = time.time()
            cli = await DirectCli.start([codex, "app-server"], env, work, relay.CodexProtocol())
            try:
                thread_id = await cli.codex_open(work)
                await cli.send(cli.proto.send_turn_start(thread_id, "first token please"))
                await cli.until(lambda e: isinstance(e, relay.ItemDelta))
                return time.time() - started
            finally:
                await cli.aclose()

        progress(f"runtime: {n} rounds of warm borrow-to-first-token vs a cold real Codex spawn")
        out["warm"], out["cold"] = await ainterleave({"warm": warm_once, "cold": cold_once}, n, 1)
        out["warm_split"] = {k: statistics.median(v) * 1e3 for k, v in split.items()}

        # -- relay overhead per turn: one lease on the warm session vs one direct Codex thread
        await r.lendable(sid)
        lease = (await r.call("Borrow", holder="overhead", session_id=sid))["lease"]
        env, work = codex_home(root, "direct", endpoint)
        cli = await DirectCli.start([codex, "app-server"], env, work, relay.CodexProtocol())
        try:
            thread_id = await cli.codex_open(work)
            count = itertools.count()

            commits = {"n": 0.0, "seconds": 0.0, "turns": 0}

            async def via_relay() -> float:
                before = await trio.to_thread.run_sync(scrape, server)
                started = time.perf_counter()
                await sse.until_end((await r.turn(lease, f"say hi {next(count)}"))["turn_id"])
                took = time.perf_counter() - started
                after = await trio.to_thread.run_sync(scrape, server)
                commits["n"] += after["relay_commit_seconds_count"] - before["relay_commit_seconds_count"]
                commits["seconds"] += after["relay_commit_seconds_sum"] - before["relay_commit_seconds_sum"]
                commits["turns"] += 1
                return took

            async def direct_turn() -> float:
                started = time.perf_counter()
                await cli.send(cli.proto.send_turn_start(thread_id, f"say hi {next(count)}"))
                await cli.until(_ended)
                return time.perf_counter() - started

            progress(f"runtime: {n} rounds of a real Codex turn through the relay vs driven directly")
            out["relay_turn"], out["direct_turn"] = await ainterleave(
                {"relay": via_relay, "direct": direct_turn}, n, 1)
            out["commits"] = commits
        finally:
            await cli.aclose()
            await sse.aclose()
        await r.call("ReleaseLease", lease_id=lease["lease_id"])
    return out


async def ainterleave(subjects: dict[str, Callable[[], Any]], n: int, warmup: int) -> tuple[list[float], ...]:
    """``interleave`` for coroutine functions; the kept durations per subject, in order."""
    names = list(subjects)
    kept: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            took = await subjects[name]()
            if i >= warmup:
                kept[name].append(took)
    return tuple(kept[name] for name in names)


@section("runtime", "the live runtime: warm vs cold first token, pooled throughput, delta lag, "
                    "overhead vs direct, RSS")
def runtime(bench: Bench) -> list[Figure]:
    codex = codex_path()
    with workspace(bench) as root, contextlib.ExitStack() as stack:
        port = stack.enter_context(mock_model_child(root))
        (root / "flow").mkdir()
        (root / "flow" / "relay.toml").write_text(
            f'[providers.codex]\nbase_url = "http://{LOOPBACK}:{port}/v1"\n'
            f'api_key_env = "{RUNTIME_KEY_ENV}"\n', encoding="utf-8")
        env = {**bench.env, RUNTIME_KEY_ENV: "mock-key-not-a-secret"}
        server = stack.enter_context(relay_server(
            Bench(bench.quick, bench.python, env, bench.tmp_parent, bench.notes, bench.profile_dir),
            root, "runtime"))
        out = run_trio(runtime_run, bench, root, server, port, codex)
    lag_r, lag_d = sorted(out["lag_relay"]), sorted(out["lag_direct"])
    p = {name: {q: percentile(xs, q) * 1e3 for q in (50, 99)} for name, xs in
         (("relay", lag_r), ("direct", lag_d))}
    tp1, tp4 = statistics.median(out["tp1"]), statistics.median(out["tp4"])
    figures = [
        Figure("runtime.throughput_4", "turns/s on 4 pooled stand-in sessions", tp4, "ops/s", tp1,
               "turns/s on 1 pooled stand-in session", note="each session runs its turns back to back; "
               "information (2 cores run the relay, the stand-ins and this client)",
               samples={"tp4": out["tp4"], "tp1": out["tp1"]}),
        Figure("runtime.delta_p50", "delta lag, stand-in stdout -> SSE subscriber, p50", p["relay"][50],
               "ms", p["direct"][50], "the same stdout read directly, p50", note=f"{len(lag_r)} tokens; "
               "information"),
        Figure("runtime.delta_p99", "delta lag, stand-in stdout -> SSE subscriber, p99", p["relay"][99],
               "ms", p["direct"][99], "the same stdout read directly, p99", "<= 50", on="value",
               note=f"{len(lag_r)} tokens, 10 ms apart; target on the value (ms)"),
    ]
    if codex is None:
        why = "openai-codex-cli-bin is not installed (pip install -e '.[test]')"
        return figures + [skipped_figure(f"runtime.{k}", k, "ms", why)
                          for k in ("warm_first_token", "overhead_per_turn", "rss_per_session")]
    rss = statistics.mean(out["rss_warm"])
    commits = out["commits"]
    commits_per_turn = commits["n"] / max(commits["turns"], 1)
    commit_ms = 1e3 * commits["seconds"] / max(commits["n"], 1)
    return figures + [
        time_figure("runtime.warm_first_token", "borrow -> first token, warm pooled real Codex",
                    out["warm"], out["cold"], "spawn real Codex cold -> first token (same turn)",
                    "<= 0.333", note="Borrow + StartTurn (a fresh thread) + first delta on SSE vs "
                    "spawn + initialize + thread/start + turn/start + first delta; target: >= 3x faster; "
                    "warm medians: Borrow {borrow:.1f} ms, StartTurn (turn/start on the spare thread) "
                    "{start:.1f} ms, then first delta {token:.1f} ms".format(**out["warm_split"])),
        time_figure("runtime.overhead_per_turn", "real Codex turn through the relay (StartTurn -> "
                    "turn.completed on SSE)", out["relay_turn"], out["direct_turn"],
                    "the same turn driven directly with relay.CodexProtocol", "<= 1.2",
                    note="both against scripts/mock_model.py, one thread each, interleaved; the relay "
                    f"made {commits_per_turn:.1f} durable group commits per turn ({commit_ms:.1f} ms each; "
                    "StartTurn, the terminal state and the result+end event wait on theirs)"),
        Figure("runtime.rss_per_session", "RSS per warm pooled real Codex session", rss, "KiB",
               out["rss_direct"], "a directly driven real Codex, handshaken, one thread open",
               note=f"VmRSS summed over the session's process group; sessions {out['rss_warm']}; "
                    "information"),
    ]


################################################################
# Faults (issue 12): the fault-injection run of scripts/faults.py
################################################################


@section("faults", "fault-injection run: random provider crashes / stalls under continuous turns "
                   "on 4 pooled stand-in sessions (scripts/faults.py)")
def fault_injection(bench: Bench) -> list[Figure]:
    """``scripts/faults.py`` (100 faults; 20 with --quick): detection and repair
    latency per cause (information: there is no baseline for a fault), and the
    run's invariants as figures that must be 0."""
    sys.path.insert(0, str(REPO / "scripts"))
    import faults

    n = bench.reps(100, 20)
    progress(f"faults: {n} random faults on 4 pooled stand-in sessions under 4 borrowing clients")
    args = faults.parser().parse_args(["--faults", str(n), *(("--dir", bench.tmp_parent)
                                                              if bench.tmp_parent else ())])
    doc = faults.fault_run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    figures = []
    for cause, stats in doc["summary"].items():
        for key, what in (("detected_s", "fault -> quarantine record (or the stall's turn ended)"),
                          ("told_s", "fault -> the holder's borrowed block ends (LeaseLost)"),
                          ("repaired_s", "fault -> the pool as healthy as before")):
            for q in ("p50", "p99"):
                value = stats[key][q]
                figures.append(Figure(f"faults.{cause}.{key.split('_')[0]}_{q}", f"{cause}: {what}, {q}",
                                      math.nan if value is None else value * 1e3, "ms",
                                      note=f"{stats[key]['n']} of {stats['n']} faults; outcomes "
                                      f"{stats['outcomes']}; information"))
    figures.append(Figure("faults.problems", "invariants broken after the run (turns not terminal, "
                          "leases on failed sessions, pool short, orphan processes, gate)",
                          len(doc["problems"]), "count", target="== 0", on="value",
                          note="; ".join(doc["problems"]) or f"details: {args.json}"))
    return figures


################################################################
# Scale (issue 14): the same figures at N = 10 .. 10,000 sessions with live leases
################################################################

# ``--scale`` runs only this.  Each N gets a fresh workspace whose ledger holds
# N sessions of one pooled profile, each with a live exclusive lease, plus a
# "bench" session (the one the commits touch) and a free session (what Borrow
# finds), named to sort after every other: Borrow takes the smallest free id,
# so in a busy pool the occupied sessions are the small ids (the worst case).
# The ledger is built in memory from records the real operations made and
# written once: building it by commits would cost minutes at 10,000.
# Every row has its baseline measured in the same run, interleaved with it.

SCALE_NS = (10, 100, 1_000, 10_000)
#: (unused: see SCALE_COMMIT_ROUNDS, spawn rounds, borrow rounds) per N: fewer where each costs more.
SCALE_REPS = {10: (80, 20, 200), 100: (80, 20, 100), 1_000: (40, 12, 100), 10_000: (12, 6, 100)}


def scale_workspace(root: Path, n: int) -> tuple[relay.Store, relay.Config]:
    """A workspace with ``n`` leased sessions, a free one and the "bench" one."""
    store, config = store_for(root)
    commit_ok(store, config, [
        relay.rpc_mutation("RegisterProfile", rc.RegisterProfileRequest(
            name="pool-codex", provider="codex", mode="pooled")),
        relay.rpc_mutation("RegisterProfile", rc.RegisterProfileRequest(  # keeps "bench" out of Borrow
            name="bench-pool", provider="codex", mode="pooled")),
        *(relay.rpc_mutation("CreateSession", rc.CreateSessionRequest(profile=profile, session_id=sid))
          for sid, profile in (("bench", "bench-pool"), ("tpl", "pool-codex"), ("zz-free", "pool-codex"))),
        relay.rpc_mutation("GrantLease", rc.GrantLeaseRequest(
            session_id="tpl", holder="holder", mode="exclusive-write", ttl_seconds=config.max_ttl_seconds)),
    ])
    ledger = store.read()
    assert ledger is not None
    tpl_session, tpl_cursor = ledger.sessions["tpl"], ledger.cursors["tpl"]
    (tpl_lease,) = [x for x in ledger.leases.values() if x.session_id == "tpl"]
    sessions, cursors, leases = dict(ledger.sessions), dict(ledger.cursors), dict(ledger.leases)
    for sid in (f"s{i:05d}" for i in range(1, n)):  # "tpl" is the n-th
        sessions[sid] = attrs.evolve(tpl_session, session_id=sid)
        cursors[sid] = attrs.evolve(tpl_cursor, session_id=sid)
        lease_id = f"lease-{sid}"
        leases[lease_id] = attrs.evolve(tpl_lease, lease_id=lease_id, session_id=sid)
    store.write(attrs.evolve(ledger, revision=ledger.revision + 1, sessions=sessions,
                                   cursors=cursors, leases=leases))
    return store, config


#: Borrow rounds on one chain of ledgers before it starts again from the store's.
BORROW_CHAIN = 8


def borrow_chain(store: relay.Store, config: relay.Config) -> Callable[[], relay.Ledger]:
    """Ledgers as a server meets them: each the one the previous Borrow left,
    its lease released and its revision bumped (what a commit adds), so the
    indexes must follow a change rather than answer a ledger they have seen.
    Every ``BORROW_CHAIN`` rounds it starts again from the store's ledger, so
    that the session's released leases pile up alike at every N."""
    start = store.read()
    assert start is not None
    state = {"ledger": start, "round": 0}
    request = rc.BorrowRequest(holder="chain", profile="pool-codex")

    def next_ledger() -> relay.Ledger:
        ledger = state["ledger"]
        state["round"] += 1
        if state["round"] % BORROW_CHAIN == 0:
            state["ledger"] = start
        else:
            ctx = relay.Ctx(time.time(), ledger.revision + 1, config)
            new, reply = relay.borrow(ledger, request, ctx)
            new, _ = relay.release_lease(new, rc.ReleaseLeaseRequest(lease_id=reply.lease.lease_id), ctx)
            state["ledger"] = attrs.evolve(new, revision=ctx.revision)
        return ledger
    return next_ledger


def timed_borrow(store: relay.Store, config: relay.Config) -> Callable[[], float]:
    """The pure Borrow by profile (no commit) on a ledger of ``borrow_chain``:
    the lookup, with its indexes brought up to date, and the grant."""
    chain = borrow_chain(store, config)
    request = rc.BorrowRequest(holder="borrower", profile="pool-codex")

    def run() -> float:
        ledger = chain()
        ctx = relay.Ctx(time.time(), ledger.revision + 1, config)
        start = time.perf_counter()
        _, reply = relay.borrow(ledger, request, ctx)
        took = time.perf_counter() - start
        if reply.outcome != "granted" or reply.lease.session_id != "zz-free":
            raise BenchError(f"Borrow picked {reply.lease.session_id} ({reply.outcome})")
        return took
    return run


def timed_lookup(store: relay.Store, config: relay.Config) -> Callable[[], float]:
    """Borrow's choice of session alone (no grant: no copy of the maps), on a
    ledger of ``borrow_chain``, where this relay has it; NaN before the lookup
    had its own function."""
    chain = borrow_chain(store, config)
    first_free = getattr(relay, "_first_free", None)

    def run() -> float:
        if first_free is None:
            return math.nan
        ledger = chain()
        start = time.perf_counter()
        sid = first_free(ledger, "pool-codex", relay.iso(time.time()))
        took = time.perf_counter() - start
        if sid != "zz-free":
            raise BenchError(f"the lookup picked {sid}")
        return took
    return run


def timed_checkpoint(store: relay.Store, config: relay.Config) -> Callable[[], float]:
    """An AppendEvent committed with a checkpoint (what a journaling store
    does once per journal budget, and a CLI on every commit)."""
    counter = iter(range(1 << 62))

    def run() -> float:
        mutation = attrs.evolve(append_mutation("bench", next(counter)), checkpoint=True)
        start = time.perf_counter()
        commit_ok(store, config, [mutation])
        return time.perf_counter() - start
    return run


def scale_setup(bench: Bench, n: int, root: Path) -> dict[str, Any]:
    """One N's workspace, its first-commit figure and its timed durable commits."""
    t0 = time.perf_counter()
    store, config = scale_workspace(root, n)
    built = time.perf_counter() - t0
    size = store.ledger_path.stat().st_size
    progress(f"scale N={n}: ledger {size:,} B built in {built:.1f} s")
    raw_dir = root / "raw"
    raw_dir.mkdir()
    pool = os.urandom(max(size, 1 << 20))

    def raw() -> float:
        return raw_durable_write(raw_dir, pool[:store.ledger_path.stat().st_size], dir_fsync=False)

    raw_log = raw_dir / "raw.journal"

    def raw_append() -> float:  # the journal's floor: one record-sized append + fdatasync
        return raw_durable_append(raw_log, pool[:RAW_RECORD_BYTES])

    first_start = time.perf_counter()
    commit_ok(relay.Store(root), config, [append_mutation("bench", -1)])  # a fresh Store: cold cache
    first = time.perf_counter() - first_start
    # The commits measured are the server's: its store journals (a CLI's
    # journals only on a checkpoint of 256 KiB or more: "CLI event append" below).
    journaled = relay.Store(root, journal=True)
    durable = {"raw": raw, "raw_append": raw_append, "lease": timed_lease(journaled, config),
               "append": timed_append(journaled, config), "checkpoint": timed_checkpoint(journaled, config)}
    return {"root": root, "store": store, "config": config, "size": size, "first": first,
            "durable": durable}


def scale_finish(bench: Bench, n: int, setup: dict[str, Any], durable: dict[str, list[float]]
                 ) -> dict[str, Any]:
    """The rest of one N's figures (Borrow, spawns), measured after every N's commits."""
    _, spawns, borrows = (max(x // (4 if bench.quick else 1), 2) for x in SCALE_REPS[n])
    root, store, config = setup["root"], setup["store"], setup["config"]
    progress(f"scale N={n}: {borrows} Borrow rounds, {spawns} spawn rounds")
    borrow_runs = interleave({"borrow": timed_borrow(store, config),
                              "lookup": timed_lookup(store, config)}, borrows, warmup=1)
    procs = interleave({
        "pass": lambda: spawn(bench, ["-c", "pass"], root),
        "status": lambda: spawn(bench, ["-m", "relay", "status", "--json"], root),
        "mutation": lambda: spawn(bench, ["-m", "relay", "event", "append", "--session", "bench",
                                          "--kind", "k"], root),
    }, spawns, warmup=1)
    status = cli(bench, root, "status")
    if status.get("sessions") != n + 2 or status.get("active_leases") < n:
        raise BenchError(f"N={n}: status says {status.get('sessions')} sessions, "
                         f"{status.get('active_leases')} active leases")
    final_size = store.ledger_path.stat().st_size
    med = {k: statistics.median(v) * 1e3 for runs in (durable, borrow_runs, procs) for k, v in runs.items()}
    return {"n": n, "ledger_bytes": setup["size"], "final_bytes": final_size,
            "first_commit_ms": setup["first"] * 1e3, "bytes_per_session": setup["size"] / n, **med}


#: Rounds of the durable commits, each round one of every subject at every N.
SCALE_COMMIT_ROUNDS = 40


def scale_rows(bench: Bench) -> list[dict[str, Any]]:
    """Every N's workspace at once, so that the durable commits of all N (and
    their raw baselines) run interleaved: the ratios between N then compare
    figures of the same moments of a machine shared with other work.  The
    process collects garbage as a server does (``serve`` freezes its start-up
    heap, so a 10,000-session ledger is not traversed by every collection)."""
    with contextlib.ExitStack() as stack:
        setups = {n: scale_setup(bench, n, stack.enter_context(workspace(bench))) for n in SCALE_NS}
        relay._quiet_gc()
        rounds = max(SCALE_COMMIT_ROUNDS // (4 if bench.quick else 1), 2)
        progress(f"scale: {rounds} rounds of durable commits at every N, interleaved")
        # In random order: a subject right after a big write (the raw baseline
        # at 10,000 replaces a 6 MB file) pays for the blocks it freed.
        runs = interleave({f"{n}/{k}": fn for n, setup in setups.items()
                           for k, fn in setup["durable"].items()}, rounds, warmup=2,
                          rng=random.Random(14))
        return [scale_finish(bench, n, setups[n], {k: runs[f"{n}/{k}"] for k in setups[n]["durable"]})
                for n in SCALE_NS]


SCALE_COLUMNS = (
    ("lease", "raw", "in-process lease commit (grant|release)", "raw temp+fsync+rename, ledger-sized"),
    ("append", "raw", "in-process AppendEvent commit", "raw temp+fsync+rename, ledger-sized"),
    ("append", "raw_append", "  the same vs a raw journal append",
     f"raw append of {RAW_RECORD_BYTES} B + fdatasync"),
    ("checkpoint", "raw", "  AppendEvent with a checkpoint (1 per journal budget)",
     "raw temp+fsync+rename, ledger-sized"),
    ("first_commit_ms", "raw", "first AppendEvent commit of a fresh Store", "raw temp+fsync+rename"),
    ("borrow", None, "Borrow by profile (pure operation)", ""),
    ("lookup", None, "  of which the choice of session", ""),
    ("status", "pass", "status --json cold start", "python -c pass"),
    ("mutation", "pass", "CLI event append, spawn to exit", "python -c pass"),
)


def scale_table(rows: list[dict[str, Any]]) -> str:
    """Figure x N: each cell the median ms and, in brackets, its baseline and ratio."""
    head = ["figure (median ms; [baseline, ratio])"] + [f"N={r['n']:,}" for r in rows]
    body = []
    for key, base, label, _ in SCALE_COLUMNS:
        cells = [label]
        for r in rows:
            cells.append(f"{r[key]:.2f}" + (f" [{r[base]:.2f}, {r[key] / r[base]:.1f}x]" if base else ""))
        body.append(cells)
    body.append(["ledger bytes per session+lease"] + [f"{r['bytes_per_session']:,.0f} B" for r in rows])
    body.append(["ledger size"] + [f"{r['ledger_bytes']:,} B" for r in rows])
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                        strict=True)))
             for cells in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {label}: baseline = {what}" for _, base, label, what in SCALE_COLUMNS if base]
    return "\n".join(lines + ["", "baselines (measured in the same run, interleaved):"] + notes)


def scale_figures(rows: list[dict[str, Any]]) -> list[Figure]:
    """The issue's targets over the scale rows, each a ratio with PASS/MISS."""
    by = {r["n"]: r for r in rows}
    lo, hi = by[SCALE_NS[0]], by[SCALE_NS[-1]]
    figs = [
        Figure("scale.lease_1k", "lease commit at N=1,000 vs N=10", by[1_000]["lease"], "ms",
               lo["lease"], "same at N=10", "<= 2"),
        Figure("scale.lease_10k", "lease commit at N=10,000 vs N=10", hi["lease"], "ms",
               lo["lease"], "same at N=10", "<= 5"),
        Figure("scale.append_10k", "AppendEvent commit at N=10,000 vs N=10", hi["append"], "ms",
               lo["append"], "same at N=10", "<= 1.2"),
        Figure("scale.borrow_10k", "Borrow by profile at N=10,000 vs N=10", hi["borrow"], "ms",
               lo["borrow"], "same at N=10", "<= 2"),
        Figure("scale.status_10", "status cold start at N=10", lo["status"], "ms", lo["pass"],
               "python -c pass", "<= 2"),
        Figure("scale.status_10k", "status cold start at N=10,000", hi["status"], "ms", hi["pass"],
               "python -c pass", "<= 4"),
    ]
    for r in rows:
        n = f"{r['n']:,}"
        figs.append(Figure(f"scale.cli_mutation_{r['n']}", f"CLI mutation spawn-to-exit at N={n}",
                           r["mutation"], "ms", r["pass"], "python -c pass", "<= 4"))
    for what in ("lease", "append"):  # rate >= 0.5x raw rate  <=>  time <= 2x raw time
        for r in rows:
            figs.append(Figure(f"scale.{what}_vs_raw_{r['n']}", f"{what} commit at N={r['n']:,} vs raw write",
                               r[what], "ms", r["raw"], "raw temp+fsync+rename, ledger-sized", "<= 2",
                               note="rate >= 0.5x the raw rate"))
    for key, label in (("sse", "SSE publish-to-all p99 at 1,000 subscribers; replay; memory"),
                       ("http", "HTTP durable RPCs c64, GET status, /ws pairs vs etcd"),
                       ("soak", "30-minute soak")):
        figs.append(skipped_figure(f"scale.{key}", label, "", "not a --scale figure: run "
                                   + {"sse": "--only sse_fanout --only sse_replay --only sse_memory",
                                      "http": "--only http_status --only http_mutations --only ws_leases",
                                      "soak": "scripts/soak.py"}[key]))
    return figs


def run_scale(bench: Bench, json_path: Path) -> int:
    started = time.time()
    rows = scale_rows(bench)
    figures = scale_figures(rows)
    print(scale_table(rows) + "\n")
    print(table([(Section("scale", "issue 14 targets over the scale rows", lambda b: []), figures, "")]))
    passed = sum(f.result == "PASS" for f in figures)
    missed = [f.key for f in figures if f.result == "MISS"]
    print(f"\n{passed} PASS, {len(missed)} MISS in {time.time() - started:.1f} s"
          + (" (quick)" if bench.quick else ""))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": {"git": git_describe(), "quick": bench.quick,
                                              "cpus": os.cpu_count()},
                                     "rows": rows, "figures": [f.as_json() for f in figures]},
                                    indent=2) + "\n", encoding="utf-8")
    print(f"results: {json_path}")
    return 0


################################################################
# Report
################################################################


def fmt(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "ops/s":
        return f"{value:,.0f}/s"
    if unit == "KiB":
        return f"{value:,.1f} KiB"
    if unit == "B":
        return f"{int(value):,} B"
    if float(value).is_integer():
        return f"{value:g} {unit}".strip()
    return f"{value:,.2f} {unit}".strip()


def table(results: list[tuple[Section, list[Figure], str]]) -> str:
    head = ("figure", "value", "baseline", "ratio", "target", "result")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for sec, figures, error in results:
        rows.append((f"[{sec.name}] {sec.title}",))
        if error:
            rows.append(("  ERROR", error))
        for fig in figures:
            ratio = f"{fig.ratio:.2f}x" if fig.ratio is not None else "-"
            target = (fig.target + ("" if fig.on == "ratio" else " (value)")) if fig.target else "-"
            rows.append(("  " + fig.label, fmt(fig.value, fig.unit), fmt(fig.baseline, fig.unit),
                         ratio, target, fig.result))
            if fig.baseline_label or fig.note or fig.skipped:
                parts = [f"skipped: {fig.skipped}"] if fig.skipped else []
                parts += [f"baseline = {fig.baseline_label}"] if fig.baseline_label else []
                notes.append(f"{fig.key}: " + "; ".join(parts + ([fig.note] if fig.note else [])))
    widths = [max(len(r[i]) for r in [head, *rows] if len(r) == len(head)) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        if len(row) != len(head):
            lines.append(" ".join(row))
            continue
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines + ["", "notes:"] + ["  " + n for n in notes])


def git_describe() -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def check_relay_import(bench: Bench) -> None:
    """Children must import this checkout's relay.py; if the venv points
    elsewhere, put the checkout on PYTHONPATH (for baseline children too)."""
    with tempfile.TemporaryDirectory(prefix="relay-bench-", dir=bench.tmp_parent) as tmp:
        proc = subprocess.run([bench.python, "-c", "import relay; print(relay.__file__)"], cwd=tmp,
                              env=bench.env, capture_output=True, text=True, check=False)
    found = proc.stdout.strip()
    if proc.returncode != 0 or Path(found).resolve() != REPO / "relay.py":
        bench.env["PYTHONPATH"] = str(REPO)
        bench.notes.append(f"relay was not importable from {REPO} (got {found or 'nothing'}); "
                           "children run with PYTHONPATH set")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--only", action="append", choices=list(SECTIONS), metavar="NAME",
                        help="run only this section (repeatable); see --list")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                        help=f"write results here (default {DEFAULT_JSON.relative_to(REPO)})")
    parser.add_argument("--dir", default=None, metavar="DIR",
                        help="parent of the temporary workspaces (default: the system temp dir)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    parser.add_argument("--scale", action="store_true",
                        help="only the scaling table: N = 10 .. 10,000 sessions with live leases")
    parser.add_argument("--profile-servers", type=Path, default=None, metavar="DIR",
                        help="run the relay servers of the serving sections under cProfile, "
                             "writing DIR/SECTION.prof (slows them: for diagnosis, not figures)")
    args = parser.parse_args(argv)
    if args.list:
        for sec in SECTIONS.values():
            print(f"{sec.name:20} {sec.title}")
        return 0

    bench = Bench(quick=args.quick, python=sys.executable, env=child_env(), tmp_parent=args.dir,
                  profile_dir=args.profile_servers and args.profile_servers.absolute())
    # SIGTERM unwinds like Ctrl-C, so every server child is stopped by its ``finally``.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    check_relay_import(bench)
    if args.scale:
        return run_scale(bench, args.json.with_name("scale.json") if args.json == DEFAULT_JSON
                         else args.json)
    chosen = [SECTIONS[name] for name in SECTIONS if not args.only or name in args.only]
    started, load_before = time.time(), os.getloadavg()
    results: list[tuple[Section, list[Figure], str]] = []
    timings: dict[str, float] = {}
    for sec in chosen:
        progress(f"== {sec.name}")
        t0 = time.perf_counter()
        try:
            figures, error = sec.run(bench), ""
        except Exception as exc:  # report and go on with the other sections
            traceback.print_exc()
            figures, error = [], f"{type(exc).__name__}: {exc}"
        timings[sec.name] = time.perf_counter() - t0
        results.append((sec, figures, error))
    duration = time.time() - started

    print(table(results))
    for note in bench.notes:
        print(f"  run: {note}")
    all_figures = [fig for _, figures, _ in results for fig in figures]
    missed = [fig.key for fig in all_figures if fig.result == "MISS"]
    errors = [sec.name for sec, _, error in results if error]
    passed = sum(fig.result == "PASS" for fig in all_figures)
    skipped = [fig.key for fig in all_figures if fig.result == "SKIP"]
    print(f"\n{passed} PASS, {len(missed)} MISS, {len(skipped)} SKIP, {len(errors)} ERROR in {duration:.1f} s"
          + (" (quick)" if args.quick else ""))

    doc = {
        "meta": {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_seconds": round(duration, 3), "quick": args.quick,
            "python": sys.version.split()[0], "executable": bench.python,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "workspace_parent": args.dir or tempfile.gettempdir(),
            "git": git_describe(), "notes": bench.notes,
        },
        "sections": {
            sec.name: {"title": sec.title, "seconds": round(timings[sec.name], 3), "error": error or None,
                       "figures": [fig.as_json() for fig in figures]}
            for sec, figures, error in results
        },
        "summary": {"pass": passed, "miss": missed, "skipped": skipped, "errors": errors},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.json}")
    if errors:
        return 1
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
