"""The asyncio runtime every server role shares: uvloop where available, stop on a signal.

``run(main)`` runs the coroutine function ``main`` on a uvloop event loop (plain asyncio
where uvloop is not installed) and returns its exit code; ``until_signal()`` waits for
SIGTERM or SIGINT so a role shuts down cleanly when Kubernetes (or Ctrl-C) asks.
"""

from __future__ import annotations

import asyncio
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
