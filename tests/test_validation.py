"""Limits on input, at every door (issue 8, defects 4, 8 and 9).

- JSON values (``data``, ``payload``) nest at most ``rc.MAX_JSON_DEPTH`` (64)
  levels: deeper ones are ``invalid_argument`` over HTTP, over ``/ws`` and on
  both CLIs, and nothing is stored that cannot be read back.
- Numbers are finite: NaN, Infinity and ``1e400`` are refused the same way, and
  the canonical encoder refuses to write one.
- The ledger reader is exactly as strict as ``specs/relay-state.schema.json``:
  a valid ledger mutated field by field is accepted by both or refused by both.
- Cursors and integers written as text (Last-Event-ID, ``after``/``limit``,
  CLI options) are ASCII digits only.

Servers are real (``serve_helpers.serving`` on 127.0.0.1:0); the CLIs run as
subprocesses where their argument parsing is what is tested.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import zlib
from typing import Any

import jsonschema
import pytest
import trio

import relay
import relay_client as rc
from conftest import ROOT, run_cli
from serve_helpers import JSON, PATIENCE, cli_in_process, serving, state_digest, ws_recv, ws_send
from test_specs import SCHEMA, Cli, _build_everything, _request_log

#: The documented nesting limit (specs/flow-relay-contract.md, "Limits on input").
LIMIT = 64


def _nested(depth: int, leaf: str = "1") -> str:
    """JSON text of ``leaf`` inside ``depth`` arrays."""
    return "[" * depth + leaf + "]" * depth


def _body(**fields: str) -> bytes:
    """A request body whose values are given as raw JSON text."""
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


async def _post_raw(r: Any, method: str, body: bytes) -> tuple[int, dict]:
    response = await r.client.post(f"/{rc.SERVICE}/{method}", content=body, headers=JSON)
    return response.status_code, response.json()


async def _relay_client(endpoint: str, *args: str) -> trio.Process:
    """``python -m relay_client --url ENDPOINT ARGS`` as a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return await trio.run_process([sys.executable, "-m", "relay_client", "--url", endpoint, *args],
                                  capture_stdout=True, capture_stderr=True, check=False, env=env)


################################################################
# Nesting
################################################################


async def test_deep_json_is_refused_over_http_and_nothing_is_stored(workspace):
    """data/payload nested 65..2000 deep is invalid_argument (never a 500) and writes nothing;
    64 deep is stored and reads back over every read path."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            before = state_digest(workspace)
            for depth in (LIMIT + 1, 485, 700, 2000, 100_000):
                for method, body in (
                    ("AppendEvent", _body(session_id='"s1"', kind='"k"', data=_nested(depth))),
                    ("AppendResult", _body(session_id='"s1"', kind='"k"', data=_nested(depth, "{}"))),
                    ("RecordControl", _body(request_id='"c1"', session_id='"s1"', kind='"k"',
                                            payload=_nested(depth))),
                ):
                    status, error = await _post_raw(r, method, body)
                    assert (status, error["code"]) == (400, "invalid_argument"), (method, depth, error)
                    assert "64" in error["message"] or "deep" in error["message"], error
            assert state_digest(workspace) == before
            deepest = json.loads(_nested(LIMIT))
            status, reply = await _post_raw(r, "AppendEvent",
                                            _body(session_id='"s1"', kind='"k"', data=_nested(LIMIT)))
            assert status == 200, reply
            listed = await r.client.get("/api/relay/events", params={"session": "s1"})
            assert listed.status_code == 200 and listed.json()["records"][0]["data"] == deepest
            assert (await r.ok("ListEvents", session_id="s1"))["records"][0]["data"] == deepest
    relay.decode_ledger((workspace / "flow/state/relay/relay-state.json").read_bytes())


async def test_deep_frames_over_ws_get_an_error_frame_and_the_socket_lives_on(workspace):
    """A /ws rpc with data 700 deep, a nested frame id, or a deep value in any other
    member gets one short invalid_argument error frame; the socket lives on."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            before = state_digest(workspace)
            async with r.ws() as ws:
                for depth in (LIMIT + 1, 700):
                    await ws.send_message('{"type":"rpc","id":7,"method":"AppendEvent","request":'
                                          + _body(session_id='"s1"', kind='"k"',
                                                  data=_nested(depth)).decode() + "}")
                    error = await ws_recv(ws)
                    assert (error["type"], error["id"], error["error"]["code"]) == (
                        "error", 7, "invalid_argument"), error
                await ws.send_message('{"type":"rpc","method":"ListSessions","request":{},"id":'
                                      + _nested(700) + "}")
                error = await ws_recv(ws)
                assert (error["type"], error["id"], error["error"]["code"]) == (
                    "error", None, "invalid_argument"), error
                for field in ("session", "stream", "feed", "last_event_id"):  # str()'d by the relay
                    await ws.send_message(f'{{"type":"subscribe","{field}":{_nested(700)}}}')
                    error = await ws_recv(ws)
                    assert error["type"] == "error" and len(json.dumps(error)) < 500, error
                await ws_send(ws, type="rpc", id=8, method="ListSessions", request={})
                reply = await ws_recv(ws)
                assert (reply["type"], reply["id"]) == ("reply", 8)
            assert state_digest(workspace) == before


async def test_deep_json_arguments_are_refused_by_both_clis(workspace):
    """`relay event append --data` / `control record --payload` and relay_client's
    AppendEvent --data refuse 65-deep JSON as a usage error (exit 2), writing nothing."""
    deep = _nested(LIMIT + 1)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            before = state_digest(workspace)
            for args in (("event", "append", "--session", "s1", "--kind", "k", "--data", deep),
                         ("control", "record", "--request-id", "c1", "--session", "s1",
                          "--kind", "k", "--payload", deep)):
                code, _, err = await trio.to_thread.run_sync(
                    lambda a=args: run_cli(workspace, *a, check=None))
                assert code == relay.EXIT_USAGE, err
                assert "64" in err, err
            proc = await _relay_client(r.server.endpoint, "AppendEvent", "--session-id", "s1",
                                       "--kind", "k", "--data", deep)
            assert proc.returncode == 2, (proc.stdout, proc.stderr)
            assert b"64" in proc.stderr
            assert state_digest(workspace) == before


################################################################
# Finite numbers
################################################################

NON_FINITE = ("1e400", "-1e400", "[1, 2e999]", '{"x": 1E400}', "NaN", "Infinity", "-Infinity")


async def test_non_finite_numbers_are_refused_over_http_and_ws(workspace):
    """1e400, NaN and Infinity in data or payload are invalid_argument over HTTP and /ws;
    nothing is written."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            before = state_digest(workspace)
            for value in NON_FINITE:
                for method, body in (
                    ("AppendEvent", _body(session_id='"s1"', kind='"k"', data=value)),
                    ("RecordControl", _body(request_id='"c1"', session_id='"s1"', kind='"k"',
                                            payload=value)),
                ):
                    status, error = await _post_raw(r, method, body)
                    assert (status, error["code"]) == (400, "invalid_argument"), (method, value, error)
            async with r.ws() as ws:
                for i, value in enumerate(NON_FINITE):
                    await ws.send_message(
                        f'{{"type":"rpc","id":{i},"method":"AppendEvent","request":'
                        + _body(session_id='"s1"', kind='"k"', data=value).decode() + "}")
                    error = await ws_recv(ws)
                    assert error["type"] == "error", (value, error)
                    assert error["error"]["code"] == "invalid_argument", (value, error)
            assert state_digest(workspace) == before


async def test_non_finite_arguments_are_refused_by_both_clis(workspace):
    """`relay event append --data 1e400` and relay_client's --data 1e400 are usage errors."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            before = state_digest(workspace)
            for value in ("1e400", "[-1e400]", "NaN"):
                code, _, err = await trio.to_thread.run_sync(lambda v=value: run_cli(
                    workspace, "event", "append", "--session", "s1", "--kind", "k", "--data", v,
                    check=None))
                assert code == relay.EXIT_USAGE, (value, err)
                proc = await _relay_client(r.server.endpoint, "AppendEvent", "--session-id", "s1",
                                           "--kind", "k", "--data", value)
                assert proc.returncode == 2, (value, proc.stdout, proc.stderr)
            assert state_digest(workspace) == before


def test_the_canonical_encoder_never_writes_a_non_finite_number(tmp_path):
    """The last defence: encoding a ledger or stream record holding NaN/Infinity raises."""
    for bad in (math.inf, -math.inf, math.nan, [1.0, math.inf]):
        with pytest.raises(ValueError):
            relay._canonical({"data": bad})
        record = rc.StreamRecord("s1", 1, "k", bad)
        with pytest.raises(ValueError):
            relay.encode_record(record)
        control = rc.ControlRequest("c1", "s1", "k", bad, "0" * 64)
        with pytest.raises(ValueError):
            relay.encode_ledger(relay.Ledger(control_requests={"c1": control}))


################################################################
# The ledger reader is exactly as strict as the schema
################################################################

# The schema's "integer" means a JSON integer literal: 1, never 1.0 or 1e0
# (JSON Schema itself calls 1.0 an integer; the relay's reader does not, and
# the schema's description says so).  Checked here with a validator whose
# integer type is strict.
_STRICT_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
StrictValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                               type_checker=_STRICT_TYPES)


def _strict_loads(data: bytes) -> Any:
    """RFC 8259 JSON, independently of the relay's parser: no NaN, no infinities."""
    def refuse(name: str) -> Any:
        raise ValueError(name)

    def finite(text: str) -> float:
        if not math.isfinite(value := float(text)):
            raise ValueError(text)
        return value

    return json.loads(data, parse_constant=refuse, parse_float=finite)


def _seal(doc: dict) -> bytes:
    """``doc`` as ledger bytes with a matching checksum (the encoder's framing)."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return text[:-1] + b',"checksum":"sha256:' + hashlib.sha256(text).hexdigest().encode() + b'"}\n'


def _schema_accepts(validator: Any, data: bytes) -> bool:
    try:
        doc = _strict_loads(data)
    except ValueError:
        return False
    return validator.is_valid(doc)


def _reader_accepts(data: bytes) -> bool:
    try:
        relay.decode_ledger(data)
    except relay.LedgerInvalid:
        return False
    return True


@pytest.fixture(scope="module")
def real_ledger(tmp_path_factory) -> dict:
    """A ledger built through the CLI with one record of every kind and state:
    profiles, sessions, leases active/waiting/released/revoked/expired, cursors,
    tokens active/rotated/revoked, quarantines active/cleared, control requests,
    and an idempotency record of every method; trimmed to one record per kind
    and state so that each mutation is checked quickly."""
    schema = json.loads(SCHEMA.read_text())
    cli = Cli(tmp_path_factory.mktemp("ledger"), schema)
    _build_everything(cli)
    cli.commit_at(relay.parse_iso(cli.ledger()["updated_at"]) + 5, relay.expire_leases)  # ttl 1 s
    cli("lease", "grant", "--session", "kimi-1", "--holder", "r9", "--mode", "shared-read")
    cli("lease", "grant", "--session", "kimi-1", "--holder", "w9", "--mode", "exclusive-write")
    doc = cli.ledger()
    # Idempotency records live in the request log now; an older ledger kept them
    # inline, and the reader still takes that form, so check it field by field.
    doc["requests"] = {row.pop("key"): row for row in _request_log(cli.store, schema)
                       if not row["key"].startswith("control/")}
    for name, state_key in (("leases", "state"), ("tokens", "state"), ("quarantines", "state"),
                            ("requests", "method"), ("sessions", "state")):
        seen: dict[str, str] = {}
        for key, record in doc[name].items():
            seen.setdefault(record[state_key], key)
        doc[name] = {k: doc[name][k] for k in seen.values()}
    for name in ("profiles", "control_requests", "cursors"):
        doc[name] = dict(list(doc[name].items())[:2])
    assert {x["state"] for x in doc["leases"].values()} == set(rc.LEASE_STATES)
    # The turn RPCs need a running provider (their records: tests/test_runtime.py).
    assert {x["method"] for x in doc["requests"].values()} == {
        r.name for r in rc.RPCS if r.mutates and r.name != "RecordControl"} - set(relay.SERVER_RPCS)
    return doc


def _sites(value: Any, path: tuple = ()) -> list[tuple]:
    """Every (path, leaf value) and (path, object) in ``value``, depth first."""
    out = [(path, value)]
    if isinstance(value, dict):
        for key, item in value.items():
            if not (path == () and key == "checksum"):
                out += _sites(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _sites(item, (*path, i))
    return out


#: Replacement strings: empty, not a timestamp, a timestamp, an unsafe id, too
#: long for an id, a label or a reason, not a digest, a digest, not an enum value.
_STRINGS = ("", "yesterday", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00.000000Z", "../x",
            "x" * 129, "r" * 600, "A" * 64, "ab" * 32, "bogus", "codex", "granted")


def _mutations(value: Any) -> list[tuple[str, Any]]:
    """(name, new value) for a leaf or object; ``...`` means delete."""
    out: list[tuple[str, Any]] = [("delete", ...), ("null", None), ("bool", True)]
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        out += [("negative", -1), ("float-for-int", float(value)), ("fraction", value + 0.5),
                ("string-for-int", str(value)), ("zero", 0), ("nan", math.nan), ("inf", math.inf),
                ("big", 10**20)]
    elif isinstance(value, str):
        out += [("int-for-string", 7), ("list-for-string", [value])]
        out += [(f"string {s[:12]!r}", s) for s in _STRINGS if s != value]
    elif isinstance(value, list):
        out += [("string-for-list", "x"), ("int item", [1]), ("bad-id item", ["../x"]),
                ("item", ["ok"]), ("empty", [])]
    elif isinstance(value, dict):
        out += [("extra key", {**value, "extra": 1}), ("list-for-object", []), ("empty", {})]
    return out


def _context(doc: dict, path: tuple) -> dict:
    """``doc`` with every map emptied but the record at ``path``: a smaller
    valid ledger around the mutated record, so each mutation is checked fast."""
    if len(path) < 2 or path[0] not in _KEY_FIELDS and path[0] != "requests":
        return doc
    return {**doc, **{m: {} for m in (*_KEY_FIELDS, "requests")},
            path[0]: {path[1]: doc[path[0]][path[1]]}}


#: The id field each ledger map is keyed by.
_KEY_FIELDS = {"profiles": "name", "sessions": "session_id", "leases": "lease_id",
               "control_requests": "request_id", "cursors": "session_id", "tokens": "token_id",
               "quarantines": "session_id"}


def test_reader_and_schema_agree_on_every_field_mutation(real_ledger):
    """Delete each field, or give it a wrong type, a bad enum value, a negative
    number, a malformed timestamp, digest or id, a float for an integer, NaN, or
    an extra key: relay.decode_ledger and the JSON Schema accept or refuse alike."""
    validator = StrictValidator(json.loads(SCHEMA.read_text()))
    assert _reader_accepts(_seal(real_ledger)) and _schema_accepts(validator, _seal(real_ledger))
    disagree, counts = [], {True: 0, False: 0}
    for path, value in _sites(real_ledger):
        if not path or path[0] == "schema":
            continue
        for name, new in _mutations(value):
            doc = copy.deepcopy(_context(real_ledger, path))
            parent = doc
            for step in path[:-1]:
                parent = parent[step]
            if new is ...:
                if isinstance(parent, list):
                    continue  # deleting a list item is the "empty"/"item" mutation of its list
                del parent[path[-1]]
            else:
                parent[path[-1]] = new
                if len(path) == 3 and _KEY_FIELDS.get(path[0]) == path[2] and isinstance(new, str):
                    # Re-key the record: "each map key equals the id inside its
                    # record" is the reader's rule that the schema cannot state.
                    doc[path[0]][new] = doc[path[0]].pop(path[1])
            data = _seal(doc)
            schema_ok = _schema_accepts(validator, data)
            counts[schema_ok] += 1
            if _reader_accepts(data) != schema_ok:
                disagree.append(f"{'.'.join(map(str, path))} {name}: schema "
                                f"{'accepts' if schema_ok else 'refuses'}, reader does not")
    assert not disagree, f"{len(disagree)} disagreements:\n" + "\n".join(disagree[:60])
    assert counts[True] > 100 and counts[False] > 1000, counts  # both outcomes well exercised


def test_what_the_schema_cannot_say_the_reader_still_refuses(real_ledger):
    """The rules the schema's description names as checked by the reader alone:
    a map key unlike its record's id, and a JSON value nested deeper than 64."""
    doc = copy.deepcopy(real_ledger)
    key = next(iter(doc["sessions"]))
    doc["sessions"]["other"] = doc["sessions"][key]
    assert not _reader_accepts(_seal(doc))
    for name, depth, ok in (("control_requests", LIMIT, True), ("control_requests", LIMIT + 1, False)):
        doc = copy.deepcopy(real_ledger)
        next(iter(doc[name].values()))["payload"] = json.loads(_nested(depth))
        assert _reader_accepts(_seal(doc)) is ok, depth
    description = json.loads(SCHEMA.read_text())["description"]
    assert "nest" in description and "1.0" in description


################################################################
# Integers written as text: ASCII digits only
################################################################

BAD_SEQ = ("+1", " 1", "1 ", "\u0661", "1_0", "-1", "", "0x1", "1.0", "\uff11")


async def _refusal(stream: Any) -> tuple[int, str]:
    """(HTTP status, Connect code) of a stream refused before it started."""
    return stream.status, json.loads(await stream.body())["code"]


async def test_last_event_id_is_ascii_digits_only(workspace):
    """Last-Event-ID S:SEQ (header or ?last_event_id=) and the relay feed's REVISION.INDEX
    take ASCII digits only: "+1", " 1", an Arabic-Indic digit or "1_0" are refused
    invalid_argument (HTTP 400, before any stream starts); a good id still replays."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            for i in range(12):
                await r.ok("AppendEvent", session_id="s1", kind="k", data=i)
            for seq in BAD_SEQ:
                async with r.sse({"session": "s1", "last_event_id": f"s1:{seq}"}) as stream:
                    assert await _refusal(stream) == (400, "invalid_argument"), seq
                if seq.isascii() and seq == seq.rstrip():  # h11 refuses trailing blanks
                    async with r.sse({"session": "s1"}, Last_Event_ID=f"s1:{seq}") as stream:
                        assert await _refusal(stream) == (400, "invalid_argument"), seq
            for bad in ("+1", " 1", "1_0", "\u0661", "1.+0", "1. 0", "1.", "-1"):
                async with r.sse({"feed": "relay", "last_event_id": bad}) as stream:
                    assert await _refusal(stream) == (400, "invalid_argument"), bad
            async with r.sse({"session": "s1"}, Last_Event_ID="s1:10") as stream:
                assert [e["id"] for e in await stream.take(2)] == ["s1:11", "s1:12"]
            async with r.ws() as ws:
                await ws_send(ws, type="subscribe", session="s1", last_event_id="s1:1_0")
                frame = await ws_recv(ws)
                assert (frame["type"], frame["data"]["code"]) == ("error", "invalid_argument"), frame


async def test_integer_query_params_are_ascii_digits_only(workspace):
    """?after= and ?limit= on the read routes refuse "+1", " 1", "1_0" and non-ASCII digits."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            for i in range(12):
                await r.ok("AppendEvent", session_id="s1", kind="k", data=i)
            for name in ("after", "limit"):
                for bad in ("+1", " 1", "1_0", "\u0661", "-1"):
                    got = await r.client.get("/api/relay/events", params={"session": "s1", name: bad})
                    assert (got.status_code, got.json()["code"]) == (400, "invalid_argument"), (name, bad)
            got = await r.client.get("/api/relay/events", params={"session": "s1", "after": "10"})
            assert [x["seq"] for x in got.json()["records"]] == [11, 12]


async def test_integer_options_of_both_clis_are_ascii_digits_only(workspace):
    """`relay event list --after 1_0`, `relay lease grant --ttl +5`, relay_client's
    --after "1_0" and --timeout "inf" are usage errors (exit 2), not read as numbers."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            before = state_digest(workspace)
            for args in (("event", "list", "--session", "s1", "--after", "1_0"),
                         ("event", "list", "--session", "s1", "--limit", "\u0661"),
                         ("lease", "grant", "--session", "s1", "--holder", "h",
                          "--mode", "shared-read", "--ttl", "+5")):
                code, _, err = await trio.to_thread.run_sync(
                    lambda a=args: run_cli(workspace, *a, check=None))
                assert code == relay.EXIT_USAGE, (args, err)
                assert "ASCII digits" in err, err
            for args in (("ListEvents", "--session-id", "s1", "--after", "1_0"),
                         ("GrantLease", "--session-id", "s1", "--holder", "h", "--mode", "shared-read",
                          "--ttl-seconds", " 5")):
                proc = await _relay_client(r.server.endpoint, *args)
                assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
                assert b"ASCII digits" in proc.stderr
            for seconds in ("1_0", "inf", "1e3", "-1"):
                proc = await _relay_client(r.server.endpoint, "--timeout", seconds, "ListSessions")
                assert proc.returncode == 2, (seconds, proc.stdout, proc.stderr)
                assert b"positive number of seconds" in proc.stderr
            assert state_digest(workspace) == before


def test_parse_digits_is_exact():
    """The one cursor grammar: [0-9]+ and nothing else; the nesting limit is the documented one."""
    assert rc.MAX_JSON_DEPTH == LIMIT
    assert rc.parse_digits("0") == 0 and rc.parse_digits("0012") == 12
    for bad in BAD_SEQ:
        with pytest.raises(ValueError):
            rc.parse_digits(bad)



def test_the_gate_reads_stream_logs_as_strictly_as_the_reader(workspace, capsys):
    """A log line with a valid CRC but "seq": 1.0 is unreadable to the reader, so
    the gate's streams_valid fails on it instead of passing it as seq 1."""
    cli_in_process(workspace, "profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    cli_in_process(workspace, "session", "create", "--profile", "cx", "--session-id", "s1")
    cli_in_process(workspace, "event", "append", "--session", "s1", "--kind", "kkk")
    path = relay.Store(workspace).stream_path("s1", "events")
    line = path.read_bytes()
    body = line[9:-1].replace(b'"kind":"kkk"', b'"kind":"k"').replace(b'"seq":1', b'"seq":1.0')
    assert len(body) == len(line) - 10  # same length: the committed cursor still fits
    path.write_bytes(b"%08x " % zlib.crc32(body) + body + b"\n")
    with pytest.raises((ValueError, rc.RelayError)):  # the reader refuses it
        list(relay.Store(workspace).scan_records("s1", "events", len(line)))
    capsys.readouterr()
    relay.main(["--root", str(workspace), "gate", "--json"])
    checks = {c["id"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["streams_valid"]["result"] == "fail", checks["streams_valid"]
