"""Each dimension binds on its own and the 429 names it; guaranteed bursts wait in the queue."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.sidecar.harness import chat, ent, key_of, post, sidecar, vec, write_config
from tests.support import Server, wait_until
from tokenscaler.core.model import DIMENSIONS

pytestmark = pytest.mark.e2e

BIG = 1e6
# chat("hello", 60): 9 prompt tokens + 60 new = 69 weighted tokens and 69 KV tokens
CASES = [
    pytest.param("throughput_tokens_per_s", vec(5, BIG, BIG), vec(100, 0, 0), id="throughput"),
    pytest.param("kv_tokens", vec(BIG, 80, BIG), vec(BIG, 20, 0), id="kv"),
    pytest.param("concurrency", vec(BIG, BIG, 1), vec(BIG, 0, 0), id="concurrency"),
]


@pytest.mark.parametrize(("dimension", "limit", "burst"), CASES)
def test_only_one_dimension_binds_and_the_429_names_it(
    sim: Server, tmp_path: Path, dimension: str, limit: dict, burst: dict
) -> None:
    config = write_config(tmp_path / "c.yaml", [ent("e", "elastic", limit=limit, burst=burst)])
    body = chat("hello", 60, stream=True, ignore_eos=True)
    with sidecar(sim.url, config) as sc:
        first = post(sc.url, "/v1/chat/completions", body, key_of("e"), stream=True)
        assert first.status_code == 200
        lines = first.iter_lines()  # keep a reference: a collected generator closes the connection
        next(lines)  # the first request is in flight
        second = post(sc.url, "/v1/chat/completions", body, key_of("e"))
        first.close()
        assert second.status_code == 429, second.text
        error = second.json()["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert second.headers["x-tokenscaler-dimension"] == dimension
        assert dimension in error["message"]
        assert not [d for d in DIMENSIONS if d != dimension and d in error["message"]]
        assert ("requested 1 requests" if dimension == "concurrency" else "requested 69") in error["message"]
        assert int(second.headers["Retry-After"]) >= 1
        assert {"x-ratelimit-limit-requests", "x-ratelimit-limit-tokens"} <= set(second.headers)
        for d in DIMENSIONS:
            assert sc.value("tokenscaler_sidecar_rejections_total", entitlement="e", dimension=d) == (d == dimension)
            assert sc.value("tokenscaler_sidecar_limit", entitlement="e", dimension=d) == limit[d]
        # the rejected request's estimate is demand: 9 prompt + min(60, 64 default output) = 69
        offered = sc.value("tokenscaler_sidecar_offered_weighted_tokens_total", entitlement="e")
        admitted = sc.value("tokenscaler_sidecar_admitted_weighted_tokens_total", entitlement="e")
        assert offered - admitted == 69
        wait_until(sc.idle, timeout=5, message="the first request released after the client closed it")


def test_a_guaranteed_burst_waits_in_the_queue_instead_of_being_refused(sim: Server, tmp_path: Path) -> None:
    # its configured limit is its guarantee, so it cannot backfill above it: it must wait
    g = vec(1000, 10000, 1)
    config = write_config(tmp_path / "c.yaml", [ent("gold", "guaranteed", guaranteed=g, limit=g, burst=vec(BIG, 0, 0))])
    body = chat("hello", 10, ignore_eos=True)
    with sidecar(sim.url, config, "--queue-max-wait-s", "10") as sc:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: post(sc.url, "/v1/chat/completions", body, key_of("gold")), range(3)))
        assert [r.status_code for r in results] == [200, 200, 200]
        assert sc.value("tokenscaler_sidecar_queue_wait_seconds_count") >= 2
        assert sc.value("tokenscaler_sidecar_queue_wait_seconds_sum") > 0.2  # each waited for a ~0.3 s request
        assert sc.value("tokenscaler_sidecar_rejections_total", entitlement="gold") == 0
        assert sc.value("tokenscaler_sidecar_queued_requests", entitlement="gold") == 0


def test_without_a_queue_or_beyond_its_wait_a_guaranteed_request_is_refused(sim: Server, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        [ent("gold", "guaranteed", guaranteed=vec(1, 10000, 1), limit=vec(1, 10000, 1), burst=vec(80, 0, 0))],
    )
    with sidecar(sim.url, config, "--queue-max-wait-s", "0.5") as sc:
        assert post(sc.url, "/v1/chat/completions", chat("hello", 60), key_of("gold")).status_code == 200
        # the bucket needs ~60 s to refill: waiting 0.5 s cannot help, so it is refused at once
        r = post(sc.url, "/v1/chat/completions", chat("hello", 60), key_of("gold"))
        assert r.status_code == 429 and r.headers["x-tokenscaler-dimension"] == "throughput_tokens_per_s"
        assert r.elapsed.total_seconds() < 0.4
        assert int(r.headers["Retry-After"]) > 30


def test_requests_from_threads_share_one_limit(sim: Server, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", [ent("e", "elastic", limit=vec(BIG, BIG, 2), burst=vec(BIG, 0, 0))])
    body = chat("hello", 30, ignore_eos=True)
    with sidecar(sim.url, config) as sc, requests.Session():
        with ThreadPoolExecutor(6) as pool:
            codes = list(
                pool.map(lambda _: post(sc.url, "/v1/chat/completions", body, key_of("e")).status_code, range(6))
            )
        assert codes.count(200) >= 2 and codes.count(429) >= 1
        assert sorted(set(codes)) == [200, 429]
        wait_until(sc.idle, timeout=5, message="idle")
