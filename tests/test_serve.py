"""End-to-end tests of ``python -m relay serve`` over HTTP and SSE.

Each test runs the real server (hypercorn + quart-trio) in-process on
127.0.0.1 port 0 and talks to it over sockets (see ``serve_helpers``).
WebSocket tests are in ``test_serve_ws.py``.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import sys
import threading
import time

import attrs
import httpx2
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import relay
import relay_client as rc
from conftest import ROOT, run_cli
from serve_helpers import (
    JSON,
    PATIENCE,
    FakeClock,
    cli_in_process,
    cli_process,
    metric,
    open_sse,
    serving,
    state_digest,
    ws_recv,
    ws_send,
)

# -- read routes ----------------------------------------------------------------


async def test_health_needs_nothing(workspace):
    """GET /health answers ok on a fresh workspace, with no token and no ledger rows."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            response = await r.client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_status_route_is_the_cli_projection(workspace):
    """/api/relay/status and GetStatus carry exactly the fields of `status --json`."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed(sessions=2)
            await r.ok("Borrow", profile="codex-main", holder="job-1")
            over_http = (await r.client.get("/api/relay/status")).json()
            over_rpc = await r.ok("GetStatus")
            from_cli = await cli_process(workspace, "status")
    assert over_http == over_rpc == from_cli
    assert set(over_http) == {f.name for f in attrs.fields(rc.StatusReply)}
    assert (over_http["status"], over_http["sessions"], over_http["active_leases"]) == ("pass", 2, 1)
    assert over_http["runtime"]["status"] == "serving"
    assert over_http["runtime"]["endpoint"] == r.server.endpoint


async def test_read_routes_list_what_the_rpcs_made(workspace):
    """Profiles, sessions, leases, events and results routes mirror the List RPCs, filters included."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            s1, s2 = await r.seed(sessions=2)
            lease = (await r.ok("GrantLease", session_id=s1, holder="h", mode="shared-read"))["lease"]
            for i in range(5):
                await r.ok("AppendEvent", session_id=s1, kind="note", data={"i": i})
            await r.ok("AppendResult", session_id=s1, kind="done", data=[1, 2])
            get = r.client.get
            profiles = (await get("/api/relay/profiles")).json()
            sessions = (await get("/api/relay/sessions", params={"profile": "codex-main"})).json()
            none = (await get("/api/relay/sessions", params={"state": "failed"})).json()
            leases = (await get("/api/relay/leases", params={"session": s1, "state": "active"})).json()
            events = (await get("/api/relay/events",
                                params={"session": s1, "after": 1, "limit": 2})).json()
            results = (await get("/api/relay/results", params={"session": s1})).json()
            rpc_events = await r.ok("ListEvents", session_id=s1, after=1, limit=2)
    assert [p["name"] for p in profiles["profiles"]] == ["codex-main"]
    assert [s["session_id"] for s in sessions["sessions"]] == [s1, s2]
    assert none["sessions"] == []
    assert [x["lease_id"] for x in leases["leases"]] == [lease["lease_id"]]
    assert events == rpc_events
    assert (events["last_seq"], [e["seq"] for e in events["records"]]) == (5, [2, 3])
    assert [e["data"] for e in events["records"]] == [{"i": 1}, {"i": 2}]
    assert [(x["seq"], x["kind"], x["data"]) for x in results["records"]] == [(1, "done", [1, 2])]


@pytest.mark.parametrize(("path", "params", "status", "code"), [
    ("/api/relay/sessions", {"bogus": "1"}, 400, "invalid_argument"),
    ("/api/relay/events", {"session": "s1", "after": "x"}, 400, "invalid_argument"),
    ("/api/relay/events", {"session": "s1", "limit": "0"}, 400, "invalid_argument"),
    ("/api/relay/events", {"session": "s1", "after": "-1"}, 400, "invalid_argument"),
    ("/api/relay/events", {}, 400, "invalid_argument"),
    ("/api/relay/results", {"session": "nope"}, 404, "not_found"),
    ("/api/relay/leases", {"session": "../etc"}, 400, "invalid_argument"),
    ("/api/relay/nope", {}, 404, "not_found"),
    ("/nope", {}, 404, "not_found"),
])
async def test_read_route_refusals(workspace, path, params, status, code):
    """Bad query parameters, unknown sessions and unknown routes get a Connect error body."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            response = await r.client.get(path, params=params)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert response.json()["message"]


# -- Connect RPCs ----------------------------------------------------------------


async def test_every_rpc_answers_over_connect(workspace):
    """Each RPC in the table works through POST /relay.v1.Relay/<Method> with the JSON codec."""
    called: set[str] = set()
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:

            async def ok(method, **fields):
                called.add(method)
                return await r.ok(method, **fields)

            assert (await ok("RegisterProfile", name="p", provider="codex", mode="pooled",
                             command=["codex", "app-server"]))["outcome"] == "registered"
            sid = (await ok("CreateSession", profile="p"))["session"]["session_id"]
            borrowed = await ok("Borrow", profile="p", holder="job-1", ttl_seconds=60)
            assert (borrowed["outcome"], borrowed["lease"]["session_id"]) == ("granted", sid)
            assert (await ok("Release", lease_id=borrowed["lease"]["lease_id"]))["outcome"] == "released"
            lease = (await ok("GrantLease", session_id=sid, holder="r1", mode="shared-read"))["lease"]
            assert lease["fencing_token"] == 2
            renewed = await ok("RenewLease", lease_id=lease["lease_id"], ttl_seconds=120)
            assert (renewed["outcome"], renewed["lease"]["ttl_seconds"]) == ("renewed", 120)
            assert (await ok("ReleaseLease", lease_id=lease["lease_id"]))["outcome"] == "released"
            lease = (await ok("GrantLease", session_id=sid, holder="w", mode="exclusive-write"))["lease"]
            revoked = await ok("RevokeLease", lease_id=lease["lease_id"], reason="operator")
            assert (revoked["lease"]["state"], revoked["lease"]["revoke_reason"]) == ("revoked", "operator")
            control = await ok("RecordControl", request_id="c-1", session_id=sid, kind="interrupt",
                               payload={"why": "test"})
            assert control["outcome"] == "recorded"
            assert (await ok("AppendEvent", session_id=sid, kind="note", data="x"))["record"]["seq"] == 1
            assert (await ok("AppendResult", session_id=sid, kind="done", data=None))["record"]["seq"] == 1
            held = (await ok("GrantLease", session_id=sid, holder="w2", mode="exclusive-write"))["lease"]
            quarantined = await ok("QuarantineSession", session_id=sid, reason="wedged")
            assert quarantined["revoked_lease_ids"] == [held["lease_id"]]
            recovery = await ok("Recover", session_id=sid)
            assert recovery["sessions"][0]["classification"] == "quarantine_repair"
            assert (await ok("ClearQuarantine", session_id=sid))["outcome"] == "cleared"
            status = await ok("GetStatus")
            assert (status["sessions"], status["control_requests"], status["events"]) == (1, 1, 1)
            assert [p["command"] for p in (await ok("ListProfiles"))["profiles"]] == [["codex", "app-server"]]
            assert (await ok("ListSessions", state="ready"))["sessions"][0]["session_id"] == sid
            states = {x["holder"]: x["state"] for x in (await ok("ListLeases", session_id=sid))["leases"]}
            assert states == {"job-1": "released", "r1": "released", "w": "revoked", "w2": "revoked"}
            assert [x["seq"] for x in (await ok("ListEvents", session_id=sid))["records"]] == [1]
            assert (await ok("ListResults", session_id=sid, after=1))["records"] == []
            assert (await ok("ListTurns", session_id=sid))["turns"] == []
            assert (await ok("ListTasks"))["tasks"] == []
            assert (await ok("CloseSession", session_id=sid))["session"]["state"] == "closed"
    # Starting, interrupting, approving or reading a turn needs a running provider:
    # tests/test_runtime.py calls each of them; the server streams: test_table.
    assert called == {rpc.name for rpc in rc.RPCS if not rpc.streams} - relay.SERVER_RPCS - {"GetTurn"}


async def test_refusals_carry_connect_codes_and_http_statuses(workspace):
    """Every domain refusal is a {code, message} body with Connect's HTTP status for the code."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            lease = (await r.ok("GrantLease", session_id=sid, holder="w", mode="exclusive-write"))["lease"]
            await r.refused("CreateSession", "not_found", profile="nope")
            await r.refused("RenewLease", "not_found", lease_id="lease-999")
            await r.refused("AppendEvent", "not_found", session_id="nope", kind="k")
            await r.refused("RegisterProfile", "already_exists", name="codex-main", provider="codex",
                            mode="one-borrow")
            await r.refused("CreateSession", "already_exists", profile="codex-main", session_id=sid)
            await r.refused("GrantLease", "already_exists", session_id=sid, holder="w",
                            mode="exclusive-write")
            await r.refused("GrantLease", "failed_precondition", session_id=sid, holder="x",
                            mode="shared-read")
            await r.refused("ClearQuarantine", "failed_precondition", session_id=sid)
            await r.refused("Borrow", "resource_exhausted", profile="codex-main", holder="y")
            await r.refused("RegisterProfile", "invalid_argument", name="k", provider="claude",
                            mode="pooled")
            await r.refused("GrantLease", "invalid_argument", session_id=sid, holder="z",
                            mode="shared-read", ttl_seconds=10**9)
            await r.refused("Borrow", "invalid_argument", holder="y")
            await r.refused("RevokeLease", "invalid_argument", lease_id=lease["lease_id"], reason=" ")
            await r.ok("ReleaseLease", lease_id=lease["lease_id"])
            await r.refused("ReleaseLease", "failed_precondition", lease_id=lease["lease_id"])
            await r.ok("RecordControl", request_id="c1", session_id=sid, kind="k", payload=1)
            await r.refused("RecordControl", "already_exists", request_id="c1", session_id=sid,
                            kind="k", payload=2)
            unknown = await r.post("Frobnicate")
            assert (unknown.status_code, unknown.json()["code"]) == (501, "unimplemented")
            wrong_verb = await r.client.get(f"/{rc.SERVICE}/AppendEvent")  # GET: reads only
            assert (wrong_verb.status_code, wrong_verb.headers["Allow"]) == (405, "POST")
            assert wrong_verb.json()["code"] == "invalid_argument"
            late = await r.client.post(f"/{rc.SERVICE}/ListEvents", json={"session_id": sid},
                                       headers={"Connect-Timeout-Ms": "0"})
            assert (late.status_code, late.json()["code"]) == (504, "deadline_exceeded")


async def test_request_id_makes_a_retry_return_the_first_reply(workspace):
    """A retry with the same request_id and body gets the first reply; another body is a conflict."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            first = await r.ok("AppendEvent", session_id=sid, kind="k", data=1, request_id="r-1")
            again = await r.ok("AppendEvent", session_id=sid, kind="k", data=1, request_id="r-1")
            await r.refused("AppendEvent", "already_exists", session_id=sid, kind="k", data=2,
                            request_id="r-1")
            listed = await r.ok("ListEvents", session_id=sid)
    assert first == again
    assert [x["seq"] for x in listed["records"]] == [1]


BAD_BODIES = [
    pytest.param(b"{", id="truncated-json"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(b"[]", id="array"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b'"text"', id="string"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
    pytest.param(b'{"session_id": "s1", "kind": "k", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                 id="deeply-nested-field"),
    pytest.param(b'{"session_id": 7, "kind": "k"}', id="int-for-string"),
    pytest.param(b'{"session_id": ["s1"], "kind": "k"}', id="list-for-string"),
    pytest.param(b'{"session_id": "s1", "kind": true}', id="bool-for-string"),
    pytest.param(b'{"session_id": "s1", "kind": "k", "request_id": null}', id="null-for-string"),
    pytest.param(b'{"session_id": "s1", "kind": "k", "sessionId": "s1"}', id="unknown-field"),
    pytest.param(b'{"kind": "k"}', id="missing-required"),
    pytest.param(b'{"session_id": "../../etc", "kind": "k"}', id="path-id"),
    pytest.param(b'{"session_id": "s1", "kind": "a b"}', id="bad-kind"),
    pytest.param(b'{"session_id": "s1", "kind": "k", "data": NaN}', id="nan"),
    pytest.param(b'{"session_id": "s1", "kind": "k", "data": -Infinity}', id="infinity"),
    pytest.param(b'{"session_id": "s1", "kind": "k", "data": "\\ud800"}', id="lone-surrogate"),
    pytest.param(b'{"session_id": "s1", "kind": "k", "data": {"\\udfff": 1}}', id="lone-surrogate-key"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_malformed_bodies_are_invalid_argument(workspace, body):
    """Malformed JSON, wrong types, unknown fields and unencodable text are invalid_argument, never 5xx."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            response = await r.client.post(f"/{rc.SERVICE}/AppendEvent", content=body, headers=JSON)
            listed = await r.ok("ListEvents", session_id="s1")
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_argument"
    assert listed["records"] == []


@pytest.mark.parametrize("value", ["NaN", "[Infinity]", '"\\ud800"', "[" * 5000 + "]" * 5000])
def test_cli_json_arguments_are_as_strict_as_the_server(workspace, value):
    """`--data` that the server would refuse is a usage error for the CLI too, not an internal error."""
    run_cli(workspace, "profile", "register", "p", "--provider", "codex", "--mode", "pooled")
    run_cli(workspace, "session", "create", "--profile", "p", "--session-id", "s1")
    _, _, err = run_cli(workspace, "event", "append", "--session", "s1", "--kind", "k", "--data", value,
                        check=2)
    assert "not valid JSON" in err


@pytest.mark.parametrize("method", ["RegisterProfile", "CreateSession", "ReleaseLease", "RecordControl",
                                    "QuarantineSession", "ListEvents"])
async def test_lone_surrogates_are_refused_on_every_text_field(workspace, method):
    """A string that cannot be UTF-8 encoded is invalid_argument in any field and poisons no other call."""
    request = rc.RPC_BY_NAME[method].request
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            for field in attrs.fields(request):
                if field.type not in ("str", "tuple[str, ...]"):
                    continue
                value = "\ud800" if field.type == "str" else ["\ud800"]
                body = json.dumps({field.name: value}).encode()
                response = await r.client.post(f"/{rc.SERVICE}/{method}", content=body, headers=JSON)
                assert response.status_code == 400, (field.name, response.text)
            await r.ok("AppendEvent", session_id="s1", kind="k")
    assert relay.Store(workspace).read() is not None


async def test_body_content_type_and_size_are_checked(workspace):
    """A non-JSON content type is 415; a body over max_body_bytes is 413; the connection stays usable."""
    config = relay.Config(max_body_bytes=4096)
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            await r.seed()
            url = f"/{rc.SERVICE}/AppendEvent"
            body = json.dumps({"session_id": "s1", "kind": "k", "data": "x" * 10_000}).encode()
            for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
                response = await r.client.post(url, content=b"{}", headers={"Content-Type": ctype})
                assert (response.status_code, response.json()["code"]) == (415, "invalid_argument")
            big = await r.client.post(url, content=body, headers=JSON)
            assert (big.status_code, big.json()["code"]) == (413, "resource_exhausted")

            async def chunks():
                for _ in range(10):
                    yield body[:1000]

            chunked = await r.client.post(url, content=chunks(), headers=JSON)
            assert (chunked.status_code, chunked.json()["code"]) == (413, "resource_exhausted")
            # Refused early (before the body was read): the same keep-alive
            # client must still be answered, not wedged on a half-read request.
            for size in (2 * 2**20, 700 * 2**10):
                huge = await r.client.post(url, content=b"x" * size, headers=JSON)
                assert huge.status_code == 413
                assert (await r.client.get("/health")).status_code == 200
                odd = await r.client.post(url, content=b"x" * size, headers={"Content-Type": "text/csv"})
                assert odd.status_code == 415
                assert (await r.client.get("/health")).status_code == 200
            assert (await r.ok("AppendEvent", session_id="s1", kind="k", data="small"))["record"]["seq"] == 1


# -- auth ------------------------------------------------------------------------

GUARDED = [
    ("GET", "/api/relay/status", None),
    ("GET", "/api/relay/profiles", None),
    ("GET", "/api/relay/sessions", None),
    ("GET", "/api/relay/leases", None),
    ("GET", "/api/relay/events?session=s1", None),
    ("GET", "/api/relay/results?session=s1", None),
    ("GET", "/metrics", None),
    ("GET", "/events?session=s1&last_event_id=s1:0", None),
    ("POST", f"/{rc.SERVICE}/GetStatus", {}),
    ("POST", f"/{rc.SERVICE}/AppendEvent", {"session_id": "s1", "kind": "k"}),
    ("POST", f"/{rc.SERVICE}/Frobnicate", {}),
    ("GET", "/nope", None),
]


def _bound_token(root):
    """A token created and bound to the runtime with the CLI; returns (id, secret)."""
    cli_in_process(root, "profile", "register", "codex-main", "--provider", "codex", "--mode", "pooled")
    cli_in_process(root, "session", "create", "--profile", "codex-main", "--session-id", "s1")
    made = cli_in_process(root, "token", "create", "--label", "tests")
    cli_in_process(root, "bootstrap", "--token-id", made["token"]["token_id"])
    return made["token"]["token_id"], made["secret"]


async def _send(client, method, path, body, headers):
    if method == "POST":
        return await client.post(path, json=body, headers=headers)
    if path.startswith("/events"):
        async with client.stream("GET", path, headers=headers) as response:
            await response.aread() if response.status_code != 200 else None
            return response
    return await client.get(path, headers=headers)


async def test_bound_token_guards_every_route_but_health(workspace):
    """With a token bound, every route but /health needs the bearer; wrong or missing get the same 401."""
    _, secret = _bound_token(workspace)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            assert (await r.client.get("/health")).status_code == 200
            for method, path, body in GUARDED:
                answers = []
                for headers in ({}, {"Authorization": "Bearer frt_wrong"},
                                {"Authorization": secret}, {"Authorization": f"Basic {secret}"},
                                {"Authorization": f"Bearer {secret}x"}):
                    response = await _send(r.client, method, path, body, headers)
                    answers.append((response.status_code, response.json()))
                assert {a[0] for a in answers} == {401}, (path, answers)
                assert all(a[1] == answers[0][1] for a in answers), (path, answers)
                assert answers[0][1]["code"] == "unauthenticated"
                good = await _send(r.client, method, path, body, {"Authorization": f"Bearer {secret}"})
                assert good.status_code != 401, (path, good.status_code)
            # The handshake by hand: trio-websocket leaks its socket when a
            # handshake is rejected (an unclosed-socket ResourceWarning).
            handshake = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            for auth in ({}, {"Authorization": "Bearer frt_wrong"}):
                async with httpx2.AsyncClient(base_url=r.server.endpoint) as fresh:
                    rejected = await fresh.get("/ws", headers=handshake | auth)
                assert rejected.status_code == 401
                assert rejected.json()["message"] == answers[0][1]["message"]
            async with r.ws(Authorization=f"Bearer {secret}") as ws:
                await ws.send_message(json.dumps({"type": "rpc", "id": 1, "method": "GetStatus"}))
                assert json.loads(await ws.get_message())["type"] == "reply"


async def test_rotated_token_works_through_grace_and_revoked_never(workspace):
    """After `token rotate` old and new tokens both work during the grace; a revoked one never does."""
    old_id, old = _bound_token(workspace)

    async def answer(r, secret):
        response = await r.client.get("/api/relay/status", headers={"Authorization": f"Bearer {secret}"})
        return response.status_code

    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            rotated = await cli_process(workspace, "token", "rotate", "--grace", "300")
            new_id, new = rotated["token"]["token_id"], rotated["secret"]
            await r.server.service.owner.refresh()  # what the ledger watcher does
            assert (await answer(r, old), await answer(r, new)) == (200, 200)
            await cli_process(workspace, "token", "revoke", old_id)
            await r.server.service.owner.refresh()
            assert (await answer(r, old), await answer(r, new)) == (401, 200)
            newest = (await cli_process(workspace, "token", "rotate", "--grace", "0"))["secret"]
            await r.server.service.owner.refresh()
            assert (await answer(r, new), await answer(r, newest)) == (401, 200)
    assert new_id != old_id


@pytest.mark.parametrize(("host", "error"), [
    ("0.0.0.0", rc.InvalidArgument),
    ("::", rc.InvalidArgument),
    ("8.8.8.8", rc.InvalidArgument),
    ("2001:4860:4860::8888", rc.InvalidArgument),
    ("relay.example.com", rc.InvalidArgument),
    ("169.254.1.1", rc.InvalidArgument),
    ("10.0.0.1", rc.FailedPrecondition),
    ("192.168.1.20", rc.FailedPrecondition),
])
async def test_unsafe_hosts_are_refused_before_binding(workspace, host, error):
    """Wildcard, public and non-IP hosts are invalid_argument; tokenless private ones failed_precondition."""
    with trio.fail_after(PATIENCE), pytest.raises(error) as refused:
        await relay.serve(relay.Store(workspace), relay.Config(), host=host, port=0)
    assert host in refused.value.message
    assert relay.Store(workspace).read() is None  # nothing recorded, nothing bound


def test_private_address_with_an_active_token_is_trusted_lan(workspace):
    """The serving rule admits a private-network address once an active token is bound (no binding)."""
    _bound_token(workspace)
    ledger = relay.Store(workspace).read()
    assert relay.require_serving_allowed(ledger, "10.0.0.1") == "trusted-lan"
    assert relay.require_serving_allowed(ledger, "127.0.0.1") == "loopback"
    assert relay.require_serving_allowed(ledger, "::1") == "loopback"


async def test_cli_serve_refuses_a_wildcard_host(workspace):
    """`serve --host 0.0.0.0` exits 1 with the error object, before anything listens."""
    doc = await cli_process(workspace, "serve", "--host", "0.0.0.0", "--port", "0", check=1)
    assert doc["error"]["code"] == "invalid_argument"
    assert "0.0.0.0" in doc["error"]["message"]


# -- SSE -----------------------------------------------------------------------


async def test_sse_replays_after_last_event_id_then_streams_live(workspace):
    """Last-Event-ID S:1 replays seq 2.. with ids S:SEQ, then new appends arrive live, in order, once."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            for i in range(1, 4):
                await r.ok("AppendEvent", session_id=sid, kind="note", data={"i": i})
            async with r.sse({"session": sid}, Last_Event_ID=f"{sid}:1") as stream:
                replayed = await stream.take(2)
                await r.ok("AppendEvent", session_id=sid, kind="note", data={"i": 4})
                await r.ok("AppendEvent", session_id="s1", kind="other", data=None)
                live = await stream.take(2)
    assert [e["id"] for e in replayed + live] == [f"{sid}:{n}" for n in (2, 3, 4, 5)]
    assert {e["event"] for e in replayed + live} == {"event"}
    assert [e["data"]["data"] for e in replayed + live] == [{"i": 2}, {"i": 3}, {"i": 4}, None]
    assert all(e["data"]["session_id"] == sid for e in replayed + live)


async def test_sse_query_cursor_results_stream_and_all_sessions(workspace):
    """?last_event_id= works like the header; stream=results replays results; no filter sees every
    session, each id the vector of every session's position."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            s1, s2 = await r.seed(sessions=2)
            for sid in (s1, s2):
                await r.ok("AppendResult", session_id=sid, kind="done", data=sid)
            async with r.sse({"session": s1, "stream": "results", "last_event_id": f"{s1}:0"}) as stream:
                (first,) = await stream.take(1)
            async with r.sse() as stream:
                await stream.until_comment("connected")
                await r.ok("AppendEvent", session_id=s2, kind="a")
                await r.ok("AppendEvent", session_id=s1, kind="b")
                everywhere = await stream.take(2)
    assert (first["id"], first["event"], first["data"]["data"]) == (f"{s1}:1", "result", s1)
    assert [e["id"] for e in everywhere] == [f"{s2}:1", f"{s1}:1,{s2}:1"]


async def test_sse_delivers_an_event_appended_by_a_cli_process(workspace):
    """`python -m relay event append` in another process reaches an open SSE stream (the ledger watcher)."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            await r.ok("AppendEvent", session_id=sid, kind="mine")
            async with r.sse({"session": sid}, Last_Event_ID=f"{sid}:0") as stream:
                (mine,) = await stream.take(1)
                appended = await cli_process(workspace, "event", "append", "--session", sid,
                                             "--kind", "theirs", "--data", '{"from": "cli"}')
                (theirs,) = await stream.take(1)
    assert mine["id"] == f"{sid}:1"
    assert appended["record"]["seq"] == 2
    assert (theirs["id"], theirs["data"]["kind"], theirs["data"]["data"]) == (
        f"{sid}:2", "theirs", {"from": "cli"})


async def test_cursors_from_another_process_are_not_ahead(workspace):
    """An id a CLI process was just given (a seq, a ledger revision) resumes a stream; it is not ahead."""
    config = relay.Config(watch_interval_seconds=3600)  # the watcher would only hide the race
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            (sid,) = await r.seed()
            appended = await cli_process(workspace, "event", "append", "--session", sid, "--kind", "cli")
            seq = appended["record"]["seq"]
            async with r.sse({"session": sid}, Last_Event_ID=f"{sid}:{seq}") as stream:
                await stream.until_comment("connected")
                await r.ok("AppendEvent", session_id=sid, kind="http")
                (after,) = await stream.take(1)
            granted = await cli_process(workspace, "lease", "grant", "--session", sid, "--holder", "cli",
                                        "--mode", "shared-read")
            revision = (await cli_process(workspace, "status"))["revision"]
            async with r.sse({"feed": "relay"}, Last_Event_ID=f"{revision}.0") as feed:
                await feed.until_comment("connected")
                await r.ok("RevokeLease", lease_id=granted["lease"]["lease_id"], reason="r")
                (notice,) = await feed.take(1)
    assert (seq, after["id"]) == (1, f"{sid}:2")
    assert (notice["event"], notice["data"]["lease_id"]) == ("lease.revoked", granted["lease"]["lease_id"])


@pytest.mark.parametrize(("params", "last_id", "code"), [
    ({"session": "s1"}, "garbage", "invalid_argument"),
    ({"session": "s1"}, "s1:x", "invalid_argument"),
    ({"session": "s1"}, "s1:-2", "invalid_argument"),
    ({"session": "s1"}, "s2:1", "invalid_argument"),
    ({}, "s1:3", "out_of_range"),
    ({}, "s1:1,ghost:1", "not_found"),
    ({"session": "ghost"}, "ghost:0", "not_found"),
    ({"session": "s1"}, "s1:3", "out_of_range"),
    ({"session": "s1", "stream": "results"}, "s1:1", "out_of_range"),
    ({"session": "s1", "stream": "logs"}, "", "invalid_argument"),
    ({"feed": "relay"}, "x.y", "invalid_argument"),
    ({"feed": "relay"}, "999999.0", "out_of_range"),
    ({"feed": "gossip"}, "", "invalid_argument"),
])
async def test_sse_bad_cursor_gets_an_error_event(workspace, params, last_id, code):
    """A malformed, unknown-session or ahead-of-stream Last-Event-ID is refused with an HTTP error
    status and a Connect error body before any stream starts (a browser's EventSource then stops)."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            await r.ok("AppendEvent", session_id="s1", kind="k")
            await r.ok("AppendEvent", session_id="s1", kind="k")
            headers = {"Last_Event_ID": last_id} if last_id else {}
            async with r.sse(params, **headers) as stream:
                status, ctype, error = stream.status, stream.headers["content-type"], await stream.body()
    assert (status, ctype) == (rc.Code(code).http_status, "application/json")
    assert json.loads(error)["code"] == code
    assert json.loads(error)["message"]


async def test_sse_idle_stream_gets_keepalive_comments(workspace):
    """An idle stream carries comment keep-alives so proxies do not cut it."""
    config = relay.Config(sse_keepalive_seconds=0.05)
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            async with r.sse({"feed": "relay"}) as stream:
                await stream.until_comment("keep-alive")


async def test_relay_feed_announces_lease_and_quarantine_notices(workspace):
    """?feed=relay carries lease and quarantine notices with REVISION.INDEX ids, and resumes from one."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            async with r.sse({"feed": "relay"}) as feed:
                await feed.until_comment("connected")
                a = (await r.ok("GrantLease", session_id=sid, holder="a", mode="shared-read"))["lease"]
                await r.ok("ReleaseLease", lease_id=a["lease_id"])
                b = (await r.ok("GrantLease", session_id=sid, holder="b", mode="shared-read"))["lease"]
                await r.ok("RevokeLease", lease_id=b["lease_id"], reason="ops")
                c = (await r.ok("GrantLease", session_id=sid, holder="c", mode="exclusive-write"))["lease"]
                q = await r.ok("QuarantineSession", session_id=sid, reason="wedged")
                await r.ok("ClearQuarantine", session_id=sid)
                await r.ok("AppendEvent", session_id=sid, kind="not-a-notice")
                notices = await feed.take(8)
            resume_from = notices[3]["id"]
            async with r.sse({"feed": "relay"}, Last_Event_ID=resume_from) as response:
                resumed = await response.take(4)
    kinds = [(n["event"], n["data"].get("lease_id") or n["data"].get("session_id")) for n in notices]
    assert kinds == [
        ("lease.granted", a["lease_id"]), ("lease.released", a["lease_id"]),
        ("lease.granted", b["lease_id"]), ("lease.revoked", b["lease_id"]),
        ("lease.granted", c["lease_id"]), ("lease.revoked", c["lease_id"]),
        ("quarantine.set", sid), ("quarantine.cleared", sid)]
    assert notices[5]["data"]["reason"] == "quarantined: wedged"
    assert notices[6]["id"].split(".")[0] == notices[5]["id"].split(".")[0] == str(q["revision"])
    assert [n["id"].split(".")[1] for n in notices[5:7]] == ["0", "1"]
    assert resumed == notices[4:8]


async def test_relay_feed_resumes_from_a_status_revision(workspace):
    """A feed cursor REVISION.0 taken from GetStatus replays every notice committed after that revision."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            before = (await r.ok("GetStatus"))["revision"]
            lease = (await r.ok("GrantLease", session_id=sid, holder="a", mode="shared-read"))["lease"]
            await r.ok("ReleaseLease", lease_id=lease["lease_id"])
            async with r.sse({"feed": "relay"}, Last_Event_ID=f"{before}.0") as feed:
                replayed = await feed.take(2)
            async with r.sse({"feed": "relay"}, Last_Event_ID="0.0") as feed:
                everything = await feed.take(3)
    assert [n["event"] for n in replayed] == ["lease.granted", "lease.released"]
    assert [n["event"] for n in everything] == ["runtime.served", "lease.granted", "lease.released"]


def test_feed_history_refuses_only_cursors_behind_what_it_dropped():
    """The feed replays from any cursor not behind its start or its newest dropped notice, no other."""
    hub = relay.EventHub(feed_history=3)
    hub.feed_base = 10
    for revision in (11, 12, 12, 14):
        hub.notice(revision, "lease.granted", {"revision": revision})
    assert [f.id for f in hub.feed_after(11, 0)] == ["12.0", "12.1", "14.0"]
    assert [f.id for f in hub.feed_after(13, 0)] == ["14.0"]
    assert hub.feed_after(14, 0) == []
    assert hub.feed_after(10, 5) is None  # 11.0 was dropped
    assert hub.feed_after(9, 0) is None  # from before this server started


async def test_relay_feed_announces_expiry_and_cli_changes(workspace):
    """The reaper's expiry and a grant made by a CLI process both appear on the relay feed."""
    clock = FakeClock(time.time())  # the CLI process below stamps its grant with the real clock
    config = relay.Config(reaper_interval_seconds=0.01, watch_interval_seconds=0.01)
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config, now=clock) as r:
            s1, s2 = await r.seed(sessions=2)
            async with r.sse({"feed": "relay"}) as feed:
                await feed.until_comment("connected")
                lease = (await r.ok("GrantLease", session_id=s1, holder="h", mode="shared-read",
                                    ttl_seconds=5))["lease"]
                granted = await feed.next()
                clock.advance(5)
                expired = await feed.next()
                other = await cli_process(workspace, "lease", "grant", "--session", s2, "--holder", "cli",
                                          "--mode", "exclusive-write", "--ttl", "3600")
                from_cli = await feed.next()
    assert (granted["event"], granted["data"]["lease_id"]) == ("lease.granted", lease["lease_id"])
    assert (expired["event"], expired["data"]["lease_id"]) == ("lease.expired", lease["lease_id"])
    assert expired["data"]["state"] == "expired"
    assert relay.Store(workspace).read().leases[lease["lease_id"]].state == "expired"
    assert (from_cli["event"], from_cli["data"]["lease_id"]) == ("lease.granted", other["lease"]["lease_id"])


# -- group commit, metrics -------------------------------------------------------


async def test_concurrent_appends_are_group_committed(workspace):
    """64 concurrent AppendEvent calls all succeed with seq 1..64, committed in batches larger than one."""
    replies = []
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()

            async def append(i):
                replies.append(await r.ok("AppendEvent", session_id=sid, kind="k", data=i))

            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(append, i)
            metrics = (await r.client.get("/metrics")).text
            listed = await r.ok("ListEvents", session_id=sid, limit=100)
    assert sorted(x["record"]["seq"] for x in replies) == list(range(1, 65))
    assert sorted(x["data"] for x in listed["records"]) == list(range(64))
    commits = metric(metrics, "relay_commit_batch_size_count")
    singles = metric(metrics, "relay_commit_batch_size_bucket", le="1.0")
    assert metric(metrics, "relay_commit_batch_size_sum") >= 64 + 3
    assert commits > singles, "no group commit took more than one mutation"


async def test_metrics_expose_requests_commits_leases_and_subscribers(workspace):
    """/metrics has requests by route and code, commit latency, active leases and subscribers."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            await r.ok("GrantLease", session_id=sid, holder="h", mode="shared-read")
            await r.client.get("/api/relay/nope")
            async with r.sse({"session": sid}) as response:
                await response.until_comment("connected")
                async with r.ws() as ws:
                    await ws.send_message(json.dumps({"type": "subscribe", "feed": "relay"}))
                    await ws.send_message(json.dumps({"type": "rpc", "id": 1, "method": "GetStatus"}))
                    await ws.get_message()
                    response = await r.client.get("/metrics")
    text = response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert metric(text, "relay_requests_total", route=f"/{rc.SERVICE}/<method>", code="200") == 3
    assert metric(text, "relay_requests_total", route="/api/relay/<name>", code="404") == 1
    assert metric(text, "relay_commit_seconds_count") >= 3
    assert metric(text, "relay_active_leases") == 1
    assert metric(text, "relay_subscribers", kind="sse") == 1
    assert metric(text, "relay_subscribers", kind="ws") == 1


# -- shutdown --------------------------------------------------------------------


async def test_stop_ends_open_streams_and_records_shutdown(workspace):
    """server.stop() ends an open SSE stream, serve returns, and the runtime is recorded stopped."""
    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(
                relay.serve, relay.Store(workspace), relay.Config(), host="127.0.0.1", port=0))
            async with open_sse(server.endpoint, {"feed": "relay"}) as stream:
                await stream.until_comment("connected")
                server.stop()
                assert await stream.next() is None  # ended by stop(), not by a cancellation
        # serve() has returned by itself: nothing cancelled the nursery.
        assert not nursery.cancel_scope.cancel_called
    runtime = relay.Store(workspace).read().runtime
    assert (runtime.status, runtime.pid) == ("stopped", 0)
    assert runtime.shutdown_at >= runtime.served_at


@pytest.mark.parametrize(("sig", "as_json"), [(signal.SIGTERM, False), (signal.SIGINT, True)])
async def test_cli_serve_stops_cleanly_on_a_signal(workspace, sig, as_json):
    """`python -m relay serve --port 0` prints its endpoint, serves, and exits 0 on SIGTERM/SIGINT."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "relay", "--root", str(workspace), "serve", "--port", "0"]
    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(functools.partial(
                trio.run_process, [*argv, "--json"] if as_json else argv,
                stdout=-1, check=False, env=env))
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "serve exited before printing its endpoint"
                line += chunk
            text = line.decode()
            endpoint = json.loads(text)["endpoint"] if as_json else text.removeprefix("serving on ").strip()
            assert text.startswith("{" if as_json else "serving on http://127.0.0.1:")
            async with httpx2.AsyncClient(base_url=endpoint, timeout=PATIENCE) as client:
                assert (await client.get("/health")).json() == {"status": "ok"}
                served = (await client.get("/api/relay/status")).json()["runtime"]
            proc.send_signal(sig)
            await proc.wait()
    assert proc.returncode == 0
    assert (served["status"], served["pid"], served["endpoint"]) == ("serving", proc.pid, endpoint)
    runtime = relay.Store(workspace).read().runtime
    assert (runtime.status, runtime.endpoint) == ("stopped", endpoint)


# -- reads change nothing --------------------------------------------------------


async def test_read_routes_and_replays_leave_flow_state_untouched(workspace):
    """Read routes and RPCs, /metrics, SSE and WebSocket replays leave flow/state byte-identical."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            s1, s2 = await r.seed(sessions=2)
            await r.ok("GrantLease", session_id=s1, holder="h", mode="shared-read")
            await r.ok("RecordControl", request_id="c1", session_id=s1, kind="k", payload=[1])
            for i in range(3):
                await r.ok("AppendEvent", session_id=s1, kind="k", data=i)
                await r.ok("AppendResult", session_id=s2, kind="k", data=i)
            await r.ok("QuarantineSession", session_id=s2, reason="r")
            before = state_digest(workspace)
            paths = ["/health", "/api/relay/status", "/api/relay/profiles", "/api/relay/sessions",
                     "/api/relay/leases", f"/api/relay/events?session={s1}",
                     f"/api/relay/results?session={s2}&after=1&limit=1", "/metrics"]
            for path in paths:
                assert (await r.client.get(path)).status_code == 200, path
            for name, rpc in rc.RPC_BY_NAME.items():
                if not rpc.mutates and not rpc.streams and name != "GetTurn":  # GetTurn: test_runtime
                    fields = {"session_id": s1} if "session_id" in {
                        f.name for f in attrs.fields(rpc.request)} else {}
                    await r.ok(name, **fields)
            for params, last in (({"session": s1}, f"{s1}:0"),
                                 ({"session": s2, "stream": "results"}, f"{s2}:1"),
                                 ({"feed": "relay"}, "0.0")):
                async with r.sse(params, Last_Event_ID=last) as stream:
                    assert (await stream.next())["event"] != "error"
            async with r.ws() as ws:
                await ws_send(ws, type="subscribe", session=s1, last_event_id=f"{s1}:1")
                await ws_send(ws, type="rpc", id=1, method="ListEvents", request={"session_id": s1})
                frames = [await ws_recv(ws) for _ in range(3)]
                assert {f["type"] for f in frames} == {"event", "reply"}
            after = state_digest(workspace)
    assert len(before) == 5  # the ledger, its journal, two stream logs and a request-log shard
    assert after == before


# -- robustness ------------------------------------------------------------------


@pytest.fixture(scope="module")
def threaded_relay(tmp_path_factory):
    """One relay served from a background thread's trio run, for sync hypothesis tests."""
    root = tmp_path_factory.mktemp("robust")
    cli_in_process(root, "profile", "register", "codex-main", "--provider", "codex", "--mode", "pooled")
    cli_in_process(root, "session", "create", "--profile", "codex-main", "--session-id", "s1")
    cli_in_process(root, "lease", "grant", "--session", "s1", "--holder", "h", "--mode", "shared-read")
    started: queue.Queue = queue.Queue()

    async def main():
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(
                relay.serve, relay.Store(root), relay.Config(), host="127.0.0.1", port=0))
            started.put((server, trio.lowlevel.current_trio_token()))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    server, token = started.get(timeout=PATIENCE)
    with httpx2.Client(base_url=server.endpoint, timeout=PATIENCE) as client:
        yield root, client
    trio.from_thread.run_sync(server.stop, trio_token=token)
    thread.join(PATIENCE)
    assert not thread.is_alive()


IDS = st.sampled_from(["s1", "s2", "codex-main", "lease-3", "lease-999", "h", "c-1", "", ".x", "a" * 129,
                       "\ud800", "x\udfff"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELD_VALUES = IDS | JSON_VALUES | st.integers(min_value=-(2**70), max_value=2**70)


@st.composite
def rpc_bodies(draw):
    """A method (real or not) and a body: a near-valid object, any JSON value, or raw bytes."""
    name = draw(st.sampled_from([*rc.RPC_BY_NAME, "Nope"]))
    request = rc.RPC_BY_NAME[name].request if name in rc.RPC_BY_NAME else rc.GetStatusRequest
    names = [f.name for f in attrs.fields(request)]
    kind = draw(st.sampled_from(["fields", "fields", "value", "bytes"]))
    if kind == "bytes":
        return name, draw(st.binary(max_size=64))
    if kind == "value":
        return name, json.dumps(draw(JSON_VALUES)).encode()
    body = draw(st.dictionaries(st.sampled_from(names or ["x"]), FIELD_VALUES, max_size=len(names) + 1))
    if draw(st.booleans()):
        body[draw(st.text(min_size=1, max_size=8))] = draw(FIELD_VALUES)
    return name, json.dumps(body).encode()


@settings(max_examples=250, deadline=None)
@given(call=rpc_bodies())
def test_random_bodies_never_get_a_5xx(threaded_relay, call):
    """Randomized and malformed bodies to every RPC get a 200 or a 4xx Connect error, never a 5xx."""
    _, client = threaded_relay
    name, body = call
    response = client.post(f"/{rc.SERVICE}/{name}", content=body, headers=JSON)
    doc = response.json()
    if name not in rc.RPC_BY_NAME or rc.RPC_BY_NAME[name].streams:  # 501 by Connect's mapping
        assert doc["code"] in ("unimplemented", "invalid_argument"), doc
    else:
        assert response.status_code < 500, (name, body, response.text)
    if response.status_code != 200:
        assert set(doc) >= {"code", "message"}, doc
        assert rc.Code(doc["code"]).http_status == response.status_code


@settings(max_examples=3, deadline=None)
@given(calls=st.lists(rpc_bodies(), min_size=30, max_size=30))
def test_server_and_ledger_survive_random_bodies(threaded_relay, calls):
    """After a run of random bodies of its own (whatever other tests sent) the
    server still answers, and the ledger decodes and passes the gate."""
    root, client = threaded_relay
    for name, body in calls:
        client.post(f"/{rc.SERVICE}/{name}", content=body, headers=JSON)
    assert client.get("/health").json() == {"status": "ok"}
    assert client.post(f"/{rc.SERVICE}/GetStatus", json={}).json()["status"] == "pass"
    store = relay.Store(root)
    assert store.read() is not None
    assert relay.status(store, time.time()).status == "pass"
    failed = [(c.id, c.evidence) for c in relay.gate(store, relay.Config()) if c.result == "fail"]
    assert failed == []


async def test_list_filters_refuse_unknown_values(workspace):
    """A list route's choice filter outside its choices is invalid_argument, as the
    CLI refuses it, not an empty list."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            bad = await r.client.get("/api/relay/leases", params={"state": "sleepy"})
            good = await r.client.get("/api/relay/leases", params={"state": "active"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"
    assert "sleepy" in bad.json()["message"]
    assert good.status_code == 200 and good.json()["leases"] == []


async def test_long_replay_arrives_whole_in_chunks(workspace):
    """A replay longer than one read chunk arrives complete, in order, once, over SSE and
    the WebSocket (which sends it with back-pressure instead of overflowing)."""
    total = 2 * relay.REPLAY_CHUNK + 7
    store, config = relay.Store(workspace), relay.Config()
    with trio.fail_after(PATIENCE * 4):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            mutations = [relay.rpc_mutation("AppendEvent", rc.AppendRecordRequest(sid, "k", i))
                         for i in range(1, total + 1)]
            await trio.to_thread.run_sync(relay.commit, store, mutations, config)
            async with r.sse({"session": sid}, Last_Event_ID=f"{sid}:0") as stream:
                sse = await stream.take(total)
            async with r.ws() as ws:
                await ws_send(ws, type="subscribe", session=sid, last_event_id=f"{sid}:0")
                frames = [await ws_recv(ws) for _ in range(total)]
    assert [e["id"] for e in sse] == [f"{sid}:{n}" for n in range(1, total + 1)]
    assert [f["id"] for f in frames] == [f"{sid}:{n}" for n in range(1, total + 1)]
    assert [f["data"]["data"] for f in frames] == list(range(1, total + 1))
