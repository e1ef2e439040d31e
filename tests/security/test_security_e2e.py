"""The controller's HTTP API behind mutual TLS or bearer tokens, with real sidecars as clients.

Real processes on loopback: a simulator, a controller, sidecars polling it. A sidecar with
the right credentials gets limits; with none, a CA that did not sign the controller, an
expired certificate, a stranger's certificate or a stale token it is refused, logs why,
counts the reason, and keeps enforcing its last limits (fail-static). Certificates and
tokens are rotated by rewriting their files, never by a restart. Every log line of every
process, every ``/metrics`` page and ``/v1/plan`` is searched for the plain keys, tokens
and key material used.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.security.pki import Ca, Issued, served_serial
from tests.sidecar.harness import POOL, chat, ent, key_of, post, vec, write_config
from tests.sidecar.harness import Sidecar as SidecarHandle
from tests.support import Proc, Server, running, wait_until

pytestmark = pytest.mark.e2e

ENTITLEMENTS = ("gold", "silver", "batch")
GOLD_TPS = {"entitlement": "gold", "dimension": "throughput_tokens_per_s"}


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    with running(["sim", "--port", "0", "--profile", "demo", "--seed", "5"]) as server:
        yield server


def _config(d: Path) -> Path:
    return write_config(
        d / "pools.yaml",
        [
            ent("gold", "guaranteed", guaranteed=vec(100, 2000, 2)),
            ent("silver", "elastic", limit=vec(400, 4000, 4)),
            ent("batch", "spot"),
        ],
    )


def _controller(d: Path, sim: Server, *flags: str) -> Server:
    scrape = d / "scrape.yaml"
    scrape.write_text(yaml.safe_dump({"pools": {POOL: {"engines": [f"{sim.url}/metrics"], "sidecars": []}}}))
    args = ["controller", "--config", str(d / "pools.yaml"), "--scrape-config", str(scrape), "--interval-s", "0.5",
            "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", *flags]  # fmt: skip
    return Server(args)


def _sidecar(sim: Server, d: Path, replica: str, url: str, *flags: str) -> SidecarHandle:
    args = ["sidecar", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--upstream", sim.url,
            "--config", str(d / "pools.yaml"), "--pool", POOL, "--replica-id", replica, "--limits-url", url,
            "--limits-poll-s", "0.2", "--limits-expiry-s", "120", *flags]  # fmt: skip
    server = Server(args)
    try:
        return SidecarHandle(server)
    except BaseException:
        server.stop()
        raise


def _state(sc: SidecarHandle) -> str:
    states = ("static", "fresh", "stale", "expired")
    return next(s for s in states if sc.value("tokenscaler_sidecar_limits_state", state=s) == 1)


def _errors(sc: SidecarHandle, reason: str) -> float:
    return sc.value("tokenscaler_sidecar_limits_fetch_errors_total", reason=reason)


def _limits(sc: SidecarHandle) -> dict[tuple[str, str], float]:
    out = {}
    for family in sc.scrape().values():
        for s in family.samples:
            if s.name in ("tokenscaler_sidecar_limit", "tokenscaler_sidecar_burst"):
                out[(s.name, s.labels["entitlement"] + "/" + s.labels["dimension"])] = s.value
    return out


def _matches_document(sc: SidecarHandle, doc: dict) -> bool:
    got = _limits(sc)
    for name, el in doc["entitlements"].items():
        for dim, v in el["limit"].items():
            if abs(got[("tokenscaler_sidecar_limit", f"{name}/{dim}")] - v) > 1e-6:
                return False
    return True


def _refused(sc: SidecarHandle, reason: str, log_text: str, before: float = 0.0) -> None:
    wait_until(lambda: _errors(sc, reason) > before, timeout=15, message=f"a poll refused for reason {reason}")
    sc.server.wait_for_line(log_text, timeout=10)


def _fail_static(sc: SidecarHandle, snapshot: dict) -> None:
    """The last limits from the controller stay in force: state stale, same gauges, traffic admitted."""
    wait_until(lambda: _state(sc) == "stale", timeout=10, message="stale limits")
    assert _limits(sc) == snapshot
    assert post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("gold")).status_code == 200


def _assert_no_secret(procs: list[Proc], pages: list[str], secrets: list[str]) -> None:
    assert all(len(s) >= 8 for s in secrets)
    for p in procs:
        for line in p.lines:
            for s in secrets:
                assert s not in line, f"a secret appears in the log of {p.args[3:4]}: {line[:120]}..."
            assert "PRIVATE KEY" not in line
    for page in pages:
        for s in secrets:
            assert s not in page, "a secret appears in a page"


def _key_material(issued: list[Issued]) -> list[str]:
    """A base64 line of each private key (what a leaked PEM would show)."""
    return [i.key.read_text().splitlines()[2] for i in issued]


def _rotate_tokens(path: Path, *tokens: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text("\n".join(tokens) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


def test_bearer_tokens_rotate_without_a_restart_and_a_stale_token_is_fail_static(sim: Server, tmp_path: Path) -> None:
    _config(tmp_path)
    t1, t2 = "tok-one-4f9a1c7e2b5d8036", "tok-two-91d3e6a0c4b7f258"
    served, sent = tmp_path / "controller-tokens", tmp_path / "sidecar-tokens"
    served.write_text(f"# the sidecars' tokens\n{t1}\n")
    sent.write_text(f"{t1}\n")
    with _stopping([]) as procs:  # the simulator is shared: its fixture stops it
        ctl = _controller(tmp_path, sim, "--http-token-file", str(served))
        procs.append(ctl)
        api = ctl.url
        good = _sidecar(sim, tmp_path, "r0", api, "--limits-token-file", str(sent))
        procs.append(good.server)
        none = _sidecar(sim, tmp_path, "r1", api)
        procs.append(none.server)
        wait_until(lambda: requests.get(f"{api}/readyz", timeout=2).status_code == 200, timeout=20, message="ready")

        # the path policy
        assert requests.get(f"{api}/healthz", timeout=2).status_code == 200
        assert requests.get(f"{api}/metrics", timeout=2).status_code == 200
        r = requests.get(f"{api}/v1/plan", timeout=2)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{api}/v1/nothing-here", timeout=2).status_code == 401  # no route enumeration
        assert requests.get(f"{api}/v1/plan", headers={"Authorization": "Basic eA=="}, timeout=2).status_code == 401
        bearer = {"Authorization": f"Bearer {t1}"}
        assert requests.get(f"{api}/v1/plan", headers=bearer, timeout=2).status_code == 200

        # the right token gets limits; none is refused and keeps the static limits
        wait_until(lambda: _state(good) == "fresh", timeout=15, message="fresh limits with the token")
        _refused(none, "auth", "refused this sidecar")
        none.server.wait_for_line("needs a bearer token", timeout=5)
        assert _state(none) == "static"

        doc = requests.get(f"{api}/v1/pools/{POOL}/limits?replica=r0", headers=bearer, timeout=2).json()
        wait_until(lambda: _matches_document(good, doc), timeout=10, message="the controller's limits in force")
        snapshot = _limits(good)

        # the controller's file is rewritten: the old token is refused, the new one accepted, no restart
        _rotate_tokens(served, t2)
        wait_until(
            lambda: requests.get(f"{api}/v1/plan", headers={"Authorization": f"Bearer {t2}"}, timeout=2).ok,
            timeout=10, message="the new token accepted",
        )  # fmt: skip
        assert requests.get(f"{api}/v1/plan", headers=bearer, timeout=2).status_code == 401
        _refused(good, "auth", "was not accepted")
        _fail_static(good, snapshot)

        # the sidecar's file is rewritten too: fresh again, neither process restarted
        _rotate_tokens(sent, t2)
        wait_until(lambda: _state(good) == "fresh", timeout=10, message="fresh limits with the rotated token")
        assert ctl.popen.poll() is None and good.server.popen.poll() is None

        metrics = requests.get(f"{api}/metrics", timeout=2).text
        assert 'tokenscaler_http_auth_failures_total{reason="invalid_token"}' in metrics
        assert 'tokenscaler_http_auth_failures_total{reason="missing_token"}' in metrics
        pages = [
            metrics,
            requests.get(f"{api}/v1/plan", headers={"Authorization": f"Bearer {t2}"}, timeout=2).text,
            requests.get(good.metrics_url + "/metrics", timeout=2).text,
        ]
        _assert_no_secret([*procs, sim], pages, [t1, t2, *(key_of(n) for n in ENTITLEMENTS)])


def test_mutual_tls_with_rotated_certificates_and_refusals_that_say_why(sim: Server, tmp_path: Path) -> None:
    _config(tmp_path)
    ca, other = Ca(tmp_path, "ca"), Ca(tmp_path, "other-ca")
    server_1, server_2 = ca.issue("server-1", server=True), ca.issue("server-2", server=True)
    client_1, client_2 = ca.issue("client-1", server=False), ca.issue("client-2", server=False)
    expired = ca.issue("client-expired", server=False, expired=True)
    stranger = other.issue("stranger", server=False)
    srv_cert, srv_key = tmp_path / "tls.crt", tmp_path / "tls.key"  # the controller's mounted Secret
    cli_cert, cli_key = tmp_path / "client.crt", tmp_path / "client.key"  # the sidecar's
    server_1.install(srv_cert, srv_key)
    client_1.install(cli_cert, cli_key)
    with _stopping([]) as procs:
        ctl = _controller(tmp_path, sim, "--http-tls-cert", str(srv_cert), "--http-tls-key", str(srv_key),
                          "--http-tls-client-ca", str(ca.pem))  # fmt: skip
        procs.append(ctl)
        assert ctl.url.startswith("https://127.0.0.1:")
        api = ctl.url
        mtls = ["--limits-ca", str(ca.pem), "--limits-client-cert", str(cli_cert), "--limits-client-key", str(cli_key)]
        good = _sidecar(sim, tmp_path, "r0", api, *mtls)
        procs.append(good.server)
        no_cert = _sidecar(sim, tmp_path, "r1", api, "--limits-ca", str(ca.pem))
        procs.append(no_cert.server)
        own = ["--limits-client-cert", str(client_1.cert), "--limits-client-key", str(client_1.key)]
        wrong_ca = _sidecar(sim, tmp_path, "r2", api, "--limits-ca", str(other.pem), *own)
        procs.append(wrong_ca.server)

        client = (str(client_1.cert), str(client_1.key))
        wait_until(
            lambda: requests.get(f"{api}/readyz", verify=str(ca.pem), timeout=2).status_code == 200,
            timeout=20, message="ready over HTTPS without a client certificate (probes stay open)",
        )  # fmt: skip
        assert requests.get(f"{api}/v1/plan", verify=str(ca.pem), timeout=2).status_code == 401
        assert requests.get(f"{api}/v1/plan", verify=str(ca.pem), cert=client, timeout=2).status_code == 200
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(api.replace("https:", "http:") + "/v1/plan", timeout=2)  # HTTPS only

        # the right certificate gets limits; the others are refused, say why, and keep static limits
        wait_until(lambda: _state(good) == "fresh", timeout=15, message="fresh limits over mutual TLS")
        _refused(no_cert, "auth", "needs a client certificate")
        _refused(wrong_ca, "tls", "certificate was not accepted")
        assert _state(no_cert) == "static" and _state(wrong_ca) == "static"

        # the controller's certificate is rotated on disk: new connections get the new one
        server_2.install(srv_cert, srv_key)
        wait_until(
            lambda: served_serial(ssl.get_server_certificate(("127.0.0.1", ctl.port), ca_certs=str(ca.pem)))
            == server_2.serial,
            timeout=10, message="the rotated server certificate served",
        )  # fmt: skip
        assert requests.get(f"{api}/v1/plan", verify=str(ca.pem), cert=client, timeout=2).status_code == 200

        doc = requests.get(f"{api}/v1/pools/{POOL}/limits?replica=r0", verify=str(ca.pem), cert=client, timeout=2)
        wait_until(lambda: _matches_document(good, doc.json()), timeout=10, message="the controller's limits")
        snapshot = _limits(good)

        # the sidecar's certificate is replaced by an expired one: refused, fail-static
        expired.install(cli_cert, cli_key)
        _refused(good, "tls", "client certificate .* expired at", before=_errors(good, "tls"))
        _fail_static(good, snapshot)
        # by a certificate of a CA the controller does not trust: refused too
        before = _errors(good, "tls")
        stranger.install(cli_cert, cli_key)
        wait_until(lambda: _errors(good, "tls") > before, timeout=15, message="the stranger's certificate refused")
        _fail_static(good, snapshot)
        # a renewed certificate: fresh again, nothing restarted
        client_2.install(cli_cert, cli_key)
        wait_until(lambda: _state(good) == "fresh", timeout=15, message="fresh limits with the renewed certificate")
        assert ctl.popen.poll() is None and good.server.popen.poll() is None

        pages = [
            requests.get(f"{api}/metrics", verify=str(ca.pem), timeout=2).text,
            requests.get(f"{api}/v1/plan", verify=str(ca.pem), cert=client, timeout=2).text,
        ]
        keys = _key_material([server_1, server_2, client_1, client_2, expired, stranger])
        _assert_no_secret([*procs, sim], pages, [*keys, *(key_of(n) for n in ENTITLEMENTS)])
