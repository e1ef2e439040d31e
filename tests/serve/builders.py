"""Builders for the scaler tests: plans with chosen replica targets, KEDA-shaped requests, HPA arithmetic."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.plan import Plan
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState
from tokenscaler.serve._proto import externalscaler_pb2 as pb

PER_REPLICA_TOKENS_PER_S = 1000.0


def make_config(pools: Mapping[str, int] | None = None, *, min_replicas: int = 0) -> TokenPoolsConfig:
    """Pools named by ``pools`` (name -> max_replicas), each with one elastic entitlement ``<pool>-tenant``.

    ``target_utilization`` is 1, so a demand of ``d`` tokens/s needs ``ceil(d / 1000)`` replicas.
    """
    pools = pools or {"alpha": 40, "beta": 40}
    return TokenPoolsConfig.model_validate(
        {
            "pools": [
                {
                    "name": name,
                    "replica": {
                        "throughput_tokens_per_s": PER_REPLICA_TOKENS_PER_S,
                        "kv_tokens": 1e6,
                        "concurrency": 1e3,
                    },
                    "min_replicas": min_replicas,
                    "max_replicas": max_replicas,
                    "target_utilization": 1.0,
                }
                for name, max_replicas in pools.items()
            ],
            "entitlements": [{"name": f"{name}-tenant", "pool": name, "tier": "elastic"} for name in pools],
        }
    )


def make_plan(desired: Mapping[str, int], config: TokenPoolsConfig | None = None, now: float = 1000.0) -> Plan:
    """A real plan (``plan_interval``) whose pools have exactly the ``desired`` replica targets.

    Each pool's tenant demands a little less than ``desired`` replicas' throughput; a fresh
    planner state and no ready replicas mean no stabilization holds the target.
    """
    config = config or make_config({name: max(40, r) for name, r in desired.items()})
    rows = build_pool_rows(config)
    inputs = {}
    for name, replicas in desired.items():
        demand = np.zeros((rows[name].n, 3))
        if replicas > 0:
            demand[0, 0] = (replicas - 0.5) * PER_REPLICA_TOKENS_PER_S
        inputs[name] = PoolInput(ready_replicas=0, demand=demand)
    plan, _ = plan_interval(rows, inputs, PlannerState(), now=now, interval_s=10.0)
    got = {name: plan.pools[name].desired_replicas for name in desired}
    assert got == dict(desired), f"builder produced {got}, wanted {dict(desired)}"
    return plan


def ref(pool: str | None = "alpha", **extra: str) -> pb.ScaledObjectRef:
    """A ScaledObjectRef as KEDA sends it: the trigger's whole metadata map, scalerAddress included."""
    metadata = {"scalerAddress": "tokenscaler-controller.tokenscaler.svc:9090", **extra}
    if pool is not None:
        metadata["pool"] = pool
    return pb.ScaledObjectRef(name="llm", namespace="inference", scalerMetadata=metadata)


def metrics_request(pool: str | None = "alpha", metric_name: str | None = None, **extra: str) -> pb.GetMetricsRequest:
    name = metric_name if metric_name is not None else f"tokenscaler-{pool}"
    return pb.GetMetricsRequest(scaledObjectRef=ref(pool, **extra), metricName=name)


# --------------------------------------------------------------------------- KEDA and HPA arithmetic


def keda_target(spec: pb.MetricSpec) -> float:
    """KEDA's ``buildMetricSpecs``: ``targetSizeFloat`` when > 0, else ``targetSize`` (milli precision)."""
    value = spec.targetSizeFloat if spec.targetSizeFloat > 0 else float(spec.targetSize)
    return round(value * 1000) / 1000


def keda_value(value: pb.MetricValue) -> float:
    """KEDA's ``GetMetricsAndActivity``: ``metricValueFloat`` when > 0, else ``metricValue`` (milli precision)."""
    v = value.metricValueFloat if value.metricValueFloat > 0 else float(value.metricValue)
    return math.floor(v * 1000) / 1000


def hpa_average_value_replicas(
    current: int, values: list[float], target: float, tolerance_up: float = 0.1, tolerance_down: float = 0.1
) -> int:
    """The HPA's replicas for an External metric with an AverageValue target (before min/max and behaviour).

    kubernetes ``replica_calculator.go`` ``GetExternalPerPodMetricReplicas``: the values are
    summed; within the tolerance band around ``target x current`` the HPA keeps ``current``,
    otherwise it wants ``ceil(sum / target)``.
    """
    usage = sum(values)
    ratio = usage / (target * current) if current > 0 else math.inf
    if 1.0 - tolerance_down <= ratio <= 1.0 + tolerance_up:
        return current
    return math.ceil(usage / target)
