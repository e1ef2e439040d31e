"""The experiments harness, end to end on shortened shipped scenarios: the orderings hold.

Each scenario runs with ``--duration-s`` cut so the whole file stays well under two minutes
on one core; the assertions are orderings between policies (who keeps the guarantee, who
converges), not the absolute figures of the full-length runs (BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenscaler.cli import main
from tokenscaler.core.showback import BASES
from tokenscaler.core.validation import ConfigError
from tokenscaler.experiments.scenario import load_scenario
from tokenscaler.experiments.suite import run_experiment


def _g(res: dict, pol: str, tier: str = "guaranteed") -> dict:
    return res["policies"][pol]["tiers"][tier]


def _ratio(res: dict, pol: str) -> float:
    g = _g(res, pol)
    return g["ttft_p99_s"] / g["uncontended_ttft_p99_s"]


def test_paper_overload_guarantee_holds_only_with_token_pools(tmp_path: Path) -> None:
    out = tmp_path / "po"
    assert main(["experiment", "paper-overload", "--policy", "none,rpm,tokenpools", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert _ratio(res, "tokenpools") <= 1.5
    assert _g(res, "tokenpools")["ttft_p99_s"] <= 1.2
    assert _ratio(res, "none") >= 10 * _ratio(res, "tokenpools")
    # token pools fill the slots spot leaves; a static request rate leaves them idle
    tp = res["policies"]["tokenpools"]["utilization"]["concurrency"]
    assert tp >= 0.9
    assert res["policies"]["rpm"]["utilization"]["concurrency"] < tp - 0.2
    assert (out / "report.md").is_file() and (out / "ttft_p99_over_time.png").is_file()


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["experiment", "paper-overload", "--policy", "tokenpools,vtc", "--seed", "3",
                     "--duration-s", "40", "--out", str(tmp_path / name), "--no-report"]) == 0  # fmt: skip
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert main(["experiment", "paper-overload", "--policy", "tokenpools", "--seed", "4",
                 "--duration-s", "40", "--out", str(tmp_path / "c"), "--no-report"]) == 0  # fmt: skip
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert a["seed"] == 3 and set(a["policies"]) == {"tokenpools", "vtc"}


def test_paper_fairshare_converges_and_rate_limits_do_not() -> None:
    res = run_experiment("paper-fairshare", ["tokenpools", "rpm"], 7, 300.0, 1)
    for pol, ok in (("tokenpools", True), ("rpm", False)):
        tenants = res["policies"][pol]["tenants"]
        off = max(abs(t["cumulative_share_over_time"][-1][1] / t["fair_share"] - 1) for t in tenants.values())
        assert (off <= 0.05) is ok, (pol, off)
    assert res["policies"]["tokenpools"]["jain_index_over_time"][-1][1] >= 0.99


def test_overload_short_orders_policies() -> None:
    res = run_experiment("overload", ["none", "tokenpools"], 7, 900.0, 2)
    assert _ratio(res, "tokenpools") <= 1.5
    assert _ratio(res, "none") >= 10
    # no replica-second for spot: the same replicas with and without spot traffic
    tp = res["policies"]["tokenpools"]
    assert tp["replica_seconds"] == pytest.approx(tp["replica_seconds_uncontended"], rel=0.05)
    # showback: each policy's parts add up to its replica-seconds; spot is charged backfill only
    for pol, r in res["policies"].items():
        sb = r["showback"]
        parts = sum(t[f"{b}_replica_seconds"] for t in sb["tenants"].values() for b in BASES)
        assert parts + sb["platform"]["idle_replica_seconds"] == pytest.approx(r["replica_seconds"], rel=1e-3), pol
        for name, t in sb["tenants"].items():
            if t["tier"] == "spot":
                assert t["reserved_replica_seconds"] == t["allocated_replica_seconds"] == 0, (pol, name)
                assert t["idle_replica_seconds"] == 0, (pol, name)
    assert sum(t["backfill_replica_seconds"] for t in tp["showback"]["tenants"].values() if t["tier"] == "spot") > 0
    # the guaranteed tenants' reserved time is the same with and without the spot flood
    for name, t in tp["showback"]["tenants"].items():
        if t["tier"] == "guaranteed":
            without = tp["showback_uncontended"]["tenants"][name]["reserved_replica_seconds"]
            assert t["reserved_replica_seconds"] == pytest.approx(without, rel=0.01), name


def test_scenario_errors_name_field_and_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "duration_s: 10\nprofile: demo\nconfig: {pools: [{name: p, replica: {throughput_tokens_per_s: 1, "
        "kv_tokens: 1, concurrency: 1}, max_replicas: 1}]}\ntraffic: {nobody: [{poisson: {rate_rps: -1, "
        "prompt_tokens: 1, output_tokens: 1}}]}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_scenario(str(bad))
    assert "rate_rps" in str(e.value) and "-1" in str(e.value)
    bad.write_text(bad.read_text().replace("rate_rps: -1", "rate_rps: 1"))
    with pytest.raises(ConfigError) as e:
        load_scenario(str(bad))
    assert "traffic.nobody" in str(e.value)
    assert main(["experiment", "paper-overload", "--policy", "nonsense", "--out", str(tmp_path)]) == 2


def test_fairshare_debt_repays_the_lagged_tenant_and_nodebt_does_not() -> None:
    res = run_experiment("fairshare", ["tokenpools", "tokenpools-nodebt"], 7, 900.0, 2)
    off = {}
    for pol in ("tokenpools", "tokenpools-nodebt"):
        tenants = res["policies"][pol]["tenants"]
        off[pol] = max(abs(t["cumulative_share_over_time"][-1][1] / t["fair_share"] - 1) for t in tenants.values())
    assert off["tokenpools"] <= 0.05, off
    assert off["tokenpools-nodebt"] > 0.05, off
    assert res["policies"]["tokenpools"]["jain_index_over_time"][-1][1] >= 0.99
    # the on/off tenant is the one debt repays
    assert res["policies"]["tokenpools"]["tenants"]["assist"]["peak_debt"] > 0


def test_burst_token_pools_keep_the_guarantee_rate_limits_do_not() -> None:
    res = run_experiment("burst", ["tokenpools", "rpm", "tpm"], 7, 600.0, 2)
    slo = 0.5  # burst.yaml: search's ttft_p99_s
    assert _g(res, "tokenpools")["ttft_p99_s"] <= slo
    assert _g(res, "rpm")["ttft_p99_s"] > slo and _g(res, "tpm")["ttft_p99_s"] > slo
    over = res["policies"]["tpm"]["tpm_overshoot"]
    assert over["longctx"]["max_ratio"] > 1.5 and over["longctx"]["tokens"] > 0


def test_long_prompt_spot_keeps_its_distance_from_the_guarantee() -> None:
    """Spot prompts of 5k-30k tokens on the engine's defaults: token pools keep guaranteed p99 TTFT
    within 1.5x of the run without spot and count no tier inversion; without admission control the
    long prefills sit in front of guaranteed prompts."""
    res = run_experiment("long-prompt", ["tokenpools", "none"], 7, 1200.0, 2)
    assert _ratio(res, "tokenpools") <= 1.5
    assert res["policies"]["tokenpools"]["tier_inversions"] == 0
    assert _ratio(res, "none") > 3 * _ratio(res, "tokenpools")


def test_onboarding_serves_the_new_tenant_within_its_slo_and_refuses_the_revoked_key(tmp_path: Path) -> None:
    """Scenario onboarding, shortened past its two events: the guaranteed tenant added at 300 s
    is within its SLO over its first minute, and the tenant whose keys are revoked at 600 s is
    refused from the next interval (nothing of it served that arrived after that)."""
    out = tmp_path / "onb"
    assert main(["experiment", "onboarding", "--policy", "tokenpools", "--duration-s", "660",
                 "--out", str(out)]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())["policies"]["tokenpools"]
    new = res["day_two"]["onboarded"]["chat-new"]
    assert new["completed_first_minute"] > 10 and new["within_slo"] is True, new
    gone = res["day_two"]["revoked"]["code-2"]
    assert gone["served_after_next_interval"] == 0 and 600 <= gone["first_refused_s"] <= 605 + 1, gone
    assert res["refusals_by_reason"]["revoked"] > 0
    assert res["tenants"]["code-2"]["admitted"] > 0  # it was served before
    assert [what for _, what in res["events"]] == ["add chat-new", "revoke code-2"]
    assert "Day two" in (out / "report.md").read_text()


def test_config_events_are_checked_at_load(tmp_path: Path) -> None:
    base = (
        "duration_s: 10\nprofile: demo\nconfig: {pools: [{name: p, replica: {throughput_tokens_per_s: 100, "
        "kv_tokens: 1000, concurrency: 4}, max_replicas: 1}], entitlements: [{name: a, pool: p, tier: spot}]}\n"
        "traffic: {a: [{poisson: {rate_rps: 1, prompt_tokens: 1, output_tokens: 1}}]}\n"
    )
    bad = tmp_path / "bad.yaml"
    for events, expect in (
        ("[{at_s: 1, revoke_key: nobody}]", "events[0].revoke_key: unknown entitlement 'nobody'"),
        ("[{at_s: 1, add_entitlement: {name: a, tier: spot}}]", "events[0].add_entitlement.name: 'a' exists"),
        ("[{at_s: 1, set: {entitlement: a, field: weight, value: -1}}]", "weight"),
        ("[{at_s: 1, revoke_key: a, fail_replicas: 1}]", "exactly one of"),
    ):
        bad.write_text(base + f"events: {events}\n")
        with pytest.raises(ConfigError) as e:
            load_scenario(str(bad))
        assert expect in str(e.value), (events, str(e.value))
    # traffic may name a tenant an event adds
    bad.write_text(base.replace("traffic: {", "traffic: {b: [{poisson: {rate_rps: 1, prompt_tokens: 1, "
                                "output_tokens: 1}, start_s: 2}], ")
                   + "events: [{at_s: 2, add_entitlement: {name: b, tier: elastic}}]\n")  # fmt: skip
    assert [e.name for e in load_scenario(str(bad)).config.entitlements] == ["a"]
