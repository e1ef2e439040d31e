"""Planner state on disk: written atomically (temp file, fsync, rename), restored at start.

A crash mid-write leaves the previous file intact, so a restart never loses debt. A state
file that cannot be read, or whose keys do not match :class:`~tokenscaler.core.state.StateFile`
exactly, is an error that names the file and the key; the caller decides whether to start
fresh (it never silently does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

from tokenscaler.core.state import PlannerState
from tokenscaler.core.validation import ConfigError


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


class StateBackend(Protocol):
    """Where the planner state lives between runs (and between leaders): a file on one
    machine, a ConfigMap in Kubernetes (:class:`tokenscaler.kube.operator.KubeStateBackend`)."""

    name: str  # for log lines: the file, the ConfigMap

    async def load(self) -> PlannerState | None:
        """The saved state, None when there is none yet. Raises :class:`StateFileError`
        when what is stored cannot be used (the caller refuses rather than drop debt)."""
        ...

    async def save(self, state: PlannerState) -> None:
        """Store ``state``; an :class:`OSError` when it could not be (retried next interval)."""
        ...


class FileStateBackend:
    """The state file (``--state``), written atomically in a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)

    async def load(self) -> PlannerState | None:
        if not self.path.exists():
            return None
        return await asyncio.to_thread(load_state, self.path)

    async def save(self, state: PlannerState) -> None:
        await asyncio.to_thread(save_state, self.path, state)
