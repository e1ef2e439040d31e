"""Config validation: every error names the field and the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.core.builders import make_config, make_entitlement, make_pool, vec
from tokenscaler.config import load_config
from tokenscaler.core.model import check_oversubscription, hash_api_key, parse_config
from tokenscaler.core.validation import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tokenpools.yaml"


def errors_of(doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    return exc.value.errors


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param(
            make_config(entitlements=[make_entitlement("a", pool="nope")]),
            ["entitlements[a].pool: unknown pool 'nope'"],
            id="unknown-pool",
        ),
        pytest.param(
            make_config(
                entitlements=[
                    make_entitlement("a", "guaranteed", guaranteed=vec(100, 5000, 10), limit={"kv_tokens": 4000})
                ]
            ),
            ["entitlements[a].guaranteed.kv_tokens (5000) must be <= limit.kv_tokens (4000)"],
            id="guarantee-above-limit",
        ),
        pytest.param(
            make_config(entitlements=[make_entitlement("a", "elastic", guaranteed=vec(1, 1, 1))]),
            ["entitlements[a].guaranteed: only the guaranteed tier may set a guarantee (tier is elastic)"],
            id="guarantee-on-elastic",
        ),
        pytest.param(
            make_config(entitlements=[{"name": "a", "pool": "p", "tier": "guaranteed"}]),
            ["entitlements[a].guaranteed: required for the guaranteed tier"],
            id="guaranteed-tier-without-guarantee",
        ),
        pytest.param(
            make_config(entitlements=[make_entitlement("a"), make_entitlement("a")]),
            ["entitlements[a].name: duplicate name 'a' (2 times)"],
            id="duplicate-entitlement",
        ),
        pytest.param(
            make_config(pools=[make_pool("p"), make_pool("p")]),
            ["pools[p].name: duplicate name 'p' (2 times)"],
            id="duplicate-pool",
        ),
        pytest.param(
            make_config(pools=[make_pool(min_replicas=5, max_replicas=3)]),
            ["pools[p].min_replicas (5) must be <= max_replicas (3)"],
            id="min-above-max",
        ),
        pytest.param(
            make_config(entitlements=[make_entitlement("a", tier="gold")]),
            ["entitlements[a].tier: Input should be 'guaranteed', 'elastic' or 'spot' (got 'gold')"],
            id="unknown-tier",
        ),
        pytest.param(
            make_config(entitlements=[make_entitlement("a", weight=0)]),
            ["entitlements[a].weight: Input should be greater than 0 (got 0)"],
            id="zero-weight",
        ),
        pytest.param(
            make_config(entitlements=[make_entitlement("a", limits={"kv_tokens": 1})]),
            ["entitlements[a].limits: Extra inputs are not permitted"],
            id="unknown-field-typo",
        ),
        pytest.param(
            make_config(pools=[make_pool(replica=vec(1000, 0, 10))]),
            ["pools[p].replica.kv_tokens (0) must be > 0"],
            id="zero-replica-capacity",
        ),
        pytest.param(
            make_config(pools=[make_pool(target_utilization=1.5)]),
            ["pools[p].target_utilization: Input should be less than or equal to 1 (got 1.5)"],
            id="utilization-above-one",
        ),
        pytest.param(
            make_config(entitlements=[make_entitlement("a", api_keys=["sk-plain-key"])]),
            ["entitlements[a].api_keys[0] must be a sha256 hex digest (64 hex characters), not a plain key"],
            id="plain-api-key",
        ),
        pytest.param(  # a plain key where the list belongs, or not a string: the value is never echoed
            make_config(
                entitlements=[make_entitlement("a", api_keys="sk-plain-key"), make_entitlement("b", api_keys=[7])]
            ),
            [
                "entitlements[a].api_keys: Input should be a valid list",
                "entitlements[b].api_keys[0]: Input should be a valid string",
            ],
            id="plain-api-key-not-echoed",
        ),
        pytest.param(
            make_config(
                entitlements=[
                    make_entitlement("a", api_keys=[hash_api_key("k")]),
                    make_entitlement("b", api_keys=[hash_api_key("k")]),
                ]
            ),
            ["entitlements[b].api_keys[0]: the same key digest already identifies entitlement 'a'"],
            id="api-key-shared",
        ),
        pytest.param(
            make_config(entitlements=[make_entitlement("Bad_Name")]),
            ["entitlements[Bad_Name].name: String should match pattern"],
            id="name-not-dns-label",
        ),
    ],
)
def test_invalid_config_names_field_and_value(doc: dict, expected: list[str]) -> None:
    errors = errors_of(doc)
    for want in expected:
        assert any(want in e for e in errors), f"{want!r} not in {errors}"


def test_plain_key_is_never_echoed() -> None:
    errors = errors_of(make_config(entitlements=[make_entitlement("a", api_keys=["sk-secret-123"])]))
    assert not any("sk-secret-123" in e for e in errors)


def test_oversubscription_names_pool_dimension_sum_and_capacity() -> None:
    # capacity at max: 2 replicas x 100,000 kv x 0.5 = 100,000; guarantees sum to 120,000
    doc = make_config(
        pools=[make_pool(max_replicas=2, target_utilization=0.5)],
        entitlements=[
            make_entitlement("a", "guaranteed", guaranteed=vec(100, 60000, 10)),
            make_entitlement("b", "guaranteed", guaranteed=vec(100, 60000, 10)),
        ],
    )
    errors = errors_of(doc)
    assert errors == [
        "pools[p]: guarantees oversubscribe kv_tokens: sum of guarantees 120000 > capacity 100000 "
        "(max_replicas 2 x replica.kv_tokens 100000 x target_utilization 0.5)"
    ]


def test_oversubscription_check_is_one_reusable_function() -> None:
    cfg = load_config(EXAMPLE)
    assert check_oversubscription(cfg.pools, cfg.entitlements) == []
    more = [*cfg.entitlements, *cfg.entitlements[:1]]  # the same guarantee sold twice more...
    assert check_oversubscription(cfg.pools, more * 3)  # ...and again: it no longer fits


def test_example_config_covers_all_tiers() -> None:
    cfg = load_config(EXAMPLE)
    assert {e.tier.value for e in cfg.entitlements} == {"guaranteed", "elastic", "spot"}
    assert cfg.key_index()[hash_api_key("sk-search-prod-demo")].name == "search-prod"


def test_models_are_frozen() -> None:
    cfg = load_config(EXAMPLE)
    with pytest.raises(ValueError):
        cfg.pools[0].max_replicas = 3  # type: ignore[misc]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenscaler", *args], capture_output=True, text=True, timeout=60)


def test_cli_validate_example_exits_zero() -> None:
    out = run_cli("validate", "--config", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1
    assert "ok: 1 pool(s), 5 entitlement(s)" in out.stdout


def test_cli_validate_oversubscribed_copy_exits_one(tmp_path: Path) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["entitlements"][0]["guaranteed"]["kv_tokens"] = 3_000_000
    doc["entitlements"][0]["limit"]["kv_tokens"] = 3_000_000
    bad = tmp_path / "oversubscribed.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = run_cli("validate", "--config", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "pools[llama-8b]: guarantees oversubscribe kv_tokens: sum of guarantees 3.3e+06 > capacity" in lines[0]
    assert "2.62482e+06" in lines[0]  # 8 x 410,128 x 0.8


def test_cli_validate_reports_each_error_on_its_own_line(tmp_path: Path) -> None:
    doc = make_config(
        pools=[make_pool(min_replicas=4, max_replicas=2)],
        entitlements=[make_entitlement("a", pool="ghost"), make_entitlement("b", weight=-1)],
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = run_cli("validate", "--config", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert any("pools[p].min_replicas (4) must be <= max_replicas (2)" in x for x in lines)
    assert any("entitlements[b].weight" in x and "(got -1)" in x for x in lines)


def test_cli_validate_unreadable_and_malformed_files(tmp_path: Path) -> None:
    assert run_cli("validate", "--config", str(tmp_path / "missing.yaml")).returncode == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("pools: [\n")
    out = run_cli("validate", "--config", str(broken))
    assert out.returncode == 1 and "not valid YAML" in out.stderr
