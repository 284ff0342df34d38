"""The lease commit path behind ``/ws``: what the event loop does per commit
must not grow with the leases the ledger keeps (issue 14)."""

from __future__ import annotations

import attrs
from conftest import T0, commit_ok

import relay


class _NoScan(dict):
    """A lease map that fails the test if anything walks all of it."""

    def values(self):  # pragma: no cover - called only when the fast path is gone
        raise AssertionError("every lease was scanned")

    def items(self):  # pragma: no cover
        raise AssertionError("every lease was scanned")

    def __iter__(self):  # pragma: no cover
        raise AssertionError("every lease was scanned")


def _seeded(workspace, sessions: int = 2) -> relay.Store:
    store = relay.Store(workspace)
    commit_ok(store, "RegisterProfile", name="pool", provider="codex", mode="pooled")
    for i in range(sessions):
        commit_ok(store, "CreateSession", profile="pool", session_id=f"s{i}")
    return store


def _grant(store, session: str, ttl: int = 3600, now: float = T0) -> str:
    return commit_ok(store, "GrantLease", now=now, session_id=session, holder="h",
                     mode="exclusive-write", ttl_seconds=ttl).lease.lease_id


def test_expired_since_reports_what_expiry_ended(workspace):
    """Leases live before and expired after are reported, in ledger order;
    released and still-live ones are not."""
    store = _seeded(workspace, sessions=3)
    short, other = _grant(store, "s0", ttl=5), _grant(store, "s1", ttl=6)
    done = _grant(store, "s2", ttl=5)
    commit_ok(store, "ReleaseLease", lease_id=done)
    kept = _grant(store, "s2", ttl=3600)
    old = store.read()
    new, gone = relay.expire_leases(old, relay.Ctx(T0 + 10, old.revision))
    assert {x.lease_id for x in gone} == {short, other}
    assert [x.lease_id for x in relay._expired_since(old, new)] == [short, other]
    assert new.leases[kept].state == "active"
    assert relay._expired_since(new, new) == []  # already expired: not again


def test_commit_announcement_does_not_scan_every_lease(workspace):
    """After a commit that expired nothing, finding the leases it expired
    looks only at the leases that were live (not the released ones kept
    until compaction)."""
    store = _seeded(workspace)
    for _ in range(20):
        commit_ok(store, "ReleaseLease", lease_id=_grant(store, "s0"))
    old = store.read()
    live = _grant(store, "s1")
    new = store.read()
    assert len(new.leases) == 21
    guarded = attrs.evolve(new, leases=_NoScan(relay._as_dict(new.leases)))
    assert relay._expired_since(old, guarded) == []
    assert guarded.leases[live].state == "active"


def test_long_lived_store_sweeps_an_orphan_left_between_its_commits(workspace):
    """A writer killed mid-write between two commits of the server's store
    leaves a temp file; the next commit still deletes it."""
    store = _seeded(workspace)
    _grant(store, "s0")
    orphan = store.state_dir / f"{relay.TEMP_PREFIX}999999.deadbeef"
    orphan.write_bytes(b"half a ledger")
    _grant(store, "s1")
    assert not orphan.exists()


def test_commit_skips_the_listing_when_the_state_directory_is_unchanged(workspace, monkeypatch):
    """Journal commits leave the state directory as it was: no listing of it."""
    monkeypatch.setattr(relay, "SWEEP_SETTLED_NS", 0)  # as if every change were long ago
    store = _seeded(workspace, sessions=4)
    store.journal = True
    for session in ("s0", "s1"):  # the journal exists from here on, and a sweep saw it
        _grant(store, session, now=relay.time.time())
    listed = []
    real = relay.os.scandir
    monkeypatch.setattr(relay.os, "scandir", lambda path: listed.append(path) or real(path))
    _grant(store, "s2", now=relay.time.time())
    assert store.state_dir not in listed
    orphan = store.state_dir / f"{relay.TEMP_PREFIX}999999.deadbeef"
    orphan.write_bytes(b"half a ledger")  # a writer killed mid-write: the directory changed
    _grant(store, "s3", now=relay.time.time())
    assert listed == [store.state_dir] and not orphan.exists()


def test_a_directory_changed_within_a_timestamp_tick_is_listed_again(workspace, monkeypatch):
    """A sweep right after the directory changed is not trusted: a temp file
    made within the same timestamp tick would leave mtime and ctime as
    they were, so the next commit lists the directory again."""
    monkeypatch.setattr(relay, "SWEEP_SETTLED_NS", 10**18)  # every change counts as recent
    store = _seeded(workspace, sessions=3)
    store.journal = True
    for session in ("s0", "s1"):
        _grant(store, session, now=relay.time.time())
    listed = []
    real = relay.os.scandir
    monkeypatch.setattr(relay.os, "scandir", lambda path: listed.append(path) or real(path))
    _grant(store, "s2", now=relay.time.time())
    assert listed == [store.state_dir]
