"""The virtual-time fast path: a pure decode run executed at once equals the same steps one by one."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.sim.builders import make_engine
from tokenscaler.sim.engine import Engine


def _snapshot(e: Engine) -> dict:
    st = e.stats
    hists = {k: (v.counts.tolist(), v.sum, v.count) for k, v in vars(st).items() if hasattr(v, "counts")}
    scalars = {k: v for k, v in vars(st).items() if not hasattr(v, "counts")}
    reqs = {
        rid: (r.status, r.output_tokens, r.first_token_s, r.last_token_s, r.scheduled_s, r.num_preemptions)
        for rid, r in e._requests.items()
    }
    return {"hists": hists, "scalars": scalars, "reqs": reqs, "busy": e.busy_until_s, "free": e.free_blocks,
            "waiting": e.num_waiting, "running": e.num_running, "vtc": e.vtc_counters() if e._vtc else None}


def _drive(e: Engine, arrivals: list[tuple[float, int, int, str]], *, fast: bool, horizon: float) -> tuple[list, int]:
    """Feed arrivals in time order and step, as the experiments' loop does: with ``fast``, a
    pure decode run is planned whole, executed up to the step in flight when a request
    arrives, and goes on after it unless the newcomer can be admitted."""
    log, runs, i, plan = [], 0, 0, []

    def record(res) -> None:  # type: ignore[no-untyped-def]
        e.check_invariants()
        log.append((res.start_s, res.end_s, res.num_requests, [r.request_id for r in res.finished],
                    [r.request_id for r in res.first_token]))

    while i < len(arrivals) or e.has_work:
        nxt = arrivals[i][0] if i < len(arrivals) else horizon
        if plan:
            starts = [e.busy_until_s, *plan[:-1]]
            k = sum(1 for st in starts if st < nxt)
            if k:
                record(e.advance_decode_run(k))
                del plan[:k]
            if not plan:
                continue
        elif e.has_work and e.busy_until_s < nxt:
            ends = e.decode_run_ends(e.busy_until_s) if fast else []
            if len(ends) >= 2:
                plan = ends
                runs += 1
            else:
                record(e.step(e.busy_until_s))
            continue
        if i >= len(arrivals):
            break
        t, p, m, tenant = arrivals[i]
        e.add_request(f"q{i}", p, m, t, tenant=tenant, output_tokens=max(1, m - (i % 7)))
        i += 1
        if plan and not e.decode_run_remains(len(plan)):
            plan = []  # the step in flight ended at busy_until_s; the next is a normal step
    return log, runs


@pytest.mark.parametrize("policy", ["fcfs", "priority", "vtc"])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("blocks", [130, 300])
def test_decode_runs_give_the_same_engine_as_single_steps(policy: str, seed: int, blocks: int) -> None:
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(300):
        t += rng.expovariate(40.0)
        arrivals.append((t, rng.randint(1, 300), rng.randint(1, 200), rng.choice("abc")))
    # few blocks: the queue's head often waits for blocks while the batch decodes
    over = {"scheduling_policy": policy, "num_gpu_blocks": blocks, "max_num_seqs": 24, "max_model_len": 2000}
    slow, fast = make_engine(seed=seed, **over), make_engine(seed=seed, **over)
    log_slow, _ = _drive(slow, arrivals, fast=False, horizon=t + 1e6)
    snap_slow = _snapshot(slow)
    log_fast, runs = _drive(fast, arrivals, fast=True, horizon=t + 1e6)
    assert runs > 3  # the fast path was taken
    # the fast engine reports only a run's last step: compare those steps and the final state
    by_end = {row[1]: row for row in log_slow}
    for row in log_fast:
        assert by_end[row[1]] == row
    assert _snapshot(fast) == snap_slow
    assert fast.stats.num_steps == slow.stats.num_steps == len(log_slow)


def test_advance_refuses_what_is_not_a_decode_run() -> None:
    e = make_engine()
    e.add_request("a", 100, 10, 0.0)
    with pytest.raises(ValueError, match="pure decode run"):
        e.advance_decode_run(2)
    assert e.decode_run_ends(0.0) == []  # prefill first
    np.testing.assert_equal(e.num_waiting, 1)


@pytest.mark.parametrize("policy", ["fcfs", "vtc"])
@pytest.mark.parametrize("seed", [4, 5, 6])
def test_preemption_on_arrays_equals_the_request_by_request_loop(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(250):
        t += rng.expovariate(60.0)
        arrivals.append((t, rng.randint(1, 400), rng.randint(1, 300), rng.choice("abc")))
    over = {"scheduling_policy": policy, "num_gpu_blocks": 130, "max_num_seqs": 32, "max_model_len": 2000,
            "long_prefill_token_threshold": 64 if seed % 2 else 0}
    loop, arrays = make_engine(seed=seed, **over), make_engine(seed=seed, **over)
    loop.vector_preemption = False
    log_loop, _ = _drive(loop, arrivals, fast=False, horizon=t + 1e6)
    log_arrays, _ = _drive(arrays, arrivals, fast=False, horizon=t + 1e6)
    assert loop.stats.num_preemptions > 20  # preemption was exercised
    assert log_arrays == log_loop
    assert _snapshot(arrays) == _snapshot(loop)
