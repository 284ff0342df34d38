"""The store under attack: a lock file deleted while writers race, reads racing
commits, appends into a truncated stream log, and disk faults on every step of
the write path (issue 8, defects 1, 3, 5 and 10).

The race tests run a real ``python -m relay serve`` process and real sockets;
they are bounded by counts, never by time, and wait on printed lines.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx2
import pytest
from conftest import ROOT, T0, commit_ok, mutation, run_cli

import relay
import relay_client as rc


def env() -> dict[str, str]:
    full = dict(os.environ, PYTHONPATH=str(ROOT))
    full.pop("RELAY_FAILPOINT", None)
    return full


def seeded(root: Path, *sessions: str) -> relay.Store:
    store = relay.Store(root)
    now = time.time()
    commit_ok(store, "RegisterProfile", now=now, name="cx", provider="codex", mode="pooled")
    for sid in sessions:
        commit_ok(store, "CreateSession", now=now, profile="cx", session_id=sid)
    return store


@contextlib.contextmanager
def served(root: Path):
    """A real ``python -m relay serve --port 0`` process; yields its endpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "relay", "--root", str(root), "serve", "--port", "0",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), cwd=str(root))
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        yield json.loads(line)["endpoint"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def run_until_done(workers: list[threading.Thread], done: threading.Event,
                   watchers: list[threading.Thread]) -> None:
    """Run both groups of threads; once every worker is through, set ``done``
    (the watchers' cue to stop) and wait for the watchers."""
    for thread in workers + watchers:
        thread.start()
    for thread in workers:
        thread.join()
    done.set()
    for thread in watchers:
        thread.join()


def append_url() -> str:
    return f"/{rc.SERVICE}/AppendEvent"


# -- defect 1: deleting the lock file must not break mutual exclusion -----------


class LockVandal(threading.Thread):
    """Removes and replaces what lives under flow/tmp in a tight loop, as a
    hostile operator or an over-eager cleanup script would."""

    def __init__(self, store: relay.Store) -> None:
        super().__init__(daemon=True)
        self.store, self.stop, self.strikes = store, threading.Event(), 0

    def run(self) -> None:
        lock, tmp = self.store.lock_path, self.store.tmp_dir
        while not self.stop.is_set():
            self.strikes += 1
            with contextlib.suppress(OSError):
                if self.strikes % 50 == 0:
                    shutil.rmtree(tmp)  # the whole scratch tree
                elif self.strikes % 7 == 0:  # replaced by another file
                    fresh = tmp / f"vandal.{self.strikes}"
                    fresh.write_bytes(b"")
                    os.replace(fresh, lock)
                else:
                    os.unlink(lock)


@pytest.mark.slow
def test_lock_file_deleted_in_a_tight_loop_loses_no_acknowledged_append(tmp_path):
    """HTTP and CLI appenders on one session while the lock file is deleted, replaced and its
    directory removed over and over: every acknowledged append is there exactly once."""
    root = tmp_path / "ws"
    store = seeded(root, "s1")
    acked: list[tuple[str, int]] = []
    refused: list[str] = []
    clis_done = threading.Event()

    def http_loop(endpoint: str, t: int) -> None:
        with httpx2.Client(base_url=endpoint, timeout=30) as client:
            for i in range(120):
                if clis_done.is_set() and i >= 20:
                    break
                tag = f"h{t}-{i}"
                r = client.post(append_url(), json={"session_id": "s1", "kind": "http", "data": tag})
                if r.status_code == 200:
                    acked.append((tag, r.json()["record"]["seq"]))
                else:
                    refused.append(r.text)

    def cli_loop(t: int) -> None:
        for i in range(10):
            tag = f"c{t}-{i}"
            code, out, err = run_cli(root, "event", "append", "--session", "s1", "--kind", "cli",
                                     "--data", json.dumps(tag), "--json", check=None)
            if code == 0:
                acked.append((tag, json.loads(out)["record"]["seq"]))
            else:
                refused.append(err)

    vandal = LockVandal(store)
    with served(root) as endpoint:
        vandal.start()
        https = [threading.Thread(target=http_loop, args=(endpoint, t)) for t in range(4)]
        clis = [threading.Thread(target=cli_loop, args=(t,)) for t in range(2)]
        run_until_done(clis, clis_done, https)
        vandal.stop.set()
        vandal.join()
    assert vandal.strikes > 100
    ledger = store.read()
    cursor = ledger.cursors["s1"]
    records = list(store.scan_records("s1", "events", cursor.events_bytes))
    assert [r.seq for r in records] == list(range(1, cursor.events + 1))  # contiguous
    stored = Counter(r.data for r in records)
    assert len(acked) > 100
    assert all(stored[tag] == 1 for tag, _ in acked), "an acknowledged append is lost or doubled"
    by_tag = {r.data: r.seq for r in records}
    assert all(by_tag[tag] == seq for tag, seq in acked)
    assert refused == []
    gate = json.loads(run_cli(root, "gate", "--json")[1])
    checks = {c["id"]: c["result"] for c in gate["checks"]}
    assert checks["streams_valid"] == "pass" and gate["status"] == "pass", gate


def blocked_on_flock() -> bool:
    """Whether a thread of this process waits for a flock (``->`` rows of /proc/locks)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and fields[5] == str(os.getpid()):
            return True
    return False


def replace_lock(store: relay.Store) -> None:
    fresh = store.tmp_dir / "fresh"
    fresh.write_bytes(b"")
    os.replace(fresh, store.lock_path)


@pytest.mark.parametrize("vandalise", [
    lambda store: os.unlink(store.lock_path),
    replace_lock,
    lambda store: shutil.rmtree(store.tmp_dir),
], ids=["unlinked", "replaced", "directory-removed"])
def test_lock_survives_unlink_and_replacement_while_held(tmp_path, vandalise):
    """A second locker blocks while the first holds the lock, whatever happened to the lock
    file meanwhile; it gets the lock once the first lets go."""
    store = seeded(tmp_path, "s1")
    inside: list[bool] = []
    released = threading.Event()

    def second() -> None:
        with relay.Store(tmp_path).locked():
            inside.append(released.is_set())

    other = threading.Thread(target=second)
    with store.locked():
        vandalise(store)
        other.start()
        deadline = time.monotonic() + 10
        while not inside and not blocked_on_flock():  # wait until it blocks (or gets in)
            assert time.monotonic() < deadline, "the second locker neither blocked nor entered"
        assert inside == [], "two holders of the mutation lock at once"
        released.set()
    other.join()
    assert inside == [True]
    assert store.lock_path.exists()


# -- defect 3: reads racing commits see one whole revision ------------------------


@contextlib.contextmanager
def fine_grained_switching():
    """Make the GIL hand over between threads every microsecond, so races show."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def race(*loops) -> list[BaseException]:
    """Run the loops in threads at once; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(loops))

    def guarded(loop) -> None:
        start.wait()
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001, ASYNC103 - a thread's, collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(loop,)) for loop in loops]
    with fine_grained_switching():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return errors


def test_reads_racing_writes_on_one_store_each_see_a_whole_revision(tmp_path):
    """Store.read() in three threads while a fourth writes revision after revision to the
    same Store: no read fails, and each returns, whole, a ledger that some write wrote."""
    store = seeded(tmp_path, "s1")
    base = store.read()
    written = {base.revision: base}
    seen: list[relay.Ledger] = []
    readers_done = threading.Event()

    def writer() -> None:
        revision = base.revision
        while not readers_done.is_set():
            revision += 1
            written[revision] = relay.attrs.evolve(base, revision=revision,
                                                   updated_at=relay.iso(T0 + revision))
            store.write(written[revision])

    def reader() -> None:
        for _ in range(10_000):
            seen.append(store.read())

    def readers() -> None:
        try:
            assert race(reader, reader, reader) == []
        finally:
            readers_done.set()

    assert race(writer, readers) == []
    assert len(written) > 10
    assert all(written[ledger.revision] == ledger for ledger in seen)
    assert store.read() == written[max(written)]


def test_ledger_encoding_in_many_threads_is_exact(tmp_path):
    """encode_ledger shares one fragment cache; concurrent encodes of different ledgers (as
    several stores in one process make) raise nothing and each gives its ledger's bytes."""
    one = seeded(tmp_path, "s1").read()
    template = one.sessions["s1"]

    def ledger_with(prefix: str, n: int, state: str) -> relay.Ledger:
        sessions = {f"{prefix}{j}": relay.attrs.evolve(template, session_id=f"{prefix}{j}", state=state)
                    for j in range(n)}
        return relay.attrs.evolve(one, sessions=sessions)

    bases = [ledger_with(f"w{i}x", 40, "ready") for i in range(6)]
    out: list[tuple[relay.Ledger, bytes]] = []

    def encoder(base: relay.Ledger):
        def loop() -> None:
            for n in range(1000):  # fresh records each time: new fragments, then eviction
                sessions = dict(base.sessions)
                sid = f"n{n % 50}"
                sessions[sid] = relay.attrs.evolve(template, session_id=sid,
                                                   state="ready" if n % 2 else "failed")
                ledger = relay.attrs.evolve(base, sessions=sessions)
                data = relay.encode_ledger(ledger)
                if n % 25 == 0:
                    out.append((ledger, data))
        return loop

    assert race(*(encoder(base) for base in bases)) == []
    for ledger, data in out:
        assert data == relay._canonical(relay.to_json(ledger))[:-1] + data[data.rfind(b',"checksum"'):]
        assert relay.decode_ledger(data) == ledger


@pytest.mark.slow
def test_reads_racing_commits_over_http_never_answer_5xx(tmp_path):
    """A real server under concurrent AppendEvent POSTs and event/status/ListEvents reads
    answers every read whole: no 5xx, and each listing is gapless from where it starts."""
    root = tmp_path / "ws"
    seeded(root, "s1")
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    writers_done = threading.Event()

    def appender(endpoint: str, t: int) -> None:
        with httpx2.Client(base_url=endpoint, timeout=30) as client:
            for i in range(120):
                r = client.post(append_url(), json={"session_id": "s1", "kind": "k", "data": f"{t}-{i}"})
                statuses[r.status_code] += 1

    def reader(endpoint: str, t: int) -> None:
        with httpx2.Client(base_url=endpoint, timeout=30) as client:
            for i in range(2000):
                if writers_done.is_set():
                    break
                after = i % 50
                if i % 3 == 0:
                    r = client.get("/api/relay/events", params={"session": "s1", "after": after,
                                                                "limit": 5})
                elif i % 3 == 1:
                    r = client.post(f"/{rc.SERVICE}/ListEvents",
                                    json={"session_id": "s1", "after": after, "limit": 5})
                else:
                    r = client.get("/api/relay/status")
                statuses[r.status_code] += 1
                if r.status_code >= 500:
                    bad.append(r.text)
                elif i % 3 != 2:
                    seqs = [x["seq"] for x in r.json()["records"]]
                    if seqs != list(range(after + 1, after + 1 + len(seqs))):
                        bad.append(f"not gapless after {after}: {seqs}")

    with served(root) as endpoint:
        writers = [threading.Thread(target=appender, args=(endpoint, t)) for t in range(3)]
        readers = [threading.Thread(target=reader, args=(endpoint, t)) for t in range(6)]
        run_until_done(writers, writers_done, readers)
    assert bad == [], (len(bad), bad[:3])
    assert statuses[200] == sum(statuses.values()) and statuses[200] > 600, statuses


# -- defect 5: a log shorter than its committed cursor refuses appends ------------


def state_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under flow/state (what is durable)."""
    base = root / "flow" / "state"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def three_events(root: Path) -> relay.Store:
    store = seeded(root, "s1", "s2")
    for i in range(3):
        commit_ok(store, "AppendEvent", now=time.time(), session_id="s1", kind="k", data=i)
    return store


def truncate_half(store: relay.Store) -> Path:
    log = store.stream_path("s1", "events")
    os.truncate(log, log.stat().st_size // 2)
    return log


def assert_names_the_repair(error: dict, log: Path) -> None:
    assert error["code"] == "data_loss"
    assert str(log) in error["message"] and "nothing was changed" in error["message"]
    assert "python -m relay gate" in error["hint"] and "quarantine session s1" in error["hint"]


async def test_append_over_http_into_a_truncated_log_is_refused_as_data_loss(tmp_path):
    """Truncated below its cursor, a log refuses AppendEvent with data_loss naming the log and
    the repair; nothing durable changes, other sessions append as usual, and once the log is
    restored appends go on from the next seq."""
    from serve_helpers import PATIENCE, serving

    import trio

    store = three_events(tmp_path)
    whole = store.stream_path("s1", "events").read_bytes()
    log = truncate_half(store)
    with trio.fail_after(PATIENCE):
        async with serving(tmp_path) as r:
            before = state_files(tmp_path)
            refused = await r.refused("AppendEvent", "data_loss", session_id="s1", kind="k", data="x")
            assert_names_the_repair(refused, log)
            assert state_files(tmp_path) == before
            await r.refused("ListEvents", "data_loss", session_id="s1")
            assert (await r.ok("AppendEvent", session_id="s2", kind="k"))["record"]["seq"] == 1
            log.write_bytes(whole)  # restored from a backup
            assert (await r.ok("AppendEvent", session_id="s1", kind="k"))["record"]["seq"] == 4
    committed = relay.Store(tmp_path).read().cursors["s1"].events_bytes
    assert [x.seq for x in store.scan_records("s1", "events", committed)] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_cli_append_into_a_short_or_missing_log_is_refused_as_data_loss(tmp_path, damage):
    """The CLI refuses the same way, exit 1 with one line; a missing log is not re-created."""
    store = three_events(tmp_path)
    log = store.stream_path("s1", "events")
    if damage == "truncated":
        truncate_half(store)
    else:
        log.unlink()
    before = state_files(tmp_path)
    code, out, err = run_cli(tmp_path, "event", "append", "--session", "s1", "--kind", "k", "--json",
                             check=1)
    assert_names_the_repair(json.loads(out)["error"], log)
    code, out, err = run_cli(tmp_path, "event", "append", "--session", "s1", "--kind", "k", check=1)
    state = "is missing" if damage == "missing" else f"is {log.stat().st_size} B, shorter than"
    assert err.count("\n") == 1 and state in err and err.startswith("relay: the events log")
    assert state_files(tmp_path) == before
    assert log.exists() == (damage == "truncated")


def test_a_short_log_refuses_only_its_own_appends_in_a_group_commit(tmp_path):
    """In one batch the appends to the damaged log get data_loss; the rest is applied."""
    store = three_events(tmp_path)
    truncate_half(store)
    start = store.read()
    results, ledger = relay.commit(store, [
        mutation("AppendEvent", session_id="s1", kind="k"),
        mutation("AppendResult", session_id="s1", kind="k"),  # another log of the same session
        mutation("AppendEvent", session_id="s2", kind="k"),
        mutation("AppendEvent", session_id="s1", kind="k"),
    ], relay.Config(), time.time())
    assert [isinstance(r, rc.DataLoss) for r in results] == [True, False, False, True]
    assert ledger.revision == start.revision + 2
    assert ledger.cursors["s1"].events_bytes == start.cursors["s1"].events_bytes
    assert (results[1].record.seq, results[2].record.seq) == (1, 1)


def test_store_append_never_grows_a_short_log(tmp_path):
    """Store.append_records itself (the last line, should a log shrink after the commit's
    check) refuses a log shorter than committed, and leaves it as it is."""
    store = three_events(tmp_path)
    log = truncate_half(store)
    size, committed = log.stat().st_size, store.read().cursors["s1"].events_bytes
    record = rc.StreamRecord("s1", 4, "k", None, relay.iso(T0))
    with pytest.raises(rc.DataLoss, match="shorter than its committed"):
        store.append_records("s1", "events", committed, [record])
    assert log.stat().st_size == size


# -- defect 10: disk faults are `unavailable`, one line naming errno and path -----

RETAIN = relay.Config(lease_retention_seconds=10, compact_interval_seconds=1)


def with_history(root: Path) -> relay.Store:
    """Events on s1 and a released lease that the next commit archives."""
    store = three_events(root)
    now = time.time()
    lease = commit_ok(store, "GrantLease", now=now, config=RETAIN, session_id="s2", holder="h",
                      mode="shared-read").lease
    commit_ok(store, "ReleaseLease", now=now, config=RETAIN, lease_id=lease.lease_id)
    return store


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


#: (case, os function, does this call fail?, errno): one step of the write path each.
FAULTS = [
    ("state-dir-lock", "open", lambda s, a: os.fspath(a[0]) == os.fspath(s.state_dir), errno.EACCES),
    ("lock-open", "open", lambda s, a: os.fspath(a[0]) == os.fspath(s.lock_path), errno.EROFS),
    ("tmp-mkdir", "mkdir", lambda s, a: os.fspath(a[0]) == os.fspath(s.tmp_dir), errno.EROFS),
    ("archive-open", "open", lambda s, a: os.fspath(a[0]).endswith("leases.jsonl"), errno.ENOSPC),
    ("log-write", "write", lambda s, a: fd_path(a[0]).endswith("events.log"), errno.ENOSPC),
    ("temp-open", "open", lambda s, a: relay.TEMP_PREFIX in os.fspath(a[0]), errno.EROFS),
    ("temp-write", "write", lambda s, a: relay.TEMP_PREFIX in fd_path(a[0]), errno.ENOSPC),
    ("temp-fsync", "fsync", lambda s, a: relay.TEMP_PREFIX in fd_path(a[0]), errno.EIO),
    ("rename", "replace", lambda s, a: os.fspath(a[1]) == os.fspath(s.ledger_path), errno.EROFS),
    ("dir-fsync", "fsync", lambda s, a: fd_path(a[0]) == os.fspath(s.state_dir)  # once renamed
     and b'"s3":' in s.ledger_path.read_bytes(), errno.EIO),
]


def inject(monkeypatch, store: relay.Store, name: str, fails, code: int) -> list[int]:
    """Make ``os.<name>`` raise OSError(code) whenever ``fails(store, args)``; the hits."""
    real, hits = getattr(os, name), []

    def faulty(*args, **kwargs):
        if fails(store, args):
            hits.append(code)
            path = args[0] if isinstance(args[0], (str, os.PathLike)) else None
            raise OSError(code, os.strerror(code), *([path] if path is not None else []))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, faulty)
    return hits


@pytest.mark.parametrize(("case", "name", "fails", "code"), FAULTS, ids=[f[0] for f in FAULTS])
def test_every_disk_fault_on_the_write_path_is_unavailable_naming_errno_and_path(
        tmp_path, monkeypatch, case, name, fails, code):
    """Each step of a commit (locks, directories, archive, stream append, temp file, rename,
    directory fsync) failing with a disk errno refuses with `unavailable`: one line with the
    errno's name and a path, a next step, nothing acknowledged; the retry succeeds."""
    store = with_history(tmp_path)
    if case == "tmp-mkdir":
        shutil.rmtree(store.tmp_dir)
    old = store.ledger_path.read_bytes()
    batch = [mutation("AppendEvent", session_id="s1", kind="k", data="x", request_id="r1"),
             mutation("CreateSession", profile="cx", session_id="s3")]
    later = time.time() + 100  # the released lease is due for the archive
    with monkeypatch.context() as m:
        hits = inject(m, store, name, fails, code)
        with pytest.raises(rc.Unavailable) as info:
            relay.commit(store, batch, RETAIN, later)
    assert hits, "the fault was never reached"
    error = info.value
    assert error.code == rc.Code.UNAVAILABLE and error.code.http_status == 503
    assert "\n" not in error.message + error.hint and error.hint
    assert f"{errno.errorcode[code]}: {os.strerror(code).lower()}: {tmp_path}" in error.message
    if case == "dir-fsync":
        assert "not acknowledged" in error.message
    else:
        assert "nothing was changed" in error.message
        assert store.ledger_path.read_bytes() == old
    results, _ = relay.commit(relay.Store(tmp_path), batch, RETAIN, later + 1)  # disk fixed
    assert results[0].record.seq == 4  # the first try applied once (dir-fsync) or not at all
    assert relay.Store(tmp_path).read().cursors["s1"].events == 4


async def test_read_only_lock_over_http_is_503_unavailable(tmp_path, monkeypatch):
    """Over HTTP the same fault is HTTP 503 `unavailable` with the line, not 500 internal."""
    from serve_helpers import PATIENCE, serving

    import trio

    store = three_events(tmp_path)
    with trio.fail_after(PATIENCE):
        async with serving(tmp_path) as r:
            with monkeypatch.context() as m:
                inject(m, store, "open", FAULTS[1][2], errno.EROFS)
                refused = await r.refused("AppendEvent", "unavailable", session_id="s1", kind="k")
            assert (await r.ok("AppendEvent", session_id="s1", kind="k"))["record"]["seq"] == 4
    assert refused["message"] == (f"could not take the mutation lock: EROFS: read-only file system: "
                                  f"{store.lock_path}; nothing was changed")
    assert "remount" in refused["hint"]


def unshared_mount_works() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, check=False) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


#: Inside a private mount namespace (gone with the process: nothing leaks to the host):
#: copy the workspace onto a small tmpfs, make it read-only or full, and run the CLI.
IN_A_SICK_FS = r"""
set -e
mount -t tmpfs -o size=1m tmpfs "$MNT"
cp -a "$SRC/." "$MNT/"
if [ "$FAULT" = rofs ]; then
    mount -o remount,ro "$MNT"
else
    dd if=/dev/zero of="$MNT/filler" bs=4k 2>/dev/null || true
fi
set +e
"$PY" -m relay --root "$MNT" event append --session s1 --kind k --json
echo "exit=$?"
"$PY" -m relay --root "$MNT" event append --session s1 --kind k 2>&1
echo "exit=$?"
"$PY" -m relay --root "$MNT" status --json >/dev/null
echo "exit=$?"
"""


@pytest.mark.slow
@pytest.mark.skipif(not unshared_mount_works(), reason="needs root and mount namespaces")
@pytest.mark.parametrize(("fault", "name"), [("rofs", "EROFS"), ("full", "ENOSPC")])
def test_cli_on_a_read_only_or_full_file_system_says_unavailable(tmp_path, fault, name):
    """A real read-only (or full) file system: the CLI exits 1 with one `unavailable` line
    naming the errno and the path, not "unexpected OSError"; status still reads."""
    src, mnt = tmp_path / "ws", tmp_path / "mnt"
    three_events(src)
    mnt.mkdir()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", IN_A_SICK_FS], capture_output=True, text=True,
                          env=dict(env(), SRC=str(src), MNT=str(mnt), FAULT=fault, PY=sys.executable),
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    as_json, _, rest = proc.stdout.partition("exit=")
    code, _, rest = rest.partition("\n")
    human, _, rest = rest.partition("exit=")
    error = json.loads(as_json)["error"]
    assert (code, error["code"]) == ("1", "unavailable")
    assert f"{name}: {os.strerror(getattr(errno, name)).lower()}: {mnt}/flow/" in error["message"]
    assert human.count("\n") == 1 and human.startswith("relay: could not ") and "; next: " in human
    assert "unexpected" not in human
    assert rest.split() == ["1", "exit=0"]  # the refused append, then status


def test_cli_read_that_hits_an_os_error_is_one_unavailable_line(tmp_path):
    """An OSError on a read the CLI did not foresee (here the ledger is a directory) is one
    `unavailable` line with the errno, not "unexpected OSError"."""
    (tmp_path / relay.LEDGER_REL).mkdir(parents=True)
    error = json.loads(run_cli(tmp_path, "session", "list", "--json", check=1)[1])["error"]
    assert error["code"] == "unavailable" and "EISDIR: is a directory" in error["message"]
    _, _, err = run_cli(tmp_path, "session", "list", check=1)
    assert err.count("\n") == 1 and "unexpected" not in err


def test_state_cleanup_and_reset_take_the_lock_after_flow_tmp_was_removed(tmp_path):
    """`state cleanup --apply` and `state reset --apply` still work (and still lock) when
    flow/tmp is gone: the lock file is recreated, cleanup keeps it, reset sets the ledger aside."""
    store = three_events(tmp_path)
    shutil.rmtree(store.tmp_dir)
    (store.state_dir / f"{relay.TEMP_PREFIX}1.deadbeef").write_bytes(b"orphan")
    done = json.loads(run_cli(tmp_path, "state", "cleanup", "--owner", "relay", "--apply", "--json")[1])
    assert done["paths"] == [f"flow/state/relay/{relay.TEMP_PREFIX}1.deadbeef"]
    assert store.lock_path.exists() and done["preserved"] == ["flow/tmp/relay/relay-state.lock"]
    os.unlink(store.lock_path)
    store.ledger_path.write_bytes(store.ledger_path.read_bytes()[:-10])  # damaged
    moved = json.loads(run_cli(tmp_path, "state", "reset", "--owner", "relay", "--apply", "--json")[1])
    assert moved["applied"] and not store.ledger_path.exists() and (tmp_path / moved["to"]).exists()
    assert store.lock_path.exists()
    assert commit_ok(relay.Store(tmp_path), "RegisterProfile", now=time.time(), name="cx",
                     provider="codex", mode="pooled").profile.name == "cx"
