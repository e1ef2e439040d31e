"""The virtual-time event loop the in-process asyncio tests run on: waits on the loop's
clock take no real time and elapse exactly; a loop that would wait forever fails at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.virtual_loop import Deadlock, VirtualTimeLoop, run


def test_an_hour_of_sleep_returns_at_once_with_the_clock_an_hour_on() -> None:
    async def go() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        before = loop.time()
        await asyncio.sleep(3600)
        return before, loop.time()

    started = time.monotonic()
    before, after = run(go())
    assert after - before == 3600
    assert time.monotonic() - started < 5  # an hour of virtual time, not of real time


def test_timers_fire_in_order_at_their_virtual_times() -> None:
    async def go() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []
        loop.call_later(0.5, lambda: fired.append(("b", loop.time())))
        loop.call_later(0.25, lambda: fired.append(("a", loop.time())))
        await asyncio.sleep(1)
        return fired

    assert run(go(), start=100.0) == [("a", 100.25), ("b", 100.5)]


def test_a_timeout_expires_at_its_virtual_deadline_and_a_set_event_wakes_without_time_passing() -> None:
    async def go() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await asyncio.Event().wait()
        timed_out = loop.time() - start
        event = asyncio.Event()
        loop.call_soon(event.set)
        start = loop.time()
        async with asyncio.timeout(10):
            await event.wait()
        return timed_out, loop.time() - start

    timed_out, woken = run(go())
    assert timed_out == pytest.approx(0.2, abs=1e-12)
    assert woken == 0


def test_waiting_on_something_nobody_will_set_is_a_deadlock_not_a_hang() -> None:
    async def go() -> None:
        await asyncio.Event().wait()

    with pytest.raises(Deadlock, match="would wait forever"):
        run(go())
