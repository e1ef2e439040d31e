"""Generated files do not drift: every file ``make generate`` writes is checked in exactly as it
generates it, and the check catches a stale or a leftover file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tools import claims, generate

FILES = generate.generated()


@pytest.mark.parametrize("rel", sorted(FILES), ids=str)
def test_checked_in_file_is_what_make_generate_writes(rel: Path) -> None:
    path = REPO / rel
    assert path.is_file(), f"{rel} is missing: run make generate"
    assert path.read_text(encoding="utf-8") == FILES[rel], f"{rel} drifted: run make generate\n" + generate.drift(
        {rel: FILES[rel]}
    )


def test_owned_directories_hold_only_generated_files() -> None:
    assert generate.extra_files(FILES) == []


def test_the_check_fails_on_a_stale_and_a_leftover_file_and_a_write_repairs_both(tmp_path: Path) -> None:
    # a copy of the sources and outputs the generator reads and writes
    digests = sorted(p.relative_to(REPO) for p in (REPO / claims.DIGESTS).glob("*.json"))
    for rel in [*FILES, generate.PROTO, generate.ALERT_RULES, generate.SCALED_OBJECT, *digests]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, tmp_path / rel)
    assert generate.main(["--check", "--repo", str(tmp_path)]) == 0
    stale = tmp_path / "dashboards" / "pools.json"
    stale.write_text(stale.read_text().replace("tokenscaler / Pools", "Pools (edited by hand)", 1))
    leftover = tmp_path / "k8s" / "base" / "crds" / "old.tokenpools.io.yaml"
    leftover.write_text("kind: CustomResourceDefinition\n")
    (tmp_path / generate.SCALED_OBJECT).write_text((REPO / generate.SCALED_OBJECT).read_text() + "# changed\n")
    d = generate.drift(generate.generated(tmp_path), tmp_path)
    assert "dashboards/pools.json (checked in)" in d and "Pools (edited by hand)" in d
    assert "k8s/base/crds/old.tokenpools.io.yaml: not generated any more" in d
    assert "tokenscaler/experiments/scaledobject.yaml (checked in)" in d  # the package copy follows keda/
    assert generate.main(["--check", "--repo", str(tmp_path)]) == 1
    assert generate.main(["--repo", str(tmp_path)]) == 0
    assert not leftover.exists()
    assert generate.main(["--check", "--repo", str(tmp_path)]) == 0


def test_make_generate_check_runs_from_the_checkout() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.generate", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
