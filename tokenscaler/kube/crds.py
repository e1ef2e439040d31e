"""The TokenPool and Entitlement CRDs, generated from the config models.

    python -m tokenscaler.kube.crds    # print both CRDs (YAML documents) to stdout

``make generate`` (``tools/generate.py``) writes them into ``k8s/base/crds/``, and a test fails
when the checked-in files drift from :func:`generate`.

The spec schemas come from :class:`tokenscaler.core.model.Pool` and
:class:`~tokenscaler.core.model.Entitlement` (``model_json_schema``), turned into Kubernetes
*structural* schemas (:func:`structural`): ``$ref`` inlined, ``Optional`` as ``nullable``,
numeric ``exclusiveMinimum`` as OpenAPI 3.0's boolean form, no ``additionalProperties:
false`` (the API server prunes unknown fields instead), no titles or defaults (the models
apply their defaults when a CR is translated, so the stored object stays what the user
wrote). Rules pydantic expresses in validators and that concern one object are added as CEL
``x-kubernetes-validations``; rules across objects (oversubscription, unknown pools,
duplicate API keys) are the admission webhook's. The Entitlement's
``api_key_secret_ref`` is the cluster's own field (:class:`tokenscaler.kube.translate.SecretRef`),
added to the model's schema here.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from tokenscaler.core.model import DIMENSIONS, Entitlement, Pool
from tokenscaler.kube import (
    ENTITLEMENT_KIND,
    ENTITLEMENT_PLURAL,
    GROUP,
    KEYS_SECRET_REF,
    KEYS_SECRET_TYPE,
    POOL_KIND,
    POOL_PLURAL,
    VERSION,
)
from tokenscaler.kube.translate import SecretRef

_DROP = {"title", "default", "additionalProperties"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _inline(copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]]), defs)
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return {**target, **_inline(extra, defs)}
    return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}


def structural(node: Any) -> Any:
    """A (ref-free) pydantic JSON Schema as a Kubernetes structural schema."""
    if isinstance(node, list):
        return [structural(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        others = [s for s in any_of if s.get("type") != "null"]
        if len(others) != 1:
            raise ValueError(f"cannot express anyOf {any_of!r} structurally")
        merged = {**others[0], **node}
        if len(others) < len(any_of):
            merged["nullable"] = True
        return structural(merged)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {k: structural(v) for k, v in value.items()}
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        else:
            out[key] = structural(value)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def spec_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's schema without ``name`` (that is ``metadata.name``)."""
    raw = model.model_json_schema()
    schema = structural(_inline(raw, raw.get("$defs", {})))
    schema["properties"].pop("name", None)
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    if not schema["required"]:
        schema.pop("required")
    schema.pop("description", None)
    return schema


def _all_le(left: str, right: str) -> str:
    """CEL: every dimension present on both sides has ``left <= right``."""
    return " && ".join(
        f"(!has(self.{left}.{d}) || !has(self.{right}.{d}) || self.{left}.{d} <= self.{right}.{d})" for d in DIMENSIONS
    )


def pool_spec_schema() -> dict[str, Any]:
    s = spec_schema(Pool)
    s["description"] = (Pool.__doc__ or "").strip()
    # Pool._replica_positive: every replica component > 0 (the vector allows 0 elsewhere)
    for d in DIMENSIONS:
        s["properties"]["replica"]["properties"][d]["exclusiveMinimum"] = True
    s["properties"]["replica"]["required"] = list(DIMENSIONS)
    s["x-kubernetes-validations"] = [
        {
            "rule": "!has(self.min_replicas) || self.min_replicas <= self.max_replicas",
            "message": "min_replicas must be <= max_replicas",
            "messageExpression": "'min_replicas (' + string(self.min_replicas) + ') must be <= max_replicas (' "
            "+ string(self.max_replicas) + ')'",
        }
    ]
    return s


def secret_ref_schema() -> dict[str, Any]:
    raw = SecretRef.model_json_schema()
    s = structural(_inline(raw, raw.get("$defs", {})))
    s["description"] = (
        f"A Secret of type {KEYS_SECRET_TYPE} in this namespace whose data values hold sha256 hex digests "
        "of API keys, one per line (never plain keys); they add to api_keys. A value that is not a digest "
        "makes none of the Secret's keys usable (condition KeysResolved)."
    )
    return s


def entitlement_spec_schema() -> dict[str, Any]:
    s = spec_schema(Entitlement)
    s["description"] = (Entitlement.__doc__ or "").strip() + " `pool` names a TokenPool in the same namespace."
    s["properties"][KEYS_SECRET_REF] = secret_ref_schema()
    s["x-kubernetes-validations"] = [
        {
            "rule": "self.tier == 'guaranteed' ? has(self.guaranteed) : !has(self.guaranteed)",
            "message": "guaranteed: required for the guaranteed tier, and only the guaranteed tier may set it",
        },
        {
            "rule": f"!has(self.guaranteed) || !has(self.limit) || ({_all_le('guaranteed', 'limit')})",
            "message": "guaranteed must be <= limit on every dimension the limit sets",
        },
    ]
    return s


def _vector(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": {d: {"type": "number"} for d in DIMENSIONS},
    }


CONDITION_TYPES = ("Ready", "GuaranteesFit", "Stale", "KeysResolved")

_CONDITIONS = {
    "type": "array",
    "description": f"Latest observations ({', '.join(CONDITION_TYPES)}), each with the generation it was made for.",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "items": {
        "type": "object",
        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": {"type": "string", "maxLength": 316},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "reason": {"type": "string", "maxLength": 1024},
            "message": {"type": "string", "maxLength": 32768},
        },
    },
}

_COMMON_STATUS = {
    "observedGeneration": {"type": "integer", "format": "int64", "description": "The spec generation last planned."},
    "planVersion": {"type": "integer", "format": "int64", "description": "Version of the plan this status is from."},
    "conditions": _CONDITIONS,
}


def pool_status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            **_COMMON_STATUS,
            "desiredReplicas": {"type": "integer", "format": "int32", "description": "The planned replica target."},
            "readyReplicas": {"type": "integer", "format": "int32", "description": "Ready replicas the plan saw."},
            "capacity": {
                "type": "object",
                "description": "Capacity of the ready replicas: measured from the engines vs configured.",
                "properties": {
                    "observed": _vector("Measured (or configured where not measured) capacity of the ready replicas."),
                    "configured": _vector("replica x ready replicas, from the spec."),
                },
            },
            "allocated": _vector("Sum of this interval's allocations."),
            "need": _vector("What the replica target provisions for."),
        },
    }


def entitlement_status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            **_COMMON_STATUS,
            "allocation": _vector("This interval's allocation."),
            "usage": _vector("Service received last interval (absent when unknown)."),
            "limit": _vector("The sustained limit the sidecars enforce, pool-wide."),
            "debt": {"type": "number", "description": "Debt in dominant-share seconds (> 0: owed to it)."},
            "boundBy": {"type": "string", "description": "What bounded the allocation."},
        },
    }


def _crd(
    kind: str,
    plural: str,
    short: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    columns: list[dict[str, Any]],
    description: str,
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "tokenscaler"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["tokenscaler"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def _column(name: str, type_: str, path: str, description: str = "", priority: int = 0) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path}
    if description:
        col["description"] = description
    if priority:
        col["priority"] = priority
    return col


AGE = _column("Age", "date", ".metadata.creationTimestamp")


def token_pool_crd() -> dict[str, Any]:
    return _crd(
        POOL_KIND,
        POOL_PLURAL,
        "tp",
        pool_spec_schema(),
        pool_status_schema(),
        [
            _column("Min", "integer", ".spec.min_replicas"),
            _column("Max", "integer", ".spec.max_replicas"),
            _column("Desired", "integer", ".status.desiredReplicas", "planned replica target"),
            _column("Ready", "integer", ".status.readyReplicas"),
            _column("Fit", "string", '.status.conditions[?(@.type=="GuaranteesFit")].status', "guarantees fit"),
            _column("Stale", "string", '.status.conditions[?(@.type=="Stale")].status', priority=1),
            AGE,
        ],
        "A fleet of identical replicas serving one model (a pool of tokenscaler's config).",
    )


def entitlement_crd() -> dict[str, Any]:
    return _crd(
        ENTITLEMENT_KIND,
        ENTITLEMENT_PLURAL,
        "ent",
        entitlement_spec_schema(),
        entitlement_status_schema(),
        [
            _column("Pool", "string", ".spec.pool"),
            _column("Tier", "string", ".spec.tier"),
            _column("Guaranteed", "number", ".spec.guaranteed.throughput_tokens_per_s", "guaranteed tokens/s"),
            _column("Allocation", "number", ".status.allocation.throughput_tokens_per_s", "allocated tokens/s"),
            _column("Debt", "number", ".status.debt", "dominant-share seconds"),
            AGE,
        ],
        "One tenant's share of a TokenPool (an entitlement of tokenscaler's config).",
    )


HEADER = "# Generated by `make generate` (tokenscaler.kube.crds) from tokenscaler/core/model.py: do not edit.\n"


def generate() -> dict[str, str]:
    """File name -> YAML text of each CRD."""
    out = {}
    for crd in (token_pool_crd(), entitlement_crd()):
        out[f"{crd['metadata']['name']}.yaml"] = HEADER + yaml.safe_dump(crd, sort_keys=False, width=120)
    return out


def main() -> int:
    for text in generate().values():
        sys.stdout.write("---\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
