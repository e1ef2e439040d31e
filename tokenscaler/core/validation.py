"""Validation errors that name the field and the value: pydantic's errors as one line each.

:func:`validate_document` validates a decoded document (YAML or JSON, a mapping) as a model
and raises :class:`ConfigError` with one line per problem; :func:`format_validation_error`
renders a pydantic :class:`~pydantic.ValidationError` that way: the field's path with list
items named by their ``name`` (``entitlements[team-a].limit``), the offending value, and for
an unknown field close to a known one, which one was probably meant. Every document the
package reads (config, usage, state, scenarios, CRs) reports its errors through here.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError


class ConfigError(Exception):
    """A config that failed validation; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(errors))
        self.source = source
        self.errors = errors

    def lines(self) -> list[str]:
        """The problems as ``tokenscaler validate`` prints them: one line each, naming the source."""
        return [f"{self.source}: {line}" for line in self.errors]


def _loc_to_path(loc: Sequence[int | str], data: Any) -> str:
    """Render a pydantic error location with list items named: ``entitlements[team-a].limit``."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and 0 <= item < len(node):
                node = node[item]
                if isinstance(node, Mapping) and isinstance(node.get("name"), str):
                    name = node["name"]
            else:
                node = None
            label = name if name is not None else str(item)
            if parts:
                parts[-1] += f"[{label}]"
            else:
                parts.append(f"[{label}]")
        else:
            node = node.get(item) if isinstance(node, Mapping) else None
            parts.append(str(item))
    return ".".join(parts)


def _join_path(path: str, message: str) -> str:
    """Prefix ``message`` (which starts with a field name) with the path of its object."""
    if not path or message.startswith(("pools[", "entitlements[")):
        return message
    head, _, last = path.rpartition(".")
    field = last.split("[", 1)[0]
    if message.startswith((f"{field}.", f"{field}[", f"{field} ")):
        # a field validator: the location already ends with the field the message names
        return f"{head}.{message}" if head else message
    return f"{path}.{message}"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _fields_at(model: type[BaseModel] | None, loc: Sequence[int | str]) -> list[str]:
    """The field names of the object holding the last item of ``loc`` (walked from ``model``)."""
    node = model
    for item in loc[:-1]:
        if node is None:
            return []
        if isinstance(item, int):
            continue
        info = node.model_fields.get(str(item))
        node = _model_of(info.annotation) if info is not None else None
    return list(node.model_fields) if node is not None else []


def _did_you_mean(model: type[BaseModel] | None, loc: Sequence[int | str]) -> str:
    if not loc or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], _fields_at(model, loc), n=1, cutoff=0.75)
    return f"; did you mean `{close[0]}`?" if close else ""


# fields whose values are never echoed in an error: a plain key pasted where a digest belongs
_SECRET_FIELDS = frozenset({"api_keys"})


def format_validation_error(err: ValidationError, data: Any, model: type[BaseModel] | None = None) -> list[str]:
    """One line per pydantic error, naming the field path and the offending value (never the
    value of an ``api_keys`` field: it may be a plain key) and, for an unknown field close to
    a known one of ``model``'s, which one was probably meant."""
    lines = []
    for e in err.errors(include_url=False):
        path = _loc_to_path(e["loc"], data)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg += _did_you_mean(model, e["loc"])
        if e["type"] in ("value_error", "assertion_error"):
            # our own messages already name the field (relative to the object) and the values
            for part in msg.split("; "):
                lines.append(_join_path(path, part))
            continue
        value = e.get("input")
        hidden = e["type"] == "missing" or isinstance(value, Mapping | list) or _SECRET_FIELDS.intersection(e["loc"])
        shown = "" if hidden else f" (got {value!r})"
        lines.append(f"{path}: {msg}{shown}")
    return lines


M = TypeVar("M", bound=BaseModel)


def validate_document(model: type[M], data: Any, source: str, what: str) -> M:
    """Validate a decoded document as ``model``; :class:`ConfigError` names each field and value."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, [f"the document must be a mapping with {what}, got {type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e, data, model)) from e
