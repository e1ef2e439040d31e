"""Spent budgets at the sidecar: which entitlements to refuse, and the 429 that says so.

The controller's limits document carries each budgeted entitlement's ``budget`` block
(:class:`~tokenscaler.core.limits.BudgetLimits`). :class:`BudgetGuard` keeps the blocks of
the last update; :meth:`BudgetGuard.refusal` names the block of an entitlement to refuse
now: its budget is ``exhausted``, ``on_exhausted`` is ``refuse`` and ``resets_at`` has not
passed (the refusal ends at the reset by itself, even while the controller is away).

The answer (:func:`refusal_response_parts`) is OpenAI's shape for a spent quota: status
429, ``type`` and ``code`` ``insufficient_quota``, a message that names the entitlement,
the budget (period, size, consumption) and the reset; ``Retry-After`` (seconds, at least 1)
and ``retry-after-ms`` are the time until the period resets, uncapped; ``x-should-retry:
false`` tells the official clients not to retry before then;
``x-tokenscaler-budget-resets-at`` is the reset in unix seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from tokenscaler.core.budget import OnExhausted
from tokenscaler.core.limits import BudgetLimits

BUDGET_DIMENSION = "budget"  # the x-tokenscaler-dimension of a budget refusal
QUOTA = "insufficient_quota"  # OpenAI's type and code for a spent quota


class BudgetGuard:
    """The budget blocks in force on this sidecar (from its limits source)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # unix seconds (resets_at is a wall-clock time)
        self._blocks: dict[str, BudgetLimits] = {}

    def apply(self, budgets: Mapping[str, BudgetLimits]) -> None:
        self._blocks = dict(budgets)

    def refusal(self, name: str) -> BudgetLimits | None:
        """The spent budget to refuse ``name`` for now, or None."""
        b = self._blocks.get(name)
        if b is None or not b.exhausted or b.on_exhausted is not OnExhausted.REFUSE:
            return None
        return b if self.clock() < b.resets_at else None

    def until_reset_s(self, b: BudgetLimits) -> float:
        return max(b.resets_at - self.clock(), 0.0)


def refusal_message(name: str, b: BudgetLimits, wait_s: float) -> str:
    resets = datetime.fromtimestamp(b.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"Budget exhausted: entitlement {name} has used {b.consumed_weighted_tokens:.0f} of its {b.period.value}ly "
        f"budget of {b.weighted_tokens:.0f} weighted tokens. The budget resets at {resets} (in {math.ceil(wait_s)} s); "
        "requests are refused until then."
    ).replace("dayly", "daily")


def refusal_headers(b: BudgetLimits, wait_s: float) -> dict[str, str]:
    return {
        "Retry-After": str(max(math.ceil(wait_s), 1)),
        "retry-after-ms": str(max(math.ceil(wait_s * 1000), 1000)),
        "x-should-retry": "false",
        "x-tokenscaler-dimension": BUDGET_DIMENSION,
        "x-tokenscaler-budget-resets-at": f"{b.resets_at:.0f}",
    }
