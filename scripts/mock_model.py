#!/usr/bin/env python3
"""A loopback mock of the model APIs the real coding-agent CLIs call, for tests and demos.

    mock_model.py [--log FILE] [--announce] [--slow-ms N] [--hold-seconds S] [--dns-port P]

It binds 127.0.0.1 on a free port and prints ``PORT <n>`` on stdout (the sync
line; with ``--announce`` also ``REQUEST <n> <METHOD> <path>`` once each
request is recorded).  It speaks, streaming (SSE, chunked, HTTP/1.1
keep-alive) as the CLIs expect:

- the OpenAI Responses API as Codex calls it: ``POST {base}/responses``
  (Codex's ``base_url`` is ``http://127.0.0.1:PORT/v1``);
- the Anthropic Messages API as Claude Code calls it: ``POST
  {base}/v1/messages?beta=true`` (``ANTHROPIC_BASE_URL=http://127.0.0.1:PORT``),
  and its non-streaming form, which Claude falls back to; ``count_tokens`` and
  ``GET …/models`` are stubbed.

Anything else is answered 404 with ``{"error":{"type":"not_found_error",
"message":"mock_model: no route for …"}}`` and recorded with ``"route": null``,
so a test can tell that a CLI asked for something the mock does not know.

The reply depends only on the request's last input, so runs are deterministic:

- after a tool result (Codex ``function_call_output``, Claude ``tool_result``):
  ``mock #<n> saw the command output: <output>``;
- a prompt containing ``@command``: a tool call that runs ``echo hi`` (Codex
  ``exec_command``, asking to run outside the sandbox so that an approval
  policy of ``on-request`` asks the client; Claude ``Bash``);
- ``@slow``: the opening events and one token, then nothing until released
  (a line ``release`` on stdin or ``POST /_release``; at most
  ``--hold-seconds``), then the rest at ``--slow-ms`` per token.  If the client
  goes away meanwhile (an interrupt), the stream just ends;
- ``@error``: HTTP 500;
- otherwise ``Hello from mock #<n>: <prompt[:60]>``, one token per word.

With ``--dns-port P`` it also answers DNS queries on UDP 127.0.0.1:P with
NXDOMAIN, recording each as ``{"route": "dns", "path": <name>}``: run in a
namespace whose /etc/resolv.conf names 127.0.0.1, it shows which outside hosts
a CLI tries to reach (none, with the offline settings).

Every request is recorded before it is answered: ``GET /_requests`` returns the
list as JSON and ``--log FILE`` appends one JSON line per request (read the
file when the mock runs in another network namespace).  A record holds ``n``,
``method``, ``path``, ``route`` (``responses``, ``messages``, ``count_tokens``,
``models`` or null), ``stream``, ``model``, ``prompt`` (the last user text),
``user_texts`` (every user text in the request, history included), ``reply``
(``text``, ``command``, ``slow``, ``error``, ``after_tool``), the user agent,
and ``auth`` (which header carried a key; never the key itself).

Standard library only, so it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import json
import select
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

COMMAND = "echo hi | tee mock-hi.txt"
CUES = ("@command", "@slow", "@error")
#: Claude's injected context blocks, not the user's prompt.
_REMINDER = "<system-reminder>"


class Mock:
    """What the mock has seen and the switches tests flip."""

    def __init__(self, log_path: str | None, announce: bool, slow_ms: int, hold_seconds: float) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.counter = itertools.count(1)
        self.release = threading.Event()
        self.log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self.announce = announce
        self.slow_s = slow_ms / 1000
        self.hold_seconds = hold_seconds

    def record(self, entry: dict) -> dict:
        with self.lock:
            entry = {"n": next(self.counter), **entry}
            self.requests.append(entry)
            if self.log:
                self.log.write(json.dumps(entry) + "\n")
                self.log.flush()
            if self.announce:
                say(f"REQUEST {entry['n']} {entry['method']} {entry['path']}")
        return entry


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- what was asked ----------------------------------------------------------


def _texts(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    out = []
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict) and block.get("type") in ("text", "input_text"):
            out.append(block.get("text") or "")
    return out


def responses_turn(body: dict) -> tuple[list[str], dict | None]:
    """(user texts, the tool output if the last input is one) of a Responses request."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    users = []
    for item in items:
        if isinstance(item, dict) and item.get("role") == "user":
            users += [t for t in _texts(item.get("content")) if not t.startswith("<environment_context>")]
    last = items[-1] if items else {}
    tool = last if isinstance(last, dict) and last.get("type") == "function_call_output" else None
    return users, tool


def messages_turn(body: dict) -> tuple[list[str], dict | None]:
    """(user texts, the tool result if the last user message holds one) of a Messages request."""
    users, tool = [], None
    for message in body.get("messages") or ():
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        users += [t for t in _texts(content) if not t.lstrip().startswith(_REMINDER)]
        blocks = content if isinstance(content, list) else []
        results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
        tool = results[-1] if results else None
    return users, tool


def _tool_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_texts(value))
    return json.dumps(value)


def reply_kind(users: list[str], tool: dict | None) -> str:
    """``after_tool``, ``command``, ``slow``, ``error`` or ``text``: from the last input only."""
    if tool is not None:
        return "after_tool"
    prompt = users[-1] if users else ""
    return next((cue[1:] for cue in CUES if cue in prompt), "text")


def reply_text(kind: str, users: list[str], tool: dict | None, n: int) -> str:
    if kind == "after_tool":
        output = _tool_text(tool.get("output", tool.get("content")))
        return f"mock #{n} saw the command output: {output.strip()[:200]}"
    return f"Hello from mock #{n}: {(users[-1] if users else '')[:60]}"


def words(text: str) -> list[str]:
    parts = text.split(" ")
    return [w + " " for w in parts[:-1]] + [parts[-1]]


# -- the HTTP side -----------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock_model/1"
    mock: Mock  # set on the subclass main() builds

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the record is the log

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/_requests":
            with self.mock.lock:
                self.send_json(200, list(self.mock.requests))
            return
        if path.endswith("/models"):
            self.record(path, "models", {})
            self.send_json(200, {"data": [{"id": "mock-model", "type": "model"}], "object": "list"})
            return
        self.not_found(path, {})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        size = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(size) if size else b""
        if path == "/_release":
            self.mock.release.set()
            self.send_json(200, {"released": True})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_unparsed": raw[:200].decode("utf-8", "replace")}
        if not isinstance(body, dict):
            body = {"_not_an_object": body}
        if path.endswith("/responses"):
            self.serve_responses(path, body)
        elif path.endswith("/messages/count_tokens"):
            self.record(path, "count_tokens", body)
            self.send_json(200, {"input_tokens": 10})
        elif path.endswith("/messages"):
            self.serve_messages(path, body)
        else:
            self.not_found(path, body)

    def record(self, path: str, route: str | None, body: dict, **extra) -> dict:
        auth = ("bearer" if self.headers.get("Authorization") else
                "x-api-key" if self.headers.get("x-api-key") else None)
        return self.mock.record({
            "method": self.command, "path": self.path, "route": route, "stream": bool(body.get("stream")),
            "model": body.get("model"), "user_agent": self.headers.get("User-Agent"), "auth": auth,
            "body": body, **extra,
        })

    def not_found(self, path: str, body: dict) -> None:
        self.record(path, None, body)
        message = f"mock_model: no route for {self.command} {path}"
        self.send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": message}})

    def send_json(self, status: int, doc) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # -- SSE ---------------------------------------------------------------

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def event(self, kind: str, **fields) -> None:
        """One SSE event, ``{"type": kind, **fields}``, as one chunk."""
        chunk = f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.flush()

    def end_sse(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def hold(self) -> bool:
        """Wait until released; False if the client went away first (or the hold ran out)."""
        deadline = time.monotonic() + self.mock.hold_seconds
        while not self.mock.release.wait(0.05):
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                return False
            if time.monotonic() > deadline:
                return False
        return True

    def pace(self, kind: str) -> None:
        if kind == "slow" and self.mock.slow_s:
            time.sleep(self.mock.slow_s)

    def error_500(self) -> None:
        self.send_json(500, {"type": "error", "error": {"type": "api_error", "message": "mock injected 500"}})

    # -- OpenAI Responses (Codex) --------------------------------------------

    def serve_responses(self, path: str, body: dict) -> None:
        users, tool = responses_turn(body)
        kind = reply_kind(users, tool)
        n = self.record(path, "responses", body, prompt=users[-1] if users else None, user_texts=users,
                        reply=kind)["n"]
        if kind == "error":
            return self.error_500()
        text = reply_text(kind, users, tool, n)
        self.start_sse()
        rid = f"resp_mock_{n}"
        self.event("response.created", response={"id": rid})
        if kind == "command":
            self.function_call(n)
        else:
            self.message(n, kind, text)
        usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 6,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 16}
        self.event("response.completed", response={"id": rid, "usage": usage})
        self.end_sse()

    def message(self, n: int, kind: str, text: str) -> None:
        item_id = f"msg_mock_{n}"
        item = {"type": "message", "id": item_id, "role": "assistant", "status": "in_progress", "content": []}
        self.event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": []}
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}
        self.event("response.content_part.added", part=part, **at)
        for i, word in enumerate(words(text)):
            self.event("response.output_text.delta", delta=word, **at)
            if i == 0 and kind == "slow" and not self.hold():
                raise ConnectionAbortedError("the client left a held stream")
            self.pace(kind)
        self.event("response.output_text.done", text=text, **at)
        content = [{"type": "output_text", "text": text, "annotations": []}]
        done = dict(item, status="completed", content=content)
        self.event("response.output_item.done", output_index=0, item=done)

    def function_call(self, n: int) -> None:
        args = {"cmd": COMMAND, "sandbox_permissions": "require_escalated",
                "justification": "mock asks to run this outside the sandbox"}
        item = {"type": "function_call", "id": f"fc_mock_{n}", "call_id": f"call_mock_{n}",
                "name": "exec_command", "arguments": "", "status": "in_progress"}
        self.event("response.output_item.added", output_index=0, item=item)
        done = dict(item, arguments=json.dumps(args), status="completed")
        self.event("response.output_item.done", output_index=0, item=done)

    # -- Anthropic Messages (Claude Code) --------------------------------------

    def serve_messages(self, path: str, body: dict) -> None:
        users, tool = messages_turn(body)
        kind = reply_kind(users, tool)
        n = self.record(path, "messages", body, prompt=users[-1] if users else None, user_texts=users,
                        reply=kind)["n"]
        if kind == "error":
            return self.error_500()
        text = reply_text(kind, users, tool, n)
        model = body.get("model") or "mock-model"
        if kind == "command":
            blocks = [{"type": "tool_use", "id": f"toolu_mock_{n}", "name": "Bash",
                       "input": {"command": COMMAND, "description": "mock tool call"}}]
            stop = "tool_use"
        else:
            blocks = [{"type": "text", "text": text}]
            stop = "end_turn"
        usage = {"input_tokens": 10, "output_tokens": 6, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        message = {"id": f"msg_mock_{n}", "type": "message", "role": "assistant", "model": model,
                   "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return self.send_json(200, message)
        self.start_sse()
        opening = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
        self.event("message_start", message=opening)
        block = blocks[0]
        if block["type"] == "tool_use":
            self.event("content_block_start", index=0, content_block=dict(block, input={}))
            self.event("ping")
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            self.event("content_block_delta", index=0, delta=delta)
        else:
            self.event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            self.event("ping")
            for i, word in enumerate(words(text)):
                delta = {"type": "text_delta", "text": word}
                self.event("content_block_delta", index=0, delta=delta)
                if i == 0 and kind == "slow" and not self.hold():
                    raise ConnectionAbortedError("the client left a held stream")
                self.pace(kind)
        self.event("content_block_stop", index=0)
        stopped = {"stop_reason": stop, "stop_sequence": None}
        self.event("message_delta", delta=stopped, usage={"output_tokens": 6})
        self.event("message_stop")
        self.end_sse()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, BrokenPipeError)):
            return  # a client that left mid-stream (an interrupt) is normal here
        super().handle_error(request, client_address)


def dns_question(query: bytes) -> tuple[str, bytes]:
    """(name asked, the question section) of a DNS query packet."""
    labels, at = [], 12
    while at < len(query) and query[at]:
        size = query[at]
        labels.append(query[at + 1 : at + 1 + size].decode("ascii", "replace"))
        at += 1 + size
    return ".".join(labels), query[12 : at + 5]  # the root label, then QTYPE and QCLASS


def dns_sink(mock: Mock, sock: socket.socket) -> None:
    """Record every DNS query and answer NXDOMAIN: which outside hosts a CLI tries to reach."""
    while True:
        query, peer = sock.recvfrom(4096)
        if len(query) < 12:
            continue
        name, question = dns_question(query)
        mock.record({"method": "DNS", "path": name, "route": "dns", "stream": False, "body": {}})
        flags = b"\x81\x83"  # a response, recursion desired and available, NXDOMAIN
        sock.sendto(query[:2] + flags + b"\x00\x01" + b"\x00" * 6 + question, peer)


def read_commands(mock: Mock) -> None:
    """``release`` on stdin releases held streams; EOF on stdin changes nothing."""
    for line in sys.stdin:
        if line.strip() == "release":
            mock.release.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", help="append one JSON line per request to this file")
    parser.add_argument("--announce", action="store_true",
                        help="print REQUEST <n> <METHOD> <path> per request")
    parser.add_argument("--slow-ms", type=int, default=20,
                        help="pause per token of a released @slow reply (ms)")
    parser.add_argument("--hold-seconds", type=float, default=60.0,
                        help="longest an @slow stream waits to be released (seconds)")
    parser.add_argument("--dns-port", type=int,
                        help="also record DNS queries on this UDP port of 127.0.0.1, answering NXDOMAIN")
    args = parser.parse_args(argv)
    mock = Mock(args.log, args.announce, args.slow_ms, args.hold_seconds)
    if args.dns_port is not None:
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns.bind(("127.0.0.1", args.dns_port))
        threading.Thread(target=dns_sink, args=(mock, dns), daemon=True).start()
    handler = type("BoundHandler", (Handler,), {"mock": mock})
    server = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=read_commands, args=(mock,), daemon=True).start()
    say(f"PORT {server.server_address[1]}")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
