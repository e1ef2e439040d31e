"""The engine model: vLLM V1 continuous batching over a paged KV cache, in any clock's time.

Pure: no asyncio, no clock, no I/O. Time is always an argument (``now``), so the server
drives it from the event loop's clock and experiments drive it in virtual time
(:meth:`Engine.run_until`), an hour of a fleet in seconds.

One :meth:`Engine.step` is one scheduler iteration followed by one model execution, as in
vLLM V1's ``Scheduler.schedule()``:

1. Running requests, oldest first, each get ``min(tokens not yet computed,
   long_prefill_token_threshold, remaining token budget)`` tokens (chunked prefill; one
   token for a decode). Blocks are allocated as sequences grow (``ceil(tokens /
   block_size)``); when the pool runs out, the newest running request (or, with priority
   scheduling, the one with the largest ``(priority, arrival)``) is preempted: its blocks
   are freed, it goes back to the front of the waiting queue and will recompute its
   prompt and output so far (recompute preemption).
2. If nothing was preempted, waiting requests are admitted in order (FCFS, by
   ``(priority, arrival)``, or by the Virtual Token Counter, see below) while the token
   budget, ``max_num_seqs`` and free blocks allow; the first that does not fit, or that
   arrives after the step starts, stops admission.
   Prompt blocks found in the prefix cache are not computed again.
3. The step lasts the profile's step time for what was scheduled
   (:class:`~tokenscaler.sim.profile.StepTimeModel`); every request whose computed tokens
   reach its known tokens samples one new token at the end of the step. A request ends
   when it has generated its output target: ``max_tokens`` (``finish_reason="length"``) or
   an earlier draw of the profile's output-length distribution (``"stop"``).

The running set lives in numpy arrays indexed by a stable slot, so a decode step costs a
few vector operations whatever the batch size; Python touches a request only when it is
admitted, produces its first token, is preempted or ends.

The waiting queue is one class per ``scheduling_policy`` (:mod:`tokenscaler.sim.request_queue`:
FCFS, priority, and the Virtual Token Counter of Sheng et al., OSDI 2024, over the tenants
named by ``add_request(tenant=...)``); with VTC, preemption picks the newest running request,
as FCFS does. Pure decode runs, virtual time's fast path (many steps at once, with the
numbers single steps give), are :mod:`tokenscaler.sim.decode_run`; the step time is the
profile's (:meth:`~tokenscaler.sim.profile.StepTimeModel.step_s`).

Invariants of every step (asserted by the tests): tokens scheduled <= ``max_num_batched_tokens``;
running <= ``max_num_seqs``; every running request holds ``ceil(computed / block_size)`` or
more blocks; blocks held + free == ``num_gpu_blocks``; a finished request generated
exactly its target.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Sequence

import numpy as np

from tokenscaler.sim.decode_run import NO_SEQ, DecodeRuns
from tokenscaler.sim.kv_cache import BlockPool
from tokenscaler.sim.profile import EngineProfile
from tokenscaler.sim.request import QueueFullError, Request, RequestStatus, StepResult
from tokenscaler.sim.request_queue import request_queue
from tokenscaler.sim.stats import EngineStats

__all__ = ["Engine", "QueueFullError", "Request", "RequestStatus", "StepResult"]


class Engine(DecodeRuns):
    """A simulated vLLM engine for one profile. See the module docstring for the model."""

    def __init__(self, profile: EngineProfile, *, seed: int = 0, max_num_queued_reqs: int | None = None) -> None:
        self.profile = profile
        self.max_num_queued_reqs = max_num_queued_reqs
        self.stats = EngineStats(max_model_len=profile.max_model_len)
        self._rng = random.Random(seed)
        self._bs = profile.block_size  # tokens per KV block
        self._budget = profile.max_num_batched_tokens  # tokens one step may compute
        self._thr = profile.long_prefill_token_threshold  # cap on one request's prefill chunk (0: none)
        self._max_seqs = profile.max_num_seqs
        self._priority = profile.scheduling_policy == "priority"
        self._vtc = profile.scheduling_policy == "vtc"
        self._waiting = request_queue(profile.scheduling_policy)
        self._caching = profile.enable_prefix_caching
        self._step_s = profile.step_time.step_s
        out = profile.output_length
        self._lognormal: tuple[float, float] | None = None
        if out.kind == "lognormal" and out.median_tokens is not None and out.sigma is not None:
            self._lognormal = (math.log(out.median_tokens), out.sigma)
        self._pool = BlockPool(profile.num_gpu_blocks)

        # Running requests live in slots: row s of every array below is the request in
        # self._slots[s]. Invariants per running slot: 0 <= _computed <= _total <= _target
        # (tokens whose KV exists <= prompt + tokens generated so far <= prompt + output
        # target), _blocks = KV blocks held = ceil(_computed / block size) or more. Schedulers
        # return ``nn``: (hi,) tokens to compute this step per slot (0: not scheduled;
        # nn <= _total - _computed; sum(nn) <= the step's token budget).
        cap = profile.max_num_seqs
        self._computed = np.zeros(cap, dtype=np.int64)
        self._total = np.zeros(cap, dtype=np.int64)
        self._prompt = np.zeros(cap, dtype=np.int64)
        self._target = np.zeros(cap, dtype=np.int64)
        self._blocks = np.zeros(cap, dtype=np.int64)
        self._seq = np.full(cap, NO_SEQ, dtype=np.int64)
        self._last_tok = np.zeros(cap, dtype=np.float64)
        self._tenant = np.zeros(cap, dtype=np.int64)  # VTC: the queue's index of the request's tenant
        self._slots: list[Request | None] = [None] * cap
        self._free_slots = list(range(cap))
        self._hi = 0  # slots >= _hi are free
        self._next_seq = 0
        self._num_running = 0

        self._requests: dict[str, Request] = {}
        self._busy_until = 0.0
        # the last pure decode run's step ends, valid while (busy_until, num_steps) match and
        # nothing was added or aborted: (busy_until_s, num_steps, ends)
        self._run_cache: tuple[float, int, list[float]] | None = None

    # ---- state -------------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        """KV cache capacity: ``num_gpu_blocks * block_size`` tokens."""
        return self.profile.kv_capacity_tokens

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by live requests, 0 to 1."""
        return self._pool.usage

    @property
    def free_blocks(self) -> int:
        return self._pool.free

    @property
    def has_work(self) -> bool:
        return bool(self._requests)

    @property
    def busy_until_s(self) -> float:
        """End of the last step; the next step starts no earlier."""
        return self._busy_until

    def slot_tokens(self, slot: int) -> int:
        """Prompt plus generated tokens of the request running in ``slot`` (:class:`SlotTokens`)."""
        return int(self._total[slot])

    def get(self, request_id: str) -> Request | None:
        """A live (waiting or running) request."""
        return self._requests.get(request_id)

    # ---- requests in and out -----------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        now: float,
        *,
        priority: int = 0,
        block_hashes: Sequence[int] = (),
        min_tokens: int = 0,
        ignore_eos: bool = False,
        tenant: str = "",
        output_tokens: int | None = None,
    ) -> Request:
        """Queue a request; it may generate up to ``max_tokens`` tokens. ``tenant`` names
        whom it is served for (the VTC policy's counters); ``output_tokens`` replaces the
        profile's output-length draw (a replayed trace knows when each request stopped).

        Raises :class:`QueueFullError` when ``max_num_queued_reqs`` requests already wait,
        ``ValueError`` for a duplicate id or lengths outside ``1 <= prompt``,
        ``1 <= max_tokens`` and ``prompt + max_tokens <= max_model_len``.
        """
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if prompt_tokens < 1 or max_tokens < 1 or prompt_tokens + max_tokens > self.profile.max_model_len:
            raise ValueError(
                f"prompt_tokens ({prompt_tokens}) and max_tokens ({max_tokens}) must be >= 1 with a sum "
                f"<= max_model_len ({self.profile.max_model_len})"
            )
        if self.max_num_queued_reqs is not None and len(self._waiting) >= self.max_num_queued_reqs:
            self.stats.admission_rejections["max_num_queued_reqs"] += 1
            raise QueueFullError(
                f"the waiting queue is full (max_num_queued_reqs={self.max_num_queued_reqs})"
            )
        if output_tokens is not None and output_tokens < max_tokens:
            target, reason = max(1, output_tokens, min_tokens), "stop"
        elif output_tokens is not None:
            target, reason = max_tokens, "length"
        else:
            target, reason = self._output_target(max_tokens, min_tokens, ignore_eos)
        req = Request(
            self, request_id, prompt_tokens, max_tokens, target, reason, priority, now, tuple(block_hashes)
        )
        req.tenant = tenant
        self._run_cache = None
        if not self._requests:  # idle: the next step starts when this request arrives
            self._busy_until = max(self._busy_until, now)
        self._requests[request_id] = req
        self.stats.request_params_max_tokens.observe(max_tokens)
        self._waiting.add(req)
        return req

    def _output_target(self, max_tokens: int, min_tokens: int, ignore_eos: bool) -> tuple[int, str]:
        if self._lognormal is None:
            return max_tokens, "length"
        mu, sigma = self._lognormal
        stop_after = max(1, min_tokens, round(self._rng.lognormvariate(mu, sigma)))
        if ignore_eos or stop_after >= max_tokens:
            return max_tokens, "length"
        return stop_after, "stop"

    def abort(self, request_id: str, now: float) -> Request | None:
        """End a live request with ``finish_reason="abort"``, freeing its blocks."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        self._run_cache = None
        self._finish(req, "abort", now)
        self._shrink_hi()
        return req

    def vtc_counters(self) -> dict[str, float]:
        """Each tenant's virtual token counter (VTC policy; generated tokens included)."""
        return self._waiting.counters()

    # ---- slots -------------------------------------------------------------------------

    def _take_slot(self, req: Request) -> int:
        slot = heapq.heappop(self._free_slots)
        self._slots[slot] = req
        if slot >= self._hi:
            self._hi = slot + 1
        self._num_running += 1
        req.slot = slot
        req.status = RequestStatus.RUNNING
        return slot

    def _leave_running(self, req: Request) -> None:
        """Sync ``req`` from its slot, free its blocks and its slot."""
        s = req.slot
        req.num_tokens = int(self._total[s])
        if req.first_token_s is not None:
            req.last_token_s = float(self._last_tok[s])
        self._pool.release(req.held, int(self._blocks[s]) - len(req.held))
        req.held = []
        req.num_registered = 0
        for arr in (self._computed, self._total, self._prompt, self._target, self._blocks):
            arr[s] = 0
        self._seq[s] = NO_SEQ
        self._slots[s] = None
        heapq.heappush(self._free_slots, s)
        self._num_running -= 1
        req.slot = -1

    def _shrink_hi(self) -> None:
        while self._hi and self._slots[self._hi - 1] is None:
            self._hi -= 1

    def _preempt(self, slot: int) -> Request:
        req = self._slots[slot]
        assert req is not None
        self._leave_running(req)
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self._waiting.prepend(req)
        return req

    def _finish(self, req: Request, reason: str, now: float) -> None:
        if req.slot >= 0:
            self._leave_running(req)
        elif req.status is RequestStatus.WAITING:
            self._waiting.discard(req)  # removed lazily from the queue
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finished_s = now
        del self._requests[req.request_id]
        st = self.stats
        st.request_success[reason] += 1
        if reason == "abort" or req.first_token_s is None or req.scheduled_s is None:
            return
        last = req.last_token_s if req.last_token_s is not None else now
        out = req.num_tokens - req.prompt_tokens
        st.e2e_request_latency.observe(now - req.arrival_s)
        st.request_queue_time.observe(req.scheduled_s - req.arrival_s)
        st.request_prefill_time.observe(req.first_token_s - req.scheduled_s)
        st.request_decode_time.observe(last - req.first_token_s)
        st.request_inference_time.observe(last - req.scheduled_s)
        st.request_prompt_tokens.observe(req.prompt_tokens)
        st.request_generation_tokens.observe(out)
        st.request_max_num_generation_tokens.observe(out)
        if out > 1:
            st.request_time_per_output_token.observe((last - req.first_token_s) / (out - 1))

    # ---- one step ----------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Schedule and execute one iteration starting at ``max(now, busy_until_s)``."""
        start = now if now > self._busy_until else self._busy_until
        preempted: list[Request] = []
        nn = self._schedule(start, preempted)
        if preempted and not nn.any():
            # Every running request was preempted or stopped behind a self-preemption: vLLM
            # runs an empty step and schedules the waiting queue next; do that now.
            nn = self._schedule(start, preempted)
        if not nn.any() and len(self._waiting) and not self._num_running:
            # Nothing runs and the next request arrives after ``start``: the step starts then.
            start = max(start, self._waiting.peek().arrival_s)
            nn = self._schedule(start, preempted)
        hi = nn.size
        sched = nn > 0
        num_reqs = int(np.count_nonzero(sched))
        if num_reqs == 0:
            self._shrink_hi()
            return StepResult(start, start, 0, 0, 0, 0, [], [], preempted)

        comp, tot = self._computed[:hi], self._total[:hi]
        prompt, last_tok = self._prompt[:hi], self._last_tok[:hi]
        comp += nn
        num_tokens = int(nn.sum())
        prefill_tokens = int(nn[nn > 1].sum())
        end = start + self._step_s(num_reqs, int(comp[sched].sum()), prefill_tokens)
        if self._caching:
            self._register_prompt_blocks(np.flatnonzero(sched & (comp - nn < prompt)))

        gen = sched & (comp == tot)
        first = gen & (tot == prompt)
        tot += gen
        num_gen = int(np.count_nonzero(gen))
        if self._vtc and num_gen:
            self._waiting.charge_generated(self._tenant[:hi][gen], 1.0)
        st = self.stats
        later = gen & ~first
        if num_gen > len(first_idx := np.flatnonzero(first)):
            st.inter_token_latency.observe_many(end - last_tok[later])
        last_tok[gen] = end

        first_token: list[Request] = []
        prompt_counted = 0
        for s in first_idx.tolist():
            req = self._slots[s]
            assert req is not None
            req.first_token_s = end
            first_token.append(req)
            prompt_counted += req.prompt_tokens
            st.time_to_first_token.observe(end - req.arrival_s)
        st.prompt_tokens += prompt_counted
        st.generation_tokens += num_gen
        st.iteration_tokens.observe(prompt_counted + num_gen)
        st.num_steps += 1

        finished: list[Request] = []
        for s in np.flatnonzero(gen & (tot >= self._target[:hi])).tolist():
            req = self._slots[s]
            assert req is not None
            req.last_token_s = end
            self._finish(req, req.target_reason, end)
            finished.append(req)
        self._shrink_hi()
        self._busy_until = end
        return StepResult(
            start, end, num_reqs, num_tokens, prefill_tokens, num_gen, first_token, finished, preempted
        )

    def _schedule(self, now: float, preempted: list[Request]) -> np.ndarray:
        """Tokens per slot for this step (running requests first, then admissions)."""
        budget = self._budget
        hi = self._hi
        preempted_before = len(preempted)
        nn = self._total[:hi] - self._computed[:hi]
        if hi:
            if self._thr:
                np.minimum(nn, self._thr, out=nn)
            if int(nn.sum()) > budget:
                nn = self._fit_budget(nn, budget)
            comp, blk = self._computed[:hi], self._blocks[:hi]
            need = (comp + nn + (self._bs - 1)) // self._bs - blk
            np.maximum(need, 0, out=need)
            total_need = int(need.sum())
            if total_need <= self._pool.free:
                blk += need
                self._pool.allocate(total_need)
            else:
                nn = self._schedule_running_with_preemption(budget, preempted)
            budget -= int(nn.sum())
        if (
            len(preempted) == preempted_before
            and len(self._waiting)
            and budget > 0
            and self._num_running < self._max_seqs
        ):
            nn = self._admit_waiting(nn, budget, now)
        return nn

    def run_until(self, until_s: float, on_step: Callable[[StepResult], object] | None = None) -> int:
        """Virtual time: run every step that starts before ``until_s``; returns how many ran."""
        n = 0
        while self._requests and self._busy_until < until_s:
            result = self.step(self._busy_until)
            if result.num_requests == 0:  # cannot happen while a request waits: max_model_len fits the cache
                raise RuntimeError(
                    f"engine stalled with {len(self._requests)} requests at {self._busy_until}"
                )
            n += 1
            if on_step is not None:
                on_step(result)
        return n

    def _fit_budget(self, nn: np.ndarray, budget: int) -> np.ndarray:
        """Give the budget to running requests oldest first (a request may get part of its want)."""
        order = np.argsort(self._seq[: nn.size], kind="stable")
        want = nn[order]
        before = np.cumsum(want) - want
        out = np.empty_like(nn)
        out[order] = np.clip(budget - before, 0, want)
        return out

    vector_preemption = True  # False: always the request-by-request loop (the tests compare both)

    def _schedule_running_with_preemption(self, budget: int, preempted: list[Request]) -> np.ndarray:
        """vLLM's running loop when blocks run short: allocate in order, preempt the newest.

        FCFS without shared prefix blocks in the batch is computed on arrays (the same outcome
        as :meth:`_preemption_loop`, which handles every case): requests oldest first take
        ``min(want, budget left)`` tokens; request ``i`` needs the blocks of the first ``i``
        and itself, which the free blocks plus those of the ``p`` newest (preempted) must
        cover; the loop ends where the newest left would be request ``i`` itself.
        """
        hi, slots = self._hi, self._slots
        if (
            not self.vector_preemption
            or self._priority
            or (self._caching and self._pool.num_cached_blocks and any(r is not None and r.held for r in slots[:hi]))
        ):
            return self._preemption_loop(budget, preempted)
        occ = np.flatnonzero(self._seq[:hi] != NO_SEQ)
        order = occ[np.argsort(self._seq[occ], kind="stable")]
        m = int(order.size)
        comp, blk = self._computed[order], self._blocks[order]
        want = self._total[order] - comp
        if self._thr:
            np.minimum(want, self._thr, out=want)
        n = np.clip(budget - (np.cumsum(want) - want), 0, want)
        bs = self._bs
        need = np.where(n > 0, np.maximum((comp + n + (bs - 1)) // bs - blk, 0), 0)
        cum_need = np.cumsum(need)
        released = np.concatenate(([0], np.cumsum(blk[::-1])))  # by preempting the p newest
        p = np.searchsorted(released, cum_need - self._pool.free, side="left")
        stop = np.flatnonzero(p >= m - np.arange(m))
        first = int(stop[0]) if stop.size else m  # requests [first, m) are preempted, newest first
        for s in order[first:][::-1].tolist():
            preempted.append(self._preempt(s))
        kept = order[:first]
        self._pool.allocate(int(cum_need[first - 1]) if first else 0)
        self._blocks[kept] += need[:first]
        nn = np.zeros(hi, dtype=np.int64)
        nn[kept] = n[:first]
        return nn

    def _preemption_loop(self, budget: int, preempted: list[Request]) -> np.ndarray:
        """vLLM's running loop, one request at a time (priority victims, shared prefix blocks)."""
        hi = self._hi
        blk, bs, pool, thr, slots = self._blocks, self._bs, self._pool, self._thr, self._slots
        # plain lists: this loop touches every running request one by one
        comp_l, tot_l, blk_l, seq_l = (a[:hi].tolist() for a in (self._computed, self._total, blk, self._seq))
        running = sorted((s for s in range(hi) if slots[s] is not None), key=seq_l.__getitem__)
        scheduled: dict[int, int] = {}
        i = 0
        while i < len(running):
            s = running[i]
            n = tot_l[s] - comp_l[s]
            if thr:
                n = min(n, thr)
            n = min(n, budget)
            if n <= 0:
                i += 1
                continue
            ok = True
            while True:
                need = max(0, -(-(comp_l[s] + n) // bs) - blk_l[s])
                if need <= pool.free:
                    pool.allocate(need)
                    blk_l[s] += need
                    blk[s] = blk_l[s]
                    break
                if self._priority:
                    victim = self._victim(running)
                    vi = running.index(victim)
                else:
                    vi = len(running) - 1
                    victim = running[vi]
                running.pop(vi)
                if vi < i:
                    i -= 1
                budget += scheduled.pop(victim, 0)
                preempted.append(self._preempt(victim))
                if victim == s:
                    ok = False
                    break
            if not ok:
                break
            scheduled[s] = n
            budget -= n
            i += 1
        nn = np.zeros(hi, dtype=np.int64)
        for s, n in scheduled.items():
            nn[s] = n
        return nn

    def _victim(self, running: list[int]) -> int:
        if self._priority:
            # vLLM: max (priority, arrival); ties go to the newest admission, as FCFS does.
            slots, seq = self._slots, self._seq

            def order(s: int) -> tuple[int, float, int]:
                req = slots[s]
                assert req is not None  # a running slot holds its request
                return req.priority, req.arrival_s, int(seq[s])

            return max(running, key=order)
        return running[-1]

    def _admit_waiting(self, nn: np.ndarray, budget: int, now: float) -> np.ndarray:
        bs, pool, st, waiting = self._bs, self._pool, self.stats, self._waiting
        admitted: list[tuple[int, int]] = []
        while budget > 0 and len(waiting) and self._num_running < self._max_seqs:
            req = waiting.peek()
            if req.arrival_s > now:  # it arrives during this step: the next one can take it
                break
            total = req.num_tokens
            hits = evictable = 0
            if self._caching and req.block_hashes:
                hits, evictable = pool.lookup(req.block_hashes, (total - 1) // bs)
            computed = hits * bs
            n = total - computed
            if self._thr:
                n = min(n, self._thr)
            n = min(n, budget)
            new_blocks = -(-(computed + n) // bs) - hits
            if new_blocks + evictable > pool.free:
                break
            waiting.pop()
            held = list(req.block_hashes[:hits])
            pool.touch(held)
            pool.allocate(new_blocks)
            s = self._take_slot(req)
            req.held = held
            req.num_registered = hits
            self._computed[s] = computed
            self._total[s] = total
            self._prompt[s] = req.prompt_tokens
            self._target[s] = req.prompt_tokens + req.output_target
            self._blocks[s] = hits + new_blocks
            self._seq[s] = self._next_seq
            self._next_seq += 1
            if self._vtc:
                self._tenant[s] = self._waiting.tenant_index(req.tenant)
            self._last_tok[s] = req.last_token_s if req.last_token_s is not None else 0.0
            if req.scheduled_s is None:
                req.scheduled_s = now
                req.num_cached_tokens = computed
                if self._caching:
                    st.prefix_cache_queries += total
                    st.prefix_cache_hits += computed
            admitted.append((s, n))
            budget -= n
        if not admitted:
            return nn
        out = np.zeros(self._hi, dtype=np.int64)
        out[: nn.size] = nn
        for s, n in admitted:
            out[s] = n
        return out

    def _register_prompt_blocks(self, slots: np.ndarray) -> None:
        """Offer prompt blocks that became full this step to the prefix cache."""
        bs, pool = self._bs, self._pool
        for s in slots.tolist():
            req = self._slots[s]
            assert req is not None
            hashes = req.block_hashes
            upto = min(len(hashes), int(self._computed[s]) // bs)
            for i in range(req.num_registered, upto):
                if pool.register(hashes[i]):
                    req.held.append(hashes[i])
            req.num_registered = max(req.num_registered, upto)

    # ---- checks (tests) ----------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the engine's bookkeeping invariants (used by the tests after every step)."""
        bs = self._bs
        running = [r for r in self._slots if r is not None]
        assert len(running) == self._num_running <= self._max_seqs
        private = 0
        for r in running:
            s = r.slot
            assert self._slots[s] is r and r.status is RequestStatus.RUNNING
            assert int(self._blocks[s]) >= -(-int(self._computed[s]) // bs)
            assert int(self._computed[s]) <= int(self._total[s]) <= int(self._target[s])
            private += int(self._blocks[s]) - len(r.held)
        assert all(self._slots[s] is None for s in range(self._hi, len(self._slots)))
        self._pool.check(private)
        waiting = [r for r in self._requests.values() if r.status is RequestStatus.WAITING]
        assert len(waiting) == len(self._waiting)
        assert len(waiting) + len(running) == len(self._requests)
