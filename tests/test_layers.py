"""Every module at the top of the package sits in a layer of the import contract.

``lint-imports`` checks only the modules a contract names: a top-level module left out of the
layers contract (as ``probe.py`` once was) may import anything without a failure. This test
fails naming the module, so each new one must be given its layer in ``pyproject.toml``."""

from __future__ import annotations

import pkgutil
import re
import tomllib

import tokenscaler
from tests.support import REPO

NOT_LAYERED = {"__main__"}  # `python -m tokenscaler`: the entry point imports the composition layer only


def layers() -> list[str]:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "layers"]
    return contract["layers"]


def test_every_top_level_module_has_a_layer() -> None:
    layered = {m for layer in layers() for m in re.split(r"\s*[|:]\s*", layer)}
    top = {f"tokenscaler.{m.name}" for m in pkgutil.iter_modules(tokenscaler.__path__)} - {
        f"tokenscaler.{m}" for m in NOT_LAYERED
    }
    missing = sorted(top - layered)
    assert not missing, f"not in the layers contract of pyproject.toml: {', '.join(missing)}"
    assert layered <= top, f"the layers contract names modules that do not exist: {sorted(layered - top)}"


def test_the_files_in_modules_are_one_layer_between_sources_and_the_core() -> None:
    names = [re.split(r"\s*[|:]\s*", layer) for layer in layers()]
    files_in = names.index(["tokenscaler.config", "tokenscaler.credfiles", "tokenscaler.tlsfiles"])
    assert names[files_in - 1] == ["tokenscaler.sources"] and names[files_in + 1] == ["tokenscaler.core"]
