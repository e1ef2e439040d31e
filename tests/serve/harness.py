"""Run the real scaler on 127.0.0.1:0 inside ``asyncio.run`` (pytest-asyncio is not used), with bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry

from tokenscaler.control.store import PlanStore
from tokenscaler.serve._proto import externalscaler_pb2_grpc as pb_grpc
from tokenscaler.serve.scaler import ScalerTLS, start_scaler

T = TypeVar("T")

TEST_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 5.0


def run(
    coro: Coroutine[Any, Any, T],
    timeout: float = TEST_TIMEOUT_S,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> T:
    """Run one async scenario to completion; fail instead of hanging after ``timeout`` seconds."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


@dataclass
class Scaler:
    store: PlanStore
    registry: CollectorRegistry
    port: int
    stub: pb_grpc.ExternalScalerStub
    target: str


@contextlib.asynccontextmanager
async def scaler(
    store: PlanStore | None = None,
    *,
    tls: ScalerTLS | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> AsyncIterator[Scaler]:
    """A started scaler and a client channel to it (plaintext, or TLS with ``channel_credentials``)."""
    store = store or PlanStore()
    registry = CollectorRegistry()
    server, port = await start_scaler(store, "127.0.0.1:0", tls, registry=registry)
    target = f"localhost:{port}" if tls else f"127.0.0.1:{port}"
    try:
        if channel_credentials is not None:
            channel = grpc.aio.secure_channel(target, channel_credentials)
        else:
            channel = grpc.aio.insecure_channel(target)
        async with channel:
            yield Scaler(store, registry, port, pb_grpc.ExternalScalerStub(channel), target)
    finally:
        await server.stop(None)


async def wait_for(condition: Any, timeout: float = CALL_TIMEOUT_S, message: str = "condition") -> None:
    """Poll a cheap synchronous ``condition`` on the loop's clock until true; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        await asyncio.sleep(0.01)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --------------------------------------------------------------------------- throwaway PKI (openssl CLI)


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    other_ca: bytes  # a CA that signed nothing here
    stranger_cert: bytes  # a client certificate signed by other_ca
    stranger_key: bytes


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN=tokenscaler test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "1", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=d,
    )  # fmt: skip


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a stranger's."""
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth")
    _leaf(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth")

    def read(name: str) -> bytes:
        return (d / name).read_bytes()

    return Pki(
        ca=read("ca.pem"),
        server_cert=read("server.pem"),
        server_key=read("server.key"),
        client_cert=read("client.pem"),
        client_key=read("client.key"),
        other_ca=read("other-ca.pem"),
        stranger_cert=read("stranger.pem"),
        stranger_key=read("stranger.key"),
    )
