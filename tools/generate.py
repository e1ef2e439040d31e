"""Every checked-in file generated from another source, written by one command from a checkout.

    make generate          # python -m tools.generate: rewrite every generated file
    make generate-check    # python -m tools.generate --check: exit 1 with a diff when any drifted

It writes into this repository (the directory above ``tools/``), never into an installed
package; ``tests/test_generated.py`` fails when a checked-in file differs from what this
produces.

| generated | from |
| --- | --- |
| ``tokenscaler/serve/_proto/*`` | ``keda/externalscaler.proto`` (grpc_tools.protoc, :mod:`tools.protos`) |
| ``k8s/base/crds/*.yaml`` | the config models (:mod:`tokenscaler.kube.crds`) |
| ``dashboards/*.json`` | :mod:`tokenscaler.observe.dashboards` |
| ``k8s/monitoring/prometheusrule.yaml`` | ``alerts/tokenscaler-alerts.rules.yml`` (:mod:`tokenscaler.observe.alerts`) |
| ``alerts/tokenscaler-recording.rules.yml`` | the controller's queries (:mod:`tokenscaler.sources.prometheus`) |
| ``tokenscaler/experiments/scaledobject.yaml`` | ``keda/scaledobject.yaml``, copied: the package's HPA rules |
| ``docs/experiments.md`` (its claims table) | the digests ``docs/data/experiments/*.json`` (:mod:`tools.claims`) |
| ``docs/reference/metrics.md`` | the metric specs (:mod:`tokenscaler.observe.metrics_reference`) |

The directories the generator owns (``OWNED``) hold nothing else: a file there that it no
longer generates is stale too (``--check`` names it, a write removes it).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROTO = Path("keda/externalscaler.proto")
ALERT_RULES = Path("alerts/tokenscaler-alerts.rules.yml")
RUNBOOK = Path("docs/runbook.md")
PROMETHEUS_RULE = Path("k8s/monitoring/prometheusrule.yaml")
RECORDING_RULES = Path("alerts/tokenscaler-recording.rules.yml")
SCALED_OBJECT = Path("keda/scaledobject.yaml")
PACKAGED_SCALED_OBJECT = Path("tokenscaler/experiments/scaledobject.yaml")
CLAIMS_PAGE = Path("docs/experiments.md")  # only its claims block is generated
METRICS_REFERENCE = Path("docs/reference/metrics.md")

# directory -> glob of the files in it that only the generator writes
OWNED = {
    Path("tokenscaler/serve/_proto"): "*.py*",
    Path("k8s/base/crds"): "*.yaml",
    Path("dashboards"): "*.json",
}


def generated(repo: Path = REPO) -> dict[Path, str]:
    """Repository-relative path -> the text that file must hold, from the sources in ``repo``."""
    from tokenscaler.kube import crds
    from tokenscaler.observe import alerts, dashboards, metrics_reference
    from tokenscaler.sources.prometheus import rules_yaml
    from tools import claims, protos

    out: dict[Path, str] = {}
    for name, text in protos.generate(repo / PROTO).items():
        out[Path("tokenscaler/serve/_proto") / name] = text
    for name, text in crds.generate().items():
        out[Path("k8s/base/crds") / name] = text
    for name, text in dashboards.render_all().items():
        out[Path("dashboards") / name] = text
    out[PROMETHEUS_RULE] = alerts.render(repo / ALERT_RULES)
    out[RECORDING_RULES] = rules_yaml()
    out[PACKAGED_SCALED_OBJECT] = (repo / SCALED_OBJECT).read_text(encoding="utf-8")
    out[CLAIMS_PAGE] = claims.render_page(repo)
    out[METRICS_REFERENCE] = metrics_reference.render()
    return out


def extra_files(files: dict[Path, str], repo: Path = REPO) -> list[Path]:
    """Files in the owned directories that the generator does not produce (any more)."""
    extra = []
    for directory, pattern in OWNED.items():
        for path in sorted((repo / directory).glob(pattern)):
            rel = path.relative_to(repo)
            if path.is_file() and rel not in files:
                extra.append(rel)
    return extra


def drift(files: dict[Path, str], repo: Path = REPO) -> str:
    """A unified diff from the checked-in files to ``files`` (and the stale ones); empty when equal."""
    chunks: list[str] = []
    for rel, text in files.items():
        path = repo / rel
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            chunks.extend(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    fromfile=f"{rel} (checked in)",
                    tofile=f"{rel} (generated)",
                )
            )
    chunks.extend(f"{rel}: not generated any more (remove it)\n" for rel in extra_files(files, repo))
    return "".join(chunks)


def write(files: dict[Path, str], repo: Path = REPO) -> list[Path]:
    """Write the files that differ and remove the stale ones; returns what changed."""
    changed = []
    for rel, text in files.items():
        path = repo / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
            changed.append(rel)
    for rel in extra_files(files, repo):
        (repo / rel).unlink()
        changed.append(rel)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff when a file drifted")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout (default: the one holding this script)")
    args = ap.parse_args(argv)
    files = generated(args.repo)
    if args.check:
        d = drift(files, args.repo)
        if d:
            sys.stdout.write(d)
            print("generated files are out of date: run make generate", file=sys.stderr)
            return 1
        print(f"{len(files)} generated files are up to date")
        return 0
    changed = write(files, args.repo)
    for rel in changed:
        print(f"wrote {rel}" if rel in files else f"removed {rel}")
    print(f"{len(files)} generated files, {len(changed)} changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
