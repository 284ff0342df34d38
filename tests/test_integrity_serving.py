"""Integrity of a serving relay (issue 8): fencing tokens, appends on a
quarantined session, a ledger reset or damaged while serving.

Servers run in-process on 127.0.0.1 port 0 (``serve_helpers.serving``) and the
CLI runs as real processes where another writer matters; every wait is on a
reply, an event or a printed line, never a sleep.
"""

from __future__ import annotations


import pytest
import trio

import relay
import relay_client as rc
from conftest import T0, commit_ok, snapshot
from serve_helpers import PATIENCE, serving

# -- fencing tokens --------------------------------------------------------------


def _refused(store, name, code, /, now=T0, **fields) -> rc.RelayError:
    """Commit ``name``; assert it is refused with ``code`` and wrote nothing."""
    before = snapshot(store.root)
    with pytest.raises(rc.RelayError) as info:
        commit_ok(store, name, now=now, **fields)
    assert info.value.code.value == code, info.value
    assert snapshot(store.root) == before
    return info.value


def _seeded(workspace) -> relay.Store:
    store = relay.Store(workspace)
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="cx", session_id="s1")
    return store


@pytest.mark.parametrize("end", ["revoke", "expire", "release"])
def test_a_stale_holder_is_fenced_off_by_the_next_grant(workspace, end):
    """A's lease ends (revoked, expired or released), B is granted: A's appends,
    renewals and releases with its old token are refused, durable state unchanged,
    while B's succeed."""
    store = _seeded(workspace)
    a = commit_ok(store, "GrantLease", session_id="s1", holder="A", mode="exclusive-write",
                  ttl_seconds=60).lease
    assert commit_ok(store, "AppendEvent", session_id="s1", kind="work",
                     fencing_token=a.fencing_token).record.seq == 1
    now = T0
    if end == "revoke":
        commit_ok(store, "RevokeLease", lease_id=a.lease_id, reason="hung")
    elif end == "release":
        commit_ok(store, "ReleaseLease", lease_id=a.lease_id, fencing_token=a.fencing_token)
    else:
        now = T0 + 61
    b = commit_ok(store, "GrantLease", session_id="s1", holder="B", mode="exclusive-write",
                  now=now).lease
    assert b.fencing_token == a.fencing_token + 1
    error = _refused(store, "AppendEvent", "failed_precondition", now=now, session_id="s1",
                     kind="late", fencing_token=a.fencing_token)
    assert f"stale fencing token {a.fencing_token}; current {b.fencing_token}" in error.message
    assert "borrow again" in error.hint
    _refused(store, "AppendResult", "failed_precondition", now=now, session_id="s1", kind="late",
             fencing_token=a.fencing_token)
    _refused(store, "RenewLease", "failed_precondition", now=now, lease_id=b.lease_id,
             fencing_token=a.fencing_token)
    _refused(store, "ReleaseLease", "failed_precondition", now=now, lease_id=b.lease_id,
             fencing_token=a.fencing_token)
    assert commit_ok(store, "AppendEvent", now=now, session_id="s1", kind="work",
                     fencing_token=b.fencing_token).record.seq == 2
    commit_ok(store, "RenewLease", now=now, lease_id=b.lease_id, fencing_token=b.fencing_token)
    commit_ok(store, "Release", now=now, lease_id=b.lease_id, fencing_token=b.fencing_token)
    cursor = store.read().cursors["s1"]
    assert (cursor.events, cursor.results) == (2, 0)


def test_fencing_tokens_that_were_never_valid_are_refused(workspace):
    """A token never issued, a negative one, or another lease's token is refused;
    0 (no token) is not checked."""
    store = _seeded(workspace)
    r1 = commit_ok(store, "GrantLease", session_id="s1", holder="r1", mode="shared-read").lease
    r2 = commit_ok(store, "GrantLease", session_id="s1", holder="r2", mode="shared-read").lease
    assert "never issued" in _refused(store, "AppendEvent", "failed_precondition", session_id="s1",
                                      kind="k", fencing_token=r2.fencing_token + 1).message
    _refused(store, "AppendEvent", "invalid_argument", session_id="s1", kind="k", fencing_token=-1)
    assert "is not that of lease" in _refused(
        store, "RenewLease", "failed_precondition", lease_id=r2.lease_id,
        fencing_token=r1.fencing_token).message
    # Readers coexist: the older reader's token stays valid beside a newer one.
    commit_ok(store, "AppendEvent", session_id="s1", kind="k", fencing_token=r1.fencing_token)
    commit_ok(store, "RenewLease", lease_id=r1.lease_id, fencing_token=r1.fencing_token)
    commit_ok(store, "AppendEvent", session_id="s1", kind="operator-note")


async def test_stale_holder_racing_a_new_one_over_http(workspace):
    """Over HTTP, holder A (revoked) and holder B append concurrently: every
    append with A's token is refused, every one with B's lands, in order."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            a = (await r.ok("Borrow", session_id=sid, holder="A"))["lease"]
            await r.ok("RevokeLease", lease_id=a["lease_id"], reason="lost heartbeat")
            b = (await r.ok("Borrow", session_id=sid, holder="B"))["lease"]
            answers: dict[str, list[int]] = {"A": [], "B": []}

            async def writer(name: str, token: int) -> None:
                for i in range(20):
                    response = await r.post("AppendEvent", session_id=sid, kind=name,
                                            data=i, fencing_token=token)
                    answers[name].append(response.status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, "A", a["fencing_token"])
                nursery.start_soon(writer, "B", b["fencing_token"])
            listed = await r.ok("ListEvents", session_id=sid, limit=100)
            refusal = await r.refused("AppendEvent", "failed_precondition", session_id=sid,
                                      kind="A", fencing_token=a["fencing_token"])
    assert answers == {"A": [400] * 20, "B": [200] * 20}
    assert [(x["kind"], x["data"]) for x in listed["records"]] == [("B", i) for i in range(20)]
    assert refusal["message"].startswith(
        f"stale fencing token {a['fencing_token']}; current {b['fencing_token']}")


def test_cli_takes_a_fencing_token(workspace):
    """`event append --fencing-token` is checked like the RPC field (exit 1, JSON error)."""
    from conftest import run_json

    _seeded(workspace)
    lease = run_json(workspace, "lease", "grant", "--session", "s1", "--holder", "A",
                     "--mode", "exclusive-write")["lease"]
    ok = run_json(workspace, "event", "append", "--session", "s1", "--kind", "k",
                  "--fencing-token", str(lease["fencing_token"]))
    assert ok["record"]["seq"] == 1
    run_json(workspace, "lease", "revoke", lease["lease_id"], "--reason", "r")
    refused = run_json(workspace, "event", "append", "--session", "s1", "--kind", "k",
                       "--fencing-token", str(lease["fencing_token"]), check=1)
    assert refused["error"]["code"] == "failed_precondition"
    assert refused["error"]["message"].startswith("stale fencing token 1; current 1")


def test_a_retry_of_an_applied_write_replays_even_after_its_token_went_stale(workspace):
    """A request id applied while the token was current replays its first reply later."""
    store = _seeded(workspace)
    lease = commit_ok(store, "GrantLease", session_id="s1", holder="A", mode="exclusive-write").lease
    first = commit_ok(store, "AppendEvent", session_id="s1", kind="k", request_id="r-1",
                      fencing_token=lease.fencing_token)
    commit_ok(store, "RevokeLease", lease_id=lease.lease_id, reason="r")
    again = commit_ok(store, "AppendEvent", session_id="s1", kind="k", request_id="r-1",
                      fencing_token=lease.fencing_token)
    assert again == first
    assert store.read().cursors["s1"].events == 1


# -- appends on a quarantined session -------------------------------------------


def test_quarantined_session_takes_notes_but_no_holder_writes(workspace):
    """On a quarantined session an append without a fencing token (a diagnostic
    note) lands; one with a token is refused naming the quarantine and the
    clear command, and changes nothing."""
    store = _seeded(workspace)
    lease = commit_ok(store, "GrantLease", session_id="s1", holder="A", mode="exclusive-write").lease
    commit_ok(store, "QuarantineSession", session_id="s1", reason="provider crashed")
    for name in ("AppendEvent", "AppendResult"):
        error = _refused(store, name, "failed_precondition", session_id="s1", kind="work",
                         fencing_token=lease.fencing_token)
        assert "quarantined (provider crashed)" in error.message
        assert "python -m relay quarantine clear s1" in error.hint
    error = _refused(store, "ReleaseLease", "failed_precondition", lease_id=lease.lease_id,
                     fencing_token=lease.fencing_token)
    assert "quarantined" in error.message
    note = commit_ok(store, "AppendEvent", session_id="s1", kind="operator-note",
                     data={"saw": "segfault"})
    assert note.record.seq == 1
    commit_ok(store, "AppendResult", session_id="s1", kind="diagnosis", data="core dumped")
