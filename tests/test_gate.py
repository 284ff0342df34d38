"""``python -m relay gate``: a healthy workspace built through the CLI passes every
check; each test breaks exactly one invariant in a copy of it and asserts the gate
fails that check by id, names a repair, and passes the others.  The gate never
changes flow/state, whatever it finds."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import run_cli

import relay
import relay_client as rc

GATE_IDS = [ident for ident, _, _ in relay.GATE_CHECKS]
DAY = 24 * 60 * 60

# The checks that need a valid ledger skip (with a reason) when it is damaged.
SKIP_WITHOUT_LEDGER = {
    "streams_valid", "cursors_match_streams", "tokens_are_digests", "pooled_codex_only",
    "quarantined_sessions_failed", "no_lease_on_failed_session", "no_writer_with_reader",
    "http_reads_readonly", "running_turns_leased", "no_turn_on_quarantined_session",
    "provider_processes_owned", "provider_scratch_intact",
}

################################################################
# The healthy workspace
################################################################


def cli(root: Path, *args: str) -> str:
    """Run one CLI command in-process; it must succeed.  Returns its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = relay.main(["--root", str(root), *args])
    assert code == 0, (args, out.getvalue())
    return out.getvalue()


def build_healthy(root: Path) -> None:
    """Every kind of record, made only through the CLI."""
    token = json.loads(cli(root, "token", "create", "--label", "operator", "--json"))
    cli(root, "bootstrap", "--token-id", token["token"]["token_id"])
    cli(root, "profile", "register", "cx", "--provider", "codex", "--mode", "pooled",
        "--command", "codex app-server")
    cli(root, "profile", "register", "cl", "--provider", "claude", "--mode", "one-borrow",
        "--command", "claude")
    cli(root, "session", "create", "--profile", "cx", "--session-id", "s-read")
    cli(root, "session", "create", "--profile", "cx", "--session-id", "s-write")
    cli(root, "session", "create", "--profile", "cl", "--session-id", "s-bad")
    cli(root, "session", "create", "--profile", "cl", "--session-id", "s-idle")
    cli(root, "lease", "grant", "--session", "s-read", "--holder", "alice", "--mode", "shared-read",
        "--ttl", str(DAY))
    cli(root, "lease", "grant", "--session", "s-write", "--holder", "bob", "--mode",
        "exclusive-write", "--ttl", str(DAY))
    cli(root, "quarantine", "session", "s-bad", "--reason", "provider crashed")
    cli(root, "control", "record", "--request-id", "ctl-1", "--session", "s-read", "--kind",
        "interrupt", "--payload", '{"why": "operator"}')
    cli(root, "control", "record", "--request-id", "ctl-2", "--session", "s-write", "--kind", "resume")
    for i in range(3):
        cli(root, "event", "append", "--session", "s-read", "--kind", "message",
            "--data", json.dumps({"n": i}))
    cli(root, "event", "append", "--session", "s-write", "--kind", "message", "--data", '"hello"')
    cli(root, "event", "append", "--session", "s-bad", "--kind", "crash", "--data", '{"exit": 137}')
    cli(root, "result", "append", "--session", "s-read", "--kind", "answer", "--data", '{"ok": true}')
    cli(root, "result", "append", "--session", "s-write", "--kind", "patch",
        "--data", '{"files": 2}', "--request-id", "res-1")


@pytest.fixture(scope="module")
def healthy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("healthy")
    build_healthy(root)
    return root


@pytest.fixture
def ws(healthy_root: Path, tmp_path: Path) -> Path:
    """A private copy of the healthy workspace."""
    root = tmp_path / "ws"
    shutil.copytree(healthy_root, root)
    return root


################################################################
# Running the gate and planting damage
################################################################


def run_gate(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """``gate --json`` in-process: (exit code, its one JSON object)."""
    capsys.readouterr()
    code = relay.main(["--root", str(root), "gate", "--json"])
    (line,) = capsys.readouterr().out.splitlines()
    return code, json.loads(line)


def assert_gate(root: Path, capsys: pytest.CaptureFixture[str], fail: tuple[str, ...] = (),
                skip: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """The gate fails exactly ``fail`` (each with evidence and a repair), skips
    exactly ``skip`` (each with a reason) and passes every other check."""
    code, doc = run_gate(root, capsys)
    checks = {c["id"]: c for c in doc["checks"]}
    assert [c["id"] for c in doc["checks"]] == GATE_IDS
    for ident in GATE_IDS:
        check = checks[ident]
        want = "fail" if ident in fail else "skip" if ident in skip else "pass"
        assert check["result"] == want, check
        assert check["evidence"].strip(), check
        if want == "fail":
            assert check["repair"].strip(), check
    assert (code, doc["status"]) == ((1, "fail") if fail else (0, "pass"))
    return checks


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def with_checksum(doc: dict[str, Any]) -> bytes:
    """Ledger bytes in ``encode_ledger``'s format for any JSON document."""
    body = canonical(doc)
    return body[:-1] + b',"checksum":"sha256:' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def edit_ledger(root: Path, change: Callable[[relay.Ledger], relay.Ledger]) -> None:
    """Replace the ledger with a changed one that carries a valid checksum."""
    store = relay.Store(root)
    store.ledger_path.write_bytes(relay.encode_ledger(change(store.read())))


def edit_ledger_doc(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the ledger as JSON (past what the typed model can express), re-checksummed."""
    path = relay.Store(root).ledger_path
    body, _ = relay.split_checksum(path.read_bytes())
    doc = json.loads(body)
    change(doc)
    path.write_bytes(with_checksum(doc))


def rewrite_record(root: Path, sid: str, stream: str, index: int, **changes: Any) -> None:
    """Change fields of one committed stream record, keeping its CRC valid and
    its length (so the committed byte count still matches)."""
    path = relay.Store(root).stream_path(sid, stream)
    lines = path.read_bytes().splitlines(keepends=True)
    doc = json.loads(lines[index][9:-1])
    doc.update(changes)
    body = canonical(doc)
    new = b"%08x " % zlib.crc32(body) + body + b"\n"
    assert len(new) == len(lines[index])
    lines[index] = new
    path.write_bytes(b"".join(lines))


def put(ledger: relay.Ledger, field: str, key: str, record: Any) -> relay.Ledger:
    return attrs.evolve(ledger, **{field: {**getattr(ledger, field), key: record}})


def live_lease(lease_id: str, session_id: str, mode: str, holder: str = "mallory") -> rc.Lease:
    now = time.time()
    return rc.Lease(lease_id, session_id, holder, mode, "active", fencing_token=7,
                    ttl_seconds=DAY, requested_at=relay.iso(now), granted_at=relay.iso(now),
                    expires_at=relay.iso(now + DAY))


def state_snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under flow/state: its content hash, size and mtime (files)
    or its listing and mtime (directories)."""
    top = root / "flow" / "state"
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, files in os.walk(top):
        here = Path(dirpath)
        out[str(here.relative_to(root))] = ("dir", sorted(dirnames + files), here.stat().st_mtime_ns)
        for name in files:
            path = here / name
            st = path.stat()
            out[str(path.relative_to(root))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns, st.st_mode)
    return out


################################################################
# The healthy workspace passes
################################################################


def test_healthy_workspace_passes_every_check(ws, capsys):
    checks = assert_gate(ws, capsys)
    assert set(checks) == set(GATE_IDS) and len(GATE_IDS) == 18
    for ident, invariant, _ in relay.GATE_CHECKS:
        assert checks[ident]["invariant"] == invariant
        assert checks[ident]["repair"] == ""
    # The fixture really holds what the checks look at.
    ledger = relay.Store(ws).read()
    assert {p.mode for p in ledger.profiles.values()} == {"pooled", "one-borrow"}
    assert sorted((x.session_id, x.mode, x.state) for x in ledger.leases.values()) == [
        ("s-read", "shared-read", "active"), ("s-write", "exclusive-write", "active")]
    assert ledger.quarantines["s-bad"].state == "active"
    assert ledger.sessions["s-bad"].state == "failed"
    assert len(ledger.control_requests) == 2 and ledger.runtime.token_id in ledger.tokens
    assert ledger.cursors["s-read"].events == 3 and ledger.cursors["s-write"].results == 1
    assert "8 logs, 7 records" in checks["streams_valid"]["evidence"]  # four sessions, two logs each


def test_healthy_workspace_passes_through_a_subprocess(ws):
    code, out, _ = run_cli(ws, "gate", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["status"] == "pass"
    assert [c["result"] for c in doc["checks"]] == ["pass"] * len(GATE_IDS)


def test_empty_workspace_passes_and_stays_empty(workspace, capsys):
    skip = {"ledger_valid"} | (SKIP_WITHOUT_LEDGER - {"http_reads_readonly"})
    checks = assert_gate(workspace, capsys, skip=skip)
    assert "no ledger" in checks["ledger_valid"]["evidence"]
    assert not (workspace / "flow").exists()


################################################################
# One test per check
################################################################


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no checksum", "empty"])
def test_damaged_ledger_fails_status_and_ledger_valid(ws, capsys, damage):
    """status_pass and ledger_valid are coupled: status fails only on an invalid
    ledger.  Every check that needs the ledger skips, saying why."""
    path = relay.Store(ws).ledger_path
    data = path.read_bytes()
    if damage == "flipped byte":
        i = data.index(b'"s-read"') + 2
        data = data[:i] + b"X" + data[i + 1:]
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "no checksum":
        data = data[: data.rindex(b',"checksum"')] + b"}\n"
    else:
        data = b""
    path.write_bytes(data)
    checks = assert_gate(ws, capsys, fail=("status_pass", "ledger_valid"), skip=SKIP_WITHOUT_LEDGER)
    assert "state reset --owner relay --apply" in checks["ledger_valid"]["repair"]
    assert "state inventory" in checks["status_pass"]["repair"]
    assert checks["http_reads_readonly"]["evidence"] == "the ledger is damaged; the server would not start"


@pytest.mark.parametrize(("field", "value"), [("created_at", "yesterday"), ("fencing_token", -1)])
def test_schema_violation_with_valid_checksum_fails_the_reader_too(ws, capsys, field, value):
    """The reader is as strict as the schema: a violation under a valid checksum
    is an invalid ledger (status and ledger_valid fail), not a schema-only finding."""
    edit_ledger_doc(ws, lambda doc: doc["sessions"]["s-idle"].update({field: value}))
    with pytest.raises(relay.LedgerInvalid, match=f"sessions.s-idle.{field}"):
        relay.Store(ws).read()
    checks = assert_gate(ws, capsys, fail=("status_pass", "ledger_valid"), skip=SKIP_WITHOUT_LEDGER)
    assert f"sessions.s-idle.{field}" in checks["ledger_valid"]["evidence"]


def test_checksum_trick_reproduces_encode_ledger(ws):
    data = relay.Store(ws).ledger_path.read_bytes()
    body, _ = relay.split_checksum(data)
    assert with_checksum(json.loads(body)) == data


def test_inspect_that_differs_from_status_fails(ws, capsys):
    """A validated-memo that vouches for a ledger the typed model refuses (a hand
    edit, re-checksummed, memo forged) makes `status` answer from the raw bytes
    what `inspect relay` does not: the gate names the disagreement."""
    edit_ledger_doc(ws, lambda doc: doc["profiles"]["cx"].update({"nickname": "x"}))
    _, claimed = relay.split_checksum(relay.Store(ws).ledger_path.read_bytes())
    (ws / relay.MEMO_REL).write_bytes(claimed)
    checks = assert_gate(ws, capsys, fail=("status_pass", "inspect_matches_status", "ledger_valid"),
                         skip=SKIP_WITHOUT_LEDGER)
    assert "status (its fast path)" in checks["inspect_matches_status"]["evidence"]
    assert "relay_mode" in checks["inspect_matches_status"]["evidence"]
    assert "inspect relay" in checks["inspect_matches_status"]["repair"]


@pytest.mark.parametrize("damage", ["gap", "repeat", "checksum", "truncated", "missing", "not an object"])
def test_damaged_stream_log_fails_streams_valid(ws, capsys, damage):
    path = relay.Store(ws).stream_path("s-read", "events")
    if damage == "gap":
        rewrite_record(ws, "s-read", "events", 1, seq=3)  # 1, 3, 3
        expect = "seq 3 follows 1"
    elif damage == "repeat":
        rewrite_record(ws, "s-read", "events", 2, seq=2)  # 1, 2, 2
        expect = "seq 2 follows 2"
    elif damage == "checksum":
        data = bytearray(path.read_bytes())
        data[data.index(b'"n":1') + 4] = ord("7")
        path.write_bytes(bytes(data))
        expect = "checksum mismatch after seq 1"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-5])
        expect = "shorter than its committed"
    elif damage == "missing":
        path.unlink()
        expect = "is missing"
    else:
        lines = path.read_bytes().splitlines(keepends=True)
        body = b'["' + b"x" * (len(lines[1]) - 14) + b'"]'  # valid JSON, same length
        lines[1] = b"%08x " % zlib.crc32(body) + body + b"\n"
        path.write_bytes(b"".join(lines))
        expect = "unreadable record"
    checks = assert_gate(ws, capsys, fail=("streams_valid",))
    assert "streams/s-read/events.log" in checks["streams_valid"]["evidence"]
    assert expect in checks["streams_valid"]["evidence"]
    assert checks["streams_valid"]["repair"].startswith("python -m relay quarantine session s-read")


def test_uncommitted_tail_is_not_damage(ws, capsys):
    """Bytes past the committed length are a torn tail the next append cuts off."""
    with open(relay.Store(ws).stream_path("s-read", "events"), "ab") as f:
        f.write(b"0000dead {torn")
    assert_gate(ws, capsys)


@pytest.mark.parametrize("damage", ["cursor ahead", "cursor behind", "orphan log"])
def test_cursor_disagreeing_with_its_log_fails(ws, capsys, damage):
    if damage == "orphan log":
        store = relay.Store(ws)
        record = rc.StreamRecord("ghost", 1, "message", None, relay.iso(time.time()))
        path = store.stream_path("ghost", "events")
        path.parent.mkdir(parents=True)
        path.write_bytes(relay.encode_record(record))
        expect = "unknown session ghost"
    else:
        # The seq in the cursor moves; its committed byte count stays right.
        seq = 5 if damage == "cursor ahead" else 2
        edit_ledger(ws, lambda led: put(led, "cursors", "s-read",
                                        attrs.evolve(led.cursors["s-read"], events=seq)))
        expect = f"session s-read events: ledger cursor {seq}, log ends at 3"
    checks = assert_gate(ws, capsys, fail=("cursors_match_streams",))
    assert expect in checks["cursors_match_streams"]["evidence"]
    assert checks["cursors_match_streams"]["repair"] == "python -m relay state inventory"


@pytest.mark.parametrize("target", ["flow/state/relay", "flow/state"])
def test_cleanup_through_a_linked_tmp_dir_fails(ws, capsys, target):
    """flow/tmp/relay as a link into flow/state makes the real dry-run plan list
    the ledger: the check names it and says not to apply the cleanup."""
    tmp = ws / "flow" / "tmp" / "relay"
    shutil.rmtree(tmp)
    tmp.symlink_to(ws / target, target_is_directory=True)
    checks = assert_gate(ws, capsys, fail=("cleanup_preserves_lock",))
    evidence = checks["cleanup_preserves_lock"]["evidence"]
    assert "cleanup would remove live file flow/state/relay/" in evidence
    assert checks["cleanup_preserves_lock"]["repair"].startswith("do not run state cleanup --apply")


def test_a_check_that_crashes_is_a_failed_check(ws, capsys, monkeypatch):
    """An OSError while a check reads the workspace fails that check, naming the error."""
    real_realpath, flow = os.path.realpath, ws / "flow"

    def failing_realpath(path, *args, **kwargs):
        if Path(path).is_relative_to(flow):
            raise OSError("disk on fire")
        return real_realpath(path, *args, **kwargs)

    monkeypatch.setattr(os.path, "realpath", failing_realpath)
    checks = assert_gate(ws, capsys, fail=("cleanup_preserves_lock",))
    assert "check raised" in checks["cleanup_preserves_lock"]["evidence"]
    assert "disk on fire" in checks["cleanup_preserves_lock"]["evidence"]


def test_configured_private_network_host_without_active_token_fails(ws, capsys):
    """flow/relay.toml serving on 10.0.0.1 while no active token is bound: serve
    would refuse, and the gate says so before anyone tries."""
    cli(ws, "bootstrap", "--token-id", "none")
    assert_gate(ws, capsys)  # tokenless on loopback is fine
    (ws / "flow" / "relay.toml").write_text('[serve]\nhost = "10.0.0.1"\n')
    checks = assert_gate(ws, capsys, fail=("lan_requires_token",))
    assert "10.0.0.1" in checks["lan_requires_token"]["evidence"]
    assert "token create" in checks["lan_requires_token"]["repair"]


def test_runtime_serving_trusted_lan_without_active_token_fails(ws, capsys):
    def unguarded(led: relay.Ledger) -> relay.Ledger:
        runtime = attrs.evolve(led.runtime, endpoint="http://10.0.0.5:9876", mode="trusted-lan")
        token = attrs.evolve(led.tokens[runtime.token_id], state="revoked",
                             revoked_at=relay.iso(time.time()))
        return put(attrs.evolve(led, runtime=runtime), "tokens", token.token_id, token)

    edit_ledger(ws, unguarded)
    checks = assert_gate(ws, capsys, fail=("lan_requires_token",))
    assert "10.0.0.5" in checks["lan_requires_token"]["evidence"]
    assert "token rotate" in checks["lan_requires_token"]["repair"]


def test_raw_looking_token_in_a_label_fails(ws, capsys):
    cli(ws, "token", "create", "--label", "frt_" + "aB3-_x9Z" * 3 + "Qw12pL")  # frt_ + 30 chars
    checks = assert_gate(ws, capsys, fail=("tokens_are_digests",))
    assert "raw bearer token" in checks["tokens_are_digests"]["evidence"]
    assert "token revoke" in checks["tokens_are_digests"]["repair"]


def test_token_digest_that_is_not_sha256_hex_fails(ws, capsys):
    """A digest off the 64-hex pattern breaks the schema, so the reader refuses
    the ledger too (as strict as the schema): status and ledger_valid fail, naming it."""
    edit_ledger(ws, lambda led: put(led, "tokens", "tok-1",
                                    attrs.evolve(led.tokens["tok-1"], digest="hunter2")))
    checks = assert_gate(ws, capsys, fail=("status_pass", "ledger_valid"), skip=SKIP_WITHOUT_LEDGER)
    assert "tokens.tok-1.digest" in checks["ledger_valid"]["evidence"]
    assert "hunter2" not in json.dumps(checks)  # a malformed digest may be a raw secret


def test_pooled_claude_profile_fails(ws, capsys):
    profile = rc.Profile("cl-pool", "claude", "pooled", ("claude",), relay.iso(time.time()))
    edit_ledger(ws, lambda led: put(led, "profiles", "cl-pool", profile))
    checks = assert_gate(ws, capsys, fail=("pooled_codex_only",))
    assert "cl-pool pools claude" in checks["pooled_codex_only"]["evidence"]
    assert "--mode one-borrow" in checks["pooled_codex_only"]["repair"]


def test_quarantine_on_a_ready_session_fails(ws, capsys):
    edit_ledger(ws, lambda led: put(led, "sessions", "s-bad",
                                    attrs.evolve(led.sessions["s-bad"], state="ready")))
    checks = assert_gate(ws, capsys, fail=("quarantined_sessions_failed",))
    assert "s-bad is quarantined but ready" in checks["quarantined_sessions_failed"]["evidence"]
    assert checks["quarantined_sessions_failed"]["repair"] == "python -m relay recover --session s-bad"


@pytest.mark.parametrize("where", ["quarantined session", "closed session"])
def test_live_lease_on_a_failed_or_closed_session_fails(ws, capsys, where):
    if where == "quarantined session":
        edit_ledger(ws, lambda led: put(led, "leases", "lease-99",
                                        live_lease("lease-99", "s-bad", "exclusive-write")))
        lease_id, sid, state = "lease-99", "s-bad", "failed"
    else:
        edit_ledger(ws, lambda led: put(led, "sessions", "s-read",
                                        attrs.evolve(led.sessions["s-read"], state="closed")))
        lease_id, sid, state = next((x.lease_id, x.session_id, "closed")
                                    for x in relay.Store(ws).read().leases.values()
                                    if x.session_id == "s-read")
    checks = assert_gate(ws, capsys, fail=("no_lease_on_failed_session",))
    assert f"live lease {lease_id} sits on {sid}, which is {state}" == \
        checks["no_lease_on_failed_session"]["evidence"]
    assert checks["no_lease_on_failed_session"]["repair"].startswith(
        f"python -m relay lease revoke {lease_id}")


def test_expired_lease_on_a_failed_session_is_fine(ws, capsys):
    lease = attrs.evolve(live_lease("lease-99", "s-bad", "shared-read"),
                         expires_at=relay.iso(time.time() - 1))
    edit_ledger(ws, lambda led: put(led, "leases", "lease-99", lease))
    assert_gate(ws, capsys)


@pytest.mark.parametrize("second", ["shared-read", "exclusive-write"])
def test_active_writer_beside_another_active_lease_fails(ws, capsys, second):
    edit_ledger(ws, lambda led: put(led, "leases", "lease-99", live_lease("lease-99", "s-write", second)))
    writer = next(x.lease_id for x in relay.Store(ws).read().leases.values()
                  if x.session_id == "s-write" and x.holder == "bob")
    checks = assert_gate(ws, capsys, fail=("no_writer_with_reader",))
    assert "s-write" in checks["no_writer_with_reader"]["evidence"]
    repair = checks["no_writer_with_reader"]["repair"].split()
    assert repair[:5] == ["python", "-m", "relay", "lease", "revoke"]
    assert repair[5] in (writer, "lease-99")


def test_waiting_writer_beside_active_readers_is_fine(ws, capsys):
    cli(ws, "lease", "grant", "--session", "s-read", "--holder", "carol", "--mode", "exclusive-write",
        "--ttl", str(DAY))
    assert any(x.state == "waiting" for x in relay.Store(ws).read().leases.values())
    assert_gate(ws, capsys)


@pytest.mark.parametrize("route", ["ListProfiles read", "SSE replay"])
def test_a_read_that_writes_to_flow_state_fails(ws, capsys, monkeypatch, route):
    touched = ws / "flow" / "state" / "relay" / "touched-by-a-read"
    if route == "ListProfiles read":
        # The HTTP route dispatches through Reads, so that is what to wrap.
        real = relay.Reads.list_profiles

        def writing(view, request):
            touched.write_text("oops")
            return real(view, request)

        monkeypatch.setattr(relay.Reads, "list_profiles", staticmethod(writing))
    else:
        real_replay = relay.Service._replay_range

        def writing_replay(self, session, stream, after):
            touched.write_text("oops")
            return real_replay(self, session, stream, after)

        monkeypatch.setattr(relay.Service, "_replay_range", writing_replay)
    checks = assert_gate(ws, capsys, fail=("http_reads_readonly",))
    assert touched.exists()
    assert "flow/state changed" in checks["http_reads_readonly"]["evidence"]


################################################################
# The gate only looks
################################################################


def _damage_gap(root: Path) -> None:
    rewrite_record(root, "s-read", "events", 1, seq=3)


def _damage_ledger(root: Path) -> None:
    path = relay.Store(root).ledger_path
    path.write_bytes(path.read_bytes()[:-40])


def _damage_lease(root: Path) -> None:
    edit_ledger(root, lambda led: put(led, "leases", "lease-99",
                                      live_lease("lease-99", "s-bad", "exclusive-write")))


def _damage_orphan_temp(root: Path) -> None:
    (relay.Store(root).state_dir / f"{relay.TEMP_PREFIX}999.deadbeef").write_bytes(b"{")


@pytest.mark.parametrize("damage", [None, _damage_gap, _damage_ledger, _damage_lease,
                                    _damage_orphan_temp],
                         ids=["healthy", "stream gap", "damaged ledger", "lease on failed",
                              "orphan temp"])
def test_gate_never_changes_flow_state(ws, capsys, damage):
    if damage is not None:
        damage(ws)
    before = state_snapshot(ws)
    for _ in range(2):
        relay.main(["--root", str(ws), "gate", "--json"])
        relay.main(["--root", str(ws), "gate"])
    capsys.readouterr()
    assert state_snapshot(ws) == before


################################################################
# Output
################################################################


def test_human_output_on_pass(ws, capsys):
    capsys.readouterr()
    assert relay.main(["--root", str(ws), "gate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["check", "result"]
    rows = lines[1:-1]
    assert [row.split()[0] for row in rows] == GATE_IDS
    assert all(row.split()[1] == "pass" for row in rows)
    assert lines[-1] == f"gate pass ({len(GATE_IDS)} pass, 0 fail, 0 skip)"


def test_human_output_on_fail_names_checks_and_repairs(ws, capsys):
    profile = rc.Profile("cl-pool", "claude", "pooled", (), relay.iso(time.time()))
    edit_ledger(ws, lambda led: put(put(led, "profiles", "cl-pool", profile), "sessions", "s-bad",
                                    attrs.evolve(led.sessions["s-bad"], state="ready")))
    capsys.readouterr()
    assert relay.main(["--root", str(ws), "gate"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1] == ("gate FAIL: pooled_codex_only, quarantined_sessions_failed "
                         f"({len(GATE_IDS) - 2} pass, 2 fail, 0 skip)")
    results = {line.split()[0]: line.split()[1] for line in lines[1:-1] if not line.startswith(" ")}
    assert list(results) == GATE_IDS
    assert {k for k, v in results.items() if v == "fail"} == {"pooled_codex_only",
                                                              "quarantined_sessions_failed"}
    repairs = [line.strip() for line in lines if line.strip().startswith("next: ")]
    assert repairs == ["next: python -m relay profile register NAME --provider claude --mode one-borrow, "
                       "and move work off cl-pool",
                       "next: python -m relay recover --session s-bad"]


def test_json_output_is_exactly_one_object(ws, capsys):
    edit_ledger(ws, lambda led: put(led, "sessions", "s-bad",
                                    attrs.evolve(led.sessions["s-bad"], state="ready")))
    capsys.readouterr()
    code = relay.main(["--root", str(ws), "gate", "--json"])
    out = capsys.readouterr().out
    assert code == 1 and out.endswith("\n") and out.count("\n") == 1
    doc = json.loads(out)
    assert set(doc) == {"status", "checks"} and doc["status"] == "fail"
    for check in doc["checks"]:
        assert set(check) == {"id", "invariant", "result", "evidence", "repair"}
        assert check["result"] in ("pass", "fail", "skip")


def test_json_output_through_a_subprocess_on_fail(ws):
    _damage_lease(ws)
    code, out, _ = run_cli(ws, "gate", "--json", check=1)
    doc = json.loads(out)
    assert doc["status"] == "fail"
    assert [c["id"] for c in doc["checks"] if c["result"] == "fail"] == ["no_lease_on_failed_session"]


def test_usage_error_exits_2(ws, capsys):
    with pytest.raises(SystemExit) as exc:
        relay.main(["--root", str(ws), "gate", "--bogus"])
    assert exc.value.code == 2
    assert "usage error" in capsys.readouterr().err


def test_gate_only_runs_the_named_checks(ws):
    store = relay.Store(ws)
    checks = relay.gate(store, relay.load_config(store.flow), only=("pooled_codex_only", "status_pass"))
    assert [(c.id, c.result) for c in checks] == [("status_pass", "pass"), ("pooled_codex_only", "pass")]


def test_contract_lists_every_check_and_its_repair():
    text = (Path(__file__).resolve().parent.parent / "specs" / "flow-relay-contract.md").read_text()
    section = text.split("\n## The gate\n", 1)[1].split("\n## ", 1)[0]
    for ident, invariant, _ in relay.GATE_CHECKS:
        row = next((line for line in section.splitlines() if line.startswith(f"| `{ident}` |")), None)
        assert row is not None, ident
        assert invariant in row, (ident, row)
