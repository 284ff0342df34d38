"""The table of RPCs (``relay_client.RPCS``) is the one truth: every row is
served, specified in relay.proto, reachable from both CLIs with the same
options, and bound on both stubs."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import relay
import relay_client as rc
from serve_helpers import PATIENCE, serving, ws_send, ws_until
from test_specs import PROTO, SPECS, parse_proto

#: Options every command has, whatever its request.
_COMMON = {"help", "json", "root", "rpc", "leaf", "_cmd", "_leaf"}


def _leaf(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> argparse.ArgumentParser:
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _options(parser: argparse.ArgumentParser) -> set[tuple[Any, ...]]:
    """What a command line can say to a leaf: each option's spellings, its
    field, whether it is positional, and whether its help is hidden."""
    return {(tuple(a.option_strings) or (a.metavar,), a.dest, a.help == argparse.SUPPRESS)
            for a in parser._actions if a.dest not in _COMMON}


def _example(rpc: rc.Rpc, session: str) -> dict[str, str]:
    """Query parameters for a row's GET route: its required ones, plus a cursor."""
    fields = attrs.fields_dict(rpc.request)
    query = {param: session for param, field in rpc.query.items()
             if fields[field].default is attrs.NOTHING}
    return query | ({"after": "0"} if "after" in rpc.query else {})


async def _produce(r: Any, rpc: rc.Rpc, session: str) -> tuple[str, Any]:
    """Commit something a server-stream row streams: the id to resume just
    before it, and the data its frame must carry."""
    if rpc.stream:  # the mutation that appends to that stream
        append = next(x for x in rc.RPCS if x.mutates and x.stream == rpc.stream)
        record = (await r.ok(append.name, session_id=session, kind="table", data=[rpc.name]))["record"]
        return f"{session}:{record['seq'] - 1}", record
    reply = await r.ok("GrantLease", session_id=session, holder=rpc.method, mode="shared-read")
    return str(reply["revision"] - 1), reply["lease"]  # REVISION alone is REVISION.0


async def _assert_streamed(r: Any, rpc: rc.Rpc, session: str) -> None:
    """The row is served by SSE ``/events`` and by a /ws ``subscribe`` frame,
    both selected by its ``watch``, its request taken from their parameters."""
    before, data = await _produce(r, rpc, session)
    key, _, value = rpc.watch.partition("=")
    params = {key: value, "last_event_id": before} | ({"session": session} if rpc.stream else {})
    assert set(params) - {key} == set(rpc.parameters), rpc.name
    async with r.sse(params) as sse:
        assert sse.status == 200, rpc.name
        while (event := await sse.next()) is not None and event.get("data") != data:
            pass
        assert event is not None, rpc.name
    async with r.ws() as ws:
        await ws_send(ws, type="subscribe", **params)
        await ws_until(ws, lambda frame: frame.get("data") == data)


async def test_every_row_is_served_specified_reachable_and_stubbed(workspace):
    """For each row: Service has its method; a unary row's Connect route
    reaches it, and its GET route (if any) answers what the Connect call
    answers; a server-stream row is served by SSE and /ws (its Connect route
    says so, unimplemented); relay.proto declares it with its messages and
    cardinality; both CLIs take exactly the same options for it; both stubs
    bind it (a coroutine per unary row, a context manager per stream row)."""
    proto = parse_proto(PROTO.read_text())
    declared = {name: (request, response) for name, request, response in proto.rpcs}
    relay_cli, client_cli = relay.build_parser(), rc._build_cli()
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (session,) = await r.seed()
            for rpc in rc.RPCS:
                assert inspect.iscoroutinefunction(getattr(relay.Service, rpc.method)), rpc.name
                reply = await r.post(rpc.name, {})  # decoded, then refused by its own rules at most
                assert (rpc.name in proto.server_streams) == rpc.streams, rpc.name
                if rpc.streams:
                    assert reply.json()["code"] == "unimplemented", rpc.name
                    assert f"GET /events?{rpc.watch}" in reply.json()["hint"], rpc.name
                    await _assert_streamed(r, rpc, session)
                else:
                    assert reply.json().get("code") not in ("unimplemented", "internal"), rpc.name
                if rpc.get:
                    query = _example(rpc, session)
                    got = await r.client.get(f"/api/relay/{rpc.get}", params=query)
                    body = {rpc.query[k]: int(v) if k == "after" else v for k, v in query.items()}
                    assert (got.status_code, got.json()) == (200, await r.ok(rpc.name, **body))
                assert declared[rpc.name] == (rpc.request.__name__, rpc.response.__name__)
                assert (proto.idempotency.get(rpc.name) == "NO_SIDE_EFFECTS") == (not rpc.mutates)
                relay_options = _options(_leaf(relay_cli, rpc.cli))
                # `relay turn start --wait` only changes how the reply is shown (it
                # follows the turn), and `recover --apply` (both CLIs) calls other
                # rows: no request fields, and the only such extras.
                extras = {o for o in relay_options if o[1] not in attrs.fields_dict(rpc.request)}
                assert {dest for _, dest, _ in extras} <= {"wait", "apply"}, rpc.name
                relay_options -= extras
                client_options = {o for o in _options(_leaf(client_cli, (rpc.method,)))
                                  if not (rpc.name == "Recover" and o[1] == "apply")}
                assert relay_options == client_options, rpc.name
                assert {dest for _, dest, _ in relay_options} == set(attrs.fields_dict(rpc.request))
                assert callable(getattr(rc.RelayStub, rpc.method)), rpc.name
                bound = getattr(rc.AsyncRelayStub, rpc.method)
                assert inspect.iscoroutinefunction(bound) != rpc.streams, rpc.name
            async with rc.AsyncRelayStub(r.server.endpoint) as stub:
                for rpc in (rpc for rpc in rc.RPCS if rpc.streams):
                    with rc.RelayStub(r.server.endpoint) as sync_stub:
                        assert hasattr(getattr(sync_stub, rpc.method)(), "__enter__"), rpc.name
                    assert hasattr(getattr(stub, rpc.method)(), "__aenter__"), rpc.name


def test_the_read_routes_of_the_contract_are_the_rows():
    """The contract's table of ``GET /api/relay/...`` routes, with their query
    parameters, is exactly what the rows' ``get`` and request flags give."""
    import re

    text = (SPECS / "flow-relay-contract.md").read_text()
    routes = dict(re.findall(r"^\| `/api/relay/([a-z]+)\??([a-z_=&]*)` \|", text, re.M))
    assert routes == {rpc.get: "&".join(f"{p}=" for p in rpc.query)
                      for rpc in rc.RPCS if rpc.get}


def test_an_alias_row_is_its_target():
    """``Release`` is declared an alias of ``ReleaseLease``: same messages, same operation."""
    aliases = [rpc for rpc in rc.RPCS if rpc.alias_of]
    assert [rpc.name for rpc in aliases] == ["Release"]
    for rpc in aliases:
        target = rc.RPC_BY_NAME[rpc.alias_of]
        assert (rpc.request, rpc.response, rpc.kind) == (target.request, target.response, target.kind)
        assert relay.operation(rpc) is relay.operation(target)


def test_rows_carry_what_was_keyed_by_name():
    """The stream a row appends to or lists, and RecordControl's control key,
    reach the commit from the row alone."""
    stream_rows = {rpc.name: rpc.stream for rpc in rc.RPCS if rpc.stream}
    assert stream_rows == {"AppendEvent": "events", "AppendResult": "results",
                           "ListEvents": "events", "ListResults": "results",
                           "WatchEvents": "events", "WatchResults": "results"}
    append = rc.AppendRecordRequest("s1", "k", 1, request_id="r1")
    for name in ("AppendEvent", "AppendResult"):
        mutation = relay.rpc_mutation(name, append)
        assert (mutation.stream, mutation.control, mutation.request_id) == (
            stream_rows[name], False, "r1")
    control = relay.rpc_mutation("RecordControl", rc.RecordControlRequest("r1", "s1", "k"))
    assert control.control and control.request_id == relay.CONTROL_KEY_PREFIX + "r1"
    assert relay.STREAM_KINDS == ("events", "results")


def test_both_clis_take_one_spelling_and_the_old_one_hidden():
    """``relay lease release L`` / ``relay_client release_lease L`` and the
    ``--lease-id``, ``--session-id`` spellings relay_client took before all
    parse to the same request."""
    relay_cli, client_cli = relay.build_parser(), rc._build_cli()

    def request(parser: argparse.ArgumentParser, *argv: str) -> Any:
        args = parser.parse_args(argv)
        rpc = rc.RPC_BY_NAME[args._cmd] if hasattr(args, "_cmd") else args.rpc
        return rc.request_from_arguments(args._leaf if hasattr(args, "_leaf") else args.leaf,
                                         rpc, args)

    release = rc.ReleaseLeaseRequest("lease-3")
    assert request(relay_cli, "lease", "release", "lease-3") == release
    assert request(relay_cli, "lease", "release", "--lease-id", "lease-3") == release
    assert request(client_cli, "release_lease", "lease-3") == release
    assert request(client_cli, "ReleaseLease", "--lease-id", "lease-3") == release
    borrow = rc.BorrowRequest("h", session_id="s1", ttl_seconds=5)
    for argv in (("--session", "s1", "--ttl", "5"), ("--session-id", "s1", "--ttl-seconds", "5")):
        assert request(relay_cli, "borrow", "--holder", "h", *argv) == borrow
        assert request(client_cli, "borrow", "--holder", "h", *argv) == borrow
    assert "--session-id" not in _leaf(relay_cli, ("borrow",)).format_help()


def _first_notice(url: str, after: str) -> Any:
    with rc.RelayStub(url) as stub, stub.watch_feed(last_event_id=after) as notices:
        return next(iter(notices))


@pytest.mark.filterwarnings(r"ignore:Async generator '(httpx2|httpcore2)\.:ResourceWarning")
async def test_both_stubs_watch_the_feed_from_an_id(workspace):
    """``watch_feed(last_event_id=...)``, bound from the WatchFeed row, yields the
    feed's notices after that id as FeedNotice messages, on both stubs."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (session,) = await r.seed()
            granted = await r.ok("GrantLease", session_id=session, holder="h", mode="shared-read")
            after = str(granted["revision"] - 1)
            notice = await trio.to_thread.run_sync(_first_notice, r.server.endpoint, after)
            assert (notice.kind, notice.data) == ("lease.granted", granted["lease"])
            assert notice.id.startswith(f"{granted['revision']}.")
            async with rc.AsyncRelayStub(r.server.endpoint) as stub, \
                    stub.watch_feed(last_event_id=after) as notices:
                assert await anext(notices) == notice
            with pytest.raises(TypeError, match="takes last_event_id"):
                rc.RelayStub(r.server.endpoint).watch_feed("s1")


_REPO = Path(__file__).resolve().parent.parent


def _relay(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "relay", "--root", str(root), *args]


async def test_relay_event_watch_follows_the_log_without_a_server(workspace):
    """``relay event watch --session S --last-event-id S:N`` prints the records
    after N, then each one committed later, as JSON lines, until interrupted."""
    env = dict(os.environ, PYTHONPATH=str(_REPO))
    for args in (("profile", "register", "p", "--provider", "codex", "--mode", "pooled"),
                 ("session", "create", "--profile", "p", "--session-id", "s1"),
                 ("event", "append", "--session", "s1", "--kind", "a"),
                 ("event", "append", "--session", "s1", "--kind", "b")):
        assert relay.main(["--root", str(workspace), *args]) == 0
    with trio.fail_after(PATIENCE):
        proc = await trio.lowlevel.open_process(
            _relay(workspace, "event", "watch", "--session", "s1", "--last-event-id", "s1:1"),
            stdout=subprocess.PIPE, env=env)
        try:
            lines = _Lines(proc.stdout)
            assert json.loads(await lines.next())["kind"] == "b"
            await trio.to_thread.run_sync(relay.main, ["--root", str(workspace), "event", "append",
                                                       "--session", "s1", "--kind", "c"])
            assert (json.loads(await lines.next())["seq"]) == 3
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
        finally:
            with trio.CancelScope(shield=True):
                proc.kill()
                await proc.wait()
                await proc.stdout.aclose()


def test_relay_feed_watch_refuses_naming_the_client(workspace, capsys):
    """The feed lives in a serving relay: ``relay feed watch`` refuses in one
    line naming ``python -m relay_client watch_feed``; a record watch with no
    session refuses too."""
    assert relay.main(["--root", str(workspace), "feed", "watch"]) == relay.EXIT_REFUSED
    assert relay.main(["--root", str(workspace), "event", "watch"]) == relay.EXIT_REFUSED
    feed, event = capsys.readouterr().err.splitlines()
    assert "needs a serving relay" in feed and "python -m relay_client watch_feed" in feed
    assert "pass --session S" in event and "relay_client watch_events" in event


class _Lines:
    """Lines of a child's stdout."""

    def __init__(self, stream: Any) -> None:
        self._stream, self._buffer = stream, b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            assert chunk, "the child closed its stdout"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


async def test_relay_client_has_a_command_per_stream_row(workspace):
    """``python -m relay_client watch_results --session S --last-event-id S:0``
    (the row's own options) prints the stream's records as JSON lines."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (session,) = await r.seed()
            await r.ok("AppendResult", session_id=session, kind="done", data=1)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "relay_client", "--url", r.server.endpoint, "watch_results",
                 "--session", session, "--last-event-id", f"{session}:0"],
                stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(_REPO)))
            try:
                record = json.loads(await _Lines(proc.stdout).next())
                assert (record["session_id"], record["seq"], record["data"]) == (session, 1, 1)
            finally:
                with trio.CancelScope(shield=True):
                    proc.kill()
                    await proc.wait()
                    await proc.stdout.aclose()


def test_repeatable_options_take_one_entry_per_use_on_both_clis():
    """`--env K=V --env K2=V2` and `--option k=v ...` are lists of whole entries on both
    CLIs (not one string, and never split into characters)."""
    rpc = rc.RPC_BY_NAME["RegisterProfile"]
    words = ["--provider", "codex", "--mode", "pooled", "--option", "approval_policy=untrusted",
             "--option", "sandbox=read-only", "--env", "A=1", "--env", "B=2"]
    for parser, leaf in ((relay.build_parser(), ["profile", "register", "cx"]),
                         (rc._build_cli(), ["register_profile", "cx"])):
        args = parser.parse_args([*leaf, *words])
        request = rc.request_from_arguments(_leaf(parser, tuple(leaf[:-1])), rpc, args)
        assert request.options == ("approval_policy=untrusted", "sandbox=read-only")
        assert request.env == ("A=1", "B=2")
