"""The limits API's protocol, small (200 entitlements x 20 sidecars): the controller's real HTTP API
on loopback, published plans from the real control step, and 20 real ``PoolLimitsSource``s
watching it. Versions and ETags, watch, deltas, a new config generation (keys included), the
v1alpha1 document for the same replica, an unknown replica, fail-static and expiry. No timing
is asserted: waits are bounded conditions."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict

from tests.core.builders import make_entitlement, make_pool
from tokenscaler.control.metrics import ControllerMetrics
from tokenscaler.control.publish import legacy_document
from tokenscaler.control.store import PlanStore
from tokenscaler.core.limits import LimitsDocument, limits_document
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.observation import Observation, PoolSignals, ReplicaTable, SignalTable
from tokenscaler.core.pool_limits import LimitColumns, PackedColumns, PoolLimitsDocument
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.step import ControlState, StepSettings, control_step
from tokenscaler.serve.api import ControllerApi
from tokenscaler.sidecar.limits import LimitRules, LimitsUpdate
from tokenscaler.sidecar.pool_source import PoolLimitsSource

N, R = 200, 20
POOL = "p"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def make_cfg(n: int = N, extra: list[dict] | None = None, keys: dict[str, list[str]] | None = None) -> TokenPoolsConfig:
    tiers = ("guaranteed", "elastic", "spot")
    ents = []
    for i in range(n):
        tier = tiers[i % 3]
        kw: dict[str, Any] = {"priority": i % 4, "api_keys": [digest(k) for k in (keys or {}).get(f"e{i}", [f"k{i}"])]}
        if tier == "guaranteed":
            kw["guaranteed"] = {"throughput_tokens_per_s": 1000.0 / n, "kv_tokens": 100.0, "concurrency": 0.1}
        ents.append(make_entitlement(f"e{i}", tier, **kw))
    return TokenPoolsConfig.model_validate(
        {"pools": [make_pool(POOL, min_replicas=R, max_replicas=R)], "entitlements": ents + (extra or [])}
    )


class Plans:
    """Publishes plans of the real control step into a store, offered load varied per version."""

    def __init__(self, store: PlanStore, config: TokenPoolsConfig) -> None:
        self.store, self.state, self.t, self.generation = store, ControlState(), 1_741_000_000.0, 1
        self.set_config(config, generation=1)

    def set_config(self, config: TokenPoolsConfig, generation: int) -> None:
        self.config, self.rows, self.generation = config, build_pool_rows(config), generation

    def publish(self, rng: np.random.Generator, moved: float = 1.0) -> int:
        names = list(self.rows[POOL].names)
        n = len(names)
        values = np.full((n, 4), np.nan)
        values[:, 0] = rng.uniform(1.0, 40.0, n) * (rng.random(n) < moved)  # offered weighted tokens/s
        table = SignalTable(pools=[POOL] * n, names=names, values=values)
        sidecars = {f"r{j}" for j in range(R)}
        # each entitlement routed to two replicas, 70/30 (a few to one only): sparse routing shares
        pools, ents, reps, offered = [], [], [], []
        for i, name in enumerate(names):
            for j, part in ((i % R, 0.7), ((i + 1) % R, 0.3)):
                pools.append(POOL), ents.append(name), reps.append(f"r{j}"), offered.append(values[i, 0] * part)
        routed = ReplicaTable(pools=pools, names=ents, replicas=reps, values=np.nan_to_num(np.array(offered)))
        obs = Observation(time=self.t, pools={POOL: PoolSignals(ready_replicas=R, sidecars=sidecars)}, signals=table,
                          replica_offered=routed)  # fmt: skip
        result = control_step(self.rows, obs, self.state, self.t, StepSettings(interval_s=5.0))
        self.state = result.state
        self.t += 5.0
        assert result.plan is not None
        pub = self.store.publish(
            result.plan, self.t, shares=result.state.shares, version=result.version, generation=self.generation,
            config=self.config,
        )  # fmt: skip
        return pub.version


@contextlib.asynccontextmanager
async def controller_api(store: PlanStore) -> AsyncIterator[tuple[str, Callable[[], Any]]]:
    api = ControllerApi(store, CollectorRegistry(), ControllerMetrics(CollectorRegistry()), limits_ttl_s=60.0)
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", runner.cleanup
    finally:
        await runner.cleanup()


class Sidecar:
    """A sidecar's limits state as the real source applies it (no proxy around it)."""

    def __init__(self, url: str, replica: str, bootstrap: TokenPoolsConfig | None, **kw: Any) -> None:
        self.source = PoolLimitsSource(bootstrap, POOL, url, replica=replica, replicas=R, **kw)
        self.gates: dict = dict(self.source.initial().limits)
        self.updates: list[LimitsUpdate] = []
        self.configs: list[TokenPoolsConfig] = []
        self.source.on_config = self.configs.append
        self.task: asyncio.Task | None = None

    def apply(self, u: LimitsUpdate) -> None:
        self.updates.append(u)
        if u.partial:
            self.gates.update(u.limits)
            for name in u.removed:
                self.gates.pop(name, None)
        else:
            self.gates = dict(u.limits)

    def start(self) -> None:
        self.task = asyncio.create_task(self.source.run(self.apply))

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def legacy_gates(doc: LimitsDocument, config: TokenPoolsConfig) -> dict:
    return LimitRules(config, POOL, R).from_document(doc)


def close(a: dict, b: dict, rtol: float = 1e-5) -> bool:
    """Gates equal but for the v1beta1 wire's rounding (6 significant figures), and (``rtol``
    0.02) the deadband of a republished version (a row moved less than 2% keeps its values)."""
    if a.keys() != b.keys():
        return False
    for name, ga in a.items():
        gb = b[name]
        if (ga.tier, ga.priority, ga.backfill) != (gb.tier, gb.priority, gb.backfill):
            return False
        for x, y in ((ga.limit, gb.limit), (ga.burst, gb.burst), (ga.ceiling, gb.ceiling),
                     (ga.ceiling_burst, gb.ceiling_burst)):  # fmt: skip
            if not np.allclose(x, y, rtol=rtol, atol=1e-9):
                return False
    return True


@pytest.mark.timeout(120)
def test_twenty_sidecars_follow_versions_deltas_and_a_new_generation() -> None:
    asyncio.run(twenty_sidecars())


async def twenty_sidecars() -> None:
    store = PlanStore()
    plans = Plans(store, make_cfg())
    rng = np.random.default_rng(7)
    plans.publish(rng)
    async with controller_api(store) as (url, _):
        sidecars = [Sidecar(url, f"r{j}", None if j % 2 else make_cfg(), poll_s=0.2, watch_s=5.0) for j in range(R)]
        async with aiohttp.ClientSession() as http:
            # the bootstrap-less sidecars learn the pool's config from the document itself
            for s in sidecars:
                if s.source.bootstrap is None:
                    s.source.adopt(await asyncio.wait_for(s.source.first_config(retry_s=0.05), 10))
            for s in sidecars:
                s.start()
            v = store.current().version  # type: ignore[union-attr]
            await until(lambda: all(s.source.view.version == v for s in sidecars), what="every sidecar at v1")
            # what each holds is what the v1alpha1 document of its replica says
            for s in sidecars[:4]:
                r = await http.get(f"{url}/v1/pools/{POOL}/limits", params={"replica": s.source.replica})
                assert r.status == 200 and r.headers["ETag"] == f'"{v}"'
                doc = LimitsDocument.model_validate_json(await r.read())
                assert close(s.gates, legacy_gates(doc, plans.config)), s.source.replica

            # ETag: the version held is a 304, on both APIs
            held = sidecars[0].source.view
            hold = {"replica": "r0", "spec": held.spec_hash, "instance": held.instance}
            r = await http.get(f"{url}/v1beta1/pools/{POOL}/limits", params={**hold, "since": str(v)})
            assert r.status == 304
            # another controller process (instance) or spec: the whole document, never a 304
            for other in ({"instance": "elsewhere"}, {"spec": "0" * 16}):
                r = await http.get(f"{url}/v1beta1/pools/{POOL}/limits", params={**hold, "since": str(v), **other})
                doc = PoolLimitsDocument.model_validate_json(await r.read())
                assert r.status == 200 and doc.limits.index is None and (doc.spec is None) == ("instance" in other)
            r = await http.get(f"{url}/v1/pools/{POOL}/limits", params={"replica": "r0"},
                               headers={"If-None-Match": f'"{v}"'})  # fmt: skip
            assert r.status == 304
            r = await http.get(f"{url}/v1/pools/{POOL}/limits", params={"replica": "r0", "budgets": "maybe"})
            assert r.status == 400 and "budgets='maybe'" in (await r.json())["error"]["message"]

            # a watch held open is answered by the next publish; a delta carries only what moved
            watch = asyncio.ensure_future(http.get(
                f"{url}/v1beta1/pools/{POOL}/limits",
                params={**hold, "since": str(v), "watch": "true", "timeout_s": "20"},
            ))  # fmt: skip
            await asyncio.sleep(0.2)
            assert not watch.done()
            v2 = plans.publish(rng, moved=0.1)
            r = await asyncio.wait_for(watch, 10)
            body = PoolLimitsDocument.model_validate_json(await r.read())
            assert r.status == 200 and body.version == v2 and body.spec is None
            assert body.limits.since == v and body.limits.index is not None and len(body.limits.index) < N
            await until(lambda: all(s.source.view.version == v2 for s in sidecars), what="every sidecar at v2")
            for s in sidecars[:4]:
                r = await http.get(f"{url}/v1/pools/{POOL}/limits", params={"replica": s.source.replica})
                doc = LimitsDocument.model_validate_json(await r.read())
                assert close(s.gates, legacy_gates(doc, plans.config), rtol=0.021)
            assert all(u.partial for s in sidecars for u in s.updates[1:])  # after the first: deltas

            # packed columns (what the sidecars ask for) are the plain ones as arrays; a bad choice is a 400
            lim_url, delta = f"{url}/v1beta1/pools/{POOL}/limits", {**hold, "since": str(v)}
            plain = PoolLimitsDocument.model_validate_json(await (await http.get(lim_url, params=delta)).read())
            packed = PoolLimitsDocument.model_validate_json(
                await (await http.get(lim_url, params={**delta, "columns": "packed"})).read())  # fmt: skip
            assert isinstance(plain.limits, LimitColumns) and isinstance(packed.limits, PackedColumns)
            assert plain.limits.since == packed.limits.since == v
            for a, b in zip(plain.limits.arrays(), packed.limits.arrays(), strict=True):
                assert a is not None and b is not None and np.array_equal(a, b)
            r = await http.get(lim_url, params={**delta, "columns": "csv"})
            assert r.status == 400 and "columns='csv'" in (await r.json())["error"]["message"]

            # a watch that sees no new version ends in a 304
            r = await http.get(f"{url}/v1beta1/pools/{POOL}/limits",
                               params={**hold, "since": str(v2), "watch": "true", "timeout_s": "0.2"})  # fmt: skip
            assert r.status == 304

            # a new generation: e1 removed, e2's key rotated, e-new added; the spec goes out once
            new_cfg = make_cfg(extra=[make_entitlement("e-new", "elastic", api_keys=[digest("k-new")])],
                               keys={"e2": ["k2-rotated"]})  # fmt: skip
            new_cfg = new_cfg.model_copy(update={"entitlements": [e for e in new_cfg.entitlements if e.name != "e1"]})
            plans.set_config(new_cfg, generation=2)
            v3 = plans.publish(rng)
            await until(lambda: all(s.source.view.version == v3 for s in sidecars), what="every sidecar at v3")
            for s in sidecars:
                assert s.source.generation == 2 and s.configs and s.configs[-1] == new_cfg
                assert s.source.view.spec_hash != hold["spec"]
                assert "e1" not in s.gates and "e-new" in s.gates
                keys = {k for e in s.configs[-1].entitlements for k in e.api_keys}
                assert digest("k2-rotated") in keys and digest("k2") not in keys and digest("k-new") in keys
            # and the document never holds a key, only digests
            raw = await (await http.get(f"{url}/v1beta1/pools/{POOL}/limits", params={"replica": "r3"})).read()
            assert b"k2-rotated" not in raw and digest("k2-rotated").encode() in raw

            # an unknown replica is a 404 naming known ones, on both APIs
            for path in ("v1beta1", "v1"):
                r = await http.get(f"{url}/{path}/pools/{POOL}/limits", params={"replica": "nobody"})
                assert r.status == 404 and "unknown replica 'nobody'" in (await r.json())["error"]["message"]
            r = await http.get(f"{url}/v1beta1/pools/{POOL}/limits", params={"since": "x"})
            assert r.status == 400 and "since" in (await r.json())["error"]["message"]
        for s in sidecars:
            await s.stop()


@pytest.mark.timeout(120)
def test_fail_static_then_floors_then_restored() -> None:
    asyncio.run(fail_static())


async def fail_static() -> None:
    store = PlanStore()
    plans = Plans(store, make_cfg(n=30))
    rng = np.random.default_rng(3)
    plans.publish(rng)
    api = ControllerApi(store, CollectorRegistry(), ControllerMetrics(CollectorRegistry()))
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    s = Sidecar(url, "r0", make_cfg(n=30), poll_s=0.05, watch_s=0.3, expiry_s=1.0, timeout_s=0.5, max_backoff_s=0.1)
    s.start()
    try:
        await until(lambda: s.source.state == "fresh", what="fresh")
        held = dict(s.gates)
        await runner.cleanup()  # the controller goes away
        await until(lambda: s.source.state == "stale", what="stale")
        assert s.gates == held  # fail-static: the last limits stay
        await until(lambda: s.source.state == "expired", what="expired")
        floors = s.source.rules.all_floors()
        assert s.gates == floors and s.gates != held
        # the controller back on the same port: the held version is restored in full
        runner = web.AppRunner(api.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await until(lambda: s.source.state == "fresh", what="restored")
        assert close(s.gates, held)
    finally:
        await s.stop()
        await runner.cleanup()


def test_the_v1alpha1_document_built_from_arrays_is_the_models() -> None:
    store = PlanStore()
    plans = Plans(store, make_cfg(n=60))
    rng = np.random.default_rng(5)
    for _ in range(3):
        plans.publish(rng)
    published = store.current()
    assert published is not None
    pp = published.plan.pools[POOL]
    for replica in (None, "r0", "r7"):
        kw = dict(version="9", generated_at=1.0, expires_at=2.0, stale=False)
        shares = published.shares[POOL]
        fast = LimitsDocument.model_validate_json(legacy_document(pp, shares, replica, **kw))
        assert fast == limits_document(pp, shares, replica, **kw)
    assert len(shares) == R  # routing was known: the split was not the even one


class _PreviousReleaseEntry(BaseModel):
    """A v1alpha1 entry as the sidecars of the release before budgets validate it: unknown keys refused."""

    model_config = ConfigDict(extra="forbid")
    tier: str
    priority: int
    limit: dict[str, float]
    burst: dict[str, float]
    ceiling: dict[str, float | None] | None
    ceiling_burst: dict[str, float] | None


def test_the_v1alpha1_document_stays_readable_by_the_previous_releases_sidecars() -> None:
    budget = {"period": "day", "weighted_tokens": 1e9}
    store = PlanStore()
    plans = Plans(store, make_cfg(n=12, extra=[make_entitlement("paid", "elastic", budget=budget)]))
    plans.publish(np.random.default_rng(3))
    published = store.current()
    assert published is not None
    pp = published.plan.pools[POOL]
    kw: dict[str, Any] = dict(version="1", generated_at=1.0, expires_at=2.0, stale=False)
    asked = orjson.loads(legacy_document(pp, published.shares[POOL], "r0", budgets=True, **kw))["entitlements"]
    assert "budget" in asked["paid"]  # a sidecar that reads budgets (budgets=true) gets the block where there is one
    assert sum("budget" in e for e in asked.values()) == 1
    # what the previous release's sidecars ask (no budgets=): nothing they do not know, budgets or not
    plain = orjson.loads(legacy_document(pp, published.shares[POOL], "r0", budgets=False, **kw))["entitlements"]
    assert len(plain) == 13
    for entry in plain.values():
        _PreviousReleaseEntry.model_validate(entry)


def test_a_row_that_moved_less_than_the_deadband_is_not_republished() -> None:
    from tokenscaler.control.publish import DEADBAND, _within

    old = np.array([[100.0, 10.0, 1.0], [100.0, 10.0, 1.0], [0.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    new = np.array([[101.9, 10.1, 1.0], [102.1, 10.0, 1.0], [0.0, 0.0, 0.0], [1e-6, 5.0, 1.0]])
    assert DEADBAND == 0.02
    # within 2% on every column; one column beyond; zero stays zero; zero to anything is a change
    assert _within(old, new).tolist() == [True, False, True, False]
