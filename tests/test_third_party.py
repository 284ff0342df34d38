"""Clients nobody here wrote, against a real relay on 127.0.0.1:0.

- ``buf curl`` (npm ``@bufbuild/buf``, installed by scripts/setup.sh into
  scripts/node with ``npm ci``), with ``--schema`` built from specs/: every RPC.
  buf curl has no codec flag: it always speaks Connect with binary protobuf.
- The Python ``connectrpc`` client from PyPI (the ``test`` extra) with code
  generated in the test's tmp dir by protoc (grpcio-tools) and the
  ``protoc-gen-py`` / ``protoc-gen-connectrpc`` plugins, left at its defaults
  (binary protobuf, gzip-compressed requests, gzip accepted), then with its
  JSON codec, and with ``use_get`` for the side-effect-free RPCs.

A client that is missing fails the test when setup should have installed it,
and is skipped with the install command otherwise: never a silent pass.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import relay
import relay_client as rc
from conftest import ROOT
from serve_helpers import PATIENCE, serving

SPECS = ROOT / "specs"
BUF = ROOT / "scripts" / "node" / "node_modules" / ".bin" / "buf"
SETUP = "bash scripts/setup.sh"

Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def _missing(what: str, installed_by_setup: bool, how: str) -> None:
    """Fail when setup should have installed ``what``; skip (naming the command) when not."""
    if installed_by_setup:
        pytest.fail(f"{what} is missing although {SETUP} installs it here; run: {how}")
    pytest.skip(f"{what} is not installed; install it with: {how}")


def _buf() -> str:
    found = str(BUF) if BUF.exists() else shutil.which("buf")
    if found is None:
        _missing("buf (npm @bufbuild/buf)", shutil.which("npm") is not None,
                 f"{SETUP}  (or: cd scripts/node && npm ci)")
    return found


#: What a Connect client calls here: the unary rows (the server streams are SSE
#: and /ws, tests/test_table.py) but those only a live provider can exercise (a
#: turn to start, interrupt, approve or read: tests/test_runtime.py).
UNARY = {rpc.name for rpc in rc.RPCS if not rpc.streams} - relay.SERVER_RPCS - {"GetTurn"}


async def drive_every_rpc(call: Call) -> set[str]:
    """Call each of the relay's RPCs once or more, checking each answer; returns
    the names called.  ``call`` sends one request and returns the reply as
    proto JSON with defaults (field names as in relay.proto)."""
    called: list[str] = []

    async def ok(method: str, **fields: Any) -> dict[str, Any]:
        called.append(method)
        return await call(method, fields)

    profile = await ok("RegisterProfile", name="codex-main", provider="codex", mode="pooled",
                       command=["codex", "app-server"])
    assert profile["outcome"] == "registered"
    for sid in ("s1", "s2"):
        assert (await ok("CreateSession", profile="codex-main", session_id=sid))["outcome"] == "created"
    lease = (await ok("GrantLease", session_id="s1", holder="w", mode="exclusive-write",
                      ttl_seconds=60))["lease"]
    assert (lease["state"], int(lease["fencing_token"])) == ("active", 1)
    assert (await ok("RenewLease", lease_id=lease["lease_id"], ttl_seconds=90))["outcome"] == "renewed"
    data = {"n": 5, "list": [1.5, None, True, "x"], "obj": {"k": "v"}}
    record = (await ok("AppendEvent", session_id="s1", kind="k", data=data))["record"]
    assert record["data"] == data and int(record["seq"]) == 1
    # Enough history for a ListEvents reply over the relay's 1 KiB gzip threshold.
    await ok("AppendEvent", session_id="s1", kind="bulk", data="z" * 1500)
    assert (await ok("AppendResult", session_id="s1", kind="k", data=[1, 2]))["outcome"] == "appended"
    assert (await ok("RecordControl", request_id="c1", session_id="s1", kind="k",
                     payload={"a": 1}))["outcome"] == "recorded"
    assert (await ok("RevokeLease", lease_id=lease["lease_id"], reason="test"))["outcome"] == "revoked"
    borrowed = (await ok("Borrow", holder="b", profile="codex-main"))["lease"]
    assert (await ok("Release", lease_id=borrowed["lease_id"]))["outcome"] == "released"
    shared = (await ok("GrantLease", session_id="s2", holder="w", mode="shared-read"))["lease"]
    assert (await ok("ReleaseLease", lease_id=shared["lease_id"]))["outcome"] == "released"
    assert (await ok("QuarantineSession", session_id="s2", reason="test"))["outcome"] == "quarantined"
    assert (await ok("ClearQuarantine", session_id="s2"))["outcome"] == "cleared"
    assert len((await ok("Recover"))["sessions"]) == 2
    assert (await ok("GetStatus"))["projection"] == "relay_generated_state_v1"
    assert [p["name"] for p in (await ok("ListProfiles"))["profiles"]] == ["codex-main"]
    assert len((await ok("ListSessions", profile="codex-main"))["sessions"]) == 2
    assert len((await ok("ListLeases", session_id="s1"))["leases"]) == 2
    events = await ok("ListEvents", session_id="s1")
    assert int(events["last_seq"]) == 2 and events["records"][0]["data"] == data
    assert int((await ok("ListResults", session_id="s1"))["last_seq"]) == 1
    assert (await ok("ListTurns", session_id="s1")).get("turns", []) == []
    assert (await ok("ListTasks")).get("tasks", []) == []
    closed = await ok("CloseSession", session_id="s2", force=True, reason="the end")
    assert (closed["outcome"], closed["session"]["state"]) == ("closed", "closed")
    return set(called)


# -- buf lint and buf curl ------------------------------------------------------------------


def test_buf_lint_is_clean_on_relay_proto():
    """`buf lint specs` passes (STANDARD rules; the exceptions are justified in specs/buf.yaml)."""
    lint = subprocess.run([_buf(), "lint", str(SPECS)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr




@pytest.mark.slow
async def test_buf_curl_calls_every_rpc(workspace, tmp_path):
    """buf curl (Connect, binary protobuf, --schema from specs/) calls every RPC; errors carry the hint."""
    buf = _buf()
    image = tmp_path / "relay.binpb"  # build the schema once, not per call
    await trio.run_process([buf, "build", str(SPECS), "-o", str(image)], capture_stdout=True)

    async def curl(endpoint: str, method: str, fields: dict[str, Any], *extra: str):
        return await trio.run_process(
            [buf, "curl", "--schema", str(image), "--protocol", "connect", "--emit-defaults",
             "-d", json.dumps(fields), *extra, f"{endpoint}/{rc.SERVICE}/{method}"],
            capture_stdout=True, capture_stderr=True, check=False)

    with trio.fail_after(PATIENCE * 4):
        async with serving(workspace) as r:
            async def call(method: str, fields: dict[str, Any]) -> dict[str, Any]:
                done = await curl(r.server.endpoint, method, fields)
                assert done.returncode == 0, (method, done.stderr.decode())
                return json.loads(done.stdout)

            assert await drive_every_rpc(call) == UNARY
            refused = await curl(r.server.endpoint, "CreateSession", {"profile": "nope"})
            assert refused.returncode != 0
            error = json.loads(refused.stderr)
            assert error["code"] == "not_found"
            (detail,) = error["details"]
            assert detail["type"] == "google.rpc.LocalizedMessage"
            assert "profile register" in detail["debug"]["message"]
            verbose = await curl(r.server.endpoint, "ListEvents", {"session_id": "s1"}, "-v")
            assert verbose.returncode == 0
            assert b"Content-Encoding: gzip" in verbose.stderr  # buf sends Accept-Encoding: gzip


# -- the Python connectrpc client ----------------------------------------------------------


@pytest.fixture(scope="module")
def connect_gen(tmp_path_factory) -> Any:
    """relay_pb / relay_connect generated from specs/relay.proto, as a package in a tmp dir."""
    try:
        importlib.import_module("connectrpc")
        from grpc_tools import protoc  # noqa: F401
    except ImportError as exc:
        _missing(f"{exc.name} (the test extra)", True, f"{SETUP}  (or: pip install -e '.[test]')")
    plugins = {name: shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
               for name in ("protoc-gen-py", "protoc-gen-connectrpc")}
    for name, path in plugins.items():
        if path is None:
            _missing(f"{name} (the test extra)", True, f"{SETUP}  (or: pip install -e '.[test]')")
    import grpc_tools

    out = tmp_path_factory.mktemp("connectgen")
    package = out / "relaygen"
    package.mkdir()
    (package / "__init__.py").write_text("")
    include = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{SPECS}", f"-I{include}",
                    *(f"--plugin={name}={path}" for name, path in plugins.items()),
                    f"--py_out={package}", f"--connectrpc_out={package}", "relay.proto"],
                   check=True, capture_output=True)
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("relaygen.relay_connect"), importlib.import_module(
            "relaygen.relay_pb")
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == "relaygen" or m.startswith("relaygen.")]:
            del sys.modules[name]


def _connect_caller(gen: Any, endpoint: str, **options: Any) -> tuple[Any, Call]:
    """A generated RelayClientSync at ``endpoint`` and a ``Call`` over it (in a thread:
    the client blocks, and the server runs on this trio loop)."""
    connect, pb = gen
    use_get = options.pop("use_get", False)
    client = connect.RelayClientSync(endpoint, **options)

    def sync_call(method: str, fields: dict[str, Any]) -> dict[str, Any]:
        rpc = rc.RPC_BY_NAME[method]
        request = getattr(pb, rpc.request.__name__).from_json(json.dumps(fields))
        kwargs = {"use_get": True} if use_get and not rpc.mutates else {}
        reply = getattr(client, rpc.method)(request, **kwargs)
        return json.loads(reply.to_json(always_emit_implicit=True, use_proto_field_name=True))

    async def call(method: str, fields: dict[str, Any]) -> dict[str, Any]:
        return await trio.to_thread.run_sync(sync_call, method, fields)

    return client, call


def _spy_on_calls(monkeypatch) -> list[tuple[str, str, str, str]]:
    """(HTTP method, Content-Type, Content-Encoding, RPC) of every RPC the relay runs."""
    seen: list[tuple[str, str, str, str]] = []
    original = relay.Service.call_json

    async def spy(self: relay.Service, name: str, body: Any) -> Any:
        from quart import request

        seen.append((request.method, request.headers.get("Content-Type", ""),
                     request.headers.get("Content-Encoding", ""), name))
        return await original(self, name, body)

    monkeypatch.setattr(relay.Service, "call_json", spy)
    return seen


async def test_connectrpc_defaults_call_every_rpc(workspace, connect_gen, monkeypatch):
    """connectrpc at its defaults (binary protobuf, gzip both ways) calls every RPC."""
    seen = _spy_on_calls(monkeypatch)
    with trio.fail_after(PATIENCE * 4):
        async with serving(workspace) as r:
            client, call = _connect_caller(connect_gen, r.server.endpoint)
            with client:
                assert await drive_every_rpc(call) == UNARY
            assert {(ctype, enc) for _, ctype, enc, _ in seen} == {("application/proto", "gzip")}


async def test_connectrpc_json_codec_and_get_form(workspace, connect_gen, monkeypatch):
    """connectrpc's JSON codec calls every RPC; use_get sends the reads as Connect GETs."""
    from connectrpc.codec import proto_json_codec

    seen = _spy_on_calls(monkeypatch)
    with trio.fail_after(PATIENCE * 4):
        async with serving(workspace) as r:
            client, call = _connect_caller(connect_gen, r.server.endpoint, codec=proto_json_codec(),
                                           use_get=True)
            with client:
                assert await drive_every_rpc(call) == UNARY
            assert {ctype for verb, ctype, _, _ in seen if verb == "POST"} == {"application/json"}
            gets = {name for verb, _, _, name in seen if verb == "GET"}
            assert gets == {rpc.name for rpc in rc.RPCS if not rpc.mutates} & UNARY


async def test_connectrpc_sees_codes_and_the_hint_detail(workspace, connect_gen):
    """A refusal reaches connectrpc as ConnectError with the code and the hint as a detail."""
    from connectrpc.code import Code
    from connectrpc.errors import ConnectError
    from google.rpc import error_details_pb2

    connect, pb = connect_gen
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            def refused() -> ConnectError:
                with connect.RelayClientSync(r.server.endpoint) as client:
                    try:
                        client.create_session(pb.CreateSessionRequest(profile="nope"))
                    except ConnectError as exc:
                        return exc
                raise AssertionError("CreateSession of an unknown profile was not refused")

            exc = await trio.to_thread.run_sync(refused)
            assert exc.code == Code.NOT_FOUND
            (detail,) = exc.details
            assert detail.type_name == "google.rpc.LocalizedMessage"
            hint = error_details_pb2.LocalizedMessage.FromString(detail.message_bytes).message
            assert "profile register" in hint
