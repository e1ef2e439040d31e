"""The engine's waiting queue, one class per scheduling policy, as vLLM's
``v1/core/sched/request_queue.py`` has them.

* :class:`FCFSQueue` (``fcfs``): arrival order.
* :class:`PriorityQueue` (``priority``): by ``(priority, arrival)``, lower first; ties in the
  order the requests were queued.
* :class:`VTCQueue` (``vtc``): the Virtual Token Counter of Sheng et al., "Fairness in
  Serving Large Language Models" (OSDI 2024). Every tenant has a counter of the service it
  received, :data:`VTC_PROMPT_WEIGHT` per prompt token at admission and
  :data:`VTC_OUTPUT_WEIGHT` per generated token as it is generated (the engine charges them,
  :meth:`VTCQueue.charge_generated`); the queue is one FCFS queue per tenant, and its head is
  the head of the tenant with the smallest counter (ties by tenant name). A tenant whose queue
  was empty is lifted on arrival to the smallest counter of the tenants waiting (or, when none
  waits, of the tenant served last), so idle time banks no credit.

A preempted request goes back to the front (:meth:`RequestQueue.prepend`; the priority queue
orders it by its key). Removal of an aborted request is lazy: :meth:`RequestQueue.discard`
stops counting it at once, and it leaves the queue when it reaches the head.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
from collections import deque

import numpy as np

from tokenscaler.sim.request import Request, RequestStatus

VTC_PROMPT_WEIGHT = 1.0  # VTC's w_p (Sheng et al. 2024, section 4: input tokens cost 1)
VTC_OUTPUT_WEIGHT = 2.0  # VTC's w_q (output tokens cost 2, as in the paper's evaluation)


class RequestQueue:
    """Requests waiting to be admitted; ``len()`` counts those still waiting."""

    __slots__ = ("_num_waiting",)

    def __init__(self) -> None:
        self._num_waiting = 0

    def __len__(self) -> int:
        return self._num_waiting

    def add(self, req: Request) -> None:
        """A new arrival, at the back."""
        req.status = RequestStatus.WAITING
        self._push(req, front=False)
        self._num_waiting += 1

    def prepend(self, req: Request) -> None:
        """A preempted request, at the front."""
        req.status = RequestStatus.WAITING
        self._push(req, front=True)
        self._num_waiting += 1

    def discard(self, req: Request) -> None:
        """``req`` (waiting) was aborted: no longer counted; it leaves when it reaches the head."""
        self._num_waiting -= 1

    def peek(self) -> Request:
        """The request admission takes next (the queue must not be empty)."""
        raise NotImplementedError

    # the service each tenant received: only the VTC queue orders by it, the others ignore it

    def tenant_index(self, tenant: str) -> int:
        """The index :meth:`charge_generated` takes for ``tenant`` (known since its first arrival)."""
        return 0

    def charge_generated(self, tenants: np.ndarray, tokens: float) -> None:
        """``tokens`` generated for each tenant index in ``tenants`` (repeats add up)."""

    def counters(self) -> dict[str, float]:
        """Each tenant's virtual token counter (generated tokens included); empty but for VTC."""
        return {}

    def pop(self) -> None:
        """Remove the request :meth:`peek` returned: it is admitted."""
        raise NotImplementedError

    def _push(self, req: Request, *, front: bool) -> None:
        raise NotImplementedError


class FCFSQueue(RequestQueue):
    __slots__ = ("_queue",)

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Request] = deque()

    def _push(self, req: Request, *, front: bool) -> None:
        if front:
            self._queue.appendleft(req)
        else:
            self._queue.append(req)

    def peek(self) -> Request:
        q = self._queue
        while q[0].status is not RequestStatus.WAITING:
            q.popleft()
        return q[0]

    def pop(self) -> None:
        self._queue.popleft()
        self._num_waiting -= 1


class PriorityQueue(RequestQueue):
    __slots__ = ("_heap", "_next_seq")

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._next_seq = 0

    def _push(self, req: Request, *, front: bool) -> None:
        heapq.heappush(self._heap, (req.priority, req.arrival_s, self._next_seq, req))
        self._next_seq += 1

    def peek(self) -> Request:
        heap = self._heap
        while heap[0][3].status is not RequestStatus.WAITING:
            heapq.heappop(heap)
        return heap[0][3]

    def pop(self) -> None:
        heapq.heappop(self._heap)
        self._num_waiting -= 1


class VTCQueue(RequestQueue):
    __slots__ = ("_counter", "_gen", "_index", "_last", "_queues", "_tenants")

    def __init__(self) -> None:
        super().__init__()
        self._queues: dict[str, deque[Request]] = {}
        self._counter: dict[str, float] = {}
        self._tenants: list[str] = []  # index -> tenant name (the engine's slot arrays hold the index)
        self._index: dict[str, int] = {}
        self._gen = np.zeros(0, dtype=np.float64)  # generated tokens per tenant index, not yet counted
        self._last = 0.0  # counter of the tenant served last

    def tenant_index(self, tenant: str) -> int:
        return self._index[tenant]

    def charge_generated(self, tenants: np.ndarray, tokens: float) -> None:
        np.add.at(self._gen, tenants, tokens)

    def counters(self) -> dict[str, float]:
        self._sync()
        return dict(self._counter)

    def add(self, req: Request) -> None:
        self._arrive(req.tenant)
        super().add(req)

    def _arrive(self, tenant: str) -> None:
        """VTC's counter lift for a tenant whose queue is empty."""
        self._sync()
        if tenant not in self._index:
            self._index[tenant] = len(self._tenants)
            self._tenants.append(tenant)
            self._gen = np.append(self._gen, 0.0)
            self._counter[tenant] = 0.0
        if self._waiting(tenant):
            return
        waiting = [self._counter[t] for t in self._queues if t != tenant and self._waiting(t)]
        floor = min(waiting) if waiting else self._last
        self._counter[tenant] = max(self._counter[tenant], floor)

    def _waiting(self, tenant: str) -> bool:
        q = self._queues.get(tenant)
        while q and q[0].status is not RequestStatus.WAITING:
            q.popleft()
        return bool(q)

    def _sync(self) -> None:
        if self._gen.size and self._gen.any():
            for i in np.flatnonzero(self._gen).tolist():
                self._counter[self._tenants[i]] += VTC_OUTPUT_WEIGHT * float(self._gen[i])
            self._gen[:] = 0.0

    def _push(self, req: Request, *, front: bool) -> None:
        q = self._queues.setdefault(req.tenant, deque())
        if front:
            q.appendleft(req)
        else:
            q.append(req)

    def peek(self) -> Request:
        self._sync()
        best = min((t for t in self._queues if self._waiting(t)), key=lambda t: (self._counter[t], t))
        return self._queues[best][0]

    def pop(self) -> None:
        req = self.peek()
        self._queues[req.tenant].popleft()
        self._counter[req.tenant] += VTC_PROMPT_WEIGHT * req.prompt_tokens
        self._last = self._counter[req.tenant]
        self._num_waiting -= 1


def request_queue(policy: str) -> RequestQueue:
    """The waiting queue of a profile's ``scheduling_policy``."""
    queues: dict[str, type[RequestQueue]] = {"fcfs": FCFSQueue, "priority": PriorityQueue, "vtc": VTCQueue}
    try:
        return queues[policy]()
    except KeyError:
        raise ValueError(f"scheduling_policy must be one of {', '.join(queues)}, got {policy!r}") from None
