"""What an experiment measures, and the results.json shape it produces per policy.

The runner reports every request's fate (offered, refused and why, cut and why, completed
with its arrival, first token and last token) and, every interval, a sample of the fleet
(the same Observation the controller reads, and the engines' gauges). From those:

* per tier: TTFT and TPOT percentiles of completed requests, goodput (generated tokens/s of
  requests within their entitlement's SLO), the throttled fraction (refused / offered), SLO
  attainment (completed within SLO / completed, for tiers with an SLO);
* utilization per dimension, time-averaged over the samples with ready replicas while spot
  traffic is offered (the contended window; ``utilization_whole_run`` over all of them): throughput =
  weighted tokens the engines computed / (replica throughput x ready); KV = blocks held /
  (replica KV x ready); concurrency = running sequences / (replica concurrency x ready);
* fairness, for every policy alike: each interval, what weighted max-min fairness at the
  configured weights *owes* each tenant at the demand and capacity derived from the
  observation (a closed-loop tenant's demand scaled to its active slots, so refused retries
  do not count as more demand) (:func:`~tokenscaler.core.allocator.allocate`, the planner's own kernel) and
  what it *received* (its usage), both as dominant shares x interval. A tenant's
  ``cumulative_share_over_time`` is its received total over everyone's; ``fair_share`` is
  its owed total over everyone's at the end; Jain's index is over ``share / fair_share`` of
  the elastic tenants; ``convergence_interval_s`` is how long after the first capacity
  event (or the start) every elastic tenant stays within 5% of its fair share.
* showback, for every policy alike (:mod:`tokenscaler.experiments.showback`): each interval's
  replica time (every replica that ran: starting, ready or draining) split by the
  controller's rule into reserved, allocated, backfill and idle per tenant.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from tokenscaler.core.allocator import allocate, dominant_share
from tokenscaler.core.demand import DemandState, derive_inputs
from tokenscaler.core.inputs import align
from tokenscaler.core.model import DIMENSIONS, TokenPoolsConfig
from tokenscaler.core.observation import Observation
from tokenscaler.core.percentile import percentile
from tokenscaler.core.plan import Plan
from tokenscaler.core.rows import PoolRows
from tokenscaler.experiments.policies import Policy
from tokenscaler.experiments.scenario import Event, LoadedScenario
from tokenscaler.experiments.showback import ShowbackMeter
from tokenscaler.sim.engine import Engine

TIERS = ("guaranteed", "elastic", "spot")
CONVERGED = 0.05


class SampledReplica(Protocol):
    """What a sample reads of a replica (the runner's ``Replica``): its state, its engine, and
    the weighted tokens it had served at the last sample, which the sample moves on."""

    state: str
    engine: Engine
    served: float


class Recorder:
    def __init__(
        self, loaded: LoadedScenario, rows: PoolRows, policy: Policy, duration_s: float,
        config: TokenPoolsConfig | None = None,
    ) -> None:
        """``rows`` and ``config``: every entitlement the run ever has (config events add some)."""
        self.loaded = loaded
        self.rows = rows
        self.policy = policy
        self.duration = duration_s
        self.interval = loaded.scenario.interval_s
        self.names = list(rows.names)
        self.index = {n: i for i, n in enumerate(self.names)}
        ents = {e.name: e for e in (config or loaded.config).entitlements}
        self.ents = ents
        self.first_denied: dict[tuple[str, str], float] = {}  # (tenant, why) -> first refusal
        self.tier = [ents[n].tier.value for n in self.names]
        n = len(self.names)
        self.offered_n = np.zeros(n, dtype=np.int64)
        self.denied_n = np.zeros(n, dtype=np.int64)
        self.denied_why: dict[str, int] = {}
        self.cut_n = np.zeros(n, dtype=np.int64)
        self.cut_why: dict[str, int] = {}
        self.preempted_n = np.zeros(n, dtype=np.int64)
        self.completed_n = np.zeros(n, dtype=np.int64)
        # completed requests, columnar
        self.c_tenant = array("i")
        self.c_arrival = array("d")
        self.c_ttft = array("d")
        self.c_end = array("d")
        self.c_tpot = array("d")
        self.c_tokens = array("i")
        self.queue_max = 0
        self.live = 0
        self.live_since = 0.0
        self.replica_s = 0.0
        self.events: list[tuple[float, str]] = []
        # samples
        self.t: list[float] = []
        self.desired: list[int] = []
        self.ready: list[int] = []
        self.waiting: list[float] = []
        self.util: list[list[float]] = []
        self.cum_owed = np.zeros(n)
        self.cum_recv = np.zeros(n)
        self.share_t: list[np.ndarray] = []
        self.fair_t: list[np.ndarray] = []
        self.debt_t: list[np.ndarray] = []
        self.offered_t: list[np.ndarray] = []
        self.admitted_t: list[np.ndarray] = []
        self._last_offered = np.zeros(n, dtype=np.int64)
        self._last_completed = np.zeros(n, dtype=np.int64)
        self.peak_debt = np.zeros(n)
        self.demand_state = DemandState()
        self._last_t: float | None = None
        self.showback = ShowbackMeter(rows)

    # ---- per request -------------------------------------------------------------------

    def offered(self, t: float, tenant: str) -> None:
        self.offered_n[self.index[tenant]] += 1

    def denied(self, t: float, tenant: str, why: str) -> None:
        self.denied_n[self.index[tenant]] += 1
        self.first_denied.setdefault((tenant, why), t)
        self.denied_why[why] = self.denied_why.get(why, 0) + 1

    def cut(self, t: float, tenant: str, why: str) -> None:
        self.cut_n[self.index[tenant]] += 1
        self.cut_why[why] = self.cut_why.get(why, 0) + 1

    def preempted_count(self, tenant: str) -> None:
        self.preempted_n[self.index[tenant]] += 1

    def completed(self, tenant: str, arrival: float, first: float, end: float, tokens: int) -> None:
        i = self.index[tenant]
        self.completed_n[i] += 1
        self.c_tenant.append(i)
        self.c_arrival.append(arrival)
        self.c_ttft.append(first - arrival)
        self.c_end.append(end)
        self.c_tpot.append((end - first) / (tokens - 1) if tokens > 1 else 0.0)
        self.c_tokens.append(tokens)

    def queue_depth(self, n: int) -> None:
        if n > self.queue_max:
            self.queue_max = n

    # ---- replicas ----------------------------------------------------------------------

    def _integrate(self, t: float) -> None:
        self.replica_s += self.live * (t - self.live_since)
        self.live_since = t

    def replica_started(self, t: float) -> None:
        self._integrate(t)
        self.live += 1

    def replica_gone(self, t: float) -> None:
        self._integrate(t)
        self.live -= 1

    def mark_event(self, t: float, ev: Event) -> None:
        if ev.fail_replicas:
            what = f"fail {ev.fail_replicas}"
        elif ev.restore_replicas:
            what = f"restore {ev.restore_replicas}"
        elif ev.add_entitlement is not None:
            what = f"add {ev.add_entitlement.get('name')}"
        elif ev.remove_entitlement is not None:
            what = f"remove {ev.remove_entitlement}"
        elif ev.revoke_key is not None:
            what = f"revoke {ev.revoke_key}"
        else:
            assert ev.set is not None
            what = f"set {ev.set.entitlement + '.' if ev.set.entitlement else ''}{ev.set.field}={ev.set.value}"
        self.events.append((t, what))

    # ---- samples -----------------------------------------------------------------------

    def sample(
        self, t: float, obs: Observation | None, plan: Plan | None, replicas: Sequence[SampledReplica], desired: int
    ) -> None:
        pool = self.rows.pool
        ready = [r for r in replicas if r.state == "ready"]
        live = [r for r in replicas if r.state in ("ready", "draining")]
        dt = self.interval if self._last_t is None else t - self._last_t
        self._last_t = t
        cap = pool.replica.to_array()
        w_p, w_g = pool.token_weights.prompt, pool.token_weights.generation
        served = 0.0
        for r in live:
            st = r.engine.stats
            total = w_p * st.prompt_tokens + w_g * st.generation_tokens
            served += total - r.served
            r.served = total
        waiting = float(sum(r.engine.num_waiting for r in ready))
        self.t.append(t)
        self.desired.append(int(desired))
        self.ready.append(len(ready))
        self.waiting.append(waiting)
        if ready and t > 0:
            n = len(ready)
            kv = sum(r.engine.kv_cache_usage * r.engine.kv_capacity_tokens for r in ready)
            running = sum(r.engine.num_running for r in ready)
            self.util.append([served / dt / (cap[0] * n), kv / (cap[1] * n), running / (cap[2] * n)])
        else:
            self.util.append([math.nan] * 3)
        self._integrate(t)
        owed_now: np.ndarray | None = None
        usage_now: np.ndarray | None = None
        # fairness: owed at the configured weights vs received, from the observation
        if obs is not None and self.rows.n:
            derived = derive_inputs({pool.name: self.rows}, obs, self.demand_state, self.interval, 10.0)
            self.demand_state = derived.state
            inp = derived.inputs[pool.name]
            if inp.ready_replicas > 0:
                capacity = np.minimum(cap * inp.ready_replicas, inp.capacity if inp.capacity is not None else np.inf)
                owed = allocate(self.rows.problem, capacity, self._true_demand(t, inp.demand)).allocation
                usage = np.nan_to_num(inp.usage if inp.usage is not None else np.zeros_like(owed), nan=0.0)
                norm = self.rows.problem.normalization
                self.cum_owed += dominant_share(owed, norm) * dt
                self.cum_recv += dominant_share(np.maximum(usage, 0.0), norm) * dt
                owed_now, usage_now = owed, usage
        self.showback.sample(
            t, self.replica_s, len(ready), plan.pools[pool.name] if plan is not None else None, owed_now, usage_now
        )
        self.share_t.append(self.cum_recv / max(self.cum_recv.sum(), 1e-12))
        self.fair_t.append(self.cum_owed / max(self.cum_owed.sum(), 1e-12))
        if plan is not None:
            pp = plan.pools[pool.name]
            debt = align(np.asarray(pp.debt, dtype=float), pp.rows.names, self.rows, 0.0)
            self.peak_debt = np.maximum(self.peak_debt, debt)
            self.debt_t.append(debt)
        else:
            self.debt_t.append(np.zeros(self.rows.n))
        self.offered_t.append(self.offered_n - self._last_offered)
        self.admitted_t.append(self.completed_n - self._last_completed)
        self._last_offered = self.offered_n.copy()
        self._last_completed = self.completed_n.copy()

    def _true_demand(self, t: float, derived: np.ndarray) -> np.ndarray:
        """The derived demand, with closed-loop tenants' retries taken out: a tenant whose
        traffic is slots wants exactly its active slots in flight (its derived demand, which
        counts every refused retry as offered load, is scaled to that concurrency)."""
        demand = derived.copy()
        for i, name in enumerate(self.names):
            slots = sum(
                s.slots.count
                for s in self.loaded.scenario.traffic.get(name, [])
                if s.slots is not None and s.start_s <= t < (s.end_s if s.end_s is not None else math.inf)
            )
            if slots and demand[i, 2] > 0:
                demand[i] *= slots / demand[i, 2]
        return demand

    # ---- results -----------------------------------------------------------------------

    def _slo_ok(self, tenant_idx: np.ndarray, ttft: np.ndarray, tpot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(has an SLO, within it) per completed request."""
        ttft_slo = np.array([self._slo(n, "ttft_p99_s") for n in self.names])[tenant_idx]
        tpot_slo = np.array([self._slo(n, "tpot_p99_s") for n in self.names])[tenant_idx]
        has = ~np.isnan(ttft_slo) | ~np.isnan(tpot_slo)
        ok = (np.isnan(ttft_slo) | (ttft <= ttft_slo)) & (np.isnan(tpot_slo) | (tpot <= tpot_slo))
        return has, ok

    def _slo(self, name: str, key: str) -> float:
        slo = self.ents[name].slo
        v = getattr(slo, key) if slo is not None else None
        return math.nan if v is None else float(v)

    def ttft_p99_in(self, lo: float, hi: float) -> dict[str, float | None]:
        """Per tier, p99 TTFT of the completed requests sent in ``[lo, hi)`` (the demo's phases)."""
        if not self.c_tenant:
            return {}
        ti = np.frombuffer(self.c_tenant, dtype=np.int32).astype(np.int64)
        arrival = np.frombuffer(self.c_arrival)
        ttft = np.frombuffer(self.c_ttft)
        tier_idx = np.array([TIERS.index(t) for t in self.tier], dtype=np.int64)[ti]
        inside = (arrival >= lo) & (arrival < hi)
        return {
            tier: percentile(ttft[inside & (tier_idx == k)], 99) for k, tier in enumerate(TIERS) if tier in self.tier
        }

    def result(self, end: float) -> dict:
        self._integrate(end)
        ti = np.frombuffer(self.c_tenant, dtype=np.int32).astype(np.int64) if self.c_tenant else np.zeros(0, np.int64)
        ttft = np.frombuffer(self.c_ttft) if self.c_ttft else np.zeros(0)
        tpot = np.frombuffer(self.c_tpot) if self.c_tpot else np.zeros(0)
        first = (np.frombuffer(self.c_arrival) + ttft) if self.c_arrival else np.zeros(0)
        tokens = np.frombuffer(self.c_tokens, dtype=np.int32).astype(float) if self.c_tokens else np.zeros(0)
        tier_idx = np.array([TIERS.index(t) for t in self.tier], dtype=np.int64)
        req_tier = tier_idx[ti] if ti.size else np.zeros(0, np.int64)
        has_slo, ok = self._slo_ok(ti, ttft, tpot) if ti.size else (np.zeros(0, bool), np.zeros(0, bool))
        tiers = {}
        for k, tier in enumerate(TIERS):
            members = tier_idx == k
            if not members.any():
                continue
            sel = req_tier == k
            offered = int(self.offered_n[members].sum())
            with_slo = sel & has_slo
            tiers[tier] = {
                "ttft_p50_s": percentile(ttft[sel], 50),
                "ttft_p99_s": percentile(ttft[sel], 99),
                "tpot_p50_s": percentile(tpot[sel & (tokens > 1)], 50),
                "tpot_p99_s": percentile(tpot[sel & (tokens > 1)], 99),
                "goodput_tokens_per_s": float(tokens[sel & ok].sum() / self.duration),
                "throttled_fraction": float(self.denied_n[members].sum() / offered) if offered else 0.0,
                "cut_fraction": float(self.cut_n[members].sum() / offered) if offered else 0.0,
                "slo_attainment": float(ok[with_slo].mean()) if with_slo.any() else None,
                "completed": int(sel.sum()),
                "offered": offered,
            }
        # p99 TTFT over time, by the window in which the first token came
        edges = np.asarray([*self.t, end])
        over_time: dict[str, list[list[float]]] = {}
        for k, tier in enumerate(TIERS):
            if tier not in tiers:
                continue
            sel = req_tier == k
            win = np.searchsorted(edges, first[sel], side="right") - 1
            vals = ttft[sel]
            series = []
            for w in range(len(self.t)):
                v = vals[win == w]
                if v.size:
                    series.append([edges[w + 1], percentile(v, 99)])
            over_time[tier] = series
        util = np.asarray(self.util, dtype=float)
        valid = ~np.isnan(util).any(axis=1) if util.size else np.zeros(0, bool)
        whole = {d: float(util[valid, k].mean()) if valid.any() else 0.0 for k, d in enumerate(DIMENSIONS)}
        # the contended window: while spot traffic is offered (the whole run without spot)
        lo, hi = self._spot_window(end)
        tt = np.asarray(self.t)
        peak = valid & (tt > lo) & (tt <= hi) if util.size else valid
        utilization = {d: float(util[peak, k].mean()) if peak.any() else whole[d] for k, d in enumerate(DIMENSIONS)}
        share_t = np.asarray(self.share_t)
        fair_t = np.asarray(self.fair_t)
        fair_end = fair_t[-1] if len(fair_t) else np.zeros(len(self.names))
        elastic = np.array([t == "elastic" for t in self.tier])
        jain, conv = self._jain_and_convergence(share_t, fair_t, elastic)
        tenants = {}
        for i, name in enumerate(self.names):
            tenants[name] = {
                "tier": self.tier[i],
                "weight": float(self.ents[name].weight),
                "cumulative_share_over_time": [[self.t[j], float(share_t[j, i])] for j in range(len(self.t))],
                "fair_share": float(fair_end[i]),
                "fair_share_over_time": [[self.t[j], float(fair_t[j, i])] for j in range(len(self.t))],
                "peak_debt": float(self.peak_debt[i]),
                "admitted": int(self.completed_n[i]),
                "denied": int(self.denied_n[i]),
                "offered": int(self.offered_n[i]),
                "cut": int(self.cut_n[i]),
                "preempted": int(self.preempted_n[i]),
            }
        return {
            "tiers": tiers,
            "day_two": self._day_two(ti, first, ttft, end),
            "utilization": utilization,
            "utilization_window_s": [lo, hi],
            "utilization_whole_run": whole,
            "replica_seconds": float(self.replica_s),
            "showback": self.showback.result(end, self.replica_s),
            "queue_depth_max": int(self.queue_max),
            "ttft_p99_s_over_time": over_time,
            "tenants": tenants,
            "jain_index_over_time": jain,
            "convergence_interval_s": conv,
            "refusals_by_reason": dict(sorted(self.denied_why.items())),
            "cuts_by_reason": dict(sorted(self.cut_why.items())),
            "events": [[t, what] for t, what in self.events],
            "series": {
                "t_s": list(self.t),
                "desired_replicas": list(self.desired),
                "ready_replicas": list(self.ready),
                "waiting_requests": list(self.waiting),
                "utilization": {d: [float(x) for x in util[:, k]] for k, d in enumerate(DIMENSIONS)} if util.size
                else {},
                "offered_per_interval": {n: [int(x[i]) for x in self.offered_t] for i, n in enumerate(self.names)},
                "completed_per_interval": {n: [int(x[i]) for x in self.admitted_t] for i, n in enumerate(self.names)},
                "debt": {n: [float(x[i]) for x in self.debt_t] for i, n in enumerate(self.names)},
            },
        }

    def _day_two(self, ti: np.ndarray, first: np.ndarray, ttft: np.ndarray, end: float) -> dict[str, Any]:
        """The config events' outcome: each tenant onboarded, its p99 TTFT over its first minute
        against its SLO; each tenant whose keys were revoked, when it was first refused for it
        and how many of its requests were served that arrived after the next interval."""
        out: dict[str, Any] = {"onboarded": {}, "revoked": {}, "removed": {}}
        arrival = first - ttft
        for ev in self.loaded.scenario.events:
            if ev.add_entitlement is not None:
                name = str(ev.add_entitlement.get("name"))
                i = self.index[name]
                sel = (ti == i) & (arrival >= ev.at_s) & (arrival < ev.at_s + 60.0)
                p99 = percentile(ttft[sel], 99)
                slo = self._slo(name, "ttft_p99_s")
                out["onboarded"][name] = {
                    "at_s": ev.at_s, "completed_first_minute": int(sel.sum()), "ttft_p99_first_minute_s": p99,
                    "slo_ttft_p99_s": None if math.isnan(slo) else slo,
                    "within_slo": None if p99 is None or math.isnan(slo) else bool(p99 <= slo),
                }  # fmt: skip
            for kind, gone in (("revoked", ev.revoke_key), ("removed", ev.remove_entitlement)):
                if gone is None:
                    continue
                i = self.index[gone]
                late = (ti == i) & (arrival > ev.at_s + self.interval)
                out[kind][gone] = {
                    "at_s": ev.at_s, "first_refused_s": self.first_denied.get((gone, kind)),
                    "served_after_next_interval": int(late.sum()),
                }  # fmt: skip
        return out

    def _spot_window(self, end: float) -> tuple[float, float]:
        spans = [
            (s.start_s, s.end_s if s.end_s is not None else end)
            for name, sources in self.loaded.scenario.traffic.items()
            if name in self.loaded.spot
            for s in sources
        ]
        if not spans:
            return 0.0, end
        return min(a for a, _ in spans), min(max(b for _, b in spans), end)

    def _jain_and_convergence(
        self, share_t: np.ndarray, fair_t: np.ndarray, elastic: np.ndarray
    ) -> tuple[list[list[float]], float | None]:
        jain: list[list[float]] = []
        within: list[bool] = []
        for j, t in enumerate(self.t):
            fair = fair_t[j]
            sel = elastic & (fair > 0)
            if sel.sum() < 1:
                continue
            x = share_t[j, sel] / fair[sel]
            jain.append([t, float(x.sum() ** 2 / (sel.sum() * (x**2).sum())) if (x**2).sum() > 0 else 0.0])
            within.append(bool(np.all(np.abs(x - 1) <= CONVERGED)))
        if not within:
            return jain, None
        start = self.events[0][0] if self.events else 0.0
        times = [t for t, _ in jain]
        conv_at = None
        for k in range(len(within) - 1, -1, -1):
            if not within[k]:
                break
            conv_at = times[k]
        if conv_at is None:
            return jain, None
        return jain, max(conv_at - start, 0.0)
