"""One engine on the event loop's clock, and the HTTP requests in flight on it.

:class:`EngineSession` owns a :class:`~tokenscaler.sim.engine.Engine` and the task that runs
it: the task steps the engine, sleeps until the step's modelled end (steps follow each other
on the model's clock, so late wake-ups do not accumulate), then hands the step's tokens to
the requests waiting on them (every ``stream_interval`` tokens for a stream; first and last
tokens always), and sleeps on an event when there is no work.

Every route that generates (:mod:`tokenscaler.sim.server`: completions and chat;
:mod:`tokenscaler.sim.endpoints`: Responses, Messages, batch chat) runs its request through
one lifecycle, :meth:`EngineSession.request`::

    async with session.request(parsed) as group:  # n engine requests per prompt, all or none
        await group.finished()                     # or stream: wait on group.event, read the choices
        ...

Entering submits the request (a full waiting queue is a 503, and nothing of it stays
queued); leaving the block for any reason (the answer written, the client gone: cancelled or
a reset connection, an error) aborts whatever of it still runs (``finished_reason="abort"``),
freeing its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from tokenscaler.sim import api
from tokenscaler.sim.api import ApiError
from tokenscaler.sim.engine import Engine, QueueFullError, Request
from tokenscaler.sim.profile import EngineProfile
from tokenscaler.sim.prompt import block_hashes

log = logging.getLogger(__name__)

MAX_LAG_S = 0.25
"""How far the engine's clock may run behind the event loop's before it resyncs (drops time)."""


class Choice:
    """One engine request of an HTTP request, as its handler sees it."""

    __slots__ = ("done_sent", "finished", "group", "index", "notified", "req", "sent")

    def __init__(self, group: Group, index: int, req: Request) -> None:
        self.group = group
        self.index = index
        self.req = req
        self.notified = 0  # tokens announced to the handler
        self.sent = 0  # tokens the handler has written
        self.finished = False
        self.done_sent = False


class Group:
    """All choices of one HTTP request and the event that wakes its handler."""

    __slots__ = ("_session", "choices", "event", "prompt_tokens", "streaming")

    def __init__(self, session: EngineSession, streaming: bool, prompt_tokens: int) -> None:
        self._session = session
        self.choices: list[Choice] = []
        self.event = asyncio.Event()
        self.streaming = streaming
        self.prompt_tokens = prompt_tokens

    @property
    def all_finished(self) -> bool:
        return all(c.finished for c in self.choices)

    async def finished(self) -> None:
        """Wait until every choice has finished; raises :class:`ApiError` 500 if the engine died meanwhile."""
        while not self.all_finished:
            await self.event.wait()
            self.event.clear()
        self._session.check_ready()

    def usage(self) -> dict[str, int]:
        return api.usage(self.prompt_tokens, sum(c.req.output_tokens for c in self.choices))


class EngineSession:
    """An :class:`Engine` run on the event loop, and the requests in flight on it."""

    def __init__(
        self,
        profile: EngineProfile,
        *,
        seed: int = 0,
        startup_s: float = 0.0,
        max_num_queued_reqs: int | None = None,
    ) -> None:
        self.profile = profile
        self.startup_s = startup_s
        self.engine = Engine(profile, seed=seed, max_num_queued_reqs=max_num_queued_reqs)
        self._interval = profile.stream_interval
        self._live: dict[str, Choice] = {}
        self._streaming: dict[str, Choice] = {}
        self._wake = asyncio.Event()
        self._ready_at = float("inf")
        self.dead = False
        """True once the engine loop has failed (a bug): health and new requests answer 500."""
        self._loop_task: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Run the engine on the running loop; it serves ``startup_s`` from now."""
        loop = asyncio.get_running_loop()
        self._ready_at = loop.time() + self.startup_s
        self._loop_task = asyncio.create_task(self._engine_loop(), name="sim-engine")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    @property
    def loading(self) -> bool:
        """True until ``startup_s`` has passed since :meth:`start`."""
        return asyncio.get_running_loop().time() < self._ready_at

    def check_ready(self) -> None:
        """Raise :class:`ApiError` 500 when the engine loop has failed, 503 while the model loads."""
        if self.dead:
            raise ApiError(500, "the engine loop has failed; see the server log")
        if self.loading:
            raise ApiError(503, "the model is still loading (tokenscaler sim --startup-s)")

    # ---- one HTTP request --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def request(self, request: api.Generate) -> AsyncIterator[Group]:
        """Submit ``request``'s engine requests; on leaving, abort whatever of them still runs."""
        group = Group(self, streaming=request.stream, prompt_tokens=request.prompt_tokens)
        self._submit(group, request)
        try:
            yield group
        finally:
            if not group.all_finished:
                self._abort(group)

    def _submit(self, group: Group, request: api.Generate) -> None:
        """Add ``n`` engine requests per prompt; all or none."""
        now = asyncio.get_running_loop().time()
        base = uuid.uuid4().hex
        caching = self.profile.enable_prefix_caching
        try:
            for p, prompt in enumerate(request.prompts):
                hashes = block_hashes(prompt.stream, self.profile.block_size) if caching else ()
                for j in range(request.n):
                    index = p * request.n + j
                    req = self.engine.add_request(
                        f"{base}-{index}",
                        prompt.tokens,
                        prompt.max_tokens,
                        now,
                        priority=request.priority,
                        block_hashes=hashes,
                        min_tokens=request.min_tokens,
                        ignore_eos=request.ignore_eos,
                    )
                    choice = Choice(group, index, req)
                    group.choices.append(choice)
                    self._live[req.request_id] = choice
                    if group.streaming:
                        self._streaming[req.request_id] = choice
        except QueueFullError as e:
            self._abort(group)
            raise ApiError(503, str(e)) from e
        self._wake.set()

    def _abort(self, group: Group) -> None:
        now = asyncio.get_running_loop().time()
        for choice in group.choices:
            rid = choice.req.request_id
            self._live.pop(rid, None)
            self._streaming.pop(rid, None)
            if not choice.finished:
                self.engine.abort(rid, now)
                choice.finished = True

    # ---- the engine loop ---------------------------------------------------------------

    async def _engine_loop(self) -> None:
        try:
            await self._run_engine()
        except Exception:
            # A bug, not a request's fault: fail what is in flight and report unhealthy, as vLLM
            # does when its engine core dies, rather than leaving clients hanging.
            log.exception("the engine loop failed; the server now answers 500")
            self.dead = True
            for choice in self._live.values():
                choice.finished = True
                choice.group.event.set()
            self._live.clear()
            self._streaming.clear()

    async def _run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        while True:
            if not engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            # Chain steps on the model's clock: a wake-up a little late (the loop was writing
            # chunks or parsing requests) must not stretch every step. Only when the loop falls
            # further behind than MAX_LAG_S (an overloaded CPU) does the model resync to it.
            # (The engine admits no request into a step that starts before its arrival.)
            lag = now - engine.busy_until_s
            result = engine.step(engine.busy_until_s if 0.0 <= lag <= MAX_LAG_S else now)
            if result.num_requests == 0:
                raise RuntimeError(f"engine step scheduled nothing with {engine.num_waiting} waiting")
            delay = result.end_s - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            for req in result.finished:
                choice = self._live.pop(req.request_id, None)
                if choice is not None:
                    self._streaming.pop(req.request_id, None)
                    choice.notified = req.output_tokens
                    choice.finished = True
                    choice.group.event.set()
            interval = self._interval
            for choice in self._streaming.values():
                n = choice.req.output_tokens
                if n > choice.notified and (choice.notified == 0 or n - choice.notified >= interval):
                    choice.notified = n
                    choice.group.event.set()
