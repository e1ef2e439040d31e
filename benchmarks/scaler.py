"""GetMetrics latency of the KEDA external scaler under 100 concurrent callers, on loopback.

    .venv/bin/python benchmarks/scaler.py [--callers 100] [--calls 100] [--channels 4]
                                          [--rates 100,1000] [--seconds 8] [--loop uvloop|asyncio]
                                          [--client-loop uvloop|asyncio]

The scaler runs in its own process, on uvloop as in ``tokenscaler controller`` (``--loop``),
serving a real plan of examples/tokenpools.yaml from a PlanStore. Beside it, in the same process,
a *floor* server answers GetMetrics with a prebuilt constant message: the same grpc.aio stack with
no work of ours, so ``scaler / floor`` is what our handler costs. This process is the client:
asyncio tasks (on uvloop too, ``--client-loop``) as callers over a few grpc.aio channels, each
call timed with ``perf_counter``;
``srv us/call`` is the server process's CPU time per call (Linux /proc).

Rows, all in the same run:
- ``handler only``: our per-call work (metadata parse, store read, response build, metrics) in-process;
- ``1 caller``: back to back, so the round trip with no queueing;
- ``N callers, closed loop``: each caller calls again at once: the throughput ceiling. Its latency
  is queueing (Little's law: about N / throughput), whatever the handler does;
- ``N callers, paced``: each caller waits an exponential time between calls so all together offer
  each of ``--rates`` calls/s for ``--seconds``, 100/s is a large cluster's KEDA load (KEDA sends
  GetMetricSpec + GetMetrics + IsActive per ScaledObject about every 15 s from the HPA and every
  pollingInterval from its own loop: ~250 ScaledObjects), 1000/s ten times that. These are the rows
  the p99 <= 5 ms goal is read from.

The client is Python too and shares the machine, so absolute numbers are pessimistic for KEDA's Go
client; the ratios to the floor are the part that is ours.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from tokenscaler.config import load_config  # noqa: E402
from tokenscaler.control.store import PlanStore  # noqa: E402
from tokenscaler.core.inputs import PoolInput  # noqa: E402
from tokenscaler.core.plan import Plan  # noqa: E402
from tokenscaler.core.planning import plan_interval  # noqa: E402
from tokenscaler.core.rows import build_pool_rows  # noqa: E402
from tokenscaler.core.state import PlannerState  # noqa: E402
from tokenscaler.serve._proto import externalscaler_pb2 as pb  # noqa: E402
from tokenscaler.serve._proto import externalscaler_pb2_grpc as pb_grpc  # noqa: E402

POOL = "llama-8b"
METADATA = {"scalerAddress": "tokenscaler-controller.tokenscaler.svc:9090", "pool": POOL}
GOAL_P99_MS = 5.0
T = TypeVar("T")


def example_plan() -> Plan:
    config = load_config(REPO / "examples" / "tokenpools.yaml")
    rows = build_pool_rows(config)
    r = rows[POOL]
    demand = np.zeros((r.n, 3))
    demand[r.index["research"]] = [20000.0, 300000.0, 100.0]
    demand[r.index["batch-eval"]] = [9000.0, 100000.0, 50.0]
    plan, _ = plan_interval(rows, {POOL: PoolInput(2, demand)}, PlannerState(), now=time.time(), interval_s=10.0)
    return plan


# --------------------------------------------------------------------------- server process


class ConstantScaler(pb_grpc.ExternalScalerServicer):
    """The gRPC floor: a prebuilt answer, no metadata parsing, no store, no metrics."""

    def __init__(self, desired: int) -> None:
        value = pb.MetricValue(metricName=f"tokenscaler-{POOL}", metricValue=desired, metricValueFloat=float(desired))
        self._metrics = pb.GetMetricsResponse(metricValues=[value])

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext) -> Any:
        return self._metrics


async def serve() -> None:
    from tokenscaler.serve.scaler import start_scaler

    plan = example_plan()
    store = PlanStore()
    store.publish(plan, published_at=time.time())
    server, port = await start_scaler(store, "127.0.0.1:0", None)
    floor = grpc.aio.server()
    pb_grpc.add_ExternalScalerServicer_to_server(ConstantScaler(plan.pools[POOL].desired_replicas), floor)
    floor_port = floor.add_insecure_port("127.0.0.1:0")
    await floor.start()
    print(f"ports {port} {floor_port} loop {type(asyncio.get_running_loop()).__module__}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.stop(None)
    await floor.stop(None)


# --------------------------------------------------------------------------- client


def handler_only(n: int) -> list[float]:
    from prometheus_client import CollectorRegistry

    from tokenscaler.serve.scaler import ExternalScalerService
    from tokenscaler.serve.scaler_metrics import ScalerMetrics

    store = PlanStore()
    store.publish(example_plan(), published_at=time.time())
    metrics = ScalerMetrics(CollectorRegistry())
    service = ExternalScalerService(store, metrics)
    request = pb.GetMetricsRequest(scaledObjectRef=pb.ScaledObjectRef(scalerMetadata=METADATA))
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        service._get_metrics(request)
        metrics.finished("GetMetrics", grpc.StatusCode.OK, t0)
        out.append(time.perf_counter() - t0)
    return out


async def drive(
    target: str, callers: int, channels: int, *, calls: int = 0, rate: float = 0.0, seconds: float = 0.0
) -> tuple[list[float], float]:
    """GetMetrics latencies of ``callers`` concurrent tasks, and the elapsed time.

    Closed loop (``rate`` 0): each caller makes ``calls`` calls back to back. Paced: each caller
    sleeps an exponential time between calls so all together offer ``rate`` calls/s, for ``seconds``.
    """
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [pb_grpc.ExternalScalerStub(c) for c in chans]
    ref = pb.ScaledObjectRef(name="llama-8b", namespace="inference", scalerMetadata=METADATA)
    request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=f"tokenscaler-{POOL}")
    latencies: list[float] = []
    loop = asyncio.get_running_loop()

    async def caller(i: int, start: float) -> None:
        call = stubs[i % len(stubs)].GetMetrics
        rng = random.Random(i)
        if rate:
            deadline = start + seconds
            await asyncio.sleep(rng.expovariate(rate / callers))
            while loop.time() < deadline:
                t0 = time.perf_counter()
                await call(request, timeout=10)
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(rng.expovariate(rate / callers))
        else:
            for _ in range(calls):
                t0 = time.perf_counter()
                await call(request, timeout=10)
                latencies.append(time.perf_counter() - t0)

    for c in chans:
        await c.channel_ready()
    for stub in stubs:
        for _ in range(20):
            await stub.GetMetrics(request, timeout=10)
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i, loop.time()) for i in range(callers)))
    elapsed = time.perf_counter() - t0
    for c in chans:
        await c.close()
    return latencies, min(elapsed, seconds) if rate else elapsed


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loop_runner(loop: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    if loop == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def measure(name: str, pid: int, run: Coroutine[Any, Any, tuple[list[float], float]], loop: str) -> dict[str, Any]:
    cpu0 = cpu_seconds(pid)
    lat, elapsed = loop_runner(loop)(run)
    cpu1 = cpu_seconds(pid)
    server_us = (cpu1 - cpu0) / len(lat) * 1e6 if cpu0 is not None and cpu1 is not None else None
    return row(name, lat, elapsed, server_us)


def row(name: str, lat: list[float], elapsed: float | None, server_us: float | None = None) -> dict[str, Any]:
    ms = np.array(lat) * 1000.0
    return {
        "scenario": name,
        "calls": len(lat),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "calls_per_s": len(lat) / elapsed if elapsed else None,
        "server_us": server_us,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'scenario':<46} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'calls/s':>8} {'srv us/call':>11}")
    for r in rows:
        rate = f"{r['calls_per_s']:8.0f}" if r["calls_per_s"] else f"{'-':>8}"
        srv = f"{r['server_us']:11.0f}" if r["server_us"] is not None else f"{'-':>11}"
        print(
            f"{r['scenario']:<46} {r['calls']:>6} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['max_ms']:8.3f} {rate} {srv}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--calls", type=int, default=100, help="calls per caller in the closed-loop rows")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument(
        "--rates", default="100,1000", help="comma-separated total calls/s offered in the paced rows (default 100,1000)"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each paced row")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the server's event loop")
    parser.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop", help="the callers' loop")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]

    if args.serve:
        loop_runner(args.loop)(serve())
        return 0

    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--loop", args.loop],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("ports "):
            raise SystemExit(f"the scaler did not start: {line!r}")
        _, port, floor_port, _, loop_name = line.split()
        scaler, floor = f"127.0.0.1:{port}", f"127.0.0.1:{floor_port}"
        n, ch, pid, secs, cl = args.callers, args.channels, proc.pid, args.seconds, args.client_loop
        rows = [
            row("handler only (in-process, no gRPC)", handler_only(20000), None),
            measure("floor, 1 caller", pid, drive(floor, 1, 1, calls=2000), cl),
            measure("scaler, 1 caller (baseline)", pid, drive(scaler, 1, 1, calls=2000), cl),
            measure(f"floor, {n} callers, closed loop", pid, drive(floor, n, ch, calls=args.calls), cl),
            measure(f"scaler, {n} callers, closed loop", pid, drive(scaler, n, ch, calls=args.calls), cl),
        ]
        for rate in rates:
            rows.append(
                measure(f"floor, {n} callers, paced {rate:g}/s", pid, drive(floor, n, ch, rate=rate, seconds=secs), cl)
            )
            rows.append(
                measure(
                    f"scaler, {n} callers, paced {rate:g}/s", pid, drive(scaler, n, ch, rate=rate, seconds=secs), cl
                )
            )
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(
        f"KEDA scaler GetMetrics on loopback: server process on {loop_name}, "
        f"client here on {cl} ({ch} grpc.aio channels), "
        f"{os.cpu_count()} cores, python {sys.version.split()[0]}, grpcio {grpc.__version__}"
    )
    print_table(rows)
    print("ratios, scaler / floor (p50, p99):")
    for floor_row, scaler_row in zip(rows[1::2], rows[2::2], strict=True):
        p50 = scaler_row["p50_ms"] / floor_row["p50_ms"]
        p99 = scaler_row["p99_ms"] / floor_row["p99_ms"]
        print(f"  {scaler_row['scenario']:<44} {p50:5.2f}x {p99:5.2f}x")
    for paced in rows[6::2]:
        verdict = "met" if paced["p99_ms"] <= GOAL_P99_MS else "NOT met"
        print(f"goal p99 <= {GOAL_P99_MS:g} ms, {paced['scenario']}: p99 {paced['p99_ms']:.2f} ms, {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
