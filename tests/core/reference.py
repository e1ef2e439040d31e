"""A slow, obvious reference allocator: plain Python, event by event.

It follows the same specification as :mod:`tokenscaler.core.allocator` (levels by tier and
priority; weighted progressive filling on dominant shares within a level) but advances the
water level from event to event (the next row satisfied or the next dimension exhausted)
with Python floats and loops, without sorting or cumulative sums. Hypothesis compares the
two on random instances.
"""

from __future__ import annotations

import math

import numpy as np

INF = math.inf


def ref_fill(r: list[list[float]], w: list[float], cap: list[float], norm: list[float]):
    m = len(r)
    alloc = [[0.0, 0.0, 0.0] for _ in range(m)]
    frozen_on = [-1] * m
    ds = [max(r[i][k] / norm[k] for k in range(3)) for i in range(m)]
    rising = [i for i in range(m) if ds[i] > 1e-12]  # the kernel's MIN_SHARE
    left = list(cap)
    exhausted = [False] * 3
    tol = [max(cap[k], norm[k]) * 1e-12 for k in range(3)]
    level = 0.0
    # a dimension with nothing left stops its users at once
    for k in range(3):
        if left[k] <= tol[k]:
            exhausted[k] = True
    while rising:
        for i in list(rising):
            used = [k for k in range(3) if r[i][k] > 0 and exhausted[k]]
            if used:
                frozen_on[i] = used[0]
                rising.remove(i)
        if not rising:
            break
        rate = [sum(w[i] * r[i][k] / ds[i] for i in rising) for k in range(3)]
        d_sat = min(ds[i] / w[i] - level for i in rising)
        d_res = min((left[k] / rate[k] if rate[k] > 0 and not exhausted[k] else INF) for k in range(3))
        d = max(min(d_sat, d_res), 0.0)
        for i in rising:
            for k in range(3):
                alloc[i][k] += w[i] * r[i][k] / ds[i] * d
        for k in range(3):
            left[k] -= rate[k] * d
        level += d
        for i in list(rising):
            if ds[i] / w[i] - level <= 1e-12 * max(ds[i] / w[i], 1e-300):
                alloc[i] = list(r[i])
                rising.remove(i)
        for k in range(3):
            if not exhausted[k] and rate[k] > 0 and left[k] <= tol[k] + rate[k] * level * 1e-12:
                exhausted[k] = True
    return alloc, frozen_on


def ref_allocate(problem, capacity, demand, weights=None):
    """Returns (allocation (n,3) ndarray, frozen_on list)."""
    n = problem.n
    w = list(problem.weight if weights is None else weights)
    norm = list(problem.normalization)
    cap = [max(float(c), 0.0) for c in capacity]
    capped = [[min(max(float(demand[i][k]), 0.0), float(problem.limit[i][k])) for k in range(3)] for i in range(n)]
    capped = [[x if x >= 1e-12 * norm[k] else 0.0 for k, x in enumerate(row)] for row in capped]  # MIN_SHARE
    g_dem = [
        [min(capped[i][k], float(problem.guarantee[i][k])) if problem.tier[i] == 0 else 0.0 for k in range(3)]
        for i in range(n)
    ]
    g_dem = [[x if x >= 1e-12 * norm[k] else 0.0 for k, x in enumerate(row)] for row in g_dem]
    alloc = [[0.0] * 3 for _ in range(n)]
    frozen = [-1] * n

    def serve(groups, need, weight_of):
        nonlocal cap
        for _, rows in sorted(groups.items()):
            a, f = ref_fill([need[i] for i in rows], [weight_of[i] for i in rows], cap, norm)
            for j, i in enumerate(rows):
                for k in range(3):
                    alloc[i][k] += a[j][k]
                frozen[i] = f[j]
            cap = [max(cap[k] - sum(a[j][k] for j in range(len(rows))), 0.0) for k in range(3)]

    groups: dict = {}
    for i in range(n):
        if problem.tier[i] == 0 and any(x > 0 for x in g_dem[i]):
            groups.setdefault((0, -int(problem.priority[i])), []).append(i)
    serve(groups, g_dem, list(problem.weight))
    rest = [[capped[i][k] - alloc[i][k] for k in range(3)] for i in range(n)]
    groups = {}
    for i in range(n):
        if any(x > 0 for x in rest[i]) and frozen[i] < 0:
            level = 2 if problem.tier[i] == 2 else 1
            groups.setdefault((level, -int(problem.priority[i])), []).append(i)
    serve(groups, rest, w)
    return np.array(alloc, dtype=float).reshape(n, 3), frozen
