"""The gatekeeper: the asynchronous edge of a sidecar's admission decisions (queue, preemption, settling).

The decisions are the pure limiter's (:mod:`tokenscaler.core.limiter`); this module adds
what needs the event loop:

* **Guaranteed waiting.** A guaranteed request refused on its own allowance may wait in a
  bounded FIFO queue of its entitlement (``queue_size`` requests, at most ``max_wait_s``
  seconds) instead of being rejected at once, so a burst within its allowance is smoothed.
  Only the head of a queue retries; it is woken when one of its entitlement's requests ends,
  when new limits arrive, or when its bucket will have refilled enough. A newcomer never
  overtakes a waiting request. A request that cannot pass within ``max_wait_s`` (its bucket
  needs longer to refill, or it can never fit) is rejected at once, as is one that finds
  the queue full.
* **Preemption.** The victims a decision names are cut through the handle their handler
  registered (:class:`Preemptible`).
* **Settling.** :meth:`Gatekeeper.finish` reconciles a reservation and wakes its queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from tokenscaler.core.limiter import Decision, Estimate, Limiter, Reservation
from tokenscaler.core.model import DIMENSIONS, THROUGHPUT, Tier
from tokenscaler.sidecar.limits import LimitsUpdate
from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics

log = logging.getLogger(__name__)
THROUGHPUT_KEY = DIMENSIONS[THROUGHPUT]


class Preemptible(Protocol):
    def preempt(self) -> None: ...


class _Waiter:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = asyncio.Event()


class Gatekeeper:
    """Who goes through one sidecar: the limiter plus the guaranteed queue, preemption and metrics."""

    def __init__(
        self,
        limiter: Limiter,
        metrics: SidecarMetrics,
        *,
        queue_size: int = 32,
        max_wait_s: float = 2.0,
        queue_tiers: Iterable[Tier] = (Tier.GUARANTEED,),
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.queue_size = queue_size
        self.max_wait_s = max_wait_s
        self.queue_tiers = frozenset(queue_tiers)
        self._clock = clock
        self._queues: dict[str, deque[_Waiter]] = {}

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # ---- limits ------------------------------------------------------------------------

    def apply(self, update: LimitsUpdate, now: float) -> None:
        self.limiter.set_limits(update.limits, now)
        self.metrics.limits_state = update.state
        for q in self._queues.values():
            if q:
                q[0].event.set()

    # ---- admission ---------------------------------------------------------------------

    async def admit(self, name: str, est: Estimate, tier: Tier) -> Decision:
        q = self._queues.get(name)
        if not q:
            decision = self.limiter.admit(name, est, self.now())
            if decision.admitted or not self._may_wait(tier, decision):
                return self._dispatch(decision)
        return await self._wait(name, est, tier)

    def _may_wait(self, tier: Tier, decision: Decision) -> bool:
        return tier in self.queue_tiers and self.queue_size > 0 and _bucket_wait(decision) <= self.max_wait_s

    async def _wait(self, name: str, est: Estimate, tier: Tier) -> Decision:
        q = self._queues.setdefault(name, deque())
        stats = self.metrics.stats[name]
        start = self.now()
        if len(q) >= self.queue_size:
            return self.limiter.admit(name, est, start)  # full queue: a fresh refusal (or a lucky pass)
        me = _Waiter()
        q.append(me)
        stats.queued += 1
        deadline = start + self.max_wait_s
        try:
            while True:
                now = self.now()
                if q[0] is me:
                    decision = self.limiter.admit(name, est, now)
                    refill = _bucket_wait(decision)
                    if decision.admitted or refill > deadline - now:
                        return self._dispatch(decision)
                    wait = min(deadline - now, max(refill, 0.001)) if refill > 0 else deadline - now
                else:
                    wait = deadline - now
                if wait <= 0:
                    return self._dispatch(self.limiter.admit(name, est, now))
                me.event.clear()
                try:
                    async with asyncio.timeout(wait):
                        await me.event.wait()
                except TimeoutError:
                    pass
        finally:
            q.remove(me)
            stats.queued -= 1
            if q:
                q[0].event.set()
            self.metrics.queue_wait.observe(self.now() - start)

    def _dispatch(self, decision: Decision) -> Decision:
        for victim in decision.victims:
            self.metrics.stats[victim.entitlement].preempted += 1
            handle = victim.handle
            if handle is not None:
                handle.preempt()  # type: ignore[attr-defined]
            log.info(
                "preempted a backfilled %s request of %s (seq %d) to give capacity back",
                victim.tier.value, victim.entitlement, victim.seq,
            )  # fmt: skip
        return decision

    # ---- settling ----------------------------------------------------------------------

    def charge(self, res: Reservation, generated: int) -> None:
        self.limiter.charge(res, generated, self.now())

    def finish(self, res: Reservation, *, prompt_tokens: int, generated_tokens: int, completed: bool) -> None:
        self.limiter.finish(
            res, self.now(), prompt_tokens=prompt_tokens, generated_tokens=generated_tokens, completed=completed
        )
        q = self._queues.get(res.entitlement)
        if q:
            q[0].event.set()

    def stats(self, name: str) -> EntitlementStats:
        return self.metrics.stats[name]


def _bucket_wait(decision: Decision) -> float:
    """A lower bound on how long this request must wait for its own allowance, absent
    refunds: the bucket's refill time; ``inf`` if it can never fit; 0 if only in-flight
    requests hold it back (they may end at any moment)."""
    wait = 0.0
    for s in decision.shortfalls:
        if s.scope == "limit" and (math.isinf(s.retry_after_s) or s.dimension == THROUGHPUT_KEY):
            wait = max(wait, s.retry_after_s)
    return wait
