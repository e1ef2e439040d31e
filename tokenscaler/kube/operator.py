"""What ``tokenscaler controller --source kubernetes`` needs from the cluster, in one object.

:class:`KubeOperator` keeps the current :class:`TokenPoolsConfig` from list+watch of the
TokenPool and Entitlement objects of one namespace (and of its Secrets of type
``tokenpools.io/api-key-digests``, which an Entitlement's ``spec.api_key_secret_ref`` names:
a key added, rotated or revoked there is a new config on the next watch event), holds (or follows) the Lease, writes
status for each published plan and loads/saves the planner state document in the
``tokenscaler-state`` ConfigMap. The controller's loop stays as it is; wiring it is a few
lines::

    op = KubeOperator(api_client(), namespace, identity=os.environ["POD_NAME"])
    await op.start()
    config = await op.wait_config()                 # first full list of both kinds
    op.on_config(controller.set_config)              # every later valid change
    ...
    if op.is_leader():                               # each interval: only the leader
        await op.write_status(published.plan,        #   steps, publishes, writes status
                              version=published.version, stale=published.stale)
        await op.save_state(new_state.to_json())
    ...
    state_doc = await op.load_state()                # on becoming leader (on_leading)
    await op.stop()

A follower does not step or publish (its PlanStore stays empty: /readyz not ready, the
scaler answers UNAVAILABLE); on becoming leader it loads the state a former leader saved,
so debt and scale-down history carry over.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from tokenscaler.control.persist import StateFileError
from tokenscaler.control.store import PublishedPlan
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.plan import Plan
from tokenscaler.core.state import PlannerState
from tokenscaler.core.validation import ConfigError
from tokenscaler.kube import ENTITLEMENT_PLURAL, POOL_PLURAL
from tokenscaler.kube.client import (
    LEASE_NAME,
    STATE_CONFIGMAP,
    ApiError,
    Conflict,
    CustomObjects,
    Leases,
    Secrets,
    StateStore,
)
from tokenscaler.kube.leader import DEFAULT_LEASE, LeaderElector, LeaseConfig
from tokenscaler.kube.translate import KeysCondition, Translation, config_from_crs, status_patches
from tokenscaler.kube.watch import Backoff, Collection, Reflector, Snapshot

log = logging.getLogger("tokenscaler.kube.operator")


class CrWatch:
    """The config the TokenPool and Entitlement objects of one namespace make, kept current.

    Used by the operator (``secrets=True``: the Entitlements' keys are resolved from the
    Secrets they name) and by ``tokenscaler webhook --source kubernetes`` (no Secrets: it
    checks objects, not keys, and its Role cannot read Secrets). Callbacks run on the event
    loop that called :meth:`start`.
    """

    def __init__(
        self,
        api: Any,
        namespace: str,
        *,
        secrets: bool = False,
        watch_timeout_s: int = 300,
        read_timeout_s: float = 330.0,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self.namespace = namespace
        self.pool_objects = CustomObjects(api, namespace, POOL_PLURAL)
        self.entitlement_objects = CustomObjects(api, namespace, ENTITLEMENT_PLURAL)
        def reflector(objects: Collection) -> Reflector:
            return Reflector(objects, lambda s: self._changed(), backoff=backoff(),
                             watch_timeout_s=watch_timeout_s, read_timeout_s=read_timeout_s)  # fmt: skip

        self.pools = reflector(self.pool_objects)
        self.entitlements = reflector(self.entitlement_objects)
        self.secrets: Reflector | None = reflector(Secrets(api, namespace)) if secrets else None
        self._keys_logged: dict[str, KeysCondition] = {}
        self.translation: Translation | None = None
        self.version = 0  # bumped on every new valid config
        self._config: TokenPoolsConfig | None = None
        self._callbacks: list[Callable[[TokenPoolsConfig], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond: asyncio.Condition | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._cond = asyncio.Condition()
        for r in self._reflectors():
            r.start()

    def _reflectors(self) -> list[Reflector]:
        return [self.pools, self.entitlements] + ([self.secrets] if self.secrets is not None else [])

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(r.stop) for r in self._reflectors()))

    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self._reflectors())

    def _changed(self) -> None:  # on a reflector thread
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._rebuild)

    def snapshot(self) -> tuple[Snapshot, Snapshot]:
        return dict(self.pools.cache), dict(self.entitlements.cache)

    def secret_snapshot(self) -> Snapshot | None:
        """The typed Secrets (name -> object), or None when this watch does not read Secrets."""
        return None if self.secrets is None else dict(self.secrets.cache)

    def _rebuild(self) -> None:
        if not self.synced():
            return
        pools, ents = self.snapshot()
        t = config_from_crs(pools.values(), ents.values(), self.secret_snapshot())
        self.translation = t
        for (kind, name), why in t.problems.items():
            log.warning("%s %s/%s left out of the config: %s", kind, self.namespace, name, why)
        for name, keys in t.keys.items():  # on a change only; the message names fields, never a digest
            if self._keys_logged.get(name) != keys and not keys.ok:
                log.warning("Entitlement %s/%s: %s", self.namespace, name, keys.message)
        self._keys_logged = dict(t.keys)
        if t.config is None:
            log.error("the objects in %s make no valid config (%s); keeping the last one", self.namespace, t.errors)
        elif t.config != self._config:
            self._config = t.config
            self.version += 1
            log.info(
                "config v%d: %d pool(s), %d entitlement(s)",
                self.version,
                len(t.config.pools),
                len(t.config.entitlements),
            )
            for cb in list(self._callbacks):
                try:
                    cb(t.config)
                except Exception:
                    log.exception("a config callback failed")
        if self._cond is not None:
            task = asyncio.ensure_future(self._notify())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        assert self._cond is not None
        async with self._cond:
            self._cond.notify_all()

    def config(self) -> TokenPoolsConfig | None:
        """The current valid config (None until the first list of both kinds made one)."""
        return self._config

    def on_config(self, callback: Callable[[TokenPoolsConfig], None]) -> None:
        """Call ``callback(config)`` on the event loop after every change to a new valid config."""
        self._callbacks.append(callback)

    async def wait_config(self, after_version: int = 0, timeout_s: float = 30.0) -> TokenPoolsConfig | None:
        """The config once its version is above ``after_version``; None on timeout."""
        assert self._cond is not None, "start() first"

        async def wait() -> None:
            assert self._cond is not None
            async with self._cond:
                await self._cond.wait_for(lambda: self.version > after_version)

        try:
            await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            return None
        return self._config


class KubeOperator(CrWatch):
    """The config from the watch, the Lease, status writes and the state document."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        identity: str,
        *,
        lease: LeaseConfig = DEFAULT_LEASE,
        lease_name: str = LEASE_NAME,
        state_configmap: str = STATE_CONFIGMAP,
        clock: Callable[[], float] = time.time,
        on_leading: Callable[[bool], None] | None = None,
        watch_timeout_s: int = 300,
        read_timeout_s: float = 330.0,
    ) -> None:
        super().__init__(
            api, namespace, secrets=True, watch_timeout_s=watch_timeout_s, read_timeout_s=read_timeout_s
        )
        self.identity = identity
        self.clock = clock
        self.elector = LeaderElector(
            Leases(api, namespace, lease_name), identity, config=lease, clock=clock, on_change=on_leading
        )
        self.state = StateStore(api, namespace, state_configmap)
        self.status_writes = 0
        self._elector_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._elector_task = asyncio.create_task(self.elector.run(), name="leader-election")

    async def stop(self) -> None:
        """Stop watching; a leader releases the Lease so the other replica takes over at once."""
        self.elector.stop()
        if self._elector_task is not None:
            await self._elector_task
        await super().stop()

    # ------------------------------------------------------------------ leading

    def is_leader(self) -> bool:
        return self.elector.is_leader()

    async def wait_leading(self, leading: bool = True, timeout_s: float = 30.0) -> bool:
        return await self.elector.wait_leading(leading, timeout_s)

    # ------------------------------------------------------------------ status

    def _now(self) -> str:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def write_status(self, plan: Plan, *, version: int, stale: bool) -> int:
        """Write the status of every object a published plan changed.

        Returns the number of patches written; 0 (and nothing written) when this replica does
        not lead. A 409 is retried; an object deleted meanwhile is skipped; other API errors
        are logged and the remaining patches still go out.
        """
        if not self.is_leader():
            return 0
        pools, ents = self.snapshot()
        t = self.translation
        patches = status_patches(
            list(pools.values()),
            list(ents.values()),
            self._config,
            plan,
            version=version,
            stale=stale,
            now=self._now(),
            problems=t.problems if t is not None else None,
            keys=t.keys if t is not None else None,
        )
        if not patches:
            return 0
        targets = {POOL_PLURAL: self.pool_objects, ENTITLEMENT_PLURAL: self.entitlement_objects}

        def write() -> int:
            n = 0
            for p in patches:
                try:
                    if targets[p.plural].patch_status(p.name, p.body) is not None:
                        n += 1
                except ApiError as e:
                    log.warning("status of %s/%s not written: %s", p.plural, p.name, e)
            return n

        written = await asyncio.to_thread(write)
        self.status_writes += written
        return written

    # ------------------------------------------------------------------ state

    async def load_state(self) -> dict[str, Any] | None:
        """The planner state document a leader saved (``PlannerState.to_json()``), or None.

        Raises :class:`ApiError` when the API cannot be read and ValueError when the stored
        document is not a JSON object."""
        return await asyncio.to_thread(self.state.load_state)

    async def save_state(self, doc: Mapping[str, Any]) -> bool:
        """Store the planner state document; False (nothing written) when this replica does not lead.

        A 409 means another writer got in between: written again once, only if this replica
        still leads."""
        if not self.is_leader():
            return False
        try:
            await asyncio.to_thread(self.state.save_state, doc)
        except Conflict:
            if not self.is_leader():
                return False
            await asyncio.to_thread(self.state.save_state, doc)
        return True


def lease_config_from_env(env: Mapping[str, str] | None = None) -> LeaseConfig:
    """Lease timings from ``TOKENSCALER_LEASE_{DURATION,RENEW_DEADLINE,RETRY_PERIOD}_S``
    (the controller Deployment sets them), client-go's defaults where unset."""
    import os

    env = os.environ if env is None else env
    d = DEFAULT_LEASE

    def num(key: str, default: float) -> float:
        raw = env.get(key)
        if raw is None or raw == "":
            return default
        try:
            return float(raw)
        except ValueError as e:
            raise ValueError(f"{key}: expected seconds, got {raw!r}") from e

    return LeaseConfig(
        lease_duration_s=num("TOKENSCALER_LEASE_DURATION_S", d.lease_duration_s),
        renew_deadline_s=num("TOKENSCALER_LEASE_RENEW_DEADLINE_S", d.renew_deadline_s),
        retry_period_s=num("TOKENSCALER_LEASE_RETRY_PERIOD_S", d.retry_period_s),
    )


def from_environment(
    api: Any = None, *, on_leading: Callable[[bool], None] | None = None, env: Mapping[str, str] | None = None
) -> KubeOperator:
    """The operator as the controller Deployment configures it: in-cluster client, namespace
    ``POD_NAMESPACE``, identity ``POD_NAME`` (else the host name), Lease and ConfigMap names
    and timings from ``TOKENSCALER_*`` (see ``k8s/base/controller.yaml``)."""
    import os
    import socket

    from tokenscaler.kube.client import api_client, in_cluster_namespace

    env = os.environ if env is None else env
    return KubeOperator(
        api if api is not None else api_client(),
        env.get("POD_NAMESPACE") or in_cluster_namespace(),
        env.get("POD_NAME") or socket.gethostname(),
        lease=lease_config_from_env(env),
        lease_name=env.get("TOKENSCALER_LEASE_NAME") or LEASE_NAME,
        state_configmap=env.get("TOKENSCALER_STATE_CONFIGMAP") or STATE_CONFIGMAP,
        on_leading=on_leading,
    )


class KubeStateBackend:
    """The controller's state backend in Kubernetes: the planner state in the operator's
    ConfigMap, so a new leader continues with the debt and history the last one saved
    (:class:`tokenscaler.control.persist.StateBackend`). Only the leader writes."""

    def __init__(self, operator: KubeOperator) -> None:
        self.operator = operator
        self.name = f"ConfigMap {operator.namespace}/{operator.state.name}"

    async def load(self) -> PlannerState | None:
        try:
            doc = await self.operator.load_state()
        except (ApiError, ValueError) as e:
            raise StateFileError(f"{self.name}: cannot read the state: {e}") from e
        if doc is None:
            return None
        try:
            return PlannerState.from_json(doc, self.name)
        except ConfigError as e:
            raise StateFileError(f"{self.name}: not a tokenscaler state document: {'; '.join(e.errors)}") from e

    async def save(self, state: PlannerState) -> None:
        try:
            await self.operator.save_state(state.to_json())
        except ApiError as e:
            raise OSError(f"{self.name}: {e}") from e

    async def write_status(self, published: PublishedPlan) -> None:
        """The controller's ``on_published``: status of every object the plan changed."""
        try:
            await self.operator.write_status(published.plan, version=published.version, stale=published.stale)
        except ApiError as e:
            log.warning("status not written for plan version %d: %s", published.version, e)
