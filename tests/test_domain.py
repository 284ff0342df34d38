"""The pure domain operations and the commit that makes them durable.

Time is the ``now`` float handed to ``apply_all``/``commit``/``Ctx``: tests move
it by adding seconds to ``T0``; nothing sleeps.
"""

from __future__ import annotations

import hmac
import json
import os
import random
import shlex

import attrs
import pytest
from conftest import T0, commit_ok, mutation, snapshot

import relay
import relay_client as rc
from relay_client import Code, RelayError

CFG = relay.Config()
READ, WRITE = "shared-read", "exclusive-write"


# -- helpers --------------------------------------------------------------------


def run(ledger, name, /, now=T0, config=CFG, **fields):
    """(new ledger, reply or error) of one RPC applied purely at ``now``."""
    new, (result,), _ = relay.apply_all(ledger, [mutation(name, **fields)], now, config)
    return new, result


def ok(ledger, name, /, now=T0, config=CFG, **fields):
    new, result = run(ledger, name, now, config, **fields)
    assert not isinstance(result, RelayError), result
    return new, result


def refused(ledger, name, code, /, now=T0, config=CFG, **fields):
    """Apply and expect a refusal with ``code`` that leaves the ledger as it was."""
    new, result = run(ledger, name, now, config, **fields)
    assert isinstance(result, RelayError), result
    assert result.code == code, (result.code, result.message)
    assert result.message and result.hint
    assert new is ledger
    return result


def grant(ledger, holder, mode, session="s1", now=T0, ttl=0):
    return ok(ledger, "GrantLease", now, session_id=session, holder=holder, mode=mode,
              ttl_seconds=ttl)


def with_session(ledger, sid, profile="cx"):
    return ok(ledger, "CreateSession", profile=profile, session_id=sid)[0]


def set_session_state(ledger, sid, state):
    session = attrs.evolve(ledger.sessions[sid], state=state)
    return attrs.evolve(ledger, sessions={**ledger.sessions, sid: session})


@pytest.fixture
def base():
    """A ledger with one pooled Codex profile ``cx`` and one ready session ``s1``."""
    ledger, _ = ok(relay.Ledger(), "RegisterProfile", name="cx", provider="codex", mode="pooled")
    return with_session(ledger, "s1")


@pytest.fixture
def store(workspace):
    return relay.Store(workspace)


def cli_json(capsys, root, *args):
    """Run the CLI in-process with --json; (exit code, the one JSON object)."""
    code = relay.main([*args, "--root", str(root), "--json"])
    out, _ = capsys.readouterr()
    return code, json.loads(out)


# -- profiles -------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["claude", "kimi"])
def test_pooled_profiles_are_codex_only(provider):
    """A pooled profile of a non-Codex provider is invalid_argument; one-borrow is fine."""
    ledger = relay.Ledger()
    err = refused(ledger, "RegisterProfile", Code.INVALID_ARGUMENT, name="p", provider=provider,
                  mode="pooled")
    assert "one-borrow" in err.hint
    new, reply = ok(ledger, "RegisterProfile", name="p", provider=provider, mode="one-borrow")
    assert reply.outcome == "registered"
    assert new.profiles["p"].provider == provider


def test_unknown_provider_or_mode_is_invalid_argument():
    """A provider or mode outside the known sets is refused by request validation (every
    door: CLI, HTTP, WebSocket) and again by the operation itself."""
    for fields in ({"provider": "gpt", "mode": "pooled"}, {"provider": "codex", "mode": "forever"}):
        request = rc.RegisterProfileRequest(name="p", **fields)
        with pytest.raises(rc.InvalidArgument):
            relay.rpc_mutation("RegisterProfile", request)
        with pytest.raises(rc.InvalidArgument):
            relay.register_profile(relay.Ledger(), request, relay.Ctx(T0, 1))


def test_duplicate_register_leaves_ledger_object_identical(base):
    """Registering the same profile again is `duplicate` and returns the very same ledger."""
    new, reply = run(base, "RegisterProfile", now=T0 + 50, name="cx", provider="codex",
                     mode="pooled")
    assert reply.outcome == "duplicate"
    assert new is base
    assert reply.revision == base.revision
    assert reply.profile == base.profiles["cx"]


@pytest.mark.parametrize("change", [
    {"mode": "one-borrow"},
    {"command": ("codex", "app-server")},
])
def test_conflicting_register_is_already_exists(base, change):
    """Re-registering a name with other settings is already_exists."""
    fields = {"name": "cx", "provider": "codex", "mode": "pooled", **change}
    err = refused(base, "RegisterProfile", Code.ALREADY_EXISTS, **fields)
    assert "profile list" in err.hint


# -- sessions -------------------------------------------------------------------


def test_create_session_needs_a_registered_profile():
    """A session of an unknown profile is not_found, naming how to register one."""
    err = refused(relay.Ledger(), "CreateSession", Code.NOT_FOUND, profile="nope")
    assert "profile register" in err.hint


def test_create_session_generates_unique_ids_and_a_cursor(base):
    """Generated session ids are distinct, ready, of the profile's provider, with a zero cursor."""
    ledger, first = ok(base, "CreateSession", profile="cx")
    ledger, second = ok(ledger, "CreateSession", profile="cx")
    ids = {first.session.session_id, second.session.session_id}
    assert len(ids) == 2 and ids <= set(ledger.sessions)
    for sid in ids:
        session = ledger.sessions[sid]
        assert (session.state, session.provider, session.profile) == ("ready", "codex", "cx")
        assert ledger.cursors[sid] == rc.Cursor(sid)


def test_session_id_taken_is_already_exists(base):
    """An explicit session id that exists is refused."""
    refused(base, "CreateSession", Code.ALREADY_EXISTS, profile="cx", session_id="s1")


def test_list_sessions_filters_by_profile_and_state(base):
    """session list filters by profile and by state."""
    ledger, _ = ok(base, "RegisterProfile", name="cl", provider="claude", mode="one-borrow")
    ledger = with_session(ledger, "c1", profile="cl")
    ledger, _ = ok(ledger, "QuarantineSession", session_id="c1", reason="crashed")
    by_profile = relay.list_sessions(ledger, rc.ListSessionsRequest(profile="cl"), T0)
    assert [s.session_id for s in by_profile.sessions] == ["c1"]
    failed = relay.list_sessions(ledger, rc.ListSessionsRequest(state="failed"), T0)
    assert [s.session_id for s in failed.sessions] == ["c1"]
    everything = relay.list_sessions(ledger, rc.ListSessionsRequest(), T0)
    assert {s.session_id for s in everything.sessions} == {"s1", "c1"}


# -- leases ---------------------------------------------------------------------


def test_shared_readers_coexist(base):
    """Two shared-read leases on one session are both granted and active."""
    ledger, r1 = grant(base, "r1", READ)
    ledger, r2 = grant(ledger, "r2", READ)
    assert (r1.outcome, r2.outcome) == ("granted", "granted")
    live = relay.live_leases(ledger, "s1", relay.iso(T0))
    assert {x.lease_id for x in live} == {r1.lease.lease_id, r2.lease.lease_id}
    assert all(x.state == "active" for x in live)


def test_writer_waits_while_readers_are_active_and_blocks_new_readers(base):
    """A writer behind a reader is recorded as waiting, and new readers and writers are refused."""
    ledger, r1 = grant(base, "r1", READ)
    ledger, w = grant(ledger, "w", WRITE, now=T0 + 1, ttl=60)
    assert w.outcome == "waiting"
    assert ledger.leases[w.lease.lease_id].state == "waiting"
    assert w.lease.fencing_token == 0  # a waiting lease was not issued a token
    assert w.lease.expires_at == relay.iso(T0 + 1 + 60)
    err = refused(ledger, "GrantLease", Code.FAILED_PRECONDITION, now=T0 + 2, session_id="s1",
                  holder="r2", mode=READ)
    assert "'w'" in err.message
    refused(ledger, "GrantLease", Code.FAILED_PRECONDITION, now=T0 + 2, session_id="s1",
            holder="w2", mode=WRITE)
    assert ledger.leases[r1.lease.lease_id].state == "active"


def test_waiting_writer_retry_promotes_once_readers_release(base):
    """The same holder's retry stays waiting while a reader is active and is granted after release."""
    ledger, r1 = grant(base, "r1", READ)
    ledger, w = grant(ledger, "w", WRITE, now=T0 + 1)
    ledger, again = grant(ledger, "w", WRITE, now=T0 + 2)
    assert again.outcome == "waiting"
    assert again.lease.lease_id == w.lease.lease_id
    ledger, _ = ok(ledger, "ReleaseLease", now=T0 + 3, lease_id=r1.lease.lease_id)
    refused(ledger, "GrantLease", Code.FAILED_PRECONDITION, now=T0 + 3, session_id="s1",
            holder="r2", mode=READ)
    ledger, promoted = grant(ledger, "w", WRITE, now=T0 + 4)
    assert promoted.outcome == "granted"
    assert promoted.lease.lease_id == w.lease.lease_id
    assert promoted.lease.state == "active"
    assert promoted.lease.fencing_token > r1.lease.fencing_token
    assert promoted.lease.granted_at == relay.iso(T0 + 4)
    assert sum(1 for x in ledger.leases.values() if x.holder == "w") == 1


def test_active_writer_excludes_readers_and_writers(base):
    """An active exclusive-write lease refuses every other grant until it is released."""
    ledger, w = grant(base, "w", WRITE)
    assert w.outcome == "granted"
    for holder, mode in (("r", READ), ("w2", WRITE)):
        refused(ledger, "GrantLease", Code.FAILED_PRECONDITION, session_id="s1", holder=holder,
                mode=mode)
    ledger, _ = ok(ledger, "ReleaseLease", now=T0 + 1, lease_id=w.lease.lease_id)
    _, r = grant(ledger, "r", READ, now=T0 + 1)
    assert r.outcome == "granted"


def test_same_holder_twice_is_already_exists(base):
    """A holder with a live lease on the session cannot take a second one."""
    ledger, r = grant(base, "h", READ)
    for mode in (READ, WRITE):
        err = refused(ledger, "GrantLease", Code.ALREADY_EXISTS, session_id="s1", holder="h",
                      mode=mode)
        assert r.lease.lease_id in err.message


def test_grant_ttl_defaults_and_range(base):
    """ttl 0 takes the configured default; beyond the maximum is invalid_argument."""
    config = relay.Config(default_ttl_seconds=42, max_ttl_seconds=100)
    _, reply = ok(base, "GrantLease", config=config, session_id="s1", holder="h", mode=READ)
    assert reply.lease.ttl_seconds == config.default_ttl_seconds
    assert reply.lease.expires_at == relay.iso(T0 + config.default_ttl_seconds)
    refused(base, "GrantLease", Code.INVALID_ARGUMENT, config=config, session_id="s1",
            holder="h", mode=READ, ttl_seconds=config.max_ttl_seconds + 1)


def test_grant_on_unknown_session_is_not_found(base):
    """A grant naming no session is not_found."""
    refused(base, "GrantLease", Code.NOT_FOUND, session_id="ghost", holder="h", mode=READ)


def test_renew_records_last_renewed_at_and_expires_at(base):
    """Renewal stamps last_renewed_at and moves expires_at to now + ttl."""
    ledger, g = grant(base, "h", WRITE, ttl=30)
    ledger, renewed = ok(ledger, "RenewLease", now=T0 + 10, lease_id=g.lease.lease_id)
    assert renewed.outcome == "renewed"
    assert renewed.lease.last_renewed_at == relay.iso(T0 + 10)
    assert renewed.lease.expires_at == relay.iso(T0 + 10 + 30)
    ledger, longer = ok(ledger, "RenewLease", now=T0 + 20, lease_id=g.lease.lease_id,
                        ttl_seconds=90)
    assert longer.lease.ttl_seconds == 90
    assert longer.lease.expires_at == relay.iso(T0 + 20 + 90)
    assert ledger.leases[g.lease.lease_id] == longer.lease
    assert longer.lease.fencing_token == g.lease.fencing_token  # renewal issues no token


def test_waiting_lease_cannot_be_renewed(base):
    """Only an active lease renews; a waiting one is failed_precondition."""
    ledger, _ = grant(base, "r", READ)
    ledger, w = grant(ledger, "w", WRITE)
    refused(ledger, "RenewLease", Code.FAILED_PRECONDITION, lease_id=w.lease.lease_id)


def test_expired_lease_occupies_nothing_and_cannot_be_renewed(base):
    """Past expires_at a writer no longer blocks grants, and renew/release/revoke refuse it."""
    ledger, w = grant(base, "w", WRITE, ttl=10)
    refused(ledger, "GrantLease", Code.FAILED_PRECONDITION, now=T0 + 9, session_id="s1",
            holder="r", mode=READ)
    lid = w.lease.lease_id
    err = refused(ledger, "RenewLease", Code.FAILED_PRECONDITION, now=T0 + 10, lease_id=lid)
    assert "expired" in err.message
    refused(ledger, "ReleaseLease", Code.FAILED_PRECONDITION, now=T0 + 10, lease_id=lid)
    refused(ledger, "RevokeLease", Code.FAILED_PRECONDITION, now=T0 + 10, lease_id=lid, reason="x")
    _, r = grant(ledger, "r", READ, now=T0 + 10)
    assert r.outcome == "granted"
    listed = relay.list_leases(ledger, rc.ListLeasesRequest(), T0 + 10).leases
    assert [(x.lease_id, x.state) for x in listed] == [(lid, "expired")]


def test_expired_waiting_writer_stops_blocking_readers(base):
    """A waiting writer whose ttl ran out no longer keeps new readers out."""
    ledger, _ = grant(base, "r1", READ, ttl=100)
    ledger, _ = grant(ledger, "w", WRITE, ttl=5)
    refused(ledger, "GrantLease", Code.FAILED_PRECONDITION, now=T0 + 4, session_id="s1",
            holder="r2", mode=READ)
    _, r2 = grant(ledger, "r2", READ, now=T0 + 5)
    assert r2.outcome == "granted"


def test_expire_leases_marks_only_the_expired(base):
    """The reaper marks leases past expiry `expired` at their expiry time and leaves live ones."""
    ledger, short = grant(base, "a", READ, ttl=5)
    ledger, long_ = grant(ledger, "b", READ, ttl=50)
    same, gone = relay.expire_leases(ledger, relay.Ctx(T0 + 4, ledger.revision + 1))
    assert same is ledger and gone == []
    new, gone = relay.expire_leases(ledger, relay.Ctx(T0 + 5, ledger.revision + 1))
    assert [x.lease_id for x in gone] == [short.lease.lease_id]
    assert new.leases[short.lease.lease_id].state == "expired"
    assert new.leases[short.lease.lease_id].ended_at == short.lease.expires_at
    assert new.leases[long_.lease.lease_id].state == "active"


def test_release_and_revoke_free_occupancy_and_record_why(base):
    """Release ends a lease; revoke records its reason; both free the session for a writer."""
    ledger, r1 = grant(base, "r1", READ)
    ledger, r2 = grant(ledger, "r2", READ)
    ledger, rel = ok(ledger, "ReleaseLease", now=T0 + 1, lease_id=r1.lease.lease_id)
    assert (rel.outcome, rel.lease.state, rel.lease.ended_at) == ("released", "released",
                                                                 relay.iso(T0 + 1))
    refused(ledger, "RevokeLease", Code.INVALID_ARGUMENT, now=T0 + 2, lease_id=r2.lease.lease_id,
            reason="  ")
    ledger, rev = ok(ledger, "RevokeLease", now=T0 + 2, lease_id=r2.lease.lease_id,
                     reason="holder vanished")
    assert (rev.lease.state, rev.lease.revoke_reason) == ("revoked", "holder vanished")
    assert relay.live_leases(ledger, "s1", relay.iso(T0 + 2)) == []
    _, w = grant(ledger, "w", WRITE, now=T0 + 3)
    assert w.outcome == "granted"
    for name, extra in (("ReleaseLease", {}), ("RevokeLease", {"reason": "again"})):
        refused(ledger, name, Code.FAILED_PRECONDITION, lease_id=r1.lease.lease_id, **extra)
        refused(ledger, name, Code.NOT_FOUND, lease_id="lease-404", **extra)


def test_releasing_a_waiting_writer_readmits_readers(base):
    """A waiting lease can be released, after which new readers are granted again."""
    ledger, _ = grant(base, "r1", READ)
    ledger, w = grant(ledger, "w", WRITE)
    ledger, rel = ok(ledger, "ReleaseLease", lease_id=w.lease.lease_id)
    assert rel.lease.state == "released"
    _, r2 = grant(ledger, "r2", READ)
    assert r2.outcome == "granted"


def test_fencing_tokens_strictly_grow_per_session(base):
    """Every grant on a session carries a larger fencing token than any before it there."""
    ledger = with_session(base, "s2")
    rng = random.Random(7)
    seen = {"s1": [], "s2": []}
    now = T0
    for i in range(40):
        sid = rng.choice(["s1", "s2"])
        now += 1
        ledger, g = grant(ledger, f"h{i}", rng.choice([READ, WRITE]), session=sid, now=now)
        if g.outcome == "granted":
            seen[sid].append(g.lease.fencing_token)
            assert ledger.sessions[sid].fencing_token == g.lease.fencing_token
        ledger, _ = ok(ledger, "ReleaseLease", now=now, lease_id=g.lease.lease_id)
    for tokens in seen.values():
        assert tokens and tokens == sorted(set(tokens))
        assert tokens[0] == 1  # per session, not global


# -- borrow ---------------------------------------------------------------------


def test_borrow_picks_a_ready_unoccupied_session(base):
    """Borrow takes a free, ready, unquarantined session of the profile as exclusive-write."""
    ledger = with_session(with_session(base, "s2"), "s3")
    ledger, _ = grant(ledger, "reader", READ, session="s1")
    ledger, _ = ok(ledger, "QuarantineSession", session_id="s3", reason="broken")
    ledger, b = ok(ledger, "Borrow", profile="cx", holder="job")
    assert b.outcome == "granted"
    assert b.lease.session_id == "s2"
    assert b.lease.mode == WRITE
    refused(ledger, "Borrow", Code.RESOURCE_EXHAUSTED, profile="cx", holder="job2")


def test_borrow_without_free_session_is_resource_exhausted_until_one_frees(base):
    """With every session occupied borrow is resource_exhausted; an expired lease frees one."""
    ledger, b1 = ok(base, "Borrow", profile="cx", holder="a", ttl_seconds=10)
    err = refused(ledger, "Borrow", Code.RESOURCE_EXHAUSTED, now=T0 + 9, profile="cx", holder="b")
    assert "session create" in err.hint
    _, b2 = ok(ledger, "Borrow", now=T0 + 10, profile="cx", holder="b")
    assert b2.lease.session_id == b1.lease.session_id
    assert b2.lease.fencing_token > b1.lease.fencing_token


def test_borrow_arguments(base):
    """Borrow needs exactly one of profile or session; an unknown profile is not_found."""
    refused(base, "Borrow", Code.INVALID_ARGUMENT, holder="h")
    refused(base, "Borrow", Code.INVALID_ARGUMENT, holder="h", profile="cx", session_id="s1")
    refused(base, "Borrow", Code.NOT_FOUND, holder="h", profile="nope")
    ledger, b = ok(base, "Borrow", holder="h", session_id="s1", mode=READ)
    assert (b.lease.session_id, b.lease.mode) == ("s1", READ)
    _, rel = ok(ledger, "Release", lease_id=b.lease.lease_id)
    assert rel.outcome == "released"


# -- control requests -----------------------------------------------------------


def test_control_record_duplicate_and_conflict(base):
    """Same id and payload is `duplicate` with the identical ledger; another payload is refused."""
    ledger, first = ok(base, "RecordControl", request_id="c1", session_id="s1", kind="stop",
                       payload={"why": "done"})
    assert first.outcome == "recorded"
    assert ledger.control_requests["c1"].payload == {"why": "done"}
    again, dup = run(ledger, "RecordControl", now=T0 + 5, request_id="c1", session_id="s1",
                     kind="stop", payload={"why": "done"})
    assert dup.outcome == "duplicate" and again is ledger
    assert dup.control_request == first.control_request
    refused(ledger, "RecordControl", Code.ALREADY_EXISTS, request_id="c1", session_id="s1",
            kind="stop", payload={"why": "other"})
    refused(ledger, "RecordControl", Code.ALREADY_EXISTS, request_id="c1", session_id="s1",
            kind="start", payload={"why": "done"})
    refused(ledger, "RecordControl", Code.NOT_FOUND, request_id="c2", session_id="ghost",
            kind="stop")
    refused(ledger, "RecordControl", Code.INVALID_ARGUMENT, request_id="c2", session_id="s1",
            kind="../stop")


def test_control_duplicate_via_cli_does_not_rewrite_the_ledger(workspace, capsys):
    """A duplicate control record leaves the ledger's bytes, inode and mtime untouched."""
    store = relay.Store(workspace)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    args = ["control", "record", "--request-id", "c1", "--session", "s1", "--kind", "stop",
            "--payload", '{"n": 1}']
    code, doc = cli_json(capsys, workspace, *args)
    assert (code, doc["outcome"]) == (0, "recorded")
    before = snapshot(workspace)
    code, doc = cli_json(capsys, workspace, *args)
    assert (code, doc["outcome"]) == (0, "duplicate")
    assert snapshot(workspace) == before
    code, doc = cli_json(capsys, workspace, *args[:-1], '{"n": 2}')
    assert (code, doc["error"]["code"]) == (1, "already_exists")
    assert snapshot(workspace) == before


# -- event and result streams ---------------------------------------------------


def test_stream_seqs_are_1_2_3_per_session_and_stream(base, store):
    """Events and results number 1, 2, 3 per session and stream, with no gap."""
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    for sid in ("s1", "s2"):
        commit_ok(store, "CreateSession", profile="cx", session_id=sid)
    got = {("s1", "AppendEvent"): [], ("s2", "AppendEvent"): [], ("s1", "AppendResult"): []}
    rng = random.Random(3)
    for i in range(30):
        key = rng.choice(list(got))
        reply = commit_ok(store, key[1], now=T0 + i, session_id=key[0], kind="note", data=i)
        got[key].append(reply.record.seq)
    ledger = store.read()
    for (sid, name), seqs in got.items():
        assert seqs == list(range(1, len(seqs) + 1))
        stream = "events" if name == "AppendEvent" else "results"
        assert getattr(ledger.cursors[sid], stream) == len(seqs)
        scanned = list(store.scan_records(sid, stream, getattr(ledger.cursors[sid], f"{stream}_bytes")))
        assert [r.seq for r in scanned] == seqs


def test_list_by_cursor_returns_records_in_order(store):
    """Listing after a cursor with a limit returns exactly the next records in seq order."""
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    total = 0
    for batch in (1, 250, 149):  # one big log (many KiB) so the binary search does work
        muts = [mutation("AppendEvent", session_id="s1", kind="tick",
                         data={"i": total + j, "pad": "x" * 100}) for j in range(batch)]
        relay.commit(store, muts, CFG, T0 + total)
        total += batch
    ledger = store.read()
    assert ledger.cursors["s1"].events_bytes > 40 * relay.KIB
    rng = random.Random(11)
    cases = [(0, 10_000), (0, 1), (total - 1, 5), (total, 5), (total + 3, 5)]
    cases += [(rng.randrange(total), rng.randrange(1, 60)) for _ in range(40)]
    for after, limit in cases:
        req = rc.ListRecordsRequest("s1", after=after, limit=limit)
        reply = relay.list_records(store, ledger, req, "events")
        want = list(range(after + 1, min(after + limit, total) + 1))
        assert [r.seq for r in reply.records] == want, (after, limit)
        assert [r.data["i"] for r in reply.records] == [s - 1 for s in want]
        assert reply.last_seq == total


def test_list_records_arguments(store):
    """A negative cursor or a limit outside 1..10000 is invalid_argument; no session is not_found."""
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    ledger = store.read()
    for after, limit in ((-1, 10), (0, 0), (0, 10_001)):
        with pytest.raises(rc.InvalidArgument):
            relay.list_records(store, ledger, rc.ListRecordsRequest("s1", after, limit), "events")
    with pytest.raises(rc.NotFound):
        relay.list_records(store, ledger, rc.ListRecordsRequest("ghost"), "events")


def test_oversized_record_is_refused_and_nothing_is_written(store):
    """Data over max_record_bytes is invalid_argument and leaves the stream log and ledger alone."""
    config = relay.Config(max_record_bytes=64)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    before = store.ledger_path.read_bytes()
    with pytest.raises(rc.InvalidArgument):
        commit_ok(store, "AppendEvent", config=config, session_id="s1", kind="big", data="x" * 65)
    assert store.ledger_path.read_bytes() == before
    assert not store.stream_path("s1", "events").exists()
    with pytest.raises(rc.NotFound):
        commit_ok(store, "AppendEvent", session_id="ghost", kind="k")


# -- quarantine -----------------------------------------------------------------


def test_quarantine_revokes_live_leases_fails_session_and_blocks_grants(base):
    """Quarantine revokes active and waiting leases, fails the session and refuses new grants."""
    ledger, r = grant(base, "r", READ)
    ledger, w = grant(ledger, "w", WRITE)
    ledger, q = ok(ledger, "QuarantineSession", now=T0 + 1, session_id="s1", reason="crashed")
    assert q.outcome == "quarantined"
    assert set(q.revoked_lease_ids) == {r.lease.lease_id, w.lease.lease_id}
    for lid in q.revoked_lease_ids:
        assert ledger.leases[lid].state == "revoked"
        assert "crashed" in ledger.leases[lid].revoke_reason
    assert ledger.sessions["s1"].state == "failed"
    assert ledger.quarantines["s1"].state == "active"
    for mode in (READ, WRITE):
        err = refused(ledger, "GrantLease", Code.FAILED_PRECONDITION, now=T0 + 2, session_id="s1",
                      holder="n", mode=mode)
        assert "recover" in err.hint
    refused(ledger, "Borrow", Code.RESOURCE_EXHAUSTED, now=T0 + 2, profile="cx", holder="n")
    refused(ledger, "QuarantineSession", Code.ALREADY_EXISTS, session_id="s1", reason="again")
    refused(ledger, "QuarantineSession", Code.INVALID_ARGUMENT, session_id="s1", reason="")


def test_clear_quarantine_restores_the_session(base):
    """Clearing an active quarantine makes the session ready and grantable again."""
    ledger, _ = ok(base, "QuarantineSession", session_id="s1", reason="crashed")
    ledger, c = ok(ledger, "ClearQuarantine", now=T0 + 1, session_id="s1")
    assert (c.outcome, c.quarantine.state) == ("cleared", "cleared")
    assert c.quarantine.cleared_at == relay.iso(T0 + 1)
    assert ledger.sessions["s1"].state == "ready"
    _, g = grant(ledger, "h", WRITE, now=T0 + 2)
    assert g.outcome == "granted"


def test_clear_is_refused_without_quarantine_or_while_unsafe(base):
    """Clear is refused with no active quarantine, with a live lease, and on a closed session."""
    refused(base, "ClearQuarantine", Code.FAILED_PRECONDITION, session_id="s1")
    refused(base, "ClearQuarantine", Code.NOT_FOUND, session_id="ghost")
    ledger, _ = ok(base, "QuarantineSession", session_id="s1", reason="crashed")
    # A lease that is live although the session is quarantined (say, a hand-repaired ledger).
    stray = rc.Lease("lease-x", "s1", "h", WRITE, "active", 1, 60, expires_at=relay.iso(T0 + 60))
    unsafe = attrs.evolve(ledger, leases={**ledger.leases, "lease-x": stray})
    err = refused(unsafe, "ClearQuarantine", Code.FAILED_PRECONDITION, session_id="s1")
    assert "lease-x" in err.message and "lease revoke" in err.hint
    ok(unsafe, "ClearQuarantine", now=T0 + 60, session_id="s1")  # once the lease has expired
    closed = set_session_state(ledger, "s1", "closed")
    refused(closed, "ClearQuarantine", Code.FAILED_PRECONDITION, session_id="s1")


# -- recover --------------------------------------------------------------------


def _parse(command):
    """Parse a suggested ``python -m relay ...`` command with the real CLI parser."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "relay"]
    argv = [{"HOLDER": "someone", "REASON": "why"}.get(w, w) for w in words[3:]]
    return relay.build_parser(argv).parse_args(argv)


def test_recover_classifies_each_session_with_its_next_command(base):
    """Each class comes with a next command the CLI accepts, naming the right session or lease."""
    ledger = base
    for sid in ("blocked", "quarantined", "revoked", "expired", "closed"):
        ledger = with_session(ledger, sid)
    ledger, held = grant(ledger, "h", WRITE, session="blocked")
    ledger, _ = ok(ledger, "QuarantineSession", session_id="quarantined", reason="crashed")
    ledger, g = grant(ledger, "h", WRITE, session="revoked")
    ledger, _ = ok(ledger, "RevokeLease", lease_id=g.lease.lease_id, reason="stuck")
    ledger, _ = grant(ledger, "h", WRITE, session="expired", ttl=5)
    ledger = set_session_state(ledger, "closed", "closed")
    reply = relay.recover(ledger, rc.RecoverRequest(), T0 + 5)
    got = {r.session_id: r for r in reply.sessions}
    assert {sid: r.classification for sid, r in got.items()} == {
        "s1": "healthy", "blocked": "lease_block", "quarantined": "quarantine_repair",
        "revoked": "resumable", "expired": "resumable", "closed": "replacement_start",
    }
    assert got["s1"].next_command == ""
    assert got["blocked"].lease_ids == (held.lease.lease_id,)
    args = _parse(got["blocked"].next_command)
    assert (args._cmd, args.lease_id) == ("RevokeLease", held.lease.lease_id)
    args = _parse(got["quarantined"].next_command)  # a repair, not a bare clear
    assert (args._cmd, args.session_id, args.apply) == ("RepairSession", "quarantined", True)
    for sid in ("revoked", "expired"):
        args = _parse(got[sid].next_command)
        assert (args._cmd, args.session_id) == ("Borrow", sid)
    assert "expired" in got["expired"].reason
    args = _parse(got["closed"].next_command)
    assert (args._cmd, args.profile) == ("CreateSession", "cx")


def test_recover_one_session_and_unknown_session(base):
    """recover --session answers for that session only; an unknown one is not_found."""
    ledger = with_session(base, "s2")
    reply = relay.recover(ledger, rc.RecoverRequest("s2"), T0)
    assert [r.session_id for r in reply.sessions] == ["s2"]
    with pytest.raises(rc.NotFound):
        relay.recover(ledger, rc.RecoverRequest("ghost"), T0)


# -- request ids (idempotent retries) -------------------------------------------


def test_request_id_retry_returns_first_reply_without_new_revision(base):
    """A retry with the same request id and body returns the first reply and changes nothing."""
    fields = {"session_id": "s1", "holder": "h", "mode": WRITE, "request_id": "req-1"}
    ledger, first = ok(base, "GrantLease", **fields)
    again, second = ok(ledger, "GrantLease", now=T0 + 30, **fields)
    assert second == first
    assert again is ledger
    assert again.revision == first.revision


def test_request_id_reused_for_another_request_is_already_exists(base):
    """The same request id with another body or method is already_exists."""
    ledger, g = ok(base, "GrantLease", session_id="s1", holder="h", mode=READ, request_id="req-1")
    refused(ledger, "GrantLease", Code.ALREADY_EXISTS, session_id="s1", holder="h2", mode=READ,
            request_id="req-1")
    refused(ledger, "ReleaseLease", Code.ALREADY_EXISTS, lease_id=g.lease.lease_id,
            request_id="req-1")


def test_request_id_retry_of_append_appends_once(store):
    """Retrying an append with its request id neither appends again nor rewrites the ledger."""
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    first = commit_ok(store, "AppendEvent", session_id="s1", kind="k", data=1, request_id="a-1")
    before = snapshot(store.root)
    again = commit_ok(store, "AppendEvent", now=T0 + 1, session_id="s1", kind="k", data=1,
                      request_id="a-1")
    assert again == first
    assert snapshot(store.root) == before
    assert store.read().cursors["s1"].events == first.record.seq


def test_request_ids_are_forgotten_after_their_retention(store):
    """Past request_retention_seconds (and its bucket) a request id may be applied afresh."""
    config = relay.Config(request_retention_seconds=10, compact_interval_seconds=1)
    commit_ok(store, "RegisterProfile", config=config, name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", config=config, profile="cx", session_id="s1")
    first = commit_ok(store, "AppendEvent", config=config, session_id="s1", kind="k",
                      request_id="a-1")
    assert not store.read().requests  # kept in the request log, not the ledger
    again = commit_ok(store, "AppendEvent", now=T0 + 10, config=config, session_id="s1", kind="k",
                      request_id="a-1")
    assert again == first
    later = commit_ok(store, "AppendEvent", now=T0 + 12, config=config, session_id="s1", kind="k",
                      request_id="a-1")
    assert later.record.seq > first.record.seq


def test_request_records_are_not_capped_by_count(store):
    """However many request ids follow, the first is still recognised (no count cap)."""
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    first = commit_ok(store, "AppendEvent", session_id="s1", kind="k", request_id="r-0")
    for i in range(1, 6):
        commit_ok(store, "AppendEvent", now=T0 + 2 * i, session_id="s1", kind="k",
                  request_id=f"r-{i}")
    assert commit_ok(store, "AppendEvent", now=T0 + 20, session_id="s1", kind="k",
                     request_id="r-0") == first
    assert not store.read().requests


# -- id validation --------------------------------------------------------------

BAD_IDS = ["../x", ".hidden", "a" * 129, "a/b", "a\\b", "a b", "x\n", "\x00"]

ID_FIELDS = [
    ("RegisterProfile", "name", {"provider": "codex", "mode": "pooled"}),
    ("CreateSession", "profile", {}),
    ("CreateSession", "session_id", {"profile": "cx"}),
    ("GrantLease", "session_id", {"holder": "h", "mode": READ}),
    ("GrantLease", "holder", {"session_id": "s1", "mode": READ}),
    ("GrantLease", "request_id", {"session_id": "s1", "holder": "h", "mode": READ}),
    ("Borrow", "holder", {"profile": "cx"}),
    ("Borrow", "profile", {"holder": "h"}),
    ("Borrow", "session_id", {"holder": "h"}),
    ("RenewLease", "lease_id", {}),
    ("ReleaseLease", "lease_id", {}),
    ("RevokeLease", "lease_id", {"reason": "r"}),
    ("RecordControl", "request_id", {"session_id": "s1", "kind": "k"}),
    ("RecordControl", "session_id", {"request_id": "c1", "kind": "k"}),
    ("AppendEvent", "session_id", {"kind": "k"}),
    ("AppendResult", "session_id", {"kind": "k"}),
    ("QuarantineSession", "session_id", {"reason": "r"}),
    ("ClearQuarantine", "session_id", {}),
]


@pytest.mark.parametrize(("name", "field", "others"), ID_FIELDS)
def test_unsafe_ids_are_invalid_argument(name, field, others):
    """Every id field refuses path-like, hidden, over-long and odd ids; 128 characters is fine."""
    for bad in BAD_IDS:
        with pytest.raises(rc.InvalidArgument) as info:
            mutation(name, **others, **{field: bad})
        assert "letters, digits" in info.value.hint
    mutation(name, **others, **{field: "a" * 128})


CLI_WITH_BAD_ID = [
    ["session", "create", "--profile", "cx", "--session-id", "{}"],
    ["lease", "grant", "--session", "{}", "--holder", "h", "--mode", READ],
    ["lease", "grant", "--session", "s1", "--holder", "{}", "--mode", READ],
    ["lease", "renew", "{}"],
    ["borrow", "--profile", "{}", "--holder", "h"],
    ["control", "record", "--request-id", "{}", "--session", "s1", "--kind", "k"],
    ["event", "append", "--session", "{}", "--kind", "k"],
    ["event", "list", "--session", "{}"],
    ["result", "list", "--session", "{}"],
    ["quarantine", "session", "{}", "--reason", "r"],
    ["profile", "register", "{}", "--provider", "codex", "--mode", "pooled"],
]


def _cli_bad_ids(capsys, root):
    for template in CLI_WITH_BAD_ID:
        for bad in ("../x", ".hidden", "a" * 129, "a/b"):
            argv = [w.replace("{}", bad) for w in template]
            code, doc = cli_json(capsys, root, *argv)
            assert (code, doc["error"]["code"]) == (1, "invalid_argument"), argv


def test_bad_ids_touch_no_file_in_an_empty_workspace(workspace, capsys):
    """A refused id is checked before the lock or any directory is created."""
    _cli_bad_ids(capsys, workspace)
    assert not (workspace / "flow").exists()


def test_bad_ids_change_nothing_in_a_live_workspace(workspace, capsys):
    """A refused id leaves every file of an existing workspace as it was."""
    store = relay.Store(workspace)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    commit_ok(store, "AppendEvent", session_id="s1", kind="k")
    before = snapshot(workspace)
    _cli_bad_ids(capsys, workspace)
    assert snapshot(workspace) == before


# -- revision -------------------------------------------------------------------


def test_revision_bumps_once_per_successful_mutation(base, store):
    """Successes each take the next revision; refusals and duplicates take none."""
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    start = store.read().revision
    muts = [
        mutation("CreateSession", profile="cx", session_id="s1"),        # ok
        mutation("CreateSession", profile="cx", session_id="s1"),        # already_exists
        mutation("RegisterProfile", name="cx", provider="codex", mode="pooled"),  # duplicate
        mutation("AppendEvent", session_id="s1", kind="k"),              # ok
        mutation("GrantLease", session_id="ghost", holder="h", mode=READ),  # not_found
        mutation("GrantLease", session_id="s1", holder="h", mode=READ),  # ok
    ]
    inode = os.stat(store.ledger_path).st_ino
    results, ledger = relay.commit(store, muts, CFG, T0 + 1)
    revisions = [r.revision for r in results if not isinstance(r, RelayError)
                 and r.outcome != "duplicate"]
    assert revisions == [start + 1, start + 2, start + 3]
    assert [type(r).__name__ for r in results if isinstance(r, RelayError)] == [
        "AlreadyExists", "NotFound"]
    assert store.read().revision == ledger.revision == start + 3
    assert os.stat(store.ledger_path).st_ino != inode  # one new file for the batch
    results, ledger = relay.commit(store, muts[1:3], CFG, T0 + 2)
    assert ledger is None  # nothing changed, nothing written
    assert store.read().revision == start + 3


# -- compaction -----------------------------------------------------------------


def _archive(store, name):
    path = store.state_dir / "archive" / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compaction_archives_terminal_leases_and_old_control_requests(store):
    """After their retention windows, ended leases and control requests move to archive/*.jsonl."""
    config = relay.Config(lease_retention_seconds=10, control_request_retention_seconds=20,
                          compact_interval_seconds=1)
    c = dict(config=config)
    commit_ok(store, "RegisterProfile", **c, name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", **c, profile="cx", session_id="s1")
    done = commit_ok(store, "GrantLease", **c, session_id="s1", holder="a", mode=READ).lease
    commit_ok(store, "ReleaseLease", **c, lease_id=done.lease_id)
    live = commit_ok(store, "GrantLease", **c, session_id="s1", holder="b", mode=READ,
                     ttl_seconds=3600).lease
    commit_ok(store, "RecordControl", **c, request_id="c1", session_id="s1", kind="stop")
    commit_ok(store, "AppendEvent", now=T0 + 10, **c, session_id="s1", kind="k")
    assert done.lease_id in store.read().leases  # not yet past the window
    commit_ok(store, "AppendEvent", now=T0 + 11, **c, session_id="s1", kind="k")
    ledger = store.read()
    assert done.lease_id not in ledger.leases and live.lease_id in ledger.leases
    assert [row["lease_id"] for row in _archive(store, "leases")] == [done.lease_id]
    assert ledger.compacted_at == relay.iso(T0 + 11)
    assert "c1" in ledger.control_requests
    commit_ok(store, "AppendEvent", now=T0 + 21, **c, session_id="s1", kind="k")
    ledger = store.read()
    assert "c1" not in ledger.control_requests
    assert [row["request_id"] for row in _archive(store, "control-requests")] == ["c1"]
    assert live.lease_id in ledger.leases
    assert rc.from_json(rc.Lease, _archive(store, "leases")[0]).state == "released"


def test_compaction_waits_for_its_interval(store):
    """No compaction happens within compact_interval_seconds of the last run,
    even a run that found nothing to archive."""
    config = relay.Config(lease_retention_seconds=1, compact_interval_seconds=100)
    c = dict(config=config)
    commit_ok(store, "RegisterProfile", **c, name="cx", provider="codex", mode="pooled")
    assert store.read().compacted_at == relay.iso(T0)  # ran, found nothing, still counts
    commit_ok(store, "CreateSession", **c, profile="cx", session_id="s1")
    first = commit_ok(store, "GrantLease", **c, session_id="s1", holder="a", mode=READ).lease
    commit_ok(store, "ReleaseLease", **c, lease_id=first.lease_id)
    commit_ok(store, "AppendEvent", now=T0 + 50, **c, session_id="s1", kind="k")
    assert first.lease_id in store.read().leases  # past retention, but within the interval
    commit_ok(store, "AppendEvent", now=T0 + 101, **c, session_id="s1", kind="k")
    assert first.lease_id not in store.read().leases  # compacted at T0 + 101
    second = commit_ok(store, "GrantLease", now=T0 + 102, **c, session_id="s1", holder="a",
                       mode=READ).lease
    commit_ok(store, "ReleaseLease", now=T0 + 102, **c, lease_id=second.lease_id)
    commit_ok(store, "AppendEvent", now=T0 + 150, **c, session_id="s1", kind="k")
    assert second.lease_id in store.read().leases  # within the interval
    commit_ok(store, "AppendEvent", now=T0 + 202, **c, session_id="s1", kind="k")
    assert second.lease_id not in store.read().leases


# -- tokens ---------------------------------------------------------------------


def _ctx(ledger, now=T0):
    return relay.Ctx(now, ledger.revision + 1)


def _bump(ledger, now=T0):
    return attrs.evolve(ledger, revision=ledger.revision + 1, updated_at=relay.iso(now))


def test_token_create_stores_only_the_digest():
    """A created token keeps the SHA-256 digest of the secret, never the secret."""
    ledger = relay.Ledger()
    ledger, token = relay.create_token(ledger, "ci", relay.token_digest("s3cret"), _ctx(ledger))
    assert token.digest != "s3cret"
    assert b"s3cret" not in relay.encode_ledger(ledger)
    import hashlib

    assert token.digest == hashlib.sha256(b"s3cret").hexdigest()
    stamp = relay.iso(T0)
    assert relay.token_accepts(ledger, "s3cret", stamp)
    assert not relay.token_accepts(ledger, "s3cret ", stamp)
    assert not relay.token_accepts(ledger, "", stamp)


def test_token_rotation_keeps_the_old_one_for_the_grace_period():
    """After rotate the new token is bound and the old one works until grace_until, not after."""
    ledger = relay.Ledger()
    ledger, old = relay.create_token(ledger, "", relay.token_digest("old"), _ctx(ledger))
    ledger = _bump(ledger)
    ledger = attrs.evolve(ledger, runtime=attrs.evolve(ledger.runtime, token_id=old.token_id))
    ledger, new = relay.rotate_token(ledger, 30, relay.token_digest("new"), _ctx(ledger))
    assert new.token_id != old.token_id
    assert ledger.runtime.token_id == new.token_id
    assert ledger.tokens[old.token_id].state == "rotated"
    assert ledger.tokens[old.token_id].grace_until == relay.iso(T0 + 30)
    assert relay.token_accepts(ledger, "old", relay.iso(T0 + 29))
    assert not relay.token_accepts(ledger, "old", relay.iso(T0 + 30))
    assert relay.token_accepts(ledger, "new", relay.iso(T0 + 30))
    with pytest.raises(rc.InvalidArgument):
        relay.rotate_token(ledger, -1, relay.token_digest("x"), _ctx(ledger))


def test_revoked_token_is_never_accepted():
    """Revocation takes effect at once, also for a rotated token inside its grace period."""
    ledger = relay.Ledger()
    ledger, a = relay.create_token(ledger, "", relay.token_digest("a"), _ctx(ledger))
    ledger = _bump(ledger)
    ledger = attrs.evolve(ledger, runtime=attrs.evolve(ledger.runtime, token_id=a.token_id))
    ledger, _ = relay.rotate_token(ledger, 3600, relay.token_digest("b"), _ctx(ledger))
    ledger = _bump(ledger)
    assert relay.token_accepts(ledger, "a", relay.iso(T0 + 1))
    ledger, revoked = relay.revoke_token(ledger, a.token_id, _ctx(ledger, T0 + 1))
    assert (revoked.state, revoked.revoked_at) == ("revoked", relay.iso(T0 + 1))
    assert not relay.token_accepts(ledger, "a", relay.iso(T0 + 1))
    assert relay.token_accepts(ledger, "b", relay.iso(T0 + 1))
    with pytest.raises(rc.FailedPrecondition):
        relay.revoke_token(ledger, a.token_id, _ctx(ledger))
    with pytest.raises(rc.NotFound):
        relay.revoke_token(ledger, "tok-404", _ctx(ledger))


def test_token_check_compares_every_token_in_constant_time(monkeypatch):
    """token_accepts compares the presented token's SHA-256 digest with every
    stored digest through hmac.compare_digest, match or not and whatever the
    presented length: both sides are always 64 hex digits, so neither the
    comparison count nor its length says anything about the stored tokens."""
    ledger = relay.Ledger()
    for i in range(5):
        ledger, _ = relay.create_token(ledger, "", relay.token_digest(f"t{i}"), _ctx(ledger))
        ledger = _bump(ledger)
    stored = sorted(t.digest.encode() for t in ledger.tokens.values())
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for raw, accepted in (("t0", True), ("t4", True), ("nope", False), ("", False),
                          ("t0" * 500, False), (stored[0].decode(), False)):
        calls.clear()
        assert relay.token_accepts(ledger, raw, relay.iso(T0)) is accepted, raw
        assert sorted(b for _, b in calls) == stored, raw
        assert {a for a, _ in calls} == {relay.token_digest(raw).encode()}, raw
        assert all(len(a) == len(b) == 64 for a, b in calls), raw


# -- the serving rule -----------------------------------------------------------


def _ledger_with_bound_token(state="active"):
    ledger = relay.Ledger()
    ledger, token = relay.create_token(ledger, "", relay.token_digest("x"), _ctx(ledger))
    token = attrs.evolve(token, state=state)
    return attrs.evolve(ledger, tokens={token.token_id: token},
                        runtime=attrs.evolve(ledger.runtime, token_id=token.token_id))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_serves_without_a_token(host):
    """Loopback addresses may serve with no ledger and no token."""
    assert relay.require_serving_allowed(None, host) == "loopback"
    assert relay.require_serving_allowed(relay.Ledger(), host) == "loopback"


@pytest.mark.parametrize("host", ["10.1.2.3", "192.168.1.20", "172.16.0.5"])
def test_private_network_needs_an_active_bound_token(host):
    """A private-network address serves only with an active token bound to the runtime."""
    for ledger in (None, relay.Ledger(), _ledger_with_bound_token("revoked"),
                   _ledger_with_bound_token("rotated")):
        with pytest.raises(rc.FailedPrecondition) as info:
            relay.require_serving_allowed(ledger, host)
        assert "token create" in info.value.hint
    unbound = attrs.evolve(_ledger_with_bound_token(), runtime=rc.Runtime())
    with pytest.raises(rc.FailedPrecondition):
        relay.require_serving_allowed(unbound, host)
    assert relay.require_serving_allowed(_ledger_with_bound_token(), host) == "trusted-lan"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "8.8.8.8", "169.254.1.1", "example.com"])
def test_everything_else_is_refused_even_with_a_token(host):
    """Wildcard, public, link-local and non-IP hosts are refused whatever the token."""
    for ledger in (None, _ledger_with_bound_token()):
        with pytest.raises(rc.InvalidArgument):
            relay.require_serving_allowed(ledger, host)
