"""Limits at fleet scale: the real controller, N entitlements, R replicas' sidecars asking it for limits.

Run: python benchmarks/fleet.py [--cells 1000x10,1000x100,10000x100] [--versions 20] [--interval-s 5]
     [--baseline-repo PATH]

For each cell (N entitlements x R replicas) it starts a synthetic exporter (the sidecar and
engine series of R replicas, each entitlement routed to two of them, demand moving every
interval), the real ``tokenscaler controller --scrape-config`` on it, and R limits clients
in a few worker processes: real ``PoolLimitsSource`` instances (v1beta1: watch, deltas) or,
for the baseline, real ``HttpLimitsSource`` instances polling v1alpha1 every 2 s with ETags
(what every sidecar did before v1beta1). ``--baseline-repo`` runs the baseline from another
checkout (its own ``.venv``: the code before the change), cell by cell beside the new code.

Columns: the time from publish until every replica holds the version (p50 and p99 over the
versions published after the warm-up; "holds" = parsed and applied to its view, that version
or a newer one: *skipped* counts versions some replica went past straight to a newer one,
*missed* those some replica never reached before the run ended), the controller's CPU-seconds per
interval after the warm-up with the clients, minus the same controller's without them (measured
once they stopped: same exporter, same plans), each
client's own CPU per version after the warm-up (its receive, parse and apply: on this machine
every client shares the two cores with the controller, in a fleet each sidecar has its own),
bytes per replica per version, ``/healthz`` and KEDA ``GetMetrics`` p99 during the run, the
sidecar's parse and apply time of one document, and one real sidecar's RSS at N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TTL_S = 60.0  # the controller's default limits_ttl_s: published_at = expires_at - TTL_S


# --------------------------------------------------------------------------- worker: R/k limits clients


class Receiver:
    """The v1beta1 protocol's requests as a sidecar makes them (watch, ``spec``, ``since`` and
    ``instance``, packed columns), but the answer only received, not parsed into a view or applied:
    the controller's side of a fan-out to more replicas than this machine can run sidecars for
    (``--clients receive``). It reads the version, instance and spec digest from the answer."""

    def __init__(self, url: str, pool: str, replica: str) -> None:
        self.url = f"{url}/v1beta1/pools/{pool}/limits"
        self.replica = replica
        self.version: int | None = None
        self.instance = ""
        self.spec: str | None = None
        self.received_bytes = 0
        self.parse_s = self.apply_s = 0.0

    async def run(self, apply: Any) -> None:
        import aiohttp
        import orjson

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            while True:
                params = {"replica": self.replica, "columns": "packed"}
                if self.spec is not None:
                    params["spec"] = self.spec
                if self.version is not None:
                    params.update(since=str(self.version), instance=self.instance, watch="true", timeout_s="30")
                try:
                    async with session.get(self.url, params=params) as resp:
                        body = await resp.read()
                        if resp.status != 200:
                            continue
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.5)
                    continue
                self.received_bytes += len(body)
                head = orjson.loads(body)
                self.version, self.instance = head["version"], head["instance"]
                self.spec = head["spec_hash"]
                apply(SimpleNamespace(version=str(self.version)))


async def worker(
    url: str, pool: str, replicas: list[str], api: str, duration_s: float, poll_s: float, clients: str = "sidecar"
) -> None:
    """Run the limits clients of ``replicas`` for ``duration_s``; print one JSON line of what each held when."""
    from tokenscaler.core.model import TokenPoolsConfig

    held: dict[str, dict[str, float]] = {r: {} for r in replicas}  # replica -> version -> unix time held
    sources: list[Any] = []
    if clients == "receive":
        sources = [Receiver(url, pool, r) for r in replicas]
    elif api == "v1alpha1":
        import yaml

        from tokenscaler.sidecar.limits import HttpLimitsSource

        config = TokenPoolsConfig.model_validate(yaml.safe_load(Path(os.environ["FLEET_CONFIG"]).read_text()))
        for r in replicas:
            sources.append(HttpLimitsSource(config, pool, url, replica=r, replicas=len(replicas), poll_s=poll_s))
    else:
        from tokenscaler.sidecar.pool_source import PoolLimitsSource

        for r in replicas:
            sources.append(PoolLimitsSource(None, pool, url, replica=r, watch_s=30.0, poll_s=poll_s))

    def applier(r: str) -> Any:
        def apply(update: Any) -> None:
            if update.version is not None and update.version not in held[r]:
                held[r][update.version] = time.time()

        return apply

    tasks = [asyncio.create_task(s.run(applier(r))) for s, r in zip(sources, replicas, strict=True)]
    cpu = await cpu_marks(duration_s, time.process_time)  # this process's, each second
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stats = {
        "held": held,
        "bytes": sum(getattr(s, "received_bytes", 0) for s in sources),
        "parse_s": [s.parse_s for s in sources if getattr(s, "parse_s", 0)],
        "apply_s": [s.apply_s for s in sources if getattr(s, "apply_s", 0)],
        "cpu": cpu,
    }
    print(json.dumps(stats), flush=True)


# --------------------------------------------------------------------------- the driver


def fleet_config(n: int, path: Path, extra_key: str | None = None) -> None:
    """N entitlements over three tiers and four priorities (``extra_key``: one more, ``gold``,
    guaranteed, high limits, with that key digest: the sidecar benchmark's caller)."""
    import yaml

    tiers = ("guaranteed", "elastic", "spot")
    ents = []
    for i in range(n):
        e: dict[str, Any] = {"name": f"e{i}", "pool": "bench", "tier": tiers[i % 3], "priority": i % 4,
                             "weight": 1 + i % 3, "api_keys": [f"{i:064x}"]}  # fmt: skip
        if e["tier"] == "guaranteed":
            e["guaranteed"] = {"throughput_tokens_per_s": 1.0, "kv_tokens": 10.0, "concurrency": 0.01}
        ents.append(e)
    if extra_key is not None:
        ents.append({"name": "gold", "pool": "bench", "tier": "guaranteed", "priority": 9, "api_keys": [extra_key],
                     "guaranteed": {"throughput_tokens_per_s": 4000.0, "kv_tokens": 100000.0, "concurrency": 64},
                     "burst": {"throughput_tokens_per_s": 1e6}})  # fmt: skip
    pool = {"name": "bench", "replica": {"throughput_tokens_per_s": 8000, "kv_tokens": 410128, "concurrency": 256},
            "min_replicas": 1, "max_replicas": 1000}  # fmt: skip
    path.write_text(yaml.safe_dump({"pools": [pool], "entitlements": ents}))


async def cpu_marks(duration_s: float, read: Any) -> list[tuple[float, float]]:
    """(unix time, ``read()`` CPU seconds) each second for ``duration_s``."""
    marks: list[tuple[float, float]] = []
    end = time.time() + duration_s
    while time.time() < end:
        marks.append((time.time(), read()))
        await asyncio.sleep(min(1.0, max(end - time.time(), 0.0)))
    return marks


def cpu_after(marks: list[tuple[float, float]], since: float) -> tuple[float, float] | None:
    """(CPU seconds, wall seconds) between the first and the last of ``marks`` at or after ``since``."""
    window = [(t, c) for t, c in marks if t >= since]
    if len(window) < 2:
        return None
    return window[-1][1] - window[0][1], window[-1][0] - window[0][0]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))] if xs else float("nan")


async def sample_latency(
    url: str, grpc_port: int, api: str, stop: asyncio.Event, published: dict[str, float]
) -> tuple[list[float], list[float]]:
    """``/healthz`` and ``GetMetrics`` latencies until ``stop``; meanwhile each new version's
    publish time (``expires_at - TTL_S`` of its document, asked with the version held: a 304
    until there is a new one) into ``published``."""
    import aiohttp
    import grpc

    from tokenscaler.serve._proto import externalscaler_pb2 as pb
    from tokenscaler.serve._proto import externalscaler_pb2_grpc as pbg

    health: list[float] = []
    keda: list[float] = []
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pbg.ExternalScalerStub(channel)
    ref = pb.ScaledObjectRef(name="bench", namespace="default", scalerMetadata={"pool": "bench"})
    held, hold = "", {}
    beta = api != "v1alpha1"
    doc_url = f"{url}/v1beta1/pools/bench/limits" if beta else f"{url}/v1/pools/bench/limits"
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            params = {"replica": "r0"}
            if beta and held:
                params.update(since=held, **hold)
            async with http.get(doc_url, params=params, headers={"If-None-Match": f'"{held}"'}) as r:
                if r.status == 200:
                    doc = json.loads(await r.read())
                    held = str(doc["version"])
                    published.setdefault(held, doc["expires_at"] - TTL_S)
                    if beta:
                        hold = {"spec": doc["spec_hash"], "instance": doc["instance"]}
            t = time.perf_counter()
            async with http.get(f"{url}/healthz") as r:
                await r.read()
            health.append(time.perf_counter() - t)
            t = time.perf_counter()
            try:
                request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName="tokenscaler-bench")
                await stub.GetMetrics(request, timeout=5)
                keda.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.02)
    await channel.close()
    return health, keda


def run_cell(
    n: int, r: int, api: str, python: str, versions: int, interval_s: float, work: Path, moving: float = 1.0,
    warmup_s: float = 0.0, clients: str = "sidecar", tree: Path = REPO,
) -> dict[str, Any]:
    """One cell. ``python`` and ``tree`` are the code measured: the controller, the clients and the
    sidecar whose RSS is read all run that interpreter on that source tree (the benchmark's own
    processes, the exporter, stay this checkout's)."""
    import urllib.error
    import urllib.request

    cfg = work / f"fleet-{n}.yaml"
    if not cfg.exists():
        fleet_config(n, cfg)
    exporter = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "fleet_exporter.py"), str(n), str(r),
                                 "bench", f"{moving:g}"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    procs: list[subprocess.Popen] = [exporter]
    try:
        port = int(exporter.stdout.readline())  # type: ignore[union-attr]
        scrape = work / "scrape.yaml"
        scrape.write_text(json.dumps({"pools": {"bench": {
            "engines": [f"http://127.0.0.1:{port}/e{j}" for j in range(r)],
            "sidecars": [f"http://127.0.0.1:{port}/s{j}" for j in range(r)]}}, "timeout_s": 4}))  # fmt: skip
        http_port, grpc_port = free_port(), free_port()
        ctl = subprocess.Popen(
            [python, "-m", "tokenscaler", "controller", "--config", str(cfg), "--scrape-config", str(scrape),
             "--http-listen", f"127.0.0.1:{http_port}", "--grpc-listen", f"127.0.0.1:{grpc_port}",
             "--interval-s", f"{interval_s:g}", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree, env=tree_env(tree),
        )  # fmt: skip
        procs.append(ctl)
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 180
        path = "v1beta1" if api != "v1alpha1" else "v1"
        while True:  # ready, and every replica known: the last one answered, an unknown one 404
            try:
                with urllib.request.urlopen(f"{url}/{path}/pools/bench/limits?replica=r{r - 1}", timeout=30):
                    pass
                try:
                    urllib.request.urlopen(f"{url}/{path}/pools/bench/limits?replica=nobody", timeout=30).close()
                except urllib.error.HTTPError as e:
                    if e.code == 404:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the controller did not come up with {r} replicas known")
            time.sleep(0.5)
        duration = versions * interval_s + max(3 * interval_s, warmup_s)
        workers = max(1, min(4, r // 50 + 1))
        chunks = [[f"r{j}" for j in range(k, r, workers)] for k in range(workers)]
        env = dict(tree_env(tree), FLEET_CONFIG=str(cfg))
        for chunk in chunks:
            procs.append(subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--worker", url, "--api", api, "--duration-s",
                 f"{duration:g}", "--replicas", ",".join(chunk), "--clients", clients],
                stdout=subprocess.PIPE, text=True, env=env, cwd=tree,
            ))  # fmt: skip
        stop = asyncio.Event()

        published: dict[str, float] = {}

        ctl_cpu: list[tuple[float, float]] = []  # (unix time, the controller's CPU seconds), each second

        async def sample() -> tuple[list[float], list[float]]:
            task = asyncio.create_task(sample_latency(url, grpc_port, api, stop, published))
            ctl_cpu.extend(await cpu_marks(duration, lambda: cpu_s(ctl.pid)))
            stop.set()
            return await task

        health, keda = asyncio.run(sample())
        results = [json.loads(p.stdout.read()) for p in procs[2:]]  # type: ignore[union-attr]
        for p in procs[2:]:
            p.wait(timeout=60)
        # the same controller, same exporter, its clients gone: what an interval costs it without them
        idle0, t_idle = cpu_s(ctl.pid), time.time()
        time.sleep(2 * interval_s)
        idle_cpu = (cpu_s(ctl.pid) - idle0) / (time.time() - t_idle) * interval_s
        held: dict[str, dict[str, float]] = {}
        for res in results:
            held.update(res["held"])
        # warm-up out: only versions published once every replica held one (the first documents
        # carry the spec and are parsed by all clients at once)
        ready_at = max((min(h.values()) for h in held.values() if h), default=float("inf"))
        used = cpu_after(ctl_cpu, ready_at)  # after the warm-up (the spec sent to all)
        cpu = used[0] / used[1] * interval_s - idle_cpu if used else None
        # a replica holds version v once it holds v or a newer one (a client busy applying v-1 asks
        # after v+1 is out and goes straight to it: it never holds v itself, which is "skipped")
        fan, skipped, missed = [], 0, 0
        by_replica = [sorted((int(v), t) for v, t in h.items()) for h in held.values()]
        for v, at in published.items():
            if at <= ready_at:
                continue
            times, skip = [], False
            for h in by_replica:
                later = [t for ver, t in h if ver >= int(v)]
                times.append(min(later) if later else None)
                skip |= bool(later) and all(ver != int(v) for ver, _ in h)
            if all(t is not None for t in times):
                fan.append(max(times) - at)  # type: ignore[type-var]
                skipped += skip
            else:
                missed += 1
        # the clients' own CPU per version after the warm-up: on this machine they share its cores
        # with the controller; in a fleet each sidecar has its own
        after = [v for v, at in published.items() if at > ready_at]
        client_cpu = 0.0
        for res in results:
            if (used := cpu_after(res["cpu"], ready_at)) is not None:
                client_cpu += used[0]
        client_ms = 1e3 * client_cpu / max(len(after), 1) / r if after else None
        nbytes = sum(res["bytes"] for res in results)
        seen = max(1, len(published))
        rss = sidecar_rss(python, url, tree) if api != "v1alpha1" else float("nan")
        parse = [x for res in results for x in res["parse_s"]]
        apply = [x for res in results for x in res["apply_s"]]
        return {
            "n": n, "r": r, "api": api, "versions": len(fan), "skipped": skipped, "missed": missed,
            "fan_p50": statistics.median(fan) if fan else None, "client_ms": client_ms,
            "fan_p99": p99(fan), "cpu_per_interval": cpu, "bytes_per_replica": nbytes / seen / r if nbytes else None,
            "healthz_p99": p99(health), "keda_p99": p99(keda),
            "parse_ms": 1e3 * statistics.median(parse) if parse else None,
            "apply_ms": 1e3 * statistics.median(apply) if apply else None, "sidecar_rss_mb": rss,
        }  # fmt: skip
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a process that runs the code of source tree ``tree`` (its cwd too)."""
    return dict(os.environ, PYTHONPATH=str(tree))


def sidecar_rss(python: str, url: str, tree: Path) -> float:
    """RSS of one real ``tokenscaler sidecar`` holding the pool's document (no --config)."""
    import urllib.request

    port, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        [python, "-m", "tokenscaler", "sidecar", "--listen", f"127.0.0.1:{port}", "--upstream", "http://127.0.0.1:9",
         "--pool", "bench", "--metrics-port", str(metrics), "--limits-url", url, "--replica-id", "r0",
         "--engine-limits", "off", "--access-log", "off", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree, env=tree_env(tree),
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
                    text = resp.read().decode()
                if "tokenscaler_sidecar_limits_version" in text and 'limits_version{pool="bench",replica="r0"} 0.0' \
                        not in text:  # fmt: skip
                    time.sleep(1.0)
                    return rss_mb(proc.pid)
            except OSError:
                pass
            time.sleep(0.5)
        return float("nan")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--api", default="v1beta1", help=argparse.SUPPRESS)
    ap.add_argument("--replicas", default="", help=argparse.SUPPRESS)
    ap.add_argument("--duration-s", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--cells", default="1000x10,1000x100,10000x10,10000x100",
                    help="entitlements x replicas, comma-separated (default: %(default)s)")  # fmt: skip
    ap.add_argument("--versions", type=int, default=20, help="plan versions measured per cell (default: 20)")
    ap.add_argument("--interval-s", type=float, default=5.0, help="the controller's interval (default: 5)")
    ap.add_argument("--baseline-repo", default=None, help="a checkout of the code before (its .venv): v1alpha1")
    ap.add_argument("--moving", type=float, default=1.0,
                    help="share of the entitlements whose demand moves each 5 s (default 1: all, the worst case)")
    ap.add_argument("--new-only", action="store_true", help="only the new code (no baseline rows)")
    ap.add_argument("--clients", choices=("sidecar", "receive"), default="sidecar",
                    help="sidecar: real PoolLimitsSource clients (parse and apply); receive: the same requests, "
                         "answers only received (the controller's side of a fan-out too large to run sidecars for)")
    ap.add_argument("--warmup-s", type=float, default=0.0,
                    help="seconds before the measured versions (default: 3 intervals): every client first parses "
                         "the spec, 100 clients x 10,000 entitlements take ~30 s on 2 cores")  # fmt: skip
    args = ap.parse_args()
    if args.worker:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(worker(args.worker, "bench", args.replicas.split(","), args.api, args.duration_s, 2.0,
                           args.clients))  # fmt: skip
        return 0
    sys.path.insert(0, str(REPO))
    print(f"# {platform.node()} | {platform.machine()} | Python {platform.python_version()} | "
          f"{time.strftime('%Y-%m-%d')} | interval {args.interval_s:g} s | {args.versions} versions a cell | "
          f"demand moving: {args.moving:.0%} of entitlements each 5 s | warm-up {args.warmup_s:g} s | "
          f"clients: {args.clients}")
    cols = ("code", "N x R", "versions (skipped / missed)", "held p50 ms", "held p99 ms", "client CPU ms/version",
            "ctl CPU s/interval",
            "kB/replica/version", "healthz p99 ms", "GetMetrics p99 ms", "parse ms", "apply ms",
            "sidecar RSS MB")  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    runs = [("new", sys.executable, "v1beta1", REPO)]
    if args.baseline_repo and not args.new_only:
        before = Path(args.baseline_repo).resolve()
        runs.append(("before", str(before / ".venv" / "bin" / "python"), "v1alpha1", before))
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cells.split(","):
            n, r = (int(x) for x in cell.lower().split("x"))
            for label, python, api, tree in runs:
                res = run_cell(n, r, api, python, args.versions, args.interval_s, Path(tmp), args.moving,
                               args.warmup_s, args.clients if api != "v1alpha1" else "sidecar", tree)  # fmt: skip

                def f(x: float | None, scale: float = 1.0, digits: int = 0) -> str:
                    return "n/a" if x is None or x != x else f"{x * scale:,.{digits}f}"

                print(f"| {label} ({api}) | {n:,} x {r:,} | {res['versions']} ({res['skipped']} / {res['missed']}) | "
                      f"{f(res['fan_p50'], 1e3)} | "
                      f"{f(res['fan_p99'], 1e3)} | {f(res['client_ms'], 1, 1)} | {f(res['cpu_per_interval'], 1, 2)} | "
                      f"{f(res['bytes_per_replica'], 1e-3)} | {f(res['healthz_p99'], 1e3, 1)} | "
                      f"{f(res['keda_p99'], 1e3, 1)} | {f(res['parse_ms'], 1, 1)} | {f(res['apply_ms'], 1, 1)} | "
                      f"{f(res['sidecar_rss_mb'])} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
