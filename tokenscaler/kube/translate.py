"""Pure translations: CR objects <-> config models, and status documents from a plan.

No I/O and no clock: the caller passes ``now`` (an RFC 3339 string) where a condition's
``lastTransitionTime`` needs one. Objects are plain dicts, as the API server sends them.

- :func:`config_to_crs` / :func:`config_from_crs`: a :class:`TokenPoolsConfig` as TokenPool
  and Entitlement objects and back. A CR's spec is the model's fields minus ``name``
  (``metadata.name``), defaults left out. One field is the cluster's own: an Entitlement's
  ``spec.api_key_secret_ref`` (:class:`SecretRef`) names a Secret of type
  ``tokenpools.io/api-key-digests`` whose data values hold key digests, one per line
  (:func:`digests_from_secret`); they join ``spec.api_keys`` when the objects are translated.
- :func:`status_patches`: for a published :class:`~tokenscaler.core.plan.Plan` (read through
  its typed fields, never its JSON view), the status of every object that changed, as merge
  patches for the status subresource.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from tokenscaler.core.frozen import Frozen
from tokenscaler.core.model import (
    DIMENSIONS,
    Entitlement,
    Pool,
    Tier,
    TokenPoolsConfig,
    check_config,
)
from tokenscaler.core.plan import Plan
from tokenscaler.core.validation import ConfigError, format_validation_error
from tokenscaler.kube import (
    API_VERSION,
    ENTITLEMENT_KIND,
    ENTITLEMENT_PLURAL,
    KEYS_SECRET_REF,
    KEYS_SECRET_TYPE,
    POOL_KIND,
    POOL_PLURAL,
)

Obj = dict[str, Any]

# --------------------------------------------------------------------------- models -> CRs


def spec_of(model: BaseModel) -> dict[str, Any]:
    """A model's fields as a CR spec: JSON types, no ``name``, no defaults, no nulls."""
    return model.model_dump(mode="json", exclude={"name"}, exclude_defaults=True, exclude_none=True)


def _cr(kind: str, name: str, namespace: str | None, spec: dict[str, Any], labels: Mapping[str, str]) -> Obj:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


def pool_to_cr(pool: Pool, namespace: str | None = None) -> Obj:
    return _cr(POOL_KIND, pool.name, namespace, spec_of(pool), {})


def entitlement_to_cr(e: Entitlement, namespace: str | None = None) -> Obj:
    labels = {"tokenpools.io/pool": e.pool, "tokenpools.io/tier": e.tier.value}
    return _cr(ENTITLEMENT_KIND, e.name, namespace, spec_of(e), labels)


def config_to_crs(config: TokenPoolsConfig, namespace: str | None = None) -> list[Obj]:
    """Every pool, then every entitlement, as CR objects."""
    return [pool_to_cr(p, namespace) for p in config.pools] + [
        entitlement_to_cr(e, namespace) for e in config.entitlements
    ]


# --------------------------------------------------------------------------- CRs -> models


def ref(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` of an object, for messages."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind', '?')} {ns + '/' if ns else ''}{meta.get('name', '?')}"


class SecretRef(Frozen):
    """The Secret holding an Entitlement's API key digests: in the Entitlement's namespace, of
    type ``tokenpools.io/api-key-digests``; each data value holds sha256 hex digests (64 hex
    characters, optionally ``sha256:``-prefixed), one per line. Never plain keys."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        description="Name of a Secret of type tokenpools.io/api-key-digests in this namespace.",
    )


def _meta_spec(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    meta = obj.get("metadata")
    spec = obj.get("spec")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise ConfigError(ref(obj), ["metadata.name: missing"])
    if not isinstance(spec, Mapping):
        raise ConfigError(ref(obj), [f"spec: must be a mapping, got {type(spec).__name__}"])
    return meta, spec


def _from_cr(model: type[Pool] | type[Entitlement], obj: Mapping[str, Any], extra_keys: Sequence[str] = ()) -> Any:
    meta, spec = _meta_spec(obj)
    data = {**spec, "name": meta["name"]}
    if model is Entitlement:
        data.pop(KEYS_SECRET_REF, None)  # the cluster's field, not the model's (secret_ref_of)
        if extra_keys:
            listed = data.get("api_keys")
            data["api_keys"] = [*(listed if isinstance(listed, list) else []), *extra_keys]
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = [("spec." + line) if not line.startswith("name") else "metadata." + line for line in
                 format_validation_error(err, data)]  # fmt: skip
        raise ConfigError(ref(obj), lines) from err


def pool_from_cr(obj: Mapping[str, Any]) -> Pool:
    """A TokenPool object as a :class:`Pool`; :class:`ConfigError` names the object and field."""
    return _from_cr(Pool, obj)


def entitlement_from_cr(obj: Mapping[str, Any], extra_keys: Sequence[str] = ()) -> Entitlement:
    """An Entitlement object as an :class:`Entitlement`, with ``extra_keys`` (digests resolved
    from its Secret) after ``spec.api_keys``; :class:`ConfigError` names the object and field.
    ``spec.api_key_secret_ref`` is checked too (:func:`secret_ref_of`)."""
    secret_ref_of(obj)
    return _from_cr(Entitlement, obj, extra_keys)


def secret_ref_of(obj: Mapping[str, Any]) -> SecretRef | None:
    """An Entitlement's ``spec.api_key_secret_ref``, or None; :class:`ConfigError` names the field."""
    _, spec = _meta_spec(obj)
    raw = spec.get(KEYS_SECRET_REF)
    if raw is None:
        return None
    try:
        return SecretRef.model_validate(raw)
    except ValidationError as err:
        lines = [f"spec.{KEYS_SECRET_REF}" + ("" if line.startswith(":") else ".") + line
                 for line in format_validation_error(err, raw, SecretRef)]  # fmt: skip
        raise ConfigError(ref(obj), lines) from err


# the model's rule for an entry of api_keys (core.model.Entitlement), which checks them again
_DIGEST = re.compile(r"^(sha256:)?[0-9a-f]{64}$")


class KeySecretError(ValueError):
    """A Secret whose keys cannot be used. The message names the Secret and the field, never a value."""


def digests_from_secret(secret: Mapping[str, Any]) -> list[str]:
    """The key digests in a Secret's data: every value, one digest per line (blank lines
    ignored), lower-cased, without ``sha256:``, in data-key order, duplicates once.

    Raises :class:`KeySecretError` naming ``data.KEY`` (and the line) when a value is not
    base64 text or a line is not a sha256 hex digest, say a plain key pasted by mistake: then
    none of the Secret's digests may be used. The message never carries the value."""
    meta = secret.get("metadata") or {}
    name = meta.get("name", "?")
    if secret.get("type") != KEYS_SECRET_TYPE:
        raise KeySecretError(f"Secret {name}: type must be {KEYS_SECRET_TYPE}")
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise KeySecretError(f"Secret {name}: data must be a mapping")
    out: list[str] = []
    for key in sorted(data):
        raw = data[key]
        try:
            text = base64.b64decode(str(raw or ""), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise KeySecretError(f"Secret {name} data.{key}: not base64-encoded UTF-8 text") from None
        for n, line in enumerate(text.splitlines(), start=1):
            digest = line.strip().lower()
            if not digest:
                continue
            if not _DIGEST.match(digest):
                raise KeySecretError(
                    f"Secret {name} data.{key} line {n}: not a sha256 hex digest (64 hex characters), "
                    "perhaps a plain key; write its digest: printf %s KEY | sha256sum"
                )
            digest = digest.removeprefix("sha256:")
            if digest not in out:
                out.append(digest)
    return out


@dataclass(frozen=True)
class KeysCondition:
    """The ``KeysResolved`` condition of an Entitlement that names a Secret."""

    ok: bool
    reason: str
    message: str  # names the Secret and field, never a digest or a key


@dataclass(frozen=True)
class Translation:
    """The config the objects make, and what was left out of it and why.

    ``config`` is None when no valid pool remains, or when the valid objects together break
    a cross-object rule (oversubscription, duplicate key digests): then ``errors`` says why,
    and a caller keeps the config it had. ``keys`` holds, for each Entitlement that names a
    Secret (when Secrets were given), whether its digests were used.
    """

    config: TokenPoolsConfig | None
    problems: dict[tuple[str, str], str]  # (kind, name) -> why that object was left out
    errors: list[str]
    keys: dict[str, KeysCondition] = dataclass_field(default_factory=dict)  # Entitlement name -> condition


def resolve_keys(obj: Mapping[str, Any], secrets: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], KeysCondition]:
    """The digests an Entitlement's ``spec.api_key_secret_ref`` contributes, from ``secrets``
    (name -> Secret of the namespace, typed ones only), and its condition. A missing Secret or
    one with a value that is not a digest contributes nothing (fail closed: a pasted plain key
    never becomes usable, and the Secret's other digests wait until it is fixed)."""
    sref = secret_ref_of(obj)
    assert sref is not None
    secret = secrets.get(sref.name)
    if secret is None:
        return [], KeysCondition(
            False,
            "SecretNotFound",
            f"spec.{KEYS_SECRET_REF}.name: no Secret {sref.name} of type {KEYS_SECRET_TYPE} in this namespace; "
            "none of its keys are used",
        )
    try:
        digests = digests_from_secret(secret)
    except KeySecretError as e:
        return [], KeysCondition(False, "InvalidDigest", f"{e}; none of its keys are used")
    return digests, KeysCondition(True, "Resolved", f"{len(digests)} key digest(s) from Secret {sref.name}")


def config_from_crs(
    pools: Iterable[Mapping[str, Any]],
    entitlements: Iterable[Mapping[str, Any]],
    secrets: Mapping[str, Mapping[str, Any]] | None = None,
) -> Translation:
    """TokenPool and Entitlement objects as one config.

    An object that fails its own validation, or an Entitlement naming a pool that is not
    there, is left out (and named in ``problems``); the rest must pass the config's
    cross-object checks together. ``secrets`` (name -> Secret of type
    ``tokenpools.io/api-key-digests``) resolves each ``spec.api_key_secret_ref`` into the
    Entitlement's ``api_keys`` (:func:`resolve_keys`); None leaves those keys out (the webhook
    checks objects, it does not read Secrets).
    """
    problems: dict[tuple[str, str], str] = {}
    keys: dict[str, KeysCondition] = {}
    good_pools: list[Pool] = []
    for obj in sorted(pools, key=_name):
        try:
            good_pools.append(pool_from_cr(obj))
        except ConfigError as e:
            problems[(POOL_KIND, _name(obj))] = "; ".join(e.errors)
    known = {p.name for p in good_pools}
    good_ents: list[Entitlement] = []
    for obj in sorted(entitlements, key=_name):
        try:
            extra: list[str] = []
            if secrets is not None and secret_ref_of(obj) is not None:
                extra, keys[_name(obj)] = resolve_keys(obj, secrets)
            ent = entitlement_from_cr(obj, extra)
        except ConfigError as err:
            keys.pop(_name(obj), None)
            problems[(ENTITLEMENT_KIND, _name(obj))] = "; ".join(err.errors)
            continue
        if ent.pool not in known:
            problems[(ENTITLEMENT_KIND, ent.name)] = f"spec.pool: no valid TokenPool {ent.pool!r} in this namespace"
            continue
        good_ents.append(ent)
    if not good_pools:
        return Translation(None, problems, ["no valid TokenPool"], keys)
    errors = check_config(good_pools, good_ents)
    if errors:
        return Translation(None, problems, errors, keys)
    return Translation(TokenPoolsConfig(pools=good_pools, entitlements=good_ents), problems, [], keys)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


# --------------------------------------------------------------------------- status


def _round(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: a status that moves by noise is not re-written."""
    if x == 0 or not math.isfinite(x):
        return 0.0 if not math.isfinite(x) else float(x)
    return float(f"{x:.{digits}g}")


def _vector(v: np.ndarray) -> dict[str, float]:
    """A (3,) vector as ``{dimension: value}``, 4 significant digits, unbounded components left out."""
    return {d: _round(x) for d, x in zip(DIMENSIONS, v.tolist(), strict=True) if math.isfinite(x)}


def _condition(
    type_: str, ok: bool, reason: str, message: str, generation: int | None, previous: Mapping[str, Any], now: str
) -> dict[str, Any]:
    status = "True" if ok else "False"
    prev = previous.get(type_) or {}
    since = prev.get("lastTransitionTime") if prev.get("status") == status else None
    cond: dict[str, Any] = {"type": type_, "status": status, "lastTransitionTime": since or now}
    if generation is not None:
        cond["observedGeneration"] = generation
    cond.update(reason=reason, message=message)
    return cond


def _prev_conditions(obj: Mapping[str, Any]) -> dict[str, Any]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return {str(c.get("type")): c for c in conditions if isinstance(c, Mapping)}


def _stale(stale: bool, incomplete: str | None) -> tuple[bool, str, str]:
    """(is stale, reason, message)."""
    if stale:
        return True, "MetricsUnavailable", "the published plan is a stale copy: the last interval read no metrics"
    if incomplete:
        return True, "MetricsIncomplete", incomplete
    return False, "Fresh", "planned from this interval's metrics"


def _status_start(obj: Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(generation, previous conditions, a status carrying ``observedGeneration``) of ``obj``."""
    gen = (obj.get("metadata") or {}).get("generation")
    status: dict[str, Any] = {} if gen is None else {"observedGeneration": gen}
    return gen, _prev_conditions(obj), status


def _not_planned(
    status: dict[str, Any], version: int, problem: str | None, gen: Any, prev: Any, now: str
) -> dict[str, Any]:
    """The status of an object the published plan does not cover (invalid, or not planned yet)."""
    why = problem or "not in the published plan yet"
    status["planVersion"] = version
    status["conditions"] = [_condition("Ready", False, "Invalid" if problem else "NotPlanned", why, gen, prev, now)]
    return status


def pool_status(
    obj: Mapping[str, Any],
    pool: Pool | None,
    plan: Plan,
    *,
    version: int,
    stale: bool,
    now: str,
    problem: str | None = None,
) -> dict[str, Any]:
    """The status of one TokenPool for a plan."""
    gen, prev, status = _status_start(obj)
    pp = plan.pools.get(_name(obj))
    if pp is None or pool is None:
        return _not_planned(status, version, problem, gen, prev, now)
    ready = int(pp.ready_replicas)
    configured = {d: _round(getattr(pool.replica, d) * ready) for d in DIMENSIONS}
    is_stale, s_reason, s_msg = _stale(stale, pp.incomplete)
    fit = pp.guarantees_fit
    shortfall = _vector(pp.pool_shortfall())
    fit_msg = (
        "every guarantee fits the ready replicas"
        if fit
        else "guarantees short by " + ", ".join(f"{d} {v:g}" for d, v in shortfall.items() if v > 0)
    )
    status.update(
        planVersion=version,
        desiredReplicas=int(pp.desired_replicas),
        readyReplicas=ready,
        capacity={"observed": _vector(pp.capacity), "configured": configured},
        allocated=_vector(pp.allocation.allocation.sum(axis=0)),
        need=_vector(pp.need),
        conditions=[
            _condition("Ready", True, "Planned", f"desired replicas {pp.desired_replicas}", gen, prev, now),
            _condition("GuaranteesFit", fit, "Fit" if fit else "Shortfall", fit_msg, gen, prev, now),
            _condition("Stale", is_stale, s_reason, s_msg, gen, prev, now),
        ],
    )
    return status


def _keys_condition(keys: KeysCondition | None, gen: Any, prev: Any, now: str) -> list[dict[str, Any]]:
    if keys is None:
        return []
    return [_condition("KeysResolved", keys.ok, keys.reason, keys.message, gen, prev, now)]


def entitlement_status(
    obj: Mapping[str, Any],
    plan: Plan,
    *,
    version: int,
    stale: bool,
    now: str,
    problem: str | None = None,
    keys: KeysCondition | None = None,
) -> dict[str, Any]:
    """The status of one Entitlement for a plan (with ``KeysResolved`` when it names a Secret)."""
    gen, prev, status = _status_start(obj)
    found = plan.entitlement(_name(obj))
    if found is None:
        status = _not_planned(status, version, problem, gen, prev, now)
        status["conditions"] += _keys_condition(keys, gen, prev, now)
        return status
    pp, i = found
    is_stale, s_reason, s_msg = _stale(stale, pp.incomplete)
    shortfall = _vector(pp.allocation.guarantee_shortfall[i])
    short = {d: v for d, v in shortfall.items() if v > 0}
    tier = pp.tier(i)
    if tier is not Tier.GUARANTEED:
        fit, reason, msg = True, "NoGuarantee", f"the {tier.value} tier has no guarantee"
    elif short:
        fit, reason = False, "Shortfall"
        msg = "guarantee short by " + ", ".join(f"{d} {v:g}" for d, v in short.items())
    else:
        fit, reason, msg = True, "Fit", "the guarantee fits the ready replicas"
    status.update(planVersion=version, allocation=_vector(pp.allocation.allocation[i]))
    usage = pp.usage_of(i)
    if usage is not None:
        status["usage"] = _vector(usage)
    status.update(
        limit=_vector(pp.limit[i]),
        debt=_round(float(pp.debt[i]) or 0.0),  # -0.0 reads as 0.0
        boundBy=pp.bound_by(i),
        conditions=[
            _condition("Ready", True, "Planned", f"planned in pool {pp.pool.name}", gen, prev, now),
            _condition("GuaranteesFit", fit, reason, msg, gen, prev, now),
            _condition("Stale", is_stale, s_reason, s_msg, gen, prev, now),
            *_keys_condition(keys, gen, prev, now),
        ],
    )
    return status


@dataclass(frozen=True)
class StatusPatch:
    """A merge patch for the status subresource of one object."""

    plural: str
    name: str
    body: dict[str, Any]  # {"status": {...}}, keys no longer present set to None


def _without_version(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "planVersion"}


def merge_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any] | None:
    """A status merge patch from ``old`` to ``new``; None when only ``planVersion`` differs
    (a new plan with the same numbers writes nothing)."""
    old = old or {}
    if _without_version(old) == _without_version(new):
        return None
    body: dict[str, Any] = dict(new)
    for key in old:
        if key not in new:
            body[key] = None
    return {"status": body}


def status_patches(
    pools: Sequence[Mapping[str, Any]],
    entitlements: Sequence[Mapping[str, Any]],
    config: TokenPoolsConfig | None,
    plan: Plan,
    *,
    version: int,
    stale: bool,
    now: str,
    problems: Mapping[tuple[str, str], str] | None = None,
    keys: Mapping[str, KeysCondition] | None = None,
) -> list[StatusPatch]:
    """The status patches a published plan calls for: one per object whose status changed."""
    problems = problems or {}
    keys = keys or {}
    by_name = {p.name: p for p in config.pools} if config is not None else {}
    out: list[StatusPatch] = []
    for obj in pools:
        name = _name(obj)
        new = pool_status(
            obj, by_name.get(name), plan, version=version, stale=stale, now=now, problem=problems.get((POOL_KIND, name))
        )
        if (body := merge_patch(obj.get("status"), new)) is not None:
            out.append(StatusPatch(POOL_PLURAL, name, body))
    for obj in entitlements:
        name = _name(obj)
        new = entitlement_status(
            obj,
            plan,
            version=version,
            stale=stale,
            now=now,
            problem=problems.get((ENTITLEMENT_KIND, name)),
            keys=keys.get(name),
        )
        if (body := merge_patch(obj.get("status"), new)) is not None:
            out.append(StatusPatch(ENTITLEMENT_PLURAL, name, body))
    return out


HEADER = "# Generated by `tokenscaler convert --config {src} --namespace {ns}`.\n"


def crs_yaml(config: TokenPoolsConfig, namespace: str, source: str) -> str:
    """``config`` as a YAML stream of TokenPool and Entitlement objects, with a header naming its source."""
    import yaml

    docs = config_to_crs(config, namespace)
    return HEADER.format(src=source, ns=namespace) + "".join(
        "---\n" + yaml.safe_dump(d, sort_keys=False, width=120) for d in docs
    )
