"""The real tier: the pinned Codex and Claude Code binaries against scripts/mock_model.py.

The CLIs are driven directly (not through the relay yet) with relay.py's
protocol objects, their homes and environments from relay.py's "Provider
settings" section, and, where the platform allows (root), inside one
loopback-only network namespace with the mock, so nothing else is reachable.
Every test checks what the mock received; waits are on output lines, each
bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request

import pytest
import trio

import relay
from provider_helpers import (
    MOCK,
    claude_argv,
    codex_argv,
    mock_model,
    mock_port,
    netns_reason,
    real_cli,
)

slow = pytest.mark.slow
DECISIONS = pytest.mark.parametrize("decision", ["accept", "decline"])


def nothing_but_the_mock(mock) -> None:
    """No request the mock does not serve, and (in the namespace) no DNS lookup of any outside host."""
    assert mock.requests(None) == [], "a CLI asked the mock for a path it does not serve"
    assert mock.requests("dns") == [], "a CLI tried to reach an outside host"


def commands(events) -> list:
    return [e for e in events if isinstance(e, relay.ItemCompleted) and e.item_type == "command_execution"]


def claude_cli(mock, tmp_path, argv):
    return real_cli(mock, tmp_path / "home", argv, relay.ClaudeProtocol(), cwd=tmp_path / "work")


def ended(event) -> bool:
    return isinstance(event, (relay.TurnCompleted, relay.TurnFailed, relay.TurnInterrupted))


def text_of(events) -> str:
    return "".join(e.delta for e in events if isinstance(e, relay.ItemDelta) and e.stream == "text")


################################################################
# The settings every real run uses (pure)
################################################################


def test_codex_config_is_offline_and_points_at_the_endpoint():
    """Codex's config.toml names one provider at the endpoint, with no retries, plugins or analytics."""
    endpoint = relay.provider_endpoint("codex", {"base_url": "http://127.0.0.1:9/v1/", "api_key_env": "K"})
    doc = tomllib.loads(relay.provider_home_files(endpoint)["config.toml"].decode())
    provider = doc["model_providers"][doc["model_provider"]]
    assert provider["base_url"] == "http://127.0.0.1:9/v1" and provider["env_key"] == "K"
    assert provider["wire_api"] == "responses"
    assert provider["request_max_retries"] == 0 and provider["stream_max_retries"] == 0
    assert doc["features"] == {"plugins": False} and doc["analytics"] == {"enabled": False}
    assert doc["check_for_update_on_startup"] is False and doc["model"] == "gpt-5.5"


def test_provider_env_carries_the_key_and_the_offline_switches():
    """The key reaches the child only by its environment; Claude's non-model traffic and retries are off."""
    codex = relay.provider_endpoint("codex", {"api_key_env": "MY_KEY"}, environ={})
    env = relay.provider_env(codex, home="/h", tmpdir="/t", api_key="sk-x")
    assert env == {"CODEX_HOME": "/h", "HOME": "/h", "TMPDIR": "/t", "MY_KEY": "sk-x"}
    assert b"sk-x" not in relay.provider_home_files(codex)["config.toml"]
    claude = relay.provider_endpoint("claude", {"base_url": "http://127.0.0.1:9"}, environ={})
    env = relay.provider_env(claude, home="/h", tmpdir="/t", api_key="k")
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9" and env["ANTHROPIC_API_KEY"] == "k"
    assert env["HOME"] == "/h" and env["TMPDIR"] == "/t"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1" and env["CLAUDE_CODE_MAX_RETRIES"] == "0"
    assert relay.provider_home_files(claude) == {}


def test_provider_endpoint_defaults_overrides_and_refusals():
    """Real endpoints by default; the environment overrides the table; a key in the table is refused."""
    assert relay.provider_endpoint("claude", environ={}) == relay.ProviderEndpoint(
        provider="claude", base_url="https://api.anthropic.com", api_key_env="ANTHROPIC_API_KEY")
    env = {"RELAY_CODEX_BASE_URL": "http://127.0.0.1:1/v1", "RELAY_CODEX_MODEL": "gpt-x"}
    codex = relay.provider_endpoint("codex", {"base_url": "https://example.invalid/v1"}, environ=env)
    assert (codex.base_url, codex.model) == ("http://127.0.0.1:1/v1", "gpt-x")
    assert codex.api_key_env == "OPENAI_API_KEY"
    for table, words in [({"api_key": "sk-x"}, "unknown setting 'api_key'"),
                         ({"base_url": "ftp://x"}, r"not an http\(s\) URL"),
                         ({"api_key_env": "not a name"}, "not a variable name"),
                         ({"model": 5}, "must be a non-empty string")]:
        with pytest.raises(relay.InvalidArgument, match=words):
            relay.provider_endpoint("codex", table, environ={})
    with pytest.raises(relay.InvalidArgument, match="no endpoint settings"):
        relay.provider_endpoint("kimi")


def test_claude_completed_command_carries_its_command():
    """A Claude tool_result names only its tool_use id; the completed item still carries the command."""
    proto = relay.ClaudeProtocol()
    proto.send_user_message("@command", turn_id="t1")
    use = {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "echo hi"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "hi", "is_error": False}
    events = proto.receive_data(
        json.dumps({"type": "assistant", "message": {"id": "m1", "content": [use]}}).encode() + b"\n"
        + json.dumps({"type": "user", "message": {"role": "user", "content": [result]}}).encode() + b"\n")
    started, done = events
    assert (started.kind, started.command) == ("item.started", "echo hi")
    assert (done.kind, done.item_type, done.command, done.output) == (
        "item.completed", "command_execution", "echo hi", "hi")


################################################################
# The mock itself
################################################################


@contextlib.asynccontextmanager
async def plain_mock(*args: str):
    """The mock in this test's own network namespace (so the test can call it); yields its port."""
    proc = await trio.lowlevel.open_process([sys.executable, str(MOCK), *args], stdout=subprocess.PIPE)
    try:
        yield await mock_port(proc)
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
            await proc.stdout.aclose()


def fetch(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict | list]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_mock_records_requests_and_answers_unknown_paths_404(tmp_path):
    """An unknown path gets a 404 naming it and is recorded with route null; /_requests lists everything."""
    log = tmp_path / "log.jsonl"
    async with plain_mock("--log", str(log)) as port:
        status, doc = await trio.to_thread.run_sync(fetch, port, "POST", "/v1/chat/completions", {"x": 1})
        assert status == 404 and "no route for POST /v1/chat/completions" in doc["error"]["message"]
        body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
        status, doc = await trio.to_thread.run_sync(fetch, port, "POST", "/v1/messages", body)
        assert status == 200
        assert doc["content"] == [{"type": "text", "text": "Hello from mock #2: hello there"}]
        status, doc = await trio.to_thread.run_sync(fetch, port, "GET", "/_requests")
        assert [(r["route"], r.get("prompt")) for r in doc] == [(None, None), ("messages", "hello there")]
        assert [json.loads(x)["n"] for x in log.read_text().splitlines()] == [1, 2]


def stream_slow_then_release(port: int) -> tuple[list[str], list[str]]:
    """The SSE event types of an @slow Messages stream before and after POST /_release."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "@slow tale"}]}
    conn.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.headers["Content-Type"] == "text/event-stream"
    before: list[str] = []
    while "content_block_delta" not in before:
        line = reply.readline().decode()
        if line.startswith("event: "):
            before.append(line.split()[1])
    fetch(port, "POST", "/_release", {})
    after = [line.split()[1] for line in reply.read().decode().splitlines() if line.startswith("event: ")]
    conn.close()
    return before, after


async def test_mock_slow_stream_holds_until_released(tmp_path):
    """An @slow stream sends its opening and one token, then the rest only once released."""
    async with plain_mock("--slow-ms", "0") as port:
        before, after = await trio.to_thread.run_sync(stream_slow_then_release, port)
    assert before == ["message_start", "content_block_start", "ping", "content_block_delta"]
    assert after == ["content_block_delta"] * 5 + ["content_block_stop", "message_delta", "message_stop"]


@pytest.fixture
def namespace():
    """Skip, saying why, where the platform cannot make a loopback-only namespace (not root)."""
    if (reason := netns_reason()) is not None:
        pytest.skip(f"no loopback-only network namespace here ({reason}); the offline settings still apply")


async def test_the_namespace_reaches_nothing_but_itself(tmp_path, namespace):
    """Inside the mock's namespace only loopback exists, and a port open outside it is unreachable."""
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen()
    probe = ("import socket,sys\ntry: socket.create_connection(('127.0.0.1', int(sys.argv[1])), 5)\n"
             "except OSError as e: print('refused', e.errno)\nelse: print('connected')")
    try:
        async with mock_model(tmp_path) as mock:
            links = await trio.run_process([*mock.prefix(), "ip", "-o", "link"], capture_stdout=True)
            names = [line.split(":")[1].strip() for line in links.stdout.decode().splitlines()]
            assert names == ["lo"]
            port = str(outside.getsockname()[1])
            result = await trio.run_process([*mock.prefix(), sys.executable, "-c", probe, port],
                                            capture_stdout=True)
            assert result.stdout.decode().startswith("refused")
    finally:
        outside.close()


@slow
async def test_without_the_offline_settings_the_clis_look_up_outside_hosts(tmp_path, namespace):
    """The DNS sink sees what the offline settings prevent, so its silence in the other tests counts."""

    def online_codex(files, env):
        text = files["config.toml"].decode()
        files["config.toml"] = text.replace("plugins = false", "plugins = true").replace(
            "[analytics]\nenabled = false", "").encode()

    def online_claude(files, env):
        del env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"]

    async with mock_model(tmp_path) as mock:
        async with real_cli(mock, tmp_path / "codex", codex_argv(), relay.CodexProtocol(),
                            cwd=tmp_path / "work", tamper=online_codex) as child:
            thread_id = await codex_open(child, tmp_path / "work")
            await codex_turn(child, thread_id, "say hi")
            await child.proc.stdin.aclose()
            assert await child.wait() == 0
        codex_names = {r["path"] for r in mock.requests("dns")}
        # Which of them it gets to before the turn ends and stdin closes varies from run
        # to run (the plugin fetch races the turn); at least one always shows.
        assert codex_names & {"github.com", "api.github.com", "chatgpt.com"}, codex_names
        async with real_cli(mock, tmp_path / "claude", claude_argv(), relay.ClaudeProtocol(),
                            cwd=tmp_path / "work", tamper=online_claude) as child:
            await child.send(child.proto.send_user_message("say hi", turn_id="t1"))
            await child.until(ended)
            await child.proc.stdin.aclose()
            assert await child.wait() == 0
        assert "api.anthropic.com" in {r["path"] for r in mock.requests("dns")} - codex_names
        assert len(mock.requests("responses")) == 1 and len(mock.requests("messages")) == 1


################################################################
# Codex app-server
################################################################


async def codex_open(child, cwd, **thread_options) -> str:
    await child.send(child.proto.send_initialize())
    await child.until("handshake.completed")
    await child.send(child.proto.send_thread_start(cwd=str(cwd), **thread_options))
    return (await child.until("thread.started"))[-1].thread_id


async def codex_turn(child, thread_id: str, text: str, until=ended) -> list:
    await child.send(child.proto.send_turn_start(thread_id, text))
    return await child.until(until)


@slow
async def test_codex_handshake_thread_and_turn_with_deltas(tmp_path):
    """The pinned Codex handshakes, opens a persisted thread and streams a turn from the mock."""
    async with mock_model(tmp_path) as mock:
        async with real_cli(mock, tmp_path / "home", codex_argv(), relay.CodexProtocol(),
                            cwd=tmp_path / "work") as child:
            await child.send(child.proto.send_initialize())
            hello = (await child.until("handshake.completed"))[-1]
            assert hello.provider_version == "0.163.0"
            await child.send(child.proto.send_thread_start(cwd=str(tmp_path / "work")))
            thread = (await child.until("thread.started"))[-1]
            assert thread.ephemeral is False and thread.path.startswith(str(tmp_path / "home" / "sessions"))
            events = await codex_turn(child, thread.thread_id, "say hi")
            done = events[-1]
            assert isinstance(done, relay.TurnCompleted), done
            assert done.output_text == text_of(events) == "Hello from mock #1: say hi"
            assert len([e for e in events if isinstance(e, relay.ItemDelta)]) == 6
        (asked,) = mock.requests("responses")
        assert asked["prompt"] == "say hi" and asked["stream"] and asked["auth"] == "bearer"
        assert asked["model"] == "gpt-5.5" and asked["path"] == "/v1/responses"
        nothing_but_the_mock(mock)


@slow
@DECISIONS
async def test_codex_command_approval_round_trip(tmp_path, decision):
    """A command the model asks to run outside the sandbox waits for the holder's accept or decline."""
    work = tmp_path / "work"
    async with mock_model(tmp_path) as mock:
        async with real_cli(mock, tmp_path / "home", codex_argv(), relay.CodexProtocol(), cwd=work) as child:
            thread_id = await codex_open(child, work, approval_policy="on-request")
            asked = (await codex_turn(child, thread_id, "@command now", until="approval.requested"))[-1]
            assert "echo hi" in asked.command and asked.approval_kind == "command"
            assert asked.thread_id == thread_id
            await child.send(child.proto.send_approval(asked.approval_id, decision))
            events = await child.until("turn.completed")
        (command,) = commands(events)
        assert any(isinstance(e, relay.ApprovalResolved) for e in events)
        replies = [r["reply"] for r in mock.requests("responses")]
        assert replies == ["command", "after_tool"]  # the model was told the outcome either way
        if decision == "accept":
            assert (command.status, command.output.strip(), command.exit_code) == ("completed", "hi", 0)
            assert (work / "mock-hi.txt").read_text() == "hi\n"
            assert "saw the command output" in events[-1].output_text
        else:
            assert command.status == "declined" and not (work / "mock-hi.txt").exists()
        nothing_but_the_mock(mock)


@slow
async def test_codex_interrupt_mid_stream_then_the_thread_goes_on(tmp_path):
    """turn/interrupt ends a streaming turn as interrupted; the next turn on the thread completes."""
    async with mock_model(tmp_path) as mock:
        async with real_cli(mock, tmp_path / "home", codex_argv(), relay.CodexProtocol(),
                            cwd=tmp_path / "work") as child:
            thread_id = await codex_open(child, tmp_path / "work")
            first = (await codex_turn(child, thread_id, "@slow story", until="item.delta"))[-1]
            await child.send(child.proto.send_turn_interrupt(thread_id, first.turn_id))
            events = await child.until(ended)
            assert isinstance(events[-1], relay.TurnInterrupted) and events[-1].turn_id == first.turn_id
            assert any(isinstance(e, relay.InterruptAcknowledged) for e in events)
            after = await codex_turn(child, thread_id, "again")
            assert isinstance(after[-1], relay.TurnCompleted), after[-1]
        assert [r["prompt"] for r in mock.requests("responses")] == ["@slow story", "again"]
        nothing_but_the_mock(mock)


@slow
async def test_codex_two_threads_share_no_history_and_archive(tmp_path):
    """Two threads on one process: the model never sees A's prompt in B's turns; archive answers."""
    async with mock_model(tmp_path) as mock:
        async with real_cli(mock, tmp_path / "home", codex_argv(), relay.CodexProtocol(),
                            cwd=tmp_path / "a") as child:
            a = await codex_open(child, tmp_path / "a")
            assert isinstance((await codex_turn(child, a, "secret-alpha"))[-1], relay.TurnCompleted)
            await child.send(child.proto.send_thread_start(cwd=str(tmp_path / "b")))
            b = (await child.until("thread.started"))[-1].thread_id
            assert b != a
            assert isinstance((await codex_turn(child, b, "plain-beta"))[-1], relay.TurnCompleted)
            assert isinstance((await codex_turn(child, a, "alpha-again"))[-1], relay.TurnCompleted)
            for thread_id in (a, b):
                await child.send(child.proto.send_thread_archive(thread_id))
                assert (await child.until("thread.archived"))[-1].thread_id == thread_id
            await child.send(child.proto.send_probe())
            loaded = (await child.until("probe.answered"))[-1].native["result"]["data"]
            assert a not in loaded and b not in loaded
        by_prompt = {r["prompt"]: json.dumps(r["body"]) for r in mock.requests("responses")}
        assert list(by_prompt) == ["secret-alpha", "plain-beta", "alpha-again"]
        assert "secret-alpha" not in by_prompt["plain-beta"]  # no leak from A into B
        assert "secret-alpha" in by_prompt["alpha-again"]  # A keeps its own history
        assert str(tmp_path / "b") in by_prompt["plain-beta"]  # B's own cwd, not A's
        assert str(tmp_path / "a") not in by_prompt["plain-beta"]
        nothing_but_the_mock(mock)


@slow
async def test_codex_sigkill_mid_turn_then_resume_in_a_new_process(tmp_path):
    """After a SIGKILL mid-turn, a new process resumes the thread and the model gets its history."""
    home, work = tmp_path / "home", tmp_path / "work"
    async with mock_model(tmp_path) as mock:
        async with real_cli(mock, home, codex_argv(), relay.CodexProtocol(), cwd=work) as child:
            thread_id = await codex_open(child, work)
            first = (await codex_turn(child, thread_id, "remember-gamma"))[-1]
            killed = (await codex_turn(child, thread_id, "@slow doomed", until="item.delta"))[-1]
            os.killpg(child.proc.pid, signal.SIGKILL)
            closed = (await child.until("stream.closed"))[-1]
            assert killed.turn_id in closed.open_turns
            assert await child.wait() == -signal.SIGKILL
        async with real_cli(mock, home, codex_argv(), relay.CodexProtocol(), cwd=work) as child:
            await child.send(child.proto.send_initialize())
            await child.until("handshake.completed")
            await child.send(child.proto.send_thread_resume(thread_id))
            resumed = (await child.until(lambda e: e.kind in ("thread.resumed", "request.failed")))[-1]
            assert isinstance(resumed, relay.ThreadResumed), resumed
            assert resumed.thread_id == thread_id
            assert resumed.turns == ((first.turn_id, "completed"), (killed.turn_id, "interrupted"))
            assert isinstance((await codex_turn(child, thread_id, "after-crash"))[-1], relay.TurnCompleted)
        last = mock.requests("responses")[-1]
        assert last["prompt"] == "after-crash"
        assert "remember-gamma" in last["user_texts"] and "@slow doomed" in last["user_texts"]
        nothing_but_the_mock(mock)


@slow
async def test_codex_model_error_fails_the_turn_without_a_retry(tmp_path):
    """A 500 from the model fails the turn at once (request_max_retries = 0): the mock saw one request."""
    async with mock_model(tmp_path) as mock:
        async with real_cli(mock, tmp_path / "home", codex_argv(), relay.CodexProtocol(),
                            cwd=tmp_path / "work") as child:
            thread_id = await codex_open(child, tmp_path / "work")
            failed = (await codex_turn(child, thread_id, "@error please"))[-1]
            assert isinstance(failed, relay.TurnFailed) and failed.error
        assert [r["reply"] for r in mock.requests("responses")] == ["error"]
        nothing_but_the_mock(mock)


################################################################
# Claude Code stream-json
################################################################


@slow
async def test_claude_model_error_fails_the_turn_without_a_retry(tmp_path):
    """A 500 from the model fails the turn at once (CLAUDE_CODE_MAX_RETRIES=0): the mock saw one request."""
    async with mock_model(tmp_path) as mock:
        async with claude_cli(mock, tmp_path, claude_argv()) as child:
            await child.send(child.proto.send_user_message("@error please", turn_id="t1"))
            failed = (await child.until(ended))[-1]
            assert isinstance(failed, relay.TurnFailed) and "500" in failed.error
        assert [r["reply"] for r in mock.requests("messages")] == ["error"]
        nothing_but_the_mock(mock)


@slow
async def test_claude_two_turns_in_one_process(tmp_path):
    """The pinned Claude handshakes on the first user line, streams deltas, and keeps history in-process."""
    argv = claude_argv("--include-partial-messages")
    async with mock_model(tmp_path) as mock:
        async with claude_cli(mock, tmp_path, argv) as child:
            await child.send(child.proto.send_user_message("say hi", turn_id="t1"))
            events = await child.until(ended)
            hello = events[0]
            assert isinstance(hello, relay.HandshakeCompleted) and hello.provider_version == "2.1.197"
            assert hello.native["cwd"] == str(tmp_path / "work")  # in the namespace too
            assert isinstance(events[-1], relay.TurnCompleted), events[-1]
            assert events[-1].output_text == text_of(events) == "Hello from mock #1: say hi"
            await child.send(child.proto.send_user_message("second one", turn_id="t2"))
            events = await child.until(ended)
            assert isinstance(events[-1], relay.TurnCompleted) and events[-1].turn_id == "t2"
            assert events[-1].thread_id == hello.session_id
            await child.proc.stdin.aclose()  # the graceful stop
            assert await child.wait() == 0
        asked = mock.requests("messages")
        assert [(r["prompt"], r["stream"], r["auth"]) for r in asked] == [
            ("say hi", True, "x-api-key"), ("second one", True, "x-api-key")]
        assert asked[1]["user_texts"] == ["say hi", "second one"]
        assert all(r["path"] == "/v1/messages?beta=true" for r in asked)
        nothing_but_the_mock(mock)


@slow
@DECISIONS
async def test_claude_can_use_tool_round_trip(tmp_path, decision):
    """With --permission-prompt-tool stdio a Bash call waits for the holder's accept or decline."""
    work = tmp_path / "work"
    argv = claude_argv("--permission-prompt-tool", "stdio")
    async with mock_model(tmp_path) as mock:
        async with real_cli(mock, tmp_path / "home", argv, relay.ClaudeProtocol(), cwd=work) as child:
            await child.send(child.proto.send_user_message("@command now", turn_id="t1"))
            asked = (await child.until("approval.requested"))[-1]
            assert asked.tool_name == "Bash" and asked.approval_kind == "command"
            assert "echo hi" in asked.command
            await child.send(child.proto.send_approval(asked.approval_id, decision))
            events = await child.until(ended)
        (command,) = commands(events)
        assert isinstance(events[-1], relay.TurnCompleted), events[-1]
        assert [r["reply"] for r in mock.requests("messages")] == ["command", "after_tool"]
        assert command.command == "echo hi | tee mock-hi.txt"
        if decision == "accept":
            assert (command.status, command.output) == ("completed", "hi")
            assert (work / "mock-hi.txt").read_text() == "hi\n"
        else:
            assert command.status == "failed" and "denied by relay" in command.output
            assert not (work / "mock-hi.txt").exists()
            assert events[-1].native["permission_denials"][0]["tool_name"] == "Bash"
        nothing_but_the_mock(mock)


@slow
async def test_claude_interrupt_mid_stream_then_the_process_goes_on(tmp_path):
    """An interrupt control request ends a streaming turn as interrupted; the next user line completes."""
    argv = claude_argv("--include-partial-messages")
    async with mock_model(tmp_path) as mock:
        async with claude_cli(mock, tmp_path, argv) as child:
            await child.send(child.proto.send_user_message("@slow story", turn_id="t1"))
            await child.until("item.delta")
            await child.send(child.proto.send_interrupt())
            events = await child.until(ended)
            assert any(isinstance(e, relay.InterruptAcknowledged) for e in events)
            assert isinstance(events[-1], relay.TurnInterrupted) and events[-1].turn_id == "t1"
            await child.send(child.proto.send_user_message("again", turn_id="t2"))
            after = (await child.until(ended))[-1]
            assert isinstance(after, relay.TurnCompleted) and after.turn_id == "t2"
        assert [r["prompt"] for r in mock.requests("messages")] == ["@slow story", "again"]
        nothing_but_the_mock(mock)


@slow
async def test_claude_answers_a_probe_before_its_first_turn(tmp_path):
    """A warm Claude that has printed nothing yet answers the mcp_status probe, without calling the model."""
    async with mock_model(tmp_path) as mock:
        async with claude_cli(mock, tmp_path, claude_argv()) as child:
            await child.send(child.proto.send_probe())
            events = await child.until("probe.answered")
            assert [e.kind for e in events] == ["probe.answered"] and events[-1].ok
            assert mock.requests() == []
            await child.send(child.proto.send_user_message("now a turn", turn_id="t1"))
            assert isinstance((await child.until(ended))[-1],
                              relay.TurnCompleted)
        assert [r["prompt"] for r in mock.requests("messages")] == ["now a turn"]
