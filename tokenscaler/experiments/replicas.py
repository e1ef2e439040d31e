"""KEDA and the HorizontalPodAutoscaler, as arithmetic: how a metric becomes a replica count.

Every ``pollingInterval`` the HPA reads the trigger's metric and computes, as Kubernetes'
``replica_calculator`` and ``normalizeDesiredReplicasWithBehaviors`` do for an external
metric with an ``AverageValue`` target:

1. ``desired = ceil(metric / target)``, unless ``|metric / (target x current) - 1|`` is
   within the tolerance (then ``current``);
2. stabilization: the lowest recommendation of the scale-up window and the highest of the
   scale-down window bound the move;
3. rate policies: from the replicas at the start of each policy's period, ``Pods`` adds or
   removes ``value`` replicas, ``Percent`` scales by ``value`` percent; ``selectPolicy: Max``
   takes the policy allowing the biggest change;
4. the result is clamped to ``[minReplicaCount, maxReplicaCount]``.

:func:`rules_from_scaledobject` reads the behaviour of the reference ScaledObject
``keda/scaledobject.yaml`` (tolerance 0, no stabilization, any step) from the copy the package
ships (``tokenscaler/experiments/scaledobject.yaml``, kept equal by ``make generate``), and
:data:`HPA_DEFAULTS` is the HPA as vLLM users get it with a KEDA Prometheus trigger and no ``behavior``: 10% tolerance,
scale-up by max(100%, 4 pods) per 15 s, scale-down 100% per 15 s after a 300 s stabilization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

SCALEDOBJECT = "scaledobject.yaml"  # package data of tokenscaler.experiments: a copy of keda/scaledobject.yaml


@dataclass(frozen=True)
class RatePolicy:
    kind: str  # Pods | Percent
    value: int
    period_s: float


@dataclass(frozen=True)
class Direction:
    tolerance: float
    stabilization_s: float
    policies: tuple[RatePolicy, ...]
    select: str = "Max"  # Max | Min | Disabled


@dataclass(frozen=True)
class HpaRules:
    polling_interval_s: float
    up: Direction
    down: Direction
    source: str


HPA_DEFAULTS = HpaRules(
    polling_interval_s=15.0,
    up=Direction(0.1, 0.0, (RatePolicy("Percent", 100, 15.0), RatePolicy("Pods", 4, 15.0))),
    down=Direction(0.1, 300.0, (RatePolicy("Percent", 100, 15.0),)),
    source="Kubernetes HPA defaults (autoscaling/v2), KEDA pollingInterval 15 s",
)


def _direction(doc: dict, default_tolerance: float) -> Direction:
    policies = tuple(
        RatePolicy(str(p["type"]), int(p["value"]), float(p["periodSeconds"])) for p in doc.get("policies") or []
    )
    return Direction(
        tolerance=float(doc.get("tolerance", default_tolerance)),
        stabilization_s=float(doc.get("stabilizationWindowSeconds", 0)),
        policies=policies,
        select=str(doc.get("selectPolicy", "Max")),
    )


def rules_from_scaledobject(path: Path | None = None) -> HpaRules:
    """The polling interval and HPA behaviour of a ScaledObject manifest (default: the reference one)."""
    source = resources.files(__package__) / SCALEDOBJECT if path is None else path
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    spec = doc["spec"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    return HpaRules(
        polling_interval_s=float(spec.get("pollingInterval", 30)),
        up=_direction(behavior["scaleUp"], 0.1),
        down=_direction(behavior["scaleDown"], 0.1),
        source=str(source.name),
    )


@dataclass
class Hpa:
    """One HPA's memory: past recommendations and scale events."""

    rules: HpaRules
    min_replicas: int
    max_replicas: int
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, replicas added; < 0 removed)

    def desired(self, now: float, current: int, metric: float, target: float) -> int:
        """The replica count after one sync with ``metric`` (the trigger's total) and ``target``."""
        if current <= 0:
            raw = math.ceil(metric / target - 1e-9) if metric > 0 else 0
        else:
            ratio = metric / (target * current)
            tol = self.rules.up.tolerance if ratio > 1 else self.rules.down.tolerance
            raw = current if abs(ratio - 1.0) <= tol else math.ceil(metric / target - 1e-9)
        raw = min(max(raw, self.min_replicas), self.max_replicas)
        horizon = max(self.rules.up.stabilization_s, self.rules.down.stabilization_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if now - t < horizon]
        up_rec = min([raw] + [r for t, r in self.recommendations if now - t < self.rules.up.stabilization_s])
        down_rec = max([raw] + [r for t, r in self.recommendations if now - t < self.rules.down.stabilization_s])
        self.recommendations.append((now, raw))
        rec = current
        if rec < up_rec:
            rec = up_rec
        if rec > down_rec:
            rec = down_rec
        if rec > current:
            rec = min(rec, self._limit(now, current, self.rules.up, up=True))
        elif rec < current:
            rec = max(rec, self._limit(now, current, self.rules.down, up=False))
        rec = min(max(rec, self.min_replicas), self.max_replicas)
        if rec != current:
            self.events.append((now, rec - current))
        longest = max([p.period_s for p in self.rules.up.policies + self.rules.down.policies] + [0.0])
        self.events = [(t, d) for t, d in self.events if now - t <= longest]
        return rec

    def _limit(self, now: float, current: int, direction: Direction, *, up: bool) -> int:
        if direction.select == "Disabled":
            return current
        if not direction.policies:
            return self.max_replicas if up else self.min_replicas
        proposals = []
        for p in direction.policies:
            changed = sum(d for t, d in self.events if now - t < p.period_s and (d > 0) == up)
            start = current - changed  # replicas at the start of the period
            if up:
                proposals.append(start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100)))
            else:
                proposals.append(start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100)))
        if up:
            return max(proposals) if direction.select == "Max" else min(proposals)
        return min(proposals) if direction.select == "Max" else max(proposals)
