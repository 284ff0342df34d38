"""The provider wire protocols (sans-I/O) and the stand-in provider that exercises them.

The unit tests feed the protocol objects the JSON lines of
``../shared/reference/providers-wire.md`` (``…`` elisions dropped, otherwise
verbatim); the process tests run ``scripts/stand_in_provider.py`` as a real
child and drive it with the same objects, synchronised on its output only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import relay

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = ROOT / "scripts" / "stand_in_provider.py"


def lines(*frames: str) -> bytes:
    return b"".join(f.encode() + b"\n" for f in frames)


def kinds(events) -> list[str]:
    return [e.kind for e in events]


def commands(events) -> list:
    return [e for e in events if isinstance(e, relay.ItemCompleted) and e.item_type == "command_execution"]


def only(events, cls):
    found = [e for e in events if isinstance(e, cls)]
    assert len(found) == 1, kinds(events)
    return found[0]


################################################################
# Codex app-server: the reference lines
################################################################

CODEX_INIT_REPLY = (
    '{"id":0,"result":{"userAgent":"relay_probe/0.171.0 (Debian 12.0.0; x86_64) xterm (relay_probe; 0.0.1)",'
    '"codexHome":"/w/home","platformFamily":"unix","platformOs":"linux"}}'
)
CODEX_HANDSHAKE = (
    CODEX_INIT_REPLY,
    '{"method":"configWarning","params":{"summary":"Codex could not find bubblewrap on PATH.",'
    '"details":null},"emittedAtMs":1}',
    '{"method":"remoteControl/status/changed","params":{"status":"disabled"}}',
)
CODEX_THREAD = (
    '{"id":1,"result":{"thread":{"id":"T1","environments":[{"environmentId":"local","cwd":"WORKDIR_A"}],'
    '"ephemeral":true,"path":null,"status":{"type":"idle"},"modelProvider":"mock","model":"gpt-5.5"}}}',
    '{"method":"thread/started","params":{"thread":{"id":"T1"}}}',
)
CODEX_TURN = (
    '{"id":2,"result":{"turn":{"id":"U1","rootTurnId":"U1","items":[],"itemsView":"notLoaded",'
    '"status":"inProgress"}}}',
    '{"method":"thread/status/changed","params":{"threadId":"T1","status":{"type":"active","activeFlags":[]}}}',
    '{"method":"turn/started","params":{"threadId":"T1","turn":{"id":"U1","status":"inProgress"}}}',
    '{"method":"item/started","params":{"item":{"type":"userMessage","id":"i1","content":[{"type":"text",'
    '"text":"say hi"}]},"threadId":"T1","turnId":"U1"}}',
    '{"method":"item/completed","params":{"item":{"type":"userMessage","id":"i1","content":[{"type":"text",'
    '"text":"say hi"}]},"threadId":"T1","turnId":"U1"}}',
    '{"method":"item/started","params":{"item":{"type":"agentMessage","id":"msg_mock_1","text":""},'
    '"threadId":"T1","turnId":"U1"}}',
    '{"method":"item/agentMessage/delta","params":{"threadId":"T1","turnId":"U1","itemId":"msg_mock_1",'
    '"delta":"Hello "}}',
    '{"method":"item/agentMessage/delta","params":{"threadId":"T1","turnId":"U1","itemId":"msg_mock_1",'
    '"delta":"from mock #1: say hi"}}',
    '{"method":"item/completed","params":{"item":{"type":"agentMessage","id":"msg_mock_1",'
    '"text":"Hello from mock #1: say hi"},"threadId":"T1","turnId":"U1"}}',
    '{"method":"thread/tokenUsage/updated","params":{"threadId":"T1","turnId":"U1",'
    '"tokenUsage":{"total":{"totalTokens":16}}}}',
    '{"method":"account/rateLimits/updated","params":{"rateLimits":{"limitId":"codex"}}}',
    '{"method":"thread/status/changed","params":{"threadId":"T1","status":{"type":"idle"}}}',
    '{"method":"turn/completed","params":{"threadId":"T1","turn":{"id":"U1","items":[{"type":"agentMessage",'
    '"id":"msg_mock_1","text":"Hello from mock #1: say hi"}],"status":"completed","error":null,'
    '"durationMs":44}}}',
)
CODEX_FAILURE = (
    '{"method":"thread/status/changed","params":{"threadId":"T1","status":{"type":"systemError"}}}',
    '{"method":"error","params":{"error":{"message":"We’re currently experiencing high demand",'
    '"codexErrorInfo":"internalServerError"},"willRetry":false,"threadId":"T1","turnId":"U1"}}',
    '{"method":"turn/completed","params":{"threadId":"T1","turn":{"id":"U1","status":"failed","error":'
    '{"message":"We’re currently experiencing high demand","codexErrorInfo":"internalServerError"}}}}',
)
CODEX_COMMAND = (
    '{"method":"item/started","params":{"item":{"type":"commandExecution","id":"call_mock_1",'
    '"command":"/bin/bash -lc \'echo hi\'","cwd":"WORKDIR_A","processId":"41946",'
    '"source":"unifiedExecStartup","status":"inProgress"},"threadId":"T1","turnId":"U1"}}',
    '{"method":"item/commandExecution/outputDelta","params":{"threadId":"T1","turnId":"U1",'
    '"itemId":"call_mock_1","delta":"BORROWER=A \\n"}}',
    '{"method":"item/completed","params":{"item":{"type":"commandExecution","id":"call_mock_1",'
    '"command":"/bin/bash -lc \'echo hi\'","status":"completed","aggregatedOutput":"BORROWER=A \\n",'
    '"exitCode":0,"durationMs":26},"threadId":"T1","turnId":"U1"}}',
)
CODEX_APPROVAL = (
    '{"method":"thread/status/changed","params":{"threadId":"T1","status":{"type":"active",'
    '"activeFlags":["waitingOnApproval"]}}}',
    '{"method":"item/started","params":{"item":{"type":"commandExecution","id":"call_mock_1",'
    '"status":"inProgress"},"threadId":"T1","turnId":"U1"}}',
    '{"method":"item/commandExecution/requestApproval","id":0,"params":{"kind":"command","threadId":"T1",'
    '"turnId":"U1","itemId":"call_mock_1","reason":"mock asks to run this outside the sandbox",'
    '"command":"/bin/bash -lc \'touch /w/esc_accepted\'","cwd":"/w/work","commandActions":[{"type":"unknown",'
    '"command":"touch /w/esc_accepted"}],"proposedExecpolicyAmendment":["touch","/w/esc_accepted"],'
    '"availableDecisions":["accept",{"acceptWithExecpolicyAmendment":{"execpolicy_amendment":["touch",'
    '"/w/esc_accepted"]}},"cancel"]}}',
)
CODEX_APPROVAL_RESOLVED = (
    '{"method":"serverRequest/resolved","params":{"threadId":"T1","requestId":0}}',
    '{"method":"thread/status/changed","params":{"threadId":"T1","status":{"type":"active","activeFlags":[]}}}',
    '{"method":"item/completed","params":{"item":{"type":"commandExecution","id":"call_mock_1",'
    '"status":"completed","exitCode":0},"threadId":"T1","turnId":"U1"}}',
)


def codex_ready() -> relay.CodexProtocol:
    """A Codex protocol past the handshake and one thread/start (request ids 0 and 1)."""
    p = relay.CodexProtocol()
    p.send_initialize()
    p.receive_data(lines(*CODEX_HANDSHAKE))
    assert p.data_to_send() == b'{"method":"initialized"}\n'
    p.send_thread_start(cwd="WORKDIR_A", ephemeral=True)
    p.receive_data(lines(*CODEX_THREAD))
    return p


def test_codex_initialize_line_and_handshake():
    """initialize is the reference request; its result completes the handshake and queues ``initialized``."""
    p = relay.CodexProtocol(client_name="relay_probe", client_version="0.0.1")
    assert json.loads(p.send_initialize()) == json.loads(
        '{"method":"initialize","id":0,"params":{"clientInfo":{"name":"relay_probe","title":null,'
        '"version":"0.0.1"},"capabilities":{"experimentalApi":false,"requestAttestation":false}}}'
    )
    assert p.data_to_send() == b""
    events = p.receive_data(lines(*CODEX_HANDSHAKE))
    assert kinds(events) == ["handshake.completed", "provider.notice", "provider.notice"]
    assert events[0].provider_version == "0.171.0"
    assert [e.name for e in events[1:]] == ["configWarning", "remoteControl/status/changed"]
    assert p.state == "ready"
    assert p.data_to_send() == b'{"method":"initialized"}\n'
    assert p.data_to_send() == b""


def test_codex_requests_wait_for_the_handshake():
    """Thread, turn and probe requests before the initialize result are a caller bug."""
    p = relay.CodexProtocol()
    with pytest.raises(relay.WireStateError):
        p.send_thread_start(cwd="/w")
    p.send_initialize()
    with pytest.raises(relay.WireStateError):
        p.send_probe()
    with pytest.raises(relay.WireStateError):
        p.send_initialize()


def test_codex_handshake_failure():
    """An error reply to initialize is handshake.failed and leaves the protocol failed."""
    p = relay.CodexProtocol()
    p.send_initialize()
    (event,) = p.receive_data(b'{"id":0,"error":{"code":-32600,"message":"bad client"}}\n')
    assert isinstance(event, relay.HandshakeFailed) and event.error == "bad client"
    assert p.state == "failed" and p.data_to_send() == b""


def test_codex_thread_start_line():
    """thread/start carries cwd, policy, sandbox, ephemeral and the per-thread environment as observed."""
    p = relay.CodexProtocol()
    p.send_initialize()
    p.receive_data(lines(CODEX_INIT_REPLY))
    line = p.send_thread_start(cwd="WORKDIR_A", ephemeral=True, env={"BORROWER": "A"})
    assert json.loads(line) == json.loads(
        '{"method":"thread/start","id":1,"params":{"cwd":"WORKDIR_A","approvalPolicy":"never",'
        '"sandbox":"read-only","ephemeral":true,"config":{"shell_environment_policy":{"set":{"BORROWER":"A"}}}}}'
    )
    events = p.receive_data(lines(*CODEX_THREAD))
    assert kinds(events) == ["thread.started", "provider.notice"]
    assert (events[0].thread_id, events[0].ephemeral, events[0].path) == ("T1", True, None)


def test_codex_turn_maps_every_reference_line():
    """A whole observed turn: accepted, started, items, deltas, usage and the completed result."""
    p = codex_ready()
    assert json.loads(p.send_turn_start("T1", "say hi")) == json.loads(
        '{"method":"turn/start","id":2,"params":{"threadId":"T1","input":[{"type":"text","text":"say hi",'
        '"text_elements":[]}]}}'
    )
    events = p.receive_data(lines(*CODEX_TURN))
    assert kinds(events) == [
        "turn.accepted", "provider.notice", "turn.started", "item.started", "item.completed", "item.started",
        "item.delta", "item.delta", "item.completed", "usage.updated", "provider.notice", "provider.notice",
        "turn.completed",
    ]
    assert (events[0].thread_id, events[0].turn_id) == ("T1", "U1")
    user = events[4]
    assert (user.item_type, user.text, user.turn_id) == ("user_message", "say hi", "U1")
    deltas = [e for e in events if isinstance(e, relay.ItemDelta)]
    assert {(d.item_id, d.stream) for d in deltas} == {("msg_mock_1", "text")}
    agent = events[8]
    assert agent.item_type == "agent_message" and agent.text == "".join(d.delta for d in deltas)
    end = events[-1]
    assert end.output_text == "Hello from mock #1: say hi" and end.error is None
    assert end.usage == {"total": {"totalTokens": 16}}
    assert end.native == json.loads(CODEX_TURN[-1])
    assert p.open_turns() == ()


def test_codex_turn_started_before_its_response():
    """turn/started may precede the turn/start result; both orders give the same turn."""
    p = codex_ready()
    p.send_turn_start("T1", "say hi")
    events = p.receive_data(lines(CODEX_TURN[2], CODEX_TURN[0]))
    assert kinds(events) == ["turn.started", "turn.accepted"]
    assert p.open_turns() == ("U1",)
    p.receive_data(lines(CODEX_TURN[-1]))
    assert p.open_turns() == ()


def test_codex_turn_that_ends_before_its_start_is_answered():
    """A turn/completed overtaking the turn/start result leaves no turn open."""
    p = codex_ready()
    p.send_turn_start("T1", "say hi")
    p.receive_data(lines(CODEX_TURN[2], *CODEX_FAILURE[2:], CODEX_TURN[0]))
    assert p.open_turns() == ()


def test_codex_command_items_and_output_deltas():
    """commandExecution items become command_execution with command, output and exit code."""
    p = codex_ready()
    started, delta, done = p.receive_data(lines(*CODEX_COMMAND))
    assert (started.kind, started.item_type, started.command) == (
        "item.started", "command_execution", "/bin/bash -lc 'echo hi'")
    assert (delta.stream, delta.delta, delta.item_id) == ("output", "BORROWER=A \n", "call_mock_1")
    assert (done.status, done.output, done.exit_code) == ("completed", "BORROWER=A \n", 0)


def test_codex_failed_turn():
    """systemError, error, then turn/completed failed: turn.failed with the model's message."""
    p = codex_ready()
    events = p.receive_data(lines(*CODEX_FAILURE))
    assert kinds(events) == ["provider.notice", "provider.notice", "turn.failed"]
    assert events[-1].error == "We’re currently experiencing high demand"


def test_codex_interrupt():
    """turn/interrupt is the reference request; its {} reply and the interrupted turn are told apart."""
    p = codex_ready()
    p.send_turn_start("T1", "MOCK_HANG")
    p.receive_data(lines(CODEX_TURN[0]))
    line = json.loads(p.send_turn_interrupt("T1", "U1"))
    assert (line["method"], line["params"]) == ("turn/interrupt", {"threadId": "T1", "turnId": "U1"})
    events = p.receive_data(lines(
        f'{{"id":{line["id"]},"result":{{}}}}',
        '{"method":"turn/completed","params":{"threadId":"T1","turn":{"id":"U1","items":[],'
        '"status":"interrupted","error":null,"durationMs":503}}}',
    ))
    assert kinds(events) == ["interrupt.acknowledged", "turn.interrupted"]
    assert (events[0].thread_id, events[0].turn_id) == ("T1", "U1")


@pytest.mark.parametrize("decision", ["accept", "decline"])
def test_codex_approval_round_trip(decision):
    """requestApproval becomes approval.requested; the answer is the reference reply; resolved follows."""
    p = codex_ready()
    events = p.receive_data(lines(*CODEX_APPROVAL))
    asked = only(events, relay.ApprovalRequested)
    assert (asked.approval_id, asked.approval_kind, asked.thread_id, asked.turn_id, asked.item_id) == (
        "0", "command", "T1", "U1", "call_mock_1")
    assert asked.command == "/bin/bash -lc 'touch /w/esc_accepted'"
    assert asked.reason == "mock asks to run this outside the sandbox"
    assert p.send_approval("0", decision) == f'{{"id":0,"result":{{"decision":"{decision}"}}}}\n'.encode()
    with pytest.raises(relay.WireStateError):
        p.send_approval("0", decision)
    events = p.receive_data(lines(*CODEX_APPROVAL_RESOLVED))
    assert kinds(events) == ["approval.resolved", "provider.notice", "item.completed"]
    assert events[0].approval_id == "0"


def test_codex_approval_rejects_unknown_decisions():
    """Only accept and decline reach the provider."""
    p = codex_ready()
    p.receive_data(lines(*CODEX_APPROVAL))
    with pytest.raises(relay.WireStateError):
        p.send_approval("0", "acceptForSession")
    with pytest.raises(relay.WireStateError):
        p.send_approval("9", "accept")


def test_codex_file_change_approval():
    """item/fileChange/requestApproval is an approval too, of kind file_change."""
    p = codex_ready()
    (asked,) = p.receive_data(
        b'{"method":"item/fileChange/requestApproval","id":5,"params":{"threadId":"T1","turnId":"U1",'
        b'"itemId":"fc_1","reason":"write outside the workspace"}}\n')
    assert (asked.approval_kind, asked.approval_id, asked.item_id) == ("file_change", "5", "fc_1")
    assert p.send_approval("5", "decline") == b'{"id":5,"result":{"decision":"decline"}}\n'


def test_codex_unhandled_server_request_is_answered_with_an_error():
    """A server request nobody can answer gets an error reply at once, or the turn would wait forever."""
    p = codex_ready()
    (event,) = p.receive_data(
        b'{"method":"item/tool/requestUserInput","id":3,"params":{"threadId":"T1","turnId":"U1"}}\n')
    assert (event.kind, event.method, event.request_id) == (
        "request.refused", "item/tool/requestUserInput", "3")
    reply = json.loads(p.data_to_send())
    assert reply["id"] == 3 and reply["error"]["code"] == -32601


def test_codex_error_reply_and_archive_and_resume():
    """Error replies name the request; archive and resume replies are their own events."""
    p = codex_ready()
    p.send_thread_resume("T1")
    (failed,) = p.receive_data(
        b'{"id":2,"error":{"code":-32600,"message":"no rollout found for thread id T1"}}\n')
    assert (failed.kind, failed.method, failed.thread_id, failed.code) == (
        "request.failed", "thread/resume", "T1", -32600)
    assert failed.message == "no rollout found for thread id T1"
    p.send_thread_archive("T1")
    (archived,) = p.receive_data(b'{"id":3,"result":{}}\n')
    assert (archived.kind, archived.thread_id) == ("thread.archived", "T1")
    p.send_thread_resume("T2")
    (resumed,) = p.receive_data(
        b'{"id":4,"result":{"thread":{"id":"T2","turns":[{"id":"U1","status":"completed","items":[]},'
        b'{"id":"U2","status":"interrupted","items":[]}]}}}\n')
    assert (resumed.thread_id, resumed.turns) == ("T2", (("U1", "completed"), ("U2", "interrupted")))


def test_codex_probe():
    """thread/loaded/list is the probe; any answer, even an error, proves the process alive."""
    p = codex_ready()
    assert json.loads(p.send_probe())["method"] == "thread/loaded/list"
    (answer,) = p.receive_data(b'{"id":2,"result":{"data":[]}}\n')
    assert (answer.kind, answer.request_id, answer.ok) == ("probe.answered", "2", True)
    p.send_probe()
    (answer,) = p.receive_data(b'{"id":3,"error":{"code":-32600,"message":"busy"}}\n')
    assert (answer.kind, answer.ok) == ("probe.answered", False)


def test_codex_unknown_response_and_odd_frames():
    """A reply to no request, a frame of no known form and a badly shaped item are protocol errors."""
    p = codex_ready()
    events = p.receive_data(lines(
        '{"id":99,"result":{}}',
        '{"params":{}}',
        '{"method":"item/started","params":{"item":"not an object"}}',
        '{"method":"item/agentMessage/delta","params":{"delta":7}}',
    ))
    assert kinds(events) == ["protocol.error"] * 4
    assert "unknown request id 99" in events[0].reason


################################################################
# Claude stream-json: the reference lines
################################################################

CLAUDE_INIT = (
    '{"type":"system","subtype":"init","cwd":"/w","session_id":"S1","tools":["Bash"],"model":"claude-opus-5-5",'
    '"permissionMode":"default","apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.332",'
    '"messaging_socket_path":"/t/cc-socks/1.sock"}'
)
CLAUDE_TURN = (
    CLAUDE_INIT,
    '{"type":"assistant","message":{"id":"msg_mock_1","role":"assistant","content":[{"type":"text",'
    '"text":"Hello from mock #1: say hi"}]},"session_id":"S1","timestamp":"t"}',
    # 2.1.332's key order: "type" is not first.
    '{"is_error":false,"num_turns":1,"subtype":"success","api_error_status":null,'
    '"result":"Hello from mock #1: say hi","type":"result","terminal_reason":"completed",'
    '"permission_denials":[],"result_index":0,"usage":{"output_tokens":6}}',
)
CLAUDE_PARTIAL = (
    CLAUDE_INIT,
    '{"type":"system","subtype":"status","status":"requesting","session_id":"S1"}',
    '{"type":"stream_event","event":{"type":"message_start","message":{"id":"msg_mock_1"}},"session_id":"S1",'
    '"parent_tool_use_id":null,"api_message_id":"msg_mock_1"}',
    '{"type":"stream_event","event":{"type":"content_block_start","index":0,"content_block":{"type":"text",'
    '"text":""}},"session_id":"S1","parent_tool_use_id":null,"api_message_id":"msg_mock_1"}',
    '{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    '"text":"Hello ‘mock’ "}},"session_id":"S1","parent_tool_use_id":null,"api_message_id":"msg_mock_1"}',
    '{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    '"text":"#1"}},"session_id":"S1","parent_tool_use_id":null,"api_message_id":"msg_mock_1"}',
    '{"type":"stream_event","event":{"type":"content_block_stop","index":0},"session_id":"S1",'
    '"parent_tool_use_id":null,"api_message_id":"msg_mock_1"}',
    '{"type":"stream_event","event":{"type":"message_stop"},"session_id":"S1","parent_tool_use_id":null,'
    '"api_message_id":"msg_mock_1"}',
    '{"type":"assistant","message":{"id":"msg_mock_1","role":"assistant","content":[{"type":"text",'
    '"text":"Hello ‘mock’ #1"}]},"session_id":"S1"}',
    '{"type":"result","subtype":"success","is_error":false,"result":"Hello ‘mock’ #1","session_id":"S1",'
    '"terminal_reason":"completed","result_index":0}',
)
CLAUDE_TOOL = (
    '{"type":"assistant","message":{"content":[{"type":"tool_use","id":"toolu_mock_1","name":"Bash",'
    '"input":{"command":"touch x","description":"mock tool call"}}]}}',
    '{"type":"system","subtype":"task_started","task_id":"k1","tool_use_id":"toolu_mock_1",'
    '"task_type":"local_bash","is_backgrounded":false}',
    '{"type":"system","subtype":"task_notification","task_id":"k1","tool_use_id":"toolu_mock_1",'
    '"status":"completed"}',
    '{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_mock_1","type":"tool_result",'
    '"content":"done","is_error":false}]},"tool_use_result":{"stdout":"done"}}',
)
CLAUDE_CAN_USE_TOOL = (
    '{"type":"control_request","request_id":"0b78","request":{"subtype":"can_use_tool","tool_name":"Bash",'
    '"display_name":"Bash","input":{"command":"touch x"},"description":"mock tool call",'
    '"permission_suggestions":[]}}'
)


def claude_turn(p: relay.ClaudeProtocol, turn_id: str = "t1") -> None:
    assert p.send_user_message("say hi", turn_id=turn_id) == (
        b'{"type":"user","message":{"role":"user","content":"say hi"}}\n')


def test_claude_turn_and_handshake():
    """The first init is the handshake and opens the turn; the result (type not first) ends it."""
    p = relay.ClaudeProtocol()
    claude_turn(p)
    events = p.receive_data(lines(*CLAUDE_TURN))
    assert kinds(events) == ["handshake.completed", "turn.started", "item.completed", "turn.completed"]
    assert (events[0].provider_version, events[0].session_id) == ("2.1.332", "S1")
    assert (events[1].thread_id, events[1].turn_id) == ("S1", "t1")
    assert (events[2].item_type, events[2].text) == ("agent_message", "Hello from mock #1: say hi")
    end = events[3]
    assert (end.turn_id, end.output_text) == ("t1", "Hello from mock #1: say hi")
    assert end.usage == {"output_tokens": 6}
    claude_turn(p, "t2")
    events = p.receive_data(lines(*CLAUDE_TURN))
    assert kinds(events) == ["turn.started", "item.completed", "turn.completed"]
    assert events[-1].turn_id == "t2"


def test_claude_partial_messages():
    """stream_event text deltas are item.delta under the id the assistant line completes."""
    p = relay.ClaudeProtocol()
    claude_turn(p)
    events = p.receive_data(lines(*CLAUDE_PARTIAL))
    assert kinds(events) == [
        "handshake.completed", "turn.started", "provider.notice", "provider.notice", "item.started",
        "item.delta", "item.delta", "provider.notice", "provider.notice", "item.completed", "turn.completed",
    ]
    deltas = [e for e in events if isinstance(e, relay.ItemDelta)]
    done = only(events, relay.ItemCompleted)
    assert {d.item_id for d in deltas} == {done.item_id, only(events, relay.ItemStarted).item_id}
    assert "".join(d.delta for d in deltas) == done.text == "Hello ‘mock’ #1"


def test_claude_tool_use_items():
    """A Bash tool_use opens a command item and its tool_result completes it with the output."""
    p = relay.ClaudeProtocol()
    claude_turn(p)
    p.receive_data(lines(CLAUDE_INIT))
    events = p.receive_data(lines(*CLAUDE_TOOL))
    assert kinds(events) == ["item.started", "provider.notice", "provider.notice", "item.completed"]
    started, done = events[0], events[-1]
    assert (started.item_id, started.item_type, started.command, started.tool_name) == (
        "toolu_mock_1", "command_execution", "touch x", "Bash")
    assert (done.item_id, done.item_type, done.status, done.output) == (
        "toolu_mock_1", "command_execution", "completed", "done")


def test_claude_error_result_is_a_failed_turn():
    """is_error decides, whatever subtype says: a 500 with subtype success is turn.failed."""
    p = relay.ClaudeProtocol()
    claude_turn(p)
    events = p.receive_data(lines(
        CLAUDE_INIT,
        '{"type":"assistant","message":{"model":"<synthetic>","content":[{"type":"text",'
        '"text":"API Error: 500"}]}}',
        '{"type":"result","subtype":"success","is_error":true,"api_error_status":500,'
        '"result":"API Error: 500 x"}',
    ))
    assert kinds(events)[-1] == "turn.failed" and events[-1].error == "API Error: 500 x"


def test_claude_interrupt():
    """The interrupt is the reference control request; ack and aborted result are told apart."""
    p = relay.ClaudeProtocol()
    claude_turn(p)
    p.receive_data(lines(CLAUDE_INIT))
    assert p.send_interrupt() == (
        b'{"type":"control_request","request_id":"int-1","request":{"subtype":"interrupt"}}\n')
    events = p.receive_data(lines(
        '{"type":"control_response","response":{"subtype":"success","request_id":"int-1",'
        '"response":{"still_queued":[]}}}',
        '{"type":"user","message":{"role":"user","content":[{"type":"text",'
        '"text":"[Request interrupted by user]"}]}}',
        '{"is_error":true,"subtype":"error_during_execution","terminal_reason":"aborted_streaming",'
        '"errors":["[ede_diagnostic] x"],"type":"result","result_index":1}',
    ))
    assert kinds(events) == ["interrupt.acknowledged", "provider.notice", "turn.interrupted"]
    assert events[0].turn_id == events[-1].turn_id == "t1"
    assert events[-1].error == "[ede_diagnostic] x"


@pytest.mark.parametrize("decision", ["accept", "decline"])
def test_claude_can_use_tool_round_trip(decision):
    """can_use_tool is approval.requested; allow echoes the input back, deny says the relay denied it."""
    p = relay.ClaudeProtocol()
    claude_turn(p)
    (asked,) = p.receive_data(lines(CLAUDE_CAN_USE_TOOL))
    assert (asked.kind, asked.approval_id, asked.tool_name, asked.command, asked.turn_id) == (
        "approval.requested", "0b78", "Bash", "touch x", "t1")
    answer = p.send_approval("0b78", decision)
    behaviour = (
        '{"behavior":"allow","updatedInput":{"command":"touch x"}}' if decision == "accept"
        else '{"behavior":"deny","message":"denied by relay"}'
    )
    assert answer == (
        '{"type":"control_response","response":{"subtype":"success","request_id":"0b78",'
        f'"response":{behaviour}}}}}\n'
    ).encode()


def test_claude_unanswered_approval_cancelled_by_interrupt():
    """control_cancel_request closes the approval; the turn ends interrupted (aborted_tools)."""
    p = relay.ClaudeProtocol()
    claude_turn(p)
    p.receive_data(lines(CLAUDE_INIT, CLAUDE_CAN_USE_TOOL))
    p.send_interrupt()
    events = p.receive_data(lines(
        '{"type":"control_cancel_request","request_id":"0b78"}',
        '{"type":"control_response","response":{"subtype":"success","request_id":"int-1","response":{}}}',
        '{"type":"result","is_error":true,"subtype":"error_during_execution","terminal_reason":"aborted_tools"}',
    ))
    assert kinds(events) == ["approval.cancelled", "interrupt.acknowledged", "turn.interrupted"]
    with pytest.raises(relay.WireStateError):
        p.send_approval("0b78", "accept")


def test_claude_probe():
    """mcp_status is the probe (the reference line); an unsupported-subtype error still answers it."""
    p = relay.ClaudeProtocol()
    assert p.send_probe() == (
        b'{"type":"control_request","request_id":"p-1","request":{"subtype":"mcp_status"}}\n')
    (answer,) = p.receive_data(
        b'{"type":"control_response","response":{"subtype":"success","request_id":"p-1",'
        b'"response":{"mcpServers":[]}}}\n')
    assert (answer.kind, answer.request_id, answer.ok) == ("probe.answered", "p-1", True)
    p.send_probe()
    (answer,) = p.receive_data(
        b'{"type":"control_response","response":{"subtype":"error","request_id":"p-2",'
        b'"error":"Unsupported control request subtype: x","error_code":"unsupported_request"}}\n')
    assert (answer.kind, answer.ok) == ("probe.answered", False)


def test_claude_result_before_any_turn_is_a_failed_handshake():
    """--resume with an unknown id prints an error result before any turn: handshake.failed."""
    p = relay.ClaudeProtocol()
    (event,) = p.receive_data(
        b'{"type":"result","subtype":"error_during_execution","is_error":true,'
        b'"errors":["No conversation found with session ID: S9"]}\n')
    assert event.kind == "handshake.failed" and "No conversation found" in event.error


def test_claude_unknown_control_request_is_refused():
    """A control request the relay cannot serve gets an error control_response at once."""
    p = relay.ClaudeProtocol()
    (event,) = p.receive_data(
        b'{"type":"control_request","request_id":"h1","request":{"subtype":"hook_callback"}}\n')
    assert event.kind == "request.refused"
    reply = json.loads(p.data_to_send())
    assert reply["type"] == "control_response" and reply["response"]["subtype"] == "error"
    assert reply["response"]["request_id"] == "h1"


def test_kimi_text_turn():
    """Kimi print mode: one user line in, one assistant line out is a whole turn."""
    p = relay.KimiProtocol()
    assert p.send_user_message("say hi", turn_id="k1") == b'{"role":"user","content":"say hi"}\n'
    events = p.receive_data(b'{"role":"assistant","content":"Hello from mock #1: say hi"}\n')
    assert kinds(events) == ["handshake.completed", "turn.started", "item.completed", "turn.completed"]
    assert events[-1].output_text == "Hello from mock #1: say hi" and events[-1].turn_id == "k1"


################################################################
# Framing: partial lines, bounds, bad lines, key order, EOF
################################################################

CODEX_TRANSCRIPT = lines(
    *CODEX_TURN, *CODEX_COMMAND, *CODEX_APPROVAL, *CODEX_APPROVAL_RESOLVED, *CODEX_FAILURE)
CLAUDE_TRANSCRIPT = lines(*CLAUDE_PARTIAL)


def codex_events(chunks) -> list:
    p = codex_ready()
    p.send_turn_start("T1", "say hi")
    return [e for chunk in chunks for e in p.receive_data(chunk)]


def claude_events(chunks) -> list:
    p = relay.ClaudeProtocol()
    claude_turn(p)
    return [e for chunk in chunks for e in p.receive_data(chunk)]


@pytest.mark.parametrize(("events_of", "data"), [
    (codex_events, CODEX_TRANSCRIPT), (claude_events, CLAUDE_TRANSCRIPT),
], ids=["codex", "claude"])
def test_every_split_point_gives_the_same_events(events_of, data):
    """Cut anywhere (inside a UTF-8 character too) or fed byte by byte, a transcript gives the same events."""
    whole = events_of([data])
    assert len(whole) > 10 and not any(isinstance(e, relay.ProtocolError) for e in whole)
    for cut in range(1, len(data)):
        assert events_of([data[:cut], data[cut:]]) == whole, cut
    assert events_of([data[i:i + 1] for i in range(len(data))]) == whole


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(CODEX_TRANSCRIPT)), max_size=40))
def test_any_chunking_gives_the_same_events(cuts):
    """Random chunkings of the Codex transcript all decode alike."""
    bounds = [0, *sorted(cuts), len(CODEX_TRANSCRIPT)]
    chunks = [CODEX_TRANSCRIPT[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert codex_events(chunks) == codex_events([CODEX_TRANSCRIPT])


def test_key_order_does_not_matter():
    """The same frames with every object's keys reversed decode to equal events."""
    def reverse(value):
        if isinstance(value, dict):
            return {k: reverse(v) for k, v in reversed(list(value.items()))}
        return [reverse(v) for v in value] if isinstance(value, list) else value
    flipped = lines(*(json.dumps(reverse(json.loads(f)), ensure_ascii=False) for f in CODEX_TURN))
    assert flipped != lines(*CODEX_TURN)
    assert codex_events([flipped]) == codex_events([lines(*CODEX_TURN)])
    flipped = lines(*(json.dumps(reverse(json.loads(f)), ensure_ascii=False) for f in CLAUDE_PARTIAL))
    assert claude_events([flipped]) == claude_events([CLAUDE_TRANSCRIPT])


def test_bad_lines_are_reported_and_parsing_goes_on():
    """Non-JSON, non-object and invalid UTF-8 lines are protocol.error; the next good line still counts."""
    p = relay.ClaudeProtocol()
    claude_turn(p)
    events = p.receive_data(b"this is not json\n[1, 2]\n\xff\xfe{}\n\n  \n" + lines(CLAUDE_INIT))
    assert kinds(events) == ["protocol.error"] * 3 + ["handshake.completed", "turn.started"]
    assert events[0].native == "this is not json" and events[1].native == [1, 2]


@pytest.mark.parametrize("chunk", [1, 100, 4096, 20_000])
def test_over_long_line_is_dropped_within_the_bound(chunk):
    """A line over max_line_bytes is reported by its length, never buffered past the bound."""
    p = relay.CodexProtocol(max_line_bytes=1000)
    p.send_initialize()
    data = b'{"method":"x","params":{"pad":"' + b"y" * 10_000 + b'"}}\n' + lines(CODEX_INIT_REPLY)
    events = []
    for i in range(0, len(data), chunk):
        events += p.receive_data(data[i:i + chunk])
        assert len(p._lines._buf) <= 1000
    assert kinds(events) == ["protocol.error", "handshake.completed"]
    assert f"{len(data) - len(CODEX_INIT_REPLY) - 2} bytes" in events[0].reason


def test_a_line_of_exactly_the_bound_is_kept():
    """max_line_bytes is inclusive, whether the line arrives whole or in pieces."""
    frame = b'{"method":"x","params":{}}'
    for chunks in ([frame + b"\n"], [frame[:5], frame[5:], b"\n"]):
        p = relay.CodexProtocol(max_line_bytes=len(frame))
        assert kinds([e for c in chunks for e in p.receive_data(c)]) == ["provider.notice"]
        p = relay.CodexProtocol(max_line_bytes=len(frame) - 1)
        assert kinds([e for c in chunks for e in p.receive_data(c)]) == ["protocol.error"]


def test_eof_reports_a_cut_line_and_the_open_turns():
    """At EOF a half-written line is a protocol.error and stream.closed names the turns left open."""
    p = codex_ready()
    p.send_turn_start("T1", "say hi")
    p.receive_data(lines(*CODEX_TURN[:3]) + b'{"method":"item/sta')
    events = p.receive_eof()
    assert kinds(events) == ["protocol.error", "stream.closed"]
    assert events[1].open_turns == ("U1",)
    assert p.receive_eof() == []
    with pytest.raises(relay.WireStateError):
        p.receive_data(b"{}\n")


def test_eof_parses_a_final_unterminated_line():
    """A last line without its newline is still a frame."""
    p = relay.KimiProtocol()
    p.send_user_message("hi", turn_id="k1")
    assert p.receive_data(b'{"role":"assistant","content":"yo"}') == []
    assert kinds(p.receive_eof()) == [
        "handshake.completed", "turn.started", "item.completed", "turn.completed", "stream.closed"]


def test_events_of_different_kinds_never_compare_equal():
    """Kinds sharing a shape are still distinct types: equal fields, different kinds, unequal events."""
    assert relay.TurnCompleted(turn_id="U1") != relay.TurnFailed(turn_id="U1")
    assert relay.TurnCompleted(turn_id="U1") == relay.TurnCompleted(turn_id="U1")
    assert repr(relay.ItemDelta(delta="x")).startswith("ItemDelta(")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        relay.TurnStarted().turn_id = "U2"


def test_event_kinds_match_the_contract():
    """Every event class has its own kind, and specs/flow-runtime-contract.md's table lists exactly those."""
    assert len(set(relay.WIRE_EVENT_KINDS)) == len(relay.WIRE_EVENT_KINDS)
    text = (ROOT / "specs" / "flow-runtime-contract.md").read_text()
    table = text.split("| kind | fields | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = re.findall(r"^\| `([a-z.]+)` \|", table, flags=re.M)
    assert sorted(documented) == sorted(relay.WIRE_EVENT_KINDS)


################################################################
# The stand-in provider as a real child process
################################################################

PROTOCOLS = {"codex": relay.CodexProtocol, "claude": relay.ClaudeProtocol, "kimi": relay.KimiProtocol}

#: Any single wait on the child (seconds, real clock: autojump cannot see subprocesses).
WAIT_SECONDS = 20


class Child:
    """A stand-in process and the protocol object that speaks to it, as the supervisor will."""

    def __init__(self, proc: trio.Process, proto, provider: str, workdir: Path) -> None:
        self.proc, self.proto, self.provider, self.workdir = proc, proto, provider, workdir
        self.events: list = []
        self.stderr = b""
        self.eof = False
        self._pos = 0
        self.thread_id: str | None = None
        self._turns = 0

    async def send(self, data: bytes) -> None:
        await self.proc.stdin.send_all(data)

    async def until(self, kind: str) -> list:
        """Read and decode stdout until an event of ``kind``; the events since the last call."""
        start = self._pos
        with trio.fail_after(WAIT_SECONDS):
            while True:
                for i in range(self._pos, len(self.events)):
                    if self.events[i].kind == kind:
                        self._pos = i + 1
                        return self.events[start:self._pos]
                self._pos = len(self.events)
                assert not self.eof, f"stdout ended before {kind}: {kinds(self.events[start:])}"
                data = await self.proc.stdout.receive_some(1 << 16)
                self.eof = not data
                self.events += self.proto.receive_data(data) if data else self.proto.receive_eof()
                if out := self.proto.data_to_send():
                    await self.send(out)

    async def until_stderr(self, text: str) -> None:
        with trio.fail_after(WAIT_SECONDS):
            while text.encode() not in self.stderr:
                chunk = await self.proc.stderr.receive_some(1 << 16)
                assert chunk, f"stderr ended without {text!r}: {self.stderr!r}"
                self.stderr += chunk

    async def wait(self) -> int:
        with trio.fail_after(WAIT_SECONDS):
            return await self.proc.wait()

    # -- what a runtime does, per provider -----------------------------------

    async def open(self) -> None:
        """Codex: handshake and a non-ephemeral thread.  Claude and Kimi handshake on the first turn."""
        if self.provider == "codex":
            await self.send(self.proto.send_initialize())
            await self.until("handshake.completed")
            await self.send(self.proto.send_thread_start(cwd=str(self.workdir)))
            self.thread_id = (await self.until("thread.started"))[-1].thread_id

    async def turn(self, text: str) -> str:
        """Start a turn; its id once the provider started it."""
        self._turns += 1
        if self.provider == "codex":
            await self.send(self.proto.send_turn_start(self.thread_id, text))
        else:
            await self.send(self.proto.send_user_message(text, turn_id=f"t{self._turns}"))
        return (await self.until("turn.started"))[-1].turn_id

    async def interrupt(self, turn_id: str) -> None:
        if self.provider == "codex":
            await self.send(self.proto.send_turn_interrupt(self.thread_id, turn_id))
        else:
            await self.send(self.proto.send_interrupt())


@contextlib.asynccontextmanager
async def stand_in(tmp_path: Path, provider: str, *args: str, **proto_options):
    """The stand-in as a child; afterwards it is reaped and none of its pipes is left open."""
    env = dict(os.environ, CODEX_HOME=str(tmp_path / "codex"), HOME=str(tmp_path / "home"),
               TMPDIR=str(tmp_path))
    fds = set(os.listdir("/proc/self/fd"))
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(STAND_IN), "--provider", provider, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path),
    )
    try:
        yield Child(proc, PROTOCOLS[provider](**proto_options), provider, tmp_path)
    finally:
        with trio.CancelScope(shield=True):
            if proc.poll() is None:
                proc.kill()
            await proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                await stream.aclose()
    with pytest.raises(ChildProcessError):  # reaped: no zombie left
        os.waitpid(proc.pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
    assert set(os.listdir("/proc/self/fd")) <= fds


BOTH = pytest.mark.parametrize("provider", ["codex", "claude"])


@BOTH
async def test_stand_in_full_turns(tmp_path, provider):
    """Handshake, two turns with deltas (the second sees the first in its history), clean exit on EOF."""
    args = ("--include-partial-messages",) if provider == "claude" else ()
    async with stand_in(tmp_path, provider, *args) as child:
        await child.open()
        first = await child.turn("say hi")
        events = await child.until("turn.completed")
        deltas = [e.delta for e in events if isinstance(e, relay.ItemDelta)]
        agent = [e for e in events if isinstance(e, relay.ItemCompleted) and e.item_type == "agent_message"]
        assert len(deltas) > 3 and [a.text for a in agent] == ["".join(deltas)]
        assert events[-1].output_text == "Hello from stand-in #1 (history 0): say hi"
        assert events[-1].turn_id == first and events[-1].usage
        handshake = [e for e in child.events if isinstance(e, relay.HandshakeCompleted)]
        assert len(handshake) == 1 and handshake[0].provider_version.endswith("-standin")
        await child.turn("again")
        second = (await child.until("turn.completed"))[-1]
        assert second.output_text.startswith("Hello from stand-in #2 (history 1)")
        await child.proc.stdin.aclose()
        closed = (await child.until("stream.closed"))[-1]
        assert closed.open_turns == () and await child.wait() == 0
        assert not [e for e in child.events if isinstance(e, relay.ProtocolError)]


async def test_stand_in_codex_answers_out_of_order(tmp_path):
    """The stand-in sends turn/started both before and after the turn/start result, as Codex does."""
    async with stand_in(tmp_path, "codex") as child:
        await child.open()
        orders = []
        for text in ("one", "two"):
            turn_id = await child.turn(text)
            await child.until("turn.completed")
            orders.append([e.kind for e in child.events if e.kind in ("turn.accepted", "turn.started")
                           and e.turn_id == turn_id])
        assert sorted(orders) == [["turn.accepted", "turn.started"], ["turn.started", "turn.accepted"]]


@BOTH
@pytest.mark.parametrize("decision", ["accept", "decline"])
async def test_stand_in_approval(tmp_path, provider, decision):
    """@approve asks; the holder's answer decides whether the command runs; the turn then completes."""
    args = ("--permission-prompt-tool", "stdio") if provider == "claude" else ()
    async with stand_in(tmp_path, provider, *args) as child:
        await child.open()
        await child.turn("touch it @approve")
        asked = (await child.until("approval.requested"))[-1]
        assert asked.command and "touch" in asked.command
        await child.send(child.proto.send_approval(asked.approval_id, decision))
        events = await child.until("turn.completed")
        (command,) = commands(events)
        if decision == "accept":
            assert command.status == "completed" and command.output.startswith("ran: ")
        else:
            assert command.status in ("declined", "failed") and not (command.output or "").startswith("ran: ")


async def test_stand_in_claude_denies_without_a_permission_tool(tmp_path):
    """Without --permission-prompt-tool stdio Claude denies at once, asking nobody (as observed)."""
    async with stand_in(tmp_path, "claude") as child:
        await child.turn("touch it @approve")
        events = await child.until("turn.completed")
        assert "approval.requested" not in kinds(events)
        assert [c.status for c in commands(events)] == ["failed"]
        assert events[-1].native["permission_denials"]


@BOTH
async def test_stand_in_interrupt_of_a_stalled_turn(tmp_path, provider):
    """@stall goes silent; probes are still answered; the interrupt ends the turn; the process lives on."""
    async with stand_in(tmp_path, provider) as child:
        await child.open()
        turn_id = await child.turn("think hard @stall")
        await child.until_stderr("stalled:")
        await child.send(child.proto.send_probe())
        assert (await child.until("probe.answered"))[-1].ok
        await child.interrupt(turn_id)
        events = await child.until("turn.interrupted")
        assert "interrupt.acknowledged" in kinds(events) and events[-1].turn_id == turn_id
        await child.turn("next")
        assert (await child.until("turn.completed"))[-1].output_text


@BOTH
async def test_stand_in_interrupt_while_an_approval_is_pending(tmp_path, provider):
    """An interrupt ends a turn that waits on an approval; a late answer changes nothing."""
    args = ("--permission-prompt-tool", "stdio") if provider == "claude" else ()
    async with stand_in(tmp_path, provider, *args) as child:
        await child.open()
        turn_id = await child.turn("touch it @approve")
        asked = (await child.until("approval.requested"))[-1]
        await child.interrupt(turn_id)
        events = await child.until("turn.interrupted")
        if provider == "claude":
            assert "approval.cancelled" in kinds(events)
        else:
            await child.send(child.proto.send_approval(asked.approval_id, "accept"))
        await child.send(child.proto.send_probe())
        events = await child.until("probe.answered")
        assert not commands(events)


async def test_stand_in_codex_refused_server_request(tmp_path):
    """@ask sends a server request the relay refuses automatically; the turn goes on."""
    async with stand_in(tmp_path, "codex") as child:
        await child.open()
        await child.turn("question @ask")
        events = await child.until("turn.completed")
        assert only(events, relay.RequestRefused).method == "item/tool/requestUserInput"
        await child.until_stderr("requestUserInput answered with ['error', 'id']")


@BOTH
async def test_stand_in_failed_turn(tmp_path, provider):
    """@error fails the turn like an HTTP 500; the next turn works."""
    async with stand_in(tmp_path, provider) as child:
        await child.open()
        await child.turn("boom @error")
        assert "500" in (await child.until("turn.failed"))[-1].error
        await child.turn("fine")
        await child.until("turn.completed")


@BOTH
async def test_stand_in_crash_mid_turn(tmp_path, provider):
    """--fault crash-mid-turn: EOF after the first token, the turn left open, exit by SIGKILL."""
    async with stand_in(tmp_path, provider, "--fault", "crash-mid-turn") as child:
        await child.open()
        turn_id = await child.turn("say hi")
        events = await child.until("stream.closed")
        assert "item.delta" in kinds(events) or provider == "claude"
        assert not {"turn.completed", "turn.failed", "turn.interrupted"} & set(kinds(events))
        assert events[-1].open_turns == (turn_id,)
        assert await child.wait() == -signal.SIGKILL


CUE_OR_FAULT = pytest.mark.parametrize("via", ["cue", "fault"])


@contextlib.asynccontextmanager
async def faulted_turn(tmp_path: Path, provider: str, via: str, fault: str):
    """A stand-in with one turn started under ``fault``, cued for that turn or set for every turn."""
    args, prompt = ((), f"say hi @{fault}") if via == "cue" else (("--fault", fault), "say hi")
    async with stand_in(tmp_path, provider, *args) as child:
        await child.open()
        yield child, await child.turn(prompt)


@BOTH
@CUE_OR_FAULT
async def test_stand_in_hang_ignores_the_interrupt(tmp_path, provider, via):
    """hang: the interrupt is acknowledged but the turn never ends; the process still answers probes."""
    async with faulted_turn(tmp_path, provider, via, "hang") as (child, turn_id):
        await child.interrupt(turn_id)
        await child.until("interrupt.acknowledged")
        await child.until_stderr("hang: ignoring interrupt")
        await child.send(child.proto.send_probe())
        await child.until("probe.answered")
        child.proc.terminate()
        events = await child.until("stream.closed")
        assert events[-1].open_turns == (turn_id,)
        assert await child.wait() == (143 if provider == "claude" else 0)


@BOTH
@CUE_OR_FAULT
async def test_stand_in_wedge_answers_nothing(tmp_path, provider, via):
    """wedge: alive, but no probe answer and no exit on stdin EOF; only a signal ends it."""
    async with faulted_turn(tmp_path, provider, via, "wedge") as (child, _):
        await child.until_stderr("wedged: answering nothing")
        await child.send(child.proto.send_probe())
        await child.until_stderr("wedged: ignoring")
        await child.proc.stdin.aclose()
        await child.until_stderr("wedged: ignoring stdin EOF")
        assert child.proc.poll() is None
        child.proc.terminate()
        events = await child.until("stream.closed")
        assert "probe.answered" not in kinds(events)


@BOTH
async def test_stand_in_exit_before_handshake(tmp_path, provider):
    """--fault exit-before-handshake: no handshake, exit 1 (Claude with its error result)."""
    async with stand_in(tmp_path, provider, "--fault", "exit-before-handshake") as child:
        if provider == "codex":
            with contextlib.suppress(trio.BrokenResourceError):
                await child.send(child.proto.send_initialize())
        events = await child.until("stream.closed")
        assert "handshake.completed" not in kinds(events)
        assert ("handshake.failed" in kinds(events)) == (provider == "claude")
        assert await child.wait() == 1


@BOTH
async def test_stand_in_flood(tmp_path, provider):
    """--fault flood: thousands of deltas, every one decoded, read as fast as they come."""
    async with stand_in(tmp_path, provider, "--fault", "flood", "--flood-count", "5000") as child:
        await child.open()
        await child.turn("say hi")
        events = await child.until("turn.completed")
        deltas = [e.delta for e in events if isinstance(e, relay.ItemDelta)]
        assert len(deltas) == 5000 and events[-1].output_text == "".join(deltas)


@BOTH
async def test_stand_in_bad_json_is_survived(tmp_path, provider):
    """--fault bad-json: two protocol errors, and the turn completes all the same."""
    async with stand_in(tmp_path, provider, "--fault", "bad-json") as child:
        await child.open()
        await child.turn("say hi")
        events = await child.until("turn.completed")
        assert kinds(events).count("protocol.error") == 2


async def test_stand_in_huge_line_is_dropped(tmp_path):
    """@huge: a 1 MiB line over a 64 KiB bound is one protocol.error; the turn completes."""
    async with stand_in(tmp_path, "codex", "--huge-bytes", str(1 << 20), max_line_bytes=64 * 1024) as child:
        await child.open()
        await child.turn("say hi @huge")
        events = await child.until("turn.completed")
        (error,) = [e for e in events if isinstance(e, relay.ProtocolError)]
        assert "dropped a stdout line" in error.reason


async def test_stand_in_ignore_term(tmp_path):
    """--fault ignore-term survives SIGTERM (so a stop must escalate to SIGKILL)."""
    async with stand_in(tmp_path, "codex", "--fault", "ignore-term") as child:
        await child.open()
        child.proc.terminate()
        await child.send(child.proto.send_probe())
        await child.until("probe.answered")
        child.proc.kill()
        assert await child.wait() == -signal.SIGKILL


async def test_stand_in_codex_resume_after_crash_and_archive(tmp_path):
    """A thread killed mid-turn resumes in a new process with the killed turn interrupted; archive works."""
    async with stand_in(tmp_path, "codex") as child:
        await child.open()
        thread_id = child.thread_id
        first = await child.turn("one")
        await child.until("turn.completed")
        second = await child.turn("two @crash")
        await child.until("stream.closed")
    async with stand_in(tmp_path, "codex") as child:
        await child.open()
        await child.send(child.proto.send_probe())
        assert (await child.until("probe.answered"))[-1].native["result"]["data"] == [child.thread_id]
        await child.send(child.proto.send_thread_resume(thread_id))
        resumed = (await child.until("thread.resumed"))[-1]
        assert resumed.turns == ((first, "completed"), (second, "interrupted"))
        child.thread_id = thread_id
        await child.turn("three")
        assert "(history 1)" in (await child.until("turn.completed"))[-1].output_text
        await child.send(child.proto.send_thread_archive(thread_id))
        await child.until("thread.archived")
        await child.send(child.proto.send_thread_start(cwd=str(tmp_path), ephemeral=True))
        ephemeral = (await child.until("thread.started"))[-1]
        assert ephemeral.ephemeral is True and ephemeral.path is None
        await child.send(child.proto.send_thread_archive(ephemeral.thread_id))
        assert "no rollout found" in (await child.until("request.failed"))[-1].message


async def test_stand_in_claude_resume(tmp_path):
    """--resume of a known session keeps its history; of an unknown one fails the handshake (exit 1)."""
    async with stand_in(tmp_path, "claude", "--session-id", "S-1") as child:
        await child.turn("one")
        await child.until("turn.completed")
        await child.turn("two @crash")
        await child.until("stream.closed")
    async with stand_in(tmp_path, "claude", "--resume", "S-1") as child:
        await child.turn("three")
        events = await child.until("turn.completed")
        assert only(child.events, relay.HandshakeCompleted).session_id == "S-1"
        assert "(history 1)" in events[-1].output_text
    async with stand_in(tmp_path, "claude", "--resume", "S-404") as child:
        assert "handshake.failed" in kinds(await child.until("stream.closed"))
        assert await child.wait() == 1


async def test_stand_in_claude_finishes_the_turn_on_stdin_eof(tmp_path):
    """Closing Claude's stdin mid-turn lets the turn finish, then it exits 0 (as observed)."""
    async with stand_in(tmp_path, "claude") as child:
        await child.turn("take your time @slow")
        await child.proc.stdin.aclose()
        events = await child.until("stream.closed")
        assert "turn.completed" in kinds(events) and await child.wait() == 0


async def test_stand_in_claude_probe_before_the_first_turn(tmp_path):
    """A warm Claude prints nothing until its first line, but the stand-in answers a probe meanwhile."""
    async with stand_in(tmp_path, "claude") as child:
        await child.send(child.proto.send_probe())
        assert kinds(await child.until("probe.answered")) == ["probe.answered"]


async def test_stand_in_kimi(tmp_path):
    """Kimi: a text turn, then @error ends the whole process with exit 75."""
    async with stand_in(tmp_path, "kimi") as child:
        await child.turn("say hi")
        assert (await child.until("turn.completed"))[-1].output_text.endswith("say hi")
        await child.send(child.proto.send_user_message("boom @error", turn_id="t9"))
        assert (await child.until("stream.closed"))[-1].open_turns == ("t9",)
        assert await child.wait() == 75
