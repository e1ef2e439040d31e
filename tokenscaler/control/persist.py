"""Planner state on disk: written atomically (temp file, fsync, rename), restored at start.

A crash mid-write leaves the previous file intact, so a restart never loses debt. A state
file that cannot be read, or whose keys do not match :class:`~tokenscaler.core.state.StateFile`
exactly, is an error that names the file and the key; the caller decides whether to start
fresh (it never silently does).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from tokenscaler.core.model import ConfigError
from tokenscaler.core.state import PlannerState


class StateFileError(Exception):
    pass


def load_state(path: str | Path) -> PlannerState:
    """The state in ``path``; an empty state when the file does not exist yet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return PlannerState()
    except OSError as e:
        raise StateFileError(f"{path}: cannot read state: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StateFileError(f"{path}: not a tokenscaler state file: {e}") from e
    try:
        return PlannerState.from_json(data, str(path))
    except ConfigError as e:
        raise StateFileError(f"{path}: not a tokenscaler state file: {'; '.join(e.errors)}") from e


def save_state(path: str | Path, state: PlannerState) -> None:
    """Write ``state`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(state.to_file().model_dump_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
