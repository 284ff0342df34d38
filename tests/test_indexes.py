"""Borrow and lookups by index (issue 14): the persistent ledger maps act as
dicts and share their entries between versions, the sorted free-session sets
answer as sets do, and Borrow's pick from the free-session index equals a scan
of the whole ledger after long seeded histories (many sessions, so the maps'
overlays flatten), from old versions as well as new ones, and after a commit
that failed."""

from __future__ import annotations

import random

import attrs
import pytest
from conftest import T0, commit_ok, mutation
from test_scale import scanned_free, scanned_live

import relay
import relay_client as rc

CONFIG = relay.Config()


@pytest.mark.parametrize("seed", range(4))
def test_persistent_map_acts_as_the_dict_edited_the_same_way(seed):
    """Every version of a ``_Map`` equals a dict given the same puts and
    deletions, in the same order, and older versions never change."""
    rng = random.Random(seed)
    start = {f"k{i:03d}": i for i in range(rng.choice((0, 5, 300)))}
    versions: list[tuple[object, dict]] = [(start, dict(start))]
    for step in range(1500):
        mapping, expected = rng.choice(versions[-3:] if rng.random() < 0.9 else versions)
        changes = {}
        for _ in range(rng.choice((1, 1, 1, 2, 40))):
            key = f"k{rng.randrange(400):03d}"
            changes[key] = relay._ABSENT if rng.random() < 0.2 else step
        new, want = relay._Map.of(mapping, changes), dict(expected)
        for key, value in changes.items():
            if value is relay._ABSENT:
                want.pop(key, None)
            else:
                want[key] = value
        assert len(new) == len(want)
        probe = f"k{rng.randrange(400):03d}"
        assert (probe in new, new.get(probe, "-")) == (probe in want, want.get(probe, "-"))
        assert new == want and want == new
        if rng.random() < 0.3:
            assert list(new.items()) == list(want.items())  # a dict's order, too
        versions.append((new, want))
    for mapping, expected in versions:
        assert dict(mapping.items()) == expected and list(mapping) == list(expected)


@pytest.mark.parametrize("seed", range(4))
def test_changed_keys_name_every_key_two_versions_differ_in(seed):
    """For any two versions of a map (one line of puts, branches, versions
    across a flatten), ``_changed_keys`` names every key whose record differs
    (or says it cannot tell: across more than one flatten), which is
    what the free-session index relies on to follow a ledger."""
    rng = random.Random(seed)
    versions = [relay._Map({f"k{i:03d}": object() for i in range(rng.choice((0, 50, 2000)))})]
    for _ in range(600):
        source = versions[-1] if rng.random() < 0.8 else rng.choice(versions[-40:])
        key = f"k{rng.randrange(2500):03d}"
        if rng.random() < 0.1:
            versions.append(relay._Map.of(source, {key: relay._ABSENT}))
        else:
            versions.append(relay._put(source, key, object()))
    told = 0
    for _ in range(2000):
        a, b = rng.choice(versions), rng.choice(versions)
        keys = relay._changed_keys(relay._view(a), b)
        differ = {k for k in set(a) | set(b) if a.get(k) is not b.get(k)}
        if keys is not None:
            told += 1
            assert keys == differ
    assert told > 500


def test_put_shares_the_entries_of_a_big_map():
    """A put on a map of 10,000 entries copies none of them: the new version
    keeps the original's dict as its base and holds only its change."""
    big = {f"s{i:05d}": i for i in range(10_000)}
    one = relay._put(big, "s00007", -1)
    two = relay._put(one, "new", 1)
    assert one.base is big and two.base is big
    assert dict(two.changes) == {"s00007": -1, "new": 1}
    assert (big["s00007"], one["s00007"], len(one), len(two)) == (7, -1, 10_000, 10_001)


@pytest.mark.parametrize("seed", range(3))
def test_sorted_ids_first_is_the_smallest_member(seed):
    rng = random.Random(seed)
    ids, members = relay._SortedIds(sorted(f"s{i:03d}" for i in range(0, 200, 3))), set()
    members = {f"s{i:03d}" for i in range(0, 200, 3)}
    for _ in range(3000):
        sid, present = f"s{rng.randrange(200):03d}", rng.random() < 0.5
        ids = ids.with_id(sid, present)
        members = members | {sid} if present else members - {sid}
        assert ids.first() == min(members, default=None)
        assert list(ids) == sorted(members)


def pool(n: int) -> relay.Ledger:
    """Profiles p and q with ``n`` sessions each (ids interleaved)."""
    ledger = relay.Ledger()
    for name in "pq":
        ledger, _ = relay.register_profile(ledger, rc.RegisterProfileRequest(
            name=name, provider="codex", mode="pooled"), relay.Ctx(T0, 1, CONFIG))
    for i in range(2 * n):
        ledger, _ = relay.create_session(ledger, rc.CreateSessionRequest(
            profile="pq"[i % 2], session_id=f"s{i:04d}"), relay.Ctx(T0, 2 + i, CONFIG))
    return ledger


def step(rng: random.Random, ledger: relay.Ledger, now: float, revision: int):
    """One random operation over a big pool (a refusal leaves the ledger as it was)."""
    ctx = relay.Ctx(now, revision, CONFIG)
    sid = rng.choice(list(ledger.sessions))
    live = [x for x in ledger.leases.values() if x.state in rc.LIVE_LEASE_STATES]
    roll = rng.random()
    try:
        if roll < 0.35:
            return relay.borrow(ledger, rc.BorrowRequest(
                holder=f"h{rng.randrange(4)}", profile=rng.choice("pq"),
                ttl_seconds=rng.randrange(5, 200)), ctx)[0]
        if roll < 0.55 and live:
            return relay.release_lease(ledger, rc.ReleaseLeaseRequest(
                lease_id=rng.choice(live).lease_id), ctx)[0]
        if roll < 0.6 and live:
            return relay.revoke_lease(ledger, rc.RevokeLeaseRequest(
                lease_id=rng.choice(live).lease_id, reason="test"), ctx)[0]
        if roll < 0.65:
            request = rc.QuarantineSessionRequest(session_id=sid, reason="x")
            return relay.quarantine_session(ledger, request, ctx)[0]
        if roll < 0.72:
            return relay.clear_quarantine(ledger, rc.ClearQuarantineRequest(session_id=sid), ctx)[0]
        if roll < 0.75:
            return relay.end_session(ledger, rc.CloseSessionRequest(session_id=sid, force=True), ctx)[0]
        if roll < 0.8:
            return relay.create_session(ledger, rc.CreateSessionRequest(
                profile=rng.choice("pq"), session_id=f"n{revision}"), ctx)[0]
        if roll < 0.84:
            return relay.expire_leases(ledger, ctx)[0]
        if roll < 0.85:
            return relay.decode_ledger(relay.encode_ledger(ledger))  # maps built without _put
        return relay.grant_lease(ledger, rc.GrantLeaseRequest(
            session_id=sid, holder=f"h{rng.randrange(4)}", mode=rng.choice(rc.LEASE_ACCESS),
            ttl_seconds=rng.randrange(5, 200)), ctx)[0]
    except rc.RelayError:
        return ledger


@pytest.mark.parametrize("seed", range(3))
def test_borrow_picks_the_smallest_free_session_over_long_histories(seed):
    """After arbitrary grants, releases, revocations, expiries (marked or only
    run out), quarantines, closes and creations over 2 x 60 sessions, Borrow's
    pick equals a scan of every session and lease, in the newest ledger and
    in older ones asked again later (the index moves back and forth)."""
    rng = random.Random(seed)
    ledger, now = pool(60), T0
    history = [ledger]
    for revision in range(200, 900):
        if rng.random() < 0.1:  # a branch: an older ledger is where the next step starts
            ledger = rng.choice(history[-20:])
        ledger = step(rng, ledger, now, revision)
        history.append(ledger)
        now += rng.choice((0, 0, 1, 7))
        stamp = relay.iso(now)
        for probe in (ledger, rng.choice(history)):
            for profile in "pq":
                assert relay._first_free(probe, profile, stamp) == scanned_free(probe, profile, stamp)
        if revision % 50 == 0:
            for sid in ledger.sessions:
                assert relay.live_leases(ledger, sid, stamp) == scanned_live(ledger, sid, stamp)


def test_borrows_in_a_row_do_not_rebuild_the_free_index(monkeypatch):
    """Each Borrow brings the free-session index forward from the last one
    (through the keys the commit changed), never by a rebuild."""
    ledger = pool(100)
    relay._first_free(ledger, "p", relay.iso(T0))
    builds = []
    real = relay._FreeIndex.build
    monkeypatch.setattr(relay._FreeIndex, "build", classmethod(lambda cls, x: builds.append(1) or real(x)))
    for revision in range(1000, 1100):
        ctx = relay.Ctx(T0, revision, CONFIG)
        ledger, reply = relay.borrow(ledger, rc.BorrowRequest(holder="h", profile="p"), ctx)
        assert reply.lease.session_id == f"s{2 * (revision - 1000):04d}"
        if revision % 3 == 0:
            release = rc.ReleaseLeaseRequest(lease_id=reply.lease.lease_id)
            ledger, _ = relay.release_lease(ledger, release, ctx)
            ledger, again = relay.borrow(ledger, rc.BorrowRequest(holder="h", profile="p"), ctx)
            assert again.lease.session_id == reply.lease.session_id
    assert builds == []


def test_a_failed_commit_leaves_no_trace_in_borrow(tmp_path, monkeypatch):
    """A Borrow whose write failed granted nothing: the next Borrow, in the
    same process (whose indexes saw the failed ledger), takes that session."""
    store = relay.Store(tmp_path, journal=True)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled")
    for sid in ("a", "b", "c"):
        commit_ok(store, "CreateSession", profile="p", session_id=sid)
    assert commit_ok(store, "Borrow", holder="h", profile="p").lease.session_id == "a"

    def broken(*_args, **_kwargs):
        raise relay._io_failure("write the journal", OSError(5, "Input/output error"))

    real = store.commit_write
    monkeypatch.setattr(store, "commit_write", broken)
    with pytest.raises(rc.RelayError):
        relay.commit(store, [mutation("Borrow", holder="h2", profile="p")], CONFIG, T0)
    monkeypatch.setattr(store, "commit_write", real)
    assert commit_ok(store, "Borrow", holder="h3", profile="p").lease.session_id == "b"
    ledger = store.read()
    assert sorted(x.holder for x in ledger.leases.values()) == ["h", "h3"]
    stamp = relay.iso(T0 + 1e6)
    assert relay._first_free(attrs.evolve(ledger), "p", relay.iso(0)) == "c"
    assert relay._first_free(ledger, "p", stamp) == scanned_free(ledger, "p", stamp) == "a"
