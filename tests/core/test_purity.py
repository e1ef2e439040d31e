"""The core is pure: no file, socket, clock, environment or event-loop access in ``tokenscaler/core``.

Checked on the source (AST), so it fails at the line that breaks the rule: every import of
the core is of the core itself or of an allow-listed module, and no code calls ``open``,
reads ``os.environ``, or names a clock. The import contracts (``lint-imports``) keep the
core from importing the rest of the package; this keeps it from doing I/O itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "tokenscaler" / "core"

ALLOWED_MODULES = {
    # stdlib without I/O or clocks
    "__future__", "base64", "bisect", "collections", "dataclasses", "enum", "functools", "hashlib", "heapq",
    "itertools", "json", "math", "re", "typing", "difflib", "numbers", "operator",
    # calendar arithmetic (datetime.now and utcnow stay forbidden below) and the time zone
    # database, looked up by name: the budgets' periods (tokenscaler/core/budget.py)
    "datetime", "zoneinfo",
    # the declared core dependencies
    "numpy", "pydantic",
}  # fmt: skip
FORBIDDEN_CALLS = {"open", "input", "print", "exec", "eval", "__import__"}
FORBIDDEN_ATTRIBUTES = {
    ("os", "environ"), ("os", "getenv"), ("time", "time"), ("time", "monotonic"), ("time", "perf_counter"),
    ("datetime", "now"), ("datetime", "utcnow"), ("Path", "read_text"), ("Path", "open"),
}  # fmt: skip


def core_files() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def import_violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            if name.startswith("tokenscaler.core") or name.split(".")[0] in ALLOWED_MODULES:
                continue
            bad.append(f"{path.name}:{node.lineno}: imports {name}")
    return bad


def io_violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            bad.append(f"{path.name}:{node.lineno}: calls {node.func.id}()")
        named = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        if named and (node.value.id, node.attr) in FORBIDDEN_ATTRIBUTES:  # type: ignore[union-attr]
            bad.append(f"{path.name}:{node.lineno}: uses {node.value.id}.{node.attr}")
        if isinstance(node, ast.AsyncFunctionDef | ast.Await):
            bad.append(f"{path.name}:{node.lineno}: async code (the core takes `now` as an argument)")
    return bad


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_a_core_module_imports_only_the_core_and_pure_libraries(path: Path) -> None:
    bad = import_violations(path)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_a_core_module_calls_no_io_and_reads_no_clock(path: Path) -> None:
    bad = io_violations(path)
    assert not bad, "\n".join(bad)


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: a module that opens a file, a socket and reads the clock is caught."""
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import os\nimport socket\nimport time\n\ndef f():\n    return open('x'), time.time(), os.environ\n"
    )
    assert [v.split(": ", 1)[1] for v in import_violations(sample)] == ["imports os", "imports socket", "imports time"]
    assert sorted(v.split(": ", 1)[1] for v in io_violations(sample)) == [
        "calls open()",
        "uses os.environ",
        "uses time.time",
    ]
