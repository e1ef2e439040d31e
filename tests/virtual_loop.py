"""An asyncio event loop on virtual time, for tests of code that waits on the loop's clock.

:class:`VirtualTimeLoop` is a real :class:`asyncio.SelectorEventLoop` (real callbacks, real
tasks, real timers, real sockets) whose :meth:`~VirtualTimeLoop.time` is a virtual clock.
Its selector polls without blocking; when nothing is ready and the loop would sleep until
its next timer, the clock jumps ahead by that timeout instead. So ``asyncio.sleep(3600)``,
``asyncio.timeout(0.2)`` and ``loop.call_later`` return at once, and elapsed times measured
with ``loop.time()`` are exactly the scheduled ones, independent of how busy the machine is.

If the loop would block with no timer at all (every task waits on something nobody will
set), :class:`Deadlock` is raised out of ``run_until_complete``: a test that hangs on a real
loop fails here at once, with a message saying why.

Only waits on the loop's own clock are virtual. Nothing outside the loop is waited for: a
socket or a thread that has not answered by the time the loop polls is overtaken by the
clock jumping to the next timer (or is a :class:`Deadlock` if there is none). So use it for
in-process asyncio code such as the sidecar's gatekeeper, never for talking to servers.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class Deadlock(RuntimeError):
    """The loop has nothing ready, nothing to poll and no timer: it would wait forever."""


class VirtualClock:
    """Seconds since the loop was created; moved only by the loop when it is idle."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds!r})")
        self.now += seconds


class _NonBlockingSelector(selectors.BaseSelector):
    """The default selector, except that ``select(timeout)`` never sleeps: it polls once and,
    when nothing is ready, advances the virtual clock by ``timeout``."""

    def __init__(self, clock: VirtualClock) -> None:
        self._inner = selectors.DefaultSelector()
        self._clock = clock

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise Deadlock(
                "the event loop would wait forever: no callback is ready, no file descriptor is readable "
                "and no timer is scheduled (every task waits on something nobody will set)"
            )
        self._clock.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock is virtual (see the module docstring)."""

    def __init__(self, start: float = 0.0) -> None:
        self.clock = VirtualClock(start)
        super().__init__(_NonBlockingSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Like :func:`asyncio.run`, on a fresh :class:`VirtualTimeLoop` starting at ``start``."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(start)) as runner:
        return runner.run(main)
