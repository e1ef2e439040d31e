"""Every metric name the dashboards and alerts use, imported from where it is defined.

The one place this package imports metric names: ours (the controller's and the sidecars') from
:mod:`tokenscaler.core.metric_names` as ``ours``, the scaler's through its aliases, vLLM's from the
simulator, which serves all of them.
"""

from __future__ import annotations

from tokenscaler.core import metric_names as ours
from tokenscaler.serve import scaler_metrics as scaler
from tokenscaler.sim import metrics as vllm

__all__ = ["exported_names", "ours", "scaler", "vllm"]


def exported_names() -> frozenset[str]:
    """Every series name our processes and the simulator (vLLM's names) export, with the
    ``_total`` / ``_bucket`` / ``_sum`` / ``_count`` forms Prometheus stores."""
    bases = set(ours.ALL_NAMES) | set(scaler.METRIC_NAMES)
    bases |= {v for k, v in vars(vllm).items() if k.isupper() and isinstance(v, str) and v.startswith("vllm:")}
    out: set[str] = set()
    for name in bases:
        stem = name.removesuffix("_total")
        out |= {name, stem, stem + "_total", stem + "_bucket", stem + "_sum", stem + "_count"}
    return frozenset(out)
