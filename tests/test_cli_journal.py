"""CLI commits on a big ledger (issue 14): a CLI process appends a journal
record instead of rewriting a checkpoint past ``CLI_JOURNAL_CHECKPOINT_BYTES``
("CLI commits on a big ledger" in specs/flow-relay-contract.md), and seeds the
counts its memo carries from the memo it read instead of scanning every map.

Crashes are real (``RELAY_FAILPOINT`` SIGKILLs the CLI at a named step); no
test sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, T0, commit_ok, mutation, run_cli, run_json
from test_journal import check_streams, checkpoint, fresh, offline_gate

import relay

#: Sessions with a live lease each: a checkpoint of ~0.55 MB (past the 512 KiB
#: above which a vouched checkpoint is hashed beside its parse, too).
BIG_SESSIONS = 900

#: The steps a CLI event append on a big ledger passes, in order.
CLI_JOURNAL_STEPS = ("after_lock", "after_logs_written", "after_logs_synced", "after_journal_write",
                     "after_journal_fsync", "before_ack")


def big_workspace(root):
    """A workspace whose checkpoint is past ``CLI_JOURNAL_CHECKPOINT_BYTES``:
    ``BIG_SESSIONS`` sessions with a live lease each and a free one, ``s1``.
    Compaction is set a day apart, so no commit of a test is a compaction
    (a checkpoint) whatever the test's duration."""
    (root / "flow").mkdir(parents=True)
    (root / "flow" / "relay.toml").write_text("[ledger]\ncompact_interval_seconds = 86400\n")
    store, now = relay.Store(root), time.time()
    config = relay.load_config(root / "flow")
    commit_ok(store, "RegisterProfile", now=now, config=config, name="cx", provider="codex",
              mode="pooled")
    for sid in ("tpl", "s1"):
        commit_ok(store, "CreateSession", now=now, config=config, profile="cx", session_id=sid)
    commit_ok(store, "GrantLease", now=now, config=config, session_id="tpl", holder="h",
              mode="exclusive-write", ttl_seconds=config.max_ttl_seconds)
    ledger = store.read()
    (lease,) = ledger.leases.values()
    sessions, cursors, leases = dict(ledger.sessions), dict(ledger.cursors), dict(ledger.leases)
    for sid in (f"s{i:05d}" for i in range(BIG_SESSIONS)):
        sessions[sid] = relay.attrs.evolve(ledger.sessions["tpl"], session_id=sid)
        cursors[sid] = relay.attrs.evolve(ledger.cursors["tpl"], session_id=sid)
        leases[f"lease-{sid}"] = relay.attrs.evolve(lease, lease_id=f"lease-{sid}", session_id=sid)
    store.write(relay.attrs.evolve(ledger, revision=ledger.revision + 1, sessions=sessions,
                                   cursors=cursors, leases=leases))
    assert store.ledger_path.stat().st_size >= max(relay.CLI_JOURNAL_CHECKPOINT_BYTES,
                                                   relay._BIG_LEDGER_BYTES)
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return big_workspace(tmp_path_factory.mktemp("big") / "ws")


def copy_of(big, tmp_path, name="ws"):
    root = tmp_path / name
    shutil.copytree(big, root)
    return root


def memo_tally(root):
    got = relay.read_memo((root / relay.MEMO_REL).read_bytes())
    assert got is not None
    return got


@pytest.mark.slow
def test_a_cli_commit_on_a_big_checkpoint_is_one_journal_record(big, tmp_path):
    root = copy_of(big, tmp_path)
    before, old = checkpoint(root), relay.Store(root).ledger_path.read_bytes()
    reply = run_json(root, "event", "append", "--session", "s1", "--kind", "cli")
    assert reply["record"]["seq"] == 1
    store = relay.Store(root)
    assert store.ledger_path.read_bytes() == old  # the checkpoint is not rewritten
    (line,) = store.journal_path.read_bytes().splitlines()
    ledger = fresh(root)
    assert ledger.revision == before.revision + 1 and ledger.cursors["s1"].events == 1
    # The memo vouches for the record, and its tally is the ledger's.
    checksum, vouched, tally = memo_tally(root)
    assert vouched == len(line) + 1 and checksum.decode() == relay.split_checksum(old)[1].decode()
    assert tally == relay.ledger_tally(ledger)
    assert run_json(root, "status") == relay.to_json(relay.status(store, time.time())) | {
        "providers": []}
    assert offline_gate(root) == ["pass"] * 3
    # A small ledger is still rewritten whole by a CLI commit.
    small = tmp_path / "small"
    commit_ok(relay.Store(small), "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(relay.Store(small), "CreateSession", profile="cx", session_id="s1")
    run_json(small, "event", "append", "--session", "s1", "--kind", "cli")
    assert not relay.Store(small).journal_path.exists() and checkpoint(small) == fresh(small)


@pytest.mark.slow
def test_the_cli_writes_a_checkpoint_once_its_journal_would_pass_its_bound(big, tmp_path):
    root = copy_of(big, tmp_path)
    config, payload = relay.load_config(root / "flow"), "x" * 3_900
    sizes, now = [], time.time()
    for i in range(40):
        commit_ok(relay.Store(root), "RecordControl", now=now, config=config, request_id=f"c{i}",
                  session_id="s1", kind="note", payload=payload)
        sizes.append(relay.Store(root).journal_path.stat().st_size)
        assert sizes[-1] <= relay.CLI_JOURNAL_BYTES
        if sizes[-1] == 0:
            break
    assert sizes[-1] == 0 and sizes == sorted(sizes[:-1]) + [0]  # grew until the checkpoint
    assert len(sizes) > relay.CLI_JOURNAL_BYTES // (8 * relay.KIB)  # records of ~4 KiB each
    assert checkpoint(root) == fresh(root) and len(fresh(root).control_requests) == len(sizes)


@pytest.mark.slow
def test_a_kill_of_a_cli_at_every_step_leaves_the_old_or_the_new_revision(big, tmp_path):
    # Each step a CLI journal commit takes, and one of a checkpoint's (which it must not take).
    for failpoint in (*CLI_JOURNAL_STEPS, "after_temp_write", "after_journal_cut"):
        root = copy_of(big, tmp_path, failpoint)
        commit_ok(relay.Store(root), "AppendEvent", now=time.time(), session_id="s1", kind="first",
                  config=relay.load_config(root / "flow"))  # (a journal record)
        old = fresh(root)
        code, out, err = run_cli(root, "event", "append", "--session", "s1", "--kind", "crash",
                                 env={"RELAY_FAILPOINT": failpoint}, check=None)
        if failpoint not in CLI_JOURNAL_STEPS:  # a step of a checkpoint: this commit takes none
            assert code == 0, (failpoint, err)
            continue
        assert code == -signal.SIGKILL and out == "", (failpoint, err)
        new = fresh(root)
        landed = CLI_JOURNAL_STEPS.index(failpoint) >= CLI_JOURNAL_STEPS.index("after_journal_write")
        assert new.revision == old.revision + landed, failpoint
        assert new.cursors["s1"].events == old.cursors["s1"].events + landed
        check_streams(relay.Store(root), new)
        # The next CLI carries on from exactly that revision.
        reply = run_json(root, "event", "append", "--session", "s1", "--kind", "next")
        assert reply["record"]["seq"] == new.cursors["s1"].events + 1, failpoint
        assert fresh(root).revision == new.revision + 1
        assert offline_gate(root) == ["pass"] * 3, failpoint


def test_journal_records_setting_one_key_again_and_again_leave_its_map_unread(big, tmp_path):
    root = copy_of(big, tmp_path)
    config = relay.load_config(root / "flow")
    for i in range(12):
        commit_ok(relay.Store(root), "AppendEvent", now=time.time(), config=config, session_id="s1",
                  kind="k", data=i)
    snap = relay.Store(root).snapshot(lazy=True)
    assert snap.records == 12
    cursors = snap.ledger.cursors
    assert type(cursors) is relay._Map and cursors.base.text is not None  # not read, not copied
    assert relay.encode_ledger(snap.ledger) == relay.encode_ledger(fresh(root))


# -- the memo's tally carried from commit to commit -------------------------------------


def counted_builds(monkeypatch) -> list[str]:
    """The names of the tally classes built from a whole map from now on."""
    builds: list[str] = []
    for kind in (relay._LeaseTally, relay._CursorTally, relay._QuarantineTally, relay._LiveCount):
        real = kind.build.__func__
        monkeypatch.setattr(kind, "build", classmethod(
            lambda cls, mapping, real=real: builds.append(cls.__name__) or real(cls, mapping)))
    return builds


def test_a_cli_commit_counts_its_changes_not_the_ledger(tmp_path, monkeypatch):
    """Each commit's memo tally is the full count of the ledger it made, yet
    only a commit that may remove the soonest-expiring lease counts leases."""
    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    for i in range(6):
        commit_ok(store, "CreateSession", profile="cx", session_id=f"s{i}")
    ttls = {"s0": 600, "s1": 300, "s2": 900}  # s1's lease expires first
    lease_of = {sid: commit_ok(store, "GrantLease", session_id=sid, holder="h", mode="exclusive-write",
                               ttl_seconds=ttl).lease.lease_id for sid, ttl in ttls.items()}
    builds = counted_builds(monkeypatch)
    steps = [
        ("AppendEvent", {"session_id": "s4", "kind": "k"}),
        ("GrantLease", {"session_id": "s3", "holder": "h", "mode": "exclusive-write",
                        "ttl_seconds": 60}),  # now the soonest, known without a count
        ("ReleaseLease", {"lease_id": lease_of["s2"]}),  # not the soonest
        ("QuarantineSession", {"session_id": "s5", "reason": "flaky"}),
        ("AppendResult", {"session_id": "s4", "kind": "done"}),
    ]
    for i, (rpc, fields) in enumerate(steps):
        builds.clear()
        commit_ok(relay.Store(tmp_path), rpc, now=T0 + i, **fields)  # a fresh store: a CLI process
        assert builds == [], rpc
        assert memo_tally(tmp_path)[2] == relay.ledger_tally(relay.Store(tmp_path).read()), rpc
    # Releasing the soonest-expiring lease: the leases are counted once, for the new soonest.
    (first,) = [k for k, v in relay.Store(tmp_path).read().leases.items() if v.session_id == "s3"]
    builds.clear()
    commit_ok(relay.Store(tmp_path), "ReleaseLease", now=T0 + 9, lease_id=first)
    assert builds == ["_LeaseTally"]
    ledger = relay.Store(tmp_path).read()
    tally = memo_tally(tmp_path)[2]
    assert tally == relay.ledger_tally(ledger)
    assert tally["soonest"] == ledger.leases[lease_of["s1"]].expires_at


def test_a_memo_of_another_revision_seeds_nothing(tmp_path):
    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    memo = tmp_path / relay.MEMO_REL
    checksum, vouched, tally = memo_tally(tmp_path)
    memo.write_bytes(relay.memo_bytes(checksum, vouched, {**tally, "revision": tally["revision"] - 1,
                                                          "events": 99}))
    commit_ok(relay.Store(tmp_path), "AppendEvent", now=T0, session_id="s1", kind="k")
    assert memo_tally(tmp_path)[2] == relay.ledger_tally(relay.Store(tmp_path).read())
    assert memo_tally(tmp_path)[2]["events"] == 1


def test_a_journaling_store_carries_on_after_a_cli_journal_commit(big, tmp_path):
    """The server's store (descriptors held between commits) and a CLI's,
    taking turns on one big ledger's journal: no update lost, every reader agrees."""
    root = copy_of(big, tmp_path)
    config = relay.load_config(root / "flow")
    server = relay.Store(root, journal=True)
    seqs = []
    for i in range(4):
        for store in (server, relay.Store(root)):  # a fresh store each time: a CLI process
            (reply,), _ = relay.commit(store, [mutation("AppendEvent", session_id="s1", kind="k", data=i)],
                                       config, time.time())
            seqs.append(reply.record.seq)
    assert seqs == list(range(1, 9))
    assert relay.Store(root).ledger_path.read_bytes() == big.joinpath(relay.LEDGER_REL).read_bytes()
    assert server.read() == fresh(root) and fresh(root).cursors["s1"].events == 8
    check_streams(relay.Store(root), fresh(root))
    server.close_handles()


def test_a_big_checkpoint_damaged_under_its_vouched_checksum_is_refused(big, tmp_path):
    """The checksum of a big checkpoint is computed in a worker thread while
    the checkpoint is parsed; the parse counts only if the checksum matches."""
    root = copy_of(big, tmp_path)
    path = relay.Store(root).ledger_path
    data = bytearray(path.read_bytes())
    at = data.index(b'"holder":"h"', len(data) // 2)
    data[at + 10:at + 11] = b"x"  # same length, same claimed checksum, memo still naming it
    path.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in path.parent.iterdir() if p.is_file()}
    code, out, err = run_cli(root, "event", "append", "--session", "s1", "--kind", "k", check=None)
    assert code == 1 and "checksum does not match" in err, err
    assert {p.name: p.read_bytes() for p in path.parent.iterdir() if p.is_file()} == before


def test_a_due_compaction_with_nothing_to_archive_types_no_lease_or_session(big, tmp_path,
                                                                           monkeypatch):
    """Compaction picks its candidates from the fields it chooses by, so on a
    lazily read ledger a compaction that archives nothing reads no record
    whole and commits by a journal record; it makes the ledger the whole
    path makes."""
    root, whole = copy_of(big, tmp_path), copy_of(big, tmp_path, "whole")
    (whole / relay.MEMO_REL).unlink()  # no memo: decoded and typed whole
    config, later = relay.Config(), time.time() + 2 * relay.Config().compact_interval_seconds
    typed = []
    real = relay._typed_record
    monkeypatch.setattr(relay, "_typed_record", lambda member, key, value: typed.append(member)
                        or real(member, key, value))
    checkpoint_bytes = relay.Store(root).ledger_path.read_bytes()
    ledgers = []
    for ws in (root, whole):
        (reply,), ledger = relay.commit(relay.Store(ws), [mutation("AppendEvent", session_id="s1",
                                                                    kind="k")], config, later)
        assert ledger.compacted_at == relay.iso(later)
        ledgers.append(fresh(ws))
        if ws is root:
            # The append's own session and cursor; no lease, no other session.
            assert sorted(typed) == ["cursors", "sessions"], sorted(typed)
            assert relay.Store(root).ledger_path.read_bytes() == checkpoint_bytes  # journaled
    assert relay.encode_ledger(ledgers[0]) == relay.encode_ledger(ledgers[1])


# -- the checkpoint's layout in the memo -------------------------------------------------


def test_the_memo_carries_the_checkpoint_layout_and_a_commit_reads_by_it(big, tmp_path, monkeypatch):
    root = copy_of(big, tmp_path)
    memo_file = root / relay.MEMO_REL
    layout = relay.memo_layout(memo_file.read_bytes())
    data = relay.Store(root).ledger_path.read_bytes()
    found = relay._top_members(data, data.rfind(relay._CHECKSUM_TAIL))
    assert [(name, start, end) for name, (start, end, _) in layout.items()] == [
        (name, start, end) for name, (_, start, end) in found.items()]
    ledger = fresh(root)
    assert {name: n for name, (_, _, n) in layout.items() if n >= 0} == {
        name: len(getattr(ledger, name)) for name in relay._LEDGER_MAPS}
    # With the layout, a commit neither searches the text for the members nor counts records.
    monkeypatch.setattr(relay, "_top_members", lambda *args: pytest.fail("searched"))
    for _ in range(2):  # the second reads the layout a journal commit carried on
        commit_ok(relay.Store(root), "AppendEvent", now=time.time(), session_id="s1", kind="k",
                  config=relay.load_config(root / "flow"))
        assert relay.memo_layout(memo_file.read_bytes()) == layout
    assert fresh(root).cursors["s1"].events == 2


def test_a_layout_that_does_not_fit_the_bytes_is_not_used(big, tmp_path):
    root = copy_of(big, tmp_path)
    memo_file = root / relay.MEMO_REL
    checksum, vouched, tally = memo_tally(root)
    layout = relay.memo_layout(memo_file.read_bytes())
    shifted = {name: [start + 1, end + 1, n] for name, (start, end, n) in layout.items()}
    for wrong in (shifted, {**layout, "schema": [0, 0, -1]}, dict(list(layout.items())[1:])):
        memo_file.write_bytes(relay.memo_bytes(checksum, vouched, {
            **tally, "layout": relay._checkpoint_layout(wrong)}))
        snap = relay.Store(root).snapshot(lazy=True)  # searched for instead: still lazy
        assert snap.lazy and snap.layout == layout and len(snap.ledger.sessions) == BIG_SESSIONS + 2
    # A layout of another version of the record fields is not read at all.
    memo_file.write_bytes(relay.memo_bytes(checksum, vouched, {
        **tally, "layout": {"fields": "another", "members": layout}}))
    assert relay.memo_layout(memo_file.read_bytes()) is None


# -- found by review: a ledger of an earlier version, damage the journal's records touch ----


def resealed(root, edit):
    """The checkpoint's body edited as JSON and checksummed again (another writer's file)."""
    import hashlib
    import json

    path = relay.Store(root).ledger_path
    data = path.read_bytes()
    body = json.loads(data[:data.rfind(relay._CHECKSUM_TAIL)] + b"}")
    edit(body)
    out = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    path.write_bytes(out[:-1] + relay._CHECKSUM_TAIL + hashlib.sha256(out).hexdigest().encode() + b'"}\n')


def test_a_big_ledger_of_an_earlier_version_stays_usable_commit_after_commit(big, tmp_path):
    """Sessions written before ``replaces``/``replaced_by`` existed: a layout
    found on them is not stamped as having every field, so no later commit
    reads a session as if it had them."""
    root = copy_of(big, tmp_path)

    def earlier(body):
        for session in body["sessions"].values():
            del session["replaces"], session["replaced_by"]
    resealed(root, earlier)
    (root / relay.MEMO_REL).unlink()
    config = relay.load_config(root / "flow")
    for i in range(4):
        commit_ok(relay.Store(root), "AppendEvent", now=time.time(), config=config, session_id="s1",
                  kind="k", data=i)
        assert relay.memo_layout((root / relay.MEMO_REL).read_bytes()) is None
    assert fresh(root).cursors["s1"].events == 4 and fresh(root).sessions["s1"].replaces == ""
    assert run_json(root, "event", "append", "--session", "s1", "--kind", "cli")["record"]["seq"] == 5


def test_damage_in_a_record_the_journal_touches_is_refused_as_a_checksum_mismatch(big, tmp_path):
    """The journal's records are applied only once the checkpoint's checksum
    matched: damage in a record they touch is reported as the checksum's."""
    root = copy_of(big, tmp_path)
    for _ in range(2):  # journal records that set s1's cursor
        run_json(root, "event", "append", "--session", "s1", "--kind", "k")
    path = relay.Store(root).ledger_path
    data = bytearray(path.read_bytes())
    at = data.index(b'"session_id":"s1"}', data.index(b'"cursors":')) + len(b'"session_id":"s1"')
    data[at:at + 1] = b" "  # its closing brace: same length, the claimed checksum and the memo unchanged
    path.write_bytes(bytes(data))
    journal = relay.Store(root).journal_path.read_bytes()
    code, _, err = run_cli(root, "event", "append", "--session", "s1", "--kind", "k", check=None)
    assert code == 1 and "checksum does not match" in err, err
    assert relay.Store(root).journal_path.read_bytes() == journal


def test_bytes_that_are_not_a_flat_record_fail_to_match_at_once():
    """A record cut short (long numbers, no closing brace) made the record
    pattern backtrack exponentially: minutes for two 15-digit numbers."""
    probe = ("import relay; assert relay._FLAT_RECORD.match("
             "b'{\"events\":' + b'1' * 40 + b',\"x\":' + b'2' * 40 + b',\"y\":\"z\"') is None")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=30,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
