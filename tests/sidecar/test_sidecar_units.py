"""The sidecar's pure pieces without a server: stream counting, request estimates, the
shapes of its answers, and the static, floor and document limit rules."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.core.limiter import Limiter, RateLimitStatus
from tokenscaler.core.limits import EntitlementLimits, LimitsDocument
from tokenscaler.core.model import ResourceVector, Tier
from tokenscaler.core.tokens import text_tokens
from tokenscaler.sidecar.errors import go_duration, ratelimit_headers, retry_headers
from tokenscaler.sidecar.estimates import BadRequest, parse_request, upstream_body
from tokenscaler.sidecar.limits import HttpLimitsSource, StaticLimitsSource
from tokenscaler.sidecar.sse import StreamCounter, response_usage

POOL = config().pool("p")


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(text: str, index: int = 0) -> bytes:
    return sse({"object": "chat.completion.chunk", "choices": [{"index": index, "delta": {"content": text}}]})


STREAM = (
    chunk("")
    + chunk("Hello wor")
    + chunk("ld, ")
    + chunk("héllo", 1)
    + chunk("again and again")
    + sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}})
    + b"data: [DONE]\n\n"
)


@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=12, unique=True))
def test_counting_does_not_depend_on_where_the_bytes_are_split(cuts: list[int]) -> None:
    counter = StreamCounter(strip_usage=True)
    edges = [0, *sorted(cuts), len(STREAM)]
    out = b"".join(counter.feed(STREAM[a:b]) for a, b in itertools.pairwise(edges)) + counter.tail()
    assert counter.done and counter.usage == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    assert counter.generated == text_tokens("Hello world, again and again") + text_tokens("héllo")
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n")
    assert out == STREAM.replace(sse({"choices": [], "usage": counter.usage}), b"")


def test_the_usage_chunk_is_kept_when_the_client_asked_for_it() -> None:
    counter = StreamCounter(strip_usage=False)
    assert counter.feed(STREAM) == STREAM


def test_an_error_event_is_noticed() -> None:
    counter = StreamCounter(strip_usage=True)
    counter.feed(sse({"error": {"message": "boom", "code": 500}}) + b"data: [DONE]\n\n")
    assert counter.error == {"message": "boom", "code": 500} and counter.done


def test_response_usage_falls_back_to_counting_text() -> None:
    assert response_usage(json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()) == (3, 4)
    body = {"choices": [{"message": {"content": "12345678"}}, {"text": "abcd"}]}
    assert response_usage(json.dumps(body).encode()) == (None, 3)
    assert response_usage(b"not json") == (None, None)


def test_estimates_follow_the_counting_rule_and_the_pool_defaults() -> None:
    lim = Limiter(POOL)
    chat = parse_request(
        json.dumps({"messages": [{"role": "user", "content": "abcdefgh"}]}).encode(), chat=True, pool=POOL
    )
    est = chat.estimate(lim)
    assert (est.prompt_tokens, est.max_new_tokens, est.sequences) == (3 + 4 + 2, POOL.default_max_tokens, 1)
    comp = parse_request(json.dumps({"prompt": ["abcd", "abcdefgh"], "n": 2}).encode(), chat=False, pool=POOL)
    est = comp.estimate(lim)
    assert (est.prompt_tokens, est.max_new_tokens, est.sequences, est.kv_tokens) == (3, 2 * 2 * 16, 4, 2 * 3 + 64)
    with pytest.raises(BadRequest) as exc:
        parse_request(b'{"prompt": "x", "max_tokens": 0}', chat=False, pool=POOL)
    assert exc.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b'{"prompt": "x", "stream": true}', {"include_usage": True}, id="added"),
        pytest.param(
            b'{"prompt": "x", "stream": true, "stream_options": {"continuous_usage_stats": false}}',
            {"continuous_usage_stats": False, "include_usage": True},
            id="merged",
        ),
        pytest.param(b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": true}}', None, id="kept"),
        pytest.param(b'{"prompt": "x"}', None, id="not-a-stream"),
    ],
)
def test_streams_ask_the_engine_for_usage(body: bytes, expected: dict | None) -> None:
    req = parse_request(body, chat=False, pool=POOL)
    out = upstream_body(body, req)
    if expected is None:
        assert out is body
    else:
        assert json.loads(out)["stream_options"] == expected
        assert req.client_usage is False


def test_headers_and_durations() -> None:
    assert [go_duration(s) for s in (0, 0.0121, 1.5, 360, 3700)] == ["0s", "13ms", "1.5s", "6m0s", "1h1m40s"]
    status = RateLimitStatus(300, 120.4, 9.0, 4, 1, 0.0)
    assert ratelimit_headers(status) == {
        "x-ratelimit-limit-tokens": "300", "x-ratelimit-remaining-tokens": "120", "x-ratelimit-reset-tokens": "9s",
        "x-ratelimit-limit-requests": "4", "x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "0s",
    }  # fmt: skip
    assert retry_headers(0.25, 60) == {"Retry-After": "1", "retry-after-ms": "250"}
    assert retry_headers(math.inf, 60) == {"Retry-After": "60", "retry-after-ms": "60000"}


def _cfg():  # type: ignore[no-untyped-def]
    return config(
        [make_pool()],
        [
            make_entitlement("g", "guaranteed", guaranteed=vec(100, 10000, 10), limit=vec(300, 30000, 30)),
            make_entitlement("e", "elastic", limit={"throughput_tokens_per_s": 200}, burst=vec(1000, 0, 2)),
            make_entitlement("s", "spot"),
        ],
    )


def test_static_limits_split_over_replicas() -> None:
    limits = StaticLimitsSource(_cfg(), "p", replicas=2).initial().limits
    assert limits["g"].limit == (50, 5000, 5) and limits["g"].ceiling == (150, 15000, 15) and limits["g"].backfill
    # unlimited components: one replica's capacity (1000 tokens/s, 100000 KV, 100 sequences)
    assert limits["e"].limit == (100, 100000, 100) and limits["e"].burst == (500, 0, 1)
    assert limits["e"].ceiling[1:] == (math.inf, math.inf)
    assert limits["s"].limit == (0, 0, 0) and limits["s"].burst == (0, 0, 0) and limits["s"].backfill


def test_floors_and_documents() -> None:
    cfg = _cfg()
    floors = StaticLimitsSource(cfg, "p", replicas=2).floors()
    assert floors["g"].limit == (50, 5000, 5) and floors["g"].backfill
    assert floors["e"].limit == (0, 0, 0) and floors["e"].backfill
    assert floors["s"].limit == (0, 0, 0) and not floors["s"].backfill
    rv = ResourceVector(throughput_tokens_per_s=7, kv_tokens=8, concurrency=9)
    doc = LimitsDocument(
        pool="p", version="v", generated_at=0, expires_at=1,
        entitlements={name: EntitlementLimits(tier=Tier.SPOT, limit=rv) for name in ("s", "ghost")},
    )  # fmt: skip
    source = HttpLimitsSource(cfg, "p", "http://127.0.0.1:1", replica="r", replicas=2)
    assert source.url == "http://127.0.0.1:1/v1/pools/p/limits"
    limits = source.rules.from_document(doc)
    assert set(limits) == {"g", "e", "s"}
    assert limits["s"].limit == (7, 8, 9) and limits["s"].backfill
    assert limits["g"] == floors["g"] and limits["e"] == floors["e"]  # missing from the document: floors


def test_every_exported_name_is_a_listed_constant_and_every_constant_is_exported() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tokenscaler.sidecar.metrics import ALL_NAMES, PREFIX, EntitlementStats, SidecarMetrics

    cfg = _cfg()
    limiter = Limiter(cfg.pool("p"))
    limiter.set_limits(StaticLimitsSource(cfg, "p").initial().limits, 0.0)
    metrics = SidecarMetrics("p", "r", limiter, [EntitlementStats(e.name, e.tier.value) for e in cfg.entitlements])
    metrics.latency("/v1/completions").observe(0.001)
    metrics.queue_wait.observe(0.1)
    metrics.engine_capacity, metrics.engine_max_model_len = {"kv_tokens": 6144.0}, 2048  # once the engine was read
    metrics.config_generation = 3  # once a controller's spec is in force
    exported = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        if family.name.endswith("_created"):  # prometheus-client's creation timestamps of histograms
            continue
        for sample in family.samples:
            assert sample.labels["pool"] == "p" and sample.labels["replica"] == "r", sample
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert all(name.startswith(PREFIX) for name in ALL_NAMES)
    assert exported == set(ALL_NAMES)


def test_a_large_pool_exports_only_the_entitlements_this_replica_was_sent() -> None:
    from prometheus_client import generate_latest

    from tokenscaler.core.model import TokenPoolsConfig
    from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics

    def exported(n: int) -> set[str]:
        cfg = TokenPoolsConfig.model_validate({
            "pools": [{"name": "p", "replica": {"throughput_tokens_per_s": 1e6, "kv_tokens": 1e7, "concurrency": 1e5},
                       "max_replicas": 1}],
            "entitlements": [{"name": f"e{i}", "pool": "p", "tier": "spot"} for i in range(n)],
        })  # fmt: skip
        limiter = Limiter(cfg.pool("p"))
        limiter.set_limits(StaticLimitsSource(cfg, "p").initial().limits, 0.0)
        stats = [EntitlementStats(e.name, e.tier.value) for e in cfg.entitlements]
        stats[7].offered_requests = 1
        text = generate_latest(SidecarMetrics("p", "r", limiter, stats).registry).decode()
        return {m for m in re.findall(r'entitlement="([^"]+)"', text)}

    assert len(exported(1000)) == 1000  # up to 1,000: every entitlement, traffic or not
    assert exported(1001) == {"e7"}  # above: only those sent a request here


def test_the_read_samples_are_the_full_collection_filtered_to_the_names_the_scraper_reads() -> None:
    from tokenscaler.experiments.control import collect_samples, sidecar_samples
    from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics
    from tokenscaler.sources.scrape import SIDECAR_READ

    cfg = _cfg()
    limiter = Limiter(cfg.pool("p"))
    limiter.set_limits(StaticLimitsSource(cfg, "p").initial().limits, 0.0)
    stats = [EntitlementStats(e.name, e.tier.value) for e in cfg.entitlements]
    metrics = SidecarMetrics("p", "r", limiter, stats)
    name = stats[0].name
    limiter.admit(name, limiter.estimate(100, 50), 0.0)  # in flight: KV and a sequence reserved
    stats[0].offered_weighted, stats[0].admitted_weighted, stats[0].offered_requests = 150.0, 150.0, 1
    stats[0].rejected["throughput"] = 2
    metrics.engine_capacity, metrics.engine_max_model_len = {"kv_tokens": 6144.0}, 2048
    full = collect_samples(metrics.registry)
    read = sidecar_samples(metrics)
    assert read == [s for s in full if s[0] in SIDECAR_READ]
    assert {s[0] for s in read} == SIDECAR_READ  # every name it reads is there
    assert any(s[0].endswith("inflight_requests") and s[1]["entitlement"] == name and s[2] == 1.0 for s in read)
