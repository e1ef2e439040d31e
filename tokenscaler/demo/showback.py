"""The demo report's showback: what the controller charged each entitlement during the run.

:func:`read_showback` reads the controller's own showback counters from its ``/metrics`` at
the end of the run (they count from the controller's start, so the run is all of them) and
:func:`showback_lines` prints them as the report's table, with each entitlement's admitted
tokens as the load generator saw them beside it.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tokenscaler.core import metric_names as names
from tokenscaler.core.showback import BASES, PLATFORM, cost, statement_markdown


async def read_showback(session: aiohttp.ClientSession, controller_url: str) -> dict[str, Any] | None:
    """``{"entitlements": {name: {basis: replica-seconds}}, "used": {...}, "replica_seconds", "price",
    "currency"}`` from the controller's ``/metrics``; None when it cannot be read."""
    try:
        async with session.get(f"{controller_url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                return None
            text = await r.text()
    except (TimeoutError, aiohttp.ClientError):
        return None
    out: dict[str, Any] = {"entitlements": {}, "used": {}, "replica_seconds": 0.0, "price": None, "currency": None}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == names.ENTITLEMENT_REPLICA_SECONDS_TOTAL:
                ent = out["entitlements"].setdefault(s.labels["entitlement"], dict.fromkeys(BASES, 0.0))
                ent[s.labels["basis"]] += s.value
            elif s.name == names.ENTITLEMENT_GUARANTEE_USED_TOTAL:
                out["used"][s.labels["entitlement"]] = out["used"].get(s.labels["entitlement"], 0.0) + s.value
            elif s.name == names.POOL_REPLICA_SECONDS_TOTAL:
                out["replica_seconds"] += s.value
            elif s.name == names.POOL_PRICE:
                out["price"], out["currency"] = s.value, s.labels.get("currency")
    return out


def showback_lines(sb: dict[str, Any] | None, summary: dict[str, Any]) -> list[str]:
    """The report's Showback section (nothing when the controller's counters were not read)."""
    if not sb or not sb["entitlements"]:
        return []
    ents = summary.get("entitlements", {})
    rows = []
    for name, parts in sb["entitlements"].items():
        total = sum(parts.values())
        reserved = parts["reserved"]
        rows.append({
            "entitlement": name, "tier": ents.get(name, {}).get("tier", "" if name != PLATFORM else "platform"),
            **parts, "replica_hours": total / 3600, "cost": cost(total, sb["price"]),
            "used": sb["used"].get(name, 0.0) / reserved if reserved > 0 else None,
            "admitted_tokens": ents.get(name, {}).get("admitted_tokens"),
        })  # fmt: skip
    columns = [("entitlement", "entitlement"), ("tier", "tier"), ("reserved", "reserved (replica-s)"),
               ("allocated", "allocated"), ("backfill", "backfill"), ("idle", "idle"), ("replica_hours", "replica-h"),
               ("cost", f"cost ({sb['currency']})" if sb["currency"] else "cost"), ("used", "guarantee used"),
               ("admitted_tokens", "admitted tokens")]  # fmt: skip
    attributed = sum(sum(p.values()) for p in sb["entitlements"].values())
    return [
        "## Showback",
        "",
        "What the controller charged each entitlement of the pool's ready replica time while it ran "
        "(its counters `tokenscaler_entitlement_replica_seconds_total`, docs/showback.md): *reserved* its "
        "guarantee, used or not; *allocated* its use within its allocation; *backfill* its use of idle capacity; "
        "*idle* what nobody used (the platform's). The same statement over any range, from Prometheus: "
        "`tokenscaler showback`.",
        "",
        *statement_markdown(rows, columns),
        "",
        f"{attributed:,.0f} of {sb['replica_seconds']:,.0f} ready replica-seconds attributed.",
        "",
    ]
