"""The latest-plan store: the loop publishes, servers read; nobody waits on the solver.

One :class:`PlanStore` lives in the controller process. The interval loop calls
:meth:`PlanStore.publish` after each plan; the KEDA scaler and the limits API read
:meth:`PlanStore.current` on every request (a reference read, no lock, no copy) and
``StreamIsActive`` awaits :meth:`PlanStore.wait_for_change`. Reads never solve anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.plan import Plan


@dataclass(frozen=True)
class PublishedPlan:
    plan: Plan
    version: int  # increases by one per publish
    published_at: float  # unix seconds
    stale: bool = False  # the last read of metrics failed; this is the last good plan
    stale_since: float | None = None
    # pool -> replica -> (n,) share of each entitlement's offered load seen there, NaN if unseen
    shares: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    generation: int = 1  # the controller's config generation this plan was made with
    config: TokenPoolsConfig | None = None  # that config: the limits API's spec (keys as digests)


class PlanStore:
    def __init__(self) -> None:
        self._current: PublishedPlan | None = None
        self._changed: asyncio.Event | None = None
        self._closed = False

    def current(self) -> PublishedPlan | None:
        return self._current

    def publish(
        self,
        plan: Plan,
        published_at: float,
        *,
        stale: bool = False,
        stale_since: float | None = None,
        shares: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        version: int | None = None,
        generation: int = 1,
        config: TokenPoolsConfig | None = None,
    ) -> PublishedPlan:
        """Make ``plan`` current. ``version`` (e.g. restored from state) is honoured when higher."""
        next_version = 1 if self._current is None else self._current.version + 1
        if version is not None:
            next_version = max(next_version, version)
        self._current = PublishedPlan(
            plan, next_version, published_at, stale, stale_since, shares or {}, generation, config
        )
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return self._current

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """The process is stopping: every waiter returns now (a watching sidecar gets its 304
        at once instead of holding the HTTP server's shutdown for its whole timeout)."""
        self._closed = True
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def clear(self) -> None:
        """Withdraw the plan (this replica stopped leading): servers answer as before the first plan."""
        self._current = None

    async def wait_for_change(self, seen_version: int, timeout: float | None = None) -> PublishedPlan | None:
        """The current plan once its version differs from ``seen_version``; None on timeout."""
        current = self._current
        if current is not None and current.version != seen_version:
            return current
        if self._closed:
            return None
        if self._changed is None:
            self._changed = asyncio.Event()
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return None
        current = self._current
        return None if current is None or current.version == seen_version else current
