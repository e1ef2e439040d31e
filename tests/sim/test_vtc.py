"""The Virtual Token Counter scheduling policy of the simulated engine."""

from __future__ import annotations

from tests.sim.builders import make_engine, run_all


def test_vtc_serves_the_tenant_with_the_least_service_first() -> None:
    # one sequence at a time, so the admission order is the whole story
    engine = make_engine("demo", scheduling_policy="vtc", max_num_seqs=1)
    for i in range(6):
        engine.add_request(f"heavy-{i}", 64, 32, 0.0, tenant="heavy")
    engine.add_request("light-0", 64, 32, 0.001, tenant="light")
    engine.add_request("light-1", 64, 32, 0.002, tenant="light")
    order = [r.request_id for res in run_all(engine) for r in res.finished]
    # FCFS would finish every heavy request first; VTC interleaves as soon as light arrives
    assert order.index("light-0") <= 2 and order.index("light-1") <= 4
    counters = engine.vtc_counters()
    assert counters["heavy"] > counters["light"] > 0


def test_vtc_lifts_a_returning_tenant_no_banked_credit() -> None:
    engine = make_engine("demo", scheduling_policy="vtc", max_num_seqs=1)
    for i in range(4):
        engine.add_request(f"a-{i}", 64, 16, 0.0, tenant="a")
    run_all(engine)
    engine.add_request("a-late", 64, 16, 100.0, tenant="a")
    engine.add_request("b-0", 64, 16, 100.0, tenant="b")
    # b is new: lifted to a's counter (no credit from having been idle), ties by name -> a first
    order = [r.request_id for res in run_all(engine) for r in res.finished]
    assert order == ["a-late", "b-0"]
    counters = engine.vtc_counters()
    assert counters["b"] >= counters["a"] - 64 - 2 * 16 - 1
