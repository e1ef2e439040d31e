"""Budgets: quotas of weighted tokens over a billing period, and the arithmetic of periods.

An entitlement may carry a :class:`Budget` (``budget: {period: day|week|month,
weighted_tokens: N, on_exhausted: refuse|spot, time_zone: UTC}``). What counts against it
is what the sidecars *admitted* (their ``admitted_weighted_tokens`` usage signal: prompt
tokens x the pool's prompt weight + generated tokens x its generation weight), integrated
by the controller over each interval and kept in its state file, so a restart or a new
leader continues the count.

Periods (:func:`period_bounds`) are calendar periods of the budget's ``time_zone`` (IANA
name, UTC by default): a day starts at local midnight, a week on Monday at local midnight
(ISO weeks), a month on its first day at local midnight. Daylight-saving changes move the
instant, never the local time, so a local day may last 23 or 25 hours. The budget resets
at the start of each period.

Per interval, :func:`update_budgets` adds ``admitted tokens/s x interval`` to each
budget's consumption (only the part of the interval inside the current period once a
period has turned over), and smooths a consumption rate (half-life
:data:`RATE_HALF_LIFE_S`) for the burn-rate alert. :func:`budget_status` says whether the
budget is spent (``consumed >= weighted_tokens``): from the interval that sees it spent,
the plan downgrades the entitlement to the spot tier (no guarantee, no provisioning, only
idle capacity) and the limits document carries the status, so sidecars refuse it
(``refuse``: a 429 until ``resets_at``) or let it backfill only (``spot``).

The time zone database is read through :mod:`zoneinfo` (the system's, or the ``tzdata``
package): a lookup by name, cached, with no other input; this module reads no clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from tokenscaler.core.frozen import Frozen

RATE_HALF_LIFE_S = 6 * 3600.0
"""Half-life of the smoothed consumption rate: long enough that a busy hour is not a trend,
short enough that a change of pace shows within a day."""


class BudgetPeriod(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class OnExhausted(StrEnum):
    """What happens to an entitlement whose budget is spent, until the period resets."""

    REFUSE = "refuse"  # every request is a 429 whose Retry-After is the reset
    SPOT = "spot"  # it keeps only idle capacity (the spot tier's backfill)


class Budget(Frozen):
    """A quota of weighted tokens over a calendar period (see :mod:`tokenscaler.core.budget`)."""

    period: BudgetPeriod = Field(description="day, week (from Monday) or month, in time_zone.")
    weighted_tokens: float = Field(
        gt=0,
        allow_inf_nan=False,
        description="Weighted tokens admitted per period (prompt x token_weights.prompt + generated x "
        "token_weights.generation).",
    )
    on_exhausted: OnExhausted = Field(
        OnExhausted.REFUSE,
        description="refuse: answer 429 until the period resets; spot: serve only from idle capacity.",
    )
    time_zone: str = Field("UTC", description="IANA time zone of the period boundaries (e.g. Europe/Paris).")

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            zone(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"time_zone ({v!r}) is not an IANA time zone name (e.g. UTC, Europe/Paris)") from e
        return v


@functools.lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The time zone ``name`` (cached); raises ``ZoneInfoNotFoundError`` or ``ValueError``."""
    if not name or name.startswith(("/", ".")) or ".." in name:
        raise ValueError(f"not a time zone name: {name!r}")
    return ZoneInfo(name)


def _midnight(d: date, tz: ZoneInfo) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()


def period_bounds(period: BudgetPeriod | str, time_zone: str, now: float) -> tuple[float, float]:
    """``(start, end)`` in unix seconds of the period containing ``now``: ``start <= now < end``."""
    tz = zone(time_zone)
    today = datetime.fromtimestamp(now, tz).date()
    p = BudgetPeriod(period)
    if p is BudgetPeriod.DAY:
        first, nxt = today, today + timedelta(days=1)
    elif p is BudgetPeriod.WEEK:
        first = today - timedelta(days=today.weekday())
        nxt = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    start, end = _midnight(first, tz), _midnight(nxt, tz)
    # a local midnight that does not exist (a DST jump at 00:00) maps just past the jump; never after now
    return min(start, now), max(end, math.nextafter(now, math.inf))


@dataclass(frozen=True)
class BudgetEntry:
    """One budget's account: the period it counts in and what was admitted in it."""

    period_start: float  # unix seconds
    resets_at: float  # unix seconds: the next period's start
    consumed: float  # weighted tokens admitted since period_start
    rate: float = 0.0  # smoothed consumption rate, weighted tokens/s (continues across periods)
    period: str = BudgetPeriod.DAY.value  # the period and zone the bounds were computed for
    time_zone: str = "UTC"


@dataclass(frozen=True)
class BudgetStatus:
    """What the plan says of one budget this interval."""

    period: BudgetPeriod
    weighted_tokens: float
    consumed: float
    resets_at: float
    rate: float
    on_exhausted: OnExhausted

    @property
    def remaining(self) -> float:
        return max(self.weighted_tokens - self.consumed, 0.0)

    @property
    def exhausted(self) -> bool:
        return self.consumed >= self.weighted_tokens


def update_budgets(
    budgets: Mapping[str, Budget],
    accounts: Mapping[str, BudgetEntry],
    admitted_tokens_per_s: Mapping[str, float],
    dt: float,
    now: float,
) -> dict[str, BudgetEntry]:
    """Every budget's account after the interval ``(now - dt, now]`` in which each entitlement
    was admitted ``admitted_tokens_per_s`` weighted tokens/s (missing: 0).

    An account of another period (the period turned over, or the budget's period or time
    zone changed) starts again at the current period's start, counting only the part of the
    interval inside it. Accounts of entitlements without a budget are dropped.
    """
    dt = max(float(dt), 0.0)
    alpha = 1.0 - math.pow(0.5, dt / RATE_HALF_LIFE_S)
    out: dict[str, BudgetEntry] = {}
    for name, b in budgets.items():
        x = admitted_tokens_per_s.get(name, 0.0)
        x = 0.0 if not math.isfinite(x) or x < 0 else float(x)
        prev = accounts.get(name)
        same = prev is not None and prev.period == b.period.value and prev.time_zone == b.time_zone
        if prev is not None and same and prev.period_start <= now < prev.resets_at:
            start, end, consumed = prev.period_start, prev.resets_at, prev.consumed + x * dt
        else:
            start, end = period_bounds(b.period, b.time_zone, now)
            if prev is not None and same and prev.period_start == start:  # e.g. restored with a stale reset
                consumed = prev.consumed + x * dt
            else:
                consumed = x * min(dt, now - start)
        rate = x if prev is None else prev.rate + alpha * (x - prev.rate)
        out[name] = BudgetEntry(start, end, consumed, rate, b.period.value, b.time_zone)
    return out


def budget_status(b: Budget, entry: BudgetEntry) -> BudgetStatus:
    return BudgetStatus(b.period, b.weighted_tokens, entry.consumed, entry.resets_at, entry.rate, b.on_exhausted)
