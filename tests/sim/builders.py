"""Builders shared by the simulator tests: small profiles and engine drivers in virtual time."""

from __future__ import annotations

from typing import Any

from tokenscaler.sim.engine import Engine, Request, StepResult
from tokenscaler.sim.profile import EngineProfile, load_profile


def make_profile(base: str = "demo", **overrides: Any) -> EngineProfile:
    """A built-in profile with fields replaced; outputs run to max_tokens unless overridden."""
    overrides.setdefault("output_length", {"kind": "fixed"})
    return load_profile(base).with_overrides(**overrides)


def make_engine(
    base: str = "demo", *, seed: int = 0, max_num_queued_reqs: int | None = None, **overrides: Any
) -> Engine:
    return Engine(make_profile(base, **overrides), seed=seed, max_num_queued_reqs=max_num_queued_reqs)


def run_all(engine: Engine, *, check: bool = True, max_steps: int = 1_000_000) -> list[StepResult]:
    """Step until the engine is idle, checking its invariants after every step."""
    results: list[StepResult] = []
    while engine.has_work:
        result = engine.step(engine.busy_until_s)
        assert result.num_requests > 0, "a step with work scheduled nothing"
        assert result.num_tokens <= engine.profile.max_num_batched_tokens
        results.append(result)
        if check:
            engine.check_invariants()
        assert len(results) < max_steps, "engine did not drain"
    return results


def steps_until(engine: Engine, condition: Any, *, max_steps: int = 100_000) -> list[StepResult]:
    """Step until ``condition(result)`` is true for the last step's result."""
    results: list[StepResult] = []
    for _ in range(max_steps):
        result = engine.step(engine.busy_until_s)
        results.append(result)
        if condition(result):
            return results
    raise AssertionError("condition never held")


def first_token_time(results: list[StepResult], req: Request) -> float:
    for r in results:
        if req in r.first_token:
            return r.end_s
    raise AssertionError(f"{req} never produced a token")


def scrape(url: str) -> dict[str, Any]:
    """``/metrics`` of a server parsed by prometheus-client: family name -> family."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(url + "/metrics", timeout=5)
    response.raise_for_status()
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The value of the one sample named ``sample`` whose labels include ``labels``."""
    name = sample
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        name = name.removesuffix(suffix)
    family = families[name]
    found = [
        s.value
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, f"{sample}{labels}: {len(found)} samples"
    return found[0]


def metric(url: str, sample: str, **labels: str) -> float:
    return value(scrape(url), sample, **labels)
