"""Admission webhooks (AdmissionReview ``admission.k8s.io/v1``) over HTTPS.

``POST /validate``: TokenPool and Entitlement CREATE/UPDATE. The object must pass its model
(the config file's rules, field by field; an Entitlement's ``spec.api_key_secret_ref`` its
:class:`~tokenscaler.kube.translate.SecretRef`: the webhook never reads the Secret) and,
with the other objects of the config, the oversubscription check
(:func:`tokenscaler.core.model.check_oversubscription`): a denial names the pool, the
dimension, the sum of guarantees and the capacity. Legal but risky changes are allowed
with ``warnings``: guarantees above 80% of what ``max_replicas`` can provision, a spot
entitlement with a limit of zero, an Entitlement whose pool is not there.

``POST /mutate``: Pods labelled ``tokenpools.io/pool``. Adds the rate-limit sidecar
(:class:`InjectedSidecar`: image, ports, args, probes, resources, the pool from the label),
and routes the serving port through it: the app container's serving port gives up its name
(it becomes ``ts-upstream``) and the sidecar takes it, so a Service that targets the port by
name reaches the sidecar, which proxies to the engine on localhost. Idempotent: a pod that
already has the sidecar gets no patch. With ``limits_url`` the sidecar gets its whole config
(entitlements, key digests, limits) from the controller's limits API and no ``--config``; a
ConfigMap is mounted as a bootstrap only when one is named (``config_map``), and is required
only for static limits (no ``limits_url``).

A body that is not an AdmissionReview, a ``kind`` the endpoint does not handle, or a body
over ``max_body_bytes`` gets HTTP 400 with an OpenAI-shaped error; nothing here raises
into aiohttp.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from tokenscaler import __version__
from tokenscaler.core.model import (
    DIMENSIONS,
    Entitlement,
    Pool,
    Tier,
    TokenPoolsConfig,
    check_config,
    check_oversubscription,
)
from tokenscaler.core.validation import ConfigError
from tokenscaler.kube import ENTITLEMENT_KIND, GROUP, POOL_KIND, POOL_LABEL
from tokenscaler.kube.translate import entitlement_from_cr, pool_from_cr, ref

log = logging.getLogger("tokenscaler.kube.webhook")

SIDECAR_NAME = "tokenscaler-sidecar"
INJECTED_ANNOTATION = "tokenpools.io/injected"
PORT_ANNOTATION = "tokenpools.io/port"
UPSTREAM_PORT_NAME = "ts-upstream"
METRICS_PORT_NAME = "ts-metrics"
CONFIG_VOLUME = "tokenscaler-config"
CLIENT_VOLUME = "tokenscaler-client"
CLIENT_DIR = "/var/run/secrets/tokenscaler"  # beside the ServiceAccount token's, not inside the config's
CLIENT_CA_KEY = "ca.crt"
CLIENT_TOKEN_KEY = "token"
IMAGE = "ghcr.io/tokenscaler/tokenscaler"
WARN_SHARE = 0.8
STATIC_CONFIG_MAP = "tokenscaler-config"  # the sidecars' config without a limits API


@dataclass(frozen=True)
class InjectedSidecar:
    """The sidecar container the webhook injects into a pool's pods: image, ports, limits API, resources."""

    image: str = f"{IMAGE}:{__version__}"  # the image follows the package's version
    port: int = 8001
    metrics_port: int = 9464
    limits_url: str | None = "https://tokenscaler-controller.tokenscaler.svc:8080"
    # the Secret (pod's namespace) with ca.crt and token for --limits-ca / --limits-token-file; None: none
    limits_secret: str | None = "tokenscaler-client"
    # a ConfigMap (pod's namespace) with the config as ``config_key``, for --config: with
    # limits_url only a bootstrap until the first document, mounted only when named here;
    # without limits_url the sidecar's only config (then STATIC_CONFIG_MAP when unnamed)
    config_map: str | None = None
    config_key: str = "tokenpools.yaml"
    cpu_request: str = "500m"
    memory_request: str = "256Mi"
    cpu_limit: str | None = None
    memory_limit: str = "512Mi"


def config_map_of(opts: InjectedSidecar) -> str | None:
    """The ConfigMap the injected sidecar mounts for ``--config``, or None (the limits API only)."""
    if opts.config_map:
        return opts.config_map
    return None if opts.limits_url else STATIC_CONFIG_MAP


class BadReview(Exception):
    """A request the webhook cannot answer with an AdmissionReview (HTTP 400)."""


# --------------------------------------------------------------------------- reviews


def parse_review(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadReview(f"the body is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BadReview(f"an AdmissionReview must be a JSON object, got {type(doc).__name__}")
    if doc.get("kind") != "AdmissionReview" or doc.get("apiVersion") != "admission.k8s.io/v1":
        raise BadReview(
            f"expected kind AdmissionReview, apiVersion admission.k8s.io/v1; got kind {doc.get('kind')!r}, "
            f"apiVersion {doc.get('apiVersion')!r}"
        )
    req = doc.get("request")
    if not isinstance(req, dict) or not isinstance(req.get("uid"), str) or not req["uid"]:
        raise BadReview("request.uid: missing (an AdmissionReview must carry a request with a uid)")
    if not isinstance(req.get("kind"), dict) or not isinstance(req["kind"].get("kind"), str):
        raise BadReview("request.kind.kind: missing")
    if req.get("object") is not None and not isinstance(req["object"], dict):
        raise BadReview("request.object: must be an object")
    return req


def review(
    uid: str,
    allowed: bool,
    *,
    message: str | None = None,
    code: int | None = None,
    warnings: list[str] | None = None,
    patch: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    resp: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if message is not None or code is not None:
        resp["status"] = {"code": code or (200 if allowed else 403), "message": message or ""}
        if not allowed:
            resp["status"]["reason"] = "Invalid" if code == 422 else "Forbidden"
    if warnings:
        resp["warnings"] = warnings
    if patch:
        resp["patchType"] = "JSONPatch"
        resp["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp}


# --------------------------------------------------------------------------- validation


def _share_warnings(pool: Pool, ents: list[Entitlement]) -> list[str]:
    total = np.zeros(len(DIMENSIONS))
    for e in ents:
        if e.pool == pool.name:
            total += e.guarantee_array()
    cap = pool.planned_capacity(pool.max_replicas)
    out = []
    for k, d in enumerate(DIMENSIONS):
        if cap[k] > 0 and WARN_SHARE * cap[k] < total[k] <= cap[k] * (1 + 1e-12):
            out.append(
                f"pool {pool.name}: guarantees on {d} sum to {total[k]:g}, {100 * total[k] / cap[k]:.0f}% of capacity "
                f"{cap[k]:g} (above {100 * WARN_SHARE:.0f}%: little room left for elastic tiers and for failures)"
            )
    return out


def _spot_warnings(e: Entitlement) -> list[str]:
    if e.tier is not Tier.SPOT:
        return []
    return [
        f"entitlement {e.name}: spot with limit.{d} 0 can never be admitted"
        for d in DIMENSIONS
        if getattr(e.limit, d) == 0
    ]


def validate_request(req: Mapping[str, Any], config: TokenPoolsConfig | None) -> dict[str, Any]:
    """The AdmissionReview answering one /validate request, against the current ``config``."""
    uid = req["uid"]
    kind = req["kind"]["kind"]
    group = req["kind"].get("group")
    if group != GROUP or kind not in (POOL_KIND, ENTITLEMENT_KIND):
        raise BadReview(f"/validate handles {GROUP} TokenPool and Entitlement, not {group or 'core'}/{kind}")
    op = req.get("operation")
    if op not in ("CREATE", "UPDATE"):
        return review(uid, True)
    obj = req.get("object")
    if not isinstance(obj, dict):
        raise BadReview(f"request.object: missing for {op}")
    obj = {**obj, "kind": kind}
    if not (obj.get("metadata") or {}).get("name") and req.get("name"):
        obj["metadata"] = {**(obj.get("metadata") or {}), "name": req["name"]}
    warnings: list[str] = []
    try:
        model: Pool | Entitlement = pool_from_cr(obj) if kind == POOL_KIND else entitlement_from_cr(obj)
    except ConfigError as e:
        return review(uid, False, code=422, message=f"{e.source}: " + "; ".join(e.errors))
    if config is None:
        warnings.append("no config is known to the webhook yet: only the object itself was checked")
        return review(uid, True, warnings=warnings)
    if isinstance(model, Pool):
        pools = [p for p in config.pools if p.name != model.name] + [model]
        ents = list(config.entitlements)
        pool = model
    else:
        pools = list(config.pools)
        ents = [e for e in config.entitlements if e.name != model.name] + [model]
        found = next((p for p in pools if p.name == model.pool), None)
        warnings += _spot_warnings(model)
        if found is None:
            warnings.append(
                f"entitlement {model.name}: pool {model.pool!r} does not exist (yet): "
                "it is left out of the plan until a TokenPool of that name is there"
            )
            return review(uid, True, warnings=warnings)
        pool = found
    errors = check_oversubscription([pool], ents)
    if not errors:
        # the rest of the config's cross-object rules, limited to the pool this change touches
        errors = [
            m
            for m in check_config(pools, [e for e in ents if e.pool == pool.name])
            if "unknown pool" not in m
        ]
    if errors:
        return review(uid, False, code=403, message=f"{ref(obj)} denied: " + "; ".join(errors), warnings=warnings)
    warnings += _share_warnings(pool, ents)
    return review(uid, True, warnings=warnings)


# --------------------------------------------------------------------------- mutation


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _serving_port(pod: Mapping[str, Any]) -> tuple[int, int, dict[str, Any]] | None:
    """(container index, port index, port) of the port clients are served on."""
    containers = (pod.get("spec") or {}).get("containers") or []
    wanted = ((pod.get("metadata") or {}).get("annotations") or {}).get(PORT_ANNOTATION)
    candidates = [
        (i, j, p)
        for i, c in enumerate(containers)
        for j, p in enumerate(c.get("ports") or [])
        if isinstance(p, dict) and p.get("protocol", "TCP") == "TCP"
    ]
    if wanted:
        for i, j, p in candidates:
            if str(p.get("name")) == wanted or str(p.get("containerPort")) == wanted:
                return i, j, p
        return None
    for i, j, p in candidates:
        if p.get("name") == "http":
            return i, j, p
    return candidates[0] if candidates else None


def sidecar_container(pool: Pool, upstream_port: int, port_name: str, opts: InjectedSidecar) -> dict[str, Any]:
    args = [
        "sidecar",
        "--listen", f"0.0.0.0:{opts.port}",
        "--upstream", f"http://127.0.0.1:{upstream_port}",
        "--pool", pool.name,
        "--metrics-port", str(opts.metrics_port),
        # static limits (a bootstrap --config before the first document, or no controller)
        # split over every replica the pool may have: the fleet never admits more than allowed
        "--replicas", str(pool.max_replicas),
    ]  # fmt: skip
    mounts: list[dict[str, Any]] = []
    if config_map_of(opts) is not None:
        args += ["--config", f"/etc/tokenscaler/{opts.config_key}"]
        mounts.append({"name": CONFIG_VOLUME, "mountPath": "/etc/tokenscaler", "readOnly": True})
    if opts.limits_url:
        args += ["--limits-url", opts.limits_url]
        if opts.limits_secret:  # files from a Secret volume: credentials are never arguments
            args += ["--limits-ca", f"{CLIENT_DIR}/{CLIENT_CA_KEY}"]
            args += ["--limits-token-file", f"{CLIENT_DIR}/{CLIENT_TOKEN_KEY}"]
            mounts.append({"name": CLIENT_VOLUME, "mountPath": CLIENT_DIR, "readOnly": True})
    limits: dict[str, str] = {"memory": opts.memory_limit}
    if opts.cpu_limit:
        limits["cpu"] = opts.cpu_limit
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": opts.image,
        "args": args,
        "ports": [
            {"name": port_name, "containerPort": opts.port, "protocol": "TCP"},
            {"name": METRICS_PORT_NAME, "containerPort": opts.metrics_port, "protocol": "TCP"},
        ],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "readinessProbe": {"tcpSocket": {"port": opts.port}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/metrics", "port": opts.metrics_port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": opts.cpu_request, "memory": opts.memory_request}, "limits": limits},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if mounts:
        container["volumeMounts"] = mounts
    return container


def sidecar_volumes(opts: InjectedSidecar) -> list[dict[str, Any]]:
    """The pod volumes the injected sidecar mounts: the config's ConfigMap and the client Secret, when used."""
    volumes: list[dict[str, Any]] = []
    if (name := config_map_of(opts)) is not None:
        volumes.append({"name": CONFIG_VOLUME, "configMap": {"name": name}})
    if opts.limits_url and opts.limits_secret:
        keys = [{"key": k, "path": k} for k in (CLIENT_CA_KEY, CLIENT_TOKEN_KEY)]
        volumes.append({"name": CLIENT_VOLUME, "secret": {"secretName": opts.limits_secret, "items": keys}})
    return volumes


def mutate_request(
    req: Mapping[str, Any], config: TokenPoolsConfig | None, opts: InjectedSidecar
) -> dict[str, Any]:
    """The AdmissionReview answering one /mutate request: a JSONPatch that injects the sidecar."""
    uid = req["uid"]
    kind = req["kind"]
    if kind.get("kind") != "Pod" or kind.get("group", "") != "":
        raise BadReview(f"/mutate handles core/v1 Pod, not {kind.get('group') or 'core'}/{kind.get('kind')}")
    pod = req.get("object")
    if not isinstance(pod, dict):
        raise BadReview("request.object: missing")
    meta = pod.get("metadata") or {}
    pool_name = (meta.get("labels") or {}).get(POOL_LABEL)
    if not pool_name:
        return review(uid, True)
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if not isinstance(containers, list) or not all(isinstance(c, dict) for c in containers):
        raise BadReview("request.object.spec.containers: must be a list of objects")
    if any(c.get("name") == SIDECAR_NAME for c in containers + list(spec.get("initContainers") or [])):
        return review(uid, True)  # already injected (or added by hand): left as it is
    if config is None:
        return review(uid, False, code=503, message="the webhook has no config yet; retry shortly")
    try:
        pool = config.pool(pool_name)
    except KeyError:
        known = ", ".join(p.name for p in config.pools)
        return review(
            uid, False, code=422, message=f"label {POOL_LABEL}={pool_name!r}: no such pool (known: {known})"
        )
    serving = _serving_port(pod)
    if serving is None:
        return review(
            uid,
            False,
            code=422,
            message=f"pod for pool {pool_name}: no TCP container port to route through the sidecar "
            f"(set annotation {PORT_ANNOTATION} to its name or number)",
        )
    ci, pj, port = serving
    if int(port.get("containerPort", 0)) in (opts.port, opts.metrics_port):
        return review(
            uid,
            False,
            code=422,
            message=f"pod for pool {pool_name}: its serving port {port.get('containerPort')} is the sidecar's "
            f"({opts.port} proxy, {opts.metrics_port} metrics)",
        )
    port_name = str(port.get("name") or "http")
    ops: list[dict[str, Any]] = []
    if "annotations" not in meta:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: "true"}})
    else:
        ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(INJECTED_ANNOTATION)}", "value": "true"})
    if port.get("name"):
        ops.append({"op": "replace", "path": f"/spec/containers/{ci}/ports/{pj}/name", "value": UPSTREAM_PORT_NAME})
    ops.append(
        {
            "op": "add",
            "path": "/spec/containers/-",
            "value": sidecar_container(pool, int(port["containerPort"]), port_name, opts),
        }
    )
    volumes = spec.get("volumes")
    if volumes is None:
        if sidecar_volumes(opts):
            ops.append({"op": "add", "path": "/spec/volumes", "value": sidecar_volumes(opts)})
    else:
        present = {v.get("name") for v in volumes if isinstance(v, dict)}
        for volume in sidecar_volumes(opts):
            if volume["name"] not in present:
                ops.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
    return review(uid, True, patch=ops)


# --------------------------------------------------------------------------- the server


def _error(status: int, message: str) -> web.Response:
    err_type = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": err_type, "code": status}}, status=status)


class Webhook:
    """The aiohttp app: /validate, /mutate, /healthz, /readyz."""

    def __init__(
        self,
        config: Callable[[], TokenPoolsConfig | None],
        sidecar: InjectedSidecar = InjectedSidecar(),
        *,
        max_body_bytes: int = 3 * 2**20,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.sidecar = sidecar
        self.max_body_bytes = max_body_bytes
        self.ready = ready or (lambda: True)
        self.counts: dict[tuple[str, int], int] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/validate", self.validate)
        app.router.add_post("/mutate", self.mutate)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/", self.healthz)
        return app

    async def _handle(self, request: web.Request, route: str, answer: Callable[..., dict[str, Any]]) -> web.Response:
        status = 200
        try:
            if request.content_length is not None and request.content_length > self.max_body_bytes:
                raise BadReview(f"the body ({request.content_length} bytes) is over {self.max_body_bytes} bytes")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge as e:
                raise BadReview(f"the body is over {self.max_body_bytes} bytes") from e
            req = parse_review(body)
            doc = answer(req)
            resp = web.json_response(doc)
        except BadReview as e:
            status = 400
            resp = _error(400, str(e))
        except Exception as e:  # nothing crashes the server: a bug answers 500 and is logged
            log.exception("%s failed", route)
            status = 500
            resp = _error(500, f"internal error: {type(e).__name__}")
        self.counts[(route, status)] = self.counts.get((route, status), 0) + 1
        return resp

    async def validate(self, request: web.Request) -> web.Response:
        return await self._handle(request, "validate", lambda r: validate_request(r, self.config()))

    async def mutate(self, request: web.Request) -> web.Response:
        return await self._handle(request, "mutate", lambda r: mutate_request(r, self.config(), self.sidecar))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready() and self.config() is not None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="no config yet\n")
