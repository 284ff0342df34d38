"""Crash safety with real processes: named failpoints, random SIGKILLs of a
writer in a mutation loop, and several processes mutating one workspace.

No test sleeps: a child is killed right after the parent has read its k-th
acknowledgement line, so where the child is in its next write is up to the
scheduler, and so random.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, commit_ok

import relay

pytestmark = pytest.mark.slow

READ, WRITE = "shared-read", "exclusive-write"


def env(**extra):
    full = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    if "RELAY_FAILPOINT" not in extra:
        full.pop("RELAY_FAILPOINT", None)
    return full


def check_streams(store, ledger):
    """Every committed stream record checks out and numbers 1..n."""
    for sid, cursor in ledger.cursors.items():
        for stream in relay.STREAM_KINDS:
            records = list(store.scan_records(sid, stream, getattr(cursor, f"{stream}_bytes")))
            assert [r.seq for r in records] == list(range(1, getattr(cursor, stream) + 1))


def temps(store):
    return [p.name for p in store.state_dir.iterdir() if p.name.startswith(relay.TEMP_PREFIX)]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-template")
    store = relay.Store(root)
    now = time.time()
    commit_ok(store, "RegisterProfile", now=now, name="cx", provider="codex", mode="pooled")
    for sid in ("s1", "s2"):
        commit_ok(store, "CreateSession", now=now, profile="cx", session_id=sid)
    for i in range(3):
        commit_ok(store, "AppendEvent", now=now, session_id="s1", kind="k", data=i)
    return root


# -- named failpoints -----------------------------------------------------------

# (CLI arguments, check that the ledger holds this mutation's change)
MUTATIONS = [
    (["event", "append", "--session", "s1", "--kind", "crash-test"],
     lambda old, new: new.cursors["s1"].events == old.cursors["s1"].events + 1),
    (["lease", "grant", "--session", "s2", "--holder", "fp", "--mode", WRITE],
     lambda old, new: any(x.holder == "fp" for x in new.leases.values())),
    (["control", "record", "--request-id", "fp-1", "--session", "s1", "--kind", "stop"],
     lambda old, new: "fp-1" in new.control_requests),
    (["token", "create", "--label", "fp"],
     lambda old, new: len(new.tokens) == len(old.tokens) + 1),
    (["result", "append", "--session", "s2", "--kind", "first"],
     lambda old, new: new.cursors["s2"].results == 1),
]

BEFORE_RENAME = {"after_lock", "after_temp_write", "after_temp_fsync"}


@pytest.mark.parametrize("failpoint", relay.FAILPOINTS)
def test_every_failpoint_leaves_exactly_the_old_or_the_new_ledger(template, tmp_path, failpoint):
    """Killed at a named step, a writer leaves the old ledger before the rename and the new after."""
    for i, (argv, changed) in enumerate(MUTATIONS):
        root = tmp_path / f"ws{i}"
        shutil.copytree(template, root)
        store = relay.Store(root)
        old_bytes = store.ledger_path.read_bytes()
        old = relay.decode_ledger(old_bytes)
        proc = subprocess.run([sys.executable, "-m", "relay", "--root", str(root), *argv, "--json"],
                              capture_output=True, text=True, env=env(RELAY_FAILPOINT=failpoint))
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
        assert proc.stdout == ""  # killed before any acknowledgement was printed
        new_bytes = store.ledger_path.read_bytes()
        new = relay.decode_ledger(new_bytes)
        if failpoint in BEFORE_RENAME:
            assert new_bytes == old_bytes
            assert not changed(old, new)
        else:
            assert new.revision == old.revision + 1
            assert changed(old, new)
        check_streams(store, new)
        # The next writer sweeps any orphan temp and carries on from what is on disk.
        after = relay.Store(root)
        reply = commit_ok(after, "AppendEvent", now=time.time(), session_id="s1", kind="next")
        assert reply.record.seq == new.cursors["s1"].events + 1
        assert temps(after) == []
        check_streams(after, after.read())


def test_failpoints_leave_a_temp_file_only_between_write_and_rename(template, tmp_path):
    """A kill after writing the temp file leaves an orphan; at the lock or after the rename, none."""
    for failpoint in relay.FAILPOINTS:
        root = tmp_path / failpoint
        shutil.copytree(template, root)
        subprocess.run([sys.executable, "-m", "relay", "--root", str(root), "event", "append",
                        "--session", "s1", "--kind", "k"], capture_output=True,
                       env=env(RELAY_FAILPOINT=failpoint))
        left = temps(relay.Store(root))
        assert bool(left) == (failpoint in ("after_temp_write", "after_temp_fsync")), failpoint


# -- random SIGKILL of a mutation loop ------------------------------------------

LOOP = r"""
import json, random, sys
from pathlib import Path
import relay, relay_client as rc

root, seed = Path(sys.argv[1]), int(sys.argv[2])
store, cfg, rng = relay.Store(root), relay.Config(), random.Random(seed)

def mut(rpc, /, **fields):
    return relay.rpc_mutation(rpc, rc.RPC_BY_NAME[rpc].request(**fields))

def commit(*muts):
    results, ledger = relay.commit(store, list(muts), cfg)
    for r in results:
        if isinstance(r, relay.RelayError):
            raise r
    return results, ledger

def ack(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

ledger = store.read()
if ledger is None or "cx" not in ledger.profiles:
    commit(mut("RegisterProfile", name="cx", provider="codex", mode="pooled"),
           mut("CreateSession", profile="cx", session_id="s1"),
           mut("CreateSession", profile="cx", session_id="s2"))
commit(mut("CreateSession", profile="cx", session_id=f"r{seed}"))  # this run's own leases
held = None
print("ready", flush=True)
for i in range(10**6):
    choice = rng.random()
    if held is not None and choice < 0.2:
        (r,), ledger = commit(mut("ReleaseLease", lease_id=held))
        ack(op="release", lease=held, revision=ledger.revision)
        held = None
    elif held is None and choice < 0.3:
        (r,), ledger = commit(mut("GrantLease", session_id=f"r{seed}", holder=f"h{i}",
                                  mode="exclusive-write", ttl_seconds=3600))
        held = r.lease.lease_id
        ack(op="grant", lease=held, revision=ledger.revision)
    else:
        n = 1 if choice < 0.8 else rng.randrange(2, 6)
        sid = rng.choice(["s1", "s2"])
        stream = rng.choice(["AppendEvent", "AppendResult"])
        muts = [mut(stream, session_id=sid, kind="tick",
                    data={"tag": f"{seed}-{i}-{j}", "pad": "x" * rng.randrange(200)})
                for j in range(n)]
        results, ledger = commit(*muts)
        for r in results:
            ack(op=stream, session=sid, seq=r.record.seq, tag=r.record.data["tag"],
                revision=ledger.revision)
"""


def _read_ack(proc):
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return line


def test_random_sigkill_never_loses_an_acknowledged_mutation(tmp_path):
    """SIGKILLed at random moments, a writer leaves a valid ledger that holds all it acknowledged."""
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    root = tmp_path / "ws"
    root.mkdir()
    rng = random.Random(1234)
    acked = []
    for round_ in range(30):
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(round_)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env(), cwd=str(tmp_path))
        try:
            assert _read_ack(proc) == "ready\n"
            for _ in range(rng.randrange(1, 40)):
                acked.append(json.loads(_read_ack(proc)))
            proc.send_signal(signal.SIGKILL)  # somewhere in the next commit
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        store = relay.Store(root)
        ledger = store.read()  # validates, or raises LedgerInvalid
        check_streams(store, ledger)
        for a in acked:
            assert a["revision"] <= ledger.revision
            if a["op"] in ("AppendEvent", "AppendResult"):
                stream = "events" if a["op"] == "AppendEvent" else "results"
                cursor = ledger.cursors[a["session"]]
                assert a["seq"] <= getattr(cursor, stream)
                (record,) = store.read_records(a["session"], stream,
                                               getattr(cursor, f"{stream}_bytes"), a["seq"] - 1, 1)
                assert (record.seq, record.data["tag"]) == (a["seq"], a["tag"])
            elif a["op"] == "grant":
                assert ledger.leases[a["lease"]].mode == WRITE
            else:
                assert ledger.leases[a["lease"]].state == "released"
    assert len(acked) > 200
    commit_ok(relay.Store(root), "AppendEvent", now=time.time(), session_id="s1", kind="end")
    assert temps(relay.Store(root)) == []


# -- concurrent writers ---------------------------------------------------------

WORKER = r"""
import json, sys
from pathlib import Path
import relay, relay_client as rc

root, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store, cfg = relay.Store(root), relay.Config()

def one(rpc, **fields):
    (r,), ledger = relay.commit(store, [relay.rpc_mutation(rpc, rc.RPC_BY_NAME[rpc].request(**fields))],
                                cfg)
    if isinstance(r, relay.RelayError):
        raise r
    return r

print("ready", flush=True)
sys.stdin.readline()  # everyone starts together
events, done = [], 0
for i in range(count):
    step = i % 4
    if step == 0:
        r = one("AppendEvent", session_id="shared", kind="tick", data=f"{name}-{i}")
        events.append(r.record.seq)
    elif step == 1:
        lease = one("GrantLease", session_id=name, holder=name, mode="exclusive-write").lease
    elif step == 2:
        one("ReleaseLease", lease_id=lease.lease_id)
    else:
        one("RecordControl", request_id=f"{name}-{i}", session_id="shared", kind="note")
    done += 1
print(json.dumps({"done": done, "events": events}), flush=True)
"""


def test_concurrent_processes_lose_no_update_and_leave_no_gap(tmp_path):
    """Four writer processes plus CLI appends: every mutation lands, event seqs are 1..N once each."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = tmp_path / "ws"
    store = relay.Store(root)
    now = time.time()
    commit_ok(store, "RegisterProfile", now=now, name="cx", provider="codex", mode="pooled")
    names = [f"w{i}" for i in range(4)]
    for sid in ["shared", *names]:
        commit_ok(store, "CreateSession", now=now, profile="cx", session_id=sid)
    start = store.read().revision
    count = 40
    workers = [subprocess.Popen([sys.executable, str(script), str(root), name, str(count)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env()) for name in names]
    try:
        for w in workers:
            assert _read_ack(w) == "ready\n"
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        clis = [subprocess.Popen([sys.executable, "-m", "relay", "--root", str(root), "event",
                                  "append", "--session", "shared", "--kind", "cli", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
                for _ in range(2)]
        reports = [json.loads(_read_ack(w)) for w in workers]
        cli_out = [p.communicate() for p in clis]
    finally:
        for w in workers:
            w.kill()
            w.wait()
            for f in (w.stdin, w.stdout, w.stderr):
                f.close()
    assert [p.returncode for p in clis] == [0, 0], cli_out
    cli_seqs = [json.loads(out)["record"]["seq"] for out, _ in cli_out]
    total = sum(r["done"] for r in reports) + len(clis)
    assert total == len(names) * count + len(clis)
    ledger = store.read()
    assert ledger.revision == start + total  # no lost update
    seqs = sorted([s for r in reports for s in r["events"]] + cli_seqs)
    assert seqs == list(range(1, len(seqs) + 1))  # no gap, no repeat
    assert ledger.cursors["shared"].events == len(seqs)
    check_streams(store, ledger)
    records = list(store.scan_records("shared", "events", ledger.cursors["shared"].events_bytes))
    tags = [r.data for r in records if r.kind == "tick"]
    assert len(tags) == len(set(tags)) == len(names) * count // 4
    assert len([c for c in ledger.control_requests if c.startswith("w")]) == len(names) * count // 4
    for name in names:
        assert relay.live_leases(ledger, name, relay.iso(time.time())) == []
        assert ledger.sessions[name].fencing_token == count // 4
