"""The guaranteed queue in-process, on the event loop's clock: FIFO, woken by releases and
refills, bounded in size and in wait, and never entered when waiting cannot help.

Every test runs on a virtual-time event loop (:mod:`tests.virtual_loop`): the gatekeeper
reads the loop's clock and waits with ``asyncio.timeout`` on it, so a wait takes no real
time and its length is exact, whatever the machine's load.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.core.builders import config, make_entitlement, make_pool, vec
from tests.virtual_loop import run
from tokenscaler.core.limiter import GateLimits, Limiter
from tokenscaler.core.model import Tier
from tokenscaler.sidecar.gatekeeper import Gatekeeper
from tokenscaler.sidecar.limits import LimitsUpdate
from tokenscaler.sidecar.metrics import QUEUE_WAIT_SECONDS, EntitlementStats, SidecarMetrics

INF = math.inf
EXACT = 1e-9  # virtual time is exact up to float rounding of the sums


def elapsed(expected: float) -> object:
    return pytest.approx(expected, abs=EXACT)


def admission(limits: GateLimits, **kw: object) -> Gatekeeper:
    pool = config([make_pool()], [make_entitlement("g", "guaranteed", guaranteed=vec(1, 1, 1))]).pool("p")
    limiter = Limiter(pool, now=asyncio.get_running_loop().time())
    metrics = SidecarMetrics("p", "r", limiter, [EntitlementStats("g", "guaranteed")])
    adm = Gatekeeper(limiter, metrics, **kw)  # type: ignore[arg-type]
    adm.apply(LimitsUpdate({"g": limits}, "static"), adm.now())
    return adm


def one_at_a_time() -> GateLimits:
    return GateLimits(tier=Tier.GUARANTEED, limit=(INF, INF, 1.0))


async def _fifo_and_release() -> None:
    adm = admission(one_at_a_time(), max_wait_s=5.0)
    est = adm.limiter.estimate(10, 10)
    first = await adm.admit("g", est, Tier.GUARANTEED)
    assert first.admitted
    admitted_at: list[tuple[int, float]] = []

    async def wait(i: int) -> None:
        d = await adm.admit("g", est, Tier.GUARANTEED)
        assert d.admitted
        admitted_at.append((i, adm.now() - start))
        await asyncio.sleep(0.01)  # each holds its slot 10 ms
        adm.finish(d.reservation, prompt_tokens=10, generated_tokens=10, completed=True)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    assert adm.metrics.stats["g"].queued == 3 and admitted_at == []
    start = adm.now()
    adm.finish(first.reservation, prompt_tokens=10, generated_tokens=10, completed=True)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    # in order, each the moment the one before it ends: woken by releases, not by polling
    assert [i for i, _ in admitted_at] == [0, 1, 2]
    assert [t for _, t in admitted_at] == [elapsed(0.0), elapsed(0.01), elapsed(0.02)]
    assert adm.now() - start == elapsed(0.03)
    assert adm.metrics.stats["g"].queued == 0


def test_waiters_are_admitted_in_order_as_requests_end() -> None:
    run(_fifo_and_release())


async def _bounded() -> None:
    adm = admission(one_at_a_time(), max_wait_s=0.2, queue_size=1)
    est = adm.limiter.estimate(10, 10)
    assert (await adm.admit("g", est, Tier.GUARANTEED)).admitted
    start = adm.now()
    waiting = asyncio.create_task(adm.admit("g", est, Tier.GUARANTEED))
    await asyncio.sleep(0.01)
    assert adm.metrics.stats["g"].queued == 1
    full = await adm.admit("g", est, Tier.GUARANTEED)  # the queue holds one: refused at once
    assert not full.admitted and full.dimension == "concurrency"
    assert adm.now() - start == elapsed(0.01)
    timed_out = await waiting
    assert not timed_out.admitted and timed_out.dimension == "concurrency"
    assert adm.now() - start == elapsed(0.2)  # refused at its max_wait, not before, not after
    assert adm.metrics.stats["g"].queued == 0
    # a concurrency shortfall is worth waiting for even when the retry hint (1 s) exceeds the wait
    labels = {"pool": "p", "replica": "r"}
    assert adm.metrics.registry.get_sample_value(QUEUE_WAIT_SECONDS + "_count", labels) == 1
    waited = adm.metrics.registry.get_sample_value(QUEUE_WAIT_SECONDS + "_sum", labels)
    assert waited == elapsed(0.2)


def test_the_queue_is_bounded_in_size_and_wait() -> None:
    run(_bounded())


async def _hopeless() -> None:
    adm = admission(GateLimits(tier=Tier.GUARANTEED, limit=(1.0, INF, INF), burst=(30.0, 0, 0)), max_wait_s=1.0)
    est = adm.limiter.estimate(10, 10)
    assert (await adm.admit("g", est, Tier.GUARANTEED)).admitted
    start = adm.now()
    d = await adm.admit("g", est, Tier.GUARANTEED)  # needs ~10 s of refill: waiting 1 s cannot help
    assert not d.admitted and adm.now() - start == 0
    assert adm.metrics.stats["g"].queued == 0
    other = await adm.admit("g", est, Tier.ELASTIC)  # other tiers never queue
    assert not other.admitted and adm.now() - start == 0
    labels = {"pool": "p", "replica": "r"}
    assert not adm.metrics.registry.get_sample_value(QUEUE_WAIT_SECONDS + "_count", labels)  # nobody queued


def test_a_request_that_waiting_cannot_help_is_refused_at_once() -> None:
    run(_hopeless())


def test_a_waiting_request_is_admitted_when_its_bucket_has_refilled() -> None:
    async def go() -> None:
        adm = admission(GateLimits(tier=Tier.GUARANTEED, limit=(50.0, INF, INF), burst=(30.0, 0, 0)), max_wait_s=2.0)
        est = adm.limiter.estimate(10, 10)
        assert (await adm.admit("g", est, Tier.GUARANTEED)).admitted
        start = adm.now()
        d = await adm.admit("g", est, Tier.GUARANTEED)
        assert d.admitted
        assert adm.now() - start == elapsed(0.2)  # 10 missing tokens at 50/s: 0.2 s

    run(go())


def test_elastic_waits_for_prefill_room_beside_guaranteed_traffic_and_spot_keeps_that_room() -> None:
    """The prefill bound (core/limiter.py): beside guaranteed traffic, elastic on idle capacity waits
    for the prompts ahead of it to be prefilled rather than being refused, and spot may not take that
    room while it waits; the first token of the guaranteed request admits it."""

    async def go() -> None:
        weights = {"prompt": 1.0, "generation": 1.0}
        typical = {"prompt_tokens": 10, "output_tokens": 10}
        pool = config(
            [make_pool(replica=vec(1000, 100000, 16), token_weights=weights, typical_request=typical)],
            [make_entitlement("g", "guaranteed"), make_entitlement("e"), make_entitlement("s", "spot")],
        ).pool("p")
        limiter = Limiter(pool, now=asyncio.get_running_loop().time(), prefill_window_s=0.1)  # 100 tokens
        stats = [EntitlementStats("g", "guaranteed"), EntitlementStats("e", "elastic"), EntitlementStats("s", "spot")]
        adm = Gatekeeper(limiter, SidecarMetrics("p", "r", limiter, stats), max_wait_s=2.0)
        adm.apply(LimitsUpdate({
            "g": GateLimits(tier=Tier.GUARANTEED, limit=(INF, INF, INF)),
            "e": GateLimits(tier=Tier.ELASTIC, backfill=True),
            "s": GateLimits(tier=Tier.SPOT, backfill=True),
        }, "static"), adm.now())  # fmt: skip
        g = await adm.admit("g", limiter.estimate(80, 10), Tier.GUARANTEED)
        assert g.admitted
        start = adm.now()
        waiting = asyncio.create_task(adm.admit("e", limiter.estimate(60, 10), Tier.ELASTIC))
        await asyncio.sleep(0.05)
        assert not waiting.done() and adm.metrics.stats["e"].queued == 1
        assert limiter.prefill_waiting[Tier.ELASTIC.rank] == 60
        spot = await adm.admit("s", limiter.estimate(10, 10), Tier.SPOT)  # 80 pending + 60 waiting: no room
        assert not spot.admitted and "no idle prefill capacity" in spot.message("s", "spot")
        adm.charge(g.reservation, 1)  # guaranteed's first token: its prompt is prefilled
        e = await asyncio.wait_for(waiting, 1)
        assert e.admitted and e.reservation.backfill
        assert adm.now() - start == elapsed(0.05)  # admitted the moment the prefill ended, not by polling
        assert limiter.prefill_waiting == [0, 0, 0] and adm.metrics.stats["e"].queued == 0
        assert adm.metrics.stats["e"].rejected == dict.fromkeys(adm.metrics.stats["e"].rejected, 0)

    run(go())
