"""The sidecar as a client of the controller's HTTP API: its credentials, and why a poll failed.

:class:`LimitsClientAuth` holds what ``--limits-ca``, ``--limits-client-cert``/
``--limits-client-key`` and ``--limits-token-file`` name. Every file is re-read when it
changes (a rotated token or certificate is used on the next poll, and a change wakes a
poll that is backing off). :func:`classify` names the reason of a failed poll, one of
:data:`FETCH_ERROR_REASONS`, which is the ``reason`` label of
``tokenscaler_sidecar_limits_fetch_errors_total``; every reason is handled alike
(fail-static, then floors after ``--limits-expiry-s``), only the log line and the label
differ. No token or key material is ever put in a log line, an error or a label:
:meth:`LimitsClientAuth.redact` scrubs the token from anything the controller sent back.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

from tokenscaler.credfiles import TokenFile
from tokenscaler.sidecar.metrics import FETCH_ERROR_REASONS
from tokenscaler.tlsfiles import ClientTLS

__all__ = ["FETCH_ERROR_REASONS", "LimitsClientAuth", "LimitsHttpError", "LimitsRefused", "classify"]
# FETCH_ERROR_REASONS: ``unreachable``: no connection; ``timeout``; ``tls``: a handshake or certificate failure
# either way; ``auth``: the controller answered 401/403; ``http``: another status;
# ``invalid``: a document that does not validate, or for another pool.


class LimitsRefused(RuntimeError):
    """The controller refused this sidecar's credentials (HTTP 401 or 403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class LimitsHttpError(RuntimeError):
    """Any other status than 200 and 304."""


class LimitsClientAuth:
    def __init__(
        self,
        *,
        ca: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        token_file: str | Path | None = None,
    ) -> None:
        """Read the files (``ValueError`` naming a file that is unusable)."""
        self.tls = ClientTLS(ca, client_cert, client_key) if (ca or client_cert or client_key) else None
        self.tokens = TokenFile(token_file, "limits token file") if token_file else None

    def describe(self) -> str:
        parts = []
        if self.tls is not None:
            parts.append(f"CA {self.tls.ca}" if self.tls.ca else "the system's CAs")
            if self.tls.cert is not None:
                parts.append(f"client certificate {self.tls.cert}")
        if self.tokens is not None:
            parts.append(f"bearer token from {self.tokens.path}")
        return ", ".join(parts) or "no credentials"

    def headers(self) -> dict[str, str]:
        """The Authorization header with the current token (the file re-read if it changed)."""
        if self.tokens is None:
            return {}
        self.tokens.refresh()
        return {"Authorization": f"Bearer {self.tokens.first}"}

    def ssl_context(self) -> ssl.SSLContext | None:
        """The current TLS context (rebuilt if a file changed); None: aiohttp's default."""
        return self.tls.context() if self.tls is not None else None

    def changed(self) -> bool:
        """Whether a credential file changed since it was last used."""
        tokens = self.tokens is not None and self.tokens.changed()
        return tokens or (self.tls is not None and self.tls.changed())

    def tls_hint(self) -> str:
        """What this side knows about a TLS failure: an expired client certificate."""
        if self.tls is not None and self.tls.expired():
            return f" (this sidecar's client certificate {self.tls.cert} expired at {self.tls.not_after})"
        return ""

    def redact(self, text: str) -> str:
        if self.tokens is not None and self.tokens.first in text:
            text = text.replace(self.tokens.first, "[redacted]")
        return text


def error_message(body: bytes, limit: int = 200) -> str:
    """The ``error.message`` of an OpenAI-shaped body, else the start of the body."""
    try:
        doc = json.loads(body)
        message = doc["error"]["message"]
        if isinstance(message, str):
            return message[:limit]
    except (ValueError, KeyError, TypeError):
        pass
    return repr(body[:limit])


def _ssl_cause(e: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        nested = getattr(cur, "os_error", None)
        if isinstance(nested, ssl.SSLError):
            return nested
        cur = cur.__cause__ or cur.__context__
    return None


def classify(e: BaseException, *, https: bool, client_cert: bool) -> tuple[str, str]:
    """``(reason, what to log)`` for a failed poll."""
    import aiohttp
    from pydantic import ValidationError

    if isinstance(e, LimitsRefused):
        return "auth", f"the controller refused this sidecar's credentials ({e})"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert_error = e.certificate_error
        why = getattr(cert_error, "verify_message", None) or getattr(cert_error, "reason", None) or str(cert_error)
        return "tls", f"the controller's certificate was not accepted: {why} (check --limits-ca)"
    cause = _ssl_cause(e)
    if cause is not None or isinstance(e, aiohttp.ClientSSLError):
        why = (getattr(cause, "reason", None) or cause.strerror or str(cause)) if cause is not None else str(e)
        hint = " (the controller may not accept this client certificate)" if client_cert else ""
        return "tls", f"TLS handshake failed: {why}{hint}"
    if isinstance(e, aiohttp.ServerDisconnectedError) and https:
        # TLS 1.3: a server that rejects the client certificate does so after the client's
        # handshake ends, by closing the connection
        hint = "its client CA refused this client certificate" if client_cert else "no client certificate was sent"
        return "tls", f"the controller closed the TLS connection ({hint}, or it went away)"
    if isinstance(e, TimeoutError):
        return "timeout", "no answer in time"
    if isinstance(e, aiohttp.ClientConnectorError | aiohttp.ClientOSError | OSError):
        return "unreachable", str(e) or type(e).__name__
    if isinstance(e, aiohttp.ClientError):
        return "unreachable", f"{type(e).__name__}: {e}"
    if isinstance(e, LimitsHttpError):
        return "http", str(e)
    if isinstance(e, ValidationError):
        return "invalid", f"the limits document does not validate ({e.error_count()} error(s))"
    return "invalid", str(e)
