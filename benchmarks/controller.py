"""One controller interval end to end (queries, solve, publish) at 10 .. 10,000 entitlements.

Run: python benchmarks/controller.py [--intervals N] [--sizes 10,1000,10000] [--warmup-s S]

For each size a synthetic exporter (benchmarks/synthetic_exporter.py) serves the series of
two replicas' sidecars and engines for N entitlements; a real Prometheus (Debian's
package) scrapes it every 5 s and, in "recorded" mode, evaluates the recording rules. The
real controller (PrometheusSource, derivation, planning in a worker thread, publish, state
written to disk) runs in-process as its command does (heap settled after start-up), one
interval every ``--pace-s`` seconds with the profile read after every third interval (the
default cadence: 15 s profile, 5 s interval). Columns: the interval until the new plan is
published (queries, solve, publish: the goal), the state write that follows it, and the
profile read off the interval's path. ``--warmup-s`` lets Prometheus' head chunks fill
before measuring (a query's cost grows with them: steady state is ~10 min of 5 s samples).
The baseline in the same run is the bare query round trip (one ``sum by (pool) (...)``
answering a single series), so the ratio shows what the query set and the solve add.
Also: ``GetMetrics`` latency under 100 concurrent callers (benchmarks/scaler.py).

Where an interval's time goes (``--phases``): per interval, the source's read split into
the slowest query's HTTP round trip (until its last byte), decoding and columns in the
fetching threads, and assembling the observation on the event loop; the cyclic
collector's pauses; and the CPU the exporter and Prometheus used meanwhile (from
``/proc``). Printed as p50 and p99 per phase, and the mean of each phase over the slowest
5% of intervals against the median ones: the phase that carries the tail.
``--source scrape`` runs the same controller on the scrape source against the exporter,
no Prometheus at all. ``--pair-ingestion on,off,on`` (Prometheus only) then runs blocks
of ``--intervals`` intervals that all query one instant already ingested, with
Prometheus scraping and evaluating its rules (``on``) or with both removed by a config
reload (``off``: same head, same answers, no ingestion): the pair that tells
Prometheus's ingestion from the rest. ``--prometheus-gogc default,400,default,400`` runs
one block per value, each on a fresh Prometheus started with that ``GOGC`` (and its own
warm-up); ``--pin unpinned,pinned,...`` runs blocks on one Prometheus with it on the first
core and the controller on the last (``pinned``) or both free.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry  # noqa: E402

from tests.prometheus import PrometheusServer, static_job  # noqa: E402
from tests.support import Proc, wait_until  # noqa: E402
from tokenscaler.cli.runtime import CONTROLLER_YOUNG_GC, settle_heap  # noqa: E402
from tokenscaler.control.loop import Controller  # noqa: E402
from tokenscaler.control.metrics import ControllerMetrics  # noqa: E402
from tokenscaler.control.store import PlanStore  # noqa: E402
from tokenscaler.core.model import parse_config  # noqa: E402
from tokenscaler.core.observation import LoadProfile, Observation  # noqa: E402
from tokenscaler.sources.prometheus import PrometheusSource, Query, assemble, recording_rules  # noqa: E402
from tokenscaler.sources.scrape import PoolTargets, ScrapeConfig, ScrapeSource  # noqa: E402

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def go_gc_cycles(url: str) -> float:
    """Prometheus's own Go garbage collections so far (its ``go_gc_duration_seconds_count``)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("go_gc_duration_seconds_count"):
                return float(line.split()[-1])
    return float("nan")


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class GcPauses:
    """The cyclic collector's pauses (any thread), summed until :meth:`take`."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self._started: dict[int, float] = {}
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started[threading.get_ident()] = time.perf_counter()
        else:
            t0 = self._started.pop(threading.get_ident(), None)
            if t0 is not None:
                self.total += time.perf_counter() - t0
                self.count += 1

    def take(self) -> tuple[float, int]:
        out = (self.total, self.count)
        self.total, self.count = 0.0, 0
        return out

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


class TimedPrometheusSource(PrometheusSource):
    """The real source, its last read timed: per query the HTTP round trip (until the last
    byte) and the whole query in its thread (with decoding and columns); then assembling."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._local = threading.local()
        self.last: dict[str, float] = {}
        self._queries: list[tuple[str, float, float]] = []
        request = self._session.request

        def timed_request(*a, **k):
            t0 = time.perf_counter()
            try:
                return request(*a, **k)
            finally:
                self._local.http = time.perf_counter() - t0

        self._session.request = timed_request  # type: ignore[method-assign]

    def _query_parsed(self, q: Query, now: float):
        t0 = time.perf_counter()
        self._local.http = 0.0
        try:
            return super()._query_parsed(q, now)
        finally:
            self._queries.append((q.name, self._local.http, time.perf_counter() - t0))

    async def read(self, now: float) -> Observation:
        self._queries = []
        t0 = time.perf_counter()
        results = await self._gather(self.queries, now)
        t1 = time.perf_counter()
        obs = assemble(now, results, self.queries, self.max_staleness_s)
        t2 = time.perf_counter()
        slowest = max(self._queries, key=lambda x: x[2])
        self.last = {
            "gather": t1 - t0,
            "slowest http": slowest[1],
            "slowest rest": slowest[2] - slowest[1],
            "http sum": sum(x[1] for x in self._queries),
            "rest sum": sum(x[2] - x[1] for x in self._queries),
            "assemble": t2 - t1,
        }
        return obs


class TimedScrapeSource(ScrapeSource):
    """The real scrape source, its last read timed: the fetches (the slowest one, and all of
    them concurrently), then in the worker thread the text parsing (filter and
    prometheus-client's parser) and turning the samples into an observation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last: dict[str, float] = {}
        self._fetches: list[float] = []
        self._observe_s = 0.0

    async def _fetch(self, url: str) -> str:
        t0 = time.perf_counter()
        try:
            return await super()._fetch(url)
        finally:
            self._fetches.append(time.perf_counter() - t0)

    def observe(self, results, now: float) -> Observation:
        t0 = time.perf_counter()
        try:
            return super().observe(results, now)
        finally:
            self._observe_s = time.perf_counter() - t0

    def _parse_and_observe(self, jobs, texts, now: float) -> Observation:
        t0 = time.perf_counter()
        obs = super()._parse_and_observe(jobs, texts, now)
        self.last["parse"] = time.perf_counter() - t0 - self._observe_s
        self.last["observe"] = self._observe_s
        return obs

    async def read(self, now: float) -> Observation:
        self._fetches = []
        self.last = {}
        t0 = time.perf_counter()
        obs = await super().read(now)
        self.last.update(
            {"gather": time.perf_counter() - t0, "slowest http": max(self._fetches), "http sum": sum(self._fetches)}
        )
        return obs


class AtInstant:
    """A source that reads one fixed instant, whatever the interval's clock says (the
    observation then carries the interval's time): the same answers every interval."""

    def __init__(self, inner: PrometheusSource, at: float) -> None:
        self.inner, self.at = inner, at

    @property
    def last(self) -> dict[str, float]:
        return getattr(self.inner, "last", {})

    async def read(self, now: float) -> Observation:
        obs = await self.inner.read(self.at)
        obs.time = now
        return obs

    async def read_profile(self, now: float) -> LoadProfile:
        profile = await self.inner.read_profile(self.at)
        profile.time = now
        return profile

    async def close(self) -> None:
        pass


def bench_config(n: int) -> dict:
    tiers = ("guaranteed", "elastic", "spot")
    ents = []
    for i in range(n):
        e = {"name": f"e{i}", "pool": "bench", "tier": tiers[i % 3], "priority": i % 4, "weight": 1 + i % 3}
        if e["tier"] == "guaranteed":
            e["guaranteed"] = {"throughput_tokens_per_s": 1.0, "kv_tokens": 10.0, "concurrency": 0.01}
        ents.append(e)
    return {
        "pools": [
            {
                "name": "bench",
                "replica": {"throughput_tokens_per_s": 8000, "kv_tokens": 410128, "concurrency": 256},
                "min_replicas": 1,
                "max_replicas": 1000,
            }
        ],
        "entitlements": ents,
    }


PHASES = ("read", "plan", "published", "persist")
READ_PHASES = ("gather", "slowest http", "slowest rest", "http sum", "rest sum", "assemble", "parse", "observe")


def prometheus_config(prom: PrometheusServer, jobs: list, rule_files: list[Path] | None) -> None:
    """Rewrite the running Prometheus's config and reload it (SIGHUP)."""
    config = yaml.safe_load(prom.config_path.read_text())
    config["scrape_configs"] = jobs
    config["rule_files"] = [str(p) for p in rule_files or []]
    prom.config_path.write_text(yaml.safe_dump(config))
    prom.proc.popen.send_signal(signal.SIGHUP)


async def run_intervals(
    controller: Controller,
    source,
    intervals: int,
    pace_s: float,
    pids: dict[str, int],
    gcs: GcPauses,
    block: str,
    profile: bool,
) -> list[dict[str, float | str]]:
    """``intervals`` intervals, one every ``pace_s``, each a record of its phases (seconds)."""
    records: list[dict[str, float | str]] = []
    for i in range(intervals):
        started = time.perf_counter()
        rec: dict[str, float | str] = {"block": block, "wall": time.time()}
        if isinstance(source, PrometheusSource):
            await asyncio.to_thread(
                source._client.custom_query, "sum by (pool) (tokenscaler_sidecar_limits_age_seconds)"
            )
            rec["baseline query"] = time.perf_counter() - started
        prom_url = getattr(getattr(controller.source, "inner", controller.source), "url", None)
        go_gc0 = go_gc_cycles(prom_url) if prom_url else 0.0
        cpu0 = {k: cpu_s(pid) for k, pid in pids.items()}
        me0 = self_cpu_s()
        gcs.take()
        t0 = time.perf_counter()
        published = await controller.step()
        elapsed = time.perf_counter() - t0
        assert published is not None and not published.stale
        assert len(published.plan.pools["bench"].rows.names) == len(controller.config.entitlements)
        rec.update({phase: controller.timings[phase] for phase in PHASES})
        rec.update(getattr(controller.source, "last", {}))
        rec["gc"], rec["gc count"] = gcs.take()
        rec["controller cpu"] = self_cpu_s() - me0
        for k, pid in pids.items():
            rec[f"{k} cpu"] = cpu_s(pid) - cpu0[k]
        rec["step"] = elapsed
        if prom_url:
            rec["prometheus gc count"] = go_gc_cycles(prom_url) - go_gc0
        if profile and i % 3 == 2:
            t1 = time.perf_counter()
            assert await controller.refresh_profile()
            rec["profile"] = time.perf_counter() - t1
        records.append(rec)
        await asyncio.sleep(max(pace_s - (time.perf_counter() - started), 0.0))
    return records


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def start_prometheus(
    n: int, workdir: Path, port: int, recorded: bool, every_s: int, gogc: str | None
) -> tuple[PrometheusServer, dict, list[Path] | None]:
    """A Prometheus scraping the exporter (GOGC ``gogc``, None or "default": Go's default),
    returned once its rates (and recorded series) answer."""
    rules = workdir / "rules.yml"
    rules.write_text(yaml.safe_dump(recording_rules(rate_window_s=30, interval_s=every_s)))
    job = static_job("bench", [f"127.0.0.1:{port}"], honor_labels=True)
    rule_files = [rules] if recorded else None
    saved = os.environ.pop("GOGC", None)
    if gogc and gogc != "default":
        os.environ["GOGC"] = gogc  # inherited by the Prometheus started here
    try:
        prom = PrometheusServer(
            Path(tempfile.mkdtemp(prefix=f"prom-{n}-{recorded}-", dir=workdir)), [job], f"{every_s}s", rule_files
        )
    finally:
        os.environ.pop("GOGC", None)
        if saved is not None:
            os.environ["GOGC"] = saved
    try:
        # two scrapes at least, so rate() has two points
        wait_until(
            lambda: prom.query('sum(rate(tokenscaler_sidecar_offered_weighted_tokens_total{entitlement="e0"}[30s]))'),
            timeout=60,
            interval=0.5,
            message="rates in Prometheus",
        )
        if recorded:
            for record in (
                "pool_entitlement:tokenscaler_sidecar_offered_weighted_tokens:rate30s",
                "pool_entitlement:tokenscaler_sidecar_inflight_requests:sum",
            ):
                wait_until(
                    lambda record=record: len(prom.query(record)) == n,
                    timeout=60,
                    interval=0.5,
                    message=f"recorded series {record}",
                )
    except BaseException:
        prom.stop()
        raise
    return prom, job, rule_files


async def measure(
    n: int,
    intervals: int,
    workdir: Path,
    recorded: bool,
    every_s: int,
    pace_s: float,
    warmup_s: float,
    source_kind: str = "prometheus",
    pair: list[str] | None = None,
    young_gc: list[int] | None = None,
    gogc: list[str] | None = None,
    pin: list[str] | None = None,
) -> list[dict[str, float | str]]:
    """The intervals' records. Blocks: with several ``gogc`` values, one fresh Prometheus per
    block (each its warm-up); within each, the ``young_gc`` or ``pin`` blocks on the same
    Prometheus, then the ``pair`` blocks."""
    exporter = Proc([sys.executable, str(REPO / "benchmarks" / "synthetic_exporter.py"), "--entitlements", str(n)])
    port = int(exporter.wait_for_line(r"listening on http://127.0.0.1:(\d+)").group(1))
    pids = {"exporter": exporter.popen.pid}
    prom = None
    gcs = GcPauses()
    all_cpus = os.sched_getaffinity(0)
    records: list[dict[str, float | str]] = []
    controller: Controller | None = None

    def new_controller(source) -> Controller:
        c = Controller(
            parse_config(bench_config(n)),
            source,
            PlanStore(),
            ControllerMetrics(CollectorRegistry()),
            interval_s=5.0,
            state_path=workdir / f"state-{n}.json",
        )
        settle_heap(CONTROLLER_YOUNG_GC)  # as `tokenscaler controller` does once started
        return c

    try:
        if source_kind == "scrape":
            url = f"http://127.0.0.1:{port}/metrics"
            # the exporter serves engines and sidecars on one port: two URLs, so two targets
            targets = PoolTargets.model_validate({"engines": [f"{url}?engine"], "sidecars": [url]})
            source = TimedScrapeSource(ScrapeConfig(pools={"bench": targets}, timeout_s=10))
            await asyncio.sleep(warmup_s)
            controller = new_controller(source)
            await controller.step()  # the scrape source's rates need a previous round
            records += await run_intervals(controller, source, intervals, pace_s, pids, gcs, "live", False)
            await source.close()
            return records
        for g in gogc or [None]:
            prom, job, rule_files = start_prometheus(n, workdir, port, recorded, every_s, g)
            pids["prometheus"] = prom.proc.popen.pid
            await asyncio.sleep(warmup_s)
            source = TimedPrometheusSource(prom.url, rate_window_s=30, timeout_s=10, recorded=recorded)
            if controller is None:
                controller = new_controller(source)
            else:
                controller.source = source
            await controller.refresh_profile()
            tag = "" if g is None else f", GOGC {g}"
            blocks: list[tuple[str, int | None, str | None]] = [(f"live{tag}", None, None)]
            if young_gc:
                blocks = [(f"live, young gc {y}{tag}", y, None) for y in young_gc]
            elif pin:
                blocks = [(f"live, {p}{tag}", None, p) for p in pin]
            for block, young, where in blocks:
                if young is not None:  # only the youngest generation's threshold differs between blocks
                    gc.collect()
                    gc.set_threshold(young, *gc.get_threshold()[1:])
                if where == "pinned":  # Prometheus on the first core, the controller on the last
                    set_affinity(prom.proc.popen.pid, {min(all_cpus)})
                    set_affinity(os.getpid(), {max(all_cpus)})
                elif where is not None:
                    set_affinity(prom.proc.popen.pid, all_cpus)
                    set_affinity(os.getpid(), all_cpus)
                records += await run_intervals(controller, source, intervals, pace_s, pids, gcs, block, True)
            set_affinity(os.getpid(), all_cpus)
            if pair:
                at = time.time() - 2 * every_s  # ingested: scraped and recorded by now
                controller.source = AtInstant(source, at)
                for block in pair:
                    if block == "off":
                        prometheus_config(prom, [], None)
                    else:
                        prometheus_config(prom, [job], rule_files)
                    await asyncio.sleep(2 * every_s)  # the reload applied, a scrape and an evaluation in
                    records += await run_intervals(
                        controller, source, intervals, pace_s, pids, gcs, f"instant, ingestion {block}{tag}", True
                    )
            await source.close()
            prom.stop()
            prom = None
        return records
    finally:
        gcs.close()
        set_affinity(os.getpid(), all_cpus)
        if prom is not None:
            prom.stop()
        exporter.stop()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def print_phases(label: str, records: list[dict[str, float | str]]) -> None:
    """p50 and p99 of each phase, and which phase carries the slowest 5% of intervals."""
    order = ("baseline query", *PHASES, *READ_PHASES, "gc", "gc count", "controller cpu", "exporter cpu")
    order += ("prometheus cpu", "prometheus gc count", "profile")
    keys = [k for k in order if any(k in r for r in records)]
    published = sorted(float(r["published"]) for r in records)
    cut = published[max(int(len(published) * 0.95) - 1, 0)]
    tail = [r for r in records if float(r["published"]) >= cut] or records
    mid = sorted(records, key=lambda r: float(r["published"]))
    median = mid[len(mid) // 4 : len(mid) * 3 // 4] or mid  # the middle half
    print(f"\n{label}: {len(records)} intervals; slowest 5%: {len(tail)} (published >= {cut * 1e3:.0f} ms)")
    print(f"{'phase':>16} | {'p50 ms':>8} | {'p99 ms':>8} | {'mid-half mean':>13} | {'slowest-5% mean':>15}")
    for k in keys:
        scale = 1 if k.endswith("count") else 1e3
        vals = [float(r[k]) * scale for r in records if k in r]
        m = [float(r[k]) * scale for r in median if k in r]
        t = [float(r[k]) * scale for r in tail if k in r]
        print(
            f"{k:>16} | {pct(vals, 50):>8.1f} | {pct(vals, 99):>8.1f} | "
            f"{statistics.fmean(m) if m else float('nan'):>13.1f} | {statistics.fmean(t) if t else float('nan'):>15.1f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", type=int, default=12)
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--skip-scaler", action="store_true")
    ap.add_argument("--scrape-interval-s", type=int, default=5, help="scrape and rule interval (default 5)")
    ap.add_argument("--pace-s", type=float, default=2.0, help="seconds between interval starts (default 2)")
    ap.add_argument("--warmup-s", type=float, default=0.0, help="let Prometheus run this long before measuring")
    ap.add_argument("--modes", default="inline,recorded")
    ap.add_argument("--source", choices=("prometheus", "scrape"), default="prometheus")
    ap.add_argument("--phases", action="store_true", help="print each phase's p50 and p99, and the tail's phases")
    ap.add_argument("--pair-ingestion", default="", help="blocks at one ingested instant, e.g. on,off,on")
    ap.add_argument("--young-gc", default="", help="blocks with these young-generation GC thresholds, e.g. 700,...")
    ap.add_argument(
        "--prometheus-gogc",
        default="",
        help="GOGC for Prometheus (its Go collector; 100 by default); several, e.g. default,400,default,400: "
        "one fresh Prometheus per block",
    )
    ap.add_argument(
        "--pin",
        default="",
        help="blocks with Prometheus and the controller on separate cores or not, e.g. unpinned,pinned,unpinned,pinned",
    )
    ap.add_argument("--dump", type=Path, help="write every interval's record here (JSON lines)")
    args = ap.parse_args()
    print(
        f"# {platform.node()} | {platform.machine()} | Python {platform.python_version()} | {time.strftime('%Y-%m-%d')}"
        f" | warm-up {args.warmup_s:g} s | source {args.source}"
    )
    cols = ["baseline ms", "read ms", "plan ms", "published ms", "published p99", "persist ms", "profile ms"]
    header = f"{'entitlements':>12} | {'mode':>8} | " + " | ".join(f"{c:>13}" for c in cols) + " | published/baseline"
    modes = [m == "recorded" for m in args.modes.split(",")] if args.source == "prometheus" else [False]
    pair = [b for b in args.pair_ingestion.split(",") if b]
    if any(b not in ("on", "off") for b in pair):
        ap.error("--pair-ingestion: blocks are on or off")
    young_gc = [int(x) for x in args.young_gc.split(",") if x] or None
    gogc = [g for g in args.prometheus_gogc.split(",") if g] or None
    pin = [p for p in args.pin.split(",") if p] or None
    if pin and (any(p not in ("pinned", "unpinned") for p in pin) or len(os.sched_getaffinity(0)) < 2):
        ap.error("--pin: blocks are pinned or unpinned, on 2 cores at least")
    if pin and young_gc:
        ap.error("--pin and --young-gc: one or the other")
    runs: list[tuple[str, list[dict[str, float | str]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, recorded in ((int(s), r) for s in args.sizes.split(",") for r in modes):
            records = asyncio.run(
                measure(
                    n,
                    args.intervals,
                    Path(tmp),
                    recorded,
                    args.scrape_interval_s,
                    args.pace_s,
                    args.warmup_s,
                    args.source,
                    pair,
                    young_gc,
                    gogc,
                    pin,
                )
            )
            mode = args.source if args.source == "scrape" else ("recorded" if recorded else "inline")
            runs.append((f"{n:,} {mode}", records))
    print(header)
    print("-" * len(header))
    for label, records in runs:
        n, mode = label.split()
        blocks = dict.fromkeys(str(r["block"]) for r in records)
        for block in blocks:
            rs = [r for r in records if r["block"] == block]

            def med(k: str, rs=rs) -> float:
                vals = [float(r[k]) for r in rs if k in r]
                return statistics.median(vals) * 1e3 if vals else float("nan")

            p99 = pct([float(r["published"]) for r in rs], 99) * 1e3
            values = [med("baseline query"), med("read"), med("plan"), med("published"), p99, med("persist")]
            values.append(med("profile"))
            ratio = med("published") / med("baseline query")
            name = mode if block == "live" else f"{mode}, {block}"
            print(f"{n:>12} | {name:>8} | " + " | ".join(f"{v:>13.1f}" for v in values) + f" | {ratio:>18.0f}x")
    if args.phases:
        for label, records in runs:
            for block in dict.fromkeys(str(r["block"]) for r in records):
                print_phases(f"{label}, {block}", [r for r in records if r["block"] == block])
    if args.dump:
        with args.dump.open("w") as f:
            for label, records in runs:
                for r in records:
                    f.write(json.dumps({"run": label, **r}) + "\n")
    if not args.skip_scaler:
        print()
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaler.py")], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
