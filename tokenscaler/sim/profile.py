"""Engine profiles: the numbers that make a simulated engine behave like one model on one GPU.

A profile is a YAML document validated by :class:`EngineProfile`. Built-in profiles live beside
this module in ``profiles/NAME.yaml`` (``llama-3.1-8b-h100``, the default,
``llama-3.1-70b-h100-tp4`` and ``demo``); ``--profile`` takes a built-in name or the path
of a user's YAML file with the same fields. Every number in the built-in files carries a
comment saying where it comes from (``docs/reference/PERFORMANCE.md`` sections 1.1
to 1.7 for the H100 profiles).

The step time model (PERFORMANCE.md 1.7), for one continuous-batching iteration that
schedules ``B`` requests whose KV context totals ``C`` tokens and ``P`` prefill tokens::

    step_s = fixed + per_request * B + kv_read_per_token * C + prefill_per_token * max(0, P - knee)

"Prefill tokens" are the tokens of requests scheduled for more than one token in the step
(prompt chunks, recomputation after preemption); a request scheduled for one token costs
what a decode does, whatever its phase.
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import yaml
from pydantic import Field, ValidationError, model_validator

from tokenscaler.core.frozen import Frozen

DEFAULT_PROFILE = "llama-3.1-8b-h100"
_PROFILE_PACKAGE = "tokenscaler.sim"
_PROFILE_DIR = "profiles"


class ProfileError(ValueError):
    """A profile that cannot be found or does not validate; the message names file and field."""


class StepTimeModel(Frozen):
    """Duration of one engine step as a function of what the step schedules."""

    fixed_ms: float = Field(ge=0)
    """Per step, whatever the batch: weight streaming, kernel launches, scheduling."""
    per_request_us: float = Field(ge=0)
    """Per request scheduled in the step (sampling, input preparation)."""
    kv_read_us_per_token: float = Field(ge=0)
    """Per token of KV context read by the step's requests (attention is bandwidth bound)."""
    prefill_us_per_token: float = Field(ge=0)
    """Per prefill token above ``prefill_knee_tokens`` (compute bound past the roofline knee)."""
    prefill_knee_tokens: int = Field(ge=0)
    """Prefill tokens a step absorbs at no extra cost (memory bound below the knee)."""

    @overload
    def step_s(self, num_requests: int, context_tokens: int, prefill_tokens: int) -> float: ...

    @overload
    def step_s(self, num_requests: int, context_tokens: np.ndarray, prefill_tokens: int) -> np.ndarray: ...

    def step_s(self, num_requests: int, context_tokens: int | np.ndarray, prefill_tokens: int) -> float | np.ndarray:
        """Seconds for a step of ``num_requests`` requests reading ``context_tokens`` of KV, of which
        ``prefill_tokens`` are prefilled: the one home of the formula (module docstring).

        ``context_tokens`` may be an array (several steps of the same batch, one context each, as
        a decode run has them): each element is what the scalar call gives, to the last bit
        (the same operations in the same order)."""
        return (
            self.fixed_ms * 1e-3
            + self.per_request_us * 1e-6 * num_requests
            + self.kv_read_us_per_token * 1e-6 * context_tokens
            + self.prefill_us_per_token * 1e-6 * max(0, prefill_tokens - self.prefill_knee_tokens)
        )


class OutputLength(Frozen):
    """How many tokens a request generates before the model would stop on its own (EOS).

    ``fixed``: never stops early, every request generates its ``max_tokens``.
    ``lognormal``: a seeded draw ``median_tokens * exp(sigma * N(0, 1))`` (at least 1); a
    request stops with ``finish_reason="stop"`` after that many tokens if it is below its
    ``max_tokens``, otherwise it ends with ``"length"`` at ``max_tokens``.
    """

    kind: Literal["fixed", "lognormal"] = "fixed"
    median_tokens: float | None = Field(default=None, gt=0)
    sigma: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _lognormal_needs_parameters(self) -> OutputLength:
        if self.kind == "lognormal" and (self.median_tokens is None or self.sigma is None):
            raise ValueError(
                f"output_length kind 'lognormal' needs median_tokens and sigma "
                f"(got median_tokens={self.median_tokens}, sigma={self.sigma})"
            )
        return self


class EngineProfile(Frozen):
    """One simulated engine: its cache, its scheduler limits, its speed, its outputs."""

    name: str
    """Profile name, as given to ``--profile``."""
    description: str = ""
    served_model_name: str
    """Default ``model`` the server answers to (``--model-name`` overrides it)."""
    max_model_len: int = Field(ge=2)
    """Context window in tokens: prompt plus output."""
    block_size: int = Field(default=16, ge=1)
    """Tokens per KV cache block (vLLM's default is 16)."""
    num_gpu_blocks: int = Field(ge=1)
    """KV cache blocks; capacity in tokens is ``num_gpu_blocks * block_size``."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Reported in ``vllm:cache_config_info`` only; the block count is what is simulated."""
    cache_dtype: str = "auto"
    """Reported in ``vllm:cache_config_info`` only."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes (vLLM V1 default: on)."""
    max_num_seqs: int = Field(ge=1)
    """Most requests running at once."""
    max_num_batched_tokens: int = Field(ge=1)
    """Token budget of one step (chunked prefill splits longer prompts)."""
    long_prefill_token_threshold: int = Field(default=0, ge=0)
    """Most tokens one request may prefill in a step; 0 means only the step budget limits it."""
    scheduling_policy: Literal["fcfs", "priority", "vtc"] = "fcfs"
    """``priority``: the request field ``priority`` (lower first) orders waiting and preemption;
    ``vtc``: the Virtual Token Counter orders waiting across tenants (see the engine)."""
    stream_interval: int = Field(default=1, ge=1)
    """Tokens per streamed chunk (vLLM's ``--stream-interval``); first and last are always sent."""
    step_time: StepTimeModel
    startup_s: float = Field(default=0.0, ge=0)
    """Seconds from a replica's start until it serves (model load); the experiments' replica
    manager waits this long before a new replica is ready."""
    output_length: OutputLength = OutputLength()

    @property
    def kv_capacity_tokens(self) -> int:
        """KV cache capacity in tokens: ``num_gpu_blocks * block_size``."""
        return self.num_gpu_blocks * self.block_size

    @model_validator(mode="after")
    def _limits_fit(self) -> EngineProfile:
        if self.max_model_len > self.kv_capacity_tokens:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) must be <= KV capacity num_gpu_blocks * block_size "
                f"({self.num_gpu_blocks} * {self.block_size} = {self.kv_capacity_tokens})"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        return self

    def with_overrides(self, **overrides: Any) -> EngineProfile:
        """A copy with the given fields replaced (``None`` values are ignored), validated again."""
        updates = {k: v for k, v in overrides.items() if v is not None}
        if not updates:
            return self
        try:
            return EngineProfile.model_validate({**self.model_dump(), **updates})
        except ValidationError as e:
            raise ProfileError(f"profile {self.name!r} with overrides {updates}: {_errors(e)}") from e


def _errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "profile"
        parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})" if err["loc"] else err["msg"])
    return "; ".join(parts)


def _profile_dir() -> Traversable:
    return resources.files(_PROFILE_PACKAGE).joinpath(_PROFILE_DIR)


def builtin_profile_names() -> list[str]:
    """Names of the profiles shipped with tokenscaler."""
    root = _profile_dir()
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def parse_profile(document: Any, source: str) -> EngineProfile:
    """Validate a parsed YAML document; errors name ``source`` and the offending field."""
    if not isinstance(document, dict):
        raise ProfileError(f"{source}: a profile must be a mapping, got {type(document).__name__}")
    try:
        return EngineProfile.model_validate(document)
    except ValidationError as e:
        raise ProfileError(f"{source}: {_errors(e)}") from e


def load_profile(name_or_path: str) -> EngineProfile:
    """A built-in profile by name, or a profile from a YAML file path."""
    if name_or_path in builtin_profile_names():
        text = _profile_dir().joinpath(f"{name_or_path}.yaml").read_text("utf-8")
        source = f"built-in profile {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(
                f"profile {name_or_path!r} is neither a built-in profile "
                f"({', '.join(builtin_profile_names())}) nor a file"
            )
        text = path.read_text("utf-8")
        source = str(path)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"{source}: not valid YAML: {e}") from e
    return parse_profile(document, source)
