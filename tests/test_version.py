"""The version is written once, ``tokenscaler.__version__``: the package metadata, the image the
manifests run (kustomize's ``images`` tag and the webhook's ``--sidecar-image``), the webhook's
default sidecar image, ``make image`` and every image reference in the docs follow it."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.kube.test_manifests import KUSTOMIZATIONS, build, by_kind
from tests.support import REPO
from tokenscaler import __version__
from tokenscaler.kube.webhook import IMAGE, InjectedSidecar

IMAGE_REF = re.compile(re.escape(IMAGE) + r":([A-Za-z0-9_.$()-]+)")
WRITTEN = [
    *sorted((REPO / "k8s").rglob("*.yaml")), REPO / "Dockerfile", REPO / "Makefile",
    REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
]  # fmt: skip


def test_the_version_is_a_release_version_and_the_installed_metadata_carries_it() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?", __version__)
    assert importlib.metadata.version("tokenscaler") == __version__
    assert 'dynamic = ["version"]' in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("path", WRITTEN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_image_reference_names_the_version(path: Path) -> None:
    for tag in IMAGE_REF.findall(path.read_text()):
        assert tag in (__version__, "$(VERSION)"), f"{path.relative_to(REPO)}: {IMAGE}:{tag}, not {__version__}"


def test_the_manifests_and_the_webhook_run_the_image_of_the_version() -> None:
    image = f"{IMAGE}:{__version__}"
    (entry,) = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())["images"]
    assert (entry["newName"], entry["newTag"]) == (IMAGE, __version__)
    assert InjectedSidecar().image == image
    for path in KUSTOMIZATIONS:
        for dep in by_kind(build(path), "Deployment"):
            c = dep["spec"]["template"]["spec"]["containers"][0]
            if c["image"].startswith(IMAGE):
                assert c["image"] == image, (path, dep["metadata"]["name"])
            flag = "--sidecar-image="
            sidecar = [a.removeprefix(flag) for a in c.get("args", []) if a.startswith(flag)]
            assert sidecar in ([], [image]), (path, sidecar)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_image_tags_the_version() -> None:
    out = subprocess.run(["make", "-n", "image"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert f"-t {IMAGE}:{__version__} ." in out
