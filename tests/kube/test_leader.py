"""Leader election decisions (pure): acquire, renew, follow, take over a lapsed lease."""

from __future__ import annotations

import pytest

from tokenscaler.kube.leader import Action, LeaseConfig, decide, released

CFG = LeaseConfig()


def test_client_go_defaults() -> None:
    assert (CFG.lease_duration_s, CFG.renew_deadline_s, CFG.retry_period_s) == (15.0, 10.0, 2.0)


def test_bad_timings_are_named() -> None:
    with pytest.raises(ValueError, match=r"lease_duration_s \(5\) > renew_deadline_s \(10\)"):
        LeaseConfig(lease_duration_s=5)


def test_no_lease_is_acquired() -> None:
    d = decide(None, None, "a", 100.0)
    assert d.action is Action.ACQUIRE and d.spec is not None
    assert d.spec["holderIdentity"] == "a" and d.spec["leaseDurationSeconds"] == 15
    assert d.spec["leaseTransitions"] == 0


def test_holder_renews_and_keeps_acquire_time() -> None:
    first = decide(None, None, "a", 100.0)
    d = decide(first.spec, first.observation, "a", 102.0)
    assert d.action is Action.RENEW
    assert d.spec["acquireTime"] == first.spec["acquireTime"]
    assert d.spec["renewTime"] != first.spec["renewTime"]


def test_other_holder_is_followed_until_the_record_stops_changing_for_a_lease_duration() -> None:
    held = decide(None, None, "a", 100.0).spec
    d = decide(held, None, "b", 1000.0)  # first sight: judged on b's clock, not a's renewTime
    assert d.action is Action.FOLLOW and d.holder == "a"
    d = decide(held, d.observation, "b", 1014.9)
    assert d.action is Action.FOLLOW
    d = decide(held, d.observation, "b", 1015.0)
    assert d.action is Action.ACQUIRE
    assert d.spec["holderIdentity"] == "b" and d.spec["leaseTransitions"] == 1


def test_a_renewal_resets_the_followers_clock() -> None:
    a0 = decide(None, None, "a", 0.0)
    b = decide(a0.spec, None, "b", 0.0)
    a1 = decide(a0.spec, a0.observation, "a", 10.0)  # a renews: the record changes
    b = decide(a1.spec, b.observation, "b", 14.0)
    assert b.action is Action.FOLLOW and b.observation.seen_at == 14.0
    assert decide(a1.spec, b.observation, "b", 28.9).action is Action.FOLLOW
    assert decide(a1.spec, b.observation, "b", 29.0).action is Action.ACQUIRE


def test_released_lease_is_taken_at_once() -> None:
    spec = released(decide(None, None, "a", 0.0).spec, 1.0)
    assert spec["holderIdentity"] is None
    d = decide(spec, None, "b", 1.5)
    assert d.action is Action.ACQUIRE and d.spec["leaseTransitions"] == 0
