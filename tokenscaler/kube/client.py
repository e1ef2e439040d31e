"""The API calls the operator and the webhook make, through the real ``kubernetes`` client.

Every call here is blocking (the ``kubernetes`` client is urllib3-based); async callers run
them with ``asyncio.to_thread``. Objects go in and come out as plain dicts (the JSON the API
server speaks), so the pure code (:mod:`tokenscaler.kube.translate`,
:mod:`tokenscaler.kube.leader`) never sees client models.

:data:`CONTROLLER_RULES` and :data:`WEBHOOK_RULES` list every (API group, resource, verb)
this module calls, and so what the RBAC in ``k8s/base/rbac.yaml`` must grant, no more
(a test compares the two, and the loopback API server checks each request against them).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

from tokenscaler.kube import GROUP, KEYS_SECRET_TYPE, VERSION

log = logging.getLogger("tokenscaler.kube.client")

LEASE_NAME = "tokenscaler-controller"
STATE_CONFIGMAP = "tokenscaler-state"
STATE_KEY = "state.json"


@dataclass(frozen=True)
class Rule:
    api_group: str
    resource: str
    verbs: tuple[str, ...]
    resource_names: tuple[str, ...] = ()


CONTROLLER_RULES: tuple[Rule, ...] = (
    Rule(GROUP, "tokenpools", ("list", "watch")),
    Rule(GROUP, "entitlements", ("list", "watch")),
    Rule(GROUP, "tokenpools/status", ("patch",)),
    Rule(GROUP, "entitlements/status", ("patch",)),
    # create cannot be limited to a name (the object does not exist yet); get/update can
    Rule("coordination.k8s.io", "leases", ("create",)),
    Rule("coordination.k8s.io", "leases", ("get", "update"), (LEASE_NAME,)),
    Rule("", "configmaps", ("create",)),
    Rule("", "configmaps", ("get", "update"), (STATE_CONFIGMAP,)),
    # the Entitlements' key digests; the code asks only for Secrets of type KEYS_SECRET_TYPE
    # (RBAC cannot narrow a list or a watch by type: the Role grants the namespace's Secrets)
    Rule("", "secrets", ("list", "watch")),
)
"""What ``tokenscaler controller --source kubernetes`` calls, in its own namespace."""

WEBHOOK_RULES: tuple[Rule, ...] = (
    Rule(GROUP, "tokenpools", ("list", "watch")),
    Rule(GROUP, "entitlements", ("list", "watch")),
)
"""What ``tokenscaler webhook --source kubernetes`` calls, in its own namespace."""


class ApiError(Exception):
    """An API call that failed: ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, what: str, status: int, reason: str) -> None:
        super().__init__(f"{what}: {status or 'unreachable'} {reason}".strip())
        self.status = status
        self.reason = reason


class Conflict(ApiError):
    """409: the object changed since it was read (resourceVersion), or already exists."""


class Gone(ApiError):
    """410: the resourceVersion is too old to watch from; list again."""


def _error(what: str, e: Exception) -> ApiError:
    if isinstance(e, ApiException):
        status = int(e.status or 0)
        reason = str(e.reason or "")
        try:
            body = json.loads(e.body) if e.body else {}
            reason = body.get("message") or reason
        except (TypeError, ValueError):
            pass
        cls = Conflict if status == 409 else Gone if status == 410 else ApiError
        return cls(what, status, reason)
    return ApiError(what, 0, f"{type(e).__name__}: {e}")


# network-level failures the client raises (connection refused, reset, a stream cut mid-chunk)
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)


def _call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (ApiException, *TRANSPORT_ERRORS) as e:  # type: ignore[misc]
        raise _error(what, e) from e


def api_client(host: str | None = None, *, timeout_s: float = 10.0) -> k8s.ApiClient:
    """A client for ``host`` (tests: the loopback stand-in), else in-cluster, else ~/.kube/config."""
    from kubernetes import config as kconfig

    if host is not None:
        cfg = k8s.Configuration(host=host)
    else:
        cfg = k8s.Configuration()
        try:
            kconfig.load_incluster_config(client_configuration=cfg)
        except kconfig.ConfigException:
            kconfig.load_kube_config(client_configuration=cfg)
    cfg.retries = 0  # every caller here retries on its own schedule
    api = k8s.ApiClient(cfg)
    api.default_timeout_s = timeout_s  # type: ignore[attr-defined]
    return api


def in_cluster_namespace(default: str = "tokenscaler") -> str:
    """The namespace this pod runs in (POD_NAMESPACE, else the service account's), or ``default``."""
    import os

    ns = os.environ.get("POD_NAMESPACE")
    if ns:
        return ns
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as f:
            return f.read().strip() or default
    except OSError:
        return default


def _timeout(api: k8s.ApiClient) -> float:
    return float(getattr(api, "default_timeout_s", 10.0))


# --------------------------------------------------------------------------- custom objects


class _Watching:
    """A collection with one watch open at a time (``_watch``), which another thread may cut."""

    _watch: Watch | None = None
    plural: str  # what the collection's errors name

    def abort_watch(self) -> None:
        """Cut the open watch (from another thread): its iterator ends with an error."""
        w = self._watch
        if w is not None:
            w.stop()


class CustomObjects(_Watching):
    """List, watch and status-patch one CR collection (``plural``) in ``namespace``."""

    def __init__(self, api: k8s.ApiClient, namespace: str, plural: str) -> None:
        self.api = api
        self.custom = k8s.CustomObjectsApi(api)
        self.namespace = namespace
        self.plural = plural
        self._watch: Watch | None = None

    def list(self) -> tuple[list[dict[str, Any]], str]:
        """All objects and the list's resourceVersion (to watch from)."""
        doc = _call(
            f"list {self.plural}",
            lambda: self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, self.plural, _request_timeout=_timeout(self.api)
            ),
        )
        return list(doc.get("items") or []), str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def watch(self, resource_version: str, timeout_s: int, read_timeout_s: float) -> Iterator[dict[str, Any]]:
        """Events after ``resource_version`` (``{"type", "object"}``) until the server ends the
        watch (``timeout_s``). Raises :class:`Gone` for a too-old version and :class:`ApiError`
        when the stream breaks or stays silent for ``read_timeout_s``."""
        w = Watch()
        stream = w.stream(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            self.plural,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            _request_timeout=(_timeout(self.api), read_timeout_s),
        )
        self._watch = w
        yield from _events(self, w, stream)

    def patch_status(self, name: str, body: Mapping[str, Any], *, attempts: int = 5) -> dict[str, Any] | None:
        """Merge-patch the status subresource of ``name``; a 409 is retried (up to ``attempts``),
        a 404 (deleted meanwhile) returns None."""
        delay = 0.05
        for attempt in range(1, attempts + 1):
            try:
                return _call(
                    f"patch {self.plural}/{name}/status",
                    lambda: self.custom.patch_namespaced_custom_object_status(
                        GROUP,
                        VERSION,
                        self.namespace,
                        self.plural,
                        name,
                        dict(body),
                        _content_type="application/merge-patch+json",
                        _request_timeout=_timeout(self.api),
                    ),
                )
            except Conflict:
                if attempt == attempts:
                    raise
                log.debug("status patch of %s/%s conflicted (attempt %d); retrying", self.plural, name, attempt)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except ApiError as e:
                if e.status == 404:
                    return None
                raise
        return None  # pragma: no cover


def _events(owner: _Watching, w: Watch, stream: Iterator[Any]) -> Iterator[dict[str, Any]]:
    """The events of one open watch as plain dicts (``{"type", "object"}``, the JSON the server
    sent); ``owner._watch`` is cleared when the stream ends."""
    try:
        while True:
            try:
                event = next(stream)
            except StopIteration:
                return
            except (ApiException, *TRANSPORT_ERRORS) as e:  # type: ignore[misc]
                raise _error(f"watch {owner.plural}", e) from e
            if isinstance(event, dict):
                raw = event.get("raw_object")
                yield {"type": event.get("type"), "object": raw if isinstance(raw, dict) else event.get("object")}
    finally:
        owner._watch = None
        w.stop()
        stream.close()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the key Secrets


class Secrets(_Watching):
    """List and watch the Secrets of type :data:`KEYS_SECRET_TYPE` in ``namespace`` (an
    Entitlement's ``spec.api_key_secret_ref``), with the interface of :class:`CustomObjects`
    that :class:`tokenscaler.kube.watch.Reflector` uses. The field selector keeps every other
    Secret of the namespace (certificates, tokens) out of this process."""

    plural = "secrets"

    def __init__(self, api: k8s.ApiClient, namespace: str, secret_type: str = KEYS_SECRET_TYPE) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.namespace = namespace
        self.field_selector = f"type={secret_type}"
        self._watch: Watch | None = None

    def list(self) -> tuple[list[dict[str, Any]], str]:
        """All the typed Secrets (as the JSON the server sent) and the list's resourceVersion."""
        resp = _call(
            "list secrets",
            lambda: self.core.list_namespaced_secret(
                self.namespace,
                field_selector=self.field_selector,
                _preload_content=False,
                _request_timeout=_timeout(self.api),
            ),
        )
        try:
            doc = json.loads(resp.data)
        except ValueError as e:
            raise ApiError("list secrets", 0, f"the answer is not JSON: {e}") from e
        return list(doc.get("items") or []), str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def watch(self, resource_version: str, timeout_s: int, read_timeout_s: float) -> Iterator[dict[str, Any]]:
        """As :meth:`CustomObjects.watch`, for the typed Secrets."""
        w = Watch()
        stream = w.stream(
            self.core.list_namespaced_secret,
            self.namespace,
            field_selector=self.field_selector,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            _request_timeout=(_timeout(self.api), read_timeout_s),
        )
        self._watch = w
        yield from _events(self, w, stream)


# --------------------------------------------------------------------------- leases


class Leases:
    """The one Lease ``name`` in ``namespace``: get / create / replace (with resourceVersion)."""

    def __init__(self, api: k8s.ApiClient, namespace: str, name: str = LEASE_NAME) -> None:
        self.api = api
        self.coord = k8s.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name

    def _model(self, spec: Mapping[str, Any], resource_version: str | None) -> Any:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version is not None:
            meta["resourceVersion"] = resource_version
        doc = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": dict(spec)}
        return self.api.deserialize(json.dumps(doc), "V1Lease", "application/json")

    def _dict(self, model: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(model)

    def get(self) -> dict[str, Any] | None:
        try:
            return self._dict(
                _call(
                    f"get lease {self.name}",
                    lambda: self.coord.read_namespaced_lease(
                        self.name, self.namespace, _request_timeout=_timeout(self.api)
                    ),
                )
            )
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        body = self._model(spec, None)
        return self._dict(
            _call(
                f"create lease {self.name}",
                lambda: self.coord.create_namespaced_lease(self.namespace, body, _request_timeout=_timeout(self.api)),
            )
        )

    def replace(self, spec: Mapping[str, Any], resource_version: str) -> dict[str, Any]:
        body = self._model(spec, resource_version)
        return self._dict(
            _call(
                f"update lease {self.name}",
                lambda: self.coord.replace_namespaced_lease(
                    self.name, self.namespace, body, _request_timeout=_timeout(self.api)
                ),
            )
        )


# --------------------------------------------------------------------------- the state ConfigMap


class StateStore:
    """The planner state (a JSON document) in the ConfigMap ``name``, key ``state.json``.

    Debt and scale-down history live here, so a new leader continues where the last one
    stopped. Writes carry the resourceVersion last read: a stale writer gets a 409.
    """

    def __init__(self, api: k8s.ApiClient, namespace: str, name: str = STATE_CONFIGMAP) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.namespace = namespace
        self.name = name
        self.resource_version: str | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            cm = _call(
                f"get configmap {self.name}",
                lambda: self.core.read_namespaced_config_map(
                    self.name, self.namespace, _request_timeout=_timeout(self.api)
                ),
            )
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return self.api.sanitize_for_serialization(cm)

    def load_state(self) -> dict[str, Any] | None:
        """The stored document, or None when there is none yet. Raises ValueError when it is not JSON."""
        cm = self._read()
        if cm is None:
            self.resource_version = None
            return None
        self.resource_version = (cm.get("metadata") or {}).get("resourceVersion")
        text = (cm.get("data") or {}).get(STATE_KEY)
        if text is None:
            return None
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ValueError(f"configmap {self.namespace}/{self.name} key {STATE_KEY}: not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ValueError(f"configmap {self.namespace}/{self.name} key {STATE_KEY}: not a JSON object")
        return doc

    def save_state(self, doc: Mapping[str, Any]) -> None:
        """Write ``doc``; creates the ConfigMap the first time. Raises :class:`Conflict` when
        someone else wrote it since this replica last read or wrote it (the caller decides
        whether it still may write: only a leader may)."""
        text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        if self.resource_version is None:
            cm = self._read()
            self.resource_version = None if cm is None else (cm.get("metadata") or {}).get("resourceVersion")
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/part-of": "tokenscaler"},
        }
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {STATE_KEY: text}}
        try:
            if self.resource_version is None:
                model = self.api.deserialize(json.dumps(body), "V1ConfigMap", "application/json")
                out = _call(
                    f"create configmap {self.name}",
                    lambda: self.core.create_namespaced_config_map(
                        self.namespace, model, _request_timeout=_timeout(self.api)
                    ),
                )
            else:
                meta["resourceVersion"] = self.resource_version
                model = self.api.deserialize(json.dumps(body), "V1ConfigMap", "application/json")
                out = _call(
                    f"update configmap {self.name}",
                    lambda: self.core.replace_namespaced_config_map(
                        self.name, self.namespace, model, _request_timeout=_timeout(self.api)
                    ),
                )
        except Conflict:
            self.resource_version = None  # the next write reads the current version first
            raise
        self.resource_version = out.metadata.resource_version
