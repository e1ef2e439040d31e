"""Child processes of the demo: started in their own process groups, logged to files, always ended.

Every role runs as ``python -m tokenscaler ROLE ...`` (Prometheus as its own binary) in a
new session, so a terminal's Ctrl-C reaches only the demo, which then ends them in order.
:class:`Supervisor` keeps every child it started; :meth:`Supervisor.stop_all` sends SIGTERM
to each process group, waits a bounded time, then SIGKILLs what is left. It runs from the
demo's ``finally``, from an ``atexit`` hook and on SIGTERM/SIGHUP, so the children end on a
normal exit, on Ctrl-C and on the demo's own errors alike.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

LISTEN_RE = re.compile(r"listening on (?:https?|grpc)://(?P<host>[^\s]+):(?P<port>\d+)")


class ChildFailed(RuntimeError):
    """A child exited or did not print what it should have in time; the message names its log."""


class Child:
    """One started process: its arguments, its log file, its process group."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    async def wait_for(self, pattern: re.Pattern[str] | str, timeout_s: float) -> re.Match[str]:
        """The first match of ``pattern`` in the child's output; :class:`ChildFailed` if it exits first or
        ``timeout_s`` passes."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        while True:
            m = rx.search(self.output())
            if m:
                return m
            if not self.alive:
                raise ChildFailed(
                    f"{self.name} exited with {self.popen.returncode} before printing {rx.pattern!r} "
                    f"(log: {self.log_path}): {self.output()[-600:]}"
                )
            if time.monotonic() >= deadline:
                raise ChildFailed(
                    f"{self.name} did not print {rx.pattern!r} within {timeout_s:g}s (log: {self.log_path})"
                )
            await asyncio.sleep(0.05)

    def signal_group(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def reap(self, timeout_s: float) -> bool:
        try:
            self.popen.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close_log(self) -> None:
        with contextlib.suppress(OSError):
            self._log.close()


class Supervisor:
    """Starts children and guarantees their end (see the module docstring)."""

    def __init__(self, log_dir: Path, grace_s: float = 5.0) -> None:
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.children: list[Child] = []
        self.pids: list[int] = []  # every pid ever started, for the report and the tests
        self._installed = False
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def install(self, signals: bool = False) -> None:
        """An ``atexit`` hook that ends every child and, with ``signals``, SIGTERM/SIGHUP handlers that
        do too (an asyncio caller adds its own with ``loop.add_signal_handler``). Idempotent."""
        if self._installed:
            return
        self._installed = True
        atexit.register(self.stop_all)
        for sig in (signal.SIGTERM, signal.SIGHUP) if signals else ():
            with contextlib.suppress(ValueError, OSError):  # not the main thread: the caller ends them
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        atexit.unregister(self.stop_all)
        for sig, handler in self._previous.items():
            if handler is None:  # installed from outside Python: it cannot be put back
                continue
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_all()
        raise SystemExit(128 + signum)

    def start(self, name: str, args: Sequence[str]) -> Child:
        child = Child(name, args, self.log_dir / f"{name}.log")
        self.children.append(child)
        self.pids.append(child.pid)
        return child

    def role(self, name: str, role_args: Sequence[str]) -> Child:
        """``python -m tokenscaler ROLE_ARGS...`` as child ``name``."""
        return self.start(name, [sys.executable, "-m", "tokenscaler", *role_args])

    def stop(self, *children: Child) -> None:
        """SIGTERM the children's groups, wait up to the grace period, SIGKILL the rest."""
        for c in children:
            c.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for c in children:
            if not c.reap(max(deadline - time.monotonic(), 0.0)):
                c.signal_group(signal.SIGKILL)
                c.reap(2.0)
            c.close_log()
            if c in self.children:
                self.children.remove(c)

    def stop_all(self) -> None:
        if self.children:
            self.stop(*list(self.children))

    async def stop_async(self, *children: Child) -> None:
        await asyncio.to_thread(self.stop, *children)
