"""The simulator serves the table of vLLM's wire its readers use (``tokenscaler.core.vllm``):
every metric name in it, under its type, and a cache config whose KV capacity, read the way
the sidecar, the sources and the probe read it, is the profile's."""

from __future__ import annotations

import pytest

from tests.sim.builders import make_engine
from tokenscaler.core import metric_names, vllm
from tokenscaler.core.vllm import kv_capacity_tokens
from tokenscaler.sim.metrics import EngineCollector, build_registry


def test_the_simulator_serves_every_vllm_name_of_the_table_under_its_type() -> None:
    registry = build_registry(make_engine(), "m", process_metrics=False)
    served = {m.name: m.type for m in registry.collect()}
    expected = {
        **dict.fromkeys(vllm.GAUGES, "gauge"),
        **dict.fromkeys(vllm.COUNTERS, "counter"),
        **dict.fromkeys(vllm.HISTOGRAMS, "histogram"),
    }
    assert served == expected
    # what the controller reads of an engine is in the table (counters as their _total samples)
    samples = set(vllm.GAUGES) | {n + "_total" for n in vllm.COUNTERS}
    assert set(metric_names.ENGINE_NAMES) <= samples


def test_kv_capacity_of_the_simulators_cache_config_is_its_profiles() -> None:
    engine = make_engine()
    labels = EngineCollector(engine, "m").cache_config_labels()
    assert kv_capacity_tokens(labels) == engine.profile.kv_capacity_tokens > 0


@pytest.mark.parametrize(
    "labels",
    [{}, {"block_size": "16"}, *({"num_gpu_blocks": n, "block_size": "16"} for n in ("None", "0", "-4", "nan", "inf"))],
)  # fmt: skip
def test_kv_capacity_is_none_where_the_labels_do_not_state_one(labels: dict[str, str]) -> None:
    assert kv_capacity_tokens(labels) is None
