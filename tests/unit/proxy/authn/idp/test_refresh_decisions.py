"""The refresh-token rotation state machine (`decide_refresh`), without Redis.

The stateful test drives the pure decision through a dictionary model that applies each
decision the way `RefreshStore` does, and checks the promises after every step.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from proxy.authn.idp.refresh import (
    FamilyRecord,
    RefreshRecord,
    Refuse,
    Reuse,
    Rotate,
    decide_refresh,
)

IDLE = 100.0
ABSOLUTE = 1_000.0


def record(*, used: bool = False, expires_at: float = 500.0) -> RefreshRecord:
    return RefreshRecord(family="fam", subject="alice", used=used, expires_at=expires_at)


def family(*, current: str = "d1", expires_at: float = 900.0) -> FamilyRecord:
    return FamilyRecord(subject="alice", current=current, created_at=0.0, expires_at=expires_at)


def test_an_unknown_token_is_refused() -> None:
    assert decide_refresh("d1", None, None, now=1, idle_ttl=IDLE) == Refuse(reason="unknown_token")


def test_the_live_token_rotates_within_the_family_and_the_absolute_end() -> None:
    decision = decide_refresh("d1", record(), family(), now=10, idle_ttl=IDLE)
    assert decision == Rotate(family="fam", subject="alice", new_expires_at=110)
    late = decide_refresh(
        "d1", record(expires_at=820), family(expires_at=850), now=800, idle_ttl=IDLE
    )
    assert late == Rotate(family="fam", subject="alice", new_expires_at=850)


def test_a_consumed_token_is_reuse_even_after_the_family_ended() -> None:
    assert decide_refresh("d1", record(used=True), family(current="d2"), now=10, idle_ttl=IDLE) == (
        Reuse(family="fam", subject="alice")
    )
    assert decide_refresh("d1", record(used=True), None, now=10, idle_ttl=IDLE) == Reuse(
        family="fam", subject="alice"
    )


def test_a_live_token_of_an_ended_family_is_refused() -> None:
    assert decide_refresh("d1", record(), None, now=10, idle_ttl=IDLE) == Refuse(
        reason="family_ended"
    )
    assert decide_refresh("d1", record(), family(current="d9"), now=10, idle_ttl=IDLE) == Refuse(
        reason="family_ended"
    )


def test_expiry_idle_or_absolute_is_refused() -> None:
    expired = Refuse(reason="expired")
    assert decide_refresh("d1", record(expires_at=10), family(), now=10, idle_ttl=IDLE) == expired
    assert decide_refresh("d1", record(), family(expires_at=10), now=10, idle_ttl=IDLE) == expired


class RotationModel(RuleBasedStateMachine):
    """Families in a dictionary, changed exactly as RefreshStore changes Redis."""

    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.records: dict[str, RefreshRecord] = {}
        self.families: dict[str, FamilyRecord] = {}
        self.revoked: set[str] = set()
        self.serial = 0

    def _new_digest(self) -> str:
        self.serial += 1
        return f"d{self.serial}"

    @rule(target=tokens)
    def login(self) -> str:
        digest = self._new_digest()
        name = f"fam{self.serial}"
        family_end = self.now + ABSOLUTE
        self.records[digest] = RefreshRecord(
            family=name, subject="u", used=False, expires_at=min(self.now + IDLE, family_end)
        )
        self.families[name] = FamilyRecord(
            subject="u", current=digest, created_at=self.now, expires_at=family_end
        )
        return digest

    @rule(seconds=st.floats(min_value=0, max_value=150))
    def wait(self, seconds: float) -> None:
        self.now += seconds
        # Redis expires keys on its own.
        self.records = {d: r for d, r in self.records.items() if r.expires_at > self.now}
        self.families = {n: f for n, f in self.families.items() if f.expires_at > self.now}

    @rule(target=tokens, digest=tokens)
    def refresh(self, digest: str) -> str:
        stored = self.records.get(digest)
        owner = self.families.get(stored.family) if stored else None
        others = {
            name: f.current
            for name, f in self.families.items()
            if stored is None or name != stored.family
        }
        decision = decide_refresh(digest, stored, owner, now=self.now, idle_ttl=IDLE)
        # A consumed token is always reuse; nothing else is.
        assert isinstance(decision, Reuse) == (stored is not None and stored.used)
        if isinstance(decision, Refuse):
            return digest
        assert stored is not None
        if isinstance(decision, Reuse):
            assert stored.used
            if owner is not None:
                self.records.pop(owner.current, None)
            self.families.pop(decision.family, None)
            self.revoked.add(decision.family)
            return digest
        assert not stored.used
        assert decision.family == stored.family
        assert decision.family not in self.revoked
        assert owner is not None
        assert decision.new_expires_at <= owner.expires_at
        next_digest = self._new_digest()
        self.records[digest] = RefreshRecord(
            family=stored.family, subject=stored.subject, used=True, expires_at=stored.expires_at
        )
        self.records[next_digest] = RefreshRecord(
            family=decision.family,
            subject=decision.subject,
            used=False,
            expires_at=decision.new_expires_at,
        )
        self.families[decision.family] = FamilyRecord(
            subject=owner.subject,
            current=next_digest,
            created_at=owner.created_at,
            expires_at=owner.expires_at,
        )
        # A token of one family never moves another family forward.
        assert {
            name: f.current for name, f in self.families.items() if name != decision.family
        } == others
        return next_digest

    @invariant()
    def one_live_token_per_family_and_it_is_current(self) -> None:
        live: dict[str, list[str]] = {}
        for digest, stored in self.records.items():
            if not stored.used and stored.family in self.families:
                live.setdefault(stored.family, []).append(digest)
        for name, digests in live.items():
            assert digests == [self.families[name].current]

    @invariant()
    def a_revoked_family_has_no_state(self) -> None:
        assert self.revoked.isdisjoint(self.families)


TestRotationModel = RotationModel.TestCase
TestRotationModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
