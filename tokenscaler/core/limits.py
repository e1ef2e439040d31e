"""The limits document: what the controller's admission API serves to each sidecar.

``GET /v1/pools/{pool}/limits?replica={id}`` returns a :class:`LimitsDocument` (JSON) with
this replica's share of every entitlement's limits. The sidecar's HTTP limits source parses
exactly this model; the controller builds it from the plan. Both sides import it from here,
so the wire format has one definition.

Per entitlement, per dimension:

* ``limit``: the sustained limit on this replica: tokens/s refill rate of the throughput
  bucket (weighted tokens), and ceilings for reserved KV tokens and in-flight requests.
* ``burst``: the allowance above it: the throughput bucket's depth in weighted tokens, and
  an overshoot added to the KV and concurrency ceilings.
* ``ceiling`` and ``ceiling_burst``: what the entitlement may never exceed on this replica,
  backfill of idle capacity included: its *configured* limit and burst, split like its
  limits, with the same floors (a null ceiling component is unlimited). The controller
  sends them so that the bound across the pool follows the replicas actually running;
  without them (an older controller) the sidecar splits the configured limit over its
  ``--replicas``.

``expires_at`` tells the sidecar how long the document may be enforced without a newer
one; past it, a sidecar falls back to guaranteed floors (see the sidecar's fail-static
rules). ``version`` changes whenever the content changes and is also the HTTP ETag.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenscaler.core.model import LimitVector, ResourceVector, Tier

API_VERSION = "tokenscaler.io/v1alpha1"


class EntitlementLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tier: Tier
    priority: int = 0
    limit: ResourceVector
    burst: ResourceVector = Field(default_factory=ResourceVector)
    ceiling: LimitVector | None = Field(
        None, description="Never exceeded on this replica, backfill included (null component: unlimited)."
    )
    ceiling_burst: ResourceVector | None = Field(None, description="The allowance above the ceiling.")


class LimitsDocument(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api_version: Literal["tokenscaler.io/v1alpha1"] = API_VERSION
    kind: Literal["Limits"] = "Limits"
    pool: str
    replica: str | None = Field(None, description="The replica these limits are for; null when split evenly.")
    version: str = Field(description="Changes whenever the content changes; also the ETag.")
    generated_at: float = Field(description="Unix seconds when the plan behind it was made.")
    expires_at: float = Field(description="Unix seconds after which it must not be enforced as is.")
    stale: bool = Field(False, description="The controller is serving its last good plan (metrics missing).")
    entitlements: dict[str, EntitlementLimits]
