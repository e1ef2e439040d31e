"""Builders for controller end-to-end tests: configs sized to the demo engine, HTTP and gRPC calls."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import yaml

from tokenscaler.core.model import hash_api_key
from tokenscaler.serve._proto import externalscaler_pb2 as pb
from tokenscaler.serve._proto import externalscaler_pb2_grpc as pb_grpc

POOL = "demo"
# one `demo`-profile simulator: ~430-500 generated tokens/s at full batch, 6,144 KV tokens, 16 sequences
DEMO_REPLICA = {"throughput_tokens_per_s": 400, "kv_tokens": 6144, "concurrency": 16}
KEYS = {"gold": "sk-gold-test", "silver": "sk-silver-test", "bronze": "sk-bronze-test", "scrap": "sk-scrap-test"}


def demo_config(
    path: Path,
    *,
    max_replicas: int = 4,
    min_replicas: int = 1,
    entitlements: list | None = None,
    pool: dict[str, Any] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """The demo pool's config; ``pool`` adds keys to the pool (e.g. ``pricing``), ``extra`` to
    the named entitlements (e.g. ``{"silver": {"budget": {...}}}``)."""
    doc = {
        "pools": [
            {
                "name": POOL,
                "replica": DEMO_REPLICA,
                "min_replicas": min_replicas,
                "max_replicas": max_replicas,
                "target_utilization": 0.8,
                "token_weights": {"prompt": 0.25, "generation": 1.0},
                "scale_down": {"stabilization_s": 30, "max_step_replicas": 1},
                "default_max_tokens": 64,
                "max_model_len": 2048,
                "typical_request": {"prompt_tokens": 64, "output_tokens": 32},
            }
        ],
        "entitlements": entitlements
        if entitlements is not None
        else [
            {
                "name": "gold",
                "pool": POOL,
                "tier": "guaranteed",
                "priority": 10,
                "guaranteed": {"throughput_tokens_per_s": 200, "kv_tokens": 2048, "concurrency": 6},
                "burst": {"throughput_tokens_per_s": 400, "kv_tokens": 512, "concurrency": 2},
                "api_keys": [hash_api_key(KEYS["gold"])],
            },
            {
                "name": "silver",
                "pool": POOL,
                "tier": "elastic",
                "weight": 2,
                "burst": {"throughput_tokens_per_s": 200},
                "api_keys": [hash_api_key(KEYS["silver"])],
            },
            {
                "name": "bronze",
                "pool": POOL,
                "tier": "elastic",
                "weight": 1,
                "burst": {"throughput_tokens_per_s": 200},
                "api_keys": [hash_api_key(KEYS["bronze"])],
            },
            {"name": "scrap", "pool": POOL, "tier": "spot", "api_keys": [hash_api_key(KEYS["scrap"])]},
        ],
    }
    doc["pools"][0].update(pool or {})
    for e in doc["entitlements"]:
        e.update((extra or {}).get(e["name"], {}))
    path.write_text(yaml.safe_dump(doc))
    return path


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def get_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metric_value(metrics_text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


class KedaClient:
    """Calls the scaler the way KEDA does, through stubs generated from keda/externalscaler.proto."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.ExternalScalerStub(self.channel)

    def ref(self, pool: str = POOL) -> pb.ScaledObjectRef:
        return pb.ScaledObjectRef(
            name=f"{pool}-so", namespace="default", scalerMetadata={"scalerAddress": "x:1", "pool": pool}
        )

    def hpa_replicas(self, pool: str = POOL) -> int:
        """What an HPA with metricType AverageValue computes: ceil(sum(values) / target)."""
        spec = self.stub.GetMetricSpec(self.ref(pool), timeout=5).metricSpecs
        assert len(spec) == 1
        target = spec[0].targetSizeFloat or spec[0].targetSize
        values = self.stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=self.ref(pool), metricName=spec[0].metricName), timeout=5
        ).metricValues
        return math.ceil(sum(v.metricValueFloat or v.metricValue for v in values) / target)

    def is_active(self, pool: str = POOL) -> bool:
        return self.stub.IsActive(self.ref(pool), timeout=5).result

    def close(self) -> None:
        self.channel.close()
