"""The allocation kernel: priority levels, guarantees, weighted DRF progressive filling.

``allocate(problem, capacity, demand, weights)`` is a pure function over numpy arrays
(``n`` entitlements of one pool, 3 dimensions, columns in :data:`DIMENSIONS` order). It
returns each entitlement's allocation and what bound it. No I/O, no clock.

Levels, served strictly in this order (invariant 3):

1. **guaranteed**: guaranteed-tier entitlements up to ``min(demand, guarantee)``, by
   priority (higher first). When the guarantees fit the capacity everyone gets them in
   full (invariant 2); when they do not (capacity was lost) each priority sublevel is
   filled fairly and the shortfall is reported.
2. **elastic**: elastic entitlements, and guaranteed-tier demand above its guarantee, by
   priority; within a priority, weighted fair shares (weights adjusted by debt upstream).
   Above its guarantee a guaranteed entitlement competes for what is left on equal
   footing, its guarantee not counted against it (as kueue's fair sharing counts only
   usage above nominal quota).
3. **spot**: what is left, by priority then weight (work-conserving backfill).

Within one (level, priority) sublevel the kernel runs weighted max-min fairness on dominant
shares (DRF progressive filling, invariant 4). Each entitlement's remaining demand ``r_i``
is a direction (a request needs all three dimensions together); its dominant share is
``max_k r_ik / N_k`` with ``N`` the per-replica capacity (a fixed normalization, so shares
do not jump when replicas come and go). A common water level ``t`` rises; entitlement
``i`` holds ``min(1, w_i t / ds_i) * r_i``. When a dimension runs out, every entitlement
still growing that uses it is frozen there; the others keep rising. Each freeze exhausts a
dimension, so a sublevel takes at most three rounds, each a sort and a cumulative sum:
``O(n log n)``.

Invariants the tests assert (with a relative tolerance of 1e-9):

1. ``allocation.sum(0) <= capacity`` on every dimension.
2. guaranteed entitlements get ``min(demand, guarantee)`` whenever those fit ``capacity``.
3. a sublevel receives nothing while an earlier sublevel it competes with is capacity-bound
   on a dimension it needs.
4. within a sublevel: weighted max-min fair dominant shares.
5. ``allocation <= min(demand, limit)``.
6. work conservation: an entitlement short of ``min(demand, limit)`` is short only on
   dimensions that are exhausted.
7. deterministic; more replicas never lower anyone's allocation when one dimension binds
   for everyone (requests of one shape). With several dimensions the strong form is
   impossible together with 3, 4 and 6 (DRF is not resource-monotonic: Ghodsi et al.,
   NSDI'11); what holds is that an allocation falls only because more replicas let an
   entitlement served no later take more of an exhausted dimension both need. The tests
   pin one counterexample for strict priority and one for fairness within a level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenscaler.core.model import DIMENSIONS, N_DIMS, Tier

# bound_by codes: what stopped an entitlement from receiving more
BOUND_DEMAND = 0  # it received its whole demand
BOUND_LIMIT = 1  # it received its whole demand up to its configured limit
BOUND_CAPACITY = 2  # + k: dimension k of the pool ran out
BOUND_NAMES: tuple[str, ...] = ("demand", "limit", *(f"capacity:{d}" for d in DIMENSIONS))

LEVEL_GUARANTEED, LEVEL_ELASTIC, LEVEL_SPOT = 0, 1, 2
_REL_EPS = 1e-12
MIN_SHARE = 1e-12  # demand below this fraction of one replica is treated as none


@dataclass(frozen=True)
class PoolProblem:
    """The static rows of one pool: everything about its entitlements but demand.

    Arrays are aligned: row ``i`` is entitlement ``names[i]``.
    """

    names: tuple[str, ...]
    tier: np.ndarray  # (n,) int: 0 guaranteed, 1 elastic, 2 spot
    priority: np.ndarray  # (n,) int
    weight: np.ndarray  # (n,) float > 0
    guarantee: np.ndarray  # (n, 3) float >= 0 (zero outside the guaranteed tier)
    limit: np.ndarray  # (n, 3) float, inf where unlimited
    normalization: np.ndarray  # (3,) per-replica capacity, > 0

    def __post_init__(self) -> None:
        n = len(self.names)
        for field, shape in (
            ("tier", (n,)),
            ("priority", (n,)),
            ("weight", (n,)),
            ("guarantee", (n, N_DIMS)),
            ("limit", (n, N_DIMS)),
            ("normalization", (N_DIMS,)),
        ):
            if getattr(self, field).shape != shape:
                raise ValueError(f"PoolProblem.{field} has shape {getattr(self, field).shape}, expected {shape}")
        if not np.all(self.normalization > 0):
            raise ValueError("PoolProblem.normalization must be > 0 on every dimension")
        if not np.all(self.weight > 0):
            raise ValueError("PoolProblem.weight must be > 0")

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def is_guaranteed(self) -> np.ndarray:
        out: np.ndarray = self.tier == Tier.GUARANTEED.rank
        return out

    @property
    def is_elastic(self) -> np.ndarray:
        out: np.ndarray = self.tier == Tier.ELASTIC.rank
        return out

    @property
    def is_spot(self) -> np.ndarray:
        out: np.ndarray = self.tier == Tier.SPOT.rank
        return out


@dataclass(frozen=True)
class Allocation:
    """The kernel's answer for one pool and one interval."""

    allocation: np.ndarray  # (n, 3)
    bound_by: np.ndarray  # (n,) int codes, see BOUND_NAMES
    guaranteed_demand: np.ndarray  # (n, 3) min(demand, guarantee, limit)
    guarantee_shortfall: np.ndarray  # (n, 3) guaranteed_demand not allocated (the breach signal)
    guarantees_fit: bool  # sum of guaranteed_demand fits the capacity

    def bound_by_names(self) -> list[str]:
        return [BOUND_NAMES[c] for c in self.bound_by.tolist()]


def dominant_share(x: np.ndarray, normalization: np.ndarray) -> np.ndarray:
    """``max_k x_k / N_k`` for each row of ``x`` (or for a single vector)."""
    out: np.ndarray = np.max(x / normalization, axis=-1)
    return out


def fill(
    remaining: np.ndarray, weight: np.ndarray, capacity: np.ndarray, normalization: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted DRF progressive filling of one sublevel.

    ``remaining`` (m, 3) demand directions, ``weight`` (m,) > 0, ``capacity`` (3,) what is
    left of the pool. Returns ``(allocation (m, 3), frozen_on (m,))`` where ``frozen_on``
    is the dimension that stopped the row, or -1 when it received all of ``remaining``.
    """
    m = remaining.shape[0]
    alloc = np.zeros_like(remaining)
    frozen_on = np.full(m, -1, dtype=np.int64)
    if m == 0:
        return alloc, frozen_on
    left = capacity.astype(float).copy()
    ds_all = dominant_share(remaining, normalization)
    active = np.flatnonzero(ds_all > MIN_SHARE)
    scale = np.maximum(capacity, normalization) * _REL_EPS
    exhausted = np.zeros(N_DIMS, dtype=bool)
    while active.size:
        r = remaining[active]
        ds = ds_all[active]
        w = weight[active]
        t_sat = ds / w  # water level at which each row is satisfied
        rate = r * (w / ds)[:, None]  # resources per unit of water level
        order = np.argsort(t_sat, kind="stable")
        ts = t_sat[order]
        rs = r[order]
        vs = rate[order]
        # usage at breakpoint j (water level ts[j]): rows before j are satisfied, j.. are rising
        prefix = np.zeros_like(rs)
        np.cumsum(rs[:-1], axis=0, out=prefix[1:])
        suffix = np.cumsum(vs[::-1], axis=0)[::-1]
        at_break = prefix + ts[:, None] * suffix
        t_star = np.full(N_DIMS, np.inf)
        for k in range(N_DIMS):
            if exhausted[k] or suffix[0, k] <= 0:
                continue
            if left[k] <= scale[k]:
                t_star[k] = 0.0
                continue
            j = int(np.searchsorted(at_break[:, k], left[k], side="left"))
            if j < ts.size:
                slope = suffix[j, k]
                t_star[k] = max((left[k] - prefix[j, k]) / slope, 0.0) if slope > 0 else ts[j]
        t_min = float(t_star.min())
        if not np.isfinite(t_min):  # everything left fits: all rows satisfied
            alloc[active] = r
            break
        # within a relative 1e-9 of its demand a row is satisfied, not starved: a guarantee
        # equal to what is left (to the last ulp) must not freeze the row's other dimensions
        satisfied = t_sat <= t_min * (1 + 1e-9)
        level = np.minimum(t_sat, t_min)
        a = rate * level[:, None]
        a[satisfied] = r[satisfied]
        binding = t_star <= t_min * (1 + 1e-9) + 1e-300
        uses_binding = (r[:, binding] > 0).any(axis=1)
        done = satisfied | uses_binding
        frozen_dim = np.argmax(np.where(binding[None, :] & (r > 0), 1.0, 0.0), axis=1)
        rows_done = active[done]
        alloc[rows_done] = a[done]
        frozen_on[active[uses_binding & ~satisfied]] = frozen_dim[uses_binding & ~satisfied]
        left = left - a[done].sum(axis=0)
        left[binding] = 0.0
        exhausted |= binding
        active = active[~done]
        # the rows still rising restart from level 0 against what the others left: their
        # trajectories are functions of the level alone, so this is the same path.
    return alloc, frozen_on


def _sublevels(levels: np.ndarray, priority: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """Split ``rows`` into (level, priority desc) groups, in serving order."""
    if rows.size == 0:
        return []
    order = np.lexsort((rows, -priority[rows], levels[rows]))
    rows = rows[order]
    keys = np.stack([levels[rows], priority[rows]], axis=1)
    cut = np.flatnonzero((keys[1:] != keys[:-1]).any(axis=1)) + 1
    return np.split(rows, cut)


def allocate(
    problem: PoolProblem,
    capacity: np.ndarray,
    demand: np.ndarray,
    weights: np.ndarray | None = None,
) -> Allocation:
    """Allocate ``capacity`` (3,) among ``demand`` (n, 3) rows of ``problem``.

    ``weights`` (n,) are the effective fair-share weights (the configured weights adjusted
    by debt); the configured weights when omitted.
    """
    n = problem.n
    demand = np.asarray(demand, dtype=float)
    capacity = np.maximum(np.asarray(capacity, dtype=float), 0.0)
    if demand.shape != (n, N_DIMS):
        raise ValueError(f"demand has shape {demand.shape}, expected {(n, N_DIMS)}")
    w = problem.weight if weights is None else np.asarray(weights, dtype=float)
    capped = np.minimum(np.maximum(demand, 0.0), problem.limit)
    dust = MIN_SHARE * problem.normalization
    capped[capped < dust] = 0.0  # dust is no demand
    guaranteed_demand = np.minimum(capped, problem.guarantee)
    guaranteed_demand[guaranteed_demand < dust] = 0.0
    is_g = problem.is_guaranteed
    guaranteed_demand[~is_g] = 0.0

    alloc = np.zeros((n, N_DIMS))
    frozen_on = np.full(n, -1, dtype=np.int64)
    left = capacity.copy()
    fits = bool(np.all(guaranteed_demand.sum(axis=0) <= capacity * (1 + 1e-9)))

    # level 1: guarantees
    g_rows = np.flatnonzero(is_g & (guaranteed_demand > 0).any(axis=1))
    level_of = np.zeros(n, dtype=np.int64)
    for rows in _sublevels(level_of, problem.priority, g_rows):
        a, f = fill(guaranteed_demand[rows], problem.weight[rows], left, problem.normalization)
        alloc[rows] = a
        frozen_on[rows] = f
        left = np.maximum(left - a.sum(axis=0), 0.0)

    # levels 2 and 3: elastic (with guaranteed demand above guarantee), then spot
    rest = capped - alloc
    level_of = np.where(problem.is_spot, LEVEL_SPOT, LEVEL_ELASTIC)
    rest_rows = np.flatnonzero((rest > 0).any(axis=1) & (frozen_on < 0))
    for rows in _sublevels(level_of, problem.priority, rest_rows):
        a, f = fill(rest[rows], w[rows], left, problem.normalization)
        alloc[rows] += a
        frozen_on[rows] = f
        left = np.maximum(left - a.sum(axis=0), 0.0)

    bound_by = np.where(frozen_on >= 0, BOUND_CAPACITY + frozen_on, BOUND_DEMAND)
    limited = (demand > problem.limit).any(axis=1) & (frozen_on < 0)
    bound_by[limited] = BOUND_LIMIT
    shortfall = np.maximum(guaranteed_demand - alloc, 0.0)
    return Allocation(
        allocation=alloc,
        bound_by=bound_by,
        guaranteed_demand=guaranteed_demand,
        guarantee_shortfall=shortfall,
        guarantees_fit=fits,
    )
