"""The commit journal: a journaling store (the server's) commits by appending a
CRC-checked record to ``relay-state.journal`` on top of the checkpoint
``relay-state.json``; every reader applies the records that count.

Crashes are real (``RELAY_FAILPOINT`` SIGKILLs the writer at a named step);
no test sleeps.
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
import trio
from conftest import ROOT, T0, mutation, run_cli, run_json
from serve_helpers import PATIENCE, cli_process, serving

import relay

READ, WRITE = "shared-read", "exclusive-write"


def env(**extra):
    full = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    if "RELAY_FAILPOINT" not in extra:
        full.pop("RELAY_FAILPOINT", None)
    return full


def commit(store, *mutations, now=None):
    results, ledger = relay.commit(store, list(mutations), relay.Config(), now)
    for result in results:
        if isinstance(result, relay.RelayError):
            raise result
    return results, ledger


def seeded(root, sessions=("s1", "s2")):
    """A checkpointed workspace with a profile and ``sessions``; its journaling store."""
    commit(relay.Store(root), mutation("RegisterProfile", name="cx", provider="codex", mode="pooled"),
           *(mutation("CreateSession", profile="cx", session_id=sid) for sid in sessions))
    return relay.Store(root, journal=True)


def fresh(root):
    """What a process that never saw this workspace reads."""
    return relay.Store(root).read()


def checkpoint(root):
    return relay.decode_ledger(relay.Store(root).ledger_path.read_bytes())


def check_streams(store, ledger):
    for sid, cursor in ledger.cursors.items():
        for stream in relay.STREAM_KINDS:
            records = list(store.scan_records(sid, stream, getattr(cursor, f"{stream}_bytes")))
            assert [r.seq for r in records] == list(range(1, getattr(cursor, stream) + 1))


def offline_gate(root):
    """The gate's ledger, stream and cursor checks (in process, without its HTTP probe)."""
    checks = relay.gate(relay.Store(root), relay.Config(),
                        only=("ledger_valid", "streams_valid", "cursors_match_streams"))
    return [c.result for c in checks]


def journal_lines(store):
    return store.journal_path.read_bytes().splitlines(keepends=True)


def test_journal_commits_are_what_every_reader_reads(workspace):
    """Appends, leases, sessions, tokens and control records commit as journal records; a
    fresh reader, the fast status path and the full path all see the newest revision."""
    store = seeded(workspace)
    rng = random.Random(7)
    held = {}
    for i in range(60):
        choice = rng.random()
        sid = rng.choice(["s1", "s2"])
        if choice < 0.15 and sid not in held:
            (reply,), _ = commit(store, mutation("GrantLease", session_id=sid, holder=f"h{i}", mode=WRITE))
            held[sid] = reply.lease.lease_id
        elif choice < 0.3 and sid in held:
            commit(store, mutation("ReleaseLease", lease_id=held.pop(sid)))
        elif choice < 0.35:
            commit(store, mutation("RecordControl", request_id=f"c{i}", session_id=sid, kind="stop"))
        elif choice < 0.4:
            commit(store, mutation("CreateSession", profile="cx", session_id=f"n{i}"))
        else:
            commit(store, *(mutation(rng.choice(["AppendEvent", "AppendResult"]), session_id=sid,
                                     kind="k", data={"i": i, "j": j}, request_id=f"r{i}-{j}")
                            for j in range(rng.randrange(1, 4))))
    mine = store.read()
    assert store.last_read().records > 10  # most commits were journal records
    assert checkpoint(workspace).revision < mine.revision  # the checkpoint lags ...
    other = fresh(workspace)
    assert relay.encode_ledger(other) == relay.encode_ledger(mine)  # ... no reader does
    check_streams(store, other)
    fast = relay._fast_status_doc(str(workspace), T0)
    assert fast is not None  # the writer vouched for its journal: the fast path answers
    assert fast == relay.to_json(relay.status(relay.Store(workspace), T0))
    assert fast["revision"] == mine.revision


def test_a_checkpoint_every_budget_empties_the_journal(workspace):
    """The journal stays within its budget: a checkpoint takes its place and cuts it."""
    store = seeded(workspace)
    budget = relay._journal_budget(store.ledger_path.stat().st_size)
    sizes = []
    while not sizes or sizes[-1]:  # until a checkpoint (records of ~0.6 KiB: ~450 commits)
        commit(store, mutation("AppendEvent", session_id="s1", kind="k", data="x" * 100))
        sizes.append(store.journal_path.stat().st_size)
        assert len(sizes) <= 2 * budget // sizes[0], "no checkpoint within twice the budget"
    assert max(sizes) <= budget
    assert sizes[-1] == 0  # a checkpoint, which emptied the journal
    assert fresh(workspace).cursors["s1"].events == len(sizes)
    assert fresh(workspace) == store.read()


def test_a_torn_or_corrupt_tail_is_never_read_and_is_cut(workspace):
    store = seeded(workspace)
    for i in range(4):
        commit(store, mutation("AppendEvent", session_id="s1", kind="k", data=i))
    lines = journal_lines(store)
    good = b"".join(lines[:2])
    # A record torn in half, then a corrupted one: neither counts, nor anything after.
    flipped = bytearray(lines[2])
    flipped[len(flipped) // 2] ^= 0x20
    for damaged in (good + lines[2][: len(lines[2]) // 2],
                    good + bytes(flipped) + lines[3],
                    good + b"deadbeef " + lines[2][9:] + lines[3]):
        store.journal_path.write_bytes(damaged)
        got = fresh(workspace)
        assert got.revision == checkpoint(workspace).revision + 2
        assert got.cursors["s1"].events == 2
    # The next writer cuts the tail before its own record: the damage is never read.
    (reply,), _ = commit(relay.Store(workspace, journal=True),
                         mutation("AppendEvent", session_id="s1", kind="next"))
    assert reply.record.seq == 3
    data = store.journal_path.read_bytes()
    assert data.startswith(good) and data.count(b"\n") == 3 and b"deadbeef" not in data
    assert fresh(workspace).cursors["s1"].events == 3
    check_streams(store, fresh(workspace))


def test_a_record_that_checks_out_bytewise_but_not_as_a_record_ends_the_journal(workspace):
    """A CRC-good record the typed model refuses (hand-written) ends the journal for
    every reader; the fast path will not vouch for it and agrees with the full path."""
    store = seeded(workspace)
    commit(store, mutation("AppendEvent", session_id="s1", kind="k"))
    doc = json.loads(journal_lines(store)[0][9:])
    forged = dict(doc, **{"from": doc["top"]["revision"],
                          "top": dict(doc["top"], revision=doc["top"]["revision"] + 1)})
    forged["set"] = {"sessions": {"s1": {"session_id": "s1", "state": "bogus"}}}
    after = dict(doc, **{"from": forged["top"]["revision"],  # a good record, but past the bad one
                         "top": dict(doc["top"], revision=forged["top"]["revision"] + 1)})
    with open(store.journal_path, "ab") as f:
        for record in (forged, after):
            body = relay._canonical(record)
            f.write(b"%08x " % relay.zlib.crc32(body) + body + b"\n")
    got = fresh(workspace)
    assert got.revision == doc["top"]["revision"] and got.sessions["s1"].state == "ready"
    assert relay._fast_status_doc(str(workspace), T0) is None  # not vouched for: the full path answers
    assert run_json(workspace, "status")["revision"] == got.revision


def test_a_journal_of_another_checkpoint_is_ignored(workspace, tmp_path):
    """Records whose base is not the checkpoint's checksum never count (a checkpoint
    restored from a backup, or a journal left from before the last checkpoint)."""
    store = seeded(workspace)
    for i in range(3):
        commit(store, mutation("AppendEvent", session_id="s1", kind="k", data=i))
    stale = store.journal_path.read_bytes()
    commit(relay.Store(workspace), mutation("AppendEvent", session_id="s2", kind="cli"))  # a checkpoint
    assert store.journal_path.read_bytes() == b""  # cut by the checkpoint
    store.journal_path.write_bytes(stale)  # as if the cut had been lost
    got = fresh(workspace)
    assert got == checkpoint(workspace) and got.cursors["s1"].events == 3
    # A journal that chains from the same revision of another ledger's checkpoint.
    other = tmp_path / "other"
    seeded(other)
    commit(relay.Store(other, journal=True), mutation("AppendEvent", session_id="s1", kind="k"))
    ours = seeded(tmp_path / "ours")
    assert fresh(other).revision == fresh(tmp_path / "ours").revision + 1
    shutil.copy(relay.Store(other).journal_path, ours.journal_path)
    assert fresh(tmp_path / "ours") == checkpoint(tmp_path / "ours")
    (reply,), _ = commit(relay.Store(workspace, journal=True),
                         mutation("AppendEvent", session_id="s1", kind="k"))
    assert reply.record.seq == 4
    assert len(journal_lines(store)) == 1  # the stale records were cut, not built upon


# -- crashes at every step of a journal commit and of a checkpoint ---------------------

CHILD = r"""
import sys
from pathlib import Path
import relay, relay_client as rc
root, kind = Path(sys.argv[1]), sys.argv[2]
store = relay.Store(root, journal=True)
request = rc.AppendRecordRequest(session_id="s1", kind="crash")
m = relay.rpc_mutation("AppendEvent", request)
if kind == "checkpoint":
    m = relay.attrs.evolve(m, checkpoint=True)
(reply,), ledger = relay.commit(store, [m], relay.Config())
relay._failpoint("before_ack")
print(ledger.revision, flush=True)
"""

#: The steps each kind of commit passes, in order.
STEPS = {
    "journal": ("after_lock", "after_journal_write", "after_journal_fsync", "before_ack"),
    "checkpoint": ("after_lock", "after_temp_write", "after_temp_fsync", "after_rename",
                   "after_dir_fsync", "after_journal_cut", "before_ack"),
}


@pytest.fixture(scope="module")
def journaled(tmp_path_factory):
    """A workspace whose journal holds three commits past its checkpoint."""
    root = tmp_path_factory.mktemp("journaled")
    store = seeded(root)
    for i in range(3):
        commit(store, mutation("AppendEvent", session_id="s1", kind="k", data=i))
    assert store.last_read().records == 3
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(STEPS))
def test_a_kill_at_every_step_leaves_the_old_or_the_new_revision(journaled, tmp_path, kind):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    for failpoint in relay.FAILPOINTS + relay.JOURNAL_FAILPOINTS:
        root = tmp_path / failpoint
        shutil.copytree(journaled, root)
        old = fresh(root)
        proc = subprocess.run([sys.executable, str(script), str(root), kind], capture_output=True,
                              text=True, env=env(RELAY_FAILPOINT=failpoint))
        if failpoint not in STEPS[kind]:
            assert proc.returncode == 0, (failpoint, proc.stderr)  # a step this commit does not take
            continue
        assert proc.returncode == -signal.SIGKILL, (failpoint, proc.stderr)
        assert proc.stdout == ""
        new = fresh(root)
        step = STEPS[kind].index(failpoint)
        # Before the record is written (or the temp renamed) the old revision, after it the new.
        landed = step >= STEPS[kind].index("after_journal_write" if kind == "journal" else "after_rename")
        assert new.revision == old.revision + landed, failpoint
        assert new.cursors["s1"].events == old.cursors["s1"].events + landed
        check_streams(relay.Store(root), new)
        if kind == "checkpoint" and landed:
            assert checkpoint(root) == new  # what the checkpoint holds, whatever the journal says
        # The next writer (journaling or not) carries on from exactly that revision.
        (reply,), ledger = commit(relay.Store(root, journal=True),
                                  mutation("AppendEvent", session_id="s1", kind="next"))
        assert reply.record.seq == new.cursors["s1"].events + 1
        assert fresh(root) == ledger
        assert offline_gate(root) == ["pass"] * 3, failpoint


@pytest.mark.slow
def test_random_kills_of_a_journaling_writer_never_lose_an_acknowledged_commit(tmp_path):
    """SIGKILL a journaling writer at random moments: every printed acknowledgement is in
    the ledger every reader reads afterwards, and the logs number 1..n."""
    script = tmp_path / "loop.py"
    script.write_text(r"""
import json, sys
from pathlib import Path
import relay, relay_client as rc
store = relay.Store(Path(sys.argv[1]), journal=True)
for i in range(10**6):
    m = relay.rpc_mutation("AppendEvent", rc.AppendRecordRequest(session_id="s1", kind="tick",
                           data={"pad": "x" * (i % 300)}))
    (reply,), ledger = relay.commit(store, [m], relay.Config())
    print(json.dumps([reply.record.seq, ledger.revision]), flush=True)
""")
    root = tmp_path / "ws"
    seeded(root)
    rng = random.Random(3)
    acked = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env())
        for _ in range(rng.randrange(5, 120)):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            acked = max(acked, json.loads(line)[0])
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        ledger = fresh(root)
        assert ledger.cursors["s1"].events >= acked
        check_streams(relay.Store(root), ledger)
    assert offline_gate(root) == ["pass"] * 3


def test_a_failed_journal_fdatasync_is_unavailable_and_never_counted(workspace, monkeypatch):
    store = seeded(workspace)
    commit(store, mutation("AppendEvent", session_id="s1", kind="k"))
    before = store.journal_path.read_bytes()
    real = os.fdatasync
    journal_fd = []

    def fdatasync(fd):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(store.journal_path.resolve()):
            journal_fd.append(fd)
            raise OSError(5, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(relay.Unavailable) as info:
        commit(store, mutation("AppendEvent", session_id="s1", kind="k"))
    assert journal_fd and "journal" in info.value.message
    assert store.journal_path.read_bytes() == before  # the record was cut: no reader counts it
    assert fresh(workspace).cursors["s1"].events == 1
    monkeypatch.setattr(os, "fdatasync", real)
    (reply,), _ = commit(store, mutation("AppendEvent", session_id="s1", kind="k"))
    assert reply.record.seq == 2  # the stream tail of the failed try was cut too
    check_streams(store, fresh(workspace))


# -- concurrent writers -----------------------------------------------------------------

WORKER = r"""
import json, sys
from pathlib import Path
import relay, relay_client as rc
root, name, count, journal = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
store = relay.Store(root, journal=journal)
seqs = []
for i in range(count):
    ms = [relay.rpc_mutation("AppendEvent", rc.AppendRecordRequest(session_id="shared", kind=name,
                             data=i)),
          relay.rpc_mutation("AppendResult", rc.AppendRecordRequest(session_id=name, kind="k"))]
    if i % 5 == 0:
        ms.append(relay.rpc_mutation("GrantLease", rc.GrantLeaseRequest(
            session_id=name, holder=f"h{i}", mode="exclusive-write", ttl_seconds=60)))
    results, _ = relay.commit(store, ms, relay.Config())
    seqs.append(results[0].record.seq)
    if i % 5 == 0:
        relay.commit(store, [relay.rpc_mutation("ReleaseLease", rc.ReleaseLeaseRequest(
            lease_id=results[2].lease.lease_id))], relay.Config())
print(json.dumps(seqs))
"""


@pytest.mark.slow
def test_journaling_and_checkpointing_writers_lose_no_update(tmp_path):
    """Two journaling writers (servers) and two checkpointing ones (CLI) at once: every
    commit lands once, the shared log numbers 1..n, each reader sees all of it."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = tmp_path / "ws"
    names = ["j1", "j2", "c1", "c2"]
    seeded(root, ["shared", *names])
    start = fresh(root).revision
    count = 30
    procs = [subprocess.Popen([sys.executable, str(script), str(root), name, str(count),
                               "1" if name.startswith("j") else "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for name in names]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    seqs = sorted(s for out, _ in outs for s in json.loads(out))
    assert seqs == list(range(1, len(names) * count + 1))  # no gap, no repeat
    ledger = fresh(root)
    assert ledger.revision == start + len(names) * 2 * (count + count // 5)  # no lost update
    for name in names:
        assert ledger.cursors[name].results == count
        assert relay.live_leases(ledger, name, relay.iso(time.time())) == []
    check_streams(relay.Store(root), ledger)
    assert run_json(root, "gate")["status"] == "pass"


async def test_a_server_journals_cli_commits_checkpoint_and_the_stop_checkpoints(workspace):
    """While serving, appends are journal records; a CLI mutation in between reads them
    (and writes a checkpoint); the server's watcher absorbs the CLI's; stopping leaves
    relay-state.json current."""
    store = relay.Store(workspace)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed(sessions=1)
            for i in range(5):
                await r.ok("AppendEvent", session_id=sid, kind="http", data=i)
            assert store.read().cursors[sid].events == 5
            assert checkpoint(workspace).revision < store.read().revision  # the journal holds them
            cli = await cli_process(workspace, "event", "append", "--session", sid, "--kind", "cli")
            assert cli["record"]["seq"] == 6
            assert checkpoint(workspace) == store.read()  # the CLI's commit was a checkpoint
            for i in range(3):
                reply = await r.ok("AppendEvent", session_id=sid, kind="http", data=i)
            assert reply["record"]["seq"] == 9  # the server absorbed the CLI's commit
            status = await r.ok("GetStatus")
            assert status["events"] == 9 and status["revision"] == store.read().revision
    final = checkpoint(workspace)
    assert final == store.read() and final.runtime.status == "stopped"
    assert store.journal_path.read_bytes() == b""
    check_streams(store, final)


# -- the other readers: inspect, gate, inventory, cleanup, reset -------------------------


def test_inspect_gate_inventory_cleanup_and_reset_know_the_journal(workspace):
    store = seeded(workspace)
    commit(store, mutation("AppendEvent", session_id="s1", kind="k"))
    commit(store, mutation("AppendEvent", session_id="s1", kind="k"))
    with open(store.journal_path, "ab") as f:
        f.write(b"0000 torn")
    ledger = fresh(workspace)
    detail = run_json(workspace, "inspect", "relay")["detail"]["checkpoint"]
    assert detail == {"revision": ledger.revision - 2, "journal_records": 2,
                      "journal_bytes": store.journal_path.stat().st_size - len(b"0000 torn")}
    gate = run_json(workspace, "gate")
    assert gate["status"] == "pass"
    (valid,) = [c for c in gate["checks"] if c["id"] == "ledger_valid"]
    assert f"holds revision {ledger.revision - 2}; 2 journal records" in valid["evidence"]
    rows = {r["path"]: r for r in run_json(workspace, "state", "inventory")["artifacts"]}
    row = rows["flow/state/relay/relay-state.journal"]
    assert row["kind"] == "journal" and row["valid"]
    assert "2 commits past the checkpoint" in row["note"] and "9 tail bytes" in row["note"]
    cleanup = run_json(workspace, "state", "cleanup", "--owner", "relay", "--apply")
    assert "flow/state/relay/relay-state.journal" not in cleanup["paths"]
    assert store.journal_path.exists()
    # A damaged checkpoint: reset moves it aside with its journal, so a fresh ledger starts clean.
    data = bytearray(store.ledger_path.read_bytes())
    data[20] ^= 1
    store.ledger_path.write_bytes(bytes(data))
    assert run_json(workspace, "state", "reset", "--owner", "relay", "--apply")["applied"]
    assert not store.journal_path.exists() and not store.ledger_path.exists()
    (aside,) = (store.state_dir / relay.SET_ASIDE_DIR).iterdir()
    assert (aside / relay.JOURNAL_NAME).exists()
    rows = {r["path"]: r for r in run_json(workspace, "state", "inventory")["artifacts"]}
    assert rows[f"flow/state/relay/set-aside/{aside.name}/{relay.JOURNAL_NAME}"]["kind"] == "set_aside"
    run_cli(workspace, "profile", "register", "--name", "cx", "--provider", "codex", "--mode", "pooled")
    assert fresh(workspace).revision == 1


def test_the_gate_finds_a_raw_token_in_the_journal(workspace):
    store = seeded(workspace)
    commit(store, mutation("RecordControl", request_id="c1", session_id="s1", kind="note",
                           payload={"oops": "frt_" + "A" * 40}))
    assert b"frt_" not in store.ledger_path.read_bytes() and b"frt_" in store.journal_path.read_bytes()
    gate = run_json(workspace, "gate", check=None)
    (tokens,) = [c for c in gate["checks"] if c["id"] == "tokens_are_digests"]
    assert tokens["result"] == "fail"


def test_a_compaction_that_drops_records_journals_their_deletion(workspace):
    """Retention on a small ledger is journaled as deletions; every reader (the typed one,
    the fast status path) applies them."""
    store = seeded(workspace)
    config = relay.attrs.evolve(relay.Config(), max_terminal_leases=2)
    for i in range(6):
        (reply,), _ = relay.commit(store, [mutation("GrantLease", session_id="s1", holder=f"h{i}",
                                                    mode=WRITE)], config, T0 + i)
        relay.commit(store, [mutation("ReleaseLease", lease_id=reply.lease.lease_id)], config, T0 + i)
    mine = store.read()
    assert any(json.loads(line[9:])["del"] for line in journal_lines(store))
    assert len(mine.leases) < 6  # some were archived and deleted
    assert fresh(workspace) == mine
    assert relay._fast_status_doc(str(workspace), T0) == relay.to_json(
        relay.status(relay.Store(workspace), T0))
    body, digest = relay.split_checksum(store.ledger_path.read_bytes())
    doc = json.loads(body)
    records, _ = relay.journal_records(store.journal_path.read_bytes(), digest.decode(), doc["revision"])
    plain = relay.apply_journal_doc(doc, [record for record, _ in records])
    assert plain == json.loads(relay.split_checksum(relay.encode_ledger(mine))[0])


def test_status_answers_from_the_fast_path_with_a_journal(workspace):
    """`python -m relay status` stays on its stdlib-only path over a non-empty journal."""
    store = seeded(workspace)
    for i in range(3):
        commit(store, mutation("AppendEvent", session_id="s1", kind="k", data=i))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "relay", "--root", str(workspace),
                           "status", "--json"], capture_output=True, text=True, env=env())
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "attrs" not in imported and "relay_client" not in imported
    out = json.loads(proc.stdout)
    assert out["revision"] == store.read().revision and out["events"] == 3


def test_the_journal_knows_every_map_of_the_ledger():
    """The fast path's list of maps and the typed reader's table cover the model's maps."""
    empty = relay.Ledger()
    maps = {f.name for f in relay.attrs.fields(relay.Ledger) if isinstance(getattr(empty, f.name), dict)}
    assert set(relay._LEDGER_MAPS) == set(relay._MAP_RECORDS) == maps
    assert set(relay._LEDGER_SCALARS) == {f.name for f in relay.attrs.fields(relay.Ledger)} - maps
