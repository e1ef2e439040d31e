"""Builders and process helpers for the sidecar tests: configs, a sidecar in front of a
simulator, its ``/metrics`` parsed by prometheus-client, and a stand-in for the
controller's limits API."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Server, hold_port, running
from tokenscaler.core.limits import LimitsDocument
from tokenscaler.core.model import hash_api_key

POOL = "demo"
MODEL = "tokenscaler/demo"
METRICS_RE = re.compile(r"tokenscaler sidecar metrics on (http://\S+)")


def key_of(name: str) -> str:
    return f"sk-test-{name}"


def vec(t: float | None = None, kv: float | None = None, c: float | None = None) -> dict[str, float | None]:
    return {"throughput_tokens_per_s": t, "kv_tokens": kv, "concurrency": c}


def ent(name: str, tier: str, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "pool": POOL, "tier": tier, "api_keys": [hash_api_key(key_of(name))]}
    d.update(kw)
    return d


def write_config(
    path: Path, entitlements: Sequence[dict[str, Any]], replica: dict[str, float] | None = None, **pool: Any
) -> Path:
    """A config with one pool ``demo`` whose replica matches the demo simulator profile."""
    p: dict[str, Any] = {
        "name": POOL,
        "replica": replica or {"throughput_tokens_per_s": 430.0, "kv_tokens": 6144.0, "concurrency": 16.0},
        "max_replicas": 4,
        "max_model_len": 2048,
        "default_max_tokens": 64,
        "typical_request": {"prompt_tokens": 16, "output_tokens": 16},
    }
    p.update(pool)
    path.write_text(yaml.safe_dump({"pools": [p], "entitlements": list(entitlements)}))
    return path


class Sidecar:
    """A running ``tokenscaler sidecar`` and its metrics endpoint."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = server.url
        self.metrics_url = server.wait_for_line(METRICS_RE, timeout=10)[1]

    def scrape(self) -> dict[str, Any]:
        text = requests.get(self.metrics_url + "/metrics", timeout=5).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """Sum of the samples named ``sample`` whose labels include ``labels``."""
        families = self.scrape()
        total = 0.0
        found = False
        for family in families.values():
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
                    found = True
        assert found, f"no sample {sample}{labels}"
        return total

    def idle(self) -> bool:
        """No request in flight and no KV reserved, for every entitlement."""
        return (
            self.value("tokenscaler_sidecar_inflight_requests") == 0
            and self.value("tokenscaler_sidecar_reserved_kv_tokens") == 0
        )


@contextlib.contextmanager
def sidecar(upstream: str, config: Path, *extra: str) -> Iterator[Sidecar]:
    args = [
        "sidecar", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--upstream", upstream,
        "--config", str(config), "--pool", POOL, "--replica-id", "r0", *extra,
    ]  # fmt: skip
    with running(args) as server:
        yield Sidecar(server)


def post(url: str, path: str, body: Any, key: str | None, **kw: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + path, json=body, headers=headers, timeout=30, **kw)


def chat(content: str = "hello", max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **kw}


@contextlib.contextmanager
def app_server(app: web.Application) -> Iterator[int]:
    """``app`` served on 127.0.0.1 from a thread with its own loop (a small real upstream beside a
    sidecar process); yields the port the kernel picked."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield runner.addresses[0][1]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


class LimitsServer:
    """A stand-in for the controller's limits API, in a thread with its own loop.

    Its address (``port``, ``url``) is fixed at construction, before it first listens, and
    stays its own while it is stopped (connections refused) and started again: a
    placeholder socket holds the port (SO_REUSEPORT lets each start's listener bind beside it).
    """

    def __init__(self, doc: LimitsDocument) -> None:
        self._hold = hold_port(reuse_port=True)
        self.port: int = self._hold.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.doc = doc
        self.requests = 0
        self.not_modified = 0
        self.replicas: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.replicas.add(request.query.get("replica", ""))
        etag = f'"{self.doc.version}"'
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=self.doc.model_dump_json(), content_type="application/json", headers={"ETag": etag})

    def start(self) -> None:
        async def go() -> None:
            app = web.Application()
            app.router.add_get(f"/v1/pools/{POOL}/limits", self._handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            sock = hold_port(self.port, reuse_port=True)
            sock.listen(128)
            sock.setblocking(False)
            await web.SockSite(self.runner, sock).start()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
            self.runner = None

    def close(self) -> None:
        try:
            self.stop()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        finally:
            self._hold.close()
