"""A loopback stand-in for the few kube-apiserver paths tokenscaler uses.

There is no kube-apiserver on this machine, so the client layer is tested against this:
a threaded HTTP server on 127.0.0.1 (port 0) implementing exactly

- ``/apis/tokenpools.io/v1alpha1/namespaces/{ns}/{tokenpools|entitlements}``: list, watch
  (``?watch=1``, chunked, with ``resourceVersion``, ``timeoutSeconds`` and bookmarks ignored),
  create; ``.../{name}``: get, merge patch (spec: bumps ``generation``), delete;
  ``.../{name}/status``: get, merge patch (``application/merge-patch+json`` only);
- ``/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]``: get, create, update;
- ``/api/v1/namespaces/{ns}/configmaps[/{name}]``: get, create, update;
- ``/api/v1/namespaces/{ns}/secrets``: list and watch, with ``fieldSelector=type=...`` (the
  one field selector the code uses); tests write Secrets with :meth:`ApiServer.put`;

with one global resourceVersion counter, 409 on a stale ``metadata.resourceVersion`` or an
existing name, 404 where the object is missing and 410 for a watch from a version older than
the last :meth:`ApiServer.compact`. Test hooks: :meth:`drop_watches` cuts every open watch
mid-stream (no terminating chunk), :meth:`fail_next` answers the next matching request with a
given status, and ``requests`` records (verb, group, resource, name) of every call, so a test
can compare what the code did with the RBAC it declares.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CUSTOM = re.compile(
    r"^/apis/(?P<group>tokenpools\.io)/v1alpha1/namespaces/(?P<ns>[^/]+)/(?P<res>tokenpools|entitlements)"
    r"(?:/(?P<name>[^/]+)(?P<sub>/status)?)?$"
)
LEASES = re.compile(
    r"^/apis/(?P<group>coordination\.k8s\.io)/v1/namespaces/(?P<ns>[^/]+)/(?P<res>leases)(?:/(?P<name>[^/]+))?$"
)
CONFIGMAPS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>configmaps|secrets)(?:/(?P<name>[^/]+))?$")

KINDS = {
    "tokenpools": ("tokenpools.io/v1alpha1", "TokenPool"),
    "entitlements": ("tokenpools.io/v1alpha1", "Entitlement"),
    "leases": ("coordination.k8s.io/v1", "Lease"),
    "configmaps": ("v1", "ConfigMap"),
    "secrets": ("v1", "Secret"),
}


def field_filter(query: dict[str, str]) -> Any:
    """The objects a ``fieldSelector`` keeps: ``type=X`` (Secrets) only; no selector keeps all."""
    selector = query.get("fieldSelector") or ""
    if not selector:
        return lambda obj: True
    field, _, value = selector.partition("=")
    if field != "type" or not value or "," in value:
        raise ValueError(f"the stand-in only supports fieldSelector type=X, not {selector!r}")
    return lambda obj: obj.get("type") == value


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


@dataclass(frozen=True)
class Call:
    verb: str  # get list watch create update patch delete
    group: str
    resource: str  # plural, with "/status" for the subresource
    namespace: str
    name: str | None


class ApiServer:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.rv = 100
        self.objects: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # (ns, resource) -> name -> obj
        self.events: list[tuple[int, str, str, str, dict[str, Any]]] = []  # (rv, ns, resource, type, obj)
        self.compacted = 0
        self.drops = 0
        self.watches_open = 0
        self.requests: list[Call] = []
        self._failures: list[tuple[str, str, int, int]] = []  # (verb, resource, status, remaining)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="apiserver", daemon=True)

    # ------------------------------------------------------------------ lifecycle and hooks

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> ApiServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.drop_watches()
        self.server.shutdown()
        self.server.server_close()

    def drop_watches(self) -> None:
        """Cut every open watch stream abruptly."""
        with self.lock:
            self.drops += 1
            self.lock.notify_all()

    def compact(self) -> int:
        """Forget history: a watch from a version before now answers 410 Gone."""
        with self.lock:
            self.compacted = self.rv
            self.events = []
            self.lock.notify_all()
            return self.rv

    def fail_next(self, verb: str, resource: str, status: int, count: int = 1) -> None:
        with self.lock:
            self._failures.append((verb, resource, status, count))

    def wait_for(self, predicate: Any, timeout_s: float = 10.0) -> bool:
        with self.lock:
            return self.lock.wait_for(predicate, timeout_s)

    # ------------------------------------------------------------------ store (lock held)

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, ns: str, res: str, type_: str, obj: dict[str, Any]) -> None:
        self.events.append((int(obj["metadata"]["resourceVersion"]), ns, res, type_, copy.deepcopy(obj)))
        self.lock.notify_all()

    def put(self, ns: str, res: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace ``obj`` directly (a test acting as another client)."""
        with self.lock:
            coll = self.objects.setdefault((ns, res), {})
            name = obj["metadata"]["name"]
            old = coll.get(name)
            new = self._stamp(ns, res, copy.deepcopy(obj), old)
            coll[name] = new
            self._emit(ns, res, "MODIFIED" if old else "ADDED", new)
            return copy.deepcopy(new)

    def delete(self, ns: str, res: str, name: str) -> None:
        with self.lock:
            obj = self.objects.get((ns, res), {}).pop(name)
            obj["metadata"]["resourceVersion"] = self._next_rv()
            self._emit(ns, res, "DELETED", obj)

    def get(self, ns: str, res: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get((ns, res), {}).get(name)
            return copy.deepcopy(obj) if obj else None

    def _stamp(self, ns: str, res: str, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        api_version, kind = KINDS[res]
        obj["apiVersion"], obj["kind"] = api_version, kind
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = ns
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if res in ("tokenpools", "entitlements"):
                meta["generation"] = 1
        else:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            if "generation" in old["metadata"]:
                changed = obj.get("spec") != old.get("spec")
                meta["generation"] = old["metadata"]["generation"] + (1 if changed else 0)
            if res in ("tokenpools", "entitlements") and "status" not in obj and "status" in old:
                obj["status"] = old["status"]
        meta["resourceVersion"] = self._next_rv()
        return obj

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                api._dispatch(self, "GET")

            def do_POST(self) -> None:
                api._dispatch(self, "POST")

            def do_PUT(self) -> None:
                api._dispatch(self, "PUT")

            def do_PATCH(self) -> None:
                api._dispatch(self, "PATCH")

            def do_DELETE(self) -> None:
                api._dispatch(self, "DELETE")

        return Handler

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _status(self, h: BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        self._send(
            h,
            code,
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
             "code": code},
        )

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        m = CUSTOM.match(url.path) or LEASES.match(url.path) or CONFIGMAPS.match(url.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        if m is None:
            self._status(h, 404, "NotFound", f"the stand-in does not serve {method} {url.path}")
            return
        g = m.groupdict()
        ns, res, name, sub = g["ns"], g["res"], g.get("name"), g.get("sub")
        group = g.get("group") or ""
        watch = query.get("watch") in ("1", "true")
        verb = {
            "GET": "watch" if watch else ("get" if name else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }[method]
        resource = res + ("/status" if sub else "")
        with self.lock:
            self.requests.append(Call(verb, group, resource, ns, name))
            for i, (fv, fr, status, left) in enumerate(self._failures):
                if fv == verb and fr == resource:
                    self._failures[i] = (fv, fr, status, left - 1)
                    if left <= 1:
                        del self._failures[i]
                    break
            else:
                status = 0
        if status:
            reason = {409: "Conflict", 410: "Gone", 500: "InternalError"}.get(status, HTTPStatus(status).phrase)
            self._status(h, status, reason, f"injected {status} for {verb} {resource}")
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._status(h, 400, "BadRequest", "body is not JSON")
            return
        try:
            keep = field_filter(query)
        except ValueError as e:
            self._status(h, 400, "BadRequest", str(e))
            return
        if watch:
            self._watch(h, ns, res, query, keep)
            return
        with self.lock:
            code, doc = self._serve(method, ns, res, name, sub, body, h.headers.get("Content-Type", ""), keep)
        if code >= 400:
            self._status(h, code, doc["reason"], doc["message"])
        else:
            self._send(h, code, doc)

    def _serve(
        self, method: str, ns: str, res: str, name: str | None, sub: str | None, body: Any, ctype: str, keep: Any
    ) -> tuple[int, dict[str, Any]]:
        coll = self.objects.setdefault((ns, res), {})
        api_version, kind = KINDS[res]

        def err(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
            return code, {"reason": reason, "message": message}

        if method == "GET" and name is None:
            items = [copy.deepcopy(o) for _, o in sorted(coll.items()) if keep(o)]
            meta = {"resourceVersion": str(self.rv)}
            return 200, {"apiVersion": api_version, "kind": f"{kind}List", "metadata": meta, "items": items}
        if method == "POST":
            if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
                return err(400, "BadRequest", "metadata.name is required")
            new_name = body["metadata"]["name"]
            if new_name in coll:
                return err(409, "AlreadyExists", f'{res} "{new_name}" already exists')
            body.get("metadata", {}).pop("resourceVersion", None)
            obj = self._stamp(ns, res, copy.deepcopy(body), None)
            coll[new_name] = obj
            self._emit(ns, res, "ADDED", obj)
            return 201, copy.deepcopy(obj)
        assert name is not None
        old = coll.get(name)
        if old is None:
            return err(404, "NotFound", f'{res} "{name}" not found')
        if method == "GET":
            return 200, copy.deepcopy(old)
        if method == "DELETE":
            del coll[name]
            old["metadata"]["resourceVersion"] = self._next_rv()
            self._emit(ns, res, "DELETED", old)
            return 200, copy.deepcopy(old)
        if method == "PUT":
            if not isinstance(body, dict):
                return err(400, "BadRequest", "body must be an object")
            want = (body.get("metadata") or {}).get("resourceVersion")
            if want is not None and want != old["metadata"]["resourceVersion"]:
                return err(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {res} "{name}": the object has been modified; '
                    "please apply your changes to the latest version and try again",
                )
            obj = self._stamp(ns, res, copy.deepcopy(body), old)
            coll[name] = obj
            self._emit(ns, res, "MODIFIED", obj)
            return 200, copy.deepcopy(obj)
        if method == "PATCH":
            if not ctype.startswith("application/merge-patch+json"):
                return err(415, "UnsupportedMediaType", f"the stand-in only takes merge patches, not {ctype!r}")
            if not isinstance(body, dict):
                return err(400, "BadRequest", "a merge patch must be an object")
            if sub:  # the status subresource: only status changes
                obj = copy.deepcopy(old)
                if "status" in body:
                    obj["status"] = merge(old.get("status"), body["status"])
                    if obj["status"] is None:
                        obj.pop("status")
            else:  # the main resource: status is ignored
                obj = merge(old, {k: v for k, v in body.items() if k != "status"})
            obj["metadata"]["resourceVersion"] = self._next_rv()
            if not sub and obj.get("spec") != old.get("spec") and "generation" in old["metadata"]:
                obj["metadata"]["generation"] = old["metadata"]["generation"] + 1
            coll[name] = obj
            self._emit(ns, res, "MODIFIED", obj)
            return 200, copy.deepcopy(obj)
        return err(405, "MethodNotAllowed", method)

    def _watch(self, h: BaseHTTPRequestHandler, ns: str, res: str, query: dict[str, str], keep: Any) -> None:
        since = int(query.get("resourceVersion") or 0)
        timeout_s = float(query.get("timeoutSeconds") or 300)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(doc: dict[str, Any]) -> None:
            data = json.dumps(doc).encode() + b"\n"
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        with self.lock:
            self.watches_open += 1
            self.lock.notify_all()
            drops = self.drops
        try:
            if since and since < self.compacted:
                chunk(
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "message": f"too old resource version: {since} ({self.compacted})",
                            "reason": "Expired",
                            "code": 410,
                        },
                    }
                )
                h.wfile.write(b"0\r\n\r\n")
                return
            deadline = threading.Event()
            timer = threading.Timer(timeout_s, lambda: (deadline.set(), self._notify()))
            timer.daemon = True
            timer.start()
            try:
                for event in self._events_after(ns, res, since, drops, deadline):
                    if keep(event["object"]):
                        chunk(event)
            except _Dropped:
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
                return
            finally:
                timer.cancel()
            h.wfile.write(b"0\r\n\r\n")  # the server ended the watch normally (timeoutSeconds)
            h.wfile.flush()
        except OSError:
            h.close_connection = True
        finally:
            with self.lock:
                self.watches_open -= 1
                self.lock.notify_all()

    def _notify(self) -> None:
        with self.lock:
            self.lock.notify_all()

    def _events_after(
        self, ns: str, res: str, since: int, drops: int, deadline: threading.Event
    ) -> Iterator[dict[str, Any]]:
        cursor = since
        while True:
            with self.lock:
                after = cursor
                self.lock.wait_for(
                    lambda: deadline.is_set()
                    or self.drops != drops
                    or any(rv > after and n == ns and r == res for rv, n, r, _, _ in self.events),  # noqa: B023
                    timeout=1.0,
                )
                if self.drops != drops:
                    raise _Dropped
                if deadline.is_set():
                    return
                pending = [(rv, t, o) for rv, n, r, t, o in self.events if rv > cursor and n == ns and r == res]
            for rv, t, o in pending:
                cursor = rv
                yield {"type": t, "object": o}


class _Dropped(Exception):
    pass
