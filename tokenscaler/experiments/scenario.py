"""Scenario files for ``tokenscaler experiment``: what runs, on what traffic, with what events.

A scenario is a YAML document: a file by path, or the name of one shipped inside the package
(``tokenscaler/experiments/scenarios/NAME.yaml``; every YAML file there is a shipped scenario, so a new
one needs no code change, and its traces sit in ``tokenscaler/experiments/traces/``)::

    duration_s: 3600
    profile: llama-3.1-8b-h100        # simulator profile name or path
    config: {pools: [...], entitlements: [...]}   # the normal config format (or config_file: PATH)
    interval_s: 5                     # the controller's planning interval
    replicas: {initial: 2, fixed: 8}  # autoscaled policies start at `initial`; fixed ones run `fixed`
    routing: round_robin              # or random, or {skewed: 0.7}
    keda_queue: {target_waiting: 5}   # the keda-queue baseline's threshold per replica
    traffic:                          # per entitlement name, one or more sources
      chat-prod: [{trace: ../traces/azure-llm-2023-conv.csv, rate_scale: 2.0, start_s: 0, end_s: 3600}]
      batch-spot: [{poisson: {rate_rps: 40, prompt_tokens: 1000, output_tokens: 200}, start_s: 600}]
      copilot: [{slots: {count: 5, prompt_tokens: [32, 176], output_tokens: [32, 176]}}]
    events: [{at_s: 1200, fail_replicas: 2}, {at_s: 1800, restore_replicas: 2}]

Events at ``at_s``: ``fail_replicas`` / ``restore_replicas`` (N), or a config change, as the
controller's config file would change live: ``add_entitlement`` (an entitlement, as in the
config), ``remove_entitlement`` (a name), ``revoke_key`` (a name: all its keys) and ``set``
(``{entitlement: NAME, field: guaranteed.throughput_tokens_per_s, value: 300}``; without
``entitlement``, a field of the pool). Traffic may name an entitlement an event adds.

Sources: ``trace`` (a CSV ``arrived_at,num_prefill_tokens,num_decode_tokens``, path relative
to the scenario file; arrival times divided by ``rate_scale``, cycled when shorter than the
window, token lengths kept), ``poisson`` (``rate_rps`` times ``rate_scale``, optionally
ramping up linearly over ``ramp_s``), ``slots`` (closed loop: ``count`` concurrent clients,
each sending its next request when the previous ends or is refused, after ``backoff_s``
when refused). Token lengths are a number or ``[low, high]`` (uniform, inclusive).
``max_tokens`` (optional) is what the client asks for; the request stops after its own
output length. Validation errors name the field and the value.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from tokenscaler.config import load_config
from tokenscaler.core.frozen import Frozen
from tokenscaler.core.model import TokenPoolsConfig, parse_config
from tokenscaler.core.validation import ConfigError, format_validation_error


def shipped_dir() -> Path:
    """The directory of the scenarios shipped in the package (``tokenscaler/experiments/scenarios``).

    Read through :mod:`importlib.resources`, so it is the installed package's data wherever
    tokenscaler is installed; a scenario's traces are found relative to it (``../traces/``)."""
    root = resources.files(__package__) / "scenarios"
    if not isinstance(root, Path):  # a zipped install: traces are read by path, so they must be files
        raise ConfigError("tokenscaler.experiments", [f"the shipped scenarios are not files on disk ({root})"])
    return root


Length = int | Annotated[list[int], Field(min_length=2, max_length=2)]


def _check_length(name: str, v: Length) -> None:
    lo, hi = (v, v) if isinstance(v, int) else (v[0], v[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} ({v!r}) must be >= 1, or [low, high] with 1 <= low <= high")


class Poisson(Frozen):
    rate_rps: float = Field(gt=0, allow_inf_nan=False)
    prompt_tokens: Length
    output_tokens: Length
    ramp_s: float = Field(0.0, ge=0, description="The rate rises linearly from 0 over this long after start_s.")

    @model_validator(mode="after")
    def _lengths(self) -> Poisson:
        _check_length("prompt_tokens", self.prompt_tokens)
        _check_length("output_tokens", self.output_tokens)
        return self


class Slots(Frozen):
    count: int = Field(ge=1)
    prompt_tokens: Length
    output_tokens: Length
    backoff_s: float = Field(0.5, ge=0, description="Wait after a refusal (429/503) before the next request.")
    think_s: float = Field(0.0, ge=0, description="Wait after a completed request before the next one.")

    @model_validator(mode="after")
    def _lengths(self) -> Slots:
        _check_length("prompt_tokens", self.prompt_tokens)
        _check_length("output_tokens", self.output_tokens)
        return self


class Source(Frozen):
    trace: str | None = None
    poisson: Poisson | None = None
    slots: Slots | None = None
    rate_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    start_s: float = Field(0.0, ge=0)
    end_s: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1, description="max_tokens the client sends (default: its output).")

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        kinds = [k for k in ("trace", "poisson", "slots") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a source needs exactly one of trace, poisson, slots (got {kinds or 'none'})")
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s:g}) must be > start_s ({self.start_s:g})")
        return self

    @property
    def kind(self) -> str:
        return "trace" if self.trace is not None else "poisson" if self.poisson is not None else "slots"


class SetField(Frozen):
    """One field of an entitlement (``entitlement``) or of the pool (neither named), by dotted path."""

    entitlement: str | None = Field(None, description="The entitlement to change (default: the pool).")
    field: str = Field(min_length=1, description="Dotted path, e.g. guaranteed.throughput_tokens_per_s.")
    value: Any


ACTIONS = ("fail_replicas", "restore_replicas", "add_entitlement", "remove_entitlement", "revoke_key", "set")
CONFIG_ACTIONS = ("add_entitlement", "remove_entitlement", "revoke_key", "set")


class Event(Frozen):
    at_s: float = Field(ge=0)
    pool: str | None = Field(None, description="Default: the scenario's only pool.")
    fail_replicas: int | None = Field(None, ge=1, description="This many ready replicas die and cannot return.")
    restore_replicas: int | None = Field(None, ge=1, description="This many lost replicas may run again.")
    add_entitlement: dict[str, Any] | None = Field(None, description="An entitlement, as in the config, onboarded.")
    remove_entitlement: str | None = Field(None, description="An entitlement retired (its requests: 403).")
    revoke_key: str | None = Field(
        None, description="Every API key of this entitlement revoked (its requests: 401 from then on)."
    )
    set: SetField | None = Field(None, description="One field of an entitlement or of the pool changed.")

    @model_validator(mode="after")
    def _one_action(self) -> Event:
        given = [a for a in ACTIONS if getattr(self, a) is not None]
        if len(given) != 1:
            raise ValueError(f"an event needs exactly one of {', '.join(ACTIONS)} (got {', '.join(given) or 'none'})")
        return self

    @property
    def changes_config(self) -> bool:
        return any(getattr(self, a) is not None for a in CONFIG_ACTIONS)


def _set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        nxt = doc.get(key)
        if nxt is None:
            nxt = doc[key] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"{path}: {key} is not a mapping")
        doc = nxt
    doc[leaf] = value


def apply_event(config: TokenPoolsConfig, ev: Event, where: str = "event") -> TokenPoolsConfig:
    """The config after a config event ``ev`` (the others leave it as it is); :class:`ConfigError`
    names the event and the field when the result is not a valid config."""
    if not ev.changes_config:
        return config
    doc = config.model_dump(mode="json", exclude_defaults=True)
    ents: list[dict[str, Any]] = doc.setdefault("entitlements", [])
    names = [e["name"] for e in ents]
    pool = ev.pool or config.pools[0].name
    errors: list[str] = []

    def find(name: str, what: str) -> dict[str, Any] | None:
        if name not in names:
            errors.append(f"{where}.{what}: unknown entitlement {name!r} (known: {', '.join(names)})")
            return None
        return ents[names.index(name)]

    if ev.add_entitlement is not None:
        new = {"pool": pool, **ev.add_entitlement}
        if new.get("name") in names:
            errors.append(f"{where}.add_entitlement.name: {new.get('name')!r} exists already")
        ents.append(new)
    elif ev.remove_entitlement is not None:
        if find(ev.remove_entitlement, "remove_entitlement") is not None:
            ents.pop(names.index(ev.remove_entitlement))
    elif ev.revoke_key is not None:
        if (e := find(ev.revoke_key, "revoke_key")) is not None:
            e["api_keys"] = []
    elif ev.set is not None:
        target = doc["pools"][[p["name"] for p in doc["pools"]].index(pool)] if ev.set.entitlement is None else (
            find(ev.set.entitlement, "set.entitlement"))  # fmt: skip
        if target is not None:
            try:
                _set_path(target, ev.set.field, ev.set.value)
            except ValueError as e:
                errors.append(f"{where}.set.field: {e}")
    if errors:
        raise ConfigError(where, errors)
    return parse_config(doc, where)


def union_config(config: TokenPoolsConfig, scenario: Scenario) -> TokenPoolsConfig:
    """Every entitlement the run ever has (the config's, then what events add, each as last
    defined), for what is measured per tenant; not validated as a whole (an entitlement
    removed and one added may never coexist)."""
    ents = {e.name: e for e in config.entitlements}
    later = config
    for ev in sorted(scenario.events, key=lambda e: e.at_s):
        later = apply_event(later, ev)
        ents.update({e.name: e for e in later.entitlements})
    return TokenPoolsConfig.model_construct(pools=list(config.pools), entitlements=list(ents.values()))


def revoked(scenario: Scenario) -> set[str]:
    """Entitlements some event revokes the keys of (their traffic is refused from then on)."""
    return {ev.revoke_key for ev in scenario.events if ev.revoke_key is not None}


class Skewed(Frozen):
    skewed: float = Field(gt=0, lt=1, description="Share of requests sent to the first ready replica.")


class Replicas(Frozen):
    initial: int | None = Field(None, ge=0, description="Autoscaled policies start here (default min_replicas).")
    fixed: int | None = Field(None, ge=1, description="Fixed-replica policies run this many (default max_replicas).")


class KedaQueue(Frozen):
    target_waiting: float = Field(5.0, gt=0, description="AverageValue target of vllm:num_requests_waiting.")


class Scenario(Frozen):
    name: str = ""
    description: str = ""
    duration_s: float = Field(gt=0)
    profile: str
    profile_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Profile fields replaced for this scenario (e.g. max_num_seqs)."
    )
    config: dict[str, Any] | None = None
    config_file: str | None = None
    interval_s: float = Field(5.0, gt=0)
    sample_s: float | None = Field(None, gt=0, description="Time step of the series in results (default interval_s).")
    replicas: Replicas = Replicas()
    routing: Literal["round_robin", "random"] | Skewed = "round_robin"
    keda_queue: KedaQueue = KedaQueue()
    traffic: dict[str, list[Source]] = Field(min_length=1)
    events: list[Event] = Field(default_factory=list)
    paper: Literal["experiment-1", "experiment-2"] | None = Field(
        None, description="Compare with this experiment of the paper in the report."
    )

    @model_validator(mode="after")
    def _config_source(self) -> Scenario:
        if (self.config is None) == (self.config_file is None):
            raise ValueError("exactly one of config, config_file is required")
        return self


class LoadedScenario:
    """A validated scenario with its config parsed and its paths resolved."""

    def __init__(self, scenario: Scenario, config: TokenPoolsConfig, base: Path, source: str) -> None:
        self.scenario = scenario
        self.config = config
        self.base = base
        self.source = source
        self.pool = config.pools[0]
        tiers = {e.name: e.tier for e in config.entitlements}
        self.spot = frozenset(n for n, t in tiers.items() if t.value == "spot")

    @property
    def name(self) -> str:
        return self.scenario.name

    def path(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.base / p


def resolve(name_or_path: str) -> Path:
    """A file path (the user's own scenario), else a shipped scenario name (:func:`shipped_dir`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = shipped_dir() / f"{name_or_path}.yaml"
    if p.name == name_or_path and shipped.is_file():
        return shipped
    known = ", ".join(shipped_scenarios()) or "none"
    raise ConfigError(name_or_path, [f"neither a file nor a shipped scenario (shipped: {known})"])


def load_scenario(name_or_path: str) -> LoadedScenario:
    """Read, validate and cross-check a scenario; :class:`ConfigError` names each field and value."""
    path = resolve(name_or_path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(source, [f"cannot read the scenario: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError(source, [f"a scenario must be a mapping, got {type(data).__name__}"])
    data.setdefault("name", path.stem)
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e, data)) from e
    base = path.parent
    if scenario.config is not None:
        config = parse_config(scenario.config, f"{source}: config")
    else:
        cpath = Path(scenario.config_file or "")
        config = load_config(cpath if cpath.is_absolute() else base / cpath)
    errors: list[str] = []
    if len(config.pools) != 1:
        errors.append(f"config.pools: an experiment runs exactly one pool (got {len(config.pools)})")
    names = {e.name for e in config.entitlements}
    # the config after each config event must be a valid config; traffic may name what events add
    later = config
    for ev in sorted(scenario.events, key=lambda e: e.at_s):
        try:
            later = apply_event(later, ev, f"events[{scenario.events.index(ev)}]")
        except ConfigError as e:
            errors.extend(e.errors)
            break
        names |= {e.name for e in later.entitlements}
    for name, sources in scenario.traffic.items():
        if name not in names:
            errors.append(f"traffic.{name}: unknown entitlement {name!r} (known: {', '.join(sorted(names))})")
        for i, s in enumerate(sources):
            if s.trace is not None and not (base / s.trace).is_file() and not Path(s.trace).is_file():
                errors.append(f"traffic.{name}[{i}].trace: no such file {s.trace!r} (relative to {base})")
            if s.start_s >= scenario.duration_s:
                errors.append(f"traffic.{name}[{i}].start_s ({s.start_s:g}) is not before duration_s")
    pool_names = {p.name for p in config.pools}
    for i, ev in enumerate(scenario.events):
        if ev.pool is not None and ev.pool not in pool_names:
            errors.append(f"events[{i}].pool: unknown pool {ev.pool!r}")
    if errors:
        raise ConfigError(source, errors)
    return LoadedScenario(scenario, config, base, source)


def shipped_scenarios() -> list[str]:
    """The names of the shipped scenarios: every ``*.yaml`` of :func:`shipped_dir`."""
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))
