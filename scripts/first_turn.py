#!/usr/bin/env python3
"""One real turn, end to end: a real CLI, relay.py's protocol objects, the mock model (or yours).

    .venv/bin/python scripts/first_turn.py                       # Codex app-server vs the mock
    .venv/bin/python scripts/first_turn.py --provider claude     # Claude Code stream-json vs the mock
    .venv/bin/python scripts/first_turn.py --prompt "@command"   # a command (Codex: approval asked, accepted)
    OPENAI_API_KEY=sk-... .venv/bin/python scripts/first_turn.py --real --prompt "say hi"

It starts scripts/mock_model.py on 127.0.0.1 (unless ``--real``), writes the
provider's home with ``relay.provider_home_files`` into a temp dir, starts the
CLI with ``relay.provider_env`` over a scrubbed environment (PATH only), does
the handshake and one turn, prints the tokens as they stream and the final
text, and exits 0 when the turn completed.  ``--real`` takes the endpoint
from ``RELAY_<PROVIDER>_BASE_URL`` / ``RELAY_<PROVIDER>_MODEL`` (default: the
provider's public API) and the key from ``OPENAI_API_KEY`` /
``ANTHROPIC_API_KEY``, exactly as the relay's runtime will.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import relay  # noqa: E402

CLAUDE = ROOT / "scripts" / "node" / "node_modules" / ".bin" / "claude"
MOCK_KEY_ENV = "FLOW_RELAY_MOCK_KEY"
TURN_SECONDS = 120


def binary(provider: str) -> str:
    if provider == "codex":
        try:
            import codex_cli_bin
        except ImportError:
            sys.exit("first_turn: openai-codex-cli-bin is not installed; run scripts/setup.sh")
        return str(codex_cli_bin.bundled_codex_path())
    if not os.access(CLAUDE, os.X_OK):
        sys.exit(f"first_turn: {CLAUDE} is missing; run scripts/setup.sh (npm ci in scripts/node)")
    return str(CLAUDE)


def start_mock() -> tuple[subprocess.Popen, int]:
    mock = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "mock_model.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    word, port = mock.stdout.readline().split()
    assert word == b"PORT"
    return mock, int(port)


def endpoint_and_key(provider: str, real: bool, port: int | None) -> tuple[relay.ProviderEndpoint, str]:
    if not real:
        base = f"http://127.0.0.1:{port}" + ("/v1" if provider == "codex" else "")
        table = {"base_url": base, "api_key_env": MOCK_KEY_ENV}
        return relay.provider_endpoint(provider, table, environ={}), "mock-key"
    endpoint = relay.provider_endpoint(provider)
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        sys.exit(f"first_turn: --real needs the key in ${endpoint.api_key_env}; export it and run again")
    return endpoint, key


class Child:
    """The CLI and its protocol object; stdout read line by line, blocking (a script, not the relay)."""

    def __init__(self, argv: list[str], proto, env: dict, cwd: Path, stderr) -> None:
        self.proto = proto
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=env, cwd=cwd, start_new_session=True)
        self.deadline = time.monotonic() + TURN_SECONDS

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def events(self):
        while time.monotonic() < self.deadline:
            line = self.proc.stdout.readline()
            events = self.proto.receive_data(line) if line else self.proto.receive_eof()
            if out := self.proto.data_to_send():
                self.send(out)
            yield from events
            if not line:
                return
        sys.exit("first_turn: no answer within the time limit")

    def until(self, kind: str):
        for event in self.events():
            show(event)
            if event.kind == kind or event.kind == "stream.closed":
                return event
        return None


def show(event) -> None:
    if isinstance(event, relay.ItemDelta):
        print(event.delta, end="", flush=True)
    elif isinstance(event, relay.ItemCompleted) and event.item_type == "command_execution":
        print(f"\n[command {event.command!r} {event.status}: {(event.output or '').strip()!r}]", flush=True)
    elif isinstance(event, relay.ApprovalRequested):
        print(f"\n[approval asked for {event.command!r}: accepting]", flush=True)


def run_turn(child: Child, provider: str, prompt: str, work: Path) -> relay.WireEvent | None:
    if provider == "codex":
        child.send(child.proto.send_initialize())
        hello = child.until("handshake.completed")
        print(f"codex {hello.provider_version} ready", flush=True)
        child.send(child.proto.send_thread_start(cwd=str(work), approval_policy="on-request"))
        thread = child.until("thread.started")
        child.send(child.proto.send_turn_start(thread.thread_id, prompt))
    else:
        child.send(child.proto.send_user_message(prompt, turn_id="t1"))
    for event in child.events():
        show(event)
        if isinstance(event, relay.ApprovalRequested):
            child.send(child.proto.send_approval(event.approval_id, "accept"))
        if isinstance(event, relay._TurnEnded) or event.kind == "stream.closed":
            return event
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=relay.PROVIDER_SETTINGS, default="codex")
    parser.add_argument("--prompt", default="say hi")
    parser.add_argument("--real", action="store_true", help="the provider's real endpoint and your key")
    args = parser.parse_args(argv)
    mock, port = start_mock() if not args.real else (None, None)
    try:
        endpoint, key = endpoint_and_key(args.provider, args.real, port)
        with tempfile.TemporaryDirectory(prefix="first-turn-") as scratch:
            home, tmp, work = (Path(scratch) / name for name in ("home", "tmp", "work"))
            for directory in (home, tmp, work):
                directory.mkdir()
            for rel, data in relay.provider_home_files(endpoint).items():
                (home / rel).write_bytes(data)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                   **relay.provider_env(endpoint, home=str(home), tmpdir=str(tmp), api_key=key)}
            if args.provider == "codex":
                cli, proto = [binary("codex"), "app-server"], relay.CodexProtocol()
            else:
                cli = [binary("claude"), "-p", "--input-format", "stream-json", "--output-format",
                       "stream-json", "--verbose", "--include-partial-messages",
                       "--permission-prompt-tool", "stdio"]
                proto = relay.ClaudeProtocol()
            with open(Path(scratch) / "stderr.log", "wb") as stderr:
                child = Child(cli, proto, env, work, stderr)
                try:
                    end = run_turn(child, args.provider, args.prompt, work)
                finally:
                    child.proc.stdin.close()
                    child.proc.wait(timeout=10)
            if mock is not None:
                mock.stdin.close()
            print()
            if not isinstance(end, relay.TurnCompleted):
                print(f"first_turn: the turn did not complete: {end!r}", file=sys.stderr)
                print((Path(scratch) / "stderr.log").read_text(errors="replace")[-2000:], file=sys.stderr)
                return 1
            print(f"turn completed: {json.dumps(end.output_text)}")
            return 0
    finally:
        if mock is not None:
            mock.kill()
            mock.wait()


if __name__ == "__main__":
    sys.exit(main())
