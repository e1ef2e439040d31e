"""The dashboard model and its Grafana writer; what each dashboard shows is in :mod:`tokenscaler.observe.dashboards`.

A :class:`Dashboard` is a list of :class:`Row` and :class:`Panel` items and the query
variables it offers. It has one name, from which everything else follows: the file
``dashboards/NAME.json``, the uid ``tokenscaler-NAME`` and the title ``tokenscaler / Name``.

:func:`build` writes Grafana's dashboard JSON (schema 39) as "export for sharing
externally" does: an ``__inputs`` entry ``DS_PROMETHEUS``, and a datasource variable of the
same name so that the file also works when provisioned from files. Panels are laid out left
to right in rows of 24 columns; a :class:`Row` starts a full-width section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SCHEMA_VERSION = 39
UID_PREFIX = "tokenscaler-"
TITLE_PREFIX = "tokenscaler / "


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    min: float | None = None


@dataclass(frozen=True)
class Row:
    title: str


@dataclass(frozen=True)
class QueryVariable:
    """A multi-value variable filled by a PromQL query ("All" = ``.*``)."""

    name: str
    label: str
    query: str


@dataclass
class Dashboard:
    name: str  # the one name: file NAME.json, uid tokenscaler-NAME, title "tokenscaler / Name"
    description: str
    variables: tuple[QueryVariable, ...] = ()
    items: list[Panel | Row] = field(default_factory=list)
    tags: tuple[str, ...] = ("tokenscaler",)

    @property
    def uid(self) -> str:
        return UID_PREFIX + self.name

    @property
    def title(self) -> str:
        return TITLE_PREFIX + self.name.capitalize()

    @property
    def file_name(self) -> str:
        return f"{self.name}.json"

    def panels(self) -> list[Panel]:
        return [p for p in self.items if isinstance(p, Panel)]


def _variable(v: QueryVariable) -> dict[str, Any]:
    return {
        "name": v.name,
        "label": v.label,
        "type": "query",
        "datasource": DS,
        "definition": v.query,
        "query": {"query": v.query, "refId": "StandardVariableQuery"},
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


def _variables(d: Dashboard) -> list[dict[str, Any]]:
    datasource = {
        "name": "DS_PROMETHEUS",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "options": [],
        "refresh": 1,
        "regex": "",
    }
    return [datasource, *(_variable(v) for v in d.variables)]


def build(d: Dashboard) -> dict[str, Any]:
    """Grafana dashboard JSON (schema 39) for ``d``: panels laid out left to right, rows full width."""
    panels: list[dict[str, Any]] = []
    x = y = row_h = 0
    kinds = set()
    for pid, item in enumerate(d.items, start=1):
        if isinstance(item, Row):
            if x:
                x, y = 0, y + row_h
            panels.append(
                {
                    "id": pid,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                    "panels": [],
                }
            )
            y += 1
            row_h = 0
            continue
        if x + item.width > 24:
            x, y, row_h = 0, y + row_h, 0
        kinds.add(item.kind)
        defaults: dict[str, Any] = {"unit": item.unit, "color": {"mode": "palette-classic"}}
        if item.min is not None:
            defaults["min"] = item.min
        options: dict[str, Any] = (
            {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi"}}
            if item.kind == "timeseries"
            else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
        )
        panels.append(
            {
                "id": pid,
                "type": item.kind,
                "title": item.title,
                "description": item.description,
                "datasource": DS,
                "gridPos": {"x": x, "y": y, "w": item.width, "h": item.height},
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": options,
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": DS,
                        "editorMode": "code",
                        "expr": t.expr,
                        "legendFormat": t.legend,
                        "range": True,
                        "instant": False,
                    }
                    for i, t in enumerate(item.targets)
                ],
            }
        )
        x += item.width
        row_h = max(row_h, item.height)
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ]
        + [{"type": "panel", "id": k, "name": k, "version": ""} for k in sorted(kinds)],
        "id": None,
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": list(d.tags),
        "editable": True,
        "graphTooltip": 1,
        "timezone": "",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": _variables(d)},
        "panels": panels,
    }


def to_text(d: Dashboard) -> str:
    """The JSON text of ``d`` as checked in (``dashboards/NAME.json``)."""
    return json.dumps(build(d), indent=2) + "\n"
