"""The flags the shipped manifests give, run for real: a controller with the security flags of the
rendered cert-manager overlay, a sidecar with the flags its webhook injects, KEDA's TLS.

Each Secret volume of the rendered pods becomes a directory holding the keys its items map, as
the kubelet mounts it (cert-manager's key names: ``tls.crt``, ``tls.key``, ``ca.crt``); only the
addresses (loopback) and the config source (a file, not the CRs) are this test's own.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
import requests
import yaml

from tests.kube.test_manifest_security import (
    CREDENTIAL_FILE_FLAGS,
    deployment,
    docs_of,
    inject,
    secret_file,
    webhook_options,
)
from tests.security.pki import Ca
from tests.security.test_security_e2e import POOL, _config, _errors, _refused, _sidecar, _state
from tests.support import Server, running, wait_until
from tokenscaler.serve._proto import externalscaler_pb2 as pb
from tokenscaler.serve._proto import externalscaler_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

OVERLAY = "k8s/overlays/cert-manager"


def security_flags(pod_spec: dict, container: dict, secrets: dict[tuple[str, str], str], root: Path) -> list[str]:
    """The container's credential flags, their files laid out as its Secret volumes would be."""
    out = []
    args = container["args"]
    for a in args:
        flag, _, path = a.partition("=")
        if flag not in CREDENTIAL_FILE_FLAGS:
            continue
        name, key = secret_file(pod_spec, container, path)
        local = root / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(secrets[(name, key)])
        out += [flag, str(local)]
    return out


def test_the_manifests_flags_secure_the_limits_api_and_the_scaler_end_to_end(tmp_path: Path) -> None:
    _config(tmp_path)
    ca = Ca(tmp_path, "ca")
    server = ca.issue("tokenscaler-controller", server=True)  # names 127.0.0.1 and localhost: loopback here
    token = "tok-manifest-3c9e1a7b5d2f4086"
    secrets = {  # what cert-manager and the install steps put in the Secrets
        ("tokenscaler-controller-tls", "tls.crt"): server.cert.read_text(),
        ("tokenscaler-controller-tls", "tls.key"): server.key.read_text(),
        ("tokenscaler-controller-tls", "ca.crt"): ca.pem.read_text(),
        ("tokenscaler-api-tokens", "tokens"): f"{token}\n",
        ("tokenscaler-client", "ca.crt"): ca.pem.read_text(),
        ("tokenscaler-client", "token"): f"{token}\n",
    }
    dep = deployment(docs_of(OVERLAY), "tokenscaler-controller")
    spec = dep["spec"]["template"]["spec"]
    flags = security_flags(spec, spec["containers"][0], secrets, tmp_path / "controller")
    assert {"--http-tls-cert", "--http-tls-key", "--http-token-file", "--tls-cert", "--tls-key"} <= set(flags)

    pod = inject(docs_of("k8s/examples"), webhook_options(OVERLAY))["llama-8b"]
    (sc,) = [c for c in pod["spec"]["containers"] if c["name"] == "tokenscaler-sidecar"]
    sidecar_flags = security_flags(pod["spec"], {**sc, "args": _joined(sc["args"])}, secrets, tmp_path / "sidecar")
    assert {"--limits-ca", "--limits-token-file"} <= set(sidecar_flags)
    url = sc["args"][sc["args"].index("--limits-url") + 1]
    assert url.startswith("https://")

    with running(["sim", "--port", "0", "--profile", "demo", "--seed", "3"]) as sim:
        scrape = tmp_path / "scrape.yaml"
        scrape.write_text(yaml.safe_dump({"pools": {POOL: {"engines": [f"{sim.url}/metrics"], "sidecars": []}}}))
        ctl = Server(["controller", "--config", str(tmp_path / "pools.yaml"), "--scrape-config", str(scrape),
                      "--interval-s", "0.5", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                      *flags])  # fmt: skip
        procs = [ctl]
        try:
            api = ctl.url
            assert api.startswith("https://127.0.0.1:")  # HTTPS only
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(api.replace("https:", "http:") + "/v1/plan", timeout=2)
            ca_file = str(ca.pem)
            wait_until(lambda: requests.get(f"{api}/readyz", verify=ca_file, timeout=2).ok, timeout=20,
                       message="ready over HTTPS; probes need no token")  # fmt: skip
            assert requests.get(f"{api}/v1/plan", verify=ca_file, timeout=2).status_code == 401
            bearer = {"Authorization": f"Bearer {token}"}
            assert requests.get(f"{api}/v1/plan", verify=ca_file, headers=bearer, timeout=2).status_code == 200

            # the injected sidecar, its URL's host and port made loopback, gets the controller's limits
            local_url = re.sub(r"^https://[^/]+", api, url)
            good = _sidecar(sim, tmp_path, "r0", local_url, *sidecar_flags)
            procs.append(good.server)
            wait_until(lambda: _state(good) == "fresh", timeout=15, message="fresh limits with the manifest's flags")
            # without the token file it is refused and keeps its static limits
            no_token = _without_flag(sidecar_flags, "--limits-token-file")
            bare = _sidecar(sim, tmp_path, "r1", local_url, *no_token)
            procs.append(bare.server)
            _refused(bare, "auth", "refused this sidecar")
            assert _state(bare) == "static" and _errors(good, "auth") == 0

            # KEDA, with the TriggerAuthentication's caCert, reaches the scaler over TLS only
            grpc_port = int(ctl.wait_for_line(r"scaler on grpc://[^:]+:(\d+)", timeout=5)[1])
            ref = pb.ScaledObjectRef(name="so", namespace="inference", scalerMetadata={"pool": POOL})
            creds = grpc.ssl_channel_credentials(ca.pem.read_bytes())
            with grpc.secure_channel(f"localhost:{grpc_port}", creds) as channel:
                spec_answer = pb_grpc.ExternalScalerStub(channel).GetMetricSpec(ref, timeout=5)
                assert spec_answer.metricSpecs[0].metricName == f"tokenscaler-{POOL}"
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    pb_grpc.ExternalScalerStub(channel).GetMetricSpec(ref, timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            for p in procs:  # no secret in any log line
                assert all(token not in line and "PRIVATE KEY" not in line for line in p.lines)
        finally:
            for p in reversed(procs):
                p.stop()


def _joined(args: list[str]) -> list[str]:
    """``--flag value`` pairs as ``--flag=value`` (the webhook writes them apart)."""
    out, i = [], 0
    while i < len(args):
        if args[i].startswith("--") and "=" not in args[i] and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def _without_flag(flags: list[str], flag: str) -> list[str]:
    i = flags.index(flag)
    return flags[:i] + flags[i + 2 :]
