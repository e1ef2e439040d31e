"""The shipped manifests are secure by default, read from ``kubectl kustomize`` of every kustomization.

* The controller serves its API only over HTTPS with bearer tokens and its KEDA scaler over TLS,
  in the base and in both certificate overlays; each overlay issues the Secret the base mounts,
  with the key names it maps. Flags are read with the real command-line parsers.
* The webhook of those overlays injects sidecars that poll ``https://`` the controller's Service
  with ``--limits-ca`` and ``--limits-token-file`` from a mounted Secret (the real mutation,
  applied to the example's pod); KEDA's TriggerAuthentication carries the same CA.
* Plain HTTP appears only in the overlays named insecure.
* Every Service port is admitted by a NetworkPolicy that selects its pods; the controller admits
  only the sidecars, Prometheus and KEDA, the metrics ports only Prometheus.
* No Secret value, private key or token is in a ConfigMap, an argument or an environment value:
  every credential flag names a file in a Secret volume.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonpatch
import pytest

from tests.kube.test_manifests import KUSTOMIZATIONS, REPO, build, by_kind
from tokenscaler.cli import build_parser
from tokenscaler.cli.webhook import injected_sidecar
from tokenscaler.kube.translate import config_from_crs
from tokenscaler.kube.webhook import POOL_LABEL, InjectedSidecar, mutate_request

Doc = dict[str, Any]

SECURE = ("k8s/base", "k8s/overlays/cert-manager", "k8s/overlays/self-signed")
INSECURE = ("k8s/overlays/insecure", "k8s/examples-insecure")
# which install overlay's webhook injects the pods of an example
INJECTED_BY = {"k8s/examples": "k8s/base", "k8s/examples-insecure": "k8s/overlays/insecure"}
CONTROLLER_HOST = "tokenscaler-controller.tokenscaler.svc"
# what each issuer names the keys of the Secret it writes
ISSUER_KEYS = {
    "k8s/base": ("tls.crt", "tls.key", "ca.crt"),  # the base assumes cert-manager's names
    "k8s/overlays/cert-manager": ("tls.crt", "tls.key", "ca.crt"),
    "k8s/overlays/self-signed": ("cert", "key", "ca"),  # kube-webhook-certgen's
}
CREDENTIAL_FILE_FLAGS = {
    "--tls-cert", "--tls-key", "--tls-client-ca", "--http-tls-cert", "--http-tls-key", "--http-tls-client-ca",
    "--http-token-file", "--limits-ca", "--limits-client-cert", "--limits-client-key", "--limits-token-file",
}  # fmt: skip
SECRETISH_FLAG = re.compile(r"^--[a-z-]*(token|password|passwd|secret|key|credential)s?(-[a-z]+)?$")
SECRET_NAME_FLAGS = {"--limits-secret", "--secret-name"}  # name a Secret, hold none of it


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def docs_of(name: str) -> tuple[Doc, ...]:
    return build(REPO / name)


def deployment(docs: tuple[Doc, ...], name: str) -> Doc:
    (dep,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == name]
    return dep


def parse(args: list[str]) -> argparse.Namespace:
    """A container's args as ``tokenscaler`` itself reads them."""
    return build_parser().parse_args(args)


def secret_file(pod_spec: Doc, container: Doc, path: str) -> tuple[str, str]:
    """(Secret name, key) of the Secret-volume file at ``path`` in ``container``; fails otherwise."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        (volume,) = [v for v in pod_spec.get("volumes", []) if v["name"] == mount["name"]]
        assert "secret" in volume, f"{path} is in volume {volume['name']}, which is not a Secret"
        assert mount.get("readOnly") is True, f"{mount['mountPath']} is not mounted read-only"
        name = path.removeprefix(prefix)
        items = volume["secret"].get("items")
        if items is None:
            return volume["secret"]["secretName"], name
        (item,) = [i for i in items if i["path"] == name]
        return volume["secret"]["secretName"], item["key"]
    raise AssertionError(f"{path}: no Secret volume is mounted there in container {container['name']}")


def sidecar_config(docs: tuple[Doc, ...]) -> Any:
    """The config the webhook knows: the example's TokenPools and Entitlements."""
    t = config_from_crs(by_kind(docs, "TokenPool"), by_kind(docs, "Entitlement"))
    assert t.config is not None, t.errors
    return t.config


def webhook_options(install: str) -> InjectedSidecar:
    hook = deployment(docs_of(install), "tokenscaler-webhook")
    return injected_sidecar(parse(hook["spec"]["template"]["spec"]["containers"][0]["args"]))


def inject(docs: tuple[Doc, ...], opts: InjectedSidecar) -> dict[str, Doc]:
    """Every Deployment of ``docs`` with its pod template as the webhook would admit it."""
    out = {}
    for dep in by_kind(docs, "Deployment"):
        pod = {"apiVersion": "v1", "kind": "Pod", **dep["spec"]["template"]}
        pod["metadata"] = {**pod["metadata"], "namespace": dep["metadata"]["namespace"]}
        if POOL_LABEL in pod["metadata"].get("labels", {}):
            req = {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": pod}
            resp = mutate_request(req, sidecar_config(docs), opts)["response"]
            assert resp["allowed"], resp
            pod = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(resp["patch"])))
        out[dep["metadata"]["name"]] = pod
    return out


def issued_names(docs: tuple[Doc, ...], secret: str) -> tuple[set[str], str] | None:
    """(DNS names, issuer) of the certificate an overlay writes into ``secret``, if it does."""
    for cert in by_kind(docs, "Certificate"):
        if cert["spec"]["secretName"] == secret:
            return set(cert["spec"]["dnsNames"]), "cert-manager"
    for job in by_kind(docs, "Job"):
        spec = job["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["args"][0] == "create" and f"--secret-name={secret}" in c["args"]:
                (hosts,) = [a.removeprefix("--host=") for a in c["args"] if a.startswith("--host=")]
                return set(hosts.split(",")), "certgen"
    return None


# --------------------------------------------------------------------------- the controller


@pytest.mark.parametrize("name", SECURE)
def test_the_controller_serves_only_tls_with_a_token(name: str) -> None:
    docs = docs_of(name)
    dep = deployment(docs, "tokenscaler-controller")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    args = parse(c["args"])
    for flag in ("http_tls_cert", "http_tls_key", "http_token_file", "tls_cert", "tls_key"):
        assert getattr(args, flag), f"{name}: the controller runs without --{flag.replace('_', '-')}"
    cert_key, key_key, ca_key = ISSUER_KEYS[name]
    tls = ("tokenscaler-controller-tls", cert_key), ("tokenscaler-controller-tls", key_key)
    assert (secret_file(spec, c, args.http_tls_cert), secret_file(spec, c, args.http_tls_key)) == tls
    assert (secret_file(spec, c, args.tls_cert), secret_file(spec, c, args.tls_key)) == tls  # KEDA's scaler too
    assert secret_file(spec, c, args.http_token_file) == ("tokenscaler-api-tokens", "tokens")
    # the port serves HTTPS only: probes speak it, the Service says so, Prometheus scrapes it
    assert c["livenessProbe"]["httpGet"]["scheme"] == c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "tokenscaler-controller"]
    assert {p["name"]: p.get("appProtocol") for p in svc["spec"]["ports"]} == {"api": "https", "grpc": "grpc"}
    (monitor,) = [m for m in by_kind(docs, "ServiceMonitor") if m["metadata"]["name"] == "tokenscaler-controller"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"] == CONTROLLER_HOST
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "tokenscaler-controller-tls", "key": ca_key}
    if name != "k8s/base":  # the overlay issues the certificate the base mounts, naming the Service
        issued = issued_names(docs, "tokenscaler-controller-tls")
        assert issued is not None, f"{name} issues no certificate into tokenscaler-controller-tls"
        assert CONTROLLER_HOST in issued[0]
        assert issued[1] == ("cert-manager" if "cert-manager" in name else "certgen")


@pytest.mark.parametrize("name", SECURE)
def test_the_webhook_serves_the_certificate_its_overlay_issues(name: str) -> None:
    docs = docs_of(name)
    dep = deployment(docs, "tokenscaler-webhook")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    args = parse(c["args"])
    cert_key, key_key, _ = ISSUER_KEYS[name]
    assert secret_file(spec, c, args.tls_cert) == ("tokenscaler-webhook-tls", cert_key)
    assert secret_file(spec, c, args.tls_key) == ("tokenscaler-webhook-tls", key_key)
    if name != "k8s/base":
        issued = issued_names(docs, "tokenscaler-webhook-tls")
        assert issued is not None and "tokenscaler-webhook.tokenscaler.svc" in issued[0]


# --------------------------------------------------------------------------- the injected sidecar


@pytest.mark.parametrize("install", SECURE)
def test_the_injected_sidecar_polls_the_controller_over_https_with_a_token(install: str) -> None:
    opts = webhook_options(install)
    example = docs_of("k8s/examples")
    pod = inject(example, opts)["llama-8b"]
    (sidecar,) = [c for c in pod["spec"]["containers"] if c["name"] == "tokenscaler-sidecar"]
    args = parse(sidecar["args"])
    url = urlsplit(args.limits_url)
    assert url.scheme == "https", args.limits_url
    # its config, keys included, comes through that API only: no --config, no ConfigMap volume
    assert args.config is None
    assert not any("configMap" in v for v in pod["spec"].get("volumes", []))
    # the controller's Service and its API port, whose certificate names that host
    docs = docs_of(install)
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "tokenscaler-controller"]
    assert url.hostname == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc" == CONTROLLER_HOST
    assert url.port == next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "api")
    if install != "k8s/base":
        issued = issued_names(docs, "tokenscaler-controller-tls")
        assert issued is not None and url.hostname in issued[0]
    # the CA and the token are files of the workload namespace's Secret
    assert secret_file(pod["spec"], sidecar, args.limits_ca) == ("tokenscaler-client", "ca.crt")
    assert secret_file(pod["spec"], sidecar, args.limits_token_file) == ("tokenscaler-client", "token")


def test_keda_verifies_the_scalers_tls_with_the_same_ca() -> None:
    docs = docs_of("k8s/examples")
    (so,) = by_kind(docs, "ScaledObject")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["metadata"]["scalerAddress"] == f"{CONTROLLER_HOST}:9491"
    ref = trigger["authenticationRef"]
    (auth,) = [a for a in by_kind(docs, "TriggerAuthentication") if a["metadata"]["name"] == ref["name"]]
    assert ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
    assert auth["metadata"]["namespace"] == so["metadata"]["namespace"]
    params = {t["parameter"]: (t["name"], t["key"]) for t in auth["spec"]["secretTargetRef"]}
    assert params == {"caCert": ("tokenscaler-client", "ca.crt")}


# --------------------------------------------------------------------------- plain HTTP, by name only


def _serves_plain(name: str) -> bool:
    docs = docs_of(name)
    plain = False
    for dep in by_kind(docs, "Deployment"):
        c = dep["spec"]["template"]["spec"]["containers"][0]
        if c["args"][0] == "controller":
            plain |= not parse(c["args"]).http_tls_cert or not parse(c["args"]).tls_cert
        if c["args"][0] == "webhook":
            url = webhook_options(name).limits_url or ""
            plain |= not url.startswith("https://")
    for so in by_kind(docs, "ScaledObject"):
        plain |= "authenticationRef" not in so["spec"]["triggers"][0]
    return plain


def test_plain_http_only_in_the_overlays_named_insecure() -> None:
    plain = {rel(p) for p in KUSTOMIZATIONS if _serves_plain(rel(p))}
    assert plain == set(INSECURE)
    assert all("insecure" in n for n in plain)
    # and there, no credential is handed to a sidecar that would send it in clear
    opts = webhook_options("k8s/overlays/insecure")
    assert (opts.limits_url or "").startswith("http://") and opts.limits_secret is None
    pod = inject(docs_of("k8s/examples-insecure"), opts)["llama-8b"]
    (sidecar,) = [c for c in pod["spec"]["containers"] if c["name"] == "tokenscaler-sidecar"]
    assert "--limits-token-file" not in sidecar["args"] and "--limits-ca" not in sidecar["args"]


# --------------------------------------------------------------------------- NetworkPolicies


def _matches(selector: Doc, labels: dict[str, str]) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"Exists": present, "DoesNotExist": not present, "In": present and value in e.get("values", []),
              "NotIn": not present or value not in e.get("values", [])}[e["operator"]]  # fmt: skip
        if not ok:
            return False
    return True


def _container_port(pod: Doc, target: int | str) -> tuple[str | None, int]:
    for c in pod["spec"]["containers"]:
        for p in c.get("ports", []):
            if target in (p.get("name"), p["containerPort"]):
                return p.get("name"), p["containerPort"]
    raise AssertionError(f"no container port {target!r} in pod {pod['metadata'].get('labels')}")


def _admitting(policies: list[Doc], pod: Doc, port: tuple[str | None, int]) -> list[Doc]:
    """The ingress rules of the policies selecting ``pod`` that admit ``port``."""
    rules = []
    for np in policies:
        if "Ingress" not in np["spec"].get("policyTypes", ["Ingress"]):
            continue
        if not _matches(np["spec"]["podSelector"], pod["metadata"].get("labels", {})):
            continue
        for rule in np["spec"].get("ingress", []):
            if any(p.get("port") in port for p in rule.get("ports", [])):
                rules.append(rule)
    return rules


def _pods(name: str) -> tuple[tuple[Doc, ...], dict[str, Doc]]:
    docs = docs_of(name)
    install = INJECTED_BY.get(name)
    return docs, inject(docs, webhook_options(install) if install else InjectedSidecar())


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=rel)
def test_every_service_port_has_a_network_policy(path: Path) -> None:
    docs, pods = _pods(rel(path))
    policies = by_kind(docs, "NetworkPolicy")
    for svc in by_kind(docs, "Service"):
        ns = svc["metadata"]["namespace"]
        wanted = {"matchLabels": svc["spec"]["selector"]}
        selected = [
            p for p in pods.values() if p["metadata"]["namespace"] == ns and _matches(wanted, p["metadata"]["labels"])
        ]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        in_ns = [n for n in policies if n["metadata"]["namespace"] == ns]
        for pod in selected:
            for sp in svc["spec"]["ports"]:
                port = _container_port(pod, sp.get("targetPort", sp["port"]))
                rules = _admitting(in_ns, pod, port)
                assert rules, f"{rel(path)}: Service {svc['metadata']['name']} port {sp['name']} ({port}): no policy"
                for rule in rules:  # open to anyone only where the caller is not a pod: the API server
                    assert rule.get("from") or port == ("https", 8443), (svc["metadata"]["name"], port, rule)


def _peers(rules: list[Doc]) -> list[Doc]:
    return [peer for r in rules for peer in r["from"]]


SIDECARS = {"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": POOL_LABEL, "operator": "Exists"}]}}
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}  # fmt: skip
KEDA = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}}}  # fmt: skip


@pytest.mark.parametrize("name", (*SECURE, "k8s/overlays/insecure"))
def test_only_the_sidecars_prometheus_and_keda_reach_the_controller(name: str) -> None:
    docs, pods = _pods(name)
    policies = [n for n in by_kind(docs, "NetworkPolicy") if n["metadata"]["namespace"] == "tokenscaler"]
    deny = [n for n in policies if n["spec"]["podSelector"] == {} and not n["spec"].get("ingress")]
    assert deny, "no default deny of ingress in namespace tokenscaler"
    ctl = pods["tokenscaler-controller"]
    api, grpc = _container_port(ctl, "api"), _container_port(ctl, "grpc")
    assert sorted(map(str, _peers(_admitting(policies, ctl, api)))) == sorted(map(str, [SIDECARS, PROMETHEUS]))
    assert _peers(_admitting(policies, ctl, grpc)) == [KEDA]
    hook = pods["tokenscaler-webhook"]
    assert [p for r in _admitting(policies, hook, _container_port(hook, "https")) for p in r["ports"]] == [
        {"port": "https", "protocol": "TCP"}
    ]  # the HTTPS port only


def test_the_metrics_ports_admit_prometheus_only() -> None:
    docs, pods = _pods("k8s/examples")
    policies = by_kind(docs, "NetworkPolicy")
    pod = pods["llama-8b"]
    (monitor,) = by_kind(docs_of("k8s/base"), "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert _matches(monitor["spec"]["selector"], pod["metadata"]["labels"])
    assert _peers(_admitting(policies, pod, _container_port(pod, endpoint["port"]))) == [PROMETHEUS]
    # vLLM's own port is reached only by the sidecar, over loopback: no rule admits it
    assert _admitting(policies, pod, _container_port(pod, "ts-upstream")) == []


# --------------------------------------------------------------------------- no secret in the open


def secrets_in_the_open(docs: tuple[Doc, ...], pods: dict[str, Doc]) -> list[str]:
    """Where a Secret's value, a PEM block or an inline credential sits outside a Secret."""
    values = set()
    for s in by_kind(docs, "Secret"):
        values |= {base64.b64decode(v).decode(errors="replace") for v in (s.get("data") or {}).values()}
        values |= set((s.get("stringData") or {}).values())
    values = {v for v in values if len(v) >= 4}
    found: list[str] = []

    def check(where: str, text: str) -> None:
        if "-----BEGIN" in text:
            found.append(f"{where}: a PEM block")
        found.extend(f"{where}: a Secret's value" for v in values if v in text)

    for cm in by_kind(docs, "ConfigMap"):
        for k, v in (cm.get("data") or {}).items():
            check(f"ConfigMap {cm['metadata']['name']} {k}", v)
    for name, pod in pods.items():
        spec = pod["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{c['name']}"
            for e in c.get("env", []):
                if "value" in e:
                    check(f"{where} env {e['name']}", e["value"])
            args = c.get("args", [])
            for i, a in enumerate(args):
                check(f"{where} arg", a)
                flag, eq, value = a.partition("=")
                if not flag.startswith("--"):
                    continue
                if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value = args[i + 1]
                if flag in CREDENTIAL_FILE_FLAGS:
                    try:
                        secret_file(spec, c, value)
                    except AssertionError as err:
                        found.append(f"{where} {flag}: {err}")
                elif SECRETISH_FLAG.match(flag) and flag not in SECRET_NAME_FLAGS:
                    found.append(f"{where} {flag}: a credential given inline")
    return found


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=rel)
def test_no_secret_value_appears_in_a_config_map_or_an_argument(path: Path) -> None:
    docs, pods = _pods(rel(path))
    for job in by_kind(docs, "Job"):
        pods[job["metadata"]["name"]] = job["spec"]["template"]
    assert secrets_in_the_open(docs, pods) == []


def test_the_check_finds_a_leaked_secret() -> None:
    docs, pods = _pods("k8s/overlays/cert-manager")
    leaked = "tok-" + "9f2c" * 6
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "tokenscaler"},
              "stringData": {"token": leaked}}  # fmt: skip
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "tokenscaler"},
          "data": {"x": f"token: {leaked}\n"}}  # fmt: skip
    ctl = json.loads(json.dumps(pods["tokenscaler-controller"]))
    c = ctl["spec"]["containers"][0]
    c["args"] = [a for a in c["args"] if not a.startswith("--http-token-file")] + [f"--http-token={leaked}"]
    c["args"].append("--http-tls-client-ca=/etc/tokenscaler/ca.crt")  # a file, but not in a Secret volume
    found = secrets_in_the_open((*docs, secret, cm), {**pods, "tokenscaler-controller": ctl})
    assert "ConfigMap c x: a Secret's value" in found
    assert "tokenscaler-controller/controller arg: a Secret's value" in found
    assert "tokenscaler-controller/controller --http-token: a credential given inline" in found
    assert any(f.startswith("tokenscaler-controller/controller --http-tls-client-ca: ") for f in found)
