"""Integrity of a serving relay (issue 8): fencing tokens, appends on a
quarantined session, a ledger reset or damaged while serving.

Servers run in-process on 127.0.0.1 port 0 (``serve_helpers.serving``) and the
CLI runs as real processes where another writer matters; every wait is on a
reply, an event or a printed line, never a sleep.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

import relay
import relay_client as rc
from conftest import T0, commit_ok, snapshot
from serve_helpers import PATIENCE, cli_process, serving, ws_recv, ws_send

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


# -- a ledger replaced while serving (state reset, a restored copy) -------------


def _damage(path: Path) -> bytes:
    """Replace the ledger with a copy one byte off (as a disk fault would);
    return the good bytes."""
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    tmp = path.with_name("damaged.tmp")
    tmp.write_bytes(bytes(bad))
    os.replace(tmp, path)
    return good


async def test_state_reset_while_serving_ends_live_streams_and_starts_over(workspace):
    """`state reset --apply` while serving: a live subscriber of the old ledger
    gets an error event telling it to resubscribe and its stream ends; after the
    session is recreated, a new live subscriber gets the new records, and a
    replay from 0 has exactly them."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            for i in range(3):
                await r.ok("AppendEvent", session_id=sid, kind="old", data=i)
            async with r.sse({"session": sid}) as old:
                await old.until_comment("connected")
                _damage(relay.Store(workspace).ledger_path)
                reset = await cli_process(workspace, "state", "reset", "--owner", "relay", "--apply")
                assert reset["applied"]
                assert await r.seed() == [sid]  # the server's commit sees the new ledger first
                farewell = await old.next()
                ended = await old.next()
            async with r.sse({"session": sid}) as new:
                await new.until_comment("connected")
                appended = [await r.ok("AppendEvent", session_id=sid, kind="new", data=i)
                            for i in range(3)]
                live = await new.take(3)
            async with r.sse({"session": sid}, Last_Event_ID=f"{sid}:0") as replay:
                replayed = await replay.take(3)
    assert farewell["event"] == "error", farewell
    # aborted if the server first saw the ledger replaced, failed_precondition
    # if its watcher saw the damage before the reset: both say to resubscribe.
    assert farewell["data"]["code"] in ("aborted", "failed_precondition"), farewell
    assert "resubscribe" in farewell["data"]["hint"]
    assert ended is None
    assert [a["record"]["seq"] for a in appended] == [1, 2, 3]
    assert [(e["id"], e["data"]["kind"]) for e in live] == [(f"{sid}:{n}", "new") for n in (1, 2, 3)]
    assert [e["data"] for e in replayed] == [e["data"] for e in live]


async def test_a_ledger_replaced_by_another_ends_streams_with_aborted(workspace, tmp_path_factory):
    """A valid ledger of another identity renamed over the served one (even at a
    higher revision, so no revision check could tell): every live stream and the
    relay feed get one `aborted` error event and end; the server then serves the
    new ledger's state."""
    other = relay.Store(tmp_path_factory.mktemp("other"))
    commit_ok(other, "RegisterProfile", name="elsewhere", provider="kimi", mode="one-borrow")
    for i in range(12):
        commit_ok(other, "CreateSession", profile="elsewhere", session_id=f"x{i}")
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            await r.ok("AppendEvent", session_id=sid, kind="k")
            served = relay.Store(workspace).read()
            replacement = other.read()
            assert replacement.revision > served.revision
            assert replacement.ledger_id and replacement.ledger_id != served.ledger_id
            async with r.sse({"session": sid}) as records, r.sse({"feed": "relay"}) as feed, \
                    r.ws() as ws:
                await records.until_comment("connected")
                await feed.until_comment("connected")
                await ws_send(ws, type="subscribe", session=sid, last_event_id=f"{sid}:0")
                assert (await ws_recv(ws))["id"] == f"{sid}:1"  # replayed: now live
                os.replace(other.ledger_path, relay.Store(workspace).ledger_path)
                got = [await records.next(), await feed.next()]
                ends = [await records.next(), await feed.next()]
                ws_farewell = await ws_recv(ws)
            sessions = await r.ok("ListSessions")
    for event in got:
        assert (event["event"], event["data"]["code"]) == ("error", "aborted"), event
        assert "resubscribe" in event["data"]["hint"]
    assert ends == [None, None]
    assert (ws_farewell["type"], ws_farewell["data"]["code"]) == ("error", "aborted")
    assert [s["session_id"] for s in sessions["sessions"]] == sorted(f"x{i}" for i in range(12))


@pytest.mark.parametrize(("old", "new", "replaced"), [
    (relay.Ledger(), relay.Ledger(ledger_id="a" * 32, revision=1), False),  # the first write
    (relay.Ledger(ledger_id="a" * 32, revision=5), relay.Ledger(ledger_id="a" * 32, revision=9), False),
    (relay.Ledger(revision=5), relay.Ledger(ledger_id="a" * 32, revision=6), False),  # gets an id
    (relay.Ledger(ledger_id="a" * 32, revision=5), relay.Ledger(), True),  # moved aside
    (relay.Ledger(ledger_id="a" * 32, revision=5), relay.Ledger(ledger_id="b" * 32, revision=9), True),
    (relay.Ledger(ledger_id="a" * 32, revision=5), relay.Ledger(ledger_id="a" * 32, revision=4), True),
    (relay.Ledger(revision=5), relay.Ledger(ledger_id="b" * 32, revision=2), True),
])
def test_ledger_replaced(old, new, replaced):
    """A new identity, a vanished ledger or a revision going back is a replacement."""
    assert relay.ledger_replaced(old, new) is replaced


def test_the_ledger_id_is_minted_once_and_kept(workspace):
    """The first write mints a 32-hex ledger_id; later writes keep it; a reset ledger gets a new one."""
    store = _seeded(workspace)
    first = store.read().ledger_id
    commit_ok(store, "AppendEvent", session_id="s1", kind="k")
    assert store.read().ledger_id == first and len(first) == 32
    _damage(store.ledger_path)
    assert relay.main(["--root", str(workspace), "state", "reset", "--owner", "relay", "--apply"]) == 0
    commit_ok(store, "RegisterProfile", name="cx", provider="codex", mode="pooled")
    assert store.read().ledger_id not in ("", first)


# -- reads on a damaged ledger ---------------------------------------------------


async def test_reads_on_a_damaged_ledger_say_so_everywhere(workspace):
    """While the ledger is damaged, live streams end with the reason; GET routes,
    Connect reads, new SSE streams (HTTP 400) and /ws answer `failed_precondition` as the CLI
    does (never the stale copy in memory); status reports `ledger_invalid`; once
    the ledger reads again, so do the reads."""
    ledger_path = relay.Store(workspace).ledger_path
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            await r.ok("AppendEvent", session_id=sid, kind="k")
            async with r.sse({"session": sid}) as live, r.sse({"feed": "relay"}) as feed:
                await live.until_comment("connected")
                await feed.until_comment("connected")
                good = _damage(ledger_path)
                ended = [await live.next(), await feed.next()]  # the watcher noticed
                assert [await live.next(), await feed.next()] == [None, None]
            gets = {path: await r.client.get(path) for path in (
                "/api/relay/profiles", "/api/relay/sessions", "/api/relay/leases",
                f"/api/relay/events?session={sid}", f"/api/relay/results?session={sid}")}
            rpcs = {name: await r.post(name, **body) for name, body in (
                ("ListProfiles", {}), ("ListSessions", {}), ("ListLeases", {}), ("Recover", {}),
                ("ListEvents", {"session_id": sid}), ("AppendEvent", {"session_id": sid, "kind": "k"}))}
            status = (await r.client.get("/api/relay/status")).json()
            streams = []
            for params, headers in (({"session": sid}, {}), ({"session": sid}, {"Last_Event_ID": f"{sid}:0"}),
                                    ({"feed": "relay"}, {})):
                async with r.sse(params, **headers) as stream:
                    streams.append((stream.status, json.loads(await stream.body())))
            async with r.ws() as ws:
                await ws_send(ws, type="rpc", id=1, method="ListSessions", request={})
                ws_rpc = await ws_recv(ws)
                await ws_send(ws, type="subscribe", session=sid)
                ws_sub = await ws_recv(ws)
            cli = await cli_process(workspace, "session", "list", check=1)
            tmp = ledger_path.with_name("repaired.tmp")
            tmp.write_bytes(good)
            os.replace(tmp, ledger_path)
            await r.ok("AppendEvent", session_id=sid, kind="after-repair")  # reads the repaired ledger
            after = await r.client.get("/api/relay/sessions")
    cli_error = cli["error"]
    for event in ended:
        assert (event["event"], event["data"]["code"]) == ("error", cli_error["code"]), event
        assert event["data"]["message"] == cli_error["message"]
        assert event["data"]["hint"].startswith(cli_error["hint"])
        assert event["data"]["hint"].endswith("resubscribe once it reads again")
    for name, response in {**gets, **rpcs}.items():
        assert (response.status_code, response.json()["code"]) == (400, "failed_precondition"), name
        assert response.json()["message"] == cli_error["message"], name
        assert "state reset --owner relay --apply" in response.json()["hint"], name
    assert status["status"] == "fail"
    assert [w["code"] for w in status["warnings"]] == ["ledger_invalid"]
    for http_status, body in streams:  # refused before the stream starts
        assert (http_status, body["code"]) == (400, "failed_precondition"), body
        assert body["message"] == cli_error["message"]
    assert (ws_rpc["type"], ws_rpc["error"]["code"]) == ("error", "failed_precondition")
    assert (ws_sub["type"], ws_sub["data"]["code"]) == ("error", "failed_precondition")
    assert after.status_code == 200 and [s["session_id"] for s in after.json()["sessions"]] == [sid]


async def test_a_held_lease_is_lost_at_once_when_the_ledger_is_replaced(workspace, tmp_path_factory):
    """A lease held over /ws that the replacing ledger does not have is reported
    `lease_lost` at once (not a third of its ttl later)."""
    other = relay.Store(tmp_path_factory.mktemp("other"))
    commit_ok(other, "RegisterProfile", name="elsewhere", provider="kimi", mode="one-borrow")
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            lease = (await r.ok("Borrow", session_id=sid, holder="A", ttl_seconds=3600))["lease"]
            async with r.ws() as ws:
                await ws_send(ws, type="hold", id=1, lease_id=lease["lease_id"])
                assert (await ws_recv(ws))["type"] == "held"
                os.replace(other.ledger_path, relay.Store(workspace).ledger_path)
                lost = await ws_recv(ws)
    assert (lost["type"], lost["lease_id"]) == ("lease_lost", lease["lease_id"])


@pytest.mark.parametrize("first", ["AppendEvent", "ListEvents"])
async def test_a_commit_or_log_read_notices_the_damage_without_the_watcher(workspace, first):
    """With the watcher idle, the first commit or stream listing that reads the
    damaged ledger ends live streams and makes the in-memory reads refuse."""
    config = relay.Config(watch_interval_seconds=3600)
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            (sid,) = await r.seed()
            assert (await r.client.get("/api/relay/sessions")).status_code == 200
            async with r.sse({"session": sid}) as live:
                await live.until_comment("connected")
                _damage(relay.Store(workspace).ledger_path)
                body = {"kind": "k"} if first == "AppendEvent" else {}
                await r.refused(first, "failed_precondition", session_id=sid, **body)
                farewell = await live.next()
            sessions = await r.client.get("/api/relay/sessions")
    assert (farewell["event"], farewell["data"]["code"]) == ("error", "failed_precondition")
    assert (sessions.status_code, sessions.json()["code"]) == (400, "failed_precondition")
