"""The browser door: Host and Origin checks, CORS, the login cookie, and SSE
streams a browser can resume (ids, refusals, ``retry:``).

Servers run in-process on 127.0.0.1 port 0 (see ``serve_helpers``); the same
behaviour driven by a real Chromium is in ``test_browser.py``.
"""

from __future__ import annotations

import json
import time

import httpx2
import pytest
import trio

import relay
import relay_client as rc
from conftest import mutation
from serve_helpers import (
    PATIENCE,
    FakeClock,
    cli_process,
    metric,
    serving,
    state_digest,
    ws_recv,
    ws_send,
    ws_until,
)
from test_serve import _bound_token

HANDSHAKE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def _hostport(r) -> str:
    return r.server.endpoint.removeprefix("http://")


async def _raw(r, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> httpx2.Response:
    """One request on a fresh connection with exactly these headers (Host included)."""
    async with httpx2.AsyncClient(base_url=r.server.endpoint, timeout=PATIENCE) as fresh:
        return await fresh.request(method, path, headers=headers, content=body)


def _append(session: str = "s1") -> tuple[str, bytes]:
    return f"/{rc.SERVICE}/AppendEvent", json.dumps({"session_id": session, "kind": "k"}).encode()


JSON_CT = {"Content-Type": "application/json"}

# -- Host ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1:1",
                                  "localhost.evil.example:{port}", "[::1]:{port}", "10.0.0.1:{port}",
                                  "127.0.0.1:{port}@evil", ""])
async def test_a_host_that_is_not_the_served_address_is_refused_before_any_work(workspace, host):
    """DNS rebinding: a Host naming anything but the served address gets 403 permission_denied on
    every route but /health (mutations, reads, SSE, the WebSocket upgrade), and nothing is written."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            before = state_digest(workspace)
            port = _hostport(r).rsplit(":", 1)[1]
            hdr = {"Host": host.format(port=port)}
            path, body = _append()
            answers = [await _raw(r, "POST", path, hdr | JSON_CT, body),
                       await _raw(r, "GET", "/api/relay/status", hdr),
                       await _raw(r, "GET", "/events?session=s1", hdr),
                       await _raw(r, "GET", "/ws", hdr | HANDSHAKE),
                       await _raw(r, "GET", "/nope", hdr)]
            health = await _raw(r, "GET", "/health", hdr)
            assert state_digest(workspace) == before
            metrics = (await r.client.get("/metrics")).text
    assert [(a.status_code, a.json()["code"]) for a in answers] == [(403, "permission_denied")] * 5
    assert "allowed_hosts" in answers[0].json()["hint"]
    assert health.status_code == 200
    assert metric(metrics, "relay_requests_total", route="door", code="403") == 5


async def test_the_served_address_localhost_and_listed_hosts_are_accepted(workspace):
    """127.0.0.1:PORT and localhost:PORT reach the routes; a name listed in [serve] allowed_hosts
    does too (bare: any port; name:port: that port only)."""
    config = relay.Config(allowed_hosts=("relay.internal", "box.lan:8443"))
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            port = _hostport(r).rsplit(":", 1)[1]
            codes = {host: (await _raw(r, "GET", "/api/relay/status", {"Host": host})).status_code
                     for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}",
                                  "relay.internal", "relay.internal:80", "box.lan:8443", "box.lan:1")}
    assert codes == {f"127.0.0.1:{port}": 200, f"localhost:{port}": 200, f"LOCALHOST:{port}": 200,
                     "relay.internal": 200, "relay.internal:80": 200, "box.lan:8443": 200,
                     "box.lan:1": 403}


def test_host_allowed_names_the_address_the_connection_arrived_on():
    """The Host rule as a pure function: the local address and port of the connection, localhost
    only on loopback, IPv6 in brackets, the scheme's default port when none is given."""
    none: frozenset[str] = frozenset()
    assert relay.host_allowed("[::1]:9", ("::1", 9), "http", none)
    assert relay.host_allowed("localhost:9", ("::1", 9), "http", none)
    assert not relay.host_allowed("localhost:9", ("192.168.1.5", 9), "http", none)
    assert relay.host_allowed("192.168.1.5:9", ("192.168.1.5", 9), "http", none)
    assert relay.host_allowed("127.0.0.1", ("127.0.0.1", 80), "http", none)
    assert not relay.host_allowed("127.0.0.1", ("127.0.0.1", 443), "http", none)
    assert not relay.host_allowed("127.0.0.2:9", ("127.0.0.1", 9), "http", none)


# -- Origin and CORS -----------------------------------------------------------------------


async def test_a_page_from_another_origin_cannot_mutate_read_stream_or_open_a_socket(workspace):
    """A request carrying a foreign Origin (another loopback port, a rebinding name, a sandbox's
    null) is refused 403 with no CORS header; nothing is written."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            before = state_digest(workspace)
            host = {"Host": _hostport(r)}
            path, body = _append()
            answers = []
            for origin in ("http://127.0.0.1:1", f"http://evil.example:{_hostport(r).rsplit(':')[1]}",
                           "null", f"https://{_hostport(r)}"):
                hdr = host | {"Origin": origin}
                answers += [await _raw(r, "POST", path, hdr | JSON_CT, body),
                            await _raw(r, "POST", path, hdr | {"Content-Type": "text/plain"}, body),
                            await _raw(r, "GET", "/api/relay/status", hdr),
                            await _raw(r, "GET", "/events?session=s1", hdr),
                            await _raw(r, "GET", "/ws", hdr | HANDSHAKE),
                            await _raw(r, "POST", "/auth/session", hdr)]
            cross_site = await _raw(r, "POST", path, host | JSON_CT | {"Sec-Fetch-Site": "same-site"}, body)
            assert state_digest(workspace) == before
    assert {(a.status_code, a.json()["code"]) for a in answers} == {(403, "permission_denied")}
    assert not any("access-control-allow-origin" in a.headers for a in answers)
    assert (cross_site.status_code, cross_site.json()["code"]) == (403, "permission_denied")


async def test_the_relays_own_origin_may_drive_it_and_gets_no_cors_for_others(workspace):
    """A page served from the relay's own origin passes (mutation included); a preflight from a
    foreign origin is refused and gets no Access-Control-Allow-Origin."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            own = {"Host": _hostport(r), "Origin": r.server.endpoint, "Sec-Fetch-Site": "same-origin"}
            path, body = _append()
            mutated = await _raw(r, "POST", path, own | JSON_CT, body)
            preflight = await _raw(r, "OPTIONS", path, {
                "Host": _hostport(r), "Origin": "http://127.0.0.1:1",
                "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert mutated.status_code == 200, mutated.text
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers


async def test_a_listed_origin_gets_preflights_and_cors_headers(workspace):
    """An origin in [serve] allowed_origins gets a 204 preflight naming the methods and the headers
    Connect clients send, and its responses carry Access-Control-Allow-Origin and exposed headers."""
    config = relay.Config(allowed_origins=("http://dash.example:3000",))
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            hdr = {"Host": _hostport(r), "Origin": "http://dash.example:3000"}
            preflight = await _raw(r, "OPTIONS", f"/{rc.SERVICE}/GetStatus", hdr | {
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,connect-protocol-version"})
            reply = await _raw(r, "POST", f"/{rc.SERVICE}/GetStatus", hdr | JSON_CT, b"{}")
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://dash.example:3000"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    for name in ("content-type", "connect-protocol-version", "connect-timeout-ms", "authorization"):
        assert name in allowed
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == "http://dash.example:3000"
    assert "connect-content-encoding" in reply.headers["access-control-expose-headers"].lower()
    assert "Origin" in [v.strip() for v in reply.headers["vary"].split(",")]


# -- the login cookie ------------------------------------------------------------------------


async def _login(r, **how: str) -> httpx2.Response:
    headers = {"Host": _hostport(r)}
    body = b""
    if "header" in how:
        headers["Authorization"] = how["header"]
    if "token" in how:
        body, headers["Content-Type"] = json.dumps({"token": how["token"]}).encode(), "application/json"
    return await _raw(r, "POST", "/auth/session", headers, body)


def _cookie_of(response: httpx2.Response) -> tuple[str, str, str]:
    """(name, value, attributes) of the one Set-Cookie."""
    (header,) = response.headers.get_list("set-cookie")
    pair, _, attributes = header.partition(";")
    name, _, value = pair.partition("=")
    return name, value, attributes


async def test_login_sets_an_httponly_strict_cookie_that_is_not_the_token(workspace):
    """POST /auth/session with the bearer (header, any scheme case, or JSON body) answers a
    HttpOnly; SameSite=Strict; Path=/ cookie, not Secure over plain HTTP, holding a signed value
    that names the token id and never contains the secret; a wrong token gets 401 and no cookie."""
    token_id, secret = _bound_token(workspace)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            by_header = await _login(r, header=f"bearer {secret}")
            by_body = await _login(r, token=secret)
            wrong = await _login(r, token="frt_wrong")
            nothing = await _login(r)
    name, value, attributes = _cookie_of(by_header)
    port = r.server.endpoint.rsplit(":", 1)[1]
    assert name == f"relay_session_{port}"
    assert secret not in value and value.startswith(f"{token_id}.")
    flags = {a.strip().split("=")[0].lower(): a.strip() for a in attributes.split(";")}
    assert {"httponly", "path", "samesite", "max-age"} <= set(flags) and "secure" not in flags
    assert (flags["path"], flags["samesite"]) == ("Path=/", "SameSite=Strict")
    assert int(flags["max-age"].split("=")[1]) == relay.SESSION_COOKIE_SECONDS
    assert by_header.json()["token_id"] == token_id and by_body.status_code == 200
    assert (wrong.status_code, wrong.json()["code"]) == (401, "unauthenticated")
    assert (nothing.status_code, "set-cookie" in wrong.headers) == (401, False)


async def test_the_cookie_stands_in_for_the_bearer_on_http_sse_and_websocket(workspace):
    """With the login cookie and no Authorization header, reads, mutations, SSE and the WebSocket
    upgrade are served; without it they get 401."""
    _, secret = _bound_token(workspace)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            name, value, _ = _cookie_of(await _login(r, token=secret))
            jar = {"Host": _hostport(r), "Cookie": f"{name}={value}"}
            path, body = _append()
            with_cookie = [await _raw(r, "GET", "/api/relay/status", jar),
                           await _raw(r, "POST", path, jar | JSON_CT, body)]
            async with r.sse({"session": "s1"}, Cookie=f"{name}={value}") as stream:
                sse_status = stream.status
            async with r.ws(Cookie=f"{name}={value}") as ws:
                await ws.send_message(json.dumps({"type": "rpc", "id": 1, "method": "GetStatus"}))
                ws_reply = json.loads(await ws.get_message())
            without = [await _raw(r, "GET", "/api/relay/status", {"Host": _hostport(r)}),
                       await _raw(r, "GET", "/ws", {"Host": _hostport(r)} | HANDSHAKE)]
    assert [x.status_code for x in with_cookie] == [200, 200]
    assert sse_status == 200 and ws_reply["type"] == "reply"
    assert [x.status_code for x in without] == [401, 401]


async def test_a_session_ends_with_its_token_its_expiry_a_logout_or_a_forgery(workspace):
    """The cookie stops working once its token is revoked or rotated past the grace, once it expires,
    after logout (even if a copy is replayed), and when its value or MAC is altered."""
    token_id, secret = _bound_token(workspace)
    clock = FakeClock(time.time())

    async def status(r, cookie: str) -> int:
        name = f"relay_session_{r.server.endpoint.rsplit(':', 1)[1]}"
        hdr = {"Host": _hostport(r), "Cookie": f"{name}={cookie}"}
        return (await _raw(r, "GET", "/api/relay/status", hdr)).status_code

    with trio.fail_after(PATIENCE):
        async with serving(workspace, now=clock) as r:
            _, first, _ = _cookie_of(await _login(r, token=secret))
            body, _, mac = first.rpartition(".")
            _, expires, nonce = body.split(".")
            forged = [f"{body}.{'0' * len(mac)}", f"tok-999.{expires}.{nonce}.{mac}",
                      f"{token_id}.{int(expires) + 9}.{nonce}.{mac}", f"{token_id}.{expires}.{mac}",
                      secret, ""]
            assert await status(r, first) == 200
            assert [await status(r, x) for x in forged] == [401] * len(forged)
            # The CLI rotates on the real clock; the server's starts at it (see above).
            rotated = await cli_process(workspace, "token", "rotate", "--grace", "60")
            await r.server.service.owner.refresh()
            assert await status(r, first) == 200  # inside the grace
            clock.advance(120)
            assert await status(r, first) == 401
            _, second, _ = _cookie_of(await _login(r, token=rotated["secret"]))
            clock.advance(relay.SESSION_COOKIE_SECONDS + 1)
            assert await status(r, second) == 401
            _, third, _ = _cookie_of(await _login(r, token=rotated["secret"]))
            _, copy, _ = _cookie_of(await _login(r, token=rotated["secret"]))
            logout = await _raw(r, "DELETE", "/auth/session", {
                "Host": _hostport(r), "Cookie": f"relay_session_{_hostport(r).rsplit(':')[1]}={third}"})
            assert logout.status_code == 200 and "Max-Age=0" in logout.headers["set-cookie"]
            assert (await status(r, third), await status(r, copy)) == (401, 200)
            await cli_process(workspace, "token", "revoke", rotated["token"]["token_id"])
            await r.server.service.owner.refresh()
            assert await status(r, copy) == 401


async def test_a_token_in_a_query_string_is_never_accepted(workspace):
    """?token= (and its aliases) is refused as invalid_argument on every route, even when the token
    is right: a URL leaks into logs and history."""
    _, secret = _bound_token(workspace)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            answers = [await _raw(r, "GET", f"/api/relay/status?{name}={secret}", {"Host": _hostport(r)})
                       for name in ("token", "access_token", "Authorization")]
            answers.append(await _raw(r, "GET", f"/events?session=s1&token={secret}",
                                      {"Host": _hostport(r)}))
    assert {(a.status_code, a.json()["code"]) for a in answers} == {(400, "invalid_argument")}


async def test_login_without_a_token_configured_says_none_is_needed(workspace):
    """On a loopback relay with no token, POST /auth/session answers token_required false and sets
    no cookie (every route is open to non-browser clients and the relay's own origin)."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            reply = await _login(r)
    assert reply.status_code == 200 and reply.json() == {"token_required": False}
    assert "set-cookie" not in reply.headers


# -- configuration -----------------------------------------------------------------------------


def test_allowed_hosts_and_origins_load_from_relay_toml(workspace):
    """[serve] allowed_hosts / allowed_origins are lists of strings, lower-cased; an origin with a
    path or a non-list value is refused with the file named."""
    flow = workspace / "flow"
    flow.mkdir()
    (flow / "relay.toml").write_text('[serve]\nallowed_hosts = ["Relay.Lan"]\n'
                                     'allowed_origins = ["http://localhost:3000/"]\n')
    config = relay.load_config(flow)
    assert (config.allowed_hosts, config.allowed_origins) == (("relay.lan",), ("http://localhost:3000",))
    for bad in ('allowed_origins = ["http://x/path"]', 'allowed_hosts = "relay.lan"',
                'allowed_origins = [""]', "allowed_hosts = [1]"):
        (flow / "relay.toml").write_text(f"[serve]\n{bad}\n")
        with pytest.raises(rc.InvalidArgument, match="relay.toml"):
            relay.load_config(flow)


# -- SSE a browser can resume ---------------------------------------------------------------


def _burst(root, session: str, n: int) -> None:
    """Commit ``n`` events to ``session`` in one group commit from outside the server: the ledger
    watcher then publishes them at once, past any small subscriber buffer."""
    store = relay.Store(root)
    (*results,), _ = relay.commit(store, [mutation("AppendEvent", session_id=session, kind="burst",
                                                   data=i) for i in range(n)], relay.Config(), time.time())
    assert not any(isinstance(x, relay.RelayError) for x in results), results


async def _read_all(stream) -> list[dict]:
    out = []
    while (event := await stream.next()) is not None:
        out.append(event)
    return out


@pytest.mark.parametrize("params", [{"session": "s1"}, {}])
async def test_a_dropped_slow_subscriber_resumes_exactly_where_it_was(workspace, params):
    """A subscriber dropped for falling behind gets a resource_exhausted event with no id line
    (a browser keeps its Last-Event-ID), and resuming with the last id it got delivers every
    remaining record once: no gap, no duplicate; on the all-sessions stream too."""
    config = relay.Config(subscriber_buffer=4)
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            await r.seed(sessions=2)
            await r.ok("AppendEvent", session_id="s2", kind="before")
            async with r.sse(params) as stream:
                await stream.until_comment("connected")
                await trio.to_thread.run_sync(_burst, workspace, "s1", 30)
                first = await _read_all(stream)
            assert first[-1]["event"] == "error" and "id" not in first[-1]
            assert first[-1]["data"]["code"] == "resource_exhausted"
            got = first[:-1]
            async with r.sse(params, Last_Event_ID=got[-1]["id"]) as stream:
                assert stream.status == 200
                rest = []
                while len(got) + len(rest) < 30:
                    rest += await stream.take(1)
                await r.ok("AppendEvent", session_id="s1", kind="after")
                (live,) = await stream.take(1)
    seqs = [e["data"]["seq"] for e in got + rest + [live]]
    assert len(got) < 30 and seqs == list(range(1, 32))
    assert (rest[-1]["id"], live["id"]) == (("s1:30", "s1:31") if params else ("s1:30,s2:1", "s1:31,s2:1"))


async def test_every_id_the_all_sessions_stream_sends_is_accepted_back(workspace):
    """The all-sessions stream's ids are per-session cursor vectors: resuming after any one of them
    replays exactly the records that followed it, across sessions, in each session's order."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed(sessions=3)
            async with r.sse() as stream:
                await stream.until_comment("connected")
                for sid in ("s1", "s2", "s1", "s3", "s2", "s1"):
                    await r.ok("AppendEvent", session_id=sid, kind="k")
                seen = await stream.take(6)
            resumed = []
            for k, event in enumerate(seen):
                async with r.sse(Last_Event_ID=event["id"]) as stream:
                    assert stream.status == 200
                    resumed.append(await stream.take(5 - k))
    key = lambda e: (e["data"]["session_id"], e["data"]["seq"])  # noqa: E731
    assert seen[-1]["id"] == "s1:3,s2:2,s3:1"
    for k, replay in enumerate(resumed):
        assert sorted(map(key, replay)) == sorted(map(key, seen[k + 1:]))
        assert [relay.parse_stream_cursor(e["id"]) for e in replay][-1:] in ([], [{"s1": 3, "s2": 2,
                                                                                     "s3": 1}])


async def test_refused_streams_are_http_errors_and_every_stream_sets_retry(workspace):
    """Auth and cursor refusals are HTTP error statuses before any stream starts; a stream that
    starts sets `retry:` deliberately; the relay feed's ids resume it."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            async with r.sse({"session": "s1"}, Last_Event_ID="s1:9") as refused:
                refused_status = refused.status
            async with r.sse({"feed": "relay"}) as feed:
                await feed.until_comment("connected")
                retry = feed.retry
                await r.ok("GrantLease", session_id="s1", holder="h", mode="shared-read")
                (granted,) = await feed.take(1)
            async with r.sse({"feed": "relay"}, Last_Event_ID=granted["id"]) as again:
                assert again.status == 200
                await r.ok("GrantLease", session_id="s1", holder="h2", mode="shared-read")
                (queued,) = await again.take(1)
    assert refused_status == 400 and retry == relay.SSE_RETRY_MS
    assert relay.parse_feed_cursor(queued["id"]) > relay.parse_feed_cursor(granted["id"])


def test_stream_cursor_ids_round_trip_and_malformed_ones_are_refused():
    """parse_stream_cursor inverts stream_cursor_id; junk, duplicates and signs are invalid_argument."""
    vector = {"s1": 3, "s2": 12}
    assert relay.parse_stream_cursor(relay.stream_cursor_id(vector)) == vector
    assert relay.parse_stream_cursor("s1:0") == {"s1": 0}
    for bad in ("", "s1", "s1:", "s1:-1", "s1:+1", "s1:1,s1:2", "s1:1,", ":3", "s1:1 ", "s1:١"):
        with pytest.raises(rc.InvalidArgument):
            relay.parse_stream_cursor(bad)


async def test_websocket_subscriptions_use_the_same_ids_and_refusals(workspace):
    """A WebSocket subscription to every session gets cursor-vector ids and resumes from one; a
    refused subscription is one error frame and the socket stays open."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed(sessions=2)
            for sid in ("s1", "s2", "s1"):
                await r.ok("AppendEvent", session_id=sid, kind="k")
            async with r.ws() as ws:
                await ws_send(ws, type="subscribe", last_event_id="s1:1")
                replayed = [await ws_recv(ws), await ws_recv(ws)]
                await ws_send(ws, type="subscribe", session="s1", last_event_id="s1:9")
                refused = await ws_recv(ws)
                await r.ok("AppendEvent", session_id="s2", kind="k")
                live = await ws_until(ws, lambda f: f["type"] == "event")
    assert [f["id"] for f in replayed] == ["s1:2", "s1:2,s2:1"]
    assert (refused["type"], refused["data"]["code"]) == ("error", "out_of_range")
    assert live["id"] == "s1:2,s2:2"
