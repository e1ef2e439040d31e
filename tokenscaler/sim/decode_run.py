"""Pure decode runs: virtual time's fast path through the engine, many steps at once.

A *pure decode run* is a stretch of steps in which every running request decodes one token
per step and nothing else happens: nothing is admitted (nothing waits, the waiting queue's
head cannot fit, or ``max_num_seqs`` run), no block runs short and no request ends before the
run's last step. Each step of such a run is determined by the state before it (the same
requests, context growing by one token each, a new block where a sequence crosses a block
boundary), so the experiments' runner asks for the run's step ends
(:meth:`DecodeRuns.decode_run_ends`) and executes it in one call
(:meth:`DecodeRuns.advance_decode_run`), with exactly the state, statistics and result that
stepping one at a time gives (``tests/sim/test_decode_runs.py``): the step time is the
profile's formula on the run's contexts, accumulated in order.

:class:`DecodeRuns` is a part of :class:`~tokenscaler.sim.engine.Engine`: it reads the
engine's running set (the slot arrays declared below) and changes it only in
:meth:`~DecodeRuns.advance_decode_run`.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import numpy as np

from tokenscaler.sim.kv_cache import BlockPool
from tokenscaler.sim.profile import EngineProfile
from tokenscaler.sim.request import Request, StepResult
from tokenscaler.sim.request_queue import RequestQueue
from tokenscaler.sim.stats import EngineStats

NO_SEQ = np.iinfo(np.int64).max
"""The admission sequence number of a free slot."""


class DecodeRuns:
    """The engine's fast path for pure decode runs (see the module docstring)."""

    # the engine's state this part reads (set by Engine.__init__; see there)
    profile: EngineProfile
    stats: EngineStats
    _budget: int
    _bs: int
    _thr: int
    _max_seqs: int
    _caching: bool
    _vtc: bool
    _pool: BlockPool
    _waiting: RequestQueue
    _slots: list[Request | None]
    _hi: int
    _num_running: int
    _busy_until: float
    _computed: np.ndarray
    _total: np.ndarray
    _prompt: np.ndarray
    _target: np.ndarray
    _blocks: np.ndarray
    _seq: np.ndarray
    _last_tok: np.ndarray
    _tenant: np.ndarray
    _run_cache: tuple[float, int, list[float]] | None
    """The last run's step ends, valid while (busy_until, num_steps) match and nothing was
    added or aborted: (busy_until_s, num_steps, ends)."""

    if TYPE_CHECKING:

        def _finish(self, req: Request, reason: str, now: float) -> None: ...

        def _shrink_hi(self) -> None: ...

    def _decode_run_len(self) -> int:
        """How many of the next steps are a *pure decode run*, 0 when the next is not.

        In such a run every running request decodes one token per step, nothing is admitted
        (nothing waits, or ``max_num_seqs`` run), no block runs short and no request ends
        before the run's last step, so each step is determined by the state before the run:
        the same requests, context growing by one token each, a new block where a sequence
        crosses a block boundary. :meth:`advance_decode_run` executes such steps at once,
        with exactly the numbers :meth:`step` would give one at a time.
        """
        n = self._num_running
        if n == 0 or n > self._budget:
            return 0
        hi = self._hi
        # cheap rejections first: free slots hold zeros, and a running request always has
        # tokens to compute (total > computed), so "every one has exactly one" is a sum
        tot_all, comp_all = self._total[:hi], self._computed[:hi]
        if int(tot_all.sum()) - int(comp_all.sum()) != n or int(np.count_nonzero(tot_all > self._prompt[:hi])) != n:
            return 0  # a prefill (chunk) is under way
        if len(self._waiting) and n < self._max_seqs and not self._head_blocked(n):
            return 0
        occupied = self._seq[:hi] != NO_SEQ
        comp, tot = comp_all[occupied], tot_all[occupied]
        last = self._last_tok[:hi][occupied]
        if not bool((last == self._busy_until).all()):
            return 0  # a request that skipped a step has its own inter-token gap
        m = int((self._target[:hi][occupied] - tot).min())  # the step in which the first one ends
        blk, bs, free = self._blocks[:hi][occupied], self._bs, self._pool.free

        def need(k: int) -> int:
            return int(np.maximum((comp + k + (bs - 1)) // bs - blk, 0).sum())

        if need(m) <= free:
            return m
        lo, top = 0, m  # need(lo) <= free < need(top)
        while top - lo > 1:
            mid = (lo + top) // 2
            if need(mid) <= free:
                lo = mid
            else:
                top = mid
        return lo

    def _head_blocked(self, n: int) -> bool:
        """Whether the waiting queue's head cannot be admitted in any step of a decode run of
        ``n`` requests: it does not fit the free blocks now, and they only shrink in a run."""
        if self._vtc:
            return False  # the head changes as the counters grow
        budget = self._budget - n
        if budget <= 0:
            return True
        req = self._waiting.peek()
        if req.arrival_s > self._busy_until:
            return False
        bs, pool = self._bs, self._pool
        total = req.num_tokens
        hits = evictable = 0
        if self._caching and req.block_hashes:
            hits, evictable = pool.lookup(req.block_hashes, (total - 1) // bs)
            if evictable:
                return False  # a hit the run's allocations evict changes the arithmetic
        computed = hits * bs
        k = total - computed
        if self._thr:
            k = min(k, self._thr)
        k = min(k, budget)
        return -(-(computed + k) // bs) - hits > pool.free

    def decode_run_remains(self, k: int) -> bool:
        """Whether the next ``k`` steps are still a pure decode run (after a request was added)."""
        return self._decode_run_len() >= k

    def decode_run_ends(self, now: float) -> list[float]:
        """End times of the pure decode run starting at ``max(now, busy_until_s)`` (empty: none)."""
        if now > self._busy_until:
            return []
        k = self._decode_run_len()
        if k == 0:
            return []
        return self._run_ends(k)

    def _run_ends(self, k: int) -> list[float]:
        cached = self._run_cache
        if (
            cached is not None
            and cached[0] == self._busy_until
            and cached[1] == self.stats.num_steps
            and len(cached[2]) >= k
        ):
            return cached[2][:k]
        n = self._num_running
        context = int(self._computed[: self._hi].sum())
        # step j of the run reads the context plus j tokens per request, and prefills nothing
        d = self.profile.step_time.step_s(n, context + n * np.arange(1, k + 1, dtype=np.int64), 0)
        # t_j = t_{j-1} + d_j, left to right (cumsum accumulates in order: the same floats)
        ends = np.cumsum(np.concatenate(([self._busy_until], d)))[1:].tolist()
        self._run_cache = (self._busy_until, self.stats.num_steps, ends)
        return ends

    def advance_decode_run(self, k: int) -> StepResult:
        """Execute the next ``k`` steps, which must be (part of) a pure decode run, at once.

        Same state, stats and result (the last step's) as ``k`` calls of :meth:`step` at
        ``busy_until_s``; raises ``ValueError`` if the next ``k`` steps are not such a run.
        """
        cached = self._run_cache
        valid = cached is not None and cached[0] == self._busy_until and cached[1] == self.stats.num_steps
        known = cached[2] if cached is not None and valid else None  # the run's step ends, when still valid
        if k < 1 or (not (known is not None and len(known) >= k) and self._decode_run_len() < k):
            raise ValueError(f"the next {k} steps are not a pure decode run")
        ends = self._run_ends(k)
        rest = known[k:] if known is not None else []
        hi, n, st = self._hi, self._num_running, self.stats
        occupied = self._seq[:hi] != NO_SEQ
        comp, tot, blk = self._computed[:hi], self._total[:hi], self._blocks[:hi]
        new_blk = np.where(occupied, np.maximum((comp + k + (self._bs - 1)) // self._bs, blk), blk)
        self._pool.allocate(int((new_blk - blk).sum()))
        blk[:] = new_blk
        comp += occupied * k
        tot += occupied * k
        if self._vtc:
            self._waiting.charge_generated(self._tenant[:hi][occupied], float(k))
        # inter-token latency: every running request, one gap per step (as step() observes it)
        itl = st.inter_token_latency
        prev = [self._busy_until, *ends[:-1]]
        gaps = np.array([e - p for e, p in zip(ends, prev, strict=True)], dtype=np.float64)
        itl.counts += n * np.bincount(np.searchsorted(itl.bounds, gaps, side="left"), minlength=itl.counts.size)
        for v in np.repeat(gaps[:, None], n, axis=1).sum(axis=1).tolist():
            itl.sum += v
        itl.count += n * k
        it = st.iteration_tokens
        it.counts[bisect.bisect_left(it._bounds_list, n)] += k
        for _ in range(k):
            it.sum += n
        it.count += k
        st.generation_tokens += n * k
        st.num_steps += k
        end = ends[-1]
        self._last_tok[:hi][occupied] = end
        finished: list[Request] = []
        for s in np.flatnonzero(occupied & (tot >= self._target[:hi])).tolist():
            req = self._slots[s]
            assert req is not None
            req.last_token_s = end
            self._finish(req, req.target_reason, end)
            finished.append(req)
        self._shrink_hi()
        start = ends[-2] if k > 1 else self._busy_until
        self._busy_until = end
        self._run_cache = (end, st.num_steps, rest) if rest and not finished else None
        return StepResult(start, end, n, n, 0, n, [], finished, [])
