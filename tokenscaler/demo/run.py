"""One demo run, start to end: the fleet up, the traffic through it, the report, every process ended.

Order: (Prometheus), the controller, the initial replicas (in parallel) until ready, then the
traffic starts (t = 0) with three loops beside it: once a second the replicas' readiness,
the controller's plan and the display; every ``pollingInterval`` the replica manager (KEDA
and the HPA). When the traffic has drained everything stops (SIGTERM, bounded waits,
SIGKILL) and the report is written from what was measured. Ctrl-C, SIGTERM and errors take
the same way out, without the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tokenscaler.demo.display import Display
from tokenscaler.demo.fleet import Fleet, FleetSettings, ReplicaManager
from tokenscaler.demo.load import LoadGenerator
from tokenscaler.demo.measure import Sample, phases_of, summarize
from tokenscaler.demo.procs import ChildFailed, Supervisor
from tokenscaler.demo.showback import read_showback
from tokenscaler.experiments.replicas import rules_from_scaledobject
from tokenscaler.experiments.scenario import LoadedScenario, load_scenario
from tokenscaler.sim.profile import load_profile


@dataclass
class DemoOptions:
    scenario: str = "demo"
    duration_s: float | None = None
    out: Path = Path("demo-out")
    prometheus: str = "auto"  # auto | on | off
    compare: bool = False
    seed: int = 0
    live_display: bool = True


@dataclass
class DemoResult:
    report: Path | None
    summary: dict[str, Any] | None
    pids: list[int]
    logs: Path
    ports: list[int]
    interrupted: bool = False
    error: str | None = None


def compress(loaded: LoadedScenario, duration_s: float | None, out: Path) -> LoadedScenario:
    """The scenario with every time scaled by ``duration_s / duration_s`` of the file (phases kept),
    written to ``out/scenario.yaml`` with the config inline and trace paths absolute, so the
    live run and the virtual one read the very same file."""
    sc = loaded.scenario
    f = 1.0 if duration_s is None else duration_s / sc.duration_s
    data = sc.model_dump(mode="json", exclude_none=True)
    data["duration_s"] = sc.duration_s * f
    data.pop("config_file", None)
    data["config"] = loaded.config.model_dump(mode="json", exclude_none=True)
    for sources in data["traffic"].values():
        for s in sources:
            s["start_s"] = s.get("start_s", 0.0) * f
            if "end_s" in s:
                s["end_s"] = s["end_s"] * f
            if "trace" in s:
                s["trace"] = str(loaded.path(s["trace"]).resolve())
    for ev in data.get("events", []):
        ev["at_s"] = ev["at_s"] * f
    profile = Path(sc.profile)
    if profile.suffix in (".yaml", ".yml") and not profile.is_absolute():
        data["profile"] = str(loaded.path(sc.profile).resolve())
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.yaml"
    note = f"# {loaded.source} with every time scaled by {f:g} (tokenscaler demo --duration-s)\n"
    path.write_text(note + yaml.safe_dump(data, sort_keys=False))
    return load_scenario(str(path))


async def run_demo(opts: DemoOptions, log: Any = print) -> DemoResult:
    out = opts.out
    loaded = compress(load_scenario(opts.scenario), opts.duration_s, out)
    sc, pool = loaded.scenario, loaded.pool
    duration = sc.duration_s
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(loaded.config.model_dump(mode="json", exclude_none=True), sort_keys=False))
    profile = load_profile(sc.profile)
    use_prometheus = opts.prometheus == "on" or (opts.prometheus == "auto" and _have_prometheus())
    logs = out / "logs"
    sup = Supervisor(logs)
    sup.install()
    settings = FleetSettings(
        pool=pool.name, config_path=config_path, profile=sc.profile, startup_s=profile.startup_s,
        interval_s=sc.interval_s, prometheus=use_prometheus, seed=opts.seed,
    )  # fmt: skip
    fleet = Fleet(sup, settings, out)
    rules = rules_from_scaledobject()
    phases = phases_of(loaded, duration)
    samples: list[Sample] = []
    display: Display | None = None
    manager: ReplicaManager | None = None
    gen: LoadGenerator | None = None
    ports: list[int] = []
    showback: dict[str, Any] | None = None
    result = DemoResult(None, None, sup.pids, logs, ports)
    main = asyncio.current_task()
    assert main is not None  # this coroutine runs as a task
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, main.cancel)
    try:
        fleet.write_targets()
        if use_prometheus:
            await fleet.start_prometheus()
            log(f"prometheus on {fleet.prometheus_url} (file-based discovery of the replicas)")
        await fleet.start_controller()
        log(f"controller on {fleet.controller_url}, KEDA scaler on grpc://{fleet.scaler_address}")
        initial = sc.replicas.initial if sc.replicas.initial is not None else pool.min_replicas
        initial = min(max(initial, pool.min_replicas), pool.max_replicas)
        reps = await asyncio.gather(*(fleet.add_replica(initial) for _ in range(initial)))
        for r in reps:
            log(f"replica {r.id}: sidecar {r.url} -> simulator {r.engine_metrics.removesuffix('/metrics')}")
        deadline = time.monotonic() + profile.startup_s + 30.0
        while fleet.count("ready") < initial:
            if time.monotonic() > deadline:
                raise ChildFailed(f"the first {initial} replicas were not ready within {profile.startup_s + 30:g}s")
            await fleet.poll_ready()
            await asyncio.sleep(0.2)
        manager = ReplicaManager(
            fleet, rules, pool.min_replicas, pool.max_replicas, clock=lambda: gen.now() if gen else 0.0
        )
        manager.desired = initial
        gen = LoadGenerator(loaded, opts.seed, duration, fleet, profile.served_model_name)
        log(
            f"{len(gen.arrivals)} requests over {duration:g}s from {len(sc.traffic)} entitlements; "
            f"overload {phases.peak_start:g}-{phases.peak_end:g}s; HPA every {rules.polling_interval_s:g}s "
            f"({rules.source}); logs in {logs}"
        )
        display = Display(out=None) if opts.live_display else None
        t0 = time.monotonic()
        traffic = asyncio.create_task(gen.run(t0), name="traffic")

        async def ticker() -> None:
            while True:
                now = gen.now()
                for r in await fleet.reap_dead(now):
                    log(f"t={now:.1f}s replica {r.id} died ({fleet.failures[-1]}); the Deployment replaces it")
                    await manager.reconcile()
                await fleet.poll_ready()
                await fleet.read_inversions()
                plan = await fleet.plan()
                p = (plan or {}).get("pools", {}).get(pool.name, {})
                elastic = [
                    e for e in (plan or {}).get("entitlements", {}).values()
                    if e.get("pool") == pool.name and e.get("tier") == "elastic"
                ]  # fmt: skip
                samples.append(
                    Sample(
                        t=round(now, 3), desired=manager.desired, ready=fleet.count("ready"),
                        starting=fleet.count("starting"), draining=fleet.count("draining"),
                        planned=p.get("desired_replicas"), plan_version=(plan or {}).get("version"),
                        plan_stale=(plan or {}).get("stale"),
                        plan_age_s=round(time.time() - plan["generated_at"], 2) if plan else None,
                        open_requests=gen.inflight,
                        elastic_allocated=_tier_sum(elastic, "allocation") if plan else None,
                        elastic_demand=_tier_sum(elastic, "demand") if plan else None,
                    )
                )  # fmt: skip
                if display is not None:
                    display.update(now, phases.of(now), gen.records, samples[-1])
                await asyncio.sleep(max(1.0 - (gen.now() - now), 0.05))

        async def autoscaler() -> None:
            while True:
                await asyncio.sleep(rules.polling_interval_s)
                d = await manager.poll()
                if d.error is None:
                    log_scale(d)

        def log_scale(d: Any) -> None:
            if display is not None and not display.tty and d.metric is not None:
                print(f"t={d.at:6.1f}s HPA: GetMetrics {d.metric:g} / target {d.target:g} -> {d.desired} replicas",
                      flush=True)  # fmt: skip

        helpers = [asyncio.create_task(ticker(), name="ticker"), asyncio.create_task(autoscaler(), name="hpa")]
        try:
            done, _ = await asyncio.wait([traffic, *helpers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a helper that ended raised: re-raise here
        finally:
            for task in (traffic, *helpers):
                task.cancel()
            await asyncio.gather(traffic, *helpers, return_exceptions=True)
        ports[:] = _ports(fleet)
        await fleet.read_inversions()  # the last word of every sidecar still serving
        showback = await read_showback(fleet.session, fleet.controller_url)  # the controller's counters, at the end
        if use_prometheus and fleet.prometheus_url:
            rendered = await asyncio.to_thread(
                _render_dashboards, fleet.prometheus_url, out / "dashboards", pool.name, time.time() - duration
            )
            log(f"rendered {rendered} dashboard panels from Prometheus into {out / 'dashboards'}")
    except asyncio.CancelledError:
        result.interrupted = True
    except (ChildFailed, OSError, ValueError) as e:
        result.error = str(e)
    finally:
        if display is not None:
            display.close()
        ports[:] = ports or _ports(fleet)
        if manager is not None:
            with contextlib.suppress(Exception):
                await manager.close()
        if gen is not None:
            await gen.close()
        await fleet.close()
        await asyncio.to_thread(sup.stop_all)
        sup.uninstall()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
    if result.interrupted or result.error or gen is None:
        return result
    bin_s = max(round(duration / 45.0), 2.0)
    summary = summarize(gen.records, samples, loaded, duration, bin_s, fleet.inversions())
    summary["showback"] = showback
    meta: dict[str, Any] = {
        "source": "Prometheus, file-based discovery" if use_prometheus else "embedded scraping",
        "seed": opts.seed,
        "logs": str(logs),
        "pids": list(sup.pids),
        "ports": ports,
        "scale_decisions": [asdict(d) for d in manager.decisions] if manager else [],
        "hpa": rules.source,
        "replica_failures": fleet.failures,
    }
    if opts.compare:
        from tokenscaler.demo.compare import compare_live_virtual

        meta["compare"] = compare_live_virtual(summary, loaded, opts.seed, duration)
    from tokenscaler.demo import report

    raw = [{k: getattr(r, k) for k in r.__slots__} for r in gen.records]
    result.report = report.write(out, summary, meta, raw)
    result.summary = {**summary, "run": meta}
    return result


def _tier_sum(entitlements: list[dict[str, Any]], key: str) -> float:
    """The throughput of ``key`` (allocation, demand) summed over the plan's ``entitlements``."""
    return float(sum((e.get(key) or {}).get("throughput_tokens_per_s") or 0.0 for e in entitlements))


def _ports(fleet: Fleet) -> list[int]:
    urls = [fleet.controller_url, fleet.prometheus_url]
    urls += [u for r in fleet.replicas for u in (r.url, r.engine_metrics, r.sidecar_metrics)]
    ports = []
    for u in urls:
        if u:
            with contextlib.suppress(ValueError, IndexError):
                ports.append(int(u.removesuffix("/metrics").rsplit(":", 1)[1]))
    if fleet.scaler_address:
        ports.append(int(fleet.scaler_address.rsplit(":", 1)[1]))
    return sorted(set(ports))


def _render_dashboards(prometheus: str, out: Path, pool: str, start: float) -> int:
    """Every panel of the shipped dashboards over the run, drawn from the demo's Prometheus
    (what `tokenscaler render-dashboards` does); a failure is reported, never fatal."""
    import requests

    from tokenscaler.observe.dashboards import all_dashboards
    from tokenscaler.observe.grafana import build
    from tokenscaler.observe.render import render

    end = time.time()
    boards = [build(d) for d in all_dashboards()]
    try:
        written = render(prometheus, out, boards, start, end, max((end - start) / 120, 1.0), 1.0, {"pool": pool})
    except (requests.RequestException, ValueError, OSError) as e:
        print(f"tokenscaler demo: dashboards not rendered: {e}", flush=True)
        return 0
    return len(written)


def _have_prometheus() -> bool:
    import shutil

    return shutil.which("prometheus") is not None
