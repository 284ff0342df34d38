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

Results: a human table on stdout (progress on stderr) and one JSON document,
``bench-results/bench.json`` by default (``--json PATH``).  Workspaces live in
temporary directories (``--dir`` picks their parent: fsync figures depend on
the filesystem) and are removed afterwards.  Nothing touches the network.

Adding a section: write ``def name(bench: Bench) -> list[Figure]`` and decorate
it with ``@section("name", "title")``; it then appears in ``--list``,
``--only``, the table and the JSON.  Use ``interleave`` for timings and give
every figure a baseline from the same section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def result(self) -> str:
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
            "key": self.key, "label": self.label, "value": self.value, "unit": self.unit,
            "baseline": self.baseline, "baseline_label": self.baseline_label,
            "ratio": self.ratio, "target": self.target or None, "target_on": self.on,
            "result": self.result, "note": self.note, "samples": self.samples,
        }


@dataclass
class Bench:
    """What every section gets: the run's settings and helpers for children."""

    quick: bool
    python: str
    env: dict[str, str]
    tmp_parent: str | None
    notes: list[str] = field(default_factory=list)

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


def interleave(subjects: dict[str, Callable[[], float]], n: int, warmup: int = 0) -> dict[str, list[float]]:
    """Run each callable ``warmup + n`` times, round-robin with the starting
    subject rotating every round; each callable returns its own duration in
    seconds.  Returns the ``n`` kept durations per subject."""
    names = list(subjects)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
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
                    base, "<= 4", note=f"prepared ledger {ledger_bytes} B, built via the CLI"),
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
                        runs["pass"], "python -c pass", "<= 5",
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
# Report
################################################################


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "ops/s":
        return f"{value:,.0f}/s"
    if unit == "B":
        return f"{int(value):,} B"
    return f"{value:g} {unit}".strip()


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
            if fig.baseline_label or fig.note:
                parts = [f"baseline = {fig.baseline_label}"] if fig.baseline_label else []
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
    args = parser.parse_args(argv)
    if args.list:
        for sec in SECTIONS.values():
            print(f"{sec.name:20} {sec.title}")
        return 0

    bench = Bench(quick=args.quick, python=sys.executable, env=child_env(), tmp_parent=args.dir)
    check_relay_import(bench)
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
    print(f"\n{passed} PASS, {len(missed)} MISS, {len(errors)} ERROR in {duration:.1f} s"
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
        "summary": {"pass": passed, "miss": missed, "errors": errors},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.json}")
    if errors:
        return 1
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
