"""The harness's address helpers: a held port refuses connections and cannot be taken; the
relay forwards to whatever it is pointed at, and closes connections while it points nowhere.
The bounded waits return what the condition returned, or fail naming what they waited for."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

from tests import virtual_loop
from tests.support import Relay, hold_port, refusing_port, wait_until, wait_until_async


@contextmanager
def answering(text: str) -> Iterator[tuple[str, int]]:
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_held_port_refuses_connections_and_cannot_be_bound_by_others() -> None:
    with refusing_port() as port:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind(("127.0.0.1", port))


def test_a_port_held_with_reuse_port_lets_our_own_listener_come_and_go() -> None:
    with hold_port(reuse_port=True) as hold:
        port = hold.getsockname()[1]
        for _ in range(2):
            with hold_port(port, reuse_port=True) as listener:
                listener.listen()
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5)
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", port))


def test_the_relay_forwards_to_its_target_and_follows_it() -> None:
    relay = Relay()
    try:
        with pytest.raises(requests.ConnectionError):  # pointed nowhere yet: closed at once
            requests.get(relay.url, timeout=5)
        with answering("first") as first, answering("second") as second:
            relay.target = first
            with requests.Session() as session:  # keep-alive through the relay
                assert [session.get(relay.url, timeout=5).text for _ in range(3)] == ["first"] * 3
            relay.target = second
            assert requests.get(relay.url, timeout=5).text == "second"
        assert relay.connections == 3
    finally:
        relay.close()


def test_wait_until_returns_the_value_or_fails_naming_what_it_waited_for() -> None:
    calls = iter([0, None, "ready"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.001) == "ready"
    with pytest.raises(AssertionError, match=r"timed out after 0.05s waiting for the moon"):
        wait_until(lambda: False, timeout=0.05, interval=0.01, message="the moon")


def test_wait_until_async_polls_on_the_loop_and_awaits_a_coroutine_condition() -> None:
    async def main() -> None:
        flag: list[str] = []
        asyncio.get_running_loop().call_later(30, flag.append, "set")  # another task's doing, 30 s later

        async def check() -> str | None:
            return flag[0] if flag else None

        assert await wait_until_async(check, timeout=60, interval=1) == "set"
        started = asyncio.get_running_loop().time()
        with pytest.raises(AssertionError, match=r"timed out after 5s waiting for nothing; last error: ValueError"):
            await wait_until_async(lambda: int("x"), timeout=5, message="nothing")
        assert asyncio.get_running_loop().time() - started >= 5

    virtual_loop.run(main())  # virtual time: the 30 s and 5 s pass at once
