"""What a sidecar holds of the controller's v1beta1 limits documents, and what each new one changes.

Pure: :meth:`PoolView.apply` takes a parsed
:class:`~tokenscaler.core.pool_limits.PoolLimitsDocument` and returns a :class:`ViewChange`:
every gate as a :class:`GateTable` and the ones that changed, both lazy (an entry is built
when the limiter asks for it, and it asks only for the gates in use), the entitlements
removed, and, when the document carried a new ``spec``, the config it describes (the proxy's
identities follow it: keys, tiers, ceilings, the pool's capacity). The split into this
replica's part is the controller's own rule (:func:`~tokenscaler.core.limits.replica_split`),
vectorised with numpy, over every row for a whole document and over the rows whose limits or
routing share moved for a delta. So a document costs arrays, O(rows changed), not an object
per entitlement.
"""

from __future__ import annotations

from collections.abc import Iterator, KeysView, Mapping
from dataclasses import dataclass, field

import numpy as np

from tokenscaler.core.limiter import GateLimits, Vector
from tokenscaler.core.limits import BudgetLimits, replica_split
from tokenscaler.core.model import TIER_ORDER, Pool, Tier, TokenPoolsConfig
from tokenscaler.core.pool_limits import PoolLimitsDocument, configured_limits, share_vector


class OutOfStep(ValueError):
    """A delta against a version this view does not hold: ask for the whole document."""


def _vec(row: list[float]) -> Vector:
    return (row[0], row[1], row[2])


_TIERS = tuple(TIER_ORDER)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(k,) rows of ``a`` equal to ``b`` (inf equal to inf)."""
    out: np.ndarray = ((a == b) | (np.isinf(a) & np.isinf(b))).all(axis=1)
    return out


class GateTable(Mapping[str, GateLimits]):
    """Every entitlement's gate limits on this replica as one applied document set them.

    Immutable (a new document makes a new table), and lazy: an entry is built when asked for
    (and kept), so a document that moves 10,000 rows costs arrays, not 10,000 objects; the
    limiter asks only for the gates in use (:meth:`~tokenscaler.core.limiter.Limiter.gate`).
    """

    __slots__ = ("_gates", "_index", "_memo", "_names", "_priority")

    def __init__(self, names: tuple[str, ...], index: Mapping[str, int], gates: np.ndarray, priority: np.ndarray):
        self._names = names
        self._index = index
        self._gates = gates  # (n, 13): tier, limit, burst, ceiling, ceiling_burst; never written
        self._priority = priority
        self._memo: dict[int, GateLimits] = {}

    def row(self, i: int) -> GateLimits:
        gl = self._memo.get(i)
        if gl is None:
            g = self._gates[i].tolist()
            gl = self._memo[i] = GateLimits(
                tier=_TIERS[int(g[0])], priority=int(self._priority[i]), limit=_vec(g[1:4]), burst=_vec(g[4:7]),
                backfill=True, ceiling=_vec(g[7:10]), ceiling_burst=_vec(g[10:13]),
            )  # fmt: skip
        return gl

    def __getitem__(self, name: str) -> GateLimits:
        return self.row(self._index[name])

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def keys(self) -> KeysView[str]:
        return self._index.keys()  # set-like, without building an entry


class ChangedGates(Mapping[str, GateLimits]):
    """The entries of ``table`` whose rows a document changed (lazy, like the table)."""

    __slots__ = ("_rows", "_set", "_table")

    def __init__(self, table: GateTable, rows: np.ndarray) -> None:
        self._table = table
        self._rows = rows
        self._set: frozenset[str] | None = None

    def _names(self) -> frozenset[str]:
        if self._set is None:
            names = self._table._names
            self._set = frozenset(names[i] for i in self._rows.tolist())
        return self._set

    def __getitem__(self, name: str) -> GateLimits:
        if name not in self._names():
            raise KeyError(name)
        return self._table[name]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        names = self._table._names
        return (names[i] for i in self._rows.tolist())

    def __len__(self) -> int:
        return int(self._rows.size)


_EMPTY = GateTable((), {}, np.zeros((0, 13)), np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class ViewChange:
    changed: Mapping[str, GateLimits]  # the gates to set (all of them after a new spec)
    table: GateTable = field(default_factory=lambda: _EMPTY)  # every gate, with ``changed`` applied
    removed: tuple[str, ...] = ()  # entitlements no longer in the pool
    config: TokenPoolsConfig | None = None  # the config a new spec describes
    budgets: dict[str, BudgetLimits] = field(default_factory=dict)


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
        self._index: dict[str, int] = {}
        self._shares = np.zeros(0)  # the routing shares the gates were split at
        self._fit = True
        self.table: GateTable = _EMPTY  # the gates of the last applied document
        self.budgets: dict[str, BudgetLimits] = {}

    def current(self) -> GateTable:
        """Every gate as the last applied document set it."""
        return self.table

    def _split(self, pool: Pool, rows: np.ndarray | slice, shares: np.ndarray, fit: bool) -> np.ndarray:
        """(k, 13) gate columns of ``rows``: tier, then this replica's limit, burst, ceiling, ceiling burst."""
        tier = self._tier[rows]
        lim, bur, ceil, cb = replica_split(
            pool, self._limit[rows], self._burst[rows], self._configured[rows], tier == Tier.SPOT.rank, fit,
            shares[rows],
        )  # fmt: skip
        return np.concatenate([tier[:, None].astype(float), lim, bur, ceil, cb], axis=1)

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
            self._index = {name: i for i, name in enumerate(names)}
            self._priority = np.array([e.priority for e in doc.spec.entitlements], dtype=np.int64)
            self._configured = configured_limits(doc.spec.entitlements)
            self.config = new_config
            self.spec_hash = doc.spec_hash
            self._gates = None  # every gate is set anew
        elif self.config is None or doc.spec_hash != self.spec_hash:
            raise OutOfStep(f"a document of spec {doc.spec_hash} without it (held: {self.spec_hash})")
        self.generation = doc.generation
        n = len(self.names)
        cols = doc.limits.arrays()
        if cols.rows is None:
            if cols.tier.size != n:
                raise ValueError(f"the limits columns hold {cols.tier.size} rows for {n} entitlements")
            self._tier = cols.tier.copy()  # the delta below writes into these
            self._limit = cols.limit.astype(float, copy=True)
            self._burst = cols.burst.astype(float, copy=True)
        else:
            since = doc.limits.since
            if since != self.version or doc.instance != self.instance or new_config is not None:
                raise OutOfStep(f"a delta since version {since} (held: {self.version})")
            idx = cols.rows
            if idx.size:
                if idx.min() < 0 or idx.max() >= n:
                    raise ValueError(f"a delta row outside the {n} entitlements")
                self._tier[idx] = cols.tier
                self._limit[idx] = cols.limit
                self._burst[idx] = cols.burst
        self.version = doc.version
        self.instance = doc.instance
        self.replica = doc.replica
        assert self.config is not None
        pool = self.config.pools[0]
        index = self._index
        routing = {index[k]: v for k, v in doc.routing.items() if k in index}
        shares = share_vector(n, doc.ready_replicas, routing)
        old = self._gates
        if old is None or old.shape[0] != n or cols.rows is None or doc.guarantees_fit != self._fit:
            todo = None  # every row
        else:  # the split is row by row: only rows whose limits or share moved can change
            todo = np.union1d(cols.rows, np.flatnonzero(shares != self._shares))
        self._shares, self._fit = shares, doc.guarantees_fit
        if old is None or todo is None:
            gates = self._split(pool, slice(None), shares, doc.guarantees_fit)
            same = old is not None and old.shape == gates.shape
            rows = np.flatnonzero(~_same(gates, old)) if same and old is not None else np.arange(n)
        else:
            part = self._split(pool, todo, shares, doc.guarantees_fit)
            moved = ~_same(part, old[todo])
            rows = todo[moved]
            gates = old.copy()  # the table made of ``old`` stays as it was
            gates[rows] = part[moved]
        self._gates = gates
        self.table = GateTable(self.names, self._index, gates, self._priority)
        self.budgets = dict(doc.budgets)
        return ViewChange(ChangedGates(self.table, rows), self.table, removed, new_config, self.budgets)
