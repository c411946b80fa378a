"""The campaign's invariant 5 (honest RetryInfo) judged on small histories written out by hand.

Each history is a few operations as the campaign records them (real times, outcomes, the
replica's answer); the checker must flag a refusal only when nothing it could not know about
freed the quota before its RetryInfo ran out.
"""

from __future__ import annotations

from tests.chaos.checker import late_retry_info
from tests.chaos.history import FAIL, OK, UNKNOWN, History, Op

T = 1_800_000_000.0  # 40 s into a minute: RetryInfo 20 s is the minute's end


def _lease(h: History, at: float, replica: int, outcome: str, *, request_id: str = "",
           lease_id: str = "", account: str = "acct-1", retry_after: float = 0.0,
           units: int = 1, client: int = 1) -> Op:
    op = h.begin("lease", client, replica, "alice", at, pool="p0", units=units,
                 priority="normal", ttl=10.0, request_id=request_id)
    op.complete, op.outcome = at + 0.05, outcome
    if outcome == OK:
        op.result = {"lease_id": lease_id, "account": account, "granted_at": at}
    elif outcome == FAIL:
        op.code, op.result = "RESOURCE_EXHAUSTED", {"retry_after": retry_after}
    else:
        op.code = "UNAVAILABLE"
    return op


def _grants(h: History) -> dict[str, Op]:
    out: dict[str, Op] = {}
    for op in sorted(h.ops, key=lambda o: o.complete):
        if op.kind == "lease" and op.outcome == OK:
            out.setdefault(op.result["lease_id"], op)
    return out


def test_a_grant_out_of_nowhere_before_the_retry_info_ran_out_is_a_violation():
    """A refusal saying "20 s" followed 0.3 s later by a fresh grant, nothing freed between, is flagged."""
    h = History()
    _lease(h, T, 1, FAIL, retry_after=20.0)
    _lease(h, T + 0.3, 2, OK, lease_id="L1", client=2)
    found = late_retry_info(h.ops, _grants(h), h.faults)
    assert [v.invariant for v in found] == [5]


def test_a_replayed_lease_whose_first_attempt_came_before_the_refusal_is_no_new_grant():
    """A LeaseKey that reached the store but lost its answer (UNAVAILABLE), then retried with
    its request_id after another caller's refusal, returns the lease granted before that
    refusal: the refusal's RetryInfo was honest."""
    h = History()
    _lease(h, T - 0.2, 0, UNKNOWN, request_id="rq-1", client=2)  # granted; the answer lost
    _lease(h, T, 1, FAIL, retry_after=20.0)
    _lease(h, T + 0.3, 2, OK, request_id="rq-1", lease_id="L1", client=2)  # the replay
    assert late_retry_info(h.ops, _grants(h), h.faults) == []


def _refund(h: History, at: float, lease_id: str) -> Op:
    op = h.begin("complete", 3, 0, "alice", at, lease_id=lease_id, used=False)
    op.complete, op.outcome, op.result = at + 0.05, OK, {"refunded": True}
    return op


def test_a_refund_on_another_account_does_not_excuse_a_grant():
    """A refund on acct-0 between a refusal and a grant on acct-1 does not explain the grant."""
    h = History()
    _lease(h, T - 5.0, 0, OK, lease_id="L0", account="acct-0", client=3)
    _lease(h, T, 1, FAIL, retry_after=20.0)
    _refund(h, T + 0.1, "L0")
    _lease(h, T + 0.3, 2, OK, lease_id="L1", account="acct-1", client=2)
    found = late_retry_info(h.ops, _grants(h), h.faults)
    assert [v.ops[1].result["lease_id"] for v in found] == ["L1"]


def test_a_refund_on_the_granted_account_excuses_the_grant():
    """A refund on acct-1 between a refusal and a grant on acct-1 freed the unit it got."""
    h = History()
    _lease(h, T - 5.0, 0, OK, lease_id="L0", account="acct-1", client=3)
    _lease(h, T, 1, FAIL, retry_after=20.0)
    _refund(h, T + 0.1, "L0")
    _lease(h, T + 0.3, 2, OK, lease_id="L1", account="acct-1", client=2)
    assert late_retry_info(h.ops, _grants(h), h.faults) == []


def test_a_later_429_with_an_earlier_reset_excuses_a_grant_before_the_first_cooldown_ended():
    """A refusal told to wait for acct-1's 4 s cooldown; a 429 reported next with a reset 1 s
    away ends the cooldown sooner (the provider's latest word wins), so a grant 1.5 s later
    is no dishonest RetryInfo."""
    h = History()
    _lease(h, T, 1, FAIL, retry_after=4.0)
    report = h.begin("report", 3, 2, "alice", T + 0.2, lease_id="L9", status=429,
                     key_id="p0/k1")
    report.complete, report.outcome = T + 0.25, OK
    _lease(h, T + 1.5, 2, OK, lease_id="L1", account="acct-1", client=2)
    assert late_retry_info(h.ops, _grants(h), h.faults) == []
