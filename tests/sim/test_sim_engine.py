"""The engine model in virtual time: continuous batching, chunked prefill, paged KV, preemption."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sim.builders import make_engine, make_profile, run_all
from tokenscaler.sim.engine import Engine, QueueFullError, RequestStatus
from tokenscaler.sim.profile import load_profile
from tokenscaler.sim.prompt import block_hashes


def test_prefill_then_one_token_per_step() -> None:
    engine = make_engine()
    req = engine.add_request("a", 100, 5, now=0.0)
    first = engine.step(0.0)
    assert (first.num_tokens, first.num_generated_tokens, first.first_token) == (100, 1, [req])
    rest = run_all(engine)
    assert [r.num_tokens for r in rest] == [1, 1, 1, 1]
    assert rest[-1].finished == [req]
    assert (req.output_tokens, req.finish_reason, req.status) == (5, "length", RequestStatus.FINISHED)
    assert req.first_token_s == first.end_s and req.finished_s == rest[-1].end_s
    assert engine.stats.prompt_tokens == 100 and engine.stats.generation_tokens == 5
    assert engine.stats.request_success["length"] == 1
    assert engine.kv_cache_usage == 0.0 and engine.free_blocks == engine.profile.num_gpu_blocks


def test_steps_follow_each_other_and_idle_engine_starts_at_arrival() -> None:
    engine = make_engine()
    engine.add_request("a", 10, 3, now=0.0)
    results = run_all(engine)
    for prev, nxt in itertools.pairwise(results):
        assert nxt.start_s == prev.end_s
    engine.add_request("b", 10, 1, now=100.0)
    (late,) = run_all(engine)
    assert late.start_s == 100.0


def test_a_request_is_never_scheduled_before_it_arrives() -> None:
    engine = make_engine()
    engine.add_request("a", 10, 3, now=0.0)
    first = engine.step(0.0)
    late = engine.add_request("late", 10, 2, now=first.end_s + 0.01)  # arrives after step 2 would start
    second = engine.step(first.end_s)  # a server catching up chains steps on the model's clock
    assert second.start_s == first.end_s and second.num_requests == 1 and late.scheduled_s is None
    third = engine.step(second.end_s)
    assert late.scheduled_s == third.start_s >= late.arrival_s
    # once nothing runs, the next step starts when the next request arrives
    run_all(engine)
    engine.add_request("last", 10, 1, now=engine.busy_until_s)
    future = engine.add_request("future", 10, 1, now=engine.busy_until_s + 5.0)  # added while busy
    results = run_all(engine)
    assert [r.num_requests for r in results] == [1, 1]
    assert results[1].start_s == future.arrival_s == future.scheduled_s


def test_chunked_prefill_splits_a_long_prompt_by_the_token_budget() -> None:
    engine = make_engine(max_num_batched_tokens=256, max_num_seqs=16)
    req = engine.add_request("a", 600, 2, now=0.0)
    results = run_all(engine)
    assert [r.num_tokens for r in results] == [256, 256, 88, 1]
    assert results[2].first_token == [req]


def test_long_prefill_threshold_lets_decodes_through() -> None:
    engine = make_engine(max_num_batched_tokens=512, long_prefill_token_threshold=64)
    short = engine.add_request("short", 8, 20, now=0.0)
    engine.add_request("long", 1000, 1, now=0.0)
    results = run_all(engine)
    assert all(r.num_tokens <= 64 + 1 for r in results[1:])
    assert short.first_token_s == results[0].end_s


def test_running_is_capped_by_max_num_seqs() -> None:
    engine = make_engine(max_num_seqs=16)
    for i in range(20):
        engine.add_request(str(i), 10, 50, now=0.0)
    engine.step(0.0)
    assert (engine.num_running, engine.num_waiting) == (16, 4)
    run_all(engine)
    assert engine.stats.request_success["length"] == 20


def test_blocks_are_allocated_as_sequences_grow() -> None:
    engine = make_engine()
    free0 = engine.free_blocks
    engine.add_request("a", 16, 20, now=0.0)
    engine.step(0.0)  # prompt computed: 16 tokens, one block; the first output token is not yet in the cache
    assert engine.free_blocks == free0 - 1
    engine.step(0.0)  # token 17 is computed: a second block
    assert engine.free_blocks == free0 - 2
    for _ in range(15):
        engine.step(0.0)  # tokens 18..32 fit the second block
    assert engine.free_blocks == free0 - 2
    engine.step(0.0)
    assert engine.free_blocks == free0 - 3
    assert engine.kv_cache_usage == pytest.approx(3 / engine.profile.num_gpu_blocks)


def test_out_of_blocks_preempts_the_newest_request_which_recomputes() -> None:
    # 20 blocks (320 tokens): three requests of 96 + 100 tokens need 13 blocks each at the end.
    engine = make_engine(num_gpu_blocks=20, max_model_len=320)
    reqs = [engine.add_request(name, 96, 100, now=0.0) for name in "abc"]
    results = run_all(engine)
    preempted = [r for res in results for r in res.preempted]
    assert preempted and preempted[0] is reqs[2]
    assert engine.stats.num_preemptions == len(preempted)
    assert all(r.output_tokens == 100 and r.finish_reason == "length" for r in reqs)
    assert reqs[2].num_preemptions >= 1
    assert max(r.num_tokens for r in results) > 100  # a resumed request recomputes prompt + output
    assert engine.kv_cache_usage == 0.0


def test_preempted_request_goes_back_to_the_front_of_the_queue() -> None:
    engine = make_engine(num_gpu_blocks=20, max_model_len=320, max_num_seqs=2)
    _, b, c = (engine.add_request(name, 96, 100, now=0.0) for name in "abc")
    results = run_all(engine)
    assert b.num_preemptions >= 1
    assert c.scheduled_s is not None and b.finished_s is not None
    assert b.finished_s <= c.finished_s  # b resumed before c was ever admitted after it
    assert any(b in r.preempted for r in results)


def test_priority_policy_admits_lower_priority_values_first() -> None:
    engine = make_engine(scheduling_policy="priority", max_num_seqs=1)
    low = engine.add_request("low", 10, 2, now=0.0, priority=5)
    high = engine.add_request("high", 10, 2, now=0.1, priority=-1)
    run_all(engine)
    assert high.finished_s is not None and low.scheduled_s is not None
    assert high.finished_s <= low.scheduled_s


def test_priority_policy_preempts_the_lowest_priority_not_the_newest() -> None:
    engine = make_engine(scheduling_policy="priority", num_gpu_blocks=20, max_model_len=320)
    background = engine.add_request("background", 96, 100, now=0.0, priority=10)
    # two urgent requests end at 136 tokens (9 blocks each) and fit together; all three do not
    urgent = [engine.add_request(f"u{i}", 96, 40, now=0.001, priority=0) for i in range(2)]
    results = run_all(engine)
    first_victim = next(r for res in results for r in res.preempted)
    assert first_victim is background
    assert all(u.num_preemptions == 0 for u in urgent)


def test_abort_frees_blocks_of_running_and_waiting_requests() -> None:
    engine = make_engine(max_num_seqs=1)
    running = engine.add_request("run", 100, 50, now=0.0)
    waiting = engine.add_request("wait", 100, 50, now=0.0)
    engine.step(0.0)
    assert engine.free_blocks < engine.profile.num_gpu_blocks
    assert engine.abort("run", now=1.0) is running
    assert engine.abort("wait", now=1.0) is waiting
    assert engine.abort("unknown", now=1.0) is None
    assert (running.finish_reason, waiting.finish_reason) == ("abort", "abort")
    assert engine.free_blocks == engine.profile.num_gpu_blocks
    assert (engine.num_running, engine.num_waiting, engine.has_work) == (0, 0, False)
    assert engine.stats.request_success["abort"] == 2
    engine.check_invariants()


def test_a_full_waiting_queue_rejects_and_counts() -> None:
    engine = make_engine(max_num_queued_reqs=2)
    engine.add_request("a", 10, 5, now=0.0)
    engine.add_request("b", 10, 5, now=0.0)
    with pytest.raises(QueueFullError, match="max_num_queued_reqs=2"):
        engine.add_request("c", 10, 5, now=0.0)
    assert engine.stats.admission_rejections["max_num_queued_reqs"] == 1
    engine.step(0.0)  # both admitted: the queue has room again
    engine.add_request("c", 10, 5, now=0.0)


@pytest.mark.parametrize(
    ("prompt", "max_tokens"),
    [
        pytest.param(0, 5, id="empty-prompt"),
        pytest.param(10, 0, id="zero-max-tokens"),
        pytest.param(2000, 49, id="over-max-model-len"),
    ],
)
def test_add_request_rejects_impossible_lengths(prompt: int, max_tokens: int) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine().add_request("a", prompt, max_tokens, now=0.0)


def test_output_lengths_are_drawn_from_the_profile_seeded() -> None:
    lognormal = {"kind": "lognormal", "median_tokens": 20, "sigma": 0.8}

    def targets(seed: int) -> list[tuple[int, str]]:
        engine = make_engine(seed=seed, output_length=lognormal)
        reqs = [engine.add_request(str(i), 10, 40, now=0.0) for i in range(200)]
        run_all(engine, check=False)
        assert all(r.output_tokens == r.output_target for r in reqs)
        return [(r.output_tokens, r.finish_reason or "") for r in reqs]

    a, b, c = targets(1), targets(1), targets(2)
    assert a == b and a != c
    reasons = {reason for _, reason in a}
    assert reasons == {"stop", "length"}
    assert all(n < 40 for n, reason in a if reason == "stop")
    assert all(n == 40 for n, reason in a if reason == "length")


def test_ignore_eos_and_min_tokens_bound_the_draw() -> None:
    engine = make_engine(output_length={"kind": "lognormal", "median_tokens": 2, "sigma": 0.1})
    eos = engine.add_request("eos", 10, 30, now=0.0)
    ignore = engine.add_request("ignore", 10, 30, now=0.0, ignore_eos=True)
    at_least = engine.add_request("min", 10, 30, now=0.0, min_tokens=12)
    run_all(engine)
    assert (eos.output_tokens, eos.finish_reason) == (2, "stop")
    assert (ignore.output_tokens, ignore.finish_reason) == (30, "length")
    assert (at_least.output_tokens, at_least.finish_reason) == (12, "stop")


def test_prefix_cache_reuses_blocks_of_a_shared_prompt_prefix() -> None:
    engine = make_engine()
    bs = engine.profile.block_size
    shared = b"s" * (4 * 100)  # 100 tokens: 6 full blocks
    a = engine.add_request("a", 100, 3, now=0.0, block_hashes=block_hashes(shared, bs))
    run_all(engine)
    b = engine.add_request("b", 130, 3, now=1.0, block_hashes=block_hashes(shared + b"t" * 120, bs))
    first = engine.step(1.0)
    assert b.num_cached_tokens == 6 * bs and a.num_cached_tokens == 0
    assert first.num_tokens == 130 - 6 * bs
    assert engine.stats.prefix_cache_hits == 6 * bs
    assert engine.stats.prefix_cache_queries == 100 + 130
    run_all(engine)
    assert b.output_tokens == 3


def test_identical_concurrent_prompts_share_cached_blocks() -> None:
    engine = make_engine()
    hashes = block_hashes(b"p" * 4 * 64, engine.profile.block_size)  # 4 blocks
    engine.add_request("a", 64, 40, now=0.0, block_hashes=hashes)
    engine.step(0.0)
    used_one = engine.profile.num_gpu_blocks - engine.free_blocks
    engine.add_request("b", 64, 40, now=0.0, block_hashes=hashes)
    engine.step(0.0)
    used_two = engine.profile.num_gpu_blocks - engine.free_blocks
    assert used_two < 2 * used_one + 2  # b holds a's three cached prompt blocks instead of its own
    engine.check_invariants()
    run_all(engine)


def test_cached_blocks_are_evicted_when_space_is_needed() -> None:
    engine = make_engine(num_gpu_blocks=130, max_model_len=2048)
    bs = engine.profile.block_size
    engine.add_request("a", 1024, 1, now=0.0, block_hashes=block_hashes(b"a" * 4096, bs))
    run_all(engine)
    assert engine.free_blocks == 130  # cached but evictable blocks count as free
    c = engine.add_request("c", 2000, 1, now=1.0, block_hashes=block_hashes(b"c" * 8000, bs))
    run_all(engine)
    assert c.output_tokens == 1
    again = engine.add_request("a2", 1024, 1, now=2.0, block_hashes=block_hashes(b"a" * 4096, bs))
    run_all(engine)
    assert again.num_cached_tokens < 1024 - bs  # most of a's blocks were evicted for c


def test_run_until_simulates_virtual_time_without_a_clock() -> None:
    engine = Engine(load_profile("llama-3.1-8b-h100"))
    for i in range(50):
        engine.add_request(str(i), 500, 200, now=0.0, ignore_eos=True)
    steps = engine.run_until(1.0)
    assert steps > 0 and engine.busy_until_s >= 1.0
    engine.run_until(3600.0)
    assert not engine.has_work and engine.stats.request_success["length"] == 50


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"), st.integers(1, 600), st.integers(1, 300), st.integers(-2, 2), st.booleans()
        ),
        st.tuples(st.just("abort"), st.integers(0, 60)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    max_size=60,
)


@settings(max_examples=60)
@given(
    ops=_ops, policy=st.sampled_from(["fcfs", "priority"]), caching=st.booleans(), blocks=st.integers(40, 200)
)
def test_invariants_hold_for_any_sequence_of_arrivals_aborts_and_steps(
    ops: list[tuple], policy: str, caching: bool, blocks: int
) -> None:
    engine = make_engine(
        num_gpu_blocks=blocks,
        max_model_len=640,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        scheduling_policy=policy,
        enable_prefix_caching=caching,
        output_length={"kind": "lognormal", "median_tokens": 30, "sigma": 1.0},
    )
    prefixes = [b"x" * 4 * 200, b"y" * 4 * 200]
    added = []
    for op in ops:
        if op[0] == "add":
            _, prompt, out, priority, shared = op
            out = min(out, 640 - prompt)
            stream = prefixes[prompt % 2][: 4 * prompt] if shared else bytes(4 * prompt)
            hashes = block_hashes(stream, 16) if shared else ()
            added.append(
                engine.add_request(
                    str(len(added)), prompt, out, now=engine.busy_until_s,
                    priority=priority if policy == "priority" else 0, block_hashes=hashes,
                )
            )  # fmt: skip
        elif op[0] == "abort" and added:
            engine.abort(added[op[1] % len(added)].request_id, now=engine.busy_until_s)
        else:
            for _ in range(op[1]):
                if engine.has_work:
                    result = engine.step(engine.busy_until_s)
                    assert result.num_tokens <= 256
                    engine.check_invariants()
        engine.check_invariants()
    run_all(engine)
    assert engine.free_blocks == blocks
    for req in added:
        assert req.finished
        if req.finish_reason != "abort":
            assert req.output_tokens == req.output_target
            assert req.finish_reason == req.target_reason
    stats = engine.stats
    assert sum(stats.request_success.values()) == len(added)
    assert stats.generation_tokens >= sum(r.output_tokens for r in added if r.finish_reason != "abort")


def test_profile_override_names_the_offending_values() -> None:
    with pytest.raises(ValueError, match=r"max_model_len \(8192\) must be <= KV capacity"):
        make_profile(max_model_len=8192)
