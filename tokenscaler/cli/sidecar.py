"""``tokenscaler sidecar``: wire the rate-limit proxy in front of one vLLM replica into a process.

Prints ``tokenscaler sidecar listening on http://HOST:PORT`` (flushed) once the proxy
accepts connections, then ``tokenscaler sidecar metrics on http://HOST:PORT`` for the
Prometheus endpoint (``--listen HOST:0`` and ``--metrics-port 0`` pick free ports), and
stops cleanly on SIGTERM or SIGINT. Before serving it reads its engine's KV capacity and
context window (:mod:`tokenscaler.sidecar.engine_limits`), and again whenever the engine restarts;
each finished request is one JSON line on stderr (``--access-log off`` silences it).
Limits come from the config split over ``--replicas``
(the default) or from the controller (``--limits-url``); see
:mod:`tokenscaler.sidecar.limits` for the fail-static rules.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tokenscaler.cli.common import EXIT_OK, add_log_level, address, bind, config_error, fail, setup_logging

if TYPE_CHECKING:
    import asyncio

    from aiohttp import web

    from tokenscaler.core.model import TokenPoolsConfig
    from tokenscaler.sidecar.limits import LimitsUpdate
    from tokenscaler.sidecar.limits_auth import LimitsClientAuth
    from tokenscaler.sidecar.metrics import SidecarMetrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", type=address("127.0.0.1"), default="127.0.0.1:8001", metavar="HOST:PORT",
        help="address to serve on (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--upstream", required=True, help="base URL of the engine, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--config", default=None,
        help="token-pools config file (YAML or JSON): the limits and keys without --limits-url; with it, a "
        "bootstrap until the controller's first document (optional: without it the sidecar waits for that)",
    )  # fmt: skip
    parser.add_argument("--pool", required=True, help="the pool this replica belongs to")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9464,
        help="Prometheus port on the listen host, 0 for any (default: %(default)s)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="replicas the static limits are split over (default: 1)"
    )
    parser.add_argument(
        "--replica-id",
        default=None,
        help="this replica's id in metrics and limit polls (default: $POD_NAME, $HOSTNAME, or HOST:PORT)",
    )
    group = parser.add_argument_group("limits source")
    group.add_argument("--limits-url", default=None, help="controller limits API base URL (default: static limits)")
    group.add_argument("--limits-poll-s", type=float, default=2.0, help="poll interval (default: %(default)s)")
    group.add_argument(
        "--limits-api", choices=["auto", "v1beta1", "v1alpha1"], default="auto",
        help="the limits API to ask: v1beta1 (pool document, keys and config included, watched, deltas), "
        "v1alpha1 (one document per replica, limits only; needs --config), auto: v1beta1 where the controller "
        "has it (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--limits-watch-s", type=float, default=30.0,
        help="v1beta1: hold each ask this long for a new version (0: poll every --limits-poll-s; "
        "default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--limits-expiry-s", type=float, default=60.0,
        help="after this long without a successful poll, fall back to guaranteed floors (default: %(default)s)",
    )  # fmt: skip
    # credentials for an https:// or authenticated --limits-url (tokenscaler.sidecar.limits_auth); files are re-read
    group.add_argument("--limits-ca", metavar="FILE", help="CA that signed the controller's certificate (PEM)")
    group.add_argument("--limits-client-cert", metavar="FILE", help="client certificate for mutual TLS (PEM)")
    group.add_argument("--limits-client-key", metavar="FILE", help="its private key (PEM, unencrypted)")
    group.add_argument("--limits-token-file", metavar="FILE", help="send the first token in FILE as a bearer token")
    group = parser.add_argument_group("admission")
    group.add_argument(
        "--trust-header", default=None, metavar="NAME",
        help="take the entitlement name from this header set by a trusted gateway (off: clients could forge it)",
    )  # fmt: skip
    group.add_argument("--queue-size", type=int, default=32, help="queued guaranteed requests per entitlement (0: off)")
    group.add_argument(
        "--queue-max-wait-s", type=float, default=2.0, help="longest a guaranteed request waits (default: %(default)s)"
    )
    group.add_argument(
        "--preempt", action=argparse.BooleanOptionalAction, default=True,
        help="cut what lower tiers hold on idle capacity (spot first, then elastic backfill) when a higher "
        "tier needs the replica back (default: on)",
    )  # fmt: skip
    group.add_argument(
        "--interval-s", type=float, default=5.0,
        help="the controller's interval: how long lower tiers yield this replica's idle capacity after a higher "
        "tier was refused for it, and the window tier inversions are counted in (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--prompt-tokens", choices=["rule", "tokenize"], default="rule",
        help="count prompts by the shared rule, or ask the upstream's /tokenize (default: %(default)s)",
    )  # fmt: skip
    group.add_argument("--max-body-bytes", type=int, default=16 * 2**20, help="larger bodies get 413")
    group.add_argument("--retry-after-max-s", type=float, default=60.0, help="cap of Retry-After (default: 60)")
    group.add_argument(
        "--replica-window-s", type=float, default=1.0,
        help="depth of the replica-wide backfill bucket, in seconds of replica throughput (default: 1)",
    )  # fmt: skip
    group.add_argument("--upstream-connections", type=int, default=512, help="connection pool size to the upstream")
    group.add_argument(
        "--engine-limits", choices=["on", "off"], default="on",
        help="read the engine's KV capacity (/metrics) and context window (/v1/models) at start and on each "
        "restart; the smaller of engine and config governs admission (default: on)",
    )  # fmt: skip
    group.add_argument(
        "--engine-poll-s", type=float, default=10.0,
        help="how often to look for an engine restart (one /metrics read; default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--access-log", choices=["on", "off"], default="on",
        help="one JSON line per finished request on stderr (entitlement, tier, status, tokens, refused "
        "dimension, duration; never the API key), at INFO (default: on)",
    )  # fmt: skip
    add_log_level(parser)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from aiohttp import web

    from tokenscaler.cli import runtime
    from tokenscaler.config import load_config
    from tokenscaler.core.limiter import Limiter
    from tokenscaler.core.validation import ConfigError
    from tokenscaler.sidecar.engine_limits import EngineCapacity
    from tokenscaler.sidecar.gatekeeper import Gatekeeper
    from tokenscaler.sidecar.limits import HttpLimitsSource, LimitsSource, StaticLimitsSource, describe
    from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics
    from tokenscaler.sidecar.pool_source import PoolLimitsSource
    from tokenscaler.sidecar.proxy import Sidecar, SidecarOptions

    setup_logging(args.log_level)
    _setup_access_log(args.log_level if args.access_log == "on" else None)
    log = logging.getLogger("tokenscaler.sidecar")
    if args.engine_poll_s <= 0:
        return fail("sidecar", f"--engine-poll-s ({args.engine_poll_s:g}) must be > 0", 2)
    if args.interval_s <= 0:
        return fail("sidecar", f"--interval-s ({args.interval_s:g}) must be > 0", 2)
    host, port = args.listen
    if args.config is None and not args.limits_url:
        return fail("sidecar", "--config FILE is needed without --limits-url (the limits and keys come from it)", 2)
    if args.config is None and args.limits_api == "v1alpha1":
        return fail("sidecar", "--limits-api v1alpha1 needs --config FILE (that API sends no keys or config)", 2)
    if args.limits_watch_s < 0:
        return fail("sidecar", f"--limits-watch-s ({args.limits_watch_s:g}) must be >= 0", 2)
    config = None
    try:
        if args.config is not None:
            config = load_config(args.config)
            config.pool(args.pool)
        limits_auth = _limits_auth(args)
    except ConfigError as e:
        return config_error(e)
    except KeyError:
        known = ", ".join(p.name for p in config.pools) if config is not None else ""
        return fail("sidecar", f"--pool {args.pool!r} is not in {args.config} (pools: {known})")

    async def serve() -> int:
        nonlocal config
        try:
            proxy_sock = bind("--listen", host, port)
            metrics_sock = bind("--metrics-port", host, args.metrics_port)
        except OSError as e:
            return fail("sidecar", str(e))
        shown = f"[{host}]" if ":" in host else host
        actual_port = proxy_sock.getsockname()[1]
        replica = args.replica_id or os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or f"{host}:{actual_port}"
        loop = asyncio.get_running_loop()
        source: LimitsSource
        pool_source: PoolLimitsSource | None = None
        if args.limits_url and args.limits_api != "v1alpha1":
            pool_source = PoolLimitsSource(
                config, args.pool, args.limits_url, replica=replica, replicas=args.replicas,
                watch_s=args.limits_watch_s, api=args.limits_api, poll_s=args.limits_poll_s,
                expiry_s=args.limits_expiry_s, auth=limits_auth,
            )  # fmt: skip
            if config is None:
                log.info("no --config: waiting for pool %s's first document from %s", args.pool, args.limits_url)
                config = await pool_source.first_config()
                pool_source.adopt(config)
        assert config is not None
        try:
            pool = config.pool(args.pool)
        except KeyError:
            return fail("sidecar", f"the controller at {args.limits_url} has no pool {args.pool!r}")
        limiter = Limiter(
            pool, now=loop.time(), preempt=args.preempt, replica_window_s=args.replica_window_s,
            interval_s=args.interval_s,
        )  # fmt: skip
        stats = [EntitlementStats(e.name, e.tier.value) for e in config.entitlements_of(pool.name)]
        metrics = SidecarMetrics(pool.name, replica, limiter, stats)
        gate = Gatekeeper(limiter, metrics, queue_size=args.queue_size, max_wait_s=args.queue_max_wait_s)
        if pool_source is not None:
            source = pool_source
        elif args.limits_url:
            source = HttpLimitsSource(
                config, pool.name, args.limits_url, replica=replica, replicas=args.replicas,
                poll_s=args.limits_poll_s, expiry_s=args.limits_expiry_s, auth=limits_auth,
            )  # fmt: skip
        else:
            source = StaticLimitsSource(config, pool.name, args.replicas)
        metrics.limits_age = source.age_s
        metrics.limits_fetch_errors = lambda: source.fetch_errors_by_reason
        initial = source.initial()
        gate.apply(initial, loop.time())
        log.info("limits (%s): %s", initial.state, describe(initial.limits))
        if limits_auth is not None:
            log.info("limits source credentials: %s", limits_auth.describe())
        options = SidecarOptions(
            max_body_bytes=args.max_body_bytes,
            trust_header=args.trust_header,
            tokenize=args.prompt_tokens == "tokenize",
            retry_after_max_s=args.retry_after_max_s,
            upstream_connections=args.upstream_connections,
            access_log=args.access_log == "on",
        )
        sidecar = Sidecar(config, pool.name, args.upstream, gate, metrics, options)
        engine = EngineCapacity(args.upstream, poll_s=args.engine_poll_s) if args.engine_limits == "on" else None
        if engine is not None:  # before serving, so the first request is judged against the engine
            await engine.read_once(sidecar.apply_engine)
        runner = web.AppRunner(sidecar.app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        await web.SockSite(runner, proxy_sock).start()
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", _metrics_handler(metrics))
        metrics_runner = web.AppRunner(metrics_app, access_log=None)
        await metrics_runner.setup()
        await web.SockSite(metrics_runner, metrics_sock).start()
        print(f"tokenscaler sidecar: pool {pool.name}, replica {replica}, upstream {args.upstream}", flush=True)
        print(f"tokenscaler sidecar listening on http://{shown}:{actual_port}", flush=True)
        print(f"tokenscaler sidecar metrics on http://{shown}:{metrics_sock.getsockname()[1]}", flush=True)

        def apply(update: LimitsUpdate) -> None:
            gate.apply(update, loop.time())
            sidecar.budgets.apply(update.budgets)  # spent budgets to refuse (the documents' budget blocks)
            if update.version is not None and update.version.isdigit():
                metrics.limits_version = int(update.version)
            if pool_source is not None and pool_source.generation is not None:
                metrics.config_generation = pool_source.generation

        def on_config(new: TokenPoolsConfig) -> None:
            changes = sidecar.apply_config(new, loop.time())
            generation = pool_source.view.generation if pool_source is not None else None
            log.info("config generation %s from the controller: %d entitlements%s", generation,
                     len(new.entitlements), "".join(f"; {c}" for c in changes))  # fmt: skip

        if pool_source is not None:
            pool_source.on_config = on_config

        watcher = None
        if args.config is not None and not args.limits_url:  # the file is this sidecar's config: re-read it
            from tokenscaler.sidecar.config_file import SidecarConfigFile

            def reconfigure(new: TokenPoolsConfig) -> None:
                changes = sidecar.apply_config(new, loop.time())
                gate.apply(StaticLimitsSource(new, pool.name, args.replicas).initial(), loop.time())
                log.info("config %s re-read: %d entitlements%s", args.config, len(new.entitlements),
                         "".join(f"; {c}" for c in changes) or "; limits changed")  # fmt: skip

            watcher = SidecarConfigFile(args.config, config, pool.name, reconfigure)
            metrics.config_reload_failures = lambda: watcher.failures if watcher is not None else 0
            loop.add_signal_handler(signal.SIGHUP, watcher.request)
            watcher_task = asyncio.create_task(watcher.run(), name="config-file")
        source_task = asyncio.create_task(source.run(apply), name="limits-source")
        source_task.add_done_callback(_log_source_failure)
        engine_task = asyncio.create_task(engine.run(sidecar.apply_engine), name="engine") if engine else None
        # the config, models and modules are permanent: keep them out of every collection, and
        # collect the young generation less often (aiohttp allocates a few hundred objects per request)
        runtime.settle_heap(young_threshold=20_000)
        await runtime.until_signal()
        source_task.cancel()
        if watcher is not None:
            watcher_task.cancel()
        if engine_task is not None:
            engine_task.cancel()
        await runner.cleanup()
        await metrics_runner.cleanup()
        return EXIT_OK

    return runtime.run(serve)


def _limits_auth(args: argparse.Namespace) -> LimitsClientAuth | None:
    """The credentials for the limits source; ``ValueError`` naming a flag or a file that is unusable."""
    from tokenscaler.sidecar.limits_auth import LimitsClientAuth

    flags = ("limits_ca", "limits_client_cert", "limits_client_key", "limits_token_file")
    given = [f for f in flags if getattr(args, f)]
    if not given:
        return None
    if not args.limits_url:
        raise ValueError(f"--{given[0].replace('_', '-')} needs --limits-url")
    if bool(args.limits_client_cert) != bool(args.limits_client_key):
        raise ValueError("--limits-client-cert and --limits-client-key go together")
    tls = args.limits_ca or args.limits_client_cert
    if tls and not args.limits_url.startswith("https://"):
        raise ValueError(f"--limits-ca and --limits-client-cert need an https:// --limits-url, got {args.limits_url!r}")
    return LimitsClientAuth(
        ca=args.limits_ca, client_cert=args.limits_client_cert, client_key=args.limits_client_key,
        token_file=args.limits_token_file,
    )  # fmt: skip
def _setup_access_log(level: str | None) -> None:
    """The access log: bare JSON lines on stderr (one per finished request), or silenced."""
    import logging
    import sys

    access = logging.getLogger("tokenscaler.sidecar.access")
    access.propagate = False
    if level is None:
        access.disabled = True
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(level)


def _log_source_failure(task: asyncio.Task[None]) -> None:
    import logging

    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("tokenscaler.sidecar").error(
            "the limits source stopped; the limits in force now stay", exc_info=task.exception()
        )


def _metrics_handler(metrics: SidecarMetrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler
