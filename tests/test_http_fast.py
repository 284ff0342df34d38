"""The serving fast paths of issue 14: ``GET /api/relay/status`` answered from
the cached status bytes in front of quart, with the same door, token check,
headers and metrics as quart's route; and the commit's fewer system calls."""

from __future__ import annotations

import trio

import relay
from serve_helpers import PATIENCE, metric, serving

STATUS = "/api/relay/status"
ROUTE = {"route": "/api/relay/<name>", "code": "200"}


def _count_quart_reads(monkeypatch) -> list[int]:
    """Count the JSON responses quart's read routes build (``_json_response``)."""
    calls = [0]
    real = relay._json_response

    def counting(body):
        calls[0] += 1
        return real(body)

    monkeypatch.setattr(relay, "_json_response", counting)
    return calls


async def test_status_is_answered_before_quart_and_follows_the_revision(workspace, monkeypatch):
    """A plain GET status never reaches quart's route, is the GetStatus reply byte for byte,
    changes as soon as a commit moves the revision, and counts under quart's route label."""
    quart_reads = _count_quart_reads(monkeypatch)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            first = await r.client.get(STATUS)
            await r.ok("RegisterProfile", name="p", provider="codex", mode="pooled")
            second = await r.client.get(STATUS)
            connect = await r.ok("GetStatus")
            metrics = (await r.client.get("/metrics")).text
            assert quart_reads == [0]
            with_query = await r.client.get(STATUS + "?unknown=1")  # not the plain read: quart's
            assert with_query.status_code == 400 and quart_reads == [0]
            assert (await r.client.get("/api/relay/rpcs")).status_code == 200
            assert quart_reads == [1]
    assert first.status_code == second.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert int(first.headers["content-length"]) == len(first.content)
    assert second.json()["revision"] > first.json()["revision"]
    assert second.json() == connect
    assert metric(metrics, "relay_requests_total", **ROUTE) == 2


async def test_status_fast_path_keeps_the_token_check(workspace):
    """With a bound token: the bearer gets the status from the fast path, a missing, wrong or
    non-Bearer credential still gets quart's 401, and only served requests count as 200."""
    from test_serve import _bound_token

    _, secret = _bound_token(workspace)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            served = await r.client.get(STATUS, headers={"Authorization": f"Bearer {secret}"})
            refused = [await r.client.get(STATUS, headers=headers) for headers in (
                {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {secret}"})]
            metrics = (await r.client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})).text
    assert served.status_code == 200 and "revision" in served.json()
    assert [x.status_code for x in refused] == [401, 401, 401]
    assert all(x.json()["code"] == "unauthenticated" for x in refused)
    assert metric(metrics, "relay_requests_total", **ROUTE) == 1


async def test_status_fast_path_stands_behind_the_door(workspace):
    """A Host the relay does not serve is refused at the door before the fast path answers."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            refused = await r.client.get(STATUS, headers={"Host": "evil.example"})
    assert refused.status_code == 403 and refused.json()["code"] == "permission_denied"


async def test_a_failing_status_projection_is_quarts_internal_error(workspace, monkeypatch, caplog):
    """When the projection raises, the fast path steps aside and quart answers `internal`
    (logged once with its traceback, never sent)."""
    def broken(self):
        raise RuntimeError("boom in the status projection")

    monkeypatch.setattr(relay.Service, "_status_doc", broken)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            response = await r.client.get(STATUS)
    assert response.status_code == 500 and response.json()["code"] == "internal"
    assert "boom" not in response.text
    assert [x.name for x in caplog.records if x.levelname == "ERROR"] == ["relay.serve"]


def test_a_journal_append_opens_the_journal_once_and_never_seeks(workspace, monkeypatch):
    """The server's journal commit opens the journal for writing once (no failed O_EXCL
    create first),
    and a stream append writes at its offset without a seek; the records read back whole."""
    from conftest import commit_ok

    store = relay.Store(workspace)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="p", session_id="s1")
    store.journal = True
    commit_ok(store, "AppendEvent", session_id="s1", kind="k", data={"n": 1})  # creates the journal
    opened: list[tuple[str, int]] = []
    seeks: list[int] = []
    real_open, real_lseek = relay.os.open, relay.os.lseek
    monkeypatch.setattr(relay.os, "open", lambda path, flags, *a: (opened.append((str(path), flags)),
                                                                   real_open(path, flags, *a))[1])
    monkeypatch.setattr(relay.os, "lseek", lambda fd, *a: (seeks.append(fd), real_lseek(fd, *a))[1])
    commit_ok(store, "AppendEvent", session_id="s1", kind="k", data={"n": 2})
    monkeypatch.undo()
    writes = [f for p, f in opened if p.endswith(relay.JOURNAL_NAME) and f & relay.os.O_RDWR]
    assert len(writes) == 1 and not writes[0] & relay.os.O_EXCL
    assert seeks == []
    fresh = relay.Store(workspace)
    committed = fresh.read().cursors["s1"].events_bytes
    assert [r.data for r in fresh.read_records("s1", "events", committed, 0, 10)] == [{"n": 1}, {"n": 2}]
