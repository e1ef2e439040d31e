"""``tokenscaler webhook``: the admission webhooks over HTTPS.

    tokenscaler webhook --listen ADDR --tls-cert FILE --tls-key FILE (--config FILE | --source kubernetes)

Prints ``tokenscaler webhook listening on https://HOST:PORT`` once it accepts connections;
stops on SIGTERM. With ``--source kubernetes`` it lists and watches the TokenPools and
Entitlements of ``--namespace`` (``/readyz`` is not ready until both are listed). The
certificate files are re-read when they change (cert-manager rotates them in place).
"""

from __future__ import annotations

import argparse
import sys


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tokenscaler.kube.webhook import SidecarOptions

    d = SidecarOptions()
    p.add_argument("--listen", type=_address, default="0.0.0.0:8443", metavar="ADDR", help="default 0.0.0.0:8443")
    p.add_argument("--tls-cert", required=True, metavar="FILE", help="serving certificate chain (PEM)")
    p.add_argument("--tls-key", required=True, metavar="FILE", help="its private key (PEM)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="FILE", help="check against this token-pools config file")
    src.add_argument("--source", choices=["kubernetes"], help="check against the TokenPools and Entitlements")
    p.add_argument("--namespace", default=None, help="namespace to watch (default: this pod's)")
    p.add_argument("--max-body-bytes", type=int, default=3 * 2**20, help="larger reviews get 400 (default 3 MiB)")
    g = p.add_argument_group("sidecar injection")
    g.add_argument("--sidecar-image", default=d.image, help="default %(default)s")
    g.add_argument("--sidecar-port", type=int, default=d.port, help="proxy port the serving port moves to")
    g.add_argument("--sidecar-metrics-port", type=int, default=d.metrics_port)
    g.add_argument("--limits-url", default=d.limits_url, help="controller admission API (empty: static limits)")
    g.add_argument("--sidecar-config-map", default=d.config_map, help="ConfigMap holding the config (pod's namespace)")
    g.add_argument("--sidecar-cpu", default=d.cpu_request, help="CPU request")
    g.add_argument("--sidecar-memory", default=d.memory_request, help="memory request")
    g.add_argument("--sidecar-memory-limit", default=d.memory_limit, help="memory limit")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    import logging

    from tokenscaler import runtime

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_body_bytes <= 0:
        print(f"tokenscaler webhook: --max-body-bytes ({args.max_body_bytes}) must be > 0", file=sys.stderr)
        return 2
    return runtime.run(lambda: _main(args))


async def _main(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import logging
    import os

    from aiohttp import web

    from tokenscaler import runtime
    from tokenscaler.core.model import ConfigError, TokenPoolsConfig, load_config
    from tokenscaler.kube.webhook import SidecarOptions, Webhook, server_tls

    try:
        ctx = server_tls(args.tls_cert, args.tls_key)
    except ValueError as e:
        print(f"tokenscaler webhook: {e}", file=sys.stderr)
        return 1
    watch = None
    static: TokenPoolsConfig | None = None
    if args.config:
        try:
            static = load_config(args.config)
        except ConfigError as e:
            for line in e.errors:
                print(f"{e.source}: {line}", file=sys.stderr)
            return 1
    else:
        from tokenscaler.kube.client import api_client, in_cluster_namespace
        from tokenscaler.kube.operator import CrWatch

        watch = CrWatch(api_client(), args.namespace or in_cluster_namespace())
        await watch.start()

    def config() -> TokenPoolsConfig | None:
        return static if watch is None else watch.config()

    opts = SidecarOptions(
        image=args.sidecar_image,
        port=args.sidecar_port,
        metrics_port=args.sidecar_metrics_port,
        limits_url=args.limits_url or None,
        config_map=args.sidecar_config_map,
        cpu_request=args.sidecar_cpu,
        memory_request=args.sidecar_memory,
        memory_limit=args.sidecar_memory_limit,
    )
    hook = Webhook(config, opts, max_body_bytes=args.max_body_bytes, ready=lambda: watch is None or watch.synced())
    runner = web.AppRunner(hook.app(), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = args.listen
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ctx)
        await site.start()
    except OSError as e:
        print(f"tokenscaler webhook: {e}", file=sys.stderr)
        await runner.cleanup()
        return 1
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"tokenscaler webhook listening on https://{host}:{bound}", flush=True)

    def mtimes() -> tuple[float, float]:
        try:
            return os.stat(args.tls_cert).st_mtime, os.stat(args.tls_key).st_mtime
        except OSError:
            return 0.0, 0.0

    async def reload_certs() -> None:
        seen = mtimes()
        while True:
            await asyncio.sleep(30)
            now = mtimes()
            if now != seen:
                seen = now
                try:
                    ctx.load_cert_chain(args.tls_cert, args.tls_key)  # new connections get the new pair
                    logging.getLogger("tokenscaler.kube.webhook").info("reloaded the serving certificate")
                except (OSError, ValueError) as e:
                    logging.getLogger("tokenscaler.kube.webhook").warning("kept the old certificate: %s", e)

    reloader = asyncio.create_task(reload_certs())
    try:
        await runtime.until_signal()
    finally:
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader
        await runner.cleanup()
        if watch is not None:
            await watch.stop()
    return 0
