"""The local CLI: every command in-process through ``relay.main`` (fast), plus
the subprocess checks that only a real ``python -m relay`` can make (the fast
status path and what it imports)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, snapshot

import relay
import relay_client as rc

READ, WRITE = "shared-read", "exclusive-write"


@pytest.fixture
def cli(workspace, capsys):
    """Run the CLI in-process on the workspace.

    With ``as_json`` (the default) it checks that stdout holds exactly one JSON
    object (and, on exit 1, the error shape) and returns it; otherwise it
    returns (stdout, stderr).
    """

    def run(*args, code=0, as_json=True):
        argv = [*args, "--root", str(workspace)] + (["--json"] if as_json else [])
        try:
            got = relay.main(argv)
        except SystemExit as exc:  # argparse's usage errors
            got = exc.code
        out, err = capsys.readouterr()
        assert got == code, (argv, got, out, err)
        if not as_json:
            return out, err
        assert out.endswith("\n") and out.count("\n") == 1, out
        doc = json.loads(out)
        assert isinstance(doc, dict)
        if got == 2:
            return doc, err
        if got == 1:
            assert set(doc) == {"error"}
            assert set(doc["error"]) == {"code", "message", "hint"}
            assert doc["error"]["code"] in {c.value for c in rc.Code}
            assert doc["error"]["message"] and doc["error"]["hint"]
        return doc

    return run


def populate(cli):
    """A workspace with profiles, sessions, leases, streams, a quarantine and a token."""
    cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    cli("profile", "register", "cl", "--provider", "claude", "--mode", "one-borrow",
        "--command", "claude -p")
    for sid in ("s1", "s2", "s3"):
        cli("session", "create", "--profile", "cx", "--session-id", sid)
    cli("lease", "grant", "--session", "s1", "--holder", "r", "--mode", READ, "--ttl", "3600")
    cli("lease", "grant", "--session", "s1", "--holder", "w", "--mode", WRITE, "--ttl", "3600")
    for i in range(3):
        cli("event", "append", "--session", "s2", "--kind", "note", "--data", json.dumps({"i": i}))
    cli("result", "append", "--session", "s2", "--kind", "done")
    cli("control", "record", "--request-id", "c1", "--session", "s2", "--kind", "stop")
    cli("quarantine", "session", "s3", "--reason", "provider crashed")
    cli("token", "create", "--label", "ci")
    cli("bootstrap")


# -- output shape and exit codes ------------------------------------------------


def test_every_command_prints_one_json_object_and_exits_zero(cli):
    """Each command's success is exit 0 with exactly one JSON object carrying its result."""
    assert cli("status")["status"] == "pass"
    assert cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")[
        "outcome"] == "registered"
    assert [p["name"] for p in cli("profile", "list")["profiles"]] == ["cx"]
    sid = cli("session", "create", "--profile", "cx")["session"]["session_id"]
    assert [s["session_id"] for s in cli("session", "list")["sessions"]] == [sid]
    borrowed = cli("borrow", "--profile", "cx", "--holder", "job", "--ttl", "600")["lease"]
    assert (borrowed["session_id"], borrowed["mode"], borrowed["state"]) == (sid, WRITE, "active")
    renewed = cli("lease", "renew", borrowed["lease_id"], "--ttl", "900")["lease"]
    assert renewed["ttl_seconds"] == 900 and renewed["last_renewed_at"]
    assert cli("lease", "list")["leases"][0]["lease_id"] == borrowed["lease_id"]
    appended = cli("event", "append", "--session", sid, "--kind", "prompt", "--data", '{"t": 1}')
    assert appended["record"]["seq"] == 1
    assert cli("result", "append", "--session", sid, "--kind", "answer")["record"]["seq"] == 1
    listed = cli("event", "list", "--session", sid, "--after", "0", "--limit", "5")
    assert [r["data"] for r in listed["records"]] == [{"t": 1}]
    assert cli("result", "list", "--session", sid)["last_seq"] == 1
    assert cli("control", "record", "--request-id", "c1", "--session", sid, "--kind", "stop",
               "--payload", "[1, 2]")["outcome"] == "recorded"
    assert cli("release", borrowed["lease_id"])["lease"]["state"] == "released"
    lease = cli("lease", "grant", "--session", sid, "--holder", "r", "--mode", READ)["lease"]
    assert cli("lease", "revoke", lease["lease_id"], "--reason", "done")["lease"]["state"] == "revoked"
    lease = cli("lease", "grant", "--session", sid, "--holder", "r2", "--mode", READ)["lease"]
    assert cli("lease", "release", lease["lease_id"])["outcome"] == "released"
    assert cli("quarantine", "session", sid, "--reason", "odd")["outcome"] == "quarantined"
    assert cli("recover")["sessions"][0]["classification"] == "quarantine_repair"
    assert cli("quarantine", "clear", sid)["outcome"] == "cleared"
    assert cli("recover", "--session", sid)["sessions"][0]["session_id"] == sid
    assert cli("inspect", "relay")["detail"]["cursors"][0]["events"] == 1
    assert cli("bootstrap")["runtime"]["status"] == "bootstrapped"
    token = cli("token", "create", "--label", "ci")["token"]
    assert cli("token", "list")["tokens"][0]["token_id"] == token["token_id"]
    rotated = cli("token", "rotate", "--grace", "60")["token"]
    assert cli("token", "revoke", rotated["token_id"])["token"]["state"] == "revoked"
    assert {r["kind"] for r in cli("state", "inventory")["artifacts"]} >= {"ledger", "lock"}
    assert cli("state", "cleanup", "--owner", "relay")["applied"] is False
    assert cli("shutdown")["runtime"]["status"] == "stopped"


def test_json_flag_may_come_before_the_command(workspace, capsys):
    """`--json` and `--root` are accepted before the command word too."""
    assert relay.main(["--json", "--root", str(workspace), "status"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out)["projection"] == relay.PROJECTION


REFUSALS = [
    (["session", "create", "--profile", "nope"], "not_found"),
    (["profile", "register", "k", "--provider", "kimi", "--mode", "pooled"], "invalid_argument"),
    (["profile", "register", "cx", "--provider", "codex", "--mode", "one-borrow"], "already_exists"),
    (["lease", "grant", "--session", "s1", "--holder", "w", "--mode", READ], "already_exists"),
    (["lease", "grant", "--session", "s1", "--holder", "x", "--mode", READ], "failed_precondition"),
    (["lease", "renew", "lease-404"], "not_found"),
    (["lease", "grant", "--session", "s1", "--holder", "y", "--mode", READ, "--ttl", "999999"],
     "invalid_argument"),
    (["borrow", "--profile", "cx", "--holder", "z"], "resource_exhausted"),
    (["control", "record", "--request-id", "c1", "--session", "s1", "--kind", "other"],
     "already_exists"),
    (["event", "list", "--session", "s1", "--limit", "0"], "invalid_argument"),
    (["quarantine", "clear", "s1"], "failed_precondition"),
    (["recover", "--session", "ghost"], "not_found"),
    (["shutdown"], "failed_precondition"),
    (["token", "revoke", "tok-404"], "not_found"),
    (["state", "reset", "--owner", "relay"], "failed_precondition"),
]


@pytest.mark.parametrize(("argv", "code"), REFUSALS, ids=[" ".join(a[:2]) for a, _ in REFUSALS])
def test_refusals_exit_one_with_the_error_object_and_change_nothing(cli, workspace, argv, code):
    """A refused command exits 1 with {"error": {code, message, hint}} and writes nothing."""
    cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    cli("session", "create", "--profile", "cx", "--session-id", "s1")
    cli("lease", "grant", "--session", "s1", "--holder", "w", "--mode", WRITE)
    cli("control", "record", "--request-id", "c1", "--session", "s1", "--kind", "stop")
    before = snapshot(workspace)
    doc = cli(*argv, code=1)
    assert doc["error"]["code"] == code
    assert snapshot(workspace) == before


def test_human_errors_are_one_line_on_stderr(cli):
    """Without --json a refusal prints nothing on stdout and one `relay: ...; next: ...` line."""
    out, err = cli("session", "create", "--profile", "nope", code=1, as_json=False)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("relay: ")
    assert "; next: " in err and "profile register" in err


def test_human_success_output_is_not_json(cli):
    """Without --json a command prints a human line, not JSON."""
    out, _ = cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled",
                 as_json=False)
    assert out.startswith("registered")
    out, _ = cli("status", as_json=False)
    assert out.startswith("relay pass")


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["lease", "grant"],
    ["lease", "grant", "--session", "s", "--holder", "h", "--mode", "bogus"],
    ["lease", "renew", "lease-1", "--ttl", "soon"],
    ["control", "record", "--request-id", "c", "--session", "s", "--kind", "k", "--payload", "{x"],
    ["profile", "register", "p", "--provider", "gpt", "--mode", "pooled"],
    ["state", "cleanup"],
    ["state", "cleanup", "--owner", "someone-else"],
])
def test_usage_errors_exit_two(cli, workspace, argv):
    """Malformed command lines exit 2 with usage on stderr (and the one error object with --json)."""
    doc, err = cli(*argv, code=2)
    assert doc["error"]["code"] == "invalid_argument"
    assert doc["error"]["message"] and "--help" in doc["error"]["hint"]
    assert "usage" in err
    out, err = cli(*argv, code=2, as_json=False)
    assert out == "" and "usage" in err
    assert not (workspace / "flow").exists()


def test_waiting_and_duplicate_outcomes_exit_zero(cli):
    """`waiting` and `duplicate` are successes: exit 0."""
    cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    assert cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")[
        "outcome"] == "duplicate"
    cli("session", "create", "--profile", "cx", "--session-id", "s1")
    cli("lease", "grant", "--session", "s1", "--holder", "r", "--mode", READ)
    assert cli("lease", "grant", "--session", "s1", "--holder", "w", "--mode", WRITE)[
        "outcome"] == "waiting"


def test_bad_relay_toml_is_refused_before_anything_is_written(cli, workspace):
    """An unknown setting in relay.toml is invalid_argument and no mutation happens."""
    (workspace / "flow").mkdir()
    (workspace / "flow" / "relay.toml").write_text("[leases]\ndefault_ttl = 5\n")
    doc = cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled", code=1)
    assert doc["error"]["code"] == "invalid_argument"
    assert "leases.default_ttl" in doc["error"]["message"]
    assert not (workspace / "flow" / "state").exists()


def test_relay_toml_settings_apply(cli, workspace):
    """relay.toml's default ttl and port reach grants and bootstrap."""
    (workspace / "flow").mkdir()
    (workspace / "flow" / "relay.toml").write_text(
        "[leases]\ndefault_ttl_seconds = 77\n[serve]\nport = 9999\n")
    cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    cli("session", "create", "--profile", "cx", "--session-id", "s1")
    lease = cli("borrow", "--session", "s1", "--holder", "h")["lease"]
    assert lease["ttl_seconds"] == 77
    assert cli("bootstrap")["runtime"]["endpoint"] == "http://127.0.0.1:9999"


# -- reads ----------------------------------------------------------------------


def test_reads_never_write(cli, workspace):
    """Every read command (and a cleanup dry run) leaves every file as it was."""
    populate(cli)
    before = snapshot(workspace)
    for argv in (["status"], ["inspect", "relay"], ["profile", "list"], ["session", "list"],
                 ["lease", "list"], ["event", "list", "--session", "s2"],
                 ["result", "list", "--session", "s2"], ["recover"], ["token", "list"],
                 ["state", "inventory"], ["state", "cleanup", "--owner", "relay"]):
        cli(*argv)
    assert snapshot(workspace) == before


def test_status_and_inspect_expose_the_same_projection(cli):
    """`inspect relay` is `status` plus `detail`, field for field and value for value."""
    populate(cli)
    status = cli("status")
    inspect = cli("inspect", "relay")
    detail = inspect.pop("detail")
    assert inspect == status
    memo_fields = {"status", "projection", "relay_mode", "ledger_path", "state_present",
                   "tmp_present", "ledger_present", "durable_artifacts", "tmp_artifacts",
                   "warnings", "profiles", "sessions", "active_leases", "active_quarantines",
                   "control_requests", "events", "results", "runtime", "revision"}
    assert memo_fields <= set(status)
    assert (status["profiles"], status["sessions"], status["events"], status["results"]) == (
        2, 3, 3, 1)
    assert (status["active_leases"], status["waiting_leases"], status["active_quarantines"]) == (
        1, 1, 1)
    assert status["control_requests"] == 1
    assert status["runtime"]["status"] == "bootstrapped"
    assert status["relay_mode"] == "ready"
    cursors = {c["session_id"]: c for c in detail["cursors"]}
    assert (cursors["s2"]["events"], cursors["s2"]["results"]) == (3, 1)
    assert detail["sessions"]["s3"]["state"] == "failed"
    assert len(detail["sessions"]["s1"]["live_leases"]) == 2
    assert detail["updated_at"] and detail["freshness_seconds"] >= 0


def test_status_reports_a_damaged_ledger_and_mutations_refuse(cli, workspace):
    """A damaged ledger is an owner-scoped ledger_invalid error in status; mutations exit 1."""
    populate(cli)
    path = workspace / relay.LEDGER_REL
    damaged = path.read_bytes()[:-20]
    path.write_bytes(damaged)
    for view in (cli("status"), cli("inspect", "relay")):
        assert view["status"] == "fail" and view["relay_mode"] == "degraded"
        (warning,) = view["warnings"]
        assert (warning["owner"], warning["code"], warning["severity"]) == (
            "relay", "ledger_invalid", "error")
        assert "state reset" in warning["repair"]
    doc = cli("event", "append", "--session", "s2", "--kind", "k", code=1)
    assert doc["error"]["code"] == "failed_precondition"
    assert path.read_bytes() == damaged


# -- state inventory, cleanup, reset --------------------------------------------


def test_state_inventory_lists_every_artifact_with_kind_and_validity(cli, workspace):
    """Inventory names each relay artifact's owner, kind and validity."""
    populate(cli)
    store = relay.Store(workspace)
    store.archive("leases", [{"lease_id": "old"}])
    (store.state_dir / f"{relay.TEMP_PREFIX}123.abcd").write_bytes(b"partial")
    (store.state_dir / "stray.txt").write_text("?")
    (store.tmp_dir / "scratch.bin").write_bytes(b"x")
    rows = {r["path"]: r for r in cli("state", "inventory")["artifacts"]}
    assert all(r["owner"] == "relay" for r in rows.values())
    kind = {path: (r["kind"], r["valid"]) for path, r in rows.items()}
    state, tmp = "flow/state/relay/", "flow/tmp/relay/"
    assert kind[state + "relay-state.json"] == ("ledger", True)
    assert kind[tmp + "relay-state.lock"] == ("lock", True)
    assert kind[state + "archive/leases.jsonl"] == ("archive", True)
    assert kind[state + f"{relay.TEMP_PREFIX}123.abcd"] == ("orphan_temp", False)
    assert kind[state + "stray.txt"] == ("unknown", False)
    assert kind[tmp + "scratch.bin"] == ("scratch", True)
    assert kind[state + "streams/s2/events.log"] == ("stream_log", True)
    assert kind[state + "streams/s2/results.log"] == ("stream_log", True)
    # A stream log shorter than its committed length is invalid.
    log = store.state_dir / "streams" / "s2" / "events.log"
    log.write_bytes(log.read_bytes()[:-3])
    rows = {r["path"]: r for r in cli("state", "inventory")["artifacts"]}
    assert rows[state + "streams/s2/events.log"]["valid"] is False
    # A damaged ledger is invalid, with the warning beside the rows.
    (workspace / relay.LEDGER_REL).write_bytes(b"{}")
    doc = cli("state", "inventory")
    rows = {r["path"]: r for r in doc["artifacts"]}
    assert rows[state + "relay-state.json"]["valid"] is False
    assert [w["code"] for w in doc["warnings"]] == ["ledger_invalid"]


def test_state_cleanup_is_a_dry_run_unless_apply_and_never_removes_the_lock(cli, workspace):
    """cleanup lists scratch and orphan temps, removes them only with --apply, and keeps the lock."""
    populate(cli)
    store = relay.Store(workspace)
    scratch = store.tmp_dir / "sub" / "scratch.bin"
    scratch.parent.mkdir()
    scratch.write_bytes(b"x")
    orphan = store.state_dir / f"{relay.TEMP_PREFIX}1.beef"
    orphan.write_bytes(b"partial")
    lock_rel = os.path.relpath(store.lock_path, workspace)
    dry = cli("state", "cleanup", "--owner", "relay")
    assert dry["applied"] is False
    assert set(dry["paths"]) >= {os.path.relpath(p, workspace) for p in (scratch, orphan)}
    assert lock_rel not in dry["paths"] and dry["preserved"] == [lock_rel]
    assert scratch.exists() and orphan.exists()
    durable = {p: v for p, v in snapshot(workspace).items() if p.startswith("flow/state")
               and os.path.basename(p) != orphan.name}
    done = cli("state", "cleanup", "--owner", "relay", "--apply")
    assert done["applied"] is True and done["paths"] == dry["paths"]
    assert not scratch.exists() and not orphan.exists()
    assert store.lock_path.exists()
    after = snapshot(workspace)
    assert {p: v for p, v in after.items() if p.startswith("flow/state")} == durable
    assert cli("status")["status"] == "pass"


def test_state_reset_refuses_a_valid_ledger_and_sets_a_damaged_one_aside(cli, workspace):
    """reset refuses on a valid or absent ledger; on a damaged one it moves it aside only with --apply."""
    assert cli("state", "reset", "--owner", "relay", code=1)["error"]["code"] == "failed_precondition"
    populate(cli)
    assert cli("state", "reset", "--owner", "relay", code=1)["error"]["code"] == "failed_precondition"
    path = workspace / relay.LEDGER_REL
    damaged = bytes(b ^ 0xFF if i == 100 else b for i, b in enumerate(path.read_bytes()))
    path.write_bytes(damaged)
    dry = cli("state", "reset", "--owner", "relay")
    assert dry["applied"] is False and path.read_bytes() == damaged
    done = cli("state", "reset", "--owner", "relay", "--apply")
    assert done["applied"] is True and "checksum" in done["reason"]
    assert not path.exists()
    assert (workspace / done["to"]).read_bytes() == damaged
    kinds = {r["path"]: r["kind"] for r in cli("state", "inventory")["artifacts"]}
    assert kinds[done["to"]] == "set_aside_ledger"
    assert cli("status")["status"] == "pass"
    assert cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")[
        "revision"] == 1


# -- runtime metadata -----------------------------------------------------------


def test_bootstrap_and_shutdown_record_runtime_metadata(cli):
    """bootstrap records endpoint, mode and time; shutdown records the stop; both only runtime."""
    assert cli("shutdown", code=1)["error"]["code"] == "failed_precondition"
    cli("profile", "register", "cx", "--provider", "codex", "--mode", "pooled")
    before = cli("status")
    runtime = cli("bootstrap", "--endpoint", "http://127.0.0.1:7000")["runtime"]
    assert (runtime["status"], runtime["endpoint"], runtime["mode"]) == (
        "bootstrapped", "http://127.0.0.1:7000", "loopback")
    assert runtime["bootstrapped_at"] and not runtime["shutdown_at"]
    status = cli("status")
    assert status["runtime"] == runtime and status["relay_mode"] == "ready"
    assert status["revision"] == before["revision"] + 1
    assert status["profiles"] == before["profiles"]
    stopped = cli("shutdown")["runtime"]
    assert stopped["status"] == "stopped" and stopped["shutdown_at"] >= runtime["bootstrapped_at"]
    assert cli("status")["relay_mode"] == "stopped"


def test_bootstrap_off_loopback_needs_an_active_token(cli):
    """A private-network endpoint needs an active token; wildcard and public hosts never bootstrap."""
    lan = "http://10.0.0.5:9876"
    assert cli("bootstrap", "--endpoint", lan, code=1)["error"]["code"] == "failed_precondition"
    token = cli("token", "create")["token"]["token_id"]
    runtime = cli("bootstrap", "--endpoint", lan, "--token-id", token)["runtime"]
    assert (runtime["mode"], runtime["token_id"]) == ("trusted-lan", token)
    cli("token", "revoke", token)
    assert cli("bootstrap", "--endpoint", lan, "--token-id", token, code=1)["error"][
        "code"] == "failed_precondition"
    for endpoint in ("http://0.0.0.0:9876", "http://8.8.8.8:9876", "ftp://127.0.0.1/"):
        assert cli("bootstrap", "--endpoint", endpoint, code=1)["error"]["code"] == "invalid_argument"
    assert cli("bootstrap", "--token-id", "../x", code=1)["error"]["code"] == "invalid_argument"


# -- tokens ---------------------------------------------------------------------


def test_token_create_prints_the_secret_once_and_stores_only_its_digest(cli, workspace):
    """The raw token is printed once; the ledger holds its SHA-256 digest and never the secret."""
    created = cli("token", "create", "--label", "ci")
    secret = created["secret"]
    assert len(secret) >= 32
    ledger_bytes = (workspace / relay.LEDGER_REL).read_bytes()
    assert secret.encode() not in ledger_bytes
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in ledger_bytes
    for path, (data, _, _) in snapshot(workspace).items():
        assert secret.encode() not in data, path
    listed = cli("token", "list")
    assert secret not in json.dumps(listed)
    assert "digest" not in listed["tokens"][0]
    out, _ = cli("token", "create", as_json=False)
    other = out.split()[1]
    assert out.count(other) == 1
    assert other.encode() not in (workspace / relay.LEDGER_REL).read_bytes()
    assert cli("token", "create")["secret"] != secret


def test_token_rotate_and_revoke(cli):
    """rotate binds a new token and leaves the old one usable for the grace; revoke ends one."""
    first = cli("token", "create")["token"]["token_id"]
    cli("bootstrap", "--token-id", first)
    rotated = cli("token", "rotate", "--grace", "600")
    new = rotated["token"]["token_id"]
    listed = cli("token", "list")
    rows = {t["token_id"]: t for t in listed["tokens"]}
    assert listed["runtime_token_id"] == new
    assert (rows[first]["state"], rows[first]["usable"]) == ("rotated", True)
    assert (rows[new]["state"], rows[new]["usable"]) == ("active", True)
    cli("token", "rotate", "--grace", "0")
    rows = {t["token_id"]: t for t in cli("token", "list")["tokens"]}
    assert (rows[new]["state"], rows[new]["usable"]) == ("rotated", False)
    assert cli("token", "revoke", first)["token"]["usable"] is False
    assert cli("token", "revoke", first, code=1)["error"]["code"] == "failed_precondition"
    assert cli("token", "revoke", "../etc", code=1)["error"]["code"] == "invalid_argument"


# -- the fast status path (real subprocesses) -----------------------------------

_MODULE_PROBE = """\
import atexit, json, runpy, sys
def report():
    sys.stderr.write("MODULES " + json.dumps(sorted(sys.modules)) + "\\n")
atexit.register(report)
runpy.run_module("relay", run_name="__main__", alter_sys=True)
"""


def _run(*args, cwd, env=None):
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    full_env.pop("RELAY_FAILPOINT", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env,
                          cwd=str(cwd))


def _probe(tmp_path, root, *args):
    """Run ``python -m relay ARGS`` under a wrapper; (process, loaded module names)."""
    script = tmp_path / "probe.py"
    script.write_text(_MODULE_PROBE)
    proc = _run(str(script), "--root", str(root), *args, cwd=tmp_path)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("MODULES "))
    return proc, set(json.loads(line[len("MODULES "):]))


def _heavy(modules):
    return {m for m in modules if m.split(".")[0] in ("attrs", "quart", "quart_trio", "hypercorn",
                                                      "trio", "httpx2", "relay_client")}


def test_fast_status_prints_what_the_full_path_prints(cli, workspace):
    """`python -m relay status --json` in a subprocess equals relay.status() field for field."""
    populate(cli)
    proc = _run("-m", "relay", "--root", str(workspace), "status", "--json", cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    fast = json.loads(proc.stdout)
    full = rc.to_json(relay.status(relay.Store(workspace), time.time()))
    for doc in (fast, full):  # counts that depend on the clock
        doc.pop("active_leases")
        doc.pop("waiting_leases")
    assert fast == json.loads(json.dumps(full))
    human = _run("-m", "relay", "--root", str(workspace), "status", cwd=workspace)
    assert human.stdout.startswith("relay pass: mode ready, revision")


def test_fast_status_honours_flow_root(cli, workspace, tmp_path_factory):
    """FLOW_ROOT chooses the workspace for the fast path as --root does."""
    populate(cli)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = _run("-m", "relay", "status", "--json", cwd=elsewhere,
                env={"FLOW_ROOT": str(workspace)})
    assert json.loads(proc.stdout)["revision"] == cli("status")["revision"]


def test_fast_status_imports_no_heavy_module(cli, workspace, tmp_path):
    """`python -m relay status` over a validated ledger imports neither attrs nor trio nor the server."""
    populate(cli)
    proc, modules = _probe(tmp_path, workspace, "status", "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["status"] == "pass"
    assert _heavy(modules) == set()


def test_status_without_a_ledger_is_fast_too(workspace, tmp_path):
    """On an empty workspace status passes without importing attrs."""
    proc, modules = _probe(tmp_path, workspace, "status", "--json")
    doc = json.loads(proc.stdout)
    assert (doc["status"], doc["ledger_present"], doc["relay_mode"]) == (
        "pass", False, "unbootstrapped")
    assert _heavy(modules) == set()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "stale-memo"])
def test_status_falls_back_to_the_full_path_for_a_ledger_it_cannot_vouch_for(
        cli, workspace, tmp_path, damage):
    """A damaged ledger (or one the memo does not vouch for) takes the validating path."""
    populate(cli)
    path = workspace / relay.LEDGER_REL
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:50] + bytes([data[50] ^ 0x04]) + data[51:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid ledger written behind the relay's back: the memo no longer matches
        ledger = relay.decode_ledger(data)
        path.write_bytes(relay.encode_ledger(relay.attrs.evolve(ledger, revision=ledger.revision + 50)))
    proc, modules = _probe(tmp_path, workspace, "status", "--json")
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert "attrs" in modules  # the typed model checked it
    assert not {m for m in modules if m.split(".")[0] in ("quart", "quart_trio", "hypercorn")}
    assert "trio._core" not in modules
    if damage == "stale-memo":
        assert doc["status"] == "pass" and doc["revision"] == ledger.revision + 50
    else:
        assert (doc["status"], doc["relay_mode"]) == ("fail", "degraded")
        assert [w["code"] for w in doc["warnings"]] == ["ledger_invalid"]
