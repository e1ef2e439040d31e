"""The accounting rules around planning: budgets before it, showback after it.

The control step (:mod:`tokenscaler.core.step`) calls these each interval, so the
controller, the Kubernetes operator and the virtual-time experiments account alike:

* :func:`interval_length`: how much time this step accounts for: the time since the last
  step that planned (a restart continues from the state file's ``updated_at``, so the
  controller's downtime is accounted too), at most ``max_gap_s``; the interval on a first
  step.
* :func:`charge_budgets`: each budget's account after the interval
  (:func:`tokenscaler.core.budget.update_budgets`, from the admitted weighted tokens/s of the
  derived usage), and its status.
* :func:`downgraded`: the rows the planner plans with: an entitlement whose budget is spent
  becomes a spot entitlement without guarantee until its period resets (nothing is
  provisioned for it; it may use only idle capacity; with ``refuse`` the sidecars also
  answer it 429).
* :func:`split_pool`: the showback split of the interval (:func:`tokenscaler.core.showback.split_interval`)
  from the plan: the ready replicas and usage it observed, the guarantees it planned with,
  and the allocation that was in force (the previous plan's, where it had one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from tokenscaler.core.budget import BudgetEntry, BudgetStatus, budget_status, update_budgets
from tokenscaler.core.inputs import PoolInput, align
from tokenscaler.core.model import THROUGHPUT, IdleAttribution, Tier
from tokenscaler.core.plan import PoolPlan
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.showback import PoolLedger, Split, split_interval

DEFAULT_MAX_GAP_S = 300.0


def interval_length(last: float | None, now: float, interval_s: float, max_gap_s: float = DEFAULT_MAX_GAP_S) -> float:
    """Seconds this step accounts for: ``now - last``, within ``[0, max_gap_s]``; ``interval_s``
    when there was no step before."""
    if last is None:
        return interval_s
    return min(max(now - last, 0.0), max_gap_s)


def charge_budgets(
    rows: PoolRows, inp: PoolInput | None, accounts: Mapping[str, BudgetEntry], dt: float, now: float
) -> tuple[dict[str, BudgetEntry], dict[str, BudgetStatus]]:
    """The budget accounts of one pool after the interval, and their statuses."""
    if not rows.budgets:
        return {}, {}
    admitted: dict[str, float] = {}
    if inp is not None and inp.usage is not None:
        usage = np.asarray(inp.usage, dtype=float)
        for name in rows.budgets:
            admitted[name] = float(usage[rows.index[name], THROUGHPUT])
    new = update_budgets(rows.budgets, accounts, admitted, dt, now)
    return new, {name: budget_status(b, new[name]) for name, b in rows.budgets.items()}


def downgraded(rows: PoolRows, names: Iterable[str]) -> PoolRows:
    """``rows`` with the entitlements ``names`` planned as spot without guarantee."""
    idx = sorted(rows.index[n] for n in names)
    if not idx:
        return rows
    p = rows.problem
    tier = p.tier.copy()
    tier[idx] = Tier.SPOT.rank
    guarantee = p.guarantee.copy()
    guarantee[idx] = 0.0
    return dataclasses.replace(rows, problem=dataclasses.replace(p, tier=tier, guarantee=guarantee))


def exhausted(statuses: Mapping[str, BudgetStatus]) -> list[str]:
    return [name for name, s in statuses.items() if s.exhausted]


def split_pool(
    pp: PoolPlan, previous: PoolPlan | None, dt: float, replica_seconds: float | None = None
) -> Split:
    """The showback split of the interval that ends with plan ``pp`` (module docstring)."""
    r = pp.rows
    allocation = pp.allocation.allocation
    if previous is not None and previous.rows.n:
        before = align(previous.allocation.allocation, previous.rows.names, r, np.nan)
        allocation = np.where(np.isnan(before), allocation, before)
    usage = pp.usage if pp.usage is not None else np.zeros_like(allocation)
    unit = pp.unit if pp.unit is not None else pp.pool.replica.to_array()
    return split_interval(
        names=r.names,
        tier=r.problem.tier,
        guarantee=r.problem.guarantee,
        allocation=allocation,
        usage=usage,
        unit=unit,
        ready_replicas=pp.ready_replicas,
        dt=dt,
        replica_seconds=replica_seconds,
        idle_to_guarantees=pp.pool.idle_attribution is IdleAttribution.GUARANTEES,
    )


def add_to_ledgers(
    ledgers: Mapping[str, PoolLedger], splits: Mapping[str, Split]
) -> dict[str, PoolLedger]:
    out = dict(ledgers)
    for pool, split in splits.items():
        out[pool] = out.get(pool, PoolLedger()).add(split)
    return out
