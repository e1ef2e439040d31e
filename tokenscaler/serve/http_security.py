"""The controller's HTTP API security, assembled from its files: TLS, tokens, the path policy.

``--http-tls-cert``/``--http-tls-key`` serve HTTPS (and only HTTPS) with
:class:`tokenscaler.tlsfiles.ServerTLS`, whose files are re-read when they change;
``--http-tls-client-ca`` adds mutual TLS; ``--http-token-file`` requires a bearer token;
``--metrics-auth`` extends the requirement to ``/metrics``. With none of them the API is
plain HTTP and open, as on one machine. See :mod:`tokenscaler.serve.auth` for the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from aiohttp import web
from prometheus_client import CollectorRegistry

from tokenscaler.credfiles import TokenFile
from tokenscaler.serve.auth import HttpAuth
from tokenscaler.tlsfiles import ServerTLS


class HttpSecurity:
    """What the HTTP listener needs: an SSL context (or None), the auth middleware, a file watcher."""

    def __init__(self, tls: ServerTLS | None, auth: HttpAuth) -> None:
        self.tls = tls
        self.auth = auth
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_files(
        cls,
        registry: CollectorRegistry | None,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        client_ca: str | None = None,
        token_file: str | None = None,
        metrics_auth: bool = False,
    ) -> HttpSecurity:
        """Read the files named (``--http-tls-*``, ``--http-token-file``); ``ValueError``
        (naming the file) if one is unusable. Nothing named: plain HTTP, open."""
        tls = ServerTLS(tls_cert, tls_key, client_ca) if tls_cert and tls_key else None
        tokens = TokenFile(token_file, "HTTP token file") if token_file else None
        auth = HttpAuth(registry, tokens=tokens, client_certificates=bool(client_ca), metrics_auth=metrics_auth)
        return cls(tls, auth)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.context if self.tls is not None else None

    def describe(self) -> str:
        tls = "off (plain HTTP)" if self.tls is None else ("mutual TLS" if self.tls.mutual else "TLS")
        return f"HTTP API: {tls}; authentication: {self.auth.describe()}"

    def install(self, app: web.Application) -> None:
        """Put the auth middleware in front of every route of ``app`` (before it is started)."""
        app.middlewares.insert(0, self.auth.middleware)

    def start(self) -> None:
        if self.tls is not None:
            self._watcher = asyncio.get_running_loop().create_task(self.tls.watch(), name="http-tls-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
