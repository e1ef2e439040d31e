"""The harness's address helpers: a held port refuses connections and cannot be taken; the
relay forwards to whatever it is pointed at, and closes connections while it points nowhere."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

from tests.support import Relay, hold_port, refusing_port


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
