"""A request as the simulated engine tracks it, and what one engine step reports.

Times are in the caller's clock (seconds): the event loop's in the server, virtual time in
experiments. While a request runs, its token counts live in the engine's arrays (see
:mod:`tokenscaler.sim.engine`); :attr:`Request.output_tokens` reads them wherever they are.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class SlotTokens(Protocol):
    """Where a running request's token count lives (the engine's arrays)."""

    def slot_tokens(self, slot: int) -> int:
        """Prompt plus generated tokens of the request running in ``slot``."""
        ...


class QueueFullError(RuntimeError):
    """The waiting queue already holds ``max_num_queued_reqs`` requests (vLLM answers 503)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence in the engine. Times are in the caller's clock (seconds)."""

    __slots__ = (
        "_engine", "arrival_s", "block_hashes", "finish_reason", "finished_s", "first_token_s", "held",
        "last_token_s", "max_tokens", "num_cached_tokens", "num_preemptions", "num_registered",
        "num_tokens", "output_target", "priority", "prompt_tokens", "request_id", "scheduled_s",
        "slot", "status", "target_reason", "tenant",
    )  # fmt: skip

    def __init__(
        self,
        engine: SlotTokens,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        output_target: int,
        target_reason: str,
        priority: int,
        arrival_s: float,
        block_hashes: tuple[int, ...],
    ) -> None:
        self._engine = engine
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.output_target = output_target
        """Tokens this request will generate (``max_tokens`` or an earlier stop)."""
        self.target_reason = target_reason
        """``finish_reason`` once the target is reached: ``"length"`` or ``"stop"``."""
        self.priority = priority
        self.arrival_s = arrival_s
        self.block_hashes = block_hashes
        self.status = RequestStatus.WAITING
        self.num_tokens = prompt_tokens  # prompt + output; synced from the arrays when not running
        self.slot = -1
        self.held: list[int] = []  # cached prefix blocks this request references
        self.num_registered = 0  # prompt blocks already offered to the prefix cache
        self.scheduled_s: float | None = None
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.finished_s: float | None = None
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.num_cached_tokens = 0
        self.tenant = ""  # whom it is served for (the VTC scheduling policy)

    @property
    def output_tokens(self) -> int:
        """Tokens generated so far."""
        if self.slot >= 0:
            return self._engine.slot_tokens(self.slot) - self.prompt_tokens
        return self.num_tokens - self.prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, prompt={self.prompt_tokens}, "
            f"output={self.output_tokens}/{self.output_target})"
        )


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step did. Tokens appear at ``end_s``."""

    start_s: float
    end_s: float
    num_requests: int
    """Requests scheduled in the step."""
    num_tokens: int
    """Tokens computed in the step (prefill chunks and decodes)."""
    num_prefill_tokens: int
    num_generated_tokens: int
    first_token: list[Request]
    """Requests that produced their first token."""
    finished: list[Request]
    preempted: list[Request]

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s
