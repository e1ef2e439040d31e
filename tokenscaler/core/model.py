"""The capacity model: pools, entitlements, tiers and resource vectors.

One YAML (or JSON) document describes the pools of a fleet and the entitlements sold on
them. Every model is a frozen pydantic v2 model that forbids unknown fields, so a typo in a
config is an error that names the field, never a silently ignored key. The same models
back the Kubernetes CRDs; :func:`check_config` (cross-object rules) and
:func:`check_oversubscription` are the single place those rules live, reused by
``tokenscaler validate`` and by the Kubernetes webhook. :func:`parse_config` validates a
decoded document (:mod:`tokenscaler.core.validation` says what is wrong with one); reading
files is :mod:`tokenscaler.config`'s.

Every capacity, guarantee, limit, demand and usage is a vector over the three dimensions
of :data:`DIMENSIONS`; those keys are used verbatim in config, JSON output and the
``dimension`` label of metrics.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

import numpy as np
from pydantic import ConfigDict, Field, field_validator, model_validator

from tokenscaler.core.budget import Budget, OnExhausted
from tokenscaler.core.frozen import Frozen
from tokenscaler.core.validation import validate_document

DIMENSIONS: tuple[str, str, str] = ("throughput_tokens_per_s", "kv_tokens", "concurrency")
"""The three dimensions, in the column order of every array in the core."""

THROUGHPUT, KV, CONCURRENCY = 0, 1, 2
N_DIMS = len(DIMENSIONS)

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SHA256_RE = re.compile(r"^(sha256:)?[0-9a-f]{64}$")

Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        pattern=_NAME_RE.pattern,
        description="A DNS-1123 label: lowercase letters, digits and '-', at most 63 characters.",
    ),
]


class Tier(StrEnum):
    """Service tiers, in the strict order in which capacity is handed out."""

    GUARANTEED = "guaranteed"
    ELASTIC = "elastic"
    SPOT = "spot"

    @cached_property
    def rank(self) -> int:
        """The tier's index in :data:`TIER_ORDER` (0: first served). Computed once per member: the
        limiter reads it on every admission, for every reservation it may preempt."""
        return TIER_ORDER.index(self)


TIER_ORDER: tuple[Tier, Tier, Tier] = (Tier.GUARANTEED, Tier.ELASTIC, Tier.SPOT)


class _Frozen(Frozen):
    model_config = ConfigDict(populate_by_name=True)  # a field by its name or its alias


class ResourceVector(_Frozen):
    """An amount on each of the three dimensions. All components are >= 0."""

    throughput_tokens_per_s: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Weighted tokens per second (prompt and generated)."
    )
    kv_tokens: float = Field(0.0, ge=0, allow_inf_nan=False, description="Tokens resident in the KV cache.")
    concurrency: float = Field(0.0, ge=0, allow_inf_nan=False, description="Requests in flight.")

    def to_array(self) -> np.ndarray:
        return np.array([self.throughput_tokens_per_s, self.kv_tokens, self.concurrency], dtype=float)

    @classmethod
    def from_array(cls, values: Sequence[float] | np.ndarray) -> ResourceVector:
        return cls(**{d: float(v) for d, v in zip(DIMENSIONS, values, strict=True)})

    def items(self) -> Iterable[tuple[str, float]]:
        return ((d, getattr(self, d)) for d in DIMENSIONS)


class LimitVector(_Frozen):
    """A ceiling on each dimension; a missing (null) component means unlimited."""

    throughput_tokens_per_s: float | None = Field(None, ge=0, allow_inf_nan=False)
    kv_tokens: float | None = Field(None, ge=0, allow_inf_nan=False)
    concurrency: float | None = Field(None, ge=0, allow_inf_nan=False)

    def to_array(self) -> np.ndarray:
        """Components as floats, ``inf`` where unlimited."""
        return np.array([math.inf if (v := getattr(self, d)) is None else v for d in DIMENSIONS], dtype=float)


class TokenWeights(_Frozen):
    """How much one prompt token and one generated token count toward throughput."""

    prompt: float = Field(1.0, ge=0, allow_inf_nan=False, description="Weight of one prompt (prefill) token.")
    generation: float = Field(1.0, ge=0, allow_inf_nan=False, description="Weight of one generated token.")

    def weigh(self, prompt_tokens: float, generation_tokens: float) -> float:
        return self.prompt * prompt_tokens + self.generation * generation_tokens


class ScaleDown(_Frozen):
    """How fast a pool may shrink. Scale-up is never delayed."""

    stabilization_s: float = Field(
        300.0,
        ge=0,
        allow_inf_nan=False,
        description="A lower target takes effect only after it has been the highest target seen for this long.",
    )
    max_step_replicas: int = Field(1, ge=1, description="At most this many replicas are removed per planning interval.")


class TypicalRequest(_Frozen):
    """The request a per-replica limit must still admit (the floor of a split limit)."""

    prompt_tokens: int = Field(512, ge=1)
    output_tokens: int = Field(256, ge=1)


class Pricing(_Frozen):
    """What one replica of a pool costs, for showback statements in money (else replica-hours)."""

    per_replica_hour: float = Field(gt=0, allow_inf_nan=False, description="Price of one replica for one hour.")
    currency: str = Field(
        "USD", min_length=1, max_length=16, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$", description="e.g. USD, EUR."
    )


class IdleAttribution(StrEnum):
    """Who pays for a pool's idle replica time (target_utilization headroom, min_replicas,
    scale-down windows, replicas starting or draining)."""

    PLATFORM = "platform"  # the platform team (the ``_platform`` row of a statement)
    GUARANTEES = "guarantees"  # the guaranteed entitlements, pro rata to their reserved time


class Pool(_Frozen):
    """A fleet of identical replicas serving one model, and the capacity of one replica."""

    name: Name
    replica: ResourceVector = Field(description="Capacity of one replica on each dimension (all > 0).")
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(ge=1)
    target_utilization: float = Field(0.8, gt=0, le=1, description="How full a replica may be planned (0 < u <= 1).")
    token_weights: TokenWeights = TokenWeights()
    scale_down: ScaleDown = ScaleDown()
    default_max_tokens: int = Field(
        512, ge=1, description="Output budget assumed for a chat request that names no max_tokens."
    )
    max_model_len: int = Field(131072, ge=1, description="The engines' context window, in tokens.")
    typical_request: TypicalRequest = TypicalRequest()
    pricing: Pricing | None = Field(None, description="Price per replica-hour; showback is in replica-hours without.")
    idle_attribution: IdleAttribution = Field(
        IdleAttribution.PLATFORM, description="Who pays for idle replica time: platform, or guarantees pro rata."
    )

    @field_validator("replica")
    @classmethod
    def _replica_positive(cls, v: ResourceVector) -> ResourceVector:
        for d, x in v.items():
            if x <= 0:
                raise ValueError(f"replica.{d} ({x:g}) must be > 0")
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> Pool:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self

    def planned_capacity(self, replicas: int) -> np.ndarray:
        """What ``replicas`` replicas may be planned to carry (capacity x target_utilization)."""
        return self.replica.to_array() * (replicas * self.target_utilization)

    def typical_request_vector(self) -> np.ndarray:
        """Footprint of one typical request on each dimension (throughput as a token burst)."""
        t = self.typical_request
        return np.array(
            [self.token_weights.weigh(t.prompt_tokens, t.output_tokens), t.prompt_tokens + t.output_tokens, 1.0]
        )


class Slo(_Frozen):
    """Latency objectives (reported against; not enforced by the allocator)."""

    ttft_p99_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    tpot_p99_s: float | None = Field(None, gt=0, allow_inf_nan=False)


class DebtSettings(_Frozen):
    """How an elastic entitlement's debt evolves (see :mod:`tokenscaler.core.debt`)."""

    half_life_s: float = Field(300.0, gt=0, allow_inf_nan=False, description="Debt halves this often.")
    bound_share_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="|debt| never exceeds this, in dominant-share seconds (1.0 = the whole pool for 1 s).",
    )
    doubling_share_s: float = Field(
        5.0,
        gt=0,
        allow_inf_nan=False,
        description="Debt per unit of weight that doubles the effective weight (halves it when negative).",
    )


class Entitlement(_Frozen):
    """One tenant's share of a pool."""

    name: Name
    pool: Name
    tier: Tier
    priority: int = Field(0, description="Higher is served first within a tier.")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="Fair-share weight within a priority.")
    guaranteed: ResourceVector | None = Field(
        None, description="Always admitted and provisioned (guaranteed tier only)."
    )
    limit: LimitVector = Field(default_factory=LimitVector, description="Ceiling; null components are unlimited.")
    burst: ResourceVector = Field(
        default_factory=ResourceVector,
        description=(
            "Short-term allowance above the sustained limit: for throughput_tokens_per_s, the token "
            "bucket depth in weighted tokens; for kv_tokens and concurrency, an overshoot added to the limit."
        ),
    )
    slo: Slo | None = None
    debt: DebtSettings = DebtSettings()
    api_keys: list[str] = Field(
        default_factory=list, description="sha256 hex digests (optionally 'sha256:'-prefixed) of API keys."
    )
    budget: Budget | None = Field(
        None, description="A quota of weighted tokens per day, week or month (what happens when it is spent)."
    )

    @field_validator("api_keys")
    @classmethod
    def _hashed_keys(cls, keys: list[str]) -> list[str]:
        out = []
        for i, k in enumerate(keys):
            k_norm = k.strip().lower()
            if not _SHA256_RE.match(k_norm):
                # Never echo the value: it may be a plain key pasted by mistake.
                raise ValueError(f"api_keys[{i}] must be a sha256 hex digest (64 hex characters), not a plain key")
            out.append(k_norm.removeprefix("sha256:"))
        return out

    @model_validator(mode="after")
    def _tier_rules(self) -> Entitlement:
        if self.tier is Tier.GUARANTEED:
            if self.guaranteed is None:
                raise ValueError("guaranteed: required for the guaranteed tier")
        elif self.guaranteed is not None:
            raise ValueError(f"guaranteed: only the guaranteed tier may set a guarantee (tier is {self.tier.value})")
        if self.budget is not None and self.tier is Tier.SPOT and self.budget.on_exhausted is OnExhausted.SPOT:
            raise ValueError(
                "budget.on_exhausted ('spot') changes nothing for an entitlement of the spot tier: use 'refuse'"
            )
        if self.guaranteed is not None:
            for d, g in self.guaranteed.items():
                cap = getattr(self.limit, d)
                if cap is not None and g > cap:
                    raise ValueError(f"guaranteed.{d} ({g:g}) must be <= limit.{d} ({cap:g})")
        return self

    def guarantee_array(self) -> np.ndarray:
        return self.guaranteed.to_array() if self.guaranteed is not None else np.zeros(N_DIMS)


class TokenPoolsConfig(_Frozen):
    """A whole config file: pools and the entitlements sold on them."""

    pools: list[Pool] = Field(min_length=1)
    entitlements: list[Entitlement] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> TokenPoolsConfig:
        errors = check_config(self.pools, self.entitlements)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def pool(self, name: str) -> Pool:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    def entitlements_of(self, pool: str) -> list[Entitlement]:
        return [e for e in self.entitlements if e.pool == pool]

    def key_index(self) -> dict[str, Entitlement]:
        """sha256 digest of an API key -> its entitlement."""
        return {k: e for e in self.entitlements for k in e.api_keys}


def hash_api_key(key: str) -> str:
    """The digest under which an API key is listed in ``api_keys``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- checks


def check_config(pools: Sequence[Pool], entitlements: Sequence[Entitlement]) -> list[str]:
    """Cross-object rules: unique names, known pools, unique API keys, no oversubscription.

    Returns one message per violation, each naming the field and the values.
    """
    errors: list[str] = []
    for kind, names in (("pools", [p.name for p in pools]), ("entitlements", [e.name for e in entitlements])):
        for name, count in Counter(names).items():
            if count > 1:
                errors.append(f"{kind}[{name}].name: duplicate name {name!r} ({count} times)")
    known = {p.name for p in pools}
    for e in entitlements:
        if e.pool not in known:
            errors.append(f"entitlements[{e.name}].pool: unknown pool {e.pool!r} (known: {', '.join(sorted(known))})")
    owners: dict[str, str] = {}
    for e in entitlements:
        for i, k in enumerate(e.api_keys):
            if k in owners and owners[k] != e.name:
                errors.append(
                    f"entitlements[{e.name}].api_keys[{i}]: the same key digest already identifies "
                    f"entitlement {owners[k]!r}"
                )
            owners.setdefault(k, e.name)
    errors.extend(check_oversubscription(pools, entitlements))
    return errors


def check_oversubscription(pools: Sequence[Pool], entitlements: Sequence[Entitlement]) -> list[str]:
    """In each pool the guarantees must fit ``max_replicas x replica x target_utilization``.

    Returns one message per (pool, dimension) that does not fit, naming the sum and the
    capacity. This is the check the admission webhook runs on every CR change.
    """
    errors: list[str] = []
    for pool in pools:
        total = np.zeros(N_DIMS)
        for e in entitlements:
            if e.pool == pool.name:
                total += e.guarantee_array()
        cap = pool.planned_capacity(pool.max_replicas)
        for k, d in enumerate(DIMENSIONS):
            if total[k] > cap[k] * (1 + 1e-12):
                errors.append(
                    f"pools[{pool.name}]: guarantees oversubscribe {d}: sum of guarantees {total[k]:g} > "
                    f"capacity {cap[k]:g} (max_replicas {pool.max_replicas} x replica.{d} "
                    f"{getattr(pool.replica, d):g} x target_utilization {pool.target_utilization:g})"
                )
    return errors


def parse_config(data: Any, source: str = "<config>") -> TokenPoolsConfig:
    """Validate a decoded config document; raises :class:`~tokenscaler.core.validation.ConfigError`
    naming each field."""
    return validate_document(TokenPoolsConfig, data, source, "'pools' and 'entitlements'")
