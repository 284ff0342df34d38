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
