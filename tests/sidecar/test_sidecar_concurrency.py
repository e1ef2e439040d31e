"""Concurrent requests cannot overshoot a limit: the throughput bucket is charged with each
request's whole estimate at admission, so N requests arriving at once admit only the k
that fit, and the tokens actually served stay within ``limit x T + burst + one estimate``
(compare litellm#18730 and ai-gateway#680, where usage is charged after completion)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.sidecar.harness import chat, ent, key_of, sidecar, vec, write_config
from tests.support import Server, wait_until

pytestmark = pytest.mark.e2e

RATE, BURST = 20.0, 300.0
N = 32
BODY = chat("hello", 50, ignore_eos=True)  # 9 prompt + 50 new = 59 weighted tokens
ESTIMATE = 59


def test_n_concurrent_requests_admit_only_what_the_bucket_holds(sim: Server, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml", [ent("e", "elastic", limit=vec(RATE, 100000, 100), burst=vec(BURST, 0, 0))]
    )
    with sidecar(sim.url, config) as sc:
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=N))
        headers = {"Authorization": f"Bearer {key_of('e')}"}

        def call(_: int) -> requests.Response:
            return session.post(sc.url + "/v1/chat/completions", json=BODY, headers=headers, timeout=30)

        start = time.monotonic()
        with ThreadPoolExecutor(N) as pool:
            responses = list(pool.map(call, range(N)))
        elapsed = time.monotonic() - start
        admitted = [r for r in responses if r.status_code == 200]
        rejected = [r for r in responses if r.status_code == 429]
        assert len(admitted) + len(rejected) == N
        k = int(BURST // ESTIMATE)
        assert len(admitted) >= k
        served = sum(r.json()["usage"]["total_tokens"] for r in admitted)
        assert served <= RATE * elapsed + BURST + ESTIMATE, (served, elapsed, len(admitted))
        assert len(admitted) <= k + 1 + int(RATE * elapsed // ESTIMATE)
        assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in rejected)
        # the sidecar counted exactly what the engine served, and the rejected estimates as demand
        labels = {"entitlement": "e"}
        assert sc.value("tokenscaler_sidecar_admitted_weighted_tokens_total", **labels) == served
        offered = sc.value("tokenscaler_sidecar_offered_weighted_tokens_total", **labels)
        assert offered == served + ESTIMATE * len(rejected)
        assert sc.value("tokenscaler_sidecar_offered_requests_total", **labels) == N
        assert sc.value("tokenscaler_sidecar_rejections_total", dimension="throughput_tokens_per_s", **labels) == len(
            rejected
        )
        wait_until(sc.idle, timeout=5, message="idle")


def test_concurrent_streams_never_exceed_the_concurrency_limit(sim: Server, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml", [ent("e", "elastic", limit=vec(100000, 100000, 3), burst=vec(1e6, 0, 1))]
    )
    body = chat("hello", 20, stream=True, ignore_eos=True)
    with sidecar(sim.url, config) as sc:
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))
        headers = {"Authorization": f"Bearer {key_of('e')}"}
        peak = 0

        def call(_: int) -> int:
            nonlocal peak
            with session.post(
                sc.url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=30
            ) as r:
                if r.status_code == 200:
                    peak = max(peak, int(sc.value("tokenscaler_sidecar_inflight_requests", entitlement="e")))
                    for _ in r.iter_lines():
                        pass
                return r.status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(call, range(16)))
        assert codes.count(200) >= 4 and 429 in codes
        assert peak <= 4  # limit 3 + burst 1
        wait_until(sc.idle, timeout=5, message="idle")
