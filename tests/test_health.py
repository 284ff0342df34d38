"""Code-health rules of issue 10: the error hierarchy, the public surface,
the clock seam, logging and the lease object of the sync client."""

from __future__ import annotations

import relay_client as rc


def test_every_status_code_has_its_own_documented_class():
    """Each Connect code maps to one RelayError subclass, written out with a docstring."""
    by_code = {cls.code: cls for cls in vars(rc).values()
               if isinstance(cls, type) and issubclass(cls, rc.RelayError)
               and cls not in (rc.RelayError, rc.LeaseLost)}
    assert set(by_code) == set(rc.Code)
    for code, cls in by_code.items():
        assert cls.__name__ == "".join(w.capitalize() for w in code.value.split("_")), cls
        assert cls.__doc__ and "\n" not in cls.__doc__.strip(), cls
        assert rc.RelayError.from_json({"code": code.value, "message": "m"}).__class__ is cls


def test_lease_lost_is_a_failed_precondition():
    """LeaseLost carries FAILED_PRECONDITION and callers can catch it as one."""
    assert issubclass(rc.LeaseLost, rc.FailedPrecondition)
    assert rc.LeaseLost().code is rc.Code.FAILED_PRECONDITION


def test_public_surface_is_declared():
    """Both modules list their public names in __all__, each one defined; relay_client
    (the generated-module part) exports every name without a leading underscore."""
    import types

    import relay

    for module in (relay, rc):
        assert len(set(module.__all__)) == len(module.__all__)
        assert [n for n in module.__all__ if not hasattr(module, n)] == []
    public = {n for n, v in vars(rc).items() if not n.startswith("_")
              and not isinstance(v, types.ModuleType) and getattr(v, "__module__", rc.__name__)
              in (rc.__name__, "typing") and n not in ("annotations", "Any", "ClassVar", "Final")}
    assert public - set(rc.__all__) == set()


def test_task_status_defaults_do_not_load_trio():
    """Importing relay leaves trio unloaded although every startable task's
    ``task_status`` has a TASK_STATUS_IGNORED-like default that does nothing."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, inspect, relay\n"
            "kind = type(sys.modules.get('trio')).__name__\n"
            "default = inspect.signature(relay.serve).parameters['task_status'].default\n"
            "print(kind, repr(default), default.started(object()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    assert out.split() == ["_LazyModule", "TASK_STATUS_IGNORED", "None"]


async def test_async_borrowed_release_is_bounded(workspace, monkeypatch):
    """A relay that never answers the release cannot hold a finished block
    forever: the shielded release gives up after its bound (the lease is left
    to expire)."""
    import trio

    from serve_helpers import PATIENCE, serving

    async def never_answers(self, **fields):
        await trio.sleep_forever()

    monkeypatch.setattr(rc, "_CLEANUP_SECONDS", 0.01, raising=False)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            await r.seed()
            async with rc.AsyncRelayStub(r.server.endpoint) as stub:
                monkeypatch.setattr(rc.AsyncRelayStub, "release_lease", never_answers)
                async with stub.borrowed(holder="job", profile="codex-main") as lease:
                    pass
            (still,) = (await r.ok("ListLeases"))["leases"]
    assert (still["lease_id"], still["state"]) == (lease.lease_id, "active")


async def test_release_on_disconnect_is_bounded(workspace, monkeypatch):
    """A release-on-disconnect whose commit never comes back does not keep the
    connection's handler (and so a graceful stop) waiting forever."""
    import trio

    import relay
    from serve_helpers import PATIENCE, serving, ws_send, ws_until

    monkeypatch.setattr(relay, "CLEANUP_SECONDS", 0.01, raising=False)
    with trio.fail_after(PATIENCE):
        async with serving(workspace) as r:
            (sid,) = await r.seed()
            lease = (await r.ok("GrantLease", session_id=sid, holder="h", mode="exclusive-write",
                                ttl_seconds=600))["lease"]
            submit = relay.LedgerOwner.submit

            async def stuck_release(owner, mutation):
                if mutation.method == "ReleaseLease":
                    await trio.sleep_forever()
                return await submit(owner, mutation)

            monkeypatch.setattr(relay.LedgerOwner, "submit", stuck_release)
            async with r.ws() as ws:
                await ws_send(ws, type="hold", id=1, lease_id=lease["lease_id"],
                              release_on_disconnect=True)
                await ws_until(ws, lambda f: f["type"] == "held")
    assert relay.Store(workspace).read().leases[lease["lease_id"]].state == "active"
