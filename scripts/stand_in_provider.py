#!/usr/bin/env python3
"""A stand-in for the coding-agent CLIs the relay supervises, speaking their stdio wire formats.

    stand_in_provider.py --provider codex            # like `codex app-server`
    stand_in_provider.py --provider claude [-p --input-format stream-json ...]   # like `claude -p`
    stand_in_provider.py --provider kimi             # like Kimi's print mode with stream-json

It follows the JSON lines of ../shared/reference/providers-wire.md closely
enough to exercise every path of the relay's protocol objects (handshake,
threads, turns, deltas, approvals, interrupts, resume, probe) without a model,
a network or a real CLI, and it misbehaves on cue:

- for every turn, ``--fault NAME`` (repeatable): ``crash-mid-turn`` (SIGKILL
  itself after the first token), ``stall`` (go silent mid-turn like a stalled
  model stream; probes and interrupts are still answered), ``hang`` (go silent
  and ignore the interrupt too; probes still answered), ``wedge`` (answer
  nothing at all any more, not even stdin EOF), ``flood`` (``--flood-count``
  deltas), ``bad-json`` (two unparseable lines, then carry on);
- at start: ``exit-before-handshake`` (exit 1 before the handshake; with
  ``--fail-while PATH``, only while PATH exists), ``ignore-term`` (SIGTERM is
  ignored, so only SIGKILL stops it), ``no-probe`` (liveness probes, Codex
  ``thread/loaded/list`` and Claude ``mcp_status``, go unanswered while
  everything else works: a process wedged for the relay's probe only);
- per turn, cues in the prompt text: ``@crash``, ``@stall``, ``@hang``,
  ``@wedge``, ``@flood``, ``@bad-json``, ``@huge`` (one ``--huge-bytes`` line),
  ``@error`` (the turn fails as on an HTTP 500), ``@approve`` (a command that
  asks for approval), ``@command`` (a command that needs none), ``@ask`` (a
  server request the relay cannot answer), ``@slow`` (``--slow-ms`` per token),
  ``@background`` (Codex: start ``sleep 300`` that outlives the turn, as a
  command left running does, and is killed by ``thread/archive``),
  ``@detach`` (as ``@background``, but not tied to the thread: only the end of
  the process group stops it), ``@pwd`` (the reply names the thread's cwd), ``@stamp`` (Codex: each
  delta is the wall-clock time it was written, for latency measurements).

When it stops answering on purpose it says so on stderr first (``wedged:``,
``hang:``), so tests can synchronise on that line instead of sleeping.
Standard library only, so it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

VERSION = {"codex": "0.163.0-standin", "claude": "2.1.197-standin", "kimi": "1.52.0-standin"}
FAULT_CUES = {
    "crash-mid-turn": "crash", "stall": "stall", "hang": "hang", "wedge": "wedge",
    "flood": "flood", "bad-json": "bad-json",
}
START_FAULTS = ("exit-before-handshake", "ignore-term", "no-probe")
FOREVER = threading.Event()  # never set: waiting on it blocks a thread for good


def log(message: str) -> None:
    sys.stderr.write(f"stand-in: {message}\n")
    sys.stderr.flush()


class Wire:
    """Whole lines to stdout, one writer at a time; a closed stdout ends the process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.out = sys.stdout.buffer

    def raw(self, data: bytes) -> None:
        with self.lock:
            try:
                self.out.write(data)
                self.out.flush()
            except (BrokenPipeError, ValueError):
                os._exit(1)

    def send(self, frame: dict) -> None:
        self.raw(json.dumps(frame, separators=(",", ":")).encode() + b"\n")


def cues_of(text: str, args: argparse.Namespace) -> set[str]:
    found = {w[1:] for w in text.split() if w.startswith("@")}
    return found | {FAULT_CUES[f] for f in args.fault if f in FAULT_CUES}


def reply_text(n: int, history: int, prompt: str) -> str:
    return f"Hello from stand-in #{n} (history {history}): {prompt[:60]}"


def tokens(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def misbehave_lines(wire: Wire, cues: set[str], args: argparse.Namespace, huge_frame: dict) -> None:
    if "bad-json" in cues:
        wire.raw(b"this line is not json\n")
        wire.raw(b'{"truncated": \n')
    if "huge" in cues:
        wire.send(huge_frame | {"padding": "x" * args.huge_bytes})


def crash() -> None:
    log("crashing (SIGKILL)")
    os.kill(os.getpid(), signal.SIGKILL)


def go_silent(what: str, cues: set[str], run: Run, provider: Provider) -> bool:
    """Stall, hang or wedge as the cues say; True if the turn was interrupted (stall only)."""
    if "wedge" in cues:
        provider.wedged = True
        log(f"wedged: answering nothing from now on ({what})")
        FOREVER.wait()
    log(f"stalled: silent until interrupted ({what})")
    run.wake.wait()
    if "hang" in cues:
        log(f"hang: ignoring interrupt of turn {run.id}")
        FOREVER.wait()
    return True


def write_json_atomic(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


class Run:
    """One running turn: woken by an interrupt or an answer to its server request."""

    def __init__(self, turn_id: str, prompt: str, cues: set[str]) -> None:
        self.id = turn_id
        self.prompt = prompt
        self.cues = cues
        self.wake = threading.Event()
        self.interrupted = False
        self.waiting_on: str | None = None  # id of the server request it waits for
        self.answer: dict | None = None
        self.done = False


class Provider:
    wedged = False

    def __init__(self, args: argparse.Namespace, wire: Wire) -> None:
        self.args = args
        self.wire = wire
        self.count = 0  # turns run by this process

    def serve(self) -> None:
        for line in sys.stdin.buffer:
            if self.wedged:
                log(f"wedged: ignoring {line[:80]!r}")
                continue
            try:
                frame = json.loads(line)
            except ValueError:
                log(f"ignoring a line that is not JSON: {line[:80]!r}")
                continue
            if isinstance(frame, dict):
                self.handle(frame)
        self.stdin_closed()

    def stdin_closed(self) -> None:
        if self.wedged:
            log("wedged: ignoring stdin EOF")
            FOREVER.wait()
        os._exit(0)

    def slow(self, cues: set[str]) -> None:
        if "slow" in cues:
            time.sleep(self.args.slow_ms / 1000)


################################################################
# Codex app-server
################################################################


class Codex(Provider):
    def __init__(self, args: argparse.Namespace, wire: Wire) -> None:
        super().__init__(args, wire)
        self.home = os.environ.get("CODEX_HOME") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "codex")
        self.initialized = False
        self.threads: dict[str, dict] = {}  # loaded threads
        self.runs: dict[str, Run] = {}
        self.server_ids = itertools.count()  # next() is atomic: turns on two threads may ask at once

    def thread_file(self, thread_id: str) -> str:
        return os.path.join(self.home, "standin-threads", f"{thread_id}.json")

    def persist(self, thread: dict) -> None:
        if not thread["ephemeral"]:
            write_json_atomic(self.thread_file(thread["id"]), thread)

    def notify(self, method: str, params: dict) -> None:
        self.wire.send({"method": method, "params": params, "emittedAtMs": int(time.time() * 1000)})

    def reply(self, rid, result: dict) -> None:
        self.wire.send({"id": rid, "result": result})

    def fail(self, rid, message: str, code: int = -32600) -> None:
        self.wire.send({"id": rid, "error": {"code": code, "message": message}})

    def handle(self, frame: dict) -> None:
        method, rid = frame.get("method"), frame.get("id")
        if method is None:  # a response to one of our server requests
            self.answered(frame)
        elif rid is None:  # a client notification
            self.initialized = self.initialized or method == "initialized"
        elif method != "initialize" and not self.initialized:
            self.fail(rid, "Not initialized")
        else:
            handler = getattr(self, "on_" + method.replace("/", "_"), None)
            if handler is None:
                self.fail(rid, f"unknown method {method}", -32601)
            else:
                handler(rid, frame.get("params") or {})

    def on_initialize(self, rid, params: dict) -> None:
        name = (params.get("clientInfo") or {}).get("name", "client")
        agent = f"{name}/{VERSION['codex']} (stand-in; x86_64) (stand-in)"
        self.reply(rid, {"userAgent": agent, "codexHome": self.home, "platformFamily": "unix",
                         "platformOs": "linux"})
        self.notify("configWarning", {"summary": "stand-in: no bubblewrap needed", "details": None})
        self.notify("remoteControl/status/changed", {"status": "disabled"})

    def thread_json(self, thread: dict) -> dict:
        return {"id": thread["id"], "ephemeral": thread["ephemeral"], "path": thread["path"],
                "cwd": thread["cwd"], "status": {"type": "idle"}, "modelProvider": "stand-in",
                "model": "stand-in", "cliVersion": VERSION["codex"]}

    def on_thread_start(self, rid, params: dict) -> None:
        tid = str(uuid.uuid4())
        ephemeral = bool(params.get("ephemeral", False))
        path = None if ephemeral else self.thread_file(tid)
        thread = {"id": tid, "ephemeral": ephemeral, "path": path, "cwd": params.get("cwd"), "turns": []}
        self.threads[tid] = thread
        self.persist(thread)
        self.reply(rid, {"thread": self.thread_json(thread)})
        self.notify("thread/started", {"thread": self.thread_json(thread)})

    def on_thread_resume(self, rid, params: dict) -> None:
        tid = params.get("threadId")
        try:
            with open(self.thread_file(tid)) as f:
                thread = json.load(f)
        except (OSError, ValueError, TypeError):
            return self.fail(rid, f"no rollout found for thread id {tid}")
        for turn in thread["turns"]:
            if turn["status"] == "inProgress":  # its process died mid-turn
                turn["status"] = "interrupted"
        self.threads[tid] = thread
        turns = [{"id": t["id"], "status": t["status"], "items": t["items"]} for t in thread["turns"]]
        self.reply(rid, {"thread": self.thread_json(thread) | {"turns": turns}})

    def on_thread_archive(self, rid, params: dict) -> None:
        thread = self.threads.get(params.get("threadId"))
        if thread is None or thread["ephemeral"]:
            return self.fail(rid, f"no rollout found for thread id {params.get('threadId')}")
        del self.threads[thread["id"]]
        for pid in thread.get("background", []):  # archive stops what its commands left running
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.reply(rid, {})

    def on_thread_loaded_list(self, rid, params: dict) -> None:
        if "no-probe" in self.args.fault:
            return log(f"no-probe: not answering thread/loaded/list {rid}")
        self.reply(rid, {"data": list(self.threads)})

    def on_turn_start(self, rid, params: dict) -> None:
        thread = self.threads.get(params.get("threadId"))
        if thread is None:
            return self.fail(rid, f"thread not found: {params.get('threadId')}")
        prompt = "".join(i.get("text", "") for i in params.get("input") or [] if isinstance(i, dict))
        run = Run(str(uuid.uuid4()), prompt, cues_of(prompt, self.args))
        self.runs[run.id] = run
        self.count += 1
        turn = {"id": run.id, "rootTurnId": run.id, "items": [], "itemsView": "notLoaded",
                "status": "inProgress"}
        started = {"threadId": thread["id"], "turn": turn}
        if self.count % 2:  # the reference saw both orders; exercise both
            self.reply(rid, {"turn": turn})
            self.notify("turn/started", started)
        else:
            self.notify("turn/started", started)
            self.reply(rid, {"turn": turn})
        threading.Thread(target=self.run_turn, args=(thread, run), daemon=True).start()

    def on_turn_interrupt(self, rid, params: dict) -> None:
        run = self.runs.get(params.get("turnId"))
        if run is None or run.done:
            return self.fail(rid, f"no active turn {params.get('turnId')}")
        self.reply(rid, {})
        run.interrupted = True
        run.wake.set()

    def answered(self, frame: dict) -> None:
        for run in list(self.runs.values()):
            if run.waiting_on is not None and run.waiting_on == frame.get("id"):
                run.answer = frame
                run.wake.set()
                return
        log(f"ignoring an answer to no open request: {frame.get('id')!r}")

    def server_request(self, run: Run, method: str, params: dict) -> dict | None:
        """Ask the client; the answer, or None if the turn was interrupted first."""
        sid = next(self.server_ids)
        run.waiting_on = sid
        self.wire.send({"method": method, "id": sid, "params": params})
        run.wake.wait()
        run.waiting_on = None
        run.wake.clear()
        if run.interrupted:
            return None
        self.notify("serverRequest/resolved", {"threadId": params["threadId"], "requestId": sid})
        return run.answer

    def run_turn(self, thread: dict, run: Run) -> None:
        tid, cues = thread["id"], run.cues
        ids = {"threadId": tid, "turnId": run.id}
        user = {"type": "userMessage", "id": f"user_{run.id}",
                "content": [{"type": "text", "text": run.prompt}]}
        record = {"id": run.id, "status": "inProgress", "items": [user]}
        thread["turns"].append(record)
        self.persist(thread)
        active = {"type": "active", "activeFlags": []}
        self.notify("thread/status/changed", {"threadId": tid, "status": active})
        self.notify("item/started", {"item": record["items"][0]} | ids)
        self.notify("item/completed", {"item": record["items"][0]} | ids)
        misbehave_lines(self.wire, cues, self.args, {"method": "standIn/padding", "params": ids})
        if cues & {"approve", "command", "ask"} and not self.command(run, ids, cues):
            return self.end(thread, run, record, "interrupted", [])
        if "error" in cues:
            return self.fail_turn(thread, run, record)
        self.agent_message(thread, run, record, ids)

    def command(self, run: Run, ids: dict, cues: set[str]) -> bool:
        """A command item (asking approval under @approve); False if interrupted meanwhile."""
        if "ask" in cues:
            answer = self.server_request(run, "item/tool/requestUserInput", ids | {"questions": []})
            if answer is None:
                return False
            log(f"requestUserInput answered with {sorted(answer)}")
        if not cues & {"approve", "command"}:
            return True
        item_id = f"call_standin_{self.count}"
        command = "/bin/bash -lc 'touch standin.txt'"
        item = {"type": "commandExecution", "id": item_id, "command": command, "cwd": ".",
                "processId": str(os.getpid()), "source": "unifiedExecStartup", "status": "inProgress"}
        status = "completed"
        self.notify("item/started", {"item": item} | ids)
        if "approve" in cues:
            flags = {"type": "active", "activeFlags": ["waitingOnApproval"]}
            self.notify("thread/status/changed", {"threadId": ids["threadId"], "status": flags})
            answer = self.server_request(run, "item/commandExecution/requestApproval", ids | {
                "kind": "command", "itemId": item_id, "reason": "stand-in asks to run this",
                "command": command, "cwd": ".", "availableDecisions": ["accept", "decline", "cancel"],
            })
            if answer is None:
                return False
            decision = (answer.get("result") or {}).get("decision")
            status = "completed" if decision in ("accept", "acceptForSession") else "declined"
            active = {"type": "active", "activeFlags": []}
            self.notify("thread/status/changed", {"threadId": ids["threadId"], "status": active})
        output = "ran: touch standin.txt\n" if status == "completed" else ""
        if output:
            self.notify("item/commandExecution/outputDelta", ids | {"itemId": item_id, "delta": output})
        done = item | {"status": status, "aggregatedOutput": output, "exitCode": 0 if output else None,
                       "durationMs": 1}
        self.notify("item/completed", {"item": done} | ids)
        return True

    def agent_message(self, thread: dict, run: Run, record: dict, ids: dict) -> None:
        cues = run.cues
        history = sum(1 for t in thread["turns"][:-1] if t["status"] == "completed")
        text = reply_text(self.count, history, run.prompt)
        for cue in ("background", "detach") if cues & {"background", "detach"} else ():
            if cue in cues:
                child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if cue == "background":
                    thread.setdefault("background", []).append(child.pid)
                log(f"{cue}: pid {child.pid}")
                text += f" [{cue} pid {child.pid}]"
        if "pwd" in cues:
            text += f" [cwd {thread['cwd']}]"
        parts = [f"tok{i} " for i in range(self.args.flood_count)] if "flood" in cues else tokens(text)
        text = "".join(parts)
        item = {"type": "agentMessage", "id": f"msg_standin_{self.count}", "text": ""}
        self.notify("item/started", {"item": item} | ids)
        for i, part in enumerate(parts):
            if "stamp" in cues:  # the delta says when it was written (latency measurements)
                part = f"{time.time():.6f} "
            self.notify("item/agentMessage/delta", ids | {"itemId": item["id"], "delta": part})
            if i == 0 and "crash" in cues:
                crash()
            if i == 0 and cues & {"stall", "hang", "wedge"}:
                go_silent("mid-turn", cues, run, self)
            if run.interrupted:
                return self.end(thread, run, record, "interrupted", [])
            self.slow(cues)
        done = item | {"text": text}
        self.notify("item/completed", {"item": done} | ids)
        record["items"].append(done)
        usage = {"total": {"totalTokens": 10 + len(parts), "inputTokens": 10, "outputTokens": len(parts)}}
        self.notify("thread/tokenUsage/updated", ids | {"tokenUsage": usage})
        self.notify("account/rateLimits/updated", {"rateLimits": {"limitId": "codex"}})
        self.notify("thread/status/changed", {"threadId": thread["id"], "status": {"type": "idle"}})
        self.end(thread, run, record, "completed", [done])

    def fail_turn(self, thread: dict, run: Run, record: dict) -> None:
        error = {"message": "stand-in injected 500", "codexErrorInfo": "internalServerError"}
        self.notify("thread/status/changed", {"threadId": thread["id"], "status": {"type": "systemError"}})
        self.notify("error", {"error": error, "willRetry": False, "threadId": thread["id"], "turnId": run.id})
        self.end(thread, run, record, "failed", [], error)

    def end(self, thread: dict, run: Run, record: dict, status: str, items: list, error=None) -> None:
        run.done = True
        record["status"] = status
        self.persist(thread)
        turn = {"id": run.id, "items": items, "status": status, "error": error, "durationMs": 1}
        self.notify("turn/completed", {"threadId": thread["id"], "turn": turn})


################################################################
# Claude Code stream-json
################################################################


class Claude(Provider):
    def __init__(self, args: argparse.Namespace, wire: Wire) -> None:
        super().__init__(args, wire)
        home = os.environ.get("HOME", "/tmp")
        self.store = os.path.join(home, ".claude-standin", "sessions")
        self.session_id = args.resume or args.session_id or str(uuid.uuid4())
        self.history: list[dict] = []
        self.turns: queue.Queue = queue.Queue()
        self.run: Run | None = None
        self.results = 0
        self.last_error = False
        self.worker = threading.Thread(target=self.work, daemon=True)

    def start(self) -> None:
        if self.args.resume:
            try:
                with open(os.path.join(self.store, f"{self.args.resume}.json")) as f:
                    self.history = json.load(f)["history"]
            except (OSError, ValueError, KeyError):
                message = f"No conversation found with session ID: {self.args.resume}"
                self.result_line(None, is_error=True, subtype="error_during_execution", errors=[message])
                log(message)
                os._exit(1)
        self.worker.start()

    def handle(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind == "user":
            self.turns.put(frame)
        elif kind == "control_request":
            self.control(frame.get("request_id"), frame.get("request") or {})
        elif kind == "control_response":
            response = frame.get("response") or {}
            run = self.run
            if run is not None and run.waiting_on and run.waiting_on == response.get("request_id"):
                run.answer = response.get("response") or {}
                run.wake.set()
            else:
                log(f"ignoring a control_response to no open request: {response.get('request_id')!r}")
        else:
            log(f"ignoring an input line of type {kind!r}")

    def control(self, rid, request: dict) -> None:
        subtype = request.get("subtype")
        ok = {"subtype": "success", "request_id": rid}
        if subtype == "interrupt":
            run = self.run
            if run is not None and run.waiting_on:
                self.wire.send({"type": "control_cancel_request", "request_id": run.waiting_on})
            self.wire.send({"type": "control_response", "response": ok | {"response": {"still_queued": []}}})
            if run is not None:
                run.interrupted = True
                run.wake.set()
        elif subtype == "mcp_status" and "no-probe" in self.args.fault:
            log(f"no-probe: not answering mcp_status {rid}")
        elif subtype == "mcp_status":
            self.wire.send({"type": "control_response", "response": ok | {"response": {"mcpServers": []}}})
        else:
            error = {"subtype": "error", "request_id": rid, "error_code": "unsupported_request",
                     "error": f"Unsupported control request subtype: {subtype}"}
            self.wire.send({"type": "control_response", "response": error})

    def stdin_closed(self) -> None:
        if not self.wedged:
            self.turns.put(None)  # finish what was sent, then exit
            self.worker.join()
        super().stdin_closed()

    def work(self) -> None:
        while (frame := self.turns.get()) is not None:
            content = (frame.get("message") or {}).get("content")
            prompt = content if isinstance(content, str) else "".join(
                b.get("text", "") for b in content or [] if isinstance(b, dict))
            self.count += 1
            self.run = Run(f"turn-{self.count}", prompt, cues_of(prompt, self.args))
            self.turn(self.run)
            self.run = None
            write_json_atomic(os.path.join(self.store, f"{self.session_id}.json"), {"history": self.history})
        os._exit(1 if self.last_error else 0)

    def send(self, frame: dict) -> None:
        self.wire.send(frame | {"session_id": self.session_id})

    def turn(self, run: Run) -> None:
        cues = run.cues
        self.send({"type": "system", "subtype": "init", "cwd": os.getcwd(), "tools": ["Bash", "Read"],
                   "model": "stand-in", "permissionMode": self.args.permission_mode or "default",
                   "apiKeySource": "ANTHROPIC_API_KEY", "claude_code_version": VERSION["claude"]})
        self.history.append({"role": "user", "content": run.prompt})
        misbehave_lines(self.wire, cues, self.args, {"type": "system", "subtype": "status"})
        denials: list = []
        if cues & {"approve", "command"} and not self.tool(run, cues, denials):
            return self.interrupted(run, "aborted_tools")
        if "error" in cues:
            self.send({"type": "assistant", "message": {
                "id": f"msg_standin_{self.count}", "role": "assistant", "model": "<synthetic>",
                "content": [{"type": "text", "text": "API Error: 500 stand-in injected 500"}]}})
            text = "API Error: 500 stand-in injected 500"
            return self.result_line(text, is_error=True, api_error_status=500)
        self.text(run, denials)

    def tool(self, run: Run, cues: set[str], denials: list) -> bool:
        tool_id = f"toolu_standin_{self.count}"
        command = "touch standin.txt" if "approve" in cues else "ls"
        tool_input = {"command": command, "description": "stand-in tool call"}
        use = {"type": "tool_use", "id": tool_id, "name": "Bash", "input": tool_input}
        self.send({"type": "assistant", "message": {"id": f"msg_standin_{self.count}_tool",
                                                    "role": "assistant", "content": [use]}})
        output, is_error = "standin.txt\n", False
        if "approve" in cues and self.args.permission_prompt_tool != "stdio":
            output, is_error = "This command needs approval", True
            denials.append({"tool_name": "Bash", "tool_use_id": tool_id, "tool_input": tool_input})
        elif "approve" in cues:
            run.waiting_on = uuid.uuid4().hex
            self.send({"type": "control_request", "request_id": run.waiting_on, "request": {
                "subtype": "can_use_tool", "tool_name": "Bash", "display_name": "Bash", "input": tool_input,
                "description": "stand-in tool call", "tool_use_id": tool_id, "permission_suggestions": []}})
            run.wake.wait()
            run.waiting_on = None
            if run.interrupted:
                self.tool_result(tool_id, "The user rejected this tool use", True)
                self.send({"type": "user", "message": {"role": "user", "content": [
                    {"type": "text", "text": "[Request interrupted by user for tool use]"}]}})
                return False
            run.wake.clear()
            if (run.answer or {}).get("behavior") == "allow":
                output = "ran: " + run.answer.get("updatedInput", tool_input).get("command", "")
            else:
                output, is_error = (run.answer or {}).get("message", "denied"), True
                denials.append({"tool_name": "Bash", "tool_use_id": tool_id, "tool_input": tool_input})
        self.tool_result(tool_id, output, is_error)
        return True

    def tool_result(self, tool_id: str, output: str, is_error: bool) -> None:
        self.send({"type": "user", "message": {"role": "user", "content": [
            {"tool_use_id": tool_id, "type": "tool_result", "content": output, "is_error": is_error}]},
            "tool_use_result": {"stdout": "" if is_error else output}})

    def text(self, run: Run, denials: list) -> None:
        cues = run.cues
        history = sum(1 for m in self.history[:-1] if m["role"] == "assistant")
        text = reply_text(self.count, history, run.prompt)
        parts = [f"tok{i} " for i in range(self.args.flood_count)] if "flood" in cues else tokens(text)
        text = "".join(parts)
        mid = f"msg_standin_{self.count}"
        partial = self.args.include_partial_messages or "flood" in cues
        stream = lambda event: self.send({"type": "stream_event", "event": event, "parent_tool_use_id": None,
                                          "api_message_id": mid})
        if partial:
            stream({"type": "message_start", "message": {"id": mid, "role": "assistant", "content": []}})
            stream({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        for i, part in enumerate(parts):
            if partial:
                delta = {"type": "text_delta", "text": part}
                stream({"type": "content_block_delta", "index": 0, "delta": delta})
            if i == 0 and "crash" in cues:
                crash()
            if i == 0 and cues & {"stall", "hang", "wedge"}:
                go_silent("mid-turn", cues, run, self)
            if run.interrupted:
                if partial:
                    stream({"type": "content_block_stop", "index": 0})
                    stream({"type": "message_delta", "delta": {"stop_reason": None}})
                    stream({"type": "message_stop", "abandoned_blocks": [0]})
                self.send({"type": "user", "message": {"role": "user", "content": [
                    {"type": "text", "text": "[Request interrupted by user]"}]}})
                return self.interrupted(run, "aborted_streaming")
            self.slow(cues)
        if partial:
            stream({"type": "content_block_stop", "index": 0})
            stream({"type": "message_delta", "delta": {"stop_reason": "end_turn"}})
            stream({"type": "message_stop"})
        self.send({"type": "assistant", "message": {"id": mid, "role": "assistant", "model": "stand-in",
                   "content": [{"type": "text", "text": text}]}})
        self.history.append({"role": "assistant", "content": text})
        self.result_line(text, permission_denials=denials)

    def interrupted(self, run: Run, reason: str) -> None:
        self.result_line("", is_error=True, subtype="error_during_execution", terminal_reason=reason,
                         errors=["[ede_diagnostic] stand-in interrupted"])

    def result_line(self, text, *, is_error=False, subtype="success", terminal_reason="completed",
                    api_error_status=None, errors=None, permission_denials=()) -> None:
        # "type" deliberately not first: Claude 2.1.332 moved it, and parsers must not care.
        frame = {"is_error": is_error, "num_turns": 1, "subtype": subtype,
                 "api_error_status": api_error_status, "result": text, "type": "result",
                 "terminal_reason": terminal_reason,
                 "permission_denials": list(permission_denials), "result_index": self.results,
                 "usage": {"input_tokens": 10, "output_tokens": len((text or "").split())}}
        if errors:
            frame["errors"] = errors
        self.results += 1
        self.last_error = is_error
        self.send(frame)


################################################################
# Kimi print mode (stream-json)
################################################################


class Kimi(Provider):
    def handle(self, frame: dict) -> None:
        if frame.get("role") != "user":
            return log(f"ignoring a line with role {frame.get('role')!r}")
        prompt = str(frame.get("content", ""))
        cues = cues_of(prompt, self.args)
        self.count += 1
        misbehave_lines(self.wire, cues, self.args, {"role": "system"})
        if "crash" in cues:
            crash()
        if "error" in cues:
            log("Error code: 500 - {'error': {'message': 'stand-in injected 500'}}")
            os._exit(75)
        if cues & {"stall", "hang", "wedge"}:
            self.wedged = "wedge" in cues
            log("stalled: silent for good (kimi has no interrupt)")
            FOREVER.wait()
        self.wire.send({"role": "assistant", "content": reply_text(self.count, self.count - 1, prompt)})


################################################################
# main
################################################################


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--provider", choices=("codex", "claude", "kimi"), required=True)
    p.add_argument("--fault", action="append", default=[], choices=(*FAULT_CUES, *START_FAULTS))
    p.add_argument("--flood-count", type=int, default=20_000, help="deltas a flooding turn sends")
    p.add_argument("--huge-bytes", type=int, default=1 << 20, help="size of the @huge line (bytes)")
    p.add_argument("--slow-ms", type=float, default=5.0, help="pause per token under @slow (ms)")
    p.add_argument("--fail-while", metavar="PATH",
                   help="exit-before-handshake only while PATH exists (a start that heals)")
    # The real CLIs' flags that change what the stand-in does; the rest are accepted and ignored.
    p.add_argument("--session-id")
    p.add_argument("--resume")
    p.add_argument("--include-partial-messages", action="store_true")
    p.add_argument("--permission-prompt-tool")
    p.add_argument("--permission-mode")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        log(f"ignoring arguments {unknown}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    wire = Wire()
    if "ignore-term" in args.fault:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:  # codex exits 0 on SIGTERM, claude 143 (with or without a turn running)
        code = 143 if args.provider == "claude" else 0
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    log(f"{args.provider} {VERSION[args.provider]} pid {os.getpid()}")
    if "exit-before-handshake" in args.fault and (args.fail_while is None
                                                  or os.path.exists(args.fail_while)):
        if args.provider == "claude":
            Claude(args, wire).result_line(None, is_error=True, subtype="error_during_execution",
                                           errors=["stand-in: failing before the handshake"])
        log("failing before the handshake")
        return 1
    provider = {"codex": Codex, "claude": Claude, "kimi": Kimi}[args.provider](args, wire)
    if isinstance(provider, Claude):
        provider.start()
    provider.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
