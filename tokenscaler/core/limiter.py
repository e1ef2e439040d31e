"""Admission decisions of one sidecar: multi-dimensional token buckets and in-flight gates.

Owns, for one replica, every entitlement's gate and the replica's own totals, and decides
whether a request is admitted, by which path, what it reserves and whom it displaces. Pure:
no asyncio and no clock; every method takes ``now`` (seconds on any monotonic clock), and
every refusal carries its reason as data (:class:`Shortfall`).

Per entitlement (:class:`GateLimits`, this replica's share of its limits):

* ``throughput_tokens_per_s``: a token bucket in weighted tokens, refilled at ``limit`` per
  second up to a depth of ``burst``. A request takes its whole estimate at admission:
  ``prompt x w_prompt + max new tokens x w_generation``;
* ``kv_tokens``: the KV footprint reserved by in-flight requests (prompt + max new tokens
  each) stays within ``limit + burst``;
* ``concurrency``: in-flight sequences stay within ``limit + burst``.

A request is admitted *within its allowance* only if all three pass. Otherwise, if the
entitlement may backfill, it may be admitted on *idle capacity* when the replica's own totals
leave room (in-flight sequences and reserved KV against the replica's capacity, and a
replica-wide bucket refilled at the replica's throughput) and its ceiling (its configured
limit on this replica) is not exceeded.

Tier order holds on the replica by construction:

* **Lower tiers never spend a higher tier's throughput.** The replica-wide bucket is one per
  tier (:attr:`Limiter.replica_buckets`): the bucket a tier's backfill is judged against is
  drained by that tier and the tiers above it only, so spot's use never empties elastic's or
  guaranteed's view of idle throughput, and elastic's never guaranteed's.
* **What a lower tier holds on idle capacity is given back.** Backfilled requests, and every
  spot request (spot's allowance is idle capacity too), are *preemptible*. A request within
  its allowance that finds the replica full preempts, lowest tier first (then lower priority,
  then newest), the preemptible requests of its own tier's backfill and of every lower tier;
  a request on backfill preempts those of strictly lower tiers when that makes it fit.
  Elastic requests within their allowance and guaranteed requests are never preempted by a
  lower or equal tier's backfill. A victim's KV and concurrency are released at once and the
  unused part of its estimate (all but its prompt and the tokens it streamed) is refunded to
  every bucket it was charged to, before the new request is judged.
* **A lower tier yields to a higher one refused for capacity.** When a request is refused
  for the replica's capacity (its backfill path failed on a ``replica`` shortfall, which with
  the rules above means equal or higher tiers hold the replica), idle-capacity admissions of
  every strictly lower tier (backfill, and spot on any path) are refused for ``interval_s``:
  what frees up goes to the tier that asked first.
* **Inversions are counted, not assumed away.** :attr:`Limiter.inversions` counts, per
  ``(higher, lower)`` tier, every idle-capacity admission of a lower tier within
  ``interval_s`` after a higher tier was refused here for the replica's capacity. The rules
  above keep it at 0; the counter is what proves it, live and in virtual time.

Reconciliation: generated tokens are charged as they stream; tokens beyond the estimate put
the buckets into debt (and grow the KV reservation) rather than going uncounted; at the end
KV and concurrency are released and the unused part of the estimate is refunded, never
filling a bucket above its depth.

The bound: admission needs ``level >= estimate``, or a full bucket for a request larger than
the whole depth, so the estimates admitted from a bucket over any window of ``T`` seconds sum
to at most ``depth + rate x T + refunds`` plus that one oversized request; every refund is
an estimate minus what was used, so the weighted tokens actually used by requests admitted
within their allowance are at most ``limit x T + burst + one request's estimate``, however
many arrive at once. Tokens beyond an estimate are charged as debt and delay later admissions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tokenscaler.core.model import CONCURRENCY, DIMENSIONS, KV, THROUGHPUT, TIER_ORDER, Pool, Tier

INF = math.inf
Vector = tuple[float, float, float]
_ZERO: Vector = (0.0, 0.0, 0.0)
_UNLIMITED: Vector = (INF, INF, INF)
_MEAN_ALPHA = 0.1  # weight of the newest request in the mean generated tokens per sequence


@dataclass(frozen=True)
class GateLimits:
    """One entitlement's limits on this replica (``inf`` = unlimited)."""

    tier: Tier
    priority: int = 0
    limit: Vector = _ZERO
    burst: Vector = _ZERO
    backfill: bool = False
    """May use this replica's idle capacity above its own limit."""
    ceiling: Vector = _UNLIMITED
    """Never exceeded, backfill included: the configured limit on this replica."""
    ceiling_burst: Vector = _ZERO


@dataclass(frozen=True)
class Estimate:
    """What a request may consume, known before it is sent."""

    prompt_tokens: int
    max_new_tokens: int  # over all sequences
    sequences: int  # prompts x n
    weighted: float  # prompt x w_prompt + max_new_tokens x w_generation
    kv_tokens: int  # prompt tokens of every sequence + max_new_tokens


PREFILL_FLOOR_PROMPTS = 4
"""The prefill window holds at least this many typical prompts: short prompts (under an engine's
prefill knee, nearly free) are not held back one at a time."""
MAX_DEBT_S = 15.0
"""A request larger than its bucket is admitted on a full bucket, borrowing from the future
(the level goes negative), when what it borrows refills within this many seconds: a long
prompt from a low-rate tenant still passes, then waits its turn; a request that would
borrow more (a 500-token request on a 20 tokens/s limit without burst) is refused. Over any
window a bucket admits at most its refill, its depth and ``MAX_DEBT_S`` of refill."""


class Bucket:
    """A token bucket in weighted tokens whose level may go negative (debt, bounded)."""

    __slots__ = ("depth", "level", "rate", "t")

    def __init__(self, rate: float, depth: float, now: float) -> None:
        self.rate = rate
        self.depth = depth
        self.level = depth
        self.t = now

    def refill(self, now: float) -> float:
        if now > self.t:
            if self.level < self.depth:
                self.level = min(self.depth, self.level + self.rate * (now - self.t))
            self.t = now
        return self.level

    def allows(self, cost: float, now: float) -> bool:
        level = self.refill(now)
        if level >= cost:
            return True
        # larger than the bucket: admitted on a full one, leaving bounded debt
        return self.depth < cost <= self.max_cost() and level >= self.depth

    def max_cost(self) -> float:
        """The largest request this bucket ever admits: its depth plus ``MAX_DEBT_S`` of refill
        (only the depth when it does not refill)."""
        return self.depth + self.rate * MAX_DEBT_S if self.depth > 0 else 0.0

    def wait_s(self, cost: float) -> float:
        """Seconds until :meth:`allows` holds, with no other traffic (``inf`` if never)."""
        if cost > self.depth and cost > self.max_cost():
            return INF  # more than the bucket and the debt it may take on: never admitted
        deficit = min(cost, self.depth) - self.level
        if deficit <= 0:
            return 0.0
        return deficit / self.rate if self.rate > 0 else INF

    def refund(self, amount: float) -> None:
        self.level = min(self.depth, self.level + amount)

    def update(self, rate: float, depth: float, now: float) -> None:
        self.refill(now)
        self.rate = rate
        self.depth = depth
        self.level = min(self.level, depth)


def _bucket(rate: float, depth: float, now: float) -> Bucket | None:
    return None if math.isinf(rate) else Bucket(rate, depth, now)


@dataclass(frozen=True)
class Shortfall:
    """One dimension on which a request does not fit, with the numbers."""

    dimension: str
    # "limit" (own allowance), "ceiling", "replica" (idle capacity), "prefill" (idle prefill capacity)
    # or "yield" (held for a higher tier)
    scope: str
    requested: float
    in_use: float  # reserved KV / in-flight sequences; throughput: allowance already spent
    allowed: float  # limit + burst; throughput: the bucket depth
    available: float  # allowed - in_use; throughput: the bucket level
    rate: float = 0.0  # throughput: refill per second
    retry_after_s: float = INF
    yielded_to: str | None = None  # scope "yield": the higher tier this replica's idle capacity is held for

    def describe(self) -> str:
        if self.scope == "yield":
            return f"held for {self.yielded_to} traffic refused on this replica {self.in_use:.3g}s ago"
        if self.scope == "prefill":
            return (
                f"a prompt of {self.requested:.0f} tokens with {self.in_use:.0f} prompt tokens still to prefill here "
                f"(at most {self.allowed:.0f} beside higher-tier traffic)"
            )
        if self.dimension == DIMENSIONS[THROUGHPUT]:
            return (
                f"requested {self.requested:.0f} weighted tokens, {max(self.available, 0):.0f} of "
                f"{self.allowed:.0f} available (refill {self.rate:g}/s)"
            )
        unit = "KV tokens" if self.dimension == DIMENSIONS[KV] else "requests"
        return f"requested {self.requested:.0f} {unit} with {self.in_use:.0f} of {self.allowed:g} already in flight"


class Preemptible(Protocol):
    """What a caller registers on a reservation to cut its request when it is preempted."""

    def preempt(self) -> None: ...


@dataclass(eq=False, slots=True)
class Reservation:
    """What one admitted request holds until :meth:`Limiter.finish`."""

    entitlement: str
    tier: Tier
    priority: int
    estimate: Estimate
    backfill: bool
    seq: int
    admitted_at: float
    charged: float = 0.0  # weighted tokens taken from the buckets so far
    kv_tokens: float = 0.0
    generated: int = 0
    prefill: int = 0  # prompt tokens the engine has yet to prefill (0 once its first token streamed)
    active: bool = True  # still holds KV and concurrency
    preempted: bool = False
    finished: bool = False
    handle: Preemptible | None = field(default=None, repr=False)
    """Set by the caller: whatever it needs to cut the request when preempted."""

    @property
    def idle_capacity(self) -> bool:
        """Held on idle capacity, so preemptible by higher tiers: backfill, or any spot request."""
        return self.backfill or self.tier is Tier.SPOT


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reservation: Reservation | None = None
    shortfalls: tuple[Shortfall, ...] = ()
    dimension: str | None = None  # the binding dimension of a refusal
    retry_after_s: float = 0.0
    victims: tuple[Reservation, ...] = ()

    def message(self, entitlement: str, tier: str) -> str:
        if self.admitted:
            return "admitted"
        own = [s for s in self.shortfalls if s.scope == "limit"]
        other = [s for s in self.shortfalls if s.scope != "limit"]
        parts = [f"Rate limit reached for entitlement {entitlement} ({tier}) on {self.dimension}"]
        for s in own:
            parts.append(f"{s.dimension}: {s.describe()}")
        for s in other:
            where = {
                "ceiling": "its ceiling", "yield": "idle capacity yielded to a higher tier",
                "prefill": "no idle prefill capacity on this replica",
            }.get(
                s.scope, "no idle capacity on this replica"
            )
            parts.append(f"{where}: {s.dimension}: {s.describe()}")
        wait = "later" if math.isinf(self.retry_after_s) else f"in {max(self.retry_after_s, 0.001):.3g}s"
        return "; ".join(parts) + f". Please try again {wait}."


@dataclass(frozen=True)
class RateLimitStatus:
    """An entitlement's own allowance now, as ``x-ratelimit-*`` headers report it."""

    tokens_limit: float
    tokens_remaining: float
    tokens_reset_s: float
    requests_limit: float
    requests_remaining: float
    requests_reset_s: float


class Gate:
    """One entitlement's state on this replica."""

    __slots__ = ("bf_inflight", "bf_kv", "ceiling", "inflight", "kv", "limits", "mean_generated", "own")

    def __init__(self, limits: GateLimits, now: float) -> None:
        self.limits = limits
        self.own = _bucket(limits.limit[THROUGHPUT], limits.burst[THROUGHPUT], now)
        self.ceiling = _bucket(limits.ceiling[THROUGHPUT], limits.ceiling_burst[THROUGHPUT], now)
        self.inflight = 0  # sequences admitted within the allowance
        self.kv = 0.0
        # "bf_": what was admitted as backfill of idle replica capacity (beyond the gate's own
        # allowance), counted apart from inflight/kv; the entitlement's totals are the sums
        self.bf_inflight = 0  # sequences admitted on idle capacity
        self.bf_kv = 0.0  # KV tokens reserved by them
        self.mean_generated: float | None = None  # per sequence, of completed requests

    def update(self, limits: GateLimits, now: float) -> None:
        for attr, rate, depth in (
            ("own", limits.limit[THROUGHPUT], limits.burst[THROUGHPUT]),
            ("ceiling", limits.ceiling[THROUGHPUT], limits.ceiling_burst[THROUGHPUT]),
        ):
            bucket: Bucket | None = getattr(self, attr)
            if math.isinf(rate):
                setattr(self, attr, None)
            elif bucket is None:
                setattr(self, attr, Bucket(rate, depth, now))
            else:
                bucket.update(rate, depth, now)
        self.limits = limits


def _in_flight_shortfalls(
    scope: str, est: Estimate, kv_in_use: float, kv_allowed: float, seq_in_use: float, seq_allowed: float, retry: float
) -> list[Shortfall]:
    """KV, then concurrency, where in-flight use plus ``est`` exceeds what is allowed (a list, not a
    generator: it is called two to three times per admission, and nearly always finds nothing)."""
    kv_over = kv_in_use + est.kv_tokens > kv_allowed
    seq_over = seq_in_use + est.sequences > seq_allowed
    if not (kv_over or seq_over):
        return []
    out: list[Shortfall] = []
    if kv_over:
        never = est.kv_tokens > kv_allowed
        out.append(Shortfall(
            DIMENSIONS[KV], scope, est.kv_tokens, kv_in_use, kv_allowed, kv_allowed - kv_in_use,
            retry_after_s=INF if never else retry,
        ))  # fmt: skip
    if seq_over:
        never = est.sequences > seq_allowed
        out.append(Shortfall(
            DIMENSIONS[CONCURRENCY], scope, est.sequences, seq_in_use, seq_allowed, seq_allowed - seq_in_use,
            retry_after_s=INF if never else retry,
        ))  # fmt: skip
    return out


def _smaller_stated(configured: float, stated: float | None) -> float:
    """The smaller of the configured capacity and what the engine states (None, not finite or
    not positive: it says nothing)."""
    return configured if stated is None or not math.isfinite(stated) or stated <= 0 else min(configured, float(stated))


def _bucket_shortfall(scope: str, bucket: Bucket | None, cost: float, now: float) -> Shortfall | None:
    if bucket is None or bucket.allows(cost, now):
        return None
    return Shortfall(
        DIMENSIONS[THROUGHPUT], scope, cost, bucket.depth - bucket.level, bucket.depth, bucket.level,
        rate=bucket.rate, retry_after_s=bucket.wait_s(cost),
    )  # fmt: skip


class Limiter:
    """Every entitlement's gate on one replica, and the replica's own totals."""

    def __init__(
        self,
        pool: Pool,
        *,
        now: float = 0.0,
        preempt: bool = True,
        replica_window_s: float = 1.0,
        inflight_retry_s: float = 1.0,
        interval_s: float = 5.0,
        prefill_window_s: float = 0.2,
        tier_order: bool = True,
    ) -> None:
        """``replica_window_s``: depth of the replica-wide buckets, in seconds of its throughput
        (at least one typical request); ``inflight_retry_s``: the retry hint when KV or
        concurrency binds (the limiter cannot know when in-flight requests will end);
        ``interval_s``: the controller's interval, how long lower tiers yield after a higher
        tier was refused for this replica's capacity, and the window inversions are counted in;
        ``prefill_window_s``: while a higher tier has traffic here, the prompt tokens still to be
        prefilled (its own tier's and higher tiers') beside which a lower tier may add a prompt
        on idle capacity, in seconds of the replica's throughput at the prompt weight (at least
        :data:`PREFILL_FLOOR_PROMPTS` typical prompts; 0: no such bound);
        ``tier_order`` False: only each gate and the replica's totals bind, none of the tier rules
        above (no yield, no prefill bound, spot's allowance not judged against idle capacity): a
        sidecar that only counts, as the experiments' baselines without token pools' admission."""
        self.pool = pool
        self.w_prompt = pool.token_weights.prompt
        self.w_generation = pool.token_weights.generation
        self.capacity: Vector = (
            pool.replica.throughput_tokens_per_s, pool.replica.kv_tokens, pool.replica.concurrency,
        )  # fmt: skip
        self.configured: Vector = self.capacity
        self.engine: tuple[float | None, float | None, float | None] = (None, None, None)
        self.replica_window_s = replica_window_s
        depth = max(self.capacity[THROUGHPUT] * replica_window_s, float(pool.typical_request_vector()[THROUGHPUT]))
        # one replica-wide bucket per tier (index: rank); bucket k is drained by tiers of rank <= k
        self.replica_buckets: tuple[Bucket, ...] = tuple(
            Bucket(self.capacity[THROUGHPUT], depth, now) for _ in TIER_ORDER
        )
        self.preempt = preempt
        self.inflight_retry_s = inflight_retry_s
        self.interval_s = interval_s
        self.gates: dict[str, Gate] = {}
        """The gates in use: made on an entitlement's first request, from :attr:`table`."""
        self.table: Mapping[str, GateLimits] = {}
        """Every entitlement's limits as last applied (a gate is made from it when first needed)."""
        self._own_table = False
        self.inflight = 0  # sequences in flight on this replica, both paths
        self.kv = 0.0  # KV tokens reserved on this replica, both paths
        self._preemptible: dict[int, Reservation] = {}  # on idle capacity (Reservation.idle_capacity), by seq
        self._seq = 0
        self._refused_at: list[float] = [-INF] * len(TIER_ORDER)  # per rank: last refusal for replica capacity
        self._seen_at: list[float] = [-INF] * len(TIER_ORDER)  # per rank: last request offered here
        self.prefill_pending: list[int] = [0] * len(TIER_ORDER)  # per rank: prompt tokens not yet prefilled
        self.prefill_window_s = prefill_window_s
        self.tier_order = tier_order
        self.prefill_waiting: list[int] = [0] * len(TIER_ORDER)
        """Per rank: prompt tokens of requests waiting (in the gatekeeper) for prefill room; lower
        tiers keep that room for them."""
        self.inversions: dict[tuple[Tier, Tier], int] = {}
        """(higher, lower) -> idle-capacity admissions of ``lower`` within ``interval_s`` after
        ``higher`` was refused here for the replica's capacity (see the module docstring)."""

    # ---- configuration -----------------------------------------------------------------

    def set_limits(self, limits: Mapping[str, GateLimits], now: float, *, lazy: bool = False) -> None:
        """Apply new limits for every entitlement; bucket levels carry over (clamped to the new
        depth), in-flight reservations stay. Entitlements not named keep their gate with zero
        limits.

        ``limits`` becomes the table gates are made from. ``lazy``: a gate is made on an
        entitlement's first request (:meth:`gate`), not here, so applying the limits of 10,000
        entitlements costs the gates in use, not 10,000 (``limits`` may be a mapping that builds
        each entry when asked: the sidecar's view of the v1beta1 documents). The one difference
        it makes: a gate made later starts full at the depth then in force, where one made now
        and left untouched keeps its level when a later depth is larger (and refills to it)."""
        old = self.table
        self.table, self._own_table = limits, False
        for name, gate in self.gates.items():
            gl = limits.get(name)
            gate.update(GateLimits(tier=gate.limits.tier, priority=gate.limits.priority) if gl is None else gl, now)
        if old:  # named before, not now, no gate yet: it gets one with zero limits, as above
            for name in old.keys() - limits.keys() - self.gates.keys():
                was = old[name]
                self.gates[name] = Gate(GateLimits(tier=was.tier, priority=was.priority), now)
        if not lazy:
            for name in limits:
                self.gate(name, now)

    def update_limits(
        self,
        changed: Mapping[str, GateLimits],
        removed: Iterable[str],
        now: float,
        table: Mapping[str, GateLimits] | None = None,
    ) -> None:
        """Apply the limits of ``changed`` and set the gates of ``removed`` to zero (new
        requests are refused before they reach it); every other gate stays as it is.
        ``table``: every entitlement's limits with ``changed`` applied already (a caller that
        holds them, as the sidecar's view of the v1beta1 documents does), and gates made lazily
        (:meth:`set_limits`): only the gates in use are touched, O(changed rows with a gate).
        Without it the limiter's own table takes ``changed`` and a new entitlement gets its gate
        now."""
        if table is not None:
            self.table, self._own_table = table, False
        elif changed:
            if not self._own_table:  # a copy, once: the mapping set_limits was given is the caller's
                self.table, self._own_table = dict(self.table), True
            assert isinstance(self.table, dict)
            self.table.update(changed)
        if table is None:  # eager: every changed entitlement has its gate now
            for name, gl in changed.items():
                gate = self.gates.get(name)
                if gate is None:
                    self.gates[name] = Gate(gl, now)
                else:
                    gate.update(gl, now)
        elif len(self.gates) < len(changed):  # lazy: the gates in use, from the smaller side
            for name, gate in self.gates.items():
                new = changed.get(name)
                if new is not None:
                    gate.update(new, now)
        else:
            for name in changed:
                in_use = self.gates.get(name)
                if in_use is not None:
                    in_use.update(changed[name], now)
        for name in removed:  # zero limits, kept: its in-flight requests still finish against it
            gone = self.gate(name, now)
            if gone is not None:
                gone.update(GateLimits(tier=gone.limits.tier, priority=gone.limits.priority), now)

    def gate(self, name: str, now: float) -> Gate | None:
        """The gate of ``name``, made from the table on its first request; None if unknown."""
        gate = self.gates.get(name)
        if gate is None:
            gl = self.table.get(name)
            if gl is None:
                return None
            gate = self.gates[name] = Gate(gl, now)
        return gate

    def limits_of(self, name: str) -> GateLimits | None:
        """The limits in force for ``name`` (its gate's, or the table's before its first request)."""
        gate = self.gates.get(name)
        return gate.limits if gate is not None else self.table.get(name)

    def set_pool(self, pool: Pool, now: float) -> None:
        """The pool's configured replica and token weights changed (a new config): the replica's
        capacity and its buckets follow, the engine's own statement still bounding them."""
        self.pool = pool
        self.w_prompt = pool.token_weights.prompt
        self.w_generation = pool.token_weights.generation
        self.configured = (
            pool.replica.throughput_tokens_per_s, pool.replica.kv_tokens, pool.replica.concurrency,
        )  # fmt: skip
        kv, conc, tput = self.engine[1], self.engine[2], self.engine[0]
        self.set_engine_capacity(kv_tokens=kv, concurrency=conc, throughput=tput)
        typical = float(pool.typical_request_vector()[THROUGHPUT])
        depth = max(self.capacity[THROUGHPUT] * self.replica_window_s, typical)
        for b in self.replica_buckets:
            b.refill(now)
            b.rate, b.depth = self.capacity[THROUGHPUT], depth
            b.level = min(b.level, depth)

    def set_engine_capacity(
        self, kv_tokens: float | None = None, concurrency: float | None = None, throughput: float | None = None
    ) -> Vector:
        """What the engine states of itself (None: says nothing). The replica's capacity,
        against which idle capacity (backfill) and preemption are judged, becomes the
        smaller of engine and config on each dimension. Returns it."""
        self.engine = (throughput, kv_tokens, concurrency)
        c_throughput, c_kv, c_concurrency = self.configured
        self.capacity = (
            _smaller_stated(c_throughput, throughput),
            _smaller_stated(c_kv, kv_tokens),
            _smaller_stated(c_concurrency, concurrency),
        )
        return self.capacity

    def never_fits(self, est: Estimate, whole: Vector = _UNLIMITED) -> Shortfall | None:
        """The KV or concurrency bound a request exceeds by itself, so that no wait can admit
        it here: ``whole``, the entitlement's whole configured limit plus burst (scope
        ``ceiling``), or this replica's capacity (scope ``replica``); None if some wait could."""
        bounds = (
            ("ceiling", KV, whole[KV], est.kv_tokens),
            ("ceiling", CONCURRENCY, whole[CONCURRENCY], est.sequences),
            ("replica", KV, self.capacity[KV], est.kv_tokens),
            ("replica", CONCURRENCY, self.capacity[CONCURRENCY], est.sequences),
        )
        for scope, k, allowed, requested in bounds:
            if requested > allowed:
                return Shortfall(DIMENSIONS[k], scope, requested, 0.0, allowed, allowed)
        return None

    def estimate(
        self, prompt_tokens: int, max_new_tokens: int, sequences: int = 1, prompt_kv_tokens: int | None = None
    ) -> Estimate:
        """The estimate of a request. ``prompt_kv_tokens``: the prompt KV its sequences hold
        together (default ``prompt_tokens``; ``n`` choices of one prompt hold it ``n`` times)."""
        kv = (prompt_tokens if prompt_kv_tokens is None else prompt_kv_tokens) + max_new_tokens
        weighted = self.w_prompt * prompt_tokens + self.w_generation * max_new_tokens
        return Estimate(prompt_tokens, max_new_tokens, sequences, weighted, kv)

    def expected_weighted(self, name: str, est: Estimate) -> float:
        """The demand a request represents: its prompt plus the output it is expected to
        generate (min of its max tokens and the entitlement's recent mean, or the pool's
        ``default_max_tokens`` while unknown)."""
        gate = self.gates.get(name)
        mean = gate.mean_generated if gate is not None else None
        per_seq = mean if mean is not None else float(self.pool.default_max_tokens)
        expected = min(float(est.max_new_tokens), per_seq * est.sequences)
        return self.w_prompt * est.prompt_tokens + self.w_generation * expected

    # ---- admission ---------------------------------------------------------------------

    def admit(self, name: str, est: Estimate, now: float) -> Decision:
        gate = self.gate(name, now)
        if gate is None:
            unknown = Shortfall(DIMENSIONS[CONCURRENCY], "limit", est.sequences, 0, 0, 0)
            return Decision(False, shortfalls=(unknown,), dimension=unknown.dimension, retry_after_s=INF)
        lim = gate.limits
        rank = lim.tier.rank
        self._seen_at[rank] = now
        cost = est.weighted
        own: list[Shortfall] = []
        if (sf := _bucket_shortfall("limit", gate.own, cost, now)) is not None:
            own.append(sf)
        own.extend(
            _in_flight_shortfalls(
                "limit", est, gate.kv, lim.limit[KV] + lim.burst[KV],
                gate.inflight, lim.limit[CONCURRENCY] + lim.burst[CONCURRENCY], self.inflight_retry_s,
            )
        )  # fmt: skip
        yielded = self._yield_shortfall(rank, est, now) if self.tier_order else None
        spot_yields = yielded is not None and lim.tier is Tier.SPOT  # spot's allowance is idle capacity too
        if not own and not spot_yields:
            spot = self.tier_order and lim.tier is Tier.SPOT
            if spot and (full := self._replica_shortfalls(name, rank, est, now, within=True)):
                return self._refuse(full, full, now, rank)  # spot's allowance is idle capacity: none is left
            victims = self._victims(name, rank, est, within=True) if self.preempt else ()
            self._preempt(victims, now)
            return Decision(True, self._reserve(name, gate, est, now, backfill=False), victims=victims)
        if not lim.backfill:
            if own:
                return self._refuse(own, own, now, rank)
            assert yielded is not None  # nothing of its own binds: it was admitted above unless spot yields
            binding = [yielded]
            return self._refuse(binding, binding, now, rank)
        other: list[Shortfall] = []
        if (sf := _bucket_shortfall("ceiling", gate.ceiling, cost, now)) is not None:
            other.append(sf)
        other.extend(
            _in_flight_shortfalls(
                "ceiling", est, gate.kv + gate.bf_kv, lim.ceiling[KV] + lim.ceiling_burst[KV],
                gate.inflight + gate.bf_inflight, lim.ceiling[CONCURRENCY] + lim.ceiling_burst[CONCURRENCY],
                self.inflight_retry_s,
            )
        )  # fmt: skip
        if yielded is not None:
            other.append(yielded)
        if (sf := _bucket_shortfall("replica", self.replica_buckets[rank], cost, now)) is not None:
            other.append(sf)
        other.extend(self._replica_shortfalls(name, rank, est, now, within=False))
        if not other:
            victims = self._victims(name, rank, est, within=False) if self.preempt else ()
            self._preempt(victims, now)
            return Decision(True, self._reserve(name, gate, est, now, backfill=True), victims=victims)
        return self._refuse(own + other, other, now, rank, own)

    def _replica_shortfalls(self, name: str, rank: int, est: Estimate, now: float, *, within: bool) -> list[Shortfall]:
        """Where the replica would not hold ``est`` on idle capacity: its KV or concurrency, even with
        everything this request may preempt given back, and the prefill bound."""
        kv_cap, seq_cap, retry = self.capacity[KV], self.capacity[CONCURRENCY], self.inflight_retry_s
        # first without anything given back: what preemption frees is >= 0, so when the request fits
        # as it is, it fits with it too (and most calls end here: the candidates need not be visited)
        out = _in_flight_shortfalls("replica", est, self.kv, kv_cap, self.inflight, seq_cap, retry)
        if out and self.preempt:
            # what preemption would free, summed without ordering it (integer counts: order does not matter)
            free_seq = 0
            free_kv: float = 0
            for r in self._preemptible_by(name, rank, within=within):
                free_seq += r.estimate.sequences
                free_kv += r.kv_tokens
            kv_left, seq_left = self.kv - free_kv, self.inflight - free_seq
            out = _in_flight_shortfalls("replica", est, kv_left, kv_cap, seq_left, seq_cap, retry)
        if self.tier_order and (sf := self._prefill_shortfall(rank, est, now)) is not None:
            out.append(sf)
        return out

    def prefill_budget(self) -> float:
        """Prompt tokens lower tiers may keep waiting for prefill on idle capacity (see ``prefill_window_s``)."""
        if self.prefill_window_s <= 0 or self.w_prompt <= 0:
            return INF
        typical = float(self.pool.typical_request.prompt_tokens)
        return max(self.prefill_window_s * self.capacity[THROUGHPUT] / self.w_prompt, PREFILL_FLOOR_PROMPTS * typical)

    def _prefill_shortfall(self, rank: int, est: Estimate, now: float) -> Shortfall | None:
        """Long prompts of lower tiers would take the engine's token budget, step after step, ahead of
        a higher tier's prompts (vLLM schedules running prefills first): while a higher tier has had
        traffic here within an interval, an idle-capacity admission of tier ``rank`` waits until the
        prompt tokens still to be prefilled by its own and higher tiers, and the prompts of higher
        tiers waiting for that room (:attr:`prefill_waiting`), leave room for its prompt. A prompt
        longer than the whole window waits until the higher tiers have been quiet here for an
        interval: one 20k-token prefill holds a step's whole token budget for several steps. Lower
        tiers' backlog never counts against it."""
        if rank == 0:
            return None
        seen_at, interval = self._seen_at, self.interval_s
        for h in range(rank):
            if now - seen_at[h] < interval:
                break
        else:
            return None  # no higher tier had traffic here within an interval
        pending = sum(self.prefill_pending[: rank + 1]) + sum(self.prefill_waiting[:rank])
        budget = self.prefill_budget()
        if pending + est.prompt_tokens <= budget:
            return None
        return Shortfall(
            DIMENSIONS[THROUGHPUT], "prefill", est.prompt_tokens, pending, budget, budget - pending,
            retry_after_s=self.inflight_retry_s,
        )  # fmt: skip

    def _refuse(
        self,
        shortfalls: list[Shortfall],
        binding: list[Shortfall],
        now: float,
        rank: int,
        alternative: list[Shortfall] | None = None,
    ) -> Decision:
        wait = max(s.retry_after_s for s in binding)
        if alternative:  # whichever path opens first
            wait = min(wait, max(s.retry_after_s for s in alternative))
        scopes = {s.scope for s in binding}
        if "replica" in scopes and "ceiling" not in scopes:
            self._refused_at[rank] = now  # refused for the replica's capacity: lower tiers yield for an interval
        return Decision(False, shortfalls=tuple(shortfalls), dimension=binding[0].dimension, retry_after_s=wait)

    def _yield_shortfall(self, rank: int, est: Estimate, now: float) -> Shortfall | None:
        """A strictly higher tier was refused here for the replica's capacity within
        ``interval_s``: this tier's idle-capacity admissions wait (scope ``yield``)."""
        for higher in range(rank):
            ago = now - self._refused_at[higher]
            if ago < self.interval_s:
                return Shortfall(
                    DIMENSIONS[CONCURRENCY], "yield", est.sequences, ago, self.capacity[CONCURRENCY], 0.0,
                    retry_after_s=self.interval_s - ago, yielded_to=TIER_ORDER[higher].value,
                )  # fmt: skip
        return None

    def _candidates(self, name: str, rank: int, *, within: bool) -> list[Reservation]:
        """Who a request of tier ``rank`` may preempt, in the order they go: lowest tier first,
        backfill before spot's allowance, lower priority first, newest first. A request within its
        allowance takes back the backfill of its own tier and of lower tiers; any request takes
        back what strictly lower tiers hold on idle capacity."""
        if not self._preemptible:
            return []
        out = list(self._preemptible_by(name, rank, within=within))
        out.sort(key=lambda r: (-r.tier.rank, not r.backfill, r.priority, -r.seq))
        return out

    def _preemptible_by(self, name: str, rank: int, *, within: bool) -> Iterator[Reservation]:
        """The reservations a request of ``name`` at tier ``rank`` may preempt, unordered (see
        :meth:`_candidates`)."""
        for r in self._preemptible.values():
            r_rank = r.tier.rank
            if r.entitlement != name and (r_rank > rank or (within and r.backfill and r_rank == rank)):
                yield r

    def _victims(self, name: str, rank: int, est: Estimate, *, within: bool) -> tuple[Reservation, ...]:
        over_seq = self.inflight + est.sequences - self.capacity[CONCURRENCY]
        over_kv = self.kv + est.kv_tokens - self.capacity[KV]
        if over_seq <= 0 and over_kv <= 0:
            return ()
        return _enough(self._candidates(name, rank, within=within), over_seq, over_kv)

    def _preempt(self, victims: tuple[Reservation, ...], now: float) -> None:
        """Cut ``victims``: their KV and concurrency are free at once, and what they were charged
        beyond their prompt and the tokens they streamed goes back to every bucket it came from
        (:meth:`finish` settles the rest when the caller has cut them)."""
        for v in victims:
            self._release(v)
            v.preempted = True
            used = self.w_prompt * v.estimate.prompt_tokens + self.w_generation * v.generated
            if v.charged > used:
                self._give(self.gates[v.entitlement], v, v.charged - used, now)

    def _reserve(self, name: str, gate: Gate, est: Estimate, now: float, *, backfill: bool) -> Reservation:
        self._seq += 1
        lim = gate.limits
        res = Reservation(name, lim.tier, lim.priority, est, backfill, self._seq, now)
        self._take(gate, res, est.weighted)
        res.kv_tokens = est.kv_tokens
        res.prefill = est.prompt_tokens
        self.prefill_pending[res.tier.rank] += est.prompt_tokens
        if backfill:
            gate.bf_inflight += est.sequences
            gate.bf_kv += est.kv_tokens
        else:
            gate.inflight += est.sequences
            gate.kv += est.kv_tokens
        if res.idle_capacity:
            self._preemptible[res.seq] = res
            self._count_inversions(res.tier.rank, now)
        self.inflight += est.sequences
        self.kv += est.kv_tokens
        return res

    def prefilled(self, res: Reservation) -> None:
        """The engine has prefilled ``res``'s prompt (its first token streamed, or it ended)."""
        if res.prefill:
            self.prefill_pending[res.tier.rank] -= res.prefill
            res.prefill = 0

    def _count_inversions(self, rank: int, now: float) -> None:
        for higher in range(rank):
            if now - self._refused_at[higher] < self.interval_s:
                key = (TIER_ORDER[higher], TIER_ORDER[rank])
                self.inversions[key] = self.inversions.get(key, 0) + 1

    def _buckets(self, gate: Gate, res: Reservation) -> Iterator[Bucket]:
        """Every bucket a reservation is charged to: its own allowance (not on backfill), its
        ceiling, and the replica buckets of its tier and of every lower tier."""
        if not res.backfill and gate.own is not None:
            yield gate.own
        if gate.ceiling is not None:
            yield gate.ceiling
        yield from self.replica_buckets[res.tier.rank :]

    def _take(self, gate: Gate, res: Reservation, amount: float) -> None:
        for b in self._buckets(gate, res):
            b.level -= amount
        res.charged += amount

    def _give(self, gate: Gate, res: Reservation, amount: float, now: float) -> None:
        for b in self._buckets(gate, res):
            b.refill(now)
            b.refund(amount)
        res.charged -= amount

    def _release(self, res: Reservation) -> None:
        if not res.active:
            return
        res.active = False
        self.prefilled(res)
        gate = self.gates[res.entitlement]
        n = res.estimate.sequences
        if res.backfill:
            gate.bf_inflight -= n
            gate.bf_kv -= res.kv_tokens
        else:
            gate.inflight -= n
            gate.kv -= res.kv_tokens
        self._preemptible.pop(res.seq, None)
        self.inflight -= n
        self.kv -= res.kv_tokens

    # ---- reconciliation ----------------------------------------------------------------

    def charge(self, res: Reservation, generated: int, now: float) -> bool:
        """``generated`` tokens (all sequences, cumulative) have streamed: charge what
        exceeds the reservation (debt) and grow the KV reservation past the estimate.
        Returns whether this ended the request's prefill (its first tokens)."""
        if generated <= res.generated or res.finished:
            return False
        res.generated = generated
        first = res.prefill > 0
        self.prefilled(res)
        est = res.estimate
        used = self.w_prompt * est.prompt_tokens + self.w_generation * generated
        gate = self.gates[res.entitlement]
        if used > res.charged:
            self._take(gate, res, used - res.charged)
        kv = est.kv_tokens - est.max_new_tokens + generated
        if res.active and kv > res.kv_tokens:
            grow = kv - res.kv_tokens
            res.kv_tokens = kv
            self.kv += grow
            if res.backfill:
                gate.bf_kv += grow
            else:
                gate.kv += grow
        return first

    def finish(
        self, res: Reservation, now: float, *, prompt_tokens: int, generated_tokens: int, completed: bool = True
    ) -> float:
        """Settle a request: charge or refund to what it used (``prompt_tokens`` 0 when the
        engine never took it), release KV and concurrency. Returns the weighted tokens used.
        ``completed``: it ended on its own (feeds the mean output length)."""
        if res.finished:
            return res.charged
        res.finished = True
        res.generated = max(res.generated, generated_tokens)
        gate = self.gates[res.entitlement]
        used = self.w_prompt * prompt_tokens + self.w_generation * generated_tokens
        if used > res.charged:
            self._take(gate, res, used - res.charged)
        elif used < res.charged:
            self._give(gate, res, res.charged - used, now)
        self._release(res)
        if completed and not res.preempted:
            per_seq = generated_tokens / res.estimate.sequences
            m = gate.mean_generated
            gate.mean_generated = per_seq if m is None else m + _MEAN_ALPHA * (per_seq - m)
        return used

    # ---- reporting ---------------------------------------------------------------------

    def status(self, name: str, now: float) -> RateLimitStatus | None:
        gate = self.gate(name, now)
        if gate is None:
            return None
        lim = gate.limits
        if gate.own is None:
            t_limit, t_left, t_reset = INF, INF, 0.0
        else:
            b = gate.own
            level = b.refill(now)
            t_limit, t_left = b.depth, max(level, 0.0)
            t_reset = 0.0 if level >= b.depth else (b.depth - level) / b.rate if b.rate > 0 else INF
        r_limit = lim.limit[CONCURRENCY] + lim.burst[CONCURRENCY]
        r_left = max(r_limit - gate.inflight, 0.0)
        return RateLimitStatus(t_limit, t_left, t_reset, r_limit, r_left, 0.0 if r_left >= 1 else self.inflight_retry_s)

    def entitlement_totals(self, name: str) -> tuple[int, float]:
        """(in-flight sequences, reserved KV tokens) of one entitlement, both paths."""
        gate = self.gates.get(name)
        if gate is None:
            return 0, 0.0
        return gate.inflight + gate.bf_inflight, gate.kv + gate.bf_kv


def _enough(candidates: list[Reservation], over_seq: float, over_kv: float) -> tuple[Reservation, ...]:
    """The first of ``candidates`` whose release brings both overshoots to <= 0 (all of them if
    they do not suffice)."""
    chosen: list[Reservation] = []
    for r in candidates:
        if over_seq <= 0 and over_kv <= 0:
            break
        chosen.append(r)
        over_seq -= r.estimate.sequences
        over_kv -= r.kv_tokens
    return tuple(chosen)
