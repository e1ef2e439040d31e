"""The pure limiter: each dimension binds on its own, reservations reconcile, backfill and
preemption follow the tiers, and concurrent admissions never overshoot by more than one
request's estimate (checked against random schedules)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.core.builders import make_pool
from tokenscaler.core.limiter import GateLimits, Limiter
from tokenscaler.core.model import Pool, Tier

INF = math.inf


def make_limiter_pool(**kw: object) -> Pool:
    d = make_pool(
        replica={"throughput_tokens_per_s": 1000.0, "kv_tokens": 10000.0, "concurrency": 8.0},
        typical_request={"prompt_tokens": 10, "output_tokens": 10},
    )
    d.update(kw)
    return Pool.model_validate(d)


def gate(
    tier: str = "guaranteed",
    limit: tuple[float, float, float] = (INF, INF, INF),
    burst: tuple[float, float, float] = (0.0, 0.0, 0.0),
    **kw: object,
) -> GateLimits:
    return GateLimits(tier=Tier(tier), limit=limit, burst=burst, **kw)


def limiter(limits: dict[str, GateLimits], pool: Pool | None = None, **kw: object) -> Limiter:
    """A limiter with ``limits`` at t=0; without the prefill bound unless asked (its own tests below), since
    these tests never stream a first token."""
    kw.setdefault("prefill_window_s", 0.0)
    lim = Limiter(pool or make_limiter_pool(), now=0.0, **kw)
    lim.set_limits(limits, 0.0)
    return lim


@pytest.mark.parametrize(
    ("limits", "estimate", "dimension"),
    [
        pytest.param(((10.0, INF, INF), (100.0, 0, 0)), (60, 60, 1), "throughput_tokens_per_s", id="throughput"),
        pytest.param(((INF, 150.0, INF), (0.0, 50.0, 0)), (60, 60, 1), "kv_tokens", id="kv"),
        pytest.param(((INF, INF, 1.0), (0.0, 0.0, 0.0)), (60, 60, 1), "concurrency", id="concurrency"),
    ],
)
def test_only_the_binding_dimension_refuses_and_is_named(limits, estimate, dimension) -> None:
    lim = limiter({"a": gate("elastic", limit=limits[0], burst=limits[1])})
    est = lim.estimate(*estimate)
    first = lim.admit("a", est, 0.0)
    assert first.admitted
    second = lim.admit("a", est, 0.0)
    assert not second.admitted
    assert second.dimension == dimension
    assert [s.dimension for s in second.shortfalls] == [dimension]
    assert dimension in second.message("a", "elastic")


def test_throughput_refusal_carries_numbers_and_retry_after() -> None:
    lim = limiter({"a": gate(limit=(10.0, INF, INF), burst=(100.0, 0, 0))})
    est = lim.estimate(30, 30)  # 60 weighted tokens
    assert lim.admit("a", est, 0.0).admitted
    d = lim.admit("a", est, 1.0)  # level 40 + 10 = 50 < 60
    assert not d.admitted
    (sf,) = d.shortfalls
    assert (sf.requested, sf.available, sf.allowed, sf.rate) == (60, 50, 100, 10)
    assert d.retry_after_s == pytest.approx(1.0)
    assert "requested 60 weighted tokens, 50 of 100 available (refill 10/s)" in d.message("a", "guaranteed")
    assert lim.admit("a", est, 2.0).admitted  # refilled as announced


@pytest.mark.parametrize(
    ("rate", "depth", "cost", "admitted"),
    [
        pytest.param(400.0, 768.0, 3000.0, True, id="long-prompt-low-rate-borrows-5.6s"),
        pytest.param(10.0, 100.0, 250.0, True, id="borrows-exactly-the-horizon"),
        pytest.param(20.0, 20.0, 507.0, False, id="would-borrow-24s-of-a-20-per-s-limit"),
        pytest.param(0.0, 50.0, 60.0, False, id="no-refill-no-debt"),
    ],
)
def test_debt_is_bounded_by_the_refill_horizon(rate: float, depth: float, cost: float, admitted: bool) -> None:
    from tokenscaler.core.limiter import MAX_DEBT_S, Bucket

    b = Bucket(rate, depth, 0.0)
    assert b.allows(cost, 0.0) is admitted
    assert (b.wait_s(cost) == INF) is (not admitted)  # refused on a full bucket: no wait helps
    assert b.max_cost() == (depth + rate * MAX_DEBT_S if depth > 0 else 0.0)


def test_a_request_larger_than_the_bucket_is_admitted_when_full_and_leaves_debt() -> None:
    lim = limiter({"a": gate(limit=(10.0, INF, INF), burst=(100.0, 0, 0))})
    big = lim.estimate(100, 100)
    d = lim.admit("a", big, 0.0)
    assert d.admitted
    assert lim.gates["a"].own.level == -100
    refused = lim.admit("a", lim.estimate(1, 1), 5.0)
    assert not refused.admitted
    assert refused.retry_after_s == pytest.approx((2 - (-50)) / 10)


def test_reconcile_refunds_the_unused_estimate_and_releases_in_flight() -> None:
    lim = limiter({"a": gate(limit=(1.0, 1000.0, 4.0), burst=(100.0, 0, 0))})
    res = lim.admit("a", lim.estimate(20, 60), 0.0).reservation
    assert (lim.gates["a"].own.level, lim.gates["a"].kv, lim.gates["a"].inflight) == (20, 80, 1)
    lim.charge(res, 10, 0.0)
    assert lim.gates["a"].own.level == 20  # within the estimate: already reserved
    used = lim.finish(res, 0.0, prompt_tokens=20, generated_tokens=10)
    assert used == 30
    assert (lim.gates["a"].own.level, lim.gates["a"].kv, lim.gates["a"].inflight) == (70, 0, 0)
    assert (lim.inflight, lim.kv) == (0, 0)
    assert lim.finish(res, 0.0, prompt_tokens=20, generated_tokens=10) == 30  # idempotent
    assert lim.gates["a"].own.level == 70


def test_tokens_beyond_the_estimate_are_charged_as_debt_and_grow_kv() -> None:
    lim = limiter({"a": gate(limit=(1.0, 1000.0, 4.0), burst=(100.0, 0, 0))})
    res = lim.admit("a", lim.estimate(20, 10), 0.0).reservation
    lim.charge(res, 50, 0.0)
    assert lim.gates["a"].own.level == 100 - 70
    assert lim.gates["a"].kv == 70 and lim.kv == 70
    lim.finish(res, 0.0, prompt_tokens=20, generated_tokens=200)
    assert lim.gates["a"].own.level == 100 - 220
    assert lim.kv == 0 and lim.gates["a"].kv == 0


def test_an_upstream_failure_refunds_everything() -> None:
    lim = limiter({"a": gate(limit=(1.0, INF, INF), burst=(100.0, 0, 0))})
    res = lim.admit("a", lim.estimate(20, 60), 0.0).reservation
    lim.finish(res, 0.0, prompt_tokens=0, generated_tokens=0, completed=False)
    assert lim.gates["a"].own.level == 100
    assert lim.gates["a"].mean_generated is None


def test_refunds_never_fill_a_bucket_above_its_depth() -> None:
    lim = limiter({"a": gate(limit=(10.0, INF, INF), burst=(100.0, 0, 0))})
    res = lim.admit("a", lim.estimate(50, 50), 0.0).reservation
    lim.finish(res, 100.0, prompt_tokens=0, generated_tokens=0)
    assert lim.gates["a"].own.level == 100


def test_expected_output_uses_the_pool_default_then_the_recent_mean() -> None:
    pool = make_limiter_pool(default_max_tokens=100)
    lim = limiter({"a": gate()}, pool)
    est = lim.estimate(10, 500)
    assert lim.expected_weighted("a", est) == 110
    assert lim.expected_weighted("a", lim.estimate(10, 50)) == 60
    res = lim.admit("a", est, 0.0).reservation
    lim.finish(res, 0.0, prompt_tokens=10, generated_tokens=20)
    assert lim.expected_weighted("a", est) == 30


def test_spot_backfills_idle_capacity_and_is_refused_when_the_replica_is_full() -> None:
    lim = limiter({"s": gate("spot", limit=(0, 0, 0), backfill=True)})
    est = lim.estimate(10, 10)
    admitted = [lim.admit("s", est, 0.0) for _ in range(8)]
    assert all(d.admitted and d.reservation.backfill for d in admitted)
    d = lim.admit("s", est, 0.0)
    assert not d.admitted
    assert d.dimension == "concurrency"
    assert "no idle capacity on this replica: concurrency" in d.message("s", "spot")


def test_spot_without_backfill_is_refused_on_its_own_limit() -> None:
    lim = limiter({"s": gate("spot", limit=(0, 0, 0), backfill=False)})
    d = lim.admit("s", lim.estimate(10, 10), 0.0)
    assert not d.admitted
    assert d.dimension == "throughput_tokens_per_s"
    assert math.isinf(d.retry_after_s)


def test_guaranteed_traffic_preempts_the_newest_spot_first_and_takes_its_place() -> None:
    lim = limiter(
        {
            "g": gate("guaranteed", limit=(INF, INF, 4.0)),
            "e": gate("elastic", limit=(0, 0, 0), backfill=True),
            "s": gate("spot", limit=(0, 0, 0), backfill=True),
        }
    )
    est = lim.estimate(10, 10)
    elastic = [lim.admit("e", est, 0.0).reservation for _ in range(2)]
    spot = [lim.admit("s", est, 0.0).reservation for _ in range(6)]
    assert lim.inflight == 8
    assert not lim.admit("s", est, 0.0).admitted  # new spot refused first
    d = lim.admit("g", est, 0.0)
    assert d.admitted and d.victims == (spot[-1],)
    assert spot[-1].preempted and not spot[-1].active
    assert lim.inflight == 8
    victims = [v for _ in range(3) for v in lim.admit("g", est, 0.0).victims]
    assert victims == spot[-2:-5:-1]
    assert not any(r.preempted for r in elastic)
    # a preempted stream settles what it streamed; its KV and concurrency are already free
    lim.finish(spot[-1], 0.0, prompt_tokens=10, generated_tokens=3, completed=False)
    assert lim.inflight == 8 and lim.entitlement_totals("s") == (2, 40)


def test_no_preemption_when_disabled_or_when_the_replica_has_room() -> None:
    limits = {"g": gate("guaranteed", limit=(INF, INF, 4.0)), "s": gate("spot", limit=(0, 0, 0), backfill=True)}
    lim = limiter(limits, preempt=False)
    est = lim.estimate(10, 10)
    for _ in range(8):
        lim.admit("s", est, 0.0)
    d = lim.admit("g", est, 0.0)
    assert d.admitted and d.victims == ()  # the engine queues it; nothing is cut
    lim2 = limiter(limits)
    lim2.admit("s", est, 0.0)
    assert lim2.admit("g", est, 0.0).victims == ()


def test_backfill_never_exceeds_the_ceiling() -> None:
    lim = limiter({"e": gate("elastic", limit=(INF, INF, 1.0), backfill=True, ceiling=(INF, INF, 2.0))})
    est = lim.estimate(10, 10)
    assert lim.admit("e", est, 0.0).reservation.backfill is False
    assert lim.admit("e", est, 0.0).reservation.backfill is True
    d = lim.admit("e", est, 0.0)
    assert not d.admitted and d.dimension == "concurrency"
    assert "its ceiling: concurrency" in d.message("e", "elastic")


def test_backfill_stops_while_allowance_traffic_drains_the_replica_bucket() -> None:
    lim = limiter({"g": gate(limit=(INF, INF, INF)), "s": gate("spot", limit=(0, 0, 0), backfill=True)})
    lim.admit("g", lim.estimate(500, 600), 0.0)  # 1100 > the replica's 1000-token window
    d = lim.admit("s", lim.estimate(5, 5), 0.0)
    assert not d.admitted and d.dimension == "throughput_tokens_per_s"
    assert d.retry_after_s == pytest.approx(0.11)
    assert lim.admit("s", lim.estimate(5, 5), 0.2).admitted


def test_new_limits_keep_the_level_clamped_and_unnamed_entitlements_get_zero() -> None:
    lim = limiter({"a": gate(limit=(10.0, INF, INF), burst=(100.0, 0, 0)), "b": gate(limit=(1.0, 1.0, 1.0))})
    lim.admit("a", lim.estimate(20, 20), 0.0)
    lim.set_limits({"a": gate(limit=(10.0, INF, INF), burst=(50.0, 0, 0))}, 1.0)
    assert lim.gates["a"].own.level == 50
    lim.set_limits({"a": gate(limit=(10.0, INF, INF), burst=(500.0, 0, 0))}, 2.0)
    assert lim.gates["a"].own.level == 50  # a full bucket did not refill toward the old depth
    assert lim.gates["a"].own.refill(3.0) == 60
    assert not lim.admit("b", lim.estimate(1, 1), 2.0).admitted


def test_status_reports_the_own_allowance() -> None:
    lim = limiter({"a": gate(limit=(10.0, INF, 3.0), burst=(100.0, 0, 1.0))})
    lim.admit("a", lim.estimate(20, 20), 0.0)
    s = lim.status("a", 0.0)
    assert (s.tokens_limit, s.tokens_remaining, s.tokens_reset_s) == (100, 60, 4.0)
    assert (s.requests_limit, s.requests_remaining, s.requests_reset_s) == (4, 3, 0.0)


@given(
    rate=st.floats(1, 200),
    depth=st.floats(10, 500),
    events=st.lists(
        st.tuples(
            st.floats(0, 2),  # time since the previous event
            st.integers(1, 80),  # prompt tokens
            st.integers(1, 120),  # max new tokens
            st.floats(0, 1),  # fraction of max new tokens generated
            st.booleans(),  # finish the oldest in-flight request first
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_admitted_tokens_never_exceed_rate_times_time_plus_burst_plus_one_estimate(rate, depth, events) -> None:
    lim = limiter({"a": gate(limit=(rate, INF, INF), burst=(depth, 0, 0))})
    now, used, biggest = 0.0, 0.0, 0.0
    inflight = []
    for dt, prompt, max_new, frac, finish_first in events:
        now += dt
        if finish_first and inflight:
            res, gen = inflight.pop(0)
            lim.finish(res, now, prompt_tokens=res.estimate.prompt_tokens, generated_tokens=gen)
        est = lim.estimate(prompt, max_new)
        d = lim.admit("a", est, now)
        if d.admitted:
            gen = int(max_new * frac)
            used += prompt + gen
            biggest = max(biggest, est.weighted)
            inflight.append((d.reservation, gen))
    assert used <= rate * now + depth + biggest + 1e-6


# ---- tier order on the replica: who preempts whom, refunds, the per-tier buckets, the yield ----------
#
# The replica holds 8 sequences. "g" guaranteed (allowance 4), "e" elastic (allowance 2), "e2" a second
# elastic without allowance, "s" spot: all may backfill. Each case fills the replica with the holders,
# then sends one request of the arriving entitlement and names who is preempted, if anyone.

TIER_LIMITS = {
    "g": gate("guaranteed", limit=(INF, INF, 4.0), backfill=True),
    "g2": gate("guaranteed", limit=(INF, INF, 0.0), backfill=True),
    "e": gate("elastic", limit=(INF, INF, 2.0), backfill=True),
    "e2": gate("elastic", limit=(INF, INF, 0.0), backfill=True),
    "s": gate("spot", limit=(0, 0, 0), backfill=True),
}


def _fill(lim: Limiter, holders: list[str]):
    est = lim.estimate(10, 10)
    held = []
    for name in holders:
        d = lim.admit(name, est, 0.0)
        assert d.admitted, (name, d.shortfalls)
        held.append(d.reservation)
    assert lim.inflight == len(holders)
    return est, held


@pytest.mark.parametrize(
    ("holders", "arriving", "path", "victim"),
    [
        # within its allowance (g has 4, e has 2)
        pytest.param(["g2"] * 4 + ["s"] * 4, "g", "allowance", "s", id="guaranteed-within-allowance-preempts-spot"),
        pytest.param(
            ["g2"] * 4 + ["e2"] * 4, "g", "allowance", "e2", id="guaranteed-within-allowance-preempts-elastic-backfill"
        ),
        pytest.param(
            ["e2"] * 4 + ["s"] * 4, "g", "allowance", "s", id="guaranteed-within-allowance-preempts-spot-before-elastic"
        ),
        pytest.param(
            ["g2"] * 8, "g", "allowance", "g2", id="guaranteed-within-allowance-takes-back-guaranteed-backfill"
        ),
        pytest.param(["g2"] * 4 + ["s"] * 4, "e", "allowance", "s", id="elastic-within-allowance-preempts-spot"),
        pytest.param(
            ["g2"] * 4 + ["e2"] * 4, "e", "allowance", "e2", id="elastic-within-allowance-preempts-elastic-backfill"
        ),
        pytest.param(
            ["g2"] * 8, "e", "allowance", None, id="elastic-within-allowance-never-preempts-guaranteed-backfill"
        ),
        # on backfill, above its allowance (g2 and e2 have none)
        pytest.param(["g"] * 4 + ["s"] * 4, "g2", "backfill", "s", id="guaranteed-backfill-preempts-spot"),
        pytest.param(
            ["g"] * 4 + ["e2"] * 4, "g2", "backfill", "e2", id="guaranteed-backfill-preempts-elastic-backfill"
        ),
        pytest.param(
            ["e2"] * 4 + ["s"] * 4, "g2", "backfill", "s", id="guaranteed-backfill-preempts-spot-before-elastic"
        ),
        pytest.param(["g"] * 4 + ["s"] * 4, "e2", "backfill", "s", id="elastic-backfill-preempts-spot"),
        pytest.param(["g"] * 4 + ["e"] * 4, "e2", "backfill", None, id="elastic-backfill-never-preempts-elastic"),
        pytest.param(["g"] * 4 + ["s"] * 4, "s", "backfill", None, id="spot-never-preempts-spot"),
    ],
)
def test_a_higher_tier_takes_back_what_lower_tiers_hold_on_idle_capacity(holders, arriving, path, victim) -> None:
    lim = limiter(TIER_LIMITS)
    est, held = _fill(lim, holders)
    d = lim.admit(arriving, est, 0.0)
    if victim is None:
        assert not d.victims
        if path == "backfill":
            assert not d.admitted
            assert {s.scope for s in d.shortfalls} >= {"replica"}
        return
    assert d.admitted and d.reservation.backfill is (path == "backfill")
    assert [v.entitlement for v in d.victims] == [victim]
    newest = max((r for r in held if r.entitlement == victim), key=lambda r: r.seq)
    assert d.victims[0] is newest and newest.preempted and not newest.active
    assert lim.inflight == 8  # its place went to the arriving request


def test_spot_is_admitted_only_on_idle_capacity_even_within_its_allowance() -> None:
    lim = limiter({**TIER_LIMITS, "s": gate("spot", limit=(INF, INF, 8.0), backfill=True)})
    est, _ = _fill(lim, ["g"] * 4 + ["e"] * 2 + ["e2"] * 2)
    d = lim.admit("s", est, 0.0)
    assert not d.admitted and d.dimension == "concurrency" and not d.victims
    assert "no idle capacity on this replica" in d.message("s", "spot")
    # and what spot holds within its allowance is preemptible like its backfill
    lim2 = limiter({**TIER_LIMITS, "s": gate("spot", limit=(INF, INF, 8.0), backfill=True)})
    est, spot = _fill(lim2, ["s"] * 8)
    assert not any(r.backfill for r in spot)
    d = lim2.admit("g", est, 0.0)
    assert d.admitted and d.victims == (spot[-1],)


def test_a_preempted_requests_unused_estimate_is_refunded_to_every_bucket_it_was_charged_to() -> None:
    limits = {
        "g": gate("guaranteed", limit=(INF, INF, 4.0), backfill=True),
        "s": gate("spot", limit=(1000.0, INF, INF), burst=(1000.0, 0, 0), backfill=True,
                  ceiling=(1000.0, INF, INF), ceiling_burst=(1000.0, 0, 0)),
    }  # fmt: skip
    lim = limiter(limits, pool=make_limiter_pool(replica={"throughput_tokens_per_s": 1000.0, "kv_tokens": 10000.0,
                                                          "concurrency": 1.0}))  # fmt: skip
    gate_s = lim.gate("s", 0.0)
    est = lim.estimate(100, 300)  # 400 weighted tokens (weights 1, 1)
    victim = lim.admit("s", est, 0.0).reservation
    lim.charge(victim, 50, 0.0)  # 50 tokens streamed: 150 of its 400 are used
    levels = (gate_s.own.level, gate_s.ceiling.level, lim.replica_buckets[2].level)
    assert levels == (600.0, 600.0, 600.0)
    d = lim.admit("g", lim.estimate(10, 10), 0.0)
    assert d.victims == (victim,)
    # its own bucket, its ceiling and the spot view of the replica all get the 250 unused tokens back
    assert gate_s.own.level == gate_s.ceiling.level == 850.0
    assert lim.replica_buckets[2].level == 850.0 - 20.0  # minus what the guaranteed request took
    # settling the cut request later charges nothing twice and refunds nothing twice
    lim.finish(victim, 0.0, prompt_tokens=100, generated_tokens=50, completed=False)
    assert gate_s.own.level == 850.0 and victim.charged == 150.0


def test_lower_tiers_never_spend_a_higher_tiers_view_of_idle_throughput() -> None:
    lim = limiter(
        {"e": gate("elastic", limit=(0, 0, 0), backfill=True), "s": gate("spot", limit=(0, 0, 0), backfill=True)}
    )
    big = lim.estimate(500, 490)  # 990 of the replica bucket's 1000
    assert lim.admit("s", big, 0.0).admitted
    assert not lim.admit("s", lim.estimate(10, 10), 0.0).admitted  # spot's view is spent
    d = lim.admit("e", lim.estimate(10, 10), 0.0)
    assert d.admitted and d.reservation.backfill and not d.victims  # elastic's view is untouched by spot
    levels = [b.level for b in lim.replica_buckets]
    assert levels == [1000.0, 980.0, -10.0]  # guaranteed's view: untouched by both


def test_lower_tiers_yield_idle_capacity_for_an_interval_after_a_higher_tier_is_refused_for_it() -> None:
    lim = limiter(TIER_LIMITS, interval_s=2.0)
    est, held = _fill(lim, ["g"] * 4 + ["e"] * 2 + ["g2"] * 2)  # full, nothing that g2 may preempt
    refused = lim.admit("g2", est, 1.0)
    assert not refused.admitted and {s.scope for s in refused.shortfalls} >= {"replica"}
    lim.finish(held[0], 1.5, prompt_tokens=10, generated_tokens=10)  # one sequence frees up
    for name in ("e2", "s"):
        d = lim.admit(name, est, 1.5)
        assert not d.admitted and d.dimension == "concurrency"
        assert "idle capacity yielded to a higher tier" in d.message(name, "x")
        assert "held for guaranteed traffic" in d.message(name, "x")
        assert d.retry_after_s == pytest.approx(1.5)
    assert lim.admit("g2", est, 1.6).admitted  # what freed up goes to the tier that asked first
    assert lim.inversions == {}
    lim.finish(held[1], 3.1, prompt_tokens=10, generated_tokens=10)
    assert lim.admit("s", est, 3.1).admitted  # past the interval spot may backfill again


def test_inversions_count_idle_capacity_admissions_of_lower_tiers_after_a_higher_tier_was_refused(monkeypatch) -> None:
    lim = limiter(TIER_LIMITS, interval_s=2.0)
    est, held = _fill(lim, ["g"] * 4 + ["e"] * 2 + ["g2"] * 2)
    assert not lim.admit("g2", est, 1.0).admitted
    monkeypatch.setattr(lim, "_yield_shortfall", lambda *a: None)  # as if the yield rule were not there
    lim.finish(held[0], 1.2, prompt_tokens=10, generated_tokens=10)
    lim.finish(held[1], 1.2, prompt_tokens=10, generated_tokens=10)
    assert lim.admit("s", est, 1.2).admitted
    assert lim.admit("e2", est, 1.3).admitted
    assert lim.inversions == {(Tier.GUARANTEED, Tier.SPOT): 1, (Tier.GUARANTEED, Tier.ELASTIC): 1}
    lim.finish(held[4], 1.4, prompt_tokens=10, generated_tokens=10)
    d = lim.admit("e", est, 1.4)
    assert d.admitted and not d.reservation.backfill
    assert sum(lim.inversions.values()) == 2  # elastic within its allowance holds what it was promised


# ---- the prefill bound: lower tiers' prompts never crowd a higher tier's prefills ---------------------
#
# The pool's replica: 1000 weighted tokens/s at prompt weight 1, so a 0.1 s window is 100 prompt tokens;
# the typical prompt (10) is below it.

PREFILL_LIMITS = {
    "g": gate("guaranteed", limit=(INF, INF, INF)),
    "e": gate("elastic", limit=(INF, INF, 0.0), backfill=True),
    "s": gate("spot", limit=(0, 0, 0), backfill=True),
}


def test_while_a_higher_tier_has_traffic_lower_tiers_add_prompts_only_within_the_prefill_window() -> None:
    lim = limiter(PREFILL_LIMITS, prefill_window_s=0.1)
    assert lim.prefill_budget() == 100
    # no higher-tier traffic yet: spot may fill the prefill queue as it likes
    assert lim.admit("s", lim.estimate(80, 10), 0.0).admitted
    assert lim.admit("s", lim.estimate(80, 10), 0.0).admitted
    g = lim.admit("g", lim.estimate(60, 10), 1.0).reservation  # guaranteed arrives: never bounded
    d = lim.admit("s", lim.estimate(30, 10), 1.0)
    assert not d.admitted and d.dimension == "throughput_tokens_per_s"
    assert "no idle prefill capacity on this replica" in d.message("s", "spot")
    assert "220 prompt tokens still to prefill" in d.message("s", "spot")
    # elastic counts its own and guaranteed's backlog, never spot's
    assert lim.admit("e", lim.estimate(30, 10), 1.0).admitted  # 60 + 30 <= 100
    e2 = lim.admit("e", lim.estimate(30, 10), 1.0)
    assert not e2.admitted and [s.scope for s in e2.shortfalls if s.scope != "limit"] == ["prefill"]
    lim.charge(g, 1, 1.1)  # guaranteed's first token: its prompt is prefilled
    assert lim.prefill_pending == [0, 30, 160]
    assert lim.admit("e", lim.estimate(30, 10), 1.1).admitted
    # a prompt longer than the whole window waits for the higher tiers to be quiet for an interval
    lim2 = limiter(PREFILL_LIMITS, prefill_window_s=0.1, interval_s=2.0)
    lim2.charge(lim2.admit("g", lim2.estimate(5, 5), 0.0).reservation, 1, 0.0)
    assert lim2.prefill_pending == [0, 0, 0]
    assert not lim2.admit("s", lim2.estimate(500, 10), 1.9).admitted
    assert lim2.admit("s", lim2.estimate(500, 10), 2.1).admitted


def test_lower_tiers_keep_the_prefill_room_that_a_waiting_higher_tier_needs() -> None:
    lim = limiter(PREFILL_LIMITS, prefill_window_s=0.1)
    lim.admit("g", lim.estimate(5, 5), 0.0)
    lim.prefill_waiting[1] = 90  # an elastic prompt of 90 waits for room (the gatekeeper parks it)
    d = lim.admit("s", lim.estimate(10, 10), 0.0)
    assert not d.admitted and [s.scope for s in d.shortfalls if s.scope != "limit"] == ["prefill"]
    assert lim.admit("e", lim.estimate(10, 10), 0.0).admitted  # its own tier's waiters do not count
    lim.prefill_waiting[1] = 0
    assert lim.admit("s", lim.estimate(10, 10), 20.0).admitted  # and past an interval without guaranteed, none


# ---- gates made on first request ---------------------------------------------------------


_NAMES = ("a", "b", "c", "d")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(("set", "update", "admit", "finish")),
            st.sampled_from(_NAMES),
            st.floats(0.0, 400.0),  # a limit's throughput
            st.integers(1, 300),  # a request's prompt tokens
        ),
        max_size=40,
    )
)
def test_a_gate_made_on_its_first_request_decides_as_one_made_when_its_limits_were_applied(ops) -> None:  # type: ignore[no-untyped-def]
    """While depths do not grow (the one difference: see the next test), lazily made gates decide
    exactly as gates made when the limits came."""
    limits = {n: gate("elastic", limit=(100.0, 4000.0, 4.0), burst=(200.0, 0.0, 0.0)) for n in _NAMES}
    lazy, eager = limiter({}), limiter(dict(limits))
    lazy.set_limits(dict(limits), 0.0, lazy=True)
    held: dict[str, list] = {"lazy": [], "eager": []}  # type: ignore[type-arg]
    for k, (op, name, tput, prompt) in enumerate(ops):
        now = 0.5 * (k + 1)
        new = gate("elastic", limit=(tput, 4000.0, 4.0), burst=(200.0, 0.0, 0.0))
        for which, lim in (("lazy", lazy), ("eager", eager)):
            table = {**limits, name: new}
            if op == "set":  # the table without one entitlement: its gate goes to zero
                del table[_NAMES[k % 4]]
                lim.set_limits(table, now, lazy=which == "lazy")
            elif op == "update":
                lim.update_limits({name: new}, (), now, table={**lazy.table, name: new} if which == "lazy" else None)
            elif op == "admit":
                d = lim.admit(name, lim.estimate(prompt, 10), now)
                if d.admitted:
                    held[which].append(d.reservation)
            elif held[which]:
                lim.finish(held[which].pop(0), now, prompt_tokens=prompt, generated_tokens=5)
        for name in _NAMES:
            a, b = lazy.limits_of(name), eager.limits_of(name)
            assert a == b, name
            assert lazy.status(name, now + 0.25) == eager.status(name, now + 0.25), name
    assert [r.entitlement for r in held["lazy"]] == [r.entitlement for r in held["eager"]]


def test_a_lazily_made_gate_starts_full_at_the_depth_in_force() -> None:
    small, large = gate(limit=(10.0, INF, INF), burst=(50.0, 0, 0)), gate(limit=(10.0, INF, INF), burst=(500.0, 0, 0))
    eager, lazy = limiter({"a": small}), limiter({})
    lazy.set_limits({"a": small}, 0.0, lazy=True)
    for lim in (eager, lazy):
        lim.set_limits({"a": large}, 1.0, lazy=lim is lazy)
    assert eager.status("a", 2.0).tokens_remaining == 60  # kept 50, refilled 10 in a second
    assert lazy.status("a", 2.0).tokens_remaining == 500


def test_applying_limits_lazily_makes_no_gate_until_a_request_comes() -> None:
    spot = gate("spot", limit=(10.0, 100.0, 1.0), burst=(20.0, 0.0, 0.0))
    lim = limiter({})
    lim.set_limits({f"e{i}": spot for i in range(10_000)}, 0.0, lazy=True)
    assert lim.gates == {} and lim.limits_of("e7") == spot
    assert lim.admit("e7", lim.estimate(5, 5), 1.0).admitted
    assert list(lim.gates) == ["e7"] and lim.entitlement_totals("e8") == (0, 0.0)
    lim.update_limits({"e7": gate("spot"), "e8": gate("spot")}, (), 2.0,
                      table={**lim.table, "e7": gate("spot"), "e8": gate("spot")})  # e7's gate only: none for e8
    assert list(lim.gates) == ["e7"] and lim.limits_of("e8") == gate("spot")
    assert lim.gates["e7"].limits == gate("spot")
    assert lim.admit("nobody", lim.estimate(5, 5), 2.0).retry_after_s == INF  # unknown: never
