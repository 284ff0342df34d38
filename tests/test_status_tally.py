"""The status tally (issue 14): the writer's memo carries what ``status``
counts, so the fast path answers without parsing the ledger.  The tally
equals a count of the document after any history; the fast path answers from
it only while it holds (no live lease expired, the journal exactly what the
memo vouches for, the memo whole), and otherwise parses and counts as before;
either way it prints what the full, typed path prints."""

from __future__ import annotations

import json
import random

import pytest
from conftest import T0, commit_ok, run_json
from test_scale import random_step, two_profiles

import relay
import relay_client as rc

CONFIG = relay.Config()


def counted(ledger: relay.Ledger) -> dict:
    """What the tally should say: the document counted with every live lease
    live, and the soonest ``expires_at`` among them."""
    doc = relay.to_json(ledger)
    live = [x["expires_at"] for x in doc["leases"].values() if x["state"] in rc.LIVE_LEASE_STATES]
    return {**relay.doc_tally(doc, ""), "soonest": min(live, default=None)}


@pytest.mark.parametrize("seed", range(6))
def test_the_tally_counts_what_the_document_counts(seed):
    """After random histories (grants, borrows, renewals, releases, expiry,
    quarantines, maps rebuilt by decoding), the tally the writer derives step
    by step equals a count of the whole document."""
    rng = random.Random(seed)
    for _ in range(15):
        ledger, now = two_profiles(), T0
        relay.ledger_tally(ledger)  # derived from the start, then carried by every put
        for revision in range(2, 80):
            ledger, now = random_step(rng, ledger, now, revision)
            assert relay.ledger_tally(ledger) == counted(ledger)


def test_cursor_and_quarantine_counts_follow_commits(workspace):
    store = relay.Store(workspace, journal=True)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled")
    for sid in ("s1", "s2"):
        commit_ok(store, "CreateSession", profile="p", session_id=sid)
    commit_ok(store, "AppendEvent", session_id="s1", kind="k")
    commit_ok(store, "AppendEvent", session_id="s2", kind="k")
    commit_ok(store, "AppendResult", session_id="s2", kind="k")
    commit_ok(store, "QuarantineSession", session_id="s1", reason="x")
    tally = relay.ledger_tally(store.read())
    assert (tally["events"], tally["results"], tally["active_quarantines"]) == (2, 1, 1)
    commit_ok(store, "ClearQuarantine", session_id="s1")
    assert relay.ledger_tally(store.read()) == counted(store.read())
    assert relay.ledger_tally(store.read())["active_quarantines"] == 0


def memo_of(root):
    return relay.read_memo((root / relay.MEMO_REL).read_bytes())


def forge_tally(root, **changes):
    """Rewrite the memo with a tally that lies (with a good CRC): only the fast
    path answering from the tally prints the lie."""
    checksum, end, tally = memo_of(root)
    (root / relay.MEMO_REL).write_bytes(relay.memo_bytes(checksum, end, {**tally, **changes}))


def leased(root, journal: bool, ttl: int = 3600):
    store = relay.Store(root, journal=journal)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="p", session_id="s1")
    commit_ok(store, "GrantLease", session_id="s1", holder="h", mode="exclusive-write", ttl_seconds=ttl)
    commit_ok(store, "AppendEvent", session_id="s1", kind="k")
    return store


def full(root, now=T0):
    return relay.to_json(relay.status(relay.Store(root), now))


@pytest.mark.parametrize("journal", [False, True], ids=["checkpoint", "journal"])
def test_the_fast_path_answers_from_the_tally(workspace, journal):
    """With a checkpoint alone and with journal records on it, the fast path's
    answer is the full path's; and it comes from the memo's tally, not a parse."""
    store = leased(workspace, journal)
    assert (store.last_read().records > 0) == journal
    assert relay._fast_status_doc(str(workspace), T0) == full(workspace)
    forge_tally(workspace, sessions=99)
    assert relay._fast_status_doc(str(workspace), T0)["sessions"] == 99


def test_an_expired_live_lease_makes_the_fast_path_count(workspace):
    """Past a live lease's ``expires_at`` the tally no longer holds: the fast
    path parses and counts, and the lease no longer counts as active."""
    leased(workspace, journal=True, ttl=60)
    assert memo_of(workspace)[2]["soonest"] == relay.iso(T0 + 60)
    forge_tally(workspace, sessions=99)
    assert relay._fast_status_doc(str(workspace), T0 + 59)["sessions"] == 99  # the tally holds
    later = relay._fast_status_doc(str(workspace), T0 + 60)
    assert later == full(workspace, T0 + 60)
    assert (later["sessions"], later["active_leases"]) == (1, 0)


def test_a_torn_or_stale_memo_is_never_trusted(workspace):
    """A memo that fails its CRC, or a journal longer, shorter or other than
    the one the memo vouches for: the tally is not used, and the answer is
    the full path's or none (then the full path answers)."""
    store = leased(workspace, journal=True)
    memo_path = workspace / relay.MEMO_REL
    good = memo_path.read_bytes()
    torn = good[:100] + (b"X" if good[100:101] != b"X" else b"Y") + good[101:]
    memo_path.write_bytes(torn)
    assert relay.read_memo(torn) is None and relay._fast_status_doc(str(workspace), T0) is None
    printed, expected = run_json(workspace, "status"), full(workspace)  # the full CLI path answers
    assert (printed["revision"], printed["sessions"]) == (expected["revision"], expected["sessions"])

    memo_path.write_bytes(good)
    forge_tally(workspace, sessions=99)
    lines = store.journal_path.read_bytes().splitlines(keepends=True)
    # A commit the memo never heard of (its writer died before the memo).
    commit_ok(relay.Store(workspace, journal=True), "AppendEvent", session_id="s1", kind="k")
    later = store.journal_path.read_bytes()
    (workspace / relay.MEMO_REL).write_bytes(relay.memo_bytes(
        memo_of(workspace)[0], len(b"".join(lines)), {**memo_of(workspace)[2], "sessions": 99}))
    assert relay._fast_status_doc(str(workspace), T0) is None
    # A damaged record inside the vouched length: its CRC fails, so no tally, and no vouching.
    flipped = bytearray(later)
    flipped[20] ^= 0x01
    store.journal_path.write_bytes(bytes(flipped))
    (workspace / relay.MEMO_REL).write_bytes(relay.memo_bytes(
        memo_of(workspace)[0], len(later), {**memo_of(workspace)[2], "sessions": 99}))
    assert relay._fast_status_doc(str(workspace), T0) is None


def test_a_record_the_memo_vouches_for_must_be_at_the_tallys_revision(workspace):
    """The last vouched record's revision and base are checked against the tally."""
    leased(workspace, journal=True)
    checksum, end, tally = memo_of(workspace)
    (workspace / relay.MEMO_REL).write_bytes(relay.memo_bytes(
        checksum, end, {**tally, "revision": tally["revision"] + 1, "sessions": 99}))
    assert relay._fast_status_doc(str(workspace), T0) == full(workspace)  # parsed, not the tally


def test_an_older_memo_without_a_tally_still_vouches(workspace):
    """A memo of a checksum (and a journal length) alone, as older writers left,
    still lets the fast path answer, by parsing."""
    store = leased(workspace, journal=True)
    checksum, end, _ = memo_of(workspace)
    (workspace / relay.MEMO_REL).write_bytes(checksum + b" %016d" % end)
    assert relay._fast_status_doc(str(workspace), T0) == full(workspace)
    store.write(store.read())  # a checkpoint: no journal
    (workspace / relay.MEMO_REL).write_bytes(memo_of(workspace)[0])
    assert relay._fast_status_doc(str(workspace), T0) == full(workspace)


def test_the_memo_is_a_multiple_of_64_bytes_and_round_trips():
    tally = {**relay._EMPTY_TALLY, "soonest": None}
    for sessions in (0, 7, 10**9):
        memo = relay.memo_bytes(b"a" * 64, 12, {**tally, "sessions": sessions})
        assert len(memo) % 64 == 0
        assert relay.read_memo(memo) == (b"a" * 64, 12, {**tally, "sessions": sessions})
    assert json.loads(memo[82:-9]) == {**tally, "sessions": 10**9}


def test_a_cli_commit_on_a_lazily_read_checkpoint_writes_the_whole_tally(workspace):
    """A CLI store's commit reads a vouched checkpoint lazily (records typed on
    use, flat maps not even parsed); the tally it writes still counts every
    record, as a count of the whole ledger does."""
    store = relay.Store(workspace)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled")
    for i in range(40):
        commit_ok(store, "CreateSession", profile="p", session_id=f"s{i}")
    for i in range(0, 40, 2):
        commit_ok(store, "GrantLease", session_id=f"s{i}", holder="h", mode="exclusive-write",
                  ttl_seconds=100 + i)
    for i in range(0, 40, 5):
        commit_ok(store, "AppendEvent", session_id=f"s{i}", kind="k")
    commit_ok(store, "QuarantineSession", session_id="s1", reason="x")
    commit_ok(relay.Store(workspace), "AppendResult", session_id="s3", kind="k")  # a fresh CLI store
    tally = memo_of(workspace)[2]
    whole = relay.Store(workspace).read()
    assert tally == counted(whole)
    assert (tally["active_leases"], tally["events"], tally["results"], tally["soonest"]) == (
        20, 8, 1, relay.iso(T0 + 100))
