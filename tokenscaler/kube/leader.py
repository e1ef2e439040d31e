"""Leader election over a ``coordination.k8s.io/v1`` Lease, as client-go's ``leaderelection`` does it.

Timings default to client-go's: the lease lasts 15 s, a leader that could not renew for
10 s (the renew deadline) stops leading, and every replica tries every 2 s. Like client-go,
expiry is judged on this replica's own clock: a lease record is expired when it has not
*changed* for ``lease_duration_s`` since this replica first saw it, so clock skew between
replicas does not matter (the ``renewTime`` written into the lease is informational).

:func:`decide` is the pure part: given the Lease (or None), what this replica saw before,
its identity and the time, it answers acquire / renew / follow and the spec to write.
:class:`LeaderElector` does the I/O with the real ``kubernetes`` client (in a thread, as
that client is blocking) and keeps :meth:`LeaderElector.is_leader` true only while the
lease is held and was renewed within the renew deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tokenscaler.kube.leader")


@dataclass(frozen=True)
class LeaseConfig:
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError(
                f"lease timings must satisfy lease_duration_s ({self.lease_duration_s:g}) > renew_deadline_s "
                f"({self.renew_deadline_s:g}) > retry_period_s ({self.retry_period_s:g}) > 0"
            )


DEFAULT_LEASE = LeaseConfig()


class Action(enum.Enum):
    ACQUIRE = "acquire"  # write the lease with us as holder (create when there is none)
    RENEW = "renew"  # we hold it: write a fresh renewTime
    FOLLOW = "follow"  # someone else holds an unexpired lease: do nothing


@dataclass(frozen=True)
class Observation:
    """The lease record as last seen, and when (on this replica's clock) it last changed."""

    record: tuple[Any, ...]
    seen_at: float


@dataclass(frozen=True)
class Decision:
    action: Action
    spec: dict[str, Any] | None  # the LeaseSpec to write (None for FOLLOW)
    observation: Observation  # what to remember for the next decision
    holder: str | None


def rfc3339_micro(t: float) -> str:
    """A MicroTime as the API server writes it."""
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        spec.get("holderIdentity"),
        spec.get("leaseDurationSeconds"),
        spec.get("acquireTime"),
        spec.get("renewTime"),
        spec.get("leaseTransitions"),
    )


def decide(
    spec: Mapping[str, Any] | None,
    previous: Observation | None,
    identity: str,
    now: float,
    config: LeaseConfig = DEFAULT_LEASE,
) -> Decision:
    """What to do with the Lease ``spec`` (None: there is no Lease) at ``now``."""
    duration = max(1, round(config.lease_duration_s))
    if spec is None:
        fresh = {
            "holderIdentity": identity,
            "leaseDurationSeconds": duration,
            "acquireTime": rfc3339_micro(now),
            "renewTime": rfc3339_micro(now),
            "leaseTransitions": 0,
        }
        return Decision(Action.ACQUIRE, fresh, Observation(_record(fresh), now), identity)
    record = _record(spec)
    seen_at = previous.seen_at if previous is not None and previous.record == record else now
    observation = Observation(record, seen_at)
    holder = spec.get("holderIdentity") or None
    transitions = int(spec.get("leaseTransitions") or 0)
    if holder == identity:
        renewed = {
            **spec,
            "holderIdentity": identity,
            "leaseDurationSeconds": duration,
            "renewTime": rfc3339_micro(now),
            "leaseTransitions": transitions,
        }
        renewed.setdefault("acquireTime", rfc3339_micro(now))
        return Decision(Action.RENEW, renewed, observation, identity)
    held_for = float(spec.get("leaseDurationSeconds") or duration)
    if holder is not None and seen_at + held_for > now:
        return Decision(Action.FOLLOW, None, observation, holder)
    taken = {
        "holderIdentity": identity,
        "leaseDurationSeconds": duration,
        "acquireTime": rfc3339_micro(now),
        "renewTime": rfc3339_micro(now),
        "leaseTransitions": transitions + 1 if holder is not None else transitions,
    }
    return Decision(Action.ACQUIRE, taken, observation, identity)


def released(spec: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The spec a leader writes when it steps down on purpose (client-go's ReleaseOnCancel):
    no holder, so the next candidate acquires at its next try instead of waiting a lease out."""
    return {**spec, "holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": rfc3339_micro(now)}


# --------------------------------------------------------------------------- the client part


class LeaderElector:
    """Holds the Lease ``namespace/name`` for ``identity`` through the real ``kubernetes`` client.

    ``leases`` is a :class:`tokenscaler.kube.client.Leases` (get/create/replace with
    resourceVersion). Run :meth:`run` as a task; :meth:`is_leader` is true from a
    successful acquire until a renewal has failed for ``renew_deadline_s``, the lease was
    found taken, or :meth:`run` ended. ``on_change(leading)`` is called on each transition.
    """

    def __init__(
        self,
        leases: Any,
        identity: str,
        *,
        config: LeaseConfig = DEFAULT_LEASE,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[bool], None] | None = None,
        release_on_stop: bool = True,
    ) -> None:
        self.leases = leases
        self.identity = identity
        self.config = config
        self.clock = clock
        self.on_change = on_change
        self.release_on_stop = release_on_stop
        self._observation: Observation | None = None
        self._leading = False
        self._last_renew: float | None = None
        self._stop = asyncio.Event()
        self.holder: str | None = None
        self.transitions = 0
        self.changed = asyncio.Condition()

    def is_leader(self) -> bool:
        if not self._leading or self._last_renew is None:
            return False
        # between tries: a leader whose last renewal is older than the renew deadline no longer leads
        return self.clock() - self._last_renew < self.config.renew_deadline_s

    async def _set(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            self.transitions += 1
            log.info("%s %s leading", self.identity, "started" if leading else "stopped")
            if self.on_change is not None:
                self.on_change(leading)
            async with self.changed:
                self.changed.notify_all()

    async def wait_leading(self, leading: bool = True, timeout_s: float = 30.0) -> bool:
        """Wait (bounded) until :meth:`is_leader` equals ``leading``."""
        async def cond() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: self._leading == leading)

        try:
            await asyncio.wait_for(cond(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def try_once(self) -> Action | None:
        """One try: read the lease, decide, write. Returns the action taken (None on an API error)."""
        from tokenscaler.kube.client import ApiError, Conflict

        now = self.clock()
        try:
            current = await asyncio.to_thread(self.leases.get)
            spec = None if current is None else (current.get("spec") or {})
            d = decide(spec, self._observation, self.identity, now, self.config)
            self._observation = d.observation
            self.holder = d.holder
            if d.action is Action.FOLLOW:
                await self._set(False)
                return d.action
            assert d.spec is not None
            if current is None:
                await asyncio.to_thread(self.leases.create, d.spec)
            else:
                await asyncio.to_thread(self.leases.replace, d.spec, current["metadata"]["resourceVersion"])
        except Conflict:
            # someone wrote the lease between our read and write: it is theirs this round
            log.debug("lease write conflicted; following this round")
            if self._leading and not self.is_leader():
                await self._set(False)
            return None
        except ApiError as e:
            log.warning("lease %s: %s", getattr(self.leases, "name", "?"), e)
            if self._leading and not self.is_leader():
                await self._set(False)
            return None
        self._last_renew = now
        await self._set(True)
        return d.action

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                await self.try_once()
                if self._leading and not self.is_leader():
                    await self._set(False)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.config.retry_period_s)
        finally:
            was_leading = self._leading
            await self._set(False)
            if was_leading and self.release_on_stop:
                await self._release()

    async def _release(self) -> None:
        from tokenscaler.kube.client import ApiError

        try:
            current = await asyncio.to_thread(self.leases.get)
            if current is not None and (current.get("spec") or {}).get("holderIdentity") == self.identity:
                body = released(current["spec"], self.clock())
                await asyncio.to_thread(self.leases.replace, body, current["metadata"]["resourceVersion"])
        except ApiError as e:
            log.warning("could not release the lease: %s", e)

    def stop(self) -> None:
        self._stop.set()
