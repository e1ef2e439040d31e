"""Shared test harness: real processes on loopback, bounded waits, no sleeps-and-hope.

Every server role prints one line ``tokenscaler <role> listening on http://HOST:PORT``
(flushed) once it accepts connections; :class:`Server` waits for that line, so tests
pass ``--port 0`` and learn the port the kernel picked. No test picks a port by binding
and closing a socket and hoping it is still free: an address where nothing must listen is
held by :func:`refusing_port` for the test's duration, and a server whose address others
need before it starts sits behind a :class:`Relay` that binds at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"listening on (?P<scheme>https?|grpc)://(?P<host>[^:\s]+):(?P<port>\d+)")

T = TypeVar("T")


def hold_port(port: int = 0, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound to 127.0.0.1:``port`` (0: the kernel picks) and not listening:
    connections to it are refused, and while it is open no other socket can bind the port.
    With ``reuse_port`` (SO_REUSEPORT) our own sockets that also set it may bind and listen
    on the port beside it, so a stand-in server can stop and start again on one address
    that nothing else can take in between."""
    s = socket.socket()
    try:
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    return s


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port where nothing listens for as long as the block runs."""
    with hold_port() as s:
        yield s.getsockname()[1]


class Relay:
    """A fixed loopback address in front of a server that starts later or moves, as a
    Kubernetes Service stands in front of a pod: it binds port 0 at once (``port``, ``url``)
    and pipes each connection to ``target`` (host, port), which may be set or changed at
    any time; while it is unset or refusing, connections are closed at once. Meant for
    HTTP/1.1: either side closing ends the connection."""

    def __init__(self) -> None:
        self.target: tuple[str, int] | None = None
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.target is None:
                return
            try:
                up_reader, upstream = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
            except (OSError, TimeoutError):
                return
            pipes = [asyncio.create_task(_pipe(reader, upstream)), asyncio.create_task(_pipe(up_reader, writer))]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pipes:
                    p.cancel()
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        self._call(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()


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


async def wait_until_async(
    condition: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"
) -> Any:
    """:func:`wait_until` for code on an event loop: poll ``condition`` (its result awaited when it
    is awaitable) on the loop's clock until it is truthy, sleeping on the loop in between so the
    loop's other tasks run; fail after ``timeout`` seconds, naming ``message``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except Exception as e:  # the condition may raise while a server is still starting
            last_exc = e
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}; last error: {last_exc!r}")
        await asyncio.sleep(interval)


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
