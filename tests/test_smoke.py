"""End-to-end smoke test of the local CLI through a subprocess."""

from conftest import run_cli, run_json


def test_borrow_append_release_round_trip(workspace):
    """A profile, a session, a borrow, an event and a release all land in the ledger."""
    run_json(workspace, "profile", "register", "codex-main", "--provider", "codex", "--mode", "pooled")
    session = run_json(workspace, "session", "create", "--profile", "codex-main")["session"]
    lease = run_json(workspace, "borrow", "--profile", "codex-main", "--holder", "job-1")["lease"]
    assert lease["session_id"] == session["session_id"]
    assert lease["fencing_token"] == 1
    appended = run_json(workspace, "event", "append", "--session", session["session_id"], "--kind", "note")
    assert appended["record"]["seq"] == 1
    run_json(workspace, "release", lease["lease_id"])
    status = run_json(workspace, "status")
    assert status["status"] == "pass"
    assert (status["sessions"], status["active_leases"], status["events"]) == (1, 0, 1)


def test_refusal_exits_one_with_error_object(workspace):
    """A refused command exits 1 and prints the Connect-style error object."""
    doc = run_json(workspace, "session", "create", "--profile", "nope", check=1)
    assert doc["error"]["code"] == "not_found"
    assert "profile register" in doc["error"]["hint"]
    code, _, err = run_cli(workspace, "lease", "grant", check=2)
    assert "usage" in err
