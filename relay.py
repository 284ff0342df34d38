"""flow-relay: a single-host relay control plane for AI coding-agent sessions.

One module, read top to bottom; each section uses only those above it.
``grep -n -A1 '^#\\{64\\}' relay.py`` prints this table of contents:

    Fast read path (status before the heavy imports)
    Constants and logging
    Errors
    Configuration (flow/relay.toml)
    Ledger model
    Ledger store (lock, atomic write, failpoints, stream logs, archive)
    Domain operations (pure: ledger in, ledger and reply out)
    Projections (status, inspect, inventory, cleanup, recover)
    Commit (the one place mutations are applied and made durable)
    Event hub (fan-out)
    Provider wire protocols (sans-I/O: bytes in, events out)
    Provider settings (offline homes and environments; pure)
    Process supervisor (provider children: spawn, read, stop, reap)
    Runtime (pools, turns, approvals, hand-over)
    Supervision (ledger owner, heartbeat, subprocesses)
    Service (one method per RPC; no Quart imports)
    Dashboard (GET /)
    HTTP, SSE and WebSocket adapter (create_app)
    Serving
    The gate
    CLI

The live server (``python -m relay serve``) is a trio application whose
nursery tree is::

    serve()                       root nursery
    |-- ledger owner              group-commits mutations under the file lock
    |-- heartbeat nursery         lease-expiry reaper; ledger watcher
    |-- supervision nursery       the live runtime: pools, turns, hand-over
    |   `-- per provider process: stdout reader, stderr ring, reaper, and its
    |       watchdog (stall timer, liveness probe)
    `-- http nursery              hypercorn serving the quart-trio app:
                                  HTTP, SSE, WebSocket, Connect RPCs

Nothing at import time pulls in quart or hypercorn, and trio is loaded
lazily; ``python -m relay status`` runs in the first section and exits before
even attrs is imported, so it starts about as fast as Python itself.
"""

from __future__ import annotations

import json
import os
import sys
import time

try:  # the bare SHA-256 module loads in a fraction of hashlib's OpenSSL start-up
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - other builds
    from hashlib import sha256 as _sha256

################################################################
# Fast read path (status before the heavy imports)
################################################################

# ``python -m relay status`` is what operators and health checks run most, so
# it must cost little more than starting Python.  attrs alone costs more than
# that on a small machine, so this section uses only the standard library:
# it reads the ledger bytes, verifies their checksum, and builds the projection
# from plain JSON.  It trusts a ledger only when its checksum is the one the
# last writer recorded as validated (``flow/tmp/relay/ledger.validated``);
# anything else (absent memo, damage, a hand-edited file) falls through to the
# full path below, which validates with the typed model.  The memo also carries
# the writer's counts of that ledger (its tally), so while they hold the ledger
# is hashed but not parsed.  Both paths build the projection with
# ``tally_status``, so they cannot disagree.

PROJECTION = "relay_generated_state_v1"
OWNER = "relay"
LEDGER_REL = os.path.join("flow", "state", "relay", "relay-state.json")
MEMO_REL = os.path.join("flow", "tmp", "relay", "ledger.validated")
_CHECKSUM_TAIL = b',"checksum":"sha256:'
_LIVE = ("active", "waiting")


def iso(t: float) -> str:
    """Fixed-width UTC stamp (microseconds), so string order is time order."""
    micros = int(round(t * 1_000_000))
    secs, frac = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:06d}Z"


def split_checksum(data: bytes) -> tuple[bytes, bytes] | None:
    """(body, claimed hex digest) of ledger bytes, or None if the checksum is
    missing or wrong.  The body is the canonical JSON the digest covers."""
    claimed = verified_checksum(data)
    if claimed is None:
        return None
    return _checksummed_body(data), claimed


def _checksummed_body(data: bytes) -> bytes:
    """The canonical JSON a ledger's checksum covers (its bytes but the checksum member)."""
    return data[: data.rfind(_CHECKSUM_TAIL)] + b"}"


def verified_checksum(data: bytes) -> bytes | None:
    """The hex digest ledger bytes claim at their tail, if it is the SHA-256
    of the body it covers; None if missing or wrong.  The body is hashed
    where it lies (no 6 MB copy of it at 10,000 sessions)."""
    cut = data.rfind(_CHECKSUM_TAIL)
    if cut < 0 or not data.endswith(b'"}\n'):
        return None
    digest = _hasher(cut + 1)()
    digest.update(memoryview(data)[:cut])
    digest.update(b"}")
    claimed = data[cut + len(_CHECKSUM_TAIL) : -3]
    return claimed if digest.hexdigest().encode() == claimed else None  # integrity, not a secret


#: Above this size OpenSSL's SHA-256 (~5x faster) repays the ~10 ms of importing hashlib.
_BIG_LEDGER_BYTES = 512 * 1024


def _hasher(size: int):
    """SHA-256 for ``size`` bytes: OpenSSL's once it is loaded (the server's)
    or worth loading, else the bare module's."""
    if size < _BIG_LEDGER_BYTES and "hashlib" not in sys.modules:
        return _sha256
    import hashlib

    return hashlib.sha256


def _count_files(directory: str) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _runtime_warnings(runtime: dict) -> list[dict]:
    if runtime.get("status") == "serving" and runtime.get("pid") and not _pid_alive(runtime["pid"]):
        return [{
            "owner": OWNER, "code": "runtime_stale", "path": LEDGER_REL, "severity": "warning",
            "message": f"runtime says serving at {runtime['endpoint']} by pid {runtime['pid']}, "
                       "which is not running",
            "repair": "run `python -m relay shutdown` to record the stop, or `python -m relay serve`",
        }]
    return []


def _relay_health(doc: dict | None, warnings: list[dict]) -> str:
    """The relay's health (JSON ``relay_mode``): its lifecycle from the runtime
    status, or ``degraded`` over a damaged ledger."""
    if any(w["code"] == "ledger_invalid" for w in warnings):
        return "degraded"
    runtime_status = doc["runtime"]["status"] if doc else "absent"
    return {"absent": "unbootstrapped", "bootstrapped": "ready", "serving": "serving",
            "stopped": "stopped"}.get(runtime_status, "unknown")


_EMPTY_RUNTIME = {"status": "absent", "endpoint": "", "mode": "", "token_id": "", "pid": 0,
                  "bootstrapped_at": "", "served_at": "", "shutdown_at": ""}


def doc_tally(doc: dict, stamp: str) -> dict:
    """The counts ``status`` shows of a ledger document (plain JSON), its
    leases counted live as of ``stamp``."""
    live = [x["state"] for x in doc["leases"].values()
            if x["state"] in _LIVE and x["expires_at"] > stamp]
    return {
        "revision": doc["revision"],
        "profiles": len(doc["profiles"]),
        "sessions": len(doc["sessions"]),
        "active_leases": live.count("active"),
        "waiting_leases": live.count("waiting"),
        "active_quarantines": sum(1 for q in doc["quarantines"].values() if q["state"] == "active"),
        "control_requests": len(doc["control_requests"]),
        "events": sum(c["events"] for c in doc["cursors"].values()),
        "results": sum(c["results"] for c in doc["cursors"].values()),
        "runtime": doc["runtime"],
    }


_EMPTY_TALLY = {"revision": 0, "profiles": 0, "sessions": 0, "active_leases": 0, "waiting_leases": 0,
                "active_quarantines": 0, "control_requests": 0, "events": 0, "results": 0,
                "runtime": _EMPTY_RUNTIME}


def status_doc(root: str, doc: dict | None, warnings: list[dict], now: float) -> dict:
    """The relay projection over a validated ledger document (or None)."""
    return tally_status(root, doc_tally(doc, iso(now)) if doc is not None else None, warnings)


def tally_status(root: str, tally: dict | None, warnings: list[dict]) -> dict:
    """The relay projection from a ledger's counts (``doc_tally``; None: no ledger)."""
    if tally is not None:
        warnings = warnings + _runtime_warnings(tally["runtime"])
    view = tally or _EMPTY_TALLY
    state_dir = os.path.join(root, "flow", "state", "relay")
    tmp_dir = os.path.join(root, "flow", "tmp", "relay")
    return {
        "status": "fail" if any(w["severity"] == "error" for w in warnings) else "pass",
        "projection": PROJECTION,
        "relay_mode": _relay_health(tally, warnings),
        "ledger_path": LEDGER_REL,
        "state_present": os.path.isdir(state_dir),
        "tmp_present": os.path.isdir(tmp_dir),
        "ledger_present": os.path.exists(os.path.join(root, LEDGER_REL)),
        "durable_artifacts": _count_files(state_dir),
        "tmp_artifacts": _count_files(tmp_dir),
        **{k: view[k] for k in _TALLY_COUNTS},
        "runtime": dict(view["runtime"]),
        "warnings": warnings,
        "providers": [],  # the running server's observations; a ledger has none
    }


_TALLY_COUNTS = ("revision", "profiles", "sessions", "active_leases", "waiting_leases",
                 "active_quarantines", "control_requests", "events", "results")


def status_text(doc: dict) -> str:
    lines = [f"relay {doc['status']}: mode {doc['relay_mode']}, revision {doc['revision']}, "
             f"{doc['profiles']} profiles, {doc['sessions']} sessions, "
             f"{doc['active_leases']} active leases, {doc['active_quarantines']} quarantines, "
             f"{doc['events']} events, {doc['results']} results"]
    lines += [f"{w['severity']}: {w['path']}: {w['message']}; next: {w['repair']}"
              for w in doc["warnings"]]
    return "\n".join(lines)


JOURNAL_REL = os.path.join("flow", "state", "relay", "relay-state.journal")
#: The ledger's maps (each keyed by its records' ids); every other member is a scalar.
_LEDGER_MAPS = ("control_requests", "cursors", "leases", "profiles", "quarantines", "requests",
                "sessions", "tokens", "turns")


def journal_records(data: bytes, base: str, revision: int, loads=json.loads
                    ) -> tuple[list[tuple[dict, int]], int]:
    """The records of journal bytes that count on top of the checkpoint whose
    checksum is ``base`` (hex) at ``revision`` (each with the offset where it
    ends), and where the last one ends.

    A record is a line ``<crc32 8 hex> <JSON>\\n``; it counts when its CRC is
    good, its ``base`` is the checkpoint's checksum and its ``from`` is the
    revision the records before it reached.  The first that fails ends the
    journal: it and everything after it are a torn or stale tail, never read."""
    records: list[tuple[dict, int]] = []
    end = 0
    for body, line_end in _crc_lines(data):
        try:
            doc = loads(body)
            top = doc["top"]
            ok = (doc["base"] == base and type(doc["from"]) is int and doc["from"] == revision
                  and type(top) is dict
                  and type(top.get("revision")) is int and top["revision"] > revision
                  and type(doc["set"]) is dict and type(doc["del"]) is dict)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            ok = False
        if not ok:
            break
        revision, end = top["revision"], line_end
        records.append((doc, end))
    return records, end


def _crc_lines(data: bytes):
    """(body, where its line ends) of each line of journal bytes whose CRC is
    good, up to the first that is not (or a line not ended yet)."""
    import zlib

    end = 0
    while True:
        nl = data.find(b"\n", end)
        if nl < 0:
            return
        line = data[end : nl + 1]
        body = line[9:-1]
        if len(line) < 11 or line[8:9] != b" " or line[:8] != b"%08x" % zlib.crc32(body):
            return
        yield body, nl + 1
        end = nl + 1


def apply_journal_doc(doc: dict, records: list[dict]) -> dict:
    """A ledger document (plain JSON) with journal records applied in order."""
    for record in records:
        doc.update(record["top"])
        for name, entries in record["set"].items():
            doc[name] = {**doc[name], **entries}
        for name, keys in record["del"].items():
            gone = set(keys)
            doc[name] = {k: v for k, v in doc[name].items() if k not in gone}
    return doc


def _fast_status(argv: list[str]) -> int | None:
    """Answer ``status [--json] [--root DIR]`` without heavy imports, or return
    None to let the full CLI answer (any other command, or a ledger this path
    cannot vouch for)."""
    args, root, as_json = list(argv), os.environ.get("FLOW_ROOT") or ".", False
    if "--root" in args:
        i = args.index("--root")
        if i + 1 >= len(args):
            return None
        root = args[i + 1]
        del args[i : i + 2]
    if "--json" in args:
        args.remove("--json")
        as_json = True
    if args != ["status"]:
        return None
    out = _fast_status_doc(root, time.time())
    if out is None:
        return None
    sys.stdout.write((json.dumps(out, sort_keys=True) if as_json else status_text(out)) + "\n")
    return 0


def memo_bytes(checksum: bytes, journal_end: int, tally: dict) -> bytes:
    """The fast ``status`` memo: the checkpoint's checksum (64 hex), the
    length of journal the writer vouches for (16 digits), the writer's tally
    of the ledger they make (``ledger_tally``, with the checkpoint's layout
    when the writer knows it: ``memo_layout``; JSON padded with spaces to a
    multiple of 64 bytes, so its length seldom changes), and a CRC-32 of all
    that: a torn memo fails its CRC."""
    import zlib

    head = checksum + b" %016d " % journal_end + json.dumps(
        tally, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-(len(head) + 9) % 64)
    return head + b" %08x" % zlib.crc32(head)


def read_memo(memo: bytes) -> tuple[bytes, int, dict | None] | None:
    """(checksum, journal length vouched for, tally or None) of a memo, or
    None when it is not one.  A memo of a checksum alone (or a checksum and a
    length, as older writers left) vouches for them without a tally."""
    checksum, rest = memo[:64], memo[64:]
    if len(checksum) != 64:
        return None
    if not rest:
        return checksum, 0, None
    if rest[:1] != b" " or len(rest) < 17 or not rest[1:17].isdigit():
        return None
    end, rest = int(rest[1:17]), rest[17:]
    if not rest:
        return checksum, end, None
    doc = _memo_doc(rest, memo)
    if doc is None:
        return None
    try:
        tally = {k: doc[k] for k in (*_TALLY_COUNTS, "runtime", "soonest")}
    except (TypeError, KeyError):
        return None
    return checksum, end, tally


def _memo_doc(rest: bytes, memo: bytes) -> Any:
    """The JSON a memo carries after its checksum and length (``rest``), if its CRC holds."""
    import zlib

    if rest[:1] != b" " or rest[-9:-8] != b" " or rest[-8:] != b"%08x" % zlib.crc32(memo[:-9]):
        return None
    try:
        return json.loads(rest[1:-9])
    except ValueError:
        return None


def _tally_now(tally: dict | None, stamp: str, journal: bytes, checksum: bytes) -> dict | None:
    """A memo's tally when it is the ledger's as of ``stamp``: no active or
    waiting lease has expired by then, and the journal is exactly the records
    the memo vouches for, each with its CRC, the last one on this checkpoint
    and at the tally's revision."""
    if tally is None or (tally["soonest"] is not None and tally["soonest"] <= stamp):
        return None
    last, end = None, 0
    for line in _crc_lines(journal):
        last, end = line
    if end != len(journal):
        return None
    if last is not None:
        try:
            record = json.loads(last)
            if record["base"] != checksum.decode() or record["top"]["revision"] != tally["revision"]:
                return None
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None
    return tally


def _fast_status_doc(root: str, now: float) -> dict | None:
    """The projection ``status`` prints from the raw ledger bytes, or None when
    this path cannot vouch for them (the full, typed path answers then)."""
    try:
        with open(os.path.join(root, LEDGER_REL), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return status_doc(root, None, [], now)
    except OSError:
        return None
    claimed = verified_checksum(data)
    try:
        with open(os.path.join(root, MEMO_REL), "rb") as f:
            memo = read_memo(f.read())
    except OSError:
        return None
    if claimed is None or memo is None or claimed != memo[0]:
        return None
    checksum, vouched, tally = memo
    try:
        with open(os.path.join(root, JOURNAL_REL), "rb") as f:
            journal = f.read()
    except FileNotFoundError:
        journal = b""
    except OSError:
        return None
    # The tally answers when it still holds and the journal is exactly what
    # the memo vouches for; otherwise the document is parsed and counted.
    if len(journal) == vouched:
        tally = _tally_now(tally, iso(now), journal, checksum)
        if tally is not None:
            return tally_status(root, tally, [])
    doc = json.loads(_checksummed_body(data))
    records, end = journal_records(journal, checksum.decode(), doc["revision"])
    if end != vouched:
        return None
    doc = apply_journal_doc(doc, [record for record, _ in records])
    return status_doc(root, doc, [], now)


if __name__ == "__main__":
    _fast_exit = _fast_status(sys.argv[1:])
    if _fast_exit is not None:
        sys.exit(_fast_exit)
    # A CLI process imports and builds thousands of objects and then exits:
    # the ~30 young collections that would run meanwhile (4-7 ms of a
    # mutation) find next to nothing.  ``main`` turns collection back on for
    # any command but a one-commit or one-read RPC (``serve``, the gate, a
    # follow, a call to the running server, ...).
    import gc

    gc.disable()

# The full module: everything below may import attrs and relay_client.
import argparse  # noqa: E402
import array  # noqa: E402
import bisect  # noqa: E402
import codecs  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import ipaddress  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast  # noqa: E402

import relay_client as rc  # noqa: E402

#: attrs, with class building deferred to first use (see relay_client).
attrs = rc.attrs

if TYPE_CHECKING:  # trio itself loads lazily (see the event hub section)
    from trio import Nursery, TaskStatus  # noqa: ASYNC106 (the name trio is bound lazily below)
from relay_client import (  # noqa: E402
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RelayError,
    Unavailable,
    check_id,
    from_json,
    to_json,
)

__all__ = [
    "CLEANUP_SECONDS",
    "DASHBOARD_CSP",
    "DASHBOARD_CSS",
    "DASHBOARD_HTML",
    "DASHBOARD_JS",
    "FAILPOINTS",
    "GATE_CHECKS",
    "GRACEFUL_SECONDS",
    "JOURNAL_FAILPOINTS",
    "JOURNAL_NAME",
    "KIB",
    "LEDGER_REL",
    "LOG_FAILPOINTS",
    "LOG_LEVELS",
    "MEMO_REL",
    "PROJECTION",
    "REPLAY_CHUNK",
    "SCHEMA_ID",
    "STREAM_KINDS",
    "TEMP_PREFIX",
    "ClaudeProtocol",
    "CodexProtocol",
    "Config",
    "Ctx",
    "EventHub",
    "HubStatistics",
    "KimiProtocol",
    "Ledger",
    "LedgerInvalid",
    "LedgerOwner",
    "Metrics",
    "Mutation",
    "Operations",
    "OwnerStatistics",
    "ProviderEndpoint",
    "ProviderProcess",
    "ReadView",
    "Reads",
    "RequestRecord",
    "Runtime",
    "Server",
    "Service",
    "Store",
    "TokenRecord",
    "append_record",
    "apply_all",
    "bootstrap",
    "borrow",
    "build_parser",
    "cleanup_plan",
    "clear_quarantine",
    "commit",
    "compact",
    "create_app",
    "create_session",
    "create_token",
    "dashboard_overview",
    "dashboard_timeline",
    "decode_ledger",
    "decode_record",
    "doc_tally",
    "encode_ledger",
    "encode_record",
    "end_session",
    "expire_leases",
    "gate",
    "grant_lease",
    "inspect_relay",
    "inventory",
    "iso",
    "last_thread",
    "ledger_tally",
    "list_leases",
    "list_profiles",
    "list_records",
    "list_sessions",
    "live_leases",
    "load_config",
    "main",
    "memo_bytes",
    "operation",
    "parse_iso",
    "provider_endpoint",
    "provider_env",
    "provider_home_files",
    "quarantine",
    "quarantine_code",
    "quarantine_session",
    "read_memo",
    "read_rpc",
    "reader",
    "rebuild_scratch",
    "record_control",
    "recover",
    "register_profile",
    "release_lease",
    "renew_lease",
    "repair_plan",
    "require_serving_allowed",
    "revoke_lease",
    "revoke_token",
    "rotate_token",
    "rpc_description",
    "rpc_mutation",
    "serve",
    "shutdown",
    "split_checksum",
    "status",
    "status_doc",
    "tally_status",
    "token_accepts",
    "token_digest",
]

################################################################
# Constants and logging
################################################################

SECONDS: Final = 1
MINUTES: Final = 60 * SECONDS
HOURS: Final = 60 * MINUTES
KIB: Final = 1024
MIB: Final = 1024 * KIB

SCHEMA_ID: Final = "flow-relay/relay-state/v1"

LEDGER_NAME: Final = "relay-state.json"
LOCK_NAME: Final = "relay-state.lock"
#: Under flow/tmp/relay: the record of provider process groups, and the
#: per-session scratch (``sessions/<session_id>/``) of the live runtime.
PROVIDERS_RECORD: Final = "providers.json"
SESSIONS_DIR: Final = "sessions"
MEMO_NAME: Final = "ledger.validated"
#: More than any memo's length (a tally and a layout: about a kilobyte).
MEMO_MAX_BYTES: Final = 64 * KIB
#: The commit journal: records of commits since the checkpoint (``relay-state.json``).
JOURNAL_NAME: Final = "relay-state.journal"
#: A journaling store writes a checkpoint instead of a record once the journal
#: would pass this many bytes (half the checkpoint's size, within these bounds).
#: The floor is the cap: a group commit of a few dozen lease changes writes a
#: record of tens of KiB, and a smaller floor checkpointed a small ledger on
#: almost every such commit.
JOURNAL_MIN_BYTES: Final = 256 * KIB
JOURNAL_MAX_BYTES: Final = 256 * KIB
#: A store that does not journal (a CLI process) commits by a journal record
#: too once the checkpoint is this big (rewriting a 6.6 MB checkpoint for one
#: event cost a CLI append at 10,000 sessions most of its time; below this
#: size a rewrite costs about what an append does), while the journal stays
#: within ``CLI_JOURNAL_BYTES``: a smaller bound than the server's, because a
#: CLI process reads and applies every record of it.
CLI_JOURNAL_CHECKPOINT_BYTES: Final = 256 * KIB
CLI_JOURNAL_BYTES: Final = 32 * KIB
#: How long the state directory must have been unchanged before a sweep of it
#: may be skipped: more than any file system's timestamp granularity, so a
#: temp file made after that sweep gets a later mtime (``sweep_orphan_temps``).
SWEEP_SETTLED_NS = 20_000_000
#: A map with at most this many entries in both ledgers is diffed key by key
#: when it was not made by ``_put`` (compaction, expiry): bigger ones checkpoint.
JOURNAL_DIFF_ENTRIES: Final = 256
#: The ledger's last bytes: `"sha256:<64 hex>"}` and a newline.
CHECKSUM_TAIL_BYTES: Final = 72
TEMP_PREFIX: Final = ".relay-state.json.tmp."
STREAMS_DIR: Final = "streams"
ARCHIVE_DIR: Final = "archive"
SET_ASIDE_DIR: Final = "set-aside"
#: The session streams: those the rows of rc.RPCS append to and list.
STREAM_KINDS: Final = tuple(dict.fromkeys(rpc.stream for rpc in rc.RPCS if rpc.stream))
REQUESTS_DIR: Final = "requests"
#: Shard files per bucket of the request log (a key's shard: its SHA-256's first byte mod this).
REQUEST_SHARDS: Final = 16
#: Buckets per retention window: a bucket is deleted whole once its end is a
#: retention window old, so a key lives between 1 and 1 + 1/24 windows.
REQUEST_BUCKETS_PER_RETENTION: Final = 24
#: The request-log key of a RecordControl call (``/`` is never in an id).
CONTROL_KEY_PREFIX: Final = "control/"

#: Allocations between young-generation collections while serving (default 700).
GC_GEN0_THRESHOLD: Final = 20_000

#: The watcher re-reads the ledger at least this often, whatever stat says (seconds).
WATCH_FULL_SECONDS: Final = 1.0

#: Tries at locking a path that keeps being removed or replaced before giving up.
LOCK_ATTEMPTS: Final = 1000

#: Stream records read per chunk when replaying after a Last-Event-ID.
REPLAY_CHUNK: Final = 500

#: How long a stopping server waits for in-flight requests (seconds).
GRACEFUL_SECONDS: Final = 3.0

#: The bound on every shielded cleanup, e.g. releasing a disconnected hold (seconds).
CLEANUP_SECONDS: Final = 5.0

#: GIL switch interval while serving (seconds); see ``serve``.
SWITCH_INTERVAL: Final = 0.0005

#: How long a browser login (the ``POST /auth/session`` cookie) lasts (seconds).
SESSION_COOKIE_SECONDS: Final = 30 * MINUTES

#: The reconnection delay every SSE stream asks browsers for (milliseconds).
SSE_RETRY_MS: Final = 1000

#: The exit codes of the CLI.
EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2

FAILPOINTS: Final = (
    "after_lock",
    "after_temp_write",
    "after_temp_fsync",
    "after_rename",
    "after_dir_fsync",
    "before_ack",
)
#: The steps of a journal commit (a journaling store: the server's) and of a
#: checkpoint's cut of the journal; the same ``RELAY_FAILPOINT`` kills there.
JOURNAL_FAILPOINTS: Final = (
    "after_journal_write",
    "after_journal_fsync",
    "after_journal_cut",
)
#: The steps of a commit's stream-log appends: every touched log written, every
#: one synced (both before the journal record or the checkpoint).
LOG_FAILPOINTS: Final = (
    "after_logs_written",
    "after_logs_synced",
)


#: The levels of ``serve --log-level`` and ``[serve] log_level``.
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def _logger(area: str) -> Any:
    """The logger of one area: ``relay.store`` (ledger and stream I/O),
    ``relay.serve`` (the server), ``relay.gate``.  ``logging`` loads on the
    first record, so a CLI mutation never pays for it.  No record ever holds
    a raw token; tracebacks go to this log, never to a client."""
    import logging

    return logging.getLogger(f"relay.{area}")


def _configure_logging(level: str) -> None:
    """``serve``'s handler: one line per record on stderr (stdout is for results)."""
    import logging

    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="relay: %(name)s %(levelname)s: %(message)s")


def _failpoint(name: str) -> None:
    """``RELAY_FAILPOINT=<name>`` makes this process SIGKILL itself here.

    Used by the crash tests to stop a writer at each step of a durable write.
    """
    if os.environ.get("RELAY_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def parse_iso(stamp: str) -> float:
    from datetime import UTC, datetime

    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def _canonical(value: Any) -> bytes:
    # allow_nan=False: the last defence against writing NaN or an infinity,
    # which no strict JSON reader (ours included) would read back.
    return _CANONICAL.encode(value).encode()


#: What ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
#: allow_nan=False)`` uses, made once: dumps builds one per call, ~20% of
#: encoding a small record (and a first commit encodes every record).
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     allow_nan=False)


def _digest(value: Any) -> str:
    return _sha256(_canonical(value)).hexdigest()


################################################################
# Errors
################################################################

# The status codes and the error hierarchy live in relay_client (the generated
# "_pb2" of this service); this section only adds the relay's own helpers.


class LedgerInvalid(FailedPrecondition):
    """The ledger file does not parse or validate; mutations are refused."""


def _not_found(kind: str, ident: str, hint: str) -> NotFound:
    return NotFound(f"{kind} {ident!r} does not exist", hint=hint)


def _io_failure(what: str, exc: OSError, path: Path | str | None = None,
                outcome: str = "nothing was changed") -> Unavailable:
    """The one error for a disk operation that failed on the write path (and,
    in the CLI, on any path not foreseen).

    ``unavailable``: the disk, not the request, is at fault, and the same
    request succeeds once it is fixed.  One line names the errno and the path
    (the failing call's own, else ``path``), then what to do next.
    """
    name = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    where = exc.filename if isinstance(exc.filename, (str, bytes, os.PathLike)) else path
    text = (exc.strerror or str(exc) or "failed").lower()
    return Unavailable(
        f"could not {what}: {name}: {text}" + (f": {os.fsdecode(where)}" if where else "") + f"; {outcome}",
        hint=_DISK_HINTS.get(exc.errno, "check the disk (df -h, dmesg), then run the command again"),
    )


#: errno -> the next step for an operator, for the errors a disk gives most.
_DISK_HINTS: Final = {
    errno.EROFS: "remount the file system read-write (mount -o remount,rw), then run the command "
                 "again; `python -m relay status` shows the last committed state",
    errno.ENOSPC: "free disk space (df -h), then run the command again",
    errno.EDQUOT: "free space within the disk quota (quota -s), then run the command again",
    errno.EACCES: "check the owner and mode of the path (ls -l), then run the command again",
    errno.EPERM: "check the owner and mode of the path (ls -l), then run the command again",
}


################################################################
# Configuration (flow/relay.toml)
################################################################


@attrs.frozen
class Config:
    """Settings from ``flow/relay.toml``; every number carries its unit."""

    default_ttl_seconds: int = 5 * MINUTES
    max_ttl_seconds: int = 24 * HOURS
    control_request_retention_seconds: int = 24 * HOURS
    lease_retention_seconds: int = 1 * HOURS
    max_terminal_leases: int = 100
    request_retention_seconds: int = 24 * HOURS
    compact_interval_seconds: int = 1 * MINUTES
    max_control_payload_bytes: int = 4 * KIB
    max_control_requests: int = 100
    max_record_bytes: int = 64 * KIB
    host: str = "127.0.0.1"
    port: int = 9876
    max_body_bytes: int = 1 * MIB
    reaper_interval_seconds: float = 1.0
    sse_keepalive_seconds: float = 15.0
    watch_interval_seconds: float = 0.05
    subscriber_buffer: int = 256
    #: Host header names accepted besides the served address (``name`` or ``name:port``).
    allowed_hosts: tuple[str, ...] = ()
    #: Origins (``scheme://host[:port]``) besides the relay's own that may drive it.
    allowed_origins: tuple[str, ...] = ()
    #: Provider processes: how long each step of a stop may take, the
    #: handshake, a release's hand-over, an unanswered approval.
    stop_stdin_seconds: float = 2.0
    stop_term_seconds: float = 2.0
    stop_kill_seconds: float = 2.0
    startup_timeout_seconds: float = 10.0
    handover_timeout_seconds: float = 5.0
    approval_timeout_seconds: float = 60.0
    #: stderr lines kept per provider process (the newest).
    stderr_lines: int = 200
    #: Failure detection (specs/flow-runtime-contract.md, "Failure detection"):
    #: silence during a turn before the relay interrupts it, and how long the
    #: interrupt may take before the process is stopped (heartbeat_lost); the
    #: liveness probe's period and its answer's deadline (unresponsive); the
    #: consecutive start failures after which a profile is degraded.
    turn_stall_seconds: float = 120.0
    interrupt_grace_seconds: float = 10.0
    probe_interval_seconds: float = 30.0
    probe_timeout_seconds: float = 10.0
    degraded_after_failures: int = 5
    log_level: str = "info"


# Table key -> (section, toml key); one place names the file's layout.
_CONFIG_KEYS: Final = {
    "default_ttl_seconds": ("leases", "default_ttl_seconds"),
    "max_ttl_seconds": ("leases", "max_ttl_seconds"),
    "control_request_retention_seconds": ("ledger", "control_request_retention_seconds"),
    "lease_retention_seconds": ("ledger", "lease_retention_seconds"),
    "max_terminal_leases": ("ledger", "max_terminal_leases"),
    "request_retention_seconds": ("ledger", "request_retention_seconds"),
    "compact_interval_seconds": ("ledger", "compact_interval_seconds"),
    "max_control_payload_bytes": ("ledger", "max_control_payload_bytes"),
    "max_control_requests": ("ledger", "max_control_requests"),
    "max_record_bytes": ("streams", "max_record_bytes"),
    "host": ("serve", "host"),
    "port": ("serve", "port"),
    "max_body_bytes": ("serve", "max_body_bytes"),
    "reaper_interval_seconds": ("serve", "reaper_interval_seconds"),
    "sse_keepalive_seconds": ("serve", "sse_keepalive_seconds"),
    "watch_interval_seconds": ("serve", "watch_interval_seconds"),
    "subscriber_buffer": ("serve", "subscriber_buffer"),
    "allowed_hosts": ("serve", "allowed_hosts"),
    "allowed_origins": ("serve", "allowed_origins"),
    "stop_stdin_seconds": ("runtime", "stop_stdin_seconds"),
    "stop_term_seconds": ("runtime", "stop_term_seconds"),
    "stop_kill_seconds": ("runtime", "stop_kill_seconds"),
    "startup_timeout_seconds": ("runtime", "startup_timeout_seconds"),
    "handover_timeout_seconds": ("runtime", "handover_timeout_seconds"),
    "approval_timeout_seconds": ("runtime", "approval_timeout_seconds"),
    "stderr_lines": ("runtime", "stderr_lines"),
    "turn_stall_seconds": ("runtime", "turn_stall_seconds"),
    "interrupt_grace_seconds": ("runtime", "interrupt_grace_seconds"),
    "probe_interval_seconds": ("runtime", "probe_interval_seconds"),
    "probe_timeout_seconds": ("runtime", "probe_timeout_seconds"),
    "degraded_after_failures": ("runtime", "degraded_after_failures"),
    "log_level": ("serve", "log_level"),
}


def load_config(flow_dir: Path) -> Config:
    """Read ``relay.toml``, refusing unknown keys and wrong types loudly."""
    path = flow_dir / "relay.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    import tomllib

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid TOML: {exc}", hint=f"fix {path}") from None
    by_place = {place: name for name, place in _CONFIG_KEYS.items()}
    defaults = Config()
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise InvalidArgument(f"{path}: [{section}] must be a table", hint=f"fix {path}")
        if section == "providers":
            _check_provider_tables(path, table)
            continue
        for key, value in table.items():
            name = by_place.get((section, key))
            if name is None:
                raise InvalidArgument(
                    f"{path}: unknown setting {section}.{key}",
                    hint="see specs/flow-relay-contract.md for the settings",
                )
            want = type(getattr(defaults, name))
            if want is tuple:
                values[name] = _config_names(path, section, key, value)
                continue
            ok = isinstance(value, want) and not isinstance(value, bool)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok or (isinstance(value, (int, float)) and value <= 0):
                raise InvalidArgument(
                    f"{path}: {section}.{key} must be a positive {want.__name__}",
                    hint=f"fix {path}",
                )
            values[name] = value
    if values.get("log_level", "info") not in LOG_LEVELS:
        raise InvalidArgument(f"{path}: serve.log_level must be one of {', '.join(LOG_LEVELS)}",
                              hint=f"fix {path}")
    return Config(**values)


#: What a ``[providers.<name>]`` table may set (``provider_endpoint`` reads it).
PROVIDER_KEYS: Final = ("base_url", "api_key_env", "model")


def _check_provider_tables(path: Path, table: dict[str, Any]) -> None:
    """``[providers.<name>]``: a known provider, string values of known keys
    (an API key itself is refused: only the name of its variable)."""
    for name, entry in table.items():
        if name not in rc.PROVIDERS or not isinstance(entry, dict):
            raise InvalidArgument(f"{path}: [providers.{name}] is not a provider table",
                                  hint=f"use one of {', '.join(f'[providers.{p}]' for p in rc.PROVIDERS)}")
        for key, value in entry.items():
            if key not in PROVIDER_KEYS or not isinstance(value, str):
                raise InvalidArgument(f"{path}: providers.{name}.{key} is not a provider setting",
                                      hint=f"set only {', '.join(PROVIDER_KEYS)} (strings); a key "
                                      "goes in the variable api_key_env names, never in the file")


def load_provider_settings(flow_dir: Path) -> dict[str, dict[str, Any]]:
    """The ``[providers.<name>]`` tables of ``relay.toml``: each provider's
    endpoint (``base_url``, ``api_key_env``, ``model``; see
    ``provider_endpoint``, which checks them when a process starts).  Never
    stored in the ledger; a key itself is never in the file, only the name of
    the variable that holds it."""
    import tomllib

    path = flow_dir / "relay.toml"
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return {}
    table = doc.get("providers")
    if not isinstance(table, dict):
        return {}
    _check_provider_tables(path, table)
    return table


def _config_names(path: Path, section: str, key: str, value: Any) -> tuple[str, ...]:
    """A list of host names or origins, lower-cased; an origin has no path."""
    if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
        raise InvalidArgument(f"{path}: {section}.{key} must be a list of non-empty strings",
                              hint=f"fix {path}")
    names = tuple(x.strip().lower().rstrip("/") for x in value)
    if key == "allowed_origins":
        for origin in names:
            if not re.fullmatch(r"https?://[^/?#@\s]+", origin):
                raise InvalidArgument(f"{path}: {section}.{key}: {origin!r} is not an origin",
                                      hint="write scheme://host[:port], e.g. http://localhost:3000")
    return names


################################################################
# Ledger model
################################################################


_TOKEN_STATES: Final = ("active", "rotated", "revoked")
#: The mutating RPCs whose ``request_id`` is an idempotency key: all but
#: RecordControl, whose request id is its control record's own key.
_IDEMPOTENT_METHODS: Final = tuple(r.name for r in rc.RPCS if r.mutates and not r.control)


@attrs.frozen
class TokenRecord:
    """A bearer token: only its SHA-256 digest is ever stored."""

    token_id: str = attrs.field(metadata=rc.IS_ID)
    digest: str = attrs.field(metadata=rc.IS_SHA256)
    state: str = attrs.field(default="active", metadata={"choices": _TOKEN_STATES})
    label: str = attrs.field(default="", metadata={"length": (0, 128)})
    created_at: str = attrs.field(default="", metadata=rc.IS_STAMP)
    grace_until: str = attrs.field(default="", metadata=rc.IS_STAMP)
    revoked_at: str = attrs.field(default="", metadata=rc.IS_STAMP)


@attrs.frozen
class RequestRecord:
    """An applied mutation's idempotency key, kept for a retention window so a
    retried call returns the first answer instead of applying twice."""

    method: str = attrs.field(metadata={"choices": _IDEMPOTENT_METHODS})
    digest: str = attrs.field(metadata=rc.IS_SHA256)
    #: Checked on read against ``method``'s reply message (``_check_replies``).
    reply: dict[str, Any]
    recorded_at: str = attrs.field(metadata={"pattern": rc.SET_STAMP_PATTERN})


#: A ledger's identity: 32 lowercase hex digits, or "" before its first write.
_LEDGER_ID: Final = re.compile(r"(?:[0-9a-f]{32})?")


@attrs.frozen
class RequestLogCursor:
    """How much of the current bucket of the request log is committed: the
    bucket's directory name and the committed length of each of its shard
    files (``REQUEST_SHARDS`` of them once the bucket has been written)."""

    bucket: str = ""
    shard_bytes: tuple[int, ...] = ()


@attrs.frozen
class Ledger:
    """The relay's durable truth: ``flow/state/relay/relay-state.json``."""

    schema: str = SCHEMA_ID
    #: 32 random hex digits minted with the ledger's first write and kept by
    #: every later one: a server notices a ledger that was replaced (state
    #: reset, a restored copy) by a change of identity ("" until first written).
    ledger_id: str = attrs.field(default="", metadata={"pattern": _LEDGER_ID})
    revision: int = attrs.field(default=0, metadata=rc.IS_COUNT)
    updated_at: str = attrs.field(default="", metadata=rc.IS_STAMP)
    compacted_at: str = attrs.field(default="", metadata=rc.IS_STAMP)
    runtime: rc.Runtime = rc.Runtime()
    profiles: dict[str, rc.Profile] = attrs.Factory(dict)
    sessions: dict[str, rc.Session] = attrs.Factory(dict)
    leases: dict[str, rc.Lease] = attrs.Factory(dict)
    control_requests: dict[str, rc.ControlRequest] = attrs.Factory(dict)
    cursors: dict[str, rc.Cursor] = attrs.Factory(dict)
    tokens: dict[str, TokenRecord] = attrs.Factory(dict)
    quarantines: dict[str, rc.Quarantine] = attrs.Factory(dict)
    requests: dict[str, RequestRecord] = attrs.Factory(dict)
    request_log: RequestLogCursor = RequestLogCursor()
    #: Turns run by the live runtime; terminal ones are archived like leases.
    turns: dict[str, rc.Turn] = attrs.Factory(dict)


def _put(mapping: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``mapping`` with ``key`` set: ledgers are values, never edited.  The
    result shares ``mapping``'s entries (a ``_Map``: O(sqrt N), not a copy).
    What was derived from ``mapping`` (see below) is carried over to it."""
    new = _Map.of(mapping, {key: value})
    old = mapping.get(key)
    # The encoded entries are not carried: a journal commit encodes only the
    # records it changed, and a checkpoint rebuilds them from cached fragments.
    new.derived = {kind: got.put(key, old, value) for kind, got in _derived_of(mapping).items()
                   if kind is not _Encoded}
    since = mapping.since if type(mapping) is _Map else None
    root, keys = since if since is not None else (mapping, frozenset())
    new.since = (root, keys | {key})
    return new


# -- derived data: indexes and encodings --------------------------------------------
#
# Lookups by session and by profile (Borrow, a grant's live leases, the
# compaction cap) would otherwise scan every lease, for every session (Borrow
# was quadratic), and every commit would re-encode every record.  What is
# derived from a ledger map (an index, its encoded entries) lives on the map
# object itself, a ``_Map``: never encoded, never edited once built, and gone
# with the map.  ``_put`` derives the copy's data from the original's in time
# proportional to the change; a map made another way (decoding, compaction,
# expiry, a test) gets it built on first use.  Plain dicts cannot carry
# attributes, so theirs sit in a small registry that holds the dict (its id
# cannot be reused while registered) and keeps only the most recent.
#
# -- persistent maps ------------------------------------------------------------------
#
# A commit that sets one lease must not copy a map of 10,000: a ``_Map`` is a
# base dict shared by every version made from it (never edited) plus its own
# changes over it, at most ``_overlay_limit`` keys (about sqrt N): a put copies
# those, and once they outgrow the limit the next version takes a flattened
# dict as its base (O(N), once per O(sqrt N) puts).  Reads are one or two dict
# lookups; iterating builds the version's whole dict once and keeps it.  Two
# versions on the same base differ at most in their changes' keys, which is
# how an index follows a map from one version to another (``_changed_keys``).

#: An overlay's value for a key deleted from its base.
_ABSENT: Final = object()
_MISSING: Final = object()


def _overlay_limit(size: int) -> int:
    """How many changed keys a ``_Map`` keeps over a base of ``size`` entries."""
    return max(32, math.isqrt(size))


class _Map(Mapping):
    """A ledger map as a persistent value (see above), with the data derived
    from it (kind -> value), and what it was made from by ``_put``: (that map,
    the keys set since), which lets a journal commit write only the records
    that changed (``_map_changes``).  Equal to a dict of the same entries, in
    the order a dict edited the same way would have."""

    __slots__ = ("base", "changes", "size", "flat", "derived", "since", "rebased", "log", "pos")

    def __init__(self, base: dict[str, Any] | None = None, changes: dict[str, Any] | None = None,
                 size: int | None = None, rebased: _View | None = None,
                 log: list[str] | None = None) -> None:
        self.base: dict[str, Any] = {} if base is None else base
        self.changes: dict[str, Any] = {} if changes is None else changes
        self.size = len(self.base) if size is None else size
        #: The version ``base`` was flattened from, (its base, its changes),
        #: kept by every version on this base: ``_changed_keys`` looks past it.
        self.rebased = rebased
        #: The keys set since ``base``, in order, up to ``pos``: a list shared
        #: by the versions of one line of puts (each extends it in place when
        #: it is the newest; a branch copies it), so that two versions on one
        #: list differ at most in the keys between their positions.
        self.log: list[str] = [] if log is None else log
        self.pos = len(self.log)
        #: The whole dict, once built (``base`` itself when nothing changed).
        self.flat: dict[str, Any] | None = None if self.changes else self.base
        self.derived: dict[type, Any] = {}
        self.since: tuple[dict[str, Any], frozenset[str]] | None = None

    @classmethod
    def of(cls, source: Any, changes: dict[str, Any]) -> _Map:
        """``source`` (a dict or a ``_Map``) with ``changes`` applied in order
        (a value ``_ABSENT`` deletes its key); shares ``source``'s entries."""
        base, own = (source.base, source.changes) if type(source) is _Map else (source, {})
        rebased, log = (source.rebased, source) if type(source) is _Map else (None, None)
        size = len(source)
        for key, value in changes.items():
            present = key in source
            size += (0 if present else 1) if value is not _ABSENT else -1 if present else 0
            if value is not _ABSENT and own.get(key) is _ABSENT:  # re-added: a dict puts it last
                return cls(_edited(_as_dict(source), changes))
        if len(own) + len(changes) > _overlay_limit(len(base)):
            rebased, log = (base, own, None, None, 0), None
            base, own = _as_dict(source), {}  # built once per source, and kept on it
            if len(changes) > _overlay_limit(len(base)):
                return cls(_edited(base, changes))
        merged = {**own}
        for key, value in changes.items():
            if value is _ABSENT and key not in base:
                merged.pop(key, None)
            else:
                merged[key] = value
        return cls(base, merged, size, rebased, _logged(log, changes, _overlay_limit(len(base))))

    def _dict(self) -> dict[str, Any]:
        flat = self.flat
        if flat is None:
            flat = self.flat = _edited(self.base, self.changes)
        return flat

    def __getitem__(self, key: str) -> Any:
        flat = self.flat
        if flat is not None:
            return flat[key]
        value = self.changes.get(key, _MISSING)
        if value is _MISSING:
            return self.base[key]
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        flat = self.flat
        if flat is not None:
            return flat.get(key, default)
        value = self.changes.get(key, _MISSING)
        if value is _MISSING:
            return self.base.get(key, default)
        return default if value is _ABSENT else value

    def __contains__(self, key: object) -> bool:
        value = self.changes.get(key, _MISSING)  # type: ignore[call-overload]
        return key in self.base if value is _MISSING else value is not _ABSENT

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def keys(self) -> Any:
        return self._dict().keys()

    def items(self) -> Any:
        return self._dict().items()

    def values(self) -> Any:
        return self._dict().values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Map):
            other = other._dict()
        return self._dict() == other if isinstance(other, dict) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._dict())


_LOG_LOCK: Final = threading.Lock()


def _logged(source: _Map | None, changes: dict[str, Any], limit: int) -> list[str]:
    """The key log of a version made from ``source`` (None: a new base) by
    ``changes``: ``source``'s list extended in place if ``source`` is its
    newest version, else a copy; a new list past 4 x ``limit`` keys (the
    versions before it are then told apart by their changes)."""
    if source is None or source.pos + len(changes) > 4 * limit:
        return list(changes)
    with _LOG_LOCK:
        log = source.log
        if len(log) == source.pos:
            log.extend(changes)
            return log
    return [*log[:source.pos], *changes]


def _edited(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``base`` with ``changes`` applied in order, as a dict would."""
    flat = base.lazy_copy() if type(base) is _LazyRecords else dict(base)
    for key, value in changes.items():
        if value is _ABSENT:
            flat.pop(key, None)
        else:
            flat[key] = value
    return flat


def _as_dict(mapping: Any) -> dict[str, Any]:
    """A ledger map as a dict to read (never to edit): a ``_Map``'s whole dict."""
    return mapping._dict() if type(mapping) is _Map else mapping


#: A version of a map as ``_changed_keys`` compares it: (base dict, changes,
#: the view its base was flattened from or None, key log, position in it).
_View = tuple[dict[str, Any], dict[str, Any], Any, Any, int]


def _view(mapping: Any) -> _View:
    if type(mapping) is _Map:
        return mapping.base, mapping.changes, mapping.rebased, mapping.log, mapping.pos
    return mapping, {}, None, None, 0


def _view_get(view: _View, key: str) -> Any:
    value = view[1].get(key, _MISSING)
    if value is _MISSING:
        return view[0].get(key)
    return None if value is _ABSENT else value


def _changed_keys(view: _View, mapping: Any) -> set[str] | None:
    """The keys whose record differs between the version ``view`` and
    ``mapping``, in time proportional to their changes; None when they are
    not on the same base (then only a whole comparison could tell)."""
    base, changes, rebased, log, pos = _view(mapping)
    if base is view[0]:
        if changes is view[1]:
            return set()
        if log is view[3] and log is not None:  # one line of puts: the keys between
            keys: Any = log[min(pos, view[4]):max(pos, view[4])]
        else:
            keys = itertools.chain(changes, view[1])
    elif rebased is not None and rebased[0] is view[0]:  # flattened since ``view``
        keys = itertools.chain(changes, rebased[1], view[1])
    elif view[2] is not None and view[2][0] is base:  # flattened since ``mapping``
        keys = itertools.chain(changes, view[2][1], view[1])
    else:
        return None
    return {k for k in keys if _view_get(view, k) is not mapping.get(k)}


# -- lazily typed maps ----------------------------------------------------------------
#
# A CLI mutation touches a few records of a ledger of thousands, and turning
# every record of the checkpoint into its typed form cost ~50 ms at 1,000
# sessions (~580 ms at 10,000).  A checkpoint the typed model already vouched
# for (its checksum is the ``ledger.validated`` memo: see ``decode_ledger``)
# is decoded into ``_LazyRecords``: dicts that hold each record as the plain
# JSON object it was read as and build its typed form on first access (then
# keep that, so a record read twice is the same object).  Iterating a map's
# values converts it whole; its keys, its length and membership never do.
# While nothing changed it, the map keeps the exact bytes it was read from
# (``span``), which the encoder writes back as they are; otherwise the
# canonical bytes of a record still in JSON form are encoded from that form,
# which is byte for byte what encoding its typed form gives (the checkpoint
# was encoded from typed records, and JSON round-trips them exactly).

_CONVERT_LOCK: Final = threading.Lock()


class _LazyRecords(dict):
    """A ledger map whose records are typed on first access (see above).
    A value whose type is ``dict`` is a record not yet typed: a typed record
    is an attrs instance, never a dict.

    A map of flat records (``_FLAT_MAPS``) may even be unread: its entries
    are then only the span of the checkpoint's bytes they are in, and a key
    is looked up by finding ``"key":{`` there (see ``_decode_vouched``); the
    first use that needs more reads the whole span (``_read``).  The bytes
    are searched as they were read: never decoded whole (6.6 MB at 10,000
    sessions), only a record, or the map, once it is read."""

    __slots__ = ("member", "span", "text", "bounds", "count", "picked")

    def __init__(self, member: str, raw: dict[str, Any] | None, span: bytes | memoryview | None,
                 text: bytes = b"", bounds: tuple[int, int] = (0, 0), count: int = 0) -> None:
        if type(raw) is _LazyRecords:
            raw._read()
            raw = dict.items(raw)  # its pairs as they are: dict(raw) would type them
        super().__init__(raw or ())
        self.member = member
        #: The canonical bytes of the whole map as read, while it is unchanged.
        self.span = span
        #: Unread (``raw`` None): the checkpoint's bytes (its JSON text),
        #: where the map's JSON is in them, how many entries it has, and the
        #: records typed so far.
        self.text: bytes | None = text if raw is None else None
        self.bounds, self.count = bounds, count
        self.picked: dict[str, Any] = {}

    def _read(self) -> None:
        """Read an unread map's entries (keeping the records typed so far)."""
        if self.text is None:
            return
        with _CONVERT_LOCK:
            if self.text is None:
                return
            start, end = self.bounds
            dict.update(self, _unread_json(self.text, start, end))
            for key, value in self.picked.items():
                dict.__setitem__(self, key, value)
            self.text, self.picked = None, {}

    def _pick(self, key: str) -> Any:
        """An unread map's record of ``key``, typed (``_MISSING`` if absent)."""
        got = self.picked.get(key, _MISSING)
        if got is not _MISSING:
            return got
        with _CONVERT_LOCK:
            text = self.text
            if text is None:
                return _MISSING
            got = self.picked.get(key, _MISSING)
            if got is _MISSING:
                at = _find_entry(text, self.bounds, key)
                if at < 0:
                    return _MISSING
                got = self.picked[key] = _typed_record(self.member, key, _unread_json(text, at))
            return got

    def _typed(self, key: str, value: Any) -> Any:
        with _CONVERT_LOCK:  # two threads must get the same record
            value = dict.__getitem__(self, key)
            if type(value) is dict:
                value = _typed_record(self.member, key, value)
                dict.__setitem__(self, key, value)
        return value

    def __getitem__(self, key: str) -> Any:
        if self.text is not None:
            got = self._pick(key)
            if got is not _MISSING:
                return got
            if self.text is not None:
                raise KeyError(key)
        value = dict.__getitem__(self, key)
        return self._typed(key, value) if type(value) is dict else value

    def get(self, key: str, default: Any = None) -> Any:
        if self.text is not None:
            got = self._pick(key)
            if got is not _MISSING:
                return got
            if self.text is not None:
                return default
        value = dict.get(self, key, _MISSING)
        if value is _MISSING:
            return default
        return self._typed(key, value) if type(value) is dict else value

    def __contains__(self, key: object) -> bool:
        if self.text is not None:
            return self.get(key, _MISSING) is not _MISSING  # type: ignore[arg-type]
        return dict.__contains__(self, key)

    def __len__(self) -> int:
        return self.count if self.text is not None else dict.__len__(self)

    def plain(self, key: str) -> Any:
        """The record as stored now: its JSON object if not yet typed, else typed."""
        self._read()
        return dict.__getitem__(self, key)

    def plain_items(self) -> Any:
        """(key, record) pairs, each record typed or still its JSON object."""
        self._read()
        return dict.items(self)

    def typed_all(self) -> None:
        self._read()
        for key, value in dict.items(self):
            if type(value) is dict:
                self._typed(key, value)

    def lazy_copy(self) -> _LazyRecords:
        """A copy (to edit) that keeps the records not yet typed as they are."""
        return _LazyRecords(self.member, self, None)

    # Whatever reads the values whole gets them typed.  Overriding __iter__
    # also makes ``dict(this)`` and ``{**this}`` go through __getitem__.
    def __iter__(self) -> Iterator[str]:
        self._read()
        return dict.__iter__(self)

    def keys(self) -> Any:
        self._read()
        return dict.keys(self)

    def values(self) -> Any:
        self.typed_all()
        return dict.values(self)

    def items(self) -> Any:
        self.typed_all()
        return dict.items(self)

    def copy(self) -> dict[str, Any]:
        self.typed_all()
        return dict.copy(self)

    def __eq__(self, other: object) -> bool:
        self.typed_all()
        if type(other) is _LazyRecords:
            other.typed_all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self.typed_all()
        return dict.__repr__(self)

    def __reduce__(self) -> Any:
        self.typed_all()
        return dict, (dict(dict.items(self)),)

    # An edit (nothing in the relay edits a ledger map, but a test might)
    # leaves the bytes read behind.
    def __setitem__(self, key: str, value: Any) -> None:
        self._read()
        self.span = None
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._read()
        self.span = None
        dict.__delitem__(self, key)

    def pop(self, key: str, *default: Any) -> Any:
        self._read()
        self.span = None
        value = dict.pop(self, key, *default)
        return self._plain_typed(key, value)

    def _plain_typed(self, key: str, value: Any) -> Any:
        return _typed_record(self.member, key, value) if type(value) is dict else value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._read()
        self.span = None
        dict.update(self, *args, **kwargs)

    def popitem(self) -> tuple[str, Any]:
        self._read()
        self.span = None
        key, value = dict.popitem(self)
        return key, self._plain_typed(key, value)

    def clear(self) -> None:
        self._read()
        self.span = None
        dict.clear(self)


def _unread_json(text: bytes, start: int, end: int | None = None) -> Any:
    """The JSON value of an unread map (``text[start:end]``) or of its record
    at ``start`` (``end`` None); its damage raises ``LedgerInvalid``."""
    try:
        if end is None:
            end = _record_end(text, start)
        return _MEMBER_DECODER.decode(_utf8(text[start:end]))
    except (ValueError, RecursionError) as exc:
        raise LedgerInvalid(f"ledger is not valid JSON: {exc}", hint=_LEDGER_HINT) from None


def _utf8(data: bytes) -> str:
    """Ledger bytes as text, as the encoder wrote them (a lone surrogate passes)."""
    try:  # strict UTF-8 has a fast path surrogatepass lacks
        return data.decode()
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogatepass")


#: A flat record (an object of strings and numbers) at the start of the match.
#: Possessive: bytes that are not one fail in linear time (a backtracking
#: ``(a+)*`` took exponential time on a damaged record).
_FLAT_RECORD: Final = re.compile(rb'\{(?:[^"{}]++|"(?:[^"\\]++|\\.)*+")*+\}')


def _record_end(text: bytes, at: int) -> int:
    """Where the flat record that starts at ``at`` ends."""
    match = _FLAT_RECORD.match(text, at)
    if match is None:
        raise ValueError(f"no record at byte {at}")
    return match.end()


#: The maps whose records hold only strings and numbers, with the field
#: every record has once (its id).  In canonical JSON such a map's text has
#: a raw ``"`` only where a string starts or ends (one inside a string is
#: escaped), so ``"<key>":{`` occurs only where the entry of ``<key>`` starts,
#: ``"<field>":"`` once per record, and ``}},"<next member>":`` only where
#: the map ends: a map is found, counted and looked up without reading it
#: (a test pins that the record classes stay flat).
_FLAT_MAPS: Final = {"cursors": "session_id", "leases": "lease_id", "sessions": "session_id",
                     "tokens": "token_id"}


#: In a flat map's text, a record's field holding a string without escapes
#: or an integer, by field name (see ``_flat_column``).
_FLAT_FIELDS: dict[str, re.Pattern[bytes]] = {}


def _flat_values(base: _LazyRecords, field: str) -> list[bytes]:
    """The JSON of ``field`` in each record of an unread flat map, in order
    (a pattern with a literal start: a scan at C speed)."""
    pattern = _FLAT_FIELDS.get(field)
    if pattern is None:
        pattern = _FLAT_FIELDS[field] = re.compile(
            f'"{re.escape(field)}":("[^"\\\\]*"|-?[0-9]+)[,}}]'.encode())
    assert base.text is not None
    return pattern.findall(base.text, *base.bounds)


def _flat_column(mapping: Any, field: str) -> dict[str, Any] | None:
    """Key -> ``field`` of every record of a flat map not read yet (or of a
    ``_Map`` of changes over one), found in its text without parsing it;
    None for any other map, or when a value is not a string without escapes
    or an integer (then read the records).  For what sums or counts a field
    over a whole map (a tally) on a CLI commit."""
    base, changes = (mapping.base, mapping.changes) if type(mapping) is _Map else (mapping, {})
    if type(base) is not _LazyRecords or base.text is None:
        return None
    # Each record's id field is its key (``_typed_record`` checks it of every record it types).
    keys, values = _flat_values(base, _FLAT_MAPS[base.member]), _flat_values(base, field)
    if len(keys) != base.count or len(values) != base.count:
        return None
    column = {k[1:-1]: v[1:-1] if v[:1] == '"' else int(v)
              for k, v in zip(_utf8_each(keys), _utf8_each(values), strict=True)}
    for key, value in changes.items():
        if value is _ABSENT:
            column.pop(key, None)
        else:
            column[key] = getattr(value, field)
    return column


def _utf8_each(pieces: list[bytes]) -> list[str]:
    """Pieces of ledger bytes holding no NUL (a JSON string escapes it) as
    text, decoded in one call."""
    return _utf8(b"\0".join(pieces)).split("\0") if pieces else []


def _find_entry(text: bytes, bounds: tuple[int, int], key: str) -> int:
    """Where the record of ``key`` starts in a flat map's text (-1: absent)."""
    if type(key) is not str or not rc.ID_PATTERN.fullmatch(key):
        return -1  # (a map's keys are ids: anything else is in no map)
    pattern = f'"{key}":{{'.encode()
    at = text.find(pattern, bounds[0], bounds[1])
    return at + len(pattern) - 1 if at >= 0 else -1


def _lazy_map_bytes(mapping: Any) -> bytes | memoryview | None:
    """The canonical bytes of a map on a lazily decoded one (None for any
    other): the bytes it was read from while it is that map unchanged; those
    bytes with the changed records spliced in when the map is unread and
    only changed records it has; else one encoder call over its records'
    JSON (the few typed ones turned back into JSON).  Each gives the bytes
    the typed records would."""
    if type(mapping) is _Map and not mapping.changes:
        mapping = mapping.base
    if type(mapping) is _LazyRecords and mapping.span is not None:
        return mapping.span
    if type(mapping) is _Map and type(mapping.base) is _LazyRecords:
        spliced = _spliced(mapping.base, mapping.changes)
        if spliced is not None:
            return spliced
    flat = _as_dict(mapping)
    if type(flat) is not _LazyRecords:
        return None
    return _canonical({k: v if type(v) is dict else to_json(v) for k, v in flat.plain_items()})


def _spliced(base: _LazyRecords, changes: dict[str, Any]) -> bytes | None:
    """An unread map's bytes with ``changes`` (records of keys it has) in
    place of its records; None for any other change (or map)."""
    text, span = base.text, base.span
    if text is None or span is None:
        return None
    start = base.bounds[0]
    cuts = []
    for key in sorted(changes):
        value = changes[key]
        at = _find_entry(text, base.bounds, key)
        if value is _ABSENT or at < 0:
            return None
        cuts.append((at - start, _record_end(text, at) - start, _entry_bytes(value)))
    parts, pos = [], 0
    for at, end, data in cuts:
        parts += [span[pos:at], data]
        pos = end
    parts.append(span[pos:])
    return b"".join(parts)


def _plain_items(mapping: Any) -> Any:
    """A map's (key, record) pairs, each record typed or, if it was not
    typed yet, its JSON object: for what reads a few fields of every record
    (``_plain_field``) and need not type them all."""
    flat = _as_dict(mapping)
    return flat.plain_items() if type(flat) is _LazyRecords else flat.items()


def _plain_field(record: Any, name: str) -> Any:
    return record[name] if type(record) is dict else getattr(record, name)


_PLAIN_DERIVED: dict[int, tuple[dict[str, Any], dict[type, Any]]] = {}
_PLAIN_DERIVED_LOCK: Final = threading.Lock()
_PLAIN_DERIVED_KEPT: Final = 32


def _derived_of(mapping: dict[str, Any]) -> dict[type, Any]:
    if type(mapping) is _Map:
        return mapping.derived
    hit = _PLAIN_DERIVED.get(id(mapping))
    return hit[1] if hit is not None and hit[0] is mapping else {}


def _plain_derived(mapping: dict[str, Any]) -> dict[type, Any]:
    """The registry's derived data of a plain dict (registered now if new)."""
    with _PLAIN_DERIVED_LOCK:
        hit = _PLAIN_DERIVED.pop(id(mapping), None)
        if hit is None or hit[0] is not mapping:
            hit = (mapping, {})
        _PLAIN_DERIVED[id(mapping)] = hit  # most recently used last
        while len(_PLAIN_DERIVED) > _PLAIN_DERIVED_KEPT:
            del _PLAIN_DERIVED[next(iter(_PLAIN_DERIVED))]
    return hit[1]


def _set_derived(mapping: dict[str, Any], kind: type, value: Any) -> None:
    """Record ``value`` as ``mapping``'s derived data of class ``kind``."""
    (mapping.derived if type(mapping) is _Map else _plain_derived(mapping))[kind] = value


def _derived(mapping: dict[str, Any], kind: type) -> Any:
    """``mapping``'s derived data of class ``kind``, built now if it has none.
    Two threads may both build it; either result is the same value."""
    derived = mapping.derived if type(mapping) is _Map else _plain_derived(mapping)
    got = derived.get(kind)
    if got is None:
        got = derived[kind] = kind.build(mapping)
    return got


@attrs.frozen
class _LeaseIndex:
    """Of a ``leases`` map: each session's lease ids (in the map's order), the
    sessions holding an active or waiting lease (with those leases' ids, in
    the map's order), the number of such leases, and a lower bound of their
    ``expires_at``."""

    by_session: Mapping[str, tuple[str, ...]]
    busy: Mapping[str, tuple[str, ...]]
    live: int
    #: No active or waiting lease expires before this ("" when there may be one).
    soonest: str

    @classmethod
    def build(cls, leases: dict[str, rc.Lease]) -> _LeaseIndex:
        by_session: dict[str, list[str]] = {}
        busy: dict[str, list[str]] = {}
        expiries = []
        for lease_id, lease in _plain_items(leases):  # (not typing a lazily decoded map)
            session_id = _plain_field(lease, "session_id")
            by_session.setdefault(session_id, []).append(lease_id)
            if _plain_field(lease, "state") in rc.LIVE_LEASE_STATES:
                busy.setdefault(session_id, []).append(lease_id)
                expiries.append(_plain_field(lease, "expires_at"))
        return _LeaseIndex({k: tuple(v) for k, v in by_session.items()},
                           {k: tuple(v) for k, v in busy.items()}, len(expiries), min(expiries, default="~"))

    def put(self, key: str, old: rc.Lease | None, new: rc.Lease) -> _LeaseIndex:
        by_session, busy, live, soonest = self.by_session, self.busy, self.live, self.soonest
        moved = old is not None and old.session_id != new.session_id
        if old is None or moved:
            lists = {new.session_id: (*by_session.get(new.session_id, ()), key)}
            if moved:
                lists[old.session_id] = tuple(x for x in by_session[old.session_id] if x != key)
            by_session = _Map.of(by_session, lists)
        was = old is not None and old.state in rc.LIVE_LEASE_STATES
        now = new.state in rc.LIVE_LEASE_STATES
        held: dict[str, Any] = {}  # a lease gets live once, when made: the map's order
        if was and (not now or moved):
            held[old.session_id] = tuple(x for x in busy[old.session_id] if x != key) or _ABSENT
            live -= 1
        if now and (not was or moved):
            held[new.session_id] = (*busy.get(new.session_id, ()), key)
            live += 1
        if held:
            busy = _Map.of(busy, held)
        if now:
            soonest = min(soonest, new.expires_at)
        return _LeaseIndex(by_session, busy, live, soonest)


def _lease_index(ledger: Ledger) -> _LeaseIndex:
    return _derived(ledger.leases, _LeaseIndex)


class _LiveCount:
    """Of a ``leases`` map: how many of its leases are active or waiting (what
    the compaction cap asks a CLI commit, which needs no ``_LeaseIndex``).
    A plain class: an attrs one would be built (~0.4 ms) by every CLI commit."""

    __slots__ = ("live",)

    def __init__(self, live: int) -> None:
        self.live = live

    @classmethod
    def build(cls, leases: dict[str, rc.Lease]) -> _LiveCount:
        flat = _as_dict(leases)
        if type(flat) is _LazyRecords and flat.text is not None:  # unread: a state is '"state":"active"'
            start, end = flat.bounds
            return cls(sum(flat.text.count(f'"state":"{state}"'.encode(), start, end)
                           for state in rc.LIVE_LEASE_STATES))
        return cls(sum(_plain_field(lease, "state") in rc.LIVE_LEASE_STATES
                       for _, lease in _plain_items(leases)))

    def put(self, key: str, old: rc.Lease | None, new: rc.Lease) -> _LiveCount:
        was = old is not None and old.state in rc.LIVE_LEASE_STATES
        return _LiveCount(self.live - was + (new.state in rc.LIVE_LEASE_STATES))


def _live_leases(leases: dict[str, rc.Lease]) -> int:
    """The number of active or waiting leases: the lease index's, if it was built."""
    index = _derived_of(leases).get(_LeaseIndex)
    return index.live if index is not None else _derived(leases, _LiveCount).live


class _SortedIds:
    """A sorted set of ids as a persistent value: a sorted base list shared by
    the versions made from it (never edited), ids added since (sorted) and
    ids of the base removed since, flattened into a new base past
    ``_overlay_limit`` of them.  ``first`` is O(removed), adding or removing
    an id O(log N + the changes)."""

    __slots__ = ("base", "added", "removed")

    def __init__(self, base: list[str], added: tuple[str, ...] = (),
                 removed: frozenset[str] = frozenset()) -> None:
        self.base, self.added, self.removed = base, added, removed

    def first(self) -> str | None:
        removed = self.removed
        old = next((x for x in self.base if x not in removed), None) if removed else \
            (self.base[0] if self.base else None)
        new = self.added[0] if self.added else None
        return new if old is None or (new is not None and new < old) else old

    def __iter__(self) -> Iterator[str]:
        return iter(sorted([*(x for x in self.base if x not in self.removed), *self.added]))

    def with_id(self, sid: str, present: bool) -> _SortedIds:
        base, added, removed = self.base, self.added, self.removed
        at = bisect.bisect_left(base, sid)
        if at < len(base) and base[at] == sid:
            if present == (sid not in removed):
                return self
            removed = removed - {sid} if present else removed | {sid}
        else:
            at = bisect.bisect_left(added, sid)
            if present == (at < len(added) and added[at] == sid):
                return self
            added = (*added[:at], sid, *added[at:]) if present else (*added[:at], *added[at + 1:])
        if len(added) + len(removed) > _overlay_limit(len(base)):
            return _SortedIds(sorted([*(x for x in base if x not in removed), *added]))
        return _SortedIds(base, added, removed)


class _FreeSlot:
    """Of a ``sessions`` map and every version ``_put`` makes from it: the
    latest ``_FreeIndex`` worked out for one of them (a cache any of them may
    replace; ``_free_index`` checks which versions it describes)."""

    __slots__ = ("index",)

    def __init__(self) -> None:
        self.index: _FreeIndex | None = None

    @classmethod
    def build(cls, sessions: dict[str, rc.Session]) -> _FreeSlot:
        return cls()

    def put(self, key: str, old: Any, new: Any) -> _FreeSlot:
        return self


@attrs.frozen
class _FreeIndex:
    """Of a ledger's sessions, leases and quarantines (the versions in
    ``views``): each profile's free sessions, those ready, holding no active
    or waiting lease and not quarantined, sorted by id.  It follows the
    ledger from one commit to the next through the keys the three maps
    changed (``_changed_keys``), and is rebuilt when they cannot tell."""

    views: tuple[_View, _View, _View]
    free: dict[str, _SortedIds]

    @classmethod
    def build(cls, ledger: Ledger) -> _FreeIndex:
        busy, sessions = _lease_index(ledger).busy, _as_dict(ledger.sessions)
        free: dict[str, list[str]] = {}
        for sid in sorted(sessions):
            if _is_free(ledger, sid, busy):
                free.setdefault(sessions[sid].profile, []).append(sid)
        return cls(_free_views(ledger), {k: _SortedIds(v) for k, v in free.items()})

    def moved_to(self, ledger: Ledger) -> _FreeIndex | None:
        """This index for ``ledger``, or None if the changes cannot be told."""
        views = _free_views(ledger)
        if all(a[0] is b[0] and a[1] is b[1] for a, b in zip(views, self.views, strict=True)):
            return self
        old_sessions, old_leases, _ = self.views
        touched = set()
        for view, mapping in zip(self.views, (ledger.sessions, ledger.leases, ledger.quarantines),
                                 strict=True):
            keys = _changed_keys(view, mapping)
            if keys is None:
                return None
            if mapping is ledger.leases:
                for key in keys:
                    touched.update(x.session_id for x in (_view_get(old_leases, key), mapping.get(key)) if x)
            else:
                touched |= keys
        busy, free = _lease_index(ledger).busy, dict(self.free)
        for sid in touched:
            session = ledger.sessions.get(sid) or _view_get(old_sessions, sid)
            if session is None:
                continue
            ids = free.get(session.profile, _SortedIds([]))
            free[session.profile] = ids.with_id(sid, _is_free(ledger, sid, busy))
        return _FreeIndex(views, free)


def _free_views(ledger: Ledger) -> tuple[_View, _View, _View]:
    return _view(ledger.sessions), _view(ledger.leases), _view(ledger.quarantines)


def _is_free(ledger: Ledger, session_id: str, busy: Mapping[str, int]) -> bool:
    session, quarantine = ledger.sessions.get(session_id), ledger.quarantines.get(session_id)
    return (session is not None and session.state == "ready" and session_id not in busy
            and (quarantine is None or quarantine.state != "active"))


def _free_index(ledger: Ledger) -> _FreeIndex:
    """The ledger's free sessions by profile, brought forward from the last
    index worked out for a version of its ``sessions`` map."""
    slot = _derived(ledger.sessions, _FreeSlot)
    index = slot.index
    if index is not None:
        index = index.moved_to(ledger)
    if index is None:
        index = _FreeIndex.build(ledger)
    slot.index = index
    return index


# -- the status tally -----------------------------------------------------------------
#
# ``python -m relay status`` would otherwise parse the whole ledger (52-73 ms
# of JSON at 10,000 sessions) to count a few things.  The writer knows the
# counts: each map's are derived data (below, in time proportional to the
# change), and the memo it writes after each commit carries them (``memo_bytes``).


class _LeaseTally:
    """Of a ``leases`` map: how many are active and waiting, and their
    ``expires_at`` (each with its lease id, sorted), so the soonest is exact.

    One seeded from a memo's tally (``_seed_tallies``) has the counts and the
    soonest expiry alone (``expiries`` None): a put keeps it exact until it
    may remove the soonest, and then ``soonest`` is ``_MISSING`` (count the map)."""

    __slots__ = ("active", "waiting", "expiries", "first")

    def __init__(self, active: int, waiting: int, expiries: _SortedIds | None,
                 first: Any = _MISSING) -> None:
        self.active, self.waiting, self.expiries, self.first = active, waiting, expiries, first

    @classmethod
    def build(cls, leases: dict[str, rc.Lease]) -> _LeaseTally:
        live = [(k, state, expires) for k, state, expires in _fields_of(leases, "state", "expires_at")
                if state in rc.LIVE_LEASE_STATES]
        active = sum(1 for _, state, _ in live if state == "active")
        return cls(active, len(live) - active, _SortedIds(sorted(f"{x} {k}" for k, _, x in live)))

    def put(self, key: str, old: rc.Lease | None, new: rc.Lease) -> _LeaseTally:
        active, waiting, expiries, first = self.active, self.waiting, self.expiries, self.first
        for lease, sign in ((old, -1), (new, 1)):
            if lease is not None and lease.state in rc.LIVE_LEASE_STATES:
                if lease.state == "active":
                    active += sign
                else:
                    waiting += sign
                if expiries is not None:
                    expiries = expiries.with_id(_expiry_key(lease), sign > 0)
                elif first is not _MISSING and (first is None or lease.expires_at <= first):
                    first = _MISSING if sign < 0 else lease.expires_at
        return _LeaseTally(active, waiting, expiries, first)

    def soonest(self) -> Any:
        """The soonest ``expires_at`` of an active or waiting lease (None:
        there is none; ``_MISSING``: a seeded tally that no longer knows)."""
        if self.expiries is None:
            return self.first
        first = self.expiries.first()
        return first.partition(" ")[0] if first is not None else None


def _expiry_key(lease: rc.Lease) -> str:
    return f"{lease.expires_at} {lease.lease_id}"


def _fields_of(mapping: Any, *fields: str) -> list[tuple[Any, ...]]:
    """(key, each of ``fields``) of every record of a ledger map, without
    typing the records of a lazily read one (see "Lazily typed maps")."""
    columns = [_flat_column(mapping, name) for name in fields]
    if all(column is not None for column in columns):  # (each in the map's order)
        return list(zip(columns[0], *(column.values() for column in columns), strict=True))
    return [(key, *(_plain_field(record, name) for name in fields)) for key, record in _plain_items(mapping)]


class _QuarantineTally:
    """Of a ``quarantines`` map: how many are active."""

    __slots__ = ("active",)

    def __init__(self, active: int) -> None:
        self.active = active

    @classmethod
    def build(cls, quarantines: dict[str, rc.Quarantine]) -> _QuarantineTally:
        return cls(sum(1 for _, state in _fields_of(quarantines, "state") if state == "active"))

    def put(self, key: str, old: rc.Quarantine | None, new: rc.Quarantine) -> _QuarantineTally:
        return _QuarantineTally(self.active + (new.state == "active")
                                - (old is not None and old.state == "active"))


class _CursorTally:
    """Of a ``cursors`` map: its events and results, summed."""

    __slots__ = ("events", "results")

    def __init__(self, events: int, results: int) -> None:
        self.events, self.results = events, results

    @classmethod
    def build(cls, cursors: dict[str, rc.Cursor]) -> _CursorTally:
        rows = _fields_of(cursors, "events", "results")
        return cls(sum(x[1] for x in rows), sum(x[2] for x in rows))

    def put(self, key: str, old: rc.Cursor | None, new: rc.Cursor) -> _CursorTally:
        events, results = (old.events, old.results) if old is not None else (0, 0)
        return _CursorTally(self.events + new.events - events, self.results + new.results - results)


def ledger_tally(ledger: Ledger) -> dict[str, Any]:
    """What ``doc_tally`` counts of ``ledger``, with every active or waiting
    lease counted and the soonest ``expires_at`` among them (None: no such
    lease): the counts hold for any moment before it."""
    leases = _derived(ledger.leases, _LeaseTally)
    soonest = leases.soonest()
    if soonest is _MISSING:
        soonest = _LeaseTally.build(ledger.leases).soonest()
    cursors = _derived(ledger.cursors, _CursorTally)
    return {
        "revision": ledger.revision, "profiles": len(ledger.profiles), "sessions": len(ledger.sessions),
        "active_leases": leases.active, "waiting_leases": leases.waiting, "soonest": soonest,
        "active_quarantines": _derived(ledger.quarantines, _QuarantineTally).active,
        "control_requests": len(ledger.control_requests),
        "events": cursors.events, "results": cursors.results, "runtime": to_json(ledger.runtime),
    }


def _seed_tallies(ledger: Ledger, tally: dict[str, Any]) -> None:
    """Give the maps of a lazily read ``ledger`` the derived counts of the
    memo's ``tally`` of it, so that a CLI commit's memo counts only what the
    commit changed instead of scanning every map's text (~70 ms at 10,000
    sessions).  The caller has checked that the memo vouches for exactly
    this checkpoint and the journal records read on it, at this revision."""
    for mapping, kind, value in (
            (ledger.leases, _LeaseTally,
             _LeaseTally(tally["active_leases"], tally["waiting_leases"], None, tally["soonest"])),
            (ledger.quarantines, _QuarantineTally, _QuarantineTally(tally["active_quarantines"])),
            (ledger.leases, _LiveCount, _LiveCount(tally["active_leases"] + tally["waiting_leases"])),
            (ledger.cursors, _CursorTally, _CursorTally(tally["events"], tally["results"]))):
        _set_derived(mapping, kind, value)


def encode_ledger(ledger: Ledger) -> bytes:
    """Canonical bytes with a trailing SHA-256 checksum of everything before it."""
    head, tail = _encode_sealed(ledger)
    return head + tail


def _encode_sealed(ledger: Ledger, layout: dict[str, list[int]] | None = None) -> tuple[bytes, bytes]:
    """``encode_ledger``'s bytes in two pieces, to be written one after the
    other: everything up to the hex digest, then the digest and ``"}\n``.
    One join, one hash: at 10,000 sessions the body is ~6 MB, and each further
    copy of it (a concatenation) costs about as much as hashing it."""
    with _FRAGMENTS_LOCK:
        parts = _encode_parts_locked(ledger, layout)
    parts.append(_CHECKSUM_TAIL)
    head = b"".join(parts)
    digest = _hasher(len(head))(memoryview(head)[: len(head) - len(_CHECKSUM_TAIL)])
    digest.update(b"}")  # the body the checksum covers ends where the tail begins
    return head, digest.hexdigest().encode() + b'"}\n'


class _Held(weakref.ref):
    """A weak reference to a cached record that knows its cache key."""

    __slots__ = ("key",)


def _forget(held: _Held) -> None:
    """The record died (no ledger of any store holds it): drop its bytes."""
    entry = _FRAGMENTS.get(held.key)
    if entry is not None and entry[0] is held:
        _FRAGMENTS.pop(held.key, None)


#: id(record) -> (weak reference to the record, its canonical JSON).  Records
#: are immutable values shared between successive ledgers, so a checkpoint
#: re-encodes only those it has not seen.  An entry lives exactly as long as its
#: record: when no ledger (of any store in the process) holds it, its weak
#: reference's callback drops the bytes -- a long-running server does not keep
#: the bytes of every turn and lease it ever archived (the 30-minute soak grew
#: by ~130 MB with a cache that kept 65,536 entries), and two stores of one
#: process never evict each other's.  A hit checks the reference still names
#: the record, so an id reused after a death is a miss, never a wrong answer.
#: Inserts hold ``_FRAGMENTS_LOCK``; the callback only pops its own entry.
_FRAGMENTS: dict[int, tuple[_Held, bytes]] = {}
_FRAGMENTS_LOCK: Final = threading.RLock()


def _fragment(record: Any) -> bytes:
    key = id(record)
    hit = _FRAGMENTS.get(key)
    if hit is not None and hit[0]() is record:
        return hit[1]
    data = _canonical(to_json(record))
    held = _Held(record, _forget)
    held.key = key
    _FRAGMENTS[key] = (held, data)
    return data


def _entry_bytes(record: Any) -> bytes:
    """A record's canonical bytes; one not typed yet (see ``_LazyRecords``)
    is encoded from its JSON object, which gives the same bytes."""
    return _canonical(record) if type(record) is dict else _fragment(record)


def _encode_body(ledger: Ledger) -> bytes:
    """``_canonical(to_json(ledger))``, byte for byte, from cached fragments."""
    with _FRAGMENTS_LOCK:
        return b"".join(_encode_parts_locked(ledger)) + b"}"


@attrs.frozen
class _Encoded:
    """Of a ledger map: its keys in canonical (sorted) order and, for each,
    the canonical bytes ``,"key":{record}`` (the first without its comma is
    where the map's body starts; joining them all is the rest of it)."""

    keys: list[str]
    entries: list[bytes]

    @classmethod
    def build(cls, mapping: dict[str, Any]) -> _Encoded:
        mapping = _as_dict(mapping)
        keys = sorted(mapping)
        get = mapping.plain if type(mapping) is _LazyRecords else mapping.__getitem__
        with _FRAGMENTS_LOCK:  # reentrant: the encoder builds with it held
            return cls(keys, [b"," + _canonical(k) + b":" + _entry_bytes(get(k)) for k in keys])

    def put(self, key: str, old: Any, new: Any) -> _Encoded:
        at = bisect.bisect_left(self.keys, key)
        entry = b"," + _canonical(key) + b":" + _canonical(to_json(new))
        keys, entries = list(self.keys), list(self.entries)
        if at < len(keys) and keys[at] == key:
            entries[at] = entry
        else:
            keys.insert(at, key)
            entries.insert(at, entry)
        return _Encoded(keys, entries)


def _encode_parts_locked(ledger: Ledger, layout: dict[str, list[int]] | None = None) -> list[bytes]:
    """The canonical body as pieces to join, all but its closing brace.
    ``layout`` (given): filled with where each member's value lies in the
    body, and each map's number of records (see ``_checkpoint_layout``)."""
    parts = [b"{"]
    for name in sorted(f.name for f in attrs.fields(Ledger)):
        if len(parts) > 1:
            parts.append(b",")
        value = getattr(ledger, name)
        mark = len(parts)
        lazy = _lazy_map_bytes(value) if isinstance(value, (dict, _Map)) else None
        if lazy is not None:
            parts += [_canonical(name) + b":", lazy]  # (the bytes read: not copied once more)
        elif isinstance(value, (dict, _Map)):
            entries = _derived(value, _Encoded).entries
            parts.append(_canonical(name) + b":{")
            if entries:  # each entry but the first brings its leading comma
                parts.append(entries[0][1:])
                parts.extend(entries[1:])
            parts.append(b"}")
        else:
            parts.append(_canonical(name) + b":" + _canonical(to_json(value) if attrs.has(type(value))
                                                              else value))
        if layout is not None:
            layout[name] = [len(name) + 3, sum(len(p) for p in parts[mark:]),
                            len(value) if isinstance(value, (dict, _Map)) else -1]
    if layout is not None:  # (offsets within each member's pieces, then from the body's start)
        at = 1
        for entry in layout.values():
            entry[0], entry[1] = at + entry[0], at + entry[1]
            at = entry[1] + 1
    return parts


_LEDGER_HINT: Final = ("run `python -m relay state inventory` to see it, then "
                       "`python -m relay state reset --owner relay --apply` to set it aside")


def decode_ledger(data: bytes, memo: bytes | None = None) -> Ledger:
    """Parse and validate ledger bytes; anything off raises ``LedgerInvalid``.

    ``memo``: the ``ledger.validated`` memo.  When it starts with these
    bytes' (verified) checksum, the typed model wrote them, and the records
    are typed only as they are used (``_decode_vouched``)."""
    ledger, _, sealed = _decode_checkpoint(data, memo)
    if not sealed():
        raise _unsealed()
    return ledger


def _unsealed() -> LedgerInvalid:
    return LedgerInvalid("ledger checksum does not match its contents", hint=_LEDGER_HINT)


def _sealed_already() -> bool:
    return True


def _decode_checkpoint(data: bytes, memo: bytes | None = None
                       ) -> tuple[Ledger, dict[str, list[int]] | None, Callable[[], bool]]:
    """``decode_ledger``, the checkpoint's layout when it was decoded lazily,
    and whether its checksum matches: a lazily decoded big checkpoint is
    hashed meanwhile (``_sealing``), and the caller must ask before it reads
    any record of the ledger; a ledger decoded whole was checked already."""
    hint = _LEDGER_HINT
    if not data or data.isspace():  # (not strip(): that copies a 6 MB ledger)
        raise LedgerInvalid("ledger is empty", hint=hint)
    if data.rfind(_CHECKSUM_TAIL) < 0 or not data.endswith(b'"}\n'):
        raise LedgerInvalid("ledger is truncated or has no checksum", hint=hint)
    cut = data.rfind(_CHECKSUM_TAIL)
    if memo is not None and memo[:64] == data[cut + len(_CHECKSUM_TAIL) : -3]:
        sealed = _sealing(data, cut)
        vouched = _decode_vouched(data, memo_layout(memo))
        if vouched is not None:
            return (*vouched, sealed)
        if not sealed():
            raise _unsealed()
    split = split_checksum(data)
    if split is None:
        raise _unsealed()
    body = split[0]
    try:
        doc = rc.strict_loads(body)  # no NaN, no infinities, no number out of range
    except (ValueError, UnicodeDecodeError) as exc:
        raise LedgerInvalid(f"ledger is not valid JSON: {exc}", hint=hint) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_ID:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise LedgerInvalid(f"ledger has schema {got!r}, expected {SCHEMA_ID!r}", hint=hint)
    try:
        # complete: every field present and within its constraints, as
        # specs/relay-state.schema.json says (the writer writes every field).
        for name, default in _LATER_MEMBERS:  # a ledger of an earlier version lacks them
            doc.setdefault(name, default)
        for name, fields in _LATER_FIELDS.items():
            for record in doc[name].values() if isinstance(doc.get(name), dict) else ():
                for key, default in fields.items():
                    if isinstance(record, dict):
                        record.setdefault(key, default)
        ledger = from_json(Ledger, doc, complete=True)
        _check_replies(ledger)
    except RelayError as exc:
        raise LedgerInvalid(f"ledger does not validate: {exc.message}", hint=hint) from None
    _check_ledger_keys(ledger, hint)
    _check_request_log_cursor(ledger.request_log, hint)
    return ledger, None, _sealed_already


def _sealed(data: bytes, cut: int) -> bool:
    """``split_checksum``'s check without its copy of the body (``cut``: where
    the checksum member starts; the body is what precedes it and ``}``)."""
    digest = _hasher(cut)(memoryview(data)[:cut])
    digest.update(b"}")
    return digest.hexdigest().encode() == data[cut + len(_CHECKSUM_TAIL) : -3]


def _sealing(data: bytes, cut: int) -> Callable[[], bool]:
    """``_sealed(data, cut)``, begun now; call the result for the answer.  A
    big ledger is hashed in a worker thread (OpenSSL's SHA-256 lets go of the
    interpreter), so that the caller parses its members meanwhile: at 10,000
    sessions the 6.6 MB hash (and hashlib's import) take ~7 ms of a CLI
    mutation."""
    if cut < _BIG_LEDGER_BYTES:
        answer = _sealed(data, cut)
        return lambda: answer
    got: list[bool] = []
    worker = threading.Thread(target=lambda: got.append(_sealed(data, cut)), name="relay-checksum",
                              daemon=True)
    worker.start()

    def wait() -> bool:
        worker.join()
        return got == [True]  # (a hash that raised matched nothing)
    return wait


def _decode_vouched(data: bytes, layout: dict[str, list[int]] | None = None
                    ) -> tuple[Ledger, dict[str, list[int]] | None] | None:
    """The ledger of a checkpoint body the typed model vouched for, its maps
    ``_LazyRecords`` (each with the bytes it was read from); None when the
    body is not laid out as the encoder writes it, or its members do not
    check out (then ``decode_ledger`` validates it whole, and says what is
    wrong).  What is checked here is what is cheap: the members, the scalars
    and the shape of each map; each record is checked as strictly as the
    whole path checks it when it is typed (``_typed_record``).  The bytes
    are never decoded whole: a flat map is searched as bytes, and only the
    other members are decoded, one at a time.  ``layout`` (the memo's, see
    ``_checkpoint_layout``) tells where the members are and how many records
    each map has; without it they are searched for and counted.  Returns the
    ledger and its layout (None when a map's records lack a later field: such
    a layout must not go into a memo that says every record has them)."""
    limit = data.rfind(_CHECKSUM_TAIL)
    try:  # the body but its closing brace: up to the checksum member
        members = _laid_out_members(data, limit, layout) if layout is not None else None
        if members is None:  # no layout, or one that does not fit these bytes: search
            layout, members = None, _top_members(data, limit)
    except (ValueError, RecursionError, IndexError):
        return None
    if members is None or members.get("schema", (None,))[0] != SCHEMA_ID:
        return None
    body = memoryview(data)  # a map's span is a view of the bytes read, not a copy
    doc = {name: value for name, (value, _, _) in members.items()}
    for name, default in _LATER_MEMBERS:
        doc.setdefault(name, default)
    maps = {}
    complete = True  # every record has every field (else the layout found is not for the memo)
    for name in _LEDGER_MAPS:
        raw = doc.pop(name, None)
        start, end = members[name][1:] if name in members else (0, 0)
        span = body[start:end] if end else None
        later = _LATER_FIELDS.get(name)
        if raw is _UNREAD:
            if layout is not None:  # (the writer wrote every field there is: the layout's stamp)
                count = layout[name][2]
            else:
                count = data.count(f'"{_FLAT_MAPS[name]}":"'.encode(), start, end)
            if layout is not None or all(data.count(f'"{field}":'.encode(), start, end) == count
                                         for field in later or ()):
                maps[name] = _LazyRecords(name, None, span, data, (start, end), count)
                continue
            complete = False
            try:  # records written before a field existed
                raw = _MEMBER_DECODER.decode(_utf8(data[start:end]))
            except (ValueError, RecursionError):
                return None
        if type(raw) is not dict:
            return None
        if later:
            wanted = later.keys()
            for record in raw.values():
                if type(record) is not dict:
                    return None
                if not wanted <= record.keys():  # written before a field existed: what its absence means
                    for key, default in later.items():
                        record.setdefault(key, default)
                    span, complete = None, False  # the bytes the typed form encodes to differ now
        maps[name] = _LazyRecords(name, raw, span)
    try:
        shell = from_json(Ledger, {**doc, **{name: {} for name in _LEDGER_MAPS}}, complete=True)
        _check_request_log_cursor(shell.request_log, "")
    except (RelayError, LedgerInvalid):
        return None
    found = {name: [start, end, len(maps[name]) if name in maps else -1]
             for name, (_, start, end) in members.items()} if complete else None
    return attrs.evolve(shell, **maps), found


def _laid_out_members(data: bytes, limit: int, layout: dict[str, list[int]]
                      ) -> dict[str, tuple[Any, int, int]] | None:
    """``_top_members`` from a layout: each member's value where the layout
    says, once the bytes agree (each member named just before it, one after
    the other with a comma between, the last ending where the body does, a
    flat map's braces at its ends); only the members that are not flat maps
    are decoded."""
    out: dict[str, tuple[Any, int, int]] = {}
    pos = 1
    for name, (start, end, count) in layout.items():
        head = f'"{name}":'.encode()
        if (not name.isidentifier() or start != pos + len(head) or end < start
                or data[pos:start] != head or (pos > 1 and data[pos - 1:pos] != b",")):
            return None
        if name in _FLAT_MAPS and count > 0:
            if data[start:start + 2] != b'{"' or data[end - 2:end] != b"}}":
                return None
            out[name] = (_UNREAD, start, end)
        else:
            out[name] = (_MEMBER_DECODER.decode(_utf8(data[start:end])), start, end)
        pos = end + 1
    return out if out and pos - 1 == limit and data[:1] == b"{" else None


def _top_members(data: bytes, limit: int) -> dict[str, tuple[Any, int, int]] | None:
    """A canonical JSON object's members (``data[:limit]``: the object but
    its closing brace): name -> (value, where its JSON starts, where it
    ends, in bytes); None if it is not laid out canonically.  Member names
    are the ledger's, plain ASCII, so a name is what lies between quotes."""
    if not data.startswith(b'{"') or limit < 0:
        return None
    out: dict[str, tuple[Any, int, int]] = {}
    pos = 1
    while True:
        close = data.find(b'"', pos + 1, limit)
        name = data[pos + 1:close].decode("ascii", "replace")
        if close < 0 or not name.isidentifier() or data[close + 1:close + 2] != b":":
            return None
        pos = close + 2
        # A flat map (not empty) ends where ``}},"<next member>":`` is (see ``_FLAT_MAPS``).
        end = (data.find(f'}}}},"{_NEXT_MEMBER[name]}":'.encode(), pos, limit) if name in _FLAT_MAPS
               and name in _NEXT_MEMBER and data[pos:pos + 2] == b'{"' else -1)
        if end >= 0:
            value, end = _UNREAD, end + 2
        else:
            value, end = _member_value(data, pos, limit)
        out[name] = (value, pos, end)
        if end >= limit:
            return out if end == limit else None
        if data[end:end + 2] != b',"':
            return None
        pos = end + 1


#: The bytes ``_member_value`` decodes at first (a member is seldom longer).
_MEMBER_CHUNK: Final = 4 * KIB


def _member_value(data: bytes, start: int, limit: int) -> tuple[Any, int]:
    """The JSON value at ``data[start:]`` and where it ends (bytes), decoding
    only a piece that holds it: one at a time of growing size, each taken
    only if the value ends before the piece does (a number cut short by the
    piece's end would parse)."""
    size = _MEMBER_CHUNK
    while True:
        stop = min(start + size, limit)
        last = stop >= limit
        text, _ = codecs.utf_8_decode(data[start:stop], "surrogatepass", last)
        try:
            value, end = _MEMBER_DECODER.raw_decode(text)
        except ValueError:
            if last:
                raise
        else:
            if end < len(text) or last:
                return value, start + (end if text.isascii() else len(text[:end].encode(
                    "utf-8", "surrogatepass")))
        size *= 8


#: A flat map ``_top_members`` found and did not read.
_UNREAD: Final = object()
#: Each member of a ledger -> the one after it in canonical (sorted) order.
_NEXT_MEMBER: Final = dict(itertools.pairwise(sorted(f.name for f in attrs.fields(Ledger))))

#: ``rc.strict_loads``'s decoder, for one member at a time.
_MEMBER_DECODER: Final = json.JSONDecoder(parse_constant=rc._reject_constant,
                                          parse_float=rc._finite_float)


def _typed_record(member: str, key: str, raw: dict[str, Any]) -> Any:
    """A record of a lazily decoded map, typed and checked as ``decode_ledger``
    checks every record of a ledger it validates whole."""
    kind, key_field = _MAP_RECORDS[member]
    try:
        record = from_json(kind, raw, path=f"{member}.{key}", complete=True)
        if member == "requests":
            _check_replies(Ledger(requests={key: record}))
    except RelayError as exc:
        raise LedgerInvalid(f"ledger does not validate: {exc.message}", hint=_LEDGER_HINT) from None
    if (key_field and getattr(record, key_field) != key) or not rc.ID_PATTERN.fullmatch(key):
        raise LedgerInvalid(f"ledger {member} entry {key!r} is inconsistent", hint=_LEDGER_HINT)
    return record


#: Ledger members added after the first release, with what their absence means.
_LATER_MEMBERS: Final = (("ledger_id", ""), ("request_log", {"bucket": "", "shard_bytes": []}),
                         ("turns", {}))
#: Record fields added after the first release: member -> field -> what absence means.
_LATER_FIELDS: Final = {"profiles": {"pool_size": 1, "cwd": "", "env": [], "options": []},
                         "sessions": {"replaces": "", "replaced_by": ""},
                         "turns": {"thread_id": ""},
                         "quarantines": {"code": "operator", "evidence": None}}
#: A stored reply's member -> the ledger member whose record it carries (for ``_LATER_FIELDS``).
_REPLY_RECORDS: Final = {"profile": "profiles", "session": "sessions", "turn": "turns",
                         "quarantine": "quarantines"}


def _check_replies(ledger: Ledger) -> None:
    """Each stored reply is a complete reply message of its method."""
    for key, record in ledger.requests.items():
        for member, records in _REPLY_RECORDS.items():  # a reply stored before later fields
            inner = record.reply.get(member)
            if isinstance(inner, dict):
                for name, default in _LATER_FIELDS[records].items():
                    inner.setdefault(name, default)
        from_json(rc.RPC_BY_NAME[record.method].response, record.reply,
                  path=f"requests.{key}.reply", complete=True)


# -- the checkpoint's layout in the memo ---------------------------------------------
#
# A CLI commit on a vouched checkpoint found its flat maps' ends and counted
# their records with scans of the whole text (~6 ms at 10,000 sessions).  The
# writer knows both: the encoder fills in where each member's value lies and
# each map's length (``_encode_parts_locked``), and the memo carries that
# layout with the tally; a journal commit carries its checkpoint's on.  The
# stamp says which fields the writer's records have (``_LATER_FIELDS``): a
# reader with another stamp counts as before.

_LAYOUT_FIELDS: Final = f"{zlib.crc32(repr(sorted(_LATER_FIELDS.items())).encode()):08x}"


def _checkpoint_layout(members: dict[str, list[int]] | None) -> dict[str, Any] | None:
    """The memo's form of a checkpoint's layout (member -> [start, end, records or -1])."""
    return {"fields": _LAYOUT_FIELDS, "members": members} if members else None


def memo_layout(memo: bytes) -> dict[str, list[int]] | None:
    """The checkpoint layout a memo carries, if its writer's records have our
    fields and its CRC holds (the caller has checked its checksum)."""
    doc = _memo_doc(memo[81:], memo) if len(memo) > 81 else None  # (past checksum and length)
    layout = doc.get("layout") if type(doc) is dict else None
    if type(layout) is not dict or layout.get("fields") != _LAYOUT_FIELDS:
        return None
    members = layout.get("members")
    if type(members) is not dict or not all(
            type(v) is list and len(v) == 3 and all(type(x) is int for x in v) for v in members.values()):
        return None
    return members


def _check_ledger_keys(ledger: Ledger, hint: str) -> None:
    """Map keys must equal the ids inside their records."""
    for name, key_field in (
        ("profiles", "name"), ("sessions", "session_id"), ("leases", "lease_id"),
        ("control_requests", "request_id"), ("cursors", "session_id"),
        ("tokens", "token_id"), ("quarantines", "session_id"), ("turns", "turn_id"),
    ):
        for key, record in getattr(ledger, name).items():
            if getattr(record, key_field) != key or not rc.ID_PATTERN.fullmatch(key):
                raise LedgerInvalid(f"ledger {name} entry {key!r} is inconsistent", hint=hint)
    for key in ledger.requests:
        if not rc.ID_PATTERN.fullmatch(key):
            raise LedgerInvalid(f"ledger requests entry {key!r} is not a valid id", hint=hint)


_BUCKET_PATTERN: Final = re.compile(r"[0-9]{1,12}-[0-9]{1,12}")


def _check_request_log_cursor(cursor: RequestLogCursor, hint: str) -> None:
    """What the schema says of ``request_log``: no bucket and no lengths, or a
    ``<start>-<span>`` bucket with one non-negative length per shard."""
    if not cursor.bucket and not cursor.shard_bytes:
        return
    if (not _BUCKET_PATTERN.fullmatch(cursor.bucket) or len(cursor.shard_bytes) != REQUEST_SHARDS
            or any(n < 0 for n in cursor.shard_bytes)):
        raise LedgerInvalid(f"ledger request_log {to_json(cursor)} is inconsistent", hint=hint)


# -- the journal's records (see "Commit journal" in specs/flow-relay-contract.md) ----------

#: Each map: its record class and the field its key must equal (None: any id).
_MAP_RECORDS: Final = {
    "profiles": (rc.Profile, "name"), "sessions": (rc.Session, "session_id"),
    "leases": (rc.Lease, "lease_id"), "control_requests": (rc.ControlRequest, "request_id"),
    "cursors": (rc.Cursor, "session_id"), "tokens": (TokenRecord, "token_id"),
    "quarantines": (rc.Quarantine, "session_id"), "requests": (RequestRecord, None),
    "turns": (rc.Turn, "turn_id"),
}
_LEDGER_SCALARS: Final = tuple(f.name for f in attrs.fields(Ledger) if f.name not in _LEDGER_MAPS)
_GONE: Final = object()


def _map_changes(old: dict[str, Any], new: dict[str, Any]) -> frozenset[str] | set[str] | None:
    """The keys that may differ between two versions of a map: those ``_put``
    set since their common origin, or every key of two small maps; None when
    that cannot be told without comparing a big map whole."""
    since = new.since if type(new) is _Map else None
    if since is not None and since[0] is old:
        return since[1]
    before = old.since if type(old) is _Map else None
    if since is not None and before is not None and since[0] is before[0]:
        return since[1] | before[1]
    if len(old) + len(new) <= JOURNAL_DIFF_ENTRIES:
        return set(old) | set(new)
    return None


def _ledger_changes(old: Ledger, new: Ledger
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]] | None:
    """(records set, keys deleted) per map that turn ``old`` into ``new``, or None."""
    sets, dels = {}, {}
    for name in _LEDGER_MAPS:
        a, b = getattr(old, name), getattr(new, name)
        if a is b:
            continue
        keys = _map_changes(a, b)
        if keys is None:
            return None
        put = {k: b[k] for k in sorted(keys) if k in b and a.get(k, _GONE) is not b[k]}
        gone = sorted(k for k in keys if k in a and k not in b)
        if put:
            sets[name] = put
        if gone:
            dels[name] = gone
    return sets, dels


def _journal_record(digest: str, old: Ledger, new: Ledger, sets: dict[str, dict[str, Any]],
                    dels: dict[str, list[str]]) -> bytes:
    """One journal line: the commit from ``old`` to ``new`` on the checkpoint ``digest``."""
    top = {name: to_json(v) if attrs.has(type(v := getattr(new, name))) else v
           for name in _LEDGER_SCALARS}
    body = _canonical({"base": digest, "del": dels, "from": old.revision,
                       "set": {n: {k: to_json(v) for k, v in m.items()} for n, m in sets.items()},
                       "top": top})
    return b"%08x " % zlib.crc32(body) + body + b"\n"


#: A journal record, typed: (scalar members, records set per map, keys deleted per map).
_Change = tuple[dict[str, Any], dict[str, Any], dict[str, list[str]]]


def _journal_change(doc: dict[str, Any]) -> _Change | None:
    """A journal record's (scalars, records set, keys deleted), checked as
    strictly as ``decode_ledger`` checks a whole ledger; None if it fails."""
    try:
        shell = from_json(Ledger, {**doc["top"], **{m: {} for m in _LEDGER_MAPS}}, complete=True)
        if shell.schema != SCHEMA_ID:
            return None
        _check_request_log_cursor(shell.request_log, "")
        sets: dict[str, Any] = {}
        for name, entries in doc["set"].items():
            kind, key_field = _MAP_RECORDS[name]
            if type(entries) is not dict:
                return None
            typed = {}
            for key, value in entries.items():
                if name in _LATER_FIELDS and isinstance(value, dict):
                    value = {**_LATER_FIELDS[name], **value}
                record = from_json(kind, value, path=f"{name}.{key}", complete=True)
                if not rc.ID_PATTERN.fullmatch(key) or (key_field and getattr(record, key_field) != key):
                    return None
                typed[key] = record
            if name == "requests":
                _check_replies(Ledger(requests=typed))
            sets[name] = typed
        dels = {}
        for name, keys in doc["del"].items():
            if name not in _MAP_RECORDS or type(keys) is not list or any(type(k) is not str for k in keys):
                return None
            dels[name] = keys
    except (RelayError, KeyError, TypeError, AttributeError):
        return None
    return {n: getattr(shell, n) for n in _LEDGER_SCALARS}, sets, dels


def _apply_changes(ledger: Ledger, changes: list[_Change]) -> Ledger:
    """``ledger`` with journal changes applied in order.  A few keys of a map
    (however often each was set) go through ``_put`` (its indexes follow, and
    a lazily read map stays unread); more, or a deletion, make one copy whose
    derived data is rebuilt on first use."""
    ops: dict[str, list[tuple[str, Any]]] = {}
    for _, sets, dels in changes:
        for name, entries in sets.items():
            ops.setdefault(name, []).extend(entries.items())
        for name, keys in dels.items():
            ops.setdefault(name, []).extend((k, _GONE) for k in keys)
    maps = {}
    for name, steps in ops.items():
        mapping = getattr(ledger, name)
        last = dict(steps)  # each key's last value, in the order keys were first set
        if len(last) <= 8 and all(v is not _GONE for v in last.values()):
            for key, value in last.items():
                mapping = _put(mapping, key, value)
        else:
            flat = _edited(_as_dict(mapping), {})  # (a lazily decoded map stays lazy)
            for key, value in steps:
                if value is _GONE:
                    flat.pop(key, None)
                else:
                    flat[key] = value
            mapping = _Map(flat)
        mapping.since = None
        maps[name] = mapping
    return attrs.evolve(ledger, **changes[-1][0], **maps)


def _put_private(mapping: dict[str, Any], start: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``_put`` for a commit's own map: one this commit made from ``start``
    with ``_put`` (nobody else holds it yet: operations hand back ledgers, not
    maps) and that has no derived data gets ``key`` set in place, which saves
    a copy of the whole map per stream append.  Any other map is copied."""
    since = mapping.since if type(mapping) is _Map else None
    if since is None or since[0] is not start or mapping is start or mapping.derived or key not in since[1]:
        return _put(mapping, key, value)
    mapping.changes[key] = value  # a key set since ``start``: the count stays
    mapping.flat = None
    mapping.log, mapping.pos = [], 0  # (nobody holds a view of it to compare)
    return mapping


def _seal(ledger: Ledger) -> None:
    """Forget what a committed ledger's maps were made from: the next commit
    diffs against them, and nothing older needs to stay alive.  Bookkeeping,
    not contents: no reader of the maps sees it."""
    for name in _LEDGER_MAPS:
        mapping = getattr(ledger, name)
        if type(mapping) is _Map:
            mapping.since = None


################################################################
# Ledger store (lock, atomic write, failpoints, stream logs, archive)
################################################################

# A stream log is a file of lines ``<crc32 8 hex> <record JSON>\n``.  The ledger
# records how many bytes of it are committed (``Cursor.events_bytes``); bytes
# past that are a torn or unacknowledged tail and are cut off before the next
# append, and never read.  Appending therefore costs the same at any history
# length, and a reader can binary-search a log by sequence number.


def encode_record(record: rc.StreamRecord) -> bytes:
    body = _canonical(to_json(record))
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode_record(line: bytes) -> rc.StreamRecord:
    """One log line -> record; raises ValueError on any damage."""
    if len(line) < 11 or line[8:9] != b" " or not line.endswith(b"\n"):
        raise ValueError("malformed stream record")
    body = line[9:-1]
    # Compare the exact bytes: int(..., 16) would also take " 1a2b3c4" or
    # "1A2B3C4D", so a flipped bit in the checksum itself could go unseen.
    if line[:8] != b"%08x" % zlib.crc32(body):
        raise ValueError("stream record checksum mismatch")
    try:
        return from_json(rc.StreamRecord, rc.strict_loads(body))
    except RelayError as exc:  # e.g. data nested past the limit, written before it existed
        raise ValueError(f"malformed stream record: {exc.message}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` that makes each new directory durable: a directory entry is
    only on disk once its parent has been fsynced."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        _fsync_dir(directory.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    """Write all of ``data`` at offset ``at``."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, at)
        view, at = view[written:], at + written


#: At most this many stream logs of one commit are synced at once (``_sync_all``).
SYNC_THREADS: Final = 4
_sync_pool: Any = None
_sync_pool_lock = threading.Lock()


def _sync_all(fds: list[int], sync: Callable[[int], None], concurrent: bool) -> list[OSError | None]:
    """``sync`` every descriptor; the OSError of each (None when it synced).
    ``concurrent``: all but the last on a small thread pool while this thread
    syncs the last (a sync waits on the disk with the GIL released, and the
    disk flushes several files in about the time of one); every sync started
    runs to its end.  One after another, the first failure stops the syncing
    (nothing more is written after a failure), and those not tried read None.
    None is retried either way: any failure fails the commit."""
    def one(fd: int) -> OSError | None:
        try:
            sync(fd)
        except OSError as exc:
            return exc
        return None

    if not concurrent or len(fds) < 2:
        out: list[OSError | None] = []
        for fd in fds:
            out.append(one(fd))
            if out[-1] is not None:
                return out + [None] * (len(fds) - len(out))
        return out
    futures = [_sync_executor().submit(one, fd) for fd in fds[:-1]]
    last = one(fds[-1])
    return [f.result() for f in futures] + [last]


def _sync_executor() -> Any:
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _sync_pool = ThreadPoolExecutor(SYNC_THREADS - 1, thread_name_prefix="relay-sync")
        return _sync_pool


def _flock_named(path: Path, flags: int, make_parent: Callable[[], None]) -> int:
    """Open ``path``, flock it exclusively, and return the descriptor once
    ``path`` still names the locked inode; a lock on a file unlinked or
    replaced meanwhile excludes nobody, so it is dropped and taken again."""
    for _ in range(LOCK_ATTEMPTS):
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # its directory is gone, or was never made
            make_parent()
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            with contextlib.suppress(FileNotFoundError):
                named = os.stat(path)
                if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise FileNotFoundError(errno.ENOENT, f"no such file or directory, or replaced, in each of "
                            f"{LOCK_ATTEMPTS} attempts to create and lock it", path)


@attrs.frozen
class _Snapshot:
    """One consistent read of the durable truth: the checkpoint (its file's
    identity and last bytes, its checksum, its ledger), the journal records
    that count on it (how far they reach, their last bytes, how many), and
    the ledger they make."""

    checkpoint_key: tuple[int, int, int]
    checkpoint_tail: bytes
    digest: str
    base: Ledger
    journal_key: tuple[int, int, int] | None
    journal_end: int
    journal_tail: bytes
    records: int
    ledger: Ledger
    #: The checkpoint was decoded lazily (``decode_ledger``'s memo): only a
    #: commit takes such a snapshot from the cache; ``read`` decodes whole.
    lazy: bool = False
    #: Where each member of the checkpoint lies (``_checkpoint_layout``), when known.
    layout: dict[str, list[int]] | None = None


#: A snapshot read while a checkpoint was renamed in: read again.
_RACED: Final = object()
#: The last bytes of the journal's last record a cached snapshot compares
#: (they end with its ``updated_at`` stamp).
JOURNAL_TAIL_BYTES: Final = 48


def _seed_from_memo(snap: _Snapshot, memo: bytes) -> None:
    """Seed a lazily read ledger's counts from the memo's tally when the memo
    vouches for exactly this checkpoint and the journal records read on it,
    and counts the revision they make (``_seed_tallies``)."""
    got = read_memo(memo)
    if got is None:
        return
    checksum, vouched, tally = got
    if (tally is not None and vouched == snap.journal_end and checksum == snap.digest.encode()
            and tally["revision"] == snap.ledger.revision):
        _seed_tallies(snap.ledger, tally)


def _journal_budget(checkpoint_bytes: int) -> int:
    return min(max(checkpoint_bytes // 2, JOURNAL_MIN_BYTES), JOURNAL_MAX_BYTES)


@attrs.define(eq=False)
class _Handles:
    """Descriptors a journaling store (the server's) keeps open from one commit
    to the next, so that a commit costs a few ``stat`` calls where it opened,
    read and closed each file (see "Held descriptors" in
    specs/flow-relay-contract.md).  Each is checked against its path under the
    lock before it is trusted, and one that fails a write is closed, never
    used again."""

    #: The state directory, flocked per commit (the lock that excludes), and its (dev, ino).
    lock_dir: int | None = None
    lock_dir_id: tuple[int, int] = (0, 0)
    #: The state directory's stat taken under this commit's lock (for the orphan sweep).
    dir_stat: os.stat_result | None = None
    #: Pins the checkpoint's inode: while it is open no other file can get its
    #: inode number, so (inode, size, mtime) alone tells the file unchanged.
    checkpoint: int | None = None
    checkpoint_ino: int = -1
    #: The journal, appended to in place; its inode.
    journal: int | None = None
    journal_ino: int = -1
    #: The ``ledger.validated`` memo, overwritten in place.
    memo: int | None = None
    #: Threads of this process exclude each other here: they share the one
    #: open file of ``lock_dir``, and a flock does not exclude its own holder.
    mutex: threading.Lock = attrs.Factory(threading.Lock)
    #: The thread that holds the lock now (None: nobody in this process).
    holder: int | None = None

    def drop(self, name: str) -> None:
        fd = getattr(self, name)
        setattr(self, name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        for name in ("lock_dir", "checkpoint", "journal", "memo"):
            self.drop(name)


@attrs.define(eq=False)
class Store:
    """Files of one workspace.  Sync by design: the CLI uses it directly and the
    server calls it through one ``trio.to_thread.run_sync`` hop per commit."""

    root: Path
    #: The last snapshot read or written.  Replaced whole, never edited: a
    #: reader takes it once into a local, so a writer in another thread can
    #: never show it half.
    _cache: _Snapshot | None = None
    #: The server's in-memory index of the request log (None: look keys up on disk).
    request_index: RequestIndex | None = None
    #: Commit by appending to the journal where the change allows (the
    #: server); otherwise every commit writes a checkpoint (the CLI).
    journal: bool = False
    #: The state directory as it was at the last orphan sweep (``sweep_orphan_temps``).
    _swept: tuple[int, ...] | None = None
    #: What a journaling store keeps open between commits (None until its first lock).
    _handles: _Handles | None = None

    # Cached: a commit asks for these paths ~40 times, and building a Path
    # costs microseconds each (a quarter of a small commit's CPU).

    @functools.cached_property
    def flow(self) -> Path:
        return self.root / "flow"

    @functools.cached_property
    def state_dir(self) -> Path:
        return self.flow / "state" / "relay"

    @functools.cached_property
    def tmp_dir(self) -> Path:
        return self.flow / "tmp" / "relay"

    @functools.cached_property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_NAME

    @functools.cached_property
    def lock_path(self) -> Path:
        return self.tmp_dir / LOCK_NAME

    @functools.cached_property
    def journal_path(self) -> Path:
        return self.state_dir / JOURNAL_NAME

    def stream_path(self, session_id: str, stream: str) -> Path:
        check_id("session", session_id)
        return self.state_dir / STREAMS_DIR / session_id / f"{stream}.log"

    # -- the lock ---------------------------------------------------------------

    # A flock belongs to an inode, not to a name.  Once someone unlinks or
    # replaces ``relay-state.lock`` (``rm -rf flow/tmp``: it is scratch) the next
    # locker creates a new file and two writers each hold "the" lock.  Checking
    # after the flock that the path still names the locked inode fixes every
    # case but one: a removal while the lock is held, which no check can see.
    # So the lock that excludes is the flock on the state directory itself,
    # which holds the ledger and is never removed by the relay, cleanup or reset;
    # the lock file is taken after it (same check) so that the documented lock
    # still excludes relay writers for a tool that flocks it.

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the exclusive locks that serialize every mutation: the state
        directory's, then ``relay-state.lock``'s (see "Lock and disk faults" in
        specs/flow-relay-contract.md)."""
        fds: list[int] = []
        held = None
        try:
            try:
                if self.journal:  # the state directory's descriptor is kept open
                    held = self._lock_held_dir()
                else:
                    fds.append(_flock_named(self.state_dir, os.O_RDONLY | os.O_DIRECTORY,
                                            lambda: _make_dirs(self.state_dir)))
                fds.append(_flock_named(self.lock_path, os.O_RDWR | os.O_CREAT,
                                        lambda: self.tmp_dir.mkdir(parents=True, exist_ok=True)))
            except OSError as exc:
                raise _io_failure("take the mutation lock", exc, self.lock_path) from exc
            if held is not None:
                held.holder = threading.get_ident()
            _failpoint("after_lock")
            try:
                yield
            except OSError as exc:  # any step not wrapped where it happens
                raise _io_failure("complete the mutation", exc, self.state_dir) from exc
        finally:
            for fd in reversed(fds):
                os.close(fd)  # closing drops the flock
            if held is not None:
                self._unlock_held_dir(held)

    def _lock_held_dir(self) -> _Handles:
        """Take this process's mutex, then flock the state directory on the
        kept descriptor once the path still names it (``_flock_named``'s check;
        a directory replaced meanwhile is opened afresh)."""
        held = self._handles
        if held is None:
            held = self._handles = _Handles()
            weakref.finalize(self, held.close)
        held.mutex.acquire()
        try:
            for _ in range(LOCK_ATTEMPTS):
                if held.lock_dir is None:
                    fd = _flock_named(self.state_dir, os.O_RDONLY | os.O_DIRECTORY,
                                      lambda: _make_dirs(self.state_dir))
                    st = os.fstat(fd)
                    held.lock_dir, held.lock_dir_id = fd, (st.st_dev, st.st_ino)
                    return held
                fcntl.flock(held.lock_dir, fcntl.LOCK_EX)
                try:
                    st = os.stat(self.state_dir)
                except FileNotFoundError:
                    st = None
                if st is not None and (st.st_dev, st.st_ino) == held.lock_dir_id:
                    held.dir_stat = st
                    return held
                held.drop("lock_dir")  # closing drops the flock
            raise FileNotFoundError(errno.ENOENT, "the state directory was replaced in each of "
                                    f"{LOCK_ATTEMPTS} attempts to lock it", self.state_dir)
        except BaseException:
            held.mutex.release()
            raise

    def _unlock_held_dir(self, held: _Handles) -> None:
        held.holder, held.dir_stat = None, None
        try:
            fcntl.flock(held.lock_dir, fcntl.LOCK_UN)
        except OSError:
            held.drop("lock_dir")  # closing drops it too
        finally:
            held.mutex.release()

    def _held(self) -> _Handles | None:
        """The kept descriptors, when this thread holds the lock through them."""
        held = self._handles
        return held if held is not None and held.holder == threading.get_ident() else None

    def close_handles(self) -> None:
        """Close what a journaling store keeps open (the server calls it when it stops)."""
        if self._handles is not None:
            with self._handles.mutex:
                self._handles.close()

    # -- reading ----------------------------------------------------------------

    def read(self) -> Ledger | None:
        """The current ledger (None when absent): the checkpoint with the
        journal records that count on it.  No lock: the rename makes every
        checkpoint read whole, and a record counts only once its CRC checks.
        Raises ``LedgerInvalid`` for a damaged checkpoint."""
        snap = self.snapshot()
        return snap.ledger if snap is not None else None

    def snapshot(self, lazy: bool = False) -> _Snapshot | None:
        """One consistent read of the checkpoint and its journal (None when
        there is no checkpoint).  A checkpoint renamed in while the journal
        was being read makes it read both again (the journal may by then hold
        the new checkpoint's records).  ``lazy`` (a commit's read, on a store
        that does not journal: the CLI's): a checkpoint the memo vouches for
        is decoded lazily (see "Lazily typed maps")."""
        held = self._held()
        if held is not None:
            got = self._unchanged(held)
            if got is not None:
                return got
        for _ in range(LOCK_ATTEMPTS):
            got = self._read_once(lazy and not self.journal)
            if got is not _RACED:
                if held is not None and got is not None:
                    self._pin_checkpoint(held, got)
                return got
        return got  # consistent still (each record names its checkpoint), only not the newest

    def _unchanged(self, held: _Handles) -> _Snapshot | None:
        """The cached snapshot, when under the lock both files are the ones it
        was read from or written as, unchanged: the checkpoint (its inode
        pinned) and the journal (its inode held) have the (inode, size, mtime)
        it recorded.  None: read them."""
        cache = self._cache
        if cache is None or held.checkpoint is None:
            return None
        try:
            st = os.stat(self.ledger_path)
        except FileNotFoundError:
            return None
        if (st.st_ino != held.checkpoint_ino
                or (st.st_ino, st.st_size, st.st_mtime_ns) != cache.checkpoint_key):
            return None
        try:
            st = os.stat(self.journal_path)
        except FileNotFoundError:
            return cache if cache.journal_key is None else None
        if (held.journal is None or st.st_ino != held.journal_ino
                or (st.st_ino, st.st_size, st.st_mtime_ns) != cache.journal_key):
            return None
        return cache

    def _pin_checkpoint(self, held: _Handles, snap: _Snapshot) -> None:
        """Keep the checkpoint ``snap`` was read from (or written as) open, once
        the file at the path has its identity and last bytes."""
        if held.checkpoint is not None and held.checkpoint_ino == snap.checkpoint_key[0]:
            return
        held.drop("checkpoint")
        with contextlib.suppress(OSError):
            fd = os.open(self.ledger_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if ((st.st_ino, st.st_size, st.st_mtime_ns) == snap.checkpoint_key
                        and os.pread(fd, CHECKSUM_TAIL_BYTES, max(st.st_size - CHECKSUM_TAIL_BYTES, 0))
                        == snap.checkpoint_tail):
                    held.checkpoint, held.checkpoint_ino, fd = fd, st.st_ino, -1
            finally:
                if fd >= 0:
                    os.close(fd)

    def _read_once(self, lazy: bool = False) -> _Snapshot | None | object:
        cache = self._cache  # once: a commit thread may replace it meanwhile
        if cache is not None and cache.lazy and not lazy:
            cache = None  # a reader other than a commit validates the checkpoint whole
        try:
            fd = os.open(self.ledger_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        data = None
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            # Same inode, size and mtime can still be another file (an inode
            # reused within one timestamp tick); the checksum at the tail
            # cannot, and costs one small read to compare.
            if (cache is None or cache.checkpoint_key != key
                    or os.pread(fd, CHECKSUM_TAIL_BYTES, max(st.st_size - CHECKSUM_TAIL_BYTES, 0))
                    != cache.checkpoint_tail):
                cache = None
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read()
        finally:
            os.close(fd)
        memo = self._memo() if data is not None and lazy else None
        sealed = _sealed_already
        if data is not None:
            base, layout, sealed = _decode_checkpoint(data, memo)
            snap = _Snapshot(key, data[-CHECKSUM_TAIL_BYTES:], data[-67:-3].decode(), base,
                             None, 0, b"", 0, base, type(base.sessions) is _LazyRecords, layout)
        else:
            snap = cache
        if not sealed():  # before any record of it is read for the journal's records
            raise _unsealed()
        snap = self._read_journal(snap, cache)
        if memo is not None and snap.lazy:
            _seed_from_memo(snap, memo)
        try:
            st = os.stat(self.ledger_path)
        except FileNotFoundError:
            return _RACED
        if (st.st_ino, st.st_size, st.st_mtime_ns) != key:
            return _RACED
        self._cache = snap
        return snap

    def _memo(self) -> bytes | None:
        """The ``ledger.validated`` memo, if there is one."""
        try:
            with open(self.tmp_dir / MEMO_NAME, "rb") as f:
                return f.read(MEMO_MAX_BYTES)
        except OSError:
            return None

    def last_read(self) -> _Snapshot | None:
        """The snapshot the last read or write of this store left."""
        return self._cache

    def with_journal(self, raw: bytes, checkpoint: Ledger) -> _Snapshot:
        """The journal as it is now applied on checkpoint bytes already
        decoded (the gate's), without touching this store's cache."""
        snap = _Snapshot((0, 0, 0), raw[-CHECKSUM_TAIL_BYTES:], raw[-67:-3].decode(), checkpoint,
                         None, 0, b"", 0, checkpoint)
        return self._read_journal(snap, None)

    def _read_journal(self, snap: _Snapshot, cache: _Snapshot | None) -> _Snapshot:
        """``snap`` (its checkpoint) with the journal as it is now: only the
        bytes past what ``cache`` (same checkpoint) already applied are read."""
        try:
            fd = os.open(self.journal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return attrs.evolve(snap, journal_key=None, journal_end=0, journal_tail=b"", records=0,
                                ledger=snap.base)
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            start, ledger, records = 0, snap.base, 0
            if (cache is not None and cache.journal_key is not None
                    and cache.journal_key[0] == st.st_ino and st.st_size >= cache.journal_end
                    and os.pread(fd, len(cache.journal_tail), cache.journal_end - len(cache.journal_tail))
                    == cache.journal_tail):
                if cache.journal_key == key:
                    return cache
                start, ledger, records = cache.journal_end, cache.ledger, cache.records
            with os.fdopen(os.dup(fd), "rb") as f:
                f.seek(start)
                data = f.read()
        finally:
            os.close(fd)
        found, _ = journal_records(data, snap.digest, ledger.revision, rc.strict_loads)
        changes, end = [], 0
        for doc, at in found:
            change = _journal_change(doc)
            if change is None:  # checks out byte-wise but not as records: the journal ends here
                break
            changes.append(change)
            end = at
        if changes:
            ledger = _apply_changes(ledger, changes)
        before = cache.journal_tail if start and cache is not None else b""
        return attrs.evolve(snap, journal_key=key, journal_end=start + end,
                            journal_tail=(before + data[:end])[-JOURNAL_TAIL_BYTES:],
                            records=records + len(changes), ledger=ledger)

    # -- writing ----------------------------------------------------------------

    def write(self, ledger: Ledger) -> None:
        """Temp file in the same directory, fsync, rename, fsync the directory.

        A failure at any step fails the write and is never retried on the same
        descriptor (after a failed fsync the kernel may have dropped the dirty
        pages: the PostgreSQL lesson); the ledger stays the old or the new one.
        """
        layout: dict[str, list[int]] = {}
        head, tail = _encode_sealed(ledger, layout)
        tmp = self.state_dir / f"{TEMP_PREFIX}{os.getpid()}.{os.urandom(4).hex()}"
        try:
            _make_dirs(self.state_dir)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, head)
                _write_all(fd, tail)
                _failpoint("after_temp_write")
                os.fsync(fd)
                _failpoint("after_temp_fsync")
            finally:
                os.close(fd)
            os.replace(tmp, self.ledger_path)
            st = os.stat(self.ledger_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _io_failure("write the ledger", exc, self.ledger_path) from exc
        _failpoint("after_rename")
        try:
            _fsync_dir(self.state_dir)
        except OSError as exc:
            raise _io_failure("fsync the ledger directory", exc, self.state_dir,
                              "the change is in place but not known to be durable, so it was not "
                              "acknowledged; `python -m relay status` shows it") from exc
        _failpoint("after_dir_fsync")
        journal_key = self._cut_journal()
        _failpoint("after_journal_cut")
        last = head[len(tail) - CHECKSUM_TAIL_BYTES :] + tail  # the file's last bytes
        self._cache = _Snapshot((st.st_ino, st.st_size, st.st_mtime_ns), last, tail[:-3].decode(),
                                ledger, journal_key, 0, b"", 0, ledger, layout=layout)
        if (held := self._held()) is not None:
            self._pin_checkpoint(held, self._cache)
        self._record_validated(tail[:-3], 0, ledger, layout)

    def _cut_journal(self) -> tuple[int, int, int] | None:
        """Empty the journal after a checkpoint; returns its identity.  Not
        fsync'd and allowed to fail: its records name the old checkpoint's
        checksum, so none of them counts any more either way."""
        try:
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size:
                os.ftruncate(fd, 0)
            st = os.fstat(fd)
            return (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return None
        finally:
            os.close(fd)

    def commit_write(self, snap: _Snapshot | None, ledger: Ledger, checkpoint: bool = False) -> None:
        """Make ``ledger``, a commit on ``snap.ledger`` (read under the lock),
        durable: one journal record when this store journals, the change can
        be told record by record and the journal has room; else a checkpoint."""
        room = self._journal_room(snap) if not checkpoint else 0
        if room:
            changes = _ledger_changes(snap.ledger, ledger)
            if changes is not None:
                line = _journal_record(snap.digest, snap.ledger, ledger, *changes)
                if snap.journal_end + len(line) <= room and self._append_journal(snap, line, ledger):
                    return
        self.write(ledger)

    def _journal_room(self, snap: _Snapshot | None) -> int:
        """How long this commit's journal record may make the journal (0: write
        a checkpoint).  A store that does not journal (a CLI process) appends
        too once the checkpoint is big, within a smaller journal (see "CLI
        commits on a big ledger" in specs/flow-relay-contract.md)."""
        if snap is None:
            return 0
        if self.journal:
            return _journal_budget(snap.checkpoint_key[1])
        return CLI_JOURNAL_BYTES if snap.checkpoint_key[1] >= CLI_JOURNAL_CHECKPOINT_BYTES else 0

    def _append_journal(self, snap: _Snapshot, line: bytes, ledger: Ledger) -> bool:
        """Cut the journal back to the end of its last record that counts,
        append ``line``, fdatasync.  False (write a checkpoint instead) when
        the journal is shorter than what was read under this lock: someone
        removed it, and the ledger in hand still holds its records."""
        path, end = self.journal_path, snap.journal_end
        held, keep = self._held(), False
        try:
            created = False
            if (held is not None and held.journal is not None and snap.journal_key is not None
                    and snap.journal_key[0] == held.journal_ino):
                # The journal this lock's read found at the path (``_unchanged``, ``_read_journal``).
                fd, held.journal = held.journal, None
            else:
                if held is not None:
                    held.drop("journal")
                try:  # the usual case first: one open, not a failed O_EXCL create and a second open
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    try:
                        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                        created = True
                    except FileExistsError:  # made meanwhile by something that ignores the lock
                        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size < end:
                    return False
                if size != end:
                    os.ftruncate(fd, end)  # a torn or stale tail: never counted, cut before the append
                try:
                    _pwrite_all(fd, line, end)
                    _failpoint("after_journal_write")
                    os.fdatasync(fd)
                except OSError:
                    # Not known durable, so no reader may count it (and the
                    # pages may be gone: never fsync'd again on this descriptor).
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, end)
                    raise
                _failpoint("after_journal_fsync")
                st = os.fstat(fd)
                keep = held is not None  # kept only after a good write: a failed one closes it
            finally:
                if keep:
                    held.journal, held.journal_ino = fd, st.st_ino
                else:
                    os.close(fd)
        except OSError as exc:
            raise _io_failure("append to the ledger journal", exc, path) from exc
        if created:
            try:
                _fsync_dir(self.state_dir)
            except OSError as exc:
                raise _io_failure("fsync the ledger directory", exc, self.state_dir,
                                  "the change is in place but not known to be durable, so it was "
                                  "not acknowledged; `python -m relay status` shows it") from exc
        new_end = end + len(line)
        self._cache = attrs.evolve(snap, journal_key=(st.st_ino, st.st_size, st.st_mtime_ns),
                                   journal_end=new_end, journal_tail=line[-JOURNAL_TAIL_BYTES:],
                                   records=snap.records + 1, ledger=ledger)
        self._record_validated(snap.digest.encode(), new_end, ledger, snap.layout)
        return True

    def _record_validated(self, checksum: bytes, journal_end: int, ledger: Ledger,
                          layout: dict[str, list[int]] | None = None) -> None:
        """Tell the fast status path that the checkpoint with this checksum and
        ``journal_end`` bytes of journal came from the typed model, and what
        ``ledger``, the ledger they make, counts (``memo_bytes``).  Scratch,
        not truth: losing it only makes ``status`` slower.  ``checksum`` is
        the hex digest ``encode_ledger`` wrote at the tail (no second hash)."""
        tally, laid = ledger_tally(ledger), _checkpoint_layout(layout)
        memo = memo_bytes(checksum, journal_end, {**tally, "layout": laid} if laid else tally)
        # Overwritten in place, never truncated: most memos have the same
        # length, and O_TRUNC on a file about to be rewritten makes ext4 start
        # writeback at close (its replace-via-truncate heuristic), which cost
        # ~17% of a commit.  A torn or stale memo fails its CRC or does not
        # match, and then the fast path falls back to full validation.
        with contextlib.suppress(OSError):
            self._write_memo(memo)

    def _write_memo(self, data: bytes) -> None:
        """Overwrite the memo in place with ``data`` (and cut what an older,
        longer one left).  A journaling store keeps the descriptor open while
        the file is still linked (``rm -rf flow/tmp``, ``state cleanup`` or a
        replacement unlinks it: then the path is opened again)."""
        held = self._held()
        if held is not None and held.memo is not None:
            try:
                os.pwrite(held.memo, data, 0)
                st = os.fstat(held.memo)
            except OSError:
                st = None
            if st is not None and st.st_nlink:
                if st.st_size != len(data):
                    os.ftruncate(held.memo, len(data))
                return
            held.drop("memo")
        fd = os.open(self.tmp_dir / MEMO_NAME, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, data, 0)
            if os.fstat(fd).st_size != len(data):  # an older, longer or empty memo
                os.ftruncate(fd, len(data))
            if held is not None:
                held.memo, fd = fd, -1
        finally:
            if fd >= 0:
                os.close(fd)

    def sweep_orphan_temps(self) -> list[str]:
        """``remove_orphan_temps`` unless the state directory is unchanged since
        the last sweep (call only under the lock).  A temp file is created
        only under the lock, so a writer that left one changed the directory
        after that sweep; a long-lived store (the server's) then pays one
        stat per commit instead of a listing."""
        held = self._held()
        st = held.dir_stat if held is not None and held.dir_stat is not None else os.stat(self.state_dir)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if key == self._swept:
            return []
        # Taken before the sweep: an unlink by it changes the directory, and
        # the next commit lists it once more (and finds nothing).  Kept only
        # once the directory has settled: a change within the same timestamp
        # tick as the last one would leave mtime and ctime as they are.
        settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SWEEP_SETTLED_NS
        removed, self._swept = self.remove_orphan_temps(), key if settled else None
        return removed

    def remove_orphan_temps(self) -> list[str]:
        """Delete temp files a crashed writer left (call only under the lock)."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.state_dir):
                if entry.name.startswith(TEMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    removed.append(entry.name)
        return removed

    # -- stream logs ------------------------------------------------------------

    def append_records(self, session_id: str, stream: str, committed: int,
                       records: list[rc.StreamRecord]) -> int:
        """Cut the log back to its committed length, append, fsync; returns the
        new length.  The caller commits that length in the ledger.  A log
        shorter than ``committed`` (or gone) is refused with ``data_loss``:
        growing it back would acknowledge records behind a hole no one can read."""
        return self.append_logs([(session_id, stream, committed, records)])[0]

    def append_logs(self, appends: list[tuple[str, str, int, list[rc.StreamRecord]]]) -> list[int]:
        """``append_records`` for several logs (session id, stream, committed
        length, records): every log is cut and written first, then all are
        synced, concurrently on a journaling store (the server's: one commit's
        logs then cost about one sync, not one each); returns the new lengths.
        Nothing is committed unless every sync succeeded."""
        opened: list[tuple[int, Path, str, int]] = []  # fd, path, stream, committed
        sizes = []
        try:
            for session_id, stream, committed, records in appends:
                sizes.append(self._write_log(session_id, stream, committed, records, opened))
            _failpoint("after_logs_written")
            # fdatasync is enough for an append (it flushes the new size, not
            # the mtime): the journaling store's, whose commits are about this.
            sync = os.fdatasync if self.journal else os.fsync
            failures = _sync_all([fd for fd, *_ in opened], sync, concurrent=self.journal)
            for (_, path, stream, _), exc in zip(opened, failures, strict=True):
                if exc is not None:
                    raise _io_failure(f"append to the {stream} log", exc, path) from exc
            _failpoint("after_logs_synced")
        finally:
            for fd, *_ in opened:
                os.close(fd)
        for _, path, _, committed in opened:
            if committed == 0:
                try:
                    _fsync_dir(path.parent)
                except OSError as exc:
                    raise _io_failure("fsync the stream directory", exc, path.parent) from exc
        return sizes

    def _write_log(self, session_id: str, stream: str, committed: int,
                   records: list[rc.StreamRecord], opened: list[tuple[int, Path, str, int]]) -> int:
        """Open the log (adding its descriptor to ``opened``, for the caller to
        sync and close), cut it to ``committed``, write ``records`` there;
        returns the new length."""
        path = self.stream_path(session_id, stream)
        data = b"".join(encode_record(r) for r in records)
        try:
            if committed:  # a log the ledger says holds records is never re-created
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            else:
                _make_dirs(path.parent)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise _short_log(session_id, stream, path, None, committed) from None
        except OSError as exc:
            raise _io_failure(f"open the {stream} log", exc, path) from exc
        opened.append((fd, path, stream, committed))
        try:
            size = os.fstat(fd).st_size
            if size < committed:
                raise _short_log(session_id, stream, path, size, committed)
            if size != committed:
                os.ftruncate(fd, committed)
            os.lseek(fd, committed, os.SEEK_SET)
            _write_all(fd, data)
        except OSError as exc:
            raise _io_failure(f"append to the {stream} log", exc, path) from exc
        return committed + len(data)

    def short_log(self, session_id: str, stream: str, committed: int) -> rc.DataLoss | None:
        """The ``data_loss`` refusal for a log shorter than its committed length
        (or missing), else None: appends to it are refused before they apply."""
        if committed == 0:
            return None
        path = self.stream_path(session_id, stream)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = None
        return None if size is not None and size >= committed else _short_log(
            session_id, stream, path, size, committed)

    def read_records(self, session_id: str, stream: str, committed: int, after: int,
                     limit: int) -> list[rc.StreamRecord]:
        """Records with seq > ``after``, in order, from the committed part only."""
        if committed == 0:
            return []
        path = self.stream_path(session_id, stream)
        with open(path, "rb") as f:
            start = _seek_after(f, committed, after)
            f.seek(start)
            out = []
            while len(out) < limit and f.tell() < committed:
                record = decode_record(f.readline())
                if record.seq > after:
                    out.append(record)
            return out

    def scan_records(self, session_id: str, stream: str, committed: int) -> Iterator[rc.StreamRecord]:
        """Every committed record, checking checksums (used by gate and tests)."""
        if committed == 0:
            return
        with open(self.stream_path(session_id, stream), "rb") as f:
            while f.tell() < committed:
                yield decode_record(f.readline())

    # -- archive ------------------------------------------------------------------

    def archive_streams(self, session_id: str, revision: int) -> None:
        """Move an archived session's stream logs to ``archive/streams/<id>.<revision>/``
        (readable there as they were; a later session given the same id starts
        fresh logs instead of cutting these).  Nothing to move is no error."""
        source = self.state_dir / STREAMS_DIR / session_id
        target_dir = self.state_dir / ARCHIVE_DIR / STREAMS_DIR
        try:
            if not source.exists():
                return
            _make_dirs(target_dir)
            os.replace(source, target_dir / f"{session_id}.{revision}")
            _fsync_dir(target_dir)
            _fsync_dir(source.parent)
        except OSError as exc:
            raise _io_failure("move an archived session's stream logs", exc, source) from exc

    def archive(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Append rows to ``archive/<name>.jsonl`` durably, before the ledger
        drops them (a crash in between only repeats a row in the archive)."""
        directory = self.state_dir / ARCHIVE_DIR
        path = directory / f"{name}.jsonl"
        data = b"".join(_canonical(r) + b"\n" for r in rows)
        try:
            _make_dirs(directory)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(directory)
        except OSError as exc:
            raise _io_failure(f"append to the {name} archive", exc, path) from exc


def _short_log(session_id: str, stream: str, path: Path, size: int | None,
               committed: int) -> rc.DataLoss:
    state = "is missing" if size is None else f"is {size} B"
    return rc.DataLoss(
        f"the {stream} log of session {session_id!r} {state}, shorter than its committed "
        f"{committed} B: {path}; appending would acknowledge records no one can read, so nothing "
        "was changed",
        hint=f"run `python -m relay gate`, restore the log from a backup, or run `python -m relay "
             f"quarantine session {session_id} --reason 'stream log damaged'` and go on in a new session")


def _seq_at(f: Any, offset: int) -> tuple[int, int] | None:
    """(seq, line start) of the first whole line at or after ``offset``."""
    if offset:
        f.seek(offset - 1)
        f.readline()  # finish the line ``offset`` falls in
    start = f.tell()
    line = f.readline()
    if not line:
        return None
    return decode_record(line).seq, start


def _seek_after(f: Any, committed: int, after: int) -> int:
    """Binary search for a line start at or before the first record with seq >
    ``after``: O(log n) seeks, whatever the history's length."""
    lo, hi = 0, committed
    best = 0
    while hi - lo > 4 * KIB:
        mid = (lo + hi) // 2
        found = _seq_at(f, mid)
        if found is None or found[1] >= committed:
            hi = mid
            continue
        seq, start = found
        if seq <= after:
            best, lo = start, mid
        else:
            hi = mid
    return best


# -- the request log ----------------------------------------------------------------
#
# Idempotency keys of committed mutations live outside the ledger, in
# ``requests/<start>-<span>/<shard>.log``: time buckets of ``span`` seconds
# (retention / 24), each of ``REQUEST_SHARDS`` files of lines in the stream log
# format.  The ledger's ``request_log`` cursor names the current bucket and the
# committed length of each of its shards; older buckets are sealed (cut to
# their committed lengths when the cursor moved on), so every byte a reader
# uses was committed by a ledger write.  Records are appended and fsync'd
# under the lock before the ledger rename; a writer killed in between leaves
# bytes past the cursor, which no reader uses and the next writer cuts off.
# Every lookup happens under the lock, inside a commit.


def _bucket_span(config: Config) -> int:
    return max(config.request_retention_seconds // REQUEST_BUCKETS_PER_RETENTION, 1)


def _bucket_start(name: str) -> int:
    return int(name.split("-")[0])


def _bucket_expired(name: str, now: float, config: Config) -> bool:
    start, span = (int(x) for x in name.split("-"))
    return start + span + config.request_retention_seconds <= now


def _request_shard(key: str) -> int:
    return _sha256(key.encode()).digest()[0] % REQUEST_SHARDS


def _encode_request(key: str, record: RequestRecord) -> bytes:
    body = _canonical({"key": key, **to_json(record)})
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _request_log_damaged(path: Path, what: str) -> rc.DataLoss:
    """The refusal of a request id whose request-log shard is damaged: its
    first answer cannot be found, so applying it again could apply it twice."""
    return rc.DataLoss(
        f"the request log {path} {what}; a request id kept there cannot be told from a "
        "new one, so this request was not applied (it may be a retry of one that was)",
        hint="restore flow/state/relay/requests from a backup (then restart a running "
             "`python -m relay serve`); or check with a read "
             "(e.g. `python -m relay event list`) whether the first attempt landed and "
             "retry only with a new request id")


def _decode_request(line: bytes, path: Path) -> tuple[str, RequestRecord]:
    """One request-log line -> (key, record); raises DataLoss on damage."""
    body = line[9:-1]
    if len(line) < 11 or line[8:9] != b" " or line[:8] != b"%08x" % zlib.crc32(body):
        raise _request_log_damaged(path, "has a record whose checksum does not match")
    try:
        doc = json.loads(body)
        key = doc.pop("key")
        return key, from_json(RequestRecord, doc)
    except (ValueError, KeyError, AttributeError, RelayError):
        raise _request_log_damaged(path, "has a record that is not a request record") from None


def _request_lines(path: Path, start: int, end: int | None) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the whole lines of ``path`` in [start, end).  Up to a
    committed ``end`` every byte must be there, in whole lines (DataLoss
    otherwise: a missing or cut shard would silently forget request ids)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; a generator holds it
    except FileNotFoundError:
        if end is not None and end > start:
            raise _request_log_damaged(path, f"is missing (committed {end} B)") from None
        return
    with f:
        f.seek(start)
        while end is None or f.tell() < end:
            offset = f.tell()
            line = f.readline()
            if end is not None and (not line.endswith(b"\n") or offset + len(line) > end):
                raise _request_log_damaged(path, f"is cut or torn before its committed {end} B")
            if not line.endswith(b"\n"):
                return  # a torn tail of a sealed bucket cannot be committed
            yield offset, line


def _live_buckets(store: Store, cursor: RequestLogCursor, now: float, config: Config) -> list[str]:
    """The committed buckets not yet expired: the cursor's and those before it."""
    if not cursor.bucket:
        return []
    try:
        names = set(os.listdir(store.state_dir / REQUESTS_DIR))
    except FileNotFoundError:
        names = set()
    names.add(cursor.bucket)  # committed: its shards are checked even if its directory is gone
    cut = _bucket_start(cursor.bucket)
    return sorted((n for n in names if _BUCKET_PATTERN.fullmatch(n) and _bucket_start(n) <= cut
                   and not _bucket_expired(n, now, config)), key=_bucket_start)


def _committed_end(cursor: RequestLogCursor, bucket: str, shard: int) -> int | None:
    return cursor.shard_bytes[shard] if bucket == cursor.bucket else None


def _scan_request(store: Store, ledger: Ledger, key: str, now: float,
                  config: Config) -> RequestRecord | None:
    """Look ``key`` up on disk: its shard in each live bucket, committed bytes only."""
    shard = _request_shard(key)
    for bucket in _live_buckets(store, ledger.request_log, now, config):
        path = store.state_dir / REQUESTS_DIR / bucket / f"{shard:x}.log"
        for _, line in _request_lines(path, 0, _committed_end(ledger.request_log, bucket, shard)):
            if key.encode() in line:
                found, record = _decode_request(line, path)
                if found == key:
                    return record
    return None


#: Keys a ``_KeyTable`` takes into its dict before merging them into its arrays.
_KEY_TABLE_BATCH: Final = 1024


def _key_hash(key: str) -> int:
    """What the server's index keeps of a request-log key: 64 bits of its SHA-256."""
    return int.from_bytes(_sha256(key.encode()).digest()[:8], "big")


@attrs.define(eq=False)
class _KeyTable:
    """Key hashes -> record offsets of one shard of one bucket: two sorted
    arrays (16 bytes a key, against ~250 for a dict of key strings and
    tuples: a day of request ids at a steady rate must not grow the server
    by gigabytes), and a small dict of the newest keys, merged in batches."""

    hashes: Any = attrs.Factory(lambda: array.array("Q"))
    offsets: Any = attrs.Factory(lambda: array.array("Q"))
    newest: dict[int, int] = attrs.Factory(dict)

    def add(self, hashed: int, offset: int) -> None:
        self.newest[hashed] = offset
        if len(self.newest) >= _KEY_TABLE_BATCH:
            self._merge()

    def seal(self) -> None:
        """No more keys come (a sealed bucket): its newest go into the arrays,
        so what a day of buckets holds is 16 bytes a key, no dict left over."""
        if self.newest:
            self._merge()

    def _merge(self) -> None:
        """The newest keys into the arrays (a newest offset replaces an
        older one), copying runs of the old arrays between them as slices:
        no dict or int object per key held (a shard of a busy hour holds
        tens of thousands, and a transient of that many small objects is
        what fragments a long-running server's heap)."""
        hashes, offsets = array.array("Q"), array.array("Q")
        at = 0
        for hashed, offset in sorted(self.newest.items()):
            until = bisect.bisect_left(self.hashes, hashed, at)
            hashes.extend(self.hashes[at:until])
            offsets.extend(self.offsets[at:until])
            hashes.append(hashed)
            offsets.append(offset)
            at = until + (until < len(self.hashes) and self.hashes[until] == hashed)
        hashes.extend(self.hashes[at:])
        offsets.extend(self.offsets[at:])
        self.hashes, self.offsets, self.newest = hashes, offsets, {}

    def find(self, hashed: int) -> int | None:
        offset = self.newest.get(hashed)
        if offset is not None:
            return offset
        i = bisect.bisect_left(self.hashes, hashed)
        return self.offsets[i] if i < len(self.hashes) and self.hashes[i] == hashed else None


#: Keys of one shard the server holds in memory (a ``_KeyTable``) before it
#: merges them into the shard's index file: what the index keeps in memory is
#: bounded by this x 16 shards whatever the request rate and retention.
_INDEX_FLUSH_KEYS: Final = _KEY_TABLE_BATCH
#: An index file's entries are read a block of this many at a time; the server
#: keeps each block's first hash and checksum (12 bytes a block) in memory.
_INDEX_BLOCK: Final = 256
_INDEX_MAGIC: Final = b"FRQX"
_INDEX_VERSION: Final = 1
#: magic, version, covered (log bytes indexed), entries, where the last record
#: indexed starts and its line's crc32, crc32 of the entries, crc32 of the header.
_INDEX_HEADER: Final = struct.Struct("<4sIQQQIII")
_INDEX_ENTRY: Final = 16  # a key's 64-bit hash and its record's offset, little-endian


def _index_path(log: Path) -> Path:
    return log.with_suffix(".idx")


def _entries_bytes(hashes: Any, offsets: Any) -> bytes:
    pairs = array.array("Q", bytes(len(hashes) * _INDEX_ENTRY))
    pairs[0::2], pairs[1::2] = hashes, offsets
    if sys.byteorder == "big":  # pragma: no cover - the file is little-endian everywhere
        pairs.byteswap()
    return pairs.tobytes()


def _entries_arrays(data: bytes) -> tuple[Any, Any]:
    pairs = array.array("Q")
    pairs.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        pairs.byteswap()
    return pairs[0::2], pairs[1::2]


class _StaleIndex(Exception):
    """An index file no longer reads as it did when it was loaded."""


@attrs.frozen(eq=False)
class _IndexFile:
    """A shard's index file, as loaded: what it covers, and per block of
    ``_INDEX_BLOCK`` entries its first hash and checksum (the entries stay on
    disk; a lookup reads one block with ``pread`` and checks it)."""

    path: Path
    covered: int
    count: int
    firsts: Any  # array("Q")
    crcs: Any  # array("I")

    @classmethod
    def of(cls, path: Path, covered: int, hashes: Any, data: bytes) -> _IndexFile:
        size = _INDEX_BLOCK * _INDEX_ENTRY
        return cls(path, covered, len(hashes), hashes[0::_INDEX_BLOCK],
                   array.array("I", (zlib.crc32(data[at:at + size]) for at in range(0, len(data), size))))

    def find(self, hashed: int) -> int | None:
        block = bisect.bisect_right(self.firsts, hashed) - 1
        if block < 0:
            return None
        at = _INDEX_HEADER.size + block * _INDEX_BLOCK * _INDEX_ENTRY
        length = min(_INDEX_BLOCK, self.count - block * _INDEX_BLOCK) * _INDEX_ENTRY
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, length, at)
            finally:
                os.close(fd)
        except OSError:
            raise _StaleIndex from None
        if len(data) != length or zlib.crc32(data) != self.crcs[block]:
            raise _StaleIndex
        hashes, offsets = _entries_arrays(data)
        i = bisect.bisect_left(hashes, hashed)
        return offsets[i] if i < len(hashes) and hashes[i] == hashed else None


def _read_index_file(path: Path, log: Path, end: int | None) -> tuple[_IndexFile, Any, Any] | None:
    """The index file of ``log`` if it is whole and fits the log's committed
    bytes (``end``; a sealed shard's whole file when None): else None, and the
    caller reads the log instead.  Never trusted beyond its checks: a torn,
    stale or foreign file is ignored and rewritten."""
    try:
        data = path.read_bytes()
        size = os.stat(log).st_size if end is None else end
    except OSError:
        return None
    if len(data) < _INDEX_HEADER.size:
        return None
    magic, version, covered, count, last, last_crc, crc, header_crc = _INDEX_HEADER.unpack_from(data)
    body = data[_INDEX_HEADER.size:]
    if (magic != _INDEX_MAGIC or version != _INDEX_VERSION
            or header_crc != zlib.crc32(data[:_INDEX_HEADER.size - 4])
            or len(body) != count * _INDEX_ENTRY or zlib.crc32(body) != crc or covered > size):
        return None
    hashes, offsets = _entries_arrays(body)
    if (any(a >= b for a, b in itertools.pairwise(hashes))
            or (count and max(offsets) != last) or (count == 0) != (covered == 0)):
        return None
    # The log must still hold, where the file says, the last record it indexed
    # (a log cut back and written again, e.g. under a ledger restored from a
    # backup, holds other records there).
    if covered and _last_line_crc(log, last, covered) != last_crc:
        return None
    return _IndexFile.of(path, covered, hashes, body), hashes, offsets


def _last_line_crc(log: Path, start: int, end: int) -> int | None:
    """crc32 of the record ``log`` holds in [start, end) (None unless one whole line)."""
    try:
        fd = os.open(log, os.O_RDONLY | os.O_CLOEXEC)
        try:
            line = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(line) != end - start or not line.endswith(b"\n") or b"\n" in line[:-1]:
        return None
    return zlib.crc32(line)


def _write_index_file(path: Path, log: Path, covered: int, hashes: Any, offsets: Any) -> _IndexFile:
    """Write the index file of ``log`` whole (temp file, rename).  It is
    derived from the log and checked whenever it is read, so it needs no
    fsync: a crash leaves the old one, a torn one, or none, and each is
    ignored or rebuilt."""
    body = _entries_bytes(hashes, offsets)
    last = max(offsets)
    last_crc = _last_line_crc(log, last, covered)
    if last_crc is None:
        raise OSError(errno.EIO, "the request log does not hold the last record indexed", str(log))
    head = _INDEX_HEADER.pack(_INDEX_MAGIC, _INDEX_VERSION, covered, len(hashes), last, last_crc,
                              zlib.crc32(body), 0)
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as f:
        f.write(head + body)
    os.replace(temp, path)
    return _IndexFile.of(path, covered, hashes, body)


@attrs.define(eq=False)
class RequestIndex:
    """The server's map of request-log keys to where their records are, kept
    in step with the ledger's cursor (its own commits and other processes').
    It keeps 64-bit hashes of the keys, not the keys (``_KeyTable``): a hit
    is confirmed by the record it points at, and a record of another key
    there (a hash collision, about one in 10^9 at a million keys) falls back
    to reading that shard.  A shard's keys beyond ``_INDEX_FLUSH_KEYS`` go to
    its index file (``<shard>.idx`` beside the log, sorted, read a checked
    block at a time), so the memory it holds does not grow with the request
    rate or the retention; a missing, torn or stale file is rebuilt from the
    log, never trusted."""

    bucket: str = ""
    offsets: list[int] = attrs.Factory(list)
    #: (bucket, shard) -> its keys' hashes and offsets not in its index file.
    tables: dict[tuple[str, int], _KeyTable] = attrs.Factory(dict)
    #: (bucket, shard) -> its index file (the log's keys up to its ``covered``).
    files: dict[tuple[str, int], _IndexFile] = attrs.Factory(dict)
    #: (bucket, shard) -> why it could not be read whole: its keys are refused, not forgotten.
    damaged: dict[tuple[str, int], rc.DataLoss] = attrs.Factory(dict)

    def sync(self, store: Store, cursor: RequestLogCursor, now: float, config: Config) -> None:
        """Read whatever was committed since the last sync (cheap when nothing was)."""
        if cursor.bucket != self.bucket or any(
                n < seen for n, seen in zip(cursor.shard_bytes, self.offsets, strict=True)):
            self._reload(store, cursor, now, config)
            return
        for shard, end in enumerate(cursor.shard_bytes):
            if end > self.offsets[shard]:
                self._read(store, cursor.bucket, shard, self.offsets[shard], end)
                self.offsets[shard] = end
                self._flush_if_full(store, shard)

    def _reload(self, store: Store, cursor: RequestLogCursor, now: float, config: Config) -> None:
        """Rebuild from disk (start-up, a new bucket, a reset ledger).  Holding
        the previous bucket's keys avoids rereading it when the cursor only
        moved on to the next bucket: its tail past our offsets is read instead.
        Each shard's index file, where it is whole and fits the log, stands
        for the log up to what it covers."""
        live = _live_buckets(store, cursor, now, config)
        moved_on = self.bucket != cursor.bucket and self.bucket in live and self.offsets
        previous = self.bucket if moved_on else ""
        ends: dict[tuple[str, int], int] = {}
        if previous:
            for shard, seen in enumerate(self.offsets):
                ends[(previous, shard)] = self._read(store, previous, shard, seen, None)
            self.tables = {k: v for k, v in self.tables.items() if k[0] in live}
            self.files = {k: v for k, v in self.files.items() if k[0] in live}
            self.damaged = {k: v for k, v in self.damaged.items() if k[0] in live}
        else:
            self.tables, self.files, self.damaged = {}, {}, {}
        for bucket in live:
            if bucket == previous or (previous and _bucket_start(bucket) < _bucket_start(previous)):
                continue
            for shard in range(REQUEST_SHARDS):
                ends[(bucket, shard)] = self._load(store, bucket, shard,
                                                   _committed_end(cursor, bucket, shard))
        for (bucket, shard), end in ends.items():
            if bucket != cursor.bucket:  # sealed: everything goes to its file
                self._flush(store, bucket, shard, end)
        for (bucket, _), table in self.tables.items():
            if bucket != cursor.bucket:
                table.seal()
        self.bucket, self.offsets = cursor.bucket, list(cursor.shard_bytes)
        for shard in range(len(self.offsets)):
            self._flush_if_full(store, shard)

    def _log(self, store: Store, bucket: str, shard: int) -> Path:
        return store.state_dir / REQUESTS_DIR / bucket / f"{shard:x}.log"

    def _table(self, bucket: str, shard: int) -> _KeyTable:
        table = self.tables.get((bucket, shard))
        if table is None:
            table = self.tables[(bucket, shard)] = _KeyTable()
        return table

    def _load(self, store: Store, bucket: str, shard: int, end: int | None) -> int:
        """Take a shard from its index file (if it can be trusted) and the log
        past it; returns where the log's records end."""
        log = self._log(store, bucket, shard)
        loaded = _read_index_file(_index_path(log), log, end)
        start = 0
        if loaded is not None:
            self.files[(bucket, shard)] = loaded[0]
            start = loaded[0].covered
        return self._read(store, bucket, shard, start, end)

    def _read(self, store: Store, bucket: str, shard: int, start: int, end: int | None) -> int:
        path = self._log(store, bucket, shard)
        table = self._table(bucket, shard)
        at = start
        try:
            for offset, line in _request_lines(path, start, end):
                table.add(_key_hash(_decode_request(line, path)[0]), offset)
                at = offset + len(line)
        except rc.DataLoss as exc:
            self.damaged[(bucket, shard)] = exc
        return at

    def _flush_if_full(self, store: Store, shard: int) -> None:
        table = self.tables.get((self.bucket, shard))
        if table is not None and len(table.hashes) + len(table.newest) >= _INDEX_FLUSH_KEYS:
            self._flush(store, self.bucket, shard, self.offsets[shard])

    def _flush(self, store: Store, bucket: str, shard: int, covered: int) -> None:
        """Merge a shard's table (its keys up to ``covered``) into its index
        file and drop it.  A damaged shard keeps what it has; a file that
        cannot be written keeps the keys in memory (tried again later)."""
        key = (bucket, shard)
        table = self.tables.get(key)
        if key in self.damaged or table is None:
            return
        if not (table.hashes or table.newest):
            del self.tables[key]  # nothing to merge: hold no table for it
            return
        old = self.files.get(key)
        log = self._log(store, bucket, shard)
        loaded = _read_index_file(old.path, log, covered) if old is not None else None
        if old is not None and (loaded is None or loaded[0].covered != old.covered):
            # It changed under us: index the log from its start instead.
            del self.files[key]
            table = self.tables[key] = _KeyTable()
            self._read(store, bucket, shard, 0, covered)
            if key in self.damaged:
                return
            loaded = None
        table.seal()
        merged = table
        if loaded is not None:
            merged = _KeyTable(loaded[1], loaded[2], dict(zip(table.hashes, table.offsets, strict=True)))
            merged._merge()
        try:
            self.files[key] = _write_index_file(_index_path(log), log, covered, merged.hashes,
                                                merged.offsets)
        except OSError:
            return
        del self.tables[key]

    def _rebuild(self, store: Store, bucket: str, shard: int) -> None:
        """A shard's index file is stale: index its log from the start in memory."""
        self.files.pop((bucket, shard), None)
        self.tables[(bucket, shard)] = _KeyTable()
        self._read(store, bucket, shard, 0, self.offsets[shard] if bucket == self.bucket else None)

    def _find(self, store: Store, bucket: str, shard: int, hashed: int) -> int | None:
        table = self.tables.get((bucket, shard))
        offset = table.find(hashed) if table is not None else None
        index = self.files.get((bucket, shard))
        if offset is None and index is not None:
            try:
                offset = index.find(hashed)
            except _StaleIndex:
                self._rebuild(store, bucket, shard)
                return self._find(store, bucket, shard, hashed)
        return offset

    def lookup(self, store: Store, key: str, now: float, config: Config) -> RequestRecord | None:
        shard, hashed = _request_shard(key), _key_hash(key)
        buckets = {bucket for bucket, in_shard in itertools.chain(self.tables, self.files)
                   if in_shard == shard}
        for bucket in sorted(buckets, key=_bucket_start, reverse=True):
            if _bucket_expired(bucket, now, config):
                break
            offset = self._find(store, bucket, shard, hashed)
            if offset is None:
                continue
            path = self._log(store, bucket, shard)
            for _, line in _request_lines(path, offset, None):
                found, record = _decode_request(line, path)
                if found == key:
                    return record
                if _key_hash(found) != hashed:
                    raise _request_log_damaged(path, f"no longer holds {key!r} where it was indexed")
                break  # another key with the same 64-bit hash: look at every record
            else:
                raise _request_log_damaged(path, f"was cut before the record of {key!r}")
            record = self._scan(path, key)
            if record is not None:
                return record
        for (bucket, damaged_shard), exc in self.damaged.items():
            if damaged_shard == shard and not _bucket_expired(bucket, now, config):
                raise exc
        return None

    @staticmethod
    def _scan(path: Path, key: str) -> RequestRecord | None:
        for _, line in _request_lines(path, 0, None):
            if key.encode() in line:
                found, record = _decode_request(line, path)
                if found == key:
                    return record
        return None

    def note(self, store: Store, cursor: RequestLogCursor,
             placed: dict[str, tuple[str, int, int]]) -> None:
        """Our own commit landed: take its records without reading them back."""
        if cursor.bucket == self.bucket and len(self.offsets) == REQUEST_SHARDS:
            for key, (bucket, shard, offset) in placed.items():
                self._table(bucket, shard).add(_key_hash(key), offset)
            self.offsets = list(cursor.shard_bytes)
            for shard in {shard for _, shard, _ in placed.values()}:
                self._flush_if_full(store, shard)


def request_lookup(store: Store, ledger: Ledger, now: float,
                   config: Config) -> Callable[[str], RequestRecord | None]:
    """The committed request record of a key, as of ``ledger`` (under the lock)."""
    index = store.request_index
    if index is None:
        return lambda key: _scan_request(store, ledger, key, now, config)
    index.sync(store, ledger.request_log, now, config)
    return lambda key: index.lookup(store, key, now, config)


def _roll_request_log(store: Store, cursor: RequestLogCursor, bucket: str,
                      now: float, config: Config) -> RequestLogCursor:
    """Seal the current bucket (cut its shards to their committed lengths) and
    remove every bucket directory no committed cursor covers (left by a killed
    writer) or past retention, durably, before a ledger names ``bucket``."""
    import shutil

    base = store.state_dir / REQUESTS_DIR
    for shard, end in enumerate(cursor.shard_bytes):
        path = base / cursor.bucket / f"{shard:x}.log"
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_size != end:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, end)
                    os.fsync(fd)
                finally:
                    os.close(fd)
    removed = False
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(base):
            keep = (name == bucket or name == cursor.bucket
                    or (cursor.bucket and _BUCKET_PATTERN.fullmatch(name)
                        and _bucket_start(name) < _bucket_start(cursor.bucket)))
            if _BUCKET_PATTERN.fullmatch(name) and (not keep or _bucket_expired(name, now, config)):
                shutil.rmtree(base / name)
                removed = True
    if removed:
        _fsync_dir(base)
    return RequestLogCursor(bucket, (0,) * REQUEST_SHARDS)


def append_request_records(store: Store, ledger: Ledger, now: float, config: Config
                           ) -> tuple[Ledger, dict[str, tuple[str, int, int]]]:
    """Move the ledger's new request records (and any from an older ledger
    that kept them inline) to the request log; returns the ledger to write,
    with an empty ``requests`` and the advanced cursor, and where each went."""
    if not ledger.requests:
        return ledger, {}
    cursor = ledger.request_log
    span = _bucket_span(config)
    bucket = f"{int(now // span) * span}-{span}"
    if cursor.bucket and _bucket_start(bucket) <= _bucket_start(cursor.bucket):
        bucket = cursor.bucket  # a clock that stepped back keeps to the current bucket
    try:
        if bucket != cursor.bucket:
            cursor = _roll_request_log(store, cursor, bucket, now, config)
        lengths, placed = list(cursor.shard_bytes), {}
        by_shard: dict[int, list[tuple[str, RequestRecord]]] = {}
        for key, record in ledger.requests.items():
            by_shard.setdefault(_request_shard(key), []).append((key, record))
        directory = store.state_dir / REQUESTS_DIR / bucket
        _make_dirs(directory)
        for shard, rows in sorted(by_shard.items()):
            offset = lengths[shard]
            chunks = []
            for key, record in rows:
                chunks.append(_encode_request(key, record))
                placed[key] = (bucket, shard, offset)
                offset += len(chunks[-1])
            _append_at(directory / f"{shard:x}.log", lengths[shard], b"".join(chunks),
                       os.fdatasync if store.journal else os.fsync)  # as the stream logs
            lengths[shard] = offset
    except OSError as exc:
        raise _io_failure("append to the request log", exc, store.state_dir / REQUESTS_DIR) from exc
    cursor = RequestLogCursor(bucket, tuple(lengths))
    return attrs.evolve(ledger, requests={}, request_log=cursor), placed


def _append_at(path: Path, committed: int, data: bytes, sync: Callable[[int], None] | None = None) -> None:
    """Cut ``path`` back to ``committed`` bytes, append ``data``, ``sync``
    (``os.fsync`` by default; and fsync the directory when the file is new)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size != committed:
            os.ftruncate(fd, committed)
        os.lseek(fd, committed, os.SEEK_SET)
        _write_all(fd, data)
        (sync or os.fsync)(fd)
    finally:
        os.close(fd)
    if committed == 0:
        _fsync_dir(path.parent)


################################################################
# Domain operations (pure: ledger in, ledger and reply out)
################################################################

# Each operation is ``op(ledger, request, ctx) -> (ledger, reply)`` and raises a
# RelayError to refuse.  Returning the very same ledger object means "nothing
# changed" (a duplicate): the commit then neither bumps the revision nor writes.
# ``ctx.revision`` is the revision this mutation will carry if it changes
# anything; ids minted from it are unique and need no randomness.


@attrs.frozen
class Ctx:
    now: float
    revision: int
    config: Config = Config()
    #: ``iso(now)``, made once: an operation asks for it several times.
    stamp: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "stamp", iso(self.now))


def _session(ledger: Ledger, session_id: str) -> rc.Session:
    session = ledger.sessions.get(session_id)
    if session is None:
        raise _not_found("session", session_id, "list sessions with `python -m relay session list`")
    return session


def _lease(ledger: Ledger, lease_id: str) -> rc.Lease:
    lease = ledger.leases.get(lease_id)
    if lease is None:
        raise _not_found("lease", lease_id, "list leases with `python -m relay lease list`")
    return lease


def _text(kind: str, value: str, limit: int = 512) -> str:
    if not value.strip() or len(value) > limit:
        raise InvalidArgument(f"{kind} must be 1..{limit} characters", hint=f"pass a {kind}")
    return value


def is_live(lease: rc.Lease, stamp: str) -> bool:
    """An active or waiting lease that has not run out.  An expired lease
    occupies nothing, whether or not the reaper has marked it yet."""
    return lease.state in rc.LIVE_LEASE_STATES and lease.expires_at > stamp


def live_leases(ledger: Ledger, session_id: str, stamp: str) -> list[rc.Lease]:
    leases = ledger.leases
    return [
        lease for lease in map(leases.__getitem__, _lease_index(ledger).busy.get(session_id, ()))
        if is_live(lease, stamp)
    ]


def _first_free(ledger: Ledger, profile: str, stamp: str) -> str | None:
    """The smallest id of a ready, unoccupied, unquarantined session of
    ``profile``: what Borrow takes.  The free-session index answers in
    O(log N) while no active or waiting lease may have run out; when one may
    have (the reaper has not marked it yet), every ready session is checked
    as it is, as before the index.  So is the index's answer, which never
    stands unchecked."""
    index = _lease_index(ledger)
    if index.soonest <= stamp:  # a bound gone stale (its lease ended early): recompute it
        index = _LeaseIndex.build(ledger.leases)
        _derived_of(ledger.leases)[_LeaseIndex] = index
    if index.soonest > stamp:  # no active or waiting lease has run out: a busy session is occupied
        ids = _free_index(ledger).free.get(profile)
        sid = ids.first() if ids is not None else None
        if sid is None or _occupiable(ledger, sid, stamp):
            return sid
    ready = sorted(sid for sid, s in ledger.sessions.items() if s.profile == profile and s.state == "ready")
    return next((sid for sid in ready if _occupiable(ledger, sid, stamp)), None)


def _occupiable(ledger: Ledger, session_id: str, stamp: str) -> bool:
    return not live_leases(ledger, session_id, stamp) and not _quarantined(ledger, session_id)


def _ttl(requested: int, ctx: Ctx) -> int:
    ttl = requested or ctx.config.default_ttl_seconds
    if not 1 <= ttl <= ctx.config.max_ttl_seconds:
        raise InvalidArgument(
            f"ttl {ttl}s is out of range 1..{ctx.config.max_ttl_seconds}s",
            hint="pass a smaller --ttl or raise leases.max_ttl_seconds in flow/relay.toml",
        )
    return ttl


def _grantable(ledger: Ledger, session_id: str) -> rc.Session:
    session = _session(ledger, session_id)
    quarantine = ledger.quarantines.get(session_id)
    if quarantine is not None and quarantine.state == "active":
        raise FailedPrecondition(
            f"session {session_id!r} is quarantined: {quarantine.reason}",
            hint=f"run `python -m relay recover --session {session_id}`",
        )
    if session.state != "ready":
        raise FailedPrecondition(
            f"session {session_id!r} is {session.state}, not ready",
            hint=f"run `python -m relay recover --session {session_id}`",
        )
    return session


def register_profile(ledger: Ledger, req: rc.RegisterProfileRequest, ctx: Ctx):
    if req.provider not in rc.PROVIDERS or req.mode not in rc.POOL_MODES:
        raise InvalidArgument(
            f"provider must be one of {', '.join(rc.PROVIDERS)} and mode one of "
            f"{', '.join(rc.POOL_MODES)}", hint="see `python -m relay profile register --help`")
    if req.mode == "pooled" and req.provider != "codex":
        raise InvalidArgument(
            f"pooled profiles are Codex-only; {req.provider} sessions are one-borrow",
            hint=f"register it with --provider {req.provider} --mode one-borrow")
    check_profile_settings(req)
    profile = rc.Profile(req.name, req.provider, req.mode, tuple(req.command), ctx.stamp,
                         req.pool_size, req.cwd, tuple(req.env), tuple(req.options))
    old = ledger.profiles.get(req.name)
    if old is not None:
        if attrs.evolve(old, created_at=ctx.stamp) == profile:
            return ledger, rc.ProfileReply("duplicate", ledger.revision, old)
        raise AlreadyExists(
            f"profile {req.name!r} already exists with other settings",
            hint="pick another NAME, or list profiles with `python -m relay profile list`")
    ledger = attrs.evolve(ledger, profiles=_put(ledger.profiles, req.name, profile))
    return ledger, rc.ProfileReply("registered", ctx.revision, profile)


#: The provider settings ``--option key=value`` may set: provider -> key -> allowed values
#: (a tuple), or a pattern a free value must match.  Never raw shell: each maps
#: to one documented flag, request field or environment variable (see the
#: runtime contract, "Profiles").
PROVIDER_OPTIONS: Final[dict[str, dict[str, Any]]] = {
    "codex": {
        "approval_policy": ("never", "on-request", "untrusted"),
        "sandbox": ("read-only", "workspace-write", "danger-full-access"),
        "model": re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"),
        "model_provider": re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
    },
    "claude": {
        "permission_mode": ("default", "acceptEdits", "dontAsk", "plan", "bypassPermissions"),
        "allowed_tools": re.compile(r"[A-Za-z0-9_(),:* .-]{1,512}"),
        "model": re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"),
        "base_url": re.compile(r"https?://[A-Za-z0-9.\[\]:_-]+(/[A-Za-z0-9._~/-]*)?"),
        "permission_prompt": ("stdio", "none"),
    },
    "kimi": {
        "model": re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"),
    },
}

#: Environment names the runtime sets itself; a profile may not override them.
RESERVED_ENV: Final = frozenset({"HOME", "CODEX_HOME", "TMPDIR", "FLOW_RELAY_SESSION", "FLOW_RELAY_SCRATCH"})


def profile_options(profile: rc.Profile) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in profile.options)


def check_profile_settings(req: rc.RegisterProfileRequest) -> None:
    """``pool_size``, ``cwd``, ``env`` and ``options`` as the runtime contract allows."""
    hint = "see `python -m relay profile register --help` and specs/flow-runtime-contract.md"
    if not 1 <= req.pool_size <= 64:
        raise InvalidArgument(f"pool size {req.pool_size} is out of range 1..64", hint=hint)
    if req.cwd and (not os.path.isabs(req.cwd) or "\x00" in req.cwd or len(req.cwd) > 4096):
        raise InvalidArgument(f"cwd {req.cwd!r} is not an absolute path", hint=hint)
    for entry in req.env:
        if not rc.ENV_ENTRY_PATTERN.fullmatch(entry):
            raise InvalidArgument(f"env entry {entry[:80]!r} is not KEY=VALUE", hint=hint)
        if entry.split("=", 1)[0] in RESERVED_ENV:
            raise InvalidArgument(f"env {entry.split('=', 1)[0]} is set by the runtime itself",
                                  hint=f"leave out {', '.join(sorted(RESERVED_ENV))}")
    table = PROVIDER_OPTIONS[req.provider]
    seen: set[str] = set()
    for entry in req.options:
        key, sep, value = entry.partition("=")
        allowed = table.get(key)
        if not sep or allowed is None:
            raise InvalidArgument(f"{req.provider} has no option {key!r}",
                                  hint=f"{req.provider} options: {', '.join(sorted(table))}")
        if key in seen:
            raise InvalidArgument(f"option {key!r} is given twice", hint=hint)
        seen.add(key)
        ok = value in allowed if isinstance(allowed, tuple) else allowed.fullmatch(value)
        if not ok:
            want = ", ".join(allowed) if isinstance(allowed, tuple) else allowed.pattern
            raise InvalidArgument(f"option {key}={value[:80]!r} is not allowed; want {want}",
                                  hint=hint)


def create_session(ledger: Ledger, req: rc.CreateSessionRequest, ctx: Ctx):
    profile = ledger.profiles.get(req.profile)
    if profile is None:
        raise _not_found("profile", req.profile,
                         "register it with `python -m relay profile register NAME ...`")
    session_id = req.session_id or _free_id(ledger.sessions, f"ses-{ctx.revision}")
    if session_id in ledger.sessions:
        raise AlreadyExists(f"session {session_id!r} already exists",
                            hint="pick another --session-id, or omit it to get a fresh one")
    if req.replaces:
        ledger = _replaced(ledger, req.replaces, profile.name, session_id, ctx)
    session = rc.Session(session_id, profile.name, profile.provider, "ready", ctx.stamp, ctx.stamp,
                         replaces=req.replaces)
    ledger = attrs.evolve(
        ledger,
        sessions=_put(ledger.sessions, session_id, session),
        cursors=_put(ledger.cursors, session_id, rc.Cursor(session_id)),
    )
    return ledger, rc.SessionReply("created", ctx.revision, session)


def _replaced(ledger: Ledger, old_id: str, profile: str, new_id: str, ctx: Ctx) -> Ledger:
    """The ledger with ``old_id`` replaced by ``new_id``: ``replaced_by`` recorded
    and the old session closed (its quarantine ends with it).  Refused while
    it has a live lease (a holder may still be using it), or if it was
    already replaced, or belongs to another profile."""
    old = _session(ledger, old_id)
    if old.replaced_by:
        raise AlreadyExists(f"session {old_id!r} was already replaced by {old.replaced_by!r}",
                            hint=f"borrow {old.replaced_by} instead")
    if old.profile != profile:
        raise InvalidArgument(f"session {old_id!r} is of profile {old.profile!r}, not {profile!r}",
                              hint=f"pass --profile {old.profile}")
    live = live_leases(ledger, old_id, ctx.stamp)
    if live:
        raise FailedPrecondition(
            f"session {old_id!r} still has live lease {live[0].lease_id!r}",
            hint=f"close it first with `python -m relay session close {old_id} --force`")
    ledger = _closed(ledger, old, ctx)
    old = attrs.evolve(ledger.sessions[old_id], replaced_by=new_id)
    return attrs.evolve(ledger, sessions=_put(ledger.sessions, old_id, old))


def _free_id(taken: dict[str, Any], base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... if a caller already chose it."""
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _issue(ledger: Ledger, session: rc.Session, lease: rc.Lease, ctx: Ctx) -> Ledger:
    """Activate ``lease`` with the session's next fencing token."""
    token = session.fencing_token + 1
    session = attrs.evolve(session, fencing_token=token, updated_at=ctx.stamp)
    lease = attrs.evolve(
        lease, state="active", fencing_token=token, granted_at=ctx.stamp,
        expires_at=iso(ctx.now + lease.ttl_seconds), last_renewed_at="",
    )
    return attrs.evolve(
        ledger,
        sessions=_put(ledger.sessions, session.session_id, session),
        leases=_put(ledger.leases, lease.lease_id, lease),
    )


def grant_lease(ledger: Ledger, req: rc.GrantLeaseRequest, ctx: Ctx):
    """Shared readers coexist; a writer needs the session to itself.  A writer
    that must wait for readers is recorded as waiting, which keeps new readers
    out; granting again for the same holder promotes it once readers are gone."""
    if req.mode not in rc.LEASE_ACCESS:
        raise InvalidArgument(f"mode must be one of {', '.join(rc.LEASE_ACCESS)}",
                              hint="pass --mode shared-read or --mode exclusive-write")
    session = _grantable(ledger, req.session_id)
    ttl = _ttl(req.ttl_seconds, ctx)
    live = live_leases(ledger, req.session_id, ctx.stamp)
    mine = [lease for lease in live if lease.holder == req.holder]
    writer = next((x for x in live if x.mode == "exclusive-write" and x.state == "active"), None)
    waiter = next((x for x in live if x.state == "waiting"), None)
    if mine and not (mine[0].state == "waiting" and req.mode == "exclusive-write"):
        raise AlreadyExists(
            f"holder {req.holder!r} already holds lease {mine[0].lease_id!r} "
            f"({mine[0].mode}, {mine[0].state}) on session {req.session_id!r}",
            hint=f"renew it with `python -m relay lease renew {mine[0].lease_id}`")
    if writer is not None:
        raise FailedPrecondition(
            f"session {req.session_id!r} has an active writer ({writer.holder!r}, "
            f"lease {writer.lease_id!r})",
            hint="retry after it is released, or see `python -m relay recover`")
    readers = [x for x in live if x.mode == "shared-read" and x.state == "active"]
    if req.mode == "shared-read":
        if waiter is not None:
            raise FailedPrecondition(
                f"session {req.session_id!r} has a waiting writer ({waiter.holder!r}); "
                "new readers wait until it has been served",
                hint="retry after the writer releases its lease")
        lease = rc.Lease(f"lease-{ctx.revision}", req.session_id, req.holder, req.mode,
                         "active", ttl_seconds=ttl, requested_at=ctx.stamp)
        ledger = _issue(ledger, session, lease, ctx)
        return ledger, rc.LeaseReply("granted", ctx.revision, ledger.leases[lease.lease_id])
    if waiter is not None and waiter.holder != req.holder:
        raise FailedPrecondition(
            f"session {req.session_id!r} already has a waiting writer ({waiter.holder!r})",
            hint="retry after that writer has been served")
    lease = waiter or rc.Lease(f"lease-{ctx.revision}", req.session_id, req.holder, req.mode,
                               "waiting", ttl_seconds=ttl, requested_at=ctx.stamp)
    lease = attrs.evolve(lease, ttl_seconds=ttl)
    if readers:
        lease = attrs.evolve(lease, state="waiting", expires_at=iso(ctx.now + ttl))
        ledger = attrs.evolve(ledger, leases=_put(ledger.leases, lease.lease_id, lease))
        return ledger, rc.LeaseReply("waiting", ctx.revision, lease)
    ledger = _issue(ledger, session, lease, ctx)
    return ledger, rc.LeaseReply("granted", ctx.revision, ledger.leases[lease.lease_id])


def borrow(ledger: Ledger, req: rc.BorrowRequest, ctx: Ctx):
    """Pick a ready, unoccupied session (of a profile, or the named one) and grant."""
    if bool(req.profile) == bool(req.session_id):
        raise InvalidArgument("borrow needs exactly one of --profile or --session",
                              hint="pass --profile NAME to take any ready session of it")
    if req.session_id:
        session_id = req.session_id
    else:
        if req.profile not in ledger.profiles:
            raise _not_found("profile", req.profile, "list profiles with `python -m relay profile list`")
        session_id = _first_free(ledger, req.profile, ctx.stamp)
        if session_id is None:
            raise rc.ResourceExhausted(
                f"profile {req.profile!r} has no ready, unoccupied session",
                hint=f"create one with `python -m relay session create --profile {req.profile}`")
    grant = rc.GrantLeaseRequest(session_id, req.holder, req.mode, req.ttl_seconds)
    return grant_lease(ledger, grant, ctx)


def _quarantined(ledger: Ledger, session_id: str) -> bool:
    q = ledger.quarantines.get(session_id)
    return q is not None and q.state == "active"


def check_fence(ledger: Ledger, session_id: str, token: int, stamp: str) -> None:
    """Refuse a write that acts for a lease holder whose hold is over.

    ``token`` 0 means the caller claims no lease (an operator's note) and is
    not checked.  Otherwise it must be the token of a lease on the session that
    is still active and unexpired: once that lease ends (released, revoked,
    expired, or ended by a quarantine) the token is stale, whatever was
    granted since.  Shared readers each hold a token of their own, so a newer
    reader beside an older one leaves the older token valid; a newer writer
    never coexists with an older lease, so its grant makes every older token
    stale.  A quarantined session takes no holder writes at all.
    """
    if not token:
        return
    if token < 0:
        raise InvalidArgument(f"fencing token {token} is negative",
                              hint="pass the fencing_token of your lease, or 0 for none")
    quarantine = ledger.quarantines.get(session_id)
    if quarantine is not None and quarantine.state == "active":
        raise FailedPrecondition(
            f"session {session_id!r} is quarantined ({quarantine.reason}); writes for a lease "
            "holder are refused until the quarantine is cleared",
            hint=f"run `python -m relay quarantine clear {session_id}` once it is safe, then "
            "borrow again")
    current = _session(ledger, session_id).fencing_token
    if token > current:
        raise FailedPrecondition(
            f"fencing token {token} was never issued on session {session_id!r}; current {current}",
            hint="pass the fencing_token your lease grant returned")
    mine = map(ledger.leases.__getitem__, _lease_index(ledger).by_session.get(session_id, ()))
    holder = next((x for x in mine if x.fencing_token == token), None)
    if holder is None or holder.state != "active" or not is_live(holder, stamp):
        what = ("its lease is no longer in the ledger" if holder is None else
                f"lease {holder.lease_id!r} that carried it is "
                f"{_state_at(holder, stamp)}")
        raise FailedPrecondition(
            f"stale fencing token {token}; current {current}: {what}",
            hint="stop writing for that lease; borrow again to continue")


def _state_at(lease: rc.Lease, stamp: str) -> str:
    """``expired`` for a live lease past its expiry, else its state."""
    return "expired" if lease.state in rc.LIVE_LEASE_STATES and lease.expires_at <= stamp \
        else lease.state


def _check_lease_fence(ledger: Ledger, lease: rc.Lease, token: int, stamp: str) -> None:
    check_fence(ledger, lease.session_id, token, stamp)
    if token and token != lease.fencing_token:
        raise FailedPrecondition(
            f"fencing token {token} is not that of lease {lease.lease_id!r} "
            f"(it carries {lease.fencing_token})",
            hint="pass the lease id and the fencing token of the same grant")


def renew_lease(ledger: Ledger, req: rc.RenewLeaseRequest, ctx: Ctx):
    lease = _lease(ledger, req.lease_id)
    _check_lease_fence(ledger, lease, req.fencing_token, ctx.stamp)
    if lease.state != "active" or not is_live(lease, ctx.stamp):
        state = "expired" if lease.state == "active" else lease.state
        raise FailedPrecondition(
            f"lease {req.lease_id!r} is {state} and cannot be renewed",
            hint=f"take a new one with `python -m relay lease grant --session {lease.session_id} ...`")
    ttl = _ttl(req.ttl_seconds or lease.ttl_seconds, ctx)
    lease = attrs.evolve(lease, ttl_seconds=ttl, last_renewed_at=ctx.stamp,
                         expires_at=iso(ctx.now + ttl))
    ledger = attrs.evolve(ledger, leases=_put(ledger.leases, lease.lease_id, lease))
    return ledger, rc.LeaseReply("renewed", ctx.revision, lease)


def _end(ledger: Ledger, lease: rc.Lease, state: str, ctx: Ctx, reason: str = "") -> Ledger:
    lease = attrs.evolve(lease, state=state, ended_at=ctx.stamp, revoke_reason=reason)
    return attrs.evolve(ledger, leases=_put(ledger.leases, lease.lease_id, lease))


def _must_be_live(lease: rc.Lease, ctx: Ctx, verb: str) -> None:
    if not is_live(lease, ctx.stamp):
        state = "expired" if lease.state in rc.LIVE_LEASE_STATES else lease.state
        raise FailedPrecondition(f"lease {lease.lease_id!r} is already {state}; nothing to {verb}",
                                 hint="list leases with `python -m relay lease list`")


def release_lease(ledger: Ledger, req: rc.ReleaseLeaseRequest, ctx: Ctx):
    lease = _lease(ledger, req.lease_id)
    _check_lease_fence(ledger, lease, req.fencing_token, ctx.stamp)
    _must_be_live(lease, ctx, "release")
    ledger = _end(ledger, lease, "released", ctx)
    return ledger, rc.LeaseReply("released", ctx.revision, ledger.leases[req.lease_id])


def revoke_lease(ledger: Ledger, req: rc.RevokeLeaseRequest, ctx: Ctx):
    lease = _lease(ledger, req.lease_id)
    _must_be_live(lease, ctx, "revoke")
    ledger = _end(ledger, lease, "revoked", ctx, _text("reason", req.reason))
    return ledger, rc.LeaseReply("revoked", ctx.revision, ledger.leases[req.lease_id])


def expire_leases(ledger: Ledger, ctx: Ctx) -> tuple[Ledger, list[rc.Lease]]:
    """Mark leases past their expiry ``expired`` (the reaper's job)."""
    soonest = _derived(ledger.leases, _LeaseTally).soonest()
    if soonest is None or (soonest is not _MISSING and soonest > ctx.stamp):
        return ledger, []  # (no live lease has expired: told without reading any)
    gone = [
        lease for lease in ledger.leases.values()
        if lease.state in rc.LIVE_LEASE_STATES and lease.expires_at <= ctx.stamp
    ]
    if not gone:
        return ledger, []
    leases = ledger.leases
    ended = [attrs.evolve(lease, state="expired", ended_at=lease.expires_at) for lease in gone]
    if len(gone) > _overlay_limit(len(leases)):  # many at once: one copy (its indexes rebuilt)
        leases = {**_as_dict(leases), **{x.lease_id: x for x in ended}}
    else:  # a few: the indexes follow
        for lease in ended:
            leases = _put(leases, lease.lease_id, lease)
    return attrs.evolve(ledger, leases=leases), [leases[x.lease_id] for x in gone]


def _check_control_payload(payload: Any, config: Config) -> None:
    """Control payloads live in the ledger every commit rewrites: keep them small."""
    size = len(_canonical(payload))
    if size > config.max_control_payload_bytes:
        raise InvalidArgument(
            f"control payload is {size} bytes, over the limit of [ledger] "
            f"max_control_payload_bytes = {config.max_control_payload_bytes}",
            hint="record a reference to the large payload (a path or an id) instead")


def record_control(ledger: Ledger, req: rc.RecordControlRequest, ctx: Ctx):
    """Idempotent by request id: same id and body is ``duplicate`` and writes
    nothing; the same id with another body is a conflict."""
    _session(ledger, req.session_id)
    check_id("kind", req.kind)
    _check_control_payload(req.payload, ctx.config)
    digest = _digest([req.session_id, req.kind, req.payload])
    old = ledger.control_requests.get(req.request_id)
    if old is not None:
        if old.payload_digest == digest:
            return ledger, rc.ControlReply("duplicate", ledger.revision, old)
        raise AlreadyExists(
            f"control request {req.request_id!r} was already recorded with another payload",
            hint="use a new --request-id for a new request")
    record = rc.ControlRequest(req.request_id, req.session_id, req.kind, req.payload,
                               digest, ctx.stamp)
    ledger = attrs.evolve(ledger, control_requests=_put(ledger.control_requests,
                                                        req.request_id, record))
    return ledger, rc.ControlReply("recorded", ctx.revision, record)


def append_record(ledger: Ledger, req: rc.AppendRecordRequest, ctx: Ctx, stream: str):
    """Give the record the session's next sequence number.  The commit writes it
    to the stream log and records the log's new length in the cursor."""
    _session(ledger, req.session_id)
    check_id("kind", req.kind)
    if len(_canonical(req.data)) > ctx.config.max_record_bytes:
        raise InvalidArgument(f"record data is over the limit of [streams] max_record_bytes = "
                              f"{ctx.config.max_record_bytes} bytes",
                              hint="store large payloads elsewhere and append a reference")
    check_fence(ledger, req.session_id, req.fencing_token, ctx.stamp)
    cursor = ledger.cursors.get(req.session_id) or rc.Cursor(req.session_id)
    seq = getattr(cursor, stream) + 1
    cursor = attrs.evolve(cursor, **{stream: seq})
    record = rc.StreamRecord(req.session_id, seq, req.kind, req.data, ctx.stamp)
    ledger = attrs.evolve(ledger, cursors=_put(ledger.cursors, req.session_id, cursor))
    return ledger, rc.AppendReply("appended", ctx.revision, record)


def quarantine_session(ledger: Ledger, req: rc.QuarantineSessionRequest, ctx: Ctx):
    """An operator's quarantine (code ``operator``)."""
    return quarantine(ledger, req.session_id, "operator", _text("reason", req.reason), None, ctx)


def quarantine(ledger: Ledger, session_id: str, code: str, reason: str, evidence: Any, ctx: Ctx):
    """Fail the session until cleared, revoking its live leases so no holder
    goes on writing to a session that is known to be unsafe.  ``code`` is one
    of ``rc.QUARANTINE_CODES``; ``evidence`` a JSON object or None.  The one
    function behind an operator's QuarantineSession and the runtime's
    automatic quarantines (``Runtime.auto_quarantine``)."""
    session = _session(ledger, session_id)
    if code not in rc.QUARANTINE_CODES:
        raise InvalidArgument(f"quarantine code {code!r} is not one of {', '.join(rc.QUARANTINE_CODES)}")
    if _quarantined(ledger, session_id):
        raise AlreadyExists(f"session {session_id!r} is already quarantined",
                            hint=f"clear it with `python -m relay quarantine clear {session_id}`")
    revoked = []
    for lease in live_leases(ledger, session_id, ctx.stamp):
        ledger = _end(ledger, lease, "revoked", ctx, f"quarantined: {reason}")
        revoked.append(lease.lease_id)
    record = rc.Quarantine(session_id, reason, "active", ctx.stamp, code=code, evidence=evidence)
    session = attrs.evolve(session, state="failed", updated_at=ctx.stamp)
    ledger = attrs.evolve(
        ledger,
        sessions=_put(ledger.sessions, session.session_id, session),
        quarantines=_put(ledger.quarantines, session.session_id, record),
    )
    return ledger, rc.QuarantineReply("quarantined", ctx.revision, record, tuple(revoked))


def clear_quarantine(ledger: Ledger, req: rc.ClearQuarantineRequest, ctx: Ctx):
    session = _session(ledger, req.session_id)
    if not _quarantined(ledger, req.session_id):
        raise FailedPrecondition(f"session {req.session_id!r} has no active quarantine",
                                 hint="see `python -m relay recover`")
    live = live_leases(ledger, req.session_id, ctx.stamp)
    if live:
        raise FailedPrecondition(
            f"session {req.session_id!r} still has live lease {live[0].lease_id!r}; clearing "
            "now would hand an unsafe session to a holder",
            hint=f"revoke it with `python -m relay lease revoke {live[0].lease_id} --reason ...`")
    if session.state == "closed":
        raise FailedPrecondition(f"session {req.session_id!r} is closed",
                                 hint="start a replacement with `python -m relay session create`")
    quarantine = attrs.evolve(ledger.quarantines[req.session_id], state="cleared",
                              cleared_at=ctx.stamp)
    session = attrs.evolve(session, state="ready", updated_at=ctx.stamp)
    ledger = attrs.evolve(
        ledger,
        sessions=_put(ledger.sessions, session.session_id, session),
        quarantines=_put(ledger.quarantines, session.session_id, quarantine),
    )
    return ledger, rc.QuarantineReply("cleared", ctx.revision, quarantine)


def quarantine_code(q: rc.Quarantine) -> str:
    """A quarantine's reason code (``provider_exited``, ``start_failed``,
    ``relay_restarted``, ``operator`` ...): its ``code`` field where the record
    has one, else the word its reason starts with (``code: detail``), else
    ``operator`` (a reason typed by a person)."""
    code = getattr(q, "code", "")
    if code:
        return code
    head, sep, _ = q.reason.partition(":")
    return head if sep and re.fullmatch(r"[a-z_]{1,40}", head) else "operator"


def _closed(ledger: Ledger, session: rc.Session, ctx: Ctx) -> Ledger:
    """``session`` closed; an active quarantine on it ends (cleared) with it,
    and a turn the ledger still says is running ends ``failed``."""
    session = attrs.evolve(session, state="closed", updated_at=ctx.stamp)
    ledger = attrs.evolve(ledger, sessions=_put(ledger.sessions, session.session_id, session))
    if _quarantined(ledger, session.session_id):
        quarantine = attrs.evolve(ledger.quarantines[session.session_id], state="cleared",
                                  cleared_at=ctx.stamp)
        ledger = attrs.evolve(ledger, quarantines=_put(ledger.quarantines, session.session_id,
                                                       quarantine))
    turn = running_turn(ledger, session.session_id)
    if turn is not None:
        ledger, _ = end_turn(ledger, turn.turn_id, "failed", turn.output_text,
                             "the session was closed", turn.usage, ctx)
    return ledger


def end_session(ledger: Ledger, req: rc.CloseSessionRequest, ctx: Ctx):
    """CloseSession: the session ends for good.  Refused while a lease is live
    unless ``force``, which revokes it with the reason.  A running server
    stops the process when it sees the session closed; the ledger change
    alone is the whole of it without one."""
    session = _session(ledger, req.session_id)
    if req.reason:
        _text("reason", req.reason)
    if session.state == "closed":
        return ledger, rc.CloseSessionReply("closed", ledger.revision, session)
    live = live_leases(ledger, req.session_id, ctx.stamp)
    if live and not req.force:
        raise FailedPrecondition(
            f"session {req.session_id!r} has live lease {live[0].lease_id!r} "
            f"({live[0].holder!r}); closing it would cut that holder off",
            hint=f"wait for its release, or `python -m relay session close {req.session_id} "
            "--force --reason R` to revoke it")
    why = f"session closed: {req.reason or 'by the operator'}"
    for lease in live:
        ledger = _end(ledger, lease, "revoked", ctx, why)
    ledger = _closed(ledger, session, ctx)
    return ledger, rc.CloseSessionReply("closed", ctx.revision, ledger.sessions[req.session_id],
                                        tuple(x.lease_id for x in live))


# -- turns (the live runtime submits these; see the Runtime section) ---------------


def turn_holder(ledger: Ledger, session_id: str, lease_id: str, token: int, stamp: str) -> rc.Lease:
    """The lease a turn acts for: live, exclusive-write, on ``session_id``, and
    carrying the session's current fencing token (anything else is refused,
    naming the current token, so a stale holder learns it was superseded)."""
    session = _session(ledger, session_id)
    current = session.fencing_token
    lease = ledger.leases.get(lease_id)
    hint = "borrow the session again (exclusive-write) and use the new lease's fencing token"
    if lease is None:
        raise FailedPrecondition(f"lease {lease_id!r} does not exist; current fencing token of "
                                 f"{session_id!r} is {current}", hint=hint)
    if lease.session_id != session_id:
        raise FailedPrecondition(f"lease {lease_id!r} is on session {lease.session_id!r}, not "
                                 f"{session_id!r}", hint="pass the session the lease was granted on")
    if lease.mode != "exclusive-write":
        raise FailedPrecondition(f"lease {lease_id!r} is {lease.mode}; turns need an "
                                 "exclusive-write lease", hint=hint)
    if lease.state != "active" or not is_live(lease, stamp):
        raise FailedPrecondition(f"lease {lease_id!r} is {_state_at(lease, stamp)}; current fencing "
                                 f"token of {session_id!r} is {current}", hint=hint)
    if token != current or token != lease.fencing_token:
        raise FailedPrecondition(f"stale fencing token {token}; current {current}", hint=hint)
    if _quarantined(ledger, session_id):
        raise FailedPrecondition(f"session {session_id!r} is quarantined",
                                 hint=f"see `python -m relay recover --session {session_id}`")
    return lease


def running_turn(ledger: Ledger, session_id: str) -> rc.Turn | None:
    return next((t for t in ledger.turns.values()
                 if t.session_id == session_id and t.state == "running"), None)


def start_turn(ledger: Ledger, req: rc.StartTurnRequest, ctx: Ctx):
    """Record a running turn for the holder of the session's current token."""
    turn_holder(ledger, req.session_id, req.lease_id, req.fencing_token, ctx.stamp)
    if not req.input.strip() or len(req.input) > rc.MAX_TURN_INPUT:
        raise InvalidArgument(f"input must be 1..{rc.MAX_TURN_INPUT} characters",
                              hint="pass the prompt with --input")
    if len(req.task_ref) > 512:
        raise InvalidArgument("task_ref must be at most 512 characters", hint="pass a short reference")
    running = running_turn(ledger, req.session_id)
    if running is not None:
        raise FailedPrecondition(
            f"session {req.session_id!r} is running turn {running.turn_id!r}",
            hint=f"wait for it, or `python -m relay turn interrupt {running.turn_id} ...`")
    turn = rc.Turn(f"turn-{ctx.revision}", req.session_id, req.lease_id, "running", req.input,
                   task_ref=req.task_ref, started_at=ctx.stamp, request_id=req.request_id)
    ledger = attrs.evolve(ledger, turns=_put(ledger.turns, turn.turn_id, turn))
    return ledger, rc.TurnReply(turn)


#: How much of a turn's output text the ledger keeps (characters); the result
#: record in the session's result stream has it whole (up to max_record_bytes).
TURN_TEXT_KEPT: Final = 16 * KIB


def end_turn(ledger: Ledger, turn_id: str, state: str, output_text: str, error: str, usage: Any,
             ctx: Ctx, thread_id: str = ""):
    """A running turn's terminal state (a turn that already ended is left as it is);
    ``thread_id`` is recorded if the turn's start did not know it yet."""
    turn = ledger.turns.get(turn_id)
    if turn is None or turn.state != "running":
        return ledger, rc.TurnReply(turn) if turn is not None else None
    if len(output_text) > TURN_TEXT_KEPT:
        output_text = output_text[:TURN_TEXT_KEPT] + " [truncated: the result stream has it whole]"
    turn = attrs.evolve(turn, state=state, output_text=output_text, error=error[:2048],
                        usage=usage, ended_at=ctx.stamp, thread_id=turn.thread_id or thread_id)
    return attrs.evolve(ledger, turns=_put(ledger.turns, turn_id, turn)), rc.TurnReply(turn)


# -- runtime and tokens (local administration, not RPCs) --------------------------


#: What "private network" means here: RFC 1918 and IPv6 unique-local space only.
#: (``ipaddress.is_private`` also admits documentation, benchmarking and reserved
#: ranges, which are no LAN of ours.)
_PRIVATE_NETWORKS: Final = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


def serving_mode(host: str) -> str:
    """The serving mode of a host: ``loopback`` or ``trusted-lan``; anything
    else may never be served."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host == "localhost":
            return "loopback"
        raise InvalidArgument(f"host {host!r} is not an IP address",
                              hint="serve on 127.0.0.1, or a private-network IP with a token") from None
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified:
        raise InvalidArgument(f"refusing to serve on {host}: it listens on every interface",
                              hint="pass --host 127.0.0.1, or one private-network address")
    if any(addr in net for net in _PRIVATE_NETWORKS):
        return "trusted-lan"
    raise InvalidArgument(f"refusing to serve on public address {host}",
                          hint="serve on 127.0.0.1, or a private-network address with a token")


def active_token(ledger: Ledger, token_id: str) -> TokenRecord | None:
    token = ledger.tokens.get(token_id) if token_id else None
    return token if token is not None and token.state == "active" else None


def require_serving_allowed(ledger: Ledger | None, host: str) -> str:
    """The security rule: loopback may serve without a token; a private-network
    address needs an active token bound to the runtime; nothing else serves."""
    serving = serving_mode(host)
    token = active_token(ledger, ledger.runtime.token_id) if ledger is not None else None
    if serving == "trusted-lan" and token is None:
        raise FailedPrecondition(
            f"serving on {host} (trusted-lan) needs an active token bound to the runtime",
            hint="run `python -m relay token create`, then "
            "`python -m relay bootstrap --endpoint URL --token-id ID`")
    return serving


def bootstrap(ledger: Ledger, endpoint: str, token_id: str, ctx: Ctx):
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise InvalidArgument(f"endpoint {endpoint!r} is not an http(s) URL with a valid port",
                              hint="pass --endpoint http://127.0.0.1:9876")
    if token_id and token_id != "none":
        check_id("token id", token_id)
        if active_token(ledger, token_id) is None:
            raise FailedPrecondition(f"token {token_id!r} is not an active token",
                                     hint="list tokens with `python -m relay token list`")
    if token_id == "none":
        token_id = ""
    elif not token_id:
        token_id = ledger.runtime.token_id  # re-bootstrapping must not silently drop auth
    ledger = attrs.evolve(ledger, runtime=attrs.evolve(ledger.runtime, token_id=token_id))
    serving = require_serving_allowed(ledger, parts.hostname)
    runtime = attrs.evolve(ledger.runtime, status="bootstrapped", endpoint=endpoint, mode=serving,
                           bootstrapped_at=ctx.stamp, shutdown_at="")
    return attrs.evolve(ledger, runtime=runtime), runtime


def shutdown(ledger: Ledger, ctx: Ctx):
    if ledger.runtime.status == "absent":
        raise FailedPrecondition("the relay was never bootstrapped",
                                 hint="run `python -m relay bootstrap` first")
    runtime = attrs.evolve(ledger.runtime, status="stopped", shutdown_at=ctx.stamp, pid=0)
    return attrs.evolve(ledger, runtime=runtime), runtime


def token_digest(raw: str) -> str:
    return _sha256(raw.encode()).hexdigest()


def create_token(ledger: Ledger, label: str, digest: str, ctx: Ctx):
    token_id = f"tok-{ctx.revision}"
    if label:
        _text("label", label, 128)
    token = TokenRecord(token_id, digest, "active", label, ctx.stamp)
    return attrs.evolve(ledger, tokens=_put(ledger.tokens, token_id, token)), token


def rotate_token(ledger: Ledger, grace: int, digest: str, ctx: Ctx):
    """Bind a fresh token to the runtime; the old one keeps working ``grace``
    seconds so callers can switch over without an outage."""
    if grace < 0 or grace > ctx.config.max_ttl_seconds:
        raise InvalidArgument(f"grace must be 0..{ctx.config.max_ttl_seconds} seconds",
                              hint="pass --grace SECONDS")
    old = active_token(ledger, ledger.runtime.token_id)
    ledger, token = create_token(ledger, "rotated", digest, ctx)
    if old is not None:
        old = attrs.evolve(old, state="rotated", grace_until=iso(ctx.now + grace))
        ledger = attrs.evolve(ledger, tokens=_put(ledger.tokens, old.token_id, old))
    runtime = attrs.evolve(ledger.runtime, token_id=token.token_id)
    return attrs.evolve(ledger, runtime=runtime), token


def revoke_token(ledger: Ledger, token_id: str, ctx: Ctx):
    token = ledger.tokens.get(token_id)
    if token is None:
        raise _not_found("token", token_id, "list tokens with `python -m relay token list`")
    if token.state == "revoked":
        raise FailedPrecondition(f"token {token_id!r} is already revoked",
                                 hint="list tokens with `python -m relay token list`")
    token = attrs.evolve(token, state="revoked", revoked_at=ctx.stamp, grace_until="")
    return attrs.evolve(ledger, tokens=_put(ledger.tokens, token_id, token)), token


def token_usable(token: TokenRecord, stamp: str) -> bool:
    """Whether a token may be used at ``stamp``: active, or rotated and inside its grace."""
    return token.state == "active" or (token.state == "rotated" and token.grace_until > stamp)


def token_matching(ledger: Ledger, raw: str, stamp: str) -> str:
    """The id of the usable token that ``raw`` is, or "" (constant time: every
    token is compared, whichever matches)."""
    import hmac

    presented = token_digest(raw).encode()
    found = ""
    for token in ledger.tokens.values():
        if hmac.compare_digest(presented, token.digest.encode()) and token_usable(token, stamp):
            found = token.token_id
    return found


def token_accepts(ledger: Ledger, raw: str, stamp: str) -> bool:
    """Constant-time check of a presented bearer token against every token that
    may be used now: active ones, and rotated ones inside their grace period."""
    import hmac

    presented = token_digest(raw).encode()
    ok = False
    for token in ledger.tokens.values():
        usable = token.state == "active" or (token.state == "rotated" and token.grace_until > stamp)
        ok |= hmac.compare_digest(presented, token.digest.encode()) and usable
    return ok


# -- retention --------------------------------------------------------------------


def _old_controls(ledger: Ledger, cut: str, keep: int) -> list[rc.ControlRequest]:
    """Control requests past their retention, and beyond the newest ``keep``
    (by ``recorded_at``, then id) the oldest: their ids stay known to the
    request log, so a retry is still a ``duplicate``."""
    ordered = sorted(ledger.control_requests.values(), key=lambda x: (x.recorded_at, x.request_id))
    overflow = max(len(ordered) - keep, 0)
    return [x for i, x in enumerate(ordered) if i < overflow or x.recorded_at < cut]


def _old_turns(ledger: Ledger, cut: str, keep: int) -> list[rc.Turn]:
    """Terminal turns past the lease retention window, and beyond the newest ``keep``."""
    ended = sorted((x for x in ledger.turns.values() if x.state != "running"),
                   key=lambda x: (x.ended_at, x.turn_id))
    overflow = max(len(ended) - keep, 0)
    return [x for i, x in enumerate(ended) if i < overflow or x.ended_at < cut]


def compact(ledger: Ledger, ctx: Ctx) -> tuple[Ledger, dict[str, list[dict[str, Any]]]]:
    """Move terminal leases and old control requests out of the ledger after
    their retention windows or beyond their caps.  Returns the rows to
    archive; the ledger is unchanged when there is nothing to do."""
    cfg = ctx.config
    lease_cut = iso(ctx.now - cfg.lease_retention_seconds)
    control_cut = iso(ctx.now - cfg.control_request_retention_seconds)
    # The candidates are found from the fields they are chosen by, so that a
    # lazily read ledger (a CLI commit's) types only the records that go.
    ended = sorted((ended_at, key)
                   for key, state, ended_at in _fields_of(ledger.leases, "state", "ended_at")
                   if state not in rc.LIVE_LEASE_STATES)
    overflow = max(len(ended) - cfg.max_terminal_leases, 0)
    old_leases = [ledger.leases[key] for i, (ended_at, key) in enumerate(ended)
                  if i < overflow or ended_at < lease_cut]
    old_controls = _old_controls(ledger, control_cut, cfg.max_control_requests)
    old_turns = _old_turns(ledger, lease_cut, cfg.max_terminal_leases)
    old_sessions = _old_sessions(ledger, lease_cut, old_leases, old_turns)
    if not old_leases and not old_controls and not old_turns and not old_sessions:
        return attrs.evolve(ledger, compacted_at=ctx.stamp), {}
    gone_leases = {x.lease_id for x in old_leases}
    gone_controls = {x.request_id for x in old_controls}
    gone_turns = {x.turn_id for x in old_turns}
    gone_sessions = {x.session_id for x in old_sessions}
    ledger = attrs.evolve(
        ledger,
        leases={k: v for k, v in ledger.leases.items() if k not in gone_leases},
        control_requests={k: v for k, v in ledger.control_requests.items()
                          if k not in gone_controls},
        turns={k: v for k, v in ledger.turns.items() if k not in gone_turns},
        compacted_at=ctx.stamp,
    )
    sessions_rows = [dict(to_json(x), cursor=to_json(ledger.cursors.get(x.session_id)
                                                      or rc.Cursor(x.session_id)),
                          quarantine=to_json(ledger.quarantines[x.session_id])
                          if x.session_id in ledger.quarantines else None)
                     for x in old_sessions]
    if gone_sessions:
        ledger = attrs.evolve(
            ledger,
            sessions={k: v for k, v in ledger.sessions.items() if k not in gone_sessions},
            cursors={k: v for k, v in ledger.cursors.items() if k not in gone_sessions},
            quarantines={k: v for k, v in ledger.quarantines.items() if k not in gone_sessions})
    rows = {"leases": [to_json(x) for x in old_leases],
            "control-requests": [to_json(x) for x in old_controls],
            "turns": [to_json(x) for x in old_turns],
            "sessions": sessions_rows}
    return ledger, {k: v for k, v in rows.items() if v}


def _old_sessions(ledger: Ledger, cut: str, old_leases: list[rc.Lease],
                  old_turns: list[rc.Turn]) -> list[rc.Session]:
    """Closed sessions past the lease retention window whose leases and turns
    all leave the ledger too (none left behind pointing at a missing session)."""
    closed = [ledger.sessions[key]
              for key, state, updated_at in _fields_of(ledger.sessions, "state", "updated_at")
              if state == "closed" and updated_at < cut]
    if not closed:
        return []
    gone = {x.lease_id for x in old_leases} | {x.turn_id for x in old_turns}
    index = _lease_index(ledger)
    kept_turns = {t.session_id for t in ledger.turns.values() if t.turn_id not in gone}
    return [s for s in closed if s.session_id not in kept_turns
            and all(x in gone for x in index.by_session.get(s.session_id, ()))]


class Operations:
    """The pure operation of every mutating RPC: one method per row of
    ``rc.RPCS``, named ``rpc.method`` (grpc's servicer pattern), each
    ``(ledger, request, ctx) -> (ledger, reply)``.  ``operation(rpc)`` binds a
    row to its method; reads are ``Reads``, in the projections section."""

    register_profile = staticmethod(register_profile)
    create_session = staticmethod(create_session)
    borrow = staticmethod(borrow)
    grant_lease = staticmethod(grant_lease)
    renew_lease = staticmethod(renew_lease)
    release_lease = staticmethod(release_lease)
    revoke_lease = staticmethod(revoke_lease)
    record_control = staticmethod(record_control)
    append_event = append_result = staticmethod(append_record)  # the row names the stream
    quarantine_session = staticmethod(quarantine_session)
    clear_quarantine = staticmethod(clear_quarantine)
    close_session = staticmethod(end_session)
    start_turn = staticmethod(start_turn)  # the runtime submits it once the provider took the input


def _implementation(namespace: type, rpc: rc.Rpc) -> Callable[..., Any]:
    """A row's method on ``Operations`` or ``Reads``: an alias row's target's,
    given the row's stream (``stream=``) when it names one."""
    method = getattr(namespace, rc.RPC_BY_NAME[rpc.alias_of].method if rpc.alias_of else rpc.method)
    return functools.partial(method, stream=rpc.stream) if rpc.stream else method


def operation(rpc: rc.Rpc) -> Callable[[Ledger, Any, Ctx], tuple[Ledger, Any]]:
    """The pure operation of a mutating RPC's row."""
    return _implementation(Operations, rpc)


################################################################
# Projections (status, inspect, inventory, cleanup, recover)
################################################################

# Reads never take the lock and never write: they see whichever whole ledger
# the last rename left.


def _ledger_or_warning(store: Store) -> tuple[Ledger | None, list[rc.StateWarning]]:
    try:
        return store.read(), []
    except LedgerInvalid as exc:
        return None, [rc.StateWarning(OWNER, "ledger_invalid", _rel(store, store.ledger_path),
                                      exc.message, exc.hint)]


def _rel(store: Store, path: Path) -> str:
    try:
        return str(path.relative_to(store.root))
    except ValueError:
        return str(path)


def status(store: Store, now: float) -> rc.StatusReply:
    """The relay projection (``status``, ``inspect relay`` and ``GetStatus``),
    from the ledger as validated by the typed model."""
    ledger, warnings = _ledger_or_warning(store)
    doc = to_json(ledger) if ledger is not None else None
    out = status_doc(str(store.root), doc, [to_json(w) for w in warnings], now)
    return from_json(rc.StatusReply, out)


def inspect_relay(store: Store, config: Config, now: float) -> dict[str, Any]:
    """``status`` plus detail: freshness, per-session cursors, settings."""
    doc = to_json(status(store, now))
    ledger, _ = _ledger_or_warning(store)
    view = ledger or Ledger()
    age = now - parse_iso(view.updated_at) if view.updated_at else None
    doc["detail"] = {
        "updated_at": view.updated_at,
        "freshness_seconds": round(age, 3) if age is not None else None,
        "compacted_at": view.compacted_at,
        "cursors": [to_json(c) for _, c in sorted(view.cursors.items())],
        "sessions": {k: {"state": s.state, "fencing_token": s.fencing_token,
                         "live_leases": [x.lease_id for x in live_leases(view, k, iso(now))]}
                     for k, s in sorted(view.sessions.items())},
        "request_records": len(view.requests),
        "checkpoint": _checkpoint_detail(store, ledger),
        "config": attrs.asdict(config),
        "quarantine_codes": _quarantine_codes(view),
    }
    return doc


def _checkpoint_detail(store: Store, ledger: Ledger | None) -> dict[str, Any]:
    """How far ``relay-state.json`` (the checkpoint) lags the ledger."""
    snap = store.last_read()
    if ledger is None or snap is None or snap.ledger is not ledger:
        return {"revision": ledger.revision if ledger else 0, "journal_records": 0, "journal_bytes": 0}
    return {"revision": snap.base.revision, "journal_records": snap.records,
            "journal_bytes": snap.journal_end}


def _quarantine_codes(ledger: Ledger) -> dict[str, dict[str, int]]:
    """Per profile, its sessions' active quarantines by code: the part of
    provider health the ledger knows (the rest is the running server's memory,
    ``GET /api/relay/runtime``)."""
    out: dict[str, dict[str, int]] = {}
    for sid, q in sorted(ledger.quarantines.items()):
        session = ledger.sessions.get(sid)
        if q.state == "active" and session is not None:
            codes = out.setdefault(session.profile, {})
            codes[q.code] = codes.get(q.code, 0) + 1
    return out


def list_profiles(ledger: Ledger, req: rc.ListProfilesRequest, now: float):
    return rc.ListProfilesReply(ledger.revision, tuple(v for _, v in sorted(ledger.profiles.items())))


def list_sessions(ledger: Ledger, req: rc.ListSessionsRequest, now: float,
                  processes: dict[str, rc.ProcessInfo] | None = None):
    """Sessions, each with its live process when a server's runtime knows one."""
    rows = [session_view(s, (processes or {}).get(s.session_id)) for _, s in sorted(ledger.sessions.items())
            if (not req.profile or s.profile == req.profile) and (not req.state or s.state == req.state)]
    return rc.ListSessionsReply(ledger.revision, tuple(rows))


def session_view(session: rc.Session, process: rc.ProcessInfo | None) -> rc.SessionView:
    return rc.SessionView(**{f.name: getattr(session, f.name) for f in attrs.fields(rc.Session)},
                          process=process or rc.ProcessInfo())


def get_turn(ledger: Ledger, req: rc.GetTurnRequest, now: float):
    turn = ledger.turns.get(req.turn_id)
    if turn is None:
        raise _not_found("turn", req.turn_id, "list turns with `python -m relay turn list`")
    return rc.TurnReply(turn)


def list_turns(ledger: Ledger, req: rc.ListTurnsRequest, now: float):
    rows = [t for t in sorted(ledger.turns.values(), key=lambda t: (t.started_at, t.turn_id))
            if (not req.session_id or t.session_id == req.session_id)
            and (not req.task_ref or t.task_ref == req.task_ref)
            and (not req.state or t.state == req.state)]
    return rc.ListTurnsReply(ledger.revision, tuple(rows))


def list_tasks(ledger: Ledger, req: rc.ListTasksRequest, now: float):
    """Turns grouped by their ``task_ref`` (turns without one are left out)."""
    groups: dict[str, list[rc.Turn]] = {}
    for turn in list_turns(ledger, rc.ListTurnsRequest(task_ref=req.task_ref), now).turns:
        if turn.task_ref:
            groups.setdefault(turn.task_ref, []).append(turn)
    tasks = tuple(
        rc.TaskView(ref, tuple(turns), **{state: sum(1 for t in turns if t.state == state)
                                          for state in rc.TURN_STATES})
        for ref, turns in sorted(groups.items()))
    return rc.ListTasksReply(ledger.revision, tasks)


def effective_lease(lease: rc.Lease, stamp: str) -> rc.Lease:
    """A lease as readers should see it: past its expiry it is ``expired``."""
    if lease.state in rc.LIVE_LEASE_STATES and lease.expires_at <= stamp:
        return attrs.evolve(lease, state="expired", ended_at=lease.expires_at)
    return lease


def list_leases(ledger: Ledger, req: rc.ListLeasesRequest, now: float):
    stamp = iso(now)
    rows = [effective_lease(x, stamp) for _, x in sorted(ledger.leases.items())]
    rows = [x for x in rows if (not req.session_id or x.session_id == req.session_id)
            and (not req.state or x.state == req.state)]
    return rc.ListLeasesReply(ledger.revision, tuple(rows))


def list_records(store: Store, ledger: Ledger, req: rc.ListRecordsRequest, stream: str):
    _session(ledger, req.session_id)
    if req.after < 0 or not 1 <= req.limit <= 10_000:
        raise InvalidArgument("after must be >= 0 and limit within 1..10000",
                              hint="pass --after SEQ --limit N")
    cursor = ledger.cursors.get(req.session_id) or rc.Cursor(req.session_id)
    last = getattr(cursor, stream)
    committed = getattr(cursor, f"{stream}_bytes")
    try:
        records = store.read_records(req.session_id, stream, committed, req.after, req.limit)
    except (OSError, ValueError, RelayError) as exc:
        raise rc.DataLoss(
            f"the {stream} log of session {req.session_id!r} is damaged or missing: {exc}",
            hint=f"run `python -m relay gate`, then `python -m relay quarantine session "
            f"{req.session_id} --reason 'stream log damaged'`") from None
    return rc.ListRecordsReply(req.session_id, last, tuple(records))


def classify(ledger: Ledger, session: rc.Session, stamp: str) -> rc.Recovery:
    """One session's recovery class and the command to run next."""
    sid = session.session_id
    quarantine = ledger.quarantines.get(sid)
    if quarantine is not None and quarantine.state == "active":
        return rc.Recovery(sid, "quarantine_repair", f"quarantined: {quarantine.reason}",
                           f"python -m relay repair {sid} --apply")
    if session.state != "ready":
        return rc.Recovery(sid, "replacement_start", f"session is {session.state}",
                           f"python -m relay session create --profile {session.profile}")
    live = live_leases(ledger, sid, stamp)
    if live:
        ids = tuple(x.lease_id for x in live)
        return rc.Recovery(sid, "lease_block", f"held by {', '.join(x.holder for x in live)}",
                           f"python -m relay lease revoke {ids[0]} --reason REASON", ids)
    mine = sorted((x for x in ledger.leases.values() if x.session_id == sid),
                  key=lambda x: (x.granted_at or x.requested_at, x.lease_id))
    ended = effective_lease(mine[-1], stamp) if mine else None
    if ended is not None and ended.state in ("expired", "revoked"):
        cursor = ledger.cursors.get(sid) or rc.Cursor(sid)
        return rc.Recovery(sid, "resumable",
                           f"last lease {ended.lease_id} was {ended.state}; "
                           f"events end at seq {cursor.events}",
                           f"python -m relay borrow --session {sid} --holder HOLDER")
    return rc.Recovery(sid, "healthy", "ready and unoccupied", "")


def recover(ledger: Ledger, req: rc.RecoverRequest, now: float):
    if req.session_id:
        sessions = [_session(ledger, req.session_id)]
    else:
        sessions = [s for _, s in sorted(ledger.sessions.items())]
    stamp = iso(now)
    return rc.RecoverReply(ledger.revision, tuple(classify(ledger, s, stamp) for s in sessions))


# -- repair plans ---------------------------------------------------------------
#
# RepairSession's dry run, and the plan its ``--apply`` follows: pure, from the
# ledger alone (the runtime adds what only it knows, the live process).

#: Providers whose conversation a fresh process can take up again, and how.
RESUMABLE: Final = {"codex": "thread/resume", "claude": "--resume"}


def last_thread(ledger: Ledger, session_id: str) -> tuple[str, str, str]:
    """(thread id, holder of its lease, turn id) of the session's latest turn
    that recorded a provider conversation; ("", "", "") when none did (or
    its turns were archived).  The holder is "" once the lease is archived."""
    turns = [t for t in ledger.turns.values() if t.session_id == session_id and t.thread_id]
    if not turns:
        return "", "", ""
    turn = max(turns, key=lambda t: (t.started_at, t.turn_id))
    lease = ledger.leases.get(turn.lease_id)
    return turn.thread_id, lease.holder if lease is not None else "", turn.turn_id


def repair_plan(ledger: Ledger, session_id: str, stamp: str,
                process: rc.ProcessInfo | None = None) -> rc.RepairReply:
    """What RepairSession would do to the session, and why (``outcome``
    planned), or why nothing (healthy) or nothing can be done (refused)."""
    session = _session(ledger, session_id)
    profile = ledger.profiles.get(session.profile)
    quarantined = _quarantined(ledger, session_id)
    step = rc.RepairStep
    if session.state == "ready" and not quarantined:
        return rc.RepairReply(session_id, False, "healthy", (step(
            "none", "ready and not quarantined: nothing to repair"),), revision=ledger.revision)
    if session.replaced_by:
        return rc.RepairReply(session_id, False, "refused", (step(
            "none", f"already replaced by {session.replaced_by}"),),
            replacement_session_id=session.replaced_by, revision=ledger.revision)
    if profile is None:
        return rc.RepairReply(session_id, False, "refused", (step(
            "none", f"profile {session.profile!r} is gone: no process and no replacement can "
            "be started"),), revision=ledger.revision)
    if session.state == "closed":
        return rc.RepairReply(session_id, False, "planned", (step(
            "start_replacement", f"the session is closed (never reopened): a new session of "
            f"{profile.name} replaces it, recorded as replaces/replaced_by"),),
            revision=ledger.revision)
    live = live_leases(ledger, session_id, stamp)
    thread, holder, turn_id = last_thread(ledger, session_id)
    pid = process.pid if process is not None and process.state not in ("", "exited") else 0
    steps = [
        step("stop_process", f"pid {pid} is left: stopped first (SIGTERM, then SIGKILL)" if pid
             else "no process is left"),
        step("rebuild_scratch", f"sessions/{session_id}/home, tmp and work move to "
             f"sessions/{session_id}/evidence-N/ as evidence; fresh ones get the provider's "
             "home files again, with its conversation store and work dir copied over"),
        step("start_process", f"spawn {profile.name}'s command in a fresh process"),
    ]
    how = RESUMABLE.get(profile.provider)
    if thread and how and holder:
        steps.append(step("resume_thread", f"{how} {thread} (the conversation of turn {turn_id}); "
                          f"{holder}'s next exclusive lease continues it"))
    else:
        why = (f"{profile.provider} has no conversation a new process can take up" if not how
               else "no turn recorded a conversation" if not thread else
               f"the lease of turn {turn_id} is archived: nobody is known to continue {thread}")
        steps.append(step("no_thread", f"{why}: the next lease starts a fresh one"))
    steps.append(step("check_handshake", "the process must answer its handshake (Codex "
                      "initialize; Claude a control request) within startup_timeout_seconds"))
    if live:
        steps.append(step("keep_quarantine", f"lease {live[0].lease_id} is live: the quarantine "
                          "stays until it ends"))
    else:
        steps.append(step("clear_quarantine", "healthy and no lease is live" if quarantined
                          else "the session is failed without a quarantine: made ready"))
    steps.append(step("start_replacement", "only if the resume is refused or the handshake "
                      f"fails: a new session of {profile.name} replaces this one, which is closed"))
    return rc.RepairReply(session_id, False, "planned", tuple(steps), revision=ledger.revision)


@attrs.define(eq=False)
class ReadView:
    """What a read RPC reads: the store, the time, and a ledger -- the one
    given (a server's, in memory) or, on first use, the store's."""

    store: Store
    now: float
    _ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = self.store.read() or Ledger()
        return self._ledger


def _over_ledger(read: Callable[[Ledger, Any, float], Any]) -> Any:
    return staticmethod(lambda view, request: read(view.ledger, request, view.now))


class Reads:
    """Every read RPC: one method per row of ``rc.RPCS``, named ``rpc.method``,
    each ``(view, request) -> reply`` over a ``ReadView``; a row with a
    stream gets it as ``stream=``.  Nothing here writes."""

    get_status = staticmethod(lambda view, request: status(view.store, view.now))
    list_profiles = _over_ledger(list_profiles)
    list_sessions = _over_ledger(list_sessions)
    list_leases = _over_ledger(list_leases)
    recover = _over_ledger(recover)
    get_turn = _over_ledger(get_turn)
    list_turns = _over_ledger(list_turns)
    list_tasks = _over_ledger(list_tasks)
    list_events = list_results = staticmethod(
        lambda view, request, stream: list_records(view.store, view.ledger, request, stream))


def reader(rpc: rc.Rpc) -> Callable[[ReadView, Any], Any]:
    """The read of a read RPC's row."""
    return _implementation(Reads, rpc)


def read_rpc(store: Store, rpc: rc.Rpc | str, request: Any, now: float) -> Any:
    """Answer a read RPC from the ledger on disk, never writing anything."""
    rpc = rc.RPC_BY_NAME[rpc] if isinstance(rpc, str) else rpc
    return reader(rpc)(ReadView(store, now), request)


def inventory(store: Store) -> list[dict[str, Any]]:
    """Every artifact under the relay's two trees, with kind and validity."""
    ledger, warnings = _ledger_or_warning(store)
    rows = []
    for top in (store.state_dir, store.tmp_dir):
        for dirpath, _, files in os.walk(top):
            for name in sorted(files):
                path = Path(dirpath) / name
                kind, valid, note = _classify_artifact(store, ledger, warnings, path)
                rows.append({"path": _rel(store, path), "owner": OWNER, "kind": kind,
                             "valid": valid, "bytes": path.stat().st_size, "note": note})
    return sorted(rows, key=lambda r: r["path"])


def _classify_artifact(store: Store, ledger: Ledger | None, warnings: list[rc.StateWarning],
                       path: Path) -> tuple[str, bool, str]:
    if path == store.ledger_path:
        return "ledger", not warnings, warnings[0].message if warnings else ""
    if path == store.journal_path:
        return _classify_journal(store, ledger, path)
    if path == store.lock_path:
        return "lock", True, "never removed by cleanup"
    if path.parent == store.state_dir and path.name.startswith(TEMP_PREFIX):
        return "orphan_temp", False, "left by an interrupted write; removed by the next mutation"
    rel = path.relative_to(store.state_dir) if path.is_relative_to(store.state_dir) else None
    if rel is None:
        return "scratch", True, "rebuildable"
    if rel.parts[0] == STREAMS_DIR and len(rel.parts) == 3 and path.suffix == ".log":
        return _classify_stream(ledger, rel.parts[1], path.stem, path.stat().st_size)
    if rel.parts[0] == ARCHIVE_DIR:
        return "archive", True, ""
    if rel.parts[0] == REQUESTS_DIR:
        return "request_log", True, "idempotency records of request ids (see the ledger's request_log)"
    if rel.parts[0] == SET_ASIDE_DIR:
        if path.name == LEDGER_NAME:
            return "set_aside_ledger", True, "a damaged ledger moved aside by `state reset`"
        if path.name == JOURNAL_NAME:
            return "set_aside", True, "the journal of a ledger moved aside by `state reset`"
        return "set_aside", True, "stream log or archive moved aside with its ledger"
    return "unknown", False, "not a relay artifact"


def _classify_journal(store: Store, ledger: Ledger | None, path: Path) -> tuple[str, bool, str]:
    snap = store.last_read() if ledger is not None else None  # what the read just now found
    if snap is None or snap.ledger is not ledger:
        return "journal", False, "cannot check without a valid checkpoint (relay-state.json)"
    size = path.stat().st_size
    note = (f"{snap.records} commits past the checkpoint (revision {snap.base.revision} -> "
            f"{snap.ledger.revision})" if snap.records else "no commits past the checkpoint")
    if size > snap.journal_end:
        note += f"; {size - snap.journal_end} tail bytes that do not count, cut by the next write"
    return "journal", True, note + "; never removed by cleanup"


def _classify_stream(ledger: Ledger | None, sid: str, stream: str, size: int):
    if ledger is None or stream not in STREAM_KINDS:
        return "stream_log", False, "cannot check without a valid ledger"
    cursor = ledger.cursors.get(sid)
    if cursor is None:
        return "stream_log", False, f"no session {sid!r} in the ledger"
    committed = getattr(cursor, f"{stream}_bytes")
    if size < committed:
        return "stream_log", False, f"shorter ({size} B) than committed ({committed} B)"
    tail = size - committed
    return "stream_log", True, f"{tail} uncommitted tail bytes, cut by the next append" if tail else ""


def cleanup_plan(store: Store) -> list[Path]:
    """What ``state cleanup --owner relay`` may remove: relay scratch and orphan
    temp files.  Never the lock, the ledger, streams or archives; never the
    record of provider processes (the next ``serve`` reaps what it names), nor
    the scratch of a session that is not closed (a live or quarantined agent's
    home: its process and its post-mortem need it)."""
    kept = _kept_scratch(store)
    doomed = []
    for dirpath, dirs, files in os.walk(store.tmp_dir):
        dirs[:] = [d for d in dirs if Path(dirpath) / d not in kept]
        doomed += [Path(dirpath) / f for f in files
                   if Path(dirpath) / f != store.lock_path and Path(dirpath) / f not in kept]
    with contextlib.suppress(FileNotFoundError):
        doomed += [Path(e.path) for e in os.scandir(store.state_dir)
                   if e.name.startswith(TEMP_PREFIX)]
    return sorted(doomed)


def _kept_scratch(store: Store) -> set[Path]:
    """Scratch that cleanup keeps: the provider-process record and the scratch
    of every session the ledger does not say is closed (all of it when the
    ledger cannot be read: nothing tells which are ended)."""
    sessions = store.tmp_dir / SESSIONS_DIR
    kept = {store.tmp_dir / PROVIDERS_RECORD}
    try:
        ledger = store.read()
    except LedgerInvalid:
        return kept | {sessions}
    live = {sid for sid, s in (ledger.sessions if ledger else {}).items() if s.state != "closed"}
    with contextlib.suppress(FileNotFoundError):
        kept |= {Path(e.path) for e in os.scandir(sessions) if e.name in live}
    return kept


################################################################
# Commit (the one place mutations are applied and made durable)
################################################################


@attrs.frozen
class Mutation:
    """One change to apply under the lock.  ``request_id`` makes it idempotent:
    a retry with the same id and body gets the first reply back."""

    apply: Callable[[Ledger, Ctx], tuple[Ledger, Any]]
    method: str
    reply_type: type | None = None
    request_id: str = ""
    digest: str = ""
    stream: str = ""
    #: ``request_id`` is a control record's key (RecordControl's row says so).
    control: bool = False
    #: Commit with a checkpoint, never a journal record (the server's start and stop).
    checkpoint: bool = False


def rpc_mutation(rpc: rc.Rpc | str, request: Any) -> Mutation:
    """Wrap a mutating RPC's request as a Mutation (ids checked first)."""
    rpc = rc.RPC_BY_NAME[rpc] if isinstance(rpc, str) else rpc
    validate_request(request)
    op = operation(rpc)
    request_id = getattr(request, "request_id", "")
    body = to_json(request) if request_id else {}  # only an idempotent request is digested
    body.pop("request_id", None)
    if rpc.control:  # its id keys the record too; a prefix keeps the two apart
        request_id = CONTROL_KEY_PREFIX + request_id
    return Mutation(lambda ledger, ctx: op(ledger, request, ctx), rpc.name, rpc.response,
                    request_id, _digest([rpc.name, body]) if request_id else "", rpc.stream,
                    rpc.control)


def validate_request(request: Any) -> None:
    """Check id fields against the one safe id pattern and choice fields
    against their choices, whichever door (CLI, HTTP, WebSocket) a request
    came in by."""
    for field in attrs.fields(type(request)):
        kind = field.metadata.get("id")
        choices = field.metadata.get("choices")
        value = getattr(request, field.name)
        if kind and (value or field.default is attrs.NOTHING):
            check_id(kind, value)
        if choices and (value or field.default is attrs.NOTHING) and value not in choices:
            raise InvalidArgument(f"{field.name} {value!r} is not one of {', '.join(choices)}",
                                  hint="see specs/relay.proto for the allowed values")
        if field.metadata.get("json"):
            rc.check_json_value(value, field.name)  # the CLI builds requests without from_json


def _replay(ledger: Ledger, m: Mutation, prior: RequestRecord) -> Any:
    control = m.control
    if prior.method != m.method or prior.digest != m.digest:
        if control:
            return AlreadyExists(f"control request {m.request_id[len(CONTROL_KEY_PREFIX):]!r} was "
                                 "already recorded with another payload",
                                 hint="use a new --request-id for a new request")
        return AlreadyExists(f"request id {m.request_id!r} was already used for another request",
                             hint="use a fresh request id for each logical call")
    reply = from_json(m.reply_type, prior.reply) if m.reply_type else prior.reply
    if control:  # what record_control answers while the record is still in the ledger
        reply = attrs.evolve(reply, outcome="duplicate", revision=ledger.revision)
    return reply


def apply_all(ledger: Ledger, mutations: list[Mutation], now: float, config: Config,
              lookup: Callable[[str], RequestRecord | None] | None = None,
              refused: dict[tuple[str, str], RelayError] | None = None):
    """Apply in order; each gets its own revision.  Returns the new ledger, a
    reply or RelayError per mutation, and the stream records to write.
    ``lookup`` finds request ids committed earlier (the request log); ids
    recorded by this batch (or kept inline by an older ledger) are in
    ``ledger.requests``.  Appends to a (session, stream) in ``refused`` get
    that error instead."""
    results: list[Any] = []
    appends: dict[tuple[str, str], list[rc.StreamRecord]] = {}
    for m in mutations:
        try:
            prior = (ledger.requests.get(m.request_id) or (lookup and lookup(m.request_id))
                     if m.request_id else None)
        except rc.DataLoss as exc:  # its first answer is unreadable: neither replay nor apply
            results.append(exc)
            continue
        if prior:
            results.append(_replay(ledger, m, prior))
            continue
        ctx = Ctx(now, ledger.revision + 1, config)
        try:
            new, reply = m.apply(ledger, ctx)
        except RelayError as exc:
            results.append(exc)
            continue
        if new is not ledger:
            if m.stream and refused and (reply.record.session_id, m.stream) in refused:
                results.append(refused[(reply.record.session_id, m.stream)])
                continue
            new = attrs.evolve(new, revision=ctx.revision, updated_at=ctx.stamp)
            if m.request_id:
                record = RequestRecord(m.method, m.digest, to_json(reply), ctx.stamp)
                new = attrs.evolve(new, requests=_put(new.requests, m.request_id, record))
            if m.stream:
                appends.setdefault((reply.record.session_id, m.stream), []).append(reply.record)
        ledger = new
        results.append(reply)
    return ledger, results, appends


def commit(store: Store, mutations: list[Mutation], config: Config,
           now: float | None = None,
           on_start: Callable[[Ledger], None] | None = None) -> tuple[list[Any], Ledger | None]:
    """Apply ``mutations`` under the lock and make them durable in one write.

    Returns a reply or RelayError per mutation, and the committed ledger (None
    if nothing changed).  A damaged ledger or an I/O failure raises: nothing
    is acknowledged, and the ledger on disk stays the old one (or, if the
    rename landed but a later fsync failed, the new one, unacknowledged).
    """
    with store.locked():
        # Every time, not once per Store: a long-lived store (the server's)
        # must also sweep what a CLI writer killed mid-write left meanwhile.
        store.sweep_orphan_temps()
        snap = store.snapshot(lazy=True)
        start = snap.ledger if snap is not None else Ledger()
        if on_start is not None:
            on_start(start)
        now = time.time() if now is None else now
        lookup = request_lookup(store, start, now, config)
        ledger, results, appends = apply_all(start, mutations, now, config, lookup)
        damaged = _damaged_logs(store, start, appends)
        if damaged:  # refuse only the appends to those logs; the rest of the batch stands
            ledger, results, appends = apply_all(start, mutations, now, config, lookup, damaged)
        if ledger is start:
            # Answers built on this ledger (duplicates, replays) may follow a
            # writer killed between its rename and its directory fsync: make
            # what they acknowledge durable before saying so.
            if store.ledger_path.exists():
                try:
                    _fsync_dir(store.state_dir)
                except OSError as exc:
                    raise _io_failure("fsync the ledger directory", exc, store.state_dir) from exc
            return results, None
        ledger = _compact_if_due(store, ledger, now, config)
        sizes = store.append_logs([
            (session_id, stream, getattr(ledger.cursors[session_id], f"{stream}_bytes"), records)
            for (session_id, stream), records in appends.items()])
        for (session_id, stream), size in zip(appends, sizes, strict=True):
            cursor = attrs.evolve(ledger.cursors[session_id], **{f"{stream}_bytes": size})
            ledger = attrs.evolve(ledger, cursors=_put_private(ledger.cursors, start.cursors,
                                                               session_id, cursor))
        if not ledger.ledger_id:  # the ledger's first write gives it its identity
            ledger = attrs.evolve(ledger, ledger_id=os.urandom(16).hex())
        ledger, placed = append_request_records(store, ledger, now, config)
        store.commit_write(snap, ledger, checkpoint=any(m.checkpoint for m in mutations))
        _seal(ledger)
        if store.request_index is not None:
            store.request_index.note(store, ledger.request_log, placed)
        return results, ledger


def _damaged_logs(store: Store, start: Ledger, appends: dict[tuple[str, str], Any]
                  ) -> dict[tuple[str, str], RelayError]:
    """The logs among ``appends`` shorter than the ledger says (their refusals)."""
    damaged = {}
    for sid, stream in appends:
        cursor = start.cursors.get(sid)
        error = store.short_log(sid, stream, getattr(cursor, f"{stream}_bytes") if cursor else 0)
        if error is not None:
            damaged[(sid, stream)] = error
    return damaged


def _compact_if_due(store: Store, ledger: Ledger, now: float, config: Config) -> Ledger:
    """Compact once per interval, or at once when a count cap is exceeded (so
    lease churn cannot grow the ledger, and every commit, between runs)."""
    terminal = len(ledger.leases) - _live_leases(ledger.leases)  # live leases never count
    crowded = (terminal > 2 * config.max_terminal_leases
               or len(ledger.turns) > 2 * config.max_terminal_leases
               or len(ledger.control_requests) > 2 * config.max_control_requests)
    if not crowded and ledger.compacted_at > iso(now - config.compact_interval_seconds):
        return ledger
    # Expiry first: without a server (and its reaper) this is where leases past
    # their time are marked, so retention can archive them.
    ctx = Ctx(now, ledger.revision, config)
    ledger, _ = expire_leases(ledger, ctx)
    compacted, rows = compact(ledger, ctx)
    for name, batch in rows.items():
        store.archive(name, batch)
    for row in rows.get("sessions", ()):  # their logs go with them, never to be cut by a reused id
        store.archive_streams(row["session_id"], compacted.revision)
    return compacted


def commit_one(store: Store, mutation: Mutation, config: Config) -> Any:
    """Commit a single mutation; raise its error, return its reply."""
    (result,), _ = commit(store, [mutation], config)
    if isinstance(result, RelayError):
        raise result
    return result


################################################################
# Event hub (fan-out)
################################################################

# trio is loaded lazily: the CLI's mutation path never touches it, and
# importing it costs more than a whole CLI mutation.  The first attribute
# access (inside ``serve`` or a test) loads it for real.


def _lazy_module(name: str) -> Any:
    module = sys.modules.get(name)
    if module is not None:
        return module
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken install
        raise ImportError(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


trio = _lazy_module("trio")


@attrs.frozen
class Frame:
    """One published item, encoded once for every subscriber: ``sse`` is the
    Server-Sent Events bytes, ``ws`` the WebSocket text."""

    id: str
    event: str
    data: dict[str, Any]
    sse: bytes
    ws: str
    seq: int = 0
    #: ``sse`` as one HTTP/1.1 chunk (``_DirectSse`` writes it to every socket).
    chunk: bytes = b""

    @classmethod
    def make(cls, id_: str, event: str, data: dict[str, Any], seq: int = 0) -> Frame:
        """An empty ``id_`` (an error) sends no SSE ``id:`` line at all: an
        empty one would reset the browser's Last-Event-ID, losing its place."""
        payload = json.dumps(data, separators=(",", ":"), sort_keys=True)
        id_line = f"id: {id_}\n" if id_ else ""
        sse = f"{id_line}event: {event}\ndata: {payload}\n\n".encode()
        ws = f'{{"type":"{event}","id":"{id_}","data":{payload}}}'
        return cls(id_, event, data, sse, ws, seq, http_chunk(sse))


def http_chunk(data: bytes) -> bytes:
    """``data`` framed as one HTTP/1.1 chunk (RFC 9112 7.1), as h11 frames it."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_frame(code: str, message: str, hint: str = "") -> Frame:
    data = {"code": code, "message": message}
    if hint:
        data["hint"] = hint
    return Frame.make("", "error", data)


def error_frame_of(exc: RelayError) -> Frame:
    return error_frame(exc.code.value, exc.message, exc.hint)


# -- stream positions ------------------------------------------------------------
#
# A stream frame's id is a position the stream accepts back as Last-Event-ID.
# On a one-session stream it is ``SESSION:SEQ``.  The all-sessions stream
# interleaves sessions, so one record's ``SESSION:SEQ`` does not say how far
# the other sessions had got; its ids are instead the vector of every
# session's last delivered sequence number, ``S1:SEQ,S2:SEQ,...`` (sorted,
# zeros left out).  A one-session id is a vector of one, so both streams parse
# ids with the one function below.  Vectors are durable (they name stream-log
# positions, not server memory), so they survive a restart.


def parse_stream_cursor(text: str) -> dict[str, int]:
    """``S:SEQ[,S:SEQ...]`` -> {session: seq}; InvalidArgument if malformed."""
    out: dict[str, int] = {}
    for part in text.split(","):
        sid, _, seq = part.rpartition(":")
        if not sid or sid in out or not re.fullmatch(r"[0-9]{1,18}", seq):
            raise InvalidArgument(f"Last-Event-ID {text!r} is not SESSION:SEQ[,SESSION:SEQ...]",
                                  hint="send back an id the stream sent, or none to start now")
        check_id("session", sid)
        out[sid] = int(seq)
    return out


def stream_cursor_id(vector: dict[str, int]) -> str:
    """The id naming ``vector`` (the inverse of ``parse_stream_cursor``)."""
    return ",".join(f"{sid}:{seq}" for sid, seq in sorted(vector.items()) if seq > 0)


def parse_feed_cursor(text: str) -> tuple[int, int]:
    """``REVISION[.INDEX]`` of the relay feed -> (revision, index)."""
    match = re.fullmatch(r"([0-9]{1,18})(?:\.([0-9]{1,9}))?", text)
    if match is None:
        raise InvalidArgument(f"Last-Event-ID {text!r} is not REVISION.INDEX",
                              hint="send back an id the feed sent, or REVISION.0 from GetStatus")
    return int(match[1]), int(match[2] or 0)


@attrs.define(eq=False)
class Replay:
    """What a new subscriber gets before live frames: frames at hand (an error,
    feed history), or a range of a stream log, read a chunk at a time so an
    old cursor on a long log never loads it whole."""

    frames: list[Frame] = attrs.Factory(list)
    store: Any = None
    session: str = ""
    stream: str = ""
    after: int = 0
    until: int = 0
    committed: int = 0
    failed: bool = False  # the log could not be read: an error frame ends the stream
    offset: int | None = None  # where the next chunk starts in the log, once one was read

    @classmethod
    def of(cls, frames: Any) -> Any:
        """A list of frames as a Replay; a Replay (or VectorReplay) as it is."""
        return cls(list(frames)) if isinstance(frames, list) else frames

    async def take(self) -> list[Frame]:
        """The next chunk of frames; empty once the replay is done."""
        if self.frames:
            out, self.frames = self.frames, []
            return out
        if self.store is None or self.after >= self.until:
            return []
        try:
            frames, self.offset = await trio.to_thread.run_sync(
                replay_frames, self.store, self.session, self.stream, self.committed, self.after,
                min(self.until - self.after, REPLAY_CHUNK), self.offset)
        except (OSError, ValueError, RelayError) as exc:
            self.after, self.failed = self.until, True
            return [error_frame("data_loss", f"the {self.stream} log of {self.session} cannot be "
                                f"replayed: {exc}; run `python -m relay gate`")]
        self.after = frames[-1].seq if frames else self.until
        return frames


#: Bytes of a stream log a replay reads at a time.
REPLAY_BLOCK: Final = 256 * KIB


def replay_frames(store: Store, session_id: str, stream: str, committed: int, after: int,
                  limit: int, offset: int | None = None) -> tuple[list[Frame], int]:
    """``Store.read_records``' range as frames, each built from its log line,
    and the offset of the line after the last one read (the next chunk starts
    there, with no search: pass it back as ``offset``).

    Every line is checked as ``decode_record`` checks it (checksum, strict
    JSON, the typed record), and the frame carries the bytes ``Frame.make``
    would have encoded: a line is the canonical JSON of the record, which for
    an ASCII line holding every field is byte for byte ``Frame.make``'s
    payload, so the replay skips re-encoding it (a third of its cost); any
    other line is encoded again.  Raises ValueError on damage."""
    if committed == 0:
        return [], 0
    event, fields = stream[:-1], len(attrs.fields(rc.StreamRecord))
    out: list[Frame] = []
    with open(store.stream_path(session_id, stream), "rb") as f:
        pos = _seek_after(f, committed, after) if offset is None else offset
        lines: list[bytes] = []
        while len(out) < limit and pos < committed:
            if not lines:  # read in blocks: a readline (and a tell) per record costs more
                f.seek(pos)
                block = f.read(min(committed - pos, REPLAY_BLOCK))
                if b"\n" not in block:  # a record longer than a block
                    block += f.readline()
                lines = block.split(b"\n")
                lines.pop()  # after the last newline: "" at the end, else a line read again next
                if not lines:
                    raise ValueError("malformed stream record")
                lines.reverse()
            line = lines.pop()
            pos += len(line) + 1
            if len(line) < 10 or line[8:9] != b" ":
                raise ValueError("malformed stream record")
            body = line[9:]
            if line[:8] != b"%08x" % zlib.crc32(body):
                raise ValueError("stream record checksum mismatch")
            doc = rc.strict_loads(body.decode("utf-8", "surrogatepass"))
            try:
                record = from_json(rc.StreamRecord, doc)
            except RelayError as exc:
                raise ValueError(f"malformed stream record: {exc.message}") from None
            if record.seq <= after:
                continue
            if len(doc) == fields and body.isascii():
                out.append(_line_frame(f"{record.session_id}:{record.seq}", event, doc, body,
                                       record.seq))
            else:
                out.append(Frame.make(f"{record.session_id}:{record.seq}", event, to_json(record),
                                      record.seq))
    return out, pos


def _line_frame(id_: str, event: str, data: dict[str, Any], payload: bytes, seq: int) -> Frame:
    """``Frame.make`` for a payload already encoded (``payload`` is ``data``'s JSON)."""
    text = payload.decode("ascii")
    sse = b"id: %b\nevent: %b\ndata: %b\n\n" % (id_.encode(), event.encode(), payload)
    return Frame(id_, event, data, sse, f'{{"type":"{event}","id":"{id_}","data":{text}}}', seq,
                 http_chunk(sse))


@attrs.define(eq=False)
class VectorReplay:
    """The all-sessions replay: each session's range in turn, every frame's id
    the vector of per-session positions delivered once it has been read."""

    parts: list[Replay]
    vector: dict[str, int]
    failed: bool = False

    async def take(self) -> list[Frame]:
        while self.parts:
            part = self.parts[0]
            frames = await part.take()
            if part.failed:
                self.failed, self.parts = True, []
                return frames
            if not frames:
                self.parts.pop(0)
                continue
            out = []
            for frame in frames:
                self.vector[frame.data["session_id"]] = frame.seq
                out.append(Frame.make(stream_cursor_id(self.vector), frame.event, frame.data,
                                      frame.seq))
            return out
        return []


def replayed(frame: Frame, last: dict[str, int]) -> bool:
    """Whether a live stream frame was already sent by the replay before it."""
    return bool(frame.seq) and frame.seq <= last.get(frame.data.get("session_id", ""), 0)


@attrs.define(eq=False, slots=True)  # one per open stream: slotted (built at import), less memory
class Subscriber:
    topic: str
    send: Any
    receive: Any
    dropped: bool = False
    #: The last frame of a subscription the hub ended (a reset, a damaged ledger).
    farewell: Frame | None = None
    #: How ``publish`` hands this subscriber a frame: ``send.send_nowait`` (its
    #: task takes it from the channel), or a sink's ``offer`` that writes the
    #: frame out itself (``_DirectSse``, then also ``send``, with no channel).
    #: Either raises trio.WouldBlock when the subscriber has fallen behind,
    #: trio.BrokenResourceError when it is gone.
    push: Any = None
    direct: bool = False
    #: While in its topic's ``FanOut``: the (standard library) socket the hub
    #: writes every frame to, and what it calls when that socket did not take a
    #: whole frame: ``fell_back(rest, handed)`` (``rest`` None: the connection is gone).
    wire: Any = None
    fell_back: Any = None

    def __attrs_post_init__(self) -> None:
        if self.push is None:
            self.push = self.send.send_nowait


@attrs.define(eq=False, slots=True)
class FanOut:
    """A topic's direct subscribers whose sockets took every byte written so
    far: ``EventHub.publish`` writes a frame to all of them in one loop over
    their sockets (one ``send`` each, nothing else per subscriber).  A socket
    that takes less than the whole frame leaves the group (its subscriber
    holds the rest and is handed frames one by one until it has caught up).

    Falling behind is counted for the group: ``burst`` frames went to it in
    hub tick ``epoch``; a member that joined during that tick had
    ``burst - joined[sock]`` of them (what it was handed before joining
    counted in), so the one check per frame is ``burst > cap``, the lowest
    member's threshold."""

    members: dict[Any, Subscriber] = attrs.Factory(dict)  # socket -> subscriber
    socks: list[Any] = attrs.Factory(list)  # the members' sockets, rebuilt when ``dirty``
    dirty: bool = False
    #: session -> the highest seq a member's replay already sent (``replayed``),
    #: and the members with such a replay: a frame at or below it is checked per member.
    guard: dict[str, int] = attrs.Factory(dict)
    lasts: dict[Any, dict[str, int]] = attrs.Factory(dict)
    epoch: int = -1
    burst: int = 0
    joined: dict[Any, int] = attrs.Factory(dict)
    cap: int = 0
    sent_at: float = 0.0


def _counter(help_: str) -> Any:
    """A ``statistics()`` field that only grows (a Prometheus counter)."""
    return attrs.field(metadata={"help": help_, "kind": "counter"})


def _gauge(help_: str) -> Any:
    """A ``statistics()`` field that goes up and down (a Prometheus gauge)."""
    return attrs.field(metadata={"help": help_, "kind": "gauge"})


@attrs.frozen
class HubStatistics:
    """A snapshot of an ``EventHub`` (``EventHub.statistics()``)."""

    subscribers: int = _gauge("open SSE and WebSocket subscriptions, all topics")
    topics: int = _gauge("topics with at least one subscriber")
    frames: int = _counter("frames handed to subscribers")
    dropped: int = _counter("subscribers dropped for falling behind")
    feed_notices: int = _gauge("relay-feed notices kept for Last-Event-ID replay")
    direct: int = _gauge("SSE subscriptions whose frames are written straight to their sockets")


@attrs.frozen
class FeedNotice:
    """A relay-feed notice as the feed's history keeps it: its JSON once,
    not a ``Frame`` (which holds the data, the SSE bytes, the WebSocket text
    and the HTTP chunk: four copies of it).  A replay rebuilds the frame."""

    revision: int
    index: int
    kind: str
    payload: bytes  # the notice's data as JSON

    @classmethod
    def of(cls, revision: int, index: int, kind: str, data: dict[str, Any]) -> FeedNotice:
        return cls(revision, index, kind,
                   json.dumps(data, separators=(",", ":"), sort_keys=True).encode())

    def frame(self) -> Frame:
        """The frame ``notice`` published (the same bytes: JSON data round-trips)."""
        return Frame.make(f"{self.revision}.{self.index}", self.kind, json.loads(self.payload))


@attrs.define(eq=False)
class EventHub:
    """Fan-out of stream records and relay notices to SSE/WebSocket subscribers.

    ``publish`` never awaits: each subscriber has a bounded channel, and one
    that falls behind is dropped (its stream ends; it reconnects with its last
    id and misses nothing), so a slow reader never blocks the others or the
    ledger owner.
    """

    buffer: int = 256
    #: The relay feed's Last-Event-ID history: at most this many notices, and
    #: at most ``feed_history_bytes`` of their JSON (``FeedNotice``).  The byte
    #: bound is the one a busy server reaches: a few minutes of notices, so a
    #: long-running server's memory levels off within its first minutes.
    feed_history: int = 4096
    feed_history_bytes: int = 256 * KIB
    #: topic -> the subscribers ``publish`` hands frames one by one (queued, and
    #: direct ones whose socket holds a backlog); the others are in ``_fast``.
    _subs: dict[str, set[Subscriber]] = attrs.Factory(dict)
    _fast: dict[str, FanOut] = attrs.Factory(dict)
    _published: dict[tuple[str, str], int] = attrs.Factory(dict)
    #: stream -> session -> last published seq: the all-sessions stream's ids.
    _vectors: dict[str, dict[str, int]] = attrs.Factory(dict)
    _feed: Any = None  # deque of FeedNotice, oldest first
    feed_bytes: int = 0  # of the JSON the notices in ``_feed`` hold
    feed_base: int = 0
    _evicted: tuple[int, int] = (-1, -1)  # the newest notice dropped from _feed
    closed: bool = False
    _frames: int = 0
    _dropped: int = 0
    #: Turns of the event loop seen by a sink (see ``next_tick``).
    tick: int = 0
    tick_at: float = 0.0
    _tick_armed: bool = False

    def __attrs_post_init__(self) -> None:
        import collections

        self._feed = collections.deque()

    def next_tick(self) -> float:
        """Count a turn of the event loop once a frame has gone out this turn;
        the (trio) time this turn's first frame went out.

        A subscriber whose task takes frames from its channel falls behind when
        more than ``buffer`` frames are published before that task next runs.
        A sink that writes frames out at once has no task to run, so it counts
        the frames of one turn instead: ``tick`` moves on only once the
        publishing task has yielded (a ``run_sync_soon`` callback), and a sink
        handed more than ``buffer`` frames in one tick has fallen behind just
        the same.  A burst past the buffer is replayed from the log, never
        pushed live."""
        if not self._tick_armed:
            self._tick_armed = True
            self.tick_at = trio.current_time()
            trio.lowlevel.current_trio_token().run_sync_soon(self._advance)
        return self.tick_at

    def _advance(self) -> None:
        self.tick += 1
        self._tick_armed = False

    def subscribe(self, topic: str) -> Subscriber:
        send, receive = trio.open_memory_channel(self.buffer)
        sub = Subscriber(topic, send, receive)
        if self.closed:
            send.close()
        else:
            self._subs.setdefault(topic, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._subs.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
        if sub.wire is not None:
            self._leave(self._fast[sub.topic], sub)
        sub.send.close()

    def join_fast(self, sub: Subscriber, wire: Any, fell_back: Any, handed: int,
                  last: dict[str, int]) -> FanOut:
        """Move a direct subscriber whose socket holds nothing into its topic's
        ``FanOut``: from now on ``publish`` writes to ``wire`` (a non-blocking
        standard-library socket) itself.  ``handed``: the frames it was handed
        in this tick already; ``last``: what its replay sent."""
        fast = self._fast.get(sub.topic)
        if fast is None:
            fast = self._fast[sub.topic] = FanOut()
        self._subs[sub.topic].discard(sub)
        sub.wire, sub.fell_back = wire, fell_back
        fast.members[wire] = sub
        fast.dirty = True
        if last:
            fast.lasts[wire] = last
            for sid, seq in last.items():
                fast.guard[sid] = max(seq, fast.guard.get(sid, 0))
        self.next_tick()  # the tick moves on once this turn ends, so ``epoch`` means this turn
        if fast.epoch != self.tick:
            fast.epoch, fast.burst, fast.joined, fast.cap = self.tick, 0, {}, self.buffer
        if fast.burst != handed:
            fast.joined[wire] = fast.burst - handed
            fast.cap = min(fast.cap, self.buffer + fast.burst - handed)
        return fast

    def leave_fast(self, sub: Subscriber) -> int:
        """Take ``sub`` out of its ``FanOut`` (back to frames one by one); the
        frames it was handed in this tick."""
        fast = self._fast[sub.topic]
        handed = self._handed(fast, sub.wire)
        self._leave(fast, sub)
        self._subs.setdefault(sub.topic, set()).add(sub)
        return handed

    def _handed(self, fast: FanOut, wire: Any) -> int:
        return fast.burst - fast.joined.get(wire, 0) if fast.epoch == self.tick else 0

    def _leave(self, fast: FanOut, sub: Subscriber) -> None:
        wire, sub.wire, sub.fell_back = sub.wire, None, None
        del fast.members[wire]
        fast.lasts.pop(wire, None)
        fast.joined.pop(wire, None)
        fast.dirty = True
        if not fast.members:
            del self._fast[sub.topic]

    def _publish_fast(self, fast: FanOut, frame: Frame) -> None:
        """Write ``frame`` to every socket of ``fast``: the fan-out's hot loop."""
        if fast.epoch != self.tick:  # the group's first frame this tick
            fast.epoch, fast.burst, fast.cap = self.tick, 0, self.buffer
            if fast.joined:
                fast.joined = {}
            fast.sent_at = self.next_tick()
        fast.burst += 1
        if fast.burst > fast.cap:
            self._fast_behind(fast)
        if fast.dirty:
            fast.socks, fast.dirty = list(fast.members), False
        socks = fast.socks
        if fast.guard and frame.seq and frame.seq <= fast.guard.get(frame.data.get("session_id", ""), 0):
            socks = [w for w in socks if not (w in fast.lasts and replayed(frame, fast.lasts[w]))]
        chunk = frame.chunk
        size, short = len(chunk), []
        for sock in socks:
            try:
                sent = sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError:  # reset, broken pipe, or closed (EBADF)
                sent = -1
            if sent != size:
                short.append((sock, sent))
        self._frames += len(socks)
        for sock, sent in short:
            sub = fast.members.get(sock)
            if sub is None:  # pragma: no cover - a member only leaves through this loop's caller
                continue
            if sent < 0:
                sub.fell_back(None, 0)
                self.unsubscribe(sub)
            else:
                sub.fell_back(chunk[sent:], self.leave_fast(sub))

    def _fast_behind(self, fast: FanOut) -> None:
        """Drop the members handed more than ``buffer`` frames in this tick."""
        for wire, sub in list(fast.members.items()):
            if self._handed(fast, wire) > self.buffer:
                sub.dropped = True
                self._dropped += 1
                self.unsubscribe(sub)
        fast.cap = self.buffer + min(fast.joined.values(), default=0) if fast.members else self.buffer
        fast.cap = min(fast.cap, self.buffer)

    def publish(self, topic: str, frame: Frame) -> None:
        subs = self._subs.get(topic)
        subs = list(subs) if subs else ()  # before the FanOut's stragglers join them
        fast = self._fast.get(topic)
        if fast is not None:
            self._publish_fast(fast, frame)
        for sub in subs:
            try:
                sub.push(frame)
                self._frames += 1
            except trio.WouldBlock:
                sub.dropped = True
                self._dropped += 1
                self.unsubscribe(sub)
            except trio.BrokenResourceError:
                self.unsubscribe(sub)

    def listened(self, topic: str) -> bool:
        """Whether ``topic`` has a subscriber."""
        return bool(self._subs.get(topic)) or topic in self._fast

    def seen(self, session_id: str, stream: str) -> int:
        return self._published.get((session_id, stream), 0)

    def publish_records(self, stream: str, records: list[rc.StreamRecord]) -> None:
        """Publish stream records once each, in order, whoever appended them."""
        event = stream[:-1]  # events -> event
        for record in records:
            key = (record.session_id, stream)
            if record.seq <= self._published.get(key, 0):
                continue
            self._published[key] = record.seq
            vector = self._vectors.setdefault(stream, {})
            vector[record.session_id] = record.seq
            one, every = self.listened(f"{stream}:{record.session_id}"), self.listened(f"{stream}:*")
            if not (one or every):  # nobody listens: encode nothing
                continue
            data = to_json(record)
            if one:
                self.publish(f"{stream}:{record.session_id}",
                             Frame.make(f"{record.session_id}:{record.seq}", event, data, record.seq))
            if every:
                self.publish(f"{stream}:*", Frame.make(stream_cursor_id(vector), event, data,
                                                       record.seq))

    def mark_seen(self, session_id: str, stream: str, seq: int) -> None:
        key = (session_id, stream)
        self._published[key] = max(seq, self._published.get(key, 0))
        self._vectors.setdefault(stream, {})[session_id] = self._published[key]

    def notice(self, revision: int, kind: str, data: dict[str, Any]) -> None:
        """A relay lifecycle notice (lease granted, revoked, ...) on the feed."""
        last = self._feed[-1] if self._feed else None
        index = last.index + 1 if last is not None and last.revision == revision else 0
        kept = FeedNotice.of(revision, index, kind, data)  # its JSON, encoded once for both
        frame = _line_frame(f"{revision}.{index}", kind, data, kept.payload, 0)
        self._feed.append(kept)
        self.feed_bytes += len(kept.payload)
        while len(self._feed) > self.feed_history or (
                self.feed_bytes > self.feed_history_bytes and len(self._feed) > 1):
            dropped = self._feed.popleft()
            self.feed_bytes -= len(dropped.payload)
            self._evicted = (dropped.revision, dropped.index)
        self.publish("relay", frame)

    def feed_after(self, revision: int, index: int) -> list[Frame] | None:
        """Notices after (revision, index); None if some of them are no longer
        kept: committed before this server started, or dropped from the history.
        A cursor need not name a notice (``REVISION.0`` from GetStatus works)."""
        if revision < self.feed_base or (revision, index) < self._evicted:
            return None
        return [n.frame() for n in self._feed if (n.revision, n.index) > (revision, index)]

    def end_all(self, farewell: Frame) -> None:
        """End every subscription with ``farewell`` as its last frame; the
        server's own shutdown watchers stay."""
        for topic, subs in list(self._subs.items()):
            if topic == "shutdown":
                continue
            for sub in list(subs):
                sub.farewell = farewell
                self.unsubscribe(sub)
        for topic in list(self._fast):
            for sub in self._fast_members(topic):
                sub.farewell = farewell
                self.unsubscribe(sub)

    def _fast_members(self, topic: str) -> list[Subscriber]:
        fast = self._fast.get(topic)
        return list(fast.members.values()) if fast is not None else []

    def rebase(self, ledger: Ledger) -> None:
        """Start over from ``ledger``: its records count as published, and the
        feed history begins at its revision (a new server, or a new ledger)."""
        self._published, self._vectors = {}, {}  # the old ledger's sessions are not in this one
        for sid, cursor in ledger.cursors.items():
            self.mark_seen(sid, "events", cursor.events)
            self.mark_seen(sid, "results", cursor.results)
        self._feed.clear()
        self.feed_bytes = 0
        self.feed_base = ledger.revision
        self._evicted = (-1, -1)

    def close(self) -> None:
        """End every subscription (graceful shutdown)."""
        self.closed = True
        for subs in list(self._subs.values()):
            for sub in list(subs):
                self.unsubscribe(sub)
        for topic in list(self._fast):
            for sub in self._fast_members(topic):
                self.unsubscribe(sub)

    def statistics(self) -> HubStatistics:
        """A frozen snapshot of the fan-out (as trio's ``statistics()`` methods)."""
        counts = {topic: len(subs) for topic, subs in self._subs.items() if subs}
        for topic, fast in self._fast.items():
            counts[topic] = counts.get(topic, 0) + len(fast.members)
        live = list(counts.values())
        direct = sum(sub.direct for subs in self._subs.values() for sub in subs)
        direct += sum(len(fast.members) for fast in self._fast.values())
        return HubStatistics(subscribers=sum(live), topics=len(live), frames=self._frames,
                             dropped=self._dropped, feed_notices=len(self._feed), direct=direct)


def notices_for(name: str, reply: Any) -> list[tuple[str, dict[str, Any]]]:
    """The relay-feed notices a committed reply announces."""
    if name == "reaper":
        return [("lease.expired", to_json(x)) for x in reply]
    if name in ("served", "stopped"):
        return [(f"runtime.{name}", to_json(reply))]
    if isinstance(reply, rc.LeaseReply) and reply.outcome in (
            "granted", "waiting", "released", "revoked", "renewed"):
        return [(f"lease.{reply.outcome}", to_json(reply.lease))]
    if isinstance(reply, rc.QuarantineReply):
        out = [("lease.revoked", {"lease_id": x, "session_id": reply.quarantine.session_id,
                                   "reason": f"quarantined: {reply.quarantine.reason}"})
               for x in reply.revoked_lease_ids]
        kind = "quarantine.set" if reply.outcome == "quarantined" else "quarantine.cleared"
        return out + [(kind, to_json(reply.quarantine))]
    return []


def diff_notices(old: Ledger, new: Ledger) -> list[tuple[str, dict[str, Any]]]:
    """Notices for changes another process committed (seen by the watcher)."""
    out = []
    for lease_id, lease in new.leases.items():
        before = old.leases.get(lease_id)
        if before is None or before.state != lease.state:
            state = {"active": "granted"}.get(lease.state, lease.state)
            out.append((f"lease.{state}", to_json(lease)))
        elif before.expires_at != lease.expires_at:
            out.append(("lease.renewed", to_json(lease)))
    for sid, q in new.quarantines.items():
        before = old.quarantines.get(sid)
        if before is None or before.state != q.state:
            out.append(("quarantine.set" if q.state == "active" else "quarantine.cleared", to_json(q)))
    if old.runtime.status != new.runtime.status:
        kind = {"serving": "served"}.get(new.runtime.status, new.runtime.status)
        out.append((f"runtime.{kind}", to_json(new.runtime)))
    return out


def _expired_since(old: Ledger, new: Ledger) -> list[rc.Lease]:
    """The leases ``new`` has ``expired`` that ``old`` had not, in ledger order.
    Only a live lease expires, so ``old``'s index of live leases says first
    whether any did: released leases stay until compaction, and this runs in
    the event loop after every commit, so no scan of them all for nothing."""
    if not any(getattr(new.leases.get(lease_id), "state", "") == "expired"
               for ids in _lease_index(old).busy.values() for lease_id in ids):
        return []
    out = []
    for lease in new.leases.values():
        before = old.leases.get(lease.lease_id)
        if lease.state == "expired" and before is not None and before.state != "expired":
            out.append(lease)
    return out


################################################################
# Provider wire protocols (sans-I/O: bytes in, events out)
################################################################

# Each coding-agent CLI speaks one JSON object per line on stdin/stdout.  The
# classes below are those protocols as pure objects, in the manner of h11: the
# supervisor feeds them what the child printed (``receive_data``) and gets back
# provider-neutral events; ``send_*`` methods return the bytes to write to the
# child's stdin.  A few replies the protocol makes on its own (``initialized``
# after Codex's handshake, an error for a server request nobody can answer,
# without which the turn waits forever) wait in ``data_to_send()``, as in h2's
# connection object: after every ``receive_data`` the caller writes them.  No
# trio, no ledger, no clock, so every wire path is a unit test.
#
# Every line is decoded and dispatched on its fields, never matched on a
# prefix: Claude 2.1.332 moved "type" away from the front of its result line,
# and Codex sends a response and the notifications that belong to it in no
# fixed order.  Correlation is by request id (Codex JSON-RPC, Claude's control
# channel) and, for Claude results, by the order user lines were written (each
# user line ends with exactly one result line).  The event kinds and what each
# maps from are in specs/flow-runtime-contract.md.
#
# A provider is not trusted to be well-formed: a line that is not JSON, not an
# object, of an unexpected shape, or longer than ``max_line_bytes`` becomes a
# ``protocol.error`` event and parsing goes on with the next line.  The buffer
# never holds more than one line's worth (``max_line_bytes``) plus one chunk.

#: The longest stdout line a protocol keeps (bytes); a longer one is dropped and reported.
#: Codex's ``thread/resume`` reply carries the whole history, hence the generous bound.
WIRE_MAX_LINE_BYTES: Final = 16 * MIB

#: How much of an unparseable line a protocol.error event quotes (characters).
WIRE_EXCERPT_CHARS: Final = 200

#: Decisions a lease holder can give an approval request.
APPROVAL_DECISIONS: Final = ("accept", "decline")

#: Claude's terminal_reason values that mean the turn was interrupted.
_CLAUDE_ABORTED: Final = frozenset({"aborted_streaming", "aborted_tools"})

#: How many ended Codex turn ids a protocol remembers (to order a late turn/start reply).
_CODEX_ENDED_KEPT: Final = 64

#: Codex server->client requests relayed to the lease holder, by the approval kind they become.
_CODEX_APPROVALS: Final = {
    "item/commandExecution/requestApproval": "command",
    "item/fileChange/requestApproval": "file_change",
}


class WireStateError(RuntimeError):
    """A protocol object was asked for something its state forbids: a bug in the caller."""


_event = attrs.frozen(kw_only=True)

# Event classes cost import time (attrs generates code for each), and every CLI
# run imports this module, so the fields live on a few attrs "shapes" and each
# kind is a plain subclass of its shape: its own type (events of different kinds
# never compare equal) at no generation cost.


@_event
class WireEvent:
    """One provider-neutral event; ``native`` keeps the frame it came from."""

    kind: ClassVar[str] = ""
    native: Any = attrs.field(default=None, repr=False)


@_event
class _Scoped(WireEvent):
    thread_id: str | None = None  # Codex thread id, Claude session id
    turn_id: str | None = None  # Codex turn id; for Claude and Kimi the caller's


@_event
class _SessionEvent(_Scoped):
    provider_version: str | None = None
    session_id: str | None = None
    error: str | None = None
    ephemeral: bool | None = None
    path: str | None = None
    turns: tuple[tuple[str, str], ...] = ()  # thread.resumed: (turn_id, native status), oldest first
    usage: Any = None
    open_turns: tuple[str, ...] = ()  # stream.closed: turns started and not ended


@_event
class _TurnEnded(_Scoped):
    output_text: str = ""
    error: str | None = None
    usage: Any = None


@_event
class _ItemEvent(_Scoped):
    item_id: str | None = None
    item_type: str = "other"
    text: str | None = None
    command: str | None = None
    tool_name: str | None = None
    status: str | None = None
    output: str | None = None
    exit_code: int | None = None
    stream: str | None = None  # item.delta: "text" (agent message tokens) or "output" (command output)
    delta: str = ""


@_event
class _ApprovalEvent(_Scoped):
    approval_id: str
    approval_kind: str | None = None  # "command", "file_change" or "tool"
    item_id: str | None = None
    command: str | None = None
    tool_name: str | None = None
    tool_input: Any = None
    reason: str | None = None


@_event
class _ChannelEvent(_Scoped):
    request_id: str | None = None
    method: str | None = None
    ok: bool = True
    code: int | None = None
    message: str = ""
    name: str | None = None  # provider.notice: the native method or type/subtype
    reason: str = ""  # protocol.error: what was wrong with the line


class HandshakeCompleted(_SessionEvent):
    __slots__ = ()
    kind: ClassVar[str] = "handshake.completed"


class HandshakeFailed(_SessionEvent):
    __slots__ = ()
    kind: ClassVar[str] = "handshake.failed"


class ThreadStarted(_SessionEvent):
    __slots__ = ()
    kind: ClassVar[str] = "thread.started"


class ThreadResumed(_SessionEvent):
    __slots__ = ()
    kind: ClassVar[str] = "thread.resumed"


class ThreadArchived(_Scoped):
    __slots__ = ()
    kind: ClassVar[str] = "thread.archived"


class UsageUpdated(_SessionEvent):
    __slots__ = ()
    kind: ClassVar[str] = "usage.updated"


class TurnAccepted(_Scoped):
    __slots__ = ()
    kind: ClassVar[str] = "turn.accepted"


class TurnStarted(_Scoped):
    __slots__ = ()
    kind: ClassVar[str] = "turn.started"


class TurnCompleted(_TurnEnded):
    __slots__ = ()
    kind: ClassVar[str] = "turn.completed"


class TurnFailed(_TurnEnded):
    __slots__ = ()
    kind: ClassVar[str] = "turn.failed"


class TurnInterrupted(_TurnEnded):
    __slots__ = ()
    kind: ClassVar[str] = "turn.interrupted"


class InterruptAcknowledged(_Scoped):
    __slots__ = ()
    kind: ClassVar[str] = "interrupt.acknowledged"


class ItemStarted(_ItemEvent):
    __slots__ = ()
    kind: ClassVar[str] = "item.started"


class ItemDelta(_ItemEvent):
    __slots__ = ()
    kind: ClassVar[str] = "item.delta"


class ItemCompleted(_ItemEvent):
    __slots__ = ()
    kind: ClassVar[str] = "item.completed"


class ApprovalRequested(_ApprovalEvent):
    __slots__ = ()
    kind: ClassVar[str] = "approval.requested"


class ApprovalResolved(_ApprovalEvent):
    __slots__ = ()
    kind: ClassVar[str] = "approval.resolved"


class ApprovalCancelled(_ApprovalEvent):
    __slots__ = ()
    kind: ClassVar[str] = "approval.cancelled"


class ProbeAnswered(_ChannelEvent):
    __slots__ = ()
    kind: ClassVar[str] = "probe.answered"


class RequestFailed(_ChannelEvent):
    __slots__ = ()
    kind: ClassVar[str] = "request.failed"


class RequestRefused(_ChannelEvent):
    """The provider asked something the relay cannot answer; an error reply is in data_to_send()."""

    __slots__ = ()
    kind: ClassVar[str] = "request.refused"


class ProviderNotice(_ChannelEvent):
    """A well-formed frame with no provider-neutral meaning (status, warnings, rate limits)."""

    __slots__ = ()
    kind: ClassVar[str] = "provider.notice"


class ProtocolError(_ChannelEvent):
    __slots__ = ()
    kind: ClassVar[str] = "protocol.error"


class StreamClosed(_SessionEvent):
    __slots__ = ()
    kind: ClassVar[str] = "stream.closed"


WIRE_EVENT_KINDS: Final = tuple(
    cls.kind
    for cls in (
        HandshakeCompleted, HandshakeFailed, ThreadStarted, ThreadResumed, ThreadArchived,
        UsageUpdated, TurnAccepted, TurnStarted, TurnCompleted, TurnFailed, TurnInterrupted,
        InterruptAcknowledged, ItemStarted, ItemDelta, ItemCompleted, ApprovalRequested,
        ApprovalResolved, ApprovalCancelled, ProbeAnswered, RequestFailed, RequestRefused,
        ProviderNotice, ProtocolError, StreamClosed,
    )
)


class _BadFrame(Exception):
    """A JSON object whose fields do not have the shape its kind promises."""


def _obj(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadFrame(f"expected an object, got {type(value).__name__}")
    return value


def _opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _BadFrame(f"expected a string, got {type(value).__name__}")


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _snake(name: Any) -> str:
    """``commandExecution`` -> ``command_execution``: native item types in neutral spelling."""
    if not isinstance(name, str) or not name:
        return "other"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _encode_line(frame: dict) -> bytes:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _excerpt(line: bytes) -> str:
    return line[: WIRE_EXCERPT_CHARS * 4].decode("utf-8", "replace")[:WIRE_EXCERPT_CHARS]


@attrs.define(eq=False)
class _LineSplitter:
    """Newline framing with a bound: whole lines out, an over-long line reported by its length.

    ``_scanned`` remembers how far the buffered partial line has been searched,
    so a line arriving one byte at a time costs linear, not quadratic, time.
    """

    max_line_bytes: int
    _buf: bytearray = attrs.field(factory=bytearray)
    _scanned: int = 0
    _dropped: int | None = None  # bytes of an over-long line dropped so far

    def feed(self, data: bytes) -> list[bytes | int]:
        """Complete lines (without the newline); an int stands for a dropped line of that length."""
        buf = self._buf
        buf += data
        out: list[bytes | int] = []
        start = 0
        while (nl := buf.find(b"\n", max(start, self._scanned))) >= 0:
            if self._dropped is not None:
                out.append(self._dropped + nl - start)
                self._dropped = None
            elif nl - start > self.max_line_bytes:
                out.append(nl - start)
            else:
                out.append(bytes(buf[start:nl]))
            start = nl + 1
        del buf[:start]
        if self._dropped is not None:
            self._dropped += len(buf)
            buf.clear()
        elif len(buf) > self.max_line_bytes:
            self._dropped = len(buf)
            buf.clear()
        self._scanned = len(buf)
        return out

    def close(self) -> bytes | int | None:
        """What was left after the last newline: a partial line, a dropped length, or None."""
        if self._dropped is not None:
            left: bytes | int | None = self._dropped
        else:
            left = bytes(self._buf) if self._buf.strip() else None
        self._buf.clear()
        self._dropped = None
        self._scanned = 0
        return left


@attrs.define(eq=False)
class _JsonLinesProtocol:
    """What every provider protocol shares: framing, decoding, error events and the outbox."""

    max_line_bytes: int = WIRE_MAX_LINE_BYTES
    _lines: _LineSplitter = attrs.field(init=False)
    _outbox: bytearray = attrs.field(init=False, factory=bytearray)
    _eof: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._lines = _LineSplitter(self.max_line_bytes)

    def receive_data(self, data: bytes) -> list[WireEvent]:
        """Events for every complete line in ``data`` (plus what earlier calls left over)."""
        if self._eof:
            raise WireStateError("receive_data after receive_eof")
        events: list[WireEvent] = []
        for line in self._lines.feed(data):
            self._receive_line(line, events)
        return events

    def receive_eof(self) -> list[WireEvent]:
        """The child's stdout ended: a final unterminated line, then ``stream.closed``."""
        if self._eof:
            return []
        self._eof = True
        events: list[WireEvent] = []
        left = self._lines.close()
        if isinstance(left, bytes):
            try:
                json.loads(left)
            except ValueError:
                events.append(ProtocolError(reason="stdout ended inside a line", native=_excerpt(left)))
                left = None
        if left is not None:
            self._receive_line(left, events)
        events.append(StreamClosed(open_turns=self.open_turns()))
        return events

    def data_to_send(self) -> bytes:
        """Bytes the protocol decided to write on its own since the last call (often empty)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def open_turns(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _receive_line(self, line: bytes | int, events: list[WireEvent]) -> None:
        if isinstance(line, int):
            reason = f"dropped a stdout line of {line} bytes (longer than {self.max_line_bytes})"
            events.append(ProtocolError(reason=reason))
            return
        if not line.strip():
            return
        try:
            frame = json.loads(line)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            events.append(ProtocolError(reason=f"not JSON: {exc}", native=_excerpt(line)))
            return
        if not isinstance(frame, dict):
            events.append(ProtocolError(reason="a JSON line that is not an object", native=frame))
            return
        try:
            events.extend(self._on_frame(frame))
        except _BadFrame as exc:
            events.append(ProtocolError(reason=f"unexpected frame shape: {exc}", native=frame))

    def _on_frame(self, frame: dict) -> list[WireEvent]:
        raise NotImplementedError


@attrs.define(eq=False)
class CodexProtocol(_JsonLinesProtocol):
    """``codex app-server``: JSON-RPC 2.0 without the "jsonrpc" member, one process, many threads.

    States: ``new`` -(send_initialize)-> ``initializing`` -(result)-> ``ready``,
    or -(error reply)-> ``failed``.  Requests other than ``initialize`` need ``ready``.
    """

    client_name: str = "flow_relay"
    client_version: str = "0.1.0"
    state: str = attrs.field(init=False, default="new")
    last_request_id: int | None = attrs.field(init=False, default=None)
    _next_id: int = attrs.field(init=False, default=0)
    _pending: dict = attrs.field(init=False, factory=dict)  # id -> (method, context)
    _approvals: dict = attrs.field(init=False, factory=dict)  # approval_id -> native request id
    #: thread_id -> last token usage, until the thread is archived (a pooled
    #: process runs a thread per lease: kept for ever, ~800 bytes a lease).
    _usage: dict = attrs.field(init=False, factory=dict)
    _turns: dict = attrs.field(init=False, factory=dict)  # open turn_id -> thread_id
    _ended: dict = attrs.field(init=False, factory=dict)  # recently ended turn ids (an ordered set)

    # -- client -> server ---------------------------------------------------

    def send_initialize(self) -> bytes:
        if self.state != "new":
            raise WireStateError(f"initialize sent twice (state {self.state})")
        self.state = "initializing"
        client = {"name": self.client_name, "title": None, "version": self.client_version}
        caps = {"experimentalApi": False, "requestAttestation": False}
        return self._request("initialize", {"clientInfo": client, "capabilities": caps}, {})

    def send_thread_start(
        self, *, cwd: str, approval_policy: Any = "never", sandbox: str = "read-only",
        ephemeral: bool = False, env: dict[str, str] | None = None, config: dict | None = None,
    ) -> bytes:
        """A thread for one borrower; ``env`` reaches only this thread's commands."""
        params: dict[str, Any] = {
            "cwd": cwd, "approvalPolicy": approval_policy, "sandbox": sandbox, "ephemeral": ephemeral,
        }
        overrides = dict(config or {})
        if env:
            overrides["shell_environment_policy"] = {"set": dict(env)}
        if overrides:
            params["config"] = overrides
        return self._request("thread/start", params, {})

    def send_thread_resume(self, thread_id: str) -> bytes:
        return self._request("thread/resume", {"threadId": thread_id}, {"thread_id": thread_id})

    def send_thread_archive(self, thread_id: str) -> bytes:
        return self._request("thread/archive", {"threadId": thread_id}, {"thread_id": thread_id})

    def send_turn_start(self, thread_id: str, text: str) -> bytes:
        item = {"type": "text", "text": text, "text_elements": []}
        return self._request("turn/start", {"threadId": thread_id, "input": [item]}, {"thread_id": thread_id})

    def send_turn_interrupt(self, thread_id: str, turn_id: str) -> bytes:
        ctx = {"thread_id": thread_id, "turn_id": turn_id}
        return self._request("turn/interrupt", {"threadId": thread_id, "turnId": turn_id}, ctx)

    def send_probe(self) -> bytes:
        """``thread/loaded/list``: answered in about 1 ms even while a turn hangs."""
        return self._request("thread/loaded/list", {}, {})

    def send_approval(self, approval_id: str, decision: str) -> bytes:
        if decision not in APPROVAL_DECISIONS:
            raise WireStateError(f"decision {decision!r} is not one of {APPROVAL_DECISIONS}")
        native_id = self._approvals.pop(approval_id, None)
        if native_id is None:
            raise WireStateError(f"no open approval {approval_id!r}")
        return _encode_line({"id": native_id, "result": {"decision": decision}})

    def open_turns(self) -> tuple[str, ...]:
        return tuple(self._turns)

    def _request(self, method: str, params: dict, context: dict) -> bytes:
        if method != "initialize" and self.state != "ready":
            raise WireStateError(f"{method} before the handshake completed (state {self.state})")
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = (method, context)
        self.last_request_id = rid
        return _encode_line({"method": method, "id": rid, "params": params})

    # -- server -> client ---------------------------------------------------

    def _on_frame(self, frame: dict) -> list[WireEvent]:
        has_id = "id" in frame
        if "method" in frame:
            method = frame["method"]
            if not isinstance(method, str):
                raise _BadFrame("method is not a string")
            return self._on_server_request(frame, method) if has_id else self._on_notification(frame, method)
        if has_id and ("result" in frame or "error" in frame):
            return self._on_response(frame)
        return [ProtocolError(reason="neither a request, a response nor a notification", native=frame)]

    def _on_response(self, frame: dict) -> list[WireEvent]:
        rid = frame["id"]
        pending = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if pending is None:
            return [ProtocolError(reason=f"a response to unknown request id {rid!r}", native=frame)]
        method, ctx = pending
        if "error" in frame:
            return [self._on_error_reply(frame, method, rid, ctx)]
        result = _obj(frame["result"])
        if method == "initialize":
            self.state = "ready"
            self._outbox += _encode_line({"method": "initialized"})
            version = _agent_version(result.get("userAgent"))
            return [HandshakeCompleted(provider_version=version, native=frame)]
        if method in ("thread/start", "thread/resume"):
            thread = _obj(result.get("thread"))
            tid = _opt_str(thread.get("id"))
            if method == "thread/start":
                ephemeral = thread.get("ephemeral")
                return [ThreadStarted(
                    thread_id=tid, ephemeral=ephemeral if isinstance(ephemeral, bool) else None,
                    path=_opt_str(thread.get("path")), native=frame,
                )]
            turns = tuple(
                (_opt_str(t.get("id")) or "", _opt_str(_status_type(t.get("status"))) or "")
                for t in map(_obj, thread.get("turns") or ())
            )
            return [ThreadResumed(thread_id=tid, turns=turns, native=frame)]
        if method == "turn/start":
            turn_id = _opt_str(_obj(result.get("turn")).get("id"))
            if turn_id and turn_id not in self._ended:  # a turn may end before its start is answered
                self._turns.setdefault(turn_id, ctx["thread_id"])
            return [TurnAccepted(thread_id=ctx["thread_id"], turn_id=turn_id, native=frame)]
        if method == "turn/interrupt":
            return [InterruptAcknowledged(thread_id=ctx["thread_id"], turn_id=ctx["turn_id"], native=frame)]
        if method == "thread/archive":  # no turn runs on it again: its usage is done with
            self._usage.pop(ctx["thread_id"], None)
            return [ThreadArchived(thread_id=ctx["thread_id"], native=frame)]
        return [ProbeAnswered(request_id=str(rid), ok=True, native=frame)]  # thread/loaded/list

    def _on_error_reply(self, frame: dict, method: str, rid: int, ctx: dict) -> WireEvent:
        error = _obj(frame["error"])
        message = _opt_str(error.get("message")) or "no message"
        if method == "initialize":
            self.state = "failed"
            return HandshakeFailed(error=message, native=frame)
        if method == "thread/loaded/list":
            return ProbeAnswered(request_id=str(rid), ok=False, native=frame)  # alive all the same
        return RequestFailed(
            method=method, request_id=str(rid), thread_id=ctx.get("thread_id"),
            code=_opt_int(error.get("code")), message=message, native=frame,
        )

    def _on_server_request(self, frame: dict, method: str) -> list[WireEvent]:
        native_id = frame["id"]
        params = _obj(frame.get("params"))
        kind = _CODEX_APPROVALS.get(method)
        if kind is None:  # answer it, even with an error, or the turn waits forever
            message = f"flow-relay does not handle {method}"
            self._outbox += _encode_line({"id": native_id, "error": {"code": -32601, "message": message}})
            return [RequestRefused(method=method, request_id=str(native_id), native=frame)]
        approval_id = str(native_id)
        self._approvals[approval_id] = native_id
        return [ApprovalRequested(
            approval_id=approval_id, approval_kind=kind, thread_id=_opt_str(params.get("threadId")),
            turn_id=_opt_str(params.get("turnId")), item_id=_opt_str(params.get("itemId")),
            command=_opt_str(params.get("command")), reason=_opt_str(params.get("reason")),
            native=frame,
        )]

    def _on_notification(self, frame: dict, method: str) -> list[WireEvent]:
        params = _obj(frame.get("params"))
        handler = _CODEX_NOTIFICATIONS.get(method)
        if handler is None:
            return [ProviderNotice(name=method, native=frame)]
        return [handler(self, params, frame)]

    def _turn_started(self, params: dict, frame: dict) -> WireEvent:
        tid = _opt_str(params.get("threadId"))
        turn_id = _opt_str(_obj(params.get("turn")).get("id"))
        if turn_id:
            self._turns[turn_id] = tid
        return TurnStarted(thread_id=tid, turn_id=turn_id, native=frame)

    def _turn_completed(self, params: dict, frame: dict) -> WireEvent:
        tid = _opt_str(params.get("threadId"))
        turn = _obj(params.get("turn"))
        turn_id = _opt_str(turn.get("id"))
        self._turns.pop(turn_id, None)
        self._ended[turn_id] = None
        if len(self._ended) > _CODEX_ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        texts = [
            i["text"] for i in map(_obj, turn.get("items") or ())
            if i.get("type") == "agentMessage" and isinstance(i.get("text"), str)
        ]
        status = turn.get("status")
        error = _opt_str(_obj(turn.get("error")).get("message"))
        cls = {"completed": TurnCompleted, "interrupted": TurnInterrupted}.get(status, TurnFailed)
        if cls is TurnFailed and error is None:
            error = f"turn ended with status {status!r}"
        return cls(
            thread_id=tid, turn_id=turn_id, output_text="".join(texts), error=error,
            usage=self._usage.get(tid), native=frame,
        )

    def _item(self, params: dict, frame: dict, cls: type) -> WireEvent:
        item = _obj(params.get("item"))
        native_type = item.get("type")
        text = item.get("text")
        if native_type == "userMessage":
            text = "".join(c.get("text", "") for c in map(_obj, item.get("content") or ()))
        fields: dict[str, Any] = dict(
            thread_id=_opt_str(params.get("threadId")), turn_id=_opt_str(params.get("turnId")),
            item_id=_opt_str(item.get("id")), item_type=_snake(native_type),
            text=_opt_str(text), command=_opt_str(item.get("command")), native=frame,
        )
        if cls is ItemCompleted:
            fields.update(
                status=_opt_str(item.get("status")), output=_opt_str(item.get("aggregatedOutput")),
                exit_code=_opt_int(item.get("exitCode")),
            )
        return cls(**fields)

    def _delta(self, params: dict, frame: dict, stream: str) -> WireEvent:
        delta = params.get("delta")
        if not isinstance(delta, str):
            raise _BadFrame("delta is not a string")
        return ItemDelta(
            thread_id=_opt_str(params.get("threadId")), turn_id=_opt_str(params.get("turnId")),
            item_id=_opt_str(params.get("itemId")), stream=stream, delta=delta, native=frame,
        )

    def _usage_updated(self, params: dict, frame: dict) -> WireEvent:
        tid = _opt_str(params.get("threadId"))
        self._usage[tid] = params.get("tokenUsage")
        return UsageUpdated(thread_id=tid, usage=params.get("tokenUsage"), native=frame)

    def _request_resolved(self, params: dict, frame: dict) -> WireEvent:
        approval_id = str(params.get("requestId"))
        self._approvals.pop(approval_id, None)  # an interrupt resolves it too; a late answer is moot
        return ApprovalResolved(approval_id=approval_id, native=frame)


_CODEX_NOTIFICATIONS: Final[dict[str, Callable[..., WireEvent]]] = {
    "turn/started": CodexProtocol._turn_started,
    "turn/completed": CodexProtocol._turn_completed,
    "item/started": lambda p, params, f: p._item(params, f, ItemStarted),
    "item/completed": lambda p, params, f: p._item(params, f, ItemCompleted),
    "item/agentMessage/delta": lambda p, params, f: p._delta(params, f, "text"),
    "item/commandExecution/outputDelta": lambda p, params, f: p._delta(params, f, "output"),
    "thread/tokenUsage/updated": CodexProtocol._usage_updated,
    "serverRequest/resolved": CodexProtocol._request_resolved,
}


def _agent_version(user_agent: Any) -> str | None:
    """``relay_probe/0.171.0 (Debian 12...)`` -> ``0.171.0``."""
    m = re.match(r"[^/\s]+/(\S+)", user_agent) if isinstance(user_agent, str) else None
    return m.group(1) if m else None


def _status_type(status: Any) -> Any:
    return status.get("type") if isinstance(status, dict) else status


@attrs.define(eq=False)
class ClaudeProtocol(_JsonLinesProtocol):
    """``claude -p --input-format stream-json --output-format stream-json --verbose``.

    One process per borrow.  It prints nothing until its first user line; the
    first ``system/init`` is the handshake, and every later one opens a turn.
    Turns are queued in the order user lines were written and each ends with
    exactly one ``result`` line.  Control requests (interrupt, probe) are
    correlated by ``request_id``.
    """

    session_id: str | None = attrs.field(init=False, default=None)
    handshaken: bool = attrs.field(init=False, default=False)
    _turns: list = attrs.field(init=False, factory=list)  # turn ids, oldest (the running one) first
    _started: bool = attrs.field(init=False, default=False)  # the oldest turn saw its init
    _interrupted: str | None = attrs.field(init=False, default=None)  # turn an interrupt was sent for
    last_request_id: str | None = attrs.field(init=False, default=None)
    _next_control: int = attrs.field(init=False, default=0)
    _controls: dict = attrs.field(init=False, factory=dict)  # request_id -> "interrupt" | "probe"
    _approvals: dict = attrs.field(init=False, factory=dict)  # request_id -> the tool input
    _tools: dict = attrs.field(init=False, factory=dict)  # tool_use id -> (item type, tool name, command)
    _message_id: str | None = attrs.field(init=False, default=None)  # of the streaming message

    def send_user_message(self, text: str, *, turn_id: str) -> bytes:
        """One turn; ``turn_id`` is the caller's name for it (Claude has none)."""
        if turn_id in self._turns:
            raise WireStateError(f"turn {turn_id!r} is already queued")
        self._turns.append(turn_id)
        return _encode_line({"type": "user", "message": {"role": "user", "content": text}})

    def send_interrupt(self) -> bytes:
        self._interrupted = self._turns[0] if self._turns else None
        return self._control("int", "interrupt", {"subtype": "interrupt"})

    def send_probe(self) -> bytes:
        """``mcp_status``: a harmless control request, answered in ms even mid-turn."""
        return self._control("p", "probe", {"subtype": "mcp_status"})

    def send_approval(self, approval_id: str, decision: str) -> bytes:
        if decision not in APPROVAL_DECISIONS:
            raise WireStateError(f"decision {decision!r} is not one of {APPROVAL_DECISIONS}")
        if approval_id not in self._approvals:
            raise WireStateError(f"no open approval {approval_id!r}")
        tool_input = self._approvals.pop(approval_id)
        if decision == "accept":
            answer: dict[str, Any] = {"behavior": "allow", "updatedInput": tool_input}
        else:
            answer = {"behavior": "deny", "message": "denied by relay"}
        response = {"subtype": "success", "request_id": approval_id, "response": answer}
        return _encode_line({"type": "control_response", "response": response})

    def open_turns(self) -> tuple[str, ...]:
        return tuple(self._turns)

    def _control(self, prefix: str, purpose: str, request: dict) -> bytes:
        self._next_control += 1
        rid = f"{prefix}-{self._next_control}"
        self._controls[rid] = purpose
        self.last_request_id = rid
        return _encode_line({"type": "control_request", "request_id": rid, "request": request})

    @property
    def _turn(self) -> str | None:
        return self._turns[0] if self._turns else None

    def _on_frame(self, frame: dict) -> list[WireEvent]:
        kind = frame.get("type")
        handler = _CLAUDE_FRAMES.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return [ProviderNotice(name=str(kind), native=frame)]
        return handler(self, frame)

    def _on_system(self, frame: dict) -> list[WireEvent]:
        subtype = frame.get("subtype")
        if subtype != "init":
            return [ProviderNotice(name=f"system/{subtype}", native=frame)]
        events: list[WireEvent] = []
        self.session_id = _opt_str(frame.get("session_id")) or self.session_id
        if not self.handshaken:
            self.handshaken = True
            version = _opt_str(frame.get("claude_code_version"))
            events.append(HandshakeCompleted(
                provider_version=version, session_id=self.session_id, native=frame,
            ))
        if self._turns and not self._started:
            self._started = True
            events.append(TurnStarted(thread_id=self.session_id, turn_id=self._turn, native=frame))
        return events

    def _on_stream_event(self, frame: dict) -> list[WireEvent]:
        event = _obj(frame.get("event"))
        etype = event.get("type")
        if etype == "message_start":
            self._message_id = _opt_str(_obj(event.get("message")).get("id"))
        message_id = _opt_str(frame.get("api_message_id")) or self._message_id
        item_id = f"{message_id}/{event.get('index')}"
        block = _obj(event.get("content_block"))
        delta = _obj(event.get("delta"))
        scope = dict(thread_id=self.session_id, turn_id=self._turn, item_id=item_id, native=frame)
        if etype == "content_block_start" and block.get("type") == "text":
            return [ItemStarted(item_type="agent_message", **scope)]
        if etype == "content_block_delta" and delta.get("type") == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str):
                raise _BadFrame("text_delta without text")
            return [ItemDelta(stream="text", delta=text, **scope)]
        return [ProviderNotice(name=f"stream_event/{etype}", native=frame)]

    def _on_assistant(self, frame: dict) -> list[WireEvent]:
        message = _obj(frame.get("message"))
        message_id = _opt_str(message.get("id"))
        scope = dict(thread_id=self.session_id, turn_id=self._turn, native=frame)
        events: list[WireEvent] = []
        for index, block in enumerate(map(_obj, message.get("content") or ())):
            if block.get("type") == "text":
                item_id = f"{message_id}/{index}"
                events.append(ItemCompleted(
                    item_id=item_id, item_type="agent_message", text=_opt_str(block.get("text")),
                    status="completed", **scope,
                ))
            elif block.get("type") == "tool_use":
                name = _opt_str(block.get("name"))
                item_type = "command_execution" if name == "Bash" else "tool_call"
                tool_id = _opt_str(block.get("id"))
                command = _obj(block.get("input")).get("command")
                command = command if isinstance(command, str) else None
                self._tools[tool_id] = (item_type, name, command)
                events.append(ItemStarted(
                    item_id=tool_id, item_type=item_type, tool_name=name, command=command, **scope,
                ))
        return events or [ProviderNotice(name="assistant", native=frame)]

    def _on_user(self, frame: dict) -> list[WireEvent]:
        content = _obj(frame.get("message")).get("content")
        events: list[WireEvent] = []
        for block in map(_obj, content if isinstance(content, list) else ()):
            if block.get("type") != "tool_result":
                continue
            tool_id = _opt_str(block.get("tool_use_id"))
            # the result line names only the tool_use id: the command comes from the tool_use
            # line, so a completed command item carries it as Codex's does
            item_type, name, command = self._tools.pop(tool_id, ("tool_call", None, None))
            events.append(ItemCompleted(
                thread_id=self.session_id, turn_id=self._turn, item_id=tool_id, item_type=item_type,
                tool_name=name, command=command, status="failed" if block.get("is_error") else "completed",
                output=_tool_output(block.get("content")), native=frame,
            ))
        return events or [ProviderNotice(name="user", native=frame)]

    def _on_result(self, frame: dict) -> list[WireEvent]:
        text = frame.get("result")
        text = text if isinstance(text, str) else ""
        errors = frame.get("errors")
        error = "; ".join(map(str, errors)) if isinstance(errors, list) and errors else text
        if not self._turns:
            if not self.handshaken:  # e.g. --resume with an unknown id: exits before any turn
                return [HandshakeFailed(error=error or "result before any turn", native=frame)]
            return [ProtocolError(reason="a result line with no turn waiting for it", native=frame)]
        turn_id = self._turns.pop(0)
        self._started = False
        interrupted = frame.get("terminal_reason") in _CLAUDE_ABORTED or self._interrupted == turn_id
        self._interrupted = None
        if frame.get("is_error") is not True:
            cls: type[_TurnEnded] = TurnCompleted
            error = None
        else:
            cls = TurnInterrupted if interrupted else TurnFailed
        return [cls(
            thread_id=self.session_id, turn_id=turn_id, output_text=text if cls is TurnCompleted else "",
            error=error, usage=frame.get("usage"), native=frame,
        )]

    def _on_control_request(self, frame: dict) -> list[WireEvent]:
        rid = _opt_str(frame.get("request_id"))
        request = _obj(frame.get("request"))
        subtype = request.get("subtype")
        if subtype != "can_use_tool" or rid is None:
            error = f"flow-relay does not handle control request {subtype!r}"
            response = {"subtype": "error", "request_id": rid, "error": error}
            self._outbox += _encode_line({"type": "control_response", "response": response})
            return [RequestRefused(method=f"control_request/{subtype}", request_id=str(rid), native=frame)]
        tool_input = _obj(request.get("input"))
        self._approvals[rid] = tool_input
        name = _opt_str(request.get("tool_name"))
        command = tool_input.get("command")
        return [ApprovalRequested(
            approval_id=rid, approval_kind="command" if name == "Bash" else "tool",
            thread_id=self.session_id, turn_id=self._turn, item_id=_opt_str(request.get("tool_use_id")),
            tool_name=name, tool_input=tool_input, command=command if isinstance(command, str) else None,
            reason=_opt_str(request.get("description")), native=frame,
        )]

    def _on_control_response(self, frame: dict) -> list[WireEvent]:
        response = _obj(frame.get("response"))
        rid = _opt_str(response.get("request_id"))
        purpose = self._controls.pop(rid, None)
        ok = response.get("subtype") == "success"
        if purpose == "probe":
            return [ProbeAnswered(request_id=rid, ok=ok, native=frame)]
        if purpose == "interrupt" and ok:
            return [InterruptAcknowledged(thread_id=self.session_id, turn_id=self._turn, native=frame)]
        if purpose == "interrupt":
            message = _opt_str(response.get("error")) or "interrupt refused"
            return [RequestFailed(method="interrupt", request_id=rid, message=message, native=frame)]
        return [ProtocolError(reason=f"a control_response to unknown request_id {rid!r}", native=frame)]

    def _on_control_cancel(self, frame: dict) -> list[WireEvent]:
        rid = _opt_str(frame.get("request_id"))
        self._approvals.pop(rid, None)
        return [ApprovalCancelled(approval_id=str(rid), native=frame)]


_CLAUDE_FRAMES: Final[dict[str, Callable[..., list[WireEvent]]]] = {
    "system": ClaudeProtocol._on_system,
    "stream_event": ClaudeProtocol._on_stream_event,
    "assistant": ClaudeProtocol._on_assistant,
    "user": ClaudeProtocol._on_user,
    "result": ClaudeProtocol._on_result,
    "control_request": ClaudeProtocol._on_control_request,
    "control_response": ClaudeProtocol._on_control_response,
    "control_cancel_request": ClaudeProtocol._on_control_cancel,
}


def _tool_output(content: Any) -> str | None:
    if isinstance(content, str) or content is None:
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return None


@attrs.define(eq=False)
class KimiProtocol(_JsonLinesProtocol):
    """Kimi CLI print mode (``--print --input-format stream-json --output-format stream-json``).

    Only text turns were observed: one ``{"role":"user","content":…}`` line in,
    one ``{"role":"assistant","content":"…"}`` line out, so an assistant line
    with string content is the whole turn.  The reference documents no
    interrupt, no probe, no approvals and no tool lines (anything else becomes a
    ``provider.notice``), and a model error ends the process (exit 75).
    """

    handshaken: bool = attrs.field(init=False, default=False)
    _turns: list = attrs.field(init=False, factory=list)

    def send_user_message(self, text: str, *, turn_id: str) -> bytes:
        if turn_id in self._turns:
            raise WireStateError(f"turn {turn_id!r} is already queued")
        self._turns.append(turn_id)
        return _encode_line({"role": "user", "content": text})

    def open_turns(self) -> tuple[str, ...]:
        return tuple(self._turns)

    def _on_frame(self, frame: dict) -> list[WireEvent]:
        content = frame.get("content")
        if frame.get("role") != "assistant" or not isinstance(content, str):
            return [ProviderNotice(name=f"role/{frame.get('role')}", native=frame)]
        if not self._turns:
            return [ProtocolError(reason="an assistant line with no turn waiting for it", native=frame)]
        turn_id = self._turns.pop(0)
        events: list[WireEvent] = []
        if not self.handshaken:
            self.handshaken = True
            events.append(HandshakeCompleted(native=frame))
        events += [
            TurnStarted(turn_id=turn_id, native=frame),
            ItemCompleted(turn_id=turn_id, item_type="agent_message", text=content, status="completed",
                          native=frame),
            TurnCompleted(turn_id=turn_id, output_text=content, native=frame),
        ]
        return events


################################################################
# Provider settings (offline homes and environments; pure)
################################################################

# What a provider process needs besides its argv, as data: the files of its
# home directory (Codex's ``$CODEX_HOME/config.toml``) and the environment
# variables that point it at one model endpoint and keep it from talking to
# anything else.  The offline settings are always applied, whatever the
# endpoint: without them Codex looks up github.com, chatgpt.com and
# ab.chatgpt.com at start-up and Claude api.anthropic.com (DNS logs in
# ../shared/reference/providers.md), and both retry failed model calls on their
# own, which would hide failures from the relay.  Retries are the relay's
# decision, so the CLIs' own are off.
#
# Where an endpoint comes from (``flow/relay.toml`` ``[providers.<name>]``,
# overridden by ``RELAY_<NAME>_BASE_URL`` / ``RELAY_<NAME>_MODEL`` in the
# environment) is resolved by ``provider_endpoint``; the key itself is only
# ever read from the environment variable the endpoint names, handed to the
# child in its environment and never written to a file, the ledger or a log.

#: Providers whose home and environment this section knows (Kimi's config was not needed yet).
PROVIDER_SETTINGS: Final = ("codex", "claude")

#: The real endpoints, the key variables and models used when nothing else is configured.
_PROVIDER_DEFAULTS: Final = {
    "codex": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY", "model": "gpt-5.5"},
    "claude": {"base_url": "https://api.anthropic.com", "api_key_env": "ANTHROPIC_API_KEY", "model": None},
}

#: Codex's ``stream_idle_timeout_ms``: its own detector of a stalled model stream (milliseconds).
CODEX_STREAM_IDLE_TIMEOUT_MS: Final = 20_000

#: Claude's switches that turn off telemetry, error reports, updates and all other
#: non-model traffic, and its own retries (with them a 5xx is retried for minutes).
CLAUDE_OFFLINE_ENV: Final = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_MAX_RETRIES": "0",
}


@attrs.frozen
class ProviderEndpoint:
    """One model endpoint for one provider: where to send turns and which variable holds the key."""

    provider: str
    base_url: str
    api_key_env: str
    model: str | None = None


def provider_endpoint(
    provider: str, table: dict | None = None, environ: dict | None = None,
) -> ProviderEndpoint:
    """The endpoint of ``provider`` from its ``[providers.<name>]`` table, then the environment.

    ``table`` may hold ``base_url``, ``api_key_env`` and ``model`` (anything else
    is refused: a key is never configured in a file, only the name of the
    variable that holds it); ``RELAY_<NAME>_BASE_URL`` and ``RELAY_<NAME>_MODEL``
    in ``environ`` override it.
    """
    if provider not in _PROVIDER_DEFAULTS:
        raise InvalidArgument(f"no endpoint settings for provider {provider!r}",
                              hint=f"use one of {', '.join(PROVIDER_SETTINGS)}")
    values = dict(_PROVIDER_DEFAULTS[provider])
    for key, value in (table or {}).items():
        if key not in values:
            raise InvalidArgument(
                f"[providers.{provider}] has unknown setting {key!r}",
                hint="use base_url, api_key_env (the name of the variable that holds the key) and model",
            )
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"[providers.{provider}] {key} must be a non-empty string",
                                  hint="fix flow/relay.toml")
        values[key] = value
    env = environ if environ is not None else os.environ
    prefix = f"RELAY_{provider.upper()}_"
    values["base_url"] = env.get(prefix + "BASE_URL") or values["base_url"]
    values["model"] = env.get(prefix + "MODEL") or values["model"]
    if not re.fullmatch(r"https?://[^\s?#]+", values["base_url"]):
        raise InvalidArgument(f"provider {provider}: base_url {values['base_url']!r} is not an http(s) URL",
                              hint=f"set [providers.{provider}] base_url or {prefix}BASE_URL")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", values["api_key_env"]):
        raise InvalidArgument(f"provider {provider}: api_key_env {values['api_key_env']!r} "
                              "is not a variable name",
                              hint="name the environment variable that holds the key, e.g. OPENAI_API_KEY")
    return ProviderEndpoint(provider=provider, **values)


def codex_config(endpoint: ProviderEndpoint, *, approval_policy: str = "never",
                 sandbox_mode: str = "read-only",
                 stream_idle_timeout_ms: int = CODEX_STREAM_IDLE_TIMEOUT_MS) -> dict:
    """Codex's ``config.toml`` as a mapping: one model provider, no retries, no plugins, no analytics."""
    return {
        "model": endpoint.model or _PROVIDER_DEFAULTS["codex"]["model"],
        "model_provider": "flow_relay",
        "approval_policy": approval_policy,
        "sandbox_mode": sandbox_mode,
        "check_for_update_on_startup": False,
        "model_providers": {"flow_relay": {
            "name": "flow-relay endpoint",
            "base_url": endpoint.base_url.rstrip("/"),
            "env_key": endpoint.api_key_env,
            "wire_api": "responses",
            "request_max_retries": 0,
            "stream_max_retries": 0,
            "stream_idle_timeout_ms": stream_idle_timeout_ms,
        }},
        "features": {"plugins": False},  # else github.com, api.github.com, chatgpt.com at start-up
        "analytics": {"enabled": False},  # else ab.chatgpt.com
    }


def provider_home_files(endpoint: ProviderEndpoint, **codex_options: Any) -> dict[str, bytes]:
    """Files to write under the provider's home (paths relative to it) before it starts.

    Codex: ``config.toml`` (``codex_config``; ``codex_options`` go there).
    Claude: nothing; it is configured by its environment and writes ``.claude/`` itself.
    """
    if endpoint.provider == "codex":
        import tomli_w

        return {"config.toml": tomli_w.dumps(codex_config(endpoint, **codex_options)).encode()}
    if endpoint.provider == "claude":
        return {}
    raise InvalidArgument(f"no home files for provider {endpoint.provider!r}",
                          hint=f"use one of {', '.join(PROVIDER_SETTINGS)}")


def provider_env(endpoint: ProviderEndpoint, *, home: str, tmpdir: str, api_key: str) -> dict[str, str]:
    """Variables to set in the provider's environment (over a scrubbed base such as PATH only).

    ``home`` is ``CODEX_HOME`` and ``HOME`` (Codex) or ``HOME`` (Claude); ``tmpdir`` becomes
    ``TMPDIR``, since both CLIs write sockets and scratch there.  ``api_key``
    is the value of ``endpoint.api_key_env``; the caller must not log the result.
    """
    env = {"TMPDIR": tmpdir}
    if endpoint.provider == "codex":
        # HOME too: Codex runs every command with ``bash -lc``, a login shell that sources
        # $HOME/.profile (and through it .bashrc); without HOME, bash takes the passwd home,
        # so the relay user's own shell files would run in every borrower's command.
        return {**env, "CODEX_HOME": home, "HOME": home, endpoint.api_key_env: api_key}
    if endpoint.provider == "claude":
        env.update(HOME=home, ANTHROPIC_BASE_URL=endpoint.base_url.rstrip("/"), ANTHROPIC_API_KEY=api_key)
        if endpoint.model:
            env["ANTHROPIC_MODEL"] = endpoint.model
        return {**env, **CLAUDE_OFFLINE_ENV}
    raise InvalidArgument(f"no environment for provider {endpoint.provider!r}",
                          hint=f"use one of {', '.join(PROVIDER_SETTINGS)}")


class _TaskStatusIgnored:
    """``trio.TASK_STATUS_IGNORED`` without importing trio when the module
    loads: the default of every ``task_status``, whose ``started`` does nothing
    (the task was not started with ``nursery.start``)."""

    def __repr__(self) -> str:
        return "TASK_STATUS_IGNORED"

    def started(self, value: Any = None) -> None:
        pass


_TASK_STATUS_IGNORED: Final = cast("TaskStatus[Any]", _TaskStatusIgnored())


################################################################
# Process supervisor (provider children: spawn, read, stop, reap)
################################################################

# One ``ProviderProcess`` per provider child.  Its life is a small state
# machine, each transition logged with its reason:
#
#     starting --(handshake, or spawned for CLIs that print nothing first)--> running
#     starting | running --(stop asked)--> stopping --(reaped)--> exited
#     starting | running --(stdout EOF / exit nobody asked for)--> exited
#
# The child runs in its own session and process group (``start_new_session``),
# so a stop signals the group: commands the agent started die with it.  It
# also gets PR_SET_PDEATHSIG=SIGKILL, so a relay killed with SIGKILL takes its
# children along.  That signal fires when the *thread* that forked the child
# exits, not the process; trio's ``open_process`` forks in a worker thread
# (which trio retires after idling), so the child is forked here, on the trio
# thread, with ``subprocess.Popen`` (a few milliseconds) and waited for with a
# pidfd.  Belt and braces: every process group is recorded in
# ``flow/tmp/relay/providers.json``, and the next ``serve`` kills what a dead
# server left (``reap_orphans``), identifying members by the scratch path in
# their environment, so a recycled pid or group id is never hit.
#
# stdout is read all the time by one task and handed on in bounded batches
# (a full pipe stalls the agent); stderr is kept as a ring of its newest lines.

#: The chunk a provider's stdout is read in (bytes).
READ_CHUNK_BYTES: Final = 64 * KIB
#: Event batches (one per stdout read) queued for the runtime before the reader waits.
EVENT_BATCHES: Final = 64
_PR_SET_PDEATHSIG: Final = 1
#: The environment variables that mark a provider process as this workspace's.
SCRATCH_ENV: Final = "FLOW_RELAY_SCRATCH"
SESSION_ENV: Final = "FLOW_RELAY_SESSION"

class _LazyLogger:
    """``_logger(area)`` on first use: logging is not imported at import time."""

    def __init__(self, area: str) -> None:
        self.area = area

    def __getattr__(self, name: str) -> Any:
        return getattr(_logger(self.area), name)


_plog = _LazyLogger("process")


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def scratch_dirs(tmp_dir: Path, session_id: str) -> dict[str, Path]:
    """A session's scratch: its root, a home (HOME and CODEX_HOME), TMPDIR and work dir."""
    root = tmp_dir / SESSIONS_DIR / session_id
    return {"root": root, "home": root / "home", "tmp": root / "tmp", "work": root / "work"}


def make_scratch(tmp_dir: Path, session_id: str) -> dict[str, Path]:
    dirs = scratch_dirs(tmp_dir, session_id)
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return dirs


def _group_members(pgid: int, marker: str | None = None) -> list[int]:
    """Live pids in process group ``pgid`` (with ``marker`` in their environment, if given)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == b"Z":
                continue
            if marker is not None:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() not in f.read().split(b"\0"):
                        continue
        except (OSError, IndexError, ValueError):
            continue
        found.append(int(entry))
    return found


def reap_orphans(tmp_dir: Path) -> int:
    """Kill the provider process groups a previous server of this workspace
    recorded and left behind (it died without stopping them).  Returns how
    many processes were killed.  Blocking: call from a worker thread."""
    path = tmp_dir / PROVIDERS_RECORD
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return 0
    if not isinstance(doc, dict) or doc.get("server_pid") == os.getpid():
        return 0
    killed = 0
    for row in doc.get("processes", []) if isinstance(doc.get("processes"), list) else ():
        try:
            pgid, scratch = int(row["pgid"]), str(row["scratch"])
        except (KeyError, TypeError, ValueError):
            continue
        for pid in _group_members(pgid, f"{SCRATCH_ENV}={scratch}"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    with contextlib.suppress(OSError):
        path.unlink()
    if killed:
        _plog.warning("killed %d provider processes left by a previous server", killed)
    return killed


def _write_record(tmp_dir: Path, rows: list[dict[str, Any]]) -> None:
    """The live provider groups, for the next server's ``reap_orphans`` (temp, fsync, rename)."""
    _make_dirs(tmp_dir)
    path = tmp_dir / PROVIDERS_RECORD
    tmp = path.with_name(f".{PROVIDERS_RECORD}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(json.dumps({"server_pid": os.getpid(), "processes": rows}, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(tmp_dir)


@attrs.define(eq=False)
class ProviderProcess:
    """One provider child: its pipes, its protocol object, its state machine."""

    session_id: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    protocol: Any
    config: Config = Config()
    state: str = "starting"
    reason: str = ""
    pid: int = 0
    started_at: str = ""
    provider_version: str = ""
    returncode: int | None = None
    stop_requested: bool = False
    #: When stdout last gave bytes: trio time (the stall timer) and a wall stamp.
    last_output_at: float = 0.0
    last_output_stamp: str = ""
    stderr: Any = None  # deque of the newest lines
    events: Any = None  # receive side: one list of WireEvents per stdout read
    exited: Any = None  # trio.Event
    _events_send: Any = None
    _popen: Any = None
    _stdin: Any = None
    _stdout: Any = None
    _stderr_stream: Any = None
    _write_lock: Any = None
    _reading: bool = False
    _stderr_seen: Any = attrs.Factory(lambda: trio.Event())
    #: Called after every state transition (the runtime wakes its watchers).
    on_change: Callable[[], None] | None = None

    def __attrs_post_init__(self) -> None:
        import collections

        self.stderr = collections.deque(maxlen=self.config.stderr_lines)
        self._events_send, self.events = trio.open_memory_channel(EVENT_BATCHES)
        self.exited = trio.Event()
        self._write_lock = trio.Lock()

    @property
    def info(self) -> rc.ProcessInfo:
        return rc.ProcessInfo(self.pid, self.state, self.started_at, self.provider_version)

    def transition(self, state: str, reason: str) -> None:
        if state != self.state:
            _plog.info("session %s pid %s: %s -> %s (%s)", self.session_id, self.pid, self.state,
                       state, reason)
        self.state, self.reason = state, reason
        if self.on_change is not None:
            self.on_change()

    def spawn(self, now: float) -> None:
        """Fork and exec the child (on the calling, trio, thread: see above)."""
        import shlex
        import subprocess

        fds = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr: (read, write)
        child = (fds[0][0], fds[1][1], fds[2][1])
        try:
            self._popen = subprocess.Popen(
                self.argv, stdin=child[0], stdout=child[1], stderr=child[2], cwd=self.cwd,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent, close_fds=True)
        except OSError:
            for r, w in fds:
                os.close(r)
                os.close(w)
            raise
        for fd in child:
            os.close(fd)
        self.pid, self.started_at = self._popen.pid, iso(now)
        self.last_output_at = trio.current_time()
        self._stdin = trio.lowlevel.FdStream(fds[0][1])
        self._stdout = trio.lowlevel.FdStream(fds[1][0])
        self._stderr_stream = trio.lowlevel.FdStream(fds[2][0])
        _plog.info("session %s: spawned pid %s: %s", self.session_id, self.pid, shlex.join(self.argv))

    async def run(self, *, task_status: TaskStatus[None] = _TASK_STATUS_IGNORED) -> None:
        """Read stdout and stderr until the child is gone, then reap it."""
        try:
            self._reading = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stderr)
                task_status.started()
                await self._read_stdout()
                await self._reap()
        finally:
            self._reading = False
            with trio.CancelScope(shield=True):
                if self.returncode is None:  # cancelled: the relay is stopping
                    await self.stop("the relay is stopping")
                for stream in (self._stdin, self._stdout, self._stderr_stream):
                    with contextlib.suppress(Exception):
                        await stream.aclose()
                self._events_send.close()

    async def _read_stdout(self) -> None:
        while True:
            try:
                chunk = await self._stdout.receive_some(READ_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if chunk:
                self.last_output_at, self.last_output_stamp = trio.current_time(), iso(time.time())
            events = self.protocol.receive_data(chunk) if chunk else self.protocol.receive_eof()
            reply = self.protocol.data_to_send()
            if reply:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.write(reply)
            if events:
                await self._events_send.send(events)
            if not chunk:
                return

    async def _read_stderr(self) -> None:
        tail = b""
        while True:
            try:
                chunk = await self._stderr_stream.receive_some(READ_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not chunk:
                if tail:
                    self.stderr.append(tail.decode("utf-8", "replace"))
                return
            *lines, tail = (tail + chunk).split(b"\n")
            tail = tail[-4096:]
            self.stderr.extend(line[:4096].decode("utf-8", "replace") for line in lines)
            if lines:
                self._stderr_seen.set()
                self._stderr_seen = trio.Event()

    async def wait_stderr(self, text: str) -> str:
        """The first kept stderr line containing ``text``, once there is one."""
        while True:
            line = next((x for x in self.stderr if text in x), None)
            if line is not None:
                return line
            await self._stderr_seen.wait()

    async def write(self, data: bytes) -> None:
        """Write to the child's stdin (whole, one writer at a time)."""
        async with self._write_lock:
            await self._stdin.send_all(data)

    async def _reap(self) -> None:
        """Wait for the exit (a pidfd, else a worker thread) and collect the status: no zombie."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pidfd = None
        if pidfd is not None:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            self.returncode = self._popen.wait()  # it has exited: this does not block
        else:  # pragma: no cover - kernels before 5.3
            self.returncode = await trio.to_thread.run_sync(self._popen.wait)
        if self.exited.is_set():
            return
        self._kill_group()  # whatever the agent left running in its group goes too
        why = self.reason if self.stop_requested else f"exited on its own with {self.returncode}"
        self.transition("exited", why)
        self.exited.set()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def leftovers(self) -> list[int]:
        """Processes of the child's group other than the child itself (what its commands left)."""
        return [pid for pid in _group_members(self.pid) if pid != self.pid]

    async def stop(self, reason: str) -> None:
        """Close stdin, wait; SIGTERM the group, wait; SIGKILL the group, wait.
        Each wait is bounded by configuration; shielded, so it finishes."""
        if self.returncode is not None:
            return
        self.stop_requested = True
        self.transition("stopping", reason)
        cfg = self.config
        with trio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self._stdin.aclose()
            for sig, seconds in ((None, cfg.stop_stdin_seconds), (signal.SIGTERM, cfg.stop_term_seconds),
                                 (signal.SIGKILL, cfg.stop_kill_seconds)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.pid, sig)
                with trio.move_on_after(seconds):
                    if self._reading:
                        await self.exited.wait()
                    else:  # the reader was cancelled (the relay is stopping): reap here
                        await self._reap()
                    return
            _plog.error("session %s pid %s survived SIGKILL for %s s", self.session_id, self.pid,
                        cfg.stop_kill_seconds)


################################################################
# Runtime (pools, turns, approvals, hand-over)
################################################################

# The runtime lives in the supervision nursery of ``serve``.  It reconciles
# the ledger with reality: every profile gets ``pool_size`` idle sessions with
# a live, handshaken process (it creates the sessions through the ledger owner,
# like any RPC), and every lease that ends hands its session over (pooled) or
# closes it (one-borrow).  It runs turns for the holder of a session's current
# fencing token and writes what the agent does into the session's streams:
# provider-neutral events (``turn.started``, ``item.started``,
# ``item.completed``, ``approval.requested``, ``turn.completed`` /
# ``turn.failed`` / ``turn.interrupted``) with the native frame under
# ``data.native``, one result record per turn.  Those records are committed
# before they are published (the ledger owner publishes after each commit).
# Token deltas are not durable: each stdout read's deltas of one item are
# coalesced into one live ``delta`` frame (no SSE id, so no Last-Event-ID
# position), published at once; the completed item carries the whole text.
#
# Failure detection (specs/flow-runtime-contract.md, "Failure detection"):
# ``_on_exit`` (a process that ended on its own: ``provider_exited``, or
# ``start_failed`` before it got going), ``_start_failed`` (backoff, degraded
# profiles), the per-process watchdog ``_watch`` (stall timer:
# ``heartbeat_lost``; liveness probe: ``unresponsive``), ``_check_scratch``
# and the check before a turn (``tmp_corrupted``) and, at start,
# ``_fail_turns_of_a_dead_relay`` (``relay_restarted``).  Each quarantines the
# session through ``auto_quarantine`` (code and evidence; leases revoked),
# fails its running turn and lets the pool start a replacement.  What was
# observed is counted per profile in ``health`` (memory only, exported).
#
# Repair (``repair_session``) brings a failed session back: a fresh scratch and
# process that takes up the conversation its last turn recorded
# (``Turn.thread_id``: Codex ``thread/resume``, Claude ``--resume``), kept for
# the holder of the revoked lease only; or, when that fails, a replacement
# session.  While it runs, the session is in ``_repairing`` and the reconcile
# loop leaves it alone; at start, ``_repair_restarted`` repairs what
# ``_fail_turns_of_a_dead_relay`` quarantined.

_rlog = _LazyLogger("runtime")

#: The provider's real CLI when a profile names no --command.
DEFAULT_COMMANDS: Final = {
    "codex": ("codex", "app-server"),
    "claude": ("claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json",
               "--verbose", "--include-partial-messages"),
    "kimi": ("kimi", "--print", "--input-format", "stream-json", "--output-format", "stream-json"),
}
#: How often the runtime re-reads the ledger when no notice woke it (seconds).
RECONCILE_SECONDS: Final = 0.5
#: The longest a profile waits before its next spawn after failures (seconds):
#: also the period of a degraded profile's one start attempt.
SPAWN_BACKOFF_MAX_SECONDS: Final = 60.0
#: The wait after a first start failure; it doubles with each one in a row.
SPAWN_BACKOFF_FIRST_SECONDS: Final = 1.0
#: How much of a native frame an event record keeps (bytes of canonical JSON).
NATIVE_KEPT_BYTES: Final = 16 * KIB
#: The event kinds the runtime makes durable (everything else stays in memory).
DURABLE_KINDS: Final = ("turn.started", "item.started", "item.completed", "approval.requested",
                        "approval.resolved", "turn.completed", "turn.failed", "turn.interrupted")
_END_STATES: Final = {"turn.completed": "completed", "turn.failed": "failed",
                      "turn.interrupted": "interrupted"}
#: Item types that are no work in flight (the stall timer ignores their open items).
_NOT_IN_FLIGHT: Final = ("agent_message", "user_message", "reasoning")


_PROTOCOLS: Final = {"codex": CodexProtocol, "claude": ClaudeProtocol, "kimi": KimiProtocol}


def provider_argv(profile: rc.Profile) -> list[str]:
    """The argv of a profile's process: its --command (or the real CLI), with
    the documented options that are flags appended (Claude).  The program is
    resolved on PATH; one that cannot be found is ``FailedPrecondition``."""
    import shutil

    argv = list(profile.command or DEFAULT_COMMANDS[profile.provider])
    found = shutil.which(argv[0])
    if found is None:
        raise FailedPrecondition(f"{argv[0]} is not on PATH for profile {profile.name!r}",
                                 hint="install it, or register the profile with --command")
    argv[0] = found
    opts = profile_options(profile)
    if profile.provider == "claude":
        flags = {"permission_mode": "--permission-mode", "allowed_tools": "--allowedTools",
                 "model": "--model"}
        for key, flag in flags.items():
            if key in opts:
                argv += [flag, opts[key]]
        if opts.get("permission_prompt", "stdio") == "stdio":
            argv += ["--permission-prompt-tool", "stdio"]
    if profile.provider == "kimi" and "model" in opts:
        argv += ["--model", opts["model"]]
    return argv


def process_env(profile: rc.Profile, session_id: str, dirs: dict[str, Path],
                endpoint: ProviderEndpoint | None) -> dict[str, str]:
    """The child's environment: the relay's, the provider's endpoint and
    offline settings (``provider_env``: always on), the profile's --env, then
    the scratch the runtime owns."""
    env = dict(os.environ)
    if endpoint is not None:
        env.update(provider_env(endpoint, home=str(dirs["home"]), tmpdir=str(dirs["tmp"]),
                                api_key=os.environ.get(endpoint.api_key_env, "")))
    env.update(dict(entry.split("=", 1) for entry in profile.env))
    opts = profile_options(profile)
    if profile.provider == "claude" and "base_url" in opts:
        env["ANTHROPIC_BASE_URL"] = opts["base_url"]
    env.update({"HOME": str(dirs["home"]), "TMPDIR": str(dirs["tmp"]),
                SCRATCH_ENV: str(dirs["root"]), SESSION_ENV: session_id})
    if profile.provider == "codex":
        env["CODEX_HOME"] = str(dirs["home"])
    return env


def write_provider_home(profile: rc.Profile, home: Path, providers: dict[str, dict[str, Any]],
                        written: dict[str, str] | None = None) -> ProviderEndpoint | None:
    """Write the provider's offline home files (Codex's ``config.toml``) into
    its scratch home; returns its endpoint (None for a provider without
    settings, e.g. Kimi).  The profile's Codex options go into the config.
    ``written``, if given, gets each file's name -> SHA-256 (the scratch check)."""
    if profile.provider not in PROVIDER_SETTINGS:
        return None
    endpoint = provider_endpoint(profile.provider, providers.get(profile.provider), dict(os.environ))
    opts = profile_options(profile)
    if opts.get("model"):
        endpoint = attrs.evolve(endpoint, model=opts["model"])
    codex = ({"approval_policy": opts.get("approval_policy", "never"),
              "sandbox_mode": opts.get("sandbox", "read-only")}
             if profile.provider == "codex" else {})
    for name, data in provider_home_files(endpoint, **codex).items():
        (home / name).write_bytes(data)
        if written is not None:
            written[name] = _sha256(data).hexdigest()
    return endpoint


# -- failure detection: evidence, scratch checks, provider health (issue 12) ----------

#: stderr lines a quarantine's evidence keeps (the newest), each trimmed to this many characters.
EVIDENCE_STDERR_LINES: Final = 10
EVIDENCE_LINE_CHARS: Final = 300
#: Environment names whose values are never copied from stderr into evidence.
_SECRET_NAME: Final = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def _secret_values(env: dict[str, str]) -> tuple[str, ...]:
    """Values of the child's environment that look like credentials (redacted from evidence)."""
    return tuple(v for k, v in env.items() if len(v) >= 8 and any(w in k.upper() for w in _SECRET_NAME))


def stderr_evidence(lines: Any, secrets: tuple[str, ...] = ()) -> list[str]:
    """The newest stderr lines, trimmed, with any credential of the child's environment redacted."""
    out = []
    for line in list(lines)[-EVIDENCE_STDERR_LINES:]:
        for secret in secrets:
            line = line.replace(secret, "[redacted]")
        out.append(line.strip()[:EVIDENCE_LINE_CHARS])
    return out


def exit_evidence(returncode: int | None) -> tuple[int | None, str]:
    """(exit status, signal name or "") of a reaped child."""
    if returncode is not None and returncode < 0:
        try:
            return returncode, signal.Signals(-returncode).name
        except ValueError:
            return returncode, f"signal {-returncode}"
    return returncode, ""


def scratch_fingerprint(root: Path, home: Path, written: dict[str, str]) -> dict[str, Any]:
    """What ``scratch_damage`` compares against: the scratch root's (device,
    inode) and the SHA-256 of each provider home file the relay wrote.  Blocking."""
    st = os.stat(root)
    return {"root": str(root), "home": str(home), "ino": (st.st_dev, st.st_ino), "files": dict(written)}


def scratch_damage(fingerprint: dict[str, Any]) -> str:
    """Why the scratch no longer is what the relay made ("" when intact):
    missing, replaced (another inode), or a provider home file changed.
    Blocking (a stat and a small file's hash): call from a worker thread."""
    try:
        st = os.stat(fingerprint["root"])
    except OSError:
        return f"scratch {fingerprint['root']} is missing"
    if (st.st_dev, st.st_ino) != tuple(fingerprint["ino"]):
        return f"scratch {fingerprint['root']} was replaced"
    for name, digest in fingerprint["files"].items():
        path = Path(fingerprint["home"]) / name
        try:
            got = _sha256(path.read_bytes()).hexdigest()
        except OSError:
            return f"provider config {path} is missing"
        if got != digest:
            return f"provider config {path} changed under the relay"
    return ""


#: Health counters of a profile (``ProviderHealth``), each a Prometheus counter.
HEALTH_COUNTERS: Final = ("starts", "exits", "crashes", "stalls", "probe_failures", "failed_turns",
                          "tmp_corrupted", "start_failures")


@attrs.define
class ProviderHealth:
    """What the runtime observed of one profile's processes since this server
    started: in memory only, exported (``status``, ``GET /api/relay/runtime``,
    ``/metrics``), never written to the provider's owner."""

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
    consecutive_failures: int = 0  # start failures since the last good start
    last_error: str = ""
    last_error_at: str = ""
    #: Automatic quarantines by code (``rc.QUARANTINE_CODES``).
    quarantines: dict[str, int] = attrs.Factory(dict)

    def error(self, text: str, stamp: str) -> None:
        self.last_error, self.last_error_at = text[:500], stamp


def close_session(ledger: Ledger, session_id: str, reason: str, ctx: Ctx):
    """A session whose process is gone for good (a one-borrow session after its lease)."""
    session = ledger.sessions.get(session_id)
    if session is None or session.state == "closed":
        return ledger, session
    session = attrs.evolve(session, state="closed", updated_at=ctx.stamp)
    return attrs.evolve(ledger, sessions=_put(ledger.sessions, session_id, session)), session


def _native(frame: Any) -> Any:
    """The native frame, or a note of its size when it is too big to keep."""
    size = len(_canonical(frame))
    return frame if size <= NATIVE_KEPT_BYTES else {"omitted_bytes": size}


def event_data(event: WireEvent, turn_id: str | None) -> dict[str, Any]:
    """The provider-neutral record of one wire event (fields left empty are dropped)."""
    data: dict[str, Any] = {"turn_id": turn_id}
    for field in attrs.fields(type(event)):
        if field.name in ("native", "turn_id", "thread_id"):
            continue
        value = getattr(event, field.name)
        if value not in (None, "", ()):
            data[field.name] = value
    data["native"] = _native(event.native)
    return data


class _NotYet(FailedPrecondition):
    """A request id with no earlier answer (RepairSession looks before it acts)."""


def _naming_thread(apply: Callable[[Ledger, Ctx], tuple[Ledger, Any]], thread_id: str):
    """StartTurn's operation, its new turn recording the conversation it runs in."""
    def run(ledger: Ledger, ctx: Ctx) -> tuple[Ledger, Any]:
        new, reply = apply(ledger, ctx)
        if new is ledger:
            return new, reply
        turn = attrs.evolve(reply.turn, thread_id=thread_id)
        return attrs.evolve(new, turns=_put(new.turns, turn.turn_id, turn)), rc.TurnReply(turn)
    return run


def rebuild_scratch(tmp_dir: Path, session_id: str) -> Path | None:
    """A repair's fresh scratch: ``home``, ``tmp`` and ``work`` move to
    ``sessions/<id>/evidence-<n>/`` (kept for the post-mortem until the session
    is closed and cleaned up), then fresh ones are made and the old home (the
    provider's conversation store: Codex rollouts, Claude sessions) and work
    dir are copied back, so the conversation can be resumed; ``tmp`` (stale
    sockets and locks) starts empty, and the spawn rewrites the provider's home
    files.  Returns the evidence directory (None: there was no scratch)."""
    import shutil

    dirs = scratch_dirs(tmp_dir, session_id)
    evidence = None
    if any(dirs[name].exists() for name in ("home", "tmp", "work")):
        n = 1
        while (dirs["root"] / f"evidence-{n}").exists():
            n += 1
        evidence = dirs["root"] / f"evidence-{n}"
        evidence.mkdir(parents=True)
        for name in ("home", "tmp", "work"):
            if dirs[name].exists():
                os.replace(dirs[name], evidence / name)
    fresh = make_scratch(tmp_dir, session_id)
    for name in ("home", "work") if evidence is not None else ():
        if (evidence / name).is_dir():
            shutil.copytree(evidence / name, fresh[name], symlinks=True, dirs_exist_ok=True,
                            ignore=_special_files)
    _fsync_dir(dirs["root"])
    return evidence


def _special_files(directory: str, names: list[str]) -> list[str]:
    """What a scratch copy leaves out: sockets, pipes, devices (only files,
    directories and symlinks are copied)."""
    import stat

    skipped = []
    for name in names:
        try:
            mode = os.lstat(os.path.join(directory, name)).st_mode
        except OSError:
            skipped.append(name)
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skipped.append(name)
    return skipped


def repaired_session(ledger: Ledger, session_id: str, ctx: Ctx) -> Ledger:
    """The session ready again: its quarantine cleared (refused while a lease is
    live, or if it is closed), or, failed without one, made ready."""
    if _quarantined(ledger, session_id):
        return clear_quarantine(ledger, rc.ClearQuarantineRequest(session_id), ctx)[0]
    session = attrs.evolve(_session(ledger, session_id), state="ready", updated_at=ctx.stamp)
    return attrs.evolve(ledger, sessions=_put(ledger.sessions, session_id, session))


@attrs.define(eq=False)
class _TurnRun:
    """The running turn of a session, in memory."""

    turn: rc.Turn
    native_id: str | None = None
    text: list[str] = attrs.Factory(list)
    ended: Any = attrs.Factory(lambda: trio.Event())
    started: Any = attrs.Factory(lambda: trio.Event())  # the provider opened it (turn.started)
    state: str = ""
    #: Set when the stall timer interrupted it: the error an interrupted end carries.
    stalled: str = ""


@attrs.define(eq=False)
class _Waiter:
    event: Any = attrs.Factory(lambda: trio.Event())
    result: Any = None


@attrs.define(eq=False)
class LiveSession:
    """A session with a process behind it: what the runtime knows of it."""

    session_id: str
    profile: rc.Profile
    proc: ProviderProcess
    lock: Any = attrs.Factory(lambda: trio.Lock())  # StartTurn, interrupt, hand-over: one at a time
    lease_id: str = ""  # the lease whose thread is open (Codex) / the one borrower (one-borrow)
    thread_id: str = ""
    #: Codex: a fresh thread opened while the session is idle, taken by the next
    #: lease's first turn (so a warm borrow does not wait for thread/start).
    spare_thread: str = ""
    used: bool = False  # a one-borrow session served its lease
    turn: _TurnRun | None = None
    approvals: dict[str, Any] = attrs.Factory(dict)  # approval_id -> cancel scope of its timer
    waiters: dict[str, _Waiter] = attrs.Factory(dict)
    handing_over: bool = False
    #: Claude: the session id the relay gave the process (``--session-id`` / ``--resume``).
    conversation_id: str = ""
    #: After a repair resumed a conversation: its thread (Codex) and the holder of
    #: the revoked lease, whose next exclusive lease continues it (any other
    #: holder gets a fresh thread, Claude a fresh process).
    resumed_thread: str = ""
    resume_holder: str = ""
    #: Started by a repair: a one-borrow session's earlier lease does not close it.
    repaired: bool = False
    #: Records queued for commit and not yet seen committed: (kind, _Pending).
    unconfirmed: list[tuple[str, Any]] = attrs.Factory(list)
    #: Failure detection.  ``activity_at``: trio time the relay last gave the
    #: provider work (a turn, an approval answer); the stall timer counts
    #: silence from it or the last stdout, whichever is later.
    activity_at: float = 0.0
    #: Trio time of the last provider event other than a probe answer (a
    #: probe's reply is no sign that the turn makes progress).
    output_at: float = 0.0
    #: Command / tool items started and not completed (a silent command is no stall).
    open_items: set[str] = attrs.Factory(set)
    probe_answered_at: str = ""  # wall stamp of the last probe answer
    fingerprint: dict[str, Any] | None = None  # scratch_fingerprint at spawn
    secrets: tuple[str, ...] = ()  # redacted from stderr evidence
    started: bool = False  # handshake done (Codex) / spawned (Claude, Kimi)
    spawned_at: float = 0.0  # trio time
    handshake_failed: str = ""  # Claude: an error result before any turn
    #: Why the relay stopped the process for a failure ("" = it did not).
    failure: str = ""

    def expect(self, name: str) -> _Waiter:
        waiter = self.waiters[name] = _Waiter()
        return waiter

    def resolve(self, name: str, result: Any) -> None:
        waiter = self.waiters.pop(name, None)
        if waiter is not None:
            waiter.result = result
            waiter.event.set()


@attrs.define(eq=False)
class Runtime:
    """Provider processes for the ledger's sessions, and the turns run on them."""

    owner: Any  # LedgerOwner
    hub: Any  # EventHub
    store: Any  # Store
    config: Config
    now: Callable[[], float] = time.time
    providers: dict[str, dict[str, str]] = attrs.Factory(dict)
    sessions: dict[str, LiveSession] = attrs.Factory(dict)
    _nursery: Any = None
    _failures: dict[str, int] = attrs.Factory(dict)  # profile -> consecutive start failures
    _not_before: dict[str, float] = attrs.Factory(dict)  # profile -> trio time of the next spawn
    _wake: Any = None
    _busy: set[str] = attrs.Factory(set)  # sessions being started or recycled
    _closing: bool = False
    #: Set whenever ``sessions`` is empty (the last process is gone).
    _none_left: Any = attrs.Factory(lambda: trio.Event())
    _changed: Any = None  # trio.Event, replaced each time it fires
    _record_lock: Any = attrs.Factory(lambda: trio.Lock())  # one providers.json writer
    _programs: dict[tuple[str, tuple[str, ...]], bool] = attrs.Factory(dict)  # profile -> installed
    _repairing: set[str] = attrs.Factory(set)  # sessions a RepairSession is working on
    _start_errors: dict[str, str] = attrs.Factory(dict)  # session -> why its last start failed
    #: Per profile, what this server observed (``ProviderHealth``).
    health: dict[str, ProviderHealth] = attrs.Factory(dict)
    _start_failed_ids: set[str] = attrs.Factory(set)  # sessions whose start failed
    _scratch_due: float = -math.inf  # trio time of the next scratch check

    def changed(self) -> None:
        """Something observable changed (a process state, a reconcile pass)."""
        if self._changed is not None:
            self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Until the next ``changed()`` (what tests and ``--wait`` loops block on)."""
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    # -- the reconcile loop -------------------------------------------------

    async def run(self, *, task_status: TaskStatus[Runtime] = _TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(reap_orphans, self.store.tmp_dir)
        await self._fail_turns_of_a_dead_relay()
        self._wake = trio.Event()
        feed = self.hub.subscribe("relay")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_feed, feed)
                await self._repair_restarted()
                await self.reconcile()
                task_status.started(self)
                while True:
                    with trio.move_on_after(RECONCILE_SECONDS):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    await self.reconcile()
                    self.changed()
        finally:
            self.hub.unsubscribe(feed)
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as stops:
                    for live in list(self.sessions.values()):
                        stops.start_soon(live.proc.stop, "the relay is stopping")
                await trio.to_thread.run_sync(self._write_record_sync, [])

    async def _watch_feed(self, feed: Subscriber) -> None:
        async for _ in feed.receive:
            self._wake.set()
            while True:  # and what else is queued (a group commit's notices): one wake-up does
                try:
                    feed.receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break

    def processes(self) -> dict[str, rc.ProcessInfo]:
        return {sid: live.proc.info for sid, live in self.sessions.items()}

    def provider_health(self) -> tuple[rc.ProviderHealth, ...]:
        """The health of every profile the runtime has run a process for, by name."""
        return tuple(rc.ProviderHealth(**attrs.asdict(self.health[n])) for n in sorted(self.health))

    def health_of(self, profile: str) -> ProviderHealth:
        health = self.health.get(profile)
        if health is None:
            health = self.health[profile] = ProviderHealth(profile)
        return health

    def runtime_doc(self) -> dict[str, Any]:
        """``GET /api/relay/runtime``: each profile's health and each live process."""
        ledger = self.owner.ledger
        processes = []
        for sid, live in sorted(self.sessions.items()):
            proc = live.proc
            processes.append({
                "session_id": sid, "profile": live.profile.name, "pid": proc.pid, "state": proc.state,
                "started_at": proc.started_at, "last_output_at": proc.last_output_stamp,
                "last_probe_answered_at": live.probe_answered_at,
                "turn_id": live.turn.turn.turn_id if live.turn is not None else "",
                "lease_id": live.lease_id, "open_items": len(live.open_items),
                "approvals": len(live.approvals)})
        return {"revision": ledger.revision,
                "providers": [to_json(h) for h in self.provider_health()],
                "processes": processes, "config": {k: getattr(self.config, k) for k in (
                    "turn_stall_seconds", "interrupt_grace_seconds", "probe_interval_seconds",
                    "probe_timeout_seconds", "degraded_after_failures", "startup_timeout_seconds")}}

    async def _fail_turns_of_a_dead_relay(self) -> None:
        """A previous server died with turns running: they end ``failed``
        (``relay_restarted``, one commit, then each its result and end event),
        and their sessions are quarantined ``relay_restarted`` (the pool
        replaces them; the repair flow may resume them)."""
        running = sorted((t for t in self.owner.ledger.turns.values() if t.state == "running"),
                         key=lambda t: t.turn_id)
        if not running:
            return
        error = "relay_restarted: the relay that ran this turn stopped without ending it"

        def fail_all(ledger: Ledger, ctx: Ctx):
            replies = []
            for turn in running:
                ledger, reply = end_turn(ledger, turn.turn_id, "failed", turn.output_text, error,
                                         turn.usage, ctx)
                replies.append(reply)
            return ledger, replies

        try:
            replies = await self.owner.submit(Mutation(fail_all, "end_turns_of_a_dead_relay"))
        except RelayError as exc:
            _rlog.error("cannot fail the turns a dead relay left running: %s", exc.message)
            return
        _rlog.warning("failed %d turns a previous relay left running", len(running))
        for reply in replies:
            turn = reply.turn
            sid = turn.session_id
            profile = self.owner.ledger.sessions.get(sid)
            if profile is not None:
                self.health_of(profile.profile).failed_turns += 1
            await self._flush(sid, [
                (turn.state, self._record(sid, "AppendResult", "turn.failed", to_json(turn))),
                (turn.state, self._record(sid, "AppendEvent", "turn.failed",
                                          {"turn_id": turn.turn_id, "error": error, "by": "relay"}))])
            session = self.owner.ledger.sessions.get(sid)
            if session is not None and session.state != "closed" and not _quarantined(self.owner.ledger, sid):
                await self.auto_quarantine(sid, "relay_restarted",
                                           f"the relay stopped while turn {turn.turn_id} ran",
                                           {"turn_id": turn.turn_id, "exit_status": None, "signal": "",
                                            "pid": 0, "stderr": [], "detail": error})

    async def reconcile(self) -> None:
        """Bring processes in line with the ledger (each step is idempotent)."""
        ledger = self.owner.ledger
        stamp = iso(self.now())
        for live in list(self.sessions.values()):
            await self._check_lease(ledger, live, stamp)
        for profile in sorted(ledger.profiles.values(), key=lambda p: p.name):
            await self._fill_pool(ledger, profile, stamp)
        await self._check_scratch()

    async def _check_scratch(self) -> None:
        """Every live session's scratch and provider home files still what the
        relay made (at most once per RECONCILE_SECONDS; stat and hash in a
        worker thread); a damaged one is ``tmp_corrupted``."""
        if trio.current_time() < self._scratch_due:
            return
        self._scratch_due = trio.current_time() + RECONCILE_SECONDS
        lives = [x for x in self.sessions.values()
                 if x.fingerprint is not None and x.started and not x.failure
                 and x.proc.state == "running"]
        if not lives:
            return
        damage = await trio.to_thread.run_sync(lambda: [scratch_damage(x.fingerprint) for x in lives])
        for live, why in zip(lives, damage, strict=True):
            if why and not live.failure:
                self.health_of(live.profile.name).tmp_corrupted += 1
                self._nursery.start_soon(self._fail, live, "tmp_corrupted", why)

    async def _check_lease(self, ledger: Ledger, live: LiveSession, stamp: str) -> None:
        if live.session_id in self._repairing:  # its quarantine is cleared once it is healthy
            return
        session = ledger.sessions.get(live.session_id)
        if session is None or session.state != "ready" or _quarantined(ledger, live.session_id):
            if live.proc.state not in ("stopping", "exited"):
                self._nursery.start_soon(self._retire, live, "the session is no longer ready")
            return
        held = live_leases(ledger, live.session_id, stamp)
        leases = [x for x in held if x.state == "active" and x.mode == "exclusive-write"]
        if leases and not live.lease_id:
            live.lease_id = leases[0].lease_id
            live.used = True
        elif live.handing_over:
            return
        elif (live.lease_id and not any(x.lease_id == live.lease_id for x in leases)) or (
                not held and not live.lease_id and live.profile.mode == "one-borrow"
                and not live.repaired and self._was_borrowed(ledger, live.session_id)):
            live.handing_over = live.used = True
            self._nursery.start_soon(self._hand_over, live)

    def _managed(self, profile: rc.Profile) -> bool:
        """Whether the runtime runs this profile's sessions: its program is
        installed.  A profile whose program is missing stays a ledger-only
        record (said once in the log), so a host without the CLIs, or a
        workspace that only records sessions, is left as it is."""
        key = (profile.name, profile.command)
        if key not in self._programs:
            try:
                provider_argv(profile)
                self._programs[key] = True
            except FailedPrecondition as exc:
                _rlog.warning("profile %s is not run by the runtime: %s", profile.name, exc.message)
                self._programs[key] = False
        return self._programs[key]

    async def _fill_pool(self, ledger: Ledger, profile: rc.Profile, stamp: str) -> None:
        """Start processes for the profile's ready sessions, and sessions for its pool."""
        if not self._managed(profile):
            return
        # While backing off (or degraded) only an operator's doing starts a
        # process: a ready session without one that never failed to start here
        # (``session create``, ``quarantine clear``).  The pool creates nothing.
        backing_off = trio.current_time() < self._not_before.get(profile.name, 0.0)
        ready = [s for s in ledger.sessions.values() if s.profile == profile.name
                 and s.state == "ready" and not _quarantined(ledger, s.session_id)]
        for session in sorted(ready, key=lambda s: s.session_id):
            if (session.session_id in self.sessions or session.session_id in self._busy
                    or session.session_id in self._repairing):
                continue
            if backing_off and session.session_id in self._start_failed_ids:
                continue
            if profile.mode == "one-borrow" and self._was_borrowed(ledger, session.session_id):
                await self._close(session.session_id, "a one-borrow session serves one lease")
                continue
            if not await self._start(profile, session.session_id):
                return
        if backing_off:
            return
        idle = sum(1 for s in ready if s.session_id in self._busy or (
            s.session_id in self.sessions and not live_leases(ledger, s.session_id, stamp)
            and not self.sessions[s.session_id].lease_id))
        for _ in range(profile.pool_size - idle):
            try:
                reply = await self.owner.submit(rpc_mutation(
                    "CreateSession", rc.CreateSessionRequest(profile.name)))
            except RelayError as exc:
                _rlog.warning("cannot create a session for %s: %s", profile.name, exc.message)
                return
            if not await self._start(profile, reply.session.session_id):
                return

    @staticmethod
    def _was_borrowed(ledger: Ledger, session_id: str) -> bool:
        return any(x.session_id == session_id and x.state not in ("waiting",)
                   for x in ledger.leases.values()) or any(
            t.session_id == session_id for t in ledger.turns.values())

    # -- processes ----------------------------------------------------------

    async def _start(self, profile: rc.Profile, session_id: str, resume: str = "",
                     check: bool = False) -> bool:
        """Spawn and (Codex) handshake a session's process; False if that failed."""
        self._busy.add(session_id)
        try:
            return await self._spawn(profile, session_id, resume, check)
        finally:
            self._busy.discard(session_id)

    async def _spawn(self, profile: rc.Profile, session_id: str, resume: str = "",
                     check: bool = False) -> bool:
        """``resume``: the conversation to take up (Codex ``thread/resume`` after
        the handshake; Claude ``--resume``).  ``check``: a CLI that prints
        nothing first must answer a probe (a repair checks the handshake)."""
        self._start_errors.pop(session_id, None)
        conversation = ""
        try:
            dirs = await trio.to_thread.run_sync(make_scratch, self.store.tmp_dir, session_id)
            argv = provider_argv(profile)
            if profile.provider == "claude":  # the relay names the conversation, so it is known up front
                conversation = resume or str(__import__("uuid").uuid4())
                argv += ["--resume", resume] if resume else ["--session-id", conversation]
            cwd = profile.cwd or str(dirs["work"])
            proto = _PROTOCOLS[profile.provider]()
            written: dict[str, str] = {}
            endpoint = await trio.to_thread.run_sync(
                write_provider_home, profile, dirs["home"], self.providers, written)
            fingerprint = await trio.to_thread.run_sync(
                scratch_fingerprint, dirs["root"], dirs["home"], written)
            proc = ProviderProcess(session_id, argv, process_env(profile, session_id, dirs, endpoint),
                                   cwd, proto, self.config, on_change=self.changed)
            proc.spawn(self.now())
        except (OSError, RelayError) as exc:
            await self._start_failed(profile, session_id, f"cannot spawn: {exc}")
            return False
        self.health_of(profile.name).starts += 1
        live = LiveSession(session_id, profile, proc, fingerprint=fingerprint,
                           secrets=_secret_values(proc.env), spawned_at=trio.current_time(),
                           conversation_id=conversation)
        self.sessions[session_id] = live
        if self._none_left.is_set():
            self._none_left = trio.Event()
        waiter = live.expect("handshake")  # before the reader runs: an early exit resolves it
        await self._nursery.start(proc.run)
        self._nursery.start_soon(self._consume, live)
        await self._write_record()
        if profile.provider == "codex":
            with trio.move_on_after(self.config.startup_timeout_seconds):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await proc.write(proto.send_initialize())  # gone already: its exit says so
                await waiter.event.wait()
            if not isinstance(waiter.result, HandshakeCompleted):
                why = getattr(waiter.result, "error", None) or "no handshake within " \
                      f"{self.config.startup_timeout_seconds} s"
                if waiter.result == "exited":
                    why = f"exited with status {proc.returncode} before the handshake"
                asked = proc.stop_requested or self._closing  # stopped by the relay, not failed
                await proc.stop(f"start failed: {why}")
                if not asked:
                    await self._start_failed(profile, session_id, why, live)
                return False
            proc.provider_version = waiter.result.provider_version or ""
            if resume and not await self._resume_thread(live, resume):
                return False
            if profile.mode == "pooled":
                await self._open_spare(live)
        elif (check or resume) and not await self._answers_probe(live):
            return False
        proc.transition("running", "handshake completed" if profile.provider == "codex"
                        else "spawned (this CLI prints nothing before its first input)")
        live.started = True
        live.activity_at = trio.current_time()
        self._nursery.start_soon(self._watch, live)
        if profile.provider == "codex":  # Claude / Kimi: an early exit still counts (_on_exit)
            self._started_well(profile)
        return True

    async def _answer_or_exit(self, live: LiveSession, waiter: _Waiter) -> None:
        """Until ``waiter`` has its answer, the process exits, or
        ``startup_timeout_seconds`` pass, whichever is first."""
        with trio.move_on_after(self.config.startup_timeout_seconds):
            async with trio.open_nursery() as nursery:
                async def either(wait: Callable[[], Any]) -> None:
                    await wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(either, waiter.event.wait)
                nursery.start_soon(either, live.proc.exited.wait)

    async def _resume_thread(self, live: LiveSession, thread_id: str) -> bool:
        """Codex ``thread/resume`` in a fresh process; False (stopped, and why
        in ``_start_errors``) when it is refused or unanswered."""
        waiter = live.expect("resume")
        try:
            await live.proc.write(live.proc.protocol.send_thread_resume(thread_id))
            await self._wait(waiter, "thread/resume")
        except (RelayError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            why = getattr(exc, "message", None) or f"the provider closed its input ({exc!r})"
            self._start_errors[live.session_id] = f"resume refused: {why}"
            await live.proc.stop(f"repair: resume refused: {why}")
            return False
        live.resumed_thread = thread_id
        return True

    async def _answers_probe(self, live: LiveSession) -> bool:
        """A CLI that prints nothing before its first input (Claude) answers a
        control request, or exits (a refused ``--resume``): False then."""
        proto = live.proc.protocol
        if not hasattr(proto, "send_probe"):  # Kimi: nothing to ask
            return True
        waiter = live.expect("probe")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await live.proc.write(proto.send_probe())
        await self._answer_or_exit(live, waiter)
        if waiter.result is not None:
            return True
        tail = " | ".join(list(live.proc.stderr)[-3:])
        self._start_errors[live.session_id] = (
            f"no answer to a probe within {self.config.startup_timeout_seconds} s"
            if live.proc.returncode is None else
            f"exited with {live.proc.returncode} before its handshake") + (
            f"; stderr: {tail}" if tail else "")
        await live.proc.stop("repair: no handshake")
        return False

    def _started_well(self, profile: rc.Profile) -> None:
        self._failures.pop(profile.name, None)
        self._not_before.pop(profile.name, None)
        health = self.health_of(profile.name)
        if health.state == "degraded":
            _rlog.warning("profile %s is healthy again: a process started", profile.name)
        health.state, health.consecutive_failures = "healthy", 0

    async def _start_failed(self, profile: rc.Profile, session_id: str, why: str,
                            live: LiveSession | None = None) -> None:
        """Back off the profile's next spawn (1, 2, 4, ... s; after
        ``degraded_after_failures`` in a row the profile is ``degraded`` and
        tries once per SPAWN_BACKOFF_MAX_SECONDS) and quarantine the session."""
        self._start_errors[session_id] = why
        n = self._failures[profile.name] = self._failures.get(profile.name, 0) + 1
        health = self.health_of(profile.name)
        health.start_failures += 1
        health.consecutive_failures = n
        if n >= self.config.degraded_after_failures:
            if health.state != "degraded":
                _rlog.error("profile %s is degraded: %d start failures in a row; one start is "
                            "tried every %.0f s", profile.name, n, SPAWN_BACKOFF_MAX_SECONDS)
            health.state = "degraded"
            delay = SPAWN_BACKOFF_MAX_SECONDS
        else:
            delay = min(SPAWN_BACKOFF_FIRST_SECONDS * 2.0 ** (n - 1), SPAWN_BACKOFF_MAX_SECONDS)
        self._not_before[profile.name] = trio.current_time() + delay
        self._start_failed_ids.add(session_id)
        _rlog.warning("session %s of %s: start failed (%s); next spawn in %.0f s", session_id,
                      profile.name, why, delay)
        evidence = self._evidence(live, why) if live is not None else {
            "turn_id": None, "exit_status": None, "signal": "", "pid": 0, "stderr": [], "detail": why}
        await self.auto_quarantine(session_id, "start_failed", why, evidence)

    def _evidence(self, live: LiveSession, detail: str) -> dict[str, Any]:
        """A quarantine's evidence: the turn, exit status / signal, pid, last stderr lines."""
        status, sig = exit_evidence(live.proc.returncode)
        return {"turn_id": live.turn.turn.turn_id if live.turn is not None else None,
                "exit_status": status, "signal": sig, "pid": live.proc.pid,
                "stderr": stderr_evidence(live.proc.stderr, live.secrets), "detail": detail}

    async def auto_quarantine(self, session_id: str, code: str, detail: str,
                              evidence: Any = None) -> rc.QuarantineReply | None:
        """Quarantine a session for what the runtime detected (``quarantine``
        with ``code``; reason ``"<code>: <detail>"`` on one line), revoking
        its live leases; counted in the profile's health.  None when the
        session is gone or already quarantined."""
        reason = " ".join(f"{code}: {detail}".split())[:500]
        try:
            reply = await self.owner.submit(Mutation(
                lambda led, ctx: quarantine(led, session_id, code, reason, evidence, ctx), "quarantine"))
        except RelayError as exc:
            _rlog.info("session %s: not quarantined (%s): %s", session_id, code, exc.message)
            return None
        session = self.owner.ledger.sessions.get(session_id)
        if session is not None:
            health = self.health_of(session.profile)
            health.quarantines[code] = health.quarantines.get(code, 0) + 1
            health.error(reason, reply.quarantine.quarantined_at)
        _rlog.warning("session %s quarantined: %s", session_id, reason)
        return reply

    async def _fail(self, live: LiveSession, code: str, detail: str) -> None:
        """The relay gives up on a live process: quarantine the session (its
        holder's lease revoked at once), then stop the process; its exit fails
        the running turn with the same reason (``_on_exit``)."""
        if live.failure:
            return
        live.failure = " ".join(f"{code}: {detail}".split())[:500]
        await self.auto_quarantine(live.session_id, code, detail, self._evidence(live, detail))
        await live.proc.stop(live.failure)

    # -- the watchdog (stall timer, liveness probe) -----------------------------

    async def _watch(self, live: LiveSession) -> None:
        """Per process, until it exits: the stall timer and (Codex, Claude) the probe."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stall_timer, live)
            if hasattr(live.proc.protocol, "send_probe"):  # Kimi has none
                nursery.start_soon(self._probe_loop, live)
            await live.proc.exited.wait()
            nursery.cancel_scope.cancel()

    def _stalled_for(self, live: LiveSession) -> float:
        """Seconds of silence of a running turn that may stall (0 when none may:
        no turn, an approval open, a command in flight, a hand-over, a stop)."""
        run = live.turn
        if (run is None or run.stalled or live.approvals or live.open_items or live.handing_over
                or live.failure or live.proc.state != "running"):
            return 0.0
        return trio.current_time() - max(live.output_at, live.activity_at)

    async def _stall_timer(self, live: LiveSession) -> None:
        cfg = self.config
        tick = min(cfg.turn_stall_seconds / 4, 1.0)
        while True:
            await trio.sleep(tick)
            quiet = self._stalled_for(live)
            if quiet >= cfg.turn_stall_seconds and live.turn is not None:
                await self._on_stall(live, live.turn, quiet)

    async def _on_stall(self, live: LiveSession, run: _TurnRun, quiet: float) -> None:
        """Interrupt a stalled turn; if it does not end within
        ``interrupt_grace_seconds``, stop the process (``heartbeat_lost``)."""
        cfg = self.config
        self.health_of(live.profile.name).stalls += 1
        detail = f"no output for {quiet:.1f} s during turn {run.turn.turn_id}"
        run.stalled = f"stalled: {detail}; interrupted by the relay"
        _rlog.warning("session %s: %s", live.session_id, run.stalled)
        if isinstance(live.proc.protocol, KimiProtocol):  # no interrupt: only a stop ends it
            await self._fail(live, "heartbeat_lost", f"{detail} (Kimi has no interrupt)")
            return
        with trio.move_on_after(cfg.interrupt_grace_seconds):
            await self._interrupt(live, run)
            await run.ended.wait()
        if not run.ended.is_set():
            await self._fail(live, "heartbeat_lost", f"{detail}; the interrupt did not end it "
                             f"within {cfg.interrupt_grace_seconds} s")

    async def _probe_loop(self, live: LiveSession) -> None:
        """A cheap request every ``probe_interval_seconds``, idle or busy; no
        answer within ``probe_timeout_seconds`` stops the process (``unresponsive``)."""
        cfg = self.config
        proto = live.proc.protocol
        while True:
            await trio.sleep(cfg.probe_interval_seconds)
            if live.proc.state != "running" or live.failure:
                continue
            waiter = live.expect("probe")
            with trio.move_on_after(cfg.probe_timeout_seconds):
                try:  # the write too: a process that reads nothing fills its pipe
                    await live.proc.write(proto.send_probe())
                except (trio.BrokenResourceError, trio.ClosedResourceError, WireStateError):
                    return
                await waiter.event.wait()
            if waiter.result is not None:
                live.probe_answered_at = iso(self.now())
            elif live.proc.state == "running" and not live.failure:
                self.health_of(live.profile.name).probe_failures += 1
                await self._fail(live, "unresponsive", "no answer to the liveness probe within "
                                 f"{cfg.probe_timeout_seconds} s")
                return

    async def _close(self, session_id: str, reason: str) -> None:
        with contextlib.suppress(RelayError):
            await self.owner.submit(Mutation(
                lambda led, ctx: close_session(led, session_id, reason, ctx), "close_session"))

    async def _retire(self, live: LiveSession, reason: str) -> None:
        await live.proc.stop(reason)

    async def _write_record(self) -> None:
        rows = [{"pid": x.proc.pid, "pgid": x.proc.pid, "session_id": sid,
                 "scratch": str(scratch_dirs(self.store.tmp_dir, sid)["root"])}
                for sid, x in self.sessions.items() if x.proc.returncode is None]
        async with self._record_lock:
            await trio.to_thread.run_sync(self._write_record_sync, rows)

    def _write_record_sync(self, rows: list[dict[str, Any]]) -> None:
        try:
            _write_record(self.store.tmp_dir, rows)
        except OSError as exc:
            _rlog.error("cannot record provider processes: %s", exc)

    async def _on_exit(self, live: LiveSession) -> None:
        """The process is gone: forget it; if nobody asked, fail its turn and
        quarantine the session (``provider_exited``; ``start_failed`` when it
        never got going); the pool replaces it."""
        if self.sessions.get(live.session_id) is live:
            del self.sessions[live.session_id]
            if not self.sessions:
                self._none_left.set()
        await self._write_record()
        proc = live.proc
        health = self.health_of(live.profile.name)
        health.exits += 1
        crashed = not proc.stop_requested and not self._closing
        status, sig = exit_evidence(proc.returncode)
        detail = f"exit status {status}" + (f" ({sig})" if sig else "")
        if live.turn is not None:
            detail += f" during turn {live.turn.turn.turn_id}"
        if crashed and not live.started:  # _spawn is waiting for the handshake: it reports this
            live.resolve("handshake", "exited")
        elif crashed and live.turn is None and not live.used and live.profile.provider != "codex" and (
                live.handshake_failed
                or trio.current_time() - live.spawned_at < self.config.startup_timeout_seconds):
            # Claude / Kimi print nothing before their first input: an exit
            # before it (or Claude's error result) is a failed start.
            why = live.handshake_failed or f"exited with status {status} before its first input"
            await self._start_failed(live.profile, live.session_id, why, live)
        elif crashed:  # first, so the holder's lease is revoked when it learns the turn failed
            health.crashes += 1
            await self.auto_quarantine(live.session_id, "provider_exited", detail,
                                       self._evidence(live, detail))
        elif live.started and live.profile.provider != "codex" and not live.failure:
            self._started_well(live.profile)
        if live.turn is not None:
            why = "the relay stopped" if self._closing else (
                live.failure or f"provider_exited: {detail}")
            await self._end_turn(live, "failed", why)
        if self._closing:
            return
        if (not crashed and not live.failure and live.profile.mode == "one-borrow" and live.used
                and live.session_id not in self._repairing):
            await self._close(live.session_id, "its one lease ended")
        self._wake.set()
        self.changed()

    # -- events from the process ---------------------------------------------

    async def _consume(self, live: LiveSession) -> None:
        try:
            async for batch in live.proc.events:
                if any(not isinstance(event, ProbeAnswered) for event in batch):
                    live.output_at = trio.current_time()
                # Deltas first, at once: a subscriber must not wait for the
                # commits of the durable events that came in the same read.
                deltas: dict[tuple[str, str], list[str]] = {}
                for event in batch:
                    if isinstance(event, ItemDelta):
                        key = (event.item_id or "", event.stream or "text")
                        deltas.setdefault(key, []).append(event.delta)
                        if live.turn is not None and event.stream == "text":
                            live.turn.text.append(event.delta)
                self._publish_deltas(live, deltas)
                # The durable records go to the ledger owner without waiting
                # for their commit (its channel keeps their order): stdout is
                # read on meanwhile, and a turn's records share group commits.
                queued: list[tuple[str, Mutation]] = []
                for event in batch:
                    if not isinstance(event, ItemDelta):
                        await self._on_event(live, event, queued)
                await self._send_records(live, queued)
        finally:
            # Bounded even when shielded: a child that survives SIGKILL, or a
            # ledger owner already gone (a cancelled serve), must not hang us.
            with trio.CancelScope(shield=True), trio.move_on_after(
                    self.config.stop_stdin_seconds + self.config.stop_term_seconds
                    + self.config.stop_kill_seconds + 1.0):
                await live.proc.exited.wait()
                await self._on_exit(live)

    def _publish_deltas(self, live: LiveSession, deltas: dict[tuple[str, str], list[str]]) -> None:
        turn_id = live.turn.turn.turn_id if live.turn is not None else None
        for (item_id, stream), parts in deltas.items():
            data = {"session_id": live.session_id, "turn_id": turn_id, "item_id": item_id,
                    "stream": stream, "delta": "".join(parts)}
            frame = Frame.make("", "delta", data)
            self.hub.publish(f"events:{live.session_id}", frame)
            self.hub.publish("events:*", frame)

    async def _on_event(self, live: LiveSession, event: WireEvent,
                        queued: list[tuple[str, Mutation]]) -> None:
        """Act on one provider event; its durable record (if any) joins ``queued``
        (a turn's end first commits what is queued, then ends the turn)."""
        kind = event.kind
        if kind == "probe.answered":
            live.resolve("probe", event)
            if self._failures.get(live.profile.name) and live.started:
                self._started_well(live.profile)  # Claude: alive after its start
            return
        if kind == "handshake.failed":
            live.handshake_failed = event.error or "the provider refused to start"
        if kind in ("handshake.completed", "handshake.failed"):
            live.resolve("handshake", event)
            if kind == "handshake.completed" and event.provider_version:
                live.proc.provider_version = event.provider_version
            return
        if kind == "thread.started":
            live.resolve("thread", event)
            return
        if kind == "thread.archived":
            live.resolve("archive", event)
            return
        if kind == "thread.resumed":
            live.resolve("resume", event)
            return
        if kind == "turn.accepted":
            if live.turn is not None:
                live.turn.native_id = event.turn_id
            live.resolve("accepted", event)
            return
        if kind == "request.failed":
            live.resolve({"thread/start": "thread", "thread/resume": "resume", "turn/start": "accepted",
                          "thread/archive": "archive", "turn/interrupt": "interrupt"}.get(
                              event.method or "", "other"), event)
            return
        if kind == "interrupt.acknowledged":
            live.resolve("interrupt", event)
            return
        if kind in ("approval.resolved", "approval.cancelled"):
            scope = live.approvals.pop(event.approval_id, None)
            if scope is not None:
                scope.cancel()
        if kind == "approval.requested":
            self._nursery.start_soon(self._approval_timer, live, event.approval_id)
        if kind == "item.started" and event.item_type not in _NOT_IN_FLIGHT and event.item_id:
            live.open_items.add(event.item_id)  # a silent command or tool run is no stall
        if kind == "item.completed":
            live.open_items.discard(event.item_id)
        if kind not in DURABLE_KINDS:
            return
        run = live.turn
        if run is not None and kind == "turn.started":
            run.native_id = run.native_id or event.turn_id
            run.started.set()
        turn_id = run.turn.turn_id if run is not None else None
        if kind in _END_STATES and run is not None:
            await self._send_records(live, queued)  # _end_turn's commits come after these
            text = event.output_text or "".join(run.text)
            await self._end_turn(live, _END_STATES[kind], event.error or "", text, event.usage,
                                 event_data(event, turn_id))
            return
        queued.append((kind, self._record(live.session_id, "AppendEvent", kind, event_data(event, turn_id))))

    def _record(self, session_id: str, rpc: str, kind: str, data: Any) -> Mutation:
        """The mutation that appends one runtime record (an oversized one trimmed)."""
        if len(_canonical(data)) > self.config.max_record_bytes and isinstance(data, dict):
            data = dict(data, native={"omitted": True})
            for key in ("text", "output", "output_text"):
                if isinstance(data.get(key), str):
                    data[key] = data[key][: self.config.max_record_bytes // 2]
        return rpc_mutation(rpc, rc.AppendRecordRequest(session_id, kind, data))

    async def _send_records(self, live: LiveSession, queued: list[tuple[str, Mutation]]) -> None:
        """Queue the ``(kind, mutation)`` records for commit, in order, without
        waiting; log the ones seen failed since the last call."""
        records, queued[:] = list(queued), []
        if records:
            pendings = await self.owner.enqueue([mutation for _, mutation in records])
            live.unconfirmed += [(kind, p) for (kind, _), p in zip(records, pendings, strict=True)]
        still = []
        for kind, pending in live.unconfirmed:
            if not pending.done.is_set():
                still.append((kind, pending))
            elif isinstance(pending.result, RelayError):
                _rlog.error("session %s: cannot record %s: %s", live.session_id, kind,
                            pending.result.message)
        live.unconfirmed = still

    async def _flush(self, session_id: str, queued: list[tuple[str, Mutation]]) -> None:
        """Commit the ``(kind, mutation)`` records queued, in order, in as few
        group commits as the owner allows (one, when nothing else is queued)."""
        records, queued[:] = list(queued), []
        if not records:
            return
        results = await self.owner.submit_many([mutation for _, mutation in records])
        for (kind, _), result in zip(records, results, strict=True):
            if isinstance(result, RelayError):
                _rlog.error("session %s: cannot record %s: %s", session_id, kind, result.message)

    async def _append(self, session_id: str, rpc: str, kind: str, data: Any) -> None:
        await self._flush(session_id, [(kind, self._record(session_id, rpc, kind, data))])

    async def _end_turn(self, live: LiveSession, state: str, error: str, text: str = "",
                        usage: Any = None, data: dict[str, Any] | None = None) -> None:
        """The turn's terminal state, its result record, then its end event, in
        that order: whoever sees the end event finds the turn and result done."""
        run, live.turn = live.turn, None
        if run is None:
            return
        for scope in live.approvals.values():
            scope.cancel()
        live.approvals.clear()
        live.open_items.clear()
        if run.stalled and state == "interrupted":  # the relay's stall interrupt ended it
            error = run.stalled + (f" ({error})" if error else "")
        if state == "failed":
            self.health_of(live.profile.name).failed_turns += 1
        turn = attrs.evolve(run.turn, state=state, output_text=text, error=error, usage=usage,
                            ended_at=iso(self.now()))
        with contextlib.suppress(RelayError):
            thread = self._conversation(live)
            reply = await self.owner.submit(Mutation(lambda led, ctx: end_turn(
                led, turn.turn_id, state, text, error, usage, ctx, thread), "end_turn"))
            if reply is not None:
                turn = attrs.evolve(reply.turn, output_text=text)  # the whole text in the result
        if data is None:  # ended by the relay, not by the provider: say so in the stream too
            data = {"turn_id": turn.turn_id, "error": error, "by": "relay"}
        sid, kind = live.session_id, f"turn.{state}"
        await self._flush(sid, [(kind, self._record(sid, "AppendResult", kind, to_json(turn))),
                                (kind, self._record(sid, "AppendEvent", kind, data))])  # in this order
        run.state = state
        run.ended.set()

    # -- turns ----------------------------------------------------------------

    def _live(self, session_id: str) -> LiveSession:
        live = self.sessions.get(session_id)
        if live is None or live.proc.state != "running":
            state = live.proc.state if live is not None else "not started"
            raise Unavailable(f"session {session_id!r} has no running provider process ({state})",
                              hint="see `python -m relay session list`; the runtime starts one "
                              "for every ready session")
        return live

    async def _lendable(self, session_id: str) -> LiveSession:
        """The session's process once it may take a turn: a hand-over, recycle
        or start in progress is waited for (bounded by startup_timeout_seconds)."""
        with trio.move_on_after(self.config.startup_timeout_seconds):
            while True:
                live = self.sessions.get(session_id)
                waiting = session_id in self._busy or (live is not None and (
                    live.handing_over or live.proc.state == "starting"))
                if not waiting:
                    return self._live(session_id)
                await self.wait_changed()
        return self._live(session_id)

    async def start_turn(self, req: rc.StartTurnRequest) -> rc.TurnReply:
        turn_holder(self.owner.ledger, req.session_id, req.lease_id, req.fencing_token,
                    iso(self.now()))
        while True:
            live = await self._lendable(req.session_id)
            async with live.lock:  # a hand-over holds it: the next borrower waits for the clean-up
                if self.sessions.get(req.session_id) is live and not live.handing_over:
                    if self._resumed_for_another(live, req):
                        live.used = False  # not its lease's end: the session stays
                        await self._recycle(live)
                        continue
                    return await self._start_locked(live, req)

    def _holder(self, lease_id: str) -> str:
        lease = self.owner.ledger.leases.get(lease_id)
        return lease.holder if lease is not None else ""

    def _resumed_for_another(self, live: LiveSession, req: rc.StartTurnRequest) -> bool:
        """A process that took up a conversation after a repair (Claude, Kimi:
        one conversation per process) is kept for the holder of the revoked
        lease; another holder's first turn gets a fresh process instead.  The
        claim lasts for the next exclusive lease only."""
        if not live.resume_holder or isinstance(live.proc.protocol, CodexProtocol):
            return False
        foreign = self._holder(req.lease_id) != live.resume_holder
        live.resume_holder = live.resumed_thread = ""
        return foreign

    def _conversation(self, live: LiveSession) -> str:
        """The provider conversation a turn of ``live`` runs in (Turn.thread_id)."""
        return live.thread_id if isinstance(live.proc.protocol, CodexProtocol) else live.conversation_id

    async def _thread_for(self, live: LiveSession, req: rc.StartTurnRequest) -> str:
        """Codex: the thread of the lease, opened now if it has none yet: the
        resumed one for the holder it was kept for, else the spare, else a new
        one; so the turn's record names it from the start."""
        if not isinstance(live.proc.protocol, CodexProtocol):
            return live.conversation_id
        if live.thread_id and live.lease_id == req.lease_id:
            return live.thread_id
        claimed = live.resumed_thread if self._holder(req.lease_id) == live.resume_holder else ""
        live.resumed_thread = live.resume_holder = ""  # the next exclusive lease only
        live.lease_id = req.lease_id
        try:
            if claimed:
                live.thread_id = claimed
            else:
                live.thread_id = live.spare_thread or await self._start_thread(live)
                live.spare_thread = ""
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise Unavailable(f"the provider of {req.session_id!r} closed its input",
                              hint="see `python -m relay recover`") from None
        return live.thread_id

    async def _start_locked(self, live: LiveSession, req: rc.StartTurnRequest) -> rc.TurnReply:
        known = {t.turn_id for t in self.owner.ledger.turns.values()
                 if t.session_id == req.session_id}
        if live.fingerprint is not None:
            damage = await trio.to_thread.run_sync(scratch_damage, live.fingerprint)
            if damage and not live.failure:
                self.health_of(live.profile.name).tmp_corrupted += 1
                live.failure = f"tmp_corrupted: {damage}"
                await self.auto_quarantine(live.session_id, "tmp_corrupted", damage,
                                           self._evidence(live, damage))
                self._nursery.start_soon(live.proc.stop, live.failure)
            if live.failure:
                raise Unavailable(f"session {req.session_id!r} is quarantined ({live.failure})",
                                  hint="borrow another session; see `python -m relay recover`")
        thread = await self._thread_for(live, req)
        mutation = rpc_mutation("StartTurn", req)
        if thread:
            mutation = attrs.evolve(mutation, apply=_naming_thread(mutation.apply, thread))
        reply = await self.owner.submit(mutation)
        if reply.turn.turn_id in known:  # an idempotent retry: it was started already
            return rc.TurnReply(self.owner.ledger.turns.get(reply.turn.turn_id, reply.turn))
        run = live.turn = _TurnRun(reply.turn)
        live.used = True  # it served a lease (whether or not a reconcile pass saw that lease)
        live.activity_at = trio.current_time()
        try:
            await self._send_turn(live, req)
        except RelayError as exc:
            if live.turn is run:
                with trio.move_on_after(CLEANUP_SECONDS, shield=True):  # record it, even if cancelled
                    await self._end_turn(live, "failed", f"the provider did not take the input: "
                                         f"{exc.message}")
            raise
        return rc.TurnReply(reply.turn)

    async def _send_turn(self, live: LiveSession, req: rc.StartTurnRequest) -> None:
        proto, proc = live.proc.protocol, live.proc
        try:
            if live.profile.provider != "codex":
                live.lease_id, live.used = req.lease_id, True
                await proc.write(proto.send_user_message(req.input, turn_id=live.turn.turn.turn_id))
                return
            waiter = live.expect("accepted")
            await proc.write(proto.send_turn_start(live.thread_id, req.input))
            await self._wait(waiter, "turn/start")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise Unavailable(f"the provider of {req.session_id!r} closed its input",
                              hint="see `python -m relay recover`") from None

    async def _start_thread(self, live: LiveSession) -> str:
        """A fresh, non-ephemeral thread for the lease (so it can be archived at release)."""
        opts = profile_options(live.profile)
        config = {k: opts[k] for k in ("model", "model_provider") if k in opts}
        waiter = live.expect("thread")
        await live.proc.write(live.proc.protocol.send_thread_start(
            cwd=live.profile.cwd or live.proc.cwd, approval_policy=opts.get("approval_policy", "never"),
            sandbox=opts.get("sandbox", "read-only"), ephemeral=False, config=config or None))
        event = await self._wait(waiter, "thread/start")
        return event.thread_id

    async def _wait(self, waiter: _Waiter, what: str) -> Any:
        with trio.move_on_after(self.config.startup_timeout_seconds):
            await waiter.event.wait()
        if isinstance(waiter.result, RequestFailed):
            raise FailedPrecondition(f"the provider refused {what}: {waiter.result.message}",
                                     hint="see the session's events")
        if waiter.result is None:
            raise Unavailable(f"the provider did not answer {what} within "
                              f"{self.config.startup_timeout_seconds} s",
                              hint="see `python -m relay recover`")
        return waiter.result

    async def interrupt_turn(self, req: rc.InterruptTurnRequest) -> rc.TurnReply:
        ledger = self.owner.ledger
        turn_holder(ledger, req.session_id, req.lease_id, req.fencing_token, iso(self.now()))
        turn = ledger.turns.get(req.turn_id)
        if turn is None or turn.session_id != req.session_id:
            raise _not_found("turn", req.turn_id, "list turns with `python -m relay turn list`")
        live = self.sessions.get(req.session_id)
        run = live.turn if live is not None else None
        if run is None or run.turn.turn_id != req.turn_id:
            raise FailedPrecondition(f"turn {req.turn_id!r} is {turn.state}, not running",
                                     hint="nothing to interrupt")
        await self._interrupt(live, run)
        with trio.move_on_after(self.config.handover_timeout_seconds):
            await run.ended.wait()
        return rc.TurnReply(self.owner.ledger.turns.get(req.turn_id, turn))

    async def _interrupt(self, live: LiveSession, run: _TurnRun) -> None:
        """Ask the provider to end ``run``; a turn it has not opened yet is
        waited for first (an interrupt before then may be lost on the wire)."""
        proto = live.proc.protocol
        if not isinstance(proto, KimiProtocol):  # Kimi says nothing before its reply
            with trio.move_on_after(self.config.handover_timeout_seconds):
                await run.started.wait()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, WireStateError):
            if isinstance(proto, CodexProtocol):
                if run.native_id is None:
                    return
                await live.proc.write(proto.send_turn_interrupt(live.thread_id, run.native_id))
            elif isinstance(proto, ClaudeProtocol):
                await live.proc.write(proto.send_interrupt())
            else:  # Kimi has no interrupt: only stopping the process ends its turn
                await live.proc.stop("interrupt (Kimi has no interrupt request)")

    # -- approvals --------------------------------------------------------------

    async def resolve_approval(self, req: rc.ResolveApprovalRequest) -> rc.ApprovalReply:
        turn_holder(self.owner.ledger, req.session_id, req.lease_id, req.fencing_token,
                    iso(self.now()))
        live = self._live(req.session_id)
        return await self._answer(live, req.approval_id, req.decision, "by the lease holder")

    async def _answer(self, live: LiveSession, approval_id: str, decision: str, by: str) -> rc.ApprovalReply:
        try:
            data = live.proc.protocol.send_approval(approval_id, decision)
        except (WireStateError, AttributeError):
            raise FailedPrecondition(f"approval {approval_id!r} is not open on {live.session_id!r}",
                                     hint="see the session's approval.requested events") from None
        scope = live.approvals.pop(approval_id, None)
        if scope is not None:
            scope.cancel()
        live.activity_at = trio.current_time()  # the silence that may stall starts now
        await live.proc.write(data)
        turn_id = live.turn.turn.turn_id if live.turn is not None else None
        await self._append(live.session_id, "AppendEvent", "approval.resolved",
                           {"turn_id": turn_id, "approval_id": approval_id, "decision": decision, "by": by})
        return rc.ApprovalReply("accepted" if decision == "accept" else "declined", live.session_id,
                                approval_id)

    async def _approval_timer(self, live: LiveSession, approval_id: str) -> None:
        with trio.CancelScope() as scope:
            live.approvals[approval_id] = scope
            await trio.sleep(self.config.approval_timeout_seconds)
            live.approvals.pop(approval_id, None)
            with contextlib.suppress(RelayError, trio.BrokenResourceError, trio.ClosedResourceError):
                await self._answer(live, approval_id, "decline",
                                   f"timeout ({self.config.approval_timeout_seconds} s)")

    # -- hand-over at release -----------------------------------------------------

    async def _hand_over(self, live: LiveSession) -> None:
        """The borrower's lease ended.  One-borrow: stop (the session closes).
        Pooled: interrupt its turn, archive its thread, and recycle the process
        if anything it started still runs; only then may the next borrower's
        turns run (they wait on the session lock)."""
        async with live.lock:
            try:
                if live.profile.mode == "one-borrow":
                    await live.proc.stop("its one lease ended")
                    return
                if not await self._clean(live):
                    await self._recycle(live)  # the new process opens its own spare
                else:
                    live.lease_id, live.thread_id = "", ""
                    await self._open_spare(live)
            finally:
                live.lease_id, live.thread_id, live.handing_over = "", "", False

    async def _open_spare(self, live: LiveSession) -> None:
        """Open the next lease's thread now (Codex, pooled), unless one is
        waiting unused; without one (it failed) that lease opens its own."""
        if live.spare_thread or not isinstance(live.proc.protocol, CodexProtocol):
            return
        try:
            live.spare_thread = await self._start_thread(live)
        except (RelayError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            _rlog.info("session %s: no spare thread (%s)", live.session_id, exc)

    async def _clean(self, live: LiveSession) -> bool:
        """True when the process is clean for the next borrower."""
        run = live.turn
        try:
            with trio.move_on_after(self.config.handover_timeout_seconds) as scope:
                if run is not None:
                    await self._interrupt(live, run)
                    await run.ended.wait()
                if live.thread_id:
                    waiter = live.expect("archive")
                    await live.proc.write(live.proc.protocol.send_thread_archive(live.thread_id))
                    await waiter.event.wait()
                    if not isinstance(waiter.result, ThreadArchived):
                        return False
        except (RelayError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The process is stopping or gone (its stdin closed): not clean; a
            # recycle (or the exit's own handling) takes it from here.
            _rlog.info("session %s: hand-over cut short: %r", live.session_id, exc)
            return False
        if scope.cancelled_caught:
            return False
        leftovers = await trio.to_thread.run_sync(live.proc.leftovers)
        if leftovers:
            _rlog.info("session %s: recycling, the last borrower left processes %s",
                       live.session_id, leftovers)
        return not leftovers

    async def _recycle(self, live: LiveSession) -> None:
        """A fresh process in place of one the last borrower may have marked."""
        self._busy.add(live.session_id)
        try:
            if live.turn is not None:
                await self._end_turn(live, "interrupted", "the lease ended")
            await live.proc.stop("recycled at hand-over")
            await live.proc.exited.wait()
            if not self._closing:  # a relay that is stopping starts nothing new
                await self._spawn(live.profile, live.session_id)
        finally:
            self._busy.discard(live.session_id)

    # -- repair (RepairSession) ---------------------------------------------------

    async def repair_session(self, req: rc.RepairSessionRequest) -> rc.RepairReply:
        """Dry run: the plan.  ``apply``: stop what is left, rebuild the
        scratch, start a fresh process resuming the last conversation, check
        its handshake, clear the quarantine; if it cannot be repaired, start
        a replacement session and close this one."""
        if req.apply and req.request_id:  # a retry gets the first answer, whatever changed since
            with contextlib.suppress(_NotYet):
                return await self.owner.submit(self._repair_mutation(req, None, None))
        plan = repair_plan(self.owner.ledger, req.session_id, iso(self.now()),
                           self.processes().get(req.session_id))
        if not req.apply or plan.outcome != "planned":
            return attrs.evolve(plan, applied=req.apply and plan.outcome != "planned")
        profile = self.owner.ledger.profiles[self.owner.ledger.sessions[req.session_id].profile]
        if not self._managed(profile):
            return attrs.evolve(plan, applied=True, outcome="refused", steps=(rc.RepairStep(
                "none", f"profile {profile.name}'s program is not installed here: the runtime "
                "starts no process for it"),))
        if req.session_id in self._repairing:
            raise FailedPrecondition(f"session {req.session_id!r} is being repaired already",
                                     hint="see `python -m relay session list` in a moment")
        self._repairing.add(req.session_id)
        try:
            return await self._repair(req)
        finally:
            self._repairing.discard(req.session_id)
            self._wake.set()

    def _repair_mutation(self, req: rc.RepairSessionRequest,
                         change: Callable[[Ledger, Ctx], Ledger] | None,
                         reply: rc.RepairReply | None) -> Mutation:
        """The repair's last commit, carrying its request id; without a
        ``change`` it only looks the id up (an earlier answer, else refused
        unchanged with ``_NotYet``)."""
        def apply(ledger: Ledger, ctx: Ctx) -> tuple[Ledger, Any]:
            if change is None:
                raise _NotYet("no earlier repair with this request id", hint="")
            return change(ledger, ctx), attrs.evolve(reply, revision=ctx.revision)
        body = to_json(req)
        body.pop("request_id", None)
        return Mutation(apply, "RepairSession", rc.RepairReply, req.request_id,
                        _digest(["RepairSession", body]) if req.request_id else "")

    async def _repair(self, req: rc.RepairSessionRequest) -> rc.RepairReply:
        sid, ledger = req.session_id, self.owner.ledger
        session = ledger.sessions[sid]
        profile = ledger.profiles[session.profile]
        if session.state == "closed":
            return await self._replace(req, profile, [], "the session is closed")
        steps = [await self._stop_left(sid)]
        evidence = await trio.to_thread.run_sync(rebuild_scratch, self.store.tmp_dir, sid)
        where = _rel(self.store, evidence) if evidence is not None else "no old scratch"
        steps.append(rc.RepairStep("rebuild_scratch", f"old scratch kept in {where}", True))
        thread, holder, _ = last_thread(ledger, sid)
        thread = thread if profile.provider in RESUMABLE and holder else ""  # as repair_plan says
        if not await self._start(profile, sid, resume=thread, check=True):
            why = self._start_errors.get(sid, "the process did not start")
            steps.append(rc.RepairStep("start_process", why, False))
            return await self._replace(req, profile, steps, why)
        live = self.sessions[sid]
        live.repaired, live.resume_holder = True, holder if thread else ""
        steps.append(rc.RepairStep("start_process", f"pid {live.proc.pid}", True))
        steps.append(rc.RepairStep("resume_thread", f"{RESUMABLE[profile.provider]} {thread}"
                                   + (f", kept for {holder}'s next exclusive lease" if holder else ""),
                                   True) if thread else
                     rc.RepairStep("no_thread", "no conversation to resume: the next lease "
                                   "starts a fresh one", True))
        steps.append(rc.RepairStep("check_handshake", "answered", True))
        steps.append(rc.RepairStep("clear_quarantine", "healthy and no lease is live", True))
        reply = rc.RepairReply(sid, True, "repaired", tuple(steps))
        try:
            return await self.owner.submit(self._repair_mutation(
                req, lambda led, ctx: repaired_session(led, sid, ctx), reply))
        except RelayError as exc:  # a lease went live meanwhile, or the session was closed
            await live.proc.stop(f"repair: {exc.message}")
            steps[-1] = rc.RepairStep("clear_quarantine", exc.message, False)
            return rc.RepairReply(sid, True, "refused", tuple(steps), revision=self.owner.ledger.revision)

    async def _stop_left(self, sid: str) -> rc.RepairStep:
        """Stop the session's process, if any is left, and wait until it is forgotten."""
        live = self.sessions.get(sid)
        if live is None:
            return rc.RepairStep("stop_process", "no process was left", True)
        await live.proc.stop("repair: a fresh process replaces it")
        with trio.move_on_after(self.config.startup_timeout_seconds):
            while self.sessions.get(sid) is live:
                await self.wait_changed()
        return rc.RepairStep("stop_process", f"pid {live.proc.pid} stopped ({live.proc.returncode})",
                             True)

    async def _replace(self, req: rc.RepairSessionRequest, profile: rc.Profile,
                       steps: list[rc.RepairStep], why: str) -> rc.RepairReply:
        """The session cannot be repaired: a new session of its profile
        replaces it (``replaces`` / ``replaced_by``) and it is closed."""
        sid = req.session_id
        await self._stop_left(sid)
        created: list[str] = []

        def change(ledger: Ledger, ctx: Ctx) -> Ledger:
            new_id = _free_id(ledger.sessions, f"ses-{ctx.revision}")
            created.append(new_id)
            return create_session(ledger, rc.CreateSessionRequest(profile.name, new_id,
                                                                  replaces=sid), ctx)[0]

        steps = [*steps, rc.RepairStep("close_session", f"cannot be repaired: {why}", True)]
        try:
            reply = await self.owner.submit(self._repair_mutation(
                req, change, rc.RepairReply(sid, True, "replaced", tuple(steps))))
        except RelayError as exc:
            steps[-1] = rc.RepairStep("close_session", exc.message, False)
            return rc.RepairReply(sid, True, "refused", tuple(steps),
                                  revision=self.owner.ledger.revision)
        new_id = created[-1] if created else self.owner.ledger.sessions[sid].replaced_by
        started = self._managed(profile) and await self._start(profile, new_id)
        step = rc.RepairStep("start_replacement", f"session {new_id}" + (
            "" if started else f" (not started: {self._start_errors.get(new_id, 'unmanaged')})"),
            True)
        return attrs.evolve(reply, steps=(*reply.steps, step), replacement_session_id=new_id)

    async def _repair_restarted(self) -> None:
        """At start: repair the sessions a previous server's death left
        quarantined (``relay_restarted``): resumed where the provider can,
        else replaced."""
        ledger = self.owner.ledger
        for sid, q in sorted(ledger.quarantines.items()):
            session = ledger.sessions.get(sid)
            if (q.state != "active" or quarantine_code(q) != "relay_restarted" or session is None
                    or session.profile not in ledger.profiles
                    or not self._managed(ledger.profiles[session.profile])):
                continue
            try:
                reply = await self.repair_session(rc.RepairSessionRequest(sid, apply=True))
                _rlog.info("session %s (relay restarted): %s", sid, reply.outcome)
            except RelayError as exc:
                _rlog.warning("session %s (relay restarted): not repaired: %s", sid, exc.message)

    async def aclose(self) -> None:
        """Stop every provider (graceful shutdown, while the ledger owner still
        commits: running turns end ``failed``, "the relay stopped")."""
        self._closing = True
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as stops:
                for live in list(self.sessions.values()):
                    stops.start_soon(live.proc.stop, "the relay is stopping")
            with trio.move_on_after(self.config.stop_kill_seconds + 1.0):
                if self.sessions:
                    await self._none_left.wait()

################################################################
# Supervision (ledger owner, heartbeat, subprocesses)
################################################################


@attrs.define(eq=False)
class _Pending:
    mutation: Mutation
    done: Any  # a trio.Event set once committed (None when ``on_done`` is given)
    result: Any = None
    #: Called with the result, in the owner's task, instead of setting ``done`` (``offer``).
    on_done: Callable[[Any], None] | None = None


@attrs.frozen
class OwnerStatistics:
    """A snapshot of a ``LedgerOwner`` (``LedgerOwner.statistics()``)."""

    revision: int = _gauge("ledger revision this server holds")
    queued: int = _gauge("mutations waiting for the next group commit")
    commits: int = _counter("group commits attempted")
    mutations: int = _counter("mutations in those commits")
    failed_commits: int = _counter("group commits that hit an internal error")


@attrs.define(eq=False)
class LedgerOwner:
    """The one task that commits this process's mutations.

    Requests queue on a channel; the owner takes everything queued, applies it
    in order under the file lock and makes the whole batch durable with one
    write (group commit), so throughput grows with concurrency instead of
    paying an fsync per request.  The commit runs in one worker thread hop.
    """

    store: Store
    config: Config
    hub: EventHub
    now: Callable[[], float] = time.time
    metrics: Any = None
    ledger: Ledger = attrs.Factory(Ledger)
    max_batch: int = 512
    _send: Any = None
    _receive: Any = None
    _lock: Any = None  # a commit and its announcement vs. the watcher's refresh
    #: Why the ledger on disk cannot be read, once this process has seen it
    #: damaged; None while it reads.  Reads refuse meanwhile (``check_intact``).
    damage: LedgerInvalid | None = None
    _commits: int = 0
    _mutations: int = 0
    _failed: int = 0

    def __attrs_post_init__(self) -> None:
        # Bounded: a flood of callers waits for room instead of growing memory.
        self._send, self._receive = trio.open_memory_channel(4 * self.max_batch)
        self._lock = trio.Lock()

    async def submit(self, mutation: Mutation) -> Any:
        """Queue a mutation and wait for its reply (raises its RelayError)."""
        pending = _Pending(mutation, trio.Event())
        await self._send.send(pending)
        await pending.done.wait()
        if isinstance(pending.result, BaseException):
            raise pending.result
        return pending.result

    async def enqueue(self, mutations: list[Mutation]) -> list[_Pending]:
        """Queue ``mutations`` back to back (one group commit takes them all,
        in order, room permitting) without waiting for their commit: each
        ``_Pending`` is ``done`` once committed, its ``result`` the mutation's
        reply or its RelayError.  The channel keeps the order of everything
        queued, so a later ``submit`` commits after these."""
        pendings = [_Pending(mutation, trio.Event()) for mutation in mutations]
        for pending in pendings:
            try:
                self._send.send_nowait(pending)  # no checkpoint: the owner cannot take a part
            except trio.WouldBlock:
                await self._send.send(pending)  # full: wait for room (back-pressure)
        return pendings

    def offer(self, mutation: Mutation, on_done: Callable[[Any], None]) -> bool:
        """Queue ``mutation`` without a task waiting for it: once it is committed
        the owner calls ``on_done`` with its reply or RelayError (it must not
        raise or block).  False, nothing queued, when the queue is full."""
        try:
            self._send.send_nowait(_Pending(mutation, None, on_done=on_done))
        except trio.WouldBlock:
            return False
        return True

    async def submit_many(self, mutations: list[Mutation]) -> list[Any]:
        """``enqueue`` and wait for every reply (each a result or a RelayError, not raised)."""
        pendings = await self.enqueue(mutations)
        for pending in pendings:
            await pending.done.wait()
        return [pending.result for pending in pendings]

    async def run(self, *, task_status: TaskStatus[None] = _TASK_STATUS_IGNORED) -> None:
        self.ledger = await trio.to_thread.run_sync(self._read_current)
        self.hub.rebase(self.ledger)
        task_status.started()
        try:
            while True:
                batch = [await self._receive.receive()]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                async with self._lock:
                    await self._commit(batch)
        finally:  # no commit of this owner runs any more (a commit's thread is waited for)
            self.store.close_handles()

    def _read_current(self) -> Ledger:
        return self.store.read() or Ledger()

    def statistics(self) -> OwnerStatistics:
        """A frozen snapshot of the commit pipeline (as trio's ``statistics()`` methods)."""
        return OwnerStatistics(
            revision=self.ledger.revision, queued=self._send.statistics().current_buffer_used,
            commits=self._commits, mutations=self._mutations, failed_commits=self._failed)

    async def _commit(self, batch: list[_Pending]) -> None:
        started = trio.current_time()
        seen: list[Ledger] = []
        try:
            results, ledger = await trio.to_thread.run_sync(lambda: commit(
                self.store, [p.mutation for p in batch], self.config, self.now(),
                on_start=seen.append))
        except RelayError as exc:
            results, ledger = [exc] * len(batch), None
            if isinstance(exc, LedgerInvalid):
                self.damaged(exc)
        except Exception:  # a bug: answer internal, keep serving
            _logger("store").exception("commit of %d mutations failed", len(batch))
            self._failed += 1
            results = [Internal("the relay hit an internal error; see its log")] * len(batch)
            ledger = None
        self._commits += 1
        self._mutations += len(batch)
        if self.metrics is not None:
            self.metrics.observe_commit(trio.current_time() - started, len(batch))
        if seen:
            await self._absorb(seen[0])  # what other processes committed first
        if ledger is not None:
            self._announce(batch, results, ledger)
        for pending, result in zip(batch, results, strict=True):
            pending.result = result
            if pending.on_done is not None:
                pending.on_done(result)
            else:
                pending.done.set()

    def _announce(self, batch: list[_Pending], results: list[Any], ledger: Ledger) -> None:
        old, self.ledger = self.ledger, ledger
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, RelayError):
                continue
            if getattr(result, "revision", old.revision + 1) <= old.revision:
                continue  # an idempotent replay: announced when it first happened
            if pending.mutation.stream:
                self.hub.publish_records(pending.mutation.stream, [result.record])
            revision = getattr(result, "revision", ledger.revision)
            for kind, data in notices_for(pending.mutation.method, result):
                self.hub.notice(revision, kind, data)
        announced = {x.lease_id for p, r in zip(batch, results, strict=True)
                     if p.mutation.method == "reaper" and isinstance(r, list) for x in r}
        for lease in _expired_since(old, ledger):  # expired by compaction on the way
            if lease.lease_id not in announced:
                self.hub.notice(ledger.revision, "lease.expired", to_json(lease))

    async def refresh(self) -> None:
        """Pick up what other processes committed.  Never mid-commit: the file
        may already hold this process's own commit, not yet announced, and
        absorbing it would announce every notice of it twice."""
        async with self._lock:
            try:
                new = await trio.to_thread.run_sync(self._read_current)
            except LedgerInvalid as exc:
                self.damaged(exc)
                raise
            await self._absorb(new)

    def check_intact(self) -> None:
        """Refuse a read while the ledger is known to be damaged: the copy in
        memory is no longer the truth, and must not be served as current."""
        if self.damage is not None:
            raise LedgerInvalid(self.damage.message, hint=self.damage.hint)

    def damaged(self, exc: LedgerInvalid) -> None:
        """The ledger on disk no longer reads: end every stream with the reason
        (nothing can be committed, and resuming needs a readable ledger)."""
        if self.damage is None:
            _logger("store").error("the ledger is damaged: %s; reads refuse until it is repaired",
                                   exc.message)
            self.hub.end_all(error_frame(exc.code.value, exc.message,
                                         f"{exc.hint}; resubscribe once it reads again"))
        self.damage = exc

    def _restart(self, new: Ledger) -> None:
        """Another ledger took this one's place: nothing published so far can
        be resumed against it (revisions and sequence numbers start again), so
        every stream ends with an error telling its client to resubscribe."""
        _logger("store").warning(
            "the ledger was replaced (revision %d -> %d, ledger_id %s -> %s); ending every stream",
            self.ledger.revision, new.revision, self.ledger.ledger_id or "(none)",
            new.ledger_id or "(none)")
        self.ledger = new
        self.hub.end_all(error_frame(
            "aborted", "the ledger was replaced (state reset, or a copy restored): revisions and "
            "sequence numbers start again, so earlier ids cannot be resumed",
            "resubscribe without Last-Event-ID, and re-read GET /api/relay/status"))
        self.hub.rebase(new)

    async def _absorb(self, new: Ledger) -> None:
        """Announce a newer ledger written by another process: relay notices
        for what changed, and stream records past what was published."""
        self.damage = None
        if ledger_replaced(self.ledger, new):
            self._restart(new)
            return
        if new.revision <= self.ledger.revision:
            return
        old, self.ledger = self.ledger, new
        for kind, data in diff_notices(old, new):
            self.hub.notice(new.revision, kind, data)
        for sid, cursor in new.cursors.items():
            for stream in STREAM_KINDS:
                seen = self.hub.seen(sid, stream)
                if getattr(cursor, stream) > seen:
                    try:
                        records = await trio.to_thread.run_sync(
                            self.store.read_records, sid, stream,
                            getattr(cursor, f"{stream}_bytes"), seen, getattr(cursor, stream) - seen)
                    except (OSError, ValueError, RelayError) as exc:
                        # A damaged log must not take the server down: skip
                        # past it (the gate names it; readers get data_loss).
                        _logger("store").warning("cannot read the %s log of %s: %s", stream, sid, exc)
                        self.hub.mark_seen(sid, stream, getattr(cursor, stream))
                        continue
                    self.hub.publish_records(stream, records)


def ledger_replaced(old: Ledger, new: Ledger) -> bool:
    """True when ``new`` does not continue ``old``: another ledger (its own
    identity, or none where ``old`` had one: moved aside by ``state reset``),
    or an older revision of the same one (a restored copy).  A ledger with no
    identity yet is continued by any newer one (its first write mints one)."""
    if old.ledger_id == new.ledger_id:
        return new.revision < old.revision
    if not old.ledger_id:
        return new.revision <= old.revision and old.revision > 0
    return True


async def reap_expired_leases(owner: LedgerOwner, interval: float, *,
                              task_status: TaskStatus[None] = _TASK_STATUS_IGNORED) -> None:
    """Heartbeat resident: mark leases past their expiry ``expired``."""
    task_status.started()
    while True:
        await trio.sleep(interval)
        stamp = iso(owner.now())
        if any(x.state in rc.LIVE_LEASE_STATES and x.expires_at <= stamp
               for x in owner.ledger.leases.values()):
            with contextlib.suppress(RelayError):
                await owner.submit(Mutation(expire_leases, "reaper"))


async def watch_ledger(owner: LedgerOwner, interval: float, *,
                       task_status: TaskStatus[None] = _TASK_STATUS_IGNORED) -> None:
    """Heartbeat resident: notice commits by other processes (a cheap stat)."""
    task_status.started()
    paths = (trio.Path(owner.store.ledger_path), trio.Path(owner.store.journal_path))
    last, checked = None, trio.current_time()
    while True:
        await trio.sleep(interval)
        key: list[tuple[int, int, int] | None] = []
        for path in paths:  # the checkpoint and its journal
            try:
                st = await path.stat()
                key.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                key.append(None)  # moved aside (state reset): absorbed as an empty, new ledger
        # Also re-read now and then: two commits in one timestamp tick can
        # leave inode, size and mtime as they were (the read compares the
        # checksum, so an unchanged ledger costs one small read).
        if key != last or trio.current_time() - checked >= WATCH_FULL_SECONDS:
            last, checked = key, trio.current_time()
            with contextlib.suppress(RelayError):
                await owner.refresh()


#: How often a serving relay collects its cyclic garbage and hands the free
#: pages inside its malloc heap back to the system.
MEMORY_TIDY_SECONDS: Final = 30.0


def _malloc_trim() -> Callable[[int], Any] | None:
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


async def tidy_memory(interval: float, collect: Callable[[], Any] | None,
                      trim: Callable[[int], Any] | None, *,
                      task_status: TaskStatus[None] = _TASK_STATUS_IGNORED) -> None:
    """Heartbeat resident: every ``interval`` seconds ``collect()`` (a full
    collection, on the event loop: it holds the interpreter either way), then
    ``trim(0)`` in a worker thread (it walks the heaps; ctypes lets the event
    loop run meanwhile).

    Cancelled waits, refused requests and finished streams leave cycles
    (exceptions, their tracebacks and frames) that outlive the young
    collections; after ``_quiet_gc`` froze the start-up heap the collector's
    own trigger for a full collection waits for a quarter of that heap to
    pile up, so in the soak the server held ~15,000 such objects more a
    minute (a full collection of what is not frozen takes ~10 ms).  And glibc
    returns memory to the system only from the top of a heap: the pages of
    free chunks below live ones (the holes the commit thread's ledger copies
    leave) stay resident until ``malloc_trim`` releases them (1.5-3.5 MB a
    call in the soak, under 5 ms)."""
    task_status.started()
    if collect is None and trim is None:
        return
    while True:
        await trio.sleep(interval)
        if collect is not None:
            collect()
        if trim is not None:
            await trio.to_thread.run_sync(trim, 0)


async def run_heartbeat(owner: LedgerOwner, config: Config, reaper: bool = True, *,
                        collect: Callable[[], Any] | None = None,
                        trim: Callable[[int], Any] | None = None,
                        task_status: TaskStatus[Nursery] = _TASK_STATUS_IGNORED) -> None:
    """The heartbeat nursery: lease-expiry reaper, the ledger watcher and (when
    serving) the memory tidier (``collect``: the garbage collector's; ``trim``:
    glibc's ``malloc_trim``)."""
    async with trio.open_nursery() as nursery:
        if reaper:
            await nursery.start(reap_expired_leases, owner, config.reaper_interval_seconds)
        await nursery.start(watch_ledger, owner, config.watch_interval_seconds)
        await nursery.start(tidy_memory, MEMORY_TIDY_SECONDS, collect, trim)
        task_status.started(nursery)


async def run_supervision(runtime: Runtime | None = None, *,
                         task_status: TaskStatus[Nursery] = _TASK_STATUS_IGNORED) -> None:
    """The subprocess-supervision nursery: the live runtime (section "Runtime")
    and, under it, one task per provider process.  Without a runtime (the
    gate's read-only probe) it holds nothing."""
    async with trio.open_nursery() as nursery:
        if runtime is not None:
            await nursery.start(runtime.run)
        task_status.started(nursery)
        await trio.sleep_forever()


################################################################
# Service (one method per RPC; no Quart imports)
################################################################


class Metrics:
    """Prometheus metrics of one server (its own registry, not the global one)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("relay_requests", "HTTP requests by route and code",
                                     ["route", "code"], registry=self.registry)
        self.commit_seconds = prom.Histogram(
            "relay_commit_seconds", "time to make one group commit durable",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry)
        self.batch_size = prom.Histogram(
            "relay_commit_batch_size", "mutations per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.active_leases = prom.Gauge("relay_active_leases", "active leases",
                                        registry=self.registry)
        self.subscribers = prom.Gauge("relay_subscribers", "SSE and WebSocket subscribers",
                                      ["kind"], registry=self.registry)
        self._snapshots: list[tuple[str, Callable[[], Any]]] = []
        self.registry.register(_SnapshotCollector(self._snapshots))

    def track(self, prefix: str, statistics: Callable[[], Any]) -> None:
        """Expose each field of a ``statistics()`` snapshot as ``relay_<prefix>_<field>``,
        read when /metrics is scraped."""
        self._snapshots.append((prefix, statistics))

    def track_providers(self, health: Callable[[], Any]) -> None:
        """Expose the runtime's provider health (``Runtime.provider_health``),
        labelled by profile and cause, read when /metrics is scraped."""
        self.registry.register(_HealthCollector(health))

    def observe_commit(self, seconds: float, batch: int) -> None:
        self.commit_seconds.observe(seconds)
        self.batch_size.observe(batch)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type): OpenMetrics when ``accept`` asks for
        application/openmetrics-text, Prometheus text format 0.0.4 otherwise
        (the client library's own content negotiation)."""
        from prometheus_client import exposition

        encoder, content_type = exposition.choose_encoder(accept)
        return encoder(self.registry), content_type


def _bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None.  The
    scheme is case-insensitive (RFC 9110 11.1: "bearer" is "Bearer")."""
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class _SnapshotCollector:
    """A Prometheus collector over ``statistics()`` snapshots (attrs classes
    whose fields say, in their metadata, counter or gauge and their help)."""

    def __init__(self, sources: list[tuple[str, Callable[[], Any]]]):
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for prefix, statistics in self.sources:
            snapshot = statistics()
            for field in attrs.fields(type(snapshot)):
                family = CounterMetricFamily if field.metadata["kind"] == "counter" else GaugeMetricFamily
                yield family(f"relay_{prefix}_{field.name}", field.metadata["help"],
                             value=getattr(snapshot, field.name))


class _HealthCollector:
    """Prometheus families over the runtime's provider health: process events
    (``HEALTH_COUNTERS``) and automatic quarantines by cause, counters; the
    degraded state and consecutive start failures, gauges; all per profile."""

    def __init__(self, health: Callable[[], Any]):
        self.health = health

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        events = CounterMetricFamily("relay_provider_events", "provider process events the "
                                     "runtime observed, per profile", labels=["profile", "event"])
        causes = CounterMetricFamily("relay_provider_quarantines", "sessions the runtime "
                                     "quarantined, per profile and cause", labels=["profile", "cause"])
        degraded = GaugeMetricFamily("relay_provider_degraded", "1 while the profile is degraded "
                                     "(start failures in a row)", labels=["profile"])
        streak = GaugeMetricFamily("relay_provider_consecutive_failures",
                                   "start failures in a row", labels=["profile"])
        for h in self.health():
            for name in HEALTH_COUNTERS:
                events.add_metric([h.profile, name], getattr(h, name))
            for code in rc.QUARANTINE_CODES[1:]:
                causes.add_metric([h.profile, code], (h.quarantines or {}).get(code, 0))
            degraded.add_metric([h.profile], 1 if h.state == "degraded" else 0)
            streak.add_metric([h.profile], h.consecutive_failures)
        yield from (events, causes, degraded, streak)


@attrs.define(eq=False)
class Service:
    """The relay's RPCs over a ledger owner, independent of HTTP: grpc's
    servicer, one method per row of ``rc.RPCS`` named ``rpc.method``.  A row
    whose method is not written out here gets one from the table
    (``_bind_servicer_methods``): a mutation submits ``Operations``' pure
    operation to the ledger owner, a read answers with ``Reads``."""

    store: Store
    config: Config
    owner: LedgerOwner
    hub: EventHub
    now: Callable[[], float] = time.time
    metrics: Metrics = attrs.Factory(Metrics)
    probe_token: str | None = attrs.field(default=None, repr=False)
    #: loopback | trusted-lan, fixed when serving starts (the ledger's ``runtime.mode``).
    serving_mode: str = "loopback"
    _status_cache: tuple[Any, bytes] | None = None
    #: Signs browser sessions; a new server's key ends every old session.
    _session_key: bytes = attrs.field(factory=lambda: os.urandom(32), repr=False)
    #: Session values logged out before their expiry -> that expiry (seconds).
    _logged_out: dict[str, float] = attrs.Factory(dict)
    #: The live runtime (None in the gate's probe and in service-level tests).
    runtime: Any = None

    async def call(self, name: str, request: Any) -> Any:
        """Run one RPC with an already-decoded request message: its method
        here, named from the table (``GrantLease`` -> ``grant_lease``)."""
        rpc = rc.RPC_BY_NAME[name]
        if rpc.streams:
            key, _, value = rpc.watch.partition("=")
            frame = json.dumps({"type": "subscribe", key: value})
            raise rc.Unimplemented(f"{name} is a server stream, not a unary call",
                                   hint=f"open GET /events?{rpc.watch}, or send {frame} on /ws")
        validate_request(request)
        if rpc.mutates and self.probe_token is not None:
            raise FailedPrecondition("this is the gate's read-only probe; it takes no mutations",
                                     hint="serve the relay with `python -m relay serve`")
        return await getattr(self, rpc.method)(request)

    async def get_status(self, request: rc.GetStatusRequest) -> rc.StatusReply:
        """The status projection (also of a damaged ledger), from its cache,
        with the live runtime's provider health."""
        reply = from_json(rc.StatusReply, json.loads(await self.status_json()))
        if self.runtime is None:
            return reply
        return attrs.evolve(reply, providers=self.runtime.provider_health())

    async def list_sessions(self, request: rc.ListSessionsRequest) -> rc.ListSessionsReply:
        """Sessions with their live processes (when this server runs the runtime)."""
        if self.runtime is None:
            return await self._read(rc.RPC_BY_NAME["ListSessions"], request)
        self.owner.check_intact()
        return list_sessions(self.owner.ledger, request, self.now(), self.runtime.processes())

    async def start_turn(self, request: rc.StartTurnRequest) -> rc.TurnReply:
        return await self._live_runtime().start_turn(request)

    async def interrupt_turn(self, request: rc.InterruptTurnRequest) -> rc.TurnReply:
        return await self._live_runtime().interrupt_turn(request)

    async def resolve_approval(self, request: rc.ResolveApprovalRequest) -> rc.ApprovalReply:
        return await self._live_runtime().resolve_approval(request)

    async def repair_session(self, request: rc.RepairSessionRequest) -> rc.RepairReply:
        """The runtime repairs; a dry run needs only the ledger."""
        if self.runtime is None and not request.apply:
            self.owner.check_intact()
            return repair_plan(self.owner.ledger, request.session_id, iso(self.now()))
        return await self._live_runtime().repair_session(request)

    def _live_runtime(self) -> Runtime:
        """The runtime, for the rows it answers (``Rpc.runtime``)."""
        if self.runtime is None:
            raise Unavailable("this RPC needs the live runtime, which this server does not run",
                              hint="start the relay with `python -m relay serve`")
        self.owner.check_intact()
        return self.runtime

    async def _mutate(self, rpc: rc.Rpc, request: Any) -> Any:
        return await self.owner.submit(rpc_mutation(rpc, request))

    async def _read(self, rpc: rc.Rpc, request: Any) -> Any:
        """A read over the ledger in memory; a stream's log is read in a thread."""
        self.owner.check_intact()
        if not rpc.stream:
            return reader(rpc)(ReadView(self.store, self.now(), self.owner.ledger), request)
        try:
            return await trio.to_thread.run_sync(read_rpc, self.store, rpc, request, self.now())
        except LedgerInvalid as exc:  # read from disk: the watcher may not have looked yet
            self.owner.damaged(exc)
            raise

    async def call_json(self, name: str, body: Any) -> dict[str, Any]:
        rpc = rc.RPC_BY_NAME.get(name)
        if rpc is None:
            raise rc.Unimplemented(f"no RPC named {name!r}",
                                   hint="see specs/relay.proto for the methods")
        return to_json(await self.call(name, from_json(rpc.request, body)))

    async def status_json(self) -> bytes:
        """The status projection, cached per ledger revision for a second."""
        key = (self.owner.ledger.ledger_id, self.owner.ledger.revision,
               self.owner.damage is not None, int(trio.current_time()))
        if self._status_cache is None or self._status_cache[0] != key:
            doc = await trio.to_thread.run_sync(self._status_doc)
            self._status_cache = (key, json.dumps(doc, sort_keys=True).encode())
        return self._status_cache[1]

    def _status_doc(self) -> dict[str, Any]:
        return to_json(status(self.store, self.now()))

    def authorized(self, header: str | None, session: str | None = None) -> bool:
        """Bearer check when the runtime has a token (constant time); a browser
        session value (the login cookie) stands in for the header."""
        import hmac

        ledger = self.owner.ledger
        presented = _bearer(header)
        if self.probe_token is not None:  # digests, so the comparison never depends on lengths
            same = hmac.compare_digest(token_digest(presented or "").encode(),
                                       token_digest(self.probe_token).encode())
            return presented is not None and same
        if not self.token_required():
            return True
        if session and self.session_token_id(session):
            return True
        # Off loopback the rule is fixed at start: a token is required even if
        # the ledger later loses its binding (unbound, reset) -- fail closed.
        if presented is None:
            return False
        return token_accepts(ledger, presented, iso(self.now()))

    def token_required(self) -> bool:
        return (self.probe_token is not None or bool(self.owner.ledger.runtime.token_id)
                or self.serving_mode == "trusted-lan")

    # -- browser sessions (the login cookie) --------------------------------------------
    #
    # Browsers cannot put a header on EventSource or WebSocket, so a page logs
    # in once with the token and gets TOKEN_ID.EXPIRES.NONCE.MAC, signed with a key
    # that lives only in this server's memory.  The value names the token, not
    # its secret; every use re-checks that token in the ledger, so revoking it
    # (or its rotation grace running out) ends its sessions at once.

    def open_session(self, raw: str) -> tuple[str, str, float]:
        """(session value, token id, expiry) for bearer token ``raw``."""
        if self.probe_token is not None:
            raise FailedPrecondition("the gate's read-only probe takes no logins",
                                     hint="log in to a relay started with `python -m relay serve`")
        token_id = token_matching(self.owner.ledger, raw, iso(self.now())) if raw else ""
        if not token_id:
            raise rc.Unauthenticated("missing or invalid bearer token",
                                     hint='send Authorization: Bearer <token> or {"token": "..."}')
        expires = float(int(self.now() + SESSION_COOKIE_SECONDS))
        body = f"{token_id}.{int(expires)}.{os.urandom(8).hex()}"  # each login its own value
        digest = self.owner.ledger.tokens[token_id].digest
        return f"{body}.{self._session_mac(body, digest)}", token_id, expires

    def _session_mac(self, body: str, digest: str) -> str:
        """The MAC binds the token's digest too (never sent): a token id names
        another token after a state reset (ids restart with revisions)."""
        import hashlib
        import hmac

        return hmac.new(self._session_key, f"{body}|{digest}".encode(), hashlib.sha256).hexdigest()

    def session_token_id(self, value: str) -> str:
        """The token a session value stands for, or "" unless the value is this
        server's, unexpired, not logged out, and the token still usable."""
        import hmac

        body, _, mac = value.rpartition(".")
        token_id, _, expires = body.rsplit(".", 1)[0].rpartition(".")
        if not (token_id and re.fullmatch(r"[0-9]{1,12}", expires)):
            return ""
        token = self.owner.ledger.tokens.get(token_id)
        if token is None or not hmac.compare_digest(
                mac.encode(), self._session_mac(body, token.digest).encode()):
            return ""
        now = self.now()
        if int(expires) <= now or value in self._logged_out:
            return ""
        return token_id if token_usable(token, iso(now)) else ""

    def log_out(self, value: str) -> None:
        """Log a session value out for good (its cookie may have been copied)."""
        if not self.session_token_id(value):
            return
        now = self.now()
        self._logged_out = {v: t for v, t in self._logged_out.items() if t > now}
        self._logged_out[value] = float(value.rsplit(".", 3)[1])

    # -- streams (SSE and WebSocket share this) --------------------------------------

    async def open_stream(self, *, session: str, stream: str, feed: str, last_event_id: str
                          ) -> tuple[Subscriber, Any, dict[str, int]]:
        """Subscribe, then replay what came after ``last_event_id``.  Returns the
        subscriber, the frames to send first (a list or a replay), and per
        session the last sequence number replayed (live frames at or below it
        are skipped).  A refusal (bad filter; malformed, unknown or
        ahead-of-stream cursor; a ledger known to be damaged) raises before
        the stream starts, so HTTP can answer it with an error status instead
        of a stream."""
        self.owner.check_intact()
        if feed:
            return await self._open_feed(feed, last_event_id)
        return await self._open_records(session, stream, last_event_id)

    async def _watch(self, rpc: rc.Rpc, request: Any) -> tuple[Subscriber, Any, dict[str, int]]:
        """A server-stream row's subscription (``open_stream`` of its selector)."""
        key, _, value = rpc.watch.partition("=")
        return await self.open_stream(
            session=getattr(request, "session_id", ""), stream=rpc.stream,
            feed=value if key == "feed" else "", last_event_id=request.last_event_id)

    async def _open_records(self, session: str, stream: str, last_event_id: str):
        if stream not in STREAM_KINDS:
            raise InvalidArgument("stream must be events or results", hint="?stream=events|results")
        if session:
            check_id("session", session)
        topic = f"{stream}:{session or '*'}"
        if not last_event_id:
            return self.hub.subscribe(topic), [], {}
        after = parse_stream_cursor(last_event_id)
        if session and set(after) != {session}:
            raise InvalidArgument(f"Last-Event-ID {last_event_id!r} is not {session}:SEQ",
                                  hint="send back an id this stream sent")
        # Absorb other processes' commits first, then subscribe and take the
        # replay range with no checkpoint in between: a backlog is replayed
        # from the log in chunks, never pushed live past the buffer, and every
        # record is either replayed or live, never both, never neither.
        await self.owner.refresh()
        sub = self.hub.subscribe(topic)
        try:
            replay, last = self._replay_range(session, stream, after)
        except RelayError:
            self.hub.unsubscribe(sub)
            raise
        return sub, replay, last

    def _replay_range(self, session: str, stream: str, after: dict[str, int]
                      ) -> tuple[Any, dict[str, int]]:
        """The replay from ``after`` to each stream's end: one session's range,
        or (all sessions) every session's in turn, ids as cursor vectors."""
        ledger = self.owner.ledger
        for sid, seq in after.items():
            cursor = ledger.cursors.get(sid)
            if cursor is None or sid not in ledger.sessions:
                raise NotFound(f"session {sid!r} does not exist",
                               hint="list sessions with GET /api/relay/sessions")
            if seq > getattr(cursor, stream):
                raise rc.OutOfRange(f"Last-Event-ID {sid}:{seq} is ahead of the stream "
                                    f"(last seq {getattr(cursor, stream)})",
                                    hint="send back an id this relay sent")
        names = [session] if session else sorted(ledger.cursors)
        last = {sid: getattr(ledger.cursors[sid], stream) for sid in names}
        parts = [Replay(store=self.store, session=sid, stream=stream, after=after.get(sid, 0),
                        until=last[sid], committed=getattr(ledger.cursors[sid], f"{stream}_bytes"))
                 for sid in names if after.get(sid, 0) < last[sid]]
        if session:
            return (parts[0] if parts else []), last
        return VectorReplay(parts, {sid: after.get(sid, 0) for sid in names}), last

    async def _open_feed(self, feed: str, last_event_id: str):
        if feed != "relay":
            raise InvalidArgument("feed must be 'relay'", hint="?feed=relay")
        if not last_event_id:
            return self.hub.subscribe("relay"), [], {}
        revision, index = parse_feed_cursor(last_event_id)
        if revision > self.owner.ledger.revision:
            await self.owner.refresh()  # another process may have committed it a moment ago
        if revision > self.owner.ledger.revision:
            raise rc.OutOfRange(f"Last-Event-ID {last_event_id} is ahead of the ledger "
                                f"(revision {self.owner.ledger.revision})",
                                hint="send back an id this relay sent")
        # Subscribe only now, with no await before the replay is taken: what
        # the refresh announced is in the history, and nothing comes twice.
        frames = self.hub.feed_after(revision, index)
        if frames is None:
            raise rc.OutOfRange("notices after that id are no longer kept",
                                hint="re-read GET /api/relay/status and /api/relay/leases, "
                                "then open the feed with no Last-Event-ID")
        return self.hub.subscribe("relay"), frames, {}

    # -- WebSocket channel ------------------------------------------------------------

    async def websocket(self, receive: Callable[[], Any], send: Callable[[str], Any],
                        send_texts: Callable[[list[str]], Any] | None = None) -> None:
        """One WebSocket connection: pipelined RPCs, subscriptions and lease
        holds.  Frames are JSON objects; see specs/flow-relay-contract.md.
        ``send_texts`` (when the server allows it) sends several frames in
        one socket write."""
        holds: dict[str, dict[str, Any]] = {}
        out_send, out_receive = trio.open_memory_channel(self.config.subscriber_buffer)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ws_writer, out_receive, send, nursery.cancel_scope,
                                   send_texts)
                nursery.start_soon(self._ws_until_shutdown, nursery.cancel_scope)
                while True:
                    text = await receive()
                    try:
                        msg = _parse_json(text)
                        if not isinstance(msg, dict):
                            raise ValueError("a frame must be a JSON object")
                        if isinstance(msg.get("id"), (list, dict)):  # it is echoed back
                            raise ValueError("a frame's id must be a string, a number or null")
                        # A backstop well past frame -> request -> data (its members
                        # are str()'d and echoed); data itself is held to the limit
                        # with a precise message by from_json.
                        rc.check_json_value(msg, "frame", limit=2 * rc.MAX_JSON_DEPTH)
                    except ValueError as exc:
                        _ws_send(out_send, _ws_error(None, InvalidArgument(f"bad frame: {exc}")))
                        continue
                    except RelayError as exc:  # too deep: answer its (scalar) id
                        _ws_send(out_send, _ws_error(msg.get("id"), exc))
                        continue
                    self._ws_dispatch(msg, nursery, out_send, holds)
        finally:
            # Shielded (the connection is going) but bounded: a commit that
            # does not come back in time leaves the leases to expire.
            with trio.move_on_after(CLEANUP_SECONDS, shield=True):
                await self._ws_release_on_disconnect(holds)

    async def _ws_writer(self, out_receive: Any, send: Callable[[str], Any], scope: Any,
                         send_texts: Callable[[list[str]], Any] | None = None) -> None:
        async for text in out_receive:
            if send_texts is None:
                await send(text)
                continue
            texts = [text]  # and what else is queued (a group commit's replies), in order
            while len(texts) < WS_WRITE_FRAMES:
                try:
                    texts.append(out_receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await send_texts(texts)
        # The queue was closed because the client stopped reading: end the
        # connection rather than keep a muted socket (and its holds) alive.
        scope.cancel()

    async def _ws_until_shutdown(self, scope: Any) -> None:
        """End the connection when the server stops, so the socket is closed
        cleanly at once instead of cut after hypercorn's graceful timeout:
        ``EventHub.close`` ends every subscription, this one included."""
        sub = self.hub.subscribe("shutdown")
        try:
            async for _ in sub.receive:
                pass
        finally:
            self.hub.unsubscribe(sub)
        scope.cancel()

    def _ws_dispatch(self, msg: dict[str, Any], nursery: Any, out: Any,
                     holds: dict[str, dict[str, Any]]) -> None:
        kind, ident = msg.get("type"), msg.get("id")
        if kind == "rpc":
            if not self._ws_offer(msg, out):
                nursery.start_soon(self._ws_rpc, msg, out)
        elif kind == "subscribe":
            nursery.start_soon(self._ws_subscribe, msg, out)
        elif kind == "hold":
            lease_id = msg.get("lease_id")
            if self.probe_token is not None:  # a hold renews and releases: mutations
                _ws_send(out, _ws_error(ident, FailedPrecondition(
                    "this is the gate's read-only probe; it holds no leases",
                    hint="serve the relay with `python -m relay serve`")))
                return
            if not isinstance(lease_id, str) or lease_id not in self.owner.ledger.leases:
                _ws_send(out, _ws_error(ident, NotFound(f"lease {lease_id!r} does not exist")))
                return
            holds[lease_id] = {"release": bool(msg.get("release_on_disconnect")),
                               "beat": trio.current_time()}
            nursery.start_soon(self._ws_keep_alive, lease_id, holds, out)
            _ws_send(out, json.dumps({"type": "held", "id": ident, "lease_id": lease_id}))
        elif kind == "heartbeat":
            for hold in holds.values():
                hold["beat"] = trio.current_time()
            _ws_send(out, json.dumps({"type": "heartbeat", "id": ident}))
        else:
            _ws_send(out, _ws_error(ident, InvalidArgument(f"unknown frame type {kind!r}")))

    def _ws_offer(self, msg: dict[str, Any], out: Any) -> bool:
        """A plain mutation (one ``_mutate`` serves) queued for the owner at once,
        its reply sent from the commit's completion: no task, no wake-up per
        call.  False (nothing done) for every other frame, or a full queue;
        the task of ``_ws_rpc`` answers it then, the same way."""
        rpc = _PLAIN_MUTATIONS.get(msg.get("method"))  # type: ignore[arg-type]
        if rpc is None or self.probe_token is not None:
            return False
        ident = msg.get("id")
        try:
            mutation = rpc_mutation(rpc, from_json(rpc.request, msg.get("request", {})))
        except RelayError as exc:
            _ws_send(out, _ws_error(ident, exc))
            return True
        return self.owner.offer(mutation, functools.partial(_ws_answer, out, ident))

    async def _ws_rpc(self, msg: dict[str, Any], out: Any) -> None:
        ident = msg.get("id")
        try:
            reply = await self.call_json(str(msg.get("method")), msg.get("request", {}))
        except RelayError as exc:
            _ws_send(out, _ws_error(ident, exc))
            return
        _ws_send(out, json.dumps({"type": "reply", "id": ident, "reply": reply}))

    async def _ws_subscribe(self, msg: dict[str, Any], out: Any) -> None:
        try:
            rpc = rc.watch_rpc(msg)  # the row, by the frame's "stream" or "feed"
            sub, frames, last = await getattr(self, rpc.method)(rpc.request_from_parameters(msg))
        except RelayError as exc:  # e.g. a malformed session id: answer, keep the socket
            sub, frames, last = None, [error_frame(exc.code.value, exc.message)], {}
        replay = Replay.of(frames)
        try:
            while chunk := await replay.take():
                for frame in chunk:  # with back-pressure: a replay may be long
                    await out.send(frame.ws)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if sub is not None:
                self.hub.unsubscribe(sub)
            return
        if sub is not None and replay.failed:
            self.hub.unsubscribe(sub)
            return
        if sub is None:
            return
        self.metrics.subscribers.labels("ws").inc()
        try:
            async for frame in sub.receive:
                if replayed(frame, last):
                    continue
                _ws_send(out, frame.ws)
            if sub.farewell is not None:
                _ws_send(out, sub.farewell.ws)
            elif sub.dropped:
                _ws_send(out, error_frame("resource_exhausted", "subscriber fell behind; "
                                          "resubscribe with your last id").ws)
        finally:
            self.metrics.subscribers.labels("ws").dec()
            self.hub.unsubscribe(sub)

    async def _ws_keep_alive(self, lease_id: str, holds: dict[str, dict[str, Any]],
                             out: Any) -> None:
        """Renew a held lease while heartbeats arrive; tell the client at once
        if the lease is lost (revoked, expired, released elsewhere)."""
        sub = self.hub.subscribe("relay")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ws_watch_lease, lease_id, sub, out, nursery.cancel_scope)
                while lease_id in holds:
                    lease = self.owner.ledger.leases.get(lease_id)
                    if lease is None or not is_live(lease, iso(self.now())):
                        _ws_send(out, _lease_lost(lease_id, lease))
                        break
                    period = max(lease.ttl_seconds / 3, 0.05)
                    await trio.sleep(period)
                    if trio.current_time() - holds[lease_id]["beat"] > lease.ttl_seconds / 2:
                        continue  # no heartbeat: let it run out
                    try:
                        await self.owner.submit(rpc_mutation(
                            "RenewLease", rc.RenewLeaseRequest(lease_id, lease.ttl_seconds)))
                    except RelayError:
                        continue  # the loop above reports the loss
                nursery.cancel_scope.cancel()
            # Lost: nothing left to release.  On a disconnect (cancelled) the
            # hold must stay, or release_on_disconnect finds nothing to release.
            holds.pop(lease_id, None)
        finally:
            self.hub.unsubscribe(sub)

    async def _ws_watch_lease(self, lease_id: str, sub: Subscriber, out: Any, scope: Any) -> None:
        async for frame in sub.receive:
            if frame.data.get("lease_id") == lease_id and frame.event in (
                    "lease.revoked", "lease.expired", "lease.released"):
                _ws_send(out, _lease_lost(lease_id, self.owner.ledger.leases.get(lease_id)))
                scope.cancel()
                return
        # The hub ended the feed: after a replaced ledger that lacks the lease,
        # it is lost now, not when the renewal loop next looks.
        if sub.farewell is not None and lease_id not in self.owner.ledger.leases:
            _ws_send(out, _lease_lost(lease_id, None))
            scope.cancel()

    async def _ws_release_on_disconnect(self, holds: dict[str, dict[str, Any]]) -> None:
        for lease_id, hold in list(holds.items()):
            if hold["release"]:
                with contextlib.suppress(RelayError):
                    await self.owner.submit(rpc_mutation(
                        "ReleaseLease", rc.ReleaseLeaseRequest(lease_id)))


#: The mutating rows ``Service`` serves by ``_mutate`` alone (its bound method, not a
#: written-out one): what ``Service._ws_offer`` may queue without a task.
_PLAIN_MUTATIONS: dict[str, rc.Rpc] = {}


def _bind_servicer_methods() -> None:
    """Give ``Service`` the method of each row it does not write out: a
    mutation is submitted to the ledger owner, a read answered by ``Reads``."""
    for rpc in rc.RPCS:
        if hasattr(Service, rpc.method):
            continue
        if rpc.mutates and not rpc.streams:
            _PLAIN_MUTATIONS[rpc.name] = rpc

        async def method(self: Service, request: Any, _rpc: rc.Rpc = rpc) -> Any:
            if _rpc.streams:
                return await self._watch(_rpc, request)
            return await (self._mutate if _rpc.mutates else self._read)(_rpc, request)

        method.__name__ = method.__qualname__ = rpc.method
        method.__doc__ = f"{rpc.help} (``{rpc.path}``)."
        setattr(Service, rpc.method, method)


_bind_servicer_methods()


#: At most this many queued frames go out in one socket write (``Service._ws_writer``).
WS_WRITE_FRAMES: Final = 256


def _ws_send(out: Any, text: str) -> None:
    """Queue a frame for the socket; a client that stops reading is cut off."""
    try:
        out.send_nowait(text)
    except trio.WouldBlock:
        out.close()
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass


def _parse_json(text: str | bytes) -> Any:
    """A request body or WebSocket frame as strict JSON (``rc.parse_json``)."""
    return rc.parse_json(text)


def _ws_error(ident: Any, exc: RelayError) -> str:
    return json.dumps({"type": "error", "id": ident, "error": exc.to_json()})


def _ws_answer(out: Any, ident: Any, result: Any) -> None:
    """Send a queued mutation's reply or error frame (``Service._ws_offer``)."""
    if isinstance(result, RelayError):
        _ws_send(out, _ws_error(ident, result))
    else:
        _ws_send(out, json.dumps({"type": "reply", "id": ident, "reply": to_json(result)}))


def _lease_lost(lease_id: str, lease: rc.Lease | None) -> str:
    state = lease.state if lease is not None else "unknown"
    if lease is not None and lease.state in rc.LIVE_LEASE_STATES:
        state = "expired"
    return json.dumps({"type": "lease_lost", "lease_id": lease_id, "state": state,
                       "reason": lease.revoke_reason if lease is not None else ""})


################################################################
# Dashboard (GET /)
################################################################

# The operator's page is served by the relay itself: one HTML document, one
# stylesheet and one script, all constants below (no build step, nothing from
# a CDN: the relay may run offline).  The page holds no data and no secret, so
# it is served before the token check, as /health is; everything it shows
# comes from authenticated JSON routes (an unauthenticated page shows only its
# login form).  Its forms are generated from ``GET /api/relay/rpcs``, the
# table of RPCs described from the request messages' field metadata, so a new
# RPC in ``relay_client.RPCS`` appears on the page with no dashboard code.

#: A strict policy: this origin's files only, no inline script or style, no
#: framing, no <base>, forms post only here.
DASHBOARD_CSP: Final = ("default-src 'self'; script-src 'self'; connect-src 'self'; "
                        "img-src 'self' data:; style-src 'self'; frame-ancestors 'none'; "
                        "base-uri 'none'; form-action 'self'")
_DASHBOARD_HEADERS: Final = {"Content-Security-Policy": DASHBOARD_CSP,
                             "X-Content-Type-Options": "nosniff",
                             "Referrer-Policy": "no-referrer",
                             "X-Frame-Options": "DENY",
                             "Cache-Control": "no-cache"}
#: An RPC is destructive (the page asks before calling it) when it mutates and
#: its name starts with one of these verbs: it ends, blocks or discards
#: someone's work.  A rule over the table, so new RPCs are covered by name.
_DESTRUCTIVE_VERBS: Final = ("Release", "Revoke", "Quarantine", "Clear", "Close", "Repair",
                             "Interrupt")
#: The relay feed's notice kinds (``notices_for``, ``diff_notices``): an
#: EventSource hears a named event only if it listens for that name.
FEED_KINDS: Final = (*(f"lease.{x}" for x in ("granted", "waiting", "renewed", "released",
                                               "revoked", "expired")),
                     "quarantine.set", "quarantine.cleared",
                     *(f"runtime.{'served' if x == 'serving' else x}" for x in rc.RUNTIME_STATUSES))
#: Rows per page of the session list (``GET /api/relay/overview``).
OVERVIEW_PAGE_ROWS: Final = 50
OVERVIEW_MAX_ROWS: Final = 500
#: The timeline's default window and the most stream records it reads per stream.
TIMELINE_WINDOW_SECONDS: Final = 1 * HOURS
TIMELINE_MAX_RECORDS: Final = 2000
_JSON_TYPES: Final = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_type(tp: Any) -> str:
    import typing

    if tp in _JSON_TYPES:
        return _JSON_TYPES[tp]
    return "array" if typing.get_origin(tp) is tuple else "json"


def _field_description(field: Any, tp: Any) -> dict[str, Any]:
    """One request field as the page's form needs it."""
    meta = field.metadata
    row: dict[str, Any] = {"name": field.name, "type": _json_type(tp),
                           "required": field.default is attrs.NOTHING,
                           "help": meta.get("help", "")}
    if field.default is not attrs.NOTHING:
        row["default"] = to_json(field.default)
    if "choices" in meta:
        row["choices"] = list(meta["choices"])
    if "id" in meta:  # checked with check_id: the id pattern, anchored for RegExp
        row["id"] = meta["id"]
        row["pattern"] = rc.ID_PATTERN.pattern
    if meta.get("id") == "request id":
        row["auto"] = "request-id"  # the page fills in a fresh UUID when left empty
    for key in ("minimum", "length"):
        if key in meta:
            row[key] = to_json(meta[key])
    if meta.get("argv"):
        row["argv"] = True
    return row


def rpc_description() -> dict[str, Any]:
    """``GET /api/relay/rpcs``: every unary RPC of the table with its kind, whether
    it is destructive, and its request fields."""
    import typing

    rows = []
    for rpc in (rpc for rpc in rc.RPCS if not rpc.streams):  # the forms call Connect: unary only
        hints = typing.get_type_hints(rpc.request, vars(rc))
        rows.append({
            "name": rpc.name, "path": rpc.path, "method": rpc.method,
            "kind": "mutation" if rpc.mutates else "read",
            "destructive": rpc.mutates and rpc.name.startswith(_DESTRUCTIVE_VERBS),
            "help": rpc.help, "cli": " ".join(rpc.cli), "request": rpc.request.__name__,
            "response": rpc.response.__name__,
            "fields": [_field_description(f, hints[f.name]) for f in attrs.fields(rpc.request)],
        })
    return {"service": rc.SERVICE, "rpcs": rows, "feed_kinds": list(FEED_KINDS)}


# -- the overview (profiles, pool health, one page of sessions) ------------------------


def _current_leases(ledger: Ledger, stamp: str) -> tuple[dict[str, rc.Lease], dict[str, int]]:
    """Per session: its current lease (the live active one with the highest
    fencing token, else a waiting one) and how many live leases it has."""
    current: dict[str, rc.Lease] = {}
    live: dict[str, int] = {}
    for lease in ledger.leases.values():
        if lease.state not in rc.LIVE_LEASE_STATES or not is_live(lease, stamp):
            continue
        live[lease.session_id] = live.get(lease.session_id, 0) + 1
        best = current.get(lease.session_id)
        rank = (lease.state == "active", lease.fencing_token)
        if best is None or rank > (best.state == "active", best.fencing_token):
            current[lease.session_id] = lease
    return current, live


def _pool_health(ledger: Ledger, current: dict[str, rc.Lease]) -> dict[str, dict[str, Any]]:
    """Per profile, from the ledger's sessions: warm (ready and free), leased,
    failed and closed counts, healthy|degraded, and the newest active
    quarantine as its last error.  (The live runtime's own pool fields, when
    a profile carries them, are shown beside these.)"""
    def empty() -> dict[str, Any]:
        return {"health": "healthy", "sessions": 0, "warm": 0, "leased": 0, "failed": 0,
                "closed": 0, "last_error": None}

    pools = {name: empty() for name in ledger.profiles}
    for session in ledger.sessions.values():
        pool = pools.setdefault(session.profile, empty())
        pool["sessions"] += 1
        lease = current.get(session.session_id)
        if session.state == "failed":
            pool["failed"] += 1
        elif session.state == "closed":
            pool["closed"] += 1
        elif lease is not None and lease.state == "active":
            pool["leased"] += 1
        else:
            pool["warm"] += 1
        q = ledger.quarantines.get(session.session_id)
        if q is not None and q.state == "active":
            last = pool["last_error"]
            if last is None or q.quarantined_at > last["at"]:
                pool["last_error"] = {"session_id": q.session_id, "reason": q.reason,
                                      "at": q.quarantined_at}
    for pool in pools.values():
        if pool["failed"]:
            pool["health"] = "degraded"
    return pools


def _running_turns(ledger: Ledger) -> dict[str, dict[str, Any]]:
    """Per session, its unfinished turn, where the ledger keeps turn records
    (the live runtime's; a ledger without them has none)."""
    return {t.session_id: {"turn_id": t.turn_id, "state": t.state, "started_at": t.started_at}
            for t in getattr(ledger, "turns", {}).values() if not t.ended_at}


def _session_row(ledger: Ledger, session: rc.Session, lease: rc.Lease | None,
                 live: int) -> dict[str, Any]:
    row = to_json(session)
    q = ledger.quarantines.get(session.session_id)
    cursor = ledger.cursors.get(session.session_id)
    row["lease"] = to_json(lease) if lease is not None else None
    row["live_leases"] = live
    row["quarantine"] = to_json(q) if q is not None and q.state == "active" else None
    row["events"] = cursor.events if cursor else 0
    row["results"] = cursor.results if cursor else 0
    return row


def _matches(session: rc.Session, lease: rc.Lease | None, text: str) -> bool:
    haystack = (session.session_id, session.profile, session.state, lease.holder if lease else "")
    return any(text in x.lower() for x in haystack)


def dashboard_overview(ledger: Ledger, now: float, *, offset: int = 0,
                       limit: int = OVERVIEW_PAGE_ROWS, query: str = "",
                       profile: str = "",
                       processes: dict[str, rc.ProcessInfo] | None = None,
                       health: tuple[rc.ProviderHealth, ...] = ()) -> dict[str, Any]:
    """``GET /api/relay/overview``: the header counts, every profile with its
    pool health, and one page of sessions (filtered, ordered by id) with
    their current lease, active quarantine, running turn and (from the
    running server's runtime, ``processes``) provider process.  One pass over the ledger in
    memory, whatever the page: 1,000 sessions cost a few milliseconds.  A profile
    the runtime has run carries its provider health (``health``) as the pool's
    ``runtime``, and the pool's state and last error are the runtime's: a
    quarantined session kept for inspection does not make a healed pool degraded."""
    stamp = iso(now)
    current, live = _current_leases(ledger, stamp)
    pools = _pool_health(ledger, current)
    for observed in health:
        pool = pools.get(observed.profile)
        if pool is not None:
            pool["runtime"] = to_json(observed)
            pool["health"] = observed.state
            if observed.last_error:
                pool["last_error"] = {"session_id": "", "reason": observed.last_error,
                                      "at": observed.last_error_at}
    text = query.strip().lower()
    chosen = [s for _, s in sorted(ledger.sessions.items())
              if (not profile or s.profile == profile)
              and (not text or _matches(s, current.get(s.session_id), text))]
    page = chosen[offset:offset + limit]
    running = _running_turns(ledger)
    rows = [_session_row(ledger, s, current.get(s.session_id), live.get(s.session_id, 0)) for s in page]
    for row in rows:
        row["turn"] = running.get(row["session_id"])
        process = (processes or {}).get(row["session_id"])
        if process is not None:
            row["process"] = to_json(process)
    return {
        "revision": ledger.revision, "now": stamp,
        "runtime": to_json(ledger.runtime),
        "profiles": [{**to_json(p), "pool": pools[p.name]} for _, p in sorted(ledger.profiles.items())],
        "sessions": {"total": len(chosen), "offset": offset, "limit": limit,
                     "items": rows},
        "counts": {"sessions": len(ledger.sessions), "leased": sum(
            1 for x in current.values() if x.state == "active"),
            "quarantined": sum(1 for q in ledger.quarantines.values() if q.state == "active")},
    }


def _page_args(args: Any) -> dict[str, Any]:
    """The overview's query (offset, limit, q, profile), checked."""
    known = {"offset", "limit", "q", "profile"}
    unknown = set(args) - known
    if unknown:
        raise InvalidArgument(f"unknown query parameter {sorted(unknown)[0]!r}",
                              hint=f"known: {', '.join(sorted(known))}")
    out: dict[str, Any] = {"query": args.get("q", ""), "profile": args.get("profile", "")}
    for name, default, top in (("offset", 0, 10**9), ("limit", OVERVIEW_PAGE_ROWS, OVERVIEW_MAX_ROWS)):
        try:
            value = rc.parse_digits(args.get(name, str(default)))
        except ValueError:
            raise InvalidArgument(f"{name} must be a whole number (ASCII digits 0-9)") from None
        if value > top:
            raise InvalidArgument(f"{name} is {value}; at most {top}")
        out[name] = value
    if out["profile"]:
        check_id("profile", out["profile"])
    return out


# -- the timeline (leases, turns and quarantines of one session) -----------------------


def _archived_leases(store: Store, session_id: str) -> Iterator[dict[str, Any]]:
    """Leases of ``session_id`` that compaction moved to archive/leases.jsonl."""
    path = store.state_dir / ARCHIVE_DIR / "leases.jsonl"
    needle = json.dumps(session_id).encode()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if needle in line:  # cheap filter before parsing
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and row.get("session_id") == session_id:
                        yield row


def _lease_span(row: dict[str, Any], stamp: str) -> dict[str, Any]:
    start = row.get("granted_at") or row.get("requested_at", "")
    end = row.get("ended_at") or ""
    if not end and row.get("state") in rc.LIVE_LEASE_STATES:
        end = min(row.get("expires_at") or stamp, stamp) if row.get("state") == "active" else stamp
    return {"lease_id": row.get("lease_id", ""), "holder": row.get("holder", ""),
            "mode": row.get("mode", ""), "state": row.get("state", ""),
            "fencing_token": row.get("fencing_token", 0), "start": start, "end": end or stamp,
            "reason": row.get("revoke_reason", "")}


def _recent_records(store: Store, ledger: Ledger, session_id: str, stream: str) -> list[rc.StreamRecord]:
    cursor = ledger.cursors.get(session_id)
    if cursor is None:
        return []
    last, committed = getattr(cursor, stream), getattr(cursor, f"{stream}_bytes")
    return store.read_records(session_id, stream, committed, max(last - TIMELINE_MAX_RECORDS, 0),
                              TIMELINE_MAX_RECORDS)


def _turn_spans(events: list[rc.StreamRecord], results: list[rc.StreamRecord]) -> list[dict[str, Any]]:
    """Turns as the streams tell them: event records of kind ``turn.*`` grouped
    by their ``turn_id`` (first to last stamp, the last kind's suffix as the
    state), and each result record closing the turn it names."""
    turns: dict[str, dict[str, Any]] = {}
    tagged = [(r, False) for r in events] + [(r, True) for r in results]
    for record, is_result in tagged:
        data = record.data if isinstance(record.data, dict) else {}
        turn_id = str(data.get("turn_id") or (f"result-{record.seq}" if is_result else ""))
        if not (is_result or record.kind.startswith("turn")) or not turn_id:
            continue
        turn = turns.setdefault(turn_id, {"turn_id": turn_id, "start": record.appended_at,
                                          "end": record.appended_at, "state": "running"})
        turn["start"] = min(turn["start"], record.appended_at)
        turn["end"] = max(turn["end"], record.appended_at)
        state = data.get("state") or data.get("status") or record.kind.rpartition(".")[2]
        if state and state not in ("started", "turn"):
            turn["state"] = str(state)
    return sorted(turns.values(), key=lambda t: t["start"])


def dashboard_timeline(store: Store, ledger: Ledger, session_id: str, since: str,
                       now: float) -> dict[str, Any]:
    """``GET /api/relay/timeline``: what happened to one session since
    ``since``: lease intervals by holder (the ledger's and the archive's),
    turns (the live runtime's turn records where the ledger has them, else
    the streams' ``turn.*`` events and results), and quarantine marks.
    Blocking reads: call it in a worker thread."""
    if session_id not in ledger.sessions:
        raise NotFound(f"session {session_id!r} does not exist",
                       hint="list sessions with GET /api/relay/sessions")
    stamp = iso(now)
    rows = {r["lease_id"]: r for r in _archived_leases(store, session_id) if "lease_id" in r}
    rows.update({x.lease_id: to_json(x) for x in ledger.leases.values() if x.session_id == session_id})
    leases = sorted((s for s in (_lease_span(r, stamp) for r in rows.values()) if s["end"] >= since),
                    key=lambda s: s["start"])
    events = _recent_records(store, ledger, session_id, "events")
    results = _recent_records(store, ledger, session_id, "results")
    turns = {t["turn_id"]: t for t in _turn_spans(events, results)}
    for turn in getattr(ledger, "turns", {}).values():  # the live runtime's records win
        if turn.session_id == session_id:
            turns[turn.turn_id] = {"turn_id": turn.turn_id, "state": turn.state,
                                   "start": turn.started_at, "end": turn.ended_at or stamp,
                                   "error": getattr(turn, "error", "")}
    turns = sorted((t for t in turns.values() if t["end"] >= since), key=lambda t: t["start"])
    marks = []
    q = ledger.quarantines.get(session_id)
    if q is not None:
        if q.quarantined_at >= since:
            marks.append({"kind": "quarantine", "at": q.quarantined_at, "reason": q.reason})
        if q.cleared_at and q.cleared_at >= since:
            marks.append({"kind": "cleared", "at": q.cleared_at, "reason": q.reason})
    return {"session_id": session_id, "since": since, "now": stamp, "leases": leases,
            "turns": turns, "marks": marks,
            "events": [{"seq": r.seq, "kind": r.kind, "at": r.appended_at}
                       for r in events if r.appended_at >= since][-200:]}


def _timeline_args(args: Any, now: float) -> tuple[str, str]:
    unknown = set(args) - {"session", "since"}
    if unknown:
        raise InvalidArgument(f"unknown query parameter {sorted(unknown)[0]!r}",
                              hint="known: session, since")
    session = check_id("session", args.get("session", ""))
    since = args.get("since") or iso(now - TIMELINE_WINDOW_SECONDS)
    if not rc.STAMP_PATTERN.fullmatch(since):
        raise InvalidArgument(f"since {since!r} is not a timestamp like {iso(now)}",
                              hint="leave it out for the last hour")
    return session, since


# -- the routes -------------------------------------------------------------------------


def _dashboard_asset(path: str) -> tuple[str, str]:
    """(content type, text) of a page file."""
    return {"/": ("text/html; charset=utf-8", DASHBOARD_HTML),
            "/dashboard.css": ("text/css; charset=utf-8", DASHBOARD_CSS),
            "/dashboard.js": ("text/javascript; charset=utf-8", DASHBOARD_JS)}[path]


def _add_dashboard(app: Any, service: Service) -> None:
    """Serve the page and its three JSON routes on ``app`` (called once by
    ``create_app``).  The Host/Origin guard still stands in front of all of it."""
    from quart import Response, request

    async def page_file() -> Any:
        content_type, text = _dashboard_asset(request.path)
        return Response(text, status=200, content_type=content_type, headers=_DASHBOARD_HEADERS)

    async def before_the_token_check() -> Any:
        # Inserted first among the before-request hooks: the files carry no
        # data, so they are answered ahead of the token check (as /health is).
        rule = request.url_rule
        return await page_file() if rule is not None and rule.endpoint == "dashboard_file" else None

    for path in ("/", "/dashboard.css", "/dashboard.js"):
        app.add_url_rule(path, "dashboard_file", page_file, methods=["GET"])
    app.before_request_funcs.setdefault(None, []).insert(0, before_the_token_check)

    @app.get("/api/relay/rpcs")
    async def api_rpcs() -> Any:
        return _json_response(rpc_description())

    @app.get("/api/relay/overview")
    async def api_overview() -> Any:
        service.owner.check_intact()
        runtime = service.runtime
        processes = runtime.processes() if runtime is not None else None
        health = runtime.provider_health() if runtime is not None else ()
        return _json_response(dashboard_overview(service.owner.ledger, service.now(),
                                                 **_page_args(request.args), processes=processes,
                                                 health=health))

    @app.get("/api/relay/timeline")
    async def api_timeline() -> Any:
        service.owner.check_intact()
        now = service.now()
        session, since = _timeline_args(request.args, now)
        doc = await trio.to_thread.run_sync(dashboard_timeline, service.store,
                                            service.owner.ledger, session, since, now)
        return _json_response(doc)



# -- the page files ---------------------------------------------------------------------

DASHBOARD_HTML: Final = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flow-relay</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard.css">
<script src="/dashboard.js" defer></script>
</head>
<body>
<header>
  <h1>flow-relay</h1>
  <span id="relay-info" class="muted"></span>
  <button id="logout" type="button" hidden>Log out</button>
</header>
<!-- the relay feed (GET /events?feed=relay): newest notice first -->
<div id="feed" class="feed" aria-live="polite"><em class="muted">relay feed: no notices yet</em></div>

<section id="login" class="panel" hidden>
  <form id="login-form">
    <h2>Log in</h2>
    <p>This relay requires its bearer token. It is sent once to
      <code>POST /auth/session</code>, which sets an HttpOnly cookie; the page keeps no copy.</p>
    <label>Token <input id="login-token" type="password" autocomplete="off" required></label>
    <button type="submit">Log in</button>
    <p id="login-error" class="error"></p>
  </form>
</section>

<main id="app" hidden>
  <div class="stack">
  <section id="profiles-panel" class="panel">
    <h2>Profiles</h2>
    <div class="scroll"><table id="profiles">
      <thead><tr><th>Profile</th><th>Provider</th><th>Mode</th><th>Pool</th>
        <th>Warm</th><th>Leased</th><th>Failed</th><th>Last error</th><th>Runtime</th></tr></thead>
      <tbody></tbody></table></div>
  </section>

  <section id="sessions-panel" class="panel">
    <h2>Sessions <span id="session-count" class="muted"></span></h2>
    <div class="toolbar">
      <input id="filter" type="search" placeholder="filter: id, profile, holder, state"
             aria-label="filter sessions">
      <button id="prev" type="button" aria-label="previous page">&lsaquo;</button>
      <span id="page-info" class="muted"></span>
      <button id="next" type="button" aria-label="next page">&rsaquo;</button>
    </div>
    <div class="scroll"><table id="sessions">
      <thead><tr><th>Session</th><th>Profile</th><th>State</th><th>Process</th><th>Holder</th>
        <th>Mode</th><th>Token</th><th>Time left</th><th>Quarantine</th></tr></thead>
      <tbody></tbody></table></div>
  </section>
  </div>

  <section id="detail-panel" class="panel">
    <h2>Session <span id="detail-id">&mdash;</span></h2>
    <p class="muted" id="detail-hint">Pick a session to see its timeline and live events.</p>
    <div id="detail-body" hidden>
    <dl id="detail-facts"></dl>
    <h3>Timeline
      <select id="window" aria-label="timeline window">
        <option value="3600">last hour</option><option value="600">last 10 minutes</option>
        <option value="60">last minute</option>
      </select></h3>
    <div id="timeline" class="timeline"></div>
    <h3>Turn <span id="turn-state" class="muted">none yet</span></h3>
    <div id="turn-view" class="turn">
      <p id="turn-info" class="muted"></p>
      <p id="turn-approval" class="approval" hidden></p>
      <pre id="turn-output" aria-live="polite"></pre>
    </div>
    <h3>Live events <span id="live-state" class="muted"></span></h3>
    <ol id="live" class="live"></ol>
    </div>
  </section>

  <section id="actions-panel" class="panel">
    <h2>Actions</h2>
    <label>RPC <select id="rpc-select"></select></label>
    <p id="rpc-help" class="muted"></p>
    <form id="rpc-form" novalidate></form>
    <div id="rpc-result" class="result" aria-live="polite"></div>
  </section>
</main>
</body>
</html>
'''

DASHBOARD_CSS: Final = r'''/* flow-relay dashboard: plain CSS, system fonts, light and dark. */
:root { --bg: #f7f7f5; --fg: #1d1d1f; --muted: #6b6b70; --line: #d9d9de; --panel: #fff;
        --ok: #1f7a3a; --warn: #a15c00; --bad: #b3261e; --accent: #2457c5; --shade: #eef1f8; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #161618; --fg: #ececf0; --muted: #9a9aa2; --line: #34343a; --panel: #202024;
          --ok: #58c27d; --warn: #e0a23a; --bad: #ff7b72; --accent: #7aa2ff; --shade: #2a2d36; }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }  /* over the display rules below */
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       background: var(--bg); color: var(--fg); }
header { display: flex; gap: 1em; align-items: baseline; padding: .6em 1em;
         border-bottom: 1px solid var(--line); background: var(--panel); flex-wrap: wrap; }
header h1 { font-size: 1.15em; margin: 0; }
#logout { margin-left: auto; }
h2 { font-size: 1.05em; margin: 0 0 .5em; }
h3 { font-size: .95em; margin: 1em 0 .4em; }
h3 select { font: inherit; font-weight: normal; margin-left: .5em; }
.muted { color: var(--muted); font-weight: normal; }
.error { color: var(--bad); }
code { font-size: .92em; }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 1em; padding: 1em;
       align-items: start; }
.stack { display: flex; flex-direction: column; gap: 1em; min-width: 0; }
#actions-panel { grid-column: 1 / span 2; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
         padding: .8em 1em; min-width: 0; }
#login { max-width: 28em; width: calc(100% - 2em); margin: 3em auto; }
#login label { display: block; margin: .8em 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .5em; border-bottom: 1px solid var(--line);
         white-space: nowrap; vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: .9em; }
td.wrap { white-space: normal; max-width: 22em; overflow-wrap: anywhere; }
#sessions tbody tr { cursor: pointer; }
#sessions tbody tr:hover, #sessions tbody tr.selected { background: var(--shade); }
.toolbar { display: flex; gap: .5em; align-items: center; margin-bottom: .5em; }
.toolbar input { flex: 1; min-width: 6em; }
.badge { display: inline-block; padding: 0 .5em; border-radius: 1em; font-size: .85em;
         border: 1px solid currentColor; }
.healthy, .ready, .active { color: var(--ok); }
.degraded, .waiting { color: var(--warn); }
.failed, .revoked, .quarantine { color: var(--bad); }
.closed, .released, .expired { color: var(--muted); }
.feed { display: flex; gap: .5em; overflow-x: auto; padding: .3em 1em; min-height: 1.9em;
        border-bottom: 1px solid var(--line); font-size: .85em; }
.feed span { white-space: nowrap; padding: .1em .6em; border-radius: 1em; background: var(--shade); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1em; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.live { list-style: none; padding: 0; margin: 0; max-height: 22em; overflow-y: auto;
        font: 12px/1.35 ui-monospace, monospace; border: 1px solid var(--line); }
.live li { padding: .15em .4em; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
.live li:empty { display: none; }
.live .seq { color: var(--muted); margin-right: .5em; }
.live .kind { color: var(--accent); margin-right: .5em; }
.live li.result { background: var(--shade); }
.badge.running { color: var(--accent); display: table; margin-top: .2em; }
td.proc { white-space: normal; min-width: 10em; max-width: 16em; }
.clamp { display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 3; overflow: hidden; }
.turn { border: 1px solid var(--line); border-radius: 4px; padding: .3em .6em; }
.turn p { margin: .2em 0; overflow-wrap: anywhere; }
.turn .approval { color: var(--warn); }
.turn pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: .3em 0; min-height: 1.4em;
            max-height: 14em; overflow-y: auto; font: 12px/1.35 ui-monospace, monospace; }
#turn-state.running { color: var(--accent); }
#turn-state.completed { color: var(--ok); }
#turn-state.failed { color: var(--bad); }
#turn-state.interrupted { color: var(--warn); }
.timeline svg { width: 100%; height: auto; display: block; }
.timeline text { font-size: 11px; fill: var(--muted); }
.timeline .axis { stroke: var(--line); }
.timeline rect.lease { fill: var(--accent); opacity: .75; }
.timeline rect.lease.revoked, .timeline rect.turn.failed { fill: var(--bad); }
.timeline rect.lease.expired, .timeline rect.lease.released { fill: var(--muted); }
.timeline rect.lease.waiting { fill: var(--warn); }
.timeline rect.turn { fill: var(--ok); opacity: .8; }
.timeline line.quarantine { stroke: var(--bad); stroke-width: 2; }
.timeline line.cleared { stroke: var(--ok); stroke-width: 2; stroke-dasharray: 3 2; }
.timeline line.event { stroke: var(--accent); opacity: .35; }
form .field { margin: .5em 0; display: grid; grid-template-columns: 11em 1fr; gap: .2em 1em;
              align-items: start; }
form .field .help, form .field .problem { grid-column: 2; font-size: .85em; }
form .field .problem { color: var(--bad); }
form .field input, form .field select, form .field textarea { width: 100%; max-width: 32em; font: inherit; }
.result { margin-top: .6em; overflow-wrap: anywhere; }
.result pre { white-space: pre-wrap; margin: .3em 0; font-size: 12px; }
button { font: inherit; padding: .2em .8em; }
button.danger { color: var(--bad); border-color: var(--bad); }
/* A narrow window (a phone at 390 px): one column, forms stacked. */
@media (max-width: 760px) {
  main { grid-template-columns: minmax(0, 1fr); padding: .5em; gap: .6em; }
  #actions-panel { grid-column: 1; }
  .stack { gap: .6em; }
  form .field { grid-template-columns: 1fr; }
  /* tables become cards: each cell over its column's name */
  #sessions thead, #profiles thead { display: none; }
  #sessions tr, #profiles tr { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr));
                               gap: .2em .6em; padding: .5em .3em; border-bottom: 1px solid var(--line); }
  #sessions td, #profiles td { border: 0; padding: 0; white-space: normal; overflow-wrap: anywhere; }
  #sessions td:empty, #profiles td:empty { display: none; }
  #sessions td.proc { min-width: 0; max-width: none; grid-column: span 2; }
  #sessions td::before, #profiles td::before { content: attr(data-label); display: block;
                                               font-size: .75em; color: var(--muted); }
  form .field .help, form .field .problem { grid-column: 1; }
  .panel { padding: .6em; }
}
'''

DASHBOARD_JS: Final = r'''// flow-relay dashboard.  Plain JavaScript, no build step, nothing from outside
// this relay.  Every action is the Connect RPC the stubs call
// (POST /relay.v1.Relay/<Method>); the forms are generated from
// GET /api/relay/rpcs, so a new RPC needs no code here.  Text goes into the
// page with textContent only, never as HTML.  No token is kept: the login
// form sends it once to POST /auth/session, which sets an HttpOnly cookie.
"use strict";

const PAGE_ROWS = 50;        // sessions per page (the server pages the list)
const LIVE_KEEP = 500;       // live-view lines kept in the DOM
const LIVE_TAIL = 50;        // events replayed when a live view opens
const FEED_KEEP = 8;         // notices shown in the strip
const POLL_MS = 2000;        // the overview is re-read this often too: processes and turns send no notice
const SVG = "http://www.w3.org/2000/svg";

const state = {
  rpcs: [], feedKinds: [], overview: null, fetchedAt: 0,
  page: {offset: 0, q: ""}, selected: null, holder: "", live: null, feed: null, seen: {},
  turn: null,  // the open session's latest turn as its stream tells it
};

// -- small helpers ------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// A request id for every call: crypto.randomUUID where the page is a secure
// context (loopback is), the same v4 layout from getRandomValues elsewhere.
function requestId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// fetch JSON; resolves to {ok, status, body} (the Connect error body on refusal).
async function api(path, options = {}) {
  const headers = Object.assign({"X-Request-Id": requestId()}, options.headers || {});
  let response;
  try {
    response = await fetch(path, Object.assign({credentials: "same-origin"}, options, {headers}));
  } catch (err) {
    return {ok: false, status: 0, body: {code: "unavailable", message: `the relay did not answer: ${err}`,
                                         hint: "is `python -m relay serve` still running?"}};
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = {code: "unknown", message: response.statusText};
  }
  if (response.status === 401) showLogin();
  return {ok: response.ok, status: response.status, body};
}

function callRpc(rpc, body) {
  return api(rpc.path, {method: "POST", headers: {"Content-Type": "application/json"},
                        body: JSON.stringify(body)});
}

function errorNode(body) {
  return el("div", {class: "error", role: "alert"},
            el("strong", {text: `${body.code || "error"}: `}), body.message || "",
            body.hint ? el("div", {class: "hint", text: `hint: ${body.hint}`}) : "");
}

function timeLeft(expires) {
  if (!expires || !state.overview) return "";
  const now = Date.parse(state.overview.now) + (Date.now() - state.fetchedAt);
  const s = Math.round((Date.parse(expires) - now) / 1000);
  if (s <= 0) return "expired";
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor(s % 3600 / 60)}m`
       : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

// A runtime block (e.g. a session's `process`) as one line: pid, up time, version...
function describe(value) {
  if (value === null || value === undefined || value === "") return "";
  if (typeof value !== "object") return String(value);
  if (Array.isArray(value)) return value.join(" ");
  return Object.entries(value).filter(([, v]) => v !== "" && v !== null)
    .map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
}

// A session's provider process, short: "pid 123 · running · up 4m 2s · 0.163.0".
function processText(p) {
  if (!p || !p.pid) return "";
  const up = p.started_at && p.state === "running" ? `up ${timeLeftSince(p.started_at)}` : "";
  return [`pid ${p.pid}`, p.state, up, p.provider_version].filter(Boolean).join(" · ");
}

function timeLeftSince(stamp) {
  if (!state.overview) return "";
  const now = Date.parse(state.overview.now) + (Date.now() - state.fetchedAt);
  const s = Math.max(0, Math.round((now - Date.parse(stamp)) / 1000));
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor(s % 3600 / 60)}m`
       : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

// A stream record's data for the live view, without the provider's native frame
// (kept whole in the line's tooltip).
function shown(data) {
  if (typeof data === "string") return data;
  if (data && typeof data === "object" && !Array.isArray(data) && "native" in data) {
    const {native, ...rest} = data;  // eslint-disable-line no-unused-vars
    return JSON.stringify(rest);
  }
  return JSON.stringify(data);
}

// -- login --------------------------------------------------------------------

function showLogin() {
  $("app").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  closeStreams();
  $("login-token").focus();
}

async function login(event) {
  event.preventDefault();
  const input = $("login-token");
  const r = await api("/auth/session", {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify({token: input.value})});
  input.value = "";  // the page keeps no copy of the token
  $("login-error").replaceChildren(r.ok ? "" : errorNode(r.body));
  if (r.ok) boot();
}

async function logout() {
  await api("/auth/logout", {method: "POST"});
  sessionStorage.clear();
  boot();
}

// -- the overview (profiles and one page of sessions) ------------------------------

async function refresh() {
  const q = new URLSearchParams({offset: state.page.offset, limit: PAGE_ROWS});
  if (state.page.q) q.set("q", state.page.q);
  const r = await api(`/api/relay/overview?${q}`);
  if (!r.ok) {  // e.g. a damaged ledger: say so where the relay's summary goes
    if (r.status !== 401) $("relay-info").replaceChildren(errorNode(r.body));
    return false;
  }
  state.overview = r.body;
  state.fetchedAt = Date.now();
  renderOverview();
  return true;
}

let refreshTimer = 0;
function refreshSoon() {  // coalesce a burst of feed notices into one refresh
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => { refresh(); if (state.selected) loadTimeline(); }, 250);
}

function renderOverview() {
  const o = state.overview;
  $("relay-info").textContent = `revision ${o.revision} · ${o.runtime.status}` +
    (o.runtime.endpoint ? ` at ${o.runtime.endpoint}` : "") +
    ` · ${o.counts.sessions} sessions, ${o.counts.leased} leased, ${o.counts.quarantined} quarantined`;
  $("logout").hidden = !o.runtime.token_id;
  $("profiles").tBodies[0].replaceChildren(...o.profiles.map(profileRow));
  const s = o.sessions;
  $("session-count").textContent = `(${s.total})`;
  $("page-info").textContent = s.total
    ? `${s.offset + 1}–${s.offset + s.items.length} of ${s.total}` : "none";
  $("prev").disabled = s.offset === 0;
  $("next").disabled = s.offset + s.items.length >= s.total;
  $("sessions").tBodies[0].replaceChildren(...s.items.map(sessionRow));
  labelCells($("profiles"));
  labelCells($("sessions"));
  const picked = state.selected && s.items.find((x) => x.session_id === state.selected.session_id);
  if (picked) { state.selected = picked; renderDetail(); }
}

// Each cell names its column (data-label), so a narrow window can show rows as cards.
function labelCells(table) {
  const names = [...table.tHead.rows[0].cells].map((th) => th.textContent);
  for (const row of table.tBodies[0].rows) {
    [...row.cells].forEach((td, i) => { td.dataset.label = names[i]; });
  }
}

const PROFILE_FIELDS = new Set(["name", "provider", "mode", "command", "created_at", "pool"]);

function profileRow(p) {
  const pool = p.pool;
  const extra = Object.entries(p).filter(([k, v]) => !PROFILE_FIELDS.has(k) && describe(v) !== "")
    .map(([k, v]) => `${k}: ${describe(v)}`).join("; ");
  const last = pool.last_error
    ? [pool.last_error.session_id, pool.last_error.reason].filter(Boolean).join(": ") : "";
  const rt = pool.runtime;  // what the running server observed (absent: ledger only)
  const observed = rt ? `starts ${rt.starts}, crashes ${rt.crashes}, stalls ${rt.stalls}, ` +
    `probe failures ${rt.probe_failures}, start failures ${rt.start_failures}, ` +
    `failed turns ${rt.failed_turns}` : "";
  return el("tr", {"data-profile": p.name},
    el("td", {text: p.name}), el("td", {text: p.provider}), el("td", {text: p.mode}),
    el("td", {}, el("span", {class: `badge ${pool.health}`, text: pool.health})),
    el("td", {text: pool.warm}), el("td", {text: pool.leased}), el("td", {text: pool.failed}),
    el("td", {class: "wrap error", title: last || null}, last ? el("div", {class: "clamp", text: last}) : ""),
    el("td", {class: "wrap", text: [observed, extra].filter(Boolean).join("; ")}));
}

function sessionRow(s) {
  const l = s.lease;
  const row = el("tr", {"data-session": s.session_id, tabindex: 0,
                        class: state.selected && state.selected.session_id === s.session_id ? "selected" : "",
                        onclick: () => select(s), onkeydown: (e) => { if (e.key === "Enter") select(s); }},
    el("td", {text: s.session_id}), el("td", {text: s.profile}),
    el("td", {}, el("span", {class: `badge ${s.state}`, text: s.state}),
      s.turn ? el("span", {class: "badge running", title: s.turn.turn_id, text: "turn running"}) : ""),
    el("td", {class: "proc", text: processText(s.process)}),
    el("td", {text: l ? l.holder : ""}),
    el("td", {text: l ? `${l.mode}${l.state === "waiting" ? " (waiting)" : ""}` : ""}),
    el("td", {text: l ? l.fencing_token : ""}),
    el("td", {"data-expires": l ? l.expires_at : "", text: l ? timeLeft(l.expires_at) : ""}),
    el("td", {class: "wrap error", title: s.quarantine ? s.quarantine.reason : null},
      s.quarantine ? el("div", {class: "clamp", text: s.quarantine.reason}) : ""));
  return row;
}

function tickTimes() {
  for (const td of document.querySelectorAll("td[data-expires]")) {
    if (td.dataset.expires) td.textContent = timeLeft(td.dataset.expires);
  }
  const left = $("lease-left");
  const lease = state.selected && state.selected.lease;
  if (left && lease) left.textContent = timeLeft(lease.expires_at);
}

// -- one session: facts, timeline, live events ------------------------------------

function select(s) {
  state.selected = s;
  if (s.lease) state.holder = s.lease.holder;
  history.replaceState(null, "", `#session=${encodeURIComponent(s.session_id)}`);
  for (const tr of $("sessions").tBodies[0].rows) {
    tr.classList.toggle("selected", tr.dataset.session === s.session_id);
  }
  renderDetail();
  loadTimeline();
  openLive(s.session_id, {events: s.events, results: s.results});
  renderForm();  // prefill from the new context
}

function renderDetail() {
  const s = state.selected;
  $("detail-id").textContent = s.session_id;
  $("detail-hint").hidden = true;
  $("detail-body").hidden = false;
  const l = s.lease, q = s.quarantine;
  const facts = [["state", s.state], ["profile", `${s.profile} (${s.provider})`],
    ["process", processText(s.process) || "—"], ["fencing token", s.fencing_token],
    ["lease", l ? `${l.lease_id} · ${l.holder} · ${l.mode} · ${l.state} · token ${l.fencing_token}` : "none"],
    ["renewed", l && l.last_renewed_at ? l.last_renewed_at : "—"],
    ["events / results", `${s.events} / ${s.results}`]];
  if (s.turn) facts.push(["turn", describe(s.turn)]);
  if (q) {
    facts.push(["quarantine", `${q.reason} (since ${q.quarantined_at})`]);
    const ev = q.evidence || {};  // the runtime's: exit status, signal, turn, stderr
    const seen = [ev.exit_status !== undefined && ev.exit_status !== null ? `exit ${ev.exit_status}` : "",
      ev.signal ? `signal ${ev.signal}` : "", ev.turn_id ? `turn ${ev.turn_id}` : "",
      ev.pid ? `pid ${ev.pid}` : "", ev.detail || ""].filter(Boolean).join(" · ");
    if (q.code) facts.push(["cause", q.code + (seen ? ` · ${seen}` : "")]);
    if (Array.isArray(ev.stderr) && ev.stderr.length) facts.push(["stderr", ev.stderr.join("\n")]);
  }
  const nodes = [];
  for (const [k, v] of facts) nodes.push(el("dt", {text: k}), el("dd", {text: String(v)}));
  if (l) {
    nodes.push(el("dt", {text: "time left"}), el("dd", {id: "lease-left", text: timeLeft(l.expires_at)}));
  }
  $("detail-facts").replaceChildren(...nodes);
}

async function loadTimeline() {
  const sid = state.selected.session_id;
  const q = new URLSearchParams({session: sid});
  const seconds = Number($("window").value);
  if (state.overview && seconds !== 3600) {  // the server's default window is the last hour
    const now = Date.parse(state.overview.now) + (Date.now() - state.fetchedAt);
    q.set("since", new Date(now - seconds * 1000).toISOString().replace("Z", "000Z"));
  }
  const r = await api(`/api/relay/timeline?${q}`);
  if (state.selected.session_id !== sid) return;
  const width = Math.max(320, $("timeline").clientWidth || 640);
  $("timeline").replaceChildren(r.ok ? drawTimeline(r.body, width) : errorNode(r.body));
}

function ago(seconds) {
  return seconds >= 60 ? `-${Math.round(seconds / 60)}m` : `-${Math.round(seconds)}s`;
}

// The window (last hour by default) as an SVG: one row per lease holder (its lease intervals), a
// row of turns, event ticks, and vertical marks where quarantines were set
// and cleared.  Every shape has a <title> for its details.
function drawTimeline(t, W) {
  const LEFT = 84, RIGHT = 28, ROW = 20, t0 = Date.parse(t.since), t1 = Date.parse(t.now);
  const holders = [...new Set(t.leases.map((x) => x.holder))];
  const rows = [...holders, "turns", "events"];
  const H = 24 + rows.length * ROW;
  const frac = (stamp) => Math.max(0, Math.min(1, (Date.parse(stamp) - t0) / (t1 - t0)));
  const x = (stamp) => LEFT + frac(stamp) * (W - LEFT - RIGHT);
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
                           "aria-label": `timeline of ${t.session_id}`});
  const span = (t1 - t0) / 1000;
  for (let i = 0; i <= 6; i += 1) {  // six ticks across the window
    const at = LEFT + (i / 6) * (W - LEFT - RIGHT);
    const label = i === 6 ? "now" : ago(span * (1 - i / 6));
    root.append(svg("line", {class: "axis", x1: at, x2: at, y1: 14, y2: H}),
                svg("text", {x: at, y: 11, "text-anchor": "middle"}, label));
  }
  rows.forEach((name, i) => root.append(svg("text", {x: 4, y: 34 + i * ROW}, name.slice(0, 12))));
  const bar = (cls, row, a, b, title) => {
    const x0 = x(a), w = Math.max(2, x(b) - x0);
    const r = svg("rect", {class: cls, x: x0, y: 22 + row * ROW, width: w, height: ROW - 6, rx: 2});
    r.append(svg("title", {}, title));
    root.append(r);
  };
  for (const l of t.leases) {
    bar(`lease ${l.state}`, holders.indexOf(l.holder), l.start, l.end,
        `${l.lease_id} ${l.holder} ${l.mode} ${l.state} token ${l.fencing_token}\n${l.start} → ${l.end}` +
        (l.reason ? `\n${l.reason}` : ""));
  }
  for (const turn of t.turns) {
    const why = turn.error ? `: ${turn.error}` : "";
    bar(`turn ${turn.state}`, holders.length, turn.start, turn.end,
        `turn ${turn.turn_id} ${turn.state}${why}\n${turn.start} → ${turn.end}`);
  }
  const eventsY = 22 + (holders.length + 1) * ROW;
  for (const e of t.events) {
    const at = x(e.at);
    const tick = svg("line", {class: "event", x1: at, x2: at, y1: eventsY, y2: eventsY + ROW - 6});
    tick.append(svg("title", {}, `#${e.seq} ${e.kind} ${e.at}`));
    root.append(tick);
  }
  for (const m of t.marks) {
    const at = x(m.at);
    const line = svg("line", {class: m.kind, x1: at, x2: at, y1: 14, y2: H});
    line.append(svg("title", {}, `${m.kind} ${m.at}: ${m.reason}`));
    root.append(line);
  }
  return root;
}

// The live view: native EventSources on the session's event and result
// streams.  Each resumes by itself after a drop (the browser sends
// Last-Event-ID).  Across reloads the page keeps the last id it showed in
// sessionStorage -- a cursor, not a credential -- and starts from a little
// before it, so nothing that arrived during the reload is missed.
function openLive(sid, counts) {
  for (const source of state.live || []) source.close();
  $("live").replaceChildren();
  state.seen = {};
  state.turn = null;
  renderTurn();
  state.live = ["events", "results"].map((stream) => liveStream(sid, stream, counts[stream]));
}

function liveStream(sid, stream, lastSeq) {
  const key = `cursor:${stream}:${sid}`;
  const kept = Number((sessionStorage.getItem(key) || "").split(":").pop() || lastSeq);
  const from = Math.max(0, Math.min(kept, lastSeq) - LIVE_TAIL);
  const query = new URLSearchParams({session: sid, stream, last_event_id: `${sid}:${from}`});
  const source = new EventSource(`/events?${query}`);
  const name = stream.slice(0, -1);  // the SSE event name: event | result
  $("live-state").textContent = "connecting…";
  source.onopen = () => { $("live-state").textContent = "live"; };
  source.addEventListener(name, (e) => {
    const record = JSON.parse(e.data);
    sessionStorage.setItem(key, e.lastEventId);
    const s = state.selected;
    if (s && s.session_id === sid && record.seq > s[stream]) { s[stream] = record.seq; renderDetail(); }
    remember(record.data);
    if (name === "event") followTurn(record);
    else if (record.data && typeof record.data.output_text === "string" && state.turn &&
             record.data.turn_id === state.turn.turn_id) {
      state.turn.output = record.data.output_text;  // the result holds the whole reply
      renderTurn();
    }
    const list = $("live");
    list.append(el("li", {[`data-${name}`]: record.seq, class: name},
                   el("span", {class: "seq", text: `${name === "result" ? "result " : ""}#${record.seq}`}),
                   el("span", {class: "kind", text: record.kind}),
                   shown(record.data)));
    if (record.data && typeof record.data === "object" && "native" in record.data) {
      list.lastChild.title = JSON.stringify(record.data.native);
    }
    while (list.children.length > LIVE_KEEP) list.firstChild.remove();
    list.scrollTop = list.scrollHeight;
  });
  if (name === "event") {  // token deltas: live only (no id), the completed item has the whole text
    source.addEventListener("delta", (e) => {
      const d = JSON.parse(e.data);
      if (!state.turn || state.turn.turn_id !== d.turn_id) {
        state.turn = {turn_id: d.turn_id, state: "running", output: "", approval: null};
      }
      state.turn.output += d.delta || "";
      state.turn.deltas = (state.turn.deltas || 0) + 1;
      renderTurn();
    });
  }
  source.addEventListener("error", (e) => {  // the relay's error frame, or a dropped connection
    if (e.data) $("live").append(el("li", {}, errorNode(JSON.parse(e.data))));
    $("live-state").textContent = source.readyState === EventSource.CLOSED ? "closed" : "reconnecting…";
  });
  return source;
}

// Ids a record names (turn_id, approval_id, ...) prefill the form fields of
// the same name: answering the approval the agent just asked for is one click.
// An empty field of the form on show is filled at once.
function remember(data) {
  if (!data || typeof data !== "object") return;
  for (const [k, v] of Object.entries(data)) {
    // never a request id: each call needs a fresh one, and a reused id is refused
    if (k.endsWith("_id") && typeof v === "string" && k !== "session_id" && k !== "request_id") {
      state.seen[k] = v;
      const input = $(`f-${k}`);
      if (input && !input.value) input.value = v;
    }
  }
}

// The turn view follows the runtime's provider-neutral events: turn.started,
// the agent's message (deltas, then the completed item), approvals asked and
// answered, and the turn's end with its error.
function followTurn(record) {
  const d = record.data && typeof record.data === "object" ? record.data : {};
  const kind = record.kind;
  if (!d.turn_id || !(kind.startsWith("turn.") || kind.startsWith("item.") || kind.startsWith("approval."))) {
    return;
  }
  if (!state.turn || state.turn.turn_id !== d.turn_id) {
    state.turn = {turn_id: d.turn_id, state: "running", output: "", approval: null, at: record.appended_at};
  }
  const t = state.turn;
  if (kind === "item.completed" && d.item_type === "agent_message" && typeof d.text === "string") {
    t.output = d.text;
  } else if (kind === "item.completed" && d.item_type === "command_execution") {
    t.command = `${d.command || "command"}: ${d.status || ""}`;
  } else if (kind === "approval.requested") {
    t.approval = d;
  } else if (kind === "approval.resolved" || kind === "approval.cancelled") {
    t.approval = null;
  } else if (/^turn\.(completed|failed|interrupted)$/.test(kind)) {
    t.state = kind.slice(5);
    t.error = d.error || "";
    t.approval = null;
  }
  renderTurn();
  if (kind.startsWith("turn.") || kind.startsWith("approval.")) refreshSoon();
}

function renderTurn() {
  const t = state.turn;
  $("turn-state").textContent = t ? t.state : "none yet";
  $("turn-state").className = t ? t.state : "muted";
  $("turn-info").textContent = t
    ? [`turn ${t.turn_id}`, t.at ? `started ${t.at}` : "", t.command || "",
       t.error ? `error: ${t.error}` : ""].filter(Boolean).join(" · ")
    : "Start one on a lease you hold (Actions below).";
  const ask = t && t.approval;
  $("turn-approval").hidden = !ask;
  $("turn-approval").textContent = ask
    ? `approval ${ask.approval_id} asked (${ask.approval_kind || "?"}` +
      `${ask.command ? `: ${ask.command}` : ""}) — answer it below (the approval id is filled in)` : "";
  $("turn-output").textContent = t ? t.output : "";
  $("turn-output").dataset.deltas = t ? t.deltas || 0 : 0;  // how many live deltas it was built from
  $("turn-output").scrollTop = $("turn-output").scrollHeight;
}

// The relay feed as a notification strip; every notice refreshes the overview.
function openFeed() {
  if (state.feed) state.feed.close();
  const source = new EventSource("/events?feed=relay");
  state.feed = source;
  const note = (e) => {
    let d = {};
    try { d = JSON.parse(e.data); } catch (err) { /* keep-alives carry none */ }
    const who = [d.session_id, d.holder, d.reason].filter(Boolean).join(" · ");
    const strip = $("feed");
    for (const placeholder of strip.querySelectorAll("em")) placeholder.remove();
    strip.prepend(el("span", {class: e.type.split(".")[0], title: e.data, text: `${e.type} ${who}`}));
    while (strip.children.length > FEED_KEEP) strip.lastChild.remove();
    refreshSoon();
  };
  for (const kind of state.feedKinds) source.addEventListener(kind, note);
}

function closeStreams() {
  for (const s of [...(state.live || []), state.feed]) if (s) s.close();
  state.live = null;
  state.feed = null;
}

// -- actions: one generated form per mutation RPC ------------------------------------

// What the page knows of the current context fills the fields of the same name.
function context() {
  const s = state.selected, l = s && s.lease;
  const running = state.turn && state.turn.state === "running" ? state.turn.turn_id : "";
  return {...state.seen, turn_id: s && s.turn ? s.turn.turn_id : running || state.seen.turn_id,
          session_id: s && s.session_id, profile: s && s.profile, holder: state.holder || (l && l.holder),
          lease_id: l && l.lease_id, fencing_token: l && l.fencing_token};
}

function currentRpc() { return state.rpcs.find((r) => r.name === $("rpc-select").value); }

function renderForm() {
  const rpc = currentRpc();
  if (!rpc) return;
  $("rpc-help").textContent = `${rpc.help} — python -m relay ${rpc.cli}`;
  const ctx = context();
  // A session implies its profile: naming both would ask for two things at once.
  if (rpc.fields.some((f) => f.name === "session_id")) delete ctx.profile;
  const form = $("rpc-form");
  form.replaceChildren(...rpc.fields.map((f) => fieldNode(f, ctx[f.name])),
    el("button", {type: "submit", class: rpc.destructive ? "danger" : "", text: rpc.name}));
}

function fieldNode(f, value) {
  const id = `f-${f.name}`;
  let input;
  if (f.choices) {
    input = el("select", {id, name: f.name},
      ...(f.required ? [] : [el("option", {value: "", text: "(default)"})]),
      ...f.choices.map((c) => el("option", {value: c, text: c})));
    const fallback = f.default !== undefined ? f.default : f.choices[0];
    input.value = value !== undefined && value !== null ? value : fallback;
  } else if (f.type === "boolean") {
    input = el("input", {id, name: f.name, type: "checkbox"});
    input.checked = Boolean(value !== undefined ? value : f.default);
  } else if (f.type === "json") {
    input = el("textarea", {id, name: f.name, rows: 2, placeholder: "any JSON value"});
  } else {
    input = el("input", {id, name: f.name, type: f.type === "integer" ? "number" : "text",
                         min: f.minimum !== undefined ? f.minimum : (f.type === "integer" ? 0 : null),
                         placeholder: placeholder(f)});
  }
  const given = value !== undefined && value !== null && value !== "";
  if (given && !f.choices && f.type !== "boolean") input.value = value;
  return el("div", {class: "field"},
    el("label", {for: id, text: f.name + (f.required ? " *" : "")}), input,
    f.help ? el("span", {class: "help muted", text: f.help}) : "",
    el("span", {class: "problem", id: `p-${f.name}`}));
}

function placeholder(f) {
  if (f.auto) return "generated";
  if (f.argv) return "words, space-separated";
  return f.default !== undefined && f.default !== "" ? `default ${f.default}` : "";
}

// Validate one field from its description; returns [value, problem].  An
// empty optional field is left out, so the relay's default applies.
function readField(f, node) {
  if (f.type === "boolean") return [node.checked, ""];
  const raw = node.value.trim();
  if (!raw) {
    if (f.auto === "request-id") return [requestId(), ""];
    return f.required ? [undefined, "required"] : [undefined, ""];
  }
  if (f.type === "integer") {
    if (!/^[0-9]+$/.test(raw)) return [undefined, "a whole number"];
    const n = Number(raw);
    if (f.minimum !== undefined && n < f.minimum) return [undefined, `at least ${f.minimum}`];
    return [n, ""];
  }
  if (f.type === "json") {
    try { return [JSON.parse(raw), ""]; } catch (err) { return [undefined, "not valid JSON"]; }
  }
  if (f.type === "array") return [raw.split(/\s+/), ""];
  if (f.choices && !f.choices.includes(raw)) return [undefined, `one of ${f.choices.join(", ")}`];
  if (f.pattern && !new RegExp(`^(?:${f.pattern})$`).test(raw)) {
    return [undefined, `not a valid ${f.id || "value"}: letters, digits, '.', '_' and '-'`];
  }
  if (f.length && (raw.length < f.length[0] || raw.length > f.length[1])) {
    return [undefined, `${f.length[0]} to ${f.length[1]} characters`];
  }
  return [raw, ""];
}

async function submitForm(event) {
  event.preventDefault();
  const rpc = currentRpc(), form = $("rpc-form"), body = {};
  let bad = false;
  for (const f of rpc.fields) {
    const [value, problem] = readField(f, form.elements[f.name]);
    $(`p-${f.name}`).textContent = problem;
    bad = bad || Boolean(problem);
    if (value !== undefined) body[f.name] = value;
  }
  if (bad) return;
  if (rpc.destructive && !confirm(`${rpc.name}: ${rpc.help}.\n\n${JSON.stringify(body)}\n\nGo ahead?`)) {
    $("rpc-result").replaceChildren(el("p", {class: "muted", text: `${rpc.name} not sent`}));
    return;
  }
  if (body.holder) state.holder = body.holder;
  const r = await callRpc(rpc, body);
  $("rpc-result").replaceChildren(r.ok
    ? el("div", {class: "ok", role: "status"}, el("strong", {text: `${rpc.name}: ${r.body.outcome || "ok"}`}),
         el("pre", {text: JSON.stringify(r.body, null, 1)}))
    : errorNode(r.body));
  if (r.ok) {
    await refresh();
    const sid = (r.body.lease || r.body.record || r.body.quarantine || r.body.session || r.body.turn ||
                 {}).session_id;
    const row = sid && state.overview.sessions.items.find((x) => x.session_id === sid);
    if (row && (!state.selected || state.selected.session_id !== sid)) select(row);
    else if (state.selected) { renderForm(); loadTimeline(); }
  }
}

// -- start ----------------------------------------------------------------------------

async function boot() {
  const r = await api("/api/relay/rpcs");
  if (!r.ok) { if (r.status !== 401) $("relay-info").replaceChildren(errorNode(r.body)); return; }
  state.rpcs = r.body.rpcs;
  state.feedKinds = r.body.feed_kinds;
  const picker = $("rpc-select");
  const keep = picker.value;
  picker.replaceChildren(...state.rpcs.filter((x) => x.kind === "mutation")
    .map((x) => el("option", {value: x.name, text: x.destructive ? `${x.name} ⚠` : x.name})));
  if (keep) picker.value = keep;
  $("login").hidden = true;
  if (!(await refresh())) return;
  $("app").hidden = false;
  renderForm();
  openFeed();
  const wanted = new URLSearchParams(location.hash.slice(1)).get("session");
  if (wanted) {
    const found = await api(`/api/relay/overview?q=${encodeURIComponent(wanted)}&limit=${PAGE_ROWS}`);
    const row = found.ok && found.body.sessions.items.find((x) => x.session_id === wanted);
    if (row) select(row);
  }
  document.body.dataset.readyMs = Math.round(performance.now());
  document.body.dataset.ready = "1";  // time to interactive is measured to here
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("rpc-select").addEventListener("change", () => { renderForm(); $("rpc-result").replaceChildren(); });
  $("rpc-form").addEventListener("submit", submitForm);
  $("window").addEventListener("change", () => { if (state.selected) loadTimeline(); });
  $("prev").addEventListener("click", () => {
    state.page.offset = Math.max(0, state.page.offset - PAGE_ROWS);
    refresh();
  });
  $("next").addEventListener("click", () => { state.page.offset += PAGE_ROWS; refresh(); });
  let typing = 0;
  $("filter").addEventListener("input", (e) => {
    clearTimeout(typing);
    typing = setTimeout(() => { state.page = {offset: 0, q: e.target.value}; refresh(); }, 200);
  });
  setInterval(tickTimes, 1000);
  setInterval(() => { if (!$("app").hidden && !document.hidden) refresh(); }, POLL_MS);
  boot();
});
'''


################################################################
# HTTP, SSE and WebSocket adapter (create_app)
################################################################

_CONNECT_PREFIX: Final = f"/{rc.SERVICE}/"


def _error_response(exc: RelayError, status: int | None = None,
                    headers: dict[str, str] | None = None) -> Any:
    """The Connect error body (always JSON, whatever the request's codec)."""
    from quart import Response

    headers = dict(headers or {})
    if exc.code is rc.Code.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="flow-relay"'  # RFC 6750
    return Response(json.dumps(_connect_error_json(exc)), status=status or exc.code.http_status,
                    content_type="application/json", headers=headers)


def _connect_error_json(exc: RelayError) -> dict[str, Any]:
    """``exc.to_json()`` (code, message, hint) plus Connect's ``details``: the
    hint again as a google.rpc.LocalizedMessage, where Connect clients
    surface it (``ConnectError.details``; ``buf curl`` prints it)."""
    import base64

    body = exc.to_json()
    if exc.hint:
        from google.rpc import error_details_pb2

        detail = error_details_pb2.LocalizedMessage(locale=_HINT_LOCALE, message=exc.hint)
        body["details"] = [{
            "type": detail.DESCRIPTOR.full_name,
            "value": base64.b64encode(detail.SerializeToString()).decode().rstrip("="),
            "debug": {"locale": _HINT_LOCALE, "message": exc.hint},
        }]
    return body


@attrs.frozen
class _HttpRefusal(Exception):
    """A RelayError that needs an HTTP status or headers of its own (413, 415,
    405 + Allow, unknown Content-Encoding + Accept-Encoding)."""

    error: RelayError
    status: int
    headers: dict[str, str] = attrs.field(factory=dict)


_HINT_LOCALE: Final = "en-US"
#: Connect codecs by media type (lower case, parameters stripped).
_CODECS: Final = {"application/json": "json", "application/proto": "proto"}
_ACCEPT_POST: Final = "application/json, application/proto"
#: Content-Encodings the relay reads, in the order it prefers to answer in.
_ENCODINGS: Final = ("gzip", "identity")
#: A reply smaller than this is sent uncompressed even to a gzip client.
_COMPRESS_MIN_BYTES: Final = 1 * KIB
_GZIP_LEVEL: Final = 6  # zlib's default: most of level 9's ratio at a fraction of its cost


def _media_type(header: str) -> tuple[str, dict[str, str]]:
    """``Application/JSON; Charset=UTF-8`` -> ``("application/json", {"charset": "utf-8"})``:
    media types and parameter names are case-insensitive (RFC 9110 8.3.1)."""
    kind, *params = header.split(";")
    parsed = {}
    for param in params:
        name, _, value = param.partition("=")
        parsed[name.strip().lower()] = value.strip().strip('"').lower()
    return kind.strip().lower(), parsed


def _unary_codec(content_type: str) -> str:
    kind, params = _media_type(content_type)
    codec = _CODECS.get(kind)
    charset = params.get("charset", "utf-8")
    if codec is None or (codec == "json" and charset not in ("utf-8", "utf8")) or \
            (codec == "proto" and "charset" in params):
        raise _HttpRefusal(InvalidArgument(
            f"content type {content_type or '(none)'} is not supported",
            hint=f"send one of: {_ACCEPT_POST}"), 415, {"Accept-Post": _ACCEPT_POST})
    return codec


def _decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Undo a request's Content-Encoding, refusing more than ``limit`` bytes of
    output (the body limit is on what the relay would parse: a 1 KiB gzip bomb
    is stopped after ``limit + 1`` bytes, never inflated whole)."""
    name = encoding.strip().lower() or "identity"
    if name not in _ENCODINGS:
        raise _HttpRefusal(rc.Unimplemented(
            f"Content-Encoding {encoding!r} is not supported",
            hint=f"send one of: {', '.join(_ENCODINGS)}"),
            rc.Code.UNIMPLEMENTED.http_status, {"Accept-Encoding": ", ".join(_ENCODINGS)})
    if name == "identity":
        out = data
    else:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise InvalidArgument(f"request body is not valid gzip: {exc}") from None
        if len(out) <= limit and (not inflater.eof or inflater.unused_data):
            raise InvalidArgument("request body is not one complete gzip stream",
                                  hint="send the whole body, compressed once")
    if len(out) > limit:
        raise _body_too_large(limit)
    return out


def _body_too_large(limit: int) -> _HttpRefusal:
    return _HttpRefusal(rc.ResourceExhausted(
        f"request body is over {limit} bytes (decompressed)",
        hint="send a smaller body, or raise [serve] max_body_bytes in flow/relay.toml"), 413)


def _accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding value allows gzip (``gzip;q=0`` does not)."""
    for item in header.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().lower().removeprefix("q=")
            try:
                return not params.strip() or float(q) > 0
            except ValueError:
                return False
    return False


def _unary_response(rpc: rc.Rpc, codec: str, reply: dict[str, Any], accept_encoding: str) -> Any:
    import gzip

    from quart import Response

    if codec == "proto":
        data = rc.json_to_proto(rpc.response.__name__, reply)
    else:
        data = json.dumps(reply).encode()
    headers = {"Vary": "Accept-Encoding"}
    if len(data) >= _COMPRESS_MIN_BYTES and _accepts_gzip(accept_encoding):
        data = gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return Response(data, status=200, content_type=f"application/{codec}", headers=headers)


def _get_form(query: bytes) -> tuple[str, bytes, str]:
    """Connect's GET form ``?message=...&encoding=json|proto[&base64=1]
    [&compression=gzip][&connect=v1]`` -> (codec, message bytes, encoding).
    The query is split by hand on bytes: a proto message sent without base64
    is binary, which a text query parser would mangle."""
    import base64

    from urllib.parse import parse_qsl

    args = {k: v.encode("latin-1") for k, v in
            parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")}
    if args.get("connect", b"v1") != b"v1":
        raise InvalidArgument(f"connect={args['connect'].decode('latin-1')!r} is not a "
                              "protocol version this relay speaks; send connect=v1")
    codec = {b"json": "json", b"proto": "proto"}.get(args.get("encoding", b""))
    if codec is None:
        raise _HttpRefusal(InvalidArgument(
            "a GET call needs encoding=json or encoding=proto",
            hint="see specs/flow-relay-contract.md, Codecs and compression"), 415)
    if "message" not in args:
        raise InvalidArgument("a GET call needs the request in ?message=")
    message = args["message"]
    if args.get("base64") == b"1":
        try:
            message = base64.b64decode(message + b"=" * (-len(message) % 4), altchars=b"-_",
                                       validate=True)
        except ValueError:
            raise InvalidArgument("message is not valid base64url") from None
    return codec, message, args.get("compression", b"identity").decode("latin-1")


def _load_codecs() -> None:
    """Import the protobuf runtime and build relay.proto's classes (~0.1 s,
    once) before the first binary call or hinted error would stall the event
    loop on it.  Called in a worker thread before the server accepts."""
    from google.rpc import error_details_pb2  # noqa: F401

    rc.proto_class("GetStatusRequest")


def _decode_unary(rpc: rc.Rpc, codec: str, raw: bytes) -> Any:
    if codec == "proto":
        return rc.proto_to_json(rpc.request.__name__, raw)
    try:
        return _parse_json(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}") from None


def _json_response(body: bytes | dict[str, Any]) -> Any:
    from quart import Response

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Response(data, status=200, content_type="application/json")


def create_app(service: Service) -> Any:
    """The quart-trio app: thin routes over ``Service``, each group installed
    by its own function below."""
    from quart_trio import QuartTrio

    app = QuartTrio("relay")
    app.config["MAX_CONTENT_LENGTH"] = service.config.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 30
    for install in (_install_guards, _install_error_handlers, _install_login,
                    _install_rpc_routes, _install_streams, _install_operations, _add_dashboard):
        install(app, service)
    return app


def _install_guards(app: Any, service: Service) -> None:
    """Authentication before every route but /health and /auth/, and the
    request counter after each."""
    from quart import request, websocket

    def refusal(conn: Any) -> Any:
        if not service.token_required() or service.authorized(  # no cookie parsing when open
                conn.headers.get("Authorization"), conn.cookies.get(_session_cookie(conn.scope))):
            return None
        return _error_response(rc.Unauthenticated("missing or invalid bearer token",
                                                  hint=_LOGIN_HINT))

    @app.before_request
    async def check_auth() -> Any:
        if request.path == "/health" or request.path.startswith("/auth/"):
            return None
        return refusal(request)

    @app.before_websocket
    async def check_ws_auth() -> Any:
        return refusal(websocket)

    counters: dict[tuple[str, int], Any] = {}  # (route, status) -> its labelled counter

    @app.after_request
    async def count(response: Any) -> Any:
        rule = request.url_rule
        key = (rule.rule if rule is not None else "unmatched", response.status_code)
        counter = counters.get(key)
        if counter is None:
            counter = counters[key] = service.metrics.requests.labels(key[0], str(key[1]))
        counter.inc()
        return response


def _install_error_handlers(app: Any, service: Service) -> None:
    """Every refusal as a Connect error body; an unexpected one as ``internal``
    (its traceback logged, never sent)."""
    from quart import request
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(RelayError)
    async def relay_error(exc: RelayError) -> Any:
        return _error_response(exc)

    @app.errorhandler(_HttpRefusal)
    async def http_refusal(exc: _HttpRefusal) -> Any:
        return _error_response(exc.error, exc.status, exc.headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        return _http_error_response(exc, request, service.config.max_body_bytes)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Any:
        _logger("serve").error("internal error on %s", request.path, exc_info=exc)
        return _error_response(Internal("the relay hit an internal error; see its log"))


def _http_error_response(exc: Any, request: Any, max_body_bytes: int) -> Any:
    """werkzeug's HTTP errors (413, 404, 405, ...) as Connect errors."""
    if exc.code == 413:
        refusal = _body_too_large(max_body_bytes)
        return _error_response(refusal.error, refusal.status)
    if exc.code == 404:
        return _error_response(NotFound(f"no route {request.path}",
                                        hint="see specs/flow-relay-contract.md"))
    if exc.code == 405:
        allowed = sorted(getattr(exc, "valid_methods", None) or ())
        return _error_response(InvalidArgument(
            f"{request.method} is not allowed on {request.path}",
            hint=f"use {' or '.join(allowed) or 'another method'}"), 405,
            {"Allow": ", ".join(allowed)} if allowed else None)
    return _error_response(InvalidArgument(exc.description or "bad request"), exc.code)


def _install_login(app: Any, service: Service) -> None:
    """The browser login: ``POST /auth/session`` sets the cookie, logout ends it."""
    from quart import request

    @app.post("/auth/session")
    async def login() -> Any:
        raw = _bearer(request.headers.get("Authorization"))
        if raw is None:
            raw = _login_body(await request.get_data())
        if not raw and not service.token_required():
            return _json_response({"token_required": False})
        value, token_id, expires = service.open_session(raw or "")
        response = _json_response({"token_required": True, "token_id": token_id,
                                   "expires_at": iso(expires)})
        response.set_cookie(_session_cookie(request.scope), value, max_age=SESSION_COOKIE_SECONDS,
                            path="/", secure=request.scheme == "https", httponly=True,
                            samesite="Strict")
        return response

    @app.route("/auth/session", methods=["DELETE"])
    @app.post("/auth/logout")
    async def logout() -> Any:
        name = _session_cookie(request.scope)
        if value := request.cookies.get(name):
            service.log_out(value)
        response = _json_response({"logged_out": True})
        response.delete_cookie(name, path="/", secure=request.scheme == "https", httponly=True,
                               samesite="Strict")
        return response


def _install_rpc_routes(app: Any, service: Service) -> None:
    """The rows of ``rc.RPCS``: every one at its Connect path (POST, and GET for
    reads), and each read that names a ``get`` route at ``/api/relay/<get>``."""
    from quart import request

    @app.get("/api/relay/<name>")
    async def api_read(name: str) -> Any:
        rpc = rc.RPC_BY_GET.get(name)
        if rpc is None:
            raise NotFound(f"no route {request.path}", hint="see specs/flow-relay-contract.md")
        if rpc.name == "GetStatus" and not request.query_string:
            # The most polled read: its bytes are cached already (status_json).
            return _json_response(await service.status_json())
        return _json_response(await service.call_json(rpc.name, _query_body(rpc, request.args)))

    @app.route(f"{_CONNECT_PREFIX}<method>", methods=["GET", "POST"])
    async def connect_unary(method: str) -> Any:
        rpc = rc.RPC_BY_NAME.get(method)
        if rpc is None:
            raise rc.Unimplemented(f"no RPC named {method!r}",
                                   hint="see specs/relay.proto for the methods")
        codec, body = await _connect_request(rpc, request, service.config.max_body_bytes)
        timeout = request.headers.get("Connect-Timeout-Ms")
        with trio.move_on_after(_connect_deadline(timeout)) as scope:
            reply = await service.call_json(method, body)
        if scope.cancelled_caught:
            raise rc.DeadlineExceeded(f"{method} did not finish within {timeout} ms")
        return _unary_response(rpc, codec, reply, request.headers.get("Accept-Encoding", ""))


async def _connect_request(rpc: rc.Rpc, request: Any, limit: int) -> tuple[str, Any]:
    """(codec, request JSON) of a Connect unary call: a POST body, or (reads
    only) Connect's GET form.  Quart routes HEAD here too: it must be as safe."""
    if request.method in ("GET", "HEAD"):
        if rpc.mutates:  # only NO_SIDE_EFFECTS RPCs have Connect's GET form
            raise _HttpRefusal(InvalidArgument(
                f"{rpc.name} changes the ledger, so it takes POST only"), 405, {"Allow": "POST"})
        codec, raw, encoding = _get_form(request.query_string)
    else:
        codec = _unary_codec(request.headers.get("Content-Type", ""))
        raw, encoding = await request.get_data(), request.headers.get("Content-Encoding", "")
    return codec, _decode_unary(rpc, codec, _decompress(raw, encoding, limit))


def _connect_deadline(timeout: str | None) -> float:
    """Seconds from a ``Connect-Timeout-Ms`` header (none: no deadline)."""
    if timeout is None:
        return math.inf
    if not re.fullmatch(r"[0-9]{1,10}", timeout):
        raise InvalidArgument(f"Connect-Timeout-Ms {timeout!r} is not a number of milliseconds")
    return int(timeout) / 1000


def _install_streams(app: Any, service: Service) -> None:
    """The record and relay streams: SSE at /events, and the WebSocket channel."""
    from quart import Response, request, websocket

    @app.get("/events")
    async def sse() -> Any:
        # The row by ?stream= / ?feed=; its request from the query (the header
        # wins for the id, as a browser's EventSource sends it).
        rpc = rc.watch_rpc(request.args)
        query = dict(request.args.items())
        if last_id := request.headers.get("Last-Event-ID"):
            query["last_event_id"] = last_id
        sub, frames, last = await getattr(service, rpc.method)(rpc.request_from_parameters(query))
        body = _sse_body(service, sub, frames, last, request.scope.get("extensions", {}).get(_SERVER_SEND),
                         request.scope)
        return Response(body, status=200, content_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        texts = _ws_text_sender(websocket.scope.get("extensions", {}).get(_SERVER_SEND))
        await service.websocket(websocket.receive, websocket.send, texts)


def _install_operations(app: Any, service: Service) -> None:
    """What an operator's tools read: /health (no token) and /metrics."""
    from quart import Response, request

    @app.get("/health")
    async def health() -> Any:
        return _json_response({"status": "ok"})

    @app.get("/api/relay/runtime")
    async def runtime_view() -> Any:
        """The live runtime: each profile's provider health and each process."""
        if service.runtime is None:
            raise Unavailable("this server does not run the live runtime",
                              hint="start the relay with `python -m relay serve`")
        service.owner.check_intact()
        return _json_response(service.runtime.runtime_doc())

    @app.get("/metrics")
    async def metrics() -> Any:
        stamp = iso(service.now())
        service.metrics.active_leases.set(sum(
            1 for x in service.owner.ledger.leases.values() if x.state == "active" and is_live(x, stamp)))
        body, content_type = service.metrics.render(request.headers.get("Accept", ""))
        return Response(body, status=200, content_type=content_type, headers={"Vary": "Accept"})


_LOGIN_HINT: Final = ("send Authorization: Bearer <token>; a browser logs in once with "
                      "POST /auth/session and its cookie does the rest")


def _login_body(raw: bytes) -> str:
    """The token of a login body ``{"token": "..."}`` ("" when there is none)."""
    if not raw.strip():
        return ""
    try:
        body = _parse_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"login body is not valid JSON: {exc}",
                              hint='send {"token": "..."} or an Authorization header') from None
    if not isinstance(body, dict) or set(body) - {"token"} or not isinstance(body.get("token", ""), str):
        raise InvalidArgument('a login body is {"token": "<bearer token>"}',
                              hint="or send Authorization: Bearer <token> and no body")
    return body.get("token", "")


def _session_cookie(scope: dict[str, Any]) -> str:
    """The login cookie's name: cookies ignore ports, so two relays on one
    host would overwrite each other's under one name."""
    server = scope.get("server")
    return f"relay_session_{server[1]}" if server else "relay_session"


def _query_body(rpc: rc.Rpc, args: Any) -> dict[str, Any]:
    """A read route's query parameters -> its request JSON; the parameters
    are the request's CLI flags (``?session=`` sets ``session_id``)."""
    params = rpc.query
    unknown = set(args) - set(params)
    if unknown:
        raise InvalidArgument(f"unknown query parameter {sorted(unknown)[0]!r}",
                              hint=f"known: {', '.join(params) or '(none)'}")
    integers = {f.name for f in attrs.fields(rpc.request) if f.type in (int, "int")}
    body: dict[str, Any] = {}
    for name, field in params.items():
        if name in args:
            value = args[name]
            if field in integers:
                try:
                    value = rc.parse_digits(value)
                except ValueError:
                    raise InvalidArgument(f"{name} must be a whole number (ASCII digits 0-9), "
                                          f"not {value!r}") from None
            body[field] = value
    return body


async def _next_frames(sub: Subscriber, keepalive: float) -> list[Frame] | bytes | None:
    """Every frame queued for ``sub`` (waiting for the first), a keep-alive
    comment after ``keepalive`` idle seconds, or None once the subscription
    has ended.  One wait (and one cancel scope) per batch, not per frame, and
    the caller writes the batch as one body chunk."""
    with trio.move_on_after(keepalive):
        try:
            frames = [await sub.receive.receive()]
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None
        while True:
            try:
                frames.append(sub.receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return frames  # an ended channel says so again on the next call
    return _SSE_KEEPALIVE


_SSE_KEEPALIVE: Final = b": keep-alive\n\n"


def _sse_last_frame(sub: Subscriber) -> Frame | None:
    """What an ended subscription says last: the hub's farewell, or (dropped
    for falling behind) an error with no id, so a browser keeps its place."""
    if sub.farewell is not None:
        return sub.farewell
    if sub.dropped:
        return error_frame("resource_exhausted", "subscriber fell behind; reconnect with Last-Event-ID")
    return None


async def _sse_body(service: Service, sub: Subscriber, frames: Any, last: dict[str, int],
                    send: Any = None, scope: dict[str, Any] | None = None):
    """The SSE response body: replayed frames, then live ones.  Only refusals
    that arise mid-stream (a log that cannot be read, a subscriber that fell
    behind) are error events, and they carry no id.  Live frames go straight
    to the socket when the connection allows it (``_DirectSse``; ``send`` is
    the server's own ASGI send), else through ASGI, a batch per body chunk."""
    service.metrics.subscribers.labels("sse").inc()
    try:
        yield f"retry: {SSE_RETRY_MS}\n: connected\n\n".encode()
        replay = Replay.of(frames)
        while chunk := await replay.take():  # one write per chunk, not one per frame
            yield b"".join(frame.sse for frame in chunk)
        if replay.failed:
            return
        frames = replay = chunk = None  # not kept for the life of the stream
        # The head and every chunk above are on the wire (ASGI's send returned),
        # so from here this task and the hub are the connection's only writers.
        sock = _h11_socket(send, scope or {})
        if sock is not None:
            sink = _DirectSse.attach(sub, sock, service.hub, last, service.hub.buffer)
            await sink.run(service.config.sse_keepalive_seconds)
            return
        while True:
            item = await _next_frames(sub, service.config.sse_keepalive_seconds)
            if item is None:
                if (frame := _sse_last_frame(sub)) is not None:
                    yield frame.sse
                return
            if isinstance(item, bytes):
                yield item
            elif data := b"".join(f.sse for f in item if not replayed(f, last)):
                yield data
    finally:
        service.metrics.subscribers.labels("sse").dec()
        service.hub.unsubscribe(sub)


# -- SSE by direct writes -------------------------------------------------------------

#: The scope extension under which the outermost ASGI wrapper (``_close_after_response``)
#: puts the server's own send: the SSE route's way to its connection.
_SERVER_SEND: Final = "relay.server_send"

#
# Through ASGI each live frame costs every subscriber a task switch, a cancel
# scope and the whole quart -> hypercorn -> h11 -> trio send path (about 80 us of
# CPU per subscriber per frame: 80 ms per publish to 1,000).  Once an SSE
# response's head and replay are on the wire, nothing else writes to its
# connection until the body ends, and an HTTP/1.1 chunk is a length line, the
# bytes and CRLF.  So the hub hands each frame, encoded and framed once
# (``Frame.chunk``), to every subscriber's socket itself: a non-blocking
# ``write`` in the publishing task, no task switch.  What a socket does not
# take is held, in order, and the subscriber's own task waits until the
# socket is writable and sends it; frames arriving meanwhile queue behind it.
# The task also sends keep-alives and the last frame, and when it returns
# quart ends the body through hypercorn as usual (h11's ``0\r\n\r\n``), so
# hypercorn's and h11's state stay right.  Only a plain-TCP HTTP/1.1 GET with a
# chunked body qualifies (``_h11_socket``); anything else (HTTP/1.0, TLS,
# HTTP/2, another ASGI server) keeps the ASGI path.  See specs/
# flow-relay-contract.md, "SSE fan-out by direct writes".


def _h11_socket(send: Any, scope: dict[str, Any]) -> Any:
    """The trio socket under this response, when its head is sent, its body
    is chunked and the connection is plain TCP served by hypercorn's h11
    protocol; None otherwise.  ``send`` is hypercorn's ``HTTPStream.app_send``:
    its bound-method chain leads to the H11Protocol and the TCPServer (their
    attributes in hypercorn 0.18; any change there falls back to ASGI)."""
    if send is None or scope.get("method") != "GET" or scope.get("http_version") != "1.1":
        return None
    import h11

    try:
        http_stream = send.__self__  # hypercorn.protocol.http_stream.HTTPStream
        protocol = http_stream.send.__self__  # hypercorn.protocol.h11.H11Protocol
        server = protocol.send.__self__  # hypercorn.trio.tcp_server.TCPServer
        connection, stream, lock = protocol.connection, server.stream, server.send_lock
        writer, closed = connection._writer, http_stream.closed
    except AttributeError:
        return None
    if (type(connection) is not h11.Connection or connection.our_state is not h11.SEND_BODY
            or type(writer).__name__ != "ChunkedWriter" or type(stream) is not trio.SocketStream
            or lock.locked() or closed):
        return None
    return stream.socket


def _ws_text_sender(send: Any) -> Callable[[list[str]], Any] | None:
    """A function that sends several text frames with one socket write, for
    hypercorn's WebSocket stream under this connection (``send`` is its
    ``WSStream.app_send``); None for anything else (then each frame goes
    through ASGI).  It does what ``app_send`` does for one
    ``websocket.send``: nothing once the stream is closed, the wsproto
    encoding of each message, one ``Data`` event to the protocol."""
    try:
        stream = send.__self__  # hypercorn.protocol.ws_stream.WSStream
        connection, stream_send, stream_id = stream.connection, stream.send, stream.stream_id
    except AttributeError:
        return None
    from hypercorn.protocol.events import Data
    from hypercorn.protocol.ws_stream import ASGIWebsocketState
    from wsproto.events import TextMessage
    from wsproto.utilities import LocalProtocolError

    if type(stream).__name__ != "WSStream" or stream.state != ASGIWebsocketState.CONNECTED:
        return None

    async def send_texts(texts: list[str]) -> None:
        if stream.closed:
            return
        if stream.state != ASGIWebsocketState.CONNECTED:  # closing: ASGI says what is allowed
            for text in texts:
                await send({"type": "websocket.send", "bytes": None, "text": text})
            return
        try:
            data = b"".join([connection.send(TextMessage(data=text)) for text in texts])
        except LocalProtocolError:  # the connection is closing (as ``_send_wsproto_event``)
            return
        await stream_send(Data(stream_id=stream_id, data=data))

    return send_texts



@attrs.define(eq=False, slots=True)  # one per open stream: slotted (built at import), less memory
class _DirectSse:
    """A live SSE subscription whose frames the hub writes to its socket
    (``Subscriber.push`` is ``offer``); its task only flushes what the socket
    did not take, sends keep-alives and ends the stream.  Once attached it is
    also the subscriber's ``send`` (the hub ``close``s it to end the stream),
    and its task parks on itself: the subscriber's channel is let go."""

    sub: Subscriber
    sock: Any
    hub: EventHub
    last: dict[str, int]
    limit: int
    #: HTTP chunks the socket did not take yet, oldest first (the first may be
    #: the rest of a partly written one).
    pending: list[bytes] = attrs.Factory(list)
    burst: int = 0  # frames offered in hub tick ``epoch``
    epoch: int = -1
    sent_at: float = 0.0
    broken: bool = False
    ended: bool = False  # the hub ended the subscription
    _parked: Any = None  # the task waiting in ``_wait``
    #: The topic's ``FanOut`` while this subscriber is in it (its socket holds
    #: nothing, so the hub writes every frame straight to it); None meanwhile.
    fanout: FanOut | None = None

    @classmethod
    def attach(cls, sub: Subscriber, sock: Any, hub: EventHub, last: dict[str, int],
               limit: int) -> _DirectSse:
        """Take over ``sub``: first what queued in its channel during the
        replay, then (with no checkpoint in between) every live frame."""
        sink = cls(sub, sock, hub, last, limit, sent_at=trio.current_time())
        backlog = []
        while True:
            try:
                frame = sub.receive.receive_nowait()
            except trio.WouldBlock:
                break
            except (trio.EndOfChannel, trio.ClosedResourceError):
                sink.ended = True
                break
            if not replayed(frame, last):
                backlog.append(frame.chunk)
        if not sink.ended:  # still subscribed: from now on the hub writes
            sub.send.close()
            sub.push, sub.send, sub.receive, sub.direct = sink.offer, sink, None, True
        with contextlib.suppress(trio.BrokenResourceError):
            if backlog:
                sink.write(b"".join(backlog))
        sink._join()
        return sink

    def _join(self) -> None:
        """Into the topic's ``FanOut``, once the socket holds nothing of ours.
        The hub writes to trio's own standard-library socket (``_sock``):
        once closed, its ``send`` fails (EBADF) rather than reaching whatever
        connection reuses the descriptor number."""
        wire = getattr(self.sock, "_sock", None)
        if self.fanout is not None or wire is None or self.pending or self.broken or self.ended:
            return
        handed = self.burst if self.epoch == self.hub.tick else 0
        self.fanout = self.hub.join_fast(self.sub, wire, self.fell_back, handed, self.last)

    def _leave(self) -> None:
        """Out of the ``FanOut`` before this task writes to the socket itself."""
        if self.fanout is not None:
            self._resume(self.hub.leave_fast(self.sub))

    def _resume(self, handed: int) -> None:
        """Frames one by one again (``offer``), ``handed`` of them this tick."""
        fast, self.fanout = self.fanout, None
        self.sent_at = max(self.sent_at, fast.sent_at) if fast is not None else self.sent_at
        self.hub.next_tick()  # ``epoch`` is this tick, which ends with this turn
        self.epoch, self.burst = self.hub.tick, handed

    def fell_back(self, rest: bytes | None, handed: int) -> None:
        """The hub's ``FanOut`` write left ``rest`` of a frame unsent (None:
        the connection is gone): hold it, take frames one by one, and wake the
        task to flush it."""
        self._resume(handed)
        if rest is None:
            self.broken = True
        else:
            self.pending.append(rest)
        self._wake()

    def _last_sent(self) -> float:
        fast = self.fanout
        return self.sent_at if fast is None else max(self.sent_at, fast.sent_at)

    def close(self) -> None:
        """``EventHub.unsubscribe``: the subscription is over (out of any ``FanOut`` too)."""
        self.ended, self.fanout = True, None
        self._wake()

    def send_nowait(self, value: Any) -> None:  # pragma: no cover - the hub pushes via offer
        self._wake()

    def offer(self, frame: Frame) -> None:
        """``Subscriber.push``: write ``frame`` now, or queue it behind what
        the socket has not taken.  trio.WouldBlock once more than ``limit``
        frames are offered in one tick of the hub or held unsent (fallen
        behind); trio.BrokenResourceError when the connection is gone.  This
        runs once per subscriber per frame, so it does as little as it can."""
        if self.last and replayed(frame, self.last):
            return
        hub = self.hub
        if self.epoch != hub.tick:  # the first frame of this tick
            self.epoch, self.burst = hub.tick, 0
            self.sent_at = hub.next_tick()
        self.burst += 1
        if self.burst > self.limit:
            raise trio.WouldBlock
        if self.pending:
            if len(self.pending) >= self.limit:
                raise trio.WouldBlock
            self.pending.append(frame.chunk)
            return
        self._send(frame.chunk)

    def write(self, chunk: bytes) -> None:
        """Write ``chunk`` (already framed), or hold it behind what is held."""
        self.sent_at = trio.current_time()
        if self.pending:
            self.pending.append(chunk)
        else:
            self._send(chunk)

    def _send(self, chunk: bytes) -> None:
        try:
            sent = os.write(self.sock.fileno(), chunk)  # the socket is non-blocking (trio's)
        except BlockingIOError:
            sent = 0
        except OSError:  # reset, broken pipe, or closed (fileno -1: EBADF)
            self.broken = True
            self._wake()
            raise trio.BrokenResourceError("the SSE connection is gone") from None
        if sent < len(chunk):
            self.pending.append(chunk[sent:])
            self._wake()  # the task flushes it

    def _wake(self) -> None:
        if self._parked is not None:
            task, self._parked = self._parked, None
            trio.lowlevel.reschedule(task)

    async def _wait(self) -> None:
        """Park until ``_wake`` (cancellable: a deadline, a disconnect)."""
        self._parked = trio.lowlevel.current_task()

        def abort(_: Any) -> Any:
            self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def flush(self) -> None:
        """Send what is held, waiting for the socket to drain."""
        while self.pending and not self.broken:
            try:
                await trio.lowlevel.wait_writable(self.sock)
                sent = os.write(self.sock.fileno(), self.pending[0])
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError, trio.BusyResourceError):
                self.broken = True
                return
            if sent < len(self.pending[0]):
                self.pending[0] = self.pending[0][sent:]
            else:
                del self.pending[0]

    async def run(self, keepalive: float) -> None:
        """Until the subscription ends: flush when woken, keep-alive when idle;
        then flush, write the last frame (farewell or fallen behind) and return."""
        while not (self.broken or self.ended):
            if not self.pending:  # no checkpoint between this test and parking
                with trio.move_on_at(self._last_sent() + keepalive) as idle:
                    await self._wait()
                if (idle.cancelled_caught and not self.ended
                        and trio.current_time() >= self._last_sent() + keepalive):
                    self._leave()  # the hub must not write while this task does
                    with contextlib.suppress(trio.BrokenResourceError):
                        self.write(http_chunk(_SSE_KEEPALIVE))
            await self.flush()
            self._join()  # caught up (no checkpoint since the last write): the hub writes again
        self._leave()
        await self.flush()
        frame = _sse_last_frame(self.sub)
        if frame is not None and not self.broken:
            with contextlib.suppress(trio.BrokenResourceError):
                self.write(frame.chunk)
            await self.flush()


# -- the browser door: Host, Origin and CORS -------------------------------------
#
# A loopback relay takes no token, and a browser will send any web page's
# requests to 127.0.0.1 (or, after DNS rebinding, to "evil.example" that now
# resolves there).  So before any route runs, every request but /health must
# name this relay in its Host header, and a request from a browser page
# (Origin, or Fetch Metadata saying another site) must come from the relay's
# own origin or one the operator listed.  Clients that are not browsers send
# no Origin and are unaffected.  Only listed origins get CORS headers.

#: What a preflight allows: the methods of the routes, the headers Connect
#: clients (connect-es and others), SSE and the login send.
_CORS_METHODS: Final = "GET, POST, DELETE"
_CORS_HEADERS: Final = ("Authorization, Content-Type, Content-Encoding, Accept-Encoding, "
                        "Connect-Protocol-Version, Connect-Timeout-Ms, Connect-Content-Encoding, "
                        "Connect-Accept-Encoding, Last-Event-ID, Grpc-Timeout, X-Grpc-Web, X-User-Agent")
_CORS_EXPOSE: Final = ("Content-Encoding, Connect-Content-Encoding, Connect-Accept-Encoding, "
                       "WWW-Authenticate, Retry-After, Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin")
_CORS_MAX_AGE_SECONDS: Final = 2 * HOURS
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
#: Query parameters that would put a credential in a URL (logs, history): refused.
_URL_CREDENTIALS: Final = frozenset({"token", "access_token", "bearer", "authorization", "auth",
                                     "api_key"})


def _split_host(text: str) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6][:port]`` -> (lower-case name, port); None if malformed."""
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]/@\s]+)(?::([0-9]{1,5}))?", text.strip().lower())
    if match is None:
        return None
    return match[1].strip("[]"), int(match[2]) if match[2] else None


def _same_ip(name: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(ip)
    except ValueError:
        return False


@functools.lru_cache(maxsize=1024)  # pure, and asked on every request with the same few values
def host_allowed(host: str, server: tuple[str, int] | None, scheme: str,
                 allowed_hosts: frozenset[str]) -> bool:
    """Whether a Host header names the address this connection arrived on
    (``localhost`` too when that is loopback) or a listed name: ``name`` takes
    any port, ``name:port`` only that one."""
    parsed = _split_host(host)
    if parsed is None:
        return False
    name, port = parsed
    if name in allowed_hosts or host.strip().lower() in allowed_hosts:
        return True
    if server is None or (port or _DEFAULT_PORTS.get(scheme)) != server[1]:
        return False
    if name == "localhost":
        return _same_ip("127.0.0.1", server[0]) or _same_ip("::1", server[0])
    return _same_ip(name, server[0])


@functools.lru_cache(maxsize=1024)
def origin_allowed(origin: str, scheme: str, host: str, allowed_origins: frozenset[str]) -> bool:
    """Whether a (browser's) Origin is the relay's own -- the scheme and the
    Host it was reached by -- or listed.  ``null`` (sandboxes, files) is neither."""
    origin = origin.strip().lower()
    if origin in allowed_origins:
        return True
    match = re.fullmatch(r"(https?)://(.+)", origin)
    own, theirs = _split_host(host), _split_host(match[2]) if match else None
    if match is None or match[1] != scheme or own is None or theirs is None:
        return False
    default = _DEFAULT_PORTS[scheme]
    return (theirs[0], theirs[1] or default) == (own[0], own[1] or default)


def browser_refusal(scope: dict[str, Any], config: Config) -> RelayError | None:
    """Why this request may not reach the relay's routes, or None."""
    headers: dict[str, list[str]] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    scheme = {"ws": "http", "wss": "https"}.get(scope["scheme"], scope["scheme"])
    hosts = headers.get("host", [])
    # An absolute-form target (``GET http://evil.example/ HTTP/1.1``) names a
    # host itself, which RFC 9112 3.2.2 puts above Host: it must pass as well.
    absolute = re.fullmatch(rb"[a-z][a-z0-9+.-]*://([^/?#]*).*", scope.get("raw_path") or b"/",
                            re.IGNORECASE | re.DOTALL)
    named = hosts + ([absolute[1].decode("latin-1")] if absolute is not None else [])
    refused = next((h for h in named if not host_allowed(
        h, scope.get("server"), scheme, frozenset(config.allowed_hosts))), None)
    if len(hosts) != 1 or refused is not None:
        shown = refused if len(hosts) == 1 else f"{len(hosts)} Host headers"
        return rc.PermissionDenied(
            f"Host {shown!r} is not an address this relay serves",
            hint="connect to the address `python -m relay serve` printed, or list the name "
                 "in flow/relay.toml [serve] allowed_hosts")
    origins = headers.get("origin", [])
    if len(origins) > 1 or (origins and not origin_allowed(
            origins[0], scheme, hosts[0], frozenset(config.allowed_origins))):
        return rc.PermissionDenied(
            f"a web page from {origins[0]!r} may not drive this relay",
            hint="open the page from the relay's own origin, or list a trusted origin in "
                 "flow/relay.toml [serve] allowed_origins")
    if not origins and any(v.strip().lower() in ("cross-site", "same-site")
                           for v in headers.get("sec-fetch-site", ())):
        return rc.PermissionDenied("a request from another site's page may not drive this relay",
                                   hint="open the page from the relay's own origin")
    if not scope.get("query_string"):
        return None
    import urllib.parse

    query = urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                   keep_blank_values=True)
    if any(name.lower() in _URL_CREDENTIALS for name, _ in query):
        return InvalidArgument("credentials are never taken from a URL (it leaks into logs "
                               "and history)", hint=_LOGIN_HINT)
    return None


def _guard_browsers(app: Any, service: Service) -> Any:
    """The ASGI wrapper that enforces ``browser_refusal`` on every HTTP request
    and WebSocket upgrade but /health, answers listed origins' preflights, and
    adds CORS headers for listed origins (nobody else gets any).  Refusals
    count in ``relay_requests`` under the route ``door``."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] == "/health":
            return await app(scope, receive, send)
        refusal = browser_refusal(scope, service.config)
        if refusal is not None:
            service.metrics.requests.labels("door", str(refusal.code.http_status)).inc()
            return await _refuse_at_door(scope, receive, send, refusal)
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        origin = headers.get("origin")
        if scope["type"] == "websocket" or origin is None:
            return await app(scope, receive, send)
        cors = [(b"access-control-allow-origin", origin), (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            cors += [(b"access-control-allow-methods", _CORS_METHODS.encode()),
                     (b"access-control-allow-headers", _CORS_HEADERS.encode()),
                     (b"access-control-max-age", str(_CORS_MAX_AGE_SECONDS).encode())]
            if headers.get("access-control-request-private-network") == b"true":
                cors.append((b"access-control-allow-private-network", b"true"))
            await send({"type": "http.response.start", "status": 204, "headers": cors})
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [*cors, (b"access-control-expose-headers", _CORS_EXPOSE.encode())]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return await app(scope, receive, send_with_cors)

    return asgi


#: The route ``GET /api/relay/status`` counts under in ``relay_requests`` (quart's rule).
_STATUS_RULE = "/api/relay/<name>"


def _serve_status_directly(app: Any, service: Service) -> Any:
    """The ASGI wrapper that answers the most polled request, a plain
    ``GET /api/relay/status``, from the cached status bytes without quart's
    request context, routing and response object (about a fifth of such a
    request's CPU).  It stands behind ``_guard_browsers`` (Host, Origin, CORS),
    answers only when quart's token check would let the request through on
    its ``Authorization`` header alone (or no token is required), and counts
    it under the same ``relay_requests`` labels; everything else (a query, a
    body, a cookie-only login, a refusal, an error) goes to quart as before."""
    counter: list[Any] = []  # the labelled counter, fetched once

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["path"] != "/api/relay/status"
                or scope["method"] != "GET" or scope.get("query_string") or _has_body(scope)):
            return await app(scope, receive, send)
        if service.token_required() and not service.authorized(_header(scope, b"authorization")):
            return await app(scope, receive, send)  # a cookie may still log it in; or quart refuses
        try:
            body = await service.status_json()
        except Exception:  # noqa: BLE001 - quart computes it again and answers (and logs) the error
            return await app(scope, receive, send)
        if not counter:
            counter.append(service.metrics.requests.labels(_STATUS_RULE, "200"))
        counter[0].inc()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    return asgi


#: The route Connect unary calls count under in ``relay_requests`` (quart's rule).
_CONNECT_RULE = f"{_CONNECT_PREFIX}<method>"
#: Request headers that send a Connect call on to quart's route (it alone handles them).
_CONNECT_SLOW_HEADERS = frozenset({b"content-encoding", b"connect-timeout-ms", b"transfer-encoding",
                                   b"expect"})


def _serve_connect_json_directly(app: Any, service: Service) -> Any:
    """The ASGI wrapper that answers a plain Connect unary call (``POST
    /relay.v1.Relay/<Method>``, ``Content-Type: application/json``, a
    ``Content-Length`` within the body limit, no ``Content-Encoding`` or
    ``Connect-Timeout-Ms``) without quart's request context, routing and
    response object.  Like ``_serve_status_directly`` it stands behind the
    door and answers only what quart's token check would pass on the
    ``Authorization`` header.  The body is read here; until the call runs,
    anything quart answers differently (a bad body, an unknown method, a body
    slower than ``BODY_TIMEOUT_SECONDS``) goes to quart with the bytes read so
    far replayed, so the call is made once either way.  The reply, an error
    reply and the ``relay_requests`` label are quart's."""
    counters: dict[int, Any] = {}  # status -> its labelled counter

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or not scope["path"].startswith(_CONNECT_PREFIX) or scope.get("query_string")):
            return await app(scope, receive, send)
        rpc = rc.RPC_BY_NAME.get(scope["path"][len(_CONNECT_PREFIX):])
        length = _plain_json_length(scope)
        if rpc is None or length is None or length > service.config.max_body_bytes:
            return await app(scope, receive, send)
        if service.token_required() and not service.authorized(_header(scope, b"authorization")):
            return await app(scope, receive, send)
        chunks, done, other = await _read_body(receive, length)
        raw = b"".join(chunks)
        try:
            body = None if not done or len(raw) != length else _decode_unary(rpc, "json", raw)
        except RelayError:
            body = None
        if body is None:  # quart answers it, from the same messages
            return await app(scope, _replaying(raw, done, other, receive), send)
        try:
            reply = await service.call_json(rpc.name, body)
            status = 200
            data, headers = _unary_bytes(reply, _header(scope, b"accept-encoding") or "")
        except RelayError as exc:
            status, data, headers = exc.code.http_status, _error_bytes(exc), []
            if exc.code is rc.Code.UNAUTHENTICATED:
                headers.append((b"www-authenticate", b'Bearer realm="flow-relay"'))
        except Exception as exc:  # as quart's ``unexpected`` handler: logged, never sent
            _logger("serve").error("internal error on %s", scope["path"], exc_info=exc)
            internal = Internal("the relay hit an internal error; see its log")
            status, data, headers = internal.code.http_status, _error_bytes(internal), []
        counter = counters.get(status)
        if counter is None:
            counter = counters[status] = service.metrics.requests.labels(_CONNECT_RULE, str(status))
        counter.inc()
        await send({"type": "http.response.start", "status": status, "headers": [  # quart's order
            *headers, (b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]})
        await send({"type": "http.response.body", "body": data})

    return asgi


def _serve_ws_directly(app: Any, service: Service) -> Any:
    """The ASGI wrapper that serves the WebSocket channel ``/ws`` without quart:
    each received frame goes from hypercorn's queue straight to
    ``Service.websocket`` (quart passes it through a receiver task and a
    channel first, and fires a signal per frame).  Like
    ``_serve_status_directly`` it stands behind the door and takes only the
    upgrades quart's token check would pass on the ``Authorization`` header
    (a cookie-only login, a refusal, a query string, a root path go to
    quart); the handshake, the frames and the close are quart's."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "websocket" or scope["path"] != "/ws" or scope.get("query_string")
                or scope.get("root_path")):
            return await app(scope, receive, send)
        if service.token_required() and not service.authorized(_header(scope, b"authorization")):
            return await app(scope, receive, send)
        await _ws_connection(service, scope, receive, send)

    return asgi


async def _ws_connection(service: Service, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """One ``/ws`` connection over ASGI, as quart's route runs it: accepted
    with no subprotocol, ended without a close frame when the client goes
    (``websocket.disconnect`` cancels the channel, as quart's receiver
    does), closed with 1000 when the channel ends (shutdown, a client that
    stopped reading) or fails (logged)."""
    if (await receive())["type"] != "websocket.connect":
        return None
    await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
    gone = trio.CancelScope()

    async def frame() -> str | bytes:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                return message.get("bytes") or message["text"]  # type: ignore[no-any-return]
            if message["type"] == "websocket.disconnect":
                gone.cancel()
                await trio.lowlevel.checkpoint()  # raises Cancelled

    async def send_text(text: str) -> None:
        await send({"type": "websocket.send", "bytes": None, "text": text})

    with gone:
        try:
            texts = _ws_text_sender(scope.get("extensions", {}).get(_SERVER_SEND))
            await service.websocket(frame, send_text, texts)
        except Exception as exc:  # noqa: BLE001 - as quart's ``unexpected`` handler: logged
            _logger("serve").error("internal error on %s", scope["path"], exc_info=exc)
        await send({"type": "websocket.close", "code": 1000})
    return None


#: How long the Connect fast path waits for a request body before handing it to quart.
BODY_TIMEOUT_SECONDS: Final = 30


def _plain_json_length(scope: dict[str, Any]) -> int | None:
    """The Content-Length of a request with ``Content-Type: application/json``
    and none of ``_CONNECT_SLOW_HEADERS``; None for anything else."""
    length = content_type = None
    for key, value in scope["headers"]:
        name = key.lower()
        if name in _CONNECT_SLOW_HEADERS:
            return None
        if name == b"content-type":
            if content_type is not None:
                return None
            content_type = value
        elif name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
    return length if content_type == b"application/json" else None


async def _read_body(receive: Any, length: int) -> tuple[list[bytes], bool, dict[str, Any] | None]:
    """The request body's chunks, whether it ended (within the timeout; more
    than ``length`` bytes stops the reading), and the message that was not
    body (a disconnect), if any."""
    chunks: list[bytes] = []
    got = 0
    with trio.move_on_after(BODY_TIMEOUT_SECONDS):
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return chunks, False, message
            chunk = message.get("body", b"")
            chunks.append(chunk)
            got += len(chunk)
            if not message.get("more_body", False):
                return chunks, True, None
            if got > length:
                return chunks, False, None
    return chunks, False, None


def _replaying(raw: bytes, done: bool, other: dict[str, Any] | None, receive: Any) -> Any:
    """An ASGI ``receive`` that first gives back what was already read: the
    body bytes (``more_body`` unless the body ended or ``other`` came), then ``other``."""
    pending = ([other] if other is not None else []) + [
        {"type": "http.request", "body": raw, "more_body": not done and other is None}]

    async def replay() -> dict[str, Any]:
        if pending:
            return pending.pop()
        return await receive()

    return replay


def _unary_bytes(reply: dict[str, Any], accept_encoding: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """``_unary_response`` for the JSON codec, as bytes and extra headers."""
    import gzip

    data = json.dumps(reply).encode()
    headers = [(b"vary", b"Accept-Encoding")]
    if len(data) >= _COMPRESS_MIN_BYTES and _accepts_gzip(accept_encoding):
        data = gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)
        headers.append((b"content-encoding", b"gzip"))
    return data, headers


def _error_bytes(exc: RelayError) -> bytes:
    """``_error_response``'s body."""
    return json.dumps(_connect_error_json(exc)).encode()


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case) in an ASGI scope."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _refuse_at_door(scope: dict[str, Any], receive: Any, send: Any, exc: RelayError) -> None:
    """Answer a refused request (or WebSocket upgrade) with the Connect error."""
    body = json.dumps(exc.to_json()).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    status = exc.code.http_status
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": head})
        return await send({"type": "http.response.body", "body": body})
    if (await receive())["type"] != "websocket.connect":
        return None
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": head})
        return await send({"type": "websocket.http.response.body", "body": body})
    return await send({"type": "websocket.close", "code": 1008})


################################################################
# Serving
################################################################


#: glibc's ``mallopt`` parameters (malloc.h).
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8
#: Allocations this big or bigger get pages of their own, returned when freed.
MMAP_THRESHOLD_BYTES: Final = 128 * KIB
#: malloc arenas for the server's threads (glibc's default: 8 per core).
MALLOC_ARENAS: Final = 2


def tune_malloc() -> bool:
    """Keep a long-running server's heap from fragmenting (glibc only; a
    no-op returning False elsewhere).

    glibc serves an allocation of 128 KiB or more with pages of its own, but
    raises that threshold to the size of every such block freed, so after
    the first ledger read (a few hundred KiB: the file, the checksummed body,
    its decoded text, the encoded checkpoint) every later one comes from the
    heap, each a little bigger or smaller than the holes the last left; with
    a heap per thread (the commit and read threads) the holes multiply.  The
    30-minute soak's server grew ~1 MB a minute this way while the memory in
    use stayed flat.  A fixed threshold (which also stops the raising) gives
    every large transient copy back when it is freed, and two arenas bound
    what the threads' heaps hold apart."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


@attrs.define(eq=False)
class Server:
    """A running relay: its endpoint, service, and a way to stop it."""

    endpoint: str
    service: Service
    _stopping: Any

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Begin a graceful shutdown: stop accepting, close streams, drain."""
        self.service.hub.close()
        self._stopping.set()


def _served(endpoint: str, serving_mode: str, pid: int) -> Mutation:
    def apply(ledger: Ledger, ctx: Ctx) -> tuple[Ledger, Any]:
        runtime = attrs.evolve(ledger.runtime, status="serving", endpoint=endpoint,
                               mode=serving_mode,
                               pid=pid, served_at=ctx.stamp, shutdown_at="")
        return attrs.evolve(ledger, runtime=runtime), runtime

    return Mutation(apply, "served", checkpoint=True)


def _stopped() -> Mutation:
    def apply(ledger: Ledger, ctx: Ctx) -> tuple[Ledger, Any]:
        runtime = attrs.evolve(ledger.runtime, status="stopped", shutdown_at=ctx.stamp, pid=0)
        return attrs.evolve(ledger, runtime=runtime), runtime

    return Mutation(apply, "stopped", checkpoint=True)


def _quiet_gc() -> None:
    """Move everything alive at start-up (modules, the app, the ledger) out of
    the collector's reach and collect young objects less often: fan-out to a
    thousand subscribers allocates in bursts, and full collections over the
    start-up heap were the long pauses in SSE delivery."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def _bind_host(host: str) -> str:
    if host == "localhost":  # bind the loopback address itself, not what a hosts file says
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _close_after_response(app: Any) -> Any:
    """Close, rather than wedge, a connection whose request body went unread.

    A request refused before its body is read (too large, wrong content type,
    no token) leaves that body on the connection, so the connection cannot be
    reused.  Without this wrapper two things go wrong: the response does not
    say ``Connection: close``, so a keep-alive client sends its next request
    there; and hypercorn, closing the connection from inside the app's final
    ``send``, first tells the app ``http.disconnect``, on which quart-trio's
    receiver cancels the request's nursery and with it that very close.  The
    socket stays open and the client's next request waits forever.  So: say
    ``Connection: close`` while the body is unread, and hold back a disconnect
    that arrives once the response is complete (quart-trio ends the request
    itself right after).
    """

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":  # the server's own send, for ``_ws_text_sender``
            extensions = scope.setdefault("extensions", {})
            extensions[_SERVER_SEND] = send
            try:
                return await app(scope, receive, send)
            finally:
                extensions.pop(_SERVER_SEND, None)
        if scope["type"] != "http":
            return await app(scope, receive, send)
        # The server's own send, for the SSE route (``_SERVER_SEND``, ``_h11_socket``).
        extensions = scope.setdefault("extensions", {})
        extensions[_SERVER_SEND] = send
        tracker = _ResponseTracker(receive, send, _has_body(scope))
        try:
            return await app(scope, tracker.receive, tracker.send)
        finally:
            del extensions[_SERVER_SEND]  # no cycle through the scope once it is done

    return asgi


class _ResponseTracker:
    """``_close_after_response``'s state for one request (slotted: an SSE
    stream keeps it for as long as it is open)."""

    __slots__ = ("_receive", "_send", "unread", "responded")

    def __init__(self, receive: Any, send: Any, unread: bool) -> None:
        self._receive, self._send, self.unread, self.responded = receive, send, unread, False

    async def receive(self) -> dict[str, Any]:
        message = await self._receive()
        if message["type"] == "http.disconnect" and self.responded:
            await trio.sleep_forever()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.unread = False
        return message

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and self.unread:
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.responded = True
        await self._send(message)


def _send_reason_phrases() -> None:
    """Give HTTP/1.1 status lines their reason phrase ("404 Not Found").

    The phrase is optional (RFC 9112 4) and h11 leaves it empty unless told
    (its writer's own FIXME suggests http.HTTPStatus), but hypercorn never
    tells it, and some clients and every person reading ``curl -i`` expect it.
    ASGI has no way to pass one, so hypercorn's h11 protocol module is given an
    ``h11`` whose ``Response`` fills in the standard phrase; everything else
    is h11's own.  Done once per process, before the first server starts.
    """
    import http
    import types

    import h11
    import hypercorn.protocol.h11 as protocol

    if getattr(protocol.h11, "RELAY_REASON_PHRASES", False):
        return

    phrases = {status.value: status.phrase.encode("ascii") for status in http.HTTPStatus}

    def response(*, status_code: int, reason: bytes = b"", **fields: Any) -> Any:
        return h11.Response(status_code=status_code, reason=reason or phrases.get(status_code, b""),
                            **fields)

    protocol.h11 = types.SimpleNamespace(**{**vars(h11), "Response": response,
                                            "RELAY_REASON_PHRASES": True})


def _has_body(scope: dict[str, Any]) -> bool:
    return any(name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
               for name, value in scope["headers"])


async def serve(store: Store, config: Config, *, host: str | None = None, port: int | None = None,
                now: Callable[[], float] = time.time, probe_token: str | None = None,
                task_status: TaskStatus[Server] = _TASK_STATUS_IGNORED) -> None:
    """Run the relay until ``Server.stop()`` (or cancellation).

    ``task_status.started(server)`` fires once the socket listens and the
    served runtime metadata is on disk.  With ``probe_token`` it serves a
    read-only probe for the gate instead: it records no runtime metadata, runs
    no reaper, refuses every mutation, and accepts that in-memory token.
    """
    import hypercorn.config
    import hypercorn.trio

    host = host or config.host
    port = config.port if port is None else port
    # The commit thread blocks in fsync several times per group commit and
    # must win the GIL back from a busy event loop each time; at the default
    # 5 ms switch interval that wait, not the disk, dominated commit latency.
    sys.setswitchinterval(SWITCH_INTERVAL)
    if store.request_index is None:  # a long-lived store indexes the request log in memory
        store.request_index = RequestIndex()
    store.journal = True  # commits append to the journal; start and stop checkpoint
    ledger = await trio.to_thread.run_sync(store.read)
    rc.build_deferred()  # every message class now, not in the middle of a request
    serving = require_serving_allowed(ledger, host)
    hub = EventHub(buffer=config.subscriber_buffer)
    owner = LedgerOwner(store, config, hub, now)
    service = Service(store, config, owner, hub, now, probe_token=probe_token,
                      serving_mode=serving)
    owner.metrics = service.metrics
    runtime = None
    if probe_token is None:
        runtime = Runtime(owner, hub, store, config, now, providers=load_provider_settings(store.flow))
        service.runtime = runtime
        service.metrics.track_providers(runtime.provider_health)
    service.metrics.track("owner", owner.statistics)
    service.metrics.track("hub", hub.statistics)
    stopping = trio.Event()
    _send_reason_phrases()
    if probe_token is None:  # the gate's probe speaks JSON only: keep it fast
        await trio.to_thread.run_sync(_load_codecs)
    hconfig = hypercorn.config.Config()
    hconfig.bind = [f"{_bind_host(host)}:{port}"]
    hconfig.graceful_timeout = GRACEFUL_SECONDS
    hconfig.accesslog = None
    hconfig.errorlog = None
    async with trio.open_nursery() as root:
        await root.start(owner.run)
        lasting = probe_token is None  # (the gate's probe lives for a moment)
        await root.start(functools.partial(run_heartbeat, owner, config, lasting,
                                           collect=gc.collect if lasting else None,
                                           trim=_malloc_trim() if lasting else None))
        await root.start(run_supervision, runtime)
        async with trio.open_nursery() as http:
            app = _close_after_response(_guard_browsers(_serve_ws_directly(
                _serve_status_directly(_serve_connect_json_directly(create_app(service), service),
                                       service), service), service))
            urls = await http.start(functools.partial(
                hypercorn.trio.serve, app, hconfig, shutdown_trigger=stopping.wait))
            endpoint = urls[0]
            _quiet_gc()
            if probe_token is None:
                await owner.submit(_served(endpoint, serving, os.getpid()))
            task_status.started(Server(endpoint, service, stopping))
        # hypercorn has stopped accepting and finished in-flight requests.
        if runtime is not None:
            await runtime.aclose()
        if probe_token is None:
            with contextlib.suppress(RelayError):
                await owner.submit(_stopped())
        root.cancel_scope.cancel()

################################################################
# The gate
################################################################

# ``python -m relay gate`` answers one question: can operators and companion
# tools trust the ledger projection?  Each check states one invariant, looks
# at the workspace from outside, and on failure names the owner-scoped repair
# or the next diagnostic.  The gate never writes to flow/state: its HTTP check
# runs the server as a read-only probe (no runtime record, no reaper).

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_RAW_TOKEN: Final = re.compile(rb"frt_[A-Za-z0-9_-]{20,}")
_INSPECT_REPAIR: Final = "python -m relay state inventory"


@attrs.frozen
class Check:
    id: str
    invariant: str
    result: str  # pass | fail | skip
    evidence: str
    repair: str = ""


@attrs.define(eq=False)
class _GateView:
    """What every check looks at, read once."""

    store: Store
    config: Config
    now: float
    ledger: Ledger | None = None
    error: str = ""
    raw: bytes = b""
    streams: dict[tuple[str, str], tuple[int, str]] = attrs.Factory(dict)
    #: The checkpoint (``raw``) and the journal records applied on it.
    checkpoint: Ledger | None = None
    journal: bytes = b""
    journal_records: int = 0
    _processes: list[MarkedProcess] | None = None
    _record: tuple[dict[str, Any] | None] | None = None

    @classmethod
    def read(cls, store: Store, config: Config, now: float) -> _GateView:
        view = cls(store, config, now)
        present = False  # an empty file is a damaged ledger, not an absent one
        with contextlib.suppress(FileNotFoundError):
            view.raw = store.ledger_path.read_bytes()
            present = True
        try:
            view.checkpoint = decode_ledger(view.raw) if present else None
        except LedgerInvalid as exc:
            view.error = exc.message
        if view.checkpoint is not None:
            with contextlib.suppress(FileNotFoundError):
                view.journal = store.journal_path.read_bytes()
            snap = store.with_journal(view.raw, view.checkpoint)
            view.ledger, view.journal_records = snap.ledger, snap.records
        if view.ledger is not None:
            for sid, cursor in view.ledger.cursors.items():
                for stream in STREAM_KINDS:
                    view.streams[(sid, stream)] = _scan_stream(store, sid, stream, cursor)
        return view

    # Read on first use, inside a check: a failing read fails that check, not the gate.
    @property
    def processes(self) -> list[MarkedProcess]:
        """This workspace's live provider processes (by their scratch marker)."""
        if self._processes is None:
            self._processes = marked_processes(self.store.tmp_dir)
        return self._processes

    @property
    def record(self) -> dict[str, Any] | None:
        """flow/tmp/relay/providers.json as the last server wrote it (None: absent or unreadable)."""
        if self._record is None:
            self._record = (_read_providers_record(self.store.tmp_dir),)
        return self._record[0]


def _scan_stream(store: Store, sid: str, stream: str, cursor: rc.Cursor) -> tuple[int, str]:
    """(last seq, problem) of one committed log: checksums, seq 1..n, length."""
    committed = getattr(cursor, f"{stream}_bytes")
    path = store.stream_path(sid, stream)
    if committed == 0:
        return 0, ""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < committed:
                return 0, f"{_rel(store, path)} is {size} B, shorter than its committed {committed} B"
            seq = 0
            while f.tell() < committed:
                line = f.readline()
                # The exact bytes, as decode_record compares them (int(..., 16) takes " 1a2b3c4").
                if len(line) < 11 or line[:9] != b"%08x " % zlib.crc32(line[9:-1]):
                    return seq, f"{_rel(store, path)}: checksum mismatch after seq {seq}"
                got = decode_record(line).seq  # as strict as every reader of the log
                if got != seq + 1:
                    return seq, f"{_rel(store, path)}: seq {got} follows {seq}"
                seq = got
    except FileNotFoundError:
        return 0, f"{_rel(store, path)} is missing"
    except (ValueError, KeyError, TypeError):  # TypeError: a record that is not an object
        return 0, f"{_rel(store, path)}: unreadable record"
    return seq, ""


def _needs_ledger(check: Callable[[_GateView], tuple[str, str, str]]):
    """Skip a check that reads the ledger when there is no valid one (the
    ledger_valid check reports why)."""

    @functools.wraps(check)
    def wrapper(view: _GateView) -> tuple[str, str, str]:
        if view.ledger is None:
            return "skip", "no valid ledger to check", ""
        return check(view)

    return wrapper


def _check_status(view: _GateView) -> tuple[str, str, str]:
    doc = to_json(status(view.store, view.now))
    if doc["status"] == "pass":
        return "pass", f"status pass, mode {doc['relay_mode']}, revision {doc['revision']}", ""
    first = doc["warnings"][0]
    return "fail", f"status {doc['status']}: {first['message']}", first["repair"]


def _check_inspect(view: _GateView) -> tuple[str, str, str]:
    # ``status`` answers from the raw bytes when the validated-memo vouches for
    # them, so compare with what it would really print, not with inspect's own path.
    fast = _fast_status_doc(str(view.store.root), view.now)
    plain = fast if fast is not None else to_json(status(view.store, view.now))
    detailed = inspect_relay(view.store, view.config, view.now)
    differ = sorted(k for k in plain if detailed.get(k) != plain[k])
    path = "status (its fast path)" if fast is not None else "status"
    if differ:
        return ("fail", f"inspect relay differs from {path} in {', '.join(differ)}",
                "python -m relay inspect relay --json")
    return "pass", f"{len(plain)} projection fields agree with {path}", ""


def _check_ledger(view: _GateView) -> tuple[str, str, str]:
    repair = "python -m relay state inventory, then python -m relay state reset --owner relay --apply"
    if view.ledger is None and not view.error:
        return "skip", "no ledger yet (the first mutation creates it)", ""
    if view.ledger is None:
        return "fail", view.error, repair
    schema_path = Path(__file__).resolve().parent / "specs" / "relay-state.schema.json"
    try:
        import jsonschema
    except ImportError:
        return "pass", "typed model accepts it; jsonschema not installed, schema not checked", ""
    if not schema_path.exists():
        return "pass", "typed model accepts it; specs/ not shipped with this install", ""
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    docs = [json.loads(view.raw)]  # the checkpoint operators read, and the ledger its journal makes
    if view.journal_records:
        docs.append(json.loads(encode_ledger(view.ledger)))
    for doc in docs:
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
            return "fail", f"schema: {where}: {errors[0].message}", repair
    lag = _lag(view.checkpoint, view.ledger, view.journal_records)
    return "pass", f"revision {view.ledger.revision} {lag} validates against {schema_path.name}", ""


def _lag(checkpoint: Ledger, ledger: Ledger, records: int) -> str:
    """How far relay-state.json lags the ledger: what an operator reading it misses."""
    if not records:
        return "(relay-state.json is current)"
    return (f"(relay-state.json holds revision {checkpoint.revision}; {records} journal records "
            f"in {JOURNAL_NAME} bring it to {ledger.revision})")


@_needs_ledger
def _check_streams(view: _GateView) -> tuple[str, str, str]:
    bad = [(key, problem) for key, (_, problem) in sorted(view.streams.items()) if problem]
    if bad:
        (sid, _), problem = bad[0]
        return ("fail", problem, f"python -m relay quarantine session {sid} --reason "
                "'stream log damaged', then restore the log from a backup")
    total = sum(seq for seq, _ in view.streams.values())
    return "pass", f"{len(view.streams)} logs, {total} records, checksums and seq 1..n intact", ""


@_needs_ledger
def _check_cursors(view: _GateView) -> tuple[str, str, str]:
    for (sid, stream), (seq, problem) in sorted(view.streams.items()):
        want = getattr(view.ledger.cursors[sid], stream)
        if not problem and seq != want:
            return ("fail", f"session {sid} {stream}: ledger cursor {want}, log ends at {seq}",
                    _INSPECT_REPAIR)
    streams_dir = view.store.state_dir / STREAMS_DIR
    orphans = sorted(p.name for p in streams_dir.iterdir() if p.name not in view.ledger.cursors) \
        if streams_dir.is_dir() else []
    if orphans:
        return "fail", f"stream logs of unknown session {orphans[0]}", _INSPECT_REPAIR
    return "pass", f"{len(view.ledger.cursors)} session cursors agree with their logs", ""


def _removed_by(path: Path) -> Path:
    """The file an unlink of ``path`` removes: its directory resolved, its name kept
    (unlinking a symlink removes the link, not its target)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _live_file(store: Store, path: Path) -> bool:
    """Whether removing ``path`` would lose the lock or durable state (the
    ledger, a stream log, an archive): anything in flow/state/relay but an
    orphan temp file."""
    state_dir = Path(os.path.realpath(store.state_dir))
    return path == _removed_by(store.lock_path) or (
        path.is_relative_to(state_dir) and not path.name.startswith(TEMP_PREFIX))


def _check_cleanup(view: _GateView) -> tuple[str, str, str]:
    # The plan is computed from the files as they are; a tmp directory that is
    # a link into flow/state makes the dry run list the ledger and the logs.
    plan = cleanup_plan(view.store)
    root = os.path.realpath(view.store.root)
    for path in plan:
        if _live_file(view.store, removed := _removed_by(path)):
            what = "the mutation lock" if removed == _removed_by(view.store.lock_path) \
                else f"live file {os.path.relpath(removed, root)}"
            return ("fail", f"cleanup would remove {what} (as {os.path.relpath(path, root)})",
                    "do not run state cleanup --apply; make flow/tmp/relay a plain directory")
    return "pass", f"dry run would remove {len(plan)} files and keep the lock", ""


def _lan_problem(view: _GateView) -> tuple[str, str] | None:
    """A host this workspace serves on (flow/relay.toml's ``[serve] host``, the
    runtime's endpoint) that is private-network with no active token bound:
    the evidence and the repair, or None."""
    from urllib.parse import urlsplit

    base = view.ledger or Ledger()
    rt = base.runtime
    if active_token(base, rt.token_id) is not None:
        return None
    with contextlib.suppress(ValueError):
        host = urlsplit(rt.endpoint).hostname if rt.endpoint else None
        if rt.mode == "trusted-lan" or (host and _serves_lan(host)):
            return (f"runtime serves trusted-lan at {rt.endpoint} without an active token",
                    "python -m relay token rotate, or python -m relay bootstrap --endpoint "
                    "http://127.0.0.1:9876")
    if _serves_lan(view.config.host):
        return (f"flow/relay.toml serves on {view.config.host} (trusted-lan) with no active "
                "token bound: serve will refuse",
                "python -m relay token create, then python -m relay bootstrap --endpoint URL "
                "--token-id ID; or set [serve] host = \"127.0.0.1\"")
    return None


def _serves_lan(host: str) -> bool:
    try:
        return serving_mode(host) == "trusted-lan"
    except RelayError:
        return False  # refused whatever the token: not this check's finding


def _check_lan(view: _GateView) -> tuple[str, str, str]:
    base = view.ledger or Ledger()
    tokenless = attrs.evolve(base, runtime=attrs.evolve(base.runtime, token_id=""))
    for host in ("10.0.0.1", "192.168.1.10", "0.0.0.0", "8.8.8.8"):
        try:
            require_serving_allowed(tokenless, host)
        except RelayError:
            continue
        return "fail", f"serving on {host} without a token was allowed", "report this as a relay bug"
    if (problem := _lan_problem(view)) is not None:
        return "fail", *problem
    return "pass", "private-network serving without a token is refused (checked without binding)", ""


@_needs_ledger
def _check_tokens(view: _GateView) -> tuple[str, str, str]:
    for token in view.ledger.tokens.values():
        if not _HEX64.fullmatch(token.digest):
            return ("fail", f"token {token.token_id} digest is not a SHA-256 hex digest",
                    f"python -m relay token revoke {token.token_id}, then python -m relay token create")
    if _RAW_TOKEN.search(view.raw) or _RAW_TOKEN.search(view.journal):
        return ("fail", "the ledger contains something shaped like a raw bearer token",
                "revoke every token (python -m relay token revoke ID) and create new ones")
    return "pass", f"{len(view.ledger.tokens)} token records hold digests only", ""


@_needs_ledger
def _check_pooled(view: _GateView) -> tuple[str, str, str]:
    bad = [p for p in view.ledger.profiles.values() if p.mode == "pooled" and p.provider != "codex"]
    if bad:
        return ("fail", f"profile {bad[0].name} pools {bad[0].provider} sessions",
                f"python -m relay profile register NAME --provider {bad[0].provider} "
                f"--mode one-borrow, and move work off {bad[0].name}")
    return "pass", "every pooled profile is Codex", ""


@_needs_ledger
def _check_quarantine(view: _GateView) -> tuple[str, str, str]:
    for sid, q in sorted(view.ledger.quarantines.items()):
        session = view.ledger.sessions.get(sid)
        if q.state == "active" and (session is None or session.state != "failed"):
            return ("fail", f"session {sid} is quarantined but {session.state if session else 'gone'}",
                    f"python -m relay recover --session {sid}")
    return "pass", "every quarantined session is failed", ""


@_needs_ledger
def _check_leases_on_failed(view: _GateView) -> tuple[str, str, str]:
    stamp = iso(view.now)
    for lease in sorted(view.ledger.leases.values(), key=lambda x: x.lease_id):
        session = view.ledger.sessions.get(lease.session_id)
        if is_live(lease, stamp) and (session is None or session.state != "ready"):
            return ("fail", f"live lease {lease.lease_id} sits on {lease.session_id}, which is "
                    f"{session.state if session else 'gone'}",
                    f"python -m relay lease revoke {lease.lease_id} --reason 'session failed'")
    return "pass", "no live lease on a failed or closed session", ""


@_needs_ledger
def _check_writer_reader(view: _GateView) -> tuple[str, str, str]:
    stamp = iso(view.now)
    for sid in sorted(view.ledger.sessions):
        live = [x for x in live_leases(view.ledger, sid, stamp) if x.state == "active"]
        modes = {x.mode for x in live}
        writers = [x for x in live if x.mode == "exclusive-write"]
        if writers and (len(modes) > 1 or len(writers) > 1):
            return ("fail", f"session {sid} has an active writer and another active lease",
                    f"python -m relay lease revoke {writers[0].lease_id} --reason 'conflicting lease'")
    return "pass", "no session has an active writer beside another active lease", ""


# -- the live runtime, seen from outside: turns, provider processes, scratch --------
#
# A provider process is this workspace's when its environment carries
# ``FLOW_RELAY_SCRATCH=<flow/tmp/relay/sessions/ID>`` (the runtime sets it; its
# commands inherit it), the same marker ``reap_orphans`` trusts.  The gate
# reads /proc and flow/tmp/relay/providers.json; it signals nothing.


@attrs.frozen
class MarkedProcess:
    """A live process whose environment marks it as a provider of this workspace."""

    pid: int
    pgid: int
    ppid: int
    session_id: str
    scratch: str


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a live process, or None (gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            return None
        return fields[0].decode(), int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def marked_processes(tmp_dir: Path) -> list[MarkedProcess]:
    """Live processes (not zombies) whose ``FLOW_RELAY_SCRATCH`` is a session
    scratch under ``tmp_dir``: the providers of this workspace and whatever
    their commands started.  Read from /proc; processes of other users whose
    environment cannot be read are not this relay's."""
    sessions = os.path.abspath(tmp_dir / SESSIONS_DIR)
    try:  # the directory itself, however its path is spelled (links, a relative root)
        st = os.stat(sessions)
        ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    prefix = f"{SCRATCH_ENV}=".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if prefix not in env:
            continue
        value = next((x[len(prefix):] for x in env.split(b"\0") if x.startswith(prefix)), None)
        if value is None:
            continue
        scratch = value.decode("utf-8", "replace")
        if not _same_dir(os.path.dirname(scratch), sessions, ident):
            continue
        stat = _proc_stat(int(entry))
        if stat is not None:
            found.append(MarkedProcess(int(entry), stat[2], stat[1], os.path.basename(scratch), scratch))
    return sorted(found, key=lambda p: p.pid)


def _same_dir(path: str, lexical: str, ident: tuple[int, int] | None) -> bool:
    if path == lexical:
        return True
    try:
        st = os.stat(path)
    except OSError:
        return False
    return ident is not None and (st.st_dev, st.st_ino) == ident


def _read_providers_record(tmp_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((tmp_dir / PROVIDERS_RECORD).read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _record_rows(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = record.get("processes") if record else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _restart_repair(turn_id: str) -> str:
    return (f"python -m relay serve (a starting server fails turn {turn_id}, left running: "
            "relay_restarted); stop the running server first (SIGTERM) if there is one")


@_needs_ledger
def _check_turn_leases(view: _GateView) -> tuple[str, str, str]:
    stamp = iso(view.now)
    running = sorted((t for t in view.ledger.turns.values() if t.state == "running"),
                     key=lambda t: t.turn_id)
    for turn in running:
        lease = view.ledger.leases.get(turn.lease_id)
        if lease is None:
            problem = f"its lease {turn.lease_id} is not in the ledger"
        elif lease.session_id != turn.session_id:
            problem = f"its lease {lease.lease_id} is on {lease.session_id}"
        elif lease.mode != "exclusive-write":
            problem = f"its lease {lease.lease_id} is {lease.mode}"
        elif lease.state != "active" or not is_live(lease, stamp):
            problem = f"its lease {lease.lease_id} is {_state_at(lease, stamp)}"
        else:
            continue
        return ("fail", f"running turn {turn.turn_id} on {turn.session_id}: {problem}",
                _restart_repair(turn.turn_id))
    return "pass", f"{len(running)} running turns, each under a live exclusive-write lease", ""


@_needs_ledger
def _check_quarantined_turns(view: _GateView) -> tuple[str, str, str]:
    running = sorted((t for t in view.ledger.turns.values() if t.state == "running"),
                     key=lambda t: t.turn_id)
    for turn in running:
        if _quarantined(view.ledger, turn.session_id):
            reason = view.ledger.quarantines[turn.session_id].reason
            return ("fail", f"session {turn.session_id} is quarantined ({reason[:120]}) but runs "
                    f"turn {turn.turn_id}", _restart_repair(turn.turn_id))
    return "pass", f"no quarantined session runs a turn ({len(running)} running turns)", ""


@_needs_ledger
def _check_process_owners(view: _GateView) -> tuple[str, str, str]:
    for proc in view.processes:
        session = view.ledger.sessions.get(proc.session_id)
        if session is None or session.state == "closed":
            what = "closed" if session is not None else "not in the ledger"
            return ("fail", f"pid {proc.pid} (group {proc.pgid}) runs for session "
                    f"{proc.session_id}, which is {what}",
                    f"kill -TERM -- -{proc.pgid} (its process group: no session owns it)")
    sessions = len({p.session_id for p in view.processes})
    return "pass", f"{len(view.processes)} provider processes, all of {sessions} non-closed sessions", ""


def _live_servers(view: _GateView) -> tuple[set[int], set[int]]:
    """(pids of live servers of this workspace, process groups they own).  A
    server is ``providers.json``'s ``server_pid`` while that process lives and
    is the parent of every recorded provider still alive (a reused pid is not),
    or the ledger's serving runtime pid while it lives."""
    servers: set[int] = set()
    groups: set[int] = set()
    rows = _record_rows(view.record)
    leaders = {p.pid: p for p in view.processes if p.pid == p.pgid}
    with contextlib.suppress(TypeError, ValueError):
        pid = int((view.record or {}).get("server_pid") or 0)
        if pid and _proc_stat(pid) is not None and all(
                leaders[int(r.get("pid", 0))].ppid == pid for r in rows
                if int(r.get("pid", 0)) in leaders):
            servers.add(pid)
            groups.update(int(r.get("pgid", 0)) for r in rows)
    rt = view.ledger.runtime if view.ledger is not None else None
    if rt is not None and rt.status == "serving" and rt.pid and _proc_stat(rt.pid) is not None:
        servers.add(rt.pid)
    groups.update(p.pgid for p in leaders.values() if p.ppid in servers)
    return servers, groups


def _check_orphan_processes(view: _GateView) -> tuple[str, str, str]:
    servers, groups = _live_servers(view)
    recorded = set()
    with contextlib.suppress(TypeError, ValueError):
        recorded = {int(r.get("pgid", 0)) for r in _record_rows(view.record)}
    for proc in view.processes:
        if proc.pgid in groups or proc.ppid in servers:
            continue
        server = (view.record or {}).get("server_pid")
        whose = (f"providers.json names server pid {server}, which is gone"
                 if proc.pgid in recorded else "no live server records its group")
        repair = (f"python -m relay serve (at start it kills the groups a dead server recorded), "
                  f"or kill -KILL -- -{proc.pgid}" if proc.pgid in recorded else
                  f"kill -KILL -- -{proc.pgid} (no record names it, so serve will not)")
        return ("fail", f"pid {proc.pid} (session {proc.session_id}, group {proc.pgid}) outlived "
                f"its server: {whose}", repair)
    return "pass", (f"{len(view.processes)} provider processes, each owned by a live server "
                    f"(pid {', '.join(map(str, sorted(servers)))})" if view.processes else
                    "no provider process of this workspace is running"), ""


def _scratch_problem(proc: MarkedProcess, row: dict[str, Any] | None) -> str:
    """What is wrong with a running provider's scratch ("" if nothing)."""
    root = Path(proc.scratch)
    if row is not None and str(row.get("scratch", "")) != proc.scratch:
        return f"providers.json records scratch {row.get('scratch')!r}, the process has {proc.scratch!r}"
    if root.is_symlink() or not root.is_dir():
        return f"{proc.scratch} is {'a link' if root.is_symlink() else 'missing'}"
    for name in ("home", "tmp", "work"):
        sub = root / name
        if sub.is_symlink() or not sub.is_dir():
            return f"{sub} is {'a link' if sub.is_symlink() else 'missing'}"
    with contextlib.suppress(OSError):
        cwd = os.readlink(f"/proc/{proc.pid}/cwd")
        if cwd.endswith(" (deleted)"):
            return f"its working directory {cwd.removesuffix(' (deleted)')} was removed under it"
    return ""


@_needs_ledger
def _check_scratch(view: _GateView) -> tuple[str, str, str]:
    rows = {}
    with contextlib.suppress(TypeError, ValueError):
        rows = {int(r.get("pid", 0)): r for r in _record_rows(view.record)}
    checked = 0
    for proc in view.processes:
        session = view.ledger.sessions.get(proc.session_id)
        if proc.pid != proc.pgid or session is None or session.state == "closed":
            continue  # only providers themselves, of live sessions (provider_processes_owned has the rest)
        checked += 1
        if problem := _scratch_problem(proc, rows.get(proc.pid)):
            return ("fail", f"session {proc.session_id} (pid {proc.pid}): {problem}",
                    f"python -m relay quarantine session {proc.session_id} --reason "
                    "'tmp_corrupted: scratch damaged', then python -m relay recover --session "
                    f"{proc.session_id}")
    return "pass", f"the scratch of {checked} running providers is in place", ""


def _state_digest(store: Store) -> str:
    import hashlib

    digest = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(store.flow / "state")):
        dirnames.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            digest.update(str(path.relative_to(store.flow)).encode() + b"\0")
            with contextlib.suppress(FileNotFoundError):
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _check_http(view: _GateView) -> tuple[str, str, str]:
    if view.error:
        return "skip", "the ledger is damaged; the server would not start", ""
    before = _state_digest(view.store)
    routes = trio.run(_probe_reads, view)
    after = _state_digest(view.store)
    if before != after:
        return ("fail", f"flow/state changed while serving {len(routes)} read requests",
                "report this as a relay bug; python -m relay state inventory")
    return "pass", f"{len(routes)} reads and SSE replays left flow/state unchanged", ""


async def _probe_reads(view: _GateView) -> list[str]:
    """Start the read-only probe on an ephemeral loopback port and call every
    read route and an SSE replay per session."""
    import secrets

    import httpx2

    secret = secrets.token_urlsafe(16)
    routes = ["/health", "/api/relay/status", "/api/relay/profiles", "/api/relay/sessions",
              "/api/relay/leases", "/metrics"]
    ledger = view.ledger or Ledger()
    # Only logs that scanned clean and end at their cursor: a damaged one is
    # streams_valid's or cursors_match_streams' finding, and replaying it would
    # fail (or wait for a seq that never comes) without saying anything new.
    sound = [(sid, c) for sid, c in sorted(ledger.cursors.items())
             if all(view.streams.get((sid, s)) == (getattr(c, s), "") for s in STREAM_KINDS)][:20]
    for sid, cursor in sound:
        for stream in STREAM_KINDS:
            routes.append(f"/api/relay/{stream}?session={sid}&after={max(getattr(cursor, stream) - 10, 0)}")
    replays = [(sid, max(c.events - 10, 0), c.events) for sid, c in sound]
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(
            serve, view.store, view.config, host="127.0.0.1", port=0, probe_token=secret))
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx2.AsyncClient(base_url=server.endpoint, headers=headers, timeout=10) as http:
            for route in routes:
                (await http.get(route)).raise_for_status()
            async with trio.open_nursery() as readers:
                for sid, after, last in replays:
                    await readers.start(_probe_sse, http, sid, after, last)
                    routes.append(f"/events?session={sid}")
                server.stop()  # ends every SSE stream, so each reader runs to its end
        server.stop()
    return routes


async def _probe_sse(http: Any, sid: str, after: int, last: int, *,
                     task_status: TaskStatus[None]) -> None:
    """Replay one session's events after ``after``; started once seq ``last``
    has arrived.  The stream is then read to its end (the probe's stop), never
    abandoned: httpx2 leaks an abandoned stream's inner async generators."""
    async with http.stream("GET", "/events", params={"session": sid},
                           headers={"Last-Event-ID": f"{sid}:{after}"}) as response:
        response.raise_for_status()
        if last == after:
            task_status.started()
            return
        seen, want, found = b"", f"\nid: {sid}:{last}\n".encode(), False
        async for chunk in response.aiter_bytes():
            seen = seen[-len(want):] + chunk
            if not found and want in seen:
                task_status.started()
                found = True
        if not found:
            raise Internal(f"SSE replay of {sid} ended before seq {last}")


#: The gate's checks, in the order they are reported.
GATE_CHECKS: Final = (
    ("status_pass", "`status --json` reports pass", _check_status),
    ("inspect_matches_status", "`inspect relay --json` exposes the same projection fields and "
     "values as `status`", _check_inspect),
    ("ledger_valid", "the ledger parses and validates against specs/relay-state.schema.json",
     _check_ledger),
    ("streams_valid", "every stream log has valid checksums and sequence numbers 1..n with no gap",
     _check_streams),
    ("cursors_match_streams", "event and result cursors in the ledger agree with the stream logs",
     _check_cursors),
    ("cleanup_preserves_lock", "tmp cleanup (dry run) would preserve relay-state.lock", _check_cleanup),
    ("lan_requires_token", "serving on a private-network host without an active token is refused",
     _check_lan),
    ("tokens_are_digests", "every token record holds a 64-hex SHA-256 digest and nothing like a "
     "raw token", _check_tokens),
    ("pooled_codex_only", "pooled profiles are Codex-only", _check_pooled),
    ("quarantined_sessions_failed", "sessions under an active quarantine are failed",
     _check_quarantine),
    ("no_lease_on_failed_session", "no live lease sits on a failed or closed session",
     _check_leases_on_failed),
    ("no_writer_with_reader", "no session has an active writer together with another active lease",
     _check_writer_reader),
    ("running_turns_leased", "every running turn has a live exclusive-write lease",
     _check_turn_leases),
    ("no_turn_on_quarantined_session", "no quarantined session is serving a turn",
     _check_quarantined_turns),
    ("provider_processes_owned", "every live provider process belongs to a non-closed session of "
     "this workspace", _check_process_owners),
    ("no_orphan_provider_processes", "no provider process is left from a dead server",
     _check_orphan_processes),
    ("provider_scratch_intact", "the scratch of every running provider of a live session is intact",
     _check_scratch),
    ("http_reads_readonly", "HTTP read routes and SSE replay do not change flow/state", _check_http),
)


def gate(store: Store, config: Config, now: float | None = None,
         only: tuple[str, ...] = ()) -> list[Check]:
    """Run every check (or ``only`` these ids); never writes to flow/state."""
    view = _GateView.read(store, config, time.time() if now is None else now)
    checks = []
    for ident, invariant, fn in GATE_CHECKS:
        if only and ident not in only:
            continue
        try:
            result, evidence, repair = fn(view)
        except Exception as exc:  # a check that crashes is a failed check, not a crash
            _logger("gate").debug("check %s raised", ident, exc_info=exc)
            result, evidence, repair = "fail", f"check raised {exc!r}", _INSPECT_REPAIR
        checks.append(Check(ident, invariant, result, evidence, repair))
    return checks


def _gate_text(checks: list[Check]) -> str:
    width = max(len(c.id) for c in checks)
    rows = [f"{'check':<{width}}  result  evidence (and, on failure, the repair)"]
    for c in checks:
        rows.append(f"{c.id:<{width}}  {c.result:<6}  {c.evidence}")
        if c.result == "fail":
            rows.append(f"{'':<{width}}  {'':<6}  next: {c.repair}")
    failed = [c.id for c in checks if c.result == "fail"]
    rows.append(f"gate {'FAIL: ' + ', '.join(failed) if failed else 'pass'} "
                f"({sum(c.result == 'pass' for c in checks)} pass, {len(failed)} fail, "
                f"{sum(c.result == 'skip' for c in checks)} skip)")
    return "\n".join(rows)

################################################################
# CLI
################################################################

# ``python -m relay [--root DIR] COMMAND ... [--json]``.  The RPC commands are
# generated from relay_client.RPCS and the field metadata of their request
# messages, so the CLI, the HTTP routes and the client stubs cannot drift.


class _Parser(argparse.ArgumentParser):
    #: Set by ``main`` when the command line asks for --json, so that even a
    #: usage error prints its one JSON object.
    wants_json = False

    def error(self, message: str) -> None:  # argparse exits 2 on usage errors
        self.print_usage(sys.stderr)
        hint = f"see `{self.prog} --help`"
        print(f"relay: usage error: {message} ({hint})", file=sys.stderr)
        if _Parser.wants_json:
            _emit(True, {"error": {"code": "invalid_argument", "message": message, "hint": hint}}, "")
        raise SystemExit(EXIT_USAGE)


#: Whole-number options: ASCII digits only, as the request fields' own (relay_client).
_int_arg: Final = rc._int_arg


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print exactly one JSON object on stdout")
    parser.add_argument("--root", default=argparse.SUPPRESS,
                        help="workspace root holding flow/ (default: $FLOW_ROOT or .)")


# The local-administration commands that are not RPCs: path -> (help, arguments).
_ADMIN: Final[dict[tuple[str, ...], tuple[str, list[tuple[tuple[str, ...], dict[str, Any]]]]]] = {
    ("inspect", "relay"): ("the status projection plus revision, freshness and cursors", []),
    ("bootstrap",): ("record runtime metadata: the endpoint and the token guarding it", [
        (("--endpoint",), {"default": "", "help": "default: http://HOST:PORT from relay.toml"}),
        (("--token-id",), {"default": "", "help": "bind an active token (required off loopback); "
                           "default: keep the bound one; 'none' unbinds it"}),
    ]),
    ("shutdown",): ("record that the relay stopped", []),
    ("token", "create"): ("mint a bearer token; prints it once, stores only its digest", [
        (("--label",), {"default": "", "help": "a note for `token list`"}),
    ]),
    ("token", "list"): ("list tokens (ids, states, never secrets)", []),
    ("token", "rotate"): ("mint a new token, bind it, keep the old one valid for --grace", [
        (("--grace",), {"type": _int_arg, "default": 300, "help": "seconds the old token still works"}),
    ]),
    ("token", "revoke"): ("revoke a token at once", [(("token_id",), {"metavar": "TOKEN_ID"})]),
    ("state", "inventory"): ("every relay artifact with owner, kind and validity", []),
    ("state", "cleanup"): ("remove relay scratch (dry run unless --apply; never the lock)", [
        (("--owner",), {"required": True, "choices": [OWNER]}),
        (("--apply",), {"action": "store_true"}),
    ]),
    ("state", "reset"): ("set a damaged ledger aside so a fresh one can start", [
        (("--owner",), {"required": True, "choices": [OWNER]}),
        (("--apply",), {"action": "store_true"}),
    ]),
    ("gate",): ("check every control-plane invariant; exit 1 naming what failed", []),
    ("serve",): ("serve HTTP, SSE, WebSocket and Connect RPCs until SIGINT/SIGTERM", [
        (("--host",), {"default": None, "help": "default 127.0.0.1 (relay.toml serve.host)"}),
        (("--port",), {"type": _int_arg, "default": None, "help": "default 9876; 0 picks a free port"}),
        (("--log-level",), {"default": None, "choices": list(LOG_LEVELS),
                            "help": "default info (relay.toml serve.log_level)"}),
    ]),
}


def _command_words(argv: list[str] | None) -> tuple[str, ...]:
    """The first two words that are not flags (nor ``--root``'s DIR): the
    command and its subcommand, if it has one."""
    words, found = list(argv if argv is not None else sys.argv[1:]), []
    while words and len(found) < 2:
        word = words.pop(0)
        if word == "--root":
            words[:1] = []
        elif not word.startswith("-"):
            found.append(word)
    return tuple(found)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser.  Given ``argv``, only the named command's subtree is
    built, and of a group only the named subcommand (argparse costs about a
    millisecond per subcommand at start-up, and each builds its request class)."""
    parser = _Parser(
        prog="python -m relay",
        description="flow-relay: lease and track AI coding-agent sessions on this host.",
        epilog="Exit status: 0 done (also `waiting` and `duplicate`), 1 refused, 2 usage error.",
    )
    _common(parser)
    tree: dict[tuple[str, ...], Any] = {(): parser.add_subparsers(metavar="COMMAND", required=True)}
    leaves = [(rpc.cli, rpc.help, rpc) for rpc in rc.RPCS]
    leaves += [(path, help_, args) for path, (help_, args) in _ADMIN.items()]
    words = _command_words(argv)
    for depth in (1, 2):  # the named command's subtree; of a group, the named leaf alone
        if len(words) >= depth and any(path[:depth] == words[:depth] for path, _, _ in leaves):
            leaves = [leaf for leaf in leaves if leaf[0][:depth] == words[:depth]]
    for path, help_, spec in sorted(leaves, key=lambda x: x[0]):
        for depth in range(1, len(path)):
            if path[:depth] not in tree:
                word = path[depth - 1]
                group = tree[path[: depth - 1]].add_parser(word, help=f"{word} commands")
                tree[path[:depth]] = group.add_subparsers(metavar="SUBCOMMAND", required=True)
        leaf = tree[path[:-1]].add_parser(path[-1], help=help_, description=help_)
        _common(leaf)
        if isinstance(spec, rc.Rpc):
            rc.add_request_arguments(leaf, spec.request)
            leaf.set_defaults(_cmd=spec.name, _leaf=leaf)
            if spec.name == "StartTurn":
                leaf.add_argument("--wait", action="store_true",
                                  help="stream the turn here; exit 0 if it completed, else 1")
            if spec.name == "Recover":  # Recover stays a read; --apply calls other RPCs
                leaf.add_argument("--apply", action="store_true",
                                  help="perform what each classification calls for, step by step")
        else:
            for flags, kwargs in spec:
                leaf.add_argument(*flags, **kwargs)
            leaf.set_defaults(_cmd=" ".join(path))
    return parser


def _emit(as_json: bool, doc: dict[str, Any], human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    else:
        sys.stdout.write(human.rstrip("\n") + "\n")
    sys.stdout.flush()


def _describe(name: str, reply: Any) -> str:
    """One human line (or a few) per reply type."""
    if isinstance(reply, rc.LeaseReply):
        x = reply.lease
        line = f"{reply.outcome}: lease {x.lease_id} on {x.session_id} for {x.holder} ({x.mode}, {x.state}"
        if x.state == "active":
            line += f", fencing token {x.fencing_token}, expires {x.expires_at}"
        return line + ")"
    if isinstance(reply, rc.StatusReply):
        return status_text(to_json(reply))
    if isinstance(reply, rc.ListRecordsReply):
        rows = [f"{r.seq}\t{r.appended_at}\t{r.kind}\t{json.dumps(r.data)}" for r in reply.records]
        return "\n".join(rows) or f"no records after that cursor (last seq {reply.last_seq})"
    if isinstance(reply, rc.RepairReply):
        head = f"{reply.session_id}: {reply.outcome}" + (
            f" (replacement {reply.replacement_session_id})" if reply.replacement_session_id else "")
        mark = "done" if reply.applied else "plan"
        rows = [f"  [{mark if x.done or not reply.applied else 'not done'}] {x.action}: {x.reason}"
                for x in reply.steps]
        tail = [] if reply.applied or reply.outcome != "planned" else [
            f"run `python -m relay repair {reply.session_id} --apply` to do it"]
        return "\n".join([head, *rows, *tail])
    if isinstance(reply, rc.RecoverReply):
        rows = [f"{r.session_id}\t{r.classification}\t{r.reason}\t{r.next_command}"
                for r in reply.sessions]
        return "\n".join(rows) or "no sessions"
    for attr in ("profiles", "sessions", "leases"):
        if hasattr(reply, attr) and isinstance(getattr(reply, attr), tuple):
            rows = [" ".join(f"{k}={v}" for k, v in to_json(r).items() if v not in ("", (), []))
                    for r in getattr(reply, attr)]
            return "\n".join(rows) or f"no {attr}"
    doc = to_json(reply)
    head = doc.pop("outcome", name)
    doc.pop("revision", None)
    return f"{head}: " + json.dumps(doc, sort_keys=True)


#: The RPCs the live runtime answers (rows with ``runtime=True``): the CLI sends
#: them to the running server (the endpoint in the ledger's runtime record).
SERVER_RPCS: Final = frozenset(rpc.name for rpc in rc.RPCS if rpc.runtime)


def _run_remote(store: Store, rpc: rc.Rpc, request: Any, args: argparse.Namespace,
                as_json: bool) -> int:
    with rc.RelayStub(root=store.root, timeout=rc.DEFAULT_TIMEOUT) as stub:
        reply = getattr(stub, rpc.method)(request)
        _emit(as_json, to_json(reply), _describe(rpc.name, reply))
        if rpc.name == "StartTurn" and getattr(args, "wait", False):
            return _wait_turn(stub, reply.turn, as_json)
    return EXIT_OK


def _wait_turn(stub: Any, turn: rc.Turn, as_json: bool) -> int:
    """Print the turn's events as they are committed; 0 if it completed, else 1."""
    seq = 0
    for record in stub.list_events(session_id=turn.session_id, limit=10_000).records:
        if isinstance(record.data, dict) and record.data.get("turn_id") == turn.turn_id:
            seq = record.seq - 1
            break
    else:
        seq = stub.list_events(session_id=turn.session_id, limit=1).last_seq
    with stub.watch_events(turn.session_id, after=seq) as records:
        for record in records:
            data = record.data if isinstance(record.data, dict) else {}
            if data.get("turn_id") != turn.turn_id:
                continue
            text = data.get("text") or data.get("output") or data.get("error") or ""
            _emit(as_json, to_json(record), f"{record.kind}\t{text}".rstrip())
            if record.kind in _END_STATES:
                return EXIT_OK if record.kind == "turn.completed" else EXIT_REFUSED
    return EXIT_REFUSED


def _run_rpc(store: Store, config: Config, rpc: rc.Rpc, request: Any, args: argparse.Namespace,
             as_json: bool) -> int:
    if rpc.streams:
        return _follow(store, config, rpc, request)
    if rpc.name == "Recover" and getattr(args, "apply", False):
        validate_request(request)
        return _recover_apply(store, config, request, as_json)
    if rpc.runtime:  # it needs running providers: the running server answers it
        validate_request(request)
        dry_run = _LEDGER_DRY_RUNS.get(rpc.name)
        if dry_run is not None and not request.apply and not _serving(store):
            reply = dry_run(store.read() or Ledger(), request, time.time())
            _emit(as_json, to_json(reply), _describe(rpc.name, reply))
            return EXIT_OK
        try:
            return _run_remote(store, rpc, request, args, as_json)
        except Unavailable as exc:
            if getattr(request, "apply", False):
                raise Unavailable(f"{exc.message}: repairing needs the running server (it owns "
                                  "the provider processes)",
                                  hint=f"start `python -m relay serve`, then run `python -m relay "
                                  f"{' '.join(rpc.cli)} {request.session_id} --apply`") from None
            raise
    if rpc.mutates:
        reply = commit_one(store, rpc_mutation(rpc, request), config)
        _failpoint("before_ack")
    else:
        validate_request(request)
        reply = read_rpc(store, rpc, request, time.time())
    _emit(as_json, to_json(reply), _describe(rpc.name, reply))
    return EXIT_OK


#: Runtime rows whose dry run (``apply`` false) the ledger alone answers when no server runs.
_LEDGER_DRY_RUNS: Final = {
    "RepairSession": lambda ledger, req, now: repair_plan(ledger, req.session_id, iso(now)),
}


def _serving(store: Store) -> bool:
    """Whether the ledger names a serving relay whose process is alive."""
    try:
        ledger = store.read()
    except LedgerInvalid:
        return False
    runtime = ledger.runtime if ledger is not None else rc.Runtime()
    return runtime.status == "serving" and runtime.pid > 0 and _pid_alive(runtime.pid)


def _recover_apply(store: Store, config: Config, request: rc.RecoverRequest, as_json: bool) -> int:
    """``recover --apply``: ``rc.apply_recovery`` over the ledger, each step
    printed.  Repairs go to the running server (without one they fail, saying
    so); replacements are CreateSession commits."""
    ledger = store.read() or Ledger()
    recoveries = recover(ledger, request, time.time()).sessions
    stub = None

    def repair(sid: str) -> rc.RepairReply:
        nonlocal stub
        if not _serving(store):
            raise Unavailable("repairing needs the running server (it owns the provider processes)",
                              hint="start `python -m relay serve`, then run `python -m relay "
                              "recover --apply` again")
        stub = stub or rc.RelayStub(root=store.root, timeout=rc.DEFAULT_TIMEOUT)
        return stub.repair_session(session_id=sid, apply=True)

    def create(profile: str, sid: str) -> rc.SessionReply:
        return commit_one(store, rpc_mutation("CreateSession", rc.CreateSessionRequest(
            profile, replaces=sid)), config)

    try:
        steps = rc.apply_recovery(recoveries, dict(ledger.sessions), dict(ledger.profiles),
                                  repair, create)
    finally:
        if stub is not None:
            stub.close()
    after = recover(store.read() or Ledger(), request, time.time()).sessions
    _emit(as_json, {"applied": True, "steps": steps, "sessions": [to_json(r) for r in after]},
          "\n".join(f"{x['session_id']}\t{x['classification']}\t{x['action']}\t{x['outcome']}"
                    f"\t{x['reason']}" for x in steps) or "no sessions")
    return EXIT_REFUSED if any(x["outcome"] == "failed" for x in steps) else EXIT_OK


def _follow(store: Store, config: Config, rpc: rc.Rpc, request: Any) -> int:
    """A server-stream row with no server: follow one session's log on disk
    (what a serving relay's watcher reads), a JSON line per record, until
    interrupted.  The relay feed lives in a server's memory: refused."""
    if not rpc.stream:
        raise FailedPrecondition(f"{' '.join(rpc.cli)} needs a serving relay (the feed is kept "
                                 "in its memory)", hint=f"python -m relay_client {rpc.method}")
    if not request.session_id:
        raise InvalidArgument(f"{' '.join(rpc.cli)} without a server follows one session",
                              hint=f"pass --session S, or run python -m relay_client {rpc.method}")
    lister = rc.RPC_LISTING[rpc.stream]  # the read row listing that stream
    page = functools.partial(read_rpc, store, lister)
    if request.last_event_id:
        cursor = parse_stream_cursor(request.last_event_id)
        if set(cursor) != {request.session_id}:
            raise InvalidArgument(f"--last-event-id {request.last_event_id!r} is not "
                                  f"{request.session_id}:SEQ", hint="send back an id this stream sent")
        after = cursor[request.session_id]
    else:  # from now
        after = page(rc.ListRecordsRequest(request.session_id, limit=1), time.time()).last_seq
    try:
        while True:
            reply = page(rc.ListRecordsRequest(request.session_id, after, limit=1000), time.time())
            for record in reply.records:
                sys.stdout.write(json.dumps(to_json(record), sort_keys=True) + "\n")
                after = record.seq
            sys.stdout.flush()
            if not reply.records:
                time.sleep(config.watch_interval_seconds)
    except KeyboardInterrupt:
        return EXIT_OK


def _admin_mutation(store: Store, config: Config, fn: Callable[[Ledger, Ctx], Any]) -> Any:
    """Commit a local-administration change (bootstrap, tokens)."""
    reply = commit_one(store, Mutation(fn, "admin"), config)
    _failpoint("before_ack")
    return reply


def _token_doc(token: TokenRecord, stamp: str) -> dict[str, Any]:
    doc = attrs.asdict(token)
    doc.pop("digest")
    doc["usable"] = token.state == "active" or (token.state == "rotated" and token.grace_until > stamp)
    return doc


def _run_admin(store: Store, config: Config, args: argparse.Namespace, as_json: bool) -> int:
    cmd = args._cmd
    if cmd == "inspect relay":
        doc = inspect_relay(store, config, time.time())
        _emit(as_json, doc, _describe("status", from_json(rc.StatusReply, {
            k: v for k, v in doc.items() if k != "detail"})) +
            f"\nupdated {doc['detail']['updated_at'] or 'never'}; "
            f"{len(doc['detail']['cursors'])} stream cursors")
        return EXIT_OK
    if cmd == "bootstrap":
        endpoint = args.endpoint or f"http://{config.host}:{config.port}"
        runtime = _admin_mutation(store, config,
                                  lambda led, ctx: bootstrap(led, endpoint, args.token_id, ctx))
        _emit(as_json, {"outcome": "bootstrapped", "runtime": to_json(runtime)},
              f"bootstrapped: {runtime.endpoint} ({runtime.mode})")
        return EXIT_OK
    if cmd == "shutdown":
        runtime = _admin_mutation(store, config, shutdown)
        _emit(as_json, {"outcome": "stopped", "runtime": to_json(runtime)},
              f"stopped at {runtime.shutdown_at}")
        return EXIT_OK
    if cmd.startswith("token "):
        return _run_token(store, config, args, as_json)
    if cmd.startswith("state "):
        return _run_state(store, config, args, as_json)
    if cmd == "gate":
        return _run_gate(store, config, as_json)
    if cmd == "serve":
        return _run_serve(store, config, args, as_json)
    raise AssertionError(cmd)


def _run_token(store: Store, config: Config, args: argparse.Namespace, as_json: bool) -> int:
    import secrets

    cmd = args._cmd
    stamp = iso(time.time())
    if cmd == "token list":
        ledger = store.read() or Ledger()
        rows = [_token_doc(t, stamp) for _, t in sorted(ledger.tokens.items())]
        bound = ledger.runtime.token_id
        _emit(as_json, {"tokens": rows, "runtime_token_id": bound},
              "\n".join(f"{r['token_id']}\t{r['state']}\t{r['label']}"
                        f"{'  (bound to runtime)' if r['token_id'] == bound else ''}"
                        for r in rows) or "no tokens")
        return EXIT_OK
    if cmd == "token revoke":
        check_id("token id", args.token_id)
        token = _admin_mutation(store, config,
                                lambda led, ctx: revoke_token(led, args.token_id, ctx))
        _emit(as_json, {"outcome": "revoked", "token": _token_doc(token, stamp)},
              f"revoked {token.token_id}")
        return EXIT_OK
    raw = "frt_" + secrets.token_urlsafe(32)
    if cmd == "token create":
        token = _admin_mutation(
            store, config, lambda led, ctx: create_token(led, args.label, token_digest(raw), ctx))
        next_step = f"bind it with `python -m relay bootstrap --token-id {token.token_id}`"
    else:
        token = _admin_mutation(
            store, config, lambda led, ctx: rotate_token(led, args.grace, token_digest(raw), ctx))
        next_step = "callers must switch to the new token before the grace period ends"
    _emit(as_json, {"outcome": cmd.split()[1] + "d", "token": _token_doc(token, stamp),
                    "secret": raw, "note": "shown once; only its SHA-256 digest is stored"},
          f"{token.token_id}: {raw}\nshown once; only its SHA-256 digest is stored; {next_step}")
    return EXIT_OK


def _run_state(store: Store, config: Config, args: argparse.Namespace, as_json: bool) -> int:
    cmd = args._cmd
    if cmd == "state inventory":
        rows = inventory(store)
        _, warnings = _ledger_or_warning(store)
        _emit(as_json, {"artifacts": rows, "warnings": [to_json(w) for w in warnings]},
              "\n".join(f"{r['path']}\t{r['kind']}\t{'valid' if r['valid'] else 'INVALID'}"
                        f"\t{r['note']}" for r in rows) or "no relay artifacts")
        return EXIT_OK
    if cmd == "state cleanup":
        return _cleanup(store, args.apply, as_json)
    return _reset(store, args.apply, as_json)


def _cleanup(store: Store, apply: bool, as_json: bool) -> int:
    if apply:
        with store.locked():
            doomed = cleanup_plan(store)
            for path in doomed:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    else:
        doomed = cleanup_plan(store)
    names = [_rel(store, p) for p in doomed]
    verb = "removed" if apply else "would remove"
    _emit(as_json, {"applied": apply, "paths": names, "preserved": [_rel(store, store.lock_path)]},
          f"{verb} {len(names)} relay scratch files; kept {_rel(store, store.lock_path)}"
          + ("" if apply or not names else "\nrun again with --apply to remove them"))
    return EXIT_OK


def _reset(store: Store, apply: bool, as_json: bool) -> int:
    """Move a damaged ledger aside, with the stream logs and archive it owned:
    a fresh ledger restarts revisions and ids, so an old ``ses-2`` log left in
    place would be cut to the new session's committed length (zero)."""
    warnings = _reset_refusal(store)
    stamp = iso(time.time()).replace(":", "").replace("-", "")
    aside = store.state_dir / SET_ASIDE_DIR / stamp
    target = aside / LEDGER_NAME
    if apply:
        with store.locked():
            warnings = _reset_refusal(store)  # again, under the lock: it may have been fixed
            _make_dirs(aside)
            for name in (STREAMS_DIR, ARCHIVE_DIR, REQUESTS_DIR):
                if (store.state_dir / name).exists():
                    os.replace(store.state_dir / name, aside / name)
            os.replace(store.ledger_path, target)
            if store.journal_path.exists():  # its records name the checkpoint moved aside
                os.replace(store.journal_path, aside / JOURNAL_NAME)
            _fsync_dir(aside)
            _fsync_dir(store.state_dir)
    verb = "moved" if apply else "would move"
    _emit(as_json, {"applied": apply, "from": _rel(store, store.ledger_path),
                    "to": _rel(store, target), "reason": warnings[0].message},
          f"{verb} {_rel(store, store.ledger_path)} to {_rel(store, target)} "
          f"({warnings[0].message})" + ("" if apply else "\nrun again with --apply to do it"))
    return EXIT_OK


def _reset_refusal(store: Store) -> list[rc.StateWarning]:
    _, warnings = _ledger_or_warning(store)
    if not warnings:
        raise FailedPrecondition("the ledger is valid (or absent); there is nothing to reset",
                                 hint="see `python -m relay status`")
    return warnings


def _run_gate(store: Store, config: Config, as_json: bool) -> int:
    checks = gate(store, config)
    failed = any(c.result == "fail" for c in checks)
    _emit(as_json, {"status": "fail" if failed else "pass", "checks": [attrs.asdict(c) for c in checks]},
          _gate_text(checks))
    return EXIT_REFUSED if failed else EXIT_OK


def _run_serve(store: Store, config: Config, args: argparse.Namespace, as_json: bool) -> int:
    """Serve in the foreground until SIGINT/SIGTERM; exit 0 after a clean stop."""
    host = args.host or config.host
    port = config.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"port {port} is out of range 0..65535", hint="0 picks a free port")
    require_serving_allowed(store.read(), host)  # refuse before importing the stack
    _configure_logging(args.log_level or config.log_level)
    tune_malloc()  # before trio starts the threads that would each get a heap

    async def run() -> None:
        # The receiver stays open until the stop is recorded, so a second
        # signal (an impatient operator, a forwarding supervisor) cannot
        # interrupt the drain half-way.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                # task_status passes through to serve, which calls started().
                async def serve_then_stop(  # noqa: ASYNC128
                        task_status: TaskStatus[Server] = _TASK_STATUS_IGNORED) -> None:
                    await serve(store, config, host=host, port=port, task_status=task_status)
                    nursery.cancel_scope.cancel()

                server = await nursery.start(serve_then_stop)
                _emit(as_json, {"endpoint": server.endpoint, "pid": os.getpid()},
                      f"serving on {server.endpoint}")
                async for signum in signals:
                    if not server.stopping:
                        _logger("serve").info("%s: finishing in-flight requests",
                                              signal.Signals(signum).name)
                        server.stop()

    try:
        trio.run(run)
    except* OSError as group:  # e.g. the port is taken: one line, not a traceback
        exc = _first_leaf(group)
        raise rc.Unavailable(f"cannot serve on {host}:{port}: {getattr(exc, 'strerror', None) or exc}",
                             hint="pick another --port (0 picks a free one)") from None
    except* RelayError as group:
        import copy

        # A copy, chained to the group: raising the child itself would graft
        # this frame onto its traceback and lose the group's context.
        raise copy.copy(_first_leaf(group)) from group
    return EXIT_OK


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first exception in a (nested: one per trio nursery) group that is not a group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _root(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "root", None) or os.environ.get("FLOW_ROOT") or ".").absolute()


def main(argv: list[str] | None = None) -> int:
    """The CLI entry point; returns the exit status."""
    _Parser.wants_json = "--json" in (sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    as_json = getattr(args, "json", False)
    rpc = rc.RPC_BY_NAME.get(args._cmd)
    if rpc is None or rpc.streams or rpc.runtime or rpc.name == "Recover":
        gc.enable()  # (a one-commit or one-read RPC leaves it off: see the module's start)
    request = rc.request_from_arguments(args._leaf, rpc, args) if rpc else None  # usage first
    try:
        store = Store(_root(args))
        config = load_config(store.flow)
        if rpc is not None:
            return _run_rpc(store, config, rpc, request, args, as_json)
        return _run_admin(store, config, args, as_json)
    except RelayError as exc:
        return _refuse(exc, as_json)
    except OSError as exc:  # the disk, on a read not wrapped where it happens
        if os.environ.get("RELAY_DEBUG"):
            raise
        return _refuse(_io_failure(f"run `{args._cmd}`", exc, _root(args)), as_json)
    except (ValueError, RecursionError) as exc:
        # Not a refusal we foresaw: still one clear line and a non-zero exit,
        # never a traceback (RELAY_DEBUG=1 shows it).
        if os.environ.get("RELAY_DEBUG"):
            raise
        return _refuse(Internal(f"unexpected {type(exc).__name__}: {exc}",
                                hint="run `python -m relay gate`; RELAY_DEBUG=1 shows the traceback"),
                       as_json)


def _refuse(exc: RelayError, as_json: bool) -> int:
    if as_json:
        _emit(True, {"error": {"code": exc.code.value, "message": exc.message, "hint": exc.hint}}, "")
    else:
        print(f"relay: {exc.message}" + (f"; next: {exc.hint}" if exc.hint else ""), file=sys.stderr)
    return EXIT_REFUSED


def _exit_now(status: int) -> None:
    """Run the atexit hooks, flush and leave without tearing the interpreter
    down: freeing every module and object of a CLI run costs about 10 ms (a
    tenth of a mutation), and nothing of the relay's needs it (its files are
    closed, its commits durable; a served relay has stopped by now)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(int(status or 0))


if __name__ == "__main__":
    _exit_now(main())
