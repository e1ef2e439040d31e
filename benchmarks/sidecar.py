"""Benchmark of the rate-limit sidecar: the latency it adds and what one core of it sustains.

Run: ``.venv/bin/python benchmarks/sidecar.py`` (``--quick`` for a shorter run). Loopback only.

Setup (2-core machine): a minimal aiohttp upstream that answers instantly (so the sidecar's
cost is what is measured; it speaks the OpenAI shapes with ``usage``, and streams N SSE
chunks), ``tokenscaler sidecar`` in front of it pinned to CPU 0, and the upstream and the
open-loop load generator (aiohttp, uvloop) pinned to CPU 1. Every request goes through the
whole admission path (key lookup, body parse, estimate, three-dimensional admission,
reconciliation, metrics) of one guaranteed entitlement whose limits never bind.

1. Added latency: at several request rates (uniform arrivals), the same requests sent
   directly to the upstream, through a bare aiohttp pass-through proxy with no logic (the
   floor of the HTTP stack on this machine) and through the sidecar: p50/p99 of the full response time
   (non-streamed) and of the time to the first chunk and to the end (streamed, 8 chunks),
   the difference (added) and the ratio. Goal: <= 0.5 ms p50 and <= 2 ms p99 added at 200 req/s.
   The same rows for the Responses API (``/v1/responses``, typed SSE events, usage from
   ``response.completed``), and the added latency of each next to chat's (goal: within 10%).
2. Capacity: closed-loop clients saturating the sidecar: requests/s (non-streamed) and
   streamed chunks/s (streams of 200 chunks), with the sidecar's CPU use read from
   ``/proc``; "per core" is the throughput divided by the fraction of a core it used.
0. Sequential (first): one request at a time, non-streamed chat, in interleaved blocks: direct,
   bare, the sidecar as deployed (access log on, written to a file; engine limits read from the
   upstream's /metrics and /v1/models), and opt-in: ``--suspects`` (the same sidecar with its
   access log off, with its engine-limit reads off), ``--tree DIR`` (the sidecar of another source
   tree: a paired before/after of two builds), ``--litellm EXE`` (LiteLLM's proxy from an install
   of its own, never a dependency of this project, with one openai-compatible model entry
   pointing at the same upstream): added p50/p99, paired block differences, and LiteLLM's added
   latency over the sidecar's (goal: <= +0.5 ms p50, <= +2 ms p99, >= 20x).
   ``--only-sequential`` runs only this cell; ``--sequential-api responses`` sends the Responses
   API's requests instead of chat's.
3. Many entitlements (``--entitlements N``, default 10,000): a second sidecar, without a
   config, holding N entitlements from the real controller (``benchmarks/fleet.py``'s config,
   its synthetic exporter moving demand so that every 2-s interval publishes new limits),
   beside the static one at 200 req/s: what holding and applying the documents adds to p99
   (goal: <= 1 ms), and that sidecar's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenscaler.core.model import hash_api_key  # noqa: E402

KEY = "sk-bench"
LITELLM_KEY = "sk-" + hash_api_key(KEY)  # LiteLLM's master key (it refuses a weak one)
LISTEN_RE = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say hello to the benchmark, please."}]}
RESPONSES = {"model": "bench", "input": "Say hello to the benchmark, please."}
APIS = {  # api -> (path, body, output-limit field)
    "chat": ("/v1/chat/completions", CHAT, "max_tokens"),
    "responses": ("/v1/responses", RESPONSES, "max_output_tokens"),
}


# ---- the upstream: a process of its own -------------------------------------------------


def serve_upstream(port: int) -> None:
    """A minimal OpenAI-compatible upstream: instant answers, streams of ``chunks`` events."""
    import uvloop
    from aiohttp import web

    def chunk(i: int) -> bytes:
        obj = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "abcd"}}]}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    piece = chunk(0)

    def event(kind: str, data: dict) -> bytes:  # type: ignore[type-arg]
        payload = json.dumps({"type": kind, **data}, separators=(",", ":")).encode()
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    where = {"item_id": "m", "output_index": 0, "content_index": 0}
    delta = event("response.output_text.delta", {**where, "delta": "abcd"})

    async def responses(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        n = int(body.get("max_output_tokens") or 8)
        usage = {"input_tokens": 12, "output_tokens": n, "total_tokens": 12 + n}
        part = {"type": "output_text", "text": "abcd" * n, "annotations": []}
        item = {"id": "m", "type": "message", "role": "assistant", "status": "completed", "content": [part]}
        out = {"id": "r", "object": "response", "model": "bench", "status": "completed", "output": [item]}
        out["usage"] = usage
        if not body.get("stream"):
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(event("response.created", {"response": {**out, "status": "in_progress", "output": []}}))
        for _ in range(n):
            await resp.write(delta)
        await resp.write(event("response.completed", {"response": out}))
        await resp.write_eof()
        return resp

    async def completions(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        n = int(body.get("max_tokens") or 8)
        prompt = 12
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "abcd" * n}
            choice = {"index": 0, "message": message, "finish_reason": "length"}
            out = {"id": "c", "object": "chat.completion", "model": "bench", "choices": [choice], "usage": usage}
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(n):
            await resp.write(piece)
        tail = b""
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = b"data: " + json.dumps({"id": "c", "choices": [], "usage": usage}).encode() + b"\n\n"
        await resp.write(tail + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # what a vLLM engine states of itself, so the sidecar reads its engine's limits as it does in
    # production (KV 1e7 tokens and the config's 4,096-token window: nothing changes admission)
    metrics = 'vllm:cache_config_info{block_size="16",num_gpu_blocks="625000"} 1.0\nprocess_start_time_seconds 1.0\n'

    async def engine_metrics(request: web.Request) -> web.Response:
        return web.Response(text=metrics, content_type="text/plain")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model",
                                                              "max_model_len": 4096}]})  # fmt: skip

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/metrics", engine_metrics)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_post("/v1/responses", responses)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"upstream listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_bare_proxy(port: int, upstream: str) -> None:
    """The floor: an aiohttp pass-through proxy with no logic at all (same server, same client)."""
    import aiohttp
    import uvloop
    from aiohttp import web
    from yarl import URL

    async def main() -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512), skip_auto_headers=("Accept-Encoding",), auto_decompress=False
        )
        urls = {path: URL(upstream + path) for path, _, _ in APIS.values()}

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            url = urls[request.path]
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
                    return web.Response(body=await r.read(), headers={"Content-Type": r.headers["Content-Type"]})
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                while data := await r.content.readany():
                    await resp.write(data)
                await resp.write_eof()
                return resp

        app = web.Application()
        for path in urls:
            app.router.add_post(path, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"bare proxy listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# ---- processes -------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    args: list[str], cpu: int, stderr: int | IO[str] = subprocess.STDOUT, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO, env=env)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(proc.pid, {cpu})
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := LISTEN_RE.search(line):
            return proc, m[1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{args[:4]} did not start")


def bench_config(directory: Path) -> Path:
    """The sidecar's config: one guaranteed entitlement (key ``KEY``) on a pool far larger than the load."""
    config = directory / "bench.yaml"
    big = {"throughput_tokens_per_s": 1e6, "kv_tokens": 1e7, "concurrency": 1e5}
    config.write_text(json.dumps({
        "pools": [{"name": "bench", "replica": big, "max_replicas": 1, "target_utilization": 1.0,
                   "max_model_len": 4096, "default_max_tokens": 8}],
        "entitlements": [{"name": "gold", "pool": "bench", "tier": "guaranteed", "guaranteed": big,
                          "burst": {"throughput_tokens_per_s": 1e7}, "api_keys": [hash_api_key(KEY)]}],
    }))  # fmt: skip
    return config


def client_cpus() -> tuple[int, int]:
    """(the sidecars' CPU, the load generator's and upstream's); pins this process to the second."""
    cpus = (0, 1) if (os.cpu_count() or 1) >= 2 else (0, 0)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {cpus[1]})
    return cpus


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    """Terminate ``procs``, newest first, waiting up to 5 s for each."""
    for p in reversed(procs):
        p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)


@contextlib.contextmanager
def processes(cpus: tuple[int, int]) -> Iterator[tuple[str, str, str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(Path(tmp))
        up_port = _free_port()
        upstream, up_url = _start([sys.executable, __file__, "--serve-upstream", str(up_port)], cpus[1])
        sidecar, sc_url = _start(
            [sys.executable, "-m", "tokenscaler", "sidecar", "--listen", "127.0.0.1:0", "--metrics-port", "0",
             "--upstream", up_url, "--config", str(config), "--pool", "bench", "--queue-size", "0",
             "--log-level", "WARNING"],
            cpus[0],
        )  # fmt: skip
        bare, bare_url = _start(
            [sys.executable, __file__, "--serve-bare-proxy", str(_free_port()), "--upstream", up_url], cpus[0]
        )
        try:
            yield up_url, bare_url, sc_url, sidecar.pid
        finally:
            stop_all([upstream, bare, sidecar])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- load ------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)]


async def open_loop(session, url: str, rate: float, duration_s: float, stream: bool, api: str = "chat") -> dict[str, list[float]]:  # type: ignore[no-untyped-def]  # noqa: E501
    path, base, limit = APIS[api]
    body = json.dumps({**base, limit: 8, "stream": stream}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    first: list[float] = []
    total: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        t0 = time.perf_counter()
        async with session.post(url + path, data=body, headers=headers) as r:
            if r.status != 200:
                errors += 1
            if stream:
                await r.content.readany()
                first.append(time.perf_counter() - t0)
            await r.read()
        total.append(time.perf_counter() - t0)

    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    tasks = []
    n = int(rate * duration_s)
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    if errors:
        raise RuntimeError(f"{errors} requests failed")
    return {"first": first, "total": total}


async def closed_loop(session, url: str, clients: int, duration_s: float, chunks: int | None) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Requests (or chunks) per second completed by ``clients`` back-to-back clients."""
    stream = chunks is not None
    body = json.dumps({**CHAT, "max_tokens": chunks or 8, "stream": stream}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    done = 0
    events = 0
    stop = time.perf_counter() + duration_s

    async def client() -> None:
        nonlocal done, events
        while time.perf_counter() < stop:
            async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                data = await r.read()
                assert r.status == 200, data[:200]
            done += 1
            if stream:
                events += data.count(b"data: ") - 1  # not [DONE]

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    return done / elapsed, events / elapsed


# ---- the report ------------------------------------------------------------------------


async def run(rates: list[float], duration_s: float, cap_s: float) -> None:
    import aiohttp

    cpus = client_cpus()
    with processes(cpus) as (up_url, bare_url, sc_url, sc_pid):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for url in (up_url, bare_url, sc_url):  # warm up connections and code paths
                for api in APIS:
                    await open_loop(session, url, 200, 1.0, False, api)
                    await open_loop(session, url, 200, 1.0, True, api)
            print(f"# latency (ms), {duration_s:g} s per cell in 1-s blocks, uniform arrivals, 8-token answers")
            print("# direct: client -> upstream; bare: a no-logic aiohttp pass-through proxy (the floor of the stack);")
            print("# sidecar: the full admission path. added = sidecar - direct; ratio = sidecar / direct")
            head = (
                f"{'mode':<19}{'req/s':>6} | {'direct p50':>10}{'p99':>7} | {'bare p50':>8}{'p99':>7} | "
                f"{'sidecar p50':>11}{'p99':>7} | {'added p50':>9}{'p99':>7} | {'ratio p50':>9}{'p99':>6}"
            )
            print(head)
            print("-" * len(head))
            added: dict[tuple[str, str, float], tuple[float, float]] = {}
            for stream in (False, True):
                for rate in rates:
                    # interleave 1-second blocks (and the two APIs) so that drift in the machine's load hits all alike
                    results = {
                        (api, url): {"first": [], "total": []} for api in APIS for url in (up_url, bare_url, sc_url)
                    }
                    for _ in range(max(int(duration_s), 1)):
                        for (api, url), out in results.items():
                            block = await open_loop(session, url, rate, 1.0, stream, api)
                            for k in out:
                                out[k].extend(block[k])
                    for api, key in ((a, k) for a in APIS for k in (("first", "total") if stream else ("total",))):
                        label = ("stream " + ("first" if key == "first" else "end")) if stream else "non-stream"
                        label = f"{'resp ' if api == 'responses' else ''}{label}"
                        (d50, d99), (b50, b99), (v50, v99) = (
                            (_pct(results[api, u][key], 0.5) * 1e3, _pct(results[api, u][key], 0.99) * 1e3)
                            for u in (up_url, bare_url, sc_url)
                        )
                        added[api, ("stream " if stream else "") + key, rate] = (v50 - d50, v99 - d99)
                        print(
                            f"{label:<19}{rate:>6g} | {d50:>10.3f}{d99:>7.2f} | {b50:>8.3f}{b99:>7.2f} | "
                            f"{v50:>11.3f}{v99:>7.2f} | {v50 - d50:>9.3f}{v99 - d99:>7.2f} | "
                            f"{v50 / d50:>9.2f}{v99 / d99:>6.2f}"
                        )
            print()
            print("# Responses API vs chat: added latency p50 (ms), and responses - chat as a share of chat's")
            for (api, key, rate), (a50, _) in added.items():
                if api != "responses":
                    continue
                c50 = added["chat", key, rate][0]
                share = (a50 - c50) / c50 if c50 > 0 else float("nan")
                print(f"{key:<14}{rate:>6g} req/s | chat {c50:>7.3f} | responses {a50:>7.3f} | {share:>+7.1%}")
            print()
            print(f"# capacity through the sidecar (pinned to CPU {cpus[0]}), {cap_s:g} s each, closed loop")
            for label, clients, chunks in (("non-streamed", 64, None), ("streamed x200", 16, 200)):
                c0, t0 = cpu_seconds(sc_pid), time.perf_counter()
                req_s, chunk_s = await closed_loop(session, sc_url, clients, cap_s, chunks)
                busy = (cpu_seconds(sc_pid) - c0) / (time.perf_counter() - t0)
                if chunks is None:
                    per_core = req_s / busy
                    print(
                        f"{label:<14} {req_s:>8.0f} req/s at {busy:5.0%} of a core -> {per_core:>8.0f} req/s per core"
                    )
                else:
                    print(
                        f"{label:<14} {chunk_s:>8.0f} chunks/s ({req_s:.0f} streams/s) at {busy:5.0%} of a core -> "
                        f"{chunk_s / busy:>8.0f} chunks/s per core"
                    )


async def many_entitlements(n: int, duration_s: float, rate: float) -> None:
    """The cell of a sidecar holding ``n`` entitlements from the real controller, whose limits
    documents change every interval (2 s here), beside the same sidecar with one static
    entitlement, interleaved in 1-second blocks at ``rate`` req/s (non-streamed)."""
    import aiohttp

    sys.path.insert(0, str(REPO / "benchmarks"))
    from fleet import fleet_config  # benchmarks/fleet.py: the same N-entitlement config

    cpus = client_cpus()
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as tmp, processes(cpus) as (up_url, _bare, sc_url, _pid):
        cfg = Path(tmp) / "fleet.yaml"
        fleet_config(n, cfg, extra_key=hash_api_key(KEY))
        exporter = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "fleet_exporter.py"), str(n), "1",
                                     "bench"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(exporter)
        try:
            port = int(exporter.stdout.readline())  # type: ignore[union-attr]
            scrape = Path(tmp) / "scrape.yaml"
            scrape.write_text(json.dumps({"pools": {"bench": {"engines": [f"http://127.0.0.1:{port}/e0"],
                                                              "sidecars": [f"http://127.0.0.1:{port}/s0"]}}}))
            ctl, ctl_url = _start(
                [sys.executable, "-m", "tokenscaler", "controller", "--config", str(cfg), "--scrape-config",
                 str(scrape), "--http-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0", "--interval-s", "2",
                 "--log-level", "WARNING"], cpus[1],
            )  # fmt: skip
            procs.append(ctl)
            metrics_port = _free_port()
            big, big_url = _start(
                [sys.executable, "-m", "tokenscaler", "sidecar", "--listen", "127.0.0.1:0", "--metrics-port",
                 str(metrics_port), "--upstream", up_url, "--pool", "bench", "--queue-size", "0", "--limits-url",
                 ctl_url, "--replica-id", "r0", "--log-level", "WARNING"], cpus[0],
            )  # fmt: skip
            procs.append(big)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                async def version() -> float:
                    async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                        text = await r.text()
                    m = re.search(r"tokenscaler_sidecar_limits_version\{[^}]*\} (\S+)", text)
                    return float(m[1]) if m else 0.0

                first = await version()
                for url in (up_url, sc_url, big_url):
                    await open_loop(session, url, rate, 1.0, False)
                results: dict[str, list[float]] = {u: [] for u in (up_url, sc_url, big_url)}
                for _ in range(max(int(duration_s), 1)):
                    for url, out in results.items():
                        out.extend((await open_loop(session, url, rate, 1.0, False))["total"])
                versions = await version() - first
            rss = 0.0
            for line in Path(f"/proc/{big.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
            (d50, d99), (s50, s99), (b50, b99) = (
                (_pct(results[u], 0.5) * 1e3, _pct(results[u], 0.99) * 1e3) for u in (up_url, sc_url, big_url)
            )
            print()
            print(f"# {n:,} entitlements from the controller, documents every 2 s ({versions:.0f} applied during "
                  f"the cell), vs 1 static entitlement; non-streamed, {rate:g} req/s, {duration_s:g} s interleaved")
            print(f"{'sidecar':<26} | {'p50 ms':>7} {'p99 ms':>7} | {'added p50':>9} {'p99':>6}")
            print(f"{'1 entitlement, static':<26} | {s50:>7.3f} {s99:>7.2f} | {s50 - d50:>9.3f} {s99 - d99:>6.2f}")
            print(f"{f'{n:,} from the controller':<26} | {b50:>7.3f} {b99:>7.2f} | {b50 - d50:>9.3f} {b99 - d99:>6.2f}")
            print(f"difference at {n:,}: p50 {b50 - s50:+.3f} ms, p99 {b99 - s99:+.2f} ms (goal: p99 <= +1 ms); "
                  f"its RSS {rss:.0f} MB")  # fmt: skip
        finally:
            stop_all(procs)


# ---- sequential: one request at a time, beside LiteLLM ---------------------------------


def _start_litellm(exe: str, up_url: str, cpu: int, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    """LiteLLM's proxy (an executable of its own install, never a dependency of this project) with one
    openai-compatible model entry pointing at the instant upstream; ready once it answers a request."""
    import urllib.request

    config = Path(tmp) / "litellm.yaml"
    config.write_text(json.dumps({
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/bench", "api_base": up_url + "/v1", "api_key": "sk-upstream"}}],
        "litellm_settings": {"telemetry": False},
        "general_settings": {"master_key": LITELLM_KEY},  # it refuses to start without one
    }))  # fmt: skip
    port = _free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR", "NO_DOCS": "True"}  # fmt: skip
    log = open(Path(tmp) / "litellm.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [exe, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(proc.pid, {cpu})
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({**CHAT, "max_tokens": 8}).encode()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {LITELLM_KEY}"}
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)
        with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=5) as r:
            if r.status == 200:
                return proc, url
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"LiteLLM's proxy did not answer; its log: {Path(tmp) / 'litellm.log'}")


async def _sequential_block(session, url: str, n: int, api: str, key: str = KEY) -> list[float]:  # type: ignore[no-untyped-def]
    path, base, limit = APIS[api]
    body = json.dumps({**base, limit: 8}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.post(url + path, data=body, headers=headers) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"{url}{path}: HTTP {r.status}")
        out.append(time.perf_counter() - t0)
    return out


async def sequential(
    blocks: int, per_block: int, litellm: str | None, trees: list[str], suspects: bool, api: str = "chat"
) -> None:
    """Non-streamed requests of ``api`` (chat, or the Responses API) one at a time (the next sent
    when the last has been read), the same client for every target, in interleaved blocks of
    ``per_block`` requests: the instant upstream directly, the bare proxy, the sidecar as it runs
    by default (access log on, at INFO, written to a file; engine limits read), with ``suspects``
    the same sidecar with each of them off, a sidecar of each source tree in ``trees`` (another
    build, for a paired before/after), and with ``litellm`` LiteLLM's proxy against the same
    upstream."""
    import aiohttp

    cpus = client_cpus()
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as tmp, processes(cpus) as (up_url, bare_url, _sc, _pid):
        config = bench_config(Path(tmp))
        variants: list[tuple[str, str, list[str]]] = [("sidecar", str(REPO), [])]  # (label, source tree, flags)
        if suspects:
            variants += [("  access log off", str(REPO), ["--access-log", "off"]),
                         ("  engine limits off", str(REPO), ["--engine-limits", "off"])]  # fmt: skip
        variants += [(f"tree {i}", str(Path(t).resolve()), []) for i, t in enumerate(trees)]
        targets: dict[str, str] = {"direct": up_url, "bare": bare_url}
        try:
            for label, tree, flags in variants:
                logf = open(Path(tmp) / f"access-{len(procs)}.log", "w")  # noqa: SIM115 - the process's stderr
                proc, url = _start(
                    [sys.executable, "-m", "tokenscaler", "sidecar", "--listen", "127.0.0.1:0", "--metrics-port",
                     "0", "--upstream", up_url, "--config", str(config), "--pool", "bench", "--queue-size", "0",
                     "--log-level", "INFO", *flags],
                    cpus[0], stderr=logf, env={**os.environ, "PYTHONPATH": tree},
                )  # fmt: skip
                procs.append(proc)
                targets[label] = url
            if litellm:
                proc, url = _start_litellm(litellm, up_url, cpus[0], Path(tmp))
                procs.append(proc)
                targets["litellm"] = url
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                keys = {label: LITELLM_KEY if label == "litellm" else KEY for label in targets}
                for label, url in targets.items():  # warm up connections and code paths
                    await _sequential_block(session, url, 200, api, keys[label])
                times: dict[str, list[float]] = {k: [] for k in targets}
                block_p50: dict[str, list[float]] = {k: [] for k in targets}
                for _ in range(blocks):
                    for label, url in targets.items():
                        block = await _sequential_block(session, url, per_block, api, keys[label])
                        times[label].extend(block)
                        block_p50[label].append(_pct(block, 0.5))
            lines = sum(1 for p in Path(tmp).glob("access-0.log") for line in p.open() if line.startswith("{"))
        finally:
            stop_all(procs)
    d50, d99 = _pct(times["direct"], 0.5) * 1e3, _pct(times["direct"], 0.99) * 1e3
    print()
    print(f"# sequential: non-streamed {api}, one request at a time, {blocks} interleaved blocks of {per_block} per "
          f"target ({blocks * per_block} each); added = target - direct (ms); the default sidecar wrote "
          f"{lines} access-log lines")  # fmt: skip
    print("# paired: the median over blocks of (this target's block p50 - the default sidecar's in the same round)")
    print(f"{'target':<20} | {'p50':>7} {'p99':>7} | {'added p50':>9} {'p99':>6} | {'paired vs sidecar':>17}")
    added: dict[str, tuple[float, float]] = {}
    for label, values in times.items():
        v50, v99 = _pct(values, 0.5) * 1e3, _pct(values, 0.99) * 1e3
        added[label] = (v50 - d50, v99 - d99)
        paired = _pct([a - b for a, b in zip(block_p50[label], block_p50["sidecar"], strict=True)], 0.5) * 1e3
        print(f"{label:<20} | {v50:>7.3f} {v99:>7.2f} | {v50 - d50:>+9.3f} {v99 - d99:>+6.2f} | {paired:>+17.3f}")
    if "litellm" in added:
        (l50, l99), (s50, s99) = added["litellm"], added["sidecar"]
        print(f"LiteLLM's added latency / the sidecar's: p50 {l50 / s50:.1f}x, p99 {l99 / s99:.1f}x "
              "(goal: sidecar <= +0.5 ms p50, <= +2 ms p99, >= 20x)")  # fmt: skip
    else:
        print("(LiteLLM's proxy not measured: --litellm PATH-TO-ITS-EXECUTABLE adds it)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter cells (2 s) and fewer rates")
    parser.add_argument("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare-proxy", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--entitlements", type=int, default=10_000,
                        help="the cell of a sidecar holding this many from the controller (0: skip)")  # fmt: skip
    parser.add_argument("--only-entitlements", action="store_true", help="run only that cell")
    parser.add_argument("--only-sequential", action="store_true", help="run only the sequential cell")
    parser.add_argument("--litellm", metavar="EXE", default=None,
                        help="LiteLLM's proxy executable (its own install): the sequential cell adds it")  # fmt: skip
    parser.add_argument("--suspects", action="store_true",
                        help="the sequential cell adds the sidecar with its access log off and its engine-limit "
                        "reads off")  # fmt: skip
    parser.add_argument("--tree", action="append", default=[], metavar="DIR",
                        help="the sequential cell adds the sidecar of this source tree (another build; repeatable)")
    parser.add_argument("--sequential-blocks", type=int, default=None, metavar="N",
                        help="interleaved blocks of the sequential cell (default: 20, 8 with --quick)")
    parser.add_argument("--sequential-api", choices=sorted(APIS), default="chat",
                        help="the API of the sequential cell's requests (default: %(default)s; LiteLLM: chat only)")
    parser.add_argument("--sequential-size", type=int, default=100, metavar="N",
                        help="requests per block of the sequential cell (default: %(default)s)")  # fmt: skip
    args = parser.parse_args()
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream)
        return 0
    if args.serve_bare_proxy is not None:
        serve_bare_proxy(args.serve_bare_proxy, args.upstream)
        return 0
    import uvloop

    blocks = args.sequential_blocks or (8 if args.quick else 20)
    if args.only_sequential:
        if args.litellm and args.sequential_api != "chat":
            parser.error("--litellm measures chat only: leave out --sequential-api or --litellm")
        uvloop.run(sequential(blocks, args.sequential_size, args.litellm, args.tree, args.suspects,
                              args.sequential_api))  # fmt: skip
        return 0
    if not args.only_entitlements:
        uvloop.run(sequential(blocks, args.sequential_size, args.litellm, args.tree, args.suspects))
        if args.quick:
            uvloop.run(run([50, 200], 2.0, 3.0))
        else:
            uvloop.run(run([50, 100, 200, 400], 5.0, 5.0))
    if args.entitlements:
        uvloop.run(many_entitlements(args.entitlements, 4.0 if args.quick else 20.0, 200.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
