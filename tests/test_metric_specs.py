"""Every exporter exports its declared metric specs (``tokenscaler.core.metric_names``) exactly:
the sidecar, the controller (the loop, the plan, showback, the HTTP API's authentication) and
the KEDA scaler each export every spec of their group under its name, type, help and label
names, and nothing else; and the declared list cannot miss a metric."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.control.metrics import ControllerMetrics, PlanCollector, ShowbackCollector
from tokenscaler.control.store import PlanStore
from tokenscaler.core import metric_names
from tokenscaler.core.limiter import Limiter
from tokenscaler.core.metric_names import MetricSpec
from tokenscaler.core.observation import Observation, PoolSignals, SignalTable
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.step import ControlState, StepSettings, control_step
from tokenscaler.serve.auth import HttpAuth
from tokenscaler.serve.scaler_metrics import ScalerMetrics
from tokenscaler.sidecar.limits import StaticLimitsSource
from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics

# prometheus-client's own series beside a family: a counter's and histogram's creation time,
# a histogram's buckets, sum and count
_SUFFIXES = ("_created", "_bucket", "_sum", "_count", "_total")


def exported(registry: CollectorRegistry) -> dict[str, tuple[str, str, frozenset[str]]]:
    """Series name as queried (counters with ``_total``) -> (type, help, label names of its samples)."""
    out: dict[str, tuple[str, str, frozenset[str]]] = {}
    for family in registry.collect():
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = (family.type, family.documentation, labels)
    return out


def declared(specs: tuple[MetricSpec, ...]) -> dict[str, tuple[str, str, frozenset[str]]]:
    return {m.name: (m.type, m.help, frozenset(m.labels)) for m in specs}


def sidecar_registry() -> CollectorRegistry:
    cfg = config(
        [make_pool()],
        [make_entitlement("g", "guaranteed", guaranteed=vec(100, 10000, 10)), make_entitlement("s", "spot")],
    )
    limiter = Limiter(cfg.pool("p"))
    limiter.set_limits(StaticLimitsSource(cfg, "p").initial().limits, 0.0)
    metrics = SidecarMetrics("p", "r", limiter, [EntitlementStats(e.name, e.tier.value) for e in cfg.entitlements])
    metrics.latency("/v1/completions").observe(0.001)
    metrics.queue_wait.observe(0.1)
    metrics.engine_capacity, metrics.engine_max_model_len = {"kv_tokens": 6144.0}, 2048
    metrics.config_generation = 3  # once a controller's spec is in force
    return metrics.registry


def controller_registry() -> CollectorRegistry:
    cfg = config(
        [make_pool(min_replicas=2, pricing={"per_replica_hour": 2.0, "currency": "EUR"})],
        [make_entitlement("g", "guaranteed"),
         make_entitlement("e", "elastic", budget={"period": "week", "weighted_tokens": 1e6, "on_exhausted": "spot"})],
    )  # fmt: skip
    rows = build_pool_rows(cfg)
    values = np.array([[50.0, 50.0, np.nan, np.nan], [200.0, 200.0, np.nan, np.nan]])
    table = SignalTable(pools=["p", "p"], names=["g", "e"], values=values)
    state = ControlState()
    for k in range(3):
        obs = Observation(time=5.0 * k, pools={"p": PoolSignals(ready_replicas=2)}, signals=table)
        obs.pools["p"].state("r0", "kv_tokens", 50000.0)  # an engine states its KV: the capacity ratio
        state = control_step(rows, obs, state, 1_741_000_000.0 + 5.0 * k, StepSettings(interval_s=5.0)).state
    store = PlanStore()
    store.publish(state.plan, 0.0)
    registry = CollectorRegistry()
    registry.register(PlanCollector(store))
    registry.register(ShowbackCollector(lambda: state.ledgers))
    m = ControllerMetrics(registry)
    m.interval_duration.labels("total").observe(0.01)
    m.intervals.labels("ok").inc()
    m.source_errors.labels("timeout").inc()
    m.source_answers.labels("running", "ok").inc()
    m.state_write_errors.inc()
    m.api_requests.labels("limits", "200").inc()
    HttpAuth(registry)
    return registry


def scaler_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    m = ScalerMetrics(registry)
    m.finished("GetMetrics", grpc.StatusCode.OK, started=0.0)
    m.stale_answer("GetMetrics")
    m.stream_messages.inc()
    return registry


@pytest.mark.parametrize(
    ("build", "specs"),
    [
        (sidecar_registry, metric_names.SIDECAR_METRICS),
        (controller_registry, metric_names.CONTROLLER_METRICS),
        (scaler_registry, metric_names.SCALER_METRICS),
    ],
    ids=["sidecar", "controller", "scaler"],
)
def test_an_exporter_exports_exactly_its_declared_specs(
    build: Callable[[], CollectorRegistry], specs: tuple[MetricSpec, ...]
) -> None:
    assert exported(build()) == declared(specs)


def test_every_metric_constant_is_in_the_declared_list() -> None:
    """A name assigned outside a declaration (so missing from ALL_NAMES) fails here."""
    constants = {
        k: v for k, v in vars(metric_names).items()
        if k.isupper() and not k.startswith("_") and isinstance(v, str) and v.startswith("tokenscaler_")
        and v != metric_names.SIDECAR_PREFIX
    }  # fmt: skip
    assert set(constants.values()) == set(metric_names.ALL_NAMES)
    assert len(metric_names.ALL_NAMES) == len(set(metric_names.ALL_NAMES)) == len(metric_names.SPECS)


def test_a_spec_refuses_a_counter_without_total_and_an_unknown_type() -> None:
    with pytest.raises(ValueError, match="_total"):
        MetricSpec("tokenscaler_x", "counter", (), "x")
    with pytest.raises(ValueError, match="_total"):
        MetricSpec("tokenscaler_x_total", "gauge", (), "x")
    with pytest.raises(ValueError, match="type"):
        MetricSpec("tokenscaler_x", "summary", (), "x")
    assert MetricSpec("tokenscaler_x_total", "counter", (), "x").family_name == "tokenscaler_x"

