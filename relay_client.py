"""relay_client -- talk to a flow-relay from automation.

This module plays the part of a generated gRPC ``_pb2``/``_pb2_grpc`` pair for
``specs/relay.proto``: it defines, once, the status codes, the typed request and
response messages, and the table of RPCs.  ``relay.py`` (the service) imports
them from here, never the other way round, so the two cannot drift.

Importing it is cheap: the HTTP library (httpx2) and trio are imported only when
a stub makes its first call, and the server stack (quart, hypercorn) never.

Table of contents (``grep -n -A1 '^#\\{64\\}' relay_client.py``):

    Status codes and errors
    JSON codec (strict attrs <-> JSON)
    Messages
    The table of RPCs
    Stubs (sync and trio)
    CLI
"""

from __future__ import annotations

import enum
import re
import sys
from typing import Any, ClassVar, Final

import attrs

__all__ = [
    "RPCS",
    "AlreadyExists",
    "Code",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "RelayError",
    "ResourceExhausted",
    "Rpc",
    "Unauthenticated",
    "Unavailable",
    "from_json",
    "to_json",
]

################################################################
# Status codes and errors
################################################################


class Code(enum.StrEnum):
    """Connect status codes (the gRPC set, spelled as Connect spells them)."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


# Connect's code -> HTTP status mapping (connectrpc.com/docs/protocol).
_HTTP_STATUS: Final = {
    Code.CANCELED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


class RelayError(Exception):
    """The one root of every error the relay reports to a caller.

    ``message`` says what went wrong; ``hint`` says what to run next.  Each code
    has its own subclass so callers can ``except NotFound``.
    """

    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, message: str, *, hint: str = "", details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_json(self) -> dict[str, Any]:
        """The Connect error body: ``{"code", "message"}`` plus our ``hint``."""
        body: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        if self.details:
            body["details"] = self.details
        return body

    @staticmethod
    def from_json(body: Any, *, http_status: int = 500) -> RelayError:
        """Rebuild the error a server sent; anything unparsable is ``unknown``."""
        if not isinstance(body, dict) or not isinstance(body.get("code"), str):
            return Unknown(f"relay answered HTTP {http_status} without a Connect error body")
        cls = _ERROR_BY_CODE.get(body["code"], Unknown)
        hint = body.get("hint") if isinstance(body.get("hint"), str) else ""
        details = body.get("details") if isinstance(body.get("details"), dict) else None
        return cls(str(body.get("message", "")), hint=hint, details=details)


def _error_class(name: str, code: Code) -> type[RelayError]:
    return type(name, (RelayError,), {"code": code, "__module__": __name__})


Canceled = _error_class("Canceled", Code.CANCELED)
Unknown = _error_class("Unknown", Code.UNKNOWN)
InvalidArgument = _error_class("InvalidArgument", Code.INVALID_ARGUMENT)
DeadlineExceeded = _error_class("DeadlineExceeded", Code.DEADLINE_EXCEEDED)
NotFound = _error_class("NotFound", Code.NOT_FOUND)
AlreadyExists = _error_class("AlreadyExists", Code.ALREADY_EXISTS)
PermissionDenied = _error_class("PermissionDenied", Code.PERMISSION_DENIED)
ResourceExhausted = _error_class("ResourceExhausted", Code.RESOURCE_EXHAUSTED)
FailedPrecondition = _error_class("FailedPrecondition", Code.FAILED_PRECONDITION)
Aborted = _error_class("Aborted", Code.ABORTED)
OutOfRange = _error_class("OutOfRange", Code.OUT_OF_RANGE)
Unimplemented = _error_class("Unimplemented", Code.UNIMPLEMENTED)
Internal = _error_class("Internal", Code.INTERNAL)
Unavailable = _error_class("Unavailable", Code.UNAVAILABLE)
DataLoss = _error_class("DataLoss", Code.DATA_LOSS)
Unauthenticated = _error_class("Unauthenticated", Code.UNAUTHENTICATED)

_ERROR_BY_CODE: Final[dict[str, type[RelayError]]] = {
    cls.code.value: cls
    for cls in (
        Canceled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


class LeaseLost(RelayError):
    """Raised into a ``borrowed`` block when its lease is gone (revoked, expired)."""

    code = Code.FAILED_PRECONDITION


################################################################
# JSON codec (strict attrs <-> JSON)
################################################################

# Why not cattrs: its default int/str hooks coerce ("5" -> 5, 5.7 -> 5), and a
# wrong type must be ``invalid_argument``; and it costs ~17 ms to import, more
# than the whole cold-start budget of ``python -m relay status``.  The walk below
# is small because our messages use only a handful of field shapes.

#: Id fields (sessions, leases, profiles, requests, holders) must match this.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

#: A field typed ``JSONValue`` holds any JSON value (proto's google.protobuf.Value).
JSONValue = Any

_SHAPES: dict[type, tuple[tuple[str, Any, bool], ...]] = {}


def _shape(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, resolved type, required) per field, resolved once per class."""
    shape = _SHAPES.get(cls)
    if shape is None:
        attrs.resolve_types(cls, vars(sys.modules[cls.__module__]))
        shape = tuple(
            (f.name, f.type, f.default is attrs.NOTHING) for f in attrs.fields(cls)
        )
        _SHAPES[cls] = shape
    return shape


def _bad(path: str, want: str, got: Any) -> InvalidArgument:
    return InvalidArgument(
        f"field {path!r} must be {want}, not {type(got).__name__}",
        hint="fix the request body; see specs/relay.proto for the message shapes",
    )


def _structure(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type ``tp`` without coercing anything."""
    if tp is Any:
        return value
    origin = getattr(tp, "__origin__", None)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(path, "a string", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(path, "a boolean", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, "a number", value)
        return float(value)
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise _bad(path, "a list", value)
        (item,) = tp.__args__[:1]
        return tuple(_structure(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(path, "an object", value)
        item = tp.__args__[1]
        return {k: _structure(item, v, f"{path}.{k}") for k, v in value.items()}
    args = getattr(tp, "__args__", None)
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _structure(inner, value, path)
    if attrs.has(tp):
        return from_json(tp, value, path=path)
    raise TypeError(f"relay_client cannot structure {tp!r}")  # a bug in a message


def from_json(cls: type, obj: Any, *, path: str = "") -> Any:
    """Build message ``cls`` from decoded JSON; unknown or mistyped fields raise
    ``InvalidArgument``.  Missing fields take their defaults (proto3 style)."""
    if not isinstance(obj, dict):
        raise _bad(path or cls.__name__, "a JSON object", obj)
    shape = _shape(cls)
    known = {name for name, _, _ in shape}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise InvalidArgument(
            f"unknown field {unknown[0]!r} in {cls.__name__}",
            hint=f"known fields: {', '.join(sorted(known)) or '(none)'}",
        )
    kwargs = {}
    for name, tp, required in shape:
        if name in obj:
            kwargs[name] = _structure(tp, obj[name], f"{path}.{name}" if path else name)
        elif required:
            raise InvalidArgument(f"{cls.__name__} needs field {name!r}")
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if attrs.has(type(value)):
        return to_json(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_json(msg: Any) -> dict[str, Any]:
    """Message -> JSON-ready dict (field names are the proto's json_name)."""
    return {f.name: _plain(getattr(msg, f.name)) for f in attrs.fields(type(msg))}


def check_id(kind: str, value: str) -> str:
    """Refuse an id that could name a path outside ``flow/`` or be ambiguous."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{kind} {value!r} is not a valid id",
            hint="ids use letters, digits, '.', '_' and '-', at most 128 characters, "
            "and do not start with a dot",
        )
    return value


################################################################
# Messages
################################################################

# Field metadata drives the CLI generated from the table of RPCs:
#   flag=  the option name (``--session``), or ``positional=`` its metavar;
#   choices= allowed values; id= the id kind checked with ``check_id``.
PROVIDERS: Final = ("codex", "claude", "kimi")
PROFILE_MODES: Final = ("pooled", "one-borrow")
LEASE_MODES: Final = ("shared-read", "exclusive-write")
SESSION_STATES: Final = ("ready", "failed", "closed")
LEASE_STATES: Final = ("active", "waiting", "released", "revoked", "expired")
LIVE_LEASE_STATES: Final = ("active", "waiting")


def _f(default: Any = attrs.NOTHING, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default")  # messages are frozen values
    return attrs.field(default=default, metadata=meta)


_REQ_ID = {"flag": "--request-id", "id": "request id", "help": "idempotency key: a retry "
           "with the same id and body returns the first answer instead of applying twice"}


# -- records (also the ledger's own record shapes) ------------------------------

@attrs.frozen
class Runtime:
    status: str = "absent"  # absent | bootstrapped | serving | stopped
    endpoint: str = ""
    mode: str = ""  # loopback | trusted-lan
    token_id: str = ""
    pid: int = 0
    bootstrapped_at: str = ""
    served_at: str = ""
    shutdown_at: str = ""


@attrs.frozen
class Profile:
    name: str
    provider: str
    mode: str
    command: tuple[str, ...] = ()
    created_at: str = ""


@attrs.frozen
class Session:
    session_id: str
    profile: str
    provider: str
    state: str = "ready"
    created_at: str = ""
    updated_at: str = ""
    #: The last fencing token issued on this session; grants only ever raise it.
    fencing_token: int = 0


@attrs.frozen
class Lease:
    lease_id: str
    session_id: str
    holder: str
    mode: str
    state: str
    fencing_token: int = 0
    ttl_seconds: int = 0
    requested_at: str = ""
    granted_at: str = ""
    expires_at: str = ""
    last_renewed_at: str = ""
    ended_at: str = ""
    revoke_reason: str = ""


@attrs.frozen
class ControlRequest:
    request_id: str
    session_id: str
    kind: str
    payload: JSONValue = None
    payload_digest: str = ""
    recorded_at: str = ""


@attrs.frozen
class Quarantine:
    session_id: str
    reason: str
    state: str = "active"  # active | cleared
    quarantined_at: str = ""
    cleared_at: str = ""


@attrs.frozen
class StreamRecord:
    session_id: str
    seq: int
    kind: str
    data: JSONValue = None
    appended_at: str = ""


@attrs.frozen
class Cursor:
    """Where a session's event and result logs end: the last committed sequence
    number and byte length of each.  Bytes past the length are uncommitted."""

    session_id: str
    events: int = 0
    events_bytes: int = 0
    results: int = 0
    results_bytes: int = 0


@attrs.frozen
class StateWarning:
    """An owner-scoped finding about the workspace (``severity`` error fails status)."""

    owner: str
    code: str
    path: str
    message: str
    repair: str = ""
    severity: str = "error"  # error | warning


@attrs.frozen
class Recovery:
    session_id: str
    classification: str  # healthy | lease_block | quarantine_repair | resumable | replacement_start
    reason: str
    next_command: str = ""
    lease_ids: tuple[str, ...] = ()


# -- requests ------------------------------------------------------------------

@attrs.frozen
class RegisterProfileRequest:
    name: str = _f(positional="NAME", id="profile")
    provider: str = _f(flag="--provider", choices=PROVIDERS)
    mode: str = _f(flag="--mode", choices=PROFILE_MODES)
    command: tuple[str, ...] = _f((), flag="--command", argv=True,
                                  help='provider command line, e.g. "codex app-server"')
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class CreateSessionRequest:
    profile: str = _f(flag="--profile", id="profile")
    session_id: str = _f("", flag="--session-id", id="session", help="default: generated")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class BorrowRequest:
    holder: str = _f(flag="--holder", id="holder")
    profile: str = _f("", flag="--profile", id="profile", help="borrow any ready session of it")
    session_id: str = _f("", flag="--session", id="session", help="borrow this session")
    mode: str = _f("exclusive-write", flag="--mode", choices=LEASE_MODES)
    ttl_seconds: int = _f(0, flag="--ttl", help="lease lifetime; default from relay.toml")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class GrantLeaseRequest:
    session_id: str = _f(flag="--session", id="session")
    holder: str = _f(flag="--holder", id="holder")
    mode: str = _f(flag="--mode", choices=LEASE_MODES)
    ttl_seconds: int = _f(0, flag="--ttl", help="lease lifetime; default from relay.toml")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class ReleaseLeaseRequest:
    lease_id: str = _f(positional="LEASE_ID", id="lease")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class RenewLeaseRequest:
    lease_id: str = _f(positional="LEASE_ID", id="lease")
    ttl_seconds: int = _f(0, flag="--ttl", help="new lifetime from now; default: the lease's own")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class RevokeLeaseRequest:
    lease_id: str = _f(positional="LEASE_ID", id="lease")
    reason: str = _f(flag="--reason")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class RecordControlRequest:
    request_id: str = _f(flag="--request-id", id="request id")
    session_id: str = _f(flag="--session", id="session")
    kind: str = _f(flag="--kind")
    payload: JSONValue = _f(None, flag="--payload", json=True, help="any JSON value")


@attrs.frozen
class AppendRecordRequest:
    session_id: str = _f(flag="--session", id="session")
    kind: str = _f(flag="--kind")
    data: JSONValue = _f(None, flag="--data", json=True, help="any JSON value")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class QuarantineSessionRequest:
    session_id: str = _f(positional="SESSION_ID", id="session")
    reason: str = _f(flag="--reason")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class ClearQuarantineRequest:
    session_id: str = _f(positional="SESSION_ID", id="session")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class RecoverRequest:
    session_id: str = _f("", flag="--session", id="session", help="only this session")


@attrs.frozen
class GetStatusRequest:
    pass


@attrs.frozen
class ListProfilesRequest:
    pass


@attrs.frozen
class ListSessionsRequest:
    profile: str = _f("", flag="--profile", id="profile")
    state: str = _f("", flag="--state", choices=SESSION_STATES)


@attrs.frozen
class ListLeasesRequest:
    session_id: str = _f("", flag="--session", id="session")
    state: str = _f("", flag="--state", choices=LEASE_STATES)


@attrs.frozen
class ListRecordsRequest:
    session_id: str = _f(flag="--session", id="session")
    after: int = _f(0, flag="--after", help="return records with seq > AFTER")
    limit: int = _f(100, flag="--limit", help="at most this many (1..10000)")


# -- responses -----------------------------------------------------------------

@attrs.frozen
class ProfileReply:
    outcome: str
    revision: int
    profile: Profile


@attrs.frozen
class SessionReply:
    outcome: str
    revision: int
    session: Session


@attrs.frozen
class LeaseReply:
    outcome: str  # granted | waiting | renewed | released | revoked | duplicate
    revision: int
    lease: Lease


@attrs.frozen
class ControlReply:
    outcome: str  # recorded | duplicate
    revision: int
    control_request: ControlRequest


@attrs.frozen
class AppendReply:
    outcome: str
    revision: int
    record: StreamRecord


@attrs.frozen
class QuarantineReply:
    outcome: str  # quarantined | cleared
    revision: int
    quarantine: Quarantine
    revoked_lease_ids: tuple[str, ...] = ()


@attrs.frozen
class RecoverReply:
    revision: int
    sessions: tuple[Recovery, ...] = ()


@attrs.frozen
class StatusReply:
    status: str  # pass | fail
    projection: str
    relay_mode: str
    ledger_path: str
    state_present: bool
    tmp_present: bool
    ledger_present: bool
    durable_artifacts: int
    tmp_artifacts: int
    revision: int
    profiles: int
    sessions: int
    active_leases: int
    waiting_leases: int
    active_quarantines: int
    control_requests: int
    events: int
    results: int
    runtime: Runtime
    warnings: tuple[StateWarning, ...] = ()


@attrs.frozen
class ListProfilesReply:
    revision: int
    profiles: tuple[Profile, ...] = ()


@attrs.frozen
class ListSessionsReply:
    revision: int
    sessions: tuple[Session, ...] = ()


@attrs.frozen
class ListLeasesReply:
    revision: int
    leases: tuple[Lease, ...] = ()


@attrs.frozen
class ListRecordsReply:
    session_id: str
    last_seq: int
    records: tuple[StreamRecord, ...] = ()


################################################################
# The table of RPCs
################################################################

SERVICE: Final = "relay.v1.Relay"


@attrs.frozen
class Rpc:
    """One RPC: its Connect name, messages, and where it sits in the CLI."""

    name: str
    request: type
    response: type
    mutates: bool
    cli: tuple[str, ...]
    help: str

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.name}"

    @property
    def method(self) -> str:
        """The stub method name: ``GrantLease`` -> ``grant_lease``."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


RPCS: Final[tuple[Rpc, ...]] = (
    Rpc("RegisterProfile", RegisterProfileRequest, ProfileReply, True, ("profile", "register"),
        "register a provider profile (pooled profiles are Codex-only)"),
    Rpc("CreateSession", CreateSessionRequest, SessionReply, True, ("session", "create"),
        "record a managed session of a profile"),
    Rpc("Borrow", BorrowRequest, LeaseReply, True, ("borrow",),
        "lease a ready, unoccupied session (of a profile, or a named one)"),
    Rpc("Release", ReleaseLeaseRequest, LeaseReply, True, ("release",),
        "give back a borrowed session (same as lease release)"),
    Rpc("GrantLease", GrantLeaseRequest, LeaseReply, True, ("lease", "grant"),
        "grant a shared-read or exclusive-write lease on a session"),
    Rpc("RenewLease", RenewLeaseRequest, LeaseReply, True, ("lease", "renew"),
        "extend an active lease"),
    Rpc("ReleaseLease", ReleaseLeaseRequest, LeaseReply, True, ("lease", "release"),
        "release an active or waiting lease"),
    Rpc("RevokeLease", RevokeLeaseRequest, LeaseReply, True, ("lease", "revoke"),
        "revoke a lease, recording why"),
    Rpc("RecordControl", RecordControlRequest, ControlReply, True, ("control", "record"),
        "record an idempotent control request"),
    Rpc("AppendEvent", AppendRecordRequest, AppendReply, True, ("event", "append"),
        "append to a session's event stream"),
    Rpc("AppendResult", AppendRecordRequest, AppendReply, True, ("result", "append"),
        "append to a session's result stream"),
    Rpc("QuarantineSession", QuarantineSessionRequest, QuarantineReply, True,
        ("quarantine", "session"), "mark a session failed until the quarantine is cleared"),
    Rpc("ClearQuarantine", ClearQuarantineRequest, QuarantineReply, True,
        ("quarantine", "clear"), "clear a quarantine once it is safe"),
    Rpc("Recover", RecoverRequest, RecoverReply, False, ("recover",),
        "classify each session and name the command to run next"),
    Rpc("GetStatus", GetStatusRequest, StatusReply, False, ("status",),
        "the relay projection: health, counts, runtime, warnings"),
    Rpc("ListProfiles", ListProfilesRequest, ListProfilesReply, False, ("profile", "list"),
        "list provider profiles"),
    Rpc("ListSessions", ListSessionsRequest, ListSessionsReply, False, ("session", "list"),
        "list managed sessions"),
    Rpc("ListLeases", ListLeasesRequest, ListLeasesReply, False, ("lease", "list"),
        "list leases"),
    Rpc("ListEvents", ListRecordsRequest, ListRecordsReply, False, ("event", "list"),
        "list a session's events after a cursor"),
    Rpc("ListResults", ListRecordsRequest, ListRecordsReply, False, ("result", "list"),
        "list a session's results after a cursor"),
)

RPC_BY_NAME: Final = {rpc.name: rpc for rpc in RPCS}
