"""The server's lease-commit path (issue 14): a journaling store keeps its
state directory, checkpoint, journal and memo descriptors open from one commit
to the next and trusts them only after checking them against their paths
under the lock, so writers in other processes (the CLI) and hands that remove
or replace files are still seen."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
from conftest import T0, commit_ok, mutation
from serve_helpers import open_fds

import relay

WRITE = "exclusive-write"


def _serving_store(root) -> relay.Store:
    """A checkpointed workspace with two sessions, and its journaling store
    after one journal commit (so its descriptors are held)."""
    cli = relay.Store(root)
    commit_ok(cli, "RegisterProfile", name="p", provider="codex", mode="pooled")
    for sid in ("s1", "s2"):
        commit_ok(cli, "CreateSession", profile="p", session_id=sid)
    store = relay.Store(root, journal=True)
    commit_ok(store, "AppendEvent", session_id="s1", kind="k", data=0)
    return store


def _grant(store, sid: str, now: float = T0) -> str:
    return commit_ok(store, "GrantLease", now=now, session_id=sid, holder="h", mode=WRITE,
                     ttl_seconds=600).lease.lease_id


def _opened(monkeypatch) -> list[str]:
    real, paths = relay.os.open, []

    def spy(path, flags, *args, **kwargs):
        paths.append(os.path.basename(os.fspath(path)))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(relay.os, "open", spy)
    return paths


def test_a_steady_lease_commit_opens_only_the_documented_lock_file(workspace, monkeypatch):
    """Between journal commits of one store nothing else wrote, so a lease commit opens
    neither the state directory, nor the checkpoint, the journal or the memo: only
    relay-state.lock (whose path is checked every time)."""
    store = _serving_store(workspace)
    _grant(store, "s2")  # the first lease commit pins the checkpoint
    opened = _opened(monkeypatch)
    lease = _grant(store, "s1")
    commit_ok(store, "ReleaseLease", lease_id=lease)
    monkeypatch.undo()
    assert opened == [relay.LOCK_NAME, relay.LOCK_NAME]
    fresh = relay.Store(workspace).read()
    assert fresh.leases[lease].state == "released" and fresh == store.read()
    assert relay._fast_status_doc(str(workspace), T0)["revision"] == fresh.revision


def test_a_cli_commit_between_two_server_commits_is_read_not_overwritten(workspace):
    """A CLI writer's checkpoint (a new inode, the journal cut) between two journal commits:
    the next one builds on it, and the journal it appends to counts on that checkpoint."""
    store = _serving_store(workspace)
    first = _grant(store, "s1")
    cli = relay.Store(workspace)
    commit_ok(cli, "CreateSession", profile="p", session_id="s3")
    assert store.journal_path.stat().st_size == 0  # the CLI's checkpoint cut the journal
    second = _grant(store, "s3")
    fresh = relay.Store(workspace).read()
    assert set(fresh.leases) == {first, second} and "s3" in fresh.sessions
    assert fresh == store.read() and store.journal_path.stat().st_size > 0
    assert relay._fast_status_doc(str(workspace), T0)["revision"] == fresh.revision


@pytest.mark.parametrize("vandalise", ["journal-removed", "checkpoint-replaced"])
def test_files_replaced_by_hand_between_commits_are_seen(workspace, vandalise):
    """A journal removed, or the checkpoint replaced by a copy, between two commits: the held
    descriptors no longer name what the paths do, so the commit reads the paths again."""
    store = _serving_store(workspace)
    _grant(store, "s1")
    if vandalise == "journal-removed":
        os.unlink(store.journal_path)  # its records are gone: the checkpoint alone is the truth
        expected = relay.Store(workspace).read()
    else:
        copy = store.ledger_path.with_name("copy")
        shutil.copyfile(store.ledger_path, copy)
        os.replace(copy, store.ledger_path)  # same bytes, another inode; the journal still counts
        expected = store.read()
    lease = _grant(store, "s2")
    fresh = relay.Store(workspace).read()
    assert fresh.revision == expected.revision + 1 and set(fresh.leases) == set(expected.leases) | {lease}
    assert fresh == store.read()


@pytest.mark.parametrize("vandalise", ["memo-removed", "tmp-removed", "memo-replaced"])
def test_a_memo_removed_or_replaced_is_written_again(workspace, vandalise):
    """The fast status path keeps answering after the memo (or all of flow/tmp) is removed
    or replaced: the next commit writes it at its path, not into the unlinked file."""
    store = _serving_store(workspace)
    _grant(store, "s1")
    memo = store.tmp_dir / relay.MEMO_NAME
    if vandalise == "memo-removed":
        memo.unlink()
    elif vandalise == "tmp-removed":
        shutil.rmtree(store.tmp_dir)
    else:
        other = memo.with_name("other")
        other.write_bytes(b"x" * 200)
        os.replace(other, memo)
    _grant(store, "s2")
    assert relay._fast_status_doc(str(workspace), T0)["revision"] == store.read().revision


def test_a_failed_journal_sync_closes_the_held_descriptor(workspace, monkeypatch):
    """After a failed fdatasync the journal's descriptor is never used again (its pages may
    be gone): the next commit opens the journal afresh, and nothing of the failed try counts."""
    store = _serving_store(workspace)
    _grant(store, "s1")
    held = store._handles.journal
    real = os.fdatasync

    def fdatasync(fd):
        if fd == held:
            raise OSError(5, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    before = store.journal_path.read_bytes()
    with pytest.raises(relay.Unavailable):
        _grant(store, "s2")
    monkeypatch.undo()
    assert store._handles.journal is None and store.journal_path.read_bytes() == before
    opened = _opened(monkeypatch)
    lease = _grant(store, "s2")
    monkeypatch.undo()
    assert relay.JOURNAL_NAME in opened
    assert lease in relay.Store(workspace).read().leases


def test_two_threads_on_one_journaling_store_still_exclude_each_other(workspace):
    """The kept state-directory descriptor is one open file for the whole process, and a flock
    does not exclude its own holder: threads of the process take turns at the store's mutex,
    so no commit of one is lost under another's."""
    store = _serving_store(workspace)
    inside, overlaps = [0], []
    real = relay.Store.sweep_orphan_temps  # called under the lock

    def watched(self):
        inside[0] += 1
        overlaps.append(inside[0])
        try:
            return real(self)
        finally:
            inside[0] -= 1

    def appender(sid: str) -> None:
        for i in range(30):
            relay.commit(store, [mutation("AppendEvent", session_id=sid, kind="k", data=i)],
                         relay.Config(), T0)

    relay.Store.sweep_orphan_temps = watched
    try:
        threads = [threading.Thread(target=appender, args=(sid,)) for sid in ("s1", "s2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        relay.Store.sweep_orphan_temps = real
    assert max(overlaps) == 1
    fresh = relay.Store(workspace).read()
    assert fresh.cursors["s1"].events == 31 and fresh.cursors["s2"].events == 30


class _WatchedMutex:
    """A lock that says when a thread started waiting for it."""

    def __init__(self) -> None:
        self.real, self.waiting = threading.Lock(), threading.Event()

    def acquire(self) -> bool:
        if self.real.locked():
            self.waiting.set()
        return self.real.acquire()

    def release(self) -> None:
        self.real.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def test_a_second_thread_waits_even_when_the_lock_file_is_removed_while_held(workspace):
    """Once relay-state.lock is unlinked while one thread holds the lock, only the state
    directory's flock excludes; its kept descriptor is shared by the process's threads (a flock
    does not exclude its own holder), so the store's mutex must make the second one wait."""
    store = _serving_store(workspace)
    store._handles.mutex = mutex = _WatchedMutex()
    inside: list[bool] = []
    released = threading.Event()

    def second() -> None:
        with store.locked():
            inside.append(released.is_set())

    other = threading.Thread(target=second)
    with store.locked():
        os.unlink(store.lock_path)
        other.start()
        deadline = time.monotonic() + 10
        while not inside and not mutex.waiting.is_set():  # until it waits (or gets in)
            assert time.monotonic() < deadline, "the second locker neither waited nor entered"
        assert inside == [], "two holders of the mutation lock at once"
        released.set()
    other.join()
    assert inside == [True]


def test_close_handles_closes_every_kept_descriptor(workspace):
    before = open_fds()
    store = _serving_store(workspace)
    _grant(store, "s1")
    assert open_fds() - before  # held between commits
    store.close_handles()
    assert open_fds() - before == set()
    _grant(store, "s2")  # a later commit opens them again
    store.close_handles()
    assert open_fds() - before == set()


# -- /ws: plain mutations go to the owner without a task; replies share socket writes ----


async def test_a_burst_of_lease_mutations_is_answered_without_a_task_each(workspace, monkeypatch):
    """GrantLease frames pipelined on one socket are queued for the ledger owner as they are
    read (no ``_ws_rpc`` task each; a read still gets one), each answered once by its id,
    refusals included; the replies of one group commit leave in one socket write."""
    import trio
    from serve_helpers import PATIENCE, serving, ws_recv, ws_send

    tasks: list[str] = []
    real_rpc = relay.Service._ws_rpc

    async def counted(self, msg, out):
        tasks.append(msg.get("method"))
        await real_rpc(self, msg, out)

    monkeypatch.setattr(relay.Service, "_ws_rpc", counted)
    writes: list[int] = []
    real_sender = relay._ws_text_sender

    def sender(send):
        texts = real_sender(send)

        async def send_texts(batch):
            writes.append(len(batch))
            await texts(batch)
        return send_texts if texts is not None else None

    monkeypatch.setattr(relay, "_ws_text_sender", sender)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            sids = await r.seed(sessions=20)
            owner = r.server.service.owner
            async with r.ws() as ws:
                async with owner._lock:  # commits wait: the burst queues up behind the first
                    for i, sid in enumerate(sids):
                        await ws_send(ws, type="rpc", id=i, method="GrantLease",
                                      request={"session_id": sid, "holder": "h", "mode": WRITE})
                    await ws_send(ws, type="rpc", id="ghost", method="GrantLease",
                                  request={"session_id": "ghost", "holder": "h", "mode": WRITE})
                    await ws_send(ws, type="rpc", id="bad", method="GrantLease",
                                  request={"session_id": "s1", "holder": "h", "mode": "sideways"})
                    # Refused as it is read: every frame before it was read and queued.
                    bad = await ws_recv(ws)
                frames = [await ws_recv(ws) for _ in range(len(sids) + 1)]
                await ws_send(ws, type="rpc", id="status", method="GetStatus", request={})
                status = await ws_recv(ws)
    assert bad["id"] == "bad" and bad["error"]["code"] == "invalid_argument"
    by_id = {f["id"]: f for f in frames}
    assert len(by_id) == len(sids) + 1
    assert {by_id[i]["reply"]["lease"]["session_id"] for i in range(len(sids))} == set(sids)
    assert by_id["ghost"]["error"]["code"] == "not_found"
    assert status["type"] == "reply" and tasks == ["GetStatus"]
    assert max(writes) >= len(sids) // 2  # one group commit's replies, one write


def test_a_big_group_commit_on_a_small_ledger_is_a_journal_record(workspace):
    """A group commit of 40 lease grants (a ~27 KiB record) on a ledger of a few KB appends to
    the journal instead of writing the whole checkpoint: the budget is 256 KiB, not half the
    checkpoint."""
    cli = relay.Store(workspace)
    commit_ok(cli, "RegisterProfile", name="p", provider="codex", mode="pooled")
    sids = [f"s{i:02d}" for i in range(40)]
    relay.commit(cli, [mutation("CreateSession", profile="p", session_id=sid) for sid in sids],
                 relay.Config(), T0)
    store = relay.Store(workspace, journal=True)
    before = relay.decode_ledger(store.ledger_path.read_bytes()).revision
    results, ledger = relay.commit(store, [mutation("GrantLease", session_id=sid, holder="h" * 120,
                                                    mode=WRITE) for sid in sids], relay.Config(), T0)
    assert all(r.outcome == "granted" for r in results)
    assert store.journal_path.stat().st_size > 16 * 1024 > store.ledger_path.stat().st_size // 2
    assert relay.decode_ledger(store.ledger_path.read_bytes()).revision == before  # no checkpoint
    assert relay.Store(workspace).read() == ledger
