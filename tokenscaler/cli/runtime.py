"""The asyncio runtime every server role shares: uvloop where available, stop on a signal, GC tuning.

``run(main)`` runs the coroutine function ``main`` on a uvloop event loop (plain asyncio
where uvloop is not installed) and returns its exit code; ``until_signal()`` waits for
SIGTERM or SIGINT so a role shuts down cleanly when Kubernetes (or Ctrl-C) asks;
``settle_heap()`` takes what start-up built out of the cyclic garbage collector's reach.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable, Coroutine
from typing import Any


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def on_signal(callback: Callable[[], object]) -> None:
    """Call ``callback`` on SIGTERM or SIGINT (on the running loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)


async def until_signal() -> None:
    """Return once SIGTERM or SIGINT arrives."""
    stop = asyncio.Event()
    on_signal(stop.set)
    await stop.wait()


# The controller's youngest-generation threshold: at 10,000 entitlements an interval decodes
# ~80,000 container objects (the answers' series) that all live until their columns are built,
# so at the default (700) it ran ~110 collections per interval, each promoting live answers
# towards the older generations (BENCHMARKS.md, "Controller").
CONTROLLER_YOUNG_GC = 100_000


def settle_heap(young_threshold: int | None = None) -> None:
    """Move every object alive now (a role's configuration, indexes, restored state) to the
    collector's permanent generation (``gc.freeze``): they live as long as the process,
    and at 10,000 entitlements each full collection would re-scan them while an interval
    decodes its metrics (measured: ~390 -> ~260 ms per interval, BENCHMARKS.md).

    ``young_threshold`` raises the youngest generation's threshold (the sidecar: aiohttp
    allocates a few hundred objects per request, so collect them less often)."""
    gc.collect()
    gc.freeze()
    if young_threshold is not None:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(young_threshold, max(middle, 20), max(old, 20))
