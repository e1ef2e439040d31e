"""The virtual-time loop: a fleet of engines, their sidecars, the controller and the HPA.

One discrete-event loop (a heap of timed events, ties broken by insertion order, so a run
is a pure function of scenario, policy and seed). Per replica it holds the simulator's
:class:`~tokenscaler.sim.engine.Engine`, stepped one scheduler iteration at a time (a step
event at each step's end delivers its tokens and starts the next), and the sidecar's
:class:`~tokenscaler.core.limiter.Limiter` with the sidecar's own per-request accounting
(:class:`~tokenscaler.sidecar.flight.Flight` into :class:`~tokenscaler.sidecar.metrics.SidecarMetrics`):
admit, accept, charge as tokens stream (at every scrape), settle at the end, preempt the
victims a decision names. Every ``interval_s`` the sidecars' and engines' collectors are
read in-process and parsed by the embedded scraper (:mod:`tokenscaler.experiments.control`);
the policy's control step plans and every ready sidecar gets its replica's limits document.
Every ``pollingInterval`` the HPA (:mod:`tokenscaler.experiments.replicas`) moves the
Deployment; new replicas are ready after the profile's ``startup_s``; a scaled-down replica
stops receiving requests and leaves when its requests are done.

Fast path (same numbers): when an engine's next steps are a pure decode run (every running
request decodes one token, nothing to admit, no block short, nobody ends before the last),
the loop schedules one event at the run's last step end instead of one per step, and
executes the run's steps only when something looks at or changes that replica
(:meth:`Run._sync`): an arrival or a cut executes the steps begun by then and ends the run
there, a scrape executes them and lets the run go on. The engine's
:meth:`~tokenscaler.sim.engine.Engine.advance_decode_run` gives the state, stats and result
that stepping one at a time gives (``tests/sim/test_decode_runs.py``).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from tokenscaler.core.limiter import INF, Decision, GateLimits, Limiter
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.step import StepSettings
from tokenscaler.experiments.control import (
    ControlLoop,
    Scraper,
    collect_samples,
    replica_gate_limits,
    sidecar_samples,
    static_gate_limits,
)
from tokenscaler.experiments.measure import Recorder
from tokenscaler.experiments.policies import POLICIES, gateway_limiter
from tokenscaler.experiments.replicas import HPA_DEFAULTS, Hpa, rules_from_scaledobject
from tokenscaler.experiments.scenario import Event, LoadedScenario, Skewed, apply_event, union_config
from tokenscaler.experiments.traffic import SlotSource, build_traffic
from tokenscaler.sidecar.flight import Flight
from tokenscaler.sidecar.gatekeeper import Gatekeeper, whole_limit
from tokenscaler.sidecar.limits import LimitsUpdate
from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics
from tokenscaler.sim.engine import Engine, StepResult
from tokenscaler.sim.metrics import build_registry
from tokenscaler.sim.profile import load_profile
from tokenscaler.sources.scrape import ScrapeResult

LIMITS_TTL_S = 60.0


@dataclass(eq=False)
class Call:
    """One request a client sent: where it went and what became of it."""

    tenant: str
    arrival: float
    prompt: int
    output: int
    max_tokens: int
    slot: SlotSource | None
    replica: Replica | None = None
    flight: Flight | None = None
    rid: str = ""
    first_token: float | None = None
    done: bool = False
    seq: int = 0  # order of sending (the order of Replica.calls)


@dataclass(eq=False)
class Replica:
    id: str
    engine: Engine
    limiter: Limiter
    gate: Gatekeeper
    metrics: SidecarMetrics
    registry: CollectorRegistry
    ready_at: float
    state: str = "starting"  # starting | ready | draining | gone
    step_scheduled: bool = False
    pending: StepResult | None = None  # the step whose tokens arrive at the next step event
    calls: dict[str, Call] = field(default_factory=dict)  # engine request id -> call
    streaming: dict[str, Call] = field(default_factory=dict)  # the calls whose first token came
    served: float = 0.0  # weighted tokens at the last sample
    epoch: int = 0  # a StepEnd of an older epoch is stale (its run was cut short)
    run_ends: list[float] = field(default_factory=list)  # the pure decode run under way (not yet executed)
    wake_at: float = INF  # the earliest Wake pushed for its gatekeeper's queue, not yet fired
    cuts: list[Call] = field(default_factory=list)  # calls its gatekeeper preempted, to cut now


# ---- the events of the heap, one type per kind ----------------------------------------------


@dataclass(slots=True)
class StepEnd:
    """A step of ``replica``'s engine (or the last of its decode run) ends: it delivers its tokens.
    Stale when the replica's epoch has moved on (its run was cut short)."""

    replica: Replica
    epoch: int


@dataclass(slots=True)
class Arrival:
    """The next request of the open-loop source ``Run.arrivals[source]``."""

    source: int


@dataclass(slots=True)
class SlotTurn:
    """A closed-loop client of ``slot`` sends its next request."""

    slot: SlotSource


@dataclass(slots=True)
class ControlTick:
    """Every ``interval_s``: scrape, plan, hand out the limits documents."""


@dataclass(slots=True)
class HpaTick:
    """Every ``pollingInterval`` of ``hpa``: the HPA moves the Deployment."""

    hpa: Hpa


@dataclass(slots=True)
class ScenarioEvent:
    """One of the scenario's events (replicas fail or are restored)."""

    event: Event


@dataclass(slots=True)
class ReplicaReady:
    """``replica`` has started (the profile's ``startup_s`` after it was created)."""

    replica: Replica


@dataclass(slots=True)
class Wake:
    """``replica``'s gatekeeper asked to be woken (its queue's next timed retry)."""

    replica: Replica


Timed = StepEnd | Arrival | SlotTurn | ControlTick | HpaTick | ScenarioEvent | ReplicaReady | Wake


class Run:
    """One policy on one scenario (see the module docstring)."""

    def __init__(self, loaded: LoadedScenario, policy: str, seed: int, duration_s: float, *, without_spot: bool):
        self.loaded = loaded
        self.sc = loaded.scenario
        self.config = loaded.config
        self.pool = loaded.pool
        self.policy = POLICIES[policy]
        self.seed = seed
        self.duration = duration_s
        profile = load_profile(self._profile_path())
        if self.sc.profile_overrides:
            profile = profile.with_overrides(**self.sc.profile_overrides)
        if self.policy.engine == "vtc":
            profile = profile.with_overrides(scheduling_policy="vtc")
        self.profile = profile
        self.rows = build_pool_rows(self.config)
        # what the sidecars hold: the config the limits API delivered with the last plan (a
        # config event reaches the controller at once, the sidecars with the next plan)
        self.held = self.config
        self.ents = {e.name: e for e in self.config.entitlements}
        self.whole = {e.name: whole_limit(e) for e in self.config.entitlements}
        self.revoked: set[str] = set()  # entitlements whose keys the sidecars hold as revoked
        self.removed: set[str] = set()
        self._revoking: set[str] = set()  # revoked at the controller, not yet at the sidecars
        self.now = 0.0
        self.w = (self.pool.token_weights.prompt, self.pool.token_weights.generation)
        self.heap: list[tuple[float, int, Timed]] = []  # (time, order of pushing, event)
        self._seq = 0
        self.replicas: list[Replica] = []
        self._next_id = 0
        self._rr = 0
        self.rng = np.random.default_rng(seed)
        self.lost = 0
        fixed = self.sc.replicas.fixed or self.pool.max_replicas
        self.autoscaled = self.policy.replicas != "fixed"
        self.ceiling = self.pool.max_replicas if self.autoscaled else fixed
        initial = self.sc.replicas.initial if self.sc.replicas.initial is not None else self.pool.min_replicas
        self.desired = max(initial, self.pool.min_replicas, 1) if self.autoscaled else fixed
        self.static_replicas = self.desired
        self.control: ControlLoop | None = None
        if self.policy.admission == "tokenpools":
            settings = StepSettings(interval_s=self.sc.interval_s, weighting=self.policy.make_weighting(self.config))
            self.control = ControlLoop(self.rows, settings)
        self.gateway = gateway_limiter(self.policy, self.config, fixed)
        self.hpa: Hpa | None = None
        if self.policy.replicas == "tokenpools":
            self.hpa = Hpa(rules_from_scaledobject(), self.pool.min_replicas, self.pool.max_replicas)
        elif self.policy.replicas == "keda-queue":
            self.hpa = Hpa(HPA_DEFAULTS, self.pool.min_replicas, self.pool.max_replicas)
        self.scraper = Scraper([self.pool.name])
        everyone = union_config(self.config, self.sc)  # every entitlement the run ever has
        self.recorder = Recorder(loaded, build_pool_rows(everyone)[self.pool.name], self.policy, duration_s, everyone)
        arrivals, slots = build_traffic(loaded, seed, duration_s, without=loaded.spot if without_spot else frozenset())
        self.arrivals = arrivals
        self._cursor = [0] * len(arrivals)
        for i, a in enumerate(arrivals):
            if a.times.size:
                self._push(float(a.times[0]), Arrival(i))
        for s in slots:
            for _ in range(s.spec.count):
                self._push(s.start_s, SlotTurn(s))
        for ev in self.sc.events:
            self._push(ev.at_s, ScenarioEvent(ev))
        self._push(0.0, ControlTick())
        if self.hpa is not None:
            self._push(self.hpa.rules.polling_interval_s, HpaTick(self.hpa))
        for _ in range(self.desired):
            self._start_replica(0.0, ready_now=True)

    def _profile_path(self) -> str:
        p = self.loaded.path(self.sc.profile)
        return str(p) if p.is_file() else self.sc.profile

    # ---- events ------------------------------------------------------------------------

    def _push(self, t: float, ev: Timed) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, ev))

    def run(self, progress: Callable[[float], object] | None = None) -> dict[str, Any]:
        heap, end = self.heap, self.duration
        while heap and heap[0][0] < end:
            t, _, ev = heapq.heappop(heap)
            self.now = t
            match ev:
                case StepEnd(r, epoch):
                    if epoch == r.epoch:
                        self._step(t, r)
                case Arrival(i):
                    a = self.arrivals[i]
                    k = self._cursor[i]
                    self._cursor[i] = k + 1
                    if k + 1 < a.times.size:
                        self._push(float(a.times[k + 1]), ev)
                    self._send(t, Call(a.tenant, t, int(a.prompt[k]), int(a.output[k]), int(a.max_tokens[k]), None))
                case SlotTurn(s):
                    if t < s.end_s:
                        p, o, m = s.draw()
                        self._send(t, Call(s.tenant, t, p, o, m, s))
                case ControlTick():
                    self._control(t)
                    if progress is not None:
                        progress(t)
                    self._push(t + self.sc.interval_s, ev)
                case HpaTick(hpa):
                    self._autoscale(t)
                    self._push(t + hpa.rules.polling_interval_s, ev)
                case ScenarioEvent(scenario_event):
                    self._event(t, scenario_event)
                case ReplicaReady(r):
                    self._ready(t, r)
                case Wake(r):
                    r.wake_at = INF
                    r.gate.wake(t)
        result = self.recorder.result(end)
        pairs: dict[str, int] = {}
        for r in self.replicas:  # the sidecars' own counters (tokenscaler_sidecar_tier_inversions_total)
            for (higher, lower), n in r.limiter.inversions.items():
                key = f"{higher.value}>{lower.value}"
                pairs[key] = pairs.get(key, 0) + n
        result["tier_inversions"] = sum(pairs.values())
        result["tier_inversions_by_pair"] = dict(sorted(pairs.items()))
        if self.gateway is not None and self.policy.admission == "tpm":
            # weighted tokens served above the per-minute limit, by the minute they were admitted in
            result["tpm_overshoot"] = self.gateway.overshoot()
        return result

    # ---- requests ----------------------------------------------------------------------

    def _route(self) -> Replica | None:
        ready = [r for r in self.replicas if r.state == "ready"]
        if not ready:
            return None
        routing = self.sc.routing
        if routing == "random":
            return ready[int(self.rng.integers(len(ready)))]
        if isinstance(routing, Skewed) and len(ready) > 1:
            if self.rng.random() < routing.skewed:
                return ready[0]
            self._rr += 1
            return ready[1 + self._rr % (len(ready) - 1)]
        self._rr += 1
        return ready[self._rr % len(ready)]

    def _refused(self, t: float, call: Call, why: str) -> None:
        call.done = True
        self.recorder.denied(t, call.tenant, why)
        if call.slot is not None:
            self._push(t + call.slot.spec.backoff_s, SlotTurn(call.slot))

    def _send(self, t: float, call: Call) -> None:
        self.recorder.offered(t, call.tenant)
        if call.tenant not in self.ents or call.tenant in self.revoked:  # the sidecar's 401/403
            why = "revoked" if call.tenant in self.revoked else "removed" if call.tenant in self.removed else "unknown"
            return self._refused(t, call, why)
        gw = self.gateway
        if gw is not None:
            if not gw.allows(call.tenant, t):
                return self._refused(t, call, "gateway")
            if self.policy.admission == "rpm":
                gw.count(call.tenant, 1.0, t)
        r = self._route()
        if r is None:
            return self._refused(t, call, "no_replica")
        limit = self.profile.max_model_len
        call.max_tokens = min(call.max_tokens, limit - 1)
        call.output = min(call.output, call.max_tokens)
        call.prompt = min(call.prompt, limit - call.max_tokens)
        call.replica = r
        # the sidecar's admission path (gatekeeper.py): the never-fits 400, the guaranteed queue,
        # preemption and the refusal bookkeeping; only the clock is the loop's
        est = r.limiter.estimate(call.prompt, call.max_tokens)
        if r.gate.screen(call.tenant, est, self.whole[call.tenant]) is not None:
            return self._refused(t, call, "invalid")
        decision = r.gate.arrive(call.tenant, est, self.ents[call.tenant].tier, t, lambda d: self._decided(r, call, d))
        if decision is not None:
            self._decided(r, call, decision)

    def _decided(self, r: Replica, call: Call, decision: Decision) -> None:
        """The sidecar of ``r`` decided ``call`` (at once, or after it waited in its queue)."""
        t = self.now
        self._do_cuts(r, t)
        if not decision.admitted:
            return self._refused(t, call, decision.dimension or "concurrency")
        res = decision.reservation
        assert res is not None
        stats = r.metrics.stats[call.tenant]
        flight = Flight(r.gate, res, stats, self.w, on_preempt=lambda: r.cuts.append(call))
        if r.state not in ("ready", "draining"):  # it waited on a replica that has gone since
            call.flight = flight
            flight.settle()
            call.done = True
            self.recorder.cut(t, call.tenant, "failed")
            return
        self._sync(r, t)
        self._seq += 1
        rid = f"{r.id}-{self._seq}"
        call.rid, call.flight, call.seq = rid, flight, self._seq
        r.calls[rid] = call
        r.engine.add_request(rid, call.prompt, call.max_tokens, t, tenant=call.tenant, output_tokens=call.output)
        flight.accept()
        if r.run_ends and not r.engine.decode_run_remains(len(r.run_ends)):
            self._end_run(r)  # it can be admitted: the next step is a normal one
        self.recorder.queue_depth(r.engine.num_waiting)
        if not r.step_scheduled:
            r.step_scheduled = True
            self._push(max(t, r.engine.busy_until_s), StepEnd(r, r.epoch))

    def _do_cuts(self, r: Replica, t: float) -> None:
        """Cut the calls ``r``'s gatekeeper preempted (their capacity is already given to another)."""
        while r.cuts:
            vcall = r.cuts.pop(0)
            self.recorder.preempted_count(vcall.tenant)
            self._cut(t, r, vcall, "preempted")

    def _wake_at(self, r: Replica, at: float) -> None:
        """The gatekeeper of ``r`` asks to be woken at ``at`` (its queue's next timed retry)."""
        if at < r.wake_at:
            r.wake_at = at
            self._push(max(at, self.now), Wake(r))

    def _cut(self, t: float, r: Replica, call: Call, why: str) -> None:
        """End a call early (preempted by the sidecar, or its replica died)."""
        if call.done:
            return
        call.done = True
        self._sync(r, t, cut=True)
        r.calls.pop(call.rid, None)
        r.streaming.pop(call.rid, None)
        r.engine.abort(call.rid, t)
        flight = call.flight
        if flight is not None:
            flight.settle()
        self.recorder.cut(t, call.tenant, why)
        if call.slot is not None:
            self._push(t + call.slot.spec.backoff_s, SlotTurn(call.slot))

    def _sync(self, r: Replica, t: float, *, cut: bool = False) -> None:
        """Execute the steps of ``r``'s decode run begun by ``t`` (``cut``: end the run there)."""
        ends = r.run_ends
        if not ends:
            return
        start = r.engine.busy_until_s
        k = bisect.bisect_left(ends, t) + 1  # steps ended before t, and the one in flight
        if start > t:
            k = 0  # its next step begins after t
        k = min(k, len(ends))
        if k:
            r.pending = r.engine.advance_decode_run(k)
            del ends[:k]
        if ends and cut:
            self._end_run(r)

    def _end_run(self, r: Replica) -> None:
        """Stop ``r``'s decode run after the step in flight, which delivers at its end."""
        r.run_ends.clear()
        r.epoch += 1
        self._push(r.engine.busy_until_s, StepEnd(r, r.epoch))

    def _step(self, t: float, r: Replica) -> None:
        if r.run_ends:
            k = len(r.run_ends)
            r.run_ends = []
            r.pending = r.engine.advance_decode_run(k)
        res = r.pending
        r.pending = None
        if res is not None:
            for req in res.first_token:
                call = r.calls.get(req.request_id)
                if call is not None:
                    call.first_token = t
                    r.streaming[call.rid] = call
                    if call.flight is not None:  # the sidecar sees the first chunk: the prompt is prefilled
                        call.flight.streamed(req.output_tokens)
            for req in res.finished:
                r.streaming.pop(req.request_id, None)
                call = r.calls.pop(req.request_id, None)
                if call is None or call.done:
                    continue
                call.done = True
                generated = req.output_tokens
                assert call.flight is not None  # every call its engine serves was admitted
                call.flight.settle(call.prompt, generated, completed=True)
                if self.gateway is not None and self.policy.admission == "tpm":
                    served = self.w[0] * call.prompt + self.w[1] * generated
                    self.gateway.count(call.tenant, served, t)
                    self.gateway.served(call.tenant, served, call.arrival)
                self.recorder.completed(call.tenant, call.arrival, call.first_token or t, t, generated)
                if call.slot is not None:
                    self._push(t + call.slot.spec.think_s, SlotTurn(call.slot))
        if r.state == "gone":
            r.step_scheduled = False
            return
        if r.engine.has_work:
            ends = r.engine.decode_run_ends(t)
            if len(ends) > 1:
                r.run_ends = ends
                self._push(ends[-1], StepEnd(r, r.epoch))
                return
            nxt = r.engine.step(t)
            if nxt.num_requests:
                r.pending = nxt
                self._push(nxt.end_s, StepEnd(r, r.epoch))
                return
        r.step_scheduled = False
        if r.state == "draining" and not r.engine.has_work:
            r.state = "gone"
            self.recorder.replica_gone(t)

    # ---- replicas ----------------------------------------------------------------------

    def _unlimited(self) -> dict[str, GateLimits]:
        return {
            e.name: GateLimits(tier=e.tier, priority=e.priority, limit=(INF, INF, INF), ceiling=(INF, INF, INF))
            for e in self.held.entitlements
        }

    def _limits_for(self, r: Replica, ready: int) -> dict[str, GateLimits]:
        if self.control is None:
            return self._unlimited()
        if self.control.plan is None:
            return static_gate_limits(self.held, self.pool.name, self.static_replicas)
        return replica_gate_limits(self.held, self.control, self.pool.name, r.id, ready, LIMITS_TTL_S)

    def _start_replica(self, t: float, *, ready_now: bool = False) -> None:
        rid = f"r{self._next_id}"
        self._next_id += 1
        engine = Engine(self.profile, seed=self.seed * 1000 + self._next_id)
        # without token pools' admission the sidecar only counts (unlimited gates): it preempts nothing
        tokenpools = self.policy.admission == "tokenpools"
        limiter = Limiter(
            self.pool, now=t, preempt=tokenpools, tier_order=tokenpools, interval_s=self.sc.interval_s
        )
        stats = [EntitlementStats(e.name, e.tier.value) for e in self.held.entitlements]
        metrics = SidecarMetrics(self.pool.name, rid, limiter, stats)
        # the embedded scraper reads the engine's gauges and token counters, never its histograms
        registry = build_registry(engine, self.profile.served_model_name, process_metrics=False, histograms=False)
        gate = Gatekeeper(limiter, metrics, clock=lambda: self.now, on_wake_at=lambda at: self._wake_at(r, at))
        r = Replica(rid, engine, limiter, gate, metrics, registry, t + self.profile.startup_s)
        self.replicas.append(r)
        self.recorder.replica_started(t)
        if ready_now:
            self._ready(t, r)
        else:
            self._push(r.ready_at, ReplicaReady(r))

    def _ready(self, t: float, r: Replica) -> None:
        if r.state != "starting":
            return
        r.state = "ready"
        r.gate.apply(LimitsUpdate(self._limits_for(r, self._count("ready")), "fresh"), t)

    def _count(self, *states: str) -> int:
        return sum(1 for r in self.replicas if r.state in states)

    def _reconcile(self, t: float) -> None:
        """The Deployment: run ``desired`` pods, as far as the replicas not lost allow."""
        want = min(self.desired, self.ceiling - self.lost)
        running = [r for r in self.replicas if r.state in ("starting", "ready")]
        for _ in range(want - len(running)):
            self._start_replica(t)
        if len(running) > want:
            # the newest go first: starting ones before ready ones
            victims = sorted(running, key=lambda r: (r.state == "ready", -int(r.id[1:])))[: len(running) - want]
            for r in victims:
                self._retire(t, r)

    def _retire(self, t: float, r: Replica) -> None:
        if r.state == "starting":
            r.state = "gone"
            self.recorder.replica_gone(t)
            return
        r.state = "draining"
        self._sync(r, t)
        if not r.engine.has_work:
            r.state = "gone"
            self.recorder.replica_gone(t)

    def _event(self, t: float, ev: Event) -> None:
        if ev.changes_config:  # the controller's config file changed: planned from the next interval
            new = apply_event(self.config, ev)
            if self.control is not None:
                self.control.set_config(self.config, new)
            self.config = new
            if ev.revoke_key is not None:
                self._revoking.add(ev.revoke_key)
            if self.control is None:  # no controller: the sidecars' own config changes at once
                self._deliver(t)
            self.recorder.mark_event(t, ev)
            return
        if ev.fail_replicas:
            ready = [r for r in self.replicas if r.state == "ready"]
            for r in ready[::-1][: ev.fail_replicas]:
                for call in list(r.calls.values()):
                    self._cut(t, r, call, "failed")
                r.state = "gone"
                self.recorder.replica_gone(t)
            self.lost += ev.fail_replicas
        else:
            self.lost = max(self.lost - (ev.restore_replicas or 0), 0)
        self.recorder.mark_event(t, ev)
        self._reconcile(t)

    def _deliver(self, t: float) -> None:
        """The sidecars receive the controller's config (the limits API's spec, with the plan):
        identities, tiers and ceilings follow it; a tenant gone is refused, its requests in
        flight finish as they started."""
        if self.held is self.config:
            return
        names = {e.name for e in self.config.entitlements}
        self.removed |= {n for n in self.ents if n not in names}
        self.removed -= names
        self.revoked |= self._revoking
        self._revoking = set()
        self.held = self.config
        self.ents = {e.name: e for e in self.held.entitlements}
        self.whole = {e.name: whole_limit(e) for e in self.held.entitlements}
        for r in self.replicas:
            for e in self.held.entitlements:
                if e.name not in r.metrics.stats:
                    r.metrics.stats[e.name] = EntitlementStats(e.name, e.tier.value)

    def _autoscale(self, t: float) -> None:
        assert self.hpa is not None
        if self.policy.replicas == "tokenpools":
            plan = self.control.plan if self.control is not None else None
            if plan is None:
                return  # GetMetrics is UNAVAILABLE until the first plan: KEDA keeps the replicas
            metric, target = float(plan.pools[self.pool.name].desired_replicas), 1.0
        else:
            for r in self.replicas:
                if r.state == "ready":
                    self._sync(r, t)
            metric = float(sum(r.engine.num_waiting for r in self.replicas if r.state == "ready"))
            target = self.sc.keda_queue.target_waiting
        current = self._count("starting", "ready")
        self.desired = self.hpa.desired(t, max(current, 1), metric, target)
        self._reconcile(t)

    # ---- the controller ----------------------------------------------------------------

    def _control(self, t: float) -> None:
        ready = [r for r in self.replicas if r.state == "ready"]
        for r in self.replicas:
            if r.state in ("ready", "draining"):
                self._sync(r, t)
        results: list[ScrapeResult] = []
        for r in ready:
            # tokens streamed so far are charged (the SSE path), call by call in sending order:
            # those whose first token came, and those whose first token the step in flight made
            streaming = list(r.streaming.values())
            if r.pending is not None:
                for req in r.pending.first_token:
                    call = r.calls.get(req.request_id)
                    if call is not None and call.rid not in r.streaming:
                        streaming.append(call)
            streaming.sort(key=lambda c: c.seq)
            for call in streaming:
                served = r.engine.get(call.rid)
                if served is not None and call.flight is not None and served.first_token_s is not None:
                    call.flight.streamed(served.output_tokens)
            pool = self.pool.name
            results.append(ScrapeResult(pool, "sidecar", f"{r.id}/sidecar", sidecar_samples(r.metrics)))
            results.append(ScrapeResult(pool, "engine", f"{r.id}/engine", collect_samples(r.registry)))
        obs = self.scraper.observe(results, t) if results else None
        plan = None
        if self.control is not None:
            plan = self.control.step(obs, t, failure=None if obs is not None else "no replica to scrape")
            if plan is not None:
                self._deliver(t)  # the spec comes with the plan's document
                for r in ready:
                    r.gate.apply(LimitsUpdate(self._limits_for(r, len(ready)), "fresh"), t)
        self.recorder.sample(t, obs, plan, self.replicas, self.desired)


def run_policy(loaded: LoadedScenario, policy: str, seed: int, duration_s: float, *, without_spot: bool = False,
               progress: Callable[[float], object] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run one policy (``without_spot``: the uncontended twin) and return its results."""
    return Run(loaded, policy, seed, duration_s, without_spot=without_spot).run(progress)

