"""Authentication of the controller's HTTP API: which paths need what, and the middleware.

Methods (each one configured is required; none configured keeps the API open, the
one-machine default):

* **bearer token** (``--http-token-file``): ``Authorization: Bearer TOKEN`` must be one of
  the file's tokens (:class:`tokenscaler.credfiles.TokenFile`: re-read when it changes,
  compared in constant time);
* **client certificate** (``--http-tls-client-ca``): the TLS layer verifies any certificate
  presented against the client CA (a bad one fails the handshake); this middleware
  requires that one was presented on the protected paths.

Path policy (:func:`needs_auth`):

========================  =============================================================
path                      needs
========================  =============================================================
``/healthz``, ``/readyz``  nothing (kubelet probes)
``/metrics``              nothing, or the configured methods with ``--metrics-auth``
``/v1/*`` and any other   the configured methods
========================  =============================================================

Any other path is protected too, so an unauthenticated client cannot even learn which
paths exist. A refusal is a 401 with an OpenAI-shaped body (``type``
``authentication_error``) and ``WWW-Authenticate: Bearer``, counted in
``tokenscaler_http_auth_failures_total{reason}``. Neither the body nor any log line ever
carries the token that was sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from tokenscaler.core.metric_names import HTTP_AUTH_FAILURES, SPECS
from tokenscaler.credfiles import TokenFile

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
REASONS = ("missing_token", "malformed_authorization", "invalid_token", "missing_client_certificate")
_MESSAGES = {
    "missing_token": "This API needs a bearer token: send 'Authorization: Bearer TOKEN'.",
    "malformed_authorization": "The Authorization header must be 'Bearer TOKEN'.",
    "invalid_token": "The bearer token was not accepted (unknown, or rotated out).",
    "missing_client_certificate": "This API needs a client certificate signed by its client CA (mutual TLS).",
}
_CODES = {"missing_client_certificate": "client_certificate_required"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def needs_auth(path: str, *, metrics_auth: bool) -> bool:
    """Whether ``path`` needs the configured authentication (see the module's table)."""
    if path in OPEN_PATHS:
        return False
    if path == METRICS_PATH:
        return metrics_auth
    return True


def _refusal(reason: str) -> web.Response:
    body = {
        "error": {
            "message": _MESSAGES[reason],
            "type": "authentication_error",
            "param": None,
            "code": _CODES.get(reason, "invalid_api_key"),
        }
    }
    return web.Response(
        status=401,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"WWW-Authenticate": 'Bearer realm="tokenscaler"'},
    )


class HttpAuth:
    """The configured methods and the path policy, as an aiohttp middleware."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        tokens: TokenFile | None = None,
        client_certificates: bool = False,
        metrics_auth: bool = False,
    ) -> None:
        self.tokens = tokens
        self.client_certificates = client_certificates
        self.metrics_auth = metrics_auth
        spec = SPECS[HTTP_AUTH_FAILURES]
        self.failures = Counter(spec.family_name, spec.help, spec.labels, registry=registry)
        for reason in REASONS:
            self.failures.labels(reason)

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.client_certificates

    def describe(self) -> str:
        """One line for the startup log (no secrets: the number of tokens, not them)."""
        if not self.enabled:
            return "open (no --http-token-file, no --http-tls-client-ca)"
        parts = []
        if self.tokens is not None:
            parts.append(f"bearer token ({self.tokens.count} in {self.tokens.path})")
        if self.client_certificates:
            parts.append("client certificate")
        scope = "/v1/* and /metrics" if self.metrics_auth else "/v1/*"
        return f"{' and '.join(parts)} required on {scope}; /healthz and /readyz open"

    def check(self, request: web.Request) -> str | None:
        """The reason to refuse ``request``, or None to let it through."""
        if not self.enabled or not needs_auth(request.path, metrics_auth=self.metrics_auth):
            return None
        if self.client_certificates:
            transport = request.transport
            if transport is None or not transport.get_extra_info("peercert"):
                return "missing_client_certificate"
        if self.tokens is not None:
            header = request.headers.get("Authorization")
            if not header:
                return "missing_token"
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return "malformed_authorization"
            self.tokens.refresh()
            if not self.tokens.accepts(token):
                return "invalid_token"
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        reason = self.check(request)
        if reason is None:
            return await handler(request)
        self.failures.labels(reason).inc()
        log.debug("refused %s %s from %s: %s", request.method, request.path, request.remote, reason)
        return _refusal(reason)
