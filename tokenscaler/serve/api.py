"""The controller's HTTP API: limits for the sidecars, the plan, health, metrics.

Routes (all answers come from the :class:`PlanStore`; nothing is solved on a request, and
nothing per entitlement is built on the event loop: documents are built once per version in
a worker thread by :class:`~tokenscaler.control.publish.Publisher`):

* ``GET /v1beta1/pools/{pool}/limits?replica={id}&spec=&since=&instance=&watch=true&columns=``: the
  pool-level :class:`~tokenscaler.core.pool_limits.PoolLimitsDocument` every replica shares
  (spec with key digests, limit columns or a delta, this replica's routing shares), held
  open with ``watch`` until a new version; ``ETag`` is the version; ``columns=packed``: the
  columns as base64 arrays (:class:`~tokenscaler.core.pool_limits.PackedColumns`).
* ``GET /v1/pools/{pool}/limits?replica={id}`` (v1alpha1, kept one release): the
  :class:`~tokenscaler.core.limits.LimitsDocument` for one replica's sidecar, built by
  :func:`~tokenscaler.core.limits.limits_document` (each entitlement's pool-level limit
  and burst split by this replica's observed share of its offered load, so uneven routing
  never throttles a tenant below its entitlement). ``ETag`` is the document's version;
  ``If-None-Match`` with it answers 304. A replica the controller has not seen (no sidecar
  metrics, no routed traffic) while it has seen others is a 404 naming the known ones; without ``replica=`` the
  document is the even split over the ready replicas.
* ``GET /v1/plan``: the whole plan, the shape ``tokenscaler plan`` prints, plus
  ``version``, ``stale`` and ``stale_since``.
* ``GET /healthz`` (the process serves), ``GET /readyz`` (a plan exists; its detail lists
  each pool's ``CapacityMismatch`` conditions and whether its guarantees fit, and the config
  in force: its generation, source and a ``ConfigReloadFailed`` condition while the last
  re-read of the file was refused), ``GET /metrics``.

Errors are JSON ``{"error": {"message", "type", "code"}}`` with the HTTP status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tokenscaler.control.metrics import ControllerMetrics
from tokenscaler.control.publish import PoolPublication, Publisher
from tokenscaler.control.store import PlanStore, PublishedPlan
from tokenscaler.core.limits import LimitsDocument, limits_document


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)


class ControllerApi:
    def __init__(
        self,
        store: PlanStore,
        registry: CollectorRegistry,
        metrics: ControllerMetrics,
        *,
        limits_ttl_s: float = 60.0,
        config_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``config_status`` says which config is in force (``/readyz``'s ``config``:
        ``generation``, ``last_reload_error``, ``source``)."""
        self.config_status = config_status
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.limits_ttl_s = limits_ttl_s
        self.publisher = Publisher(limits_ttl_s)
        self._plan_body: tuple[int, bytes] | None = None  # /v1/plan of one version, built off the loop

    def document(self, published: PublishedPlan, pool: str, replica: str | None) -> LimitsDocument:
        """The v1alpha1 limits document of ``replica`` (None: the even split) in the published plan."""
        return limits_document(
            published.plan.pools[pool],
            published.shares.get(pool, {}),
            replica,
            version=str(published.version),
            generated_at=published.plan.now,
            expires_at=published.published_at + self.limits_ttl_s,
            stale=published.stale,
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/v1/pools/{pool}/limits", self.limits)
        app.router.add_get("/v1beta1/pools/{pool}/limits", self.pool_limits)
        app.router.add_get("/v1/plan", self.plan)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    def _count(self, route: str, status: int) -> None:
        self.metrics.api_requests.labels(route, str(status)).inc()

    async def limits(self, request: web.Request) -> web.StreamResponse:
        """v1alpha1, kept one release: one replica's :class:`LimitsDocument`."""
        route = "limits"
        pool = request.match_info["pool"]
        replica = request.query.get("replica") or None
        checked = self._check(route, pool, replica)
        if isinstance(checked, web.Response):
            return checked
        published = checked
        # the entitlements' budget blocks only for a sidecar that reads them: the previous release's
        # refuse any key they do not know (an older controller ignores the parameter)
        budgets = request.query.get("budgets", "false")
        if budgets not in ("true", "false"):
            self._count(route, 400)
            return _error(400, f"budgets must be true or false (got budgets={budgets!r})", "invalid_request_error")
        etag = f'"{published.version}"'
        if request.headers.get("If-None-Match") == etag:
            self._count(route, 304)
            return web.Response(status=304, headers={"ETag": etag})
        body = await self.publisher.legacy(published, pool, replica, budgets == "true")  # built once, off the loop
        self._count(route, 200)
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    def _check(self, route: str, pool: str, replica: str | None) -> web.Response | PublishedPlan:
        """The published plan, or the error answer: no plan yet, an unknown pool or replica."""
        published = self.store.current()
        if published is None:
            self._count(route, 503)
            return _error(503, "no plan yet: the controller has not completed its first interval", "unavailable")
        if pool not in published.plan.pools:
            self._count(route, 404)
            known = ", ".join(sorted(published.plan.pools)) or "none"
            return _error(404, f"unknown pool {pool!r} (known: {known})", "not_found")
        known_replicas = self._known_replicas(published, pool)
        if replica is not None and known_replicas and replica not in known_replicas:
            self._count(route, 404)
            known = ", ".join(sorted(known_replicas)[:20]) + (", ..." if len(known_replicas) > 20 else "")
            return _error(
                404,
                f"unknown replica {replica!r} of pool {pool!r} (known: {known}; the controller learns a replica "
                "from its sidecar's metrics within an interval; without ?replica= the document is the even split)",
                "not_found",
            )
        return published

    async def pool_limits(self, request: web.Request) -> web.StreamResponse:
        """v1beta1: the pool-level document (module docstring). Query: ``replica``; ``spec``,
        ``since`` and ``instance`` (what the sidecar holds); ``watch=true`` with ``timeout_s``
        (at most 60): answer once there is a version the sidecar does not hold, else 304."""
        route = "pool_limits"
        pool = request.match_info["pool"]
        q = request.query
        replica = q.get("replica") or None
        spec, instance = q.get("spec") or None, q.get("instance")
        try:
            since = int(q["since"]) if q.get("since") else None
            timeout_s = min(max(float(q.get("timeout_s", "30")), 0.0), 60.0)
        except ValueError:
            self._count(route, 400)
            return _error(400, "since must be an integer and timeout_s a number of seconds "
                          f"(got since={q.get('since')!r}, timeout_s={q.get('timeout_s')!r})",
                          "invalid_request_error")  # fmt: skip
        watch = q.get("watch", "").lower() in ("1", "true", "yes")
        columns = q.get("columns", "json")
        if columns not in ("json", "packed"):
            self._count(route, 400)
            return _error(400, f"columns must be json or packed (got columns={columns!r})", "invalid_request_error")
        pub = await self._publication(route, pool, replica)
        if isinstance(pub, web.Response):
            return pub
        if watch and pub.holds(spec, since, instance):
            changed = await self.store.wait_for_change(pub.version, timeout_s)
            if changed is not None:
                pub = await self._publication(route, pool, replica)
                if isinstance(pub, web.Response):
                    return pub
        etag = f'"{pub.version}"'
        if pub.holds(spec, since, instance):
            self._count(route, 304)
            return web.Response(status=304, headers={"ETag": etag})
        body = pub.body(replica, spec, since, instance, packed=columns == "packed")
        self._count(route, 200)
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    async def _publication(self, route: str, pool: str, replica: str | None) -> web.Response | PoolPublication:
        checked = self._check(route, pool, replica)
        if isinstance(checked, web.Response):
            return checked
        try:
            return await self.publisher.pool(checked, pool)
        except LookupError as e:  # a restored plan the config no longer matches: the next interval will
            self._count(route, 503)
            return _error(503, f"the plan and the config disagree until the next interval: {e}", "unavailable")

    @staticmethod
    def _known_replicas(published: PublishedPlan, pool: str) -> set[str]:
        """Replicas whose sidecars the controller has seen, or whose traffic it has routed."""
        return set(published.plan.pools[pool].replicas) | set(published.shares.get(pool, {}))

    async def plan(self, request: web.Request) -> web.Response:
        published = self.store.current()
        if published is None:
            self._count("plan", 503)
            return _error(503, "no plan yet", "unavailable")
        cached = self._plan_body
        if cached is None or cached[0] != published.version:
            cached = (published.version, await asyncio.to_thread(self._plan_json, published))
            self._plan_body = cached
        self._count("plan", 200)
        return web.Response(body=cached[1], content_type="application/json")

    @staticmethod
    def _plan_json(published: PublishedPlan) -> bytes:
        doc = published.plan.to_json()
        doc.update(version=published.version, stale=published.stale, stale_since=published.stale_since,
                   generation=published.generation)  # fmt: skip
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        config: dict[str, Any] | None = None
        if self.config_status is not None:
            # a refused re-read stays ready: the last good config is in force and serves
            config = dict(self.config_status())
            error = config.get("last_reload_error")
            config["conditions"] = (
                [{"type": "ConfigReloadFailed", "status": "True", "message": error}] if error is not None else []
            )
        published = self.store.current()
        if published is None:
            waiting: dict[str, Any] = {"status": "waiting for the first plan"}
            if config is not None:
                waiting["config"] = config
            return web.json_response(waiting, status=503)
        conditions = {
            name: [c.to_json(name) for c in pp.conditions] for name, pp in published.plan.pools.items() if pp.conditions
        }
        guarantees = {name: pp.guarantees_fit for name, pp in published.plan.pools.items()}
        body: dict[str, Any] = {
            "status": "ready",
            "version": published.version,
            "stale": published.stale,
            "conditions": conditions,
            "guarantees_fit": guarantees,
        }
        if config is not None:
            body["config"] = config
        return web.json_response(body)

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
