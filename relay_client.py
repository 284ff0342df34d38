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
    Binary protobuf codec (application/proto, loaded on first use)
    Stubs (sync and trio)
    CLI
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, ClassVar, Final

import attrs as _attrs

__all__ = [
    "DEFAULT_TIMEOUT",
    "ID_PATTERN",
    "IS_COUNT",
    "IS_ID",
    "IS_OPTIONAL_ID",
    "IS_SHA256",
    "IS_STAMP",
    "LEASE_ACCESS",
    "LEASE_STATES",
    "LIVE_LEASE_STATES",
    "MAX_JSON_DEPTH",
    "MAX_JSON_INTEGER",
    "MAX_TURN_INPUT",
    "MUTATION",
    "POOL_MODES",
    "PROCESS_STATES",
    "PROTO_PACKAGE",
    "PROVIDERS",
    "QUARANTINE_CODES",
    "QUARANTINE_STATES",
    "READ",
    "REPAIR_OUTCOMES",
    "RPCS",
    "RPC_BY_GET",
    "RPC_BY_NAME",
    "RPC_BY_WATCH",
    "RPC_LISTING",
    "RUNTIME_STATUSES",
    "SERVER_STREAM",
    "SERVICE",
    "SERVING_MODES",
    "SESSION_STATES",
    "TURN_END_KINDS",
    "TURN_STATES",
    "UNARY",
    "Aborted",
    "AlreadyExists",
    "AppendRecordRequest",
    "AppendReply",
    "ApprovalReply",
    "AsyncBorrowedLease",
    "AsyncRelayStub",
    "BorrowRequest",
    "BorrowedLease",
    "Canceled",
    "ClearQuarantineRequest",
    "CloseSessionReply",
    "CloseSessionRequest",
    "Code",
    "ControlReply",
    "ControlRequest",
    "CreateSessionRequest",
    "Cursor",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FeedNotice",
    "GetStatusRequest",
    "GetTurnRequest",
    "GrantLeaseRequest",
    "HeldLease",
    "Internal",
    "InterruptTurnRequest",
    "InvalidArgument",
    "JSONValue",
    "Lease",
    "LeaseLost",
    "LeaseReply",
    "ListLeasesReply",
    "ListLeasesRequest",
    "ListProfilesReply",
    "ListProfilesRequest",
    "ListRecordsReply",
    "ListRecordsRequest",
    "ListSessionsReply",
    "ListSessionsRequest",
    "ListTasksReply",
    "ListTasksRequest",
    "ListTurnsReply",
    "ListTurnsRequest",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ProcessInfo",
    "Profile",
    "ProfileReply",
    "ProviderHealth",
    "Quarantine",
    "QuarantineReply",
    "QuarantineSessionRequest",
    "RecordControlRequest",
    "RecoverReply",
    "RecoverRequest",
    "Recovery",
    "RegisterProfileRequest",
    "RelayError",
    "RelayStub",
    "ReleaseLeaseRequest",
    "RenewLeaseRequest",
    "RepairReply",
    "RepairSessionRequest",
    "RepairStep",
    "ResolveApprovalRequest",
    "ResourceExhausted",
    "RevokeLeaseRequest",
    "Rpc",
    "Runtime",
    "Session",
    "SessionReply",
    "SessionView",
    "StartTurnRequest",
    "StateWarning",
    "StatusReply",
    "StreamRecord",
    "TaskView",
    "Turn",
    "TurnReply",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "WatchFeedRequest",
    "WatchRecordsRequest",
    "add_request_arguments",
    "apply_recovery",
    "build_class",
    "build_deferred",
    "check_id",
    "check_json_value",
    "discover",
    "from_json",
    "json_to_proto",
    "main",
    "missing_arguments",
    "parse_digits",
    "parse_json",
    "proto_class",
    "proto_to_json",
    "request_from_arguments",
    "strict_loads",
    "to_json",
    "watch_rpc",
]

################################################################
# Deferred class building (attrs, built on first use)
################################################################

# attrs writes and compiles each class's __init__, __repr__, __eq__ and
# __hash__ when the class is defined: about 0.4 ms a class, some 100 of them
# between this module and relay.py, most never used by one CLI command.  So
# ``attrs`` here (and in relay.py, which takes it from here) is attrs with its
# class decorators deferred: ``@attrs.frozen`` / ``@attrs.define`` leave the
# class as written and run the real decorator, in place, on its first use --
# the first instance, or the first look at its fields (``attrs.fields``,
# ``attrs.has``, anything that reads ``__attrs_attrs__``).  In place means
# ``slots=False`` (a slotted class is a new class object; this one is already
# named by the RPC table and by type hints); a class that asks for
# ``slots=True`` is built at once.  ``build_deferred`` builds every class still
# waiting (the server does, before it serves).  New message classes need
# nothing of their own: the decorator is the usual one.

_UNBUILT: dict[type, tuple[Any, Any]] = {}  # class -> (the real decorator, its own __init__)
_BUILDING: set[type] = set()
_BUILD_LOCK: Final = __import__("_thread").RLock()  # _thread is built in: no import cost


class _Unbuilt:
    """``__attrs_attrs__`` of a class not built yet: reading it builds it."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __get__(self, instance: Any, owner: type) -> Any:
        build_class(self.cls)
        value = self.cls.__dict__.get("__attrs_attrs__")
        if value is self:  # asked while this very thread builds the class
            raise AttributeError("__attrs_attrs__")
        return value if owner is self.cls else owner.__attrs_attrs__


def build_class(cls: type) -> None:
    """Run ``cls``'s deferred attrs decorator, once.  Other threads that need
    the class meanwhile wait on the lock; a class is out of ``_UNBUILT`` only
    once it is built, and its stand-ins (``__init__``, ``__attrs_attrs__``)
    stay until attrs replaces them, so no thread ever sees it half built."""
    if cls not in _UNBUILT:
        return
    with _BUILD_LOCK:
        entry = _UNBUILT.get(cls)
        if entry is None or cls in _BUILDING:
            return
        decorate, own_init = entry
        _BUILDING.add(cls)
        try:
            built = decorate(cls)
            if own_init is not None:
                cls.__init__ = own_init
        finally:
            _BUILDING.discard(cls)
        assert built is cls, f"{cls.__name__} was rebuilt as another class"
        del _UNBUILT[cls]


def build_deferred() -> int:
    """Build every class still waiting; how many there were."""
    waiting = list(_UNBUILT)
    for cls in waiting:
        build_class(cls)
    return len(waiting)


def _defer_class(cls: type, decorator: Any, kwargs: dict[str, Any]) -> type:
    own_init = cls.__dict__.get("__init__")
    if own_init is None:  # attrs would take the stand-in below for the class's own
        kwargs.setdefault("init", True)

    def __init__(self: Any, *args: Any, **kw: Any) -> None:
        build_class(cls)
        cls.__init__(self, *args, **kw)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    _UNBUILT[cls] = (lambda c: decorator(c, **kwargs), own_init)
    cls.__attrs_attrs__ = _Unbuilt(cls)
    cls.__init__ = __init__
    return cls


def _deferring(decorator: Any) -> Any:
    def deferred(maybe_cls: type | None = None, /, **kwargs: Any) -> Any:
        if kwargs.setdefault("slots", False):
            return decorator(maybe_cls, **kwargs) if maybe_cls is not None else decorator(**kwargs)

        def wrap(cls: type) -> type:
            return _defer_class(cls, decorator, dict(kwargs))
        return wrap if maybe_cls is None else wrap(maybe_cls)
    return deferred


#: The attrs API, with ``frozen``, ``define`` and ``mutable`` deferred.
attrs: Any = type(sys)("attrs")
vars(attrs).update({k: v for k, v in vars(_attrs).items() if not k.startswith("__")})
attrs.frozen = _deferring(_attrs.frozen)
attrs.define = attrs.mutable = _deferring(_attrs.define)

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


class Canceled(RelayError):
    """The call was cancelled, typically by the caller."""

    code = Code.CANCELED


class Unknown(RelayError):
    """An error the relay could not classify (or an answer without a Connect error body)."""

    code = Code.UNKNOWN


class InvalidArgument(RelayError):
    """The request is malformed, whatever the ledger's state."""

    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(RelayError):
    """The call did not finish before its deadline."""

    code = Code.DEADLINE_EXCEEDED


class NotFound(RelayError):
    """A named profile, session, lease or record does not exist."""

    code = Code.NOT_FOUND


class AlreadyExists(RelayError):
    """The thing to create exists already."""

    code = Code.ALREADY_EXISTS


class PermissionDenied(RelayError):
    """The caller may not do this."""

    code = Code.PERMISSION_DENIED


class ResourceExhausted(RelayError):
    """A quota or buffer ran out (e.g. a subscriber fell behind)."""

    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(RelayError):
    """The ledger's state forbids the call now (e.g. the lease is not live)."""

    code = Code.FAILED_PRECONDITION


class LeaseLost(FailedPrecondition):
    """The lease of a ``borrowed`` block is gone (revoked, expired, released
    elsewhere): a job must not go on writing without it."""

    def __init__(self, message: str = "the lease was lost", **kw: Any):
        super().__init__(message, **kw)


class Aborted(RelayError):
    """The call lost a race with a concurrent change; retry it."""

    code = Code.ABORTED


class OutOfRange(RelayError):
    """A position (sequence number, Last-Event-ID) lies beyond what exists."""

    code = Code.OUT_OF_RANGE


class Unimplemented(RelayError):
    """No such RPC, or not supported by this relay."""

    code = Code.UNIMPLEMENTED


class Internal(RelayError):
    """A bug in the relay; its log has the details, the caller gets none."""

    code = Code.INTERNAL


class Unavailable(RelayError):
    """The relay cannot be reached or cannot serve now; retry later."""

    code = Code.UNAVAILABLE


class DataLoss(RelayError):
    """Durable data is damaged or missing."""

    code = Code.DATA_LOSS


class Unauthenticated(RelayError):
    """The call carried no valid bearer token."""

    code = Code.UNAUTHENTICATED

_ERROR_BY_CODE: Final[dict[str, type[RelayError]]] = {
    cls.code.value: cls
    for cls in (
        Canceled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


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

#: How many levels of arrays and objects a ``JSONValue`` field (``data``,
#: ``payload``) may nest.  Python's parser, its encoder and our own walks each
#: give up somewhere between a few hundred and a thousand levels, depending on
#: the stack they run on; a fixed limit checked at every door keeps every
#: stored value readable back, by us and by any other JSON reader.
MAX_JSON_DEPTH: Final = 64

# Field constraints of the ledger's records, checked by ``from_json(...,
# complete=True)`` as specs/relay-state.schema.json states them.
_STAMP: Final = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z"
#: A UTC timestamp ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (relay.iso), or "" when unset.
STAMP_PATTERN: Final = re.compile(f"(?:{_STAMP})?")
#: A timestamp that is always set.
SET_STAMP_PATTERN: Final = re.compile(_STAMP)
#: 64 lowercase hex digits.
SHA256_PATTERN: Final = re.compile(r"[0-9a-f]{64}")
#: An id, or "" when unset.
OPTIONAL_ID_PATTERN: Final = re.compile(f"(?:{ID_PATTERN.pattern})?")
#: A whole number written as text (a cursor, a query parameter, a CLI option):
#: ASCII digits only -- ``int()`` would also take " 1", "+1", "1_0" and "١".
DIGITS_PATTERN: Final = re.compile(r"[0-9]+")


#: The largest integer a JSON number may be: beyond it no double holds it, so
#: the binary codec (google.protobuf.Value) and most JSON readers could not.
MAX_JSON_INTEGER: Final = int(sys.float_info.max)


def parse_digits(text: str) -> int:
    """``text`` as a non-negative integer, or ValueError unless it is ASCII digits only."""
    if not isinstance(text, str) or not DIGITS_PATTERN.fullmatch(text):
        raise ValueError(f"{text!r} is not a whole number (ASCII digits 0-9 only)")
    return int(text)


def parse_json(text: str | bytes) -> Any:
    """Decode a request body, frame or argument as strict JSON (RFC 8259).

    Python's parser also takes NaN and Infinity, reads ``1e400`` as infinity,
    and takes lone surrogates (``"\\ud800"``) that can never be encoded again:
    a commit holding one would fail, and with it every request in its group
    commit.  Nesting too deep for the parser is malformed input too, not an
    internal error.  Every refusal is a ValueError.
    """
    value = strict_loads(text, parse_int=_door_int)
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone surrogate (not valid Unicode)") from None
    return value


def strict_loads(text: str | bytes, *, parse_int: Any = None) -> Any:
    """``json.loads`` refusing NaN, Infinity and out-of-range numbers (and
    nesting too deep for the parser) with ValueError; what the ledger reader
    uses, whose bytes our own encoder wrote (so every string encodes)."""
    decoder = _STRICT_DECODERS.get(parse_int)
    if decoder is None:  # json.loads would build one per call: ~15% of a small record's parse
        decoder = _STRICT_DECODERS[parse_int] = json.JSONDecoder(
            parse_constant=_reject_constant, parse_float=_finite_float, parse_int=parse_int)
    if isinstance(text, (bytes, bytearray)):  # as json.loads reads bytes
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    try:
        return decoder.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


_STRICT_DECODERS: dict[Any, json.JSONDecoder] = {}


def _door_int(text: str) -> int:
    """An integer literal of a request: refused beyond what a double holds
    (the binary codec's google.protobuf.Value could never carry it back).
    Only the doors refuse it; readers take what an earlier version stored."""
    value = int(text)
    if not -MAX_JSON_INTEGER <= value <= MAX_JSON_INTEGER:
        raise ValueError(f"integer of {len(text.lstrip('-'))} digits is beyond what a double can "
                         "hold (about 1.8e308); send it as a string")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range (only finite numbers are accepted)")
    return value


def check_json_value(value: Any, path: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse a value nested deeper than ``limit`` or holding NaN or an
    infinity, with ``InvalidArgument``.  Iterative: a recursive check would
    itself run out of stack on the values it exists to refuse."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        tp = type(item)
        if tp is float and not math.isfinite(item):
            raise InvalidArgument(f"field {path!r} holds {item!r}; only finite numbers are accepted",
                                  hint="send a finite number, or the value as a string")
        if tp is list or tp is dict or tp is tuple:
            if depth >= limit:
                raise InvalidArgument(
                    f"field {path!r} nests arrays/objects more than {limit} levels deep",
                    hint="flatten the value (see 'Limits on input' in specs/flow-relay-contract.md)")
            stack.extend((v, depth + 1) for v in (item.values() if tp is dict else item))


_SHAPES: dict[type, tuple[tuple[str, Any, bool, Any], ...]] = {}
_KNOWN: dict[type, frozenset[str]] = {}


def _shape(cls: type) -> tuple[tuple[str, Any, bool, Any], ...]:
    """(name, resolved type, required, stored-field check or None) per field,
    resolved once per class."""
    shape = _SHAPES.get(cls)
    if shape is None:
        attrs.resolve_types(cls, vars(sys.modules[cls.__module__]))
        shape = tuple(
            (f.name, f.type, f.default is attrs.NOTHING, _field_check(f.metadata))
            for f in attrs.fields(cls)
        )
        _KNOWN[cls] = frozenset(f.name for f in attrs.fields(cls))
        _SHAPES[cls] = shape
    return shape


def _bad(path: str, want: str, got: Any) -> InvalidArgument:
    return InvalidArgument(
        f"field {path!r} must be {want}, not {type(got).__name__}",
        hint="fix the request body; see specs/relay.proto for the message shapes",
    )


def _is_finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (type(value) is not float or math.isfinite(value)))


#: Scalar types -> (what a value must be, the test it must pass).  No
#: coercion: ``True`` is no integer and ``"5"`` no number.
_SCALAR_CHECKS: Final[dict[Any, tuple[str, Any]]] = {
    str: ("a string", lambda v: isinstance(v, str)),
    bool: ("a boolean", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", _is_finite_number),
}


def _structure(tp: Any, value: Any, path: str, complete: bool = False) -> Any:
    """Check ``value`` against the type ``tp`` without coercing anything."""
    if tp is Any:
        return value
    if tp in _SCALAR_CHECKS:
        what, ok = _SCALAR_CHECKS[tp]
        if not ok(value):
            raise _bad(path, what, value)
        return float(value) if tp is float else value
    origin = getattr(tp, "__origin__", None)
    if origin in (list, tuple, dict):
        return _structure_container(tp, origin, value, path, complete)
    args = getattr(tp, "__args__", None)
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _structure(inner, value, path, complete)
    if attrs.has(tp):
        return from_json(tp, value, path=path, complete=complete)
    raise TypeError(f"relay_client cannot structure {tp!r}")  # a bug in a message


def _structure_container(tp: Any, origin: Any, value: Any, path: str, complete: bool) -> Any:
    """A JSON list (a tuple of the item type) or object (a dict of the value type)."""
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(path, "an object", value)
        item = tp.__args__[1]
        return {k: _structure(item, v, f"{path}.{k}", complete) for k, v in value.items()}
    if not isinstance(value, list):
        raise _bad(path, "a list", value)
    (item,) = tp.__args__[:1]
    return tuple(_structure(item, v, f"{path}[{i}]", complete) for i, v in enumerate(value))


def from_json(cls: type, obj: Any, *, path: str = "", complete: bool = False) -> Any:
    """Build message ``cls`` from decoded JSON; unknown or mistyped fields raise
    ``InvalidArgument``.  Missing fields take their defaults (proto3 style),
    unless ``complete``: a stored record (the ledger) has every field, and
    each meets the constraints in its metadata (see ``_field_check``)."""
    if not isinstance(obj, dict):
        raise _bad(path or cls.__name__, "a JSON object", obj)
    shape = _shape(cls)
    if not _KNOWN[cls].issuperset(obj):
        unknown = sorted(set(obj) - _KNOWN[cls])
        raise InvalidArgument(
            f"unknown field {unknown[0]!r} in {cls.__name__}",
            hint=f"known fields: {', '.join(sorted(_KNOWN[cls])) or '(none)'}",
        )
    kwargs = {}
    for name, tp, required, check in shape:
        if name in obj:
            value = obj[name]
            # The common scalar cases inline: the ledger reader walks every record.
            if not ((tp is str and type(value) is str) or (tp is int and type(value) is int)):
                value = _structure(tp, value, f"{path}.{name}" if path else name, complete)
            kwargs[name] = value
            if tp is Any:
                check_json_value(value, f"{path}.{name}" if path else name)
            if complete and check is not None:
                check(value, path, name)
        elif required or complete:
            raise InvalidArgument(f"{cls.__name__} needs field {name!r}" +
                                  (f" (at {path!r})" if path else ""))
    return cls(**kwargs)


def _field_check(meta: Any) -> Any:
    """The check of a stored field's constraints from its metadata, or None:
    ``pattern`` (of a string, or of each string in a list), ``minimum``,
    ``choices`` and ``length`` (min, max) -- what the JSON Schema says with
    pattern, minimum, enum and minLength/maxLength.  ``redact`` keeps the
    value out of the message."""
    pattern, minimum, choices = meta.get("pattern"), meta.get("minimum"), meta.get("choices")
    length, redact = meta.get("length"), meta.get("redact")
    if pattern is None and minimum is None and choices is None and length is None:
        return None

    def check(value: Any, parent: str, name: str) -> None:
        path = f"{parent}.{name}" if parent else name
        for item in value if type(value) is tuple else (value,):
            if pattern is not None and not pattern.fullmatch(item):
                shown = f"{len(item)} characters" if redact else repr(item)
                raise InvalidArgument(f"field {path!r} is {shown}, which does not match "
                                      f"{pattern.pattern}")
        if minimum is not None and value < minimum:
            raise InvalidArgument(f"field {path!r} is {value}, below its minimum {minimum}")
        if choices is not None and value not in choices:
            raise InvalidArgument(f"field {path!r} is {value!r}, not one of {', '.join(choices)}")
        if length is not None and not length[0] <= len(value) <= length[1]:
            raise InvalidArgument(f"field {path!r} has {len(value)} characters; "
                                  f"it needs {length[0]} to {length[1]}")

    return check


_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(value: Any) -> Any:
    # Dispatch on the exact type: this walk encodes the whole ledger on every
    # commit, and asking attrs about every string was most of its cost.
    tp = type(value)
    if tp in _SCALARS:
        return value
    if tp is tuple or tp is list:
        return [_plain(v) for v in value]
    if tp is dict:
        return {k: _plain(v) for k, v in value.items()}
    names = _FIELD_NAMES.get(tp)
    if names is None:
        if isinstance(value, Mapping):  # relay's ledger maps (persistent, with derived data)
            return {k: _plain(v) for k, v in value.items()}
        if not attrs.has(tp):
            return value
        names = _FIELD_NAMES[tp] = tuple(f.name for f in attrs.fields(tp))
    return {name: _plain(getattr(value, name)) for name in names}


def to_json(msg: Any) -> dict[str, Any]:
    """Message -> JSON-ready dict (field names are the proto's json_name)."""
    return _plain(msg)


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
POOL_MODES: Final = ("pooled", "one-borrow")
LEASE_ACCESS: Final = ("shared-read", "exclusive-write")
SESSION_STATES: Final = ("ready", "failed", "closed")
LEASE_STATES: Final = ("active", "waiting", "released", "revoked", "expired")
LIVE_LEASE_STATES: Final = ("active", "waiting")


def _f(default: Any = attrs.NOTHING, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default")  # messages are frozen values
    return attrs.field(default=default, metadata=meta)


_REQ_ID = {"flag": "--request-id", "id": "request id", "help": "idempotency key: a retry "
           "with the same id and body returns the first answer instead of applying twice"}
_FENCE = {"flag": "--fencing-token", "help": "the fencing token of the lease this write acts "
          "for; refused once that lease has ended or a newer holder took over (0: not checked)"}


# -- records (also the ledger's own record shapes) ------------------------------
# Their field metadata is what specs/relay-state.schema.json says of each field;
# the ledger reader checks it (``from_json(..., complete=True)``).

#: Constraints of stored fields: an id, an id or "", a timestamp or "", a
#: non-negative integer, a SHA-256 hex digest.
IS_ID: Final = {"pattern": ID_PATTERN}
IS_OPTIONAL_ID: Final = {"pattern": OPTIONAL_ID_PATTERN}
IS_STAMP: Final = {"pattern": STAMP_PATTERN}
IS_COUNT: Final = {"minimum": 0}
IS_SHA256: Final = {"pattern": SHA256_PATTERN, "redact": True}  # it may be a raw secret
RUNTIME_STATUSES: Final = ("absent", "bootstrapped", "serving", "stopped")
TURN_STATES: Final = ("running", "completed", "failed", "interrupted")
PROCESS_STATES: Final = ("starting", "running", "stopping", "exited")
#: A profile's --env entry and --option entry (values are checked per provider by the relay).
ENV_ENTRY_PATTERN: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}=[^\x00]{0,4096}")
OPTION_ENTRY_PATTERN: Final = re.compile(r"[a-z_]{1,64}=[^\x00\n]{0,1024}")
#: The longest turn input a StartTurn takes (characters).
MAX_TURN_INPUT: Final = 32 * 1024
SERVING_MODES: Final = ("", "loopback", "trusted-lan")
QUARANTINE_STATES: Final = ("active", "cleared")
#: Why a session was quarantined: an operator's QuarantineSession, or what the
#: live runtime detected (specs/flow-runtime-contract.md, "Failure detection").
QUARANTINE_CODES: Final = ("operator", "provider_exited", "heartbeat_lost", "unresponsive",
                           "start_failed", "tmp_corrupted", "relay_restarted")


@attrs.frozen
class Runtime:
    status: str = _f("absent", choices=RUNTIME_STATUSES)
    endpoint: str = ""
    mode: str = _f("", choices=SERVING_MODES)  #: the serving mode: loopback | trusted-lan
    token_id: str = _f("", **IS_OPTIONAL_ID)
    pid: int = _f(0, **IS_COUNT)
    bootstrapped_at: str = _f("", **IS_STAMP)
    served_at: str = _f("", **IS_STAMP)
    shutdown_at: str = _f("", **IS_STAMP)


@attrs.frozen
class Profile:
    name: str = _f(**IS_ID)
    provider: str = _f(choices=PROVIDERS)
    #: The pool mode: pooled | one-borrow (JSON and proto name ``mode``).
    mode: str = _f(choices=POOL_MODES)
    command: tuple[str, ...] = ()
    created_at: str = _f("", **IS_STAMP)
    #: Idle, warm sessions the runtime keeps ready (pooled) or pre-spawned (one-borrow).
    pool_size: int = _f(1, minimum=1)
    #: The provider's working directory; "" = the session's own scratch directory.
    cwd: str = _f("", length=(0, 4096))
    #: Extra environment of the provider process, each "KEY=VALUE".
    env: tuple[str, ...] = _f((), pattern=ENV_ENTRY_PATTERN)
    #: Provider settings from the documented table, each "key=value".
    options: tuple[str, ...] = _f((), pattern=OPTION_ENTRY_PATTERN)


@attrs.frozen
class Session:
    session_id: str = _f(**IS_ID)
    profile: str = _f(**IS_ID)
    provider: str = _f(choices=PROVIDERS)
    state: str = _f("ready", choices=SESSION_STATES)
    created_at: str = _f("", **IS_STAMP)
    updated_at: str = _f("", **IS_STAMP)
    #: The last fencing token issued on this session; grants only ever raise it.
    fencing_token: int = _f(0, **IS_COUNT)
    #: The session this one was started to replace (RepairSession, recover --apply), or "".
    replaces: str = _f("", **IS_OPTIONAL_ID)
    #: The session started in this one's place, or "" (set when it is replaced).
    replaced_by: str = _f("", **IS_OPTIONAL_ID)


@attrs.frozen
class Lease:
    lease_id: str = _f(**IS_ID)
    session_id: str = _f(**IS_ID)
    holder: str = _f(**IS_ID)
    #: The lease's access: shared-read | exclusive-write (JSON and proto name ``mode``).
    mode: str = _f(choices=LEASE_ACCESS)
    state: str = _f(choices=LEASE_STATES)
    fencing_token: int = _f(0, **IS_COUNT)
    ttl_seconds: int = _f(0, **IS_COUNT)
    requested_at: str = _f("", **IS_STAMP)
    granted_at: str = _f("", **IS_STAMP)
    expires_at: str = _f("", **IS_STAMP)
    last_renewed_at: str = _f("", **IS_STAMP)
    ended_at: str = _f("", **IS_STAMP)
    revoke_reason: str = ""


@attrs.frozen
class ControlRequest:
    request_id: str = _f(**IS_ID)
    session_id: str = _f(**IS_ID)
    kind: str = _f(**IS_ID)
    payload: JSONValue = None
    payload_digest: str = _f("", **IS_SHA256)
    recorded_at: str = _f("", **IS_STAMP)


@attrs.frozen
class Quarantine:
    session_id: str = _f(**IS_ID)
    reason: str = _f(length=(1, 512))
    state: str = _f("active", choices=QUARANTINE_STATES)
    quarantined_at: str = _f("", **IS_STAMP)
    cleared_at: str = _f("", **IS_STAMP)
    #: What set it (``QUARANTINE_CODES``); ``reason`` starts with it when the runtime set it.
    code: str = _f("operator", choices=QUARANTINE_CODES)
    #: The runtime's evidence (an object: turn_id, exit_status, signal, pid, stderr, detail), or null.
    evidence: JSONValue = None


@attrs.frozen
class StreamRecord:
    session_id: str = _f(**IS_ID)
    seq: int = _f(minimum=1)
    kind: str = _f(**IS_ID)
    data: JSONValue = None
    appended_at: str = _f("", **IS_STAMP)


@attrs.frozen
class Turn:
    """One prompt run on a session for a lease holder (durable; see the runtime contract)."""

    turn_id: str = _f(**IS_ID)
    session_id: str = _f(**IS_ID)
    lease_id: str = _f(**IS_ID)
    state: str = _f("running", choices=TURN_STATES)
    input: str = _f("", length=(0, MAX_TURN_INPUT))
    output_text: str = ""
    error: str = ""
    task_ref: str = _f("", length=(0, 512))
    started_at: str = _f("", **IS_STAMP)
    ended_at: str = _f("", **IS_STAMP)
    usage: JSONValue = None
    request_id: str = _f("", **IS_OPTIONAL_ID)
    #: The provider's conversation the turn ran in (Codex thread id, Claude session id;
    #: "" for Kimi or when unknown): what RepairSession resumes after a crash.
    thread_id: str = _f("", length=(0, 128))


@attrs.frozen
class ProcessInfo:
    """A session's provider process as the running server sees it (in memory, not durable)."""

    pid: int = 0
    state: str = ""  # starting | running | stopping | exited
    started_at: str = ""
    provider_version: str = ""


@attrs.frozen
class ProviderHealth:
    """One profile's provider health as the running server observed it since
    it started (in memory, not durable; never written to the provider's owner)."""

    profile: str
    state: str = "healthy"  # healthy | degraded
    starts: int = 0
    exits: int = 0
    crashes: int = 0
    stalls: int = 0
    probe_failures: int = 0
    failed_turns: int = 0
    tmp_corrupted: int = 0
    start_failures: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_at: str = ""
    #: Automatic quarantines by code: an object code -> count.
    quarantines: JSONValue = None


@attrs.frozen
class SessionView:
    """A session row of ListSessions: the ledger record plus its live process."""

    session_id: str
    profile: str
    provider: str
    state: str
    created_at: str
    updated_at: str
    fencing_token: int
    #: Empty (pid 0, state "") when no process runs or no server answers.
    process: ProcessInfo = ProcessInfo()
    replaces: str = ""
    replaced_by: str = ""


@attrs.frozen
class TaskView:
    """The turns that carry one task_ref (the relay is not the task's owner)."""

    task_ref: str
    turns: tuple[Turn, ...] = ()
    running: int = 0
    completed: int = 0
    failed: int = 0
    interrupted: int = 0


@attrs.frozen
class Cursor:
    """Where a session's event and result logs end: the last committed sequence
    number and byte length of each.  Bytes past the length are uncommitted."""

    session_id: str = _f(**IS_ID)
    events: int = _f(0, **IS_COUNT)
    events_bytes: int = _f(0, **IS_COUNT)
    results: int = _f(0, **IS_COUNT)
    results_bytes: int = _f(0, **IS_COUNT)


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
    mode: str = _f(flag="--mode", choices=POOL_MODES)
    command: tuple[str, ...] = _f((), flag="--command", argv=True,
                                  help='provider command line, e.g. "codex app-server" '
                                  "(default: the provider's real CLI)")
    request_id: str = _f("", **_REQ_ID)
    pool_size: int = _f(1, flag="--pool-size", help="warm idle sessions kept ready (default 1)")
    cwd: str = _f("", flag="--cwd", help="provider working directory (default: session scratch)")
    env: tuple[str, ...] = _f((), flag="--env", repeat=True, help="KEY=VALUE for the provider "
                              "process (repeatable)")
    options: tuple[str, ...] = _f((), flag="--option", repeat=True, help="provider setting "
                                  "key=value from the documented table (repeatable)")


@attrs.frozen
class CreateSessionRequest:
    profile: str = _f(flag="--profile", id="profile")
    session_id: str = _f("", flag="--session-id", id="session", help="default: generated")
    request_id: str = _f("", **_REQ_ID)
    replaces: str = _f("", flag="--replaces", id="session", help="the session this one replaces "
                       "(recorded on both; the old one is closed)")


@attrs.frozen
class BorrowRequest:
    holder: str = _f(flag="--holder", id="holder")
    profile: str = _f("", flag="--profile", id="profile", help="borrow any ready session of it")
    session_id: str = _f("", flag="--session", id="session", help="borrow this session")
    mode: str = _f("exclusive-write", flag="--mode", choices=LEASE_ACCESS)
    ttl_seconds: int = _f(0, flag="--ttl", help="lease lifetime; default from relay.toml")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class GrantLeaseRequest:
    session_id: str = _f(flag="--session", id="session")
    holder: str = _f(flag="--holder", id="holder")
    mode: str = _f(flag="--mode", choices=LEASE_ACCESS)
    ttl_seconds: int = _f(0, flag="--ttl", help="lease lifetime; default from relay.toml")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class ReleaseLeaseRequest:
    lease_id: str = _f(positional="LEASE_ID", id="lease")
    request_id: str = _f("", **_REQ_ID)
    fencing_token: int = _f(0, **_FENCE)


@attrs.frozen
class RenewLeaseRequest:
    lease_id: str = _f(positional="LEASE_ID", id="lease")
    ttl_seconds: int = _f(0, flag="--ttl", help="new lifetime from now; default: the lease's own")
    request_id: str = _f("", **_REQ_ID)
    fencing_token: int = _f(0, **_FENCE)


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
    fencing_token: int = _f(0, **_FENCE)


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
class RepairSessionRequest:
    session_id: str = _f(positional="SESSION_ID", id="session")
    apply: bool = _f(False, flag="--apply", help="perform the repair (default: a dry run that "
                     "says what it would do, and why)")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class CloseSessionRequest:
    session_id: str = _f(positional="SESSION_ID", id="session")
    force: bool = _f(False, flag="--force", help="close even while a lease is live (revoking it)")
    reason: str = _f("", flag="--reason", help="why (recorded on a revoked lease)")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class StartTurnRequest:
    session_id: str = _f(flag="--session", id="session")
    lease_id: str = _f(flag="--lease", id="lease")
    fencing_token: int = _f(flag="--fencing-token", help="the fencing token of that lease")
    input: str = _f(flag="--input", help="the prompt")
    task_ref: str = _f("", flag="--task-ref", help="opaque pointer to the task this turn serves")
    request_id: str = _f("", **_REQ_ID)


@attrs.frozen
class InterruptTurnRequest:
    session_id: str = _f(flag="--session", id="session")
    lease_id: str = _f(flag="--lease", id="lease")
    fencing_token: int = _f(flag="--fencing-token", help="the fencing token of that lease")
    turn_id: str = _f(positional="TURN_ID", id="turn")


@attrs.frozen
class GetTurnRequest:
    turn_id: str = _f(positional="TURN_ID", id="turn")


@attrs.frozen
class ListTurnsRequest:
    session_id: str = _f("", flag="--session", id="session")
    task_ref: str = _f("", flag="--task-ref")
    state: str = _f("", flag="--state", choices=TURN_STATES)


@attrs.frozen
class ListTasksRequest:
    task_ref: str = _f("", flag="--task-ref")


@attrs.frozen
class ResolveApprovalRequest:
    session_id: str = _f(flag="--session", id="session")
    lease_id: str = _f(flag="--lease", id="lease")
    fencing_token: int = _f(flag="--fencing-token", help="the fencing token of that lease")
    approval_id: str = _f(positional="APPROVAL_ID")
    decision: str = _f(flag="--decision", choices=("accept", "decline"))


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


@attrs.frozen
class WatchRecordsRequest:
    session_id: str = _f("", flag="--session",
                         help="one session's records (without it: every session's)")
    last_event_id: str = _f("", flag="--last-event-id",
                            help="resume after this id (S:SEQ, or S1:SEQ,S2:SEQ for every session)")


@attrs.frozen
class WatchFeedRequest:
    last_event_id: str = _f("", flag="--last-event-id",
                            help="resume after this notice id (REVISION.INDEX)")


# -- responses -----------------------------------------------------------------

@attrs.frozen
class ProfileReply:
    outcome: str = _f(choices=("registered",))
    revision: int = _f(**IS_COUNT)
    profile: Profile


@attrs.frozen
class SessionReply:
    outcome: str = _f(choices=("created",))
    revision: int = _f(**IS_COUNT)
    session: Session


@attrs.frozen
class LeaseReply:
    outcome: str = _f(choices=("granted", "waiting", "renewed", "released", "revoked"))
    revision: int = _f(**IS_COUNT)
    lease: Lease


@attrs.frozen
class ControlReply:
    outcome: str  # recorded | duplicate
    revision: int
    control_request: ControlRequest


@attrs.frozen
class AppendReply:
    outcome: str = _f(choices=("appended",))
    revision: int = _f(**IS_COUNT)
    record: StreamRecord


@attrs.frozen
class QuarantineReply:
    outcome: str = _f(choices=("quarantined", "cleared"))
    revision: int = _f(**IS_COUNT)
    quarantine: Quarantine
    revoked_lease_ids: tuple[str, ...] = _f((), **IS_ID)


#: RepairSession's outcomes: what a dry run would do (planned) or what was done.
REPAIR_OUTCOMES: Final = ("planned", "repaired", "replaced", "healthy", "refused")


@attrs.frozen
class RepairStep:
    """One step of a repair: what (``action``), why, and whether it was done."""

    action: str
    reason: str = ""
    done: bool = False


@attrs.frozen
class RepairReply:
    session_id: str
    applied: bool
    outcome: str = _f(choices=REPAIR_OUTCOMES)
    steps: tuple[RepairStep, ...] = ()
    #: The session started in this one's place (outcome replaced), or "".
    replacement_session_id: str = ""
    revision: int = _f(0, **IS_COUNT)


@attrs.frozen
class CloseSessionReply:
    outcome: str = _f(choices=("closed",))
    revision: int = _f(**IS_COUNT)
    session: Session
    revoked_lease_ids: tuple[str, ...] = _f((), **IS_ID)


@attrs.frozen
class RecoverReply:
    revision: int
    sessions: tuple[Recovery, ...] = ()


@attrs.frozen
class StatusReply:
    status: str  # pass | fail
    projection: str
    #: The relay's health: unbootstrapped | ready | serving | stopped | degraded.
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
    #: Per profile, the running server's provider health (empty from the CLI,
    #: which has no server's memory).
    providers: tuple[ProviderHealth, ...] = ()


@attrs.frozen
class TurnReply:
    turn: Turn


@attrs.frozen
class ListTurnsReply:
    revision: int
    turns: tuple[Turn, ...] = ()


@attrs.frozen
class ListTasksReply:
    revision: int
    tasks: tuple[TaskView, ...] = ()


@attrs.frozen
class ApprovalReply:
    outcome: str  # accepted | declined
    session_id: str
    approval_id: str


@attrs.frozen
class ListProfilesReply:
    revision: int
    profiles: tuple[Profile, ...] = ()


@attrs.frozen
class ListSessionsReply:
    revision: int
    sessions: tuple[SessionView, ...] = ()


@attrs.frozen
class ListLeasesReply:
    revision: int
    leases: tuple[Lease, ...] = ()


@attrs.frozen
class FeedNotice:
    """One relay-feed notice: its id (``REVISION.INDEX``), its kind
    (``lease.granted``, ...) and the record it announces."""

    id: str
    kind: str
    data: JSONValue = None


@attrs.frozen
class ListRecordsReply:
    session_id: str
    last_seq: int
    records: tuple[StreamRecord, ...] = ()


################################################################
# The table of RPCs
################################################################

SERVICE: Final = "relay.v1.Relay"

#: An Rpc's kind: a read changes nothing (Connect's NO_SIDE_EFFECTS, the GET
#: form); a mutation is applied once, under the ledger lock.
READ: Final = "read"
MUTATION: Final = "mutation"
#: An Rpc's cardinality: one reply per request, or a stream of messages
#: (served as SSE ``/events`` and WebSocket ``subscribe``, not as Connect).
UNARY: Final = "unary"
SERVER_STREAM: Final = "server_stream"


@attrs.frozen
class Rpc:
    """One RPC: its Connect name and messages, and every way it is reached.

    Everything the server, both CLIs and both stubs do differently per RPC is
    a field of its row here, never a test of its name.  A row is declared
    ``Rpc(NAME, REQUEST, RESPONSE, kind=READ|MUTATION, cli=(WORDS...), help=TEXT,
    ...)``; the keyword fields below all have defaults."""

    name: str
    request: type
    response: type
    kind: str = attrs.field(kw_only=True, validator=attrs.validators.in_((READ, MUTATION)))
    #: The ``python -m relay`` command words (``relay_client`` uses ``method``).
    cli: tuple[str, ...] = attrs.field(kw_only=True)
    help: str = attrs.field(kw_only=True)
    cardinality: str = attrs.field(default=UNARY, kw_only=True,
                                   validator=attrs.validators.in_((UNARY, SERVER_STREAM)))
    #: The session stream (events | results) a mutation appends to or a read
    #: lists; it is passed to the operation as ``stream=``, and a read of a
    #: stream reads its log from disk.
    stream: str = attrs.field(default="", kw_only=True,
                              validator=attrs.validators.in_(("", "events", "results")))
    #: The request id is the control record's own key, not an idempotency key.
    control: bool = attrs.field(default=False, kw_only=True)
    #: A read's route ``GET /api/relay/<get>``; its query parameters are the
    #: request's CLI flags (``--session`` -> ``?session=``, ``--task-ref`` ->
    #: ``?task_ref=``).
    get: str = attrs.field(default="", kw_only=True)
    #: Another row's name: this one is an explicit alias of it (same request,
    #: same operation), kept for the callers that know it by this name.
    alias_of: str = attrs.field(default="", kw_only=True)
    #: Answered by the live runtime of a running ``serve`` (it needs provider
    #: processes): the servicer hands it to the runtime, and ``python -m relay``
    #: sends it to the running server instead of answering from the ledger.
    runtime: bool = attrs.field(default=False, kw_only=True)
    #: A server stream's selector, ``KEY=VALUE``: the query parameter of SSE
    #: ``/events`` and the member of a WebSocket ``subscribe`` frame that pick
    #: this row (``stream=events``, ``feed=relay``).
    watch: str = attrs.field(default="", kw_only=True)

    @property
    def mutates(self) -> bool:
        return self.kind == MUTATION

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.name}"

    @property
    def method(self) -> str:
        """The stub and servicer method name: ``GrantLease`` -> ``grant_lease``."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()

    @property
    def streams(self) -> bool:
        return self.cardinality == SERVER_STREAM

    @property
    def query(self) -> dict[str, str]:
        """The GET route's query parameters -> the request fields they set."""
        return self.parameters if self.get else {}

    @property
    def parameters(self) -> dict[str, str]:
        """URL query parameters (and WebSocket frame members) -> the request
        fields they set: each field's CLI flag without ``--``, dashes as
        underscores (``--last-event-id`` -> ``last_event_id``)."""
        return {meta["flag"].removeprefix("--").replace("-", "_"): field.name
                for field in attrs.fields(self.request) if (meta := field.metadata).get("flag")}

    def request_from_parameters(self, values: Any) -> Any:
        """The request of a query string or a ``subscribe`` frame (strings)."""
        return self.request(**{name: str(values[param]) for param, name in self.parameters.items()
                               if values.get(param)})


RPCS: Final[tuple[Rpc, ...]] = (
    Rpc("RegisterProfile", RegisterProfileRequest, ProfileReply, kind=MUTATION,
        cli=("profile", "register"),
        help="register a provider profile (pooled profiles are Codex-only)"),
    Rpc("CreateSession", CreateSessionRequest, SessionReply, kind=MUTATION,
        cli=("session", "create"), help="record a managed session of a profile"),
    Rpc("CloseSession", CloseSessionRequest, CloseSessionReply, kind=MUTATION,
        cli=("session", "close"),
        help="end a session for good (refused while a lease is live unless --force)"),
    Rpc("Borrow", BorrowRequest, LeaseReply, kind=MUTATION, cli=("borrow",),
        help="lease a ready, unoccupied session (of a profile, or a named one)"),
    Rpc("Release", ReleaseLeaseRequest, LeaseReply, kind=MUTATION, cli=("release",),
        help="give back a borrowed session (same as lease release)", alias_of="ReleaseLease"),
    Rpc("GrantLease", GrantLeaseRequest, LeaseReply, kind=MUTATION, cli=("lease", "grant"),
        help="grant a shared-read or exclusive-write lease on a session"),
    Rpc("RenewLease", RenewLeaseRequest, LeaseReply, kind=MUTATION, cli=("lease", "renew"),
        help="extend an active lease"),
    Rpc("ReleaseLease", ReleaseLeaseRequest, LeaseReply, kind=MUTATION, cli=("lease", "release"),
        help="release an active or waiting lease"),
    Rpc("RevokeLease", RevokeLeaseRequest, LeaseReply, kind=MUTATION, cli=("lease", "revoke"),
        help="revoke a lease, recording why"),
    Rpc("RecordControl", RecordControlRequest, ControlReply, kind=MUTATION,
        cli=("control", "record"), help="record an idempotent control request", control=True),
    Rpc("AppendEvent", AppendRecordRequest, AppendReply, kind=MUTATION, cli=("event", "append"),
        help="append to a session's event stream", stream="events"),
    Rpc("AppendResult", AppendRecordRequest, AppendReply, kind=MUTATION, cli=("result", "append"),
        help="append to a session's result stream", stream="results"),
    Rpc("QuarantineSession", QuarantineSessionRequest, QuarantineReply, kind=MUTATION,
        cli=("quarantine", "session"), help="mark a session failed until the quarantine is cleared"),
    Rpc("ClearQuarantine", ClearQuarantineRequest, QuarantineReply, kind=MUTATION,
        cli=("quarantine", "clear"), help="clear a quarantine once it is safe"),
    Rpc("Recover", RecoverRequest, RecoverReply, kind=READ, cli=("recover",),
        help="classify each session and name the command to run next"),
    Rpc("RepairSession", RepairSessionRequest, RepairReply, kind=MUTATION, cli=("repair",),
        help="repair a failed session: fresh scratch and process, its thread resumed, else a "
        "replacement (dry run unless --apply)", runtime=True),
    Rpc("GetStatus", GetStatusRequest, StatusReply, kind=READ, cli=("status",),
        help="the relay projection: health, counts, runtime, warnings", get="status"),
    Rpc("ListProfiles", ListProfilesRequest, ListProfilesReply, kind=READ,
        cli=("profile", "list"), help="list provider profiles", get="profiles"),
    Rpc("ListSessions", ListSessionsRequest, ListSessionsReply, kind=READ,
        cli=("session", "list"), help="list managed sessions", get="sessions"),
    Rpc("ListLeases", ListLeasesRequest, ListLeasesReply, kind=READ, cli=("lease", "list"),
        help="list leases", get="leases"),
    Rpc("ListEvents", ListRecordsRequest, ListRecordsReply, kind=READ, cli=("event", "list"),
        help="list a session's events after a cursor", stream="events", get="events"),
    Rpc("ListResults", ListRecordsRequest, ListRecordsReply, kind=READ, cli=("result", "list"),
        help="list a session's results after a cursor", stream="results", get="results"),
    Rpc("StartTurn", StartTurnRequest, TurnReply, kind=MUTATION, cli=("turn", "start"),
        help="run a prompt on a leased session (answered once the provider took it)", runtime=True),
    Rpc("InterruptTurn", InterruptTurnRequest, TurnReply, kind=MUTATION, cli=("turn", "interrupt"),
        help="interrupt a running turn", runtime=True),
    Rpc("ResolveApproval", ResolveApprovalRequest, ApprovalReply, kind=MUTATION,
        cli=("turn", "approve"), help="answer an approval the agent asked for (accept or decline)",
        runtime=True),
    Rpc("GetTurn", GetTurnRequest, TurnReply, kind=READ, cli=("turn", "show"), help="one turn"),
    Rpc("ListTurns", ListTurnsRequest, ListTurnsReply, kind=READ, cli=("turn", "list"),
        help="list turns (by session, task_ref, state)", get="turns"),
    Rpc("ListTasks", ListTasksRequest, ListTasksReply, kind=READ, cli=("task", "list"),
        help="turns grouped by task_ref (read-only)", get="tasks"),
    Rpc("WatchEvents", WatchRecordsRequest, StreamRecord, kind=READ, cardinality=SERVER_STREAM,
        cli=("event", "watch"), help="follow event streams live, resuming after an id",
        stream="events", watch="stream=events"),
    Rpc("WatchResults", WatchRecordsRequest, StreamRecord, kind=READ, cardinality=SERVER_STREAM,
        cli=("result", "watch"), help="follow result streams live, resuming after an id",
        stream="results", watch="stream=results"),
    Rpc("WatchFeed", WatchFeedRequest, FeedNotice, kind=READ, cardinality=SERVER_STREAM,
        cli=("feed", "watch"), help="follow the relay feed (lease, quarantine, runtime notices)",
        watch="feed=relay"),
)

RPC_BY_NAME: Final = {rpc.name: rpc for rpc in RPCS}
#: A session stream -> the read row that lists it (where a watch pins "from now").
RPC_LISTING: Final = {rpc.stream: rpc for rpc in RPCS
                       if rpc.stream and not rpc.mutates and not rpc.streams}
#: A server stream's selector (``stream=events``) -> its row.
RPC_BY_WATCH: Final = {rpc.watch: rpc for rpc in RPCS if rpc.watch}


def watch_rpc(selector: Any) -> Rpc:
    """The server-stream row an SSE query or a ``subscribe`` frame selects:
    ``feed=...`` if given, else ``stream=...`` (``events`` by default)."""
    if selector.get("feed"):
        rpc = RPC_BY_WATCH.get(f"feed={selector['feed']}")
        if rpc is None:
            raise InvalidArgument("feed must be 'relay'", hint="?feed=relay")
        return rpc
    rpc = RPC_BY_WATCH.get(f"stream={selector.get('stream') or 'events'}")
    if rpc is None:
        raise InvalidArgument("stream must be events or results", hint="?stream=events|results")
    return rpc
#: The read routes ``GET /api/relay/<get>`` -> their rows.
RPC_BY_GET: Final = {rpc.get: rpc for rpc in RPCS if rpc.get}


################################################################
# Binary protobuf codec (application/proto, loaded on first use)
################################################################

# Connect's binary codec, for clients left at their default (``buf curl``,
# connect-es, the Python ``connectrpc`` client).  The attrs messages and their
# JSON stay the one model: a binary message is converted to that JSON and back
# by the protobuf runtime's json_format, so both codecs pass through the same
# ``from_json`` checks.  The classes are built from specs/relay.proto's
# descriptor, embedded at the end of this section by scripts/gen_proto.py (a
# test fails when it is stale), so no generated module and no protoc are needed
# at run time.  google.protobuf is imported on first use only: ``import
# relay_client`` and ``python -m relay status`` never pay for it.
#
# Where proto JSON and the relay's JSON differ, the relay's wins: 64-bit
# integers (proto JSON strings) become numbers, and a google.protobuf.Value
# number (always a double on the wire) that is integral becomes an integer, as
# the same value sent as JSON would be.

PROTO_PACKAGE: Final = "relay.v1"
_WELL_KNOWN_JSON: Final = frozenset({"google.protobuf.Value", "google.protobuf.Struct",
                                     "google.protobuf.ListValue"})
_PROTO_CLASSES: dict[str, type] = {}
_EXACT_DOUBLE: Final = 2**53  # integers up to this survive a double unchanged


def proto_class(name: str) -> type:
    """The protobuf message class of message ``name`` (e.g. ``"LeaseReply"``)."""
    cls = _PROTO_CLASSES.get(name)
    if cls is None:
        if not _PROTO_CLASSES:
            _load_proto_classes()
        cls = _PROTO_CLASSES[name]
    return cls


def _load_proto_classes() -> None:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

    # A pool of our own: a test or an application that imports another
    # rendering of relay.proto into the default pool cannot collide with it.
    pool = descriptor_pool.DescriptorPool()
    struct_file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_file)
    pool.Add(struct_file)
    file = pool.Add(descriptor_pb2.FileDescriptorProto.FromString(_RELAY_PROTO_DESCRIPTOR))
    for name, desc in file.message_types_by_name.items():
        _PROTO_CLASSES[name] = message_factory.GetMessageClass(desc)


def proto_to_json(name: str, data: bytes, *, defaults: bool = False) -> dict[str, Any]:
    """Binary message ``name`` -> the relay's JSON form.  Malformed bytes are
    ``invalid_argument``.  ``defaults`` writes fields left at their default."""
    from google.protobuf import json_format, message

    cls = proto_class(name)
    try:
        msg = cls.FromString(data)
    except message.DecodeError as exc:
        raise InvalidArgument(f"request body is not a valid {PROTO_PACKAGE}.{name}: {exc}",
                              hint="send the binary form of the message in specs/relay.proto") from None
    try:
        obj = json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=defaults)
    except json_format.SerializeToJsonError as exc:  # a Value holding NaN or an infinity
        raise InvalidArgument(f"request body is not valid JSON data: {exc}",
                              hint="send finite numbers only, or the value as a string") from None
    return _relay_json(cls.DESCRIPTOR, obj)


def json_to_proto(name: str, obj: dict[str, Any]) -> bytes:
    """The relay's JSON form of message ``name`` -> its binary form; a value
    the binary form cannot carry is ``failed_precondition``."""
    from google.protobuf import json_format

    try:
        msg = json_format.ParseDict(obj, proto_class(name)(), ignore_unknown_fields=False)
    except (OverflowError, json_format.ParseError) as exc:
        raise FailedPrecondition(f"the reply holds a value the binary codec cannot carry: {exc}",
                                 hint="ask with Content-Type: application/json") from None
    return msg.SerializeToString()


def _relay_json(desc: Any, obj: dict[str, Any]) -> dict[str, Any]:
    for field in desc.fields:
        if field.name not in obj:
            continue
        sub, value = field.message_type, obj[field.name]
        if sub is not None and sub.full_name in _WELL_KNOWN_JSON:
            obj[field.name] = _integral(value)  # any JSON, repeated or not
            continue
        if sub is not None:
            convert: Any = lambda item, sub=sub: _relay_json(sub, item)  # noqa: E731
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            convert = int
        else:
            continue
        obj[field.name] = [convert(v) for v in value] if isinstance(value, list) else convert(value)
    return obj


def _integral(value: Any) -> Any:
    if type(value) is float and value.is_integer() and abs(value) <= _EXACT_DOUBLE:
        return int(value)
    if type(value) is list:
        return [_integral(v) for v in value]
    if type(value) is dict:
        return {k: _integral(v) for k, v in value.items()}
    return value


# --- BEGIN GENERATED by scripts/gen_proto.py from specs/relay.proto; do not edit ---
_RELAY_PROTO_DESCRIPTOR: Final = (
    b'\n\x0brelay.proto\x12\x08relay.v1\x1a\x1cgoogle/protobuf/struct.proto"\xf2\x01\n\x16RegisterProfi'
    b'leRequest\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x1a\n\x08provider\x18\x02 \x01(\tR\x08pr'
    b'ovider\x12\x12\n\x04mode\x18\x03 \x01(\tR\x04mode\x12\x18\n\x07command\x18\x04 \x03(\tR\x07comman'
    b'd\x12\x1e\n\nrequest_id\x18\x05 \x01(\tR\nrequest_id\x12\x1c\n\tpool_size\x18\x06 \x01(\rR\tpool_'
    b'size\x12\x10\n\x03cwd\x18\x07 \x01(\tR\x03cwd\x12\x10\n\x03env\x18\x08 \x03(\tR\x03env\x12\x18\n'
    b'\x07options\x18\t \x03(\tR\x07options"\x8c\x01\n\x14CreateSessionRequest\x12\x18\n\x07profile\x18'
    b'\x01 \x01(\tR\x07profile\x12\x1e\n\nsession_id\x18\x02 \x01(\tR\nsession_id\x12\x1e\n\nrequest_id'
    b'\x18\x03 \x01(\tR\nrequest_id\x12\x1a\n\x08replaces\x18\x04 \x01(\tR\x08replaces"\x83\x01\n\x13Cl'
    b'oseSessionRequest\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12\x14\n\x05force\x18\x02 '
    b'\x01(\x08R\x05force\x12\x16\n\x06reason\x18\x03 \x01(\tR\x06reason\x12\x1e\n\nrequest_id\x18\x04 '
    b'\x01(\tR\nrequest_id"l\n\x14RepairSessionRequest\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_'
    b'id\x12\x14\n\x05apply\x18\x02 \x01(\x08R\x05apply\x12\x1e\n\nrequest_id\x18\x03 \x01(\tR\nrequest'
    b'_id"\xb7\x01\n\rBorrowRequest\x12\x16\n\x06holder\x18\x01 \x01(\tR\x06holder\x12\x18\n\x07profile'
    b'\x18\x02 \x01(\tR\x07profile\x12\x1e\n\nsession_id\x18\x03 \x01(\tR\nsession_id\x12\x12\n\x04mode'
    b'\x18\x04 \x01(\tR\x04mode\x12 \n\x0bttl_seconds\x18\x05 \x01(\rR\x0bttl_seconds\x12\x1e\n\nreques'
    b't_id\x18\x06 \x01(\tR\nrequest_id"\xa1\x01\n\x11GrantLeaseRequest\x12\x1e\n\nsession_id\x18\x01 '
    b'\x01(\tR\nsession_id\x12\x16\n\x06holder\x18\x02 \x01(\tR\x06holder\x12\x12\n\x04mode\x18\x03 '
    b'\x01(\tR\x04mode\x12 \n\x0bttl_seconds\x18\x04 \x01(\rR\x0bttl_seconds\x12\x1e\n\nrequest_id\x18'
    b'\x05 \x01(\tR\nrequest_id"w\n\x13ReleaseLeaseRequest\x12\x1a\n\x08lease_id\x18\x01 \x01(\tR\x08le'
    b'ase_id\x12\x1e\n\nrequest_id\x18\x02 \x01(\tR\nrequest_id\x12$\n\rfencing_token\x18\x03 \x01(\rR'
    b'\rfencing_token"\x97\x01\n\x11RenewLeaseRequest\x12\x1a\n\x08lease_id\x18\x01 \x01(\tR\x08lease_i'
    b'd\x12 \n\x0bttl_seconds\x18\x02 \x01(\rR\x0bttl_seconds\x12\x1e\n\nrequest_id\x18\x03 \x01(\tR\nr'
    b'equest_id\x12$\n\rfencing_token\x18\x04 \x01(\rR\rfencing_token"h\n\x12RevokeLeaseRequest\x12\x1a'
    b'\n\x08lease_id\x18\x01 \x01(\tR\x08lease_id\x12\x16\n\x06reason\x18\x02 \x01(\tR\x06reason\x12'
    b'\x1e\n\nrequest_id\x18\x03 \x01(\tR\nrequest_id"\x9c\x01\n\x14RecordControlRequest\x12\x1e\n\nreq'
    b'uest_id\x18\x01 \x01(\tR\nrequest_id\x12\x1e\n\nsession_id\x18\x02 \x01(\tR\nsession_id\x12\x12\n'
    b'\x04kind\x18\x03 \x01(\tR\x04kind\x120\n\x07payload\x18\x04 \x01(\x0b2\x16.google.protobuf.ValueR'
    b'\x07payload"\xbb\x01\n\x13AppendRecordRequest\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id'
    b'\x12\x12\n\x04kind\x18\x02 \x01(\tR\x04kind\x12*\n\x04data\x18\x03 \x01(\x0b2\x16.google.protobuf'
    b'.ValueR\x04data\x12\x1e\n\nrequest_id\x18\x04 \x01(\tR\nrequest_id\x12$\n\rfencing_token\x18\x05 '
    b'\x01(\rR\rfencing_token"r\n\x18QuarantineSessionRequest\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\ns'
    b'ession_id\x12\x16\n\x06reason\x18\x02 \x01(\tR\x06reason\x12\x1e\n\nrequest_id\x18\x03 \x01(\tR\n'
    b'request_id"X\n\x16ClearQuarantineRequest\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12'
    b'\x1e\n\nrequest_id\x18\x02 \x01(\tR\nrequest_id"0\n\x0eRecoverRequest\x12\x1e\n\nsession_id\x18'
    b'\x01 \x01(\tR\nsession_id"\x12\n\x10GetStatusRequest"\x15\n\x13ListProfilesRequest"E\n\x13ListSes'
    b'sionsRequest\x12\x18\n\x07profile\x18\x01 \x01(\tR\x07profile\x12\x14\n\x05state\x18\x02 \x01(\tR'
    b'\x05state"I\n\x11ListLeasesRequest\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12\x14\n'
    b'\x05state\x18\x02 \x01(\tR\x05state"`\n\x12ListRecordsRequest\x12\x1e\n\nsession_id\x18\x01 \x01('
    b'\tR\nsession_id\x12\x14\n\x05after\x18\x02 \x01(\rR\x05after\x12\x14\n\x05limit\x18\x03 \x01(\rR'
    b'\x05limit"\xc6\x01\n\x10StartTurnRequest\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12'
    b'\x1a\n\x08lease_id\x18\x02 \x01(\tR\x08lease_id\x12$\n\rfencing_token\x18\x03 \x01(\rR\rfencing_t'
    b'oken\x12\x14\n\x05input\x18\x04 \x01(\tR\x05input\x12\x1a\n\x08task_ref\x18\x05 \x01(\tR\x08task_'
    b'ref\x12\x1e\n\nrequest_id\x18\x06 \x01(\tR\nrequest_id"\x92\x01\n\x14InterruptTurnRequest\x12\x1e'
    b'\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12\x1a\n\x08lease_id\x18\x02 \x01(\tR\x08lease_id'
    b'\x12$\n\rfencing_token\x18\x03 \x01(\rR\rfencing_token\x12\x18\n\x07turn_id\x18\x04 \x01(\tR\x07t'
    b'urn_id"*\n\x0eGetTurnRequest\x12\x18\n\x07turn_id\x18\x01 \x01(\tR\x07turn_id"d\n\x10ListTurnsReq'
    b'uest\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12\x1a\n\x08task_ref\x18\x02 \x01(\tR'
    b'\x08task_ref\x12\x14\n\x05state\x18\x03 \x01(\tR\x05state".\n\x10ListTasksRequest\x12\x1a\n\x08ta'
    b'sk_ref\x18\x01 \x01(\tR\x08task_ref"\xb8\x01\n\x16ResolveApprovalRequest\x12\x1e\n\nsession_id'
    b'\x18\x01 \x01(\tR\nsession_id\x12\x1a\n\x08lease_id\x18\x02 \x01(\tR\x08lease_id\x12$\n\rfencing_'
    b'token\x18\x03 \x01(\rR\rfencing_token\x12 \n\x0bapproval_id\x18\x04 \x01(\tR\x0bapproval_id\x12'
    b'\x1a\n\x08decision\x18\x05 \x01(\tR\x08decision"[\n\x13WatchRecordsRequest\x12\x1e\n\nsession_id'
    b'\x18\x01 \x01(\tR\nsession_id\x12$\n\rlast_event_id\x18\x02 \x01(\tR\rlast_event_id"8\n\x10WatchF'
    b'eedRequest\x12$\n\rlast_event_id\x18\x01 \x01(\tR\rlast_event_id"q\n\x0cProfileReply\x12\x18\n'
    b'\x07outcome\x18\x01 \x01(\tR\x07outcome\x12\x1a\n\x08revision\x18\x02 \x01(\rR\x08revision\x12+\n'
    b'\x07profile\x18\x03 \x01(\x0b2\x11.relay.v1.ProfileR\x07profile"q\n\x0cSessionReply\x12\x18\n\x07'
    b'outcome\x18\x01 \x01(\tR\x07outcome\x12\x1a\n\x08revision\x18\x02 \x01(\rR\x08revision\x12+\n\x07'
    b'session\x18\x03 \x01(\x0b2\x11.relay.v1.SessionR\x07session"i\n\nLeaseReply\x12\x18\n\x07outcome'
    b'\x18\x01 \x01(\tR\x07outcome\x12\x1a\n\x08revision\x18\x02 \x01(\rR\x08revision\x12%\n\x05lease'
    b'\x18\x03 \x01(\x0b2\x0f.relay.v1.LeaseR\x05lease"\x88\x01\n\x0cControlReply\x12\x18\n\x07outcome'
    b'\x18\x01 \x01(\tR\x07outcome\x12\x1a\n\x08revision\x18\x02 \x01(\rR\x08revision\x12B\n\x0fcontrol'
    b'_request\x18\x03 \x01(\x0b2\x18.relay.v1.ControlRequestR\x0fcontrol_request"s\n\x0bAppendReply'
    b'\x12\x18\n\x07outcome\x18\x01 \x01(\tR\x07outcome\x12\x1a\n\x08revision\x18\x02 \x01(\rR\x08revis'
    b'ion\x12.\n\x06record\x18\x03 \x01(\x0b2\x16.relay.v1.StreamRecordR\x06record"\xab\x01\n\x0fQuaran'
    b'tineReply\x12\x18\n\x07outcome\x18\x01 \x01(\tR\x07outcome\x12\x1a\n\x08revision\x18\x02 \x01(\rR'
    b'\x08revision\x124\n\nquarantine\x18\x03 \x01(\x0b2\x14.relay.v1.QuarantineR\nquarantine\x12,\n'
    b'\x11revoked_lease_ids\x18\x04 \x03(\tR\x11revoked_lease_ids"P\n\nRepairStep\x12\x16\n\x06action'
    b'\x18\x01 \x01(\tR\x06action\x12\x16\n\x06reason\x18\x02 \x01(\tR\x06reason\x12\x12\n\x04done\x18'
    b'\x03 \x01(\x08R\x04done"\xe1\x01\n\x0bRepairReply\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession'
    b'_id\x12\x18\n\x07applied\x18\x02 \x01(\x08R\x07applied\x12\x18\n\x07outcome\x18\x03 \x01(\tR\x07o'
    b'utcome\x12*\n\x05steps\x18\x04 \x03(\x0b2\x14.relay.v1.RepairStepR\x05steps\x126\n\x16replacement'
    b'_session_id\x18\x05 \x01(\tR\x16replacement_session_id\x12\x1a\n\x08revision\x18\x06 \x01(\rR\x08'
    b'revision"\xa4\x01\n\x11CloseSessionReply\x12\x18\n\x07outcome\x18\x01 \x01(\tR\x07outcome\x12\x1a'
    b'\n\x08revision\x18\x02 \x01(\rR\x08revision\x12+\n\x07session\x18\x03 \x01(\x0b2\x11.relay.v1.Ses'
    b'sionR\x07session\x12,\n\x11revoked_lease_ids\x18\x04 \x03(\tR\x11revoked_lease_ids"Z\n\x0cRecover'
    b'Reply\x12\x1a\n\x08revision\x18\x01 \x01(\rR\x08revision\x12.\n\x08sessions\x18\x02 \x03(\x0b2'
    b'\x12.relay.v1.RecoveryR\x08sessions"\x94\x06\n\x0bStatusReply\x12\x16\n\x06status\x18\x01 \x01(\t'
    b'R\x06status\x12\x1e\n\nprojection\x18\x02 \x01(\tR\nprojection\x12\x1e\n\nrelay_mode\x18\x03 \x01'
    b'(\tR\nrelay_mode\x12 \n\x0bledger_path\x18\x04 \x01(\tR\x0bledger_path\x12$\n\rstate_present\x18'
    b'\x05 \x01(\x08R\rstate_present\x12 \n\x0btmp_present\x18\x06 \x01(\x08R\x0btmp_present\x12&\n\x0e'
    b'ledger_present\x18\x07 \x01(\x08R\x0eledger_present\x12,\n\x11durable_artifacts\x18\x08 \x01(\rR'
    b'\x11durable_artifacts\x12$\n\rtmp_artifacts\x18\t \x01(\rR\rtmp_artifacts\x12\x1a\n\x08revision'
    b'\x18\n \x01(\rR\x08revision\x12\x1a\n\x08profiles\x18\x0b \x01(\rR\x08profiles\x12\x1a\n\x08sessi'
    b'ons\x18\x0c \x01(\rR\x08sessions\x12$\n\ractive_leases\x18\r \x01(\rR\ractive_leases\x12&\n\x0ewa'
    b'iting_leases\x18\x0e \x01(\rR\x0ewaiting_leases\x12.\n\x12active_quarantines\x18\x0f \x01(\rR\x12'
    b'active_quarantines\x12*\n\x10control_requests\x18\x10 \x01(\rR\x10control_requests\x12\x16\n\x06e'
    b'vents\x18\x11 \x01(\rR\x06events\x12\x18\n\x07results\x18\x12 \x01(\rR\x07results\x12+\n\x07runti'
    b'me\x18\x13 \x01(\x0b2\x11.relay.v1.RuntimeR\x07runtime\x122\n\x08warnings\x18\x14 \x03(\x0b2\x16.'
    b'relay.v1.StateWarningR\x08warnings\x126\n\tproviders\x18\x15 \x03(\x0b2\x18.relay.v1.ProviderHeal'
    b'thR\tproviders"^\n\x11ListProfilesReply\x12\x1a\n\x08revision\x18\x01 \x01(\rR\x08revision\x12-\n'
    b'\x08profiles\x18\x02 \x03(\x0b2\x11.relay.v1.ProfileR\x08profiles"b\n\x11ListSessionsReply\x12'
    b'\x1a\n\x08revision\x18\x01 \x01(\rR\x08revision\x121\n\x08sessions\x18\x02 \x03(\x0b2\x15.relay.v'
    b'1.SessionViewR\x08sessions"V\n\x0fListLeasesReply\x12\x1a\n\x08revision\x18\x01 \x01(\rR\x08revis'
    b'ion\x12\'\n\x06leases\x18\x02 \x03(\x0b2\x0f.relay.v1.LeaseR\x06leases"\x80\x01\n\x10ListRecordsR'
    b'eply\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12\x1a\n\x08last_seq\x18\x02 \x01(\rR'
    b'\x08last_seq\x120\n\x07records\x18\x03 \x03(\x0b2\x16.relay.v1.StreamRecordR\x07records"/\n\tTurn'
    b'Reply\x12"\n\x04turn\x18\x01 \x01(\x0b2\x0e.relay.v1.TurnR\x04turn"R\n\x0eListTurnsReply\x12\x1a'
    b'\n\x08revision\x18\x01 \x01(\rR\x08revision\x12$\n\x05turns\x18\x02 \x03(\x0b2\x0e.relay.v1.TurnR'
    b'\x05turns"V\n\x0eListTasksReply\x12\x1a\n\x08revision\x18\x01 \x01(\rR\x08revision\x12(\n\x05task'
    b's\x18\x02 \x03(\x0b2\x12.relay.v1.TaskViewR\x05tasks"k\n\rApprovalReply\x12\x18\n\x07outcome\x18'
    b'\x01 \x01(\tR\x07outcome\x12\x1e\n\nsession_id\x18\x02 \x01(\tR\nsession_id\x12 \n\x0bapproval_id'
    b'\x18\x03 \x01(\tR\x0bapproval_id"\xe9\x01\n\x07Runtime\x12\x16\n\x06status\x18\x01 \x01(\tR\x06st'
    b'atus\x12\x1a\n\x08endpoint\x18\x02 \x01(\tR\x08endpoint\x12\x12\n\x04mode\x18\x03 \x01(\tR\x04mod'
    b'e\x12\x1a\n\x08token_id\x18\x04 \x01(\tR\x08token_id\x12\x10\n\x03pid\x18\x05 \x01(\rR\x03pid\x12'
    b'(\n\x0fbootstrapped_at\x18\x06 \x01(\tR\x0fbootstrapped_at\x12\x1c\n\tserved_at\x18\x07 \x01(\tR'
    b'\tserved_at\x12 \n\x0bshutdown_at\x18\x08 \x01(\tR\x0bshutdown_at"\xe3\x01\n\x07Profile\x12\x12\n'
    b'\x04name\x18\x01 \x01(\tR\x04name\x12\x1a\n\x08provider\x18\x02 \x01(\tR\x08provider\x12\x12\n'
    b'\x04mode\x18\x03 \x01(\tR\x04mode\x12\x18\n\x07command\x18\x04 \x03(\tR\x07command\x12\x1e\n\ncre'
    b'ated_at\x18\x05 \x01(\tR\ncreated_at\x12\x1c\n\tpool_size\x18\x06 \x01(\rR\tpool_size\x12\x10\n'
    b'\x03cwd\x18\x07 \x01(\tR\x03cwd\x12\x10\n\x03env\x18\x08 \x03(\tR\x03env\x12\x18\n\x07options\x18'
    b'\t \x03(\tR\x07options"\x99\x02\n\x07Session\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id'
    b'\x12\x18\n\x07profile\x18\x02 \x01(\tR\x07profile\x12\x1a\n\x08provider\x18\x03 \x01(\tR\x08provi'
    b'der\x12\x14\n\x05state\x18\x04 \x01(\tR\x05state\x12\x1e\n\ncreated_at\x18\x05 \x01(\tR\ncreated_'
    b'at\x12\x1e\n\nupdated_at\x18\x06 \x01(\tR\nupdated_at\x12$\n\rfencing_token\x18\x07 \x01(\rR\rfen'
    b'cing_token\x12\x1a\n\x08replaces\x18\x08 \x01(\tR\x08replaces\x12 \n\x0breplaced_by\x18\t \x01(\t'
    b'R\x0breplaced_by"\x9d\x03\n\x05Lease\x12\x1a\n\x08lease_id\x18\x01 \x01(\tR\x08lease_id\x12\x1e\n'
    b'\nsession_id\x18\x02 \x01(\tR\nsession_id\x12\x16\n\x06holder\x18\x03 \x01(\tR\x06holder\x12\x12'
    b'\n\x04mode\x18\x04 \x01(\tR\x04mode\x12\x14\n\x05state\x18\x05 \x01(\tR\x05state\x12$\n\rfencing_'
    b'token\x18\x06 \x01(\rR\rfencing_token\x12 \n\x0bttl_seconds\x18\x07 \x01(\rR\x0bttl_seconds\x12"'
    b'\n\x0crequested_at\x18\x08 \x01(\tR\x0crequested_at\x12\x1e\n\ngranted_at\x18\t \x01(\tR\ngranted'
    b'_at\x12\x1e\n\nexpires_at\x18\n \x01(\tR\nexpires_at\x12(\n\x0flast_renewed_at\x18\x0b \x01(\tR'
    b'\x0flast_renewed_at\x12\x1a\n\x08ended_at\x18\x0c \x01(\tR\x08ended_at\x12$\n\rrevoke_reason\x18'
    b'\r \x01(\tR\rrevoke_reason"\xe0\x01\n\x0eControlRequest\x12\x1e\n\nrequest_id\x18\x01 \x01(\tR\nr'
    b'equest_id\x12\x1e\n\nsession_id\x18\x02 \x01(\tR\nsession_id\x12\x12\n\x04kind\x18\x03 \x01(\tR'
    b'\x04kind\x120\n\x07payload\x18\x04 \x01(\x0b2\x16.google.protobuf.ValueR\x07payload\x12&\n\x0epay'
    b'load_digest\x18\x05 \x01(\tR\x0epayload_digest\x12 \n\x0brecorded_at\x18\x06 \x01(\tR\x0brecorded'
    b'_at"\xea\x01\n\nQuarantine\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12\x16\n\x06reason'
    b'\x18\x02 \x01(\tR\x06reason\x12\x14\n\x05state\x18\x03 \x01(\tR\x05state\x12&\n\x0equarantined_at'
    b'\x18\x04 \x01(\tR\x0equarantined_at\x12\x1e\n\ncleared_at\x18\x05 \x01(\tR\ncleared_at\x12\x12\n'
    b'\x04code\x18\x06 \x01(\tR\x04code\x122\n\x08evidence\x18\x07 \x01(\x0b2\x16.google.protobuf.Value'
    b'R\x08evidence"\\\n\nFeedNotice\x12\x0e\n\x02id\x18\x01 \x01(\tR\x02id\x12\x12\n\x04kind\x18\x02 '
    b'\x01(\tR\x04kind\x12*\n\x04data\x18\x03 \x01(\x0b2\x16.google.protobuf.ValueR\x04data"\xa2\x01\n'
    b'\x0cStreamRecord\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12\x10\n\x03seq\x18\x02 \x01'
    b'(\rR\x03seq\x12\x12\n\x04kind\x18\x03 \x01(\tR\x04kind\x12*\n\x04data\x18\x04 \x01(\x0b2\x16.goog'
    b'le.protobuf.ValueR\x04data\x12 \n\x0bappended_at\x18\x05 \x01(\tR\x0bappended_at"\x9a\x01\n\x0cSt'
    b'ateWarning\x12\x14\n\x05owner\x18\x01 \x01(\tR\x05owner\x12\x12\n\x04code\x18\x02 \x01(\tR\x04cod'
    b'e\x12\x12\n\x04path\x18\x03 \x01(\tR\x04path\x12\x18\n\x07message\x18\x04 \x01(\tR\x07message\x12'
    b'\x16\n\x06repair\x18\x05 \x01(\tR\x06repair\x12\x1a\n\x08severity\x18\x06 \x01(\tR\x08severity"'
    b'\xac\x01\n\x08Recovery\x12\x1e\n\nsession_id\x18\x01 \x01(\tR\nsession_id\x12&\n\x0eclassificatio'
    b'n\x18\x02 \x01(\tR\x0eclassification\x12\x16\n\x06reason\x18\x03 \x01(\tR\x06reason\x12"\n\x0cnex'
    b't_command\x18\x04 \x01(\tR\x0cnext_command\x12\x1c\n\tlease_ids\x18\x05 \x03(\tR\tlease_ids"\x84'
    b'\x03\n\x04Turn\x12\x18\n\x07turn_id\x18\x01 \x01(\tR\x07turn_id\x12\x1e\n\nsession_id\x18\x02 '
    b'\x01(\tR\nsession_id\x12\x1a\n\x08lease_id\x18\x03 \x01(\tR\x08lease_id\x12\x14\n\x05state\x18'
    b'\x04 \x01(\tR\x05state\x12\x14\n\x05input\x18\x05 \x01(\tR\x05input\x12 \n\x0boutput_text\x18\x06'
    b' \x01(\tR\x0boutput_text\x12\x14\n\x05error\x18\x07 \x01(\tR\x05error\x12\x1a\n\x08task_ref\x18'
    b'\x08 \x01(\tR\x08task_ref\x12\x1e\n\nstarted_at\x18\t \x01(\tR\nstarted_at\x12\x1a\n\x08ended_at'
    b'\x18\n \x01(\tR\x08ended_at\x12,\n\x05usage\x18\x0b \x01(\x0b2\x16.google.protobuf.ValueR\x05usag'
    b'e\x12\x1e\n\nrequest_id\x18\x0c \x01(\tR\nrequest_id\x12\x1c\n\tthread_id\x18\r \x01(\tR\tthread_'
    b'id"\x81\x01\n\x0bProcessInfo\x12\x10\n\x03pid\x18\x01 \x01(\rR\x03pid\x12\x14\n\x05state\x18\x02 '
    b'\x01(\tR\x05state\x12\x1e\n\nstarted_at\x18\x03 \x01(\tR\nstarted_at\x12*\n\x10provider_version'
    b'\x18\x04 \x01(\tR\x10provider_version"\xee\x03\n\x0eProviderHealth\x12\x18\n\x07profile\x18\x01 '
    b'\x01(\tR\x07profile\x12\x14\n\x05state\x18\x02 \x01(\tR\x05state\x12\x16\n\x06starts\x18\x03 \x01'
    b'(\rR\x06starts\x12\x14\n\x05exits\x18\x04 \x01(\rR\x05exits\x12\x18\n\x07crashes\x18\x05 \x01(\rR'
    b'\x07crashes\x12\x16\n\x06stalls\x18\x06 \x01(\rR\x06stalls\x12&\n\x0eprobe_failures\x18\x07 \x01('
    b'\rR\x0eprobe_failures\x12"\n\x0cfailed_turns\x18\x08 \x01(\rR\x0cfailed_turns\x12$\n\rtmp_corrupt'
    b'ed\x18\t \x01(\rR\rtmp_corrupted\x12&\n\x0estart_failures\x18\n \x01(\rR\x0estart_failures\x122\n'
    b'\x14consecutive_failures\x18\x0b \x01(\rR\x14consecutive_failures\x12\x1e\n\nlast_error\x18\x0c '
    b'\x01(\tR\nlast_error\x12$\n\rlast_error_at\x18\r \x01(\tR\rlast_error_at\x128\n\x0bquarantines'
    b'\x18\x0e \x01(\x0b2\x16.google.protobuf.ValueR\x0bquarantines"\xce\x02\n\x0bSessionView\x12\x1e\n'
    b'\nsession_id\x18\x01 \x01(\tR\nsession_id\x12\x18\n\x07profile\x18\x02 \x01(\tR\x07profile\x12'
    b'\x1a\n\x08provider\x18\x03 \x01(\tR\x08provider\x12\x14\n\x05state\x18\x04 \x01(\tR\x05state\x12'
    b'\x1e\n\ncreated_at\x18\x05 \x01(\tR\ncreated_at\x12\x1e\n\nupdated_at\x18\x06 \x01(\tR\nupdated_a'
    b't\x12$\n\rfencing_token\x18\x07 \x01(\rR\rfencing_token\x12/\n\x07process\x18\x08 \x01(\x0b2\x15.'
    b'relay.v1.ProcessInfoR\x07process\x12\x1a\n\x08replaces\x18\t \x01(\tR\x08replaces\x12 \n\x0brepla'
    b'ced_by\x18\n \x01(\tR\x0breplaced_by"\xbe\x01\n\x08TaskView\x12\x1a\n\x08task_ref\x18\x01 \x01(\t'
    b'R\x08task_ref\x12$\n\x05turns\x18\x02 \x03(\x0b2\x0e.relay.v1.TurnR\x05turns\x12\x18\n\x07running'
    b'\x18\x03 \x01(\rR\x07running\x12\x1c\n\tcompleted\x18\x04 \x01(\rR\tcompleted\x12\x16\n\x06failed'
    b'\x18\x05 \x01(\rR\x06failed\x12 \n\x0binterrupted\x18\x06 \x01(\rR\x0binterrupted2\xbd\x11\n\x05R'
    b'elay\x12K\n\x0fRegisterProfile\x12 .relay.v1.RegisterProfileRequest\x1a\x16.relay.v1.ProfileReply'
    b'\x12G\n\rCreateSession\x12\x1e.relay.v1.CreateSessionRequest\x1a\x16.relay.v1.SessionReply\x12J\n'
    b'\x0cCloseSession\x12\x1d.relay.v1.CloseSessionRequest\x1a\x1b.relay.v1.CloseSessionReply\x127\n'
    b'\x06Borrow\x12\x17.relay.v1.BorrowRequest\x1a\x14.relay.v1.LeaseReply\x12>\n\x07Release\x12\x1d.r'
    b'elay.v1.ReleaseLeaseRequest\x1a\x14.relay.v1.LeaseReply\x12?\n\nGrantLease\x12\x1b.relay.v1.Grant'
    b'LeaseRequest\x1a\x14.relay.v1.LeaseReply\x12?\n\nRenewLease\x12\x1b.relay.v1.RenewLeaseRequest'
    b'\x1a\x14.relay.v1.LeaseReply\x12C\n\x0cReleaseLease\x12\x1d.relay.v1.ReleaseLeaseRequest\x1a\x14.'
    b'relay.v1.LeaseReply\x12A\n\x0bRevokeLease\x12\x1c.relay.v1.RevokeLeaseRequest\x1a\x14.relay.v1.Le'
    b'aseReply\x12G\n\rRecordControl\x12\x1e.relay.v1.RecordControlRequest\x1a\x16.relay.v1.ControlRepl'
    b'y\x12C\n\x0bAppendEvent\x12\x1d.relay.v1.AppendRecordRequest\x1a\x15.relay.v1.AppendReply\x12D\n'
    b'\x0cAppendResult\x12\x1d.relay.v1.AppendRecordRequest\x1a\x15.relay.v1.AppendReply\x12R\n\x11Quar'
    b'antineSession\x12".relay.v1.QuarantineSessionRequest\x1a\x19.relay.v1.QuarantineReply\x12N\n\x0fC'
    b'learQuarantine\x12 .relay.v1.ClearQuarantineRequest\x1a\x19.relay.v1.QuarantineReply\x12@\n\x07Re'
    b'cover\x12\x18.relay.v1.RecoverRequest\x1a\x16.relay.v1.RecoverReply"\x03\x90\x02\x01\x12F\n\rRepa'
    b'irSession\x12\x1e.relay.v1.RepairSessionRequest\x1a\x15.relay.v1.RepairReply\x12C\n\tGetStatus'
    b'\x12\x1a.relay.v1.GetStatusRequest\x1a\x15.relay.v1.StatusReply"\x03\x90\x02\x01\x12O\n\x0cListPr'
    b'ofiles\x12\x1d.relay.v1.ListProfilesRequest\x1a\x1b.relay.v1.ListProfilesReply"\x03\x90\x02\x01'
    b'\x12O\n\x0cListSessions\x12\x1d.relay.v1.ListSessionsRequest\x1a\x1b.relay.v1.ListSessionsReply"'
    b'\x03\x90\x02\x01\x12I\n\nListLeases\x12\x1b.relay.v1.ListLeasesRequest\x1a\x19.relay.v1.ListLease'
    b'sReply"\x03\x90\x02\x01\x12K\n\nListEvents\x12\x1c.relay.v1.ListRecordsRequest\x1a\x1a.relay.v1.L'
    b'istRecordsReply"\x03\x90\x02\x01\x12L\n\x0bListResults\x12\x1c.relay.v1.ListRecordsRequest\x1a'
    b'\x1a.relay.v1.ListRecordsReply"\x03\x90\x02\x01\x12<\n\tStartTurn\x12\x1a.relay.v1.StartTurnReque'
    b'st\x1a\x13.relay.v1.TurnReply\x12D\n\rInterruptTurn\x12\x1e.relay.v1.InterruptTurnRequest\x1a\x13'
    b'.relay.v1.TurnReply\x12L\n\x0fResolveApproval\x12 .relay.v1.ResolveApprovalRequest\x1a\x17.relay.'
    b'v1.ApprovalReply\x12=\n\x07GetTurn\x12\x18.relay.v1.GetTurnRequest\x1a\x13.relay.v1.TurnReply"'
    b'\x03\x90\x02\x01\x12F\n\tListTurns\x12\x1a.relay.v1.ListTurnsRequest\x1a\x18.relay.v1.ListTurnsRe'
    b'ply"\x03\x90\x02\x01\x12F\n\tListTasks\x12\x1a.relay.v1.ListTasksRequest\x1a\x18.relay.v1.ListTas'
    b'ksReply"\x03\x90\x02\x01\x12K\n\x0bWatchEvents\x12\x1d.relay.v1.WatchRecordsRequest\x1a\x16.relay'
    b'.v1.StreamRecord"\x03\x90\x02\x010\x01\x12L\n\x0cWatchResults\x12\x1d.relay.v1.WatchRecordsReques'
    b't\x1a\x16.relay.v1.StreamRecord"\x03\x90\x02\x010\x01\x12D\n\tWatchFeed\x12\x1a.relay.v1.WatchFee'
    b'dRequest\x1a\x14.relay.v1.FeedNotice"\x03\x90\x02\x010\x01b\x06proto3'
)
# --- END GENERATED ---


################################################################
# Stubs (sync and trio)
################################################################

# One core builds requests and reads replies without doing I/O; RelayStub
# (httpx2.Client) and AsyncRelayStub (httpx2.AsyncClient on trio) only move
# bytes.  Both bind one method per RPC, named in snake_case, at class creation
# (as a generated ``*_pb2_grpc`` stub does).

DEFAULT_TIMEOUT: Final = 30.0  # seconds, per call (sync stub)
_RETRIES: Final = 3  # attempts after the first, for retry-safe failures
_BACKOFF: Final = 0.05  # seconds, doubled each attempt, capped at _BACKOFF_MAX
_BACKOFF_MAX: Final = 2.0
_HEARTBEAT_FRACTION: Final = 0.25  # heartbeat every ttl * this on a held lease
_CLEANUP_SECONDS: Final = 5.0  # bound on a shielded release after a borrowed block


def discover(url: str | None = None, token: str | None = None,
             root: str | os.PathLike[str] | None = None) -> tuple[str, str | None]:
    """Endpoint and token: arguments, then RELAY_URL / RELAY_TOKEN, then the
    workspace ledger's runtime endpoint (``root``/flow/state/relay)."""
    url = url or os.environ.get("RELAY_URL")
    token = token or os.environ.get("RELAY_TOKEN") or None
    if not url:
        path = os.path.join(root or os.environ.get("FLOW_ROOT") or ".", "flow", "state", "relay",
                            "relay-state.json")
        try:
            with open(path, "rb") as f:
                data = f.read()
            url = json.loads(data[: data.rfind(b',"checksum"')] + b"}")["runtime"]["endpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            url = ""
    if not url:
        raise Unavailable("no relay endpoint known",
                          hint="pass url=, set RELAY_URL, or start `python -m relay serve`")
    return url.rstrip("/"), token


def _request_of(rpc: Rpc, request: Any, fields: dict[str, Any]) -> Any:
    if request is None:
        request = rpc.request(**fields)
    elif fields:
        raise TypeError(f"{rpc.method}() takes a request message or keyword fields, not both")
    if not isinstance(request, rpc.request):
        raise TypeError(f"{rpc.method}() needs a {rpc.request.__name__}")
    if rpc.mutates and "request_id" in attrs.fields_dict(rpc.request) and not request.request_id:
        import uuid

        # One id per logical call: every retry carries it, so the relay
        # applies the call at most once however often the network fails.
        request = attrs.evolve(request, request_id=uuid.uuid4().hex)
    return request


@attrs.define(eq=False)
class _Core:
    """What both stubs share: URLs, headers, decoding; no I/O."""

    url: str
    token: str | None = attrs.field(default=None, repr=False)

    def headers(self, deadline: float | None = None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if deadline is not None and deadline != float("inf"):
            # A passed or cancelled trio deadline reads as -inf: send 1 ms and
            # let the caller's cancel scope stop the call at its first checkpoint.
            headers["Connect-Timeout-Ms"] = str(max(int(max(deadline, 0) * 1000), 1))
        return headers

    def body(self, request: Any) -> bytes:
        return json.dumps(to_json(request)).encode()

    def reply(self, rpc: Rpc, status: int, content: bytes) -> Any:
        try:
            doc = json.loads(content) if content else None
        except ValueError:
            doc = None
        if status != 200:
            raise RelayError.from_json(doc, http_status=status)
        return from_json(rpc.response, doc)

    @staticmethod
    def retryable(exc: BaseException) -> bool:
        import httpx2

        return isinstance(exc, (httpx2.TransportError, Unavailable)) and not isinstance(
            exc, httpx2.UnsupportedProtocol)

    def stream_url(self, rpc: Rpc, session: str | None) -> tuple[str, dict[str, str]]:
        """SSE ``/events`` and the query of a server-stream row (its selector)."""
        key, _, value = rpc.watch.partition("=")
        params = {key: value}
        if session:
            params["session"] = session
        return f"{self.url}/events", params

    def ws_url(self) -> str:
        return "ws" + self.url[4:] + "/ws"


def _backoff(attempt: int) -> float:
    return min(_BACKOFF * (2 ** attempt), _BACKOFF_MAX)


class _Watch:
    """Resume bookkeeping for a watched stream: skip what was seen, remember
    where to resume.  Shared by both flavours; ``rpc`` is its server-stream row."""

    def __init__(self, rpc: Rpc, session: str | None = None, after: int | None = None,
                 last_event_id: str = ""):
        self.rpc, self.session = rpc, session
        self.last: dict[str, int] = {session: after} if session and after is not None else {}
        self.last_id = last_event_id  # the feed's (and a caller's first) Last-Event-ID

    @property
    def needs_pin(self) -> bool:
        """A one-session watch "from now" pins now to a sequence number first."""
        return bool(self.rpc.stream and self.session and self.session not in self.last
                    and not self.last_id)

    def headers(self) -> dict[str, str]:
        if self.session and self.session in self.last:
            return {"Last-Event-ID": f"{self.session}:{self.last[self.session]}"}
        return {"Last-Event-ID": self.last_id} if self.last_id else {}

    def accept(self, event: Any) -> Any:
        """Decode one SSE event; None for ones already seen; raise on errors."""
        if event.event == "error":
            raise RelayError.from_json(event.json(), http_status=400)
        if not self.rpc.stream:
            if not event.id:
                return None
            self.last_id = event.id
            return FeedNotice(event.id, event.event, event.json())
        if event.event not in ("event", "result"):
            return None
        record = from_json(StreamRecord, event.json())
        if record.seq <= self.last.get(record.session_id, 0):
            return None
        self.last[record.session_id] = record.seq
        return record


class _AsyncWatch:
    """The trio watch iterator: an explicit state machine, not an async
    generator, so no ``yield`` ever sits inside the open SSE response's
    ``async with`` (a generator left suspended there is closed only by the
    garbage collector).  ``aclose`` closes the connection at once."""

    def __init__(self, stub: AsyncRelayStub, watch: _Watch):
        self._stub, self._watch = stub, watch
        self._connection: contextlib.AsyncExitStack | None = None
        self._events: Any = None
        self._failures = 0
        self._closed = False

    def __aiter__(self) -> _AsyncWatch:
        return self

    async def __anext__(self) -> Any:
        import httpx2

        while not self._closed:
            try:
                if self._events is None:
                    await self._connect()
                event = await anext(self._events)
                self._failures = 0
                record = self._watch.accept(event)
            except (StopAsyncIteration, httpx2.TransportError, ResourceExhausted):
                # The stream ended, dropped, or we fell behind: resume from the last record.
                await self._reconnect_later()
                continue
            if record is not None:
                return record
        raise StopAsyncIteration

    async def _connect(self) -> None:
        watch, stub = self._watch, self._stub
        if watch.needs_pin:
            lister = getattr(stub, RPC_LISTING[watch.rpc.stream].method)
            watch.last[watch.session] = (await lister(session_id=watch.session, limit=1)).last_seq
        url, params = stub._core.stream_url(watch.rpc, watch.session)
        headers = dict(stub._core.headers(), **watch.headers())
        async with contextlib.AsyncExitStack() as connection:
            source = await connection.enter_async_context(
                stub._http.sse(url, params=params, headers=headers))
            if source.response.status_code != 200:
                await source.response.aread()
                raise RelayError.from_json(source.response.json(),
                                           http_status=source.response.status_code)
            self._events = source.__aiter__()
            connection.push_async_callback(self._events.aclose)
            self._connection = connection.pop_all()

    async def _reconnect_later(self) -> None:
        import trio

        await self._disconnect()
        await trio.sleep(_backoff(self._failures))
        self._failures += 1

    async def _disconnect(self) -> None:
        connection, self._connection, self._events = self._connection, None, None
        if connection is not None:
            await connection.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._disconnect()


class RelayStub:
    """Blocking stub: one method per RPC, e.g. ``stub.borrow(profile=..., holder=...)``.

    Each method takes a request message or its fields as keywords, plus
    ``timeout=`` (seconds, a deadline the server also enforces), and returns
    the typed reply or raises a ``RelayError`` subclass.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 root: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT):
        import httpx2

        self._core = _Core(*discover(url, token, root))
        self._timeout = timeout
        self._http = httpx2.Client(timeout=timeout)

    def __repr__(self) -> str:
        return f"RelayStub({self._core.url!r})"  # never the token

    def __enter__(self) -> RelayStub:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, rpc: Rpc, request: Any, timeout: float | None) -> Any:
        import time

        timeout = self._timeout if timeout is None else timeout
        body = self._core.body(request)
        deadline = time.monotonic() + timeout
        for attempt in range(_RETRIES + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"{rpc.name} did not finish within {timeout} s")
            try:
                response = self._http.post(self._core.url + rpc.path, content=body,
                                           headers=self._core.headers(left), timeout=left)
                return self._core.reply(rpc, response.status_code, response.content)
            except Exception as exc:
                if attempt == _RETRIES or not self._core.retryable(exc):
                    raise _transport_error(exc) from exc
                time.sleep(min(_backoff(attempt), max(deadline - time.monotonic(), 0)))
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _watching(self, watch: _Watch) -> Iterator[Iterator[Any]]:
        records = self._watch(watch)
        try:
            yield records
        finally:
            records.close()  # the stream's connection goes now, not at garbage collection

    def _watch(self, watch: _Watch) -> Iterator[Any]:
        import time

        import httpx2

        if watch.needs_pin:
            # "From now" is pinned to a sequence number, so a drop before the
            # first record still resumes exactly there.
            lister = getattr(self, RPC_LISTING[watch.rpc.stream].method)
            watch.last[watch.session] = lister(session_id=watch.session, limit=1).last_seq
        url, params = self._core.stream_url(watch.rpc, watch.session)
        failures = 0
        while True:
            headers = dict(self._core.headers(), **watch.headers())
            try:
                with self._http.sse(url, params=params, headers=headers,
                                    timeout=httpx2.Timeout(self._timeout, read=None)) as source:
                    if source.response.status_code != 200:
                        source.response.read()
                        raise RelayError.from_json(source.response.json(),
                                                   http_status=source.response.status_code)
                    for event in source:
                        failures = 0
                        record = watch.accept(event)
                        if record is not None:
                            yield record
            except httpx2.TransportError:
                pass
            except ResourceExhausted:
                pass  # we fell behind: resume from the last record
            time.sleep(_backoff(failures))
            failures += 1

    @contextlib.contextmanager
    def borrowed(self, *, holder: str, profile: str = "", session_id: str = "",
                 mode: str = "exclusive-write", ttl_seconds: int = 0) -> Iterator[BorrowedLease]:
        """Borrow a session for the block; keep its lease renewed over the
        WebSocket channel; release it on exit, also on an exception.

        The block gets a ``HeldLease``: the lease's fields, plus ``lost`` (a
        ``threading.Event`` set as soon as the relay reports the lease lost or
        the keep-alive channel closes) and ``check()``, which raises
        ``LeaseLost`` once it is.  Nothing interrupts the block's thread: a
        long block calls ``check()`` between steps (or waits on ``lost``), and
        a block that ends normally on a lost lease still raises ``LeaseLost``
        on exit.  Writes that carry ``fencing_token`` to a resource that checks
        it are refused there by themselves."""
        reply = self.borrow(holder=holder, profile=profile, session_id=session_id, mode=mode,
                            ttl_seconds=ttl_seconds)
        lease = reply.lease
        if reply.outcome != "granted":
            with contextlib.suppress(FailedPrecondition, NotFound):
                self.release_lease(lease_id=lease.lease_id)
            raise _not_granted(lease, reply.outcome)
        held = BorrowedLease(self, lease)
        keeper = _SyncKeeper(self._core, held)
        try:
            keeper.start()
            yield held
        finally:
            if not keeper.stop():
                with contextlib.suppress(FailedPrecondition, NotFound):
                    self.release_lease(lease_id=lease.lease_id)
        held.check()  # reached only when the block ended normally


class AsyncRelayStub:
    """The trio flavour of ``RelayStub``: same methods, awaited.

    Deadlines come from the caller's cancel scopes (``trio.fail_after``) and are
    sent to the server as ``Connect-Timeout-Ms``.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 root: str | os.PathLike[str] | None = None):
        import httpx2

        self._core = _Core(*discover(url, token, root))
        self._http = httpx2.AsyncClient(timeout=None)

    def __repr__(self) -> str:
        return f"AsyncRelayStub({self._core.url!r})"

    async def __aenter__(self) -> AsyncRelayStub:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, rpc: Rpc, request: Any) -> Any:
        import trio

        body = self._core.body(request)
        for attempt in range(_RETRIES + 1):
            left = trio.current_effective_deadline() - trio.current_time()
            try:
                response = await self._http.post(self._core.url + rpc.path, content=body,
                                                 headers=self._core.headers(left))
                return self._core.reply(rpc, response.status_code, response.content)
            except Exception as exc:
                if attempt == _RETRIES or not self._core.retryable(exc):
                    raise _transport_error(exc) from exc
                await trio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _watching(self, watch: _Watch) -> AsyncIterator[AsyncIterator[Any]]:
        records = _AsyncWatch(self, watch)
        try:
            yield records
        finally:
            await records.aclose()

    @contextlib.asynccontextmanager
    async def borrowed(self, *, holder: str, profile: str = "", session_id: str = "",
                       mode: str = "exclusive-write", ttl_seconds: int = 0
                       ) -> AsyncIterator[AsyncBorrowedLease]:
        """Borrow for the block, keep the lease alive over the WebSocket, and
        release on exit (also on exception or cancellation).  If the lease is
        lost, the block is cancelled and ``LeaseLost`` raised."""
        import trio

        reply = await self.borrow(holder=holder, profile=profile, session_id=session_id,
                                  mode=mode, ttl_seconds=ttl_seconds)
        lease = reply.lease
        if reply.outcome != "granted":
            with contextlib.suppress(FailedPrecondition, NotFound):
                await self.release_lease(lease_id=lease.lease_id)
            raise _not_granted(lease, reply.outcome)
        lost: list[LeaseLost] = []
        error: Exception | None = None
        try:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(_hold_lease, self._core, lease, lost, nursery.cancel_scope)
                    try:
                        yield AsyncBorrowedLease(self, lease)
                    except Exception as exc:
                        error = exc  # re-raised below as itself, not wrapped in the nursery's group
                    finally:
                        nursery.cancel_scope.cancel()
            except* Exception as group:  # the keep-alive channel never opened
                raise _keeper_failure(group.exceptions[0]) from None
        finally:
            if not lost:
                # Shielded (the block may be ending by cancellation) but bounded:
                # a relay that does not answer leaves the lease to expire.
                with trio.move_on_after(_CLEANUP_SECONDS, shield=True), contextlib.suppress(
                        FailedPrecondition, NotFound):
                    await self.release_lease(lease_id=lease.lease_id)
        if lost:
            raise lost[0]
        if error is not None:
            raise error


class HeldLease:
    """The lease a blocking ``borrowed`` block holds.

    Its ``Lease`` fields read through (``held.lease_id``, ``held.fencing_token``,
    ...; the message itself is ``held.lease``).  ``lost`` is a
    ``threading.Event`` the keeper thread sets when the lease is gone;
    ``check()`` raises ``LeaseLost`` from then on.  The trade-off against
    interrupting the block: a blocking call inside it runs to its end, so a
    block notices the loss at its next ``check()`` (or at its exit) and not at
    once -- but no exception ever lands in the middle of its own cleanup.
    """

    def __init__(self, lease: Lease):
        import threading

        self.lease = lease
        self.lost = threading.Event()
        self._why: LeaseLost | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "lease":  # not yet set: never recurse
            raise AttributeError(name)
        return getattr(self.lease, name)

    def __repr__(self) -> str:
        return f"HeldLease({self.lease!r}, lost={self.lost.is_set()})"

    def check(self) -> None:
        """Raise ``LeaseLost`` (saying why) if the lease has been lost."""
        if self.lost.is_set():
            why = self._why or LeaseLost()
            raise LeaseLost(why.message, hint=why.hint)

    def cancel(self) -> None:
        """``_hold_lease``'s "cancel the block", for a thread: mark the lease lost."""
        self.lost.set()


#: The event kinds that end a turn in the session's event stream.
TURN_END_KINDS: Final = ("turn.completed", "turn.failed", "turn.interrupted")


def _of_turn(record: StreamRecord, turn_id: str) -> bool:
    return isinstance(record.data, dict) and record.data.get("turn_id") == turn_id


class BorrowedLease(HeldLease):
    """What ``RelayStub.borrowed`` yields: a ``HeldLease`` (the lease's fields,
    ``lost`` and ``check()``) that also runs turns under the lease, the
    fencing token carried for the caller."""

    def __init__(self, stub: RelayStub, lease: Lease):
        super().__init__(lease)
        self.stub = stub

    def __repr__(self) -> str:
        return f"BorrowedLease({self.lease!r}, lost={self.lost.is_set()})"

    def start(self, prompt: str, *, task_ref: str = "") -> Turn:
        """Start a turn; returns it ``running`` once the provider took the input."""
        return self.stub.start_turn(session_id=self.lease.session_id, lease_id=self.lease.lease_id,
                                    fencing_token=self.lease.fencing_token, input=prompt,
                                    task_ref=task_ref).turn

    @contextlib.contextmanager
    def stream(self, prompt: str, *, task_ref: str = "") -> Iterator[Iterator[StreamRecord]]:
        """``with lease.stream("fix it") as events: for e in events`` -- the
        turn's events as they are committed, ending with its end event."""
        after = self.stub.list_events(session_id=self.lease.session_id, limit=1).last_seq
        turn = self.start(prompt, task_ref=task_ref)
        with self.stub.watch_events(self.lease.session_id, after=after) as records:
            def of_turn() -> Iterator[StreamRecord]:
                for record in records:
                    if _of_turn(record, turn.turn_id):
                        yield record
                        if record.kind in TURN_END_KINDS:
                            return
            yield of_turn()

    def run(self, prompt: str, *, task_ref: str = "") -> Turn:
        """Run a turn to its end; returns the turn (``state``, ``output_text``, ``error``)."""
        with self.stream(prompt, task_ref=task_ref) as events:
            for record in events:
                if record.kind in TURN_END_KINDS:
                    return self.stub.get_turn(turn_id=record.data["turn_id"]).turn
        raise Unavailable("the event stream ended before the turn did",
                          hint="read the turn with `python -m relay turn show TURN_ID`")


class AsyncBorrowedLease:
    """The trio flavour of ``BorrowedLease``: ``await lease.run(...)``, and
    ``async with lease.stream(...) as events: async for e in events``."""

    def __init__(self, stub: AsyncRelayStub, lease: Lease):
        self.stub, self.lease = stub, lease

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lease, name)

    def __repr__(self) -> str:
        return f"AsyncBorrowedLease({self.lease!r})"

    async def start(self, prompt: str, *, task_ref: str = "") -> Turn:
        return (await self.stub.start_turn(
            session_id=self.lease.session_id, lease_id=self.lease.lease_id,
            fencing_token=self.lease.fencing_token, input=prompt, task_ref=task_ref)).turn

    @contextlib.asynccontextmanager
    async def stream(self, prompt: str, *, task_ref: str = "") -> AsyncIterator[AsyncIterator[StreamRecord]]:
        after = (await self.stub.list_events(session_id=self.lease.session_id, limit=1)).last_seq
        turn = await self.start(prompt, task_ref=task_ref)
        async with self.stub.watch_events(self.lease.session_id, after=after) as records:
            yield _TurnEvents(records, turn.turn_id)

    async def run(self, prompt: str, *, task_ref: str = "") -> Turn:
        async with self.stream(prompt, task_ref=task_ref) as events:
            async for record in events:
                if record.kind in TURN_END_KINDS:
                    return (await self.stub.get_turn(turn_id=record.data["turn_id"])).turn
        raise Unavailable("the event stream ended before the turn did",
                          hint="read the turn with `python -m relay turn show TURN_ID`")


class _TurnEvents:
    """One turn's records of a watched event stream, ending with its end event
    (a plain async iterator, not a generator: nothing to finalize)."""

    def __init__(self, records: Any, turn_id: str):
        self.records, self.turn_id, self.done = records, turn_id, False

    def __aiter__(self) -> _TurnEvents:
        return self

    async def __anext__(self) -> StreamRecord:
        if self.done:
            raise StopAsyncIteration
        async for record in self.records:
            if _of_turn(record, self.turn_id):
                self.done = record.kind in TURN_END_KINDS
                return record
        raise StopAsyncIteration


@contextlib.asynccontextmanager
async def _open_websocket(core: _Core) -> AsyncIterator[Any]:
    """A trio-websocket client on ``/ws`` over a TCP stream closed here.

    trio-websocket 0.12 never closes the stream of a connection whose peer
    dropped without a close handshake (a relay that crashed): that socket
    would be left to the garbage collector."""
    from urllib.parse import urlsplit

    import trio
    import trio_websocket

    url = urlsplit(core.ws_url())
    headers = [(b"Authorization", f"Bearer {core.token}".encode())] if core.token else []
    stream = await trio.open_tcp_stream(url.hostname or "127.0.0.1", url.port or 80)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, url.netloc, url.path or "/", extra_headers=headers)
            try:
                yield ws
            finally:
                nursery.cancel_scope.cancel()
                await ws.aclose()
    finally:
        await stream.aclose()


async def _hold_lease(core: _Core, lease: Lease, lost: list[LeaseLost], block: Any,
                      *, task_status: Any) -> None:
    """Hold ``lease`` over the WebSocket channel: heartbeats keep the relay
    renewing it; a ``lease_lost`` frame cancels ``block`` and records why."""
    import trio
    from trio_websocket import ConnectionClosed

    async with _open_websocket(core) as ws:
        await ws.send_message(json.dumps({"type": "hold", "id": 0, "lease_id": lease.lease_id}))
        # Only a "held" answer means the relay renews the lease; anything else
        # and the block must not start.
        answer = json.loads(await ws.get_message())
        if answer.get("type") != "held":
            error = answer.get("error") if isinstance(answer.get("error"), dict) else None
            raise RelayError.from_json(error, http_status=400) if error else Unavailable(
                f"the relay did not agree to hold lease {lease.lease_id}: {answer}")
        task_status.started()
        interval = max(lease.ttl_seconds * _HEARTBEAT_FRACTION, 0.05)

        async def beat() -> None:
            while True:
                await trio.sleep(interval)
                await ws.send_message('{"type":"heartbeat"}')

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(beat)
                frame = await _lease_lost_frame(ws)
                nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            # The relay went away (crash, restart): nothing renews the lease
            # now, so the block must stop as if it were lost -- the sync keeper
            # would otherwise die silently and leave the block writing.
            lost.append(LeaseLost(
                f"lease {lease.lease_id} on {lease.session_id} can no longer be renewed: "
                "the keep-alive channel to the relay closed",
                hint="stop writing; borrow again to continue"))
            block.cancel()
        else:
            lost.append(LeaseLost(
                f"lease {lease.lease_id} on {lease.session_id} was lost "
                f"({frame.get('state')}{': ' + frame['reason'] if frame.get('reason') else ''})",
                hint="stop writing; borrow again to continue"))
            block.cancel()


async def _lease_lost_frame(ws: Any) -> dict[str, Any]:
    """Read the hold channel until the relay says the lease is lost."""
    while True:
        frame = json.loads(await ws.get_message())
        if frame.get("type") == "lease_lost":
            return frame


class _SyncKeeper:
    """Runs ``_hold_lease`` on its own trio loop in a thread for the sync stub."""

    def __init__(self, core: _Core, held: HeldLease):
        self.core, self.held = core, held
        self.lost: list[LeaseLost] = []
        self.failure: Exception | None = None  # the channel never opened
        self._token: Any = None
        self._scope: Any = None
        self._ready: Any = None
        self._thread: Any = None

    def start(self) -> None:
        import threading

        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-lease-keeper", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.failure is not None:  # never run the block unprotected
            raise _keeper_failure(self.failure) from self.failure

    def _run(self) -> None:
        import trio

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(_hold_lease, self.core, self.held.lease, self.lost, self)
                    self._ready.set()

        try:
            trio.run(main)
        except Exception as exc:
            self.failure = exc  # recorded before start() is woken to look at it
        finally:
            self._ready.set()

    def cancel(self) -> None:
        """Called by ``_hold_lease`` (in the keeper thread) when the lease is lost."""
        self.held._why = self.lost[0]
        self.held.cancel()

    def stop(self) -> bool:
        """Stop holding (idempotent); True if the lease was lost meanwhile."""
        import trio

        if self._thread.is_alive() and self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join()
        return bool(self.lost)


def _not_granted(lease: Lease, outcome: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"lease {lease.lease_id} on {lease.session_id} was {outcome}, not granted (readers hold "
        "the session); the waiting request was withdrawn",
        hint="retry later, or borrow with mode='shared-read'")


def _keeper_failure(exc: BaseException) -> RelayError:
    if isinstance(exc, RelayError):
        return exc
    return Unavailable(f"cannot open the lease keep-alive channel: {exc!r}",
                       hint="check that the relay serves /ws to this client")


def _transport_error(exc: BaseException) -> BaseException:
    """Map httpx2 failures to status-code errors; RelayErrors pass through."""
    import httpx2

    if isinstance(exc, RelayError):
        return exc
    if isinstance(exc, httpx2.TimeoutException):
        return DeadlineExceeded(f"the relay did not answer in time: {exc}")
    if isinstance(exc, httpx2.TransportError):
        return Unavailable(f"cannot reach the relay: {exc}",
                           hint="check the URL and that `python -m relay serve` is running")
    return exc


def _watch_of(rpc: Rpc, args: tuple[Any, ...], fields: dict[str, Any]) -> _Watch:
    """A stream method's arguments -> its watch: ``(session, after)`` for the
    record streams (``after`` a sequence number; None: from now), or
    ``last_event_id=`` (the feed's ``REVISION.INDEX``, or any id the stream sent);
    or the row's request message."""
    if len(args) == 1 and not fields and isinstance(args[0], rpc.request):
        request = args[0]
        return _Watch(rpc, getattr(request, "session_id", "") or None,
                      last_event_id=request.last_event_id)
    if rpc.stream:
        names = ("session", "after")
        given = dict(zip(names, args, strict=False)) | fields
    else:
        names, given = (), dict(fields)
    unknown = set(given) - {*names, "last_event_id"}
    if len(args) > len(names) or unknown:
        raise TypeError(f"{rpc.method}() takes {', '.join(names + ('last_event_id',))}")
    return _Watch(rpc, given.get("session"), given.get("after"), given.get("last_event_id") or "")


def _bind_stream_methods(rpc: Rpc) -> None:
    """A server-stream row: a context manager over its records (grpc's
    ``stub.Watch(request)`` iterator, but closed with its block)."""
    def sync_method(self: RelayStub, *args: Any, _rpc: Rpc = rpc, **fields: Any) -> Any:
        return self._watching(_watch_of(_rpc, args, fields))

    def async_method(self: AsyncRelayStub, *args: Any, _rpc: Rpc = rpc, **fields: Any) -> Any:
        return self._watching(_watch_of(_rpc, args, fields))

    usage = (f"``with stub.{rpc.method}(...) as records: for r in records`` (sync); "
             "``async with`` / ``async for`` (trio)")
    for cls, fn in ((RelayStub, sync_method), (AsyncRelayStub, async_method)):
        fn.__name__ = fn.__qualname__ = rpc.method
        fn.__doc__ = (f"{rpc.help}.\n\n{usage}: each a {rpc.response.__name__}.  Reconnects with "
                      "backoff after a drop, resuming after the last one seen (a record "
                      "stream needs its session to resume); never yields one twice.")
        setattr(cls, rpc.method, fn)


def _bind_stub_methods() -> None:
    for rpc in RPCS:
        if rpc.streams:
            _bind_stream_methods(rpc)
            continue
        def sync_method(self: RelayStub, request: Any = None, *, timeout: float | None = None,
                        _rpc: Rpc = rpc, **fields: Any) -> Any:
            return self._call(_rpc, _request_of(_rpc, request, fields), timeout)

        async def async_method(self: AsyncRelayStub, request: Any = None, *, _rpc: Rpc = rpc,
                               **fields: Any) -> Any:
            return await self._call(_rpc, _request_of(_rpc, request, fields))

        for cls, fn in ((RelayStub, sync_method), (AsyncRelayStub, async_method)):
            fn.__name__ = fn.__qualname__ = rpc.method
            fn.__doc__ = (f"{rpc.help}.\n\n``{rpc.path}``: takes a {rpc.request.__name__} "
                          f"(or its fields), returns a {rpc.response.__name__}.")
            setattr(cls, rpc.method, fn)


_bind_stub_methods()


################################################################
# CLI
################################################################

# ``python -m relay_client [--url URL] [--token-file PATH] METHOD [--field value ...]``
# calls any RPC and prints its reply as one JSON object; ``watch`` streams
# records as JSON lines.  Exit status: 0 done, 1 refused (with the error
# object), 2 usage error -- as the relay's own CLI.


def _int_arg(text: str) -> int:
    import argparse

    try:
        return parse_digits(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_arg(text: str) -> Any:
    """A JSON argument, as strict as the relay's own doors."""
    import argparse

    try:
        value = parse_json(text)
        check_json_value(value, "value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    except RelayError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return value


def _seconds_arg(text: str) -> float:
    """A positive number of seconds in plain decimal ("30", "2.5"): float()
    would also take "nan", "inf", "1e3" and "1_0"."""
    import argparse

    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", text) or float(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return float(text)


def _argv_arg(text: str) -> tuple[str, ...]:
    import shlex

    return tuple(shlex.split(text))


def _field_options(field: Any) -> tuple[str, list[str]]:
    """A request field's one spelling on both CLIs (its ``flag``, or its
    ``positional`` metavar) and the hidden aliases also taken: the field's
    own name as a flag (``--session-id``, ``--lease-id``), which
    ``relay_client`` used before the two CLIs agreed."""
    meta = field.metadata
    spelling = meta.get("flag") or meta["positional"]
    alias = "--" + field.name.replace("_", "-")
    return spelling, [alias] if alias != spelling else []


def add_request_arguments(parser: Any, request_type: type) -> None:
    """Add a request message's fields to a CLI (sub)parser, as both CLIs do:
    one option per field, spelled and typed by the field's metadata
    (``flag``/``positional``, ``choices``, ``json``, ``argv``, ``repeat``, ``help``)."""
    import argparse

    for field in attrs.fields(request_type):
        meta = field.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help"), "default": argparse.SUPPRESS}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("json"):
            kwargs["type"] = _json_arg
        elif meta.get("argv"):
            kwargs["type"] = _argv_arg
        elif meta.get("repeat"):  # --env A=1 --env B=2: one entry per use
            kwargs["action"] = "append"
        elif field.type in (int, "int"):
            kwargs["type"] = _int_arg
        elif field.type in (bool, "bool"):  # a switch: present is true
            kwargs["action"] = "store_true"
        spelling, aliases = _field_options(field)
        if "positional" in meta:
            # Optional in argparse's eyes so that the alias may stand in for
            # it; ``missing_arguments`` then asks for whichever is missing.
            parser.add_argument(field.name, metavar=spelling, nargs="?", **kwargs)
            for alias in aliases:
                parser.add_argument(alias, dest=field.name, **dict(kwargs, help=argparse.SUPPRESS))
            continue
        parser.add_argument(spelling, dest=field.name, required=field.default is attrs.NOTHING,
                            **kwargs)
        for alias in aliases:
            parser.add_argument(alias, dest=field.name, **dict(kwargs, help=argparse.SUPPRESS))


def missing_arguments(request_type: type, args: Any) -> list[str]:
    """The positional arguments a parsed command line lacks (their aliases
    make argparse treat them as optional)."""
    return [field.metadata["positional"] for field in attrs.fields(request_type)
            if "positional" in field.metadata and field.default is attrs.NOTHING
            and not hasattr(args, field.name)]


def request_from_arguments(parser: Any, rpc: Rpc, args: Any) -> Any:
    """The request message of a parsed command line (usage error if incomplete)."""
    missing = missing_arguments(rpc.request, args)
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    values = {f.name: getattr(args, f.name) for f in attrs.fields(rpc.request) if hasattr(args, f.name)}
    return rpc.request(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _build_cli() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m relay_client",
        description="Call a flow-relay RPC (or watch a stream) and print JSON.",
        epilog="Exit status: 0 done, 1 refused (error object on stdout), 2 usage error. "
               "The endpoint comes from --url, $RELAY_URL, or the workspace ledger (--root).")
    parser.add_argument("--url", help="relay endpoint, e.g. http://127.0.0.1:9876")
    parser.add_argument("--token-file", help="file holding the bearer token ($RELAY_TOKEN also works)")
    parser.add_argument("--root", help="workspace root, to find the endpoint in its ledger")
    parser.add_argument("--json", action="store_true", help="accepted for symmetry; output is JSON")
    parser.add_argument("--timeout", type=_seconds_arg, default=DEFAULT_TIMEOUT, help="seconds per call")
    sub = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    for rpc in RPCS:
        leaf = sub.add_parser(rpc.method, help=rpc.help, aliases=[rpc.name])
        add_request_arguments(leaf, rpc.request)
        leaf.set_defaults(rpc=rpc, leaf=leaf)
        if rpc.name == "Recover":  # Recover stays a read; --apply calls other RPCs
            leaf.add_argument("--apply", action="store_true",
                              help="perform what each classification calls for, step by step")
    watch = sub.add_parser("watch", help="stream a session's records as JSON lines")
    watch.add_argument("--session", help="session id (needed to resume after a drop)")
    watch.add_argument("--after", type=_int_arg, help="start after this sequence number")
    watch.add_argument("--results", action="store_true", help="the result stream, not events")
    watch.set_defaults(rpc=None)
    return parser


def apply_recovery(recoveries: tuple[Recovery, ...], sessions: dict[str, Any],
                   profiles: dict[str, Any], repair: Any, create: Any) -> list[dict[str, Any]]:
    """``recover --apply`` (both CLIs): what each session's classification
    calls for, as calls of ordinary RPCs, one step per session:
    ``quarantine_repair`` -> ``repair(session_id)`` (RepairSession, applied);
    ``replacement_start`` -> ``create(profile, session_id)`` (CreateSession
    replacing it) unless it was replaced already or its profile's pool holds
    ``pool_size`` ready sessions; ``resumable`` and ``healthy`` need nothing;
    ``lease_block`` is left alone: recover never revokes a live holder.
    ``sessions`` and ``profiles`` map ids to records (``state``, ``profile``,
    ``replaced_by``; ``pool_size``).  Each step: ``session_id``,
    ``classification``, ``action``, ``outcome`` (done | skipped | failed),
    ``reason``."""
    ready: dict[str, int] = {}
    for session in sessions.values():
        if session.state == "ready":
            ready[session.profile] = ready.get(session.profile, 0) + 1
    steps = []
    for rec in recoveries:
        session = sessions.get(rec.session_id)
        step = {"session_id": rec.session_id, "classification": rec.classification}
        try:
            step.update(_recovery_step(rec, session, profiles, ready, repair, create))
        except RelayError as exc:
            step.update(action=_RECOVERY_ACTIONS.get(rec.classification, "none"),
                        outcome="failed", reason=exc.message + (f"; next: {exc.hint}" if exc.hint else ""))
        steps.append(step)
    return steps


_RECOVERY_ACTIONS: Final = {"quarantine_repair": "repair", "replacement_start": "start_replacement",
                            "lease_block": "keep_lease", "resumable": "none", "healthy": "none"}


def _recovery_step(rec: Recovery, session: Any, profiles: dict[str, Any], ready: dict[str, int],
                   repair: Any, create: Any) -> dict[str, Any]:
    kind = rec.classification
    if kind == "quarantine_repair":
        reply = repair(rec.session_id)
        if reply.replacement_session_id:
            ready[session.profile] = ready.get(session.profile, 0) + 1
        why = "; ".join(f"{x.action}: {x.reason}" for x in reply.steps if x.done)
        return {"action": "repair", "outcome": "done" if reply.outcome in ("repaired", "replaced")
                else "failed", "reason": f"{reply.outcome}: {why}"}
    if kind == "replacement_start":
        if session.replaced_by:
            return {"action": "none", "outcome": "skipped",
                    "reason": f"already replaced by {session.replaced_by}"}
        profile = profiles.get(session.profile)
        if profile is not None and ready.get(profile.name, 0) >= profile.pool_size:
            return {"action": "none", "outcome": "skipped", "reason": f"the pool of {profile.name} "
                    f"already holds {ready[profile.name]} ready sessions (pool_size {profile.pool_size})"}
        reply = create(session.profile, rec.session_id)
        ready[session.profile] = ready.get(session.profile, 0) + 1
        return {"action": "start_replacement", "outcome": "done",
                "reason": f"session {reply.session.session_id} replaces it ({rec.reason})"}
    if kind == "lease_block":
        return {"action": "keep_lease", "outcome": "skipped", "reason": f"{rec.reason}: recover "
                f"never revokes a live holder; if it is gone: {rec.next_command}"}
    if kind == "resumable":
        return {"action": "none", "outcome": "skipped",
                "reason": f"{rec.reason}: nothing to do; {rec.next_command} continues it"}
    return {"action": "none", "outcome": "skipped", "reason": rec.reason}


def _recover_apply(stub: Any, request: Any) -> int:
    """``python -m relay_client recover --apply``: ``apply_recovery`` through the server."""
    recoveries = stub.recover(request).sessions
    sessions = {s.session_id: s for s in stub.list_sessions().sessions}
    profiles = {p.name: p for p in stub.list_profiles().profiles}
    steps = apply_recovery(
        recoveries, sessions, profiles,
        lambda sid: stub.repair_session(session_id=sid, apply=True),
        lambda profile, sid: stub.create_session(profile=profile, replaces=sid))
    after = stub.recover(request).sessions
    print(json.dumps({"applied": True, "steps": steps, "sessions": [to_json(r) for r in after]},
                     sort_keys=True))
    return 1 if any(step["outcome"] == "failed" for step in steps) else 0


def _print_stream(watching: Any) -> int:
    """Print a stream's messages as JSON lines until it is interrupted."""
    with watching as messages:
        for message in messages:
            print(json.dumps(to_json(message), sort_keys=True), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_cli().parse_args(argv)
    request = None if args.rpc is None else request_from_arguments(args.leaf, args.rpc, args)
    try:
        token = None
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        with RelayStub(args.url, token=token, root=args.root, timeout=args.timeout) as stub:
            if args.rpc is None:  # ``watch``: the record streams by sequence number
                rpc = RPC_BY_NAME["WatchResults" if args.results else "WatchEvents"]
                return _print_stream(getattr(stub, rpc.method)(args.session, args.after))
            if args.rpc.streams:
                return _print_stream(getattr(stub, args.rpc.method)(request))
            if getattr(args, "apply", False) and args.rpc.name == "Recover":
                return _recover_apply(stub, request)
            reply = getattr(stub, args.rpc.method)(request)
            print(json.dumps(to_json(reply), sort_keys=True))
            return 0
    except RelayError as exc:
        print(json.dumps({"error": exc.to_json()}, sort_keys=True))
        if not args.json:
            print(f"relay_client: {exc.message}" + (f"; next: {exc.hint}" if exc.hint else ""),
                  file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay_client: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
