"""The demo's fleet on 127.0.0.1: the controller, simulator-plus-sidecar replicas, optionally Prometheus,
and the replica manager that plays KEDA and the HPA.

Every port is chosen by the kernel (``--port 0``, ``--listen 127.0.0.1:0``, ``--metrics-port 0``,
``--grpc-listen 127.0.0.1:0``) and read back from the line each role prints; Prometheus cannot
report its port, so it gets a free one (and another on a clash). The controller scrapes the
replicas itself (``--scrape-config``, a file the fleet rewrites as replicas come and go: the
controller re-reads it when it changes) or reads a real Prometheus the fleet configures with
file-based service discovery (also rewritten). :class:`ReplicaManager` is KEDA plus the HPA: every
``pollingInterval`` of ``keda/scaledobject.yaml`` it calls the controller's external scaler through
the generated stubs (``GetMetricSpec`` then ``GetMetrics``, with the trigger metadata KEDA sends),
applies the HPA arithmetic of :mod:`tokenscaler.experiments.replicas`, and starts or retires
replicas; a new simulator answers 503 for the profile's ``startup_s`` (``--startup-s``) and takes
traffic once ``/health`` through its sidecar answers 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tokenscaler.core.metric_names import TIER_INVERSIONS_TOTAL
from tokenscaler.demo.procs import LISTEN_RE, Child, ChildFailed, Supervisor
from tokenscaler.experiments.replicas import Hpa, HpaRules
from tokenscaler.serve._proto import externalscaler_pb2 as pb
from tokenscaler.serve._proto import externalscaler_pb2_grpc as pb_grpc

METRICS_RE = re.compile(r"metrics on http://[^\s]+:(\d+)")
SCALER_RE = re.compile(r"scaler on grpc://[^\s]+:(\d+)")
START_TIMEOUT_S = 30.0


@dataclass(eq=False)
class Replica:
    id: str
    sim: Child
    sidecar: Child
    url: str  # the sidecar (what clients call)
    engine_metrics: str
    sidecar_metrics: str
    started_at: float
    state: str = "starting"  # starting | ready | draining | gone
    ready_at: float | None = None
    inflight: int = 0  # requests the load generator has open on it
    # its sidecar's tokenscaler_sidecar_tier_inversions_total, "higher>lower" -> count, as last read
    inversions: dict[str, int] = field(default_factory=dict)


@dataclass
class FleetSettings:
    pool: str
    config_path: Path
    profile: str
    startup_s: float
    interval_s: float
    prometheus: bool
    seed: int = 0


@dataclass
class Fleet:
    """The processes of one demo run and the files that wire them."""

    sup: Supervisor
    settings: FleetSettings
    workdir: Path
    replicas: list[Replica] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # replicas whose processes died
    controller: Child | None = None
    controller_url: str = ""
    scaler_address: str = ""
    prometheus: Child | None = None
    prometheus_url: str = ""
    _next_id: int = 0
    _session: aiohttp.ClientSession | None = None

    # ---- wiring files ------------------------------------------------------------------

    @property
    def scrape_path(self) -> Path:
        return self.workdir / "scrape.yaml"

    def _atomic_write(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    def write_targets(self) -> None:
        """The scrape targets: every replica that is ready (a pod in the Service's endpoints)."""
        live = [r for r in self.replicas if r.state in ("ready", "draining")]
        if self.settings.prometheus:
            labels = {"pool": self.settings.pool}
            for name, urls in (
                ("engines", [r.engine_metrics for r in live]),
                ("sidecars", [r.sidecar_metrics for r in live]),
            ):
                targets = [u.removeprefix("http://").removesuffix("/metrics") for u in urls]
                doc_sd = json.dumps([{"targets": targets, "labels": labels}])
                self._atomic_write(self.workdir / f"targets-{name}.json", doc_sd)
        doc = {
            "pools": {
                self.settings.pool: {
                    "engines": [r.engine_metrics for r in live],
                    "sidecars": [r.sidecar_metrics for r in live],
                }
            },
            "timeout_s": 1.0,
        }
        self._atomic_write(self.scrape_path, yaml.safe_dump(doc, sort_keys=False))

    # ---- processes ---------------------------------------------------------------------

    async def start_prometheus(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise ChildFailed("--prometheus on: no `prometheus` on PATH (Debian's prometheus package)")
        pdir = self.workdir / "prometheus"
        pdir.mkdir(parents=True, exist_ok=True)
        def sd(name: str) -> list[dict[str, Any]]:
            return [{"files": [str((self.workdir / f"targets-{name}.json").resolve())], "refresh_interval": "1s"}]

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "vllm",
                    "file_sd_configs": sd("engines"),
                },
                {
                    "job_name": "sidecars",
                    "honor_labels": True,
                    "file_sd_configs": sd("sidecars"),
                },
                # the name the dashboards and alerts expect (observe/): written once the controller listens
                {"job_name": "tokenscaler-controller", "file_sd_configs": sd("controller")},
            ],
        }
        self._atomic_write(self.workdir / "targets-controller.json", "[]")
        (pdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        last: Exception | None = None
        for attempt in range(3):
            port = _free_port()
            child = self.sup.start(
                "prometheus" if attempt == 0 else f"prometheus-{attempt}",
                [
                    binary,
                    f"--config.file={pdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={pdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
            )
            url = f"http://127.0.0.1:{port}"
            try:
                await self._wait_http(f"{url}/-/ready", child, START_TIMEOUT_S)
            except ChildFailed as e:
                last = e
                await self.sup.stop_async(child)
                continue
            self.prometheus, self.prometheus_url = child, url
            return
        raise ChildFailed(f"prometheus did not start: {last}")

    async def start_controller(self) -> None:
        s = self.settings
        args = [
            "controller", "--config", str(s.config_path),
            "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
            "--interval-s", f"{s.interval_s:g}", "--log-level", "WARNING",
        ]  # fmt: skip
        if s.prometheus:
            args += ["--prometheus-url", self.prometheus_url, "--rate-window-s", "5", "--profile-refresh-s", "2"]
        else:
            args += ["--scrape-config", str(self.scrape_path)]
        child = self.sup.role("controller", args)
        m = await child.wait_for(LISTEN_RE, START_TIMEOUT_S)
        self.controller_url = f"http://127.0.0.1:{m['port']}"
        if self.settings.prometheus:
            target = [{"targets": [f"127.0.0.1:{m['port']}"], "labels": {}}]
            self._atomic_write(self.workdir / "targets-controller.json", json.dumps(target))
        g = await child.wait_for(SCALER_RE, START_TIMEOUT_S)
        self.scaler_address = f"127.0.0.1:{g.group(1)}"
        self.controller = child

    async def add_replica(self, replicas_hint: int) -> Replica:
        """Start one simulator and its sidecar; ready later (see :meth:`poll_ready`)."""
        s = self.settings
        rid = f"r{self._next_id}"
        self._next_id += 1
        sim = self.sup.role(
            f"sim-{rid}",
            ["sim", "--host", "127.0.0.1", "--port", "0", "--profile", s.profile,
             "--seed", str(s.seed * 1000 + self._next_id), "--startup-s", f"{s.startup_s:g}"],
        )  # fmt: skip
        try:
            m = await sim.wait_for(LISTEN_RE, START_TIMEOUT_S)
        except ChildFailed:
            await self.sup.stop_async(sim)
            raise
        sim_url = f"http://127.0.0.1:{m['port']}"
        sidecar = self.sup.role(
            f"sidecar-{rid}",
            ["sidecar", "--listen", "127.0.0.1:0", "--upstream", sim_url, "--config", str(s.config_path),
             "--pool", s.pool, "--metrics-port", "0", "--replicas", str(max(replicas_hint, 1)), "--replica-id", rid,
             "--limits-url", self.controller_url, "--limits-poll-s", "1", "--limits-expiry-s", "30",
             "--interval-s", f"{s.interval_s:g}",
             "--log-level", "WARNING"],
        )  # fmt: skip
        try:
            lm = await sidecar.wait_for(LISTEN_RE, START_TIMEOUT_S)
            mm = await sidecar.wait_for(METRICS_RE, START_TIMEOUT_S)
        except ChildFailed:
            await self.sup.stop_async(sidecar, sim)
            raise
        r = Replica(
            rid, sim, sidecar, f"http://127.0.0.1:{lm['port']}", f"{sim_url}/metrics",
            f"http://127.0.0.1:{mm.group(1)}/metrics", time.monotonic(),
        )  # fmt: skip
        self.replicas.append(r)
        return r

    async def reap_dead(self, now: float) -> list[Replica]:
        """Ready replicas whose simulator or sidecar exited: out of the endpoints (as a crashed pod
        leaves a Service), the surviving half stopped, the exit codes kept for the report."""
        dead = [r for r in self.replicas if r.state in ("ready", "draining") and not (r.sim.alive and r.sidecar.alive)]
        for r in dead:
            r.state = "gone"
            self.failures.append(
                {"t": round(now, 2), "replica": r.id, "sim_exit": r.sim.popen.poll(),
                 "sidecar_exit": r.sidecar.popen.poll(), "logs": [str(r.sim.log_path), str(r.sidecar.log_path)]}
            )  # fmt: skip
        if dead:
            self.write_targets()
            await self.sup.stop_async(*[c for r in dead for c in (r.sidecar, r.sim)])
        return dead

    async def poll_ready(self) -> list[Replica]:
        """Mark starting replicas whose ``/health`` (through the sidecar) answers 200 as ready."""
        became = []
        for r in [r for r in self.replicas if r.state == "starting"]:
            if not (r.sim.alive and r.sidecar.alive):
                raise ChildFailed(f"replica {r.id} died while starting (logs: {r.sim.log_path}, {r.sidecar.log_path})")
            try:
                async with self.session.get(f"{r.url}/health", timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    ok = resp.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                r.state, r.ready_at = "ready", time.monotonic()
                became.append(r)
        if became:
            self.write_targets()
        return became

    async def retire(self, r: Replica, drain_s: float = 10.0) -> None:
        """Take ``r`` out of the endpoints, let its open requests finish (bounded), stop it."""
        r.state = "draining"
        deadline = time.monotonic() + drain_s
        while r.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        r.state = "gone"
        self.write_targets()
        await self.sup.stop_async(r.sidecar, r.sim)

    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "ready"]

    async def read_inversions(self) -> None:
        """Read every serving sidecar's tier-inversion counters (kept per replica, so a replica that
        is retired later still counts with what it last said)."""
        for r in [r for r in self.replicas if r.state in ("ready", "draining")]:
            try:
                async with self.session.get(r.sidecar_metrics, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    text = await resp.text()
            except (TimeoutError, aiohttp.ClientError):
                continue
            for family in text_string_to_metric_families(text):
                if family.name == TIER_INVERSIONS_TOTAL.removesuffix("_total"):
                    for sample in family.samples:
                        if sample.name == TIER_INVERSIONS_TOTAL:
                            key = f"{sample.labels['higher']}>{sample.labels['lower']}"
                            r.inversions[key] = int(sample.value)

    def inversions(self) -> dict[str, int]:
        """Tier inversions over every replica the run had, by ``higher>lower``."""
        out: dict[str, int] = {}
        for r in self.replicas:
            for key, n in r.inversions.items():
                out[key] = out.get(key, 0) + n
        return dict(sorted(out.items()))

    def count(self, *states: str) -> int:
        return sum(1 for r in self.replicas if r.state in states)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def plan(self) -> dict[str, Any] | None:
        """The controller's ``/v1/plan`` (None before the first plan or on an error)."""
        try:
            async with self.session.get(f"{self.controller_url}/v1/plan", timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status != 200:
                    return None
                return await r.json()
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def _wait_http(self, url: str, child: Child, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not child.alive:
                raise ChildFailed(f"{child.name} exited with {child.popen.returncode} (log: {child.log_path})")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            if time.monotonic() >= deadline:
                raise ChildFailed(f"{child.name}: {url} not ready within {timeout_s:g}s (log: {child.log_path})")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- KEDA and the HPA --------------------------------------------------------------------


@dataclass
class ScaleDecision:
    at: float
    metric: float | None
    target: float | None
    desired: int
    error: str | None = None


class ReplicaManager:
    """KEDA's external-scaler calls and the HPA's arithmetic, moving the fleet (module docstring)."""

    def __init__(
        self,
        fleet: Fleet,
        rules: HpaRules,
        min_replicas: int,
        max_replicas: int,
        clock: Callable[[], float],
    ) -> None:
        self.fleet = fleet
        self.rules = rules
        self.hpa = Hpa(rules, min_replicas, max_replicas)
        self.clock = clock
        self.desired = min_replicas
        self.decisions: list[ScaleDecision] = []
        self._channel = grpc.aio.insecure_channel(fleet.scaler_address)
        self._stub = pb_grpc.ExternalScalerStub(self._channel)
        self._ref = pb.ScaledObjectRef(
            name=fleet.settings.pool,
            namespace="demo",
            scalerMetadata={"scalerAddress": fleet.scaler_address, "pool": fleet.settings.pool},
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def poll(self) -> ScaleDecision:
        """One HPA sync: the trigger's metric through the scaler, the HPA's answer, the fleet moved."""
        now = self.clock()
        current = self.fleet.count("starting", "ready")
        try:
            specs = await self._stub.GetMetricSpec(self._ref, timeout=2.0)
            spec = specs.metricSpecs[0]
            target = spec.targetSizeFloat if spec.targetSizeFloat > 0 else float(spec.targetSize)
            req = pb.GetMetricsRequest(scaledObjectRef=self._ref, metricName=spec.metricName)
            values = await self._stub.GetMetrics(req, timeout=2.0)
            metric = sum(v.metricValueFloat or float(v.metricValue) for v in values.metricValues)
        except (grpc.aio.AioRpcError, IndexError) as e:
            # no plan yet (UNAVAILABLE) or the controller is gone: KEDA keeps the replicas
            msg = e.details() if isinstance(e, grpc.aio.AioRpcError) else "no metric spec"
            d = ScaleDecision(now, None, None, current, error=str(msg))
            self.decisions.append(d)
            return d
        self.desired = self.hpa.desired(now, max(current, 1), metric, target)
        d = ScaleDecision(now, metric, target, self.desired)
        self.decisions.append(d)
        await self.reconcile()
        return d

    async def reconcile(self) -> None:
        """Start replicas up to the desired count, retire the newest beyond it (the Deployment)."""
        fleet = self.fleet
        current = fleet.count("starting", "ready")
        for _ in range(self.desired - current):
            await fleet.add_replica(self.desired)
        if current > self.desired:
            # a ReplicaSet removes starting pods first, then the newest ready ones
            live = [r for r in fleet.replicas if r.state in ("starting", "ready")]
            live.sort(key=lambda r: (r.state != "starting", -r.started_at))
            for r in live[: current - self.desired]:
                task = asyncio.create_task(fleet.retire(r), name=f"retire-{r.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for t in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 15.0)
        await self._channel.close()
