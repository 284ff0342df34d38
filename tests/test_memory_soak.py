"""What keeps the 30-minute soak's server from growing (issue 14): the request
index holds a bounded number of keys in memory and the rest in index files
beside the request log, which are derived data (checked whenever read, rebuilt
from the log when missing, torn or stale, never trusted wrongly)."""

from __future__ import annotations

import functools

import pytest

import relay

NOW = 10 * 3600 + 1.0


@pytest.fixture
def small(monkeypatch):
    """A flush every 8 keys a shard and blocks of 4 entries (many files, many blocks)."""
    monkeypatch.setattr(relay, "_INDEX_FLUSH_KEYS", 8)
    monkeypatch.setattr(relay, "_INDEX_BLOCK", 4)


def record(n: int) -> relay.RequestRecord:
    return relay.RequestRecord("AppendEvent", f"{n:064x}", {"n": n}, relay.iso(NOW))


def append(store, ledger, keys, now=NOW, config=None):
    ledger = relay.attrs.evolve(ledger, requests={k: record(i) for i, k in enumerate(keys)})
    return relay.append_request_records(store, ledger, now, config or relay.Config())


def filled(store, n, index=None, now=NOW, prefix="k", group=50):
    """``n`` keys committed ``group`` at a time; ``index`` (if any) notes each commit."""
    ledger, keys = relay.Ledger(), [f"{prefix}-{i}" for i in range(n)]
    config = relay.Config()
    for at in range(0, n, group):
        if index is not None:
            index.sync(store, ledger.request_log, now, config)
        ledger, placed = append(store, ledger, keys[at:at + group], now)
        if index is not None:
            index.note(store, ledger.request_log, placed)
    return ledger, keys


def held(index) -> int:
    return sum(len(t.hashes) + len(t.newest) for t in index.tables.values())


def found_all(store, index, ledger, keys, now=NOW):
    config = relay.Config()
    index.sync(store, ledger.request_log, now, config)
    return all(index.lookup(store, k, now, config) == record(int(k.rsplit("-")[1]) % 50)
               for k in keys)


def index_files(store):
    return sorted((store.state_dir / relay.REQUESTS_DIR).rglob("*.idx"))


def test_the_server_index_holds_a_bounded_number_of_keys_and_finds_every_one(tmp_path, small):
    store, index = relay.Store(tmp_path), relay.RequestIndex()
    ledger, keys = filled(store, 600, index)
    assert held(index) < relay.REQUEST_SHARDS * 8  # the rest went to the shards' index files
    assert sum(f.count for f in index.files.values()) + held(index) == 600
    assert len(index_files(store)) == relay.REQUEST_SHARDS
    assert found_all(store, index, ledger, keys)
    config = relay.Config()
    assert index.lookup(store, "k-600", NOW, config) is None
    assert index.lookup(store, "never", NOW, config) is None


def test_a_restarted_server_takes_the_index_files_and_reads_only_the_logs_past_them(tmp_path, small,
                                                                                   monkeypatch):
    store = relay.Store(tmp_path)
    ledger, keys = filled(store, 600, relay.RequestIndex())
    read_from = []
    original = relay._request_lines
    monkeypatch.setattr(relay, "_request_lines",
                        lambda path, start, end: read_from.append(start) or original(path, start, end))
    index = relay.RequestIndex()
    index.sync(store, ledger.request_log, NOW, relay.Config())
    assert len(index.files) == relay.REQUEST_SHARDS and held(index) < relay.REQUEST_SHARDS * 8
    assert all(start > 0 for start in read_from)  # no log was read from its start
    assert found_all(store, index, ledger, keys)


@pytest.mark.parametrize("damage", ["torn", "flipped", "missing", "covers_more", "foreign_magic",
                                    "not_at_a_record_end"])
def test_a_torn_or_stale_index_file_is_ignored_and_rebuilt_from_the_log(tmp_path, small, damage):
    store = relay.Store(tmp_path)
    ledger, keys = filled(store, 600, relay.RequestIndex())
    for path in index_files(store):
        data = path.read_bytes()
        header = relay._INDEX_HEADER
        if damage == "torn":
            path.write_bytes(data[:len(data) - 24])
        elif damage == "flipped":
            path.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
        elif damage == "missing":
            path.unlink()
        else:
            fields = list(header.unpack_from(data))
            if damage == "covers_more":  # e.g. a ledger restored from an older backup
                fields[2] += 10 ** 6
            elif damage == "foreign_magic":
                fields[0] = b"XXXX"
            else:
                fields[2] -= 1
            head = header.pack(*fields[:-1], 0)
            head = head[:-4] + relay.struct.pack("<I", relay.zlib.crc32(head[:-4]))
            path.write_bytes(head + data[header.size:])
    index = relay.RequestIndex()
    index.sync(store, ledger.request_log, NOW, relay.Config())
    assert found_all(store, index, ledger, keys)
    # Only what the checks let through stands for the log; the rest was read again.
    assert sum(f.count for f in index.files.values()) + held(index) == 600


def test_an_index_file_changed_after_it_was_loaded_is_rebuilt_not_believed(tmp_path, small):
    """A block that no longer matches its checksum (or a file gone) sends the
    lookup to the log: a retried request id is never taken for a new one."""
    store = relay.Store(tmp_path)
    ledger, keys = filled(store, 600, relay.RequestIndex())
    index = relay.RequestIndex()
    index.sync(store, ledger.request_log, NOW, relay.Config())
    for path in index_files(store):
        data = bytearray(path.read_bytes())
        data[relay._INDEX_HEADER.size:] = bytes(len(data) - relay._INDEX_HEADER.size)  # zeroed
        path.write_bytes(bytes(data))
    index_files(store)[0].unlink()
    assert found_all(store, index, ledger, keys)
    assert held(index) >= 600 - relay.REQUEST_SHARDS * 8  # taken from the logs again


def test_a_sealed_bucket_goes_to_its_index_files_whole(tmp_path, small):
    store, index, config = relay.Store(tmp_path), relay.RequestIndex(), relay.Config()
    span = relay._bucket_span(config)
    ledger, keys = filled(store, 100, index)
    index.sync(store, ledger.request_log, NOW + span, config)
    ledger, placed = append(store, ledger, ["next-0"], NOW + span)
    index.sync(store, ledger.request_log, NOW + span, config)
    sealed = {b for b, _ in index.files if b != ledger.request_log.bucket}
    assert sealed and not any(b in sealed for b, _ in index.tables)
    assert sum(f.count for (b, _), f in index.files.items() if b in sealed) == 100
    assert found_all(store, index, ledger, keys, now=NOW + span)
    assert index.lookup(store, "next-0", NOW + span, config) == record(0)


def test_a_damaged_shard_writes_no_index_file_and_still_refuses_its_ids(tmp_path, small):
    store = relay.Store(tmp_path)
    ledger, keys = filled(store, 600, relay.RequestIndex())
    for path in index_files(store):
        path.unlink()
    shard = relay._request_shard(keys[0])
    log = store.state_dir / relay.REQUESTS_DIR / ledger.request_log.bucket / f"{shard:x}.log"
    data = log.read_bytes()
    log.write_bytes(data[:100] + b"#" + data[101:])
    index = relay.RequestIndex()
    index.sync(store, ledger.request_log, NOW, relay.Config())
    assert not any(s == shard for _, s in index.files)
    with pytest.raises(relay.rc.DataLoss):
        index.lookup(store, keys[0], NOW, relay.Config())


def test_an_index_file_of_a_log_written_again_is_not_trusted(tmp_path, small):
    """A ledger restored from an older backup cuts the logs back to its cursor,
    and new records take the old ones' places: an index file written before
    (which covers bytes that now hold other records) must not stand for them,
    or a committed request id would be taken for a new one."""
    store = relay.Store(tmp_path)
    older, _ = filled(store, 300)
    ledger, keys = filled(store, 600, relay.RequestIndex())  # idx files cover the 600
    written = {p: p.read_bytes() for p in index_files(store)}
    assert written
    ledger, placed = older, {}
    fresh = [f"n-{i}" for i in range(400)]  # the same size of records, in other places
    for at in range(0, 400, 50):
        ledger, placed = append(store, ledger, fresh[at:at + 50])
    for path, data in written.items():  # (the restore brought the old index files back)
        path.write_bytes(data)
    index = relay.RequestIndex()
    assert found_all(store, index, ledger, fresh)
    config = relay.Config()
    assert all(index.lookup(store, k, NOW, config) is None for k in keys[300:])


async def test_the_heartbeat_collects_garbage_then_trims_the_heap_every_interval(tmp_path, autojump_clock,
                                                                              monkeypatch):
    """A serving relay's heartbeat runs a full collection on the event loop,
    then ``malloc_trim(0)`` off it (through ``trio.to_thread``), every
    ``MEMORY_TIDY_SECONDS``."""
    import trio

    calls: list[tuple[float, str, bool]] = []
    in_thread = False

    def collect() -> int:
        calls.append((trio.current_time(), "collect", in_thread))
        return 0

    def trim(pad: int) -> int:
        calls.append((trio.current_time(), f"trim({pad})", in_thread))
        return 1

    async def inline(fn, *args, **kwargs):  # the clock stays the test's: no real thread
        nonlocal in_thread
        in_thread = True
        try:
            return fn(*args)
        finally:
            in_thread = False

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    store, config, hub = relay.Store(tmp_path), relay.Config(), relay.EventHub()
    owner = relay.LedgerOwner(store, config, hub)
    async with trio.open_nursery() as nursery:
        await nursery.start(owner.run)
        start = trio.current_time()
        await nursery.start(functools.partial(relay.run_heartbeat, owner, config, False,
                                              collect=collect, trim=trim))
        await trio.sleep(3.5 * relay.MEMORY_TIDY_SECONDS)
        nursery.cancel_scope.cancel()
    assert [(round(at - start, 6), what, off) for at, what, off in calls] == [
        (n * relay.MEMORY_TIDY_SECONDS, what, off) for n in (1, 2, 3)
        for what, off in (("collect", False), ("trim(0)", True))]


async def test_a_heartbeat_without_a_tidier_tidies_nothing(tmp_path, autojump_clock):
    import trio

    store, config, hub = relay.Store(tmp_path), relay.Config(), relay.EventHub()
    owner = relay.LedgerOwner(store, config, hub)
    async with trio.open_nursery() as nursery:
        await nursery.start(owner.run)
        heartbeat = await nursery.start(relay.run_heartbeat, owner, config, False)
        await trio.sleep(3 * relay.MEMORY_TIDY_SECONDS)
        assert len(heartbeat.child_tasks) == 1  # the watcher alone: the tidier returned
        nursery.cancel_scope.cancel()


def test_malloc_trim_is_glibcs():
    trim = relay._malloc_trim()
    if trim is None:
        pytest.skip("not glibc")
    assert trim(0) in (0, 1)


async def test_serve_hands_its_heartbeat_the_collector_and_malloc_trim(tmp_path, monkeypatch):
    import gc

    from serve_helpers import serving

    given = {}
    original = relay.run_heartbeat

    async def recording(owner, config, reaper=True, **kwargs):
        given.update(kwargs, reaper=reaper)
        await original(owner, config, reaper, **kwargs)

    monkeypatch.setattr(relay, "run_heartbeat", recording)
    async with serving(tmp_path):
        pass
    assert given["reaper"] and given["collect"] is gc.collect
    assert (given["trim"] is None) == (relay._malloc_trim() is None)
