"""settle_heap: what start-up built leaves the collector's reach, and the controller's young
generation is collected less often (its answers' series would otherwise be scanned ~110
times per interval at 10,000 entitlements)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO

PROBE = """
import gc
from tokenscaler.cli import runtime

survivors = [[i] for i in range(1000)]  # alive at start-up
runtime.settle_heap(young_threshold=runtime.CONTROLLER_YOUNG_GC)
print(gc.get_freeze_count() >= 1000, gc.get_threshold()[0] == runtime.CONTROLLER_YOUNG_GC)
before = gc.get_count()[0]
garbage = [[i] for i in range(5000)]  # far more allocations than the default threshold (700)
print(gc.get_count()[0] - before >= 5000)  # no young collection ran meanwhile
"""


def test_controller_heap_settles_and_young_generation_is_collected_less_often() -> None:
    # in a fresh interpreter: the collector's state is process-wide
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["True", "True", "True"]
