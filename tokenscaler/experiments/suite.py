"""One experiment: every policy on a scenario, each run again without the spot traffic.

:func:`run_experiment` runs the policies (in ``jobs`` processes), adds each policy's
``uncontended_ttft_p99_s`` from its twin without spot traffic, and returns the results in
the shape ``results.json`` has; :func:`rounded` makes them byte-stable (floats to 6
significant digits, NaN and infinity as null), so the same seed gives the same bytes. A
progress bar per run shows simulated time when stderr is a terminal.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def rounded(x: Any) -> Any:
    """``x`` with every float at 6 significant digits (NaN and infinity: None), recursively."""
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return None
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {str(k): rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v) for v in x]
    return x


def _job(args: tuple[str, str, int, float, bool, int]) -> tuple[str, bool, dict, float]:
    scenario, policy, seed, duration, without_spot, position = args
    from tokenscaler.experiments.runner import run_policy
    from tokenscaler.experiments.scenario import load_scenario

    loaded = load_scenario(scenario)
    started = time.perf_counter()
    bar = None
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        label = f"{loaded.name} {policy}{' (no spot)' if without_spot else ''}"
        total = round(duration)
        bar = tqdm(total=total, desc=label, unit="s", position=position, leave=False, file=sys.stderr)

        def progress(t: float) -> None:
            bar.n = min(round(t), total)
            bar.refresh()

    result = run_policy(loaded, policy, seed, duration, without_spot=without_spot, progress=progress)
    if bar is not None:
        bar.close()
    return policy, without_spot, result, time.perf_counter() - started


def run_experiment(scenario: str, policies: list[str], seed: int, duration_s: float | None, jobs: int) -> dict:
    """Every policy's results, in the issue's shape (plus the uncontended twin's figures)."""
    from tokenscaler.experiments.scenario import load_scenario

    loaded = load_scenario(scenario)
    duration = duration_s if duration_s is not None else loaded.scenario.duration_s
    twins = (False, True) if loaded.spot else (False,)
    pairs = [(p, twin) for p in policies for twin in twins]
    tasks = [(scenario, p, seed, duration, twin, i % max(jobs, 1)) for i, (p, twin) in enumerate(pairs)]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            outputs = list(pool.map(_job, tasks))
    else:
        outputs = [_job(t) for t in tasks]
    full = {p: r for p, twin, r, _ in outputs if not twin}
    twin = {p: r for p, tw, r, _ in outputs if tw}
    walls = {f"{p}{' (no spot)' if tw else ''}": w for p, tw, _, w in outputs}
    out: dict[str, Any] = {}
    for p in policies:
        res = full[p]
        base = twin.get(p, res)
        for tier, figures in res["tiers"].items():
            figures["uncontended_ttft_p99_s"] = base["tiers"].get(tier, {}).get("ttft_p99_s", figures["ttft_p99_s"])
        res["replica_seconds_uncontended"] = base["replica_seconds"]
        if base is not res:  # the twin's showback: what each tenant is charged without the spot traffic
            res["showback_uncontended"] = base["showback"]
        out[p] = res
    return {
        "scenario": loaded.name,
        "seed": seed,
        "duration_s": duration,
        "interval_s": loaded.scenario.interval_s,
        "paper": loaded.scenario.paper,
        "policies": out,
        "_wall_s": walls,
    }
