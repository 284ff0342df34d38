"""Connect conformance: both codecs, compression, the GET form, HTTP conventions
and error details, against a real server on 127.0.0.1:0 (see serve_helpers)."""

from __future__ import annotations

import base64
import gzip
import http
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zlib
from urllib.parse import urlencode

import httpx2
import pytest
import trio

import relay
import relay_client as rc
from conftest import ROOT
from serve_helpers import JSON, PATIENCE, serving

PROTO = {"Content-Type": "application/proto"}
BASE = f"/{rc.SERVICE}"


def _msg(name: str, data: bytes):
    return rc.proto_class(name).FromString(data)


async def _proto_call(r, method: str, fields: dict, **headers: str) -> httpx2.Response:
    rpc = rc.RPC_BY_NAME[method]
    body = rc.json_to_proto(rpc.request.__name__, fields)
    return await r.client.post(f"{BASE}/{method}", content=body, headers=PROTO | headers)


async def _proto_ok(r, method: str, **fields) -> dict:
    response = await _proto_call(r, method, fields)
    assert response.status_code == 200, (method, response.status_code, response.text)
    assert response.headers["content-type"] == "application/proto"
    return rc.proto_to_json(rc.RPC_BY_NAME[method].response.__name__, response.content,
                            defaults=True)


# -- the descriptor -----------------------------------------------------------------


def test_embedded_descriptor_is_regenerated_from_relay_proto():
    """scripts/gen_proto.py --check passes on the tree and fails once relay.proto changes."""
    check = [sys.executable, "scripts/gen_proto.py", "--check"]
    assert subprocess.run(check, cwd=ROOT, capture_output=True).returncode == 0


def test_descriptor_drift_is_caught(tmp_path):
    """A field added to relay.proto without regenerating makes --check fail, naming the fix."""
    for name in ("relay_client.py", "specs", "scripts/gen_proto.py"):
        src, dst = ROOT / name, tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    proto = tmp_path / "specs" / "relay.proto"
    proto.write_text(proto.read_text().replace(
        "message GetStatusRequest {}", "message GetStatusRequest { string x = 1; }"))
    check = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert check.returncode == 1 and "run: python scripts/gen_proto.py" in check.stderr
    subprocess.run([sys.executable, "scripts/gen_proto.py"], cwd=tmp_path, check=True,
                   capture_output=True)
    again = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=tmp_path)
    assert again.returncode == 0


def test_descriptor_agrees_with_the_table_of_rpcs():
    """Each RPC's messages and its NO_SIDE_EFFECTS marking match relay_client.RPCS."""
    service = rc.proto_class("GetStatusRequest").DESCRIPTOR.file.services_by_name["Relay"]
    assert [m.name for m in service.methods] == [rpc.name for rpc in rc.RPCS]
    for method in service.methods:
        rpc = rc.RPC_BY_NAME[method.name]
        assert (method.input_type.name, method.output_type.name) == (
            rpc.request.__name__, rpc.response.__name__)
        level = method.GetOptions().idempotency_level
        assert (level == method.GetOptions().NO_SIDE_EFFECTS) == (not rpc.mutates), method.name


@pytest.mark.parametrize("code", [
    "import relay_client",
    "import relay_client as rc; rc.RelayStub",
])
def test_importing_the_client_does_not_load_protobuf(code):
    """google.protobuf is loaded on the first binary message, never by an import."""
    probe = f"{code}; import sys; print(sorted(m for m in sys.modules if m.startswith('google')))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout
    assert out.strip() == "[]"


def test_relay_status_does_not_load_protobuf(workspace):
    """`python -m relay status` stays on its fast path: no protobuf, no quart."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "relay", "--root",
                           str(workspace), "status", "--json"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode in (0, 1), proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert not {m for m in imported if m.startswith(("google", "quart", "hypercorn"))}


# -- both codecs ----------------------------------------------------------------------


async def test_every_rpc_speaks_binary_protobuf(workspace):
    """Every RPC answers application/proto with the same reply the JSON codec gives."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            got = await _proto_ok(r, "RegisterProfile", name="codex-main", provider="codex",
                                  mode="pooled", command=["codex", "app-server"])
            assert got["profile"]["command"] == ["codex", "app-server"]
            for sid in ("s1", "s2"):
                await _proto_ok(r, "CreateSession", profile="codex-main", session_id=sid)
            lease = (await _proto_ok(r, "GrantLease", session_id="s1", holder="w",
                                     mode="exclusive-write", ttl_seconds=60))["lease"]
            assert lease["fencing_token"] == 1 and lease["state"] == "active"
            await _proto_ok(r, "RenewLease", lease_id=lease["lease_id"], ttl_seconds=90)
            data = {"n": 5, "big": 2**40, "half": 0.5, "list": [1, None, True, "x"], "obj": {}}
            appended = await _proto_ok(r, "AppendEvent", session_id="s1", kind="k", data=data)
            assert appended["record"]["data"] == data
            await _proto_ok(r, "AppendResult", session_id="s1", kind="k", data=[1, 2])
            await _proto_ok(r, "RecordControl", request_id="c1", session_id="s1", kind="k",
                            payload={"a": 1})
            await _proto_ok(r, "RevokeLease", lease_id=lease["lease_id"], reason="test")
            borrowed = (await _proto_ok(r, "Borrow", holder="b", profile="codex-main"))["lease"]
            await _proto_ok(r, "Release", lease_id=borrowed["lease_id"])
            other = (await _proto_ok(r, "GrantLease", session_id="s2", holder="w",
                                     mode="shared-read"))["lease"]
            await _proto_ok(r, "ReleaseLease", lease_id=other["lease_id"])
            await _proto_ok(r, "QuarantineSession", session_id="s2", reason="test")
            await _proto_ok(r, "ClearQuarantine", session_id="s2")
            # The reads: binary and JSON answers are the same message.
            reads = {"Recover": {}, "GetStatus": {}, "ListProfiles": {}, "ListSessions": {},
                     "ListLeases": {"session_id": "s1"}, "ListEvents": {"session_id": "s1"},
                     "ListResults": {"session_id": "s1"}, "ListTurns": {}, "ListTasks": {}}
            # GetTurn needs a turn: tests/test_runtime.py reads one in both codecs.
            assert set(reads) == {rpc.name for rpc in rc.RPCS
                                  if not rpc.mutates and not rpc.streams} - {"GetTurn"}
            for method, fields in reads.items():
                name = rc.RPC_BY_NAME[method].response.__name__
                binary = (await _proto_call(r, method, fields)).content
                as_json = await r.ok(method, **fields)
                assert _msg(name, binary) == _msg(name, rc.json_to_proto(name, as_json)), method
            # What a binary client wrote reads back through JSON unchanged (5, not 5.0).
            events = await r.ok("ListEvents", session_id="s1")
            assert events["records"][0]["data"] == data
            assert json.dumps(events["records"][0]["data"]["n"]) == "5"


async def test_binary_refusals_are_connect_json_errors(workspace):
    """A binary call that is refused, or malformed, gets the Connect JSON error body."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            missing = await _proto_call(r, "CreateSession", {"profile": "nope"})
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/json"
            assert missing.json()["code"] == "not_found"
            garbage = await r.client.post(f"{BASE}/GetStatus", content=b"\xff\xff\xff", headers=PROTO)
            assert (garbage.status_code, garbage.json()["code"]) == (400, "invalid_argument")
            assert "relay.v1.GetStatusRequest" in garbage.json()["message"]
            # Absent fields are absent (not ""), as in JSON: a required one is named.
            empty = await r.client.post(f"{BASE}/RegisterProfile", content=b"", headers=PROTO)
            assert "needs field 'name'" in empty.json()["message"]
    assert not relay.Store(workspace).read().profiles


# -- compression ------------------------------------------------------------------------


async def test_gzip_and_identity_request_bodies_are_read(workspace):
    """Content-Encoding gzip (any case) and identity bodies are decoded, in both codecs."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            body = json.dumps({"session_id": "s1", "kind": "k", "data": "x" * 3000}).encode()
            for encoding in ("gzip", "GZip", "identity", ""):
                payload = gzip.compress(body) if encoding.lower() == "gzip" else body
                response = await r.client.post(f"{BASE}/AppendEvent", content=payload,
                                               headers=JSON | {"Content-Encoding": encoding})
                assert response.status_code == 200, (encoding, response.text)
            binary = rc.json_to_proto("AppendRecordRequest", {"session_id": "s1", "kind": "p"})
            response = await r.client.post(f"{BASE}/AppendEvent", content=gzip.compress(binary),
                                           headers=PROTO | {"Content-Encoding": "gzip"})
            assert response.status_code == 200
            assert (await r.ok("ListEvents", session_id="s1"))["last_seq"] == 5


async def test_unknown_or_broken_encodings_are_refused(workspace):
    """An unknown Content-Encoding is unimplemented with Accept-Encoding; bad gzip is invalid."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            url, body = f"{BASE}/AppendEvent", b'{"session_id": "s1", "kind": "k"}'
            for encoding in ("br", "zstd", "deflate"):
                response = await r.client.post(url, content=body,
                                               headers=JSON | {"Content-Encoding": encoding})
                assert (response.status_code, response.json()["code"]) == (501, "unimplemented")
                assert response.headers["Accept-Encoding"] == "gzip, identity"
            whole = gzip.compress(body)
            for broken in (body, whole[:-6], whole + whole):
                response = await r.client.post(url, content=broken,
                                               headers=JSON | {"Content-Encoding": "gzip"})
                assert (response.status_code, response.json()["code"]) == (400, "invalid_argument")
            assert (await r.ok("ListEvents", session_id="s1"))["last_seq"] == 0


async def test_the_body_limit_applies_to_the_decompressed_size(workspace):
    """A small gzip body that inflates past max_body_bytes is 413 resource_exhausted."""
    config = relay.Config(max_body_bytes=4096)
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            await r.seed()
            body = json.dumps({"session_id": "s1", "kind": "k", "data": " " * 5000}).encode()
            bomb = gzip.compress(body)
            assert len(bomb) < 200
            response = await r.client.post(f"{BASE}/AppendEvent", content=bomb,
                                           headers=JSON | {"Content-Encoding": "gzip"})
            assert (response.status_code, response.json()["code"]) == (413, "resource_exhausted")
            assert "decompressed" in response.json()["message"]
            assert (await r.ok("ListEvents", session_id="s1"))["last_seq"] == 0


def test_a_zip_bomb_is_never_inflated_whole():
    """64 MiB of zeros in ~64 KiB of gzip is refused after limit + 1 bytes of output."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(bytes(64 * 2**20)) + bomb.flush()
    tracemalloc.start()
    try:
        with pytest.raises(relay._HttpRefusal) as info:
            relay._decompress(data, "gzip", 1 * 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.status == 413
    assert peak < 4 * 2**20, peak


async def test_large_replies_are_gzipped_for_clients_that_accept_it(workspace):
    """Over 1 KiB and Accept-Encoding gzip: gzip; small, or gzip;q=0, or identity: plain."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            for _ in range(20):
                await r.ok("AppendEvent", session_id="s1", kind="k", data="y" * 100)
            url, body = f"{BASE}/ListEvents", b'{"session_id": "s1"}'

            async def raw(accept: str, path: str = url, content: bytes = body):
                request = r.client.build_request("POST", path, content=content,
                                                 headers=JSON | {"Accept-Encoding": accept})
                response = await r.client.send(request, stream=True)
                try:  # the bytes as sent: httpx2 would undo the gzip in .content
                    return response, b"".join([chunk async for chunk in response.aiter_raw()])
                finally:
                    await response.aclose()

            response, data = await raw("gzip")
            assert response.headers["Content-Encoding"] == "gzip"
            assert json.loads(gzip.decompress(data))["last_seq"] == 20
            assert "Accept-Encoding" in response.headers["Vary"]
            for accept in ("identity", "gzip;q=0", "br", ""):
                response, data = await raw(accept)
                assert "Content-Encoding" not in response.headers, accept
                assert json.loads(data)["last_seq"] == 20
            small, data = await raw("gzip", f"{BASE}/ListProfiles", b"{}")
            assert "Content-Encoding" not in small.headers and json.loads(data)["profiles"]


# -- the GET form ------------------------------------------------------------------------


async def test_side_effect_free_rpcs_answer_connect_get(workspace):
    """GET ?message=&encoding= works for reads, in JSON and base64 proto, gzipped or not."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            await r.ok("AppendEvent", session_id="s1", kind="k", data=1)
            want = await r.ok("ListEvents", session_id="s1")
            text = json.dumps({"session_id": "s1"})
            as_json = await r.client.get(f"{BASE}/ListEvents?" + urlencode(
                {"message": text, "encoding": "json", "connect": "v1"}))
            assert (as_json.status_code, as_json.json()) == (200, want)
            binary = rc.json_to_proto("ListRecordsRequest", {"session_id": "s1"})
            for compression, payload in (("identity", binary), ("gzip", gzip.compress(binary))):
                query = urlencode({"message": base64.urlsafe_b64encode(payload).rstrip(b"="),
                                   "encoding": "proto", "base64": "1", "compression": compression})
                response = await r.client.get(f"{BASE}/ListEvents?{query}")
                assert response.status_code == 200, response.text
                assert _msg("ListRecordsReply", response.content) == _msg(
                    "ListRecordsReply", rc.json_to_proto("ListRecordsReply", want))
            empty = await r.client.get(f"{BASE}/GetStatus?message=&encoding=proto")
            assert empty.status_code == 200 and empty.headers["content-type"] == "application/proto"


async def test_get_form_refusals(workspace):
    """GET on a mutation is 405 + Allow: POST; a bad GET form is refused with a Connect code."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            message = urlencode({"message": '{"session_id": "s1", "kind": "k"}', "encoding": "json"})
            mutation = await r.client.get(f"{BASE}/AppendEvent?{message}")
            assert (mutation.status_code, mutation.headers["Allow"]) == (405, "POST")
            assert mutation.json()["code"] == "invalid_argument"
            cases = {"encoding=json": 400, "message={}": 415, "message={}&encoding=xml": 415,
                     "message={}&encoding=json&connect=v2": 400,
                     "message=!!&encoding=proto&base64=1": 400,
                     "message={}&encoding=json&compression=br": 501}
            for query, status in cases.items():
                response = await r.client.get(f"{BASE}/GetStatus?{query}")
                assert response.status_code == status, (query, response.text)
            assert (await r.ok("ListEvents", session_id="s1"))["last_seq"] == 0


# -- HTTP conventions ----------------------------------------------------------------------


async def test_media_types_are_case_insensitive_and_415_names_what_is_accepted(workspace):
    """Application/JSON; Charset=UTF-8 is JSON; another charset or type is 415 with Accept-Post."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            url = f"{BASE}/GetStatus"
            for ctype in ("Application/JSON; charset=utf-8", "application/json;CHARSET=\"UTF-8\"",
                          "APPLICATION/PROTO"):
                response = await r.client.post(url, content=b"", headers={"Content-Type": ctype})
                assert response.status_code == 200, (ctype, response.text)
            for ctype in ("application/json; charset=latin-1", "application/grpc", "text/json"):
                response = await r.client.post(url, content=b"{}", headers={"Content-Type": ctype})
                assert response.status_code == 415
                assert response.headers["Accept-Post"] == "application/json, application/proto"


async def test_405_carries_allow_and_no_unimplemented_body(workspace):
    """A method a route does not take is 405 with Allow, and the body is not `unimplemented`."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            for method, path, allowed in (("PUT", f"{BASE}/GetStatus", {"GET", "POST"}),
                                          ("POST", "/api/relay/status", {"GET"}),
                                          ("DELETE", "/metrics", {"GET"})):
                response = await r.client.request(method, path)
                assert response.status_code == 405, (method, path)
                assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}
                assert response.json()["code"] == "invalid_argument"


async def test_401_says_bearer_and_the_scheme_is_case_insensitive(workspace):
    """401 answers carry WWW-Authenticate: Bearer; "bearer" and "BEARER" are the same scheme."""
    from test_serve import _bound_token

    _, secret = _bound_token(workspace)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            for path in ("/api/relay/status", f"{BASE}/GetStatus"):
                refused = await r.client.post(path, json={}) if "v1" in path else \
                    await r.client.get(path)
                assert refused.status_code == 401
                assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            for scheme in ("bearer", "BEARER", "Bearer"):
                response = await r.client.get("/api/relay/status",
                                              headers={"Authorization": f"{scheme} {secret}"})
                assert response.status_code == 200, scheme
            wrong = await r.client.get("/api/relay/status", headers={"Authorization": f"Basic {secret}"})
            assert wrong.status_code == 401


async def test_metrics_speak_openmetrics_when_asked(workspace):
    """/metrics is OpenMetrics for an Accept that asks for it, Prometheus text otherwise."""
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            plain = await r.client.get("/metrics")
            assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert "# EOF" not in plain.text
            om = await r.client.get("/metrics", headers={
                "Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
            assert om.headers["content-type"].startswith("application/openmetrics-text")
            assert om.text.rstrip().endswith("# EOF")
            assert "Accept" in om.headers["Vary"]


async def test_status_lines_carry_reason_phrases(workspace):
    """HTTP/1.1 status lines name their reason ("200 OK", "404 Not Found", "413 ...")."""
    too_large = http.HTTPStatus(413).phrase.encode()
    config = relay.Config(max_body_bytes=64)
    with trio.fail_after(PATIENCE):
        async with serving(workspace, config) as r:
            host, port = r.server.endpoint.removeprefix("http://").rsplit(":", 1)
            named = f"Host: {host}:{port}".encode()  # the relay refuses a Host it does not serve
            for request, line in (
                    (b"GET /health HTTP/1.1\r\n" + named + b"\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
                    (b"GET /nope HTTP/1.1\r\n" + named + b"\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n"),
                    (b"POST /relay.v1.Relay/GetStatus HTTP/1.1\r\n" + named + b"\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n" + b" " * 100,
                     b"HTTP/1.1 413 " + too_large + b"\r\n")):
                stream = await trio.open_tcp_stream(host, int(port))
                async with stream:
                    await stream.send_all(request)
                    head = b""
                    while b"\r\n" not in head:
                        head += await stream.receive_some(4096)
                assert head.startswith(line), head[:60]


# -- error details --------------------------------------------------------------------------


async def test_the_hint_travels_as_a_connect_error_detail(workspace):
    """An error's hint is in `hint` and in details[] as a google.rpc.LocalizedMessage."""
    from google.rpc import error_details_pb2

    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            body = (await r.post("CreateSession", profile="nope")).json()
            assert body["hint"]
            (detail,) = body["details"]
            assert detail["type"] == "google.rpc.LocalizedMessage"
            value = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
            message = error_details_pb2.LocalizedMessage.FromString(value)
            assert (message.message, message.locale) == (body["hint"], "en-US")
            assert detail["debug"] == {"locale": "en-US", "message": body["hint"]}
            # The stub still reads the hint from the JSON form.
            def call() -> None:
                with rc.RelayStub(r.server.endpoint) as stub:
                    stub.create_session(profile="nope")

            with pytest.raises(rc.NotFound) as info:
                await trio.to_thread.run_sync(call)
            assert info.value.hint == body["hint"]
