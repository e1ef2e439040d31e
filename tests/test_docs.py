"""The README is a front door and the docs build: `mkdocs build --strict` passes (no broken link,
anchor or page left out of the nav), every relative link resolves in the repository too, and the
pages agree with what they describe (every alert has its row)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import REPO
from tools.mkdocs_hooks import site_target

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").rglob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)")
SITE_SOURCES = ["mkdocs.yml", "README.md", "BENCHMARKS.md", "docs", "tools/mkdocs_hooks.py"]


def mkdocs(cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=cwd, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip


def test_the_site_builds_strict_with_the_readme_as_its_home_page(tmp_path: Path) -> None:
    done = mkdocs(REPO, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "Token pools for multi-tenant LLM inference" in home
    assert 'href="sidecar.html"' in home and 'src="img/demo-ttft-p99.png"' in home  # README's docs/ links, rewritten
    assert (tmp_path / "site" / "benchmarks.html").is_file()


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("[a page](no-such-page.md)", "no-such-page.md"),
        ("[an anchor](runbook.md#no-such-section)", "no-such-section"),
        ("[outside the site](../Makefile)", "Makefile"),
        (None, "orphan.md"),  # a page in docs/ that the nav leaves out
    ],
)
def test_a_broken_link_or_a_page_left_out_fails_the_build(tmp_path: Path, edit: str | None, named: str) -> None:
    for rel in SITE_SOURCES:
        src, dst = REPO / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
    page = tmp_path / "docs" / "sidecar.md"
    if edit is None:
        (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    else:
        page.write_text(page.read_text() + f"\nSee {edit}.\n")
    done = mkdocs(tmp_path, tmp_path / "site")
    assert done.returncode != 0 and named in done.stdout + done.stderr, done.stdout + done.stderr


def test_the_hook_rewrites_repository_links_to_site_pages() -> None:
    assert site_target("index.md", "docs/sidecar.md#tier-order-on-a-replica") == "sidecar.md#tier-order-on-a-replica"
    assert site_target("index.md", "docs/img/demo-ttft-p99.png") == "img/demo-ttft-p99.png"
    assert site_target("index.md", "BENCHMARKS.md") == "benchmarks.md"
    assert site_target("sidecar.md", "../BENCHMARKS.md") == "benchmarks.md"
    assert site_target("reference/README.md", "../../README.md") == "../index.md"
    assert site_target("sidecar.md", "runbook.md#x") == "runbook.md#x"
    assert site_target("sidecar.md", "../Makefile") == "../Makefile"  # left for --strict to refuse
    assert site_target("sidecar.md", "https://example.org/a.md") == "https://example.org/a.md"


@pytest.mark.parametrize("path", [README, REPO / "BENCHMARKS.md", *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_in_the_repository(path: Path) -> None:
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^([a-z][a-z0-9+.-]*:|#)", target, re.IGNORECASE):
            continue
        file = (path.parent / target.partition("#")[0]).resolve()
        assert file.is_file(), f"{path.relative_to(REPO)}: link to {target}, which is not a file of the repository"


def test_the_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move detail into docs/"
    sections = [line.removeprefix("## ") for line in lines if line.startswith("## ")]
    assert sections == ["Quick start", "Concepts", "Config format", "Commands", "Operating it", "Read next"]
    quick = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    assert [c.split("#")[0].strip() for c in quick.strip().splitlines()] == ["make demo", "make test"]
    assert yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"][0] == {"Home": "index.md"}  # the site's home


def test_the_controllers_http_endpoint_for_limits_is_the_limits_api() -> None:
    for path in [README, REPO / "BENCHMARKS.md", *PAGES]:
        assert "admission API" not in path.read_text(encoding="utf-8"), path.relative_to(REPO)


def test_every_alert_has_its_row_in_the_observability_page() -> None:
    rules = yaml.safe_load((REPO / "alerts" / "tokenscaler-alerts.rules.yml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    page = (REPO / "docs" / "observability.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \[(Tokenscaler\w+)\]\(runbook\.md#(\w+)\)", page, re.MULTILINE)
    assert [name for name, _ in rows] == alerts
    assert all(anchor == name.lower() for name, anchor in rows)
