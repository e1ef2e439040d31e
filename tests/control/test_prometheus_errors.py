"""The Prometheus source's failures: each is one SourceError kind, never a crash or a hang.

A real Prometheus cannot be made to answer garbage or to stall, so these run the source
against a small HTTP server on loopback standing in for a misbehaving Prometheus (or a
proxy in front of one); the healthy path runs against the real one elsewhere
(test_controller_e2e.py, test_recording_rules.py).
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support import refusing_port
from tokenscaler.sources.base import SourceError
from tokenscaler.sources.prometheus import PrometheusSource


@contextmanager
def answering(status: int, body: bytes, delay_s: float = 0.0) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every request with ``status`` and ``body``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if delay_s:
                time.sleep(delay_s)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
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
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def read_both(url: str, timeout_s: float = 2.0) -> list[SourceError]:
    """What read() and read_profile() raise (both must raise a SourceError)."""

    async def run() -> list[SourceError]:
        source = PrometheusSource(url, timeout_s=timeout_s)
        errors = []
        try:
            for read in (source.read, source.read_profile):
                with pytest.raises(SourceError) as info:
                    await asyncio.wait_for(read(time.time()), timeout=10)
                errors.append(info.value)
        finally:
            await source.close()
        return errors

    return asyncio.run(run())


def test_unreachable() -> None:
    with refusing_port() as port:  # bound, not listening: refused, and nobody else can take it
        errors = read_both(f"http://127.0.0.1:{port}")
    assert {e.kind for e in errors} == {"unreachable"}


def test_http_error_names_the_query_and_status() -> None:
    body = b'{"status":"error","errorType":"bad_data","error":"parse error"}'
    with answering(400, body) as url:
        errors = read_both(url)
    assert {e.kind for e in errors} == {"http"}
    assert all("400" in str(e) and "query " in str(e) for e in errors)


@pytest.mark.parametrize(
    "body",
    [b"<html>proxy error</html>", b'{"status":"success","data":{}}', b'{"status":"success","data":{"result":{}}}'],
    ids=["not-json", "no-result", "not-a-vector"],
)
def test_malformed_answers(body: bytes) -> None:
    with answering(200, body) as url:
        errors = read_both(url)
    assert {e.kind for e in errors} == {"bad_answer"}


def test_a_stalled_prometheus_times_out_within_the_bound() -> None:
    with answering(200, b'{"status":"success","data":{"resultType":"vector","result":[]}}', delay_s=3) as url:
        started = time.monotonic()
        errors = read_both(url, timeout_s=0.3)
        elapsed = time.monotonic() - started
    assert {e.kind for e in errors} == {"timeout"}
    assert elapsed < 2.5  # two reads, each bounded by the query timeout (no blind retries)
