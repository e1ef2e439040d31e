"""The client layer with the real ``kubernetes`` client against the loopback API server stand-in:
a watch that drops, a 410 Gone, a 409 conflict, a lost lease, two electors handing over."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tests.kube.apiserver import ApiServer
from tokenscaler.kube import KEYS_SECRET_TYPE
from tokenscaler.kube.client import (
    CONTROLLER_RULES,
    Conflict,
    CustomObjects,
    Leases,
    Secrets,
    StateStore,
    api_client,
)
from tokenscaler.kube.leader import Action, LeaderElector, LeaseConfig
from tokenscaler.kube.watch import Backoff, Reflector, apply_event

NS = "tokenscaler"
FAST = LeaseConfig(lease_duration_s=1.5, renew_deadline_s=1.0, retry_period_s=0.1)


def pool(name: str, max_replicas: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "replica": {"throughput_tokens_per_s": 1, "kv_tokens": 1, "concurrency": 1},
            "max_replicas": max_replicas,
        },
    }


class Seen:
    """Snapshots a reflector delivered, with a bounded wait for one that matches."""

    def __init__(self) -> None:
        self.snaps: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, snap: dict[str, Any]) -> None:
        with self.cond:
            self.snaps.append(snap)
            self.cond.notify_all()

    def wait(self, pred: Any, timeout_s: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: bool(self.snaps) and pred(self.snaps[-1]), timeout_s)


def reflector(server: ApiServer, seen: Seen, watch_timeout_s: int = 30) -> Reflector:
    r = Reflector(
        CustomObjects(api_client(server.url), NS, "tokenpools"),
        seen,
        watch_timeout_s=watch_timeout_s,
        read_timeout_s=30,
        backoff=Backoff(initial_s=0.05, cap_s=0.5),
    )
    r.start()
    return r


def secret(name: str, type_: str = KEYS_SECRET_TYPE, **data: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "type": type_, "data": data}


def secrets_reflector(server: ApiServer, seen: Seen) -> Reflector:
    r = Reflector(
        Secrets(api_client(server.url), NS), seen, watch_timeout_s=30, read_timeout_s=30,
        backoff=Backoff(initial_s=0.05, cap_s=0.5),
    )  # fmt: skip
    r.start()
    return r


def test_the_secrets_reflector_sees_only_the_key_secrets(apiserver: ApiServer) -> None:
    apiserver.put(NS, "secrets", secret("team-a-keys", a="ZGlnZXN0"))
    apiserver.put(NS, "secrets", secret("tls", "kubernetes.io/tls", **{"tls.key": "UFJJVkFURQ=="}))
    seen = Seen()
    r = secrets_reflector(apiserver, seen)
    try:
        assert seen.wait(lambda s: set(s) == {"team-a-keys"}), seen.snaps
        apiserver.wait_for(lambda: apiserver.watches_open > 0)
        apiserver.put(NS, "secrets", secret("other-token", "Opaque", token="dG9r"))
        apiserver.put(NS, "secrets", secret("team-a-keys", a="bmV3"))
        assert seen.wait(lambda s: s["team-a-keys"]["data"] == {"a": "bmV3"})
        apiserver.delete(NS, "secrets", "team-a-keys")
        assert seen.wait(lambda s: s == {})
        # never a Secret of another type, in the list or in the watch
        assert all("tls" not in snap and "other-token" not in snap for snap in seen.snaps)
    finally:
        r.stop()


def test_apply_event_is_pure() -> None:
    cache = {"a": {"metadata": {"name": "a", "resourceVersion": "1"}}}
    deleted = {"type": "DELETED", "object": {"metadata": {"name": "a", "resourceVersion": "2"}}}
    new, rv, changed = apply_event(cache, deleted)
    assert (new, rv, changed) == ({}, "2", True) and "a" in cache
    same, rv, changed = apply_event(cache, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}})
    assert same is cache and rv == "9" and not changed


def test_backoff_is_bounded() -> None:
    b = Backoff(initial_s=0.1, cap_s=2.0, jitter=0.0)
    delays = [b.next_delay() for _ in range(10)]
    assert delays[:3] == pytest.approx([0.1, 0.2, 0.4]) and max(delays) == 2.0
    b.reset()
    assert b.next_delay() == pytest.approx(0.1)


def test_watch_sees_changes_survives_a_dropped_stream_and_relists_on_410(apiserver: ApiServer) -> None:
    apiserver.put(NS, "tokenpools", pool("a"))
    seen = Seen()
    r = reflector(apiserver, seen, watch_timeout_s=1)
    try:
        assert seen.wait(lambda s: set(s) == {"a"})
        apiserver.put(NS, "tokenpools", pool("b"))
        assert seen.wait(lambda s: set(s) == {"a", "b"})
        lists = r.lists
        # the stream is cut mid-chunk: the reflector notices, lists again, and misses nothing
        assert apiserver.wait_for(lambda: apiserver.watches_open > 0)
        apiserver.drop_watches()
        apiserver.put(NS, "tokenpools", pool("c"))
        assert seen.wait(lambda s: set(s) == {"a", "b", "c"})
        assert r.lists > lists and any("ProtocolError" in e or "unreachable" in e for e in r.errors)
        # history compacted: re-opening the watch from the old version gets a 410, and a re-list
        apiserver.wait_for(lambda: apiserver.watches_open > 0)
        lists = r.lists
        apiserver.compact()
        apiserver.delete(NS, "tokenpools", "a")  # only a list shows this now... or the new watch
        apiserver.drop_watches()  # force a re-open at once (a server-ended watch does the same)
        assert seen.wait(lambda s: set(s) == {"b", "c"})
        assert r.lists > lists
    finally:
        r.stop()


def poll(pred: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def test_410_from_an_ended_watch_relists(apiserver: ApiServer) -> None:
    apiserver.put(NS, "tokenpools", pool("a"))
    apiserver.put(NS, "tokenpools", pool("b"))
    seen = Seen()
    r = reflector(apiserver, seen, watch_timeout_s=1)
    try:
        assert seen.wait(lambda s: set(s) == {"a", "b"})
        assert apiserver.wait_for(lambda: apiserver.watches_open > 0)
        # history compacted past the reflector's version; the open watch ends at its timeout and
        # re-opening it from that version answers an ERROR event with code 410: list again
        apiserver.delete(NS, "tokenpools", "b")
        assert seen.wait(lambda s: set(s) == {"a"})
        apiserver.rv += 5
        apiserver.compact()
        assert poll(lambda: r.lists >= 2)
        assert any("410" in e for e in r.errors), r.errors
        assert set(r.cache) == {"a"}
    finally:
        r.stop()


def test_status_patch_retries_a_conflict(apiserver: ApiServer) -> None:
    apiserver.put(NS, "tokenpools", pool("a"))
    objects = CustomObjects(api_client(apiserver.url), NS, "tokenpools")
    apiserver.fail_next("patch", "tokenpools/status", 409, count=2)
    out = objects.patch_status("a", {"status": {"desiredReplicas": 3}})
    assert out is not None and out["status"] == {"desiredReplicas": 3}
    patches = [c for c in apiserver.requests if c.verb == "patch"]
    assert len(patches) == 3
    apiserver.fail_next("patch", "tokenpools/status", 409, count=3)
    with pytest.raises(Conflict):
        objects.patch_status("a", {"status": {"desiredReplicas": 4}}, attempts=3)
    assert objects.patch_status("gone", {"status": {}}) is None  # deleted meanwhile: skipped


def test_state_configmap_round_trip_and_stale_writer_conflict(apiserver: ApiServer) -> None:
    api = api_client(apiserver.url)
    a, b = StateStore(api, NS), StateStore(api, NS)
    assert a.load_state() is None
    a.save_state({"version": 1, "pools": {"p": {"debt": {"x": 1.5}}}})
    assert b.load_state() == {"version": 1, "pools": {"p": {"debt": {"x": 1.5}}}}
    b.save_state({"version": 1, "pools": {}})
    with pytest.raises(Conflict):  # a's version is stale now
        a.save_state({"version": 1, "pools": {"old": {}}})
    assert b.load_state() == {"version": 1, "pools": {}}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_lease_conflict_and_lost_lease(apiserver: ApiServer) -> None:
    async def main() -> None:
        api = api_client(apiserver.url)
        clock = Clock()
        a = LeaderElector(Leases(api, NS), "a", config=FAST, clock=clock)
        assert await a.try_once() is Action.ACQUIRE and a.is_leader()
        # a write between a's read and write: 409, a does not count that round as renewed
        apiserver.fail_next("update", "leases", 409)
        clock.t += 0.5
        assert await a.try_once() is None
        assert a.is_leader()  # still within the renew deadline
        clock.t += 0.6
        assert not a.is_leader()  # 1.1 s since the last renewal > renew deadline 1.0
        # someone else takes the lease over (as after a partition): a finds it held and follows
        lease = apiserver.get(NS, "leases", "tokenscaler-controller")
        lease["spec"]["holderIdentity"] = "intruder"
        apiserver.put(NS, "leases", lease)
        assert await a.try_once() is Action.FOLLOW
        assert not a.is_leader() and a.holder == "intruder"

    asyncio.run(main())


def test_second_elector_waits_while_the_lease_is_held_and_takes_over_after_it_lapses(apiserver: ApiServer) -> None:
    async def main() -> None:
        api = api_client(apiserver.url)
        a = LeaderElector(Leases(api, NS), "a", config=FAST, release_on_stop=False)
        b = LeaderElector(Leases(api, NS), "b", config=FAST)
        ta = asyncio.create_task(a.run())
        assert await a.wait_leading(True, 5)
        tb = asyncio.create_task(b.run())
        # b tries every 0.1 s for well over a lease duration while a renews: it never leads
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            assert a.is_leader() and not b.is_leader()
            await asyncio.sleep(0.05)
        assert b.holder == "a"
        a.stop()  # a dies without releasing: b waits the lease out (1.5 s) and takes over
        await ta
        t_stop = time.monotonic()
        assert await b.wait_leading(True, 5)
        took = time.monotonic() - t_stop
        assert 1.0 < took < FAST.lease_duration_s + 1.0, took
        lease = apiserver.get(NS, "leases", "tokenscaler-controller")
        assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
        b.stop()
        await tb
        # b released on stop: no holder
        assert not apiserver.get(NS, "leases", "tokenscaler-controller")["spec"].get("holderIdentity")

    asyncio.run(main())


def test_every_request_the_code_made_is_granted_by_the_declared_rules(apiserver: ApiServer) -> None:
    """Run the calls of the tests above once more and check each against CONTROLLER_RULES."""
    api = api_client(apiserver.url)
    apiserver.put(NS, "tokenpools", pool("a"))
    seen = Seen()
    r = reflector(apiserver, seen, watch_timeout_s=1)
    try:
        assert seen.wait(lambda s: "a" in s)
        apiserver.wait_for(lambda: apiserver.watches_open > 0)
    finally:
        r.stop()
    apiserver.put(NS, "secrets", secret("k", a="ZGlnZXN0"))
    seen_secrets = Seen()
    r = secrets_reflector(apiserver, seen_secrets)
    try:
        assert seen_secrets.wait(lambda s: "k" in s)
        watched = lambda: any(c.verb == "watch" and c.resource == "secrets" for c in apiserver.requests)  # noqa: E731
        assert apiserver.wait_for(watched)
    finally:
        r.stop()
    CustomObjects(api, NS, "tokenpools").patch_status("a", {"status": {"x": 1}})
    store = StateStore(api, NS)
    store.save_state({"v": 1})
    store.save_state({"v": 2})
    store.load_state()

    async def elect() -> None:
        e = LeaderElector(Leases(api, NS), "a", config=FAST)
        await e.try_once()
        await e.try_once()

    asyncio.run(elect())
    allowed = {
        (rule.api_group, rule.resource, verb, name)
        for rule in CONTROLLER_RULES
        for verb in rule.verbs
        for name in (rule.resource_names or (None,))
    }
    made = set()
    for call in apiserver.requests:
        name = None if call.verb in ("list", "watch", "create") else call.name
        key = (call.group, call.resource, call.verb, name)
        assert key in allowed or (call.group, call.resource, call.verb, None) in allowed, call
        made.add((call.group, call.resource, call.verb))
    declared = {(rule.api_group, rule.resource, v) for rule in CONTROLLER_RULES for v in rule.verbs}
    # every declared permission is used by the code (only entitlements, the twin of tokenpools, not run here)
    unused = {d for d in declared - made if "entitlements" not in d[1]}
    assert unused == set()
