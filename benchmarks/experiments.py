"""Benchmark of the experiments harness: how long virtual-time experiments take on this machine.

Run: ``.venv/bin/python benchmarks/experiments.py`` (``--quick``: only the first goal).

1. One policy (``tokenpools``) of ``overload``: 8-replica fleet ceiling, one simulated hour,
   one core. Goal: at most 60 s wall.
2. ``--policy all --jobs 2`` over every shipped scenario (each policy twice: with and without
   spot traffic). Goal: at most 10 minutes wall.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenscaler.experiments.policies import POLICIES  # noqa: E402
from tokenscaler.experiments.runner import run_policy  # noqa: E402
from tokenscaler.experiments.scenario import load_scenario, shipped_scenarios  # noqa: E402
from tokenscaler.experiments.suite import run_experiment  # noqa: E402


def one_policy(policy: str = "tokenpools", without_spot: bool = False) -> float:
    loaded = load_scenario("overload")
    t0 = time.perf_counter()
    run_policy(loaded, policy, 7, loaded.scenario.duration_s, without_spot=without_spot)
    return time.perf_counter() - t0


def everything() -> dict[str, float]:
    out = {}
    for name in shipped_scenarios():
        t0 = time.perf_counter()
        run_experiment(name, list(POLICIES), 7, None, 2)
        out[name] = time.perf_counter() - t0
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for policy in ("tokenpools", "none"):
        wall = one_policy(policy)
        twin = one_policy(policy, without_spot=True)
        print(f"| overload, {policy}, 3600 simulated s, 1 core | {wall:.1f} s (+ {twin:.1f} s uncontended twin) "
              f"| goal <= 60 s: {'met' if wall <= 60 else 'NOT met'} |")  # fmt: skip
    if not args.quick:
        walls = everything()
        for name, w in walls.items():
            print(f"| {name}, --policy all --jobs 2 | {w:.1f} s |")
        total = sum(walls.values())
        print(f"| all shipped scenarios | {total:.1f} s | goal <= 600 s: {'met' if total <= 600 else 'NOT met'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
