"""Every metric name the dashboards and alerts use, imported from where it is defined.

The one place this package imports metric names: when the names move to one module, only
these imports change.
"""

from __future__ import annotations

from tokenscaler.control import metrics as controller
from tokenscaler.serve import scaler_metrics as scaler
from tokenscaler.sidecar import metrics as sidecar
from tokenscaler.sim import metrics as vllm

__all__ = ["controller", "exported_names", "scaler", "sidecar", "vllm"]


def exported_names() -> frozenset[str]:
    """Every series name our processes and the simulator (vLLM's names) export, with the
    ``_total`` / ``_bucket`` / ``_sum`` / ``_count`` forms Prometheus stores."""
    bases = set(controller.ALL_NAMES) | set(sidecar.ALL_NAMES) | set(scaler.METRIC_NAMES)
    bases |= {v for k, v in vars(vllm).items() if k.isupper() and isinstance(v, str) and v.startswith("vllm:")}
    out: set[str] = set()
    for name in bases:
        stem = name.removesuffix("_total")
        out |= {name, stem, stem + "_total", stem + "_bucket", stem + "_sum", stem + "_count"}
    return frozenset(out)
