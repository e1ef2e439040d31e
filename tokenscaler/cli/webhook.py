"""``tokenscaler webhook``: the admission webhooks over HTTPS.

    tokenscaler webhook --listen ADDR --tls-cert FILE --tls-key FILE (--config FILE | --source kubernetes)

Prints ``tokenscaler webhook listening on https://HOST:PORT`` once it accepts connections;
stops on SIGTERM. With ``--source kubernetes`` it lists and watches the TokenPools and
Entitlements of ``--namespace`` (``/readyz`` is not ready until both are listed). The
certificate files are re-read when they change (cert-manager rotates them in place).

Injected sidecars poll ``--limits-url`` (default the controller's HTTPS API) with the CA and
bearer token of the Secret ``--limits-secret`` in the pod's namespace, mounted as files; an
``http://`` URL must come with ``--limits-secret ''`` (no token is sent in clear).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tokenscaler.cli.common import (
    EXIT_OK,
    add_log_level,
    address,
    bind,
    config_error,
    fail,
    setup_logging,
    usage_errors,
)

if TYPE_CHECKING:
    from tokenscaler.kube.webhook import InjectedSidecar

_address = address("0.0.0.0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tokenscaler.kube.webhook import STATIC_CONFIG_MAP, InjectedSidecar

    d = InjectedSidecar()
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
    g.add_argument("--limits-url", default=d.limits_url, help="controller limits API (empty: static limits)")
    g.add_argument(
        "--limits-secret", default=d.limits_secret, metavar="NAME",
        help="Secret in the pod's namespace with ca.crt and token, mounted for --limits-ca and --limits-token-file "
        "(empty: none; default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--sidecar-config-map", default=d.config_map, metavar="NAME",
        help="ConfigMap in the pod's namespace with the config for the sidecar's --config: with --limits-url only "
        f"a bootstrap until the first document, mounted only when named; without it the only config (default "
        f"then: {STATIC_CONFIG_MAP})",
    )  # fmt: skip
    g.add_argument("--sidecar-cpu", default=d.cpu_request, help="CPU request")
    g.add_argument("--sidecar-memory", default=d.memory_request, help="memory request")
    g.add_argument("--sidecar-memory-limit", default=d.memory_limit, help="memory limit")
    add_log_level(p)


def injected_sidecar(args: argparse.Namespace) -> InjectedSidecar:
    """What the injected sidecar gets, from the flags (the manifests' tests read it the same way)."""
    from tokenscaler.kube.webhook import InjectedSidecar

    return InjectedSidecar(
        image=args.sidecar_image,
        port=args.sidecar_port,
        metrics_port=args.sidecar_metrics_port,
        limits_url=args.limits_url or None,
        limits_secret=args.limits_secret or None,
        config_map=args.sidecar_config_map,
        cpu_request=args.sidecar_cpu,
        memory_request=args.sidecar_memory,
        memory_limit=args.sidecar_memory_limit,
    )


def _check(args: argparse.Namespace) -> list[str]:
    errors = []
    if args.max_body_bytes <= 0:
        errors.append(f"--max-body-bytes ({args.max_body_bytes}) must be > 0")
    url = args.limits_url or ""
    if url and not url.startswith(("http://", "https://")):
        errors.append(f"--limits-url ({url}) must be an http:// or https:// URL")
    if url.startswith("http://") and args.limits_secret:
        errors.append(
            f"--limits-url {url} is plain HTTP: the sidecars would send the token of --limits-secret "
            f"{args.limits_secret} in clear; use https:// or --limits-secret ''"
        )
    return errors


def run(args: argparse.Namespace) -> int:
    from tokenscaler.cli import runtime

    if code := usage_errors("webhook", _check(args)):
        return code
    setup_logging(args.log_level)
    return runtime.run(lambda: _main(args))


async def _main(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from aiohttp import web

    from tokenscaler.cli import runtime
    from tokenscaler.config import load_config
    from tokenscaler.core.model import TokenPoolsConfig
    from tokenscaler.core.validation import ConfigError
    from tokenscaler.kube.webhook import Webhook
    from tokenscaler.tlsfiles import ServerTLS, TLSFileError

    try:
        tls = ServerTLS(args.tls_cert, args.tls_key)  # re-read when cert-manager rotates the files
    except TLSFileError as e:
        return fail("webhook", f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: {e}")
    watch = None
    static: TokenPoolsConfig | None = None
    if args.config:
        try:
            static = load_config(args.config)
        except ConfigError as e:
            return config_error(e)
    else:
        from tokenscaler.kube.client import api_client, in_cluster_namespace
        from tokenscaler.kube.operator import CrWatch

        watch = CrWatch(api_client(), args.namespace or in_cluster_namespace())
        await watch.start()

    def config() -> TokenPoolsConfig | None:
        return static if watch is None else watch.config()

    opts = injected_sidecar(args)
    hook = Webhook(config, opts, max_body_bytes=args.max_body_bytes, ready=lambda: watch is None or watch.synced())
    runner = web.AppRunner(hook.app(), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = args.listen
    try:
        sock = bind("--listen", host, port)
        await web.SockSite(runner, sock, ssl_context=tls.context).start()
    except OSError as e:
        await runner.cleanup()
        if watch is not None:
            await watch.stop()
        return fail("webhook", str(e))
    print(f"tokenscaler webhook listening on https://{host}:{sock.getsockname()[1]}", flush=True)
    reloader = asyncio.create_task(tls.watch(), name="webhook-tls-watch")
    try:
        await runtime.until_signal()
    finally:
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader
        await runner.cleanup()
        if watch is not None:
            await watch.stop()
    return EXIT_OK
