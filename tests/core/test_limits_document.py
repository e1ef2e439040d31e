"""The limits document the controller's limits API serves (``core/limits.py``): each entitlement's
ceiling follows the ready replicas and the replica's share of the load, as its limits do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.limits import LimitsDocument
from tokenscaler.core.limits import limits_document as make_document
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.plan import Plan
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState

CONFIG = TokenPoolsConfig.model_validate(
    {
        "pools": [
            {
                "name": "p",
                "replica": {"throughput_tokens_per_s": 4000, "kv_tokens": 100000, "concurrency": 64},
                "max_replicas": 16,
                "typical_request": {"prompt_tokens": 100, "output_tokens": 50},
            }
        ],
        "entitlements": [
            {
                "name": "capped",
                "pool": "p",
                "tier": "elastic",
                "limit": {"throughput_tokens_per_s": 2400, "kv_tokens": 48000, "concurrency": 24},
                "burst": {"throughput_tokens_per_s": 1200},
            },
            {"name": "open", "pool": "p", "tier": "spot"},
        ],
    }
)


Published = tuple[Plan, dict[str, dict[str, np.ndarray]]]  # the plan, and pool -> replica -> share of the load


def published(ready: int, shares: dict[str, list[float]] | None = None) -> Published:
    rows = build_pool_rows(CONFIG)
    demand = np.array([[1000.0, 20000.0, 10.0], [500.0, 5000.0, 2.0]])
    plan, _ = plan_interval(
        rows, {"p": PoolInput(ready_replicas=ready, demand=demand)}, PlannerState(), now=1000.0, interval_s=5.0
    )
    observed = {"p": {r: np.array(s) for r, s in (shares or {}).items()}}
    return plan, observed


def limits_document(pub: Published, pool: str, replica: str | None, ttl_s: float) -> dict:
    """The document as the limits API serves it (JSON): plan version 7, published at 1000."""
    plan, shares = pub
    doc = make_document(
        plan.pools[pool], shares.get(pool, {}), replica,
        version="7", generated_at=plan.now, expires_at=1000.0 + ttl_s, stale=False,
    )  # fmt: skip
    return json.loads(doc.model_dump_json())


def document(pub: Published, replica: str | None) -> LimitsDocument:
    # through JSON, as a sidecar receives it
    return LimitsDocument.model_validate_json(json.dumps(limits_document(pub, "p", replica, ttl_s=60.0)))


@pytest.mark.parametrize("ready", [2, 4, 8])
def test_the_ceiling_is_the_configured_limit_split_over_the_ready_replicas(ready: int) -> None:
    doc = document(published(ready), "r0")
    capped = doc.entitlements["capped"]
    assert capped.ceiling is not None and capped.ceiling_burst is not None
    assert capped.ceiling.throughput_tokens_per_s == pytest.approx(2400 / ready)
    assert capped.ceiling.kv_tokens == pytest.approx(48000 / ready)
    assert capped.ceiling.concurrency == pytest.approx(24 / ready)
    assert capped.ceiling_burst.throughput_tokens_per_s == pytest.approx(1200 / ready)
    # summed over the ready replicas the bound is the configured one, whatever their number
    assert capped.ceiling.throughput_tokens_per_s * ready == pytest.approx(2400)


def test_an_unlimited_component_is_null_on_the_wire() -> None:
    body = limits_document(published(4), "p", "r0", ttl_s=60.0)
    assert body["entitlements"]["open"]["ceiling"] == {
        "throughput_tokens_per_s": None,
        "kv_tokens": None,
        "concurrency": None,
    }
    json.dumps(body, allow_nan=False)  # strict JSON: no Infinity anywhere
    assert document(published(4), "r0").entitlements["open"].ceiling.to_array().tolist() == [np.inf] * 3


def test_the_ceiling_follows_the_replica_share_of_the_load_like_the_limit() -> None:
    # r0 sees 3/4 of capped's offered load, r1 a quarter; r2 has seen none of it (even share)
    pub = published(4, {"r0": [0.75, np.nan], "r1": [0.25, np.nan]})
    ceilings = {r: document(pub, r).entitlements["capped"].ceiling for r in ("r0", "r1", "r2")}
    assert ceilings["r0"].throughput_tokens_per_s == pytest.approx(2400 * 0.75)
    assert ceilings["r1"].throughput_tokens_per_s == pytest.approx(2400 * 0.25)
    assert ceilings["r2"].throughput_tokens_per_s == pytest.approx(2400 / 4)
    for r in ("r0", "r1", "r2"):
        limits = document(pub, r).entitlements["capped"]
        assert limits.limit.throughput_tokens_per_s <= limits.ceiling.throughput_tokens_per_s + 1e-9


def test_a_small_share_keeps_one_typical_request_admissible() -> None:
    # 16 replicas: 24 / 16 = 1.5 requests; KV 48000 / 16 = 3000 tokens, above one typical request (150)
    doc = document(published(16, {"r0": [0.01, np.nan]}), "r0")
    ceiling = doc.entitlements["capped"].ceiling
    # never below half an even share, and never below one typical request where the limit allows one
    assert ceiling.concurrency >= 1.0
    assert ceiling.kv_tokens >= 150.0
    assert ceiling.throughput_tokens_per_s == pytest.approx(2400 / 32)
