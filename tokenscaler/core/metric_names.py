"""Every ``tokenscaler_*`` metric name, and the engine metrics the controller reads: one list.

The sidecar exports its names from here and the controller's sources query the same
constants, so a rename cannot split producer and consumer; the controller's own names
(the plan, the loop, the KEDA scaler) sit beside them. Dashboards and alert rules are
tested against :data:`ALL_NAMES` and :data:`ENGINE_NAMES`.

Label sets: every sidecar series carries ``pool`` and ``replica``; per-entitlement ones add
``entitlement`` and ``tier`` (:data:`SIDECAR_ENTITLEMENT_LABELS`), and per-dimension ones
``dimension`` (one of :data:`~tokenscaler.core.model.DIMENSIONS`). Controller series carry
``pool`` (and ``entitlement``, ``tier``, ``dimension`` where per entitlement or dimension).
"""

from __future__ import annotations

from tokenscaler.core import vllm

# --- sidecar (produced by each sidecar, read by the controller)

SIDECAR_LABELS: tuple[str, ...] = ("pool", "replica")
SIDECAR_ENTITLEMENT_LABELS: tuple[str, ...] = ("pool", "replica", "entitlement", "tier")

SIDECAR_PREFIX = "tokenscaler_sidecar_"
# each name is spelled out in full (not SIDECAR_PREFIX + ...) so that searching for a metric finds its definition

REQUESTS_TOTAL = "tokenscaler_sidecar_requests_total"
"""Counter {entitlement, tier, outcome}: outcome admitted | rejected | error | unauthenticated |
budget_exhausted (refused because the entitlement's budget is spent)."""
REJECTIONS_TOTAL = "tokenscaler_sidecar_rejections_total"
"""Counter {entitlement, tier, dimension}: rejections by the binding dimension."""
PROMPT_TOKENS_TOTAL = "tokenscaler_sidecar_prompt_tokens_total"
"""Counter {entitlement, tier}: prompt tokens of admitted requests the engine accepted."""
GENERATION_TOKENS_TOTAL = "tokenscaler_sidecar_generation_tokens_total"
"""Counter {entitlement, tier}: generated tokens, counted as they stream."""
ADMITTED_WEIGHTED_TOKENS_TOTAL = "tokenscaler_sidecar_admitted_weighted_tokens_total"
"""Counter {entitlement, tier}: weighted tokens served (the usage signal)."""
OFFERED_WEIGHTED_TOKENS_TOTAL = "tokenscaler_sidecar_offered_weighted_tokens_total"
"""Counter {entitlement, tier}: served weighted tokens plus rejected requests' estimates (demand)."""
OFFERED_REQUESTS_TOTAL = "tokenscaler_sidecar_offered_requests_total"
"""Counter {entitlement, tier}: requests that reached admission (admitted, rejected or queued)."""
INFLIGHT_REQUESTS = "tokenscaler_sidecar_inflight_requests"
"""Gauge {entitlement, tier}: sequences in flight (a request with ``n`` choices counts ``n``)."""
RESERVED_KV_TOKENS = "tokenscaler_sidecar_reserved_kv_tokens"
"""Gauge {entitlement, tier}: KV tokens reserved by in-flight requests (prompt + max new tokens)."""
LIMIT = "tokenscaler_sidecar_limit"
"""Gauge {entitlement, tier, dimension}: this replica's sustained limit (+Inf: unlimited)."""
BURST = "tokenscaler_sidecar_burst"
"""Gauge {entitlement, tier, dimension}: this replica's burst (bucket depth; overshoot for kv/concurrency)."""
CEILING = "tokenscaler_sidecar_ceiling"
"""Gauge {entitlement, tier, dimension}: never exceeded on this replica, backfill included (+Inf: unlimited)."""
BACKFILL_ALLOWED = "tokenscaler_sidecar_backfill_allowed"
"""Gauge {entitlement, tier}: 1 when the entitlement may use this replica's idle capacity."""
LIMITS_AGE_SECONDS = "tokenscaler_sidecar_limits_age_seconds"
"""Gauge: seconds since the limits in force were last confirmed by their source (static: 0)."""
LIMITS_STATE = "tokenscaler_sidecar_limits_state"
"""Gauge {state}: 1 for the current state among static, fresh, stale, expired."""
LIMITS_FETCH_ERRORS_TOTAL = "tokenscaler_sidecar_limits_fetch_errors_total"
"""Counter: failed polls of the limits source."""
ADDED_LATENCY_SECONDS = "tokenscaler_sidecar_added_latency_seconds"
"""Histogram {route}: time in the sidecar before forwarding plus the per-response overhead."""
PREEMPTED_STREAMS_TOTAL = "tokenscaler_sidecar_preempted_streams_total"
"""Counter {entitlement, tier}: requests on idle capacity (backfill, spot) cut to give capacity back."""
QUEUE_WAIT_SECONDS = "tokenscaler_sidecar_queue_wait_seconds"
"""Histogram: how long queued (guaranteed) requests waited, admitted or not."""
QUEUED_REQUESTS = "tokenscaler_sidecar_queued_requests"
"""Gauge {entitlement, tier}: requests waiting in the guaranteed queue now."""
TTFT_SLO_REQUESTS_TOTAL = "tokenscaler_sidecar_ttft_slo_requests_total"
"""Counter {entitlement, tier, outcome}: streamed requests of entitlements with ``slo.ttft_p99_s``,
outcome met | missed (time from arrival at the sidecar to the first generated token)."""
TIER_INVERSIONS_TOTAL = "tokenscaler_sidecar_tier_inversions_total"
"""Counter {higher, lower}: admissions of a lower tier on this replica's idle capacity within an interval
after a higher tier was refused here for the replica's capacity (the goal is 0; see core/limiter.py)."""
ENGINE_CAPACITY = SIDECAR_PREFIX + "engine_capacity"
"""Gauge {dimension}: what this replica's engine says it holds (kv_tokens from its cache config);
only the dimensions the engine states."""
ENGINE_MAX_MODEL_LEN = SIDECAR_PREFIX + "engine_max_model_len"
"""Gauge: the engine's context window (``max_model_len`` of its ``/v1/models``)."""

SIDECAR_NAMES: tuple[str, ...] = (
    REQUESTS_TOTAL, REJECTIONS_TOTAL, PROMPT_TOKENS_TOTAL, GENERATION_TOKENS_TOTAL, ADMITTED_WEIGHTED_TOKENS_TOTAL,
    OFFERED_WEIGHTED_TOKENS_TOTAL, OFFERED_REQUESTS_TOTAL, INFLIGHT_REQUESTS, RESERVED_KV_TOKENS, LIMIT, BURST,
    CEILING, BACKFILL_ALLOWED, LIMITS_AGE_SECONDS, LIMITS_STATE, LIMITS_FETCH_ERRORS_TOTAL, ADDED_LATENCY_SECONDS,
    PREEMPTED_STREAMS_TOTAL, QUEUE_WAIT_SECONDS, QUEUED_REQUESTS, TIER_INVERSIONS_TOTAL, ENGINE_CAPACITY,
    ENGINE_MAX_MODEL_LEN, TTFT_SLO_REQUESTS_TOTAL,
)  # fmt: skip

# --- controller (the plan and the loop)

# per entitlement, label dimension (and pool, entitlement, tier)
ENTITLEMENT_GUARANTEE = "tokenscaler_entitlement_guarantee"
ENTITLEMENT_LIMIT = "tokenscaler_entitlement_limit"
ENTITLEMENT_BURST = "tokenscaler_entitlement_burst"
ENTITLEMENT_ALLOCATION = "tokenscaler_entitlement_allocation"
ENTITLEMENT_DEMAND = "tokenscaler_entitlement_demand"
ENTITLEMENT_USAGE = "tokenscaler_entitlement_usage"
ENTITLEMENT_SHORTFALL = "tokenscaler_entitlement_guarantee_shortfall"
# per entitlement, no dimension
ENTITLEMENT_DEBT = "tokenscaler_entitlement_debt_share_seconds"
ENTITLEMENT_DEBT_BOUND = "tokenscaler_entitlement_debt_bound_share_seconds"  # the configured |debt| bound
# per pool
POOL_DESIRED_REPLICAS = "tokenscaler_pool_desired_replicas"
POOL_TARGET_REPLICAS = "tokenscaler_pool_target_replicas"
POOL_READY_REPLICAS = "tokenscaler_pool_ready_replicas"
POOL_MIN_REPLICAS = "tokenscaler_pool_min_replicas"
POOL_MAX_REPLICAS = "tokenscaler_pool_max_replicas"
POOL_CAPACITY = "tokenscaler_pool_capacity"  # label dimension
POOL_ALLOCATED = "tokenscaler_pool_allocated"  # label dimension
POOL_DEMAND = "tokenscaler_pool_demand"  # label dimension
POOL_GUARANTEE_SHORTFALL = "tokenscaler_pool_guarantee_shortfall"  # label dimension
POOL_DATA_INCOMPLETE = "tokenscaler_pool_data_incomplete"
POOL_CAPACITY_RATIO = "tokenscaler_pool_capacity_ratio"  # label dimension: observed / configured per replica
# showback (tokenscaler.core.showback): counters that start at zero in each controller
# process, so increase() over any range gives a statement
ENTITLEMENT_REPLICA_SECONDS_TOTAL = "tokenscaler_entitlement_replica_seconds_total"
"""Counter {pool, entitlement, basis}: replica-seconds attributed, basis reserved | allocated |
backfill | idle; entitlement ``_platform`` holds the idle time the platform pays for."""
ENTITLEMENT_GUARANTEE_USED_TOTAL = "tokenscaler_entitlement_guarantee_used_replica_seconds_total"
"""Counter {pool, entitlement}: the part of ``basis="reserved"`` the entitlement used."""
POOL_REPLICA_SECONDS_TOTAL = "tokenscaler_pool_replica_seconds_total"
"""Counter {pool}: ready replica-seconds split (the sum of every basis of the pool)."""
POOL_PRICE = "tokenscaler_pool_price_per_replica_hour"
"""Gauge {pool, currency}: the pool's ``pricing.per_replica_hour`` (absent without pricing)."""
# budgets (tokenscaler.core.budget), per entitlement that has one: {pool, entitlement, period, on_exhausted}
ENTITLEMENT_BUDGET = "tokenscaler_entitlement_budget_weighted_tokens"
ENTITLEMENT_BUDGET_CONSUMED = "tokenscaler_entitlement_budget_consumed_weighted_tokens"
ENTITLEMENT_BUDGET_REMAINING = "tokenscaler_entitlement_budget_remaining_weighted_tokens"
ENTITLEMENT_BUDGET_RATE = "tokenscaler_entitlement_budget_consumption_rate_weighted_tokens_per_s"
ENTITLEMENT_BUDGET_RESETS_AT = "tokenscaler_entitlement_budget_resets_at_timestamp_seconds"
ENTITLEMENT_BUDGET_EXHAUSTED = "tokenscaler_entitlement_budget_exhausted"
# the plan
PLAN_AGE = "tokenscaler_plan_age_seconds"
PLAN_STALE = "tokenscaler_plan_stale"
PLAN_VERSION = "tokenscaler_plan_version"
# the loop and its inputs
INTERVAL_DURATION = "tokenscaler_interval_duration_seconds"  # label phase
INTERVALS = "tokenscaler_intervals_total"  # label outcome
SOURCE_ERRORS = "tokenscaler_source_errors_total"  # label kind
SOURCE_ANSWERS = "tokenscaler_source_answers_total"  # labels query, kind
STATE_WRITE_ERRORS = "tokenscaler_state_write_errors_total"
API_REQUESTS = "tokenscaler_api_requests_total"  # labels route, code: the HTTP API (limits, plan)
HTTP_AUTH_FAILURES = "tokenscaler_http_auth_failures_total"  # label reason (tokenscaler.serve.auth)

CONTROLLER_NAMES: tuple[str, ...] = tuple(
    v
    for k, v in dict(globals()).items()
    if k.isupper() and isinstance(v, str) and v.startswith("tokenscaler_") and not v.startswith(SIDECAR_PREFIX)
)

# --- the KEDA scaler (inside the controller)

SCALER_REQUESTS_TOTAL = "tokenscaler_scaler_requests_total"
SCALER_REQUEST_DURATION_SECONDS = "tokenscaler_scaler_request_duration_seconds"
SCALER_STALE_ANSWERS_TOTAL = "tokenscaler_scaler_stale_answers_total"
SCALER_STREAMS_OPEN = "tokenscaler_scaler_streams_open"
SCALER_STREAM_MESSAGES_TOTAL = "tokenscaler_scaler_stream_messages_total"

SCALER_NAMES: tuple[str, ...] = (
    SCALER_REQUESTS_TOTAL,
    SCALER_REQUEST_DURATION_SECONDS,
    SCALER_STALE_ANSWERS_TOTAL,
    SCALER_STREAMS_OPEN,
    SCALER_STREAM_MESSAGES_TOTAL,
)

ALL_NAMES: tuple[str, ...] = (*SIDECAR_NAMES, *CONTROLLER_NAMES, *SCALER_NAMES)

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
