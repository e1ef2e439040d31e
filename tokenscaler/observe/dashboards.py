"""What the Grafana dashboards show, built from one source; ``make generate`` writes them into the repository.

Four dashboards, one per concern (:data:`DASHBOARDS`): *Pools*, *Entitlements*, *Health*
(the sidecars, the controller and the KEDA scaler) and *Showback*, each written to
``dashboards/NAME.json`` by :mod:`tokenscaler.observe.grafana` (the model and the writer: one
name per dashboard gives its file, uid and title). Every dashboard has the variables
``pool``, ``tier`` and ``entitlement`` (multi-value, "All" = ``.*``).

Metric names come from :mod:`tokenscaler.observe.names`; the checked-in JSON is what this
module builds (:func:`render_all`; a test fails on a difference).

Label conventions the queries rely on: engine (vLLM) and sidecar series carry ``pool``
(the sidecar sets it; engines get it from a relabelling of the pod's label, as the
controller's Prometheus source expects), sidecars also ``replica``.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenscaler.observe.grafana import Dashboard, Panel, QueryVariable, Row, Target, to_text
from tokenscaler.observe.names import ours as m
from tokenscaler.observe.names import scaler as s
from tokenscaler.observe.names import vllm as v

DIMENSIONS: tuple[tuple[str, str, str], ...] = (
    # (dimension label value, title, Grafana unit)
    ("throughput_tokens_per_s", "throughput", "suffix: tok/s"),
    ("kv_tokens", "KV tokens", "short"),
    ("concurrency", "concurrency", "short"),
)

P = 'pool=~"$pool"'
E = 'pool=~"$pool", tier=~"$tier", entitlement=~"$entitlement"'
RI = "$__rate_interval"

VARIABLES = (
    QueryVariable("pool", "pool", f"label_values({m.POOL_DESIRED_REPLICAS}, pool)"),
    QueryVariable("tier", "tier", f'label_values({m.ENTITLEMENT_ALLOCATION}{{pool=~"$pool"}}, tier)'),
    QueryVariable(
        "entitlement",
        "entitlement",
        f'label_values({m.ENTITLEMENT_ALLOCATION}{{pool=~"$pool", tier=~"$tier"}}, entitlement)',
    ),
)


def _base(name: str) -> str:
    return name.removesuffix("_total")


def total(name: str) -> str:
    """A counter's series name (``_total``)."""
    return _base(name) + "_total"


def _q(expr: str, legend: str) -> Target:
    return Target(" ".join(expr.split()), legend)


def _tier_join(expr: str) -> str:
    """Attach ``tier`` to a per-pool series: one copy per tier that has entitlements in the pool
    (engines know pools, not tiers)."""
    tiers = f'{m.ENTITLEMENT_ALLOCATION}{{{P}, tier=~"$tier"}}'
    return f"group by (pool, tier) ({tiers}) * on (pool) group_left () ({expr})"


def pools() -> Dashboard:
    d = Dashboard(
        "pools",
        "Per pool: capacity against demand and what is provisioned, replicas, the plan and engine load.",
        VARIABLES,
    )
    d.items.append(Row("Capacity and demand"))
    for dim, title, unit in DIMENSIONS:
        sel = f'{P}, dimension="{dim}"'
        d.items.append(
            Panel(
                f"Capacity and demand: {title}",
                f"{title} of the ready replicas (capacity), what the desired replicas provision, smoothed demand, "
                "the sum of allocations and the guarantee shortfall (should be 0).",
                (
                    _q(f"sum by (pool) ({m.POOL_CAPACITY}{{{sel}}})", "{{pool}} capacity (ready)"),
                    _q(
                        f"sum by (pool) ({m.POOL_CAPACITY}{{{sel}}})"
                        f" / on (pool) (max by (pool) ({m.POOL_READY_REPLICAS}{{{P}}}) > 0)"
                        f" * on (pool) max by (pool) ({m.POOL_DESIRED_REPLICAS}{{{P}}})",
                        "{{pool}} provisioned (desired)",
                    ),
                    _q(f"sum by (pool) ({m.POOL_DEMAND}{{{sel}}})", "{{pool}} demand"),
                    _q(f"sum by (pool) ({m.POOL_ALLOCATED}{{{sel}}})", "{{pool}} allocated"),
                    _q(f"sum by (pool) ({m.POOL_GUARANTEE_SHORTFALL}{{{sel}}})", "{{pool}} guarantee shortfall"),
                ),
                unit=unit,
                width=8,
                min=0,
            )
        )
    d.items.append(Row("Replicas and plan"))
    d.items.append(
        Panel(
            "Replicas: desired against ready",
            "Desired is what KEDA is told; target is before scale-down stabilization; min and max from the config.",
            (
                _q(f"{m.POOL_DESIRED_REPLICAS}{{{P}}}", "{{pool}} desired"),
                _q(f"{m.POOL_TARGET_REPLICAS}{{{P}}}", "{{pool}} target"),
                _q(f"{m.POOL_READY_REPLICAS}{{{P}}}", "{{pool}} ready"),
                _q(f"{m.POOL_MAX_REPLICAS}{{{P}}}", "{{pool}} max"),
                _q(f"{m.POOL_MIN_REPLICAS}{{{P}}}", "{{pool}} min"),
            ),
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Capacity observed vs configured",
            "Observed per-replica capacity over the configured one, per dimension (1 = as configured; "
            "below 1 the engines deliver less than the pool's replica spec).",
            (_q(f"{m.POOL_CAPACITY_RATIO}{{{P}}}", "{{pool}} {{dimension}}"),),
            unit="percentunit",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Plan age and staleness",
            "Seconds since the published plan was made, and 1 while the controller serves its last good plan.",
            (
                _q(f"max by (instance) ({m.PLAN_AGE})", "plan age {{instance}}"),
                _q(f"max by (instance) ({m.PLAN_STALE})", "stale {{instance}}"),
            ),
            unit="s",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Plan version",
            "Version of the published plan; it rises once per planning interval.",
            (_q(f"max by (instance) ({m.PLAN_VERSION})", "version {{instance}}"),),
            kind="stat",
            width=6,
        )
    )
    d.items.append(
        Panel(
            "Pool data incomplete",
            "1 when part of the pool's metrics were missing in the last interval.",
            (_q(f"{m.POOL_DATA_INCOMPLETE}{{{P}}}", "{{pool}}"),),
            width=6,
            min=0,
        )
    )
    d.items.append(Row("Engines"))
    d.items.append(
        Panel(
            "Engine KV cache usage",
            "vLLM's KV-cache usage (fraction), averaged over the pool's engines.",
            (_q(f"avg by (pool) ({v.KV_CACHE_USAGE_PERC}{{{P}}})", "{{pool}}"),),
            unit="percentunit",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Engine requests running and waiting",
            "vLLM's scheduler state summed over the pool's engines.",
            (
                _q(f"sum by (pool) ({v.NUM_REQUESTS_RUNNING}{{{P}}})", "{{pool}} running"),
                _q(f"sum by (pool) ({v.NUM_REQUESTS_WAITING}{{{P}}})", "{{pool}} waiting"),
            ),
            min=0,
        )
    )
    return d


def entitlements() -> Dashboard:
    d = Dashboard(
        "entitlements",
        "Per entitlement: allocation against guarantee, limit and usage; offered against admitted; 429s; "
        "debt; SLO attainment and latency by tier.",
        VARIABLES,
    )
    d.items.append(Row("Allocation"))
    for dim, title, unit in DIMENSIONS:
        sel = f'{E}, dimension="{dim}"'
        d.items.append(
            Panel(
                f"Allocation, guarantee, limit and usage: {title}",
                f"Per entitlement, {title}: the allocation of this interval, its guarantee (guaranteed tier), "
                "the sustained limit the sidecars enforce (whole pool), service received and smoothed demand.",
                (
                    _q(f"{m.ENTITLEMENT_ALLOCATION}{{{sel}}}", "{{entitlement}} allocation"),
                    _q(f'{m.ENTITLEMENT_GUARANTEE}{{{sel}, tier="guaranteed"}}', "{{entitlement}} guarantee"),
                    _q(f"{m.ENTITLEMENT_LIMIT}{{{sel}}}", "{{entitlement}} limit"),
                    _q(f"{m.ENTITLEMENT_USAGE}{{{sel}}}", "{{entitlement}} usage"),
                    _q(f"{m.ENTITLEMENT_DEMAND}{{{sel}}}", "{{entitlement}} demand"),
                ),
                unit=unit,
                width=8,
                min=0,
            )
        )
    d.items.append(
        Panel(
            "Guarantee shortfall",
            "Guaranteed demand the plan could not allocate, per dimension: the breach signal (should be 0).",
            (_q(f"{m.ENTITLEMENT_SHORTFALL}{{{E}}}", "{{entitlement}} {{dimension}}"),),
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Debt over time",
            "Fair-share debt in dominant-share seconds (positive: owed service), against its configured bound.",
            (
                _q(f"{m.ENTITLEMENT_DEBT}{{{E}}}", "{{entitlement}}"),
                _q(f"{m.ENTITLEMENT_DEBT_BOUND}{{{E}}}", "{{entitlement}} bound"),
            ),
            unit="s",
        )
    )
    d.items.append(Row("Admission at the sidecars"))
    d.items.append(
        Panel(
            "Offered vs admitted weighted tokens",
            "Weighted tokens/s offered (rejected requests' estimates included) and served, over all replicas.",
            (
                _q(
                    f"sum by (entitlement) (rate({m.OFFERED_WEIGHTED_TOKENS_TOTAL}{{{E}}}[{RI}]))",
                    "{{entitlement}} offered",
                ),
                _q(
                    f"sum by (entitlement) (rate({m.ADMITTED_WEIGHTED_TOKENS_TOTAL}{{{E}}}[{RI}]))",
                    "{{entitlement}} admitted",
                ),
            ),
            unit="suffix: tok/s",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Requests by outcome",
            "Requests/s reaching admission, and their outcome (admitted, rejected with 429, error).",
            (
                _q(f"sum by (entitlement) (rate({m.OFFERED_REQUESTS_TOTAL}{{{E}}}[{RI}]))", "{{entitlement}} offered"),
                _q(
                    f"sum by (entitlement, outcome) "
                    f'(rate({m.REQUESTS_TOTAL}{{{E}, outcome!="unauthenticated"}}[{RI}]))',
                    "{{entitlement}} {{outcome}}",
                ),
            ),
            unit="reqps",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "429s by dimension",
            "Rejections/s by the dimension that bound them (throughput, KV tokens, concurrency).",
            (
                _q(
                    f"sum by (entitlement, dimension) (rate({m.REJECTIONS_TOTAL}{{{E}}}[{RI}]))",
                    "{{entitlement}} {{dimension}}",
                ),
            ),
            unit="reqps",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Guaranteed queue wait (p99)",
            "How long queued guaranteed requests waited for admission at the sidecars.",
            (
                _q(
                    f"histogram_quantile(0.99, sum by (pool, le) (rate({m.QUEUE_WAIT_SECONDS}_bucket{{{P}}}[{RI}])))",
                    "{{pool}} p99",
                ),
            ),
            unit="s",
            min=0,
        )
    )
    d.items.append(Row("Latency and SLO by tier"))
    ttft = f"{v.TIME_TO_FIRST_TOKEN_SECONDS}_bucket{{{P}}}"
    d.items.append(
        Panel(
            "TTFT SLO attainment by tier",
            "Share of requests whose time to first token was at most 1 s, on the pools serving each tier "
            "(the engines see pools, not tiers).",
            (
                _q(
                    _tier_join(
                        f'sum by (pool) (rate({v.TIME_TO_FIRST_TOKEN_SECONDS}_bucket{{{P}, le=~"1|1\\\\.0"}}[{RI}]))'
                        f" / sum by (pool) (rate({v.TIME_TO_FIRST_TOKEN_SECONDS}_count{{{P}}}[{RI}]))"
                    ),
                    "{{tier}} on {{pool}}",
                ),
            ),
            unit="percentunit",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "TTFT by tier (p50, p99)",
            "vLLM's time to first token on the pools serving each tier.",
            tuple(
                _q(
                    _tier_join(f"histogram_quantile({q}, sum by (pool, le) (rate({ttft}[{RI}])))"),
                    f"{{{{tier}}}} on {{{{pool}}}} p{int(q * 100)}",
                )
                for q in (0.5, 0.99)
            ),
            unit="s",
            min=0,
        )
    )
    tpot = f"{v.INTER_TOKEN_LATENCY_SECONDS}_bucket{{{P}}}"
    d.items.append(
        Panel(
            "TPOT by tier (p50, p99)",
            "vLLM's inter-token latency (time per output token) on the pools serving each tier.",
            tuple(
                _q(
                    _tier_join(f"histogram_quantile({q}, sum by (pool, le) (rate({tpot}[{RI}])))"),
                    f"{{{{tier}}}} on {{{{pool}}}} p{int(q * 100)}",
                )
                for q in (0.5, 0.99)
            ),
            unit="s",
            min=0,
        )
    )
    return d


def health() -> Dashboard:
    d = Dashboard(
        "health",
        "Sidecars: limits age and fail-static state per replica. Controller: intervals, the metrics source, "
        "the KEDA scaler's calls.",
        VARIABLES,
    )
    d.items.append(Row("Sidecars"))
    d.items.append(
        Panel(
            "Limits age per replica",
            "Seconds since each sidecar's limits were last confirmed by the controller (static limits: 0).",
            (_q(f"{m.LIMITS_AGE_SECONDS}{{{P}}}", "{{pool}}/{{replica}}"),),
            unit="s",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Limits state (fail-static)",
            "Replicas per limits state: fresh (the controller's), stale (its last limits kept: fail-static), "
            "expired (floors), static (no controller).",
            (_q(f"sum by (pool, state) ({m.LIMITS_STATE}{{{P}}})", "{{pool}} {{state}}"),),
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Config generation per replica",
            "The controller's config generation (dashed) and the one each sidecar enforces: a sidecar below it "
            "has not yet received tenants, keys or limits changed since (alert TokenscalerSidecarConfigBehind).",
            (
                _q("max(tokenscaler_config_generation)", "controller"),
                _q(f"{m.SIDECAR_CONFIG_GENERATION}{{{P}}}", "{{pool}}/{{replica}}"),
            ),
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Limits fetch errors",
            "Failed polls of the controller's limits per second, per replica.",
            (
                _q(
                    f"sum by (pool, replica) (rate({total(m.LIMITS_FETCH_ERRORS_TOTAL)}{{{P}}}[{RI}]))",
                    "{{pool}}/{{replica}}",
                ),
            ),
            unit="reqps",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Sidecar added latency (p99)",
            "Time spent in the sidecar before forwarding plus the per-response overhead.",
            (
                _q(
                    "histogram_quantile(0.99, sum by (pool, route, le) "
                    f"(rate({m.ADDED_LATENCY_SECONDS}_bucket{{{P}}}[{RI}])))",
                    "{{pool}} {{route}}",
                ),
            ),
            unit="s",
            min=0,
        )
    )
    d.items.append(Row("Controller"))
    d.items.append(
        Panel(
            "Interval duration by phase (p99)",
            "Time spent in one planning interval: read, plan, persist, total; and reading the profile.",
            (
                _q(
                    "histogram_quantile(0.99, sum by (phase, le) "
                    f"(rate({m.INTERVAL_DURATION}_bucket[{RI}])))",
                    "{{phase}}",
                ),
            ),
            unit="s",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Intervals by outcome",
            "Planning intervals per second by outcome.",
            (_q(f"sum by (outcome) (rate({total(m.INTERVALS)}[{RI}]))", "{{outcome}}"),),
            unit="ops",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Metrics source answers by kind",
            "Answers of the metrics source per second by shape (ok, empty, nan, multi, stale), and failed reads "
            "by kind (0 when none).",
            (
                _q(f"sum by (kind) (rate({total(m.SOURCE_ANSWERS)}[{RI}]))", "answers {{kind}}"),
                _q(f"sum by (kind) (rate({total(m.SOURCE_ERRORS)}[{RI}])) or vector(0)", "errors {{kind}}"),
            ),
            unit="ops",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Controller API requests",
            "Requests/s to the controller's HTTP API (the sidecars' limits polls, the plan) by route and status.",
            (_q(f"sum by (route, code) (rate({total(m.API_REQUESTS)}[{RI}]))", "{{route}} {{code}}"),),
            unit="reqps",
            min=0,
        )
    )
    d.items.append(Row("KEDA scaler"))
    d.items.append(
        Panel(
            "Scaler calls by RPC and code",
            "KEDA external scaler RPCs per second, by RPC and gRPC status; open StreamIsActive streams.",
            (
                _q(f"sum by (rpc, code) (rate({s.REQUESTS_TOTAL}[{RI}])) > 0", "{{rpc}} {{code}}"),
                _q(f"sum ({s.STREAMS_OPEN})", "open streams"),
            ),
            unit="reqps",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Scaler latency (p99)",
            "Handler time of the unary KEDA scaler RPCs.",
            (
                _q(
                    f"histogram_quantile(0.99, sum by (rpc, le) (rate({s.REQUEST_DURATION_SECONDS}_bucket[{RI}])))",
                    "{{rpc}}",
                ),
            ),
            unit="s",
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Scrape targets up",
            "Prometheus' up for the pool's engines and sidecars (1 = scraped).",
            (_q(f'sum by (pool, job) (up{{{P}, pool!=""}})', "{{pool}} {{job}} up"),),
            min=0,
        )
    )
    return d


def showback() -> Dashboard:
    """Cost per tenant over time, reserved against used, idle, and budgets (docs/showback.md)."""
    d = Dashboard(
        "showback",
        "Per entitlement: the replica time it is charged by basis (reserved, allocated, backfill, idle), its cost "
        "at the pool's price, its guarantee reserved against used, tokens served; budgets and their burn rate. "
        "For a statement over a range: tokenscaler showback.",
        VARIABLES,
    )
    ent = 'pool=~"$pool", entitlement=~"$entitlement"'
    rs = f"{total(m.ENTITLEMENT_REPLICA_SECONDS_TOTAL)}{{{ent}}}"
    rs_pool = f"{total(m.ENTITLEMENT_REPLICA_SECONDS_TOTAL)}{{{P}}}"
    used = f"{total(m.ENTITLEMENT_GUARANTEE_USED_TOTAL)}{{{ent}}}"
    price = f"max by (pool, currency) ({m.POOL_PRICE}{{{P}}})"
    # the counters carry no tier: keep the entitlements of the selected tiers (the plan's gauges know them)
    tiers = f"group by (pool, entitlement) ({m.ENTITLEMENT_ALLOCATION}{{{E}}})"

    def of_tiers(expr: str) -> str:
        return f"({expr}) * on (pool, entitlement) group_left () {tiers}"

    def per_ent(name: str) -> str:
        return of_tiers(f"max by (pool, entitlement) ({name}{{{ent}}})")

    d.items.append(Row("Cost"))
    d.items.append(
        Panel(
            "Cost per tenant (per hour)",
            "Each entitlement's replicas (all bases) times its pool's price per replica-hour: what it costs per hour "
            "at the current pace (pools with pricing).",
            (
                _q(
                    of_tiers(f"sum by (pool, entitlement) (rate({rs}[{RI}]))")
                    + f" * on (pool) group_left (currency) {price}",
                    "{{entitlement}} ({{currency}}/h)",
                ),
            ),
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Replicas charged per tenant, by basis",
            "Replica-seconds per second (= replicas) charged to each entitlement: reserved (its guarantee, used or "
            "not), allocated (use within its allocation), backfill (use of idle capacity).",
            (_q(of_tiers(f"sum by (pool, entitlement, basis) (rate({rs}[{RI}]))"), "{{entitlement}} {{basis}}"),),
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Idle replicas: the platform's and the guarantees'",
            "Replica time nobody used (target_utilization headroom, min_replicas, scale-down windows): entitlement "
            "_platform, or the guaranteed ones with idle_attribution: guarantees; against the pool's ready replicas.",
            (
                _q(f'sum by (pool, entitlement) (rate({rs_pool[:-1]}, basis="idle"}}[{RI}]))', "{{entitlement}} idle"),
                _q(f"sum by (pool) (rate({total(m.POOL_REPLICA_SECONDS_TOTAL)}{{{P}}}[{RI}]))", "{{pool}} ready"),
            ),
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Reserved against used (guaranteed)",
            "Each guaranteed entitlement's reserved replicas (its guarantee) and the part of them it used.",
            (
                _q(of_tiers(f'sum by (pool, entitlement) (rate({rs[:-1]}, basis="reserved"}}[{RI}]))'),
                   "{{entitlement}} reserved"),
                _q(of_tiers(f"sum by (pool, entitlement) (rate({used}[{RI}]))"), "{{entitlement}} used"),
            ),
            min=0,
        )
    )
    d.items.append(
        Panel(
            "Tokens served per tenant",
            "Prompt and generated tokens/s the sidecars served, over all replicas.",
            (
                _q(f"sum by (entitlement) (rate({m.PROMPT_TOKENS_TOTAL}{{{E}}}[{RI}]))", "{{entitlement}} prompt"),
                _q(f"sum by (entitlement) (rate({m.GENERATION_TOKENS_TOTAL}{{{E}}}[{RI}]))",
                   "{{entitlement}} generated"),
            ),
            unit="suffix: tok/s",
            min=0,
        )
    )
    d.items.append(Row("Budgets"))
    d.items.append(
        Panel(
            "Budget remaining",
            "Weighted tokens left in each budget's period, against the budget (0: spent; refused or spot until the "
            "period resets).",
            (
                _q(per_ent(m.ENTITLEMENT_BUDGET_REMAINING), "{{entitlement}} remaining"),
                _q(per_ent(m.ENTITLEMENT_BUDGET), "{{entitlement}} budget"),
            ),
            min=0,
        )
    )
    left = f"clamp_min({per_ent(m.ENTITLEMENT_BUDGET_RESETS_AT)} - time(), 1)"
    d.items.append(
        Panel(
            "Budget consumption rate",
            "Weighted tokens/s charged to each budget (smoothed over hours), against the pace that spends what is "
            "left exactly at the period's end (remaining / time left).",
            (
                _q(per_ent(m.ENTITLEMENT_BUDGET_RATE), "{{entitlement}} rate"),
                _q(f"{per_ent(m.ENTITLEMENT_BUDGET_REMAINING)} / on (pool, entitlement) {left}",
                   "{{entitlement}} even pace"),
            ),
            unit="suffix: tok/s",
            min=0,
        )
    )
    return d


DASHBOARDS: tuple[Callable[[], Dashboard], ...] = (pools, entitlements, health, showback)
"""Every dashboard, in the order a reader meets them."""


def all_dashboards() -> list[Dashboard]:
    return [make() for make in DASHBOARDS]


def render_all() -> dict[str, str]:
    """``{file name: JSON text}`` of every dashboard, as checked in."""
    return {d.file_name: to_text(d) for d in all_dashboards()}
