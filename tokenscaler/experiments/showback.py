"""Showback in an experiment: each interval's replica time split between the tenants, every policy alike.

:class:`ShowbackMeter` is fed by the recorder's samples (every ``interval_s``, with the
replica-seconds the Deployment ran so far, the ready replicas, and what the controller
decided or, for baselines without one, what fairness owed). It splits each interval with the
controller's own rule (:func:`tokenscaler.core.accounting.split_pool` where the policy has a
plan: its allocation in force and the usage it observed; :func:`tokenscaler.core.showback.split_interval`
with the owed allocation otherwise), so what an experiment reports is what the controller's
counters say. The replica time split is the Deployment's: replicas starting and draining
included (the controller sees only ready ones); that part is idle, shown as ``not_ready``.

:func:`showback_table` prints a policy's table for ``report.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenscaler.core.accounting import split_pool
from tokenscaler.core.model import IdleAttribution
from tokenscaler.core.plan import PoolPlan
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.showback import BASES, PLATFORM, PoolLedger, Split, cost, split_interval, statement_markdown


class ShowbackMeter:
    """The running showback of one run (module docstring)."""

    def __init__(self, rows: PoolRows) -> None:
        self.rows = rows
        self.ledger = PoolLedger()
        self.not_ready = 0.0
        self._t: float | None = None
        self._replica_s = 0.0
        self._previous: PoolPlan | None = None
        self._last: dict[str, Any] | None = None  # the last interval's split inputs, for the run's tail

    def _split(self, inputs: dict[str, Any], dt: float, replica_seconds: float) -> Split:
        pp = inputs.get("plan")
        if pp is not None:
            return split_pool(pp, inputs.get("previous"), dt, replica_seconds)
        p = self.rows.problem
        return split_interval(
            names=self.rows.names, tier=p.tier, guarantee=p.guarantee, allocation=inputs["allocation"],
            usage=inputs["usage"], unit=self.rows.pool.replica.to_array(), ready_replicas=inputs["ready"], dt=dt,
            replica_seconds=replica_seconds,
            idle_to_guarantees=self.rows.pool.idle_attribution is IdleAttribution.GUARANTEES,
        )  # fmt: skip

    def _add(self, inputs: dict[str, Any], dt: float, replica_seconds: float) -> None:
        split = self._split(inputs, dt, replica_seconds)
        self.ledger = self.ledger.add(split)
        self.not_ready += max(replica_seconds - inputs["ready"] * dt, 0.0)

    def sample(
        self, t: float, replica_s: float, ready: int, plan: PoolPlan | None, owed: np.ndarray | None,
        usage: np.ndarray | None,
    ) -> None:  # fmt: skip
        """The interval that ends at ``t``: ``replica_s`` replica-seconds run since the start."""
        if self._t is None:
            self._t, self._replica_s = t, replica_s
            if replica_s > 0:  # time before the first sample: nothing is known of it but that it ran
                self._add(self._idle_inputs(ready), 0.0, replica_s)
            self._previous = plan
            return
        dt, spent = t - self._t, replica_s - self._replica_s
        n = self.rows.n
        if plan is not None and plan.ready_replicas == ready:
            inputs: dict[str, Any] = {"plan": plan, "previous": self._previous, "ready": ready}
        elif owed is not None and usage is not None:
            inputs = {"allocation": owed, "usage": usage, "ready": ready}
        else:  # nothing observed (no replica ready): all of it was idle
            inputs = self._idle_inputs(ready if n else 0)
        self._add(inputs, dt, spent)
        self._t, self._replica_s, self._previous, self._last = t, replica_s, plan, inputs

    def _idle_inputs(self, ready: int) -> dict[str, Any]:
        n = self.rows.n
        return {"allocation": np.zeros((n, 3)), "usage": np.zeros((n, 3)), "ready": ready}

    def result(self, end: float, replica_s: float) -> dict[str, Any]:
        """The run's showback in ``results.json``'s shape: per tenant the replica-seconds of each
        basis (keys ``<basis>_replica_seconds``), and the platform's idle."""
        if self._t is not None and replica_s > self._replica_s:  # the run's tail after the last sample
            self._add(self._last or self._idle_inputs(0), max(end - self._t, 0.0), replica_s - self._replica_s)
            self._t, self._replica_s = end, replica_s
        rows = self.ledger.rows()
        pricing = self.rows.pool.pricing
        price = pricing.per_replica_hour if pricing is not None else None
        tiers = dict(zip(self.rows.names, (int(x) for x in self.rows.problem.tier), strict=True))
        used = dict(zip(self.ledger.names, self.ledger.guarantee_used.tolist(), strict=True))
        tenants: dict[str, Any] = {}
        for name in self.rows.names:
            r = rows.get(name, dict.fromkeys(BASES, 0.0))
            total = sum(r.values())
            tenants[name] = {
                "tier": ("guaranteed", "elastic", "spot")[tiers[name]],
                **{f"{b}_replica_seconds": r[b] for b in BASES},
                "total_s": total,
                "guarantee_used_s": used.get(name, 0.0),
                "cost": cost(total, price),
            }
        platform = rows[PLATFORM]["idle"]
        return {
            "unit": "replica-seconds (docs/showback.md); platform idle includes replicas not ready",
            "currency": pricing.currency if pricing is not None else None,
            "tenants": tenants,
            "platform": {
                "idle_replica_seconds": platform, "not_ready_s": self.not_ready, "cost": cost(platform, price),
            },
            "pool_total_s": self.ledger.attributed(),
        }


def showback_table(policy: str, sb: dict[str, Any], uncontended: dict[str, Any] | None = None) -> list[str]:
    """A policy's showback as markdown rows (tenants, then the platform), with each tenant's share of
    the pool and, given the run without spot, its reserved time there."""
    total = sb["pool_total_s"] or 1.0
    rows = []
    for name, t in sb["tenants"].items():
        row = {"policy": policy, "tenant": name, "tier": t["tier"], "share": t["total_s"] / total, "cost": t["cost"]}
        row.update({b: t[f"{b}_replica_seconds"] for b in BASES})
        reserved = t["reserved_replica_seconds"]
        row["used"] = t["guarantee_used_s"] / reserved if reserved > 0 else None
        if uncontended is not None:
            row["reserved_nospot"] = uncontended["tenants"].get(name, {}).get("reserved_replica_seconds")
        rows.append(row)
    p = sb["platform"]
    rows.append({"policy": policy, "tenant": PLATFORM, "tier": "", "idle": p["idle_replica_seconds"],
                 "share": p["idle_replica_seconds"] / total, "cost": p["cost"]})  # fmt: skip
    columns = [("policy", "policy"), ("tenant", "tenant"), ("tier", "tier"), ("reserved", "reserved"),
               ("allocated", "allocated"), ("backfill", "backfill"), ("idle", "idle"), ("share", "share of pool"),
               ("used", "guarantee used"), ("cost", "cost")]  # fmt: skip
    if uncontended is not None:
        columns.insert(4, ("reserved_nospot", "reserved, no spot"))
    return statement_markdown(rows, columns)
