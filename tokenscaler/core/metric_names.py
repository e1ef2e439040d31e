"""Every ``tokenscaler_*`` metric, declared once as a spec, and the engine metrics the controller reads.

Each metric is declared once, with its type, labels and help, as client_python declares a
metric (``Counter(name, documentation, labelnames)``): the exporters build their families
from the spec (the sidecar, :mod:`tokenscaler.sidecar.metrics`; the controller,
:mod:`tokenscaler.control.metrics`; the KEDA scaler, :mod:`tokenscaler.serve.scaler_metrics`;
the HTTP API's authentication, :mod:`tokenscaler.serve.auth`), the controller's sources query
the same constants, so a rename cannot split producer and consumer, and the dashboards,
alert rules and the metrics reference (``docs/reference/metrics.md``, generated) are checked
against, or written from, :data:`METRICS`.

Each declaration returns the metric's name, the module constant everyone imports; the
groups (:data:`SIDECAR_METRICS`, :data:`CONTROLLER_METRICS`, :data:`SCALER_METRICS`) hold
every spec in declaration order, so a metric cannot be declared outside its group's list.
A counter's name ends in ``_total`` (its samples' name; prometheus-client is given
:attr:`MetricSpec.family_name`, without it, and appends it).

Label sets: every sidecar series carries ``pool`` and ``replica``
(:data:`SIDECAR_LABELS`); per-entitlement ones add ``entitlement`` and ``tier``
(:data:`SIDECAR_ENTITLEMENT_LABELS`), and per-dimension ones ``dimension`` (one of
:data:`~tokenscaler.core.model.DIMENSIONS`). Controller series carry ``pool`` (and
``entitlement``, ``tier``, ``dimension`` where per entitlement or dimension); the loop's own
and the scaler's carry only their own labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenscaler.core import vllm

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
TYPES = (COUNTER, GAUGE, HISTOGRAM)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as its exporter declares it: name, type, label names (in order) and help."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"metric {self.name}: type must be one of {', '.join(TYPES)}, got {self.type!r}")
        if (self.type == COUNTER) != self.name.endswith("_total"):
            raise ValueError(f"metric {self.name}: a counter's name, and only a counter's, ends in _total")

    @property
    def family_name(self) -> str:
        """The name prometheus-client is given: a counter's without ``_total`` (it appends it)."""
        return self.name.removesuffix("_total") if self.type == COUNTER else self.name


class _Group:
    """The specs of one process, collected in declaration order (as a registry collects metrics)."""

    def __init__(self, base_labels: tuple[str, ...] = ()) -> None:
        self.base_labels = base_labels
        self.specs: list[MetricSpec] = []

    def _declare(self, type_: str, name: str, help_: str, labels: tuple[str, ...]) -> str:
        self.specs.append(MetricSpec(name, type_, (*self.base_labels, *labels), help_))
        return name

    def counter(self, name: str, help_: str, *labels: str) -> str:
        return self._declare(COUNTER, name, help_, labels)

    def gauge(self, name: str, help_: str, *labels: str) -> str:
        return self._declare(GAUGE, name, help_, labels)

    def histogram(self, name: str, help_: str, *labels: str) -> str:
        return self._declare(HISTOGRAM, name, help_, labels)


# --- sidecar (produced by each sidecar, read by the controller)

SIDECAR_LABELS: tuple[str, ...] = ("pool", "replica")
SIDECAR_ENTITLEMENT_LABELS: tuple[str, ...] = ("pool", "replica", "entitlement", "tier")
_ENT = ("entitlement", "tier")

SIDECAR_PREFIX = "tokenscaler_sidecar_"
# each name is spelled out in full (not SIDECAR_PREFIX + ...) so that searching for a metric finds its definition
_sidecar = _Group(SIDECAR_LABELS)

REQUESTS_TOTAL = _sidecar.counter("tokenscaler_sidecar_requests_total", "Requests by outcome.", *_ENT, "outcome")
"""outcome admitted | rejected | error | unauthenticated | budget_exhausted (refused because the
entitlement's budget is spent)."""
REJECTIONS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_rejections_total", "Rejections by binding dimension.", *_ENT, "dimension"
)
TTFT_SLO_REQUESTS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_ttft_slo_requests_total",
    "Streamed requests of entitlements with a TTFT SLO, by whether their first token met it.",
    *_ENT, "outcome",
)  # fmt: skip
"""Entitlements with ``slo.ttft_p99_s`` only; outcome met | missed (time from arrival at the sidecar
to the first generated token)."""
PROMPT_TOKENS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_prompt_tokens_total", "Prompt tokens of admitted requests.", *_ENT
)
"""Prompt tokens of admitted requests the engine accepted."""
GENERATION_TOKENS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_generation_tokens_total", "Generated tokens, counted as they stream.", *_ENT
)
ADMITTED_WEIGHTED_TOKENS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_admitted_weighted_tokens_total", "Weighted tokens served (usage).", *_ENT
)
"""The usage signal."""
OFFERED_WEIGHTED_TOKENS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_offered_weighted_tokens_total", "Weighted tokens offered, rejected included (demand).", *_ENT
)
"""Served weighted tokens plus rejected requests' estimates: the demand signal."""
OFFERED_REQUESTS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_offered_requests_total", "Requests offered for admission.", *_ENT
)
"""Requests that reached admission (admitted, rejected or queued)."""
PREEMPTED_STREAMS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_preempted_streams_total", "Requests on idle capacity cut to give it back.", *_ENT
)
"""Requests on idle capacity (backfill, spot) cut to give capacity back."""
INFLIGHT_REQUESTS = _sidecar.gauge("tokenscaler_sidecar_inflight_requests", "Sequences in flight.", *_ENT)
"""A request with ``n`` choices counts ``n``."""
RESERVED_KV_TOKENS = _sidecar.gauge(
    "tokenscaler_sidecar_reserved_kv_tokens", "KV tokens reserved by in-flight requests.", *_ENT
)
"""Prompt + max new tokens of the requests in flight."""
QUEUED_REQUESTS = _sidecar.gauge(
    "tokenscaler_sidecar_queued_requests", "Requests waiting in the guaranteed queue.", *_ENT
)
BACKFILL_ALLOWED = _sidecar.gauge("tokenscaler_sidecar_backfill_allowed", "1 if idle capacity may be used.", *_ENT)
LIMIT = _sidecar.gauge("tokenscaler_sidecar_limit", "Sustained limit on this replica.", *_ENT, "dimension")
"""+Inf: unlimited."""
BURST = _sidecar.gauge("tokenscaler_sidecar_burst", "Burst on this replica.", *_ENT, "dimension")
"""The bucket depth; the overshoot for kv_tokens and concurrency."""
CEILING = _sidecar.gauge(
    "tokenscaler_sidecar_ceiling", "Never exceeded on this replica, backfill included.", *_ENT, "dimension"
)
"""+Inf: unlimited."""
TIER_INVERSIONS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_tier_inversions_total",
    "Idle-capacity admissions of a lower tier within an interval after a higher tier was refused here "
    "for the replica's capacity.",
    "higher", "lower",
)  # fmt: skip
"""The goal is 0; see core/limiter.py."""
LIMITS_AGE_SECONDS = _sidecar.gauge(
    "tokenscaler_sidecar_limits_age_seconds", "Seconds since the limits were confirmed."
)
"""Since the limits in force were last confirmed by their source (static: 0)."""
LIMITS_STATE = _sidecar.gauge("tokenscaler_sidecar_limits_state", "Current limits state.", "state")
"""1 for the current state among static, fresh, stale, expired."""
SIDECAR_CONFIG_GENERATION = _sidecar.gauge(
    "tokenscaler_sidecar_config_generation",
    "The controller's config generation whose spec this sidecar enforces (absent: only its own --config).",
)
"""Lags ``tokenscaler_config_generation`` by at most an interval and a poll; longer: the alert."""
SIDECAR_CONFIG_RELOAD_FAILURES_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_config_reload_failures_total",
    "Re-reads of the sidecar's own --config refused (the last good config stays in force).",
)
"""Only where the file is the sidecar's config (no --limits-url)."""
LIMITS_VERSION = _sidecar.gauge(
    "tokenscaler_sidecar_limits_version", "The version of the controller's limits document in force (0: none)."
)
LIMITS_FETCH_ERRORS_TOTAL = _sidecar.counter(
    "tokenscaler_sidecar_limits_fetch_errors_total", "Failed polls of the limits source, by reason.", "reason"
)
ENGINE_CAPACITY = _sidecar.gauge(
    "tokenscaler_sidecar_engine_capacity",
    "What this replica's engine states it holds (kv_tokens: its cache config).",
    "dimension",
)
"""Only the dimensions the engine states."""
ENGINE_MAX_MODEL_LEN = _sidecar.gauge(
    "tokenscaler_sidecar_engine_max_model_len", "The engine's context window (/v1/models max_model_len)."
)
ADDED_LATENCY_SECONDS = _sidecar.histogram(
    "tokenscaler_sidecar_added_latency_seconds",
    "Latency added by the sidecar: before forwarding plus per-response overhead.",
    "route",
)
QUEUE_WAIT_SECONDS = _sidecar.histogram(
    "tokenscaler_sidecar_queue_wait_seconds", "Time queued guaranteed requests waited for admission."
)
"""How long queued (guaranteed) requests waited, admitted or not."""

# --- controller (the plan and the loop)

_controller = _Group()
_PER_DIM = ("pool", "entitlement", "tier", "dimension")
_PER_ENT = ("pool", "entitlement", "tier")
_BUDGET = ("pool", "entitlement", "period", "on_exhausted")

# per entitlement and dimension
ENTITLEMENT_GUARANTEE = _controller.gauge(
    "tokenscaler_entitlement_guarantee", "Guaranteed amount per dimension (guaranteed tier).", *_PER_DIM
)
ENTITLEMENT_LIMIT = _controller.gauge(
    "tokenscaler_entitlement_limit", "Sustained limit for the next interval, whole pool.", *_PER_DIM
)
ENTITLEMENT_BURST = _controller.gauge("tokenscaler_entitlement_burst", "Burst allowance, whole pool.", *_PER_DIM)
ENTITLEMENT_ALLOCATION = _controller.gauge(
    "tokenscaler_entitlement_allocation", "Allocation this interval.", *_PER_DIM
)
ENTITLEMENT_DEMAND = _controller.gauge(
    "tokenscaler_entitlement_demand", "Smoothed demand (offered load, rejected included).", *_PER_DIM
)
ENTITLEMENT_USAGE = _controller.gauge(
    "tokenscaler_entitlement_usage",
    "Service received over the last interval (kv_tokens and concurrency: admitted tokens/s "
    "times the profiled footprint where the source reads the gauges with the profile).",
    *_PER_DIM,
)
ENTITLEMENT_SHORTFALL = _controller.gauge(
    "tokenscaler_entitlement_guarantee_shortfall", "Guaranteed demand not allocated: the breach signal.", *_PER_DIM
)
# per entitlement, no dimension
ENTITLEMENT_DEBT = _controller.gauge(
    "tokenscaler_entitlement_debt_share_seconds", "Fair-share debt in dominant-share seconds.", *_PER_ENT
)
ENTITLEMENT_DEBT_BOUND = _controller.gauge(
    "tokenscaler_entitlement_debt_bound_share_seconds",
    "The bound |debt| never exceeds (debt.bound_share_s of the entitlement's config).",
    *_PER_ENT,
)
# per pool
POOL_DESIRED_REPLICAS = _controller.gauge(
    "tokenscaler_pool_desired_replicas", "Replicas the plan asks for (what KEDA is told).", "pool"
)
POOL_TARGET_REPLICAS = _controller.gauge(
    "tokenscaler_pool_target_replicas", "Replicas needed now, before scale-down stabilization.", "pool"
)
POOL_READY_REPLICAS = _controller.gauge("tokenscaler_pool_ready_replicas", "Replicas ready to serve.", "pool")
POOL_MIN_REPLICAS = _controller.gauge("tokenscaler_pool_min_replicas", "Configured minimum replicas.", "pool")
POOL_MAX_REPLICAS = _controller.gauge("tokenscaler_pool_max_replicas", "Configured maximum replicas.", "pool")
POOL_CAPACITY = _controller.gauge(
    "tokenscaler_pool_capacity", "Capacity of the ready replicas.", "pool", "dimension"
)
POOL_ALLOCATED = _controller.gauge("tokenscaler_pool_allocated", "Sum of allocations.", "pool", "dimension")
POOL_DEMAND = _controller.gauge("tokenscaler_pool_demand", "Sum of smoothed demand.", "pool", "dimension")
POOL_GUARANTEE_SHORTFALL = _controller.gauge(
    "tokenscaler_pool_guarantee_shortfall",
    "Sum of guarantee shortfalls, and guarantees max_replicas cannot carry.",
    "pool", "dimension",
)  # fmt: skip
POOL_DATA_INCOMPLETE = _controller.gauge(
    "tokenscaler_pool_data_incomplete", "1 when part of the pool's metrics were missing this interval.", "pool"
)
POOL_CAPACITY_RATIO = _controller.gauge(
    "tokenscaler_pool_capacity_ratio",
    "Per-replica capacity the engines state / the configured replica.",
    "pool", "dimension",
)  # fmt: skip
"""Observed / configured per replica; only the dimensions an engine states."""
# showback (tokenscaler.core.showback): counters that start at zero in each controller
# process, so increase() over any range gives a statement
ENTITLEMENT_REPLICA_SECONDS_TOTAL = _controller.counter(
    "tokenscaler_entitlement_replica_seconds_total",
    "Replica-seconds attributed to each entitlement by basis (entitlement _platform: idle time the "
    "platform pays for).",
    "pool", "entitlement", "basis",
)  # fmt: skip
"""basis reserved | allocated | backfill | idle; entitlement ``_platform`` holds the idle time the
platform pays for."""
ENTITLEMENT_GUARANTEE_USED_TOTAL = _controller.counter(
    "tokenscaler_entitlement_guarantee_used_replica_seconds_total",
    "The used part of each entitlement's reserved replica-seconds.",
    "pool", "entitlement",
)  # fmt: skip
"""The part of ``basis="reserved"`` the entitlement used."""
POOL_REPLICA_SECONDS_TOTAL = _controller.counter(
    "tokenscaler_pool_replica_seconds_total", "Ready replica-seconds of the pool, split.", "pool"
)
"""The sum of every basis of the pool."""
POOL_PRICE = _controller.gauge(
    "tokenscaler_pool_price_per_replica_hour", "Price of one replica-hour (pricing).", "pool", "currency"
)
"""The pool's ``pricing.per_replica_hour`` (absent without pricing)."""
# budgets (tokenscaler.core.budget), per entitlement that has one
ENTITLEMENT_BUDGET = _controller.gauge(
    "tokenscaler_entitlement_budget_weighted_tokens", "The budget: weighted tokens per period.", *_BUDGET
)
ENTITLEMENT_BUDGET_CONSUMED = _controller.gauge(
    "tokenscaler_entitlement_budget_consumed_weighted_tokens", "Weighted tokens admitted this period.", *_BUDGET
)
ENTITLEMENT_BUDGET_REMAINING = _controller.gauge(
    "tokenscaler_entitlement_budget_remaining_weighted_tokens",
    "Weighted tokens left this period (0 when spent).",
    *_BUDGET,
)
ENTITLEMENT_BUDGET_RATE = _controller.gauge(
    "tokenscaler_entitlement_budget_consumption_rate_weighted_tokens_per_s",
    "Consumption rate, weighted tokens/s, smoothed (6 h half-life).",
    *_BUDGET,
)
ENTITLEMENT_BUDGET_RESETS_AT = _controller.gauge(
    "tokenscaler_entitlement_budget_resets_at_timestamp_seconds",
    "Unix seconds when the period ends and the budget resets.",
    *_BUDGET,
)
ENTITLEMENT_BUDGET_EXHAUSTED = _controller.gauge(
    "tokenscaler_entitlement_budget_exhausted",
    "1 while the budget is spent (refused, or spot, until the reset).",
    *_BUDGET,
)
# the plan
PLAN_AGE = _controller.gauge("tokenscaler_plan_age_seconds", "Seconds since the published plan was made.")
PLAN_STALE = _controller.gauge(
    "tokenscaler_plan_stale", "1 while the controller serves its last good plan (metrics missing)."
)
PLAN_VERSION = _controller.gauge("tokenscaler_plan_version", "Version of the published plan.")
# the loop and its inputs
INTERVAL_DURATION = _controller.histogram(
    "tokenscaler_interval_duration_seconds",
    "Time spent in one planning interval, by phase (read, plan, persist, total), and reading the profile.",
    "phase",
)
INTERVALS = _controller.counter("tokenscaler_intervals_total", "Planning intervals by outcome.", "outcome")
SOURCE_ERRORS = _controller.counter("tokenscaler_source_errors_total", "Metric reads that failed, by kind.", "kind")
SOURCE_ANSWERS = _controller.counter(
    "tokenscaler_source_answers_total",
    "Answers of the metrics source by query and shape (ok, empty, nan, multi, stale).",
    "query", "kind",
)  # fmt: skip
STATE_WRITE_ERRORS = _controller.counter("tokenscaler_state_write_errors_total", "State file writes that failed.")
CONFIG_GENERATION = _controller.gauge(
    "tokenscaler_config_generation", "Generation of the config in force: one more per change applied."
)
"""Starts at 1 in each process; a re-read that changes nothing is no new generation."""
CONFIG_RELOAD_FAILURES = _controller.counter(
    "tokenscaler_config_reload_failures_total",
    "Config file re-reads refused (unreadable or invalid): the last good config stays in force.",
)
CONFIG_LAST_RELOAD_SUCCESS = _controller.gauge(
    "tokenscaler_config_last_reload_success",
    "1 if the last config re-read was applied (or changed nothing), 0 if it was refused.",
)
API_REQUESTS = _controller.counter(
    "tokenscaler_api_requests_total", "HTTP API requests (limits, plan) by route and status code.", "route", "code"
)
HTTP_AUTH_FAILURES = _controller.counter(
    "tokenscaler_http_auth_failures_total",
    "Requests to the HTTP API refused for want of authentication, by reason.",
    "reason",
)
"""tokenscaler.serve.auth"""

# --- the KEDA scaler (inside the controller)

_scaler = _Group()
SCALER_REQUESTS_TOTAL = _scaler.counter(
    "tokenscaler_scaler_requests_total",
    "KEDA external scaler RPCs finished, by RPC and gRPC status code.",
    "rpc", "code",
)  # fmt: skip
"""A stream counts when it ends."""
SCALER_REQUEST_DURATION_SECONDS = _scaler.histogram(
    "tokenscaler_scaler_request_duration_seconds", "Time spent handling a unary KEDA external scaler RPC.", "rpc"
)
SCALER_STALE_ANSWERS_TOTAL = _scaler.counter(
    "tokenscaler_scaler_stale_answers_total",
    "Scaler answers served from the last good plan while it is marked stale.",
    "rpc",
)
SCALER_STREAMS_OPEN = _scaler.gauge("tokenscaler_scaler_streams_open", "Open StreamIsActive streams.")
SCALER_STREAM_MESSAGES_TOTAL = _scaler.counter(
    "tokenscaler_scaler_stream_messages_total", "IsActiveResponse messages pushed on StreamIsActive streams."
)

# --- vLLM's (produced by each engine, read by the controller; the names' table: tokenscaler.core.vllm)

VLLM_CACHE_CONFIG_INFO = vllm.CACHE_CONFIG_INFO
"""Info gauge; labels ``num_gpu_blocks`` and ``block_size`` (read by name) give KV capacity."""
VLLM_NUM_REQUESTS_RUNNING = vllm.NUM_REQUESTS_RUNNING
VLLM_NUM_REQUESTS_WAITING = vllm.NUM_REQUESTS_WAITING
VLLM_KV_CACHE_USAGE_PERC = vllm.KV_CACHE_USAGE_PERC
VLLM_PROMPT_TOKENS_TOTAL = vllm.PROMPT_TOKENS + "_total"
VLLM_GENERATION_TOKENS_TOTAL = vllm.GENERATION_TOKENS + "_total"
ENGINE_NAMES: tuple[str, ...] = (
    VLLM_CACHE_CONFIG_INFO,
    VLLM_NUM_REQUESTS_RUNNING,
    VLLM_NUM_REQUESTS_WAITING,
    VLLM_KV_CACHE_USAGE_PERC,
    VLLM_PROMPT_TOKENS_TOTAL,
    VLLM_GENERATION_TOKENS_TOTAL,
)

# --- the declared lists (the last lines of the module: every declaration above is in them)

SIDECAR_METRICS: tuple[MetricSpec, ...] = tuple(_sidecar.specs)
CONTROLLER_METRICS: tuple[MetricSpec, ...] = tuple(_controller.specs)
SCALER_METRICS: tuple[MetricSpec, ...] = tuple(_scaler.specs)
METRICS: tuple[MetricSpec, ...] = (*SIDECAR_METRICS, *CONTROLLER_METRICS, *SCALER_METRICS)
"""Every ``tokenscaler_*`` metric any process of ours exports."""
SPECS: dict[str, MetricSpec] = {m.name: m for m in METRICS}
"""Name -> its spec."""

SIDECAR_NAMES: tuple[str, ...] = tuple(m.name for m in SIDECAR_METRICS)
CONTROLLER_NAMES: tuple[str, ...] = tuple(m.name for m in CONTROLLER_METRICS)
SCALER_NAMES: tuple[str, ...] = tuple(m.name for m in SCALER_METRICS)
ALL_NAMES: tuple[str, ...] = (*SIDECAR_NAMES, *CONTROLLER_NAMES, *SCALER_NAMES)
