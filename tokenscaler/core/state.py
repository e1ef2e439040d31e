"""What the planner carries between intervals, and the state file's typed encoding.

:class:`PoolState` (debt, last allocation, scale-down history, last target) and
:class:`PlannerState` (every pool's, plus the last published plan) are what a restart must
not lose. On disk they are one JSON document whose every key is a pydantic model field
(:class:`StateFile`): an unknown or mistyped key, a debt entry for an entitlement the file
does not list, or a file of another ``version`` is refused with a message naming the key,
never read as zero. Bulky per-entitlement arrays travel base64-encoded
(:mod:`tokenscaler.core.codec`); debt stays a readable ``{entitlement: value}`` map.

The last plan is kept as a :class:`PlanSnapshot` so a restarted controller serves it at
once (:func:`snapshot_plan`, :func:`restore_plan`).

Budgets (:mod:`tokenscaler.core.budget`) keep their accounts here too
(:class:`BudgetAccountFile` per pool and entitlement: the period counted in and what was
admitted in it), so a restart or a new leader continues the count. The key is optional: a
file written before budgets existed reads as no accounts, and stays version 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from tokenscaler.core.allocator import Allocation
from tokenscaler.core.budget import BudgetEntry, BudgetPeriod
from tokenscaler.core.codec import decode_array, encode_array
from tokenscaler.core.frozen import Frozen
from tokenscaler.core.inputs import align
from tokenscaler.core.model import N_DIMS
from tokenscaler.core.plan import Plan, PoolPlan
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.validation import ConfigError, format_validation_error

STATE_VERSION = 1


# --------------------------------------------------------------------------- the file's models


class EncodedArray(Frozen):
    """A numpy array as little-endian bytes in base64 (:func:`~tokenscaler.core.codec.encode_array`)."""

    dtype: str
    shape: list[int]
    b64: str

    @model_validator(mode="after")
    def _decodes(self) -> EncodedArray:
        self.decode()  # ValueError: pydantic reports it at this array's key
        return self

    def decode(self) -> np.ndarray:
        return decode_array(self.model_dump())

    @classmethod
    def of(cls, a: np.ndarray) -> EncodedArray:
        """``a`` encoded; built without validation: :func:`encode_array`'s output always decodes
        (what a file brings is validated, decode included, when it is read)."""
        return cls.model_construct(**encode_array(a))


class PoolStateFile(Frozen):
    desired_replicas: int | None
    scale_history: list[tuple[float, int]]
    entitlements: list[str]
    debt: dict[str, float]  # entitlements with zero debt are left out
    last_allocation: EncodedArray | None

    @model_validator(mode="after")
    def _debt_names_listed(self) -> PoolStateFile:
        listed = set(self.entitlements)
        unknown = sorted(set(self.debt) - listed)
        if unknown:
            raise ValueError(f"debt names entitlements the file does not list: {', '.join(map(repr, unknown))}")
        return self


class PoolPlanSnapshot(Frozen):
    ready_replicas: int
    desired_replicas: int
    target_replicas: int
    capacity: list[float]
    need: list[float]
    signals: dict[str, float | None]
    incomplete: str | None
    guarantees_fit: bool
    entitlements: list[str]
    allocation: EncodedArray
    bound_by: EncodedArray
    guarantee_shortfall: EncodedArray
    demand: EncodedArray | None
    owed: EncodedArray | None
    debt: EncodedArray | None
    limit: EncodedArray | None
    burst: EncodedArray | None
    limit_per_replica: EncodedArray | None
    burst_per_replica: EncodedArray | None
    usage: EncodedArray | None


class PlanSnapshot(Frozen):
    generated_at: float
    interval_s: float
    pools: dict[str, PoolPlanSnapshot]


class BudgetAccountFile(Frozen):
    """One budget's account (:class:`~tokenscaler.core.budget.BudgetEntry`)."""

    period: BudgetPeriod
    time_zone: str
    period_start: float
    resets_at: float
    consumed_weighted_tokens: float = Field(ge=0, allow_inf_nan=False)
    consumption_rate_weighted_tokens_per_s: float = Field(0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> BudgetAccountFile:
        if not self.period_start < self.resets_at:
            raise ValueError(f"period_start ({self.period_start:g}) must be < resets_at ({self.resets_at:g})")
        return self

    def entry(self) -> BudgetEntry:
        return BudgetEntry(
            self.period_start, self.resets_at, self.consumed_weighted_tokens,
            self.consumption_rate_weighted_tokens_per_s, self.period.value, self.time_zone,
        )  # fmt: skip

    @classmethod
    def of(cls, e: BudgetEntry) -> BudgetAccountFile:
        return cls(
            period=BudgetPeriod(e.period), time_zone=e.time_zone, period_start=e.period_start, resets_at=e.resets_at,
            consumed_weighted_tokens=e.consumed, consumption_rate_weighted_tokens_per_s=e.rate,
        )  # fmt: skip


class StateFile(Frozen):
    """The whole state file (``--state``): written after every interval, read at start."""

    version: Literal[1]
    updated_at: float | None
    plan_version: int
    pools: dict[str, PoolStateFile]
    last_plan: PlanSnapshot | None
    # pool -> entitlement -> account; absent in files written before budgets (read as none)
    budgets: dict[str, dict[str, BudgetAccountFile]] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _without_empty_budgets(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # written only when there are accounts: a controller that predates budgets reads the file
        out: dict[str, Any] = handler(self)
        if not out.get("budgets"):
            out.pop("budgets", None)
        return out


# --------------------------------------------------------------------------- in memory


@dataclass
class PoolState:
    """What a pool carries from one interval to the next. Arrays are aligned with ``names``
    (the rows they were computed for), so a changed config maps them by name."""

    names: tuple[str, ...] = ()
    debt: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (len(names),)
    last_allocation: np.ndarray | None = None  # (len(names), 3)
    scale_history: list[tuple[float, int]] = field(default_factory=list)  # (time, raw target)
    desired_replicas: int | None = None

    def debt_array(self, rows: PoolRows) -> np.ndarray:
        return align(self.debt, self.names, rows, 0.0) if self.names else np.zeros(rows.n)

    def last_allocation_array(self, rows: PoolRows) -> np.ndarray | None:
        if self.last_allocation is None or not self.names:
            return None
        return align(self.last_allocation, self.names, rows, np.nan)

    def debt_of(self, name: str) -> float:
        try:
            return float(self.debt[self.names.index(name)])
        except ValueError:
            return 0.0

    def to_file(self) -> PoolStateFile:
        return PoolStateFile(
            desired_replicas=self.desired_replicas,
            scale_history=list(self.scale_history),
            entitlements=list(self.names),
            debt={n: d for n, d in zip(self.names, self.debt.tolist(), strict=True) if d != 0.0},
            last_allocation=None if self.last_allocation is None else EncodedArray.of(self.last_allocation),
        )

    def to_json(self) -> dict[str, Any]:
        return self.to_file().model_dump(mode="json")

    @classmethod
    def from_file(cls, p: PoolStateFile) -> PoolState:
        names = tuple(p.entitlements)
        last_allocation = p.last_allocation.decode() if p.last_allocation is not None else None
        if last_allocation is not None and last_allocation.shape != (len(names), N_DIMS):
            raise ValueError(f"last_allocation has shape {last_allocation.shape}, expected {(len(names), N_DIMS)}")
        return cls(
            names=names,
            debt=np.array([p.debt.get(n, 0.0) for n in names], dtype=float),
            last_allocation=last_allocation,
            scale_history=[(float(t), int(r)) for t, r in p.scale_history],
            desired_replicas=p.desired_replicas,
        )


@dataclass
class PlannerState:
    """Debt, last allocations, scale-down history and the last plan of every pool."""

    pools: dict[str, PoolState] = field(default_factory=dict)
    updated_at: float | None = None
    last_plan: PlanSnapshot | None = None  # the last published plan, for restarts
    plan_version: int = 0
    budgets: dict[str, dict[str, BudgetEntry]] = field(default_factory=dict)  # pool -> entitlement -> account

    def to_file(self) -> StateFile:
        return StateFile(
            version=STATE_VERSION,
            updated_at=self.updated_at,
            plan_version=self.plan_version,
            pools={name: ps.to_file() for name, ps in self.pools.items()},
            last_plan=self.last_plan,
            budgets={
                pool: {name: BudgetAccountFile.of(e) for name, e in accounts.items()}
                for pool, accounts in self.budgets.items()
                if accounts
            },
        )

    def to_json(self) -> dict[str, Any]:
        return self.to_file().model_dump(mode="json")

    @classmethod
    def from_file(cls, f: StateFile) -> PlannerState:
        return cls(
            pools={name: PoolState.from_file(p) for name, p in f.pools.items()},
            updated_at=f.updated_at,
            last_plan=f.last_plan,
            plan_version=f.plan_version,
            budgets={pool: {name: a.entry() for name, a in accounts.items()} for pool, accounts in f.budgets.items()},
        )

    @classmethod
    def from_json(cls, data: Any, source: str = "<state>") -> PlannerState:
        """Validate a decoded state document; :class:`ConfigError` names each bad key."""
        if isinstance(data, Mapping) and data.get("version") != STATE_VERSION:
            raise ConfigError(
                source, [f"state version {data.get('version')!r} is not supported (expected {STATE_VERSION})"]
            )
        try:
            return cls.from_file(StateFile.model_validate(data))
        except ValidationError as e:
            raise ConfigError(source, format_validation_error(e, data)) from e
        except ValueError as e:  # an array that does not decode or has the wrong shape
            raise ConfigError(source, [str(e)]) from e


# --------------------------------------------------------------------------- the plan, kept for restarts

_SNAPSHOT_ARRAYS = ("demand", "owed", "debt", "limit", "burst", "limit_per_replica", "burst_per_replica", "usage")


def snapshot_plan(plan: Plan) -> PlanSnapshot:
    """A compact form of ``plan`` for the state file (arrays base64-encoded)."""
    pools = {}
    for name, pp in plan.pools.items():
        arrays = {key: None if (v := getattr(pp, key)) is None else EncodedArray.of(v) for key in _SNAPSHOT_ARRAYS}
        pools[name] = PoolPlanSnapshot(
            ready_replicas=pp.ready_replicas,
            desired_replicas=pp.desired_replicas,
            target_replicas=pp.target_replicas,
            capacity=pp.capacity.tolist(),
            need=pp.need.tolist(),
            signals=dict(pp.signals or {}),
            incomplete=pp.incomplete,
            guarantees_fit=pp.allocation.guarantees_fit,
            entitlements=list(pp.rows.names),
            allocation=EncodedArray.of(pp.allocation.allocation),
            bound_by=EncodedArray.of(pp.allocation.bound_by.astype(np.int64)),
            guarantee_shortfall=EncodedArray.of(pp.allocation.guarantee_shortfall),
            **arrays,
        )
    return PlanSnapshot(generated_at=plan.now, interval_s=plan.interval_s, pools=pools)


def restore_plan(snapshot: PlanSnapshot, rows: Mapping[str, PoolRows]) -> Plan:
    """Rebuild a plan from :func:`snapshot_plan` (a restart serves its last plan at once).

    Pools and entitlements the config no longer has are dropped; new ones get zeros.
    Raises ValueError when an array does not match the entitlements it is listed for.
    """
    pools = {name: _restore_pool(name, snapshot.pools[name], r) for name, r in rows.items() if name in snapshot.pools}
    return Plan(now=snapshot.generated_at, interval_s=snapshot.interval_s, pools=pools)


def _restore_pool(pool: str, snap: PoolPlanSnapshot, r: PoolRows) -> PoolPlan:
    names = tuple(snap.entitlements)

    def arr(encoded: EncodedArray | None, key: str, fill: float = 0.0) -> np.ndarray | None:
        if encoded is None:
            return None
        values = encoded.decode()
        if values.shape[0] != len(names):
            raise ValueError(f"{pool}.{key}: {values.shape[0]} rows for {len(names)} entitlements")
        return align(values.astype(float), names, r, fill)

    def vectors(key: str) -> np.ndarray:
        values = arr(getattr(snap, key), key)
        return np.zeros((r.n, N_DIMS)) if values is None else values

    demand = vectors("demand")
    p = r.problem
    guaranteed_demand = np.where(p.is_guaranteed[:, None], np.minimum(np.minimum(demand, p.limit), p.guarantee), 0.0)
    bound = arr(snap.bound_by, "bound_by")
    debt = arr(snap.debt, "debt")
    return PoolPlan(
        rows=r,
        ready_replicas=snap.ready_replicas,
        desired_replicas=snap.desired_replicas,
        target_replicas=snap.target_replicas,
        capacity=np.asarray(snap.capacity, dtype=float),
        need=np.asarray(snap.need, dtype=float),
        demand=demand,
        owed=vectors("owed"),
        allocation=Allocation(
            allocation=vectors("allocation"),
            bound_by=np.zeros(r.n, dtype=np.int64) if bound is None else bound.astype(np.int64),
            guaranteed_demand=guaranteed_demand,
            guarantee_shortfall=vectors("guarantee_shortfall"),
            guarantees_fit=snap.guarantees_fit,
        ),
        debt=np.zeros(r.n) if debt is None else debt,
        limit=vectors("limit"),
        burst=vectors("burst"),
        limit_per_replica=vectors("limit_per_replica"),
        burst_per_replica=vectors("burst_per_replica"),
        signals=snap.signals,
        usage=arr(snap.usage, "usage", np.nan),
        incomplete=snap.incomplete,
    )
