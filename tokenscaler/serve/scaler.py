"""The KEDA external scaler: a ``grpc.aio`` server answering KEDA from the latest published plan.

This module owns the ``externalscaler.ExternalScaler`` service (``keda/externalscaler.proto``,
KEDA v2.20.2's contract) and its trigger-metadata rules. Every answer is a reference read of
:meth:`PlanStore.current`; nothing is solved on the request path.

Trigger metadata (``ScaledObjectRef.scalerMetadata``, i.e. the trigger's ``metadata`` map)
    ``pool`` (required, non-empty): the token pool this ScaledObject scales.
    ``scalerAddress``, ``enableTLS``, ``unsafeSsl``: KEDA's own keys, accepted and ignored.
    Any other key is rejected with INVALID_ARGUMENT naming it (a typo such as ``pools`` must not
    silently scale nothing). ``caCert``/``tlsClientCert``/``tlsClientKey`` are also rejected
    there: KEDA reads them only from a TriggerAuthentication, so in metadata they do nothing.

Answers (KEDA uses the ``*Float`` field when > 0, else the int field, so both are filled)
    ``GetMetricSpec``: one MetricSpec, ``metricName`` = :func:`metric_name` (``tokenscaler-<pool>``),
    ``targetSize`` 1 and ``targetSizeFloat`` 1.0.
    ``GetMetrics``: one MetricValue with the pool's ``desired_replicas`` in ``metricValue`` and
    ``metricValueFloat``. With ``metricType: AverageValue`` the HPA computes
    ``ceil(value / target) = desired_replicas`` (and with tolerance 0 nothing rounds it away).
    A non-empty request ``metricName`` other than the pool's is INVALID_ARGUMENT.
    ``IsActive``: :meth:`PoolPlan.active`, whether any guarantee or demand needs a replica.
    ``StreamIsActive``: the current activity at once, then one message whenever it changes;
    it ends only when the client cancels, the server stops, or the pool leaves the plan.

Errors
    INVALID_ARGUMENT: bad metadata or metric name. NOT_FOUND: the pool is not in the plan (the
    message names the known pools). UNAVAILABLE: no plan published yet (controller starting), so
    KEDA counts a failure and its ``fallback`` applies after ``failureThreshold`` of them; never a
    made-up number. ``GetMetricSpec`` depends only on the metadata, so before the first plan it
    answers without checking the pool (KEDA can build the HPA while the controller warms up);
    ``StreamIsActive`` waits for the first plan instead of failing. A stale plan is still the
    last good plan: it is served, and counted in ``tokenscaler_scaler_stale_answers_total``.

TLS (optional): :class:`ScalerTLS` holds the server certificate chain and key, and a client CA
that turns on mutual TLS (KEDA's TriggerAuthentication ``tlsClientCert``/``tlsClientKey``; KEDA
verifies this server with ``caCert``, so the server certificate must name the host in
``scalerAddress``). Built :meth:`ScalerTLS.from_files`, the server follows its files: before
each new connection's handshake it checks their signatures and, when one changed (cert-manager
renewed the Secret), serves the new certificate; files that do not load keep the previous one
and are logged once, naming the files.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from prometheus_client import CollectorRegistry
from pydantic import Field, ValidationError

from tokenscaler.control.store import PlanStore, PublishedPlan
from tokenscaler.core.frozen import Frozen
from tokenscaler.core.plan import PoolPlan
from tokenscaler.credfiles import Signature, signature
from tokenscaler.serve._proto import externalscaler_pb2 as pb
from tokenscaler.serve._proto import externalscaler_pb2_grpc as pb_grpc
from tokenscaler.serve.scaler_metrics import ScalerMetrics

log = logging.getLogger(__name__)

METRIC_NAME_PREFIX = "tokenscaler-"
TARGET_REPLICAS_PER_UNIT = 1  # GetMetricSpec's target: one unit of the metric per replica
KEDA_METADATA_KEYS = ("scalerAddress", "enableTLS", "unsafeSsl")
KEDA_AUTH_PARAMS = ("caCert", "tlsClientCert", "tlsClientKey")
_METRIC_NAME_UNSAFE = re.compile(r"[^a-z0-9_-]+")

T = TypeVar("T")


def metric_name(pool: str) -> str:
    """The metric a pool is scaled on: ``tokenscaler-<pool>``, lowercase ``[a-z0-9_-]``.

    Pool names are DNS-1123 labels already, so this is ``tokenscaler-`` + the name; any other
    character becomes ``-`` (KEDA's metric names become URL path segments of the external
    metrics API). KEDA shows it to the HPA as ``s<trigger index>-tokenscaler-<pool>``.
    """
    return METRIC_NAME_PREFIX + _METRIC_NAME_UNSAFE.sub("-", pool.lower())


class ScalerError(Exception):
    """An answer that is a gRPC status instead of a message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TriggerMetadata(Frozen):
    """The ``metadata`` of a ScaledObject trigger of ``type: external`` pointing at tokenscaler."""

    pool: str = Field(min_length=1, description="The token pool this ScaledObject scales (required).")
    scaler_address: str | None = Field(None, alias="scalerAddress", description="KEDA's: host:port of this server.")
    enable_tls: str | None = Field(None, alias="enableTLS", description="KEDA's: use TLS with the operator's CAs.")
    unsafe_ssl: str | None = Field(None, alias="unsafeSsl", description="KEDA's: skip server cert verification.")

    @classmethod
    def parse(cls, metadata: Mapping[str, str]) -> TriggerMetadata:
        """Validate ``scalerMetadata``; :class:`ScalerError` INVALID_ARGUMENT names what is wrong."""
        return _parse_metadata(tuple(sorted(metadata.items())))


_ALLOWED_KEYS = ("pool", *KEDA_METADATA_KEYS)


@functools.lru_cache(maxsize=1024)
def _parse_metadata(items: tuple[tuple[str, str], ...]) -> TriggerMetadata:
    # KEDA sends the same few maps over and over: parse each once (errors are not cached).
    unknown = [k for k, _ in items if k not in _ALLOWED_KEYS]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        msg = f"unknown trigger metadata key(s): {names}; allowed: {', '.join(_ALLOWED_KEYS)}"
        misplaced = [k for k in unknown if k in KEDA_AUTH_PARAMS]
        if misplaced:
            msg += f" ({', '.join(misplaced)} belong in a TriggerAuthentication; KEDA ignores them in metadata)"
        raise ScalerError(grpc.StatusCode.INVALID_ARGUMENT, msg)
    data = dict(items)
    if not data.get("pool"):
        raise ScalerError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "trigger metadata must set 'pool' to the token pool this ScaledObject scales"
            + (" (it is empty)" if "pool" in data else ""),
        )
    try:
        return TriggerMetadata.model_validate(data)
    except ValidationError as e:  # unreachable with str values today; kept so a new field cannot crash the RPC
        raise ScalerError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid trigger metadata: {e}") from e


@dataclass(frozen=True)
class ScalerTLS:
    """Server TLS for the scaler; ``client_ca_pem`` set means clients must present a certificate it signed.

    ``files`` (set by :meth:`from_files`): the certificate, key and client CA paths the server
    re-reads when they change (:class:`_Reloader`)."""

    certificate_chain_pem: bytes
    private_key_pem: bytes
    client_ca_pem: bytes | None = None
    files: tuple[Path, Path, Path | None] | None = field(default=None, compare=False)

    @classmethod
    def from_files(
        cls, certificate_file: str | Path, private_key_file: str | Path, client_ca_file: str | Path | None = None
    ) -> ScalerTLS:
        """Read PEM files (the server's certificate chain, its key, optionally the client CA)."""

        def read(path: str | Path, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the scaler's {what} {str(path)!r}: {e.strerror or e}") from e

        return cls(
            certificate_chain_pem=read(certificate_file, "TLS certificate"),
            private_key_pem=read(private_key_file, "TLS private key"),
            client_ca_pem=None if client_ca_file is None else read(client_ca_file, "client CA"),
            files=(Path(certificate_file), Path(private_key_file), Path(client_ca_file) if client_ca_file else None),
        )

    @property
    def mutual(self) -> bool:
        return self.client_ca_pem is not None

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key_pem, self.certificate_chain_pem)], root_certificates=self.client_ca_pem
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.files is None:
            return grpc.ssl_server_credentials(
                [(self.private_key_pem, self.certificate_chain_pem)],
                root_certificates=self.client_ca_pem,
                require_client_auth=self.mutual,
            )
        # gRPC keeps the current configuration when fetch returns None; the grpcio stubs type the
        # callback as never returning None
        fetch = _Reloader(self).fetch
        return grpc.dynamic_ssl_server_credentials(
            self.certificate_configuration(), fetch, require_client_authentication=self.mutual  # type: ignore[arg-type]
        )


class _Reloader:
    """gRPC calls :meth:`fetch` before each new connection's handshake: a new certificate
    configuration when the files changed and load, else ``None`` (keep the current one)."""

    def __init__(self, tls: ScalerTLS) -> None:
        assert tls.files is not None
        self.files = tuple(p for p in tls.files if p is not None)
        self.cert, self.key, self.client_ca = tls.files
        self._loaded = self._signatures()
        self._failed: tuple[Signature | None, ...] | None = None
        self.reloads = 0

    def _signatures(self) -> tuple[Signature | None, ...]:
        return tuple(signature(p) for p in self.files)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            now = self._signatures()
            if now in (self._loaded, self._failed):
                return None
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)  # the pair matches
                tls = ScalerTLS.from_files(self.cert, self.key, self.client_ca)
            except (OSError, ssl.SSLError, ValueError) as e:
                reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or type(e).__name__
                log.warning(
                    "the scaler's TLS files %s do not load (%s); the previous certificate stays in use",
                    ", ".join(str(p) for p in self.files), reason,
                )  # fmt: skip
                self._failed = now
                return None
            self._loaded, self._failed = now, None
            self.reloads += 1
            log.info("the scaler's TLS certificate %s re-read; new connections get it", self.cert)
            return tls.certificate_configuration()
        except Exception:  # called from gRPC's core: never raise into it
            log.exception("checking the scaler's TLS files failed; the current certificate stays in use")
            return None


class ExternalScalerService(pb_grpc.ExternalScalerServicer):
    """KEDA's ``ExternalScaler`` over a :class:`PlanStore` (see the module docstring for the rules)."""

    def __init__(self, store: PlanStore, metrics: ScalerMetrics) -> None:
        self._store = store
        self._metrics = metrics

    # ------------------------------------------------------------------ reads of the store

    def _published(self, rpc: str) -> PublishedPlan:
        published = self._store.current()
        if published is None:
            raise ScalerError(
                grpc.StatusCode.UNAVAILABLE,
                "no plan has been published yet (the controller is starting); KEDA's fallback applies meanwhile",
            )
        if published.stale:
            self._metrics.stale_answer(rpc)
        return published

    @staticmethod
    def _pool_plan(published: PublishedPlan, pool: str) -> PoolPlan:
        pool_plan = published.plan.pools.get(pool)
        if pool_plan is None:
            known = ", ".join(sorted(published.plan.pools)) or "none"
            raise ScalerError(grpc.StatusCode.NOT_FOUND, f"pool {pool!r} is not in the plan; known pools: {known}")
        return pool_plan

    # ------------------------------------------------------------------ answers

    def _is_active(self, request: pb.ScaledObjectRef) -> pb.IsActiveResponse:
        meta = TriggerMetadata.parse(request.scalerMetadata)
        pool_plan = self._pool_plan(self._published("IsActive"), meta.pool)
        return pb.IsActiveResponse(result=pool_plan.active())

    def _get_metric_spec(self, request: pb.ScaledObjectRef) -> pb.GetMetricSpecResponse:
        meta = TriggerMetadata.parse(request.scalerMetadata)
        published = self._store.current()
        if published is not None:  # before the first plan the spec still depends only on the metadata
            self._pool_plan(published, meta.pool)
        spec = pb.MetricSpec(
            metricName=metric_name(meta.pool),
            targetSize=TARGET_REPLICAS_PER_UNIT,
            targetSizeFloat=float(TARGET_REPLICAS_PER_UNIT),
        )
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    def _get_metrics(self, request: pb.GetMetricsRequest) -> pb.GetMetricsResponse:
        meta = TriggerMetadata.parse(request.scaledObjectRef.scalerMetadata)
        name = metric_name(meta.pool)
        if request.metricName and request.metricName != name:
            raise ScalerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metric {request.metricName!r} is not served for pool {meta.pool!r} (its metric is {name!r})",
            )
        pool_plan = self._pool_plan(self._published("GetMetrics"), meta.pool)
        desired = max(int(pool_plan.desired_replicas), 0)
        value = pb.MetricValue(metricName=name, metricValue=desired, metricValueFloat=float(desired))
        return pb.GetMetricsResponse(metricValues=[value])

    # ------------------------------------------------------------------ gRPC handlers

    async def _unary(self, rpc: str, answer: Callable[[], T], context: grpc.aio.ServicerContext) -> T:
        started = time.perf_counter()
        try:
            response = answer()
        except ScalerError as e:
            code, message = e.code, e.message
        except Exception:
            log.exception("KEDA scaler %s failed", rpc)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {rpc}; see the controller's log"
        else:
            self._metrics.finished(rpc, grpc.StatusCode.OK, started)
            return response
        self._metrics.finished(rpc, code, started)
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    async def IsActive(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> pb.IsActiveResponse:
        return await self._unary("IsActive", lambda: self._is_active(request), context)

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricSpecResponse:
        return await self._unary("GetMetricSpec", lambda: self._get_metric_spec(request), context)

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricsResponse:
        return await self._unary("GetMetrics", lambda: self._get_metrics(request), context)

    async def StreamIsActive(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> None:
        rpc = "StreamIsActive"
        code = grpc.StatusCode.OK
        self._metrics.streams_open.inc()
        try:
            try:
                await self._stream_is_active(request, context)
            except ScalerError as e:
                code = e.code
                await context.abort(e.code, e.message)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("KEDA scaler %s failed", rpc)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, f"internal error in {rpc}; see the controller's log")
        finally:
            self._metrics.streams_open.dec()
            self._metrics.finished(rpc, code)

    async def _stream_is_active(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> None:
        meta = TriggerMetadata.parse(request.scalerMetadata)
        published = self._store.current()
        while published is None:  # versions start at 1: wait for the first plan rather than fail
            if self._store.closed:
                return
            published = await self._store.wait_for_change(0)
        sent: bool | None = None
        while True:
            if published.stale:
                self._metrics.stale_answer("StreamIsActive")
            active = self._pool_plan(published, meta.pool).active()
            if active != sent:
                await context.write(pb.IsActiveResponse(result=active))
                self._metrics.stream_messages.inc()
                sent = active
            changed = await self._store.wait_for_change(published.version)
            if changed is not None:
                published = changed
            elif self._store.closed:  # the controller is stopping
                return


async def start_scaler(
    store: PlanStore,
    address: str,
    tls: ScalerTLS | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the scaler on ``address`` (``host:port``; port 0 picks a free one) on the running loop.

    Returns the started server and the bound port; stop it with ``await server.stop(grace)``.
    Metrics go to ``registry`` (the controller's); without one they are kept in a private registry.
    Must be called on the loop that publishes into ``store`` (its change event is loop-bound).
    Raises :class:`OSError` when the address cannot be bound.
    """
    metrics = ScalerMetrics(registry if registry is not None else CollectorRegistry())
    # so_reuseport off: a second server on a busy port must fail, not silently share it
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalScalerServicer_to_server(ExternalScalerService(store, metrics), server)
    try:
        port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind the KEDA scaler to {address}: {e}") from e
    if port == 0:
        raise OSError(f"cannot bind the KEDA scaler to {address}")
    await server.start()
    scheme = "grpcs (mTLS)" if tls and tls.mutual else "grpcs" if tls else "grpc"
    log.info("KEDA external scaler listening on %s, port %d (%s)", address, port, scheme)
    return server, port


__all__ = [
    "KEDA_AUTH_PARAMS",
    "KEDA_METADATA_KEYS",
    "METRIC_NAME_PREFIX",
    "ExternalScalerService",
    "ScalerError",
    "ScalerTLS",
    "TriggerMetadata",
    "metric_name",
    "start_scaler",
]
