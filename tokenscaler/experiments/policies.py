"""The policies an experiment compares, all on the same traffic and seed.

=====================  ==========================  ==================  ==========
policy                 admission                   replicas            engine
=====================  ==========================  ==================  ==========
``none``               none                        fixed               FCFS
``rpm``                static requests/minute      fixed               FCFS
``tpm``                static tokens/minute        fixed               FCFS
``keda-queue``         none                        HPA on queue depth  FCFS
``vtc``                none                        fixed               VTC
``paper``              token pools, paper weights  tokenscaler plan    FCFS
``tokenpools``         token pools                 tokenscaler plan    FCFS
``tokenpools-nodebt``  token pools, no debt        tokenscaler plan    FCFS
=====================  ==========================  ==================  ==========

``rpm`` and ``tpm`` are what AIBrix and LiteLLM (RPM, TPM) and Envoy AI Gateway (token
rate limits) offer: one counter per tenant at the gateway over fixed one-minute windows,
sized from the config. Each entitlement's tokens/s is its guarantee (guaranteed tier) or,
for elastic and spot, its weight's share of what the fixed replicas have left after the
guarantees (``replicas x replica x target_utilization``); RPM divides that by the pool's
typical request in weighted tokens. ``rpm`` counts a request when it is admitted; ``tpm``
admits while the minute's counted tokens are below the limit and counts a request's
weighted tokens when it completes, as LiteLLM does, so it overshoots by what is in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenscaler.core.model import THROUGHPUT, Tier, TokenPoolsConfig
from tokenscaler.core.weighting import DEFAULT_WEIGHTING, NoDebt, Weighting
from tokenscaler.experiments.paper_weighting import PaperWeighting


@dataclass(frozen=True)
class Policy:
    name: str
    admission: str  # none | rpm | tpm | tokenpools
    replicas: str  # fixed | tokenpools | keda-queue
    engine: str = "fcfs"  # fcfs | vtc
    weighting: str = "tokenpools"  # tokenpools | nodebt | paper

    def make_weighting(self, config: TokenPoolsConfig) -> Weighting:
        if self.weighting == "nodebt":
            return NoDebt()
        if self.weighting == "paper":
            return PaperWeighting({e.name: e.slo.ttft_p99_s for e in config.entitlements if e.slo and e.slo.ttft_p99_s})
        return DEFAULT_WEIGHTING


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("none", "none", "fixed"),
        Policy("rpm", "rpm", "fixed"),
        Policy("tpm", "tpm", "fixed"),
        Policy("keda-queue", "none", "keda-queue"),
        Policy("vtc", "none", "fixed", engine="vtc"),
        Policy("paper", "tokenpools", "tokenpools", weighting="paper"),
        Policy("tokenpools", "tokenpools", "tokenpools"),
        Policy("tokenpools-nodebt", "tokenpools", "tokenpools", weighting="nodebt"),
    )
}


def parse_policies(text: str) -> list[str]:
    """``all`` or a comma-separated list; unknown names are an error naming them."""
    if text.strip() == "all":
        return list(POLICIES)
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown or not names:
        known = ", ".join(POLICIES)
        raise ValueError(f"--policy: unknown policy {', '.join(unknown) or '(none)'} (known: {known}, all)")
    return list(dict.fromkeys(names))


def static_rates(config: TokenPoolsConfig, replicas: int) -> dict[str, float]:
    """Weighted tokens/s per entitlement for the static baselines (see the module docstring)."""
    pool = config.pools[0]
    ents = config.entitlements_of(pool.name)
    capacity = float(pool.planned_capacity(replicas)[THROUGHPUT])
    guaranteed = sum(float(e.guarantee_array()[THROUGHPUT]) for e in ents if e.tier is Tier.GUARANTEED)
    left = max(capacity - guaranteed, 0.0)
    weights = sum(e.weight for e in ents if e.tier is not Tier.GUARANTEED)
    out = {}
    for e in ents:
        if e.tier is Tier.GUARANTEED:
            out[e.name] = float(e.guarantee_array()[THROUGHPUT])
        else:
            out[e.name] = left * e.weight / weights if weights > 0 else 0.0
        cap = e.limit.throughput_tokens_per_s
        if cap is not None:
            out[e.name] = min(out[e.name], cap)
    return out


class WindowLimiter:
    """A gateway's per-tenant counter over fixed windows (LiteLLM's and AIBrix's shape)."""

    def __init__(self, limits: dict[str, float], window_s: float = 60.0) -> None:
        self.limits = limits
        self.window_s = window_s
        self._window: dict[str, int] = {}
        self._used: dict[str, float] = {}
        self._admitted: dict[tuple[str, int], float] = {}  # (tenant, window admitted in) -> served

    def _roll(self, tenant: str, now: float) -> float:
        w = math.floor(now / self.window_s)
        if self._window.get(tenant) != w:
            self._window[tenant] = w
            self._used[tenant] = 0.0
        return self._used[tenant]

    def allows(self, tenant: str, now: float) -> bool:
        return self._roll(tenant, now) < self.limits.get(tenant, math.inf)

    def count(self, tenant: str, amount: float, now: float) -> None:
        self._roll(tenant, now)
        self._used[tenant] += amount

    def served(self, tenant: str, amount: float, admitted_at: float) -> None:
        """Record ``amount`` served for a request admitted at ``admitted_at`` (the overshoot)."""
        key = (tenant, math.floor(admitted_at / self.window_s))
        self._admitted[key] = self._admitted.get(key, 0.0) + amount

    def overshoot(self) -> dict[str, dict[str, float]]:
        """Per tenant: what requests admitted in a window served above that window's limit,
        summed over windows (``tokens``), and the worst window's served / limit (``max_ratio``)."""
        out: dict[str, dict[str, float]] = {}
        for (tenant, _), amount in sorted(self._admitted.items()):
            limit = self.limits.get(tenant, math.inf)
            o = out.setdefault(tenant, {"tokens": 0.0, "max_ratio": 0.0, "limit_per_window": limit})
            o["tokens"] += max(amount - limit, 0.0)
            o["max_ratio"] = max(o["max_ratio"], amount / limit if limit > 0 else math.inf)
        return out


def gateway_limiter(policy: Policy, config: TokenPoolsConfig, replicas: int) -> WindowLimiter | None:
    """The static baseline's gateway counter (None for the other policies)."""
    if policy.admission not in ("rpm", "tpm"):
        return None
    pool = config.pools[0]
    rates = static_rates(config, replicas)
    if policy.admission == "tpm":
        return WindowLimiter({n: r * 60.0 for n, r in rates.items()})
    typical = float(pool.typical_request_vector()[THROUGHPUT])
    return WindowLimiter({n: r * 60.0 / typical for n, r in rates.items()})
