"""Benchmarks of the engine simulator: virtual-time fleet speed and real-time streaming capacity.

Run: ``.venv/bin/python benchmarks/sim.py`` (``--quick`` for a shorter run). Prints two tables.

1. Virtual time: 8 ``llama-3.1-8b-h100`` replicas for 10 simulated minutes at about 80% of
   their capacity (Poisson arrivals, round-robin routing, chat-like lengths). Capacity is
   measured first: one replica under 2x overload, completed requests per second once the
   queue is long. Reports wall seconds and simulated-seconds per wall-second.
2. Real time: one ``tokenscaler sim`` process pinned to CPU 0, a closed-loop aiohttp client
   on CPU 1 (loopback only) keeping C streams open. Per-token latency at the client is
   compared with the profile's ideal step time. Two engines:
   - ``demo`` as shipped (max_num_seqs 16): the per-request step cost slows steps as the
     batch grows, like a GPU does, so the server's CPU is never the limit;
   - ``demo-flat``: the demo profile with the per-request, KV and prefill terms set to 0
     (every step 30 ms whatever the batch) and max_num_seqs raised to C. Only the server's CPU can then
     slow tokens down: the largest C whose median per-token latency stays within 10% of
     the ideal is how many concurrent streams one process sustains on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenscaler.sim.engine import Engine  # noqa: E402
from tokenscaler.sim.profile import load_profile  # noqa: E402

PROFILE_8B = "llama-3.1-8b-h100"


# ---- virtual time ----------------------------------------------------------------------


def _workload(rng: np.random.Generator, rate: float, duration_s: float) -> tuple[np.ndarray, ...]:
    """Poisson arrivals with chat-like lengths: prompts ~512 tokens, max_tokens ~256 (lognormal)."""
    n = int(rate * duration_s * 1.2) + 100
    times = np.cumsum(rng.exponential(1 / rate, n))
    times = times[times < duration_s]
    prompts = np.clip(rng.lognormal(np.log(512), 0.8, times.size), 16, 8192).astype(np.int64)
    max_tokens = np.clip(rng.lognormal(np.log(256), 0.7, times.size), 16, 2048).astype(np.int64)
    return times, prompts, max_tokens


def _capacity_req_per_s(seed: int) -> float:
    """Completed requests per second of one replica kept saturated (queue never empty)."""
    profile = load_profile(PROFILE_8B)
    engine = Engine(profile, seed=seed)
    times, prompts, max_tokens = _workload(np.random.default_rng(seed), 150.0, 240.0)
    done_at: list[float] = []
    for i, (t, p, m) in enumerate(zip(times.tolist(), prompts.tolist(), max_tokens.tolist(), strict=True)):
        engine.run_until(t, lambda r: done_at.extend(r.end_s for _ in r.finished))
        engine.add_request(str(i), p, m, now=t)
    steady = [t for t in done_at if 120.0 <= t < 240.0]
    assert engine.num_waiting > 1000, "the capacity run was not saturated"
    return len(steady) / 120.0


def virtual_time(replicas: int, duration_s: float, load: float, seed: int = 1) -> dict[str, float]:
    capacity = _capacity_req_per_s(seed)
    rate = load * capacity * replicas
    profile = load_profile(PROFILE_8B)
    engines = [Engine(profile, seed=seed + i) for i in range(replicas)]
    times, prompts, max_tokens = _workload(np.random.default_rng(seed + 100), rate, duration_s)
    ttft: list[float] = []
    kv: list[float] = []
    t0 = time.perf_counter()
    steps = 0
    for i, (t, p, m) in enumerate(zip(times.tolist(), prompts.tolist(), max_tokens.tolist(), strict=True)):
        engine = engines[i % replicas]
        steps += engine.run_until(t)
        engine.add_request(str(i), p, m, now=t)
        if i % 1000 == 0:
            kv.append(float(np.mean([e.kv_cache_usage for e in engines])))
    for engine in engines:
        steps += engine.run_until(duration_s)
    wall = time.perf_counter() - t0
    for engine in engines:
        h = engine.stats.time_to_first_token
        ttft.append(h.sum / max(h.count, 1))
    stats = [e.stats for e in engines]
    return {
        "capacity_req_s": capacity,
        "rate_req_s": rate,
        "requests": float(times.size),
        "completed": float(sum(sum(s.request_success.values()) for s in stats)),
        "steps": float(steps),
        "tokens": float(sum(s.prompt_tokens + s.generation_tokens for s in stats)),
        "preemptions": float(sum(s.num_preemptions for s in stats)),
        "kv_mean": float(np.mean(kv)),
        "ttft_mean_s": float(np.mean(ttft)),
        "wall_s": wall,
        "ratio": duration_s * replicas / wall,
    }


# ---- real time -------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _client(url: str, streams: int, warmup_s: float, window_s: float, max_tokens: int) -> list[float]:
    """Closed loop of ``streams`` streaming completions; per-token seconds of requests in the window."""
    import aiohttp

    per_token: list[float] = []
    start = time.monotonic()
    t_begin, t_end = start + warmup_s, start + warmup_s + window_s
    connector = aiohttp.TCPConnector(limit=streams + 8)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:

        async def worker(w: int) -> None:
            i = 0
            while time.monotonic() < t_end:
                i += 1
                body = {
                    "prompt": f"stream {w} request {i}: " + "lorem ipsum " * 8,
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "stream": True,
                }
                stamps: list[float] = []
                async with session.post(url + "/v1/completions", json=body) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            stamps.append(time.monotonic())
                if len(stamps) >= 2 and stamps[0] >= t_begin and stamps[-1] <= t_end:
                    # the first chunk carries one token, the others stream_interval tokens
                    per_token.append((stamps[-1] - stamps[0]) / (max_tokens - 1))

        await asyncio.gather(*(worker(w) for w in range(streams)))
    return per_token


def real_time(
    profile_path: str, streams: int, *, overrides: list[str], warmup_s: float, window_s: float
) -> dict:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {1})  # the client on CPU 1
    cmd = [sys.executable, "-m", "tokenscaler", "sim", "--port", "0", "--profile", profile_path, *overrides]
    server = subprocess.Popen(
        ["taskset", "-c", "0", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if m := re.search(r"listening on (http://\S+)", line):
                url = m.group(1)
                break
        else:
            raise RuntimeError("the simulator did not start")
        cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
        client_cpu0 = time.process_time()
        per_token = asyncio.run(_client(url, streams, warmup_s, window_s, max_tokens=33))
        server_cpu = (_cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
        client_cpu = (time.process_time() - client_cpu0) / (time.monotonic() - t0)
    finally:
        server.terminate()
        server.wait(10)
    return {
        "requests": len(per_token),
        "p50_ms": 1e3 * statistics.median(per_token) if per_token else float("nan"),
        "p95_ms": 1e3 * float(np.percentile(per_token, 95)) if per_token else float("nan"),
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
    }


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str]) -> None:
    print(_row(header))
    print(_row(["---"] * len(header)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (for a smoke test)")
    args = parser.parse_args()

    replicas, duration = 8, (120.0 if args.quick else 600.0)
    v = virtual_time(replicas, duration, load=0.8)
    print(f"## Virtual time: {replicas} x {PROFILE_8B}, {duration:.0f} simulated s at 80% load\n")
    _table(["capacity/replica", "offered", "requests", "steps", "tokens", "preemptions", "mean KV use"])
    print(
        _row(
            [
                f"{v['capacity_req_s']:.1f} req/s",
                f"{v['rate_req_s']:.0f} req/s",
                f"{v['requests']:.0f}",
                f"{v['steps']:.0f}",
                f"{v['tokens'] / 1e6:.1f} M",
                f"{v['preemptions']:.0f}",
                f"{v['kv_mean']:.2f}",
            ]
        )
    )
    print()
    _table(["mean TTFT", "wall", "simulated s / wall s (all replicas)"])
    print(
        _row([f"{1e3 * v['ttft_mean_s']:.0f} ms", f"{v['wall_s']:.1f} s", f"{v['ratio']:.0f}x"]), flush=True
    )

    demo = load_profile("demo")
    warmup, window = (1.5, 4.0) if args.quick else (3.0, 8.0)
    print("\n## Real time: one `tokenscaler sim` on CPU 0, closed-loop client on CPU 1 (127.0.0.1)\n")
    header = ["engine", "streams", "ideal ms/token", "p50 ms/token", "p95 ms/token", "p50/ideal"]
    _table([*header, "server CPU", "client CPU", "requests"])
    with tempfile.TemporaryDirectory() as tmp:
        flat = demo.model_dump()
        flat["name"] = "demo-flat"
        flat["step_time"].update(per_request_us=0.0, kv_read_us_per_token=0.0, prefill_us_per_token=0.0)
        flat_path = Path(tmp) / "demo-flat.yaml"
        flat_path.write_text(yaml.safe_dump(flat))
        runs: list[tuple[str, str, int, list[str]]] = [("demo", "demo", 16, [])]
        sweep = (64, 256, 1024) if args.quick else (64, 256, 512, 1024, 2048, 3072, 4096)
        for c in sweep:
            overrides = ["--max-num-seqs", str(c), "--num-gpu-blocks", str(max(demo.num_gpu_blocks, c * 8))]
            runs.append(
                ("demo-flat", str(flat_path), c, [*overrides, "--max-num-batched-tokens", str(c * 64)])
            )
        sustained = 0
        for label, path, c, overrides in runs:
            r = real_time(path, c, overrides=overrides, warmup_s=warmup, window_s=window)
            context = 45 * c  # ~29 prompt + ~16 output tokens per stream on average
            ideal = load_profile(path).step_time.step_s(c, context, 0) * 1e3
            ratio = r["p50_ms"] / ideal
            if label == "demo-flat" and ratio <= 1.10 and r["server_cpu"] < 0.95:
                sustained = max(sustained, c)
            cpu = [f"{100 * r['server_cpu']:.0f}%", f"{100 * r['client_cpu']:.0f}%", r["requests"]]
            print(
                _row(
                    [
                        label,
                        c,
                        f"{ideal:.1f}",
                        f"{r['p50_ms']:.1f}",
                        f"{r['p95_ms']:.1f}",
                        f"{ratio:.2f}",
                        *cpu,
                    ]
                )
            )
            sys.stdout.flush()
    bound = f">= {sustained} (the largest tried)" if sustained == sweep[-1] else str(sustained)
    print(f"\nStreams one demo process sustains on one core (median per-token latency within 10%): {bound}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
