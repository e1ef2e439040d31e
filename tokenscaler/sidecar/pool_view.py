"""What a sidecar holds of the controller's v1beta1 limits documents, and what each new one changes.

Pure: :meth:`PoolView.apply` takes a parsed
:class:`~tokenscaler.core.pool_limits.PoolLimitsDocument` and returns a :class:`ViewChange`:
the gates that changed (only those: a new version usually moves a few rows of 10,000), the
entitlements removed, and, when the document carried a new ``spec``, the config it
describes (the proxy's identities follow it: keys, tiers, ceilings, the pool's capacity).
The split into this replica's part is the controller's own rule
(:func:`~tokenscaler.core.limits.replica_split`), computed for every row at once with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenscaler.core.limiter import GateLimits, Vector
from tokenscaler.core.limits import BudgetLimits, replica_split
from tokenscaler.core.model import TIER_ORDER, Tier, TokenPoolsConfig
from tokenscaler.core.pool_limits import PoolLimitsDocument, configured_limits, share_vector


class OutOfStep(ValueError):
    """A delta against a version this view does not hold: ask for the whole document."""


@dataclass(frozen=True)
class ViewChange:
    changed: dict[str, GateLimits]  # the gates to set (all of them after a new spec)
    removed: tuple[str, ...] = ()  # entitlements no longer in the pool
    config: TokenPoolsConfig | None = None  # the config a new spec describes
    budgets: dict[str, BudgetLimits] = field(default_factory=dict)


def _vec(row: list[float]) -> Vector:
    return (row[0], row[1], row[2])


class PoolView:
    """The pool as the last applied document describes it, for one replica."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.config: TokenPoolsConfig | None = None
        self.names: tuple[str, ...] = ()
        self.generation: int | None = None
        self.spec_hash: str | None = None
        self.instance: str | None = None
        self.version: int | None = None
        self.replica: str | None = None  # the replica the last document's routing was for
        self._priority = np.zeros(0, dtype=np.int64)
        self._configured = np.zeros((0, 3))
        self._tier = np.zeros(0, dtype=np.int8)
        self._limit = np.zeros((0, 3))
        self._burst = np.zeros((0, 3))
        self._gates: np.ndarray | None = None  # (n, 13): tier, limit, burst, ceiling, ceiling_burst as applied
        self.budgets: dict[str, BudgetLimits] = {}

    def forget_gates(self) -> None:
        """The next :meth:`apply` returns every gate, not only those that changed."""
        self._gates = None

    def current(self) -> dict[str, GateLimits]:
        """Every gate as the last applied document set it."""
        return {} if self._gates is None else self._limits_of(np.arange(len(self.names)), self._gates)

    def _limits_of(self, rows: np.ndarray, gates: np.ndarray) -> dict[str, GateLimits]:
        tiers = list(TIER_ORDER)
        sub = gates[rows].tolist()
        prios = self._priority[rows].tolist()
        return {
            self.names[i]: GateLimits(
                tier=tiers[int(g[0])], priority=prios[k], limit=_vec(g[1:4]), burst=_vec(g[4:7]), backfill=True,
                ceiling=_vec(g[7:10]), ceiling_burst=_vec(g[10:13]),
            )
            for k, (i, g) in enumerate(zip(rows.tolist(), sub, strict=True))
        }

    def apply(self, doc: PoolLimitsDocument) -> ViewChange:
        if doc.pool != self.pool:
            raise ValueError(f"the document is for pool {doc.pool!r}, not {self.pool!r}")
        new_config: TokenPoolsConfig | None = None
        removed: tuple[str, ...] = ()
        if doc.spec is not None:
            # validated where it was parsed; its cross-object rules are the controller's, which checked them
            ents = list(doc.spec.entitlements)
            new_config = TokenPoolsConfig.model_construct(pools=[doc.spec.pool], entitlements=ents)
            names = tuple(e.name for e in doc.spec.entitlements)
            removed = tuple(n for n in self.names if n not in set(names))
            self.names = names
            self._priority = np.array([e.priority for e in doc.spec.entitlements], dtype=np.int64)
            self._configured = configured_limits(doc.spec.entitlements)
            self.config = new_config
            self.spec_hash = doc.spec_hash
            self._gates = None  # every gate is set anew
        elif self.config is None or doc.spec_hash != self.spec_hash:
            raise OutOfStep(f"a document of spec {doc.spec_hash} without it (held: {self.spec_hash})")
        self.generation = doc.generation
        n = len(self.names)
        cols = doc.limits
        if cols.index is None:
            if len(cols.tier) != n or len(cols.limit) != n or len(cols.burst) != n:
                raise ValueError(f"the limits columns hold {len(cols.tier)} rows for {n} entitlements")
            self._tier = np.asarray(cols.tier, dtype=np.int8)
            self._limit = np.asarray(cols.limit, dtype=float).reshape(n, 3)
            self._burst = np.asarray(cols.burst, dtype=float).reshape(n, 3)
        else:
            if cols.since != self.version or doc.instance != self.instance or new_config is not None:
                raise OutOfStep(f"a delta since version {cols.since} (held: {self.version})")
            idx = np.asarray(cols.index, dtype=np.int64)
            if idx.size:
                if idx.min() < 0 or idx.max() >= n:
                    raise ValueError(f"a delta row outside the {n} entitlements")
                self._tier[idx] = np.asarray(cols.tier, dtype=np.int8)
                self._limit[idx] = np.asarray(cols.limit, dtype=float).reshape(idx.size, 3)
                self._burst[idx] = np.asarray(cols.burst, dtype=float).reshape(idx.size, 3)
        self.version = doc.version
        self.instance = doc.instance
        self.replica = doc.replica
        assert self.config is not None
        pool = self.config.pools[0]
        index = {name: i for i, name in enumerate(self.names)} if doc.routing else {}
        routing = {index[k]: v for k, v in doc.routing.items() if k in index}
        shares = share_vector(n, doc.ready_replicas, routing)
        spot = self._tier == Tier.SPOT.rank
        lim, bur, ceil, cb = replica_split(
            pool, self._limit, self._burst, self._configured, spot, doc.guarantees_fit, shares
        )
        gates = np.concatenate([self._tier[:, None].astype(float), lim, bur, ceil, cb], axis=1)
        if self._gates is None or self._gates.shape != gates.shape:
            rows = np.arange(n)
        else:
            same = (gates == self._gates) | (np.isinf(gates) & np.isinf(self._gates))
            rows = np.flatnonzero(~same.all(axis=1))
        self._gates = gates
        changed = self._limits_of(rows, gates)
        self.budgets = dict(doc.budgets)
        return ViewChange(changed, removed, new_config, self.budgets)
