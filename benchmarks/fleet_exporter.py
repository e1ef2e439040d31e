"""Sidecar- and engine-shaped /metrics of R replicas and N entitlements, for ``benchmarks/fleet.py``.

Run: python benchmarks/fleet_exporter.py N R POOL [MOVING]  (prints its port, then serves)

``/s{j}`` is the sidecar of replica ``r{j}``, ``/e{j}`` its engine. Each entitlement is
routed to two replicas (so the routing shares are sparse, as behind a prefix-aware router);
its offered load moves a little every 5 s: every entitlement's, or (``MOVING`` < 1) a rotating
share of them each window, so every interval publishes new limits.
"""

from __future__ import annotations

import http.server
import sys
import time

TIERS = ("guaranteed", "elastic", "spot")


def main() -> None:
    n, replicas, pool = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    t0 = time.time() - 600
    # per replica: (label set, base rate) of the entitlements routed to it
    routed: list[list[tuple[str, float]]] = [[] for _ in range(replicas)]
    for i in range(n):
        for j in {i % replicas, (i + 1) % replicas}:
            lab = f'pool="{pool}",replica="r{j}",entitlement="e{i}",tier="{TIERS[i % 3]}"'
            routed[j].append((lab, 1.0 + i % 50))

    moving = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0  # the share of entitlements whose demand moves

    def sidecar(j: int) -> str:
        el = time.time() - t0
        window = int(el) // 5
        out = [f'tokenscaler_sidecar_limits_age_seconds{{pool="{pool}",replica="r{j}"}} 1.0']
        for k, (lab, base) in enumerate(routed[j]):
            # each 5-s window, a rotating ``moving`` share of the entitlements steps its demand
            i = int(lab.rsplit('entitlement="e', 1)[1].split('"', 1)[0])
            steps = window if moving >= 1.0 else int(window * moving + ((i * 0.618) % 1.0))
            rate = base + 0.1 * (steps % 7)
            out += [
                f"tokenscaler_sidecar_offered_weighted_tokens_total{{{lab}}} {rate * 1.2 * el:.3f}",
                f"tokenscaler_sidecar_admitted_weighted_tokens_total{{{lab}}} {rate * el:.3f}",
                f"tokenscaler_sidecar_offered_requests_total{{{lab}}} {0.012 * rate * el:.3f}",
                f'tokenscaler_sidecar_requests_total{{{lab},outcome="admitted"}} {0.01 * rate * el:.3f}',
                f"tokenscaler_sidecar_inflight_requests{{{lab}}} {k % 4}",
                f"tokenscaler_sidecar_reserved_kv_tokens{{{lab}}} {(k % 4) * 900}",
            ]
        return "\n".join(out) + "\n"

    def engine(j: int) -> str:
        el = time.time() - t0
        eng = 'model_name="bench",engine="0"'
        return "\n".join([
            f'vllm:cache_config_info{{{eng},block_size="16",num_gpu_blocks="25633"}} 1.0',
            f"vllm:num_requests_running{{{eng}}} 100", f"vllm:num_requests_waiting{{{eng}}} 3",
            f"vllm:kv_cache_usage_perc{{{eng}}} 0.5", f"vllm:prompt_tokens_total{{{eng}}} {4000 * el:.1f}",
            f"vllm:generation_tokens_total{{{eng}}} {2000 * el:.1f}",
        ]) + "\n"  # fmt: skip

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            kind, j = self.path[1], int(self.path[2:].split("/")[0])
            body = (sidecar(j) if kind == "s" else engine(j)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer.request_queue_size = 1024
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
