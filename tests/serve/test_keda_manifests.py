"""The reference KEDA manifests: valid against KEDA v2.20.2's CRD, and scaling the pool exactly.

The CRD's ``openAPIV3Schema`` is converted to a draft-7 JSON Schema (:func:`structural_to_json_schema`)
so the ``jsonschema`` package can check it, with what the API server would do on top: ``required``,
and a rejection of fields the schema does not list. Kubernetes prunes unknown fields silently;
in a reference manifest a pruned field is a setting that silently does nothing, so it is an error here.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.serve.builders import hpa_average_value_replicas
from tokenscaler.config import load_config
from tokenscaler.serve.scaler import KEDA_AUTH_PARAMS, KEDA_METADATA_KEYS, metric_name

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "keda" / "crd" / "keda.sh_scaledobjects.v2.20.2.yaml"
SCALED_OBJECT = REPO / "keda" / "scaledobject.yaml"
TRIGGER_AUTH = REPO / "keda" / "triggerauthentication.yaml"
POOLS = REPO / "examples" / "tokenpools.yaml"

INT32 = (-(2**31), 2**31 - 1)


def structural_to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema as draft-7 JSON Schema.

    - ``nullable: true`` also admits null;
    - ``x-kubernetes-int-or-string`` admits an integer or a string (the CRD spells it with anyOf too);
    - ``format: int32``/``int64`` become bounds (jsonschema ignores unknown formats);
    - an object listing ``properties`` without ``x-kubernetes-preserve-unknown-fields`` or
      ``additionalProperties`` gets ``additionalProperties: false`` (what pruning would drop);
    - other ``x-kubernetes-*`` keys (list types, CEL validations) are dropped; the one CEL rule
      of this CRD is checked by hand in :func:`test_scaled_object_satisfies_the_crds_cel_rule`.
    """
    if isinstance(node, list):
        return [structural_to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "description"):
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {k: structural_to_json_schema(v) for k, v in value.items()}
        elif isinstance(value, dict | list):
            out[key] = structural_to_json_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("format") == "int32" and out.get("type") == "integer":
        out.setdefault("minimum", INT32[0])
        out.setdefault("maximum", INT32[1])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in node
    ):
        out["additionalProperties"] = False
    return out


def crd_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = structural_to_json_schema(version["schema"]["openAPIV3Schema"])
    # ObjectMeta is validated by the API server itself; the CRD says only `type: object`.
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(doc: dict[str, Any]) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator().iter_errors(doc))


def scaled_object() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(SCALED_OBJECT.read_text()) if d]
    return doc


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (the plain decimal and milli forms used for tolerances)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --------------------------------------------------------------------------- schema


def test_scaled_object_is_valid_against_kedas_crd() -> None:
    doc = scaled_object()
    assert (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert errors(doc) == []


@pytest.mark.parametrize(
    ("mutate", "want"),
    [
        pytest.param(
            lambda d: d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"].update(
                tolerence="0"
            ),
            "Additional properties are not allowed ('tolerence' was unexpected)",
            id="misspelled-field-would-be-pruned",
        ),
        pytest.param(
            lambda d: d["spec"]["advanced"].update(behavior={}),
            "Additional properties are not allowed ('behavior' was unexpected)",
            id="behavior-at-the-wrong-level",
        ),
        pytest.param(lambda d: d["spec"].pop("triggers"), "'triggers' is a required property", id="no-triggers"),
        pytest.param(
            lambda d: d["spec"]["fallback"].pop("replicas"),
            "'replicas' is a required property",
            id="fallback-no-replicas",
        ),
        pytest.param(
            lambda d: d["spec"]["triggers"][0]["metadata"].update(pool=8),
            "8 is not of type 'string'",
            id="metadata-values-are-strings",
        ),
        pytest.param(
            lambda d: d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(
                tolerance="ten percent"
            ),
            "does not match",
            id="tolerance-must-be-a-quantity",
        ),
        pytest.param(lambda d: d["spec"].update(maxReplicaCount=0), "less than the minimum", id="max-at-least-one"),
        pytest.param(lambda d: d["spec"].update(pollingInterval=2**31), "greater than the maximum", id="int32"),
    ],
)
def test_the_converted_schema_rejects_what_kubernetes_would_reject_or_prune(mutate: Any, want: str) -> None:
    doc = copy.deepcopy(scaled_object())
    mutate(doc)
    found = errors(doc)
    assert any(want in e for e in found), found


def test_scaled_object_satisfies_the_crds_cel_rule() -> None:
    # x-kubernetes-validations on spec: !has(self.minReplicaCount) || self.minReplicaCount <= (max or 100)
    crd = yaml.safe_load(CRD.read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in spec_schema.get("x-kubernetes-validations", [])]
    assert len(rules) == 1 and "minReplicaCount <=" in rules[0], "the CRD's CEL rules changed: update this test"
    spec = scaled_object()["spec"]
    assert spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100)


# --------------------------------------------------------------------------- matches the pool


def test_scaled_object_scales_the_example_pool_within_its_replica_range() -> None:
    pool = load_config(POOLS).pool("llama-8b")
    spec = scaled_object()["spec"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "external"
    assert trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["pool"] == pool.name
    assert trigger["metadata"]["scalerAddress"].rsplit(":", 1)[1].isdigit()
    assert set(trigger["metadata"]) <= {"pool", *KEDA_METADATA_KEYS}, "the scaler would reject other keys"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (pool.min_replicas, pool.max_replicas)
    assert pool.min_replicas <= spec["fallback"]["replicas"] <= pool.max_replicas
    assert spec["fallback"]["failureThreshold"] >= 1


def test_hpa_behavior_follows_the_exact_target() -> None:
    pool = load_config(POOLS).pool("llama-8b")
    behavior = scaled_object()["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    for direction in ("scaleUp", "scaleDown"):
        assert behavior[direction]["tolerance"] == "0", direction  # a string quantity, as the CRD expects
        assert quantity(behavior[direction]["tolerance"]) == 0
        # pacing is the controller's (pool.scale_down); the HPA adds no window of its own
        assert behavior[direction]["stabilizationWindowSeconds"] == 0
    # one HPA sync can move anywhere in the pool's range
    span = pool.max_replicas - pool.min_replicas
    up = behavior["scaleUp"]["policies"]
    assert (
        any(p["type"] == "Pods" and p["value"] >= span for p in up) or behavior["scaleUp"]["selectPolicy"] == "Disabled"
    )
    down = behavior["scaleDown"]["policies"]
    assert any(p["type"] == "Percent" and p["value"] >= 100 for p in down)


def test_hpa_behavior_passes_the_hpa_api_validation_the_crd_does_not_encode() -> None:
    # KEDA copies `behavior` into the HPA it creates; the autoscaling/v2 API then checks these
    # (k8s.io/api autoscaling/v2 HPAScalingRules), so a bad value breaks HPA creation, not the apply.
    behavior = scaled_object()["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    for direction, rules in behavior.items():
        assert rules.get("selectPolicy", "Max") in ("Max", "Min", "Disabled"), direction
        assert 0 <= rules.get("stabilizationWindowSeconds", 0) <= 3600, direction
        assert quantity(rules.get("tolerance", "0.1")) >= 0, direction
        for policy in rules.get("policies", []):
            assert policy["type"] in ("Pods", "Percent"), (direction, policy)
            assert policy["value"] > 0, (direction, policy)
            assert 0 < policy["periodSeconds"] <= 1800, (direction, policy)


def test_average_value_with_target_one_gives_the_planned_replicas_across_the_pool_range() -> None:
    pool = load_config(POOLS).pool("llama-8b")
    behavior = scaled_object()["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up, down = quantity(behavior["scaleUp"]["tolerance"]), quantity(behavior["scaleDown"]["tolerance"])
    target = 1.0  # GetMetricSpec's targetSizeFloat
    for current in range(max(pool.min_replicas, 1), pool.max_replicas + 1):
        for desired in range(max(pool.min_replicas, 1), pool.max_replicas + 1):
            got = hpa_average_value_replicas(current, [float(desired)], target, up, down)
            assert got == math.ceil(desired / target) == desired, (current, desired)


def test_metric_name_is_a_valid_external_metric_name() -> None:
    name = f"s0-{metric_name('llama-8b')}"  # as KEDA names it for the HPA (trigger index 0)
    assert name == "s0-tokenscaler-llama-8b"
    assert all(c.islower() or c.isdigit() or c in "-_" for c in name)


# --------------------------------------------------------------------------- TriggerAuthentication


def test_trigger_authentication_maps_kedas_tls_parameters_from_a_secret() -> None:
    (doc,) = [d for d in yaml.safe_load_all(TRIGGER_AUTH.read_text()) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "TriggerAuthentication")
    refs = doc["spec"]["secretTargetRef"]
    # server TLS: KEDA verifies the scaler with the CA (mutual TLS would add the client pair)
    assert [r["parameter"] for r in refs] == ["caCert"] and set(KEDA_AUTH_PARAMS) >= {"caCert"}
    assert all(set(r) == {"parameter", "name", "key"} for r in refs)
    assert doc["metadata"]["namespace"] == scaled_object()["metadata"]["namespace"]
    # the ScaledObject's trigger uses it
    (trigger,) = scaled_object()["spec"]["triggers"]
    assert trigger["authenticationRef"] == {"name": doc["metadata"]["name"], "kind": "TriggerAuthentication"}
