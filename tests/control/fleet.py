"""A whole fleet on loopback: simulators, sidecars polling the controller, the controller,
and (optionally) a real Prometheus scraping all of them. Real processes, every one.

Every process binds port 0 and reports the port it got. The controller must know the
sidecars' metrics ports (or Prometheus's URL) when it starts, and the sidecars (and
Prometheus) the controller's address when they start; that cycle is broken as a cluster
breaks it, by a stable address in front of the controller (:class:`tests.support.Relay`,
standing in for its Kubernetes Service), bound first and pointed at the controller once
it is listening, and again at a restarted one."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import yaml

from tests.control.harness import KEYS, POOL, KedaClient, get_json
from tests.prometheus import PrometheusServer, static_job
from tests.support import Relay, Server, wait_until

METRICS_RE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)")
MODEL = "tokenscaler/demo"


@dataclass
class Fleet:
    controller: Server
    sims: list[Server]
    sidecars: list[Server]
    sidecar_metrics_ports: list[int]
    keda: KedaClient
    relay: Relay  # the controller's stable address, as the sidecars and Prometheus see it
    prometheus: PrometheusServer | None = None
    extra: dict = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.controller.url

    def serve(self, controller: Server) -> None:
        """Point the controller's stable address at ``controller`` (e.g. a restarted one)."""
        self.relay.target = (controller.host, controller.port)

    def plan(self) -> dict:
        return get_json(f"{self.api}/v1/plan")

    def limits(self, replica: str) -> dict:
        return get_json(f"{self.api}/v1/pools/{POOL}/limits?replica={replica}")


def start_controller(
    config: Path,
    http_port: int = 0,
    *,
    prometheus: PrometheusServer | None,
    scrape_config: Path | None,
    state: Path | None = None,
    interval_s: float = 1.0,
    extra: list[str] | None = None,
) -> tuple[Server, int]:
    args = [
        "controller",
        "--config",
        str(config),
        "--interval-s",
        str(interval_s),
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--demand-half-life-s",
        "2",
        "--rate-window-s",
        "5",
        "--profile-refresh-s",
        "1",
    ]
    args += ["--prometheus-url", prometheus.url] if prometheus else ["--scrape-config", str(scrape_config)]
    if state is not None:
        args += ["--state", str(state)]
    ctl = Server(args + (extra or []))
    grpc_port = int(ctl.wait_for_line(r"scaler on grpc://[^:]+:(\d+)").group(1))
    return ctl, grpc_port


@contextlib.contextmanager
def fleet(
    tmp: Path, config: Path, *, replicas: int = 2, use_prometheus: bool, state: Path | None = None,
    sidecar_configs: list[Path | None] | None = None,
) -> Iterator[Fleet]:
    """``sidecar_configs``: each sidecar's own --config (None: none, it waits for the
    controller's document); default: the controller's config file."""
    stack = contextlib.ExitStack()
    with stack:
        relay = Relay()
        stack.callback(relay.close)
        sims, sidecars, metric_ports = [], [], []
        late: list[tuple[int, threading.Thread, list[Server]]] = []  # sidecars that wait for the controller
        for i in range(replicas):
            sim = stack.enter_context(_server(["sim", "--port", "0", "--profile", "demo", "--seed", str(i)]))
            sims.append(sim)
            own = config if sidecar_configs is None else sidecar_configs[i]
            metrics_port = 0 if own is not None else _free_port()
            args = [
                "sidecar", "--listen", "127.0.0.1:0", "--upstream", sim.url,
                *(["--config", str(own)] if own is not None else []),
                "--pool", POOL, "--metrics-port", str(metrics_port), "--replicas", str(replicas),
                "--replica-id", f"r{i}", "--limits-url", relay.url, "--limits-expiry-s", "30",
            ]  # fmt: skip
            if own is None:  # it serves once the controller's first document came: started now, waited on later
                box: list[Server] = []
                thread = threading.Thread(target=lambda a=args, b=box: b.append(Server(a, timeout=60)), daemon=True)
                thread.start()
                late.append((i, thread, box))
                sidecars.append(None)  # type: ignore[arg-type]
                metric_ports.append(metrics_port)
                continue
            sc = stack.enter_context(_server(args))
            sidecars.append(sc)
            metric_ports.append(int(sc.wait_for_line(METRICS_RE, timeout=10).group(1)))
        prometheus = None
        scrape = None
        if use_prometheus:
            prometheus = PrometheusServer(
                tmp / "prometheus",
                [
                    static_job("vllm", [f"127.0.0.1:{s.port}" for s in sims], {"pool": POOL}),
                    static_job("sidecars", [f"127.0.0.1:{p}" for p in metric_ports], {"pool": POOL}, honor_labels=True),
                    static_job("controller", [f"127.0.0.1:{relay.port}"]),
                ],
                scrape_interval="1s",
            )
            stack.callback(prometheus.stop)
        else:
            scrape = tmp / "scrape.yaml"
            scrape.write_text(
                yaml.safe_dump(
                    {
                        "pools": {
                            POOL: {
                                "engines": [f"{s.url}/metrics" for s in sims],
                                "sidecars": [f"http://127.0.0.1:{p}/metrics" for p in metric_ports],
                            }
                        },
                        "timeout_s": 1,
                    }
                )
            )
        ctl, grpc_port = start_controller(config, prometheus=prometheus, scrape_config=scrape, state=state)
        stack.callback(ctl.stop)
        relay.target = (ctl.host, ctl.port)
        for i, thread, box in late:
            thread.join(timeout=90)
            assert box, f"sidecar r{i} (no --config) never served"
            sidecars[i] = box[0]
            stack.callback(box[0].stop)
        keda = KedaClient(f"127.0.0.1:{grpc_port}")
        stack.callback(keda.close)
        yield Fleet(ctl, sims, sidecars, metric_ports, keda, relay, prometheus)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(args: list[str]) -> Iterator[Server]:
    s = Server(args)
    try:
        yield s
    finally:
        s.stop()


class Load:
    """Bounded streaming load from one entitlement, spread round-robin over the sidecars,
    by ``concurrency`` threads until ``stop()`` or ``max_requests`` requests each."""

    def __init__(
        self,
        fl: Fleet,
        entitlement: str,
        concurrency: int,
        max_tokens: int = 48,
        max_requests: int = 200,
        sidecars: list[int] | None = None,  # only through these replicas (default: all)
    ):
        self.fl = fl
        self.sidecars = [fl.sidecars[i] for i in sidecars] if sidecars is not None else fl.sidecars
        self.entitlement = entitlement
        self.done = threading.Event()
        self.ok = 0
        self.rejected = 0
        self.errors = 0
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i, max_tokens, max_requests), daemon=True)
            for i in range(concurrency)
        ]
        for t in self.threads:
            t.start()

    def _run(self, i: int, max_tokens: int, max_requests: int) -> None:
        clients = [
            openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEYS[self.entitlement], max_retries=0, timeout=30)
            for s in self.sidecars
        ]
        deadline = time.monotonic() + 120  # a bound, whatever happens
        for n in range(max_requests):
            if self.done.is_set() or time.monotonic() > deadline:
                break
            client = clients[(i + n) % len(clients)]
            try:
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"load {i}-{n} " + "x" * 100}],
                    max_tokens=max_tokens,
                    stream=True,
                )
                with stream:  # closing it on stop() disconnects at once: the engine aborts the request
                    for _ in stream:
                        if self.done.is_set():
                            break
                with self._lock:
                    self.ok += 1
            except openai.RateLimitError:
                with self._lock:
                    self.rejected += 1
                self.done.wait(0.05)  # a rejected client backs off briefly, as a real one would
            except openai.APIError:
                with self._lock:
                    self.errors += 1
                self.done.wait(0.05)

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(timeout=40)


def wait_plan(fl: Fleet, predicate, timeout: float = 40.0, message: str = "plan condition") -> dict:
    return wait_until(lambda: (p := fl.plan()) and predicate(p) and p, timeout=timeout, interval=0.3, message=message)
