"""The sidecar's client of the limits API v1beta1: the pool's spec and limits, watched, as deltas.

:class:`PoolLimitsSource` asks ``GET {url}/v1beta1/pools/{pool}/limits?replica=&spec=
&since=&instance=&watch=true`` (:mod:`tokenscaler.core.pool_limits`): the controller answers at once
when a newer version exists, else holds the request up to ``watch_s`` and answers when one
is published (304 if none), so a sidecar learns a version within milliseconds of publish
rather than within a poll. It sends the spec and version it holds: the spec comes only
when the config changed, the limits only as the rows that changed. A document is parsed in a
worker thread when large and applied as the gates that changed
(:class:`~tokenscaler.sidecar.pool_view.PoolView`), so proxying never waits for 10,000
entitlements.

Fail-static and expiry are those of :class:`~tokenscaler.sidecar.limits.HttpLimitsSource`;
the floors follow the last spec. An older controller (no v1beta1 route) is asked the
v1alpha1 way instead (``api="auto"``, the default), with the sidecar's own config.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from tokenscaler.core.limits import LimitsDocument
from tokenscaler.core.model import Entitlement, Pool, TokenPoolsConfig
from tokenscaler.core.pool_limits import PoolLimitsDocument, PoolSpec
from tokenscaler.sidecar.limits import HttpLimitsSource, LimitRules, LimitsUpdate, budgets_of
from tokenscaler.sidecar.limits_auth import LimitsHttpError, LimitsRefused, error_message
from tokenscaler.sidecar.pool_view import OutOfStep, PoolView, ViewChange

log = logging.getLogger(__name__)
PARSE_IN_THREAD_BYTES = 64 * 1024  # larger documents are parsed off the proxy's event loop


SPEC_CHUNK = 500  # entitlements validated at a time: the GIL is let go between chunks
_ENTITLEMENTS = TypeAdapter(list[Entitlement])


def parse(body: bytes) -> PoolLimitsDocument:
    """A document from its bytes. A spec's entitlements are validated in chunks, so a worker
    thread parsing 10,000 of them lets the proxy's event loop run between chunks (one
    validation call would hold the GIL for the whole spec); the config is assembled without
    validating it again (its cross-object rules are the controller's, which checked them)."""
    raw = orjson.loads(body)
    spec = raw.pop("spec", None) if isinstance(raw, dict) else None
    doc = PoolLimitsDocument.model_validate(raw)
    if spec is None:
        return doc
    if not isinstance(spec, dict) or not isinstance(spec.get("entitlements"), list):
        raise ValueError("spec: expected {pool, entitlements: [...]}")
    pool = Pool.model_validate(spec.get("pool"))
    items: list[object] = spec["entitlements"]
    ents: list[Entitlement] = []
    for i in range(0, len(items), SPEC_CHUNK):
        ents.extend(_ENTITLEMENTS.validate_python(items[i : i + SPEC_CHUNK]))
        time.sleep(0)  # let the event loop's thread have the GIL
    return doc.model_copy(update={"spec": PoolSpec.model_construct(pool=pool, entitlements=ents)})


@dataclass
class Applied:
    """A document parsed and applied to the view (in a worker thread when it is large)."""

    doc: PoolLimitsDocument
    change: ViewChange | None = None
    rules: LimitRules | None = None  # the floors of a new spec
    out_of_step: str | None = None
    parse_s: float = 0.0
    apply_s: float = 0.0


class PoolLimitsSource(HttpLimitsSource):
    """Watches the controller's v1beta1 document; ``on_config`` gets each new spec's config
    (before the limits of that document are applied)."""

    def __init__(
        self,
        config: TokenPoolsConfig | None,
        pool: str,
        url: str,
        *,
        replica: str,
        replicas: int = 1,
        watch_s: float = 30.0,
        api: str = "auto",
        on_config: Callable[[TokenPoolsConfig], None] | None = None,
        **kwargs: object,
    ) -> None:
        self.base = url.rstrip("/")
        self.pool_name = pool
        self.bootstrap = config
        if config is not None:
            super().__init__(config, pool, url, replica=replica, replicas=replicas, **kwargs)  # type: ignore[arg-type]
        else:
            self._init_without_config(pool, url, replica, replicas, kwargs)
        self.view = PoolView(pool)
        self.legacy_url = self.url
        if api != "v1alpha1":
            self.url = self._v1beta1_url()  # what the logs name
        self.watch_s = watch_s
        self.api = api  # auto | v1beta1 | v1alpha1
        self.legacy = api == "v1alpha1"
        self.on_config = on_config
        self.generation: int | None = None
        self.received_bytes = 0  # document bytes received (v1beta1)
        self.parse_s = 0.0  # the last document's parse, and its application to the view, in seconds
        self.apply_s = 0.0
        self._pending: Applied | None = None

    def _init_without_config(self, pool: str, url: str, replica: str, replicas: int, kwargs: dict[str, Any]) -> None:
        # HttpLimitsSource without its rules: they come with the first document's spec
        placeholder = TokenPoolsConfig.model_validate(
            {"pools": [{"name": pool, "replica": {"throughput_tokens_per_s": 1, "kv_tokens": 1, "concurrency": 1},
                        "max_replicas": 1}]}
        )  # fmt: skip
        super().__init__(placeholder, pool, url, replica=replica, replicas=replicas, **kwargs)

    def adopt(self, config: TokenPoolsConfig) -> None:
        """Bootstrap from ``config`` (the first document's, when there is no ``--config``)."""
        self.bootstrap = config
        self.rules = LimitRules(config, self.pool_name, self.rules.replicas)

    @property
    def config(self) -> TokenPoolsConfig | None:
        """The config in force: the last spec's, else the bootstrap."""
        return self.view.config or self.bootstrap

    def _v1beta1_url(self) -> str:
        return f"{self.base}/v1beta1/pools/{self.pool_name}/limits"

    async def _fetch(self, session: object, *, as_replica: bool = True) -> tuple[int, LimitsDocument | None]:
        """One ask; ``as_replica`` False: without ``replica=`` (the even split), as a sidecar
        without a config asks first: the controller learns a replica from its sidecar's
        metrics, which that sidecar serves only once it has a config."""
        if self.legacy:
            return await super()._fetch(session)
        import aiohttp

        assert isinstance(session, aiohttp.ClientSession)
        # packed columns: a copy to decode, not 10,000 rows of JSON numbers to parse (a controller
        # from before packing ignores the parameter and answers plain columns, which parse too)
        params = {"replica": self.replica, "columns": "packed"} if as_replica else {"columns": "packed"}
        watching = (
            self.view.version is not None and self.view.replica == self.replica and self.watch_s > 0
            and self.state != "expired"
        )  # fmt: skip
        if self.view.spec_hash is not None:
            params["spec"] = self.view.spec_hash
        # a version held for another replica (the even split a config-less sidecar began with)
        # is not this replica's: ask for its rows again (the spec it holds is still good)
        if self.view.version is not None and (not as_replica or self.view.replica == self.replica):
            params["since"] = str(self.view.version)
            params["instance"] = self.view.instance or ""
        if watching:
            params.update(watch="true", timeout_s=f"{self.watch_s:g}")
        headers = {"Accept": "application/json"}
        tls: ssl.SSLContext | bool = True
        if self.auth is not None:
            headers.update(self.auth.headers())
            tls = self.auth.ssl_context() or True
        timeout = aiohttp.ClientTimeout(total=self.timeout_s + (self.watch_s if watching else 0.0))
        async with session.get(self._v1beta1_url(), params=params, headers=headers, ssl=tls, timeout=timeout) as resp:
            if resp.status == 304:
                return 304, None
            body = await resp.read()
            self.received_bytes += len(body)
            if resp.status in (401, 403):
                raise LimitsRefused(resp.status, self._redact(error_message(body)))
            if resp.status == 404 and self.api == "auto" and not body.startswith(b'{"error"'):
                # no such route: a controller older than v1beta1
                log.warning("the controller at %s has no v1beta1 limits API: asking it the v1alpha1 way", self.base)
                if self.bootstrap is None:
                    raise LimitsHttpError("the controller serves only v1alpha1, which needs this sidecar's --config")
                self.legacy = True
                self.url = self.legacy_url
                return await super()._fetch(session)
            if resp.status != 200:
                raise LimitsHttpError(f"HTTP {resp.status}: {self._redact(error_message(body))}")
        # parsed outside the request's timeout: that bounds the network, not this replica's CPU (a
        # spec of 10,000 entitlements on a busy core takes longer than an answer should)
        if len(body) > PARSE_IN_THREAD_BYTES:
            applied = await asyncio.to_thread(self._parse_apply, body)
        else:
            applied = self._parse_apply(body)
        self.parse_s, self.apply_s = applied.parse_s, applied.apply_s
        self._pending = applied
        return 200, None

    def _parse_apply(self, body: bytes) -> Applied:
        """Parse ``body`` and apply it to the view (pure but for the view; no event loop)."""
        t0 = time.perf_counter()
        doc = parse(body)
        if doc.pool != self.pool_name:
            raise RuntimeError(f"document is for pool {doc.pool!r}, not {self.pool_name!r}")
        out = Applied(doc, parse_s=time.perf_counter() - t0)
        t1 = time.perf_counter()
        try:
            out.change = self.view.apply(doc)
        except OutOfStep as e:  # a delta against what this view does not hold: ask for everything
            out.out_of_step = str(e)
            return out
        if out.change.config is not None:
            out.rules = LimitRules(out.change.config, self.pool_name, max(doc.ready_replicas, 1))
        out.apply_s = time.perf_counter() - t1
        return out

    async def first_config(self, retry_s: float = 1.0, max_retry_s: float = 10.0) -> TokenPoolsConfig:
        """The pool's config from the first document (no ``--config``): retried until it comes."""
        import aiohttp

        delay = retry_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            while True:
                try:
                    await self._fetch(session, as_replica=False)
                    applied = self._pending
                    if isinstance(applied, Applied) and applied.change is not None and applied.change.config:
                        return applied.change.config  # kept pending: run() applies it first
                except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError, ValidationError, ValueError) as e:
                    log.warning("waiting for the first limits document from %s: %s", self._v1beta1_url(),
                                self._redact(str(e) or type(e).__name__))  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_retry_s)

    async def run(self, apply: Callable[[LimitsUpdate], None]) -> None:
        if self._pending is not None:  # the document first_config() fetched
            self._on_success(200, None, apply)
        await super().run(apply)

    def _on_success(self, status: int, doc: LimitsDocument | None, apply: Callable[[LimitsUpdate], None]) -> None:
        if self.legacy:
            super()._on_success(status, doc, apply)
            return
        self._last_ok = self.clock()
        was = self.state
        applied, self._pending = self._pending, None
        if not isinstance(applied, Applied):
            if self.view.version is not None and was in ("stale", "expired"):
                self._restore(apply, was)
            return
        pending = applied.doc
        if applied.out_of_step is not None or applied.change is None:
            log.info("limits document out of step (%s): asking for the whole document", applied.out_of_step)
            self.view.version = None
            self.view.spec_hash = None
            return
        change = applied.change
        if change.config is not None:
            if applied.rules is not None:
                self.rules = applied.rules
            if self.on_config is not None:
                self.on_config(change.config)
        state = "stale" if pending.stale else "fresh"
        self.state = state
        self.version = str(pending.version)
        self.generation = pending.generation
        # after a new spec every gate is set anew; after an expiry too (the floors were in force)
        full = change.config is not None or was == "expired"
        if full:
            apply(LimitsUpdate(change.table, state, self.version, change.budgets, removed=change.removed, lazy=True))
        else:
            apply(LimitsUpdate(change.changed, state, self.version, change.budgets, partial=True,
                               removed=change.removed, table=change.table))  # fmt: skip
        if was == "expired":
            log.warning("limits restored from %s (version %s)", self.base, pending.version)

    def _restore(self, apply: Callable[[LimitsUpdate], None], was: str) -> None:
        """The source answers again, with the version this view holds."""
        self.state = "fresh"
        if was == "expired":  # the floors are in force: every gate of the view anew
            apply(LimitsUpdate(self.view.current(), "fresh", self.version, budgets=self.view.budgets, lazy=True))
            log.warning("limits restored from %s (version %s)", self.base, self.version)
        else:
            apply(LimitsUpdate({}, "fresh", self.version, budgets=self.view.budgets, partial=True,
                               table=self.view.table))  # fmt: skip

    def _expired_update(self) -> LimitsUpdate:
        if self.legacy:
            return super()._expired_update()
        return LimitsUpdate(self.rules.all_floors(), "expired", self.version, lazy=True)

    def _stale_update(self) -> LimitsUpdate:
        if self.legacy:
            return super()._stale_update()
        return LimitsUpdate({}, "stale", self.version, partial=True)  # every gate stays as it is

    def _delay(self, failures: int) -> float | None:
        """After a watch answered, ask again at once (the watch itself waits); None: the poll rule."""
        return 0.01 if failures == 0 and not self.legacy and self.watch_s > 0 else None


__all__ = ["PoolLimitsSource", "budgets_of"]
