"""Installed as users install it: the wheel built from this checkout, in a fresh venv, run from an
empty directory outside the checkout.

The wheel is built as a release is (``python -m build``: an sdist, then the wheel from the
sdist, so a file missing from the sdist fails here too) and checked with ``twine check``. It is
installed with ``pip install --no-deps --no-index`` into a venv that sees no other
site-packages; its dependencies come from this test run's own environment, but only those the
wheel's metadata asks for: a directory of links to exactly the distributions its requirements
resolve to (base first, then with the ``demo`` and ``experiments`` extras), which ``pip check``
then holds against the wheel's requirements. No network, a few seconds, and the base venv
really lacks matplotlib, rich, tqdm and openai.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import LISTEN_RE, REPO, Proc
from tokenscaler import __version__

pytestmark = pytest.mark.install

HEAVY = ("matplotlib", "rich", "tqdm", "openai")
ROLES = ("sim", "sidecar", "controller", "webhook", "validate", "plan", "probe", "convert",
         "experiment", "demo", "render-dashboards")  # fmt: skip


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path
    requires: tuple[Requirement, ...]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"tokenscaler-{__version__}.dist-info/METADATA").decode()
    requires = tuple(Requirement(v) for k, v in re.findall(r"^(Requires-Dist): (.*)$", meta, re.M))
    return Built(wheel, sdist, requires)


def test_the_release_build_is_named_by_the_one_version_and_passes_twine_check(built: Built) -> None:
    assert built.wheel.name == f"tokenscaler-{__version__}-py3-none-any.whl"
    assert built.sdist.name == f"tokenscaler-{__version__}.tar.gz"
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(built.wheel), str(built.sdist)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with zipfile.ZipFile(built.wheel) as z:
        names = set(z.namelist())
    for data in ("tokenscaler/experiments/scenarios/overload.yaml", "tokenscaler/experiments/traces/README.md",
                 "tokenscaler/experiments/traces/azure-llm-2023-conv.csv", "tokenscaler/experiments/scaledobject.yaml",
                 "tokenscaler/sim/profiles/demo.yaml", "tokenscaler/py.typed",
                 f"tokenscaler-{__version__}.dist-info/licenses/LICENSE"):  # fmt: skip
        assert data in names, data
    shipped = {Path(n).stem for n in names if n.startswith("tokenscaler/experiments/scenarios/")}
    in_checkout = {p.stem for p in (REPO / "tokenscaler" / "experiments" / "scenarios").glob("*.yaml")}
    assert shipped == in_checkout  # a new scenario file ships with no change to the packaging


def test_the_base_requirements_leave_out_plotting_the_live_display_and_the_load_client(built: Built) -> None:
    base = {canonicalize_name(r.name) for r in built.requires if not _has_extra(r)}
    assert base.isdisjoint(HEAVY)
    for extra, wanted in (("experiments", {"matplotlib", "tqdm"}), ("demo", {"matplotlib", "rich", "openai"})):
        got = {canonicalize_name(d.metadata["Name"]) for d in _closure(built.requires, {extra}).values()}
        assert wanted <= got, (extra, wanted - got)


def _has_extra(r: Requirement) -> bool:
    return r.marker is not None and "extra" in str(r.marker)


def _closure(requires: Iterable[Requirement], extras: set[str]) -> dict[str, md.Distribution]:
    """The installed distributions that ``requires`` (tokenscaler's, with ``extras``) resolve to."""
    ours = tuple(requires)
    out: dict[str, md.Distribution] = {}
    todo: list[tuple[Requirement, str]] = [(r, e) for r in ours for e in ("", *sorted(extras))]
    done: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name == "tokenscaler":  # an extra made of other extras (tokenscaler[plots])
            todo += [(r, e) for r in ours for e in req.extras]
            continue
        dist = md.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{req} but {dist.version} is installed"
        out[name] = dist
        for e in ("", *req.extras):
            if (name, e) not in done:
                done.add((name, e))
                todo += [(Requirement(r), e) for r in dist.requires or []]
    return out


def _link(dists: Iterable[md.Distribution], view: Path) -> None:
    """``view``: links to each distribution's top-level modules and its metadata, nothing else."""
    view.mkdir(parents=True)
    for dist in dists:
        site = Path(dist.locate_file(""))
        tops = {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}
        for top in tops:
            if (site / top).exists() and not (view / top).exists():
                (view / top).symlink_to(site / top)


class Venv:
    """A fresh venv (no system site-packages, no pip of its own) with the wheel installed."""

    def __init__(self, root: Path, built: Built) -> None:
        self.root, self.built = root, built
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
        self.bin = root / "bin"
        purelib = sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)})
        self.site = Path(purelib)
        self.pip("install", "--no-deps", "--no-index", "--no-compile", "--quiet", str(built.wheel))

    def pip(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(self.bin / "python"), "--disable-pip-version-check", *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def provide(self, name: str, dists: Iterable[md.Distribution]) -> None:
        _link(dists, self.root / "deps" / name)
        (self.site / f"_{name}_deps.pth").write_text(str(self.root / "deps" / name) + "\n")

    def run(self, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(
            [str(self.bin / "tokenscaler"), *args], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self, cwd: Path, *args: str) -> Proc:
        return Proc([str(self.bin / "tokenscaler"), *args], env={"PYTHONPATH": ""}, cwd=cwd)

    def can_import(self, module: str) -> bool:
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        return subprocess.run([str(self.bin / "python"), "-c", code], timeout=60).returncode == 0


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    v = Venv(tmp_path_factory.mktemp("venv") / "v", built)
    v.provide("base", _closure(built.requires, set()).values())
    return v


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_the_base_install_lacks_the_extras_and_its_requirements_hold(venv: Venv, empty: Path) -> None:
    assert [m for m in HEAVY if venv.can_import(m)] == []
    venv.pip("check")  # every installed distribution's requirements are met, tokenscaler's included
    where = subprocess.run(
        [str(venv.bin / "python"), "-c", "import tokenscaler; print(tokenscaler.__file__)"],
        cwd=empty, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv.root) and not Path(where).is_relative_to(REPO)


@pytest.mark.parametrize("role", ROLES)
def test_every_role_answers_help_from_the_base_install(venv: Venv, empty: Path, role: str) -> None:
    done = venv.run(empty, role, "--help")
    assert done.returncode == 0 and "usage: tokenscaler" in done.stdout, done.stderr


def test_the_serving_roles_run_from_the_base_install(venv: Venv, empty: Path) -> None:
    config = REPO / "examples" / "tokenpools-demo.yaml"  # the user's own file, by path
    done = venv.run(empty, "validate", "--config", str(config))
    assert done.returncode == 0, done.stderr
    procs: list[Proc] = []
    try:
        procs.append(venv.start(empty, "sim", "--port", "0", "--profile", "demo"))  # a profile shipped as package data
        sim = f"http://127.0.0.1:{procs[-1].wait_for_line(LISTEN_RE, timeout=30)['port']}"
        procs.append(venv.start(empty, "sidecar", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                                "--upstream", sim, "--config", str(config), "--pool", "llama-8b"))  # fmt: skip
        procs[-1].wait_for_line(LISTEN_RE, timeout=30)
        scrape = empty / "scrape.yaml"
        scrape.write_text(f"pools: {{llama-8b: {{engines: ['{sim}/metrics'], sidecars: []}}}}\n")
        procs.append(venv.start(empty, "controller", "--config", str(config), "--scrape-config", str(scrape),
                                "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"))  # fmt: skip
        procs[-1].wait_for_line(r"scaler on grpc://", timeout=30)
        probe = venv.run(empty, "probe", "--url", sim, "--prompt-tokens", "16", "--output-tokens", "8", "--max-seconds",
                         "6", "--level-s", "1", "--max-concurrency", "2", "--out", "replica.yaml")  # fmt: skip
        assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-2000:]
        assert "replica:" in probe.stdout and (empty / "replica.yaml").is_file()
        assert "no PNG without matplotlib (pip install 'tokenscaler[plots]')" in probe.stdout
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("experiment", "overload", "--policy", "tokenpools", "--duration-s", "120", "--out", "x"), "experiments"),
        (("demo", "--duration-s", "30"), "demo"),
        (("render-dashboards", "--prometheus", "http://127.0.0.1:9", "--out", "x"), "plots"),
        (("probe", "--url", "http://127.0.0.1:9", "--png", "x.png"), "plots"),
    ],
    ids=["experiment", "demo", "render-dashboards", "probe-png"],
)
def test_a_command_whose_extra_is_missing_says_which_pip_install_to_run(
    venv: Venv, empty: Path, args: tuple[str, ...], extra: str
) -> None:
    done = venv.run(empty, *args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert f"pip install 'tokenscaler[{extra}]'" in done.stderr
    assert list(empty.iterdir()) == []  # it did no work first


def test_with_the_extras_an_experiment_runs_from_an_empty_directory(built: Built, tmp_path: Path) -> None:
    v = Venv(tmp_path / "v", built)
    base = _closure(built.requires, set())
    v.provide("base", base.values())
    v.provide("extras", [d for n, d in _closure(built.requires, {"demo", "experiments"}).items() if n not in base])
    assert all(v.can_import(m) for m in HEAVY)
    v.pip("check")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = v.run(empty, "experiment", "paper-overload", "--policy", "tokenpools", "--duration-s", "30", "--out", "x")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (empty / "x" / "results.json").is_file() and (empty / "x" / "report.md").is_file()
    assert list((empty / "x").glob("*.png")), "the report's plots"
    # the user's own scenario, by path, with its trace beside it
    shipped = REPO / "tokenscaler" / "experiments"
    mine = empty / "mine"
    (mine / "traces").mkdir(parents=True)
    (mine / "traces" / "t.csv").write_text((shipped / "traces" / "azure-llm-2023-code.csv").read_text())
    text = (shipped / "scenarios" / "overload.yaml").read_text().replace("azure-llm-2023-conv", "azure-llm-2023-code")
    (mine / "scenarios").mkdir()
    (mine / "scenarios" / "s.yaml").write_text(text.replace("../traces/azure-llm-2023-code.csv", "../traces/t.csv"))
    done = v.run(empty, "experiment", "mine/scenarios/s.yaml", "--policy", "tokenpools", "--duration-s", "60",
                 "--out", "y", "--no-report")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"scenario": "s"' in (empty / "y" / "results.json").read_text()
    unknown = v.run(empty, "experiment", "no-such-scenario", "--out", "z")
    assert unknown.returncode == 1 and "neither a file nor a shipped scenario" in unknown.stderr
    assert "paper-overload" in unknown.stderr
