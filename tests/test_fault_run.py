"""A small fault-injection run (scripts/faults.py, issue 12's Proof): a real
``serve`` child with a pooled stand-in profile of 4 sessions, 4 clients running
turns through ``AsyncRelayStub.borrowed`` / ``lease.run``, and 8 random faults,
each synchronised on what the relay shows (a running turn's first delta).
Asserted: the invariants, never the times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_eight_random_faults_leave_the_pool_healthy_and_nothing_behind(tmp_path):
    out = tmp_path / "faults.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "faults.py"), "--faults", "8",
                           "--seed", "7", "--patience", "10", "--json", str(out), "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["problems"] == []
    faults = doc["faults"]
    assert len(faults) == 8
    for fault in faults:
        # every fault was seen and acted on: a quarantine with its reason code, or (a stall
        # the interrupt ended) the turn ended by the relay
        assert fault["outcome"].startswith("quarantined: ") or (
            fault["cause"] == "stall" and fault["outcome"] in ("turn interrupted", "turn failed")), fault
        assert fault["detected_s"] is not None and fault["leases_left"] == 0, fault
        if fault["cause"] == "kill":  # (a kill that raced its turn's end may find it completed)
            assert fault["outcome"].startswith("quarantined: ") and fault["pid"] > 0, fault
            assert fault["outcome"] == "quarantined: provider_exited" or not fault["mid_turn"], fault
            assert fault["repaired_s"] is not None, fault
    checks = doc["checks"]
    assert checks["turns_not_terminal"] == 0 and checks["turns"] > 0
    assert checks["leases_on_failed_sessions"] == 0
    assert checks["idle_healthy_sessions"] >= checks["pool_size"] == 4
    assert checks["quarantined_sessions"] == sum(f["outcome"].startswith("quarantined") for f in faults)
    assert checks["orphan_processes"] == [] and checks["processes_after_serve_stopped"] == []
    assert checks["serve_exit_code"] == 0
    assert set(checks["gate"].values()) == {"pass"} and len(checks["gate"]) == 7
    # the workspace is gone (no --keep), and the table was printed
    assert not any(p.name.startswith("relay-faults-") for p in tmp_path.iterdir())
    assert "result: PASS" in done.stdout
