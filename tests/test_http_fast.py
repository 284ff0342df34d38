"""The serving fast paths of issue 14: ``GET /api/relay/status`` answered from
the cached status bytes in front of quart, with the same door, token check,
headers and metrics as quart's route; and the commit's fewer system calls."""

from __future__ import annotations

import errno
import gzip
import os
import signal
import subprocess
import sys
import threading

import pytest
import trio

import relay
from conftest import ROOT, T0, commit_ok, mutation
from relay_client import Code, RelayError
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


def test_a_journal_append_opens_the_journal_once(workspace, monkeypatch):
    """The server's journal commit opens the journal for writing at most once (no failed
    O_EXCL create first; the journaling store keeps it open from the commit before); the
    records read back whole."""
    store = relay.Store(workspace)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled")
    commit_ok(store, "CreateSession", profile="p", session_id="s1")
    store.journal = True
    commit_ok(store, "AppendEvent", session_id="s1", kind="k", data={"n": 1})  # creates the journal
    opened: list[tuple[str, int]] = []
    real_open = relay.os.open
    monkeypatch.setattr(relay.os, "open", lambda path, flags, *a: (opened.append((str(path), flags)),
                                                                   real_open(path, flags, *a))[1])
    commit_ok(store, "AppendEvent", session_id="s1", kind="k", data={"n": 2})
    monkeypatch.undo()
    writes = [f for p, f in opened if p.endswith(relay.JOURNAL_NAME) and f & relay.os.O_RDWR]
    assert len(writes) <= 1 and not any(f & relay.os.O_EXCL for f in writes)
    fresh = relay.Store(workspace)
    committed = fresh.read().cursors["s1"].events_bytes
    assert [r.data for r in fresh.read_records("s1", "events", committed, 0, 10)] == [{"n": 1}, {"n": 2}]


# -- one commit's stream logs are synced concurrently (journaling store) -------------

SIDS = ["s1", "s2", "s3", "s4"]


def _four_logs(root) -> relay.Store:
    """A journaling store with four sessions that each hold one event."""
    store = relay.Store(root)
    commit_ok(store, "RegisterProfile", name="p", provider="codex", mode="pooled")
    for sid in SIDS:
        commit_ok(store, "CreateSession", profile="p", session_id=sid)
        commit_ok(store, "AppendEvent", session_id=sid, kind="k", data={"n": 0})
    store.journal = True
    return store


def _append_to_all(store: relay.Store, n: int) -> tuple[list, relay.Ledger | None]:
    return relay.commit(store, [mutation("AppendEvent", session_id=sid, kind="k", data={"n": n})
                                for sid in SIDS], relay.Config(), T0)


def _name(fd: int) -> str:
    return os.path.basename(os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))) + "/" + \
        os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def test_one_commits_logs_sync_concurrently_and_all_before_the_journal(workspace, monkeypatch):
    """A commit touching four logs syncs them on more than one thread, every one of them
    finished before the journal record is written (the crash table is unchanged)."""
    store = _four_logs(workspace)
    steps: list[tuple[str, str, str]] = []  # (call, file, thread)
    real_sync, real_pwrite = os.fdatasync, os.pwrite
    lock = threading.Lock()

    def fdatasync(fd):
        name = _name(fd)
        real_sync(fd)
        with lock:
            steps.append(("synced", name, threading.current_thread().name))

    def pwrite(fd, data, at):
        with lock:
            steps.append(("pwrite", _name(fd), threading.current_thread().name))
        return real_pwrite(fd, data, at)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    results, ledger = _append_to_all(store, 1)
    monkeypatch.undo()
    assert all(r.record.seq == 2 for r in results)
    journal = ("pwrite", "relay/" + relay.JOURNAL_NAME)
    journal_write = next(i for i, step in enumerate(steps) if step[:2] == journal)
    synced_first = sorted(name for call, name, _ in steps[:journal_write] if call == "synced")
    assert synced_first == [f"{sid}/events.log" for sid in SIDS]
    assert len({thread for call, name, thread in steps if call == "synced" and name != journal[1]}) > 1
    assert relay.Store(workspace).read().revision == ledger.revision


def test_a_failed_sync_of_one_log_fails_the_commit_and_the_next_one_numbers_on(workspace, monkeypatch):
    """EIO from one log's fdatasync among four: `unavailable` naming that log, nothing
    acknowledged or counted (revision and cursors as before), every other sync still
    ran to its end; the next commit cuts the unacknowledged tails and numbers on."""
    store = _four_logs(workspace)
    before = relay.Store(workspace).read()
    real_sync = os.fdatasync
    synced: list[str] = []

    def fdatasync(fd):
        name = _name(fd)
        if name == "s3/events.log":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync(fd)
        synced.append(name)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(RelayError) as info:
        _append_to_all(store, 1)
    monkeypatch.undo()
    assert info.value.code == Code.UNAVAILABLE and "s3" in info.value.message
    assert sorted(synced) == ["s1/events.log", "s2/events.log", "s4/events.log"]
    after = relay.Store(workspace).read()
    assert after.revision == before.revision and after.cursors == before.cursors
    _assert_the_next_commit_numbers_on(workspace)


def _assert_the_next_commit_numbers_on(workspace) -> None:
    """After a failed or killed commit: the next one gives every log seq 2, and
    each log reads back the first commit's record and the new one, nothing between."""
    results, _ = _append_to_all(relay.Store(workspace), 2)
    assert [r.record.seq for r in results] == [2, 2, 2, 2]
    fresh = relay.Store(workspace)
    for sid in SIDS:
        committed = fresh.read().cursors[sid].events_bytes
        assert [r.data for r in fresh.read_records(sid, "events", committed, 0, 10)] == [{"n": 0}, {"n": 2}]


KILLED_CHILD = r"""
import sys
from pathlib import Path
import relay, relay_client as rc
store = relay.Store(Path(sys.argv[1]), journal=True)
relay.commit(store, [relay.rpc_mutation("AppendEvent", rc.AppendRecordRequest(
    session_id=sid, kind="crash", data={"n": 1})) for sid in ("s1", "s2", "s3", "s4")], relay.Config())
print("committed", flush=True)
"""


@pytest.mark.parametrize("failpoint", relay.LOG_FAILPOINTS)
def test_a_kill_around_the_log_syncs_leaves_the_old_revision(workspace, tmp_path, failpoint):
    """A writer killed once its four logs are written, or once all are synced, before the
    journal record: every reader sees the old revision; the next commit numbers on."""
    _four_logs(workspace)
    before = relay.Store(workspace).read()
    script = tmp_path / "child.py"
    script.write_text(KILLED_CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RELAY_FAILPOINT=failpoint)
    proc = subprocess.run([sys.executable, str(script), str(workspace)], capture_output=True,
                          text=True, env=env, timeout=PATIENCE)
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "", proc.stderr
    after = relay.Store(workspace).read()
    assert after.revision == before.revision and after.cursors == before.cursors
    assert all(relay.Store(workspace).stream_path(sid, "events").stat().st_size
               > before.cursors[sid].events_bytes for sid in SIDS)  # the unacknowledged tails
    _assert_the_next_commit_numbers_on(workspace)


# -- plain Connect JSON calls in front of quart -------------------------------------

APPEND = f"/{relay.rc.SERVICE}/AppendEvent"


def _count_quart_unary(monkeypatch) -> list[int]:
    """Count the replies quart's Connect route builds (``_unary_response``)."""
    calls = [0]
    real = relay._unary_response

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(relay, "_unary_response", counting)
    return calls


async def test_a_plain_connect_json_call_is_answered_before_quart(workspace, monkeypatch):
    """AppendEvent with Content-Type application/json and a Content-Length is answered
    without quart's route, commits once, and counts under quart's route label; a refusal
    is the same status and body quart gives (asked with a charset, which only quart takes)."""
    quart_calls = _count_quart_unary(monkeypatch)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed(1)  # RegisterProfile, CreateSession: two more plain calls
            seeded = quart_calls[0]
            reply = await r.ok("AppendEvent", session_id="s1", kind="k", data={"n": 1})
            assert quart_calls[0] == seeded
            fast = await r.post("AppendEvent", session_id="nope", kind="k")
            slow = await r.client.post(APPEND, content=b'{"session_id": "nope", "kind": "k"}',
                                       headers={"Content-Type": "application/json; charset=utf-8"})
            assert quart_calls[0] == seeded  # a refusal builds no reply either way
            events = await r.ok("ListEvents", session_id="s1")
            metrics = (await r.client.get("/metrics")).text
    assert reply["record"]["seq"] == 1 and [e["seq"] for e in events["records"]] == [1]
    assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())
    assert fast.json()["code"] == "not_found"
    route = f"/{relay.rc.SERVICE}/<method>"
    assert metric(metrics, "relay_requests_total", route=route, code="404") == 2
    assert seeded == 0
    assert metric(metrics, "relay_requests_total", route=route, code="200") == 4  # seed, append, list


async def test_what_the_connect_fast_path_does_not_take_goes_to_quart_with_its_body(workspace, monkeypatch):
    """A body that is not JSON is quart's 400 (its bytes replayed to quart, read once); a
    gzip Content-Encoding or a Connect-Timeout-Ms is served by quart's route; a token
    still guards the fast path."""
    from test_serve import _bound_token

    _, secret = _bound_token(workspace)
    quart_calls = _count_quart_unary(monkeypatch)
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    body = b'{"session_id": "s1", "kind": "k"}'
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            bad = await r.client.post(APPEND, content=b"{bad", headers=auth)
            unauthenticated = await r.client.post(APPEND, content=body,
                                                  headers={"Content-Type": "application/json"})
            assert quart_calls == [0]
            fast = await r.client.post(APPEND, content=body, headers=auth)
            assert quart_calls == [0]
            gz = await r.client.post(APPEND, content=gzip.compress(body),
                                     headers=auth | {"Content-Encoding": "gzip"})
            timed = await r.client.post(APPEND, content=body, headers=auth | {"Connect-Timeout-Ms": "5000"})
            assert quart_calls == [2]
            events = await r.client.post(f"/{relay.rc.SERVICE}/ListEvents", content=b'{"session_id": "s1"}',
                                         headers=auth)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["message"]
    assert unauthenticated.status_code == 401 and unauthenticated.headers["WWW-Authenticate"]
    assert [x.json()["record"]["seq"] for x in (fast, gz, timed)] == [1, 2, 3]
    assert [e["seq"] for e in events.json()["records"]] == [1, 2, 3]


async def test_the_body_read_before_handing_over_is_given_back_in_order():
    """What the fast path read (a partial body, then a disconnect; or a whole body) is what
    quart's receive returns first, then the connection's own messages."""
    async def feed(messages):
        queue = list(messages)

        async def receive():
            return queue.pop(0)
        return receive

    later = {"type": "http.request", "body": b"-rest", "more_body": False}
    gone = {"type": "http.disconnect"}
    receive = await feed([{"type": "http.request", "body": b"ab", "more_body": True}, gone, later])
    chunks, ended, other = await relay._read_body(receive, 10)
    assert (chunks, ended, other) == ([b"ab"], False, gone)
    replay = relay._replaying(b"ab", ended, other, receive)
    assert [await replay() for _ in range(3)] == [
        {"type": "http.request", "body": b"ab", "more_body": False}, gone, later]
    receive = await feed([{"type": "http.request", "body": b"abc", "more_body": True}, later])
    chunks, ended, other = await relay._read_body(receive, 2)  # past the length: stop reading
    replay = relay._replaying(b"".join(chunks), ended, other, receive)
    assert [await replay() for _ in range(2)] == [
        {"type": "http.request", "body": b"abc", "more_body": True}, later]


async def _replies_of_each_path(workspace) -> list[tuple[int, dict[str, str], bytes]]:
    """Status, headers (less the date and length) and body (its own address left out) of a
    plain GET status, a Connect read, a mutation and a refusal, with a fixed clock."""
    out = []
    with trio.fail_after(PATIENCE):
        async with serving(workspace, now=lambda: T0) as r:
            for response in (
                    await r.client.get(STATUS),
                    await r.client.post(f"/{relay.rc.SERVICE}/GetStatus", content=b"{}",
                                        headers={"Content-Type": "application/json"}),
                    await r.post("RegisterProfile", name="p", provider="codex", mode="pooled"),
                    await r.post("AppendEvent", session_id="nope", kind="k")):
                headers = {k: v for k, v in response.headers.items() if k not in ("date", "content-length")}
                assert int(response.headers["content-length"]) == len(response.content)
                body = response.content.replace(r.server.endpoint.encode(), b"ENDPOINT")
                out.append((response.status_code, headers, body))
    return out


async def test_the_fast_paths_answer_with_quarts_headers(tmp_path, monkeypatch):
    """The same requests on a relay whose fast paths are taken out (quart answers
    everything) get the same status, headers and bodies: a header quart's hooks add
    cannot be missing from the fast paths."""
    (tmp_path / "fast").mkdir()
    (tmp_path / "quart").mkdir()
    quart_calls = _count_quart_unary(monkeypatch)
    fast = await _replies_of_each_path(tmp_path / "fast")
    assert quart_calls == [0]
    monkeypatch.setattr(relay, "_serve_status_directly", lambda app, service: app)
    monkeypatch.setattr(relay, "_serve_connect_json_directly", lambda app, service: app)
    slow = await _replies_of_each_path(tmp_path / "quart")
    assert quart_calls == [2]  # the two successful Connect calls; the status read is quart's too
    assert [status for status, _, _ in fast] == [200, 200, 200, 404]
    assert fast == slow
