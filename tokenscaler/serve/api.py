"""The controller's HTTP API: limits for the sidecars, the plan, health, metrics.

Routes (all answers come from the :class:`PlanStore`; nothing is solved on a request):

* ``GET /v1/pools/{pool}/limits?replica={id}``: the
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

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tokenscaler.control.metrics import ControllerMetrics
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
        self._cache: dict[tuple[str, str | None], bytes] = {}  # documents of plan _cache_version
        self._cache_version: int | None = None

    def document(self, published: PublishedPlan, pool: str, replica: str | None) -> LimitsDocument:
        """The limits document of ``replica`` (None: the even split) in the published plan."""
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
        app.router.add_get("/v1/plan", self.plan)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    def _count(self, route: str, status: int) -> None:
        self.metrics.api_requests.labels(route, str(status)).inc()

    async def limits(self, request: web.Request) -> web.StreamResponse:
        route = "limits"
        pool = request.match_info["pool"]
        replica = request.query.get("replica") or None
        published = self.store.current()
        if published is None:
            self._count(route, 503)
            return _error(503, "no plan yet: the controller has not completed its first interval", "unavailable")
        if pool not in published.plan.pools:
            self._count(route, 404)
            known = ", ".join(sorted(published.plan.pools)) or "none"
            return _error(404, f"unknown pool {pool!r} (known: {known})", "not_found")
        known_replicas = self._known_replicas(published, pool)
        # a plan that has seen no replica at all (the first intervals, a plan restored from the
        # state file) cannot tell: it answers, as it did before it knew replicas
        if replica is not None and known_replicas and replica not in known_replicas:
            self._count(route, 404)
            known = ", ".join(sorted(known_replicas))
            return _error(
                404,
                f"unknown replica {replica!r} of pool {pool!r} (known: {known}; the controller learns a replica "
                "from its sidecar's metrics within an interval; without ?replica= the document is the even split)",
                "not_found",
            )
        etag = f'"{published.version}"'
        if request.headers.get("If-None-Match") == etag:
            self._count(route, 304)
            return web.Response(status=304, headers={"ETag": etag})
        if self._cache_version != published.version:  # a new plan: every cached document is old
            self._cache.clear()
            self._cache_version = published.version
        body = self._cache.get((pool, replica))
        if body is None:
            body = self.document(published, pool, replica).model_dump_json().encode()
            self._cache[(pool, replica)] = body
        self._count(route, 200)
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    @staticmethod
    def _known_replicas(published: PublishedPlan, pool: str) -> set[str]:
        """Replicas whose sidecars the controller has seen, or whose traffic it has routed."""
        return set(published.plan.pools[pool].replicas) | set(published.shares.get(pool, {}))

    async def plan(self, request: web.Request) -> web.Response:
        published = self.store.current()
        if published is None:
            self._count("plan", 503)
            return _error(503, "no plan yet", "unavailable")
        doc = published.plan.to_json()
        doc.update(version=published.version, stale=published.stale, stale_since=published.stale_since)
        self._count("plan", 200)
        return web.json_response(doc)

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
