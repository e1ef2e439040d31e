"""Where a sidecar's limits come from: the :class:`LimitsSource` protocol and its two sources.

:class:`StaticLimitsSource` (the embedded default) derives limits from the config alone,
split evenly over ``--replicas`` with the planner's floors
(:func:`tokenscaler.core.limits.split_per_replica`):

* guaranteed: its guarantee split; its configured burst split; may backfill above it;
* elastic: its configured limit split (an unlimited component: one replica's capacity);
  may backfill up to its ceiling, which here is that same configured limit, except for
  unlimited components;
* spot: 0 sustained and 0 burst; lives on backfill of idle capacity.

:class:`HttpLimitsSource` polls the controller's limits API
(``GET {url}/v1/pools/{pool}/limits?replica={id}``, a :class:`LimitsDocument`) with
``If-None-Match`` and applies each new version; entitlements missing from a document get
their floors. Fail-static: while polls fail, the last limits stay in force (state
``stale``; also when the controller marks the document stale); once no poll has succeeded
for ``expiry_s`` (counting from start before the first success, when the static limits
apply) the sidecar falls back to the *floors* (state ``expired``), logs it once and keeps
polling with backoff:

* guaranteed: its guarantee split over ``--replicas``, and may still backfill;
* elastic: 0 sustained, but may still backfill idle capacity;
* spot: 0 and no backfill.

Budgets (the document's optional per-entitlement ``budget`` block): an entitlement whose
budget is ``exhausted`` is enforced as the spot tier (idle capacity only), as the plan
treats it; every update carries the blocks (:attr:`LimitsUpdate.budgets`), and with
``on_exhausted: refuse`` the proxy answers the entitlement 429 until the block's
``resets_at`` (:mod:`tokenscaler.sidecar.budget`). The last blocks stay in force through failed polls and
expiry: a refusal ends at its ``resets_at`` whatever the controller says.

Every tier's backfill is bounded by its *ceiling*: the one in the controller's document
(the configured limit split by this replica's share of the ready replicas), else the
configured limit split over ``--replicas`` (unlimited components stay unlimited). The first
successful poll after an expiry restores the controller's limits (state ``fresh``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pydantic import ValidationError

from tokenscaler.core.limiter import GateLimits, Vector
from tokenscaler.core.limits import BudgetLimits, LimitsDocument, split_per_replica
from tokenscaler.core.model import Entitlement, Pool, Tier, TokenPoolsConfig
from tokenscaler.sidecar.limits_auth import (
    FETCH_ERROR_REASONS,
    LimitsClientAuth,
    LimitsHttpError,
    LimitsRefused,
    classify,
    error_message,
)

log = logging.getLogger(__name__)
_FAILED = {"tls": "refused the TLS connection", "auth": "refused this sidecar", "timeout": "timed out"}


@dataclass(frozen=True)
class LimitsUpdate:
    """The limits to enforce now, and why."""

    limits: Mapping[str, GateLimits]  # may build its entries when asked (the v1beta1 view's tables)
    state: str  # static | fresh | stale | expired
    version: str | None = None
    budgets: Mapping[str, BudgetLimits] = field(default_factory=dict)  # the document's budget blocks
    partial: bool = False  # ``limits`` holds only what changed; every other gate stays as it is
    removed: tuple[str, ...] = ()  # with ``partial``: entitlements no longer in the pool (gates to zero)
    table: Mapping[str, GateLimits] | None = None  # with ``partial``: every gate, ``limits`` applied
    lazy: bool = False  # without ``partial``: gates made on first request (Limiter.set_limits)


def budgets_of(doc: LimitsDocument | None) -> dict[str, BudgetLimits]:
    """The budget blocks of a limits document, by entitlement."""
    if doc is None:
        return {}
    return {name: el.budget for name, el in doc.entitlements.items() if el.budget is not None}


class LimitsSource(Protocol):
    """Where a sidecar's limits come from. The sidecar applies :meth:`initial` before it
    serves, then runs :meth:`run` in the background, which calls ``apply`` on every change
    of limits or state until cancelled."""

    state: str
    fetch_errors: int
    fetch_errors_by_reason: dict[str, int]  # reasons: tokenscaler.sidecar.limits_auth.FETCH_ERROR_REASONS

    def initial(self) -> LimitsUpdate: ...

    def age_s(self) -> float:
        """Seconds since the limits in force were last confirmed by the source."""
        ...

    async def run(self, apply: Callable[[LimitsUpdate], None]) -> None: ...


def _vec(a: np.ndarray) -> Vector:
    return (float(a[0]), float(a[1]), float(a[2]))


def _split(
    pool: Pool, limit: np.ndarray, burst: np.ndarray, ceiling: np.ndarray, replicas: int
) -> tuple[Vector, Vector]:
    lpr, bpr = split_per_replica(pool, limit[None, :], burst[None, :], ceiling[None, :], 1.0 / replicas)
    return _vec(lpr[0]), _vec(bpr[0])


class LimitRules:
    """The per-entitlement limit rules of one pool for ``replicas`` replicas."""

    def __init__(self, config: TokenPoolsConfig, pool: str, replicas: int) -> None:
        self.pool = config.pool(pool)
        self.replicas = max(int(replicas), 1)
        self.entitlements: dict[str, Entitlement] = {e.name: e for e in config.entitlements_of(pool)}
        self._ceilings = {name: self._ceiling(e) for name, e in self.entitlements.items()}

    def _ceiling(self, e: Entitlement) -> tuple[Vector, Vector]:
        conf = e.limit.to_array()
        return _split(self.pool, conf, e.burst.to_array(), conf, self.replicas)

    def gate(
        self,
        e: Entitlement,
        limit: Vector,
        burst: Vector,
        backfill: bool,
        ceiling: Vector | None = None,
        ceiling_burst: Vector | None = None,
        tier: Tier | None = None,
    ) -> GateLimits:
        """The gate for ``e``; a ceiling (or its burst) not given is the configured one, a tier
        not given the configured one."""
        configured, configured_burst = self._ceilings[e.name]
        return GateLimits(
            tier=e.tier if tier is None else tier, priority=e.priority, limit=limit, burst=burst, backfill=backfill,
            ceiling=configured if ceiling is None else ceiling,
            ceiling_burst=configured_burst if ceiling_burst is None else ceiling_burst,
        )  # fmt: skip

    def static(self, e: Entitlement) -> GateLimits:
        conf = e.limit.to_array()
        if e.tier is Tier.SPOT:
            return self.gate(e, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), backfill=True)
        if e.tier is Tier.GUARANTEED:
            limit, burst = _split(self.pool, e.guarantee_array(), e.burst.to_array(), conf, self.replicas)
        else:
            whole = np.where(np.isinf(conf), self.pool.replica.to_array() * self.replicas, conf)
            limit, burst = _split(self.pool, whole, e.burst.to_array(), conf, self.replicas)
        return self.gate(e, limit, burst, backfill=True)

    def floor(self, e: Entitlement) -> GateLimits:
        if e.tier is Tier.GUARANTEED:
            return self.static(e)
        return self.gate(e, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), backfill=e.tier is Tier.ELASTIC)

    def all_static(self) -> dict[str, GateLimits]:
        return {name: self.static(e) for name, e in self.entitlements.items()}

    def all_floors(self) -> dict[str, GateLimits]:
        return {name: self.floor(e) for name, e in self.entitlements.items()}

    def from_document(self, doc: LimitsDocument) -> dict[str, GateLimits]:
        out: dict[str, GateLimits] = {}
        for name, e in self.entitlements.items():
            el = doc.entitlements.get(name)
            if el is None:
                out[name] = self.floor(e)
                continue
            limit = _vec(el.limit.to_array())
            burst = _vec(el.burst.to_array())
            # sent by the controller, they follow the ready replicas
            ceiling = None if el.ceiling is None else _vec(el.ceiling.to_array())
            ceiling_burst = None if el.ceiling_burst is None else _vec(el.ceiling_burst.to_array())
            # a spent budget: the entitlement is enforced as spot (the plan's tier for it) until the reset
            spent = el.budget is not None and el.budget.exhausted
            out[name] = self.gate(
                e, limit, burst, backfill=True, ceiling=ceiling, ceiling_burst=ceiling_burst,
                tier=Tier.SPOT if spent else None,
            )  # fmt: skip
        return out


class StaticLimitsSource:
    """Limits from the config, split evenly over ``replicas``; never changes."""

    def __init__(self, config: TokenPoolsConfig, pool: str, replicas: int = 1) -> None:
        self.rules = LimitRules(config, pool, replicas)
        self.state = "static"
        self.fetch_errors = 0
        self.fetch_errors_by_reason: dict[str, int] = dict.fromkeys(FETCH_ERROR_REASONS, 0)

    def initial(self) -> LimitsUpdate:
        return LimitsUpdate(self.rules.all_static(), "static")

    def floors(self) -> dict[str, GateLimits]:
        return self.rules.all_floors()

    def age_s(self) -> float:
        return 0.0

    async def run(self, apply: Callable[[LimitsUpdate], None]) -> None:
        return None


class HttpLimitsSource:
    """Polls the controller's limits API with ETags; fail-static, then floors after expiry."""

    def __init__(
        self,
        config: TokenPoolsConfig,
        pool: str,
        url: str,
        *,
        replica: str,
        replicas: int = 1,
        poll_s: float = 2.0,
        expiry_s: float = 60.0,
        timeout_s: float = 2.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        auth: LimitsClientAuth | None = None,
    ) -> None:
        self.rules = LimitRules(config, pool, replicas)
        self.auth = auth  # credentials for the controller (tokenscaler.sidecar.limits_auth)
        self.url = self._document_url(url, pool)
        self.replica = replica
        self.poll_s = poll_s
        self.expiry_s = expiry_s
        self.timeout_s = timeout_s
        self.max_backoff_s = max(max_backoff_s, poll_s)
        self.clock = clock
        self.state = "static"
        self.fetch_errors = 0
        self.fetch_errors_by_reason: dict[str, int] = dict.fromkeys(FETCH_ERROR_REASONS, 0)
        self.version: str | None = None
        self._etag: str | None = None
        self._doc: LimitsDocument | None = None
        self._last_ok = clock()  # before the first success: since start, with the static limits

    @staticmethod
    def _document_url(url: str, pool: str) -> str:
        url = url.rstrip("/")
        return url if "/v1/pools/" in url else f"{url}/v1/pools/{pool}/limits"

    def initial(self) -> LimitsUpdate:
        return LimitsUpdate(self.rules.all_static(), "static")

    def age_s(self) -> float:
        return max(self.clock() - self._last_ok, 0.0)

    async def _fetch(self, session: object) -> tuple[int, LimitsDocument | None]:
        import aiohttp

        assert isinstance(session, aiohttp.ClientSession)
        headers = {"Accept": "application/json"}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag
        tls: ssl.SSLContext | bool = True  # aiohttp's default: verify with the system's CAs
        if self.auth is not None:
            headers.update(self.auth.headers())
            tls = self.auth.ssl_context() or True
        # budgets=true: this sidecar reads the budget blocks (an older controller ignores it)
        params = {"replica": self.replica, "budgets": "true"}
        async with session.get(self.url, params=params, headers=headers, ssl=tls) as resp:
            if resp.status == 304:
                return 304, None
            body = await resp.read()
            if resp.status in (401, 403):
                raise LimitsRefused(resp.status, self._redact(error_message(body)))
            if resp.status != 200:
                raise LimitsHttpError(f"HTTP {resp.status}: {self._redact(error_message(body))}")
            doc = LimitsDocument.model_validate_json(body)
            if doc.pool != self.rules.pool.name:
                raise RuntimeError(f"document is for pool {doc.pool!r}, not {self.rules.pool.name!r}")
            self._etag = resp.headers.get("ETag") or f'"{doc.version}"'
            return 200, doc

    async def run(self, apply: Callable[[LimitsUpdate], None]) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        failures = 0
        last_reason: str | None = None
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    status, doc = await self._fetch(session)
                except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError, ValidationError, ValueError) as e:
                    failures += 1
                    self.fetch_errors += 1
                    reason, why = classify(e, https=self.url.startswith("https:"), client_cert=self._client_cert)
                    if reason == "tls" and self.auth is not None:
                        why += self.auth.tls_hint()
                    self.fetch_errors_by_reason[reason] = self.fetch_errors_by_reason.get(reason, 0) + 1
                    if failures == 1 or failures % 30 == 0 or reason != last_reason:
                        log.warning(
                            "limits source %s %s (%s failures): %s; %s", self.url,
                            _FAILED.get(reason, "failed"), failures, self._redact(why),
                            "keeping the last limits" if self.state != "expired" else "floors stay in force",
                        )  # fmt: skip
                    last_reason = reason
                    self._on_failure(apply)
                else:
                    if failures:
                        log.info("limits source %s reachable again after %d failures", self.url, failures)
                    failures = 0
                    last_reason = None
                    self._on_success(status, doc, apply)
                delay = self.poll_s if failures == 0 else min(self.poll_s * 2 ** min(failures, 10), self.max_backoff_s)
                delay *= 1 + 0.1 * random.random()
                hook = self._delay(failures)
                if hook is not None:
                    delay = hook
                until_expiry = self._last_ok + self.expiry_s - self.clock()
                if self.state != "expired" and until_expiry > 0:
                    delay = min(delay, until_expiry + 0.01)
                await self._sleep(delay)

    def _delay(self, failures: int) -> float | None:
        """The wait before the next ask, where a subclass knows better than the poll rule (None)."""
        return None

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when a credential file changes (a fix is tried at once)."""
        if self.auth is None:
            await asyncio.sleep(delay)
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + delay
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(left, 0.25))
            if self.auth.changed():
                return

    @property
    def _client_cert(self) -> bool:
        return self.auth is not None and self.auth.tls is not None and self.auth.tls.cert is not None

    def _redact(self, text: str) -> str:
        return self.auth.redact(text) if self.auth is not None else text

    def _on_success(self, status: int, doc: LimitsDocument | None, apply: Callable[[LimitsUpdate], None]) -> None:
        self._last_ok = self.clock()
        was = self.state
        if doc is not None:
            self._doc = doc
        if self._doc is None:  # a 304 before any document: nothing to apply
            return
        state = "stale" if self._doc.stale else "fresh"
        if status == 200 or state != was or was == "expired":
            self.state = state
            self.version = self._doc.version
            apply(LimitsUpdate(self.rules.from_document(self._doc), state, self._doc.version, budgets_of(self._doc)))
            if was == "expired":
                log.warning("limits restored from %s (version %s)", self.url, self._doc.version)

    def _on_failure(self, apply: Callable[[LimitsUpdate], None]) -> None:
        if self.state == "expired":
            return
        if self.age_s() >= self.expiry_s:
            self.state = "expired"
            log.warning(
                "limits expired: no successful poll of %s for %.1fs (--limits-expiry-s %g); "
                "falling back to guaranteed floors, elastic at 0 sustained (backfill only), spot at 0",
                self.url, self.age_s(), self.expiry_s,
            )  # fmt: skip
            apply(self._expired_update())
        elif self.state == "fresh":
            self.state = "stale"
            apply(self._stale_update())

    def _expired_update(self) -> LimitsUpdate:
        """The floors, once no poll has succeeded for ``expiry_s``."""
        return LimitsUpdate(self.rules.all_floors(), "expired", self.version, budgets_of(self._doc))

    def _stale_update(self) -> LimitsUpdate:
        """The limits held, marked stale, once a poll fails."""
        if self._doc is None:
            return LimitsUpdate(self.rules.all_static(), "stale")
        return LimitsUpdate(self.rules.from_document(self._doc), "stale", self.version, budgets_of(self._doc))


def gate_limits_from_document(
    config: TokenPoolsConfig, pool: str, document: LimitsDocument, replicas: int = 1
) -> dict[str, GateLimits]:
    """What a sidecar enforces given a limits document (entitlements it omits get their
    floors; a missing ceiling is the configured limit split over ``replicas``)."""
    return LimitRules(config, pool, replicas).from_document(document)


DESCRIBE_AT_MOST = 20  # entitlements the startup log names (a pool may hold 10,000)


def describe(limits: Mapping[str, GateLimits]) -> str:
    """One part per entitlement for the startup log, the first :data:`DESCRIBE_AT_MOST` by name."""
    parts = []
    names = sorted(limits)
    for name in names[:DESCRIBE_AT_MOST]:
        g = limits[name]
        vals = "/".join("inf" if math.isinf(x) else f"{x:g}" for x in g.limit)
        parts.append(f"{name} ({g.tier.value}): limit {vals}{' +backfill' if g.backfill else ''}")
    if len(names) > DESCRIBE_AT_MOST:
        parts.append(f"and {len(names) - DESCRIBE_AT_MOST} more")
    return "; ".join(parts)
