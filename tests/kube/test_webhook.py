"""``tokenscaler webhook`` over real TLS with real AdmissionReview JSON."""

from __future__ import annotations

import base64
import copy
import json
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.kube.certs import make_certs
from tests.support import REPO, Server, running
from tokenscaler.kube.webhook import SIDECAR_NAME, UPSTREAM_PORT_NAME

CRS = REPO / "examples" / "k8s" / "tokenpools.yaml"


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, ssl.SSLContext]]:
    ca, cert, key = make_certs(tmp_path_factory.mktemp("certs"))
    args = ["webhook", "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)]
    args += ["--config", str(REPO / "examples" / "tokenpools.yaml"), "--max-body-bytes", "65536"]
    with running(args) as server:
        yield server, ssl.create_default_context(cafile=str(ca))


def post(hook: tuple[Server, ssl.SSLContext], path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    server, ctx = hook
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"https://127.0.0.1:{server.port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def example(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(CRS.read_text()) if d and d["metadata"]["name"] == name]
    return doc


def admission(obj: dict[str, Any], *, group: str, kind: str, resource: str, op: str = "CREATE") -> dict[str, Any]:
    version = "v1alpha1" if group else "v1"
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": obj["metadata"].get("name", ""),
            "namespace": obj["metadata"].get("namespace", "tokenscaler"),
            "operation": op,
            "userInfo": {"username": "test"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


def entitlement_review(obj: dict[str, Any], op: str = "CREATE") -> dict[str, Any]:
    return admission(obj, group="tokenpools.io", kind="Entitlement", resource="entitlements", op=op)


def test_tls_only_with_the_right_ca(hook: tuple[Server, ssl.SSLContext]) -> None:
    server, _ = hook
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://127.0.0.1:{server.port}/healthz", timeout=5)
    assert post(hook, "/validate", raw=b"")[0] == 400


def test_example_entitlement_is_allowed(hook: tuple[Server, ssl.SSLContext]) -> None:
    review = entitlement_review(example("search-prod"), op="UPDATE")
    status, body = post(hook, "/validate", review)
    assert status == 200
    r = body["response"]
    assert r["uid"] == review["request"]["uid"] and r["allowed"] is True


def test_oversubscribing_entitlement_is_denied_with_the_numbers(hook: tuple[Server, ssl.SSLContext]) -> None:
    e = copy.deepcopy(example("search-prod"))
    e["metadata"]["name"] = "greedy"
    e["spec"]["guaranteed"]["throughput_tokens_per_s"] = 40000
    e["spec"].pop("limit")
    e["spec"]["api_keys"] = []
    status, body = post(hook, "/validate", entitlement_review(e))
    assert status == 200
    r = body["response"]
    assert r["allowed"] is False and r["status"]["code"] == 403
    msg = r["status"]["message"]
    # search-prod 12000 + chat-prod 6000 + greedy 40000 = 58000 > 8 x 8000 x 0.8 = 51200
    assert "Entitlement tokenscaler/greedy" in msg and "pools[llama-8b]" in msg, msg
    assert "throughput_tokens_per_s" in msg and "58000" in msg and "51200" in msg, msg


def test_model_errors_are_denied_naming_the_field(hook: tuple[Server, ssl.SSLContext]) -> None:
    e = copy.deepcopy(example("research"))
    e["spec"]["weight"] = -1
    status, body = post(hook, "/validate", entitlement_review(e))
    r = body["response"]
    assert status == 200 and r["allowed"] is False and r["status"]["code"] == 422
    assert "spec.weight" in r["status"]["message"] and "-1" in r["status"]["message"]


def test_risky_changes_get_warnings(hook: tuple[Server, ssl.SSLContext]) -> None:
    e = copy.deepcopy(example("chat-prod"))
    e["spec"]["guaranteed"]["throughput_tokens_per_s"] = 30000  # 12000 + 30000 = 42000: 82% of 51200
    body = post(hook, "/validate", entitlement_review(e, op="UPDATE"))[1]
    r = body["response"]
    assert r["allowed"] is True
    assert any("82% of capacity 51200" in w for w in r["warnings"]), r["warnings"]
    spot = copy.deepcopy(example("backfill"))
    spot["spec"]["limit"] = {"concurrency": 0}
    r = post(hook, "/validate", entitlement_review(spot, op="UPDATE"))[1]["response"]
    assert r["allowed"] is True and any("spot with limit.concurrency 0" in w for w in r["warnings"])


def test_shrinking_a_pool_below_its_guarantees_is_denied(hook: tuple[Server, ssl.SSLContext]) -> None:
    p = copy.deepcopy(example("llama-8b"))
    p["spec"]["max_replicas"] = 2
    review = admission(p, group="tokenpools.io", kind="TokenPool", resource="tokenpools", op="UPDATE")
    r = post(hook, "/validate", review)[1]["response"]
    assert r["allowed"] is False and "max_replicas 2" in r["status"]["message"]


POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"generateName": "llama-8b-", "namespace": "inference", "labels": {"tokenpools.io/pool": "llama-8b"}},
    "spec": {
        "containers": [
            {
                "name": "vllm",
                "image": "vllm/vllm-openai:v0.11.0",
                "ports": [{"name": "metrics-x", "containerPort": 9000}, {"name": "http", "containerPort": 8000}],
            }
        ]
    },
}


def pod_review(pod: dict[str, Any]) -> dict[str, Any]:
    return admission(pod, group="", kind="Pod", resource="pods")


def test_labelled_pod_gets_the_sidecar_and_the_serving_port(hook: tuple[Server, ssl.SSLContext]) -> None:
    status, body = post(hook, "/mutate", pod_review(POD))
    r = body["response"]
    assert status == 200 and r["allowed"] is True and r["patchType"] == "JSONPatch"
    pod = jsonpatch.apply_patch(POD, json.loads(base64.b64decode(r["patch"])))
    vllm, sidecar = pod["spec"]["containers"]
    assert sidecar["name"] == SIDECAR_NAME
    # the name `http` moved to the sidecar: a Service with targetPort http now reaches the proxy
    assert [p["name"] for p in vllm["ports"]] == ["metrics-x", UPSTREAM_PORT_NAME]
    assert {"name": "http", "containerPort": 8001, "protocol": "TCP"} in sidecar["ports"]
    args = sidecar["args"]
    assert args[0] == "sidecar"
    assert args[args.index("--upstream") + 1] == "http://127.0.0.1:8000"
    assert args[args.index("--pool") + 1] == "llama-8b"
    assert args[args.index("--replicas") + 1] == "8"
    # by default over HTTPS, with the CA and the token as files from the namespace's Secret
    assert args[args.index("--limits-url") + 1] == "https://tokenscaler-controller.tokenscaler.svc:8080"
    assert args[args.index("--limits-ca") + 1] == "/var/run/secrets/tokenscaler/ca.crt"
    assert args[args.index("--limits-token-file") + 1] == "/var/run/secrets/tokenscaler/token"
    assert {"name": "tokenscaler-client", "mountPath": "/var/run/secrets/tokenscaler", "readOnly": True} in sidecar[
        "volumeMounts"
    ]
    assert sidecar["readinessProbe"]["tcpSocket"]["port"] == 8001
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    # its config (entitlements, key digests, limits) comes from the limits API: no --config, no ConfigMap
    assert "--config" not in args
    assert [m["name"] for m in sidecar["volumeMounts"]] == ["tokenscaler-client"]
    assert pod["spec"]["volumes"] == [
        {
            "name": "tokenscaler-client",
            "secret": {"secretName": "tokenscaler-client", "items": [
                {"key": "ca.crt", "path": "ca.crt"}, {"key": "token", "path": "token"}]},
        },
    ]  # fmt: skip
    assert pod["metadata"]["annotations"]["tokenpools.io/injected"] == "true"
    # reinvoked on the injected pod: nothing more to do
    r2 = post(hook, "/mutate", pod_review(pod))[1]["response"]
    assert r2["allowed"] is True and "patch" not in r2


def test_plain_http_injection_carries_no_credentials_and_never_a_token_in_clear(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tokenscaler.cli import main
    from tokenscaler.config import load_config
    from tokenscaler.kube.webhook import InjectedSidecar, mutate_request

    base = ["webhook", "--tls-cert", "x.crt", "--tls-key", "x.key", "--config", "x.yaml"]
    assert main([*base, "--limits-url", "http://tokenscaler-controller.tokenscaler.svc:8080"]) == 2
    assert "would send the token of --limits-secret tokenscaler-client in clear" in capsys.readouterr().err
    assert main([*base, "--limits-url", "ftp://x"]) == 2
    assert "must be an http:// or https:// URL" in capsys.readouterr().err

    opts = InjectedSidecar(limits_url="http://tokenscaler-controller.tokenscaler.svc:8080", limits_secret=None)
    r = mutate_request(pod_review(POD)["request"], load_config(REPO / "examples" / "tokenpools.yaml"), opts)
    pod = jsonpatch.apply_patch(POD, json.loads(base64.b64decode(r["response"]["patch"])))
    args = pod["spec"]["containers"][1]["args"]
    assert "--limits-ca" not in args and "--limits-token-file" not in args
    # and nothing to mount: no credentials, no config map
    assert "--config" not in args and "volumes" not in pod["spec"]
    assert "volumeMounts" not in pod["spec"]["containers"][1]


def test_a_config_map_is_mounted_only_when_named_or_for_static_limits() -> None:
    from tokenscaler.config import load_config
    from tokenscaler.kube.webhook import InjectedSidecar, mutate_request

    config = load_config(REPO / "examples" / "tokenpools.yaml")

    def injected(opts: InjectedSidecar) -> tuple[list[str], list[dict[str, Any]]]:
        r = mutate_request(pod_review(POD)["request"], config, opts)
        pod = jsonpatch.apply_patch(POD, json.loads(base64.b64decode(r["response"]["patch"])))
        return pod["spec"]["containers"][1]["args"], pod["spec"].get("volumes", [])

    # a bootstrap named explicitly: --config beside --limits-url, until the first document
    args, volumes = injected(InjectedSidecar(config_map="tokenscaler-bootstrap"))
    assert args[args.index("--config") + 1] == "/etc/tokenscaler/tokenpools.yaml" and "--limits-url" in args
    assert {"name": "tokenscaler-config", "configMap": {"name": "tokenscaler-bootstrap"}} in volumes
    # static limits (no limits API): the config is the sidecar's only source
    args, volumes = injected(InjectedSidecar(limits_url=None))
    assert "--limits-url" not in args and "--config" in args
    assert volumes == [{"name": "tokenscaler-config", "configMap": {"name": "tokenscaler-config"}}]


def test_an_entitlement_with_a_key_secret_is_allowed_and_a_bad_reference_denied(
    hook: tuple[Server, ssl.SSLContext],
) -> None:
    e = copy.deepcopy(example("research"))
    e["spec"].pop("api_keys", None)
    e["spec"]["api_key_secret_ref"] = {"name": "research-keys"}
    r = post(hook, "/validate", entitlement_review(e, op="UPDATE"))[1]["response"]
    assert r["allowed"] is True, r
    e["spec"]["api_key_secret_ref"] = {"name": "Not_A_Name"}
    r = post(hook, "/validate", entitlement_review(e, op="UPDATE"))[1]["response"]
    assert r["allowed"] is False and r["status"]["code"] == 422
    assert "spec.api_key_secret_ref.name" in r["status"]["message"], r["status"]["message"]
    e["spec"]["api_key_secret_ref"] = {"name": "research-keys", "key": "x"}
    r = post(hook, "/validate", entitlement_review(e, op="UPDATE"))[1]["response"]
    assert r["allowed"] is False and "spec.api_key_secret_ref.key" in r["status"]["message"]


def test_unlabelled_or_unknown_pool_pods(hook: tuple[Server, ssl.SSLContext]) -> None:
    plain = copy.deepcopy(POD)
    plain["metadata"]["labels"] = {"app": "x"}
    r = post(hook, "/mutate", pod_review(plain))[1]["response"]
    assert r["allowed"] is True and "patch" not in r
    other = copy.deepcopy(POD)
    other["metadata"]["labels"]["tokenpools.io/pool"] = "nope"
    r = post(hook, "/mutate", pod_review(other))[1]["response"]
    assert r["allowed"] is False and "'nope'" in r["status"]["message"] and "llama-8b" in r["status"]["message"]


@pytest.mark.parametrize(
    ("path", "raw", "want"),
    [
        ("/validate", b"{not json", "not JSON"),
        ("/validate", b"[]", "JSON object"),
        ("/validate", json.dumps({"kind": "Pod", "apiVersion": "v1"}).encode(), "AdmissionReview"),
        ("/validate", json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}).encode(), "uid"),
        ("/validate", json.dumps(pod_review(POD)).encode(), "not core/Pod"),
        ("/mutate", json.dumps(entitlement_review(example("research"))).encode(), "not tokenpools.io/Entitlement"),
        ("/mutate", b"x" * 70000, "over 65536 bytes"),
    ],
    ids=["malformed", "not-object", "wrong-kind", "no-uid", "validate-pod", "mutate-entitlement", "oversize"],
)
def test_bad_reviews_get_400_with_a_message(
    hook: tuple[Server, ssl.SSLContext], path: str, raw: bytes, want: str
) -> None:
    status, body = post(hook, path, raw=raw)
    assert status == 400
    assert want in body["error"]["message"], body
    # and the server is still there
    assert post(hook, "/validate", entitlement_review(example("research")))[0] == 200


def test_readyz_with_a_config(hook: tuple[Server, ssl.SSLContext]) -> None:
    server, ctx = hook
    with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/readyz", context=ctx, timeout=5) as r:
        assert r.status == 200


def test_bad_certificate_files_are_named(tmp_path: Path) -> None:
    from tests.support import Proc

    bad = tmp_path / "x.pem"
    bad.write_text("nope")
    import sys

    p = Proc([sys.executable, "-m", "tokenscaler", "webhook", "--listen", "127.0.0.1:0", "--tls-cert", str(bad),
              "--tls-key", str(bad), "--config", str(REPO / "examples" / "tokenpools.yaml")])  # fmt: skip
    assert p.popen.wait(20) == 1
    p.stop()
    assert f"--tls-cert {bad}" in p.output


def test_webhook_with_source_kubernetes(tmp_path: Path) -> None:
    """--source kubernetes: the webhook lists and watches the CRs (through a kubeconfig pointing at
    the stand-in), is ready once both are listed, and judges against what the cluster holds."""
    import os

    from tests.kube.apiserver import ApiServer
    from tests.support import wait_until
    from tokenscaler.kube.client import WEBHOOK_RULES

    api = ApiServer().start()
    try:
        for d in yaml.safe_load_all(CRS.read_text()):
            if d:
                api.put("tokenscaler", "tokenpools" if d["kind"] == "TokenPool" else "entitlements", d)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": api.url}}],
            "users": [{"name": "u", "user": {"token": "test"}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "u"}}],
        }))  # fmt: skip
        ca, cert, key = make_certs(tmp_path)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        args = ["webhook", "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)]
        args += ["--source", "kubernetes", "--namespace", "tokenscaler"]
        with running(args, env=env) as server:
            h = (server, ssl.create_default_context(cafile=str(ca)))

            def ready() -> bool:
                with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/readyz", context=h[1], timeout=5) as r:
                    return r.status == 200

            wait_until(ready, timeout=15, message="webhook ready")
            e = copy.deepcopy(example("search-prod"))
            e["metadata"]["name"] = "greedy"
            e["spec"]["guaranteed"]["throughput_tokens_per_s"] = 40000
            e["spec"].pop("limit")
            e["spec"]["api_keys"] = []
            r = post(h, "/validate", entitlement_review(e))[1]["response"]
            assert r["allowed"] is False and "58000" in r["status"]["message"]
            # the pool grows in the cluster: the same Entitlement now fits (watch event -> new config)
            pool = api.get("tokenscaler", "tokenpools", "llama-8b")
            pool["spec"]["max_replicas"] = 12  # 12 x 8000 x 0.8 = 76800 >= 58000
            api.put("tokenscaler", "tokenpools", pool)
            wait_until(
                lambda: post(h, "/validate", entitlement_review(e))[1]["response"]["allowed"],
                timeout=10,
                message="the webhook to see the bigger pool",
            )
        allowed = {(r.api_group, r.resource, v) for r in WEBHOOK_RULES for v in r.verbs}
        assert {(c.group, c.resource, c.verb) for c in api.requests} <= allowed
    finally:
        api.close()
