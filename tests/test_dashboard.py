"""The operator dashboard (``GET /``): its headers, the JSON it is built from
(the RPC description, the overview, the timeline), and, in headless Chromium,
an operator logging in and driving a relay through the generated forms.

The browser tests are slow-marked and reuse ``test_browser``'s launcher
(Debian's chromium, off the network).  They save screenshots under
``$FLOW_ARTIFACTS`` (default ``tests/artifacts/``, not committed).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import relay
import relay_client as rc
from conftest import T0, commit_ok, mutation
from serve_helpers import PATIENCE, FakeClock, serving, state_digest
from test_browser import _rpc, _seeded, browser, relay_process  # noqa: F401 - browser is a fixture

ARTIFACTS = Path(os.environ.get("FLOW_ARTIFACTS") or Path(__file__).parent / "artifacts")
PAGE_FILES = ("/", "/dashboard.js", "/dashboard.css")


def _seed(store: relay.Store, sessions: int = 3) -> None:
    commit_ok(store, "RegisterProfile", name="codex-main", provider="codex", mode="pooled")
    commit_ok(store, "RegisterProfile", name="claude-one", provider="claude", mode="one-borrow")
    for i in range(1, sessions + 1):
        commit_ok(store, "CreateSession", profile="codex-main", session_id=f"s{i}")


# -- the page's files and headers ----------------------------------------------------------


async def test_the_page_files_carry_a_strict_csp_and_need_no_token(workspace):
    """GET /, /dashboard.js and /dashboard.css answer 200 with the strict CSP, nosniff and
    no-referrer even on a relay that requires a token (they hold no data), while the JSON routes
    the page reads stay behind the token; the HTML has no inline script or style and names no
    other origin."""
    secret = _seeded(workspace, token=True)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            files = {p: await r.client.get(p) for p in PAGE_FILES}
            refused = [await r.client.get(p) for p in ("/api/relay/rpcs", "/api/relay/overview",
                                                       "/api/relay/timeline?session=s1")]
            allowed = await r.client.get("/api/relay/rpcs", headers={"Authorization": f"Bearer {secret}"})
    for path, answer in files.items():
        assert answer.status_code == 200, path
        assert answer.headers["Content-Security-Policy"] == relay.DASHBOARD_CSP
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
    csp = dict(part.strip().split(" ", 1) for part in relay.DASHBOARD_CSP.split(";"))
    assert csp == {"default-src": "'self'", "script-src": "'self'", "connect-src": "'self'",
                   "img-src": "'self' data:", "style-src": "'self'", "frame-ancestors": "'none'",
                   "base-uri": "'none'", "form-action": "'self'"}
    assert files["/"].headers["Content-Type"].startswith("text/html")
    assert files["/dashboard.js"].headers["Content-Type"].startswith("text/javascript")
    assert files["/dashboard.css"].headers["Content-Type"].startswith("text/css")
    html = files["/"].text
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/dashboard.js" defer>']
    assert "<style" not in html and " style=" not in html and "javascript:" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", files["/dashboard.js"].text)
    assert "localStorage" not in files["/dashboard.js"].text
    assert [(x.status_code, x.json()["code"]) for x in refused] == [(401, "unauthenticated")] * 3
    assert allowed.status_code == 200


async def test_the_page_is_refused_to_a_foreign_host_or_origin(workspace):
    """Like every route, the page and its JSON answer 403 to a Host that is not the relay's
    address (DNS rebinding) and to a page of another origin."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            port = r.server.endpoint.rsplit(":", 1)[1]
            answers = []
            for path in [*PAGE_FILES, "/api/relay/rpcs", "/api/relay/overview"]:
                answers.append(await r.client.get(path, headers={"Host": f"evil.example:{port}"}))
                answers.append(await r.client.get(path, headers={"Origin": "http://evil.example"}))
            own = await r.client.get("/", headers={"Origin": r.server.endpoint})
    assert [(a.status_code, a.json()["code"]) for a in answers] == [(403, "permission_denied")] * 10
    assert own.status_code == 200


# -- the RPC description ------------------------------------------------------------------


async def test_the_rpc_description_has_every_rpc_with_its_request_fields(workspace):
    """GET /api/relay/rpcs lists every row of relay_client.RPCS in order with its kind, path and
    each request field's JSON type, requiredness, choices, help and id pattern, as the messages
    define them; exactly the mutations named by a destructive verb are destructive."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            doc = (await r.client.get("/api/relay/rpcs")).json()
    assert [row["name"] for row in doc["rpcs"]] == [rpc.name for rpc in rc.RPCS]
    for row, rpc in zip(doc["rpcs"], rc.RPCS, strict=True):
        assert row["kind"] == ("mutation" if rpc.mutates else "read")
        assert row["path"] == rpc.path and row["help"] == rpc.help
        fields = attrs.fields(rpc.request)
        assert [f["name"] for f in row["fields"]] == [f.name for f in fields]
        for described, field in zip(row["fields"], fields, strict=True):
            assert described["required"] is (field.default is attrs.NOTHING)
            assert described.get("choices") == (list(field.metadata["choices"])
                                                 if "choices" in field.metadata else None)
            assert described["help"] == field.metadata.get("help", "")
            if "id" in field.metadata:
                assert re.fullmatch(described["pattern"], "s-1.x") and not re.fullmatch(
                    described["pattern"], "../etc")
    by_name = {row["name"]: row for row in doc["rpcs"]}
    assert {n for n, row in by_name.items() if row["destructive"]} >= {
        "Release", "ReleaseLease", "RevokeLease", "QuarantineSession", "ClearQuarantine"}
    assert not any(by_name[n]["destructive"] for n in ("Borrow", "AppendEvent", "RenewLease",
                                                       "RegisterProfile", "ListSessions"))
    types = {f["name"]: f["type"] for f in by_name["AppendEvent"]["fields"]}
    assert types == {"session_id": "string", "kind": "string", "data": "json",
                     "request_id": "string", "fencing_token": "integer"}
    assert {f["name"]: f["type"] for f in by_name["RegisterProfile"]["fields"]}["command"] == "array"
    assert [f.get("auto") for f in by_name["Borrow"]["fields"]][-1] == "request-id"
    assert "lease.revoked" in doc["feed_kinds"] and "quarantine.set" in doc["feed_kinds"]


def test_a_new_rpc_in_the_table_is_described_with_no_dashboard_code(monkeypatch):
    """An RPC added to relay_client.RPCS (here a made-up destructive CloseSession) appears in the
    description, its fields from its request message: the page needs nothing new to offer it."""

    @attrs.frozen
    class CloseSessionRequest:
        session_id: str = attrs.field(metadata={"flag": "--session", "id": "session"})
        reason: str = attrs.field(default="", metadata={"flag": "--reason", "help": "why"})

    extra = rc.Rpc("CloseSession", CloseSessionRequest, rc.SessionReply, True, ("session", "close"),
                   "close a session for good")
    monkeypatch.setattr(rc, "RPCS", (*rc.RPCS, extra))
    row = relay.rpc_description()["rpcs"][-1]
    assert (row["name"], row["kind"], row["destructive"]) == ("CloseSession", "mutation", True)
    assert row["fields"] == [
        {"name": "session_id", "type": "string", "required": True, "help": "", "id": "session",
         "pattern": rc.ID_PATTERN.pattern},
        {"name": "reason", "type": "string", "required": False, "help": "why", "default": ""}]


# -- the overview and the timeline ----------------------------------------------------------


def test_the_overview_shows_pool_health_leases_quarantines_and_pages(workspace):
    """The overview counts each profile's warm, leased and failed sessions (degraded once one
    fails, its quarantine reason as the last error), gives each session its current lease
    (holder, mode, fencing token, expiry) and quarantine, and pages and filters the list."""
    store = relay.Store(workspace)
    _seed(store, sessions=3)
    lease = commit_ok(store, "Borrow", holder="alice", session_id="s1", ttl_seconds=60).lease
    commit_ok(store, "QuarantineSession", session_id="s2", reason="provider crashed", now=T0 + 1)
    ledger = store.read()
    doc = relay.dashboard_overview(ledger, T0 + 2, limit=2)
    pools = {p["name"]: p["pool"] for p in doc["profiles"]}
    assert pools["codex-main"] == {"health": "degraded", "sessions": 3, "warm": 1, "leased": 1,
                                   "failed": 1, "closed": 0, "last_error": {
                                       "session_id": "s2", "reason": "provider crashed",
                                       "at": relay.iso(T0 + 1)}}
    assert pools["claude-one"]["health"] == "healthy" and pools["claude-one"]["sessions"] == 0
    page = doc["sessions"]
    assert (page["total"], [s["session_id"] for s in page["items"]]) == (3, ["s1", "s2"])
    s1, s2 = page["items"]
    assert {k: s1["lease"][k] for k in ("holder", "mode", "fencing_token", "expires_at")} == {
        "holder": "alice", "mode": "exclusive-write", "fencing_token": lease.fencing_token,
        "expires_at": relay.iso(T0 + 60)}
    assert s1["quarantine"] is None and s2["lease"] is None
    assert (s2["state"], s2["quarantine"]["reason"]) == ("failed", "provider crashed")
    assert [s["session_id"] for s in relay.dashboard_overview(ledger, T0, offset=2)["sessions"]["items"]] == ["s3"]
    assert [s["session_id"] for s in relay.dashboard_overview(ledger, T0, query="ALICE")["sessions"]["items"]] == ["s1"]
    expired = relay.dashboard_overview(ledger, T0 + 61)
    assert expired["sessions"]["items"][0]["lease"] is None  # an expired lease occupies nothing


async def test_the_overview_route_refuses_bad_paging(workspace):
    """Unknown parameters, non-digits and oversized pages are invalid_argument, not a 500."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            answers = [await r.client.get(f"/api/relay/overview?{q}")
                       for q in ("nope=1", "offset=-1", "limit=100000", "profile=../x")]
            timeline = [await r.client.get(f"/api/relay/timeline?{q}")
                        for q in ("session=s9", "session=s1&since=yesterday", "", "session=s1&x=1")]
    assert [(a.status_code, a.json()["code"]) for a in answers] == [(400, "invalid_argument")] * 4
    assert [a.json()["code"] for a in timeline] == ["not_found", "invalid_argument",
                                                     "invalid_argument", "invalid_argument"]


def test_the_timeline_joins_ledger_archive_streams_and_quarantines(workspace):
    """A session's timeline over the last hour has its archived and current leases by holder,
    the turns its streams tell (turn.* events by turn_id, results), and quarantine marks;
    leases that ended before the window are left out."""
    store = relay.Store(workspace)
    _seed(store, sessions=2)
    old = commit_ok(store, "Borrow", holder="early", session_id="s1", now=T0 - 7200).lease
    commit_ok(store, "Release", lease_id=old.lease_id, now=T0 - 7100)
    bob = commit_ok(store, "Borrow", holder="bob", session_id="s1", ttl_seconds=3600,
                    now=T0 - 600).lease
    commit_ok(store, "RevokeLease", lease_id=bob.lease_id, reason="operator", now=T0 - 300)
    ledger = store.read()
    archived = {**relay.to_json(ledger.leases[bob.lease_id]), "lease_id": "L-archived"}
    store.archive("leases", [archived, {**archived, "session_id": "s2", "lease_id": "L-other"}])
    commit_ok(store, "Borrow", holder="carol", session_id="s1", ttl_seconds=3600, now=T0 - 200)
    commit_ok(store, "AppendEvent", session_id="s1", kind="turn.started", data={"turn_id": "t1"},
              now=T0 - 150)
    commit_ok(store, "AppendEvent", session_id="s1", kind="agent.message", data="hi", now=T0 - 140)
    commit_ok(store, "AppendEvent", session_id="s1", kind="turn.failed", data={"turn_id": "t1"},
              now=T0 - 100)
    commit_ok(store, "QuarantineSession", session_id="s1", reason="crash", now=T0 - 90)
    commit_ok(store, "ClearQuarantine", session_id="s1", now=T0 - 30)
    ledger = store.read()
    t = relay.dashboard_timeline(store, ledger, "s1", relay.iso(T0 - 3600), T0)
    assert [(x["holder"], x["state"]) for x in t["leases"]] == [
        ("bob", "revoked"), ("bob", "revoked"), ("carol", "revoked")]
    assert {x["lease_id"] for x in t["leases"]} >= {"L-archived", bob.lease_id}
    assert t["leases"][-1]["reason"].startswith("quarantined")
    assert [(x["turn_id"], x["state"], x["start"], x["end"]) for x in t["turns"]] == [
        ("t1", "failed", relay.iso(T0 - 150), relay.iso(T0 - 100))]
    assert [(m["kind"], m["at"]) for m in t["marks"]] == [
        ("quarantine", relay.iso(T0 - 90)), ("cleared", relay.iso(T0 - 30))]
    assert [e["kind"] for e in t["events"]] == ["turn.started", "agent.message", "turn.failed"]


async def test_the_timeline_route_serves_the_same_document(workspace):
    """GET /api/relay/timeline?session=S is dashboard_timeline for the last hour, read-only."""
    clock = FakeClock()
    store = relay.Store(workspace)
    _seed(store, sessions=1)
    commit_ok(store, "Borrow", holder="alice", session_id="s1", now=clock.t - 60)
    before = state_digest(workspace)
    with trio.fail_after(PATIENCE):
        async with serving(workspace, now=clock) as r:
            before = state_digest(workspace)
            doc = (await r.client.get("/api/relay/timeline?session=s1")).json()
            after = state_digest(workspace)
    assert doc["since"] == relay.iso(clock.t - 3600) and doc["now"] == relay.iso(clock.t)
    assert [(x["holder"], x["state"], x["end"]) for x in doc["leases"]] == [
        ("alice", "active", relay.iso(clock.t))]
    assert after == before
