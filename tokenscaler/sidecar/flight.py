"""A flight: one admitted request, from admission to its one settlement.

It counts what the request consumed as it happens (the prompt once the engine accepted it,
generated tokens as they stream), charges them to the entitlement's gate and settles the
reservation exactly once, whatever ended it; preemption cuts it through the task serving
it (the proxy), or through ``on_preempt`` (the virtual-time experiments, which drive the
same class outside an event loop and cut the simulated engine's request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tokenscaler.core.limiter import Reservation
from tokenscaler.sidecar.gatekeeper import Gatekeeper
from tokenscaler.sidecar.metrics import EntitlementStats


class Flight:
    """One admitted request: what has been counted for it, and how to cut it."""

    __slots__ = (
        "accepted", "counted_gen", "counted_prompt", "gate", "on_preempt", "preempted", "res", "stats", "task", "w",
    )  # fmt: skip

    def __init__(
        self,
        gate: Gatekeeper,
        res: Reservation,
        stats: EntitlementStats,
        w: tuple[float, float],
        on_preempt: Callable[[], None] | None = None,
    ) -> None:
        self.gate = gate
        self.on_preempt = on_preempt
        self.res = res
        self.stats = stats
        self.w = w
        self.task = _current_task()  # None outside an event loop (the experiments' virtual time)
        self.accepted = False
        self.preempted = False
        self.counted_prompt = 0
        self.counted_gen = 0
        res.handle = self

    def preempt(self) -> None:
        if not self.res.finished and not self.preempted:
            self.preempted = True
            if self.task is not None:
                self.task.cancel()
            if self.on_preempt is not None:
                self.on_preempt()

    def _count(self, prompt: int, generated: int) -> None:
        s = self.stats
        s.prompt_tokens += prompt
        s.generation_tokens += generated
        weighted = self.w[0] * prompt + self.w[1] * generated
        s.admitted_weighted += weighted
        s.offered_weighted += weighted
        self.counted_prompt += prompt
        self.counted_gen += generated

    def accept(self) -> None:
        """The engine took the request: its prompt is processed."""
        self.accepted = True
        self.stats.admitted += 1
        self._count(self.res.estimate.prompt_tokens, 0)

    def streamed(self, generated: int) -> None:
        if generated > self.counted_gen:
            self._count(0, generated - self.counted_gen)
            self.gate.charge(self.res, generated)

    def settle(self, prompt: int | None = None, generated: int | None = None, completed: bool = False) -> None:
        if self.res.finished:
            return
        if not self.accepted:
            prompt, generated = 0, 0
        prompt = self.counted_prompt if prompt is None else prompt
        generated = self.counted_gen if generated is None else generated
        self._count(max(prompt - self.counted_prompt, 0), max(generated - self.counted_gen, 0))
        self.gate.finish(self.res, prompt_tokens=prompt, generated_tokens=generated, completed=completed)


def _current_task() -> asyncio.Task[Any] | None:
    # outside an event loop (the experiments make ~180,000 flights an hour) without raising and
    # catching current_task's RuntimeError each time
    if asyncio._get_running_loop() is None:
        return None
    return asyncio.current_task()
