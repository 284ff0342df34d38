"""A CLI commit on a checkpoint the typed model vouched for (issue 14): its
records are typed only as the commit uses them ("Lazily typed reads of a
vouched checkpoint" in specs/flow-relay-contract.md), and what it writes is
byte for byte what validating the whole ledger first would have written."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import T0, commit_ok, mutation, run_cli

import relay


def memo_path(root: Path) -> Path:
    return root / relay.MEMO_REL


def seeded(root: Path) -> Path:
    """Sessions with live and ended leases, a control request and a profile
    holding non-ASCII text, and an idempotency record: every kind of map."""
    store = relay.Store(root)
    commit_ok(store, "RegisterProfile", now=T0, name="cx", provider="codex", mode="pooled",
              cwd="/srv/café")
    for i in range(6):
        commit_ok(store, "CreateSession", now=T0, profile="cx", session_id=f"s{i}")
    for i in range(4):
        commit_ok(store, "GrantLease", now=T0, session_id=f"s{i}", holder="h", mode="exclusive-write",
                  ttl_seconds=3600)
    lease = commit_ok(store, "GrantLease", now=T0, session_id="s5", holder="h", mode="shared-read",
                      ttl_seconds=3600).lease
    commit_ok(store, "ReleaseLease", now=T0, lease_id=lease.lease_id)
    commit_ok(store, "RecordControl", now=T0, request_id="c1", session_id="s1", kind="interrupt",
              payload={"why": "ünïcode", "nested": {"s2": {"events": 1}}})
    commit_ok(store, "AppendEvent", now=T0, session_id="s1", kind="k", data={"n": 1}, request_id="r1")
    commit_ok(store, "QuarantineSession", now=T0, session_id="s3", reason="flaky ⚠")
    # Ids that are also member names, and a free-text field holding what a
    # search of an unread map looks for (see relay._FLAT_MAPS).
    for sid in ("leases", "ledger_id", "tokens", "turns"):
        commit_ok(store, "CreateSession", now=T0, profile="cx", session_id=sid)
    lease = commit_ok(store, "GrantLease", now=T0, session_id="ledger_id", holder="h",
                      mode="exclusive-write", ttl_seconds=3600).lease
    commit_ok(store, "RevokeLease", now=T0, lease_id=lease.lease_id, reason=TRICKY)
    commit_ok(store, "GrantLease", now=T0, session_id="ledger_id", holder="h", mode="exclusive-write",
              ttl_seconds=3600)
    return root


#: What a search of a flat map's text looks for, in a string (and ending one).
TRICKY = 'x}},"ledger_id":"y" "state":"active" "s1":{"a":1} "lease_id":"z" ":{"é}},"'


#: Commits one CLI process each, as (RPC, fields); all within the compaction interval.
STEPS = [
    ("AppendEvent", {"session_id": "s1", "kind": "k"}),
    ("AppendResult", {"session_id": "s2", "kind": "done", "data": {"ok": True}}),
    ("GrantLease", {"session_id": "s4", "holder": "h2", "mode": "exclusive-write", "ttl_seconds": 60}),
    ("AppendEvent", {"session_id": "s1", "kind": "k", "data": {"n": 1}, "request_id": "r1"}),  # a replay
    ("CreateSession", {"profile": "cx", "session_id": "s9"}),
    ("RecordControl", {"request_id": "c2", "session_id": "s9", "kind": "stop", "payload": "é"}),
    ("AppendEvent", {"session_id": "s9", "kind": "k", "request_id": "r2"}),
    ("AppendEvent", {"session_id": "ledger_id", "kind": "k"}),
    ("AppendEvent", {"session_id": "tokens", "kind": "k"}),
]


def typed(mapping) -> int:
    """How many records of a decoded map are typed (all of a plain dict's)."""
    flat = relay._as_dict(mapping)
    if type(flat) is relay._LazyRecords and flat.text is not None:  # not read yet
        return len(flat.picked)
    return sum(type(v) is not dict for v in dict.values(flat))


def test_a_commit_on_a_vouched_checkpoint_writes_what_the_whole_path_writes(tmp_path):
    """The same commits, one fresh store each (a CLI process), on a copy whose
    memo vouches for the checkpoint and on a copy without a memo: the first
    types only what each commit reads, both write the same bytes."""
    lazy, whole = seeded(tmp_path / "lazy"), tmp_path / "whole"
    shutil.copytree(lazy, whole)
    for i, (rpc, fields) in enumerate(STEPS):
        memo_path(whole).unlink(missing_ok=True)
        starts = {}
        for root in (lazy, whole):
            seen: list[relay.Ledger] = []
            (result,), _ = relay.commit(relay.Store(root), [mutation(rpc, **fields)], relay.Config(),
                                        T0 + 1 + i, on_start=seen.append)
            assert not isinstance(result, relay.RelayError), result
            starts[root] = seen[0]
        assert relay.Store(lazy).ledger_path.read_bytes() == relay.Store(whole).ledger_path.read_bytes(), rpc
        start = starts[lazy]
        assert type(start.leases) is relay._LazyRecords, rpc
        assert type(starts[whole].leases) is dict
        # The leases were counted (the compaction cap) and looked at only where the commit must.
        assert typed(start.leases) <= (1 if rpc == "GrantLease" else 0), rpc
        assert typed(start.sessions) <= 1 and typed(start.cursors) <= 1, rpc
        if rpc.startswith("Append"):  # not even parsed: found, counted and spliced in the text
            assert start.leases.text is not None and start.cursors.text is not None, rpc
        assert starts[lazy] == starts[whole]  # and every record types to the same value
    assert relay.Store(lazy).read() == relay.Store(whole).read()


def test_the_lazy_maps_read_as_dicts_of_typed_records(tmp_path):
    """Whatever reads a lazily decoded map whole (items, values, a copy, ``==``,
    pickle) sees typed records; one record read twice is one object."""
    store = relay.Store(seeded(tmp_path))
    data = store.ledger_path.read_bytes()
    full = relay.decode_ledger(data)
    lazy = relay.decode_ledger(data, memo_path(tmp_path).read_bytes())
    leases = lazy.leases
    assert type(leases) is relay._LazyRecords and typed(leases) == 0
    key = sorted(full.leases)[0]
    assert leases[key] is leases.get(key) is leases[key] and leases[key] == full.leases[key]
    assert typed(leases) == 1
    assert leases.get("nope") is None and "nope" not in leases and key in leases
    assert len(leases) == len(full.leases) and sorted(leases) == sorted(full.leases)
    for got in (dict(lazy.sessions), {**lazy.cursors}, copy.copy(lazy.control_requests),
                dict(lazy.quarantines.items()),
                dict(lazy.leases.items()), pickle.loads(pickle.dumps(lazy.profiles))):
        assert got and all(type(v) is not dict for v in got.values())
    assert lazy == full and full == lazy
    assert relay.encode_ledger(lazy) == data == relay.encode_ledger(full)


def test_an_edit_of_a_lazy_map_is_encoded_as_edited(tmp_path):
    """The bytes a map was read from are reused only while it is unchanged."""
    data = relay.Store(seeded(tmp_path)).ledger_path.read_bytes()
    lazy = relay.decode_ledger(data, memo_path(tmp_path).read_bytes())
    full = relay.decode_ledger(data)
    for ledger in (lazy, full):
        del ledger.sessions["s3"]
        ledger.cursors.pop("s3")
    assert relay.encode_ledger(lazy) == relay.encode_ledger(full) != data


def test_a_checkpoint_the_memo_does_not_vouch_for_is_validated_whole(tmp_path):
    """A hand edit (re-checksummed) of a record no commit touches is refused by
    a CLI mutation as before, with nothing written; a forged memo does not
    make ``Store.read`` (inspect, the gate's typed check) trust it either."""
    root = seeded(tmp_path)
    path = relay.Store(root).ledger_path
    body, _ = relay.split_checksum(path.read_bytes())
    doc = json.loads(body)
    doc["leases"][sorted(doc["leases"])[0]]["holder"] = "not an id!"
    out = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    data = out[:-1] + b',"checksum":"sha256:' + hashlib.sha256(out).hexdigest().encode() + b'"}\n'
    path.write_bytes(data)
    with pytest.raises(relay.LedgerInvalid) as whole:
        relay.decode_ledger(data)
    code, stdout, stderr = run_cli(root, "event", "append", "--session", "s1", "--kind", "k", check=None)
    assert code == 1 and stdout == "" and whole.value.message in stderr
    assert path.read_bytes() == data
    # A memo that vouches for it (forged: no relay writer wrote these bytes).
    memo_path(root).write_bytes(relay.split_checksum(data)[1])
    store = relay.Store(root)
    assert store.snapshot(lazy=True) is not None  # a commit's read types records as it goes
    with pytest.raises(relay.LedgerInvalid) as lazily:
        store.read()  # the lazily decoded snapshot in the cache is not what a reader gets
    assert lazily.value.message == whole.value.message
    lease = store.snapshot(lazy=True).ledger.leases
    with pytest.raises(relay.LedgerInvalid) as typed_late:
        dict(lease)  # typing the record refuses it as the whole path does
    assert "holder" in typed_late.value.message


def test_an_older_ledger_without_later_fields_reads_lazily_as_wholly(tmp_path):
    """A vouched checkpoint written before some record fields existed gets their
    defaults, and encodes as the typed path encodes it (with them)."""
    root = seeded(tmp_path)
    path = relay.Store(root).ledger_path
    body, _ = relay.split_checksum(path.read_bytes())
    doc = json.loads(body)
    for record in doc["sessions"].values():
        del record["replaced_by"]
    for record in doc["profiles"].values():
        del record["options"]
    out = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    digest = hashlib.sha256(out).hexdigest().encode()
    data = out[:-1] + b',"checksum":"sha256:' + digest + b'"}\n'
    full, lazy = relay.decode_ledger(data), relay.decode_ledger(data, digest)
    assert type(lazy.sessions) is relay._LazyRecords
    assert lazy == full
    assert relay.encode_ledger(lazy) == relay.encode_ledger(full) != data


def test_a_journaling_store_validates_whole(tmp_path):
    """The server's store (it journals) keeps its maps plain: lazy typing is a CLI commit's."""
    root = seeded(tmp_path)
    seen = []
    relay.commit(relay.Store(root, journal=True), [mutation("AppendEvent", session_id="s1", kind="k")],
                 relay.Config(), T0 + 1, on_start=seen.append)
    assert type(seen[0].leases) is dict


def test_the_flat_maps_hold_only_strings_and_numbers():
    """What finding a record in an unread map's text relies on (``relay._FLAT_MAPS``)."""
    import typing

    import attrs

    import relay_client as rc

    for name, key_field in relay._FLAT_MAPS.items():
        kind = relay._MAP_RECORDS[name][0]
        hints = typing.get_type_hints(kind, vars(rc) | vars(relay))
        fields = {f.name: hints[f.name] for f in attrs.fields(kind)}
        assert set(fields.values()) <= {str, int}, (name, fields)
        assert fields[key_field] is str


def _leaf(parser, path):
    import argparse

    for word in path:
        (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = group.choices[word]
    return parser


def test_the_parser_built_for_a_command_is_that_of_the_whole_cli():
    """The parser built for one command (only its leaf: each leaf builds its
    request class) takes exactly the options the whole CLI's leaf takes."""
    import relay_client as rc

    def shape(parser):
        return [(a.option_strings, a.dest, a.nargs, a.default, a.required, a.choices)
                for a in parser._actions if a.dest != "command"]

    whole = relay.build_parser()
    paths = [rpc.cli for rpc in rc.RPCS] + list(relay._ADMIN)
    for path in paths:
        for argv in ([*path], ["--root", "/x", *path, "--json"]):
            assert shape(_leaf(relay.build_parser(argv), path)) == shape(_leaf(whole, path)), argv
    only = relay.build_parser(["event", "append", "--session", "s1", "--kind", "k"])
    assert set(_leaf(only, ["event"])._actions[-1].choices) == {"append"}
    assert set(_leaf(relay.build_parser(["event"]), ["event"])._actions[-1].choices) >= {"append", "list"}


def test_a_column_of_an_unread_flat_map_is_read_from_its_text(tmp_path):
    """``_flat_column`` gives each record's field without parsing the map (or
    None when it cannot tell), also over a ``_Map`` of changes."""
    import attrs

    data = relay.Store(seeded(tmp_path)).ledger_path.read_bytes()
    full = relay.decode_ledger(data)
    for name in relay._FLAT_MAPS:
        lazy = getattr(relay.decode_ledger(data, memo_path(tmp_path).read_bytes()), name)
        whole = getattr(full, name)
        for field in attrs.fields(relay._MAP_RECORDS[name][0]):
            got = relay._flat_column(lazy, field.name)
            if got is not None:
                assert got == {k: getattr(v, field.name) for k, v in whole.items()}, (name, field.name)
            elif name in ("leases", "cursors") and field.name != "revoke_reason":
                raise AssertionError((name, field.name))  # (the tricky reason has escapes)
        assert lazy.text is not None or not whole  # still unread (an empty map is read at once)
    lazy = relay.decode_ledger(data, memo_path(tmp_path).read_bytes())
    cursor = attrs.evolve(full.cursors["s1"], events=99)
    changed = relay._put(lazy.cursors, "s1", cursor)
    assert relay._flat_column(changed, "events") == {**{k: v.events for k, v in full.cursors.items()},
                                                     "s1": 99}
    assert relay._flat_column(full.cursors, "events") is None  # a read map: read its records


def test_a_one_commit_cli_rpc_runs_without_the_cyclic_collector_other_commands_with_it(workspace,
                                                                                      capsys):
    """``python -m relay`` starts with the collector off (see the module's
    start); ``main`` turns it on for any command that runs long."""
    import gc

    was = gc.isenabled()
    try:
        gc.disable()
        assert relay.main(["--root", str(workspace), "profile", "register", "cx", "--provider", "codex",
                           "--mode", "pooled"]) == 0
        assert not gc.isenabled()  # one commit, then the process ends
        assert relay.main(["--root", str(workspace), "state", "inventory"]) == 0
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
    capsys.readouterr()
