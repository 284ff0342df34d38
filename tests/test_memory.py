"""Bounds on what a long-running server keeps in memory (issue 14's soak:
RSS must level off after warm-up, so every history a server keeps is bounded
by a size it reaches in its first minutes, or by what it serves)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

import pytest

import relay
from conftest import ROOT


def _lease(n: int) -> dict:
    return {"lease_id": f"L{n:06d}", "session_id": "s1", "holder": "h" * 40, "state": "active",
            "granted_at": "2026-12-01T14:00:00.000000Z", "ttl_seconds": 60, "note": "x" * 300}


def test_feed_history_is_bounded_by_bytes_and_replays_the_same_frames():
    """The feed keeps at most ``feed_history_bytes`` of notice JSON (not 4096
    notices of any size), one copy of each, and a replay sends byte for byte
    the frames that were published live."""
    hub = relay.EventHub(feed_history_bytes=16 * 1024)
    live = hub.subscribe("relay")
    sent = []
    for n in range(400):
        hub.notice(n + 1, "lease.granted", _lease(n))
        sent.append(live.receive.receive_nowait())
        assert hub.feed_bytes <= 16 * 1024
    size = len(json.dumps(_lease(0), separators=(",", ":"), sort_keys=True))
    assert hub.statistics().feed_notices == 16 * 1024 // size
    assert hub.feed_bytes == sum(len(n.payload) for n in hub._feed)
    assert all(isinstance(n, relay.FeedNotice) for n in hub._feed)  # no Frame kept per notice
    kept = hub.statistics().feed_notices
    replay = hub.feed_after(400 - kept, 0)
    assert [(f.id, f.event, f.sse, f.ws, f.chunk, f.data) for f in replay] == [
        (f.id, f.event, f.sse, f.ws, f.chunk, f.data) for f in sent[-kept:]]
    assert hub.feed_after(400 - kept - 1, 0) is None  # its next notice was dropped: refused


def test_feed_history_keeps_the_newest_notice_even_when_it_alone_is_over_the_bound():
    hub = relay.EventHub(feed_history_bytes=10)
    hub.notice(1, "lease.granted", _lease(1))
    hub.notice(2, "lease.granted", _lease(2))
    assert [f.id for f in hub.feed_after(1, 0)] == ["2.0"]
    assert hub.feed_after(0, 0) is None


def test_feed_history_forgets_its_bytes_on_rebase():
    hub = relay.EventHub()
    hub.notice(1, "lease.granted", _lease(1))
    hub.rebase(relay.Ledger())
    assert hub.feed_bytes == 0 and hub.statistics().feed_notices == 0


def test_a_sealed_request_key_table_holds_arrays_only():
    """A bucket that takes no more keys keeps 16 bytes a key in two arrays, no
    dict of its newest keys (a day of 24 sealed buckets x 16 shards must not
    keep up to 1,023 dict entries each), and still finds every key."""
    table = relay._KeyTable()
    keys = [relay._key_hash(f"req-{n}") for n in range(relay._KEY_TABLE_BATCH + 500)]
    for offset, hashed in enumerate(keys):
        table.add(hashed, offset)
    assert len(table.newest) == 500
    table.seal()
    assert table.newest == {} and len(table.hashes) == len(table.offsets) == len(keys)
    assert table.hashes.itemsize == table.offsets.itemsize == 8
    assert [table.find(h) for h in keys] == list(range(len(keys)))


def test_the_request_index_seals_buckets_the_cursor_moved_past(tmp_path):
    """After a reload, the sealed bucket's keys are in its index files (no
    table left in memory) and only the current bucket's tables hold keys."""
    store, config = relay.Store(tmp_path), relay.Config()
    span = relay._bucket_span(config)
    now = 10 * span + 1.0
    ledger = relay.Ledger()
    for step in range(2):  # two buckets, a few keys each
        ledger = relay.attrs.evolve(ledger, requests={
            f"k{step}-{n}": relay.RequestRecord("AppendEvent", "f" * 64, {}, relay.iso(now))
            for n in range(40)})
        ledger, _ = relay.append_request_records(store, ledger, now + step * span, config)
    index = relay.RequestIndex()
    index.sync(store, ledger.request_log, now + span, config)
    current = ledger.request_log.bucket
    assert all(bucket == current for bucket, _ in index.tables)
    assert sum(f.count for (bucket, _), f in index.files.items() if bucket != current) == 40
    assert any(t.newest for (bucket, _), t in index.tables.items() if bucket == current)
    assert index.lookup(store, "k0-3", now + span, config) is not None


_MALLINFO = """
import ctypes, sys
import relay
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    assert relay.tune_malloc()
big = bytes(30_000_000)  # pages of its own, freed: glibc raises its threshold past it
del big
before = libc.mallinfo2().hblkhd
smaller = bytes(28_000_000)  # more than the heap has free: a block of its own, or a bigger heap
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc 2.33+ only")
@pytest.mark.parametrize("tuned", [False, True])
def test_a_served_relay_gives_each_large_transient_block_pages_of_its_own(tuned):
    """After ``tune_malloc`` (``relay serve`` calls it) a large block that
    fits no hole gets pages of its own (returned when freed) even after a
    bigger one was freed; untuned glibc grows the heap for it instead (the
    soak's server grew that way, a large transient copy at a time)."""
    out = subprocess.run([sys.executable, "-c", _MALLINFO, "tuned" if tuned else "plain"],
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, check=True).stdout
    mapped = int(out)
    assert (mapped >= 28_000_000) if tuned else (mapped == 0)


def test_serve_tunes_malloc_before_it_starts(workspace, monkeypatch):
    """``_run_serve`` calls ``tune_malloc`` before ``trio.run`` (threads get their heaps then)."""
    calls: list[str] = []
    monkeypatch.setattr(relay, "tune_malloc", lambda: calls.append("tune_malloc"))
    monkeypatch.setattr(relay.trio, "run", lambda *args, **kwargs: calls.append("trio.run"))
    monkeypatch.setattr(relay, "_configure_logging", lambda level: None)  # no root handler left behind
    args = argparse.Namespace(host="127.0.0.1", port=0, log_level=None)
    relay._run_serve(relay.Store(workspace), relay.Config(), args, as_json=True)
    assert calls[:2] == ["tune_malloc", "trio.run"]


def test_a_key_table_merge_keeps_every_key_sorted_and_the_newest_offset_of_each():
    """Merging batches into the arrays keeps them sorted, one entry a key, the
    newest offset winning (a key added again after a merge, and within a batch)."""
    import random

    rng = random.Random(7)
    table, expected = relay._KeyTable(), {}
    for offset in range(5 * relay._KEY_TABLE_BATCH):
        hashed = rng.choice(list(expected)) if expected and rng.random() < 0.2 else rng.getrandbits(64)
        table.add(hashed, offset)
        expected[hashed] = offset
    table.seal()
    assert list(table.hashes) == sorted(expected)
    assert list(table.offsets) == [expected[h] for h in sorted(expected)]
    assert all(table.find(h) == o for h, o in expected.items())
    assert table.find(rng.getrandbits(64)) is None
