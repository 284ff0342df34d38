"""The specs agree with the code: relay.proto with relay_client, the ledger JSON
Schema with the files the relay really writes, the contracts with the CLI and
the settings.  Every check fails on drift in either direction."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import re
import time
import typing
import zlib
from pathlib import Path
from typing import Any

import attrs
import jsonschema
import pytest

import relay
import relay_client as rc

SPECS = Path(__file__).resolve().parent.parent / "specs"
PROTO = SPECS / "relay.proto"
SCHEMA = SPECS / "relay-state.schema.json"
CLI_CONTRACT = SPECS / "flow-cli-contract.md"
RELAY_CONTRACT = SPECS / "flow-relay-contract.md"

################################################################
# A small proto3 parser (exactly the subset relay.proto uses)
################################################################

_COMMENT = re.compile(r"//[^\n]*")
_FIELD = re.compile(
    r"(?P<repeated>repeated\s+)?(?P<type>[A-Za-z_][\w.]*)\s+(?P<name>[A-Za-z_]\w*)\s*=\s*"
    r"(?P<number>\d+)\s*(?:\[\s*json_name\s*=\s*\"(?P<json_name>[^\"]*)\"\s*\])?"
)
_RPC = re.compile(r"rpc\s+(\w+)\s*\(\s*([\w.]+)\s*\)\s*returns\s*\(\s*(?:stream\s+)?([\w.]+)\s*\)")
_SERVER_STREAM = re.compile(r"rpc\s+(\w+)\s*\([^)]*\)\s*returns\s*\(\s*stream\s")
# An rpc ends in ";" or in a body holding only its idempotency_level option.
_RPC_END = re.compile(r"\s*(?:;|\{\s*option\s+idempotency_level\s*=\s*(\w+)\s*;\s*\})")


@attrs.frozen
class ProtoField:
    name: str
    type: str
    repeated: bool
    number: int
    json_name: str | None


@attrs.frozen
class ProtoFile:
    syntax: str
    package: str
    imports: tuple[str, ...]
    service: str
    rpcs: tuple[tuple[str, str, str], ...]
    rpc_comments: dict[str, str]
    #: rpc name -> its idempotency_level option ("" when unset)
    idempotency: dict[str, str]
    messages: dict[str, tuple[ProtoField, ...]]
    #: the rpcs that return ``stream X``
    server_streams: frozenset[str] = frozenset()


def parse_proto(text: str) -> ProtoFile:
    """Parse relay.proto; anything outside the known subset is an error, so
    nothing in the file can escape the comparison below."""
    code = _COMMENT.sub("", text)
    rest = code

    def take(pattern: str, flags: int = 0) -> list[re.Match]:
        nonlocal rest
        found = list(re.finditer(pattern, rest, flags))
        rest = re.sub(pattern, "", rest, flags=flags)
        return found

    syntax = take(r'\bsyntax\s*=\s*"(\w+)"\s*;')
    package = take(r"\bpackage\s+([\w.]+)\s*;")
    imports = take(r'\bimport\s+"([^"]+)"\s*;')
    services = take(r"\bservice\s+(\w+)\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
    messages = take(r"\bmessage\s+(\w+)\s*\{([^{}]*)\}")
    leftover = rest.strip()[:200]
    assert not leftover, f"relay.proto has text the spec parser does not understand: {leftover!r}"
    assert len(syntax) == 1 and len(package) == 1 and len(services) == 1

    rpcs, idempotency = [], {}
    body, pos = services[0].group(2), 0
    while body[pos:].strip():
        m = re.compile(r"\s*" + _RPC.pattern + _RPC_END.pattern).match(body, pos)
        assert m, f"not a unary or server-stream rpc statement: {body[pos:pos + 80].strip()!r}"
        rpcs.append(m.groups()[:3])
        idempotency[m.group(1)] = m.group(4) or ""
        pos = m.end()

    parsed: dict[str, tuple[ProtoField, ...]] = {}
    for m in messages:
        name, body = m.group(1), m.group(2)
        assert name not in parsed, f"message {name} is defined twice"
        fields = []
        for statement in body.split(";"):
            statement = " ".join(statement.split())
            if not statement or statement.startswith("reserved "):
                continue
            f = _FIELD.fullmatch(statement)
            assert f, f"message {name}: not a field statement: {statement!r}"
            fields.append(ProtoField(f["name"], f["type"], bool(f["repeated"]), int(f["number"]),
                                     f["json_name"]))
        parsed[name] = tuple(fields)

    comments = {}
    for m in re.finditer(r"((?:[ \t]*//[^\n]*\n)+)[ \t]*rpc\s+(\w+)", text):
        comments[m.group(2)] = " ".join(
            line.strip().removeprefix("//").strip() for line in m.group(1).splitlines())
    return ProtoFile(syntax[0].group(1), package[0].group(1), tuple(i.group(1) for i in imports),
                     services[0].group(1), tuple(rpcs), comments, idempotency, parsed,
                     frozenset(_SERVER_STREAM.findall(code)))


################################################################
# What relay_client says the contract is
################################################################


def proto_type(tp: Any) -> tuple[str, bool]:
    """(proto type, repeated) of a message field's Python type."""
    if tp is str:
        return "string", False
    if tp is bool:
        return "bool", False
    if tp is int:
        return "uint32", False
    if tp is Any:  # relay_client.JSONValue
        return "google.protobuf.Value", False
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        assert len(args) == 2 and args[1] is Ellipsis, f"only tuple[X, ...] maps to repeated: {tp!r}"
        inner, repeated = proto_type(args[0])
        assert not repeated, f"proto3 has no repeated repeated: {tp!r}"
        return inner, True
    if attrs.has(tp):
        return tp.__name__, False
    raise AssertionError(f"relay.proto cannot express the Python type {tp!r}")


def expected_messages() -> dict[str, tuple[tuple[str, str, bool], ...]]:
    """Every message the RPCs use, transitively: name -> ((field, type, repeated), ...)."""
    todo = [cls for rpc in rc.RPCS for cls in (rpc.request, rpc.response)]
    out: dict[str, tuple[tuple[str, str, bool], ...]] = {}
    while todo:
        cls = todo.pop()
        if cls.__name__ in out:
            continue
        hints = typing.get_type_hints(cls)
        fields = []
        for f in attrs.fields(cls):
            tp, repeated = proto_type(hints[f.name])
            fields.append((f.name, tp, repeated))
            nested = typing.get_args(hints[f.name]) or (hints[f.name],)
            todo += [t for t in nested if attrs.has(t)]
        out[cls.__name__] = tuple(fields)
    return out


def contract_drift(proto: ProtoFile) -> list[str]:
    """Every disagreement between relay.proto and relay_client, both ways."""
    problems = []
    if proto.syntax != "proto3":
        problems.append(f"syntax is {proto.syntax!r}, not proto3")
    if f"{proto.package}.{proto.service}" != rc.SERVICE:
        problems.append(f"service {proto.package}.{proto.service} is not {rc.SERVICE}")
    want_rpcs = [(r.name, r.request.__name__, r.response.__name__) for r in rc.RPCS]
    if list(proto.rpcs) != want_rpcs:
        problems.append(f"rpcs differ:\n  proto: {list(proto.rpcs)}\n  code:  {want_rpcs}")
    streams = {r.name for r in rc.RPCS if r.streams}
    if proto.server_streams != streams:
        problems.append(f"server streams differ: proto {sorted(proto.server_streams)}, "
                        f"code {sorted(streams)}")
    for rpc in rc.RPCS:
        comment = proto.rpc_comments.get(rpc.name, "")
        for want in (rpc.help, f"GET /events?{rpc.watch}" if rpc.streams else f"POST {rpc.path}"):
            if want not in comment:
                problems.append(f"rpc {rpc.name}: comment lacks {want!r}")
        # Connect's GET form is offered exactly for the RPCs that do not mutate.
        level = "" if rpc.mutates else "NO_SIDE_EFFECTS"
        if proto.idempotency.get(rpc.name, "") != level:
            problems.append(f"rpc {rpc.name}: idempotency_level is "
                            f"{proto.idempotency.get(rpc.name) or 'unset'}, want {level or 'unset'}")
    want = expected_messages()
    for name in sorted(set(want) - set(proto.messages)):
        problems.append(f"message {name} is in relay_client but not in relay.proto")
    for name in sorted(set(proto.messages) - set(want)):
        problems.append(f"message {name} is in relay.proto but no RPC of relay_client uses it")
    for name in sorted(set(want) & set(proto.messages)):
        got = proto.messages[name]
        shape = tuple((f.name, f.type, f.repeated) for f in got)
        if shape != want[name]:
            problems.append(f"message {name} fields differ:\n  proto: {shape}\n  code:  {want[name]}")
        for f in got:
            if f.json_name != f.name:
                problems.append(f"{name}.{f.name}: json_name is {f.json_name!r}, not {f.name!r}")
            if not re.fullmatch(r"[a-z][a-z0-9_]*", f.name):
                problems.append(f"{name}.{f.name}: not a snake_case name")
        numbers = [f.number for f in got]
        if numbers != sorted(set(numbers)) or (numbers and numbers[0] < 1):
            problems.append(f"message {name}: field numbers {numbers} are not unique and increasing")
    uses_value = any(t == "google.protobuf.Value" for fs in want.values() for _, t, _ in fs)
    if uses_value != ("google/protobuf/struct.proto" in proto.imports):
        problems.append("google/protobuf/struct.proto must be imported exactly when Value is used")
    return problems


################################################################
# relay.proto <-> relay_client
################################################################


def test_proto_matches_relay_client():
    """Same service, rpcs (names, order, messages), and every message field by
    field: name, type, repetition, order, json_name."""
    problems = contract_drift(parse_proto(PROTO.read_text()))
    assert not problems, "relay.proto drifted from relay_client:\n" + "\n".join(problems)


def test_every_message_field_is_checked():
    """The comparison is not vacuous: the proto has every RPC and a field for
    every attribute of every message the RPCs use."""
    proto = parse_proto(PROTO.read_text())
    assert len(proto.rpcs) == len(rc.RPCS) > 0
    total = sum(len(attrs.fields(getattr(rc, name))) for name in proto.messages)
    assert total == sum(len(fs) for fs in proto.messages.values()) > 100


@pytest.mark.parametrize("edit, finds", [
    (lambda t: t.replace('string holder = 3 [json_name = "holder"];', ""), "Lease fields differ"),
    (lambda t: t.replace('[json_name = "fencing_token"]', '[json_name = "fencingToken"]', 1),
     "json_name is 'fencingToken'"),
    (lambda t: t.replace("uint32 seq = 2", "int64 seq = 2"), "StreamRecord fields differ"),
    (lambda t: t.replace("repeated Lease leases", "Lease leases"), "ListLeasesReply fields differ"),
    (lambda t: t + "\nmessage Cursor {\n  string session_id = 1 [json_name = \"session_id\"];\n}\n",
     "message Cursor is in relay.proto but no RPC"),
    (lambda t: re.sub(r"message GetStatusRequest \{\}\n", "", t),
     "message GetStatusRequest is in relay_client"),
    (lambda t: t.replace("rpc Release(ReleaseLeaseRequest)", "rpc Release(RevokeLeaseRequest)"),
     "rpcs differ"),
    (lambda t: t.replace("// list leases\n", "// list the leases\n"), "comment lacks 'list leases'"),
    (lambda t: t.replace("bool state_present = 5", "string state_present = 5"), "StatusReply fields differ"),
])
def test_drift_is_caught(edit, finds):
    """Planted drifts of each kind are reported (a guard on the checker itself)."""
    text = PROTO.read_text()
    changed = edit(text)
    assert changed != text, "the planted edit did not apply"
    problems = contract_drift(parse_proto(changed))
    assert any(finds in p for p in problems), problems


def test_parser_refuses_what_it_does_not_understand():
    text = PROTO.read_text()
    for extra in ("\nenum Mode { MODE_UNSPECIFIED = 0; }\n",
                  "\nmessage Outer { message Inner { string x = 1; } }\n",
                  "\noption go_package = \"x\";\n"):
        with pytest.raises(AssertionError):
            parse_proto(text + extra)
    with pytest.raises(AssertionError):
        parse_proto(text.replace("rpc ListLeases(ListLeasesRequest)",
                                 "rpc ListLeases(stream ListLeasesRequest)"))


def test_proto_json_names_are_the_wire_names():
    """A real reply, as the relay writes it, uses exactly the proto's field names."""
    proto = parse_proto(PROTO.read_text())
    reply = rc.LeaseReply("granted", 3, rc.Lease("lease-3", "s", "h", "shared-read", "active"))
    doc = rc.to_json(reply)
    assert list(doc) == [f.json_name for f in proto.messages["LeaseReply"]]
    assert list(doc["lease"]) == [f.json_name for f in proto.messages["Lease"]]


################################################################
# The ledger JSON Schema
################################################################


@pytest.fixture(scope="module")
def schema() -> dict:
    doc = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(doc)
    return doc


def _validator(schema: dict, part: str | None = None) -> jsonschema.Draft202012Validator:
    if part is not None:
        schema = {**schema, "$ref": f"#/$defs/{part}"}
        for key in ("type", "properties", "required", "additionalProperties"):
            schema.pop(key, None)
    return jsonschema.Draft202012Validator(schema)


def _errors(schema: dict, doc: Any, part: str | None = None) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in _validator(schema, part).iter_errors(doc)]


_RECORDS = {
    "Runtime": rc.Runtime, "Profile": rc.Profile, "Session": rc.Session, "Lease": rc.Lease,
    "ControlRequest": rc.ControlRequest, "Cursor": rc.Cursor, "TokenRecord": relay.TokenRecord,
    "Quarantine": rc.Quarantine, "StreamRecord": rc.StreamRecord, "RequestRecord": relay.RequestRecord,
    "ProfileReply": rc.ProfileReply, "SessionReply": rc.SessionReply, "LeaseReply": rc.LeaseReply,
    "AppendReply": rc.AppendReply, "QuarantineReply": rc.QuarantineReply,
}


def test_schema_records_match_the_model(schema):
    """Each record's properties are its attrs fields, all required (the writer
    writes every field) but the ledger members an earlier version lacked, and
    nothing else is allowed (the reader refuses unknown fields)."""
    top = {k: v for k, v in schema.items() if not k.startswith("$")}
    for name, cls, part in [("Ledger", relay.Ledger, top),
                            *((n, c, schema["$defs"][n]) for n, c in _RECORDS.items())]:
        fields = [f.name for f in attrs.fields(cls)]
        props = [p for p in part["properties"] if not (name == "Ledger" and p == "checksum")]
        assert props == fields, name
        later = [m for m, _ in relay._LATER_MEMBERS] if name == "Ledger" else []
        # record fields added later: a ledger written before them lacks them
        later += list(relay._LATER_FIELDS.get({"Profile": "profiles", "Quarantine": "quarantines"}
                                              .get(name, ""), {}))
        assert part["required"] == [p for p in part["properties"] if p not in later], name
        assert part["additionalProperties"] is False, name


def test_schema_enums_match_the_code(schema):
    d = schema["$defs"]
    enum = lambda part, field: tuple(d[part]["properties"][field]["enum"])  # noqa: E731
    assert enum("Profile", "provider") == enum("Session", "provider") == rc.PROVIDERS
    assert enum("Profile", "mode") == rc.POOL_MODES
    assert enum("Lease", "mode") == rc.LEASE_ACCESS
    assert enum("Lease", "state") == rc.LEASE_STATES
    assert enum("Session", "state") == rc.SESSION_STATES
    # Idempotency records exist for the mutating RPCs whose request_id is an
    # idempotency key, i.e. all but RecordControl (its id is the record key).
    methods = [r.name for r in rc.RPCS if r.mutates and r.name != "RecordControl"]
    assert list(enum("RequestRecord", "method")) == methods
    replies = {c["if"]["properties"]["method"]["const"]: c["then"]["properties"]["reply"]["$ref"]
               for c in d["RequestRecord"]["allOf"]}
    assert replies == {m: f"#/$defs/{rc.RPC_BY_NAME[m].response.__name__}" for m in methods}
    assert d["id"]["pattern"] == f"^{rc.ID_PATTERN.pattern}$"
    assert schema["properties"]["schema"]["const"] == relay.SCHEMA_ID


class Cli:
    """Runs ``relay.main`` in-process on one workspace; every call checks the
    exit status and validates the ledger file against the schema."""

    def __init__(self, root: Path, schema: dict):
        self.root, self.schema = root, schema
        self.store = relay.Store(root)

    def __call__(self, *argv: str, code: int = 0) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            got = relay.main([*argv, "--json", "--root", str(self.root)])
        assert got == code, (argv, out.getvalue())
        self.check()
        return json.loads(out.getvalue())

    def ledger(self) -> dict:
        return json.loads(self.store.ledger_path.read_bytes())

    def check(self) -> None:
        if not self.store.ledger_path.exists():
            return
        data = self.store.ledger_path.read_bytes()
        problems = _errors(self.schema, json.loads(data))
        assert not problems, problems
        # The checksum rule as the contract states it: sha256 of the canonical
        # JSON of every other member, appended as the last member.
        doc = json.loads(data)
        claimed = doc.pop("checksum")
        body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert claimed == "sha256:" + hashlib.sha256(body).hexdigest()
        assert data == body[:-1] + b',"checksum":"' + claimed.encode() + b'"}\n'

    def commit_at(self, now: float, apply) -> None:
        """A direct commit at ``now`` (the reaper's and retention's path)."""
        relay.commit(self.store, [relay.Mutation(apply, "test")], relay.Config(), now)
        self.check()


def _build_everything(cli: Cli) -> None:
    """A ledger with every record kind and every state the CLI can reach."""
    cli("bootstrap")
    cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled",
        "--command", "codex app-server", "--request-id", "req-profile")
    cli("profile", "register", "cl", "--provider", "claude", "--mode", "one-borrow")
    cli("profile", "register", "km", "--provider", "kimi", "--mode", "one-borrow", "--command", "kimi")
    sid = cli("session", "create", "--profile", "cx", "--request-id", "req-session")["session"]["session_id"]
    cli("session", "create", "--profile", "cl", "--session-id", "claude.1")
    cli("session", "create", "--profile", "km", "--session-id", "kimi-1")
    cli("session", "create", "--profile", "cx", "--session-id", "q_1")
    # shared readers, a waiting writer, promotion, renewal, release, revocation
    r1 = cli("lease", "grant", "--session", sid, "--holder", "r1", "--mode", "shared-read",
             "--request-id", "req-grant")["lease"]["lease_id"]
    r2 = cli("lease", "grant", "--session", sid, "--holder", "r2",
             "--mode", "shared-read")["lease"]["lease_id"]
    assert cli("lease", "grant", "--session", sid, "--holder", "w", "--mode", "exclusive-write",
               "--ttl", "60")["outcome"] == "waiting"
    cli("lease", "renew", r1, "--ttl", "120", "--request-id", "req-renew")
    cli("lease", "release", r1, "--request-id", "req-release")
    cli("release", r2, "--request-id", "req-release2")
    assert cli("lease", "grant", "--session", sid, "--holder", "w", "--mode", "exclusive-write")["outcome"] \
        == "granted"
    borrowed = cli("borrow", "--profile", "cl", "--holder", "job", "--ttl", "1",
                   "--request-id", "req-borrow")["lease"]["lease_id"]
    cli("lease", "revoke", borrowed, "--reason", "operator said so", "--request-id", "req-revoke")
    cli("borrow", "--session", "kimi-1", "--holder", "job2", "--mode", "shared-read", "--ttl", "1")
    cli("lease", "grant", "--session", "q_1", "--holder", "doomed", "--mode", "exclusive-write")
    # control requests, events and results
    cli("control", "record", "--request-id", "c1", "--session", sid, "--kind", "prompt",
        "--payload", '{"text": "héllo", "n": [1, 2.5, null, true]}')
    cli("control", "record", "--request-id", "c1", "--session", sid, "--kind", "prompt",
        "--payload", '{"text": "héllo", "n": [1, 2.5, null, true]}')
    cli("control", "record", "--request-id", "c2", "--session", "claude.1", "--kind", "stop")
    for i in range(3):
        cli("event", "append", "--session", sid, "--kind", "note", "--data", json.dumps({"i": i}),
            *(("--request-id", "req-event") if i == 0 else ()))
    cli("result", "append", "--session", sid, "--kind", "done", "--data", '"ok"',
        "--request-id", "req-result")
    # quarantine (revokes the live lease) and clear, and one left active
    cli("quarantine", "session", "q_1", "--reason", "provider crashed", "--request-id", "req-q")
    cli("quarantine", "clear", "q_1", "--request-id", "req-clear")
    cli("quarantine", "session", "claude.1", "--reason", "heartbeat lost")
    # tokens: active, rotated (in grace), revoked; trusted-LAN bootstrap; shutdown
    tok = cli("token", "create", "--label", "ci")["token"]["token_id"]
    cli("bootstrap", "--endpoint", "http://10.1.2.3:9876", "--token-id", tok)
    cli("token", "rotate", "--grace", "60")
    spare = cli("token", "create")["token"]["token_id"]
    cli("token", "revoke", spare)
    cli("shutdown")


def _request_log(store: relay.Store, schema: dict) -> list[dict]:
    """Every committed request-log record, each checked against the schema."""
    rows = []
    cursor = store.read().request_log
    for path in sorted((store.state_dir / "requests").glob("*/*.log")):
        data = path.read_bytes()
        if path.parent.name == cursor.bucket:
            data = data[:cursor.shard_bytes[int(path.stem, 16)]]
        for line in data.splitlines(keepends=True):
            assert int(line[:8], 16) == zlib.crc32(line[9:-1])
            row = json.loads(line[9:])
            assert not _errors(schema, row, "RequestLogRecord"), row
            rows.append(row)
    return rows


def test_real_ledgers_validate(tmp_path, schema):
    """Ledgers built through the CLI, in every state it can reach, validate
    after every single command, and their stream logs and archives match the
    record shapes of the schema."""
    cli = Cli(tmp_path, schema)
    cli("status")  # no ledger yet: reads write nothing
    assert not cli.store.ledger_path.exists()
    _build_everything(cli)
    doc = cli.ledger()
    assert {x["state"] for x in doc["leases"].values()} == {"active", "released", "revoked"}
    assert {x["state"] for x in doc["tokens"].values()} == {"active", "rotated", "revoked"}
    assert {x["state"] for x in doc["quarantines"].values()} == {"active", "cleared"}
    assert {x["state"] for x in doc["sessions"].values()} == {"ready", "failed"}
    assert not doc["requests"]  # idempotency records live in the request log
    assert {x["method"] for x in _request_log(cli.store, schema)} >= {
        "RegisterProfile", "CreateSession", "GrantLease", "RenewLease", "ReleaseLease", "Release",
        "Borrow", "RevokeLease", "AppendEvent", "AppendResult", "QuarantineSession", "ClearQuarantine",
        "RecordControl"}
    assert doc["runtime"]["mode"] == "trusted-lan" and doc["runtime"]["status"] == "stopped"

    # A writer waiting for a reader; a reader refused while a writer is active.
    sid = next(k for k, v in doc["sessions"].items() if v["profile"] == "cx" and k != "q_1")
    cli("lease", "grant", "--session", "kimi-1", "--holder", "r9", "--mode", "shared-read")
    assert cli("lease", "grant", "--session", "kimi-1", "--holder", "w9",
               "--mode", "exclusive-write")["outcome"] == "waiting"
    assert cli("lease", "grant", "--session", sid, "--holder", "r3", "--mode", "shared-read",
               code=1)["error"]["code"] == "failed_precondition"
    assert {x["state"] for x in cli.ledger()["leases"].values()} == {
        "active", "waiting", "released", "revoked"}

    # The reaper marks leases past their expiry ``expired``.
    cli.commit_at(time.time() + 1800, relay.expire_leases)
    states = {x["state"] for x in cli.ledger()["leases"].values()}
    assert states == {"released", "revoked", "expired"}

    # Retention moves old leases and control requests to archive/*.jsonl.
    cli.commit_at(time.time() + 3 * 86400, lambda led, ctx: (
        attrs.evolve(led, runtime=attrs.evolve(led.runtime, endpoint="http://127.0.0.1:1")), None))
    after = cli.ledger()
    assert after["compacted_at"] and not after["leases"] and not after["control_requests"]
    assert not after["requests"]
    archive = cli.store.state_dir / "archive"
    for name, part in (("leases", "Lease"), ("control-requests", "ControlRequest")):
        rows = [json.loads(line) for line in (archive / f"{name}.jsonl").read_text().splitlines()]
        assert rows
        for row in rows:
            assert not _errors(schema, row, part), row

    # Stream log lines: ``<crc32 8 hex> <record JSON>\n``, records of StreamRecord shape.
    cursor = after["cursors"][sid]
    for stream in ("events", "results"):
        data = (cli.store.state_dir / "streams" / sid / f"{stream}.log").read_bytes()
        assert len(data) == cursor[f"{stream}_bytes"]
        lines = data.splitlines(keepends=True)
        assert len(lines) == cursor[stream]
        for seq, line in enumerate(lines, 1):
            assert re.fullmatch(rb"[0-9a-f]{8} \{.*\}\n", line, re.S)
            record = json.loads(line[9:])
            assert int(line[:8], 16) == zlib.crc32(line[9:-1])
            assert record["seq"] == seq and not _errors(schema, record, "StreamRecord")


def test_reply_shapes_validate_against_the_schema_defs(tmp_path, schema):
    """The CLI's JSON replies carry the same record shapes the schema names."""
    cli = Cli(tmp_path, schema)
    cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    session = cli("session", "create", "--profile", "cx")
    assert not _errors(schema, session, "SessionReply")
    lease = cli("borrow", "--profile", "cx", "--holder", "h")
    assert not _errors(schema, lease, "LeaseReply")
    appended = cli("event", "append", "--session", session["session"]["session_id"], "--kind", "k")
    assert not _errors(schema, appended, "AppendReply")


def _valid_ledger(tmp_path: Path, schema: dict) -> dict:
    cli = Cli(tmp_path, schema)
    cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    sid = cli("session", "create", "--profile", "cx")["session"]["session_id"]
    cli("borrow", "--profile", "cx", "--holder", "h", "--request-id", "r1")
    cli("control", "record", "--request-id", "c1", "--session", sid, "--kind", "k")
    cli("token", "create")
    doc = cli.ledger()
    # A ledger of an earlier version kept its idempotency records inline; it stays valid.
    legacy = next(r for r in _request_log(cli.store, schema) if r["key"] == "r1")
    doc["requests"] = {legacy.pop("key"): legacy}
    return doc


def _first(mapping: dict) -> dict:
    return next(iter(mapping.values()))


@pytest.mark.parametrize("damage, where", [
    (lambda d: d.update(extra=1), "top-level unknown field"),
    (lambda d: _first(d["leases"]).update(colour="red"), "unknown field in a lease"),
    (lambda d: _first(d["requests"])["reply"]["lease"].update(x=1), "unknown field in a stored reply"),
    (lambda d: d.update(revision="7"), "revision as a string"),
    (lambda d: d.update(revision=-1), "negative revision"),
    (lambda d: _first(d["sessions"]).update(fencing_token=1.5), "fractional fencing token"),
    (lambda d: _first(d["profiles"]).update(command="codex"), "command not a list"),
    (lambda d: _first(d["tokens"]).update(digest="A" * 64), "uppercase digest"),
    (lambda d: _first(d["tokens"]).update(digest="ab" * 31), "short digest"),
    (lambda d: _first(d["control_requests"]).update(payload_digest="x"), "bad payload digest"),
    (lambda d: d.update(checksum="sha256:" + "0" * 63), "bad checksum"),
    (lambda d: d.pop("checksum"), "no checksum"),
    (lambda d: d.update(schema="flow-relay/relay-state/v2"), "other schema id"),
    (lambda d: _first(d["leases"]).update(state="stolen"), "unknown lease state"),
    (lambda d: _first(d["profiles"]).update(provider="gpt"), "unknown provider"),
    (lambda d: d["runtime"].update(mode="public"), "unknown runtime mode"),
    (lambda d: d["sessions"].update({"../etc": _first(d["sessions"])}), "map key outside the id pattern"),
    (lambda d: d["sessions"].update({".hidden": _first(d["sessions"])}), "map key with a leading dot"),
    (lambda d: _first(d["leases"]).update(expires_at="tomorrow"), "malformed timestamp"),
    (lambda d: _first(d["leases"]).pop("holder"), "missing field"),
    (lambda d: _first(d["requests"]).update(method="RecordControl"), "idempotency record of RecordControl"),
    (lambda d: _first(d["requests"])["reply"].update(outcome="duplicate"), "stored reply outcome"),
])
def test_schema_rejects_broken_ledgers(tmp_path, schema, damage, where):
    doc = _valid_ledger(tmp_path, schema)
    assert not _errors(schema, doc)
    broken = copy.deepcopy(doc)
    damage(broken)
    assert _errors(schema, broken), where


################################################################
# The contracts name what the code has
################################################################


def _cli_commands() -> list[str]:
    return [" ".join(rpc.cli) for rpc in rc.RPCS] + [" ".join(path) for path in relay._ADMIN]


def test_cli_contract_documents_every_command_and_option():
    text = CLI_CONTRACT.read_text()
    headings = set(re.findall(r"^#+ `python -m relay ([a-z ]+)`$", text, re.M))
    assert headings == set(_cli_commands())
    parser_options = set()
    for rpc in rc.RPCS:
        for f in attrs.fields(rpc.request):
            parser_options.add(f.metadata.get("flag") or f.metadata["positional"])
    for _, args in relay._ADMIN.values():
        for flags, kwargs in args:
            parser_options.add(kwargs.get("metavar") or flags[0])
    for option in sorted(parser_options):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option
    for code, meaning in ((0, "done"), (1, "refused"), (2, "usage")):
        assert re.search(rf"\b{code}\b.*{meaning}", text), meaning
    gate_section = text.split("### `python -m relay gate`")[1].split("\n### ")[0]
    gate_rows = re.findall(r"^\| `([a-z_]+)` \| ", gate_section, re.M)
    assert gate_rows == [ident for ident, _, _ in relay.GATE_CHECKS]


def test_relay_contract_documents_every_setting_and_failpoint():
    text = RELAY_CONTRACT.read_text()
    defaults = relay.Config()
    for name, (section, key) in relay._CONFIG_KEYS.items():
        row = re.search(rf"^\| `{section}\.{key}` \|([^\n]*)$", text, re.M)
        assert row, f"{section}.{key} is not in the settings table"
        default = getattr(defaults, name)
        default = list(default) if isinstance(default, tuple) else default  # a TOML list
        assert f"`{default!r}`".replace("'", '"') in row.group(1), (name, row.group(1))
    for name in relay.FAILPOINTS:
        assert f"`{name}`" in text, name
    for code, status in rc._HTTP_STATUS.items():
        assert re.search(rf"^\| `{code.value}` \| {status} \|", text, re.M), code
    assert re.search(r"^#+ Serving$", text, re.M)


def test_flow_relay_toml_states_the_defaults():
    """The committed flow/relay.toml documents defaults: every value it sets is the default."""
    import tomllib

    doc = tomllib.loads((SPECS.parent / "flow" / "relay.toml").read_text())
    flat = {(section, key): value for section, table in doc.items() for key, value in table.items()}
    assert relay.load_config(SPECS.parent / "flow") == relay.Config()
    for (section, key), value in flat.items():
        assert value == getattr(relay.Config(), key), f"{section}.{key}"
