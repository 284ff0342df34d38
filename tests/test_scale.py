"""Cost at scale (issue 14): the derived lookup indexes answer exactly as a scan
of the whole ledger would, live leases never trigger compaction, and the
validated memo is the digest of the ledger just written."""

from __future__ import annotations

import hashlib
import random

import pytest
from conftest import T0, commit_ok, mutation

import relay
import relay_client as rc

CONFIG = relay.Config()



def two_profiles() -> relay.Ledger:
    """A fresh ledger with pooled profiles p and q (revision 1)."""
    ledger = relay.Ledger()
    for name in "pq":
        ledger, _ = relay.register_profile(ledger, rc.RegisterProfileRequest(
            name=name, provider="codex", mode="pooled"), relay.Ctx(T0, 1, CONFIG))
    return ledger

def scanned_free(ledger: relay.Ledger, profile: str, stamp: str) -> str | None:
    """What Borrow picked before the index: the smallest free session id, by a full scan."""
    free = [s.session_id for s in ledger.sessions.values()
            if s.profile == profile and s.state == "ready"
            and not scanned_live(ledger, s.session_id, stamp)
            and not relay._quarantined(ledger, s.session_id)]
    return min(free) if free else None


def scanned_live(ledger: relay.Ledger, session_id: str, stamp: str) -> list[rc.Lease]:
    return [x for x in ledger.leases.values() if x.session_id == session_id and relay.is_live(x, stamp)]


def random_step(rng: random.Random, ledger: relay.Ledger, now: float, revision: int):
    """One random operation (refusals leave the ledger as it was); returns (ledger, now)."""
    sids, lids = list(ledger.sessions), list(ledger.leases)
    ttl = rng.randrange(1, 50)
    choices = [
        (relay.create_session, lambda: rc.CreateSessionRequest(
            profile=rng.choice("pq"), session_id=f"s{rng.randrange(30)}")),
        (relay.borrow, lambda: rc.BorrowRequest(
            holder=f"h{rng.randrange(3)}", profile=rng.choice("pq"), ttl_seconds=ttl)),
    ]
    if sids:
        choices += [
            (relay.grant_lease, lambda: rc.GrantLeaseRequest(
                session_id=rng.choice(sids), holder=f"h{rng.randrange(3)}",
                mode=rng.choice(rc.LEASE_ACCESS), ttl_seconds=ttl)),
            (relay.quarantine_session, lambda: rc.QuarantineSessionRequest(
                session_id=rng.choice(sids), reason="x")),
            (relay.clear_quarantine, lambda: rc.ClearQuarantineRequest(session_id=rng.choice(sids))),
        ]
    if lids:
        choices += [
            (relay.release_lease, lambda: rc.ReleaseLeaseRequest(lease_id=rng.choice(lids))),
            (relay.renew_lease, lambda: rc.RenewLeaseRequest(lease_id=rng.choice(lids), ttl_seconds=ttl)),
        ]
    ctx = relay.Ctx(now, revision, CONFIG)
    roll = rng.random()
    if roll < 0.1:
        return relay.expire_leases(ledger, ctx)[0], now
    if roll < 0.15:
        return relay.decode_ledger(relay.encode_ledger(ledger)), now  # a map built without _put
    if roll < 0.3:
        return ledger, now + rng.randrange(0, 30)
    op, request = rng.choice(choices)
    try:
        return op(ledger, request(), ctx)[0], now
    except rc.RelayError:
        return ledger, now


@pytest.mark.parametrize("seed", range(6))
def test_indexed_lookups_answer_as_a_full_scan(seed):
    """Borrow's pick, each session's live leases and the live-lease count from the
    derived indexes equal a scan of every lease, over random histories."""
    rng = random.Random(seed)
    for _ in range(25):
        ledger, now = two_profiles(), T0
        for revision in range(2, 80):
            ledger, now = random_step(rng, ledger, now, revision)
            stamp = relay.iso(now)
            for profile in "pq":
                assert relay._first_free(ledger, profile, stamp) == scanned_free(ledger, profile, stamp)
            for sid in ledger.sessions:
                assert relay.live_leases(ledger, sid, stamp) == scanned_live(ledger, sid, stamp)
            assert relay._lease_index(ledger).live == sum(
                x.state in rc.LIVE_LEASE_STATES for x in ledger.leases.values())


def test_live_leases_never_trigger_compaction(tmp_path, monkeypatch):
    """More live leases than twice the terminal-lease cap do not make every
    commit compact; terminal leases over the cap still do."""
    config = relay.Config(max_terminal_leases=2)
    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled", config=config)
    for i in range(6):
        commit_ok(store, "CreateSession", profile="p", session_id=f"s{i}", config=config)
        commit_ok(store, "GrantLease", session_id=f"s{i}", holder="h", mode="exclusive-write",
                  ttl_seconds=3600, config=config)
    runs = []
    monkeypatch.setattr(relay, "compact", lambda ledger, ctx: runs.append(1) or (ledger, {}))
    commit_ok(store, "AppendEvent", session_id="s0", kind="k", config=config)  # inside the interval
    assert runs == []
    for lease in [x for x in store.read().leases.values()][:5]:
        commit_ok(store, "ReleaseLease", lease_id=lease.lease_id, config=config)
    assert runs, "5 terminal leases over a cap of 2 (twice: 4) compact at once"


def test_validated_memo_is_the_written_digest(tmp_path):
    """After a commit the memo holds the ledger's checksum digest and its tally,
    even over an older, longer memo (it is overwritten in place, then cut)."""
    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled")
    memo = store.tmp_dir / relay.MEMO_NAME
    memo.write_bytes(b"x" * 200)
    relay.commit(store, [mutation("CreateSession", profile="p", session_id="s1")], CONFIG, T0)
    data = store.ledger_path.read_bytes()
    checksum, end, tally = relay.read_memo(memo.read_bytes())
    assert (checksum, end) == (relay.split_checksum(data)[1], 0)
    assert tally["sessions"] == 1 and tally["revision"] == store.read().revision
    assert relay._fast_status_doc(str(tmp_path), T0) is not None  # the fast path vouches for it


def test_index_follows_put_without_rebuilding(monkeypatch):
    """A map derived by ``_put`` gets its index from the original's, never by a rebuild."""
    ledger, _ = relay.register_profile(relay.Ledger(), rc.RegisterProfileRequest(
        name="p", provider="codex", mode="pooled"), relay.Ctx(T0, 1, CONFIG))
    ledger, _ = relay.create_session(ledger, rc.CreateSessionRequest(profile="p", session_id="s1"),
                                     relay.Ctx(T0, 2, CONFIG))
    relay._lease_index(ledger), relay._free_index(ledger)  # built once
    builds = []
    for kind in (relay._LeaseIndex, relay._FreeIndex):
        monkeypatch.setattr(kind, "build", classmethod(lambda cls, m: builds.append(cls) or None))
    ledger, reply = relay.borrow(ledger, rc.BorrowRequest(holder="h", profile="p"),
                                 relay.Ctx(T0, 3, CONFIG))
    assert reply.lease.session_id == "s1"
    assert relay._first_free(ledger, "p", relay.iso(T0)) is None
    assert builds == []


@pytest.mark.parametrize("seed", range(3))
def test_incremental_encoding_is_the_canonical_json(seed):
    """Maps encoded from entries carried over by ``_put`` give exactly the bytes
    of encoding the whole ledger afresh, checksum included, over random histories."""
    rng = random.Random(100 + seed)
    ledger, now = two_profiles(), T0
    for revision in range(2, 300):
        ledger, now = random_step(rng, ledger, now, revision)
        if revision % 7 == 0:
            body = relay._canonical(rc.to_json(ledger))
            digest = hashlib.sha256(body).hexdigest().encode()
            assert relay.encode_ledger(ledger) == body[:-1] + b',"checksum":"sha256:' + digest + b'"}\n'


async def test_sse_replay_is_one_write_per_chunk():
    """A replayed chunk of frames leaves the SSE body as one piece (one socket
    write), holding every frame in order, not one piece per frame."""
    import trio

    class Gauge:
        def labels(self, *_):
            return self

        def inc(self):
            pass

        dec = inc

    unsubscribed = []
    service = type("S", (), {})()
    service.metrics = type("M", (), {"subscribers": Gauge()})()
    service.config = relay.Config()
    service.hub = type("H", (), {"unsubscribe": lambda self, sub: unsubscribed.append(sub)})()
    send, receive = trio.open_memory_channel(1)
    sub = relay.Subscriber("events:s1", send, receive)
    frames = [relay.Frame.make(f"s1:{i}", "event", {"seq": i}, i) for i in range(1, 4)]
    await send.aclose()  # no live frames: the body ends after the replay
    pieces = [piece async for piece in relay._sse_body(service, sub, frames, {})]
    assert pieces[1:] == [b"".join(f.sse for f in frames)]
    assert unsubscribed == [sub]


def test_split_checksum_of_a_big_ledger():
    """Above the size where the OpenSSL hash is used, the checksum still verifies
    and still catches a flipped byte."""
    body = b'{"a":"' + b"x" * (2 * relay._BIG_LEDGER_BYTES) + b'"}'
    data = body[:-1] + b',"checksum":"sha256:' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'
    assert relay.split_checksum(data) == (body, hashlib.sha256(body).hexdigest().encode())
    assert relay.split_checksum(data.replace(b"xxx", b"xyx", 1)) is None


def test_canonical_encoder_is_json_dumps():
    """The encoder made once writes what ``json.dumps`` with the canonical options
    writes, and still refuses NaN."""
    import json

    for value in ({"b": [1, 2.5, None, True], "a": "ü\u2028\"\\", "c": {"z": {}, "y": []}},
                  [1e300, -0.0, 12345678901234567890], "x", 3):
        assert relay._canonical(value) == json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    with pytest.raises(ValueError):
        relay._canonical({"x": float("nan")})


def test_the_fragment_cache_forgets_records_no_ledger_holds(tmp_path):
    """The encoder's cache of records' canonical bytes lives as long as the records:
    once commits have replaced a record (a released lease, a renewed one) and no
    ledger holds it, its bytes are gone, so a long-running server does not keep the
    bytes of everything it ever committed; what the current ledger holds stays cached."""
    import gc

    store = relay.Store(tmp_path)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    for i in range(60):
        lease = commit_ok(store, "Borrow", now=T0 + i, profile="cx", holder=f"fragment-h{i}").lease
        commit_ok(store, "ReleaseLease", now=T0 + i, lease_id=lease.lease_id)
    ledger = store.read()
    relay._encode_body(ledger)
    gc.collect()
    assert all(ref() is not None for ref, _ in relay._FRAGMENTS.values())  # none outlives its record
    records = [r for m in (ledger.profiles, ledger.sessions, ledger.leases) for r in m.values()]
    assert all(relay._FRAGMENTS[id(r)][0]() is r for r in records)  # the live ones stay cached
    del ledger, records, lease
    store = None
    gc.collect()
    ours = [ref() for ref, _ in list(relay._FRAGMENTS.values())
            if isinstance(ref(), rc.Lease) and ref().holder.startswith("fragment-h")]
    assert ours == []  # 120 versions of this test's leases were cached; none is kept
