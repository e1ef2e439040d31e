"""Shared test harness: real processes on loopback, bounded waits, no sleeps-and-hope.

Every server role prints one line ``tokenscaler <role> listening on http://HOST:PORT``
(flushed) once it accepts connections; :func:`start_process` waits for that line, so tests
can pass ``--port 0`` and learn the port the kernel picked.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"listening on (?P<scheme>https?|grpc)://(?P<host>[^:\s]+):(?P<port>\d+)")

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"
) -> T:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # the condition may raise while a server is still starting
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}; last error: {last_exc!r}")
        time.sleep(interval)


class Proc:
    """A child process whose output is collected line by line in the background."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.args = list(args)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=str(cwd or REPO),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"{self.args[:3]} exited with {self.popen.returncode} before printing {rx.pattern!r}:\n"
                        + self.output[-4000:]
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {rx.pattern!r} from {self.args[:3]}:\n"
                        + self.output[-4000:]
                    )
                self._cond.wait(min(remaining, 0.2))

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._reader.join(timeout)
        return self.popen.returncode


class Server(Proc):
    """A tokenscaler role started with ``python -m tokenscaler ...``; ``url`` once listening."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 30.0) -> None:
        super().__init__([sys.executable, "-m", "tokenscaler", *args], env=env)
        try:
            m = self.wait_for_line(LISTEN_RE, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        self.host = m["host"]
        self.port = int(m["port"])
        self.url = f"{m['scheme']}://{self.host}:{self.port}"


@contextlib.contextmanager
def running(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 30.0) -> Iterator[Server]:
    server = Server(args, env=env, timeout=timeout)
    try:
        yield server
    finally:
        server.stop()
