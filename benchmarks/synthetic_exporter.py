"""A synthetic exporter: sidecar- and vLLM-shaped series for N entitlements, for Prometheus to scrape.

Run: python benchmarks/synthetic_exporter.py --entitlements N --replicas R --port P [--pool NAME]

Serves ``/metrics`` in the Prometheus text format with, for every replica and entitlement,
the sidecar series the controller queries (counters grow at a steady per-entitlement rate,
so ``rate()`` has something to compute) and, per replica, the vLLM series it reads. It
prints ``synthetic exporter listening on http://127.0.0.1:PORT`` once serving. Used by
``benchmarks/controller.py`` to load Prometheus with a realistic number of series without
running thousands of sidecars.
"""

from __future__ import annotations

import argparse
import http.server
import time


def render(names: list[str], replicas: int, pool: str, t0: float) -> bytes:
    elapsed = time.time() - t0
    lines: list[str] = []
    add = lines.append
    tiers = ("guaranteed", "elastic", "spot")
    for r in range(replicas):
        rep = f"r{r}"
        base = f'pool="{pool}",replica="{rep}"'
        add(f"tokenscaler_sidecar_limits_age_seconds{{{base}}} 1.0")
        for i, name in enumerate(names):
            lab = f'{base},entitlement="{name}",tier="{tiers[i % 3]}"'
            rate = 1.0 + (i % 50)
            add(f"tokenscaler_sidecar_offered_weighted_tokens_total{{{lab}}} {rate * 1.2 * elapsed:.3f}")
            add(f"tokenscaler_sidecar_admitted_weighted_tokens_total{{{lab}}} {rate * elapsed:.3f}")
            add(f"tokenscaler_sidecar_offered_requests_total{{{lab}}} {0.012 * rate * elapsed:.3f}")
            add(f'tokenscaler_sidecar_requests_total{{{lab},outcome="admitted"}} {0.01 * rate * elapsed:.3f}')
            add(f"tokenscaler_sidecar_inflight_requests{{{lab}}} {i % 4}")
            add(f"tokenscaler_sidecar_reserved_kv_tokens{{{lab}}} {(i % 4) * 900}")
        eng = f'pool="{pool}",model_name="bench",engine="0",instance="engine-{rep}"'
        add(f'vllm:cache_config_info{{{eng},block_size="16",num_gpu_blocks="25633"}} 1.0')
        add(f"vllm:num_requests_running{{{eng}}} 100")
        add(f"vllm:num_requests_waiting{{{eng}}} 3")
        add(f"vllm:kv_cache_usage_perc{{{eng}}} 0.5")
        add(f"vllm:prompt_tokens_total{{{eng}}} {4000 * elapsed:.1f}")
        add(f"vllm:generation_tokens_total{{{eng}}} {2000 * elapsed:.1f}")
    return ("\n".join(lines) + "\n").encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entitlements", type=int, required=True)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--pool", default="bench")
    args = ap.parse_args()
    names = [f"e{i}" for i in range(args.entitlements)]
    t0 = time.time() - 600  # counters already have history

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = render(names, args.replicas, args.pool, t0)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"synthetic exporter listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
