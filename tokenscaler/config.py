"""Documents on disk: config, usage and other YAML/JSON files, read and validated.

The core validates decoded documents (:func:`tokenscaler.core.model.parse_config`) but
never reads a file; this module is where a path becomes a document. Every failure is a
:class:`~tokenscaler.core.validation.ConfigError` naming the file and why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from tokenscaler.core.model import TokenPoolsConfig, parse_config
from tokenscaler.core.usage import UsageDocument, parse_usage
from tokenscaler.core.validation import ConfigError, validate_document

M = TypeVar("M", bound=BaseModel)

FileStamp = tuple[int, int, int]


def file_stamp(path: str | Path) -> FileStamp | None:
    """``(mtime_ns, size, inode)`` of ``path``, None if it cannot be stat'ed: a file re-read
    when it changes compares these (an atomic rename brings a new inode, an in-place write
    a new mtime or size)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_document(path: str | Path, *, fmt: str = "yaml") -> Any:
    """Read and decode a YAML (or JSON) file; :class:`ConfigError` names the file and why."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {e.start})"]) from e
    try:
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(str(path), [f"not valid {fmt.upper()}: {e}"]) from e


def load_model(model: type[M], path: str | Path, what: str) -> M:
    """Read ``path`` (YAML or JSON) and validate it as ``model``."""
    return validate_document(model, read_document(path), str(path), what)


def load_config(path: str | Path) -> TokenPoolsConfig:
    """Read and validate a YAML or JSON token-pools config file."""
    return parse_config(read_document(path), str(path))


def load_usage(path: str | Path) -> UsageDocument:
    """Read and validate a usage document (JSON) for ``tokenscaler plan``."""
    return parse_usage(read_document(path, fmt="json"), str(path))
