"""Exact counter increases (``observe/counters.py``) read from a real Prometheus, over samples
written into its storage with ``promtool tsdb create-blocks-from openmetrics``: so the series,
their timestamps and their restarts are known exactly, with no scrape timing in the way."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.prometheus import PrometheusServer, prometheus_binary
from tokenscaler.observe.counters import Prometheus, increases

pytestmark = pytest.mark.skipif(
    prometheus_binary() is None or shutil.which("promtool") is None, reason="needs Debian's prometheus package"
)

# one exporter behind one scrape address, restarted: process 1 counts for t in [0, 9] (created at
# t = 0); no scrape for t in [10, 12]; process 2 counts from zero for t in [13, 20] (created at
# t = 12.5). ``small``'s first value after the restart (1.0) is above its last before it (0.9).
OLD = range(0, 10)
NEW = range(13, 21)


def series(t0: int) -> str:
    lines = ["# HELP big_total a counter that falls at the restart", "# TYPE big counter"]
    lines += [f'big_total{{pool="p"}} {float(t)} {t0 + t}' for t in OLD]
    lines += [f'big_total{{pool="p"}} {t - 13 + 0.5} {t0 + t}' for t in NEW]
    lines += [f'big_created{{pool="p"}} {t0} {t0 + t}' for t in OLD]
    lines += [f'big_created{{pool="p"}} {t0 + 12.5} {t0 + t}' for t in NEW]
    lines += ["# HELP small_total a counter whose first value after the restart is above its last"]
    lines += ["# TYPE small counter"]
    lines += [f'small_total{{pool="p"}} {0.1 * t:.1f} {t0 + t}' for t in OLD]
    lines += [f'small_total{{pool="p"}} {1.0 + 0.5 * (t - 13)} {t0 + t}' for t in NEW]
    lines += [f'small_created{{pool="p"}} {t0} {t0 + t}' for t in OLD]
    lines += [f'small_created{{pool="p"}} {t0 + 12.5} {t0 + t}' for t in NEW]
    return "\n".join([*lines, "# EOF", ""])


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Prometheus, int]:
    work: Path = tmp_path_factory.mktemp("prometheus")
    t0 = int(time.time()) - 600  # within the server's retention
    (work / "series.om").write_text(series(t0))
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(work / "series.om"),
                    str(work / "data")], check=True, capture_output=True, timeout=60)  # fmt: skip
    server = PrometheusServer(work, jobs=[])
    try:
        yield Prometheus(server.url, requests.Session()), t0
    finally:
        server.stop()


def test_a_restart_behind_one_address_counts_the_new_process_from_zero(prom: tuple[Prometheus, int]) -> None:
    p, t0 = prom
    start, end = t0 + 2, t0 + 20
    big = increases(p, "big_total", start, end)
    small = increases(p, "small_total", start, end)
    assert list(big.values()) == [pytest.approx((9.0 - 2.0) + 7.5)]
    # without the created timestamps this would read 1.0 -> 4.5 as a rise from 0.9: 4.3
    assert list(small.values()) == [pytest.approx((0.9 - 0.2) + 4.5)]


def test_statements_of_adjacent_ranges_add_up_across_the_restart(prom: tuple[Prometheus, int]) -> None:
    p, t0 = prom
    for name in ("big_total", "small_total"):
        whole = sum(increases(p, name, t0 + 2, t0 + 20).values())
        halves = sum(increases(p, name, t0 + 2, t0 + 11.5).values()) + sum(
            increases(p, name, t0 + 11.5, t0 + 20).values()
        )
        assert halves == pytest.approx(whole), name
