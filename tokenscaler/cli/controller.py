"""`tokenscaler controller`: the interval loop, the KEDA scaler and the HTTP API in one process.

    tokenscaler controller --config FILE [--prometheus-url URL | --scrape-config FILE]
        [--grpc-listen ADDR] [--http-listen ADDR] [--state FILE] [--interval-s N] ...

One asyncio loop (uvloop where available) hosts the planning loop, the gRPC server for KEDA
and the HTTP API (limits for the sidecars, the plan). Once both servers accept connections it prints
``tokenscaler controller listening on http://HOST:PORT`` then
``tokenscaler controller scaler on grpc://HOST:PORT``. SIGTERM stops it cleanly: servers
close, the last state is already on disk (it is written after every interval).

With ``--source file`` the controller re-reads ``--config`` when the file changes (checked
every second) and on SIGHUP (:mod:`tokenscaler.control.reload`): a valid config is planned
from the next interval on, a file that does not validate is logged and the last good
config stays in force.
"""

from __future__ import annotations

import argparse

from tokenscaler.cli.common import (
    EXIT_OK,
    add_log_level,
    address,
    bind,
    config_error,
    fail,
    setup_logging,
    shown,
    usage_errors,
)

_address = address("0.0.0.0")
DEFAULT_GRPC_PORT = 9491  # unassigned by IANA, clear of Prometheus (9090), its exporters (9100-9400s) and 9464


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="token-pools config (YAML or JSON); with --source file")
    p.add_argument(
        "--source",
        choices=["file", "kubernetes"],
        default="file",
        help="where pools and entitlements come from: --config (default), or the TokenPool and Entitlement "
        "objects of this namespace, with a Lease so only one controller replica plans and publishes",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus-url", metavar="URL", help="read metrics from this Prometheus")
    src.add_argument("--scrape-config", metavar="FILE", help="scrape these targets directly (no Prometheus)")
    p.add_argument(
        "--grpc-listen",
        type=_address,
        default=f"0.0.0.0:{DEFAULT_GRPC_PORT}",
        metavar="ADDR",
        help=f"KEDA external scaler address (default 0.0.0.0:{DEFAULT_GRPC_PORT}; not 9090, Prometheus's own)",
    )
    p.add_argument(
        "--http-listen",
        type=_address,
        default="0.0.0.0:8080",
        metavar="ADDR",
        help="HTTP API address: the limits API, the plan, health (default 0.0.0.0:8080)",
    )
    p.add_argument("--state", metavar="FILE", help="persist debt, history and the last plan here (restored at start)")
    p.add_argument("--interval-s", type=float, default=5.0, metavar="N", help="planning interval (default 5)")
    p.add_argument(
        "--rate-window-s", type=float, default=30.0, metavar="N", help="PromQL rate() window for counters (default 30)"
    )
    p.add_argument(
        "--recording-rules",
        action="store_true",
        help="read the per-entitlement series recorded by alerts/tokenscaler-recording.rules.yml "
        "(cheaper at thousands of entitlements; its window must equal --rate-window-s)",
    )
    p.add_argument("--query-timeout-s", type=float, default=2.0, metavar="N", help="per-query timeout (default 2)")
    p.add_argument(
        "--max-staleness-s",
        type=float,
        default=60.0,
        metavar="N",
        help="sidecar samples older than this mark a pool's data incomplete (default 60)",
    )
    p.add_argument(
        "--demand-half-life-s", type=float, default=10.0, metavar="N", help="half-life of demand smoothing (default 10)"
    )
    p.add_argument(
        "--profile-refresh-s",
        type=float,
        default=15.0,
        metavar="N",
        help="how often to re-read the footprint of each entitlement's requests and its routing "
        "across replicas, after an interval has published (Prometheus source; default 15)",
    )
    p.add_argument(
        "--limits-ttl-s",
        type=float,
        default=60.0,
        metavar="N",
        help="how long sidecars may enforce a limits document without a newer one (default 60)",
    )
    p.add_argument(
        "--capacity-tolerance",
        type=float,
        default=0.1,
        metavar="F",
        help="how far an engine's stated per-replica capacity may be from the configured replica before "
        "the plan carries a CapacityMismatch condition (default 0.1)",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="scaler server certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="scaler server private key (PEM)")
    p.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA (mTLS)")
    # HTTP API security (tokenscaler.serve.http_security); none of them: plain HTTP, open
    sec = p.add_argument_group("HTTP API security")
    sec.add_argument("--http-tls-cert", metavar="FILE", help="serve HTTPS with this certificate chain (PEM; re-read)")
    sec.add_argument("--http-tls-key", metavar="FILE", help="the HTTPS private key (PEM, unencrypted; re-read)")
    sec.add_argument("--http-tls-client-ca", metavar="FILE", help="require client certificates signed by this CA")
    sec.add_argument("--http-token-file", metavar="FILE", help="require a bearer token listed in FILE (re-read)")
    sec.add_argument("--metrics-auth", action="store_true", help="require the same authentication on /metrics")
    add_log_level(p)


def _check(args: argparse.Namespace) -> list[str]:
    errors = []
    if args.source == "file" and not args.config:
        errors.append("--config FILE is required (or --source kubernetes)")
    if args.source == "kubernetes" and (args.config or args.state):
        errors.append("--source kubernetes reads the config from the CRs and keeps state in a ConfigMap: "
                      "drop --config and --state")  # fmt: skip
    positive = ("interval_s", "rate_window_s", "query_timeout_s", "max_staleness_s", "limits_ttl_s")
    for flag in (*positive, "profile_refresh_s"):
        if getattr(args, flag) <= 0:
            errors.append(f"--{flag.replace('_', '-')} ({getattr(args, flag):g}) must be > 0")
    if args.demand_half_life_s < 0:
        errors.append(f"--demand-half-life-s ({args.demand_half_life_s:g}) must be >= 0")
    if not 0 <= args.capacity_tolerance < 1:
        errors.append(f"--capacity-tolerance ({args.capacity_tolerance:g}) must be in [0, 1)")
    if bool(args.tls_cert) != bool(args.tls_key):
        errors.append("--tls-cert and --tls-key go together")
    if args.recording_rules and not args.prometheus_url:
        errors.append("--recording-rules needs --prometheus-url")
    if args.tls_client_ca and not args.tls_cert:
        errors.append("--tls-client-ca needs --tls-cert and --tls-key")
    if bool(args.http_tls_cert) != bool(args.http_tls_key):
        errors.append("--http-tls-cert and --http-tls-key go together")
    if args.http_tls_client_ca and not args.http_tls_cert:
        errors.append("--http-tls-client-ca needs --http-tls-cert and --http-tls-key")
    if args.metrics_auth and not (args.http_token_file or args.http_tls_client_ca):
        errors.append("--metrics-auth needs --http-token-file or --http-tls-client-ca")
    return errors


def run(args: argparse.Namespace) -> int:
    from tokenscaler.cli import runtime

    code = usage_errors("controller", _check(args))
    if code:
        return code
    setup_logging(args.log_level)
    return runtime.run(lambda: _main(args))


async def _main(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    from typing import Any

    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from tokenscaler.cli import runtime
    from tokenscaler.config import FileStamp, file_stamp, load_config, load_model
    from tokenscaler.control.loop import Controller
    from tokenscaler.control.metrics import ControllerMetrics, PlanCollector, ShowbackCollector
    from tokenscaler.control.persist import StateFileError
    from tokenscaler.control.reload import ConfigReloader
    from tokenscaler.control.store import PlanStore
    from tokenscaler.core.model import TokenPoolsConfig
    from tokenscaler.core.validation import ConfigError
    from tokenscaler.serve.api import ControllerApi
    from tokenscaler.serve.http_security import HttpSecurity
    from tokenscaler.serve.scaler import ScalerTLS, start_scaler
    from tokenscaler.sources.base import MetricsSource
    from tokenscaler.sources.prometheus import PrometheusSource
    from tokenscaler.sources.scrape import ScrapeConfig, ScrapeSource

    log = logging.getLogger("tokenscaler.controller")
    config: TokenPoolsConfig | None = None
    stamp: FileStamp | None = None
    try:
        if args.source == "file":
            stamp = file_stamp(args.config)  # before the read: a write after it is re-read
            config = load_config(args.config)
        source: MetricsSource
        if args.prometheus_url:
            source = PrometheusSource(
                args.prometheus_url,
                rate_window_s=args.rate_window_s,
                timeout_s=args.query_timeout_s,
                max_staleness_s=args.max_staleness_s,
                recorded=args.recording_rules,
            )
        else:
            source = ScrapeSource(load_model(ScrapeConfig, args.scrape_config, "'pools'"), path=args.scrape_config)
        tls = ScalerTLS.from_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    except ConfigError as e:
        return config_error(e)
    except ValueError as e:
        return fail("controller", str(e))

    registry = CollectorRegistry()
    try:
        security = HttpSecurity.from_files(
            registry,
            tls_cert=args.http_tls_cert,
            tls_key=args.http_tls_key,
            client_ca=args.http_tls_client_ca,
            token_file=args.http_token_file,
            metrics_auth=args.metrics_auth,
        )
    except ValueError as e:
        return fail("controller", str(e))
    metrics = ControllerMetrics(registry)
    store = PlanStore()
    controller: Controller | None = None
    reloader: ConfigReloader | None = None
    registry.register(PlanCollector(store))
    registry.register(ShowbackCollector(lambda: controller.state.ledgers if controller is not None else {}))

    def config_status() -> dict[str, Any]:
        if reloader is not None:
            return reloader.status()
        generation = controller.generation if controller is not None else None
        return {"generation": generation, "last_reload_error": None, "source": args.source}

    # the servers answer from the store alone: up before the first plan (not ready until then)
    api = ControllerApi(store, registry, metrics, limits_ttl_s=args.limits_ttl_s, config_status=config_status)
    app = api.app()
    security.install(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    http_host, http_port = args.http_listen
    grpc_host, grpc_port = args.grpc_listen
    try:
        http_sock = bind("--http-listen", http_host, http_port)
        await web.SockSite(runner, http_sock, ssl_context=security.ssl_context).start()
    except OSError as e:
        await runner.cleanup()
        await source.close()
        return fail("controller", str(e))
    try:
        grpc_server, bound_grpc = await start_scaler(store, f"{grpc_host}:{grpc_port}", tls, registry=registry)
    except OSError as e:
        await runner.cleanup()
        await source.close()
        try:  # say why in the words bind() uses (in use, or cannot listen), naming the flag
            bind("--grpc-listen", grpc_host, grpc_port).close()
        except OSError as why:
            return fail("controller", str(why))
        return fail("controller", f"--grpc-listen {shown(grpc_host, grpc_port)}: {e}")

    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        if controller is not None:
            controller.stop()
        if reloader is not None:
            reloader.stop()

    def hangup() -> None:
        if reloader is not None:
            reloader.request()
        else:
            log.info("SIGHUP: the config comes from the TokenPool and Entitlement objects; nothing to re-read")

    runtime.on_signal(stop)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup)
    operator = None
    watch: asyncio.Task[None] | None = None
    code = EXIT_OK
    try:
        options = {
            "interval_s": args.interval_s,
            "demand_half_life_s": args.demand_half_life_s,
            "profile_refresh_s": args.profile_refresh_s,
            "capacity_tolerance": args.capacity_tolerance,
        }
        if config is not None:
            controller = Controller(config, source, store, metrics, state_path=args.state, **options)
            try:
                restored = await controller.restore()
            except StateFileError as e:
                return fail("controller", f"{e} (move it away to start without state)")
            reloader = ConfigReloader(args.config, controller, stamp=stamp)
        else:
            from tokenscaler.kube.operator import KubeStateBackend, from_environment

            operator = from_environment()
            await operator.start()
            log.info("watching TokenPools and Entitlements in %s as %s", operator.namespace, operator.identity)
            while config is None and not stopping.is_set():
                config = await operator.wait_config(timeout_s=5.0)
                if config is None:
                    log.info("waiting for a valid set of TokenPools and Entitlements")
            if config is None:
                return EXIT_OK
            backend = KubeStateBackend(operator)
            controller = Controller(
                config, source, store, metrics, state_backend=backend, leading=operator.is_leader,
                on_published=backend.write_status, **options,
            )  # fmt: skip
            reconfigure = controller.set_config

            def on_config(new: TokenPoolsConfig) -> None:
                reconfigure(new)  # logs each change and raises the generation

            operator.on_config(on_config)
            restored = None  # a leader restores when it starts leading
        runtime.settle_heap(young_threshold=runtime.CONTROLLER_YOUNG_GC)
        log.info("%s", security.describe())
        security.start()
        bound_http = http_sock.getsockname()[1]
        print(f"tokenscaler controller listening on {security.scheme}://{http_host}:{bound_http}", flush=True)
        print(f"tokenscaler controller scaler on grpc://{grpc_host}:{bound_grpc}", flush=True)
        if reloader is not None:
            watch = asyncio.create_task(reloader.run())
        if not stopping.is_set():
            await controller.run(first_delay_s=args.interval_s if restored is not None else 0.0)
    finally:
        if watch is not None:
            assert reloader is not None
            reloader.stop()
            await watch
        store.close()  # watching sidecars are answered now, not at their watch's timeout
        await grpc_server.stop(1.0)
        await security.stop()
        await runner.cleanup()
        await source.close()
        if operator is not None:
            await operator.stop()
    return code
