"""The gatekeeper: who goes through one sidecar, around the pure limiter (queue, preemption, bookkeeping).

The decisions are the pure limiter's (:mod:`tokenscaler.core.limiter`); this module adds
what every caller of it must do the same way, so the live sidecar and the virtual-time
experiments run one admission path and only the clock differs:

* **The never-fits check.** :meth:`Gatekeeper.screen`: a request above the replica's whole
  KV or concurrency, or its entitlement's whole ceiling, can never be admitted: a 400, counted
  as an error, never offered.
* **Guaranteed waiting.** A guaranteed request refused on its own allowance may wait in a
  bounded FIFO queue of its entitlement (``queue_size`` requests, at most ``max_wait_s``
  seconds) instead of being rejected at once, so a burst within its allowance is smoothed.
  It waits only for its *own* allowance: the limiter's backfill path (and the preemption of
  what lower tiers hold on idle capacity) is tried on every retry, and lower tiers yield
  this replica's idle capacity to it while it is refused for capacity. Only the head of a
  queue retries; it retries when one of its entitlement's requests ends, when new limits
  arrive, or when its bucket will have refilled enough. A newcomer never overtakes a waiting
  request. A request that cannot pass within ``max_wait_s`` (its bucket needs longer to
  refill, or it can never fit) is rejected at once, as is one that finds the queue full.
* **Elastic waiting for prefill room.** An elastic request whose only obstacle on idle
  capacity is the prefill bound (lower tiers' long prompts may not crowd a higher tier's,
  :meth:`~tokenscaler.core.limiter.Limiter._prefill_shortfall`) waits, at most ``max_wait_s``,
  for the prompts ahead of it to be prefilled, and spot keeps that room for it meanwhile
  (:attr:`~tokenscaler.core.limiter.Limiter.prefill_waiting`). It retries whenever a prefill
  ends; a newcomer of its entitlement is tried first (it may fit its allowance).
* **Bookkeeping.** Every request offered, every refusal by its binding dimension and the
  demand it represents, every preemption, the queue's depth and wait: into
  :class:`~tokenscaler.sidecar.metrics.SidecarMetrics`.
* **Preemption.** The victims a decision names are cut through the handle their caller
  registered (:class:`~tokenscaler.core.limiter.Preemptible`: the proxy's flight cancels its task; the experiments'
  cuts the simulated engine's request).

The queue is clock-free: :meth:`Gatekeeper.arrive` decides at once or parks a
:class:`Waiter`, which :meth:`Gatekeeper.finish`, :meth:`Gatekeeper.apply` and
:meth:`Gatekeeper.wake` (at :meth:`Gatekeeper.next_wake`) decide later. The proxy awaits
:meth:`Gatekeeper.admit`, which drives the same queue from the event loop's clock and
timers; the virtual-time runner drives it from its event heap.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable

from tokenscaler.core.limiter import Decision, Estimate, Limiter, Reservation, Shortfall, Vector
from tokenscaler.core.model import CONCURRENCY, DIMENSIONS, THROUGHPUT, Entitlement, Tier
from tokenscaler.sidecar.limits import LimitsUpdate
from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics

log = logging.getLogger(__name__)
THROUGHPUT_KEY = DIMENSIONS[THROUGHPUT]
_UNLIMITED: Vector = (math.inf, math.inf, math.inf)


class Waiter:
    """One request parked in its entitlement's queue until it is decided."""

    __slots__ = ("deadline", "decided", "est", "name", "on_decided", "prefill", "rank", "start", "wake_at")

    def __init__(
        self,
        name: str,
        est: Estimate,
        start: float,
        deadline: float,
        on_decided: Callable[[Decision], None],
        *,
        prefill: bool = False,
        rank: int = 0,
    ) -> None:
        self.prefill = prefill  # waits for prefill room (else for its own allowance)
        self.rank = rank
        self.name = name
        self.est = est
        self.start = start
        self.deadline = deadline
        self.wake_at = deadline  # when it retries on its own (refill, or the deadline)
        self.on_decided = on_decided
        self.decided = False


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
        prefill_tiers: Iterable[Tier] = (Tier.ELASTIC,),
        clock: Callable[[], float] | None = None,
        on_wake_at: Callable[[float], None] | None = None,
    ) -> None:
        """``clock``: the time of the live path (default: the running loop's); ``on_wake_at``:
        called with the time of the earliest timed retry whenever one is parked (default, live:
        a timer on the running loop)."""
        self.limiter = limiter
        self.metrics = metrics
        self.queue_size = queue_size
        self.max_wait_s = max_wait_s
        self.queue_tiers = frozenset(queue_tiers)
        self.prefill_tiers = frozenset(prefill_tiers)
        self._clock = clock
        self._on_wake_at = on_wake_at
        self._timer: asyncio.TimerHandle | None = None
        self._queues: dict[str, deque[Waiter]] = {}

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # ---- limits ------------------------------------------------------------------------

    def apply(self, update: LimitsUpdate, now: float) -> None:
        if update.partial:
            self.limiter.update_limits(update.limits, update.removed, now, table=update.table)
        else:
            self.limiter.set_limits(update.limits, now, lazy=update.lazy)
        self.metrics.limits_state = update.state
        for name in list(self._queues):
            self._retry_head(name, now)

    # ---- admission ---------------------------------------------------------------------

    def screen(self, name: str, est: Estimate, whole: Vector = _UNLIMITED) -> Shortfall | None:
        """The bound a request exceeds by itself (no wait can admit it here: a 400), counted as an
        error of its entitlement; None if it may be offered."""
        never = self.limiter.never_fits(est, whole)
        if never is not None:
            self.metrics.stats[name].errors += 1
        return never

    def arrive(
        self, name: str, est: Estimate, tier: Tier, now: float, on_decided: Callable[[Decision], None]
    ) -> Decision | None:
        """Offer a request: its decision now, or None when it waits in its entitlement's queue
        (``on_decided`` gets the decision later, from :meth:`finish`, :meth:`apply` or
        :meth:`wake`)."""
        stats = self.metrics.stats[name]
        stats.offered_requests += 1
        q = self._queues.get(name)
        first: Decision | None = None
        if not q or q[0].prefill:  # a prefill wait is no allowance to queue behind: try first
            first = self.limiter.admit(name, est, now)
            if first.admitted:
                return self._decided(name, est, first)
            # a prompt longer than the whole window cannot pass beside higher-tier traffic: no use waiting
            # (the window is looked up only for a refusal on the prefill bound alone)
            prefill = (
                tier in self.prefill_tiers
                and _prefill_only(first)
                and est.prompt_tokens <= self.limiter.prefill_budget()
            )
            if not prefill and not self._may_wait(tier, first):
                return self._decided(name, est, first)
        else:
            prefill = False
        q = self._queues.setdefault(name, deque())
        if len(q) >= self.queue_size:  # full queue: a fresh refusal (or a lucky pass)
            if not q:
                del self._queues[name]
            return self._decided(name, est, first or self.limiter.admit(name, est, now))
        w = Waiter(name, est, now, now + self.max_wait_s, on_decided, prefill=prefill, rank=tier.rank)
        q.append(w)
        stats.queued += 1
        if prefill:
            self.limiter.prefill_waiting[w.rank] += est.prompt_tokens  # lower tiers keep its room
        elif first is not None:  # the new head: it retries when its bucket will have refilled
            w.wake_at = self._retry_at(w, first, now)
        self._schedule(w.wake_at)
        return None

    async def admit(self, name: str, est: Estimate, tier: Tier) -> Decision:
        """:meth:`arrive` on the event loop's clock, waiting for the decision."""
        fut: asyncio.Future[Decision] | None = None

        def decided(decision: Decision) -> None:
            if fut is not None and not fut.done():
                fut.set_result(decision)

        decision = self.arrive(name, est, tier, self.now(), decided)
        if decision is not None:
            return decision
        fut = asyncio.get_running_loop().create_future()
        try:
            return await fut
        except asyncio.CancelledError:
            self._abandon(name, est)  # the client went away while it waited
            raise

    def _may_wait(self, tier: Tier, decision: Decision) -> bool:
        return tier in self.queue_tiers and self.queue_size > 0 and _bucket_wait(decision) <= self.max_wait_s

    def _gives_up(self, w: Waiter, decision: Decision, now: float) -> bool:
        if w.deadline <= now:
            return True
        if w.prefill:  # it waits only while prefill room is all it lacks
            return not _prefill_only(decision)
        return _bucket_wait(decision) > w.deadline - now

    def _retry_head(self, name: str, now: float) -> None:
        """The head of ``name``'s queue retries; each head that is decided makes room for the next."""
        q = self._queues.get(name)
        while q:
            w = q[0]
            decision = self.limiter.admit(name, w.est, now)
            if decision.admitted or self._gives_up(w, decision, now):
                self._leave(w, decision, now)
                continue
            w.wake_at = w.deadline if w.prefill else self._retry_at(w, decision, now)
            self._schedule(w.wake_at)
            return

    @staticmethod
    def _retry_at(w: Waiter, decision: Decision, now: float) -> float:
        """When a refused head retries on its own: once its bucket has refilled enough, or at its
        deadline when only in-flight requests hold it back (their ends wake it earlier)."""
        refill = _bucket_wait(decision)
        return min(w.deadline, now + max(refill, 0.001)) if refill > 0 else w.deadline

    def wake(self, now: float) -> None:
        """Timed retries due by ``now``: a head whose bucket has refilled retries, a request past
        its deadline gets a last decision and leaves."""
        for name, q in list(self._queues.items()):
            for w in [w for w in list(q)[1:] if w.deadline <= now]:
                self._leave(w, self.limiter.admit(name, w.est, now), now)
            if q and q[0].wake_at <= now:
                self._retry_head(name, now)
        nxt = self.next_wake()
        if nxt is not None:
            self._schedule(nxt)

    def next_wake(self) -> float | None:
        """The earliest timed retry of a parked request (None: nobody waits)."""
        times = [w.wake_at if i == 0 else w.deadline for q in self._queues.values() for i, w in enumerate(q)]
        return min(times) if times else None

    def _schedule(self, at: float) -> None:
        if self._on_wake_at is not None:
            self._on_wake_at(at)
            return
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if self._timer.when() <= at and not self._timer.cancelled():
                return  # an earlier wake-up is set; it schedules the next
            self._timer.cancel()
        self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.wake(self.now())

    def _unpark(self, w: Waiter) -> None:
        q = self._queues[w.name]
        q.remove(w)
        if not q:
            del self._queues[w.name]
        w.decided = True
        self.metrics.stats[w.name].queued -= 1
        if w.prefill:
            self.limiter.prefill_waiting[w.rank] -= w.est.prompt_tokens

    def _leave(self, w: Waiter, decision: Decision, now: float) -> None:
        self._unpark(w)
        self.metrics.queue_wait.observe(now - w.start)
        w.on_decided(self._decided(w.name, w.est, decision))

    def _abandon(self, name: str, est: Estimate) -> None:
        q = self._queues.get(name)
        if not q:
            return
        for w in q:
            if w.est is est and not w.decided:
                head = q[0] is w
                self._unpark(w)
                if head and q:
                    self._retry_head(name, self.now())
                return

    def _decided(self, name: str, est: Estimate, decision: Decision) -> Decision:
        """Count a decision and cut the victims it names."""
        if not decision.admitted:
            stats = self.metrics.stats[name]
            stats.rejected[decision.dimension or DIMENSIONS[CONCURRENCY]] += 1
            stats.offered_weighted += self.limiter.expected_weighted(name, est)
        for victim in decision.victims:
            self.metrics.stats[victim.entitlement].preempted += 1
            handle = victim.handle
            if handle is not None:
                handle.preempt()
            log.info(
                "preempted a %s request of %s (seq %d, %s) to give capacity back to %s",
                victim.tier.value, victim.entitlement, victim.seq, "backfill" if victim.backfill else "spot allowance",
                name,
            )  # fmt: skip
        return decision

    # ---- settling ----------------------------------------------------------------------

    def charge(self, res: Reservation, generated: int) -> None:
        now = self.now()
        if self.limiter.charge(res, generated, now) and self._queues:
            for name in list(self._queues):  # a prefill ended: who waits for prefill room retries
                self._retry_head(name, now)

    def finish(self, res: Reservation, *, prompt_tokens: int, generated_tokens: int, completed: bool) -> None:
        now = self.now()
        self.limiter.finish(
            res, now, prompt_tokens=prompt_tokens, generated_tokens=generated_tokens, completed=completed
        )
        # its entitlement's waiting head retries; with capacity free, so does every other queue's
        for name in list(self._queues):
            self._retry_head(name, now)

    def stats(self, name: str) -> EntitlementStats:
        return self.metrics.stats[name]


def whole_limit(ent: Entitlement) -> Vector:
    """An entitlement's whole configured limit plus burst: a request above it can never run (the
    ``whole`` of :meth:`Gatekeeper.screen`)."""
    t, k, c = (ent.limit.to_array() + ent.burst.to_array()).tolist()
    return (t, k, c)


def _prefill_only(decision: Decision) -> bool:
    """The idle-capacity path failed on the prefill bound alone (its own allowance aside)."""
    other = [s.scope for s in decision.shortfalls if s.scope != "limit"]
    return bool(other) and all(scope == "prefill" for scope in other)


def _bucket_wait(decision: Decision) -> float:
    """A lower bound on how long this request must wait for its own allowance, absent
    refunds: the bucket's refill time; ``inf`` if it can never fit; 0 if only in-flight
    requests hold it back (they may end at any moment)."""
    wait = 0.0
    for s in decision.shortfalls:
        if s.scope == "limit" and (math.isinf(s.retry_after_s) or s.dimension == THROUGHPUT_KEY):
            wait = max(wait, s.retry_after_s)
    return wait
