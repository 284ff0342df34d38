"""Request ids are recognised for their whole retention window, whatever the
request rate, from a request log outside the ledger; and the ledger every
commit rewrites stays small (caps on what goes in it).

Time is injected (``commit(..., now)``, ``serve(now=...)``); nothing sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import attrs
import pytest
import trio
from conftest import ROOT, T0, commit_ok, mutation, snapshot
from serve_helpers import PATIENCE, cli_process, serving

import relay

RETENTION = 240  # seconds; buckets of RETENTION // 24 = 10 s


def seeded(store, now=T0, sessions=("s1",)):
    commit_ok(store, "RegisterProfile", now=now, name="cx", provider="codex", mode="pooled")
    for sid in sessions:
        commit_ok(store, "CreateSession", now=now, profile="cx", session_id=sid)


def append_many(store, n, now=T0, prefix="other", group=100, config=None):
    """Commit ``n`` appends with distinct request ids, ``group`` per commit."""
    config = config or relay.Config()
    for start in range(0, n, group):
        muts = [mutation("AppendEvent", session_id="s1", kind="k", data=i,
                         request_id=f"{prefix}-{i}") for i in range(start, min(start + group, n))]
        results, _ = relay.commit(store, muts, config, now)
        assert not any(isinstance(r, relay.RelayError) for r in results)


def events(store, sid="s1"):
    ledger = store.read()
    return list(store.scan_records(sid, "events", ledger.cursors[sid].events_bytes))


def cli(root, *args, env_extra=None, check=0):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    if not env_extra or "RELAY_FAILPOINT" not in env_extra:
        env.pop("RELAY_FAILPOINT", None)
    proc = subprocess.run([sys.executable, "-m", "relay", "--root", str(root), *args, "--json"],
                          capture_output=True, text=True, env=env)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


# -- recognised whatever the rate --------------------------------------------------


@pytest.mark.parametrize("indexed", [False, True], ids=["scan", "index"])
def test_a_request_id_survives_1200_others(tmp_path, indexed):
    """After 1,200 other request ids, a retry of the first is replayed, not applied again."""
    store = relay.Store(tmp_path, request_index=relay.RequestIndex() if indexed else None)
    seeded(store)
    first = commit_ok(store, "AppendEvent", session_id="s1", kind="k", data="R", request_id="R")
    append_many(store, 1200, now=T0 + 1)
    for retry_store in (store, relay.Store(tmp_path)):  # this process, and a fresh one
        again = commit_ok(retry_store, "AppendEvent", now=T0 + 2, session_id="s1", kind="k",
                          data="R", request_id="R")
        assert again == first
    assert [r.seq for r in events(store) if r.data == "R"] == [first.record.seq]
    ledger = store.read()
    assert ledger.requests == {}
    assert ledger.cursors["s1"].events == 1201
    # The ledger does not grow with the request ids: a few hundred bytes per session.
    assert store.ledger_path.stat().st_size < 4096


def test_same_id_other_body_is_already_exists_from_the_log(tmp_path):
    """Reused with another body, a logged request id is already_exists and changes nothing."""
    store = relay.Store(tmp_path)
    seeded(store)
    commit_ok(store, "AppendEvent", session_id="s1", kind="k", data=1, request_id="R")
    append_many(store, 50, now=T0 + 1)
    before = snapshot(tmp_path)
    with pytest.raises(relay.AlreadyExists):
        commit_ok(store, "AppendEvent", now=T0 + 2, session_id="s1", kind="k", data=2,
                  request_id="R")
    with pytest.raises(relay.AlreadyExists):
        commit_ok(store, "CreateSession", now=T0 + 2, profile="cx", request_id="R")
    assert snapshot(tmp_path) == before


def test_one_lookup_reads_one_shard_per_bucket(tmp_path, monkeypatch):
    """A fresh process looks its key up in one shard file, not the whole log."""
    store = relay.Store(tmp_path)
    seeded(store)
    append_many(store, 300)
    opened = []
    real = relay._request_lines
    monkeypatch.setattr(relay, "_request_lines", lambda path, *a: opened.append(path) or real(path, *a))
    commit_ok(relay.Store(tmp_path), "AppendEvent", now=T0 + 1, session_id="s1", kind="k",
              data=0, request_id="other-0")
    assert len(opened) == 1
    assert len(list((store.state_dir / "requests").glob("*/*.log"))) == relay.REQUEST_SHARDS


async def test_a_request_id_survives_1200_others_over_http(tmp_path):
    """Over HTTP (group commits), and from a CLI process meanwhile: the retry is replayed."""
    with trio.fail_after(10 * PATIENCE):
        async with serving(tmp_path) as r:
            (sid,) = await r.seed()
            first = await r.ok("AppendEvent", session_id=sid, kind="k", data="R", request_id="R")

            async def writer(w: int) -> None:
                for i in range(75):
                    await r.ok("AppendEvent", session_id=sid, kind="k", data=i,
                               request_id=f"w{w}-{i}")

            async with trio.open_nursery() as nursery:
                for w in range(16):
                    nursery.start_soon(writer, w)
            assert await r.ok("AppendEvent", session_id=sid, kind="k", data="R",
                              request_id="R") == first
            # A key committed by another process is known to the server ...
            by_cli = await cli_process(tmp_path, "event", "append", "--session", sid, "--kind", "k",
                                       "--data", '"C"', "--request-id", "C")
            assert await r.ok("AppendEvent", session_id=sid, kind="k", data="C",
                              request_id="C") == by_cli
            # ... and a CLI process knows the server's.
            assert await cli_process(tmp_path, "event", "append", "--session", sid, "--kind", "k",
                                     "--data", '"R"', "--request-id", "R") == first
            listed = await r.ok("ListEvents", session_id=sid, after=1201)
    assert [x["data"] for x in listed["records"]] == ["C"]
    assert listed["records"][0]["seq"] == 1202


# -- retention ---------------------------------------------------------------------


def test_default_retention_is_24_hours(tmp_path):
    """By default a request id is recognised for 24 hours."""
    assert relay.Config().request_retention_seconds == 24 * 3600
    store = relay.Store(tmp_path)
    seeded(store)
    first = commit_ok(store, "AppendEvent", session_id="s1", kind="k", request_id="R")
    assert commit_ok(store, "AppendEvent", now=T0 + 24 * 3600 - 1, session_id="s1", kind="k",
                     request_id="R") == first


@pytest.mark.parametrize("indexed", [False, True], ids=["scan", "index"])
def test_request_ids_expire_with_their_bucket(tmp_path, indexed):
    """A key is recognised for the retention window, and its bucket is deleted once past it."""
    config = relay.Config(request_retention_seconds=RETENTION)
    store = relay.Store(tmp_path, request_index=relay.RequestIndex() if indexed else None)
    seeded(store)
    first = commit_ok(store, "AppendEvent", config=config, session_id="s1", kind="k",
                      request_id="R")
    buckets = store.state_dir / "requests"
    (old,) = os.listdir(buckets)
    # Commits in later buckets (each rolls the log on) keep the key.
    for step in range(1, 24):
        commit_ok(store, "AppendEvent", now=T0 + 10 * step, config=config, session_id="s1",
                  kind="k", request_id=f"x-{step}")
    assert commit_ok(store, "AppendEvent", now=T0 + RETENTION, config=config, session_id="s1",
                     kind="k", request_id="R") == first
    later = commit_ok(store, "AppendEvent", now=T0 + RETENTION + 11, config=config,
                      session_id="s1", kind="k", request_id="R")
    assert later.record.seq > first.record.seq
    assert old not in os.listdir(buckets)  # expired buckets are removed whole
    assert len(os.listdir(buckets)) <= 26


def test_index_follows_bucket_rollover_by_another_process(tmp_path):
    """A server's index keeps keys when another process rolls the log to a new bucket."""
    config = relay.Config(request_retention_seconds=RETENTION)
    server = relay.Store(tmp_path, request_index=relay.RequestIndex())
    seeded(server)
    first = commit_ok(server, "AppendEvent", config=config, session_id="s1", kind="k",
                      request_id="R")
    other = relay.Store(tmp_path)
    by_other = commit_ok(other, "AppendEvent", now=T0 + 30, config=config, session_id="s1",
                         kind="k", request_id="O")
    commit_ok(other, "AppendEvent", now=T0 + 60, config=config, session_id="s1", kind="k",
              request_id="P")
    assert commit_ok(server, "AppendEvent", now=T0 + 61, config=config, session_id="s1",
                     kind="k", request_id="R") == first
    assert commit_ok(server, "AppendEvent", now=T0 + 61, config=config, session_id="s1",
                     kind="k", request_id="O") == by_other


# -- migration ---------------------------------------------------------------------


def test_inline_records_of_an_older_ledger_move_to_the_log(tmp_path):
    """An older ledger's inline request records are honoured, then moved out by the next commit."""
    store = relay.Store(tmp_path)
    seeded(store)
    first = commit_ok(store, "AppendEvent", session_id="s1", kind="k", request_id="R")
    record = relay.RequestRecord("AppendEvent", mutation("AppendEvent", session_id="s1", kind="k",
                                                         request_id="R").digest,
                                 relay.to_json(first), relay.iso(T0))
    # What an earlier version wrote: the record inline and no request log.
    shutil.rmtree(store.state_dir / "requests")
    store.write(attrs.evolve(store.read(), requests={"R": record},
                             request_log=relay.RequestLogCursor()))
    assert commit_ok(store, "AppendEvent", now=T0 + 1, session_id="s1", kind="k",
                     request_id="R") == first
    commit_ok(store, "AppendEvent", now=T0 + 2, session_id="s1", kind="other")
    assert store.read().requests == {}
    assert commit_ok(relay.Store(tmp_path), "AppendEvent", now=T0 + 3, session_id="s1", kind="k",
                     request_id="R") == first


def test_request_log_cursor_schema_matches_the_model():
    """The schema's RequestLogCursor has exactly the model's fields."""
    schema = json.loads((ROOT / "specs" / "relay-state.schema.json").read_text())
    part = schema["$defs"]["RequestLogCursor"]
    assert list(part["properties"]) == [f.name for f in attrs.fields(relay.RequestLogCursor)]
    assert part["required"] == list(part["properties"])


@pytest.mark.parametrize("cursor, ok", [
    ({"bucket": "", "shard_bytes": []}, True),
    ({"bucket": "1700000000-3600", "shard_bytes": [0] * 16}, True),
    ({"bucket": "", "shard_bytes": [0] * 16}, False),
    ({"bucket": "1700000000-3600", "shard_bytes": []}, False),
    ({"bucket": "1700000000-3600", "shard_bytes": [0] * 15}, False),
    ({"bucket": "1700000000-3600", "shard_bytes": [-1] + [0] * 15}, False),
    ({"bucket": "../x", "shard_bytes": [0] * 16}, False),
])
def test_reader_and_schema_agree_on_the_cursor(tmp_path, cursor, ok):
    """The reader accepts exactly the request_log cursors the schema accepts."""
    import jsonschema

    store = relay.Store(tmp_path)
    seeded(store)
    doc = json.loads(relay.split_checksum(store.ledger_path.read_bytes())[0])
    doc["request_log"] = cursor
    body = relay._canonical(doc)
    data = (body[:-1] + b',"checksum":"sha256:' + hashlib.sha256(body).hexdigest().encode()
            + b'"}\n')
    schema = json.loads((ROOT / "specs" / "relay-state.schema.json").read_text())
    assert jsonschema.Draft202012Validator(schema).is_valid(json.loads(data)) == ok
    if ok:
        relay.decode_ledger(data)
    else:
        with pytest.raises(relay.LedgerInvalid):
            relay.decode_ledger(data)


# -- crash safety ------------------------------------------------------------------

CRASH_MUTATIONS = [
    (["event", "append", "--session", "s1", "--kind", "crash", "--request-id", "R"],
     lambda store: sum(r.kind == "crash" for r in events(store))),
    (["control", "record", "--request-id", "c-R", "--session", "s1", "--kind", "stop"],
     lambda store: int("c-R" in store.read().control_requests)),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("idem-template")
    store = relay.Store(root)
    now = time.time()  # the CLI writers below commit at the real time: the same bucket
    seeded(store, now=now)
    append_many(store, 40, now=now)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", relay.FAILPOINTS)
def test_a_killed_writer_then_a_retry_applies_exactly_once(template, tmp_path, failpoint):
    """SIGKILLed at any step with a request id, then retried (with other writes between): once."""
    for i, (argv, count) in enumerate(CRASH_MUTATIONS):
        root = tmp_path / f"ws{i}"
        shutil.copytree(template, root)
        killed = cli(root, *argv, env_extra={"RELAY_FAILPOINT": failpoint}, check=None)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        # The retry comes first: the killed writer's record, if it is on disk
        # but uncommitted, must not be taken for a committed one.
        retry = cli(root, *argv)
        assert count(relay.Store(root)) == 1
        append_many(relay.Store(root), 40, now=time.time(), prefix="after")
        again = cli(root, *argv)
        assert json.loads(again.stdout)["outcome"] in ("duplicate", json.loads(retry.stdout)
                                                        ["outcome"])
        assert count(relay.Store(root)) == 1


def test_an_unacknowledged_request_record_never_counts(tmp_path, monkeypatch):
    """A request record written but not committed (the ledger write failed) is cut, not replayed,
    also when the log moves on to the next bucket."""
    config = relay.Config(request_retention_seconds=RETENTION)
    store = relay.Store(tmp_path)
    seeded(store)
    commit_ok(store, "AppendEvent", config=config, session_id="s1", kind="k", request_id="A")

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(relay.RelayError):
        commit_ok(store, "AppendEvent", now=T0 + 1, config=config, session_id="s1", kind="lost",
                  request_id="R")
    monkeypatch.undo()
    cursor = store.read().request_log
    sizes = {p.name: p.stat().st_size for p in (store.state_dir / "requests" / cursor.bucket)
             .glob("*.log")}
    assert sum(sizes.values()) > sum(cursor.shard_bytes)  # the uncommitted tail is on disk
    for indexed in (False, True):  # looked up at once, it is not there
        probe = relay.Store(tmp_path, request_index=relay.RequestIndex() if indexed else None)
        assert relay.request_lookup(probe, probe.read(), T0 + 1, config)("R") is None
    # The next commit is in a new bucket: the old one is sealed at its committed lengths.
    commit_ok(store, "AppendEvent", now=T0 + 20, config=config, session_id="s1", kind="k",
              request_id="B")
    for path in (store.state_dir / "requests" / cursor.bucket).glob("*.log"):
        assert path.stat().st_size == cursor.shard_bytes[int(path.stem, 16)]
    applied = commit_ok(store, "AppendEvent", now=T0 + 21, config=config, session_id="s1",
                        kind="lost", request_id="R")
    assert applied.outcome == "appended"
    assert [r.kind for r in events(store)].count("lost") == 1


# -- caps on what the ledger keeps -------------------------------------------------


async def test_caps_are_enforced_over_http(tmp_path):
    """Oversized control payloads and record data are invalid_argument naming the limit."""
    with trio.fail_after(PATIENCE):
        async with serving(tmp_path) as r:
            (sid,) = await r.seed()
            before = snapshot(tmp_path)
            big = "x" * relay.Config().max_control_payload_bytes
            err = await r.refused("RecordControl", "invalid_argument", request_id="c1",
                                  session_id=sid, kind="k", payload=big)
            assert "max_control_payload_bytes = 4096" in err["message"]
            err = await r.refused("AppendEvent", "invalid_argument", session_id=sid, kind="k",
                                  data="x" * (64 * 1024))
            assert "max_record_bytes = 65536" in err["message"]
            err = await r.refused("AppendResult", "invalid_argument", session_id=sid, kind="k",
                                  data="x" * (64 * 1024))
            assert "max_record_bytes" in err["message"]
            assert snapshot(tmp_path) == before
            await r.ok("RecordControl", request_id="c2", session_id=sid, kind="k",
                       payload="x" * (4096 - 2))


def test_caps_are_enforced_on_the_cli(tmp_path):
    """The CLI refuses the same oversized payloads with exit 1 and one line naming the limit."""
    store = relay.Store(tmp_path)
    seeded(store)
    before = snapshot(tmp_path)
    proc = cli(tmp_path, "control", "record", "--request-id", "c1", "--session", "s1", "--kind",
               "k", "--payload", json.dumps("x" * 4096), check=1)
    assert "max_control_payload_bytes" in proc.stdout + proc.stderr
    proc = cli(tmp_path, "event", "append", "--session", "s1", "--kind", "k",
               "--data", json.dumps("x" * 65536), check=1)
    assert "max_record_bytes" in proc.stdout + proc.stderr
    assert snapshot(tmp_path) == before


def test_control_requests_in_the_ledger_are_capped_and_still_deduplicated(tmp_path):
    """Beyond 2 x max_control_requests the oldest are archived; their ids stay duplicates."""
    config = relay.Config(max_control_requests=10)
    store = relay.Store(tmp_path)
    seeded(store)
    first = commit_ok(store, "RecordControl", config=config, request_id="c-0", session_id="s1",
                      kind="k", payload={"n": 0})
    for i in range(1, 60):
        commit_ok(store, "RecordControl", now=T0 + i, config=config, request_id=f"c-{i}",
                  session_id="s1", kind="k", payload={"n": i})
        assert len(store.read().control_requests) <= 2 * config.max_control_requests
    assert "c-0" not in store.read().control_requests
    archived = (store.state_dir / "archive" / "control-requests.jsonl").read_text().splitlines()
    assert json.loads(archived[0])["request_id"] == "c-0"
    again = commit_ok(store, "RecordControl", now=T0 + 100, config=config, request_id="c-0",
                      session_id="s1", kind="k", payload={"n": 0})
    assert again.outcome == "duplicate"
    assert again.control_request == first.control_request
    with pytest.raises(relay.AlreadyExists, match="control request 'c-0'"):
        commit_ok(store, "RecordControl", now=T0 + 100, config=config, request_id="c-0",
                  session_id="s1", kind="k", payload={"n": 1})
    assert "c-0" not in store.read().control_requests


def test_ledger_stays_small_under_large_payloads(tmp_path):
    """The issue's 200 RecordControl calls with big payloads cannot grow the ledger (was 47 MiB)."""
    store = relay.Store(tmp_path)
    seeded(store)
    payload = "x" * 4000
    for i in range(0, 250, 10):
        muts = [mutation("RecordControl", request_id=f"c-{j}", session_id="s1", kind="k",
                         payload=payload) for j in range(i, i + 10)]
        muts.append(mutation("AppendEvent", session_id="s1", kind="k", data="y" * 60_000,
                             request_id=f"e-{i}"))
        results, _ = relay.commit(store, muts, relay.Config(), T0 + i)
        assert not any(isinstance(r, relay.RelayError) for r in results)
    assert len(store.read().control_requests) <= 200
    assert store.ledger_path.stat().st_size < 1024 * 1024


def test_a_bucket_opened_by_a_failed_commit_never_counts(tmp_path, monkeypatch):
    """A failed commit that opened a new bucket leaves a directory no cursor names: ignored, then
    removed by the next commit that opens a bucket."""
    config = relay.Config(request_retention_seconds=RETENTION)
    store = relay.Store(tmp_path)
    seeded(store)
    commit_ok(store, "AppendEvent", config=config, session_id="s1", kind="k", request_id="A")
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(relay.RelayError):
        commit_ok(store, "AppendEvent", now=T0 + 20, config=config, session_id="s1", kind="lost",
                  request_id="R")
    monkeypatch.setattr(os, "replace", real_replace)
    orphan = f"{int(T0 + 20) // 10 * 10}-10"
    assert orphan in os.listdir(store.state_dir / "requests")
    for indexed in (False, True):
        probe = relay.Store(tmp_path, request_index=relay.RequestIndex() if indexed else None)
        assert relay.request_lookup(probe, probe.read(), T0 + 25, config)("R") is None
    commit_ok(store, "AppendEvent", now=T0 + 30, config=config, session_id="s1", kind="k",
              request_id="B")
    assert orphan not in os.listdir(store.state_dir / "requests")
    commit_ok(store, "AppendEvent", now=T0 + 31, config=config, session_id="s1", kind="lost",
              request_id="R")
    assert [r.kind for r in events(store)].count("lost") == 1


# -- the server's index stays small -------------------------------------------------


def test_the_servers_index_keeps_about_16_bytes_a_request_id():
    """A day of request ids at a steady rate is held by the server's index: 64-bit
    hashes and offsets in sorted arrays, not key strings (~200 B a key), so a
    long soak's RSS does not grow by the request ids it has seen."""
    import tracemalloc

    n = 50_000
    tracemalloc.start()
    try:
        index = relay.RequestIndex()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            key = f"AppendEvent/worker-{i}"
            index._table("1764590400-3600", relay._request_shard(key)).add(relay._key_hash(key), i)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / n < 40, f"{held / n:.0f} B a key"
    key = "AppendEvent/worker-31337"
    assert index.tables[("1764590400-3600", relay._request_shard(key))].find(
        relay._key_hash(key)) == 31337


def test_request_ids_whose_hashes_collide_are_told_apart(tmp_path, monkeypatch):
    """Every key hashing alike (a collision, forced): each retry still finds its own
    record (the shard is read), and a new id is still new."""
    monkeypatch.setattr(relay, "_key_hash", lambda key: 7)
    store = relay.Store(tmp_path, request_index=relay.RequestIndex())
    seeded(store)
    firsts = {rid: commit_ok(store, "AppendEvent", session_id="s1", kind="k", data=rid,
                             request_id=rid) for rid in ("a", "b", "c")}
    for rid, first in firsts.items():
        assert commit_ok(store, "AppendEvent", now=T0 + 1, session_id="s1", kind="k", data=rid,
                         request_id=rid) == first
    fresh = commit_ok(store, "AppendEvent", now=T0 + 1, session_id="s1", kind="k", data="d",
                      request_id="d")
    assert fresh.record.seq == 4
    assert [r.data for r in events(store)] == ["a", "b", "c", "d"]
