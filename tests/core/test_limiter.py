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
