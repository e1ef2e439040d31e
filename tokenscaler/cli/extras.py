"""Which commands need an optional dependency, and what to say when it is not installed.

``pip install tokenscaler`` (the base) runs every serving role: ``controller``, ``sidecar``,
``webhook``, ``sim``, ``probe`` and the offline commands (``validate``, ``plan``, ``convert``).
Plotting, the live display and the load client are extras (``[project.optional-dependencies]``
in ``pyproject.toml``; ``tokenscaler[lab]`` is all of them):

| extra | brings | for |
| --- | --- | --- |
| ``plots`` | matplotlib | ``render-dashboards``, ``probe --png`` |
| ``experiments`` | matplotlib, tqdm | ``experiment`` (report plots, progress bar) |
| ``demo`` | matplotlib, rich, openai | ``demo`` (report plots, live display, load generator) |

A command checks before it does any work; when a module is missing it prints one line naming
the modules and the ``pip install`` that brings them, and exits 1 (no traceback).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable

from tokenscaler.cli.common import EXIT_BAD_INPUT, EXIT_OK

# extra -> the modules (import names) a command of that extra imports
EXTRAS: dict[str, tuple[str, ...]] = {
    "plots": ("matplotlib",),
    "experiments": ("matplotlib", "tqdm"),
    "demo": ("matplotlib", "rich", "openai"),
}


def missing(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (looked up, not imported)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def install_hint(extra: str) -> str:
    return f"pip install 'tokenscaler[{extra}]'"


def require(role: str, extra: str, modules: Iterable[str] | None = None) -> int:
    """0 when ``modules`` (default: all of ``extra``'s) import; else say what to install and return 1."""
    absent = missing(EXTRAS[extra] if modules is None else modules)
    if not absent:
        return EXIT_OK
    print(
        f"tokenscaler {role}: needs {', '.join(absent)}, which the base install leaves out: {install_hint(extra)}",
        file=sys.stderr,
    )
    return EXIT_BAD_INPUT
