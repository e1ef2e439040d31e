"""Allocator solve time at 10 .. 100,000 entitlements, against the slow reference.

Run: python benchmarks/allocator.py [--repeats N]

One pool; entitlements spread over the three tiers and four priorities, random demand
shapes under contention (total demand about twice the capacity). Times ``allocate`` (one
solve) and ``plan_pool`` (the whole interval: two solves for owed and debt-weighted
allocation, debt, target, limits). The reference is the plain-Python event-by-event
allocator from the tests, run where it finishes in reasonable time; the ratio column is
reference / kernel in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.core.reference import ref_allocate
from tokenscaler.core.allocator import PoolProblem, allocate
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.model import Pool, ResourceVector
from tokenscaler.core.planning import plan_pool
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.state import PoolState

REPLICA = np.array([8000.0, 410128.0, 256.0])


def instance(n: int, seed: int = 0) -> tuple[PoolRows, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tier = rng.choice([0, 1, 2], size=n, p=[0.2, 0.6, 0.2])
    replicas = max(4, n // 50)
    capacity = REPLICA * replicas
    shape = rng.lognormal(0.0, 0.5, size=(n, 3))
    demand = shape / shape.sum(axis=0) * capacity * 2.0  # twice the capacity in total
    guarantee = np.where((tier == 0)[:, None], demand * 0.3, 0.0)
    limit = np.where(rng.random((n, 3)) < 0.3, demand * 0.8, np.inf)
    limit = np.maximum(limit, guarantee)
    problem = PoolProblem(
        names=tuple(f"e{i}" for i in range(n)),
        tier=tier.astype(np.int64),
        priority=rng.integers(0, 4, size=n),
        weight=rng.choice([1.0, 2.0, 4.0], size=n),
        guarantee=guarantee,
        limit=limit,
        normalization=REPLICA,
    )
    pool = Pool(
        name="bench",
        replica=ResourceVector.from_array(REPLICA),
        max_replicas=10 * replicas,
        target_utilization=0.8,
    )
    rows = PoolRows(
        pool=pool,
        problem=problem,
        burst=np.zeros((n, 3)),
        half_life_s=np.full(n, 300.0),
        bound_share_s=np.full(n, 60.0),
        doubling_share_s=np.full(n, 5.0),
        index={name: i for i, name in enumerate(problem.names)},
    )
    return rows, capacity, demand


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print(
        f"# {platform.node()} | {platform.processor() or platform.machine()} | Python {platform.python_version()} | "
        f"numpy {np.__version__} | {time.strftime('%Y-%m-%d')}"
    )
    header = (
        f"{'entitlements':>12} | {'solve p50 ms':>12} | {'solve p99 ms':>12} | {'interval p50 ms':>15} | "
        f"{'reference ms':>12} | {'ref/kernel':>10}"
    )
    print(header)
    print("-" * len(header))
    for n in (10, 100, 1_000, 10_000, 100_000):
        rows, capacity, demand = instance(n)
        repeats = args.repeats if n <= 10_000 else max(5, args.repeats // 10)
        allocate(rows.problem, capacity, demand)  # warm up
        problem = rows.problem
        solve = timed(lambda p=problem, c=capacity, d=demand: allocate(p, c, d), repeats)
        replicas = round(capacity[0] / REPLICA[0])
        debt_state = PoolState(names=rows.names, debt=np.where(np.arange(n) % 3 == 0, 1.0, 0.0))
        interval = timed(
            lambda rows=rows, demand=demand, replicas=replicas, st=debt_state: plan_pool(
                rows, PoolInput(replicas, demand, demand * 0.9), st, 0.0, 5.0
            ),
            repeats,
        )
        ref_ms = "n/a"
        ratio = "n/a"
        if n <= 1_000:
            ref = timed(lambda p=problem, c=capacity, d=demand: ref_allocate(p, c, d), 3)
            ref_med = statistics.median(ref)
            ref_ms = f"{ref_med * 1e3:.1f}"
            ratio = f"{ref_med / statistics.median(solve):.2g}x"
        print(
            f"{n:>12,} | {statistics.median(solve) * 1e3:>12.2f} | {pct(solve, 99) * 1e3:>12.2f} | "
            f"{statistics.median(interval) * 1e3:>15.2f} | {ref_ms:>12} | {ratio:>10}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
