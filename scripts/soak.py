#!/usr/bin/env python3
"""A bounded mixed soak of a real relay server; prints the ledger size at the end.

    .venv/bin/python scripts/soak.py --seconds 300            # the issue's 5-minute soak
    .venv/bin/python scripts/soak.py --seconds 60 --workers 8

It runs ``python -m relay serve --host 127.0.0.1 --port 0 --json`` in a
scratch workspace (``--dir`` picks its parent; removed afterwards unless
``--keep``), then ``--workers`` threads call it over loopback HTTP for
``--seconds``: RecordControl (payloads up to the cap, a few oversized ones that
must be refused), AppendEvent and AppendResult (data up to 16 KiB), Borrow and
Release, every call with a request id and one in ten of them retried with the
same id (which must get the first reply back).  Every few seconds a CLI process
appends an event too.  ``--turn-workers`` threads borrow sessions of a pooled
profile run by the stand-in provider (``scripts/stand_in_provider.py``) and run
turns on them through ``relay_client``'s stubs, so the live runtime is under
load as well.

Every call's latency is kept, and the server's RSS and the ledger's size are
sampled as it goes.  At the end it prints one JSON line: the counts, p99
latency per window, RSS and ledger size over time, growth after warm-up (the
first ``--warmup`` seconds), and the size of the stream logs and the request
log; it exits 1 if any retry was applied twice, an unexpected error occurred,
or (with ``--check``) RSS grew by 10 % or more after warm-up.

    .venv/bin/python scripts/soak.py --seconds 1800 --workers 2 --turn-workers 2 --check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import relay_client as rc  # noqa: E402

KIB = 1024


def start_server(workspace: Path, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "--root", str(workspace), "serve", "--host", "127.0.0.1",
         "--port", "0", "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready:
        proc.kill()
        raise SystemExit("relay serve did not report its endpoint within 30 s")
    return proc, json.loads(proc.stdout.readline())["endpoint"].rstrip("/")


class Soak:
    def __init__(self, url: str, seconds: float, seed: int) -> None:
        self.url, self.deadline, self.seed = url, time.monotonic() + seconds, seed
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (monotonic end, seconds)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def call(self, http: httpx2.Client, method: str, body: dict, expect: str = "") -> dict:
        began = time.monotonic()
        response = http.post(f"{self.url}/{rc.SERVICE}/{method}", json=body)
        ended = time.monotonic()
        with self.lock:
            self.latencies.append((ended, ended - began))
        doc = response.json()
        code = doc.get("code", "") if response.status_code != 200 else ""
        self.count(f"{method}:{code or 'ok'}")
        if code != expect:
            with self.lock:
                self.failures.append(f"{method} -> {response.status_code} {doc}")
        return doc

    def worker(self, w: int, sessions: list[str]) -> None:
        rng = random.Random(self.seed * 1000 + w)
        n = 0
        with httpx2.Client(timeout=30) as http:
            while time.monotonic() < self.deadline:
                n += 1
                rid, sid = f"w{w}-{n}", rng.choice(sessions)
                pick = rng.random()
                if pick < 0.25:
                    size = rng.choice((16, 512, 3 * KIB, 8 * KIB))
                    body = {"request_id": rid, "session_id": sid, "kind": "prompt",
                            "payload": {"text": "x" * size}}
                    expect = "invalid_argument" if size > 4 * KIB - 32 else ""
                    method = "RecordControl"
                elif pick < 0.75:
                    method = rng.choice(("AppendEvent", "AppendEvent", "AppendResult"))
                    body = {"request_id": rid, "session_id": sid, "kind": "note",
                            "data": {"n": n, "blob": "y" * rng.choice((8, 256, 4 * KIB, 16 * KIB))}}
                    expect = ""
                else:
                    lease = self.call(http, "Borrow", {"request_id": rid, "profile": "cx",
                                                       "holder": f"h{w}", "ttl_seconds": 60},
                                      expect="")
                    lease_id = lease.get("lease", {}).get("lease_id")
                    if lease_id:
                        self.call(http, "ReleaseLease", {"request_id": rid + "-r",
                                                         "lease_id": lease_id})
                    continue
                first = self.call(http, method, body, expect)
                if not expect and rng.random() < 0.1:  # a retry must replay, not re-apply
                    again = self.call(http, method, body)
                    if method == "RecordControl":
                        same = again.get("control_request") == first.get("control_request")
                    else:
                        same = again == first
                    self.count("retry:replayed" if same else "retry:APPLIED-TWICE")
                    if not same:
                        with self.lock:
                            self.failures.append(f"retry of {rid} applied twice")


    def turn_worker(self, w: int) -> None:
        """Borrow a stand-in session, run a turn, release; again until the deadline."""
        n = 0
        with rc.RelayStub(self.url) as stub:
            while time.monotonic() < self.deadline:
                n += 1
                try:
                    with stub.borrowed(profile="sx", holder=f"turns{w}", ttl_seconds=60) as lease:
                        turn = lease.run(f"soak turn {w}-{n}")
                    self.count(f"turn:{turn.state}")
                    if turn.state != "completed":
                        with self.lock:
                            self.failures.append(f"turn {turn.turn_id} ended {turn.state}: {turn.error}")
                except rc.ResourceExhausted:
                    self.count("turn:pool-busy")  # the pool is refilling: try again
                    time.sleep(0.05)
                except rc.RelayError as exc:
                    self.count(f"turn:{exc.code}")
                    with self.lock:
                        self.failures.append(f"turn worker {w}: {exc.code}: {exc.message}")


def rss_kib(pid: int) -> int:
    """The resident set of process ``pid`` (KiB), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


def windows(latencies: list[tuple[float, float]], started: float, width: float) -> list[dict]:
    """p50/p99 latency (ms) and call count per ``width``-second window."""
    buckets: dict[int, list[float]] = {}
    for ended, seconds in latencies:
        buckets.setdefault(int((ended - started) // width), []).append(seconds)
    return [{"from_s": int(k * width), "calls": len(v), "p50_ms": round(sorted(v)[len(v) // 2] * 1e3, 2),
             "p99_ms": round(p99(v) * 1e3, 2)} for k, v in sorted(buckets.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turn-workers", type=int, default=0,
                        help="threads running turns on stand-in sessions (0: none)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of warm-up before growth is measured (default: a tenth)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds per latency window (default: a tenth of the run)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if RSS grew by 10%% or more after warm-up")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="parent of the scratch workspace")
    parser.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    args = parser.parse_args(argv)
    workspace = Path(tempfile.mkdtemp(prefix="relay-soak-", dir=args.dir))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RELAY_FAILPOINT", None)
    ledger_path = workspace / "flow" / "state" / "relay" / "relay-state.json"
    proc, url = start_server(workspace, env)
    samples: list[tuple[float, int]] = []
    rss: list[tuple[float, int]] = []
    warmup = args.warmup if args.warmup is not None else args.seconds / 10
    width = args.window or max(args.seconds / 10, 1.0)
    try:
        with httpx2.Client(timeout=30) as http:
            http.post(f"{url}/{rc.SERVICE}/RegisterProfile",
                      json={"name": "cx", "provider": "codex", "mode": "pooled"}).raise_for_status()
            sessions = [http.post(f"{url}/{rc.SERVICE}/CreateSession",
                                  json={"profile": "cx", "session_id": f"s{i}"}).json()
                        ["session"]["session_id"] for i in range(args.sessions)]
            if args.turn_workers:
                stand_in = [sys.executable, str(ROOT / "scripts" / "stand_in_provider.py"),
                            "--provider", "codex"]
                http.post(f"{url}/{rc.SERVICE}/RegisterProfile", json={
                    "name": "sx", "provider": "codex", "mode": "pooled", "command": stand_in,
                    "pool_size": args.turn_workers}).raise_for_status()
        soak = Soak(url, args.seconds, args.seed)
        threads = [threading.Thread(target=soak.worker, args=(w, sessions), daemon=True)
                   for w in range(args.workers)]
        threads += [threading.Thread(target=soak.turn_worker, args=(w,), daemon=True)
                    for w in range(args.turn_workers)]
        started = time.monotonic()
        for t in threads:
            t.start()
        cli_n = 0
        while any(t.is_alive() for t in threads):
            cli_n += 1
            subprocess.run([sys.executable, "-m", "relay", "--root", str(workspace), "event",
                            "append", "--session", sessions[0], "--kind", "cli",
                            "--request-id", f"cli-{cli_n}"], env=env, capture_output=True,
                           check=True)
            soak.count("cli:ok")
            at = round(time.monotonic() - started, 1)
            samples.append((at, ledger_path.stat().st_size))
            rss.append((at, rss_kib(proc.pid)))
            time.sleep(2)  # a sample every ~2 s (this is a benchmark script, not a test)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    state = workspace / "flow" / "state" / "relay"

    def du(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    after = [kib for at, kib in rss if at >= warmup] or [kib for _, kib in rss]
    ledger_after = [b for at, b in samples if at >= warmup] or [b for _, b in samples]
    rss_growth = round(after[-1] / after[0] - 1, 4) if after else 0.0
    per_window = windows(soak.latencies, started, width)
    steady = [w["p99_ms"] for w in per_window if w["from_s"] >= warmup] or [0.0]
    report = {
        "seconds": args.seconds, "workers": args.workers, "counts": dict(sorted(soak.counts.items())),
        "calls": sum(soak.counts.values()),
        "ledger_bytes": ledger_path.stat().st_size,
        "ledger_bytes_max_sampled": max((s for _, s in samples), default=0),
        "ledger_samples": samples[:: max(len(samples) // 10, 1)],
        "streams_bytes": du(state / "streams"), "request_log_bytes": du(state / "requests"),
        "archive_bytes": du(state / "archive") if (state / "archive").exists() else 0,
        "warmup_s": warmup, "rss_kib_samples": rss[:: max(len(rss) // 10, 1)],
        "rss_kib_at_warmup": after[0] if after else 0, "rss_kib_end": after[-1] if after else 0,
        "rss_growth_after_warmup": rss_growth,
        "ledger_bytes_at_warmup": ledger_after[0] if ledger_after else 0,
        "ledger_bytes_max_after_warmup": max(ledger_after, default=0),
        "latency_windows": per_window,
        "p99_ms_steady_min_max": [min(steady), max(steady)],
        "failures": soak.failures[:10], "workspace": str(workspace) if args.keep else None,
    }
    print(json.dumps(report))
    if not args.keep:
        shutil.rmtree(workspace, ignore_errors=True)
    if args.check and rss_growth >= 0.10:
        print(f"RSS grew {rss_growth:.1%} after warm-up (limit 10%)", file=sys.stderr)
        return 1
    return 1 if soak.failures else 0


if __name__ == "__main__":
    sys.exit(main())
