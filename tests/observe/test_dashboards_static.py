"""Dashboards and alert rules without a running stack: generated from one source, every PromQL
expression parses, every metric it names is exported by our code or by vLLM (the simulator),
every alert has a runbook section, and the PrometheusRule matches the rule file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import promql_parser
import pytest
import yaml

from tests.support import REPO
from tokenscaler.observe import alerts, dashboards
from tokenscaler.observe.names import exported_names
from tools import generate

ALERT_RULES = REPO / generate.ALERT_RULES
RUNBOOK = REPO / generate.RUNBOOK
PROMETHEUS_RULE = REPO / generate.PROMETHEUS_RULE

PROMETHEUS_BUILTINS = {"up"}
# KEDA's operator exports these (not our code); only alerts may use them
KEDA_NAMES = {"keda_scaler_detail_errors_total"}


def substitute(expr: str, rate_interval: str = "1m") -> str:
    """Grafana's variables as Grafana would expand them with "All" selected."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", "15s")
    return re.sub(r"\$\{?(pool|tier|entitlement)\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node, *_):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)
        return True

    _walk(promql_parser.parse(expr), visit)
    return names


def _walk(node, visit) -> None:
    visit(node)
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if isinstance(child, promql_parser.Expr):
            _walk(child, visit)
    for arg in getattr(node, "args", None) or []:
        _walk(arg, visit)


def all_targets() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((REPO / "dashboards").glob("*.json")):
        d = json.loads(path.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((path.name, p["title"], t["expr"]))
    return out


@pytest.mark.parametrize("name", sorted(dashboards.render_all()))
def test_dashboard_is_importable_with_the_datasource_input_and_variables(name: str) -> None:
    d = json.loads((REPO / "dashboards" / name).read_text())
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["id"] is None and 8 <= len(d["uid"]) <= 40
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert {"DS_PROMETHEUS", "pool", "tier", "entitlement"} <= set(variables)
    for v in ("pool", "tier", "entitlement"):
        assert variables[v]["includeAll"] and variables[v]["allValue"] == ".*"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert p["title"] and p["description"] and p["fieldConfig"]["defaults"]["unit"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["refId"] and t["expr"] and t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            # counters and histograms only under rate()/increase(), over Grafana's rate interval
            for m in re.finditer(r"[a-z_:]+_(total|bucket)\b", t["expr"]):
                assert "$__rate_interval" in t["expr"], (p["title"], m.group(0))


def test_each_dashboard_has_one_name_for_its_file_uid_and_title() -> None:
    names = [d.name for d in dashboards.all_dashboards()]
    assert len(names) == len(set(names)) == 4
    for path in sorted((REPO / "dashboards").glob("*.json")):
        d = json.loads(path.read_text())
        assert path.stem in names, f"{path.name} is no dashboard of tokenscaler.observe.dashboards"
        assert d["uid"] == f"tokenscaler-{path.stem}", path.name
        assert d["title"] == f"tokenscaler / {path.stem.capitalize()}", path.name


@pytest.mark.parametrize(("dashboard", "title", "expr"), all_targets())
def test_every_panel_query_parses_and_names_only_exported_metrics(dashboard: str, title: str, expr: str) -> None:
    parsed = substitute(expr)
    names = metric_names(parsed)  # raises on a syntax error
    assert names, f"{dashboard} {title}: no metric in {expr}"
    unknown = names - exported_names() - PROMETHEUS_BUILTINS
    assert not unknown, f"{dashboard} {title}: {sorted(unknown)} exported by nothing"


def test_the_name_check_catches_a_wrong_name() -> None:
    names = metric_names(substitute('rate(tokenscaler_sidecar_requets_total{pool=~"$pool"}[$__rate_interval])'))
    assert names - exported_names() == {"tokenscaler_sidecar_requets_total"}
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (pool (x)")


def test_every_alert_names_exported_metrics_and_has_severity_summary_and_runbook() -> None:
    rules = alerts.alert_rules(ALERT_RULES)
    assert len(rules) >= 9
    anchors = alerts.runbook_anchors(RUNBOOK)
    for r in rules:
        unknown = metric_names(r["expr"]) - exported_names() - PROMETHEUS_BUILTINS - KEDA_NAMES
        assert not unknown, f"{r['alert']}: {sorted(unknown)}"
        assert r["labels"]["severity"] in {"critical", "warning"}
        ann = r["annotations"]
        assert ann["summary"] and "{{ $value" in ann["description"], r["alert"]
        assert "$labels." in ann["summary"] + ann["description"] or r["alert"] == "TokenscalerControllerDown"
        page, _, anchor = ann["runbook_url"].partition("#")
        assert page == "docs/runbook.md" and anchor == r["alert"].lower(), r["alert"]
        assert anchor in anchors, f"docs/runbook.md has no section {r['alert']}"
    text = RUNBOOK.read_text()
    for r in rules:  # each section says what it means, how to confirm it, what to do
        section = text.split(f"## {r['alert']}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Meaning.**", "**Confirm.**", "**Do.**"):
            assert part in section, (r["alert"], part)


def test_prometheusrule_is_generated_from_the_rule_file() -> None:
    pr = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert pr["kind"] == "PrometheusRule" and pr["apiVersion"] == "monitoring.coreos.com/v1"
    assert pr["spec"]["groups"] == yaml.safe_load(ALERT_RULES.read_text())["groups"]
    kustomization = yaml.safe_load((PROMETHEUS_RULE.parent / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [PROMETHEUS_RULE.name]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian's prometheus package)")
def test_promtool_checks_the_rules_and_every_alert_fires_in_its_unit_test() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(ALERT_RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tests_dir = REPO / "alerts" / "tests"
    test_files = sorted(tests_dir.glob("*.y*ml"))
    assert test_files
    fired: set[str] = set()
    silent: set[str] = set()
    for f in test_files:
        run = subprocess.run(
            ["promtool", "test", "rules", f.name], cwd=tests_dir, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stdout + run.stderr
        for case in yaml.safe_load(f.read_text())["tests"]:
            for at in case.get("alert_rule_test", []):
                (fired if at.get("exp_alerts") else silent).add(at["alertname"])
    names = {r["alert"] for r in alerts.alert_rules(ALERT_RULES)}
    assert fired == names, f"never shown firing: {sorted(names - fired)}"
    assert silent == names, f"no near miss shown silent: {sorted(names - silent)}"
