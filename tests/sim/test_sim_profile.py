"""Profiles: the built-in ones load, user YAML files load, bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tokenscaler.sim.profile import DEFAULT_PROFILE, ProfileError, builtin_profile_names, load_profile


def test_builtin_profiles_are_listed_and_load() -> None:
    names = builtin_profile_names()
    assert {"llama-3.1-8b-h100", "llama-3.1-70b-h100-tp4", "demo"} <= set(names)
    assert DEFAULT_PROFILE == "llama-3.1-8b-h100"
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.kv_capacity_tokens >= profile.max_model_len


def test_demo_profile_reaches_its_limits_with_a_handful_of_requests() -> None:
    demo = load_profile("demo")
    assert demo.kv_capacity_tokens <= 4 * demo.max_model_len  # a few long requests fill the cache
    assert demo.max_num_seqs <= 32 and demo.stream_interval > 1
    assert demo.step_time.step_s(1, 100, 0) >= 0.01  # steps of tens of ms: little CPU per replica


def test_a_user_yaml_file_is_a_profile(tmp_path: Path) -> None:
    document = load_profile("demo").model_dump()
    document.update(name="mine", max_num_seqs=4)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(document))
    profile = load_profile(str(path))
    assert (profile.name, profile.max_num_seqs) == ("mine", 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"max_num_seqs": 0}, r"max_num_seqs: .*greater than or equal to 1 \(got 0\)", id="zero-seqs"
        ),
        pytest.param({"color": "red"}, r"color: Extra inputs are not permitted", id="unknown-field"),
        pytest.param(
            {"max_model_len": 10**6}, r"max_model_len \(1000000\) must be <= KV capacity", id="too-long"
        ),
        pytest.param(
            {"max_num_batched_tokens": 8},
            r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)",
            id="budget",
        ),
        pytest.param(
            {"output_length": {"kind": "lognormal"}},
            r"lognormal' needs median_tokens and sigma",
            id="lognormal",
        ),
    ],
)
def test_bad_profiles_name_the_field_and_value(tmp_path: Path, change: dict, message: str) -> None:
    document = {**load_profile("demo").model_dump(), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_unknown_profile_lists_the_builtin_ones() -> None:
    with pytest.raises(ProfileError, match=r"neither a built-in profile .*demo"):
        load_profile("no-such-profile")


def test_overrides_are_validated_again() -> None:
    demo = load_profile("demo")
    assert demo.with_overrides(max_num_seqs=None) is demo
    assert demo.with_overrides(max_num_seqs=4).max_num_seqs == 4
    with pytest.raises(ProfileError, match=r"max_model_len \(8192\) must be <= KV capacity"):
        demo.with_overrides(max_model_len=8192)
