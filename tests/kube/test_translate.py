"""CRs <-> config (pure), `tokenscaler convert` both ways, and which status patches a plan calls for."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tokenscaler.config import load_config, load_usage
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.model import hash_api_key
from tokenscaler.core.plan import Plan
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState
from tokenscaler.core.usage import to_inputs
from tokenscaler.kube.translate import config_from_crs, config_to_crs, crs_yaml, merge_patch, status_patches

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "tokenpools.yaml"
USAGE = REPO / "examples" / "usage.json"
NOW = "2026-01-01T00:00:00Z"


def split(docs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return [d for d in docs if d["kind"] == "TokenPool"], [d for d in docs if d["kind"] == "Entitlement"]


def test_config_round_trips_through_crs() -> None:
    config = load_config(CONFIG)
    t = config_from_crs(*split(config_to_crs(config, "ns")))
    assert t.problems == {} and t.errors == []
    assert t.config is not None
    assert {p.name: p for p in t.config.pools} == {p.name: p for p in config.pools}
    assert {e.name: e for e in t.config.entitlements} == {e.name: e for e in config.entitlements}


def test_example_crs_are_the_convert_output() -> None:
    text = crs_yaml(load_config(CONFIG), "tokenscaler", "examples/tokenpools.yaml")
    assert (REPO / "examples" / "k8s" / "tokenpools.yaml").read_text() == text, (
        "run: tokenscaler convert --config examples/tokenpools.yaml --out examples/k8s/tokenpools.yaml"
    )


def test_convert_command_both_ways(tmp_path: Path) -> None:
    crs, back = tmp_path / "crs.yaml", tmp_path / "back.yaml"
    run = [sys.executable, "-m", "tokenscaler", "convert"]
    subprocess.run([*run, "--config", str(CONFIG), "--namespace", "x", "--out", str(crs)], check=True, timeout=60)
    docs = [d for d in yaml.safe_load_all(crs.read_text()) if d]
    assert {d["metadata"]["namespace"] for d in docs} == {"x"} and len(docs) == 6
    subprocess.run([*run, "--from-crs", str(crs), "--out", str(back)], check=True, timeout=60)
    a, b = load_config(CONFIG), load_config(back)
    assert sorted(a.pools, key=str) == sorted(b.pools, key=str)
    assert sorted(a.entitlements, key=lambda e: e.name) == sorted(b.entitlements, key=lambda e: e.name)
    bad = copy.deepcopy(docs)
    bad[1]["spec"]["tier"] = "gold"
    crs.write_text(yaml.safe_dump_all(bad))
    p = subprocess.run([*run, "--from-crs", str(crs)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "spec.tier" in p.stderr and "gold" in p.stderr


def test_bad_objects_are_left_out_and_named() -> None:
    pools, ents = split(config_to_crs(load_config(CONFIG), "ns"))
    ents[0]["spec"]["weight"] = -2
    ents[1]["spec"]["pool"] = "elsewhere"
    t = config_from_crs(pools, ents)
    assert t.config is not None and len(t.config.entitlements) == 3
    assert set(t.problems) == {("Entitlement", ents[0]["metadata"]["name"]), ("Entitlement", "chat-prod")}
    assert "spec.weight" in t.problems[("Entitlement", ents[0]["metadata"]["name"])]
    assert "elsewhere" in t.problems[("Entitlement", "chat-prod")]
    # valid one by one, oversubscribed together: no config (the caller keeps its last one)
    ents = split(config_to_crs(load_config(CONFIG), "ns"))[1]
    ents[0]["spec"]["guaranteed"]["throughput_tokens_per_s"] = 1e9
    ents[0]["spec"].pop("limit")
    t = config_from_crs(pools, ents)
    assert t.config is None and any("oversubscribe" in e for e in t.errors)


def example_plan() -> Plan:
    config = load_config(CONFIG)
    rows = build_pool_rows(config)
    plan, _ = plan_interval(rows, to_inputs(load_usage(USAGE), rows, str(USAGE)), PlannerState(), 1000.0, 5.0)
    return plan


def stored(docs: list[dict[str, Any]], gen: int = 1) -> list[dict[str, Any]]:
    for d in docs:
        d["metadata"]["generation"] = gen
    return docs


def apply(docs: list[dict[str, Any]], patches: list[Any]) -> None:
    by = {(("tokenpools" if d["kind"] == "TokenPool" else "entitlements"), d["metadata"]["name"]): d for d in docs}
    for p in patches:
        d = by[(p.plural, p.name)]
        status = {**(d.get("status") or {}), **p.body["status"]}
        d["status"] = {k: v for k, v in status.items() if v is not None}


def test_status_is_written_once_and_again_only_when_it_changes() -> None:
    config = load_config(CONFIG)
    pools, ents = (stored(x) for x in split(config_to_crs(config, "ns")))
    plan = example_plan()
    view = json.loads(json.dumps(plan.to_json()))  # what GET /v1/plan shows of the same plan
    patches = status_patches(pools, ents, config, plan, version=1, stale=False, now=NOW)
    assert len(patches) == 6
    pool_status = next(p for p in patches if p.plural == "tokenpools").body["status"]
    assert pool_status["desiredReplicas"] == view["pools"]["llama-8b"]["desired_replicas"]
    assert pool_status["capacity"]["configured"]["concurrency"] == 256 * view["pools"]["llama-8b"]["ready_replicas"]
    assert {c["type"]: c["status"] for c in pool_status["conditions"]} == {
        "Ready": "True", "GuaranteesFit": "True", "Stale": "False"
    }  # fmt: skip
    assert all(c["observedGeneration"] == 1 for c in pool_status["conditions"])
    research = next(p for p in patches if p.name == "research").body["status"]
    assert research["debt"] == float(f"{view['entitlements']['research']['debt']:.4g}") != 0  # 4 significant digits
    assert research["allocation"]["throughput_tokens_per_s"] > 0
    apply(pools + ents, patches)
    # the next plan with the same numbers: nothing to write (planVersion alone is not a change)
    assert status_patches(pools, ents, config, plan, version=2, stale=False, now="2026-01-01T00:00:05Z") == []
    # stale: every object's Stale condition flips, with a new transition time; Ready keeps its time
    patches = status_patches(pools, ents, config, plan, version=3, stale=True, now="2026-01-01T00:00:10Z")
    assert len(patches) == 6
    conds = {c["type"]: c for c in patches[0].body["status"]["conditions"]}
    assert conds["Stale"]["status"] == "True" and conds["Stale"]["lastTransitionTime"] == "2026-01-01T00:00:10Z"
    assert conds["Ready"]["lastTransitionTime"] == NOW


def test_a_guarantee_short_of_capacity_is_reported_on_pool_and_entitlement() -> None:
    # one ready replica and fifty times the example's demand: the guarantees do not fit
    config = load_config(CONFIG)
    rows = build_pool_rows(config)
    usage = to_inputs(load_usage(USAGE), rows, str(USAGE))
    short = {name: PoolInput(ready_replicas=1, demand=inp.demand * 50) for name, inp in usage.items()}
    plan, _ = plan_interval(rows, short, PlannerState(), 1000.0, 5.0)
    assert not plan.pools["llama-8b"].guarantees_fit
    pools, ents = (stored(x) for x in split(config_to_crs(config, "ns")))
    patches = {p.name: p.body["status"] for p in status_patches(pools, ents, config, plan, version=1, stale=False,
                                                                  now=NOW)}  # fmt: skip
    fit = {c["type"]: c for c in patches["llama-8b"]["conditions"]}["GuaranteesFit"]
    assert fit["status"] == "False" and fit["reason"] == "Shortfall" and "guarantees short by" in fit["message"]
    short_of = [e.name for e in config.entitlements if e.tier.value == "guaranteed"
                and plan.pools[e.pool].allocation.guarantee_shortfall[plan.pools[e.pool].rows.index[e.name]].any()]
    assert short_of
    for name in short_of:
        cond = {c["type"]: c for c in patches[name]["conditions"]}["GuaranteesFit"]
        assert cond["status"] == "False" and cond["reason"] == "Shortfall", name


def test_status_of_invalid_objects_says_why() -> None:
    config = load_config(CONFIG)
    pools, ents = (stored(x) for x in split(config_to_crs(config, "ns")))
    ghost = copy.deepcopy(ents[0])
    ghost["metadata"]["name"] = "ghost"
    patches = status_patches(
        pools, [*ents, ghost], config, example_plan(), version=1, stale=False, now=NOW,
        problems={("Entitlement", "ghost"): "spec.pool: no valid TokenPool 'x'"},
    )  # fmt: skip
    (g,) = [p for p in patches if p.name == "ghost"]
    (cond,) = g.body["status"]["conditions"]
    assert cond["reason"] == "Invalid" and "no valid TokenPool" in cond["message"]


def test_merge_patch_deletes_keys_that_went_away() -> None:
    assert merge_patch({"usage": {"kv_tokens": 1.0}, "debt": 1.0}, {"debt": 2.0}) == {
        "status": {"debt": 2.0, "usage": None}
    }
    assert merge_patch({"debt": 1.0, "planVersion": 1}, {"debt": 1.0, "planVersion": 2}) is None


# --------------------------------------------------------------------------- keys from a Secret

KEY_A, KEY_B = "sk-team-a-7f3c1e", "sk-team-a-rotated-92d4"
PLAIN = "sk-pasted-by-mistake-5b8e"


def keys_secret(name: str, type_: str = "tokenpools.io/api-key-digests", **values: str) -> dict[str, Any]:
    """A Secret as the API server returns it: data values base64."""
    data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": type_, "data": data}


def with_secret_ref(ent: dict[str, Any], secret: str) -> dict[str, Any]:
    out = copy.deepcopy(ent)
    out["spec"].pop("api_keys", None)
    out["spec"]["api_key_secret_ref"] = {"name": secret}
    return out


def test_an_entitlements_keys_come_from_the_secret_it_names() -> None:
    pools, ents = split(config_to_crs(load_config(CONFIG), "ns"))
    i = next(i for i, e in enumerate(ents) if e["metadata"]["name"] == "research")
    listed = list(ents[i]["spec"].get("api_keys", []))
    ents[i] = with_secret_ref(ents[i], "research-keys")
    ents[i]["spec"]["api_keys"] = listed  # both: the spec's and the Secret's
    a, b = hash_api_key(KEY_A), hash_api_key(KEY_B)
    secret = keys_secret("research-keys", laptop=f"{a}\n", ci=f"\n  SHA256:{b.upper()}  \n{a}\n")
    t = config_from_crs(pools, ents, {"research-keys": secret})
    assert t.config is not None and t.problems == {}
    research = next(e for e in t.config.entitlements if e.name == "research")
    assert research.api_keys == [*listed, b, a]  # data keys in order (ci, laptop), duplicates once
    assert t.config.key_index()[a].name == "research"
    cond = t.keys["research"]
    assert cond.ok and cond.reason == "Resolved" and cond.message == "2 key digest(s) from Secret research-keys"
    # without Secrets (the webhook's view), the spec's keys only and no condition
    plain = config_from_crs(pools, ents)
    assert plain.config is not None and plain.keys == {}
    assert next(e for e in plain.config.entitlements if e.name == "research").api_keys == listed


def test_a_secret_with_a_plain_key_or_missing_gives_no_keys_and_a_condition_without_the_value() -> None:
    pools, ents = split(config_to_crs(load_config(CONFIG), "ns"))
    i = next(i for i, e in enumerate(ents) if e["metadata"]["name"] == "research")
    ents[i] = with_secret_ref(ents[i], "research-keys")
    good = hash_api_key(KEY_A)
    bad = keys_secret("research-keys", primary=good, next=f"{good}\n{PLAIN}\n")
    t = config_from_crs(pools, ents, {"research-keys": bad})
    assert t.config is not None  # the entitlement stays planned, without any key of that Secret
    assert next(e for e in t.config.entitlements if e.name == "research").api_keys == []
    cond = t.keys["research"]
    assert not cond.ok and cond.reason == "InvalidDigest"
    assert "Secret research-keys data.next line 2: not a sha256 hex digest" in cond.message
    assert PLAIN not in cond.message and good not in cond.message
    for broken, reason in (
        ({}, "SecretNotFound"),
        ({"research-keys": keys_secret("research-keys", "Opaque", a=good)}, "InvalidDigest"),  # wrong type
        ({"research-keys": {**keys_secret("research-keys"), "data": {"a": "%%%"}}}, "InvalidDigest"),
    ):
        t = config_from_crs(pools, ents, broken)
        assert t.config is not None and t.keys["research"].reason == reason and not t.keys["research"].ok
    # the status carries the condition, never a digest
    config = load_config(CONFIG)
    t = config_from_crs(pools, ents, {"research-keys": bad})
    patches = status_patches(stored(pools), stored(ents), t.config, example_plan(), version=1, stale=False,
                             now=NOW, keys=t.keys)  # fmt: skip
    (research,) = [p for p in patches if p.name == "research"]
    conds = {c["type"]: c for c in research.body["status"]["conditions"]}
    assert conds["KeysResolved"]["status"] == "False" and conds["KeysResolved"]["reason"] == "InvalidDigest"
    text = json.dumps([p.body for p in patches])
    assert PLAIN not in text and all(k not in text for e in config.entitlements for k in e.api_keys)
    assert good not in text
    # an entitlement without a Secret reference has no KeysResolved condition
    (search,) = [p for p in patches if p.name == "search-prod"]
    assert "KeysResolved" not in {c["type"] for c in search.body["status"]["conditions"]}


def test_a_bad_secret_reference_is_named() -> None:
    pools, ents = split(config_to_crs(load_config(CONFIG), "ns"))
    ents[0]["spec"]["api_key_secret_ref"] = {"name": "Bad_Name"}
    t = config_from_crs(pools, ents, {})
    name = ents[0]["metadata"]["name"]
    assert "spec.api_key_secret_ref.name" in t.problems[("Entitlement", name)]
    assert name not in t.keys
