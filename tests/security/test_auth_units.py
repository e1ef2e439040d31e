"""The pieces on their own: token files, the path policy and its 401s, a TLS server whose
certificate is rotated on disk, the sidecar's failure reasons. Real aiohttp servers on
loopback, real TLS handshakes."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from tests.security.pki import Ca, served_serial
from tests.support import wait_until_async
from tokenscaler.credfiles import SecretFileError, TokenFile, read_tokens
from tokenscaler.serve.auth import HttpAuth, needs_auth
from tokenscaler.sidecar.limits_auth import LimitsClientAuth, LimitsRefused, classify
from tokenscaler.tlsfiles import ClientTLS, ServerTLS, TLSFileError


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_token_file_format_errors_name_the_file_and_never_the_content(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\n\n  alpha-token-123  \nbeta-token-456\n")
    assert read_tokens(f) == ("alpha-token-123", "beta-token-456")
    f.write_text("# only a comment\n")
    with pytest.raises(SecretFileError, match="holds no token"):
        read_tokens(f)
    f.write_text("secret-part one-more\n")
    with pytest.raises(SecretFileError, match="line 1") as e:
        read_tokens(f)
    assert "secret-part" not in str(e.value)
    with pytest.raises(SecretFileError, match="cannot read"):
        read_tokens(tmp_path / "missing")


def test_a_rewritten_token_file_replaces_the_tokens_and_a_broken_one_keeps_them(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("old-token-aaaa\n")
    tokens = TokenFile(f)
    assert tokens.accepts("old-token-aaaa") and not tokens.accepts("old-token-aaab") and not tokens.accepts("")
    assert "old-token" not in repr(tokens)
    _write(f, "old-token-aaaa\nnew-token-bbbb\n")  # overlap while clients move
    assert tokens.changed() and tokens.refresh() and tokens.accepts("new-token-bbbb")
    assert tokens.accepts("old-token-aaaa") and tokens.first == "old-token-aaaa"
    _write(f, "new-token-bbbb\n")
    tokens.refresh()
    assert not tokens.accepts("old-token-aaaa") and tokens.accepts("new-token-bbbb")
    _write(f, "\n")  # a botched write: the last good tokens stay
    assert not tokens.refresh() and tokens.accepts("new-token-bbbb")
    assert not tokens.changed()  # warned once for this state of the file
    os.unlink(f)
    assert not tokens.refresh() and tokens.accepts("new-token-bbbb")


def test_path_policy() -> None:
    assert not needs_auth("/healthz", metrics_auth=True) and not needs_auth("/readyz", metrics_auth=True)
    assert not needs_auth("/metrics", metrics_auth=False) and needs_auth("/metrics", metrics_auth=True)
    for path in ("/v1/plan", "/v1/pools/p/limits", "/v1/", "/", "/admin"):
        assert needs_auth(path, metrics_auth=False), path


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _serve(auth: HttpAuth, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    app = web.Application(middlewares=[auth.middleware])
    for path in ("/v1/plan", "/healthz", "/readyz", "/metrics"):
        app.router.add_get(path, _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def test_middleware_refuses_with_openai_shaped_401s_and_counts_each_reason(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("right-token-0123456\n")
    registry = CollectorRegistry()
    auth = HttpAuth(registry, tokens=TokenFile(f), metrics_auth=True)

    async def go() -> None:
        runner, port = await _serve(auth)
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s:
                for path in ("/healthz", "/readyz"):
                    async with s.get(base + path) as r:
                        assert r.status == 200
                cases = {
                    "missing_token": {},
                    "malformed_authorization": {"Authorization": "Basic cmlnaHQ="},
                    "invalid_token": {"Authorization": "Bearer wrong-token-0123456"},
                }
                for reason, headers in cases.items():
                    for path in ("/v1/plan", "/metrics", "/v1/unknown"):
                        async with s.get(base + path, headers=headers) as r:
                            assert r.status == 401, (reason, path)
                            body = await r.json()
                            assert set(body["error"]) == {"message", "type", "param", "code"}
                            assert body["error"]["type"] == "authentication_error"
                            assert "wrong-token" not in await r.text()
                            assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    assert registry.get_sample_value("tokenscaler_http_auth_failures_total", {"reason": reason}) == 3
                ok = {"Authorization": "Bearer right-token-0123456"}
                for path in ("/v1/plan", "/metrics"):
                    async with s.get(base + path, headers=ok) as r:
                        assert r.status == 200
        finally:
            await runner.cleanup()

    asyncio.run(go())


def test_a_certificate_rotated_on_disk_is_served_without_a_restart_and_a_broken_one_is_not(tmp_path: Path) -> None:
    ca = Ca(tmp_path, "ca")
    first, second = ca.issue("first", server=True), ca.issue("second", server=True)
    client = ca.issue("client", server=False)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first.install(cert, key)
    tls = ServerTLS(cert, key, ca.pem)
    auth = HttpAuth(None, client_certificates=True)

    async def go() -> None:
        runner, port = await _serve(auth, tls.context)
        watcher = asyncio.create_task(tls.watch(0.05))
        verify = ssl.create_default_context(cafile=str(ca.pem))
        with_cert = ssl.create_default_context(cafile=str(ca.pem))
        with_cert.load_cert_chain(client.cert, client.key)

        async def serial() -> int:
            _, w = await asyncio.open_connection("127.0.0.1", port, ssl=verify)
            der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
            w.close()
            return served_serial(ssl.DER_cert_to_PEM_cert(der))

        try:
            assert await serial() == first.serial
            async with aiohttp.ClientSession() as s:
                async with s.get(f"https://127.0.0.1:{port}/healthz", ssl=verify) as r:
                    assert r.status == 200  # probes need no client certificate
                async with s.get(f"https://127.0.0.1:{port}/v1/plan", ssl=verify) as r:
                    assert r.status == 401 and (await r.json())["error"]["code"] == "client_certificate_required"
                async with s.get(f"https://127.0.0.1:{port}/v1/plan", ssl=with_cert) as r:
                    assert r.status == 200
            second.install(cert, key)

            async def rotated() -> bool:
                return await serial() == second.serial

            await wait_until_async(rotated, timeout=10, message="the rotated certificate to be served")
            assert tls.reloads == 1 and tls.failed_reloads == 0
            key.write_text("-----BEGIN PRIVATE KEY-----\ntruncated\n")  # a broken write keeps the current one
            await wait_until_async(lambda: tls.failed_reloads == 1, timeout=10, message="the watcher to refuse the key")
            assert await serial() == second.serial and tls.reloads == 1
        finally:
            watcher.cancel()
            await runner.cleanup()

    asyncio.run(go())


def test_unusable_tls_files_are_startup_errors_naming_the_file(tmp_path: Path) -> None:
    ca = Ca(tmp_path, "ca")
    a, b = ca.issue("a", server=True), ca.issue("b", server=True)
    with pytest.raises(TLSFileError, match=r"a\.pem.*b\.key"):
        ServerTLS(a.cert, b.key)  # mismatched key
    with pytest.raises(TLSFileError, match=r"missing\.pem"):
        ClientTLS(tmp_path / "missing.pem")
    with pytest.raises(TLSFileError, match="go together"):
        ClientTLS(ca.pem, a.cert)
    expired = ca.issue("old", server=False, expired=True)
    client = ClientTLS(ca.pem, expired.cert, expired.key)  # loads (the server is the judge), but knows
    assert client.expired() and client.not_after is not None and client.not_after.year >= 2020
    assert not ClientTLS(ca.pem, a.cert, a.key).expired()


def test_failure_reasons_of_the_sidecar(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("sidecar-token-987654\n")
    auth = LimitsClientAuth(token_file=f)
    assert auth.headers() == {"Authorization": "Bearer sidecar-token-987654"}
    assert auth.redact("echo: sidecar-token-987654") == "echo: [redacted]"
    assert classify(LimitsRefused(401, "no"), https=False, client_cert=False)[0] == "auth"
    assert classify(TimeoutError(), https=False, client_cert=False)[0] == "timeout"
    assert classify(aiohttp.ServerDisconnectedError(), https=True, client_cert=True)[0] == "tls"
    assert classify(ssl.SSLError(1, "x"), https=True, client_cert=False)[0] == "tls"
    assert classify(ConnectionRefusedError(111, "refused"), https=False, client_cert=False)[0] == "unreachable"
