"""The demo's load generator: the scenario's traffic, sent live through the official ``openai`` client.

Arrivals come from :func:`tokenscaler.experiments.traffic.build_traffic` (the same seeded
streams the virtual-time runner replays), so the live run and the experiment see the same
requests. Each request is a streamed chat completion (``AsyncOpenAI``, ``max_retries=0``: a
429 is an answer, not something to hide) with the entitlement's API key
(``sk-<entitlement>-demo``, checked against the config's digests), a prompt of exactly the
scenario's token count by the shared counting rule, ``max_tokens`` its output and
``ignore_eos`` so the simulator generates exactly that. Requests go round robin over the
ready replicas' sidecars, as a Kubernetes Service spreads them. Everything is bounded: at
most ``max_inflight`` open requests, each cut after ``timeout_s``, and the run drains for
at most ``drain_s`` after the last arrival.

Every request becomes a :class:`Record`: when it was sent, where, what came back (answered,
rejected with the 429's dimension and whether it named only the entitlement's own limit,
preempted, failed), its time to first token and its tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletionUserMessageParam

from tokenscaler.core.model import DIMENSIONS, TokenPoolsConfig, hash_api_key
from tokenscaler.core.tokens import BYTES_PER_TOKEN, CHAT_MESSAGE_OVERHEAD_TOKENS, CHAT_REPLY_PRIMING_TOKENS
from tokenscaler.demo.fleet import Fleet, Replica
from tokenscaler.experiments.scenario import LoadedScenario
from tokenscaler.experiments.traffic import SlotSource, build_traffic

_OVERHEAD = CHAT_MESSAGE_OVERHEAD_TOKENS + CHAT_REPLY_PRIMING_TOKENS
_FILLER = b"token pools share one capacity model between admission and autoscaling. "


@dataclass(slots=True, eq=False)
class Record:
    seq: int
    tenant: str
    tier: str
    sent: float  # seconds since the traffic started
    prompt: int
    output: int
    max_tokens: int
    weighted: float  # prompt x w_prompt + output x w_generation: the request's nominal tokens
    replica: str = ""
    status: str = "open"  # open | answered | rejected | preempted | failed | unrouted
    dimension: str | None = None  # of a 429
    own_limit: bool = True  # a 429 that names the entitlement's own limit (not only others' use)
    accepted: bool = False  # the sidecar admitted it (a 200 and its headers came back)
    first_token: float | None = None  # seconds since the traffic started
    end: float | None = None
    completion_tokens: int = 0
    detail: str = ""

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def admitted(self) -> bool:
        return self.accepted or self.status in ("answered", "preempted")


def api_key(config: TokenPoolsConfig, entitlement: str) -> str:
    """The demo key ``sk-<entitlement>-demo``, if the config lists its digest."""
    key = f"sk-{entitlement}-demo"
    ent = next(e for e in config.entitlements if e.name == entitlement)
    if hash_api_key(key) not in ent.api_keys:
        raise ValueError(
            f"entitlement {entitlement!r}: the demo sends the key {key!r}, whose sha256 is not in its api_keys"
        )
    return key


def prompt_messages(seq: int, tokens: int) -> list[ChatCompletionUserMessageParam]:
    """One user message counted as exactly ``tokens`` prompt tokens (at least the chat overhead + 1);
    unique per ``seq`` so no two prompts share a cached prefix."""
    n = max(tokens - _OVERHEAD, 1) * BYTES_PER_TOKEN
    head = f"{seq} ".encode()  # the unique part first, so even short prompts differ
    body = (head + _FILLER * (n // len(_FILLER) + 1))[:n]
    return [{"role": "user", "content": body.decode("ascii")}]


class LoadGenerator:
    def __init__(
        self,
        loaded: LoadedScenario,
        seed: int,
        duration_s: float,
        fleet: Fleet,
        model: str,
        *,
        max_inflight: int = 400,
        timeout_s: float = 30.0,
        drain_s: float = 15.0,
    ) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.duration_s = duration_s
        self.fleet = fleet
        self.model = model
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s
        self.drain_s = drain_s
        pool = loaded.pool
        self.w = (pool.token_weights.prompt, pool.token_weights.generation)
        self.tiers = {e.name: e.tier.value for e in self.config.entitlements}
        self.keys = {name: api_key(self.config, name) for name in loaded.scenario.traffic}
        arrivals, self.slots = build_traffic(loaded, seed, duration_s)
        events: list[tuple[float, str, int, int, int]] = []
        for a in arrivals:
            cols = (a.prompt.tolist(), a.output.tolist(), a.max_tokens.tolist())
            events += zip(a.times.tolist(), itertools.repeat(a.tenant), *cols, strict=False)
        events.sort(key=lambda e: e[0])
        self.arrivals = events
        self.records: list[Record] = []
        self.t0 = 0.0
        self.inflight = 0
        self._seq = itertools.count()
        self._rr = 0
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_record: Callable[[Record], None] | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---- routing -------------------------------------------------------------------------

    def _route(self) -> Replica | None:
        ready = self.fleet.ready()
        if not ready:
            return None
        self._rr += 1
        return ready[self._rr % len(ready)]

    def _client(self, r: Replica) -> openai.AsyncOpenAI:
        c = self._clients.get(r.id)
        if c is None:
            c = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0, timeout=self.timeout_s)
            self._clients[r.id] = c
        return c

    # ---- running ------------------------------------------------------------------------

    async def run(self, t0: float) -> None:
        """Send every arrival at its time (relative to ``t0``, a ``time.monotonic()``), run the closed-loop
        slots, then drain for at most ``drain_s``."""
        self.t0 = t0
        slot_tasks = [asyncio.create_task(self._slot(s)) for s in self.slots for _ in range(s.spec.count)]
        try:
            for t, tenant, p, o, mt in self.arrivals:
                delay = t - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._spawn(tenant, t, p, o, mt)
            await asyncio.sleep(max(self.duration_s - self.now(), 0.0))
        finally:
            for st in slot_tasks:
                st.cancel()
            await asyncio.gather(*slot_tasks, return_exceptions=True)
            await self.drain()

    async def drain(self) -> None:
        deadline = time.monotonic() + self.drain_s
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self._tasks), timeout=max(deadline - time.monotonic(), 0.01))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for rec in self.records:
            if rec.status == "open":
                rec.status, rec.detail = "failed", "still open when the run ended"

    async def close(self) -> None:
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.close()
        self._clients.clear()

    def _new_record(self, tenant: str, t: float, p: int, o: int, mt: int) -> Record:
        rec = Record(next(self._seq), tenant, self.tiers[tenant], t, p, o, mt, p * self.w[0] + o * self.w[1])
        self.records.append(rec)
        return rec

    def _spawn(self, tenant: str, t: float, p: int, o: int, mt: int) -> None:
        rec = self._new_record(tenant, self.now(), p, o, mt)
        if self.inflight >= self.max_inflight:
            self._finish(rec, "failed", detail=f"client-side: {self.max_inflight} requests already open")
            return
        task = asyncio.create_task(self._request(rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _slot(self, s: SlotSource) -> None:
        if s.start_s > self.now():
            await asyncio.sleep(s.start_s - self.now())
        while self.now() < min(s.end_s, self.duration_s):
            p, o, mt = s.draw()
            rec = self._new_record(s.tenant, self.now(), p, o, mt)
            await self._request(rec)
            wait = s.spec.backoff_s if rec.status in ("rejected", "preempted", "unrouted") else s.spec.think_s
            if wait > 0:
                await asyncio.sleep(wait)

    def _finish(self, rec: Record, status: str, *, detail: str = "") -> None:
        rec.status = status
        rec.end = self.now()
        if detail:
            rec.detail = detail[:300]
        if self.on_record is not None:
            self.on_record(rec)

    async def _request(self, rec: Record) -> None:
        r = self._route()
        if r is None:
            self._finish(rec, "unrouted", detail="no ready replica")
            return
        rec.replica = r.id
        r.inflight += 1
        self.inflight += 1
        try:
            await asyncio.wait_for(self._call(r, rec), self.timeout_s)
        except TimeoutError:
            self._finish(rec, "failed", detail=f"no answer within {self.timeout_s:g}s")
        except asyncio.CancelledError:
            self._finish(rec, "failed", detail="cancelled at the end of the run")
            raise
        finally:
            r.inflight -= 1
            self.inflight -= 1

    async def _call(self, r: Replica, rec: Record) -> None:
        client = self._client(r)
        extra: dict[str, Any] = {"ignore_eos": True} if rec.max_tokens == rec.output else {"min_tokens": rec.output}
        try:
            stream = await client.chat.completions.create(
                model=self.model,
                messages=prompt_messages(rec.seq, rec.prompt),
                max_tokens=rec.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra,
                extra_headers={"Authorization": f"Bearer {self.keys[rec.tenant]}"},
            )
            rec.accepted = True
            async for chunk in stream:
                if rec.first_token is None and chunk.choices and chunk.choices[0].delta.content:
                    rec.first_token = self.now()
                if chunk.usage is not None:
                    rec.completion_tokens = chunk.usage.completion_tokens
        except openai.RateLimitError as e:
            rec.dimension = e.response.headers.get("x-tokenscaler-dimension") or "unknown"
            message = str(e.message)
            # "...on DIM; DIM: <own shortfall>; its ceiling: ...; no idle capacity on this replica: ..."
            parts = message.split("; ")[1:]
            rec.own_limit = any(p.startswith(DIMENSIONS) for p in parts)
            self._finish(rec, "rejected", detail=message)
            return
        except openai.APIStatusError as e:
            preempted = e.status_code == 503 and "preempt" in str(e.message).lower()
            self._finish(rec, "preempted" if preempted else "failed", detail=f"HTTP {e.status_code}: {e.message}")
            return
        except openai.APIError as e:  # an error event in the stream (a preemption after the first token)
            preempted = "preempt" in str(e.message).lower() or getattr(e, "code", None) == "preempted"
            self._finish(rec, "preempted" if preempted else "failed", detail=str(e.message))
            return
        if rec.first_token is None:
            rec.first_token = self.now()
        self._finish(rec, "answered")


