"""Stateful property test: the lease operations against a small reference model.

The model keeps, per session, the leases (holder, mode, state, expiry) and the
last fencing token, and decides every grant from the brief's rules: shared
readers coexist; a writer needs the session to itself; a writer that must wait
for readers is recorded as waiting and keeps new readers out until it has been
served; an expired lease occupies nothing.  Time is a float that a rule moves
forward; it is handed to the operations in their ``Ctx``.
"""

from __future__ import annotations

import attrs
from conftest import T0
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import relay
import relay_client as rc
from relay_client import Code, RelayError

READ, WRITE = "shared-read", "exclusive-write"
SESSIONS = ("s1", "s2")
HOLDERS = ("a", "b", "c", "d")
LIVE = ("active", "waiting")


@attrs.define
class ModelLease:
    lease_id: str
    session: str
    holder: str
    mode: str
    state: str
    ttl: int
    expires: float
    token: int = 0


class LeaseModel:
    """What the brief says leases do, written without looking at ledgers."""

    def __init__(self) -> None:
        self.leases: dict[str, ModelLease] = {}
        self.tokens = dict.fromkeys(SESSIONS, 0)
        self.quarantined: set[str] = set()

    def live(self, session: str, now: float) -> list[ModelLease]:
        return [x for x in self.leases.values()
                if x.session == session and x.state in LIVE and x.expires > now]

    def _issue(self, lease: ModelLease, now: float) -> None:
        self.tokens[lease.session] += 1
        lease.state, lease.token, lease.expires = "active", self.tokens[lease.session], now + lease.ttl

    def grant(self, session, holder, mode, ttl, now, new_id):
        """("granted" | "waiting", lease id) or a refusal code."""
        if session in self.quarantined:
            return Code.FAILED_PRECONDITION
        live = self.live(session, now)
        held = [x for x in live if x.holder == holder]
        retrying_writer = held and held[0].state == "waiting" and mode == WRITE
        if held and not retrying_writer:
            return Code.ALREADY_EXISTS
        if any(x.mode == WRITE and x.state == "active" for x in live):
            return Code.FAILED_PRECONDITION
        waiting = [x for x in live if x.state == "waiting"]
        readers = [x for x in live if x.mode == READ and x.state == "active"]
        if mode == READ:
            if waiting:
                return Code.FAILED_PRECONDITION
            lease = ModelLease(new_id, session, holder, mode, "waiting", ttl, now + ttl)
            self.leases[new_id] = lease
            self._issue(lease, now)
            return "granted", new_id
        if waiting and waiting[0].holder != holder:
            return Code.FAILED_PRECONDITION
        lease = waiting[0] if waiting else ModelLease(new_id, session, holder, mode, "waiting",
                                                      ttl, now + ttl)
        lease.ttl = ttl
        self.leases[lease.lease_id] = lease
        if readers:
            lease.state, lease.expires = "waiting", now + ttl
            return "waiting", lease.lease_id
        self._issue(lease, now)
        return "granted", lease.lease_id

    def _live_lease(self, lease_id, now):
        lease = self.leases.get(lease_id)
        if lease is None:
            return Code.NOT_FOUND
        if lease.state not in LIVE or lease.expires <= now:
            return Code.FAILED_PRECONDITION
        return lease

    def renew(self, lease_id, ttl, now):
        lease = self._live_lease(lease_id, now)
        if isinstance(lease, Code):
            return lease
        if lease.state != "active":
            return Code.FAILED_PRECONDITION
        lease.ttl = ttl or lease.ttl
        lease.expires = now + lease.ttl
        return "renewed", lease_id

    def end(self, lease_id, now, state):
        lease = self._live_lease(lease_id, now)
        if isinstance(lease, Code):
            return lease
        lease.state = state
        return state, lease_id

    def quarantine(self, session, now):
        if session in self.quarantined:
            return Code.ALREADY_EXISTS
        for lease in self.live(session, now):
            lease.state = "revoked"
        self.quarantined.add(session)
        return "quarantined", session

    def clear(self, session, now):
        if session not in self.quarantined or self.live(session, now):
            return Code.FAILED_PRECONDITION
        self.quarantined.discard(session)
        return "cleared", session

    def expire(self, now):
        gone = [x for x in self.leases.values() if x.state in LIVE and x.expires <= now]
        for lease in gone:
            lease.state = "expired"
        return sorted(x.lease_id for x in gone)


def _outcome(call):
    """Run a pure operation; (ledger, outcome) where outcome is like the model's."""
    try:
        ledger, reply = call()
    except RelayError as exc:
        return None, exc.code
    subject = getattr(reply, "lease", None) or reply.quarantine
    return ledger, (reply.outcome, getattr(subject, "lease_id", None) or subject.session_id)


class LeaseMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        ledger = relay.Ledger()
        muts = [relay.rpc_mutation("RegisterProfile",
                                   rc.RegisterProfileRequest("cx", "codex", "pooled"))]
        muts += [relay.rpc_mutation("CreateSession", rc.CreateSessionRequest("cx", sid))
                 for sid in SESSIONS]
        self.ledger, _, _ = relay.apply_all(ledger, muts, T0, relay.Config())
        self.revision = self.ledger.revision
        self.now = T0
        self.model = LeaseModel()
        self.issued = dict.fromkeys(SESSIONS, 0)

    def ctx(self) -> relay.Ctx:
        self.revision += 1  # every call gets a fresh revision, so lease ids never collide
        return relay.Ctx(self.now, self.revision)

    def pick(self, index: int) -> str:
        ids = sorted(self.model.leases) + ["lease-none"]
        return ids[index % len(ids)]

    def check(self, call, expected):
        ledger, got = _outcome(call)
        assert got == expected, (got, expected)
        if ledger is not None:
            self.ledger = ledger

    @rule(seconds=st.sampled_from([0, 0.5, 1, 2, 3, 5]))
    def advance(self, seconds):
        self.now += seconds

    @rule(session=st.sampled_from(SESSIONS), holder=st.sampled_from(HOLDERS),
          mode=st.sampled_from([READ, WRITE]), ttl=st.integers(1, 6))
    def grant(self, session, holder, mode, ttl):
        ctx = self.ctx()
        expected = self.model.grant(session, holder, mode, ttl, self.now, f"lease-{ctx.revision}")
        request = rc.GrantLeaseRequest(session, holder, mode, ttl)
        self.check(lambda: relay.grant_lease(self.ledger, request, ctx), expected)
        if isinstance(expected, tuple) and expected[0] == "granted":
            token = self.ledger.leases[expected[1]].fencing_token
            assert token > self.issued[session]  # fencing tokens only grow
            self.issued[session] = token

    @rule(index=st.integers(0, 10**6), ttl=st.sampled_from([0, 1, 4]))
    def renew(self, index, ttl):
        lease_id, ctx = self.pick(index), self.ctx()
        expected = self.model.renew(lease_id, ttl, self.now)
        request = rc.RenewLeaseRequest(lease_id, ttl)
        self.check(lambda: relay.renew_lease(self.ledger, request, ctx), expected)
        if isinstance(expected, tuple):
            assert self.ledger.leases[lease_id].last_renewed_at == relay.iso(self.now)

    @rule(index=st.integers(0, 10**6))
    def release(self, index):
        lease_id, ctx = self.pick(index), self.ctx()
        expected = self.model.end(lease_id, self.now, "released")
        request = rc.ReleaseLeaseRequest(lease_id)
        self.check(lambda: relay.release_lease(self.ledger, request, ctx), expected)

    @rule(index=st.integers(0, 10**6))
    def revoke(self, index):
        lease_id, ctx = self.pick(index), self.ctx()
        expected = self.model.end(lease_id, self.now, "revoked")
        request = rc.RevokeLeaseRequest(lease_id, "model says so")
        self.check(lambda: relay.revoke_lease(self.ledger, request, ctx), expected)

    @rule(session=st.sampled_from(SESSIONS))
    def quarantine(self, session):
        ctx = self.ctx()
        expected = self.model.quarantine(session, self.now)
        request = rc.QuarantineSessionRequest(session, "model says so")
        self.check(lambda: relay.quarantine_session(self.ledger, request, ctx), expected)

    @rule(session=st.sampled_from(SESSIONS))
    def clear(self, session):
        ctx = self.ctx()
        expected = self.model.clear(session, self.now)
        request = rc.ClearQuarantineRequest(session)
        self.check(lambda: relay.clear_quarantine(self.ledger, request, ctx), expected)

    @rule()
    def expire(self):
        expected = self.model.expire(self.now)
        self.ledger, gone = relay.expire_leases(self.ledger, self.ctx())
        assert sorted(x.lease_id for x in gone) == expected

    @invariant()
    def leases_match_the_model(self):
        if not hasattr(self, "model"):
            return
        real = {k: (x.session_id, x.holder, x.mode, x.state, x.expires_at, x.fencing_token)
                for k, x in self.ledger.leases.items()}
        want = {k: (x.session, x.holder, x.mode, x.state, relay.iso(x.expires), x.token)
                for k, x in self.model.leases.items()}
        assert real == want
        for sid in SESSIONS:
            assert self.ledger.sessions[sid].fencing_token == self.model.tokens[sid]
            assert (self.ledger.sessions[sid].state == "failed") == (sid in self.model.quarantined)

    @invariant()
    def never_a_writer_beside_a_reader(self):
        if not hasattr(self, "model"):
            return
        stamp = relay.iso(self.now)
        for sid in SESSIONS:
            live = relay.live_leases(self.ledger, sid, stamp)
            active = [x for x in live if x.state == "active"]
            writers = [x for x in active if x.mode == WRITE]
            assert len(writers) <= 1
            assert not writers or len(active) == 1
            assert len([x for x in live if x.state == "waiting"]) <= 1
            tokens = [x.fencing_token for x in active]
            assert len(tokens) == len(set(tokens))


LeaseMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lease_semantics_match_the_reference_model = LeaseMachine.TestCase
test_lease_semantics_match_the_reference_model.__doc__ = (
    "Grant, renew, release, revoke, quarantine and expiry agree with the reference model.")
