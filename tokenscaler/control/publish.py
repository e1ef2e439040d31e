"""The limits API's documents, built once per plan version from the plan's arrays, off the event loop.

A :class:`Publisher` lives beside the :class:`~tokenscaler.control.store.PlanStore`. The
first request for a version builds that pool's :class:`PoolPublication` in a worker thread
(every other request for it awaits the same build), so nothing per entitlement runs on the
HTTP event loop, and ``/healthz``, ``/readyz`` and the KEDA scaler never wait behind it:

* v1beta1 (:mod:`tokenscaler.core.pool_limits`): the pool's ``spec`` once per config
  generation, its limit columns once per version (every row, plus a delta per version a
  sidecar holds, computed on first ask), and each replica's routing shares (small, sparse).
  A body is those prebuilt fragments joined, O(bytes) per request.
* v1alpha1 (:class:`~tokenscaler.core.limits.LimitsDocument`, one per replica, kept one
  release for older sidecars): built with numpy and orjson instead of a pydantic model per
  entry, the same JSON, cached per (version, replica).

Cost: O(N) per version to build, O(N) bytes per replica for a full document and O(rows
changed) for a delta, O(N) per replica per version for v1alpha1 (which is why it is legacy).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import orjson

from tokenscaler.control.store import PublishedPlan
from tokenscaler.core.limits import API_VERSION, BudgetLimits, replica_parts
from tokenscaler.core.model import DIMENSIONS, TIER_ORDER, Entitlement, Pool, TokenPoolsConfig
from tokenscaler.core.plan import PoolPlan
from tokenscaler.core.pool_limits import API_VERSION_V1BETA1, finite, pack_columns, rounded, routing_shares

HISTORY = 8  # versions a delta can be computed from


@dataclass(frozen=True)
class SpecPublication:
    """A pool's spec (pool and entitlements as configured, keys as digests) of one generation."""

    generation: int
    names: tuple[str, ...]
    fragment: bytes  # {"pool": ..., "entitlements": [...]}
    hash: str  # of ``fragment``: what a sidecar holding this spec sends back (``?spec=``)


def build_spec(pool: Pool, entitlements: list[Entitlement], generation: int) -> SpecPublication:
    body = {
        "pool": pool.model_dump(mode="json"),
        "entitlements": [e.model_dump(mode="json", exclude_defaults=True) for e in entitlements],
    }
    fragment = orjson.dumps(body)
    return SpecPublication(generation, tuple(e.name for e in entitlements), fragment,
                           hashlib.sha256(fragment).hexdigest()[:16])  # fmt: skip


def pool_entitlements(config: TokenPoolsConfig | None, pp: PoolPlan) -> list[Entitlement]:
    """The pool's entitlements in the plan's row order (the spec's order is the columns')."""
    by_name = {} if config is None else {e.name: e for e in config.entitlements_of(pp.pool.name)}
    missing = [n for n in pp.rows.names if n not in by_name]
    if missing:  # a plan restored from a state file before the config caught up: the rows say enough
        raise LookupError(f"the plan's entitlements {missing[:3]} are not in the config")
    return [by_name[n] for n in pp.rows.names]


@dataclass
class PoolPublication:
    """One pool's documents of one published version."""

    pool: str
    version: int
    instance: str  # the controller process that made it: versions and deltas mean nothing across two
    spec: SpecPublication
    header: Mapping[str, object]
    tier: np.ndarray  # (n,) planned tier rank
    limit: np.ndarray  # (n, 3) pool-level, rounded
    burst: np.ndarray  # (n, 3)
    budgets: bytes
    observed: Mapping[str, np.ndarray]  # replica -> (n,) observed share, NaN where unseen
    ready_replicas: int
    held: np.ndarray  # (n,) versions each row's published values have been held (the deadband)
    previous: dict[int, PoolPublication] = field(default_factory=dict)  # older versions, same rows
    _deltas: dict[tuple[int | None, bool], bytes] = field(default_factory=dict)  # (since, packed) -> columns
    _routing: dict[str | None, bytes] = field(default_factory=dict)

    def delta(self, since: int | None, packed: bool = False) -> bytes:
        """The limits columns: the rows changed since version ``since`` if it is known, else all
        (``packed``: as :class:`~tokenscaler.core.pool_limits.PackedColumns`)."""
        old = self if since == self.version else None if since is None else self.previous.get(since)
        key = (None if old is None else old.version, packed)  # (None, _): every row
        got = self._deltas.get(key)
        if got is None:
            idx = None if old is None else np.flatnonzero(
                (old.tier != self.tier) | np.any(old.limit != self.limit, axis=1)
                | np.any(old.burst != self.burst, axis=1)
            )  # fmt: skip
            got = self._deltas[key] = _columns(key[0], idx, self, packed)
        return got

    def routing(self, replica: str | None) -> bytes:
        got = self._routing.get(replica)
        if got is None:
            rows = routing_shares(self.observed.get(replica) if replica else None, self.ready_replicas)
            names = self.spec.names
            got = orjson.dumps({names[i]: s for i, s in rows.items()})
            self._routing[replica] = got
        return got

    def holds(self, spec: str | None, since: int | None, instance: str | None) -> bool:
        """A sidecar that holds ``spec``, version ``since`` of ``instance`` holds this version."""
        return since == self.version and spec == self.spec.hash and instance == self.instance

    def body(
        self, replica: str | None, spec: str | None, since: int | None, instance: str | None, packed: bool = False
    ) -> bytes:
        """The document for ``replica``, for a sidecar that holds ``spec`` and version ``since`` of
        ``instance``: the spec only if it holds another, a delta only against a version it holds
        (``packed``: the columns as base64 arrays)."""
        same = spec == self.spec.hash
        since = since if same and instance == self.instance else None
        head = dict(self.header, replica=replica)
        return b"".join((
            orjson.dumps(head)[:-1],
            b',"spec":', b"null" if same else self.spec.fragment,
            b',"limits":', self.delta(since, packed),
            b',"routing":', self.routing(replica),
            b',"budgets":', self.budgets, b"}",
        ))  # fmt: skip


def build_pool_publication(
    published: PublishedPlan, pool: str, spec: SpecPublication, ttl_s: float, previous: PoolPublication | None,
    instance: str = "",
) -> PoolPublication:  # fmt: skip
    """The v1beta1 publication of ``pool`` in ``published`` (pure but for the clock it is given)."""
    pp = published.plan.pools[pool]
    tier = pp.rows.problem.tier.astype(np.int8)
    limit, burst = rounded(finite(pp.limit)), rounded(finite(pp.burst))
    held = np.zeros(len(tier), dtype=np.int64)
    if previous is not None and previous.spec.hash == spec.hash and previous.instance == instance:
        # a row whose limits moved less than DEADBAND keeps its published values, for at most
        # HOLD_VERSIONS versions: an elastic share shifts a little whenever anyone's demand does,
        # and resending every row of 10,000 each interval for that made deltas whole documents;
        # the bound makes a settled plan reach the sidecars exactly
        same = (previous.tier == tier) & _within(previous.limit, limit) & _within(previous.burst, burst)
        same &= previous.held < HOLD_VERSIONS
        limit = np.where(same[:, None], previous.limit, limit)
        burst = np.where(same[:, None], previous.burst, burst)
        moved = (previous.limit != limit).any(axis=1) | (previous.burst != burst).any(axis=1)
        held = np.where(moved, 0, previous.held + 1)
    header = {
        "api_version": API_VERSION_V1BETA1, "kind": "PoolLimits", "pool": pool, "version": published.version,
        "instance": instance, "generation": spec.generation, "spec_hash": spec.hash,
        "generated_at": published.plan.now,
        "expires_at": published.published_at + ttl_s, "stale": published.stale,
        "guarantees_fit": pp.guarantees_fit, "ready_replicas": int(pp.ready_replicas),
    }  # fmt: skip
    budgets = orjson.dumps({n: BudgetLimits.of(s).model_dump(mode="json") for n, s in pp.budgets.items()})
    pub = PoolPublication(
        pool, published.version, instance, spec, header, tier, limit, burst, budgets,
        published.shares.get(pool, {}), int(pp.ready_replicas), held,
    )  # fmt: skip
    # what sidecars ask for, built here in the worker thread rather than on first ask on the loop:
    # every row (a sidecar starting, or out of step) and the rows changed since the version before
    pub.delta(None, packed=False)
    pub.delta(None, packed=True)
    if previous is not None and previous.spec.hash == spec.hash and previous.instance == instance:
        older = dict(previous.previous)
        older[previous.version] = previous
        for v in sorted(older)[:-HISTORY]:
            del older[v]
        for p in older.values():
            p.previous = {}  # only the newest keeps the chain: memory stays HISTORY x N
        pub.previous = older
        pub.delta(previous.version, packed=True)
    return pub


def _columns(since: int | None, idx: np.ndarray | None, pub: PoolPublication, packed: bool) -> bytes:
    """The limits columns of ``pub``'s rows ``idx`` (None: every row) as JSON, plain or packed."""
    tier, limit, burst = (pub.tier, pub.limit, pub.burst) if idx is None else (
        pub.tier[idx], pub.limit[idx], pub.burst[idx])  # fmt: skip
    if packed:
        return orjson.dumps(pack_columns(since, idx, tier, limit, burst))
    return orjson.dumps(
        {"since": since, "index": idx, "tier": tier, "limit": limit, "burst": burst}, option=orjson.OPT_SERIALIZE_NUMPY
    )


DEADBAND = 0.02  # relative change of a row's limits below which it is not republished...
HOLD_VERSIONS = 6  # ...for at most this many versions (30 s at the default interval)


def _within(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """(n,) rows of ``new`` within DEADBAND of ``old`` on every column (0 stays 0)."""
    within: np.ndarray = np.all(np.abs(new - old) <= DEADBAND * np.abs(old), axis=1)
    return within


def legacy_document(
    pp: PoolPlan, observed: Mapping[str, np.ndarray], replica: str | None, *, version: str,
    generated_at: float, expires_at: float, stale: bool, budgets: bool = True,
) -> bytes:  # fmt: skip
    """The v1alpha1 :class:`~tokenscaler.core.limits.LimitsDocument` of ``replica`` as JSON,
    the same document as ``limits_document(...)`` once parsed, but built from the arrays.
    An entry has a ``budget`` key only when the entitlement has a budget and ``budgets`` is true
    (the sidecars that read it ask ``budgets=true``): the sidecars of the previous release refuse
    any key they do not know, and validate every document served without the blocks."""
    p = pp.rows.problem
    lim, bur, ceiling, ceiling_burst = replica_parts(pp, observed, replica)
    tier_names = [t.value for t in TIER_ORDER]
    tiers, prios = p.tier.tolist(), p.priority.tolist()
    lim_rows, bur_rows, ceil_rows, cb_rows = lim.tolist(), bur.tolist(), ceiling.tolist(), ceiling_burst.tolist()
    d0, d1, d2 = DIMENSIONS
    blocks = {n: BudgetLimits.of(s).model_dump(mode="json") for n, s in pp.budgets.items()} if budgets else {}
    ents = {}
    for i, name in enumerate(pp.rows.names):
        lr, br, cr, cbr = lim_rows[i], bur_rows[i], ceil_rows[i], cb_rows[i]
        ents[name] = {
            "tier": tier_names[tiers[i]], "priority": prios[i],
            "limit": {d0: lr[0], d1: lr[1], d2: lr[2]},
            "burst": {d0: br[0], d1: br[1], d2: br[2]},
            "ceiling": {d0: None if math.isinf(cr[0]) else cr[0], d1: None if math.isinf(cr[1]) else cr[1],
                        d2: None if math.isinf(cr[2]) else cr[2]},
            "ceiling_burst": {d0: cbr[0], d1: cbr[1], d2: cbr[2]},
        }  # fmt: skip
        if name in blocks:  # only where there is one, and asked for: older sidecars refuse any other key
            ents[name]["budget"] = blocks[name]
    return orjson.dumps({
        "api_version": API_VERSION, "kind": "Limits", "pool": pp.pool.name, "replica": replica, "version": version,
        "generated_at": generated_at, "expires_at": expires_at, "stale": stale, "entitlements": ents,
    })  # fmt: skip


class Publisher:
    """The documents of the published plans, each built once, in a worker thread, on first ask."""

    def __init__(self, ttl_s: float = 60.0) -> None:
        self.ttl_s = ttl_s
        self.instance = secrets.token_hex(6)
        self._specs: dict[tuple[str, int], SpecPublication] = {}
        self._pools: dict[str, PoolPublication] = {}
        self._building: dict[tuple[str, int], asyncio.Future[PoolPublication]] = {}
        self._legacy: OrderedDict[tuple[int, str, str | None, bool], asyncio.Future[bytes]] = OrderedDict()

    async def pool(self, published: PublishedPlan, pool: str) -> PoolPublication:
        have = self._pools.get(pool)
        if have is not None and have.version == published.version:
            return have
        key = (pool, published.version)
        fut = self._building.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._building[key] = fut
            try:
                pub = await asyncio.to_thread(self._build, published, pool, have)
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # retrieved: a failed build is reported to each asker, not logged unretrieved
                raise
            finally:
                self._building.pop(key, None)
            fut.set_result(pub)
            current = self._pools.get(pool)
            if current is None or current.version < pub.version:
                self._pools[pool] = pub
            return pub
        return await fut

    def _build(self, published: PublishedPlan, pool: str, previous: PoolPublication | None) -> PoolPublication:
        pp = published.plan.pools[pool]
        skey = (pool, published.generation)
        spec = self._specs.get(skey)
        if spec is None or spec.names != pp.rows.names:
            spec = build_spec(pp.pool, pool_entitlements(published.config, pp), published.generation)
            self._specs = {k: v for k, v in self._specs.items() if k[0] != pool}
            self._specs[skey] = spec
        return build_pool_publication(published, pool, spec, self.ttl_s, previous, self.instance)

    async def legacy(self, published: PublishedPlan, pool: str, replica: str | None, budgets: bool = True) -> bytes:
        key = (published.version, pool, replica, budgets)
        fut = self._legacy.get(key)
        if fut is None:
            if self._legacy and next(iter(self._legacy))[0] != published.version:
                self._legacy = OrderedDict((k, f) for k, f in self._legacy.items() if k[0] == published.version)
            fut = asyncio.ensure_future(asyncio.to_thread(
                legacy_document, published.plan.pools[pool], published.shares.get(pool, {}), replica,
                version=str(published.version), generated_at=published.plan.now,
                expires_at=published.published_at + self.ttl_s, stale=published.stale, budgets=budgets,
            ))  # fmt: skip
            self._legacy[key] = fut
        return await asyncio.shield(fut)
