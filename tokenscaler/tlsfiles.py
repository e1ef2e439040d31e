"""TLS contexts built from PEM files and re-built when the files change, without a restart.

cert-manager renews a certificate by rewriting the Secret, and the kubelet swaps the files
of the mounted volume; a long-running process must pick the new ones up.

* :class:`ServerTLS`: the ``ssl.SSLContext`` a server listens with. Its SNI callback (called
  on every handshake, with or without a server name) hands the connection the *current*
  context, built from the files as they were when last read; :meth:`ServerTLS.watch` checks
  the files' signatures every second and builds a new context when one changed. A set of
  files that does not load (a certificate written before its key, a truncated file) keeps
  the previous context and logs why once; the next change is tried again. Connections
  already open keep the certificate they were made with. With a client CA, client
  certificates are verified against it when presented (``CERT_OPTIONAL``: a probe without
  one can still reach ``/healthz``); which paths *require* one is the HTTP layer's
  business (:mod:`tokenscaler.serve.auth`).
* :class:`ClientTLS`: the context a client connects with (a CA to verify the server, a
  client certificate and key to present), re-built on the next use after a file changed.

Errors name the file and OpenSSL's reason, never the content; encrypted keys are refused
(there is nobody to type a passphrase).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from pathlib import Path

from tokenscaler.credfiles import Signature, signature

log = logging.getLogger(__name__)


class TLSFileError(ValueError):
    """Certificate or key files that do not make a TLS context (names the files, not their content)."""


def _no_passphrase() -> bytes:
    raise TLSFileError("the private key is encrypted; give an unencrypted PEM key (a Secret protects it at rest)")


def _reason(e: BaseException) -> str:
    if isinstance(e, TLSFileError):
        return str(e)
    if isinstance(e, ssl.SSLError):
        return getattr(e, "reason", None) or e.strerror or type(e).__name__
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return type(e).__name__


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, what: str) -> None:
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except (OSError, ssl.SSLError, TLSFileError) as e:
        raise TLSFileError(f"cannot load the {what} {str(cert)!r} with its key {str(key)!r}: {_reason(e)}") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise TLSFileError(f"cannot load the {what} {str(ca)!r}: {_reason(e)}") from None


def _der(data: bytes, i: int) -> tuple[int, bytes, int]:
    """One DER item at ``i``: (tag, content, index after it)."""
    tag, n = data[i], data[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(data[i : i + k], "big")
        i += k
    return tag, data[i : i + n], i + n


def certificate_not_after(path: str | Path) -> datetime.datetime | None:
    """The end of validity of the first certificate in a PEM file (None if it cannot be read)."""
    try:
        text = Path(path).read_text()
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(text[start:end])
        _, cert, _ = _der(der, 0)
        _, tbs, _ = _der(cert, 0)
        tag, _, i = _der(tbs, 0)
        if tag != 0xA0:  # no explicit version: the serial came first
            i = 0
        for _ in range(3):  # serial number, signature algorithm, issuer
            _, _, i = _der(tbs, i)
        _, validity, _ = _der(tbs, i)
        _, _, j = _der(validity, 0)
        tag, value, _ = _der(validity, j)
        fmt = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime or GeneralizedTime
        return datetime.datetime.strptime(value.decode("ascii"), fmt).replace(tzinfo=datetime.UTC)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


class _Watched:
    def __init__(self, files: tuple[Path, ...]) -> None:
        self.files = files
        self._signatures = self._now()
        self._warned: tuple[Signature | None, ...] | None = None
        self.failures = 0  # changed files that were read and refused

    def _now(self) -> tuple[Signature | None, ...]:
        return tuple(signature(f) for f in self.files)

    def changed(self) -> tuple[Signature | None, ...] | None:
        """The new signatures if any file changed since the last good load (and not already warned)."""
        now = self._now()
        if now == self._signatures or now == self._warned:
            return None
        return now

    def loaded(self, now: tuple[Signature | None, ...]) -> None:
        self._signatures = now
        self._warned = None

    def failed(self, now: tuple[Signature | None, ...], error: TLSFileError, keeping: str) -> None:
        log.warning("%s; %s", error, keeping)
        self._warned = now
        self.failures += 1


class ServerTLS:
    """A server's TLS context whose certificate, key and client CA follow their files."""

    def __init__(self, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self.client_ca = Path(client_ca) if client_ca is not None else None
        self._watch = _Watched(tuple(p for p in (self.cert, self.key, self.client_ca) if p is not None))
        self._current = self._build()  # raises TLSFileError: bad files are a startup error
        self.context = self._build()
        self.context.sni_callback = self._select
        self.reloads = 0

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    @property
    def failed_reloads(self) -> int:
        """Changed files that were read and refused (the previous certificate stayed in use)."""
        return self._watch.failures

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_chain(ctx, self.cert, self.key, "TLS certificate")
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_OPTIONAL
            _load_ca(ctx, self.client_ca, "client CA")
        return ctx

    def _select(self, conn: ssl.SSLObject, server_name: str | None, outer: ssl.SSLContext) -> None:
        conn.context = self._current

    def reload_if_changed(self) -> bool:
        """Build a new context if a file changed; True when the new one is now served."""
        now = self._watch.changed()
        if now is None:
            return False
        try:
            ctx = self._build()
        except TLSFileError as e:
            self._watch.failed(now, e, "the previous certificate stays in use")
            return False
        self._current = ctx
        self._watch.loaded(now)
        self.reloads += 1
        log.info("TLS certificate %s re-read; new connections get it", self.cert)
        return True

    async def watch(self, interval_s: float = 1.0) -> None:
        """Re-read the files when they change, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.reload_if_changed()
            except Exception:  # a watcher never takes the server down
                log.exception("checking the TLS files failed; the current certificate stays in use")


class ClientTLS:
    """A client's TLS context: the CA that verifies the server (default: the system's) and
    an optional client certificate; rebuilt by :meth:`context` after a file changed."""

    def __init__(self, ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None):
        if (cert is None) != (key is None):
            raise TLSFileError("a client certificate and its key go together")
        self.ca = Path(ca) if ca is not None else None
        self.cert = Path(cert) if cert is not None else None
        self.key = Path(key) if key is not None else None
        self._watch = _Watched(tuple(p for p in (self.ca, self.cert, self.key) if p is not None))
        self.not_after: datetime.datetime | None = None
        self._context = self._build()  # raises TLSFileError at start
        self.reloads = 0

    def _build(self) -> ssl.SSLContext:
        if self.ca is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system's CAs
        else:  # only this CA: a private CA must not be mixed with the public ones
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
            _load_ca(ctx, self.ca, "CA")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None and self.key is not None:
            _load_chain(ctx, self.cert, self.key, "client certificate")
            self.not_after = certificate_not_after(self.cert)
            if self.expired():
                log.warning("the client certificate %s expired at %s: servers refuse it", self.cert, self.not_after)
        return ctx

    def expired(self) -> bool:
        """Whether the client certificate (as last loaded) is past its end of validity."""
        return self.not_after is not None and self.not_after <= datetime.datetime.now(datetime.UTC)

    def changed(self) -> bool:
        """Whether a file changed since the context was last built (cheap: a few ``stat``)."""
        return self._watch.changed() is not None

    def context(self) -> ssl.SSLContext:
        now = self._watch.changed()
        if now is not None:
            try:
                ctx = self._build()
            except TLSFileError as e:
                self._watch.failed(now, e, "the previous TLS settings stay in use")
            else:
                self._context = ctx
                self._watch.loaded(now)
                self.reloads += 1
                log.info("client TLS files re-read (%s)", ", ".join(str(f) for f in self._watch.files))
        return self._context
