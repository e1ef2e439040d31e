"""The CRDs (generated from the models; tests/test_generated.py keeps the checked-in files equal):
the example CRs validate against them (structural schema with jsonschema, CEL rules with cel-python)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from tokenscaler.kube import crds

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CRS = REPO / "examples" / "k8s" / "tokenpools.yaml"


def to_json_schema(node: Any) -> Any:
    """A structural schema as draft-7 JSON Schema: nullable, boolean exclusiveMinimum, and unknown
    fields rejected (the API server would prune them: in an example that is a silent no-op)."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-") or k in ("nullable", "description", "exclusiveMinimum", "format"):
            continue
        out[k] = {p: to_json_schema(s) for p, s in v.items()} if k == "properties" else to_json_schema(v)
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and node.get("type") == "object":
        out["additionalProperties"] = False
    return out


def crd_of(kind: str) -> dict[str, Any]:
    for text in crds.generate().values():
        doc = yaml.safe_load(text)
        if doc["spec"]["names"]["kind"] == kind:
            return doc
    raise KeyError(kind)


def schema_of(kind: str) -> dict[str, Any]:
    return crd_of(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validator(kind: str) -> jsonschema.Draft7Validator:
    s = to_json_schema(schema_of(kind))
    s["properties"]["metadata"] = {"type": "object"}
    jsonschema.Draft7Validator.check_schema(s)
    return jsonschema.Draft7Validator(s)


def as_declared(value: Any, schema: dict[str, Any]) -> Any:
    """JSON as the API server hands it to CEL: ``number`` fields are doubles even when written 3."""
    if isinstance(value, dict) and "properties" in schema:
        return {k: as_declared(v, schema["properties"].get(k, {})) for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [as_declared(v, schema["items"]) for v in value]
    if schema.get("type") == "number" and isinstance(value, int):
        return float(value)
    return value


def cel_errors(kind: str, spec: dict[str, Any]) -> list[str]:
    """The messages of the spec's CEL rules that fail (evaluated with cel-python)."""
    spec_schema = schema_of(kind)["properties"]["spec"]
    env = celpy.Environment()
    activation = {"self": celpy.json_to_cel(as_declared(spec, spec_schema))}
    failed = []
    for rule in spec_schema["x-kubernetes-validations"]:
        if not env.program(env.compile(rule["rule"])).evaluate(activation):
            failed.append(rule["message"])
    return failed


def examples() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE_CRS.read_text()) if d]


def test_crds_are_structural_enough() -> None:
    for kind in ("TokenPool", "Entitlement"):
        crd = crd_of(kind)
        v = crd["spec"]["versions"][0]
        assert v["subresources"] == {"status": {}}
        text = yaml.safe_dump(crd)
        assert "$ref" not in text and "anyOf" not in text and "additionalProperties" not in text
        conds = v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
        assert "observedGeneration" in conds["items"]["properties"]
    cols = {c["name"] for c in crd_of("Entitlement")["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert {"Tier", "Guaranteed", "Allocation", "Debt", "Age"} <= cols


@pytest.mark.parametrize("doc", examples(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_example_crs_validate_against_the_crds(doc: dict[str, Any]) -> None:
    errors = [e.message for e in validator(doc["kind"]).iter_errors(doc)]
    assert errors == []
    assert cel_errors(doc["kind"], doc["spec"]) == []


def by_name(name: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in examples() if d["metadata"]["name"] == name))


def test_schema_rejects_what_the_model_rejects() -> None:
    e = by_name("research")
    e["spec"]["tier"] = "gold"
    e["spec"]["weight"] = 0
    e["spec"]["limt"] = {}
    msgs = sorted(x.message for x in validator("Entitlement").iter_errors(e))
    assert any("'gold' is not one of" in m for m in msgs)
    assert any("less than or equal to the minimum of 0" in m for m in msgs)
    assert any("'limt' was unexpected" in m for m in msgs)
    p = by_name("llama-8b")
    p["spec"]["replica"]["kv_tokens"] = 0  # Pool._replica_positive
    assert [x.message for x in validator("TokenPool").iter_errors(p)] == [
        "0 is less than or equal to the minimum of 0"
    ]


def test_cel_rules() -> None:
    e = by_name("search-prod")
    e["spec"]["guaranteed"]["concurrency"] = 301  # limit.concurrency is 300
    assert cel_errors("Entitlement", e["spec"]) == ["guaranteed must be <= limit on every dimension the limit sets"]
    e = by_name("research")
    e["spec"]["guaranteed"] = {"concurrency": 1}
    (only,) = cel_errors("Entitlement", e["spec"])
    assert "guaranteed tier" in only
    e = by_name("chat-prod")
    del e["spec"]["guaranteed"]
    assert len(cel_errors("Entitlement", e["spec"])) == 1
    p = by_name("llama-8b")
    p["spec"]["min_replicas"] = 9
    assert cel_errors("TokenPool", p["spec"]) == ["min_replicas must be <= max_replicas"]
    # the messageExpression (what kubectl shows) evaluates too
    rule = schema_of("TokenPool")["properties"]["spec"]["x-kubernetes-validations"][0]
    env = celpy.Environment()
    msg = env.program(env.compile(rule["messageExpression"])).evaluate({"self": celpy.json_to_cel(p["spec"])})
    assert str(msg) == "min_replicas (9) must be <= max_replicas (8)"
