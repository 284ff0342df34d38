"""The browser door with a real browser: headless Debian Chromium driven by
Playwright's Python package (its sync API, so these are plain sync tests
against relays run as ``python -m relay serve`` processes).

- a page from another loopback origin cannot read, stream or mutate;
- a DNS-rebinding name (Chromium's resolver maps it to 127.0.0.1) is refused;
- the same-origin login works for EventSource and WebSocket;
- a native EventSource dropped for falling behind resumes with no gap and no
  duplicate, on one session's stream and on the all-sessions stream.

Chromium comes from Debian (``apt-get install -y chromium``; scripts/setup.sh
does it when run as root), never from Playwright's own download.  Where it is
missing the tests skip with that command as the reason, except as root, where
setup should have installed it: there they fail.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

import relay
import relay_client as rc
from conftest import ROOT, mutation
from serve_helpers import cli_in_process, state_digest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
REBIND_NAME = "rebind.test"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-gpu",
                 f"--host-resolver-rules=MAP {REBIND_NAME} 127.0.0.1"]
#: A guard for a page's wait (milliseconds): generous, never reached by a passing test.
PAGE_PATIENCE_MS = 10_000
BURST = 30


def _missing() -> str:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append("Debian's chromium (`apt-get install -y chromium`, or run scripts/setup.sh as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright's Python package (`.venv/bin/pip install -e '.[test]'`)")
    return " and ".join(missing)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium (a fresh profile) for the module's tests."""
    missing = _missing()
    if missing:
        if os.geteuid() == 0:
            pytest.fail(f"the browser tests need {missing}; setup installs them as root")
        pytest.skip(f"the browser tests need {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS)
        context.set_default_timeout(PAGE_PATIENCE_MS)
        try:
            yield context
        finally:
            context.close()


@contextlib.contextmanager
def relay_process(root: Path, toml: str = "") -> Iterator[str]:
    """``python -m relay serve --port 0`` on ``root``; yields its endpoint, then SIGTERMs it."""
    if toml:
        (root / "flow").mkdir(exist_ok=True)
        (root / "flow" / "relay.toml").write_text(toml)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RELAY_FAILPOINT", None)
    proc = subprocess.Popen([sys.executable, "-m", "relay", "--root", str(root), "serve", "--host",
                             "127.0.0.1", "--port", "0", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(root), text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        yield json.loads(line)["endpoint"]
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


@contextlib.contextmanager
def other_origin() -> Iterator[str]:
    """A second tiny HTTP server on another loopback port: the hostile page's origin."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = b"<!doctype html><title>another origin</title><p>not the relay</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _seeded(root: Path, token: bool = False) -> str:
    """A profile and session s1 (and, with ``token``, a bound bearer token: its secret)."""
    cli_in_process(root, "profile", "register", "codex-main", "--provider", "codex", "--mode", "pooled")
    cli_in_process(root, "session", "create", "--profile", "codex-main", "--session-id", "s1")
    cli_in_process(root, "session", "create", "--profile", "codex-main", "--session-id", "s2")
    if not token:
        return ""
    made = cli_in_process(root, "token", "create", "--label", "browser")
    cli_in_process(root, "bootstrap", "--token-id", made["token"]["token_id"])
    return made["secret"]


def _rpc(endpoint: str, method: str, secret: str = "", **body: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    reply = httpx2.post(f"{endpoint}/{rc.SERVICE}/{method}", json=body, headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


# Every probe settles with what the page could see: it never waits forever.
ATTACKS = """async ([relay, wsRelay]) => {
  const settle = (p) => Promise.race([p, new Promise(r => setTimeout(() => r('timeout'), 5000))]);
  const out = {};
  const append = JSON.stringify({session_id: 's1', kind: 'from-another-origin'});
  const tryFetch = async (url, init) => {
    try { const r = await fetch(url, init); return {status: r.status, body: await r.text()}; }
    catch (e) { return {error: String(e)}; }
  };
  out.json_post = await tryFetch(relay + '/relay.v1.Relay/AppendEvent',
    {method: 'POST', headers: {'Content-Type': 'application/json'}, body: append});
  out.simple_post = await tryFetch(relay + '/relay.v1.Relay/AppendEvent',
    {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'}, body: append,
     credentials: 'include'});
  out.read = await tryFetch(relay + '/api/relay/status', {credentials: 'include'});
  out.login = await tryFetch(relay + '/auth/session', {method: 'POST', body: '{}', credentials: 'include'});
  out.stream = await settle(new Promise(resolve => {
    const es = new EventSource(relay + '/events?session=s1', {withCredentials: true});
    es.onmessage = e => { es.close(); resolve({message: e.data}); };
    es.addEventListener('event', e => { es.close(); resolve({message: e.data}); });
    es.onerror = () => { const state = es.readyState; es.close(); resolve({error: true, state}); };
  }));
  out.socket = await settle(new Promise(resolve => {
    const ws = new WebSocket(wsRelay + '/ws');
    ws.onopen = () => ws.send(JSON.stringify({type: 'rpc', id: 1, method: 'AppendEvent',
                                                request: {session_id: 's1', kind: 'via-ws'}}));
    ws.onmessage = e => { ws.close(); resolve({message: e.data}); };
    ws.onerror = () => resolve({error: true});
    ws.onclose = e => resolve({closed: e.code});
  }));
  return out;
}"""


def _assert_locked_out(out: dict[str, Any]) -> None:
    """Nothing a hostile page tried got through: no readable body, no stream, no socket."""
    assert "error" in out["json_post"] and "error" in out["read"] and "error" in out["login"], out
    assert out["simple_post"] == {"status": 0, "body": ""}, out  # opaque: nothing readable
    assert out["stream"] == {"error": True, "state": 2}, out  # refused: EventSource gives up
    assert "message" not in out["socket"], out


def test_a_page_from_another_loopback_origin_cannot_read_stream_or_mutate(browser, tmp_path):
    """A page on 127.0.0.1:<other port> fetches, POSTs (JSON and a 'simple' text/plain form),
    opens an EventSource and a WebSocket to the relay: each is refused, and the ledger and the
    stream logs are unchanged."""
    _seeded(tmp_path)
    with relay_process(tmp_path) as endpoint, other_origin() as hostile:
        before = state_digest(tmp_path)
        page = browser.new_page()
        page.goto(hostile)
        out = page.evaluate(ATTACKS, [endpoint, endpoint.replace("http", "ws", 1)])
        page.close()
        after = state_digest(tmp_path)
        events = _rpc(endpoint, "ListEvents", session_id="s1")
    _assert_locked_out(out)
    assert after == before and events["records"] == []


def test_a_dns_rebinding_name_is_refused(browser, tmp_path):
    """A page on a hostile name that resolves to 127.0.0.1 is, to the browser, the relay's own
    origin; the relay refuses its Host: no read, no mutation, no stream, no socket."""
    _seeded(tmp_path)
    with relay_process(tmp_path) as endpoint:
        port = endpoint.rsplit(":", 1)[1]
        rebound = f"http://{REBIND_NAME}:{port}"
        before = state_digest(tmp_path)
        page = browser.new_page()
        assert page.goto(f"{rebound}/health").status == 200  # /health answers any Host
        out = page.evaluate(ATTACKS, [rebound, f"ws://{REBIND_NAME}:{port}"])
        page.close()
        after = state_digest(tmp_path)
    # Same-origin to the browser, so the refusals are readable: each is the 403.
    for probe in ("json_post", "read", "login"):
        assert out[probe]["status"] == 403 and json.loads(out[probe]["body"])["code"] == "permission_denied"
    assert out["stream"] == {"error": True, "state": 2}, out
    assert "message" not in out["socket"], out
    assert after == before


LOGIN = """async ([token]) => {
  const settle = (p) => Promise.race([p, new Promise(r => setTimeout(() => r('timeout'), 5000))]);
  const before = await fetch('/api/relay/status');
  const refused = await settle(new Promise(resolve => {
    const es = new EventSource('/events?session=s1');
    es.onerror = () => { const state = es.readyState; es.close(); resolve(state); };
  }));
  const login = await fetch('/auth/session', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                               body: JSON.stringify({token})});
  const after = await fetch('/api/relay/status');
  window.events = [];
  window.es = new EventSource('/events?session=s1');
  window.es.addEventListener('event', e => window.events.push(JSON.parse(e.data)));
  const opened = await settle(new Promise(resolve => { window.es.onopen = () => resolve(true); }));
  const socket = await settle(new Promise(resolve => {
    const ws = new WebSocket(location.origin.replace('http', 'ws') + '/ws');
    ws.onopen = () => ws.send(JSON.stringify({type: 'rpc', id: 7, method: 'GetStatus'}));
    ws.onmessage = e => { ws.close(); resolve(JSON.parse(e.data)); };
    ws.onclose = e => resolve({closed: e.code});
  }));
  return {before: before.status, refused, login: login.status, loginBody: await login.json(),
          after: after.status, opened, socket, cookieVisible: document.cookie};
}"""


def test_the_same_origin_login_works_for_eventsource_and_websocket(browser, tmp_path):
    """On the relay's own origin, a page with no header of its own is refused until it logs in with
    POST /auth/session; then the HttpOnly cookie (invisible to script) carries EventSource and
    WebSocket, and a record appended elsewhere arrives on the page's stream."""
    secret = _seeded(tmp_path, token=True)
    with relay_process(tmp_path) as endpoint:
        page = browser.new_page()
        page.goto(f"{endpoint}/health")  # any relay route makes the page's origin the relay's
        out = page.evaluate(LOGIN, [secret])
        _rpc(endpoint, "AppendEvent", secret, session_id="s1", kind="hello")
        page.wait_for_function("window.events.length >= 1")
        (event,) = page.evaluate("window.events")
        page.close()
    assert (out["before"], out["refused"], out["login"], out["after"]) == (401, 2, 200, 200), out
    assert out["loginBody"]["token_required"] is True and out["opened"] is True, out
    assert out["socket"]["type"] == "reply" and out["socket"]["id"] == 7, out
    assert out["cookieVisible"] == ""
    assert (event["session_id"], event["seq"], event["kind"]) == ("s1", 1, "hello")


RESUME = """() => {
  window.seen = {one: [], all: []};
  window.drops = {one: 0, all: 0};
  window.opens = {one: 0, all: 0};
  window.ids = {one: [], all: []};
  for (const [name, url] of [['one', '/events?session=s1'], ['all', '/events']]) {
    const es = new EventSource(url);
    es.onopen = () => { window.opens[name] += 1; };
    es.addEventListener('event', e => {
      const record = JSON.parse(e.data);
      window.seen[name].push(record.session_id + ':' + record.seq);
      window.ids[name].push(e.lastEventId);
    });
    // Both our error events (with data) and connection errors (without) arrive here.
    es.addEventListener('error', e => { if (e.data) window.drops[name] += 1; });
  }
}"""


def _burst(root: Path, session: str, n: int) -> None:
    """``n`` events to ``session`` in one commit from outside the server: the ledger watcher
    publishes them at once, past the subscribers' small buffers."""
    muts = [mutation("AppendEvent", session_id=session, kind="burst", data=i) for i in range(n)]
    results, _ = relay.commit(relay.Store(root), muts, relay.Config(), time.time())
    assert not any(isinstance(x, relay.RelayError) for x in results), results


def test_a_native_eventsource_resumes_after_a_forced_drop_with_no_gap_and_no_duplicate(browser, tmp_path):
    """With a 4-frame subscriber buffer, a burst of 30 records drops both a one-session and an
    all-sessions EventSource; each reconnects on its own (retry: 1000) with its Last-Event-ID and
    ends with every record exactly once, in order, then keeps receiving live ones."""
    _seeded(tmp_path)
    with relay_process(tmp_path, "[serve]\nsubscriber_buffer = 4\n") as endpoint:
        _rpc(endpoint, "AppendEvent", session_id="s2", kind="before")
        page = browser.new_page()
        page.goto(f"{endpoint}/health")
        page.evaluate(RESUME)
        page.wait_for_function("window.opens.one >= 1 && window.opens.all >= 1")
        _burst(tmp_path, "s1", BURST)
        both = "window.seen.one.length >= {n} && window.seen.all.length >= {n}"
        page.wait_for_function(both.format(n=BURST))
        _rpc(endpoint, "AppendEvent", session_id="s1", kind="after")
        page.wait_for_function(both.format(n=BURST + 1))
        state = page.evaluate("({seen: window.seen, drops: window.drops, opens: window.opens, "
                              "ids: window.ids})")
        page.close()
    want = [f"s1:{n}" for n in range(1, BURST + 2)]
    assert state["seen"]["one"] == want and state["seen"]["all"] == want
    assert state["drops"] == {"one": 1, "all": 1}, state["drops"]
    assert state["opens"]["one"] >= 2 and state["opens"]["all"] >= 2, state["opens"]
    assert state["ids"]["one"][-1] == f"s1:{BURST + 1}"
    assert state["ids"]["all"][-1] == f"s1:{BURST + 1},s2:1"
