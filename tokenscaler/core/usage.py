"""The usage document: per-pool ready replicas, per-entitlement demand and received service.

The hand-written input of ``tokenscaler plan --usage FILE`` (an observation of metrics is
the other way in: :mod:`tokenscaler.core.demand`); :func:`to_inputs` turns it into one
:class:`~tokenscaler.core.inputs.PoolInput` per pool::

    {"pools": {POOL: {"ready_replicas": N}},
     "entitlements": {NAME: {"demand": VEC, "usage": VEC}}}

``usage`` (service actually received last interval) is optional; entitlements missing from
the document have zero demand. Names the config does not know are errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from tokenscaler.core.frozen import Frozen
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.model import N_DIMS, ResourceVector
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.validation import ConfigError, validate_document


class PoolUsage(Frozen):
    ready_replicas: int = Field(ge=0, description="Replicas ready to serve now.")


class EntitlementUsage(Frozen):
    demand: ResourceVector = Field(default_factory=ResourceVector, description="What it would use unthrottled.")
    usage: ResourceVector | None = Field(None, description="Service received last interval.")


class UsageDocument(Frozen):
    pools: dict[str, PoolUsage] = Field(default_factory=dict)
    entitlements: dict[str, EntitlementUsage] = Field(default_factory=dict)


def parse_usage(data: Any, source: str = "<usage>") -> UsageDocument:
    return validate_document(UsageDocument, data, source, "'pools' and 'entitlements'")


def to_inputs(doc: UsageDocument, rows: Mapping[str, PoolRows], source: str = "<usage>") -> dict[str, PoolInput]:
    """Arrays per pool from a usage document; unknown pool or entitlement names are errors."""
    errors = [f"pools[{name}]: unknown pool" for name in doc.pools if name not in rows]
    owner = {name: pool for pool, r in rows.items() for name in r.names}
    errors += [f"entitlements[{name}]: unknown entitlement" for name in doc.entitlements if name not in owner]
    if errors:
        raise ConfigError(source, errors)
    inputs: dict[str, PoolInput] = {}
    for pool, r in rows.items():
        demand = np.zeros((r.n, N_DIMS))
        usage = np.full((r.n, N_DIMS), np.nan)
        any_usage = False
        for i, name in enumerate(r.names):
            e = doc.entitlements.get(name)
            if e is None:
                continue
            demand[i] = e.demand.to_array()
            if e.usage is not None:
                usage[i] = e.usage.to_array()
                any_usage = True
        ready = doc.pools[pool].ready_replicas if pool in doc.pools else 0
        inputs[pool] = PoolInput(ready_replicas=ready, demand=demand, usage=usage if any_usage else None)
    return inputs
