"""Durability without killing anything: injected I/O errors, damaged ledgers and
stream logs, and orphan temp files.  Everything runs in-process with seeded
randomness, so a failure names the case that broke."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import attrs
import pytest
from conftest import ROOT, T0, commit_ok, mutation

import relay
import relay_client as rc
from relay_client import Code, RelayError

READ, WRITE = "shared-read", "exclusive-write"
CONFIG = relay.Config(lease_retention_seconds=10, compact_interval_seconds=1)


def temps(store):
    return sorted(p.name for p in store.state_dir.iterdir() if p.name.startswith(relay.TEMP_PREFIX))


def check_streams(store, ledger):
    """Every committed stream record checks out and numbers 1..n."""
    for sid, cursor in ledger.cursors.items():
        for stream in relay.STREAM_KINDS:
            records = list(store.scan_records(sid, stream, getattr(cursor, f"{stream}_bytes")))
            assert [r.seq for r in records] == list(range(1, getattr(cursor, stream) + 1))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A workspace with history: profile, sessions, streams, and a lease due for archiving."""
    root = tmp_path_factory.mktemp("template")
    store = relay.Store(root)
    commit_ok(store, "RegisterProfile", config=CONFIG, name="cx", provider="codex", mode="pooled")
    for sid in ("s1", "s2"):
        commit_ok(store, "CreateSession", config=CONFIG, profile="cx", session_id=sid)
    for i in range(5):
        commit_ok(store, "AppendEvent", config=CONFIG, session_id="s1", kind="k", data=i)
    lease = commit_ok(store, "GrantLease", config=CONFIG, session_id="s1", holder="a", mode=READ)
    commit_ok(store, "ReleaseLease", config=CONFIG, lease_id=lease.lease.lease_id)
    commit_ok(store, "RecordControl", config=CONFIG, request_id="c1", session_id="s1", kind="stop")
    return root


def fresh(template, tmp_path, name="ws"):
    root = tmp_path / name
    shutil.copytree(template, root)
    return relay.Store(root)


def batch():
    """One commit that appends to an existing log, starts a new one, grants and compacts."""
    return [
        mutation("AppendEvent", session_id="s1", kind="k", data="more"),
        mutation("AppendResult", session_id="s2", kind="first"),
        mutation("GrantLease", session_id="s2", holder="w", mode=WRITE),
    ]


# -- injected I/O errors --------------------------------------------------------


class Faults:
    """Wrap os.write/os.fsync/os.replace; make the k-th call of one of them fail with EIO."""

    NAMES = ("write", "fsync", "replace")

    def __init__(self, monkeypatch, store, target, k):
        self.target, self.k, self.count = target, k, 0
        self.calls: list[str] = []
        self.failed_at: int | None = None
        self.renamed = False
        ledger = os.fspath(store.ledger_path)
        for name in self.NAMES:
            real = getattr(os, name)

            def wrapper(*args, _name=name, _real=real):
                self.calls.append(_name)
                if _name == self.target:
                    self.count += 1
                    if self.count == self.k:
                        self.failed_at = len(self.calls)
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                result = _real(*args)
                if _name == "replace" and os.fspath(args[1]) == ledger:
                    self.renamed = True
                return result

            monkeypatch.setattr(os, name, wrapper)


def _calls_in_a_clean_commit(template, tmp_path, monkeypatch):
    store = fresh(template, tmp_path, "count")
    with monkeypatch.context() as m:
        faults = Faults(m, store, target="none", k=0)
        relay.commit(store, batch(), CONFIG, T0 + 100)
    return {name: faults.calls.count(name) for name in Faults.NAMES}


@pytest.mark.parametrize("target", Faults.NAMES)
def test_io_error_at_every_call_never_acknowledges_what_is_not_on_disk(
        template, tmp_path, monkeypatch, target):
    """Failing the k-th write/fsync/rename raises unavailable, leaves old-or-new; the next mutation heals."""
    total = _calls_in_a_clean_commit(template, tmp_path, monkeypatch)[target]
    assert total >= 1
    outcomes = set()
    for k in range(1, total + 2):
        store = fresh(template, tmp_path, f"{target}-{k}")
        old_bytes = store.ledger_path.read_bytes()
        old = relay.decode_ledger(old_bytes)
        with monkeypatch.context() as m:
            faults = Faults(m, store, target, k)
            try:
                results, committed = relay.commit(store, batch(), CONFIG, T0 + 100)
                error = None
            except RelayError as exc:
                error = exc
        on_disk = store.ledger_path.read_bytes()
        now = relay.decode_ledger(on_disk)  # always a whole, valid ledger
        if error is None:
            outcomes.add("acknowledged")
            assert all(not isinstance(r, RelayError) for r in results)
            assert now == committed and now.revision == old.revision + len(results)
        else:
            assert error.code == Code.UNAVAILABLE, error
            assert faults.failed_at is not None
            assert faults.failed_at == len(faults.calls), "kept writing after a failure"
            if faults.renamed:
                outcomes.add("new, unacknowledged")
                assert now.revision == old.revision + 3
                assert now.cursors["s2"].results == 1
            else:
                outcomes.add("old")
                assert on_disk == old_bytes
        check_streams(store, now)
        # The next mutation (a fresh process's store) removes leftovers and numbers on.
        healed = relay.Store(store.root)
        reply = commit_ok(healed, "AppendEvent", now=T0 + 200, config=CONFIG, session_id="s1",
                          kind="after")
        assert reply.record.seq == now.cursors["s1"].events + 1
        assert temps(healed) == []
        check_streams(healed, healed.read())
    assert "old" in outcomes and "acknowledged" in outcomes
    if target == "fsync":  # the directory fsync comes after the rename
        assert "new, unacknowledged" in outcomes


def test_failed_dir_fsync_leaves_the_new_ledger_unacknowledged(template, tmp_path, monkeypatch):
    """When only the directory fsync fails the rename has landed: new state, but an error."""
    store = fresh(template, tmp_path)
    old = store.read()
    real_fsync, real_replace = os.fsync, os.replace
    renamed = []

    def replace(src, dst):
        real_replace(src, dst)
        renamed.append(os.fspath(dst) == os.fspath(store.ledger_path))

    def fsync(fd):
        if any(renamed) and os.path.samefile(f"/proc/self/fd/{fd}", store.state_dir):
            raise OSError(errno.EIO, "injected")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(rc.Unavailable) as info:
        relay.commit(store, batch()[:1], CONFIG, T0 + 100)
    monkeypatch.undo()
    assert "fsync" in info.value.message and "not acknowledged" in info.value.message
    assert relay.Store(store.root).read().revision == old.revision + 1


# -- damaged ledgers ------------------------------------------------------------


def seal(doc) -> bytes:
    """Ledger bytes for ``doc`` with a correct checksum (mirrors relay.encode_ledger)."""
    return seal_body(relay._canonical(doc))


def seal_body(body: bytes) -> bytes:
    assert body.endswith(b"}")
    return body[:-1] + b',"checksum":"sha256:' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def random_json(rng, depth=0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randrange(-10**6, 10**6)
    if kind == 1:
        return "".join(rng.choice("ab\"\\{}[]:, \u00e9\x00") for _ in range(rng.randrange(8)))
    if kind == 2:
        return rng.choice([None, True, False, 1.5])
    if kind == 3:
        return rng.random()
    if kind in (4, 5):
        return {f"k{rng.randrange(9)}": random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


#: Ledger section -> the fields its records cannot do without.
REQUIRED = {
    section: [f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING]
    for section, cls in (("profiles", rc.Profile), ("sessions", rc.Session), ("leases", rc.Lease),
                         ("control_requests", rc.ControlRequest), ("cursors", rc.Cursor),
                         ("tokens", relay.TokenRecord), ("quarantines", rc.Quarantine))
}


def schema_damage(doc, rng):
    """A copy of a valid ledger document that breaks the schema in one random way."""
    doc = json.loads(json.dumps(doc))
    sections = ["profiles", "sessions", "leases", "control_requests", "cursors", "tokens",
                "quarantines"]
    full = [s for s in sections if doc[s]]
    how = rng.randrange(9)
    if how == 0:
        doc["schema"] = rng.choice(["flow-relay/relay-state/v0", "", None, 2])
    elif how == 1:
        doc["revision"] = rng.choice([-1, "7", 1.5, None, True, [1]])
    elif how == 2:
        doc[rng.choice(sections + ["runtime"])] = rng.choice([[], "x", 3, None])
    elif how == 3:
        doc[rng.choice(["extra", "ledger", "Revision"])] = 1
    else:
        section = rng.choice(full)
        key = rng.choice(sorted(doc[section]))
        record = doc[section][key]
        if how == 4:
            record["unexpected"] = True
        elif how == 5:
            del record[rng.choice(REQUIRED[section])]
        elif how == 6:
            field = rng.choice(sorted(set(record) - {"payload", "data"}))  # those take any JSON
            record[field] = {"wrong": "type"}
        elif how == 7:
            doc[section]["other-" + key] = doc[section].pop(key)
        else:
            doc[section]["../" + key] = doc[section].pop(key)
    return doc


def damaged_ledgers(data: bytes, doc: dict, count: int, seed: int):
    """(label, bytes) of ``count`` damaged versions of a valid ledger."""
    rng = random.Random(seed)
    yield "empty", b""
    yield "whitespace", b" \n\t"
    yield "zeros", bytes(len(data))
    yield "no-newline", data[:-1]
    yield "json-without-checksum", relay._canonical(doc)
    yield "deeply-nested", seal_body(b'{"schema":"x","a":' + b"[" * 5000 + b"]" * 5000 + b"}")
    for i in range(count):
        kind = i % 6
        if kind == 0:
            cut = rng.randrange(len(data))
            yield f"truncate@{cut}", data[:cut]
        elif kind == 1:
            flipped = bytearray(data)
            for pos in rng.sample(range(len(data) * 8), rng.randrange(1, 9)):
                flipped[pos // 8] ^= 1 << (pos % 8)
            yield f"flip#{i}", bytes(flipped)
        elif kind == 2:
            yield f"schema#{i}", seal(schema_damage(doc, rng))
        elif kind == 3:
            value = random_json(rng)
            if isinstance(value, dict):
                value["not_a_field"] = 0  # an empty object would be a valid runtime
            body = relay._canonical({"schema": relay.SCHEMA_ID, "runtime": value}
                                    if rng.random() < 0.5 else {"garbage": value})
            yield f"json#{i}", seal_body(body)
        elif kind == 4:
            yield f"bytes#{i}", seal_body(rng.randbytes(rng.randrange(1, 200)) + b"}")
        else:
            yield f"raw#{i}", rng.randbytes(rng.randrange(1, 400))


def test_seal_mirrors_the_ledger_codec(template):
    """The test's checksum helper produces exactly relay.encode_ledger's bytes."""
    ledger = relay.Store(template).read()
    assert seal(rc.to_json(ledger)) == relay.encode_ledger(ledger)


def test_hundreds_of_damaged_ledgers_are_refused_and_reported(template, tmp_path, capsys):
    """No damaged ledger is accepted: decode refuses, mutations exit 1, status fails, bytes stay."""
    store = fresh(template, tmp_path)
    data = store.ledger_path.read_bytes()
    doc = rc.to_json(store.read())
    argv = ["event", "append", "--session", "s1", "--kind", "k", "--root", str(store.root),
            "--json"]
    seen = 0
    for label, damaged in damaged_ledgers(data, doc, 360, seed=2024):
        store.ledger_path.write_bytes(damaged)
        with pytest.raises(relay.LedgerInvalid):
            relay.decode_ledger(damaged)
        with pytest.raises(relay.LedgerInvalid):
            relay.commit(relay.Store(store.root), batch(), CONFIG, T0 + 100)
        assert relay.main(argv) == 1, label
        out, _ = capsys.readouterr()
        assert json.loads(out)["error"]["code"] == "failed_precondition", label
        status = relay.status(relay.Store(store.root), T0 + 100)
        assert status.status == "fail" and status.relay_mode == "degraded", label
        assert [w.code for w in status.warnings] == ["ledger_invalid"], label
        assert store.ledger_path.read_bytes() == damaged, label
        assert temps(store) == []
        seen += 1
    assert seen > 300


@pytest.mark.parametrize("kind", ["truncate", "flip", "zeros", "schema"])
def test_damaged_ledger_is_refused_by_a_real_cli_process(template, tmp_path, kind):
    """A real `python -m relay` mutation on a damaged ledger exits 1 and leaves it byte for byte."""
    store = fresh(template, tmp_path)
    data = store.ledger_path.read_bytes()
    doc = rc.to_json(store.read())
    damaged = {"truncate": data[: len(data) // 3],
               "flip": data[:40] + bytes([data[40] ^ 1]) + data[41:],
               "zeros": bytes(len(data)),
               "schema": seal({**doc, "schema": "someone-else/v9"})}[kind]
    store.ledger_path.write_bytes(damaged)
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "--root", str(store.root), "lease", "grant", "--session",
         "s1", "--holder", "h", "--mode", READ, "--json"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 1, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "failed_precondition" and "state reset" in error["hint"]
    assert store.ledger_path.read_bytes() == damaged


# -- damaged stream logs --------------------------------------------------------


def test_torn_tail_is_ignored_by_reads_and_cut_by_the_next_append(template, tmp_path):
    """Bytes past the committed length are never read and are replaced by the next append."""
    rng = random.Random(5)
    for trial in range(30):
        store = fresh(template, tmp_path, f"t{trial}")
        ledger = store.read()
        cursor = ledger.cursors["s1"]
        log = store.stream_path("s1", "events")
        committed = log.read_bytes()
        assert len(committed) == cursor.events_bytes
        torn = relay.encode_record(rc.StreamRecord("s1", cursor.events + 1, "torn", "x" * 40))
        tail = rng.choice([torn[: rng.randrange(1, len(torn))], torn, rng.randbytes(30)])
        log.write_bytes(committed + tail)
        listed = relay.list_records(store, ledger, rc.ListRecordsRequest("s1"), "events")
        assert [r.seq for r in listed.records] == list(range(1, cursor.events + 1))
        assert all(r.kind != "torn" for r in listed.records)
        reply = commit_ok(store, "AppendEvent", now=T0 + 100, session_id="s1", kind="real")
        assert reply.record.seq == cursor.events + 1
        data = log.read_bytes()
        assert data.startswith(committed) and b"torn" not in data
        assert data == committed + relay.encode_record(reply.record)
        check_streams(store, store.read())


def test_bit_flips_inside_committed_records_are_detected(template, tmp_path):
    """A single flipped bit anywhere in the committed part of a stream log fails the checksum scan."""
    store = fresh(template, tmp_path)
    ledger = store.read()
    cursor = ledger.cursors["s1"]
    log = store.stream_path("s1", "events")
    good = log.read_bytes()
    first = good.index(b"\n") + 1
    # Every bit of the first record, and a seeded sample of the others.
    sample = random.Random(8).sample(range(first * 8, len(good) * 8), 600)
    for pos in [*range(first * 8), *sample]:
        flipped = bytearray(good)
        flipped[pos // 8] ^= 1 << (pos % 8)
        log.write_bytes(bytes(flipped))
        with pytest.raises((ValueError, RelayError)):
            list(store.scan_records("s1", "events", cursor.events_bytes))
    log.write_bytes(good)
    assert len(list(store.scan_records("s1", "events", cursor.events_bytes))) == cursor.events


def test_random_damage_to_long_logs_is_detected(template, tmp_path):
    """Random flips and overwrites anywhere in a long committed log are caught by the scan."""
    store = fresh(template, tmp_path)
    relay.commit(store, [mutation("AppendEvent", session_id="s2", kind="k", data={"i": i})
                         for i in range(300)], CONFIG, T0 + 100)
    cursor = store.read().cursors["s2"]
    log = store.stream_path("s2", "events")
    good = log.read_bytes()
    rng = random.Random(99)
    for _ in range(300):
        damaged = bytearray(good)
        if rng.random() < 0.5:
            pos = rng.randrange(len(good) * 8)
            damaged[pos // 8] ^= 1 << (pos % 8)
        else:
            start = rng.randrange(len(good) - 8)
            damaged[start:start + 8] = rng.randbytes(8)
            if damaged == bytearray(good):
                continue
        log.write_bytes(bytes(damaged))
        with pytest.raises((ValueError, RelayError)):
            list(store.scan_records("s2", "events", cursor.events_bytes))


# -- orphan temp files ----------------------------------------------------------


def test_orphan_temp_files_are_removed_by_the_next_mutation(template, tmp_path):
    """Temp files a crashed writer left are deleted by the next mutation, under the lock."""
    store = fresh(template, tmp_path)
    names = [f"{relay.TEMP_PREFIX}{pid}.{i:08x}" for i, pid in enumerate((1, 999999, os.getpid()))]
    for name in names:
        (store.state_dir / name).write_bytes(b'{"schema": partial')
    assert temps(store) == sorted(names)
    assert relay.Store(store.root).read() == store.read()  # reads ignore them
    commit_ok(relay.Store(store.root), "AppendEvent", now=T0 + 100, session_id="s1", kind="k")
    assert temps(store) == []


def test_orphans_are_removed_even_when_the_mutation_is_refused(template, tmp_path):
    """A refused mutation still sweeps orphan temps (it held the lock) and changes nothing else."""
    store = fresh(template, tmp_path)
    (store.state_dir / f"{relay.TEMP_PREFIX}1.0").write_bytes(b"x")
    before = store.ledger_path.read_bytes()
    with pytest.raises(rc.NotFound):
        commit_ok(relay.Store(store.root), "AppendEvent", session_id="ghost", kind="k")
    assert temps(store) == []
    assert store.ledger_path.read_bytes() == before


def test_orphans_left_while_a_long_lived_store_runs_are_removed(template, tmp_path):
    """A store that outlives a crashed writer (the server's) still sweeps its temp files."""
    store = fresh(template, tmp_path)
    commit_ok(store, "AppendEvent", now=T0 + 100, session_id="s1", kind="k")
    (store.state_dir / f"{relay.TEMP_PREFIX}4242.dead").write_bytes(b"x")
    commit_ok(store, "AppendEvent", now=T0 + 101, session_id="s1", kind="k")
    assert temps(store) == []


def test_ledger_of_the_template_is_sane(template):
    """The shared template decodes and its streams scan (guards the fixtures above)."""
    store = relay.Store(template)
    ledger = store.read()
    assert ledger.cursors["s1"].events == 5
    assert attrs.has(type(ledger))
    check_streams(store, ledger)


def test_ledger_encoding_from_cached_fragments_is_byte_identical(tmp_path):
    """The fragment-cached encoder writes exactly the canonical JSON of the whole ledger,
    across successive ledgers that share, replace and drop records."""
    import hashlib

    from relay_client import to_json

    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    for i in range(30):
        lease = commit_ok(store, "GrantLease", session_id="s1", holder=f"h{i}",
                          mode="exclusive-write").lease
        commit_ok(store, "ReleaseLease", lease_id=lease.lease_id)
        commit_ok(store, "RecordControl", request_id=f"r{i}", session_id="s1", kind="k",
                  payload={"ü": i, "list": [1, "two", None]})
        ledger = store.read()
        body = relay._canonical(to_json(ledger))
        expect = body[:-1] + b',"checksum":"sha256:' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'
        assert relay.encode_ledger(ledger) == expect
        assert store.ledger_path.read_bytes() == expect
