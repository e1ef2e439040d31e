"""What changed between two configs: one :class:`ConfigChange` per pool or entitlement field.

:func:`config_changes` compares two validated :class:`~tokenscaler.core.model.TokenPoolsConfig`
and returns, in a fixed order, every pool and entitlement added or removed and every field
that differs, by its dotted path in the config file (``guaranteed.throughput_tokens_per_s``,
``tier``, ``replica.kv_tokens``). The controller logs one line per change and bumps its
config generation when there is at least one (:meth:`tokenscaler.control.loop.Controller.set_config`).

API keys are never shown, not even as digests: a change of ``api_keys`` reads
``2 keys -> 3 keys`` with how many were added and revoked.

:func:`fresh_starts` is the carry-over rule's pure half: an entitlement that moves to
another pool or tier starts clean (no debt, no smoothed demand), every other one keeps
what it carried. Entitlements are identified by name (names are unique in a config).

Order: pools, then entitlements; within each, the new config's order (added or changed),
then those removed, in the old config's order; fields in the model's declaration order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from tokenscaler.core.model import Entitlement, TokenPoolsConfig

ChangeKind = Literal["added", "removed", "changed"]
ChangeObject = Literal["pool", "entitlement"]

API_KEYS = "api_keys"


@dataclass(frozen=True)
class ConfigChange:
    """One change: an object ``added`` or ``removed``, or one of its fields ``changed``.

    ``field`` is the dotted path of the field (None for an added or removed object);
    ``old``/``new`` its values as JSON values (for ``api_keys``: counts such as ``"2 keys"``,
    with ``keys_added``/``keys_revoked``; never a key or a digest). ``pool`` is the pool of
    the entitlement (its new one when it moved) or the pool itself."""

    kind: ChangeKind
    object: ChangeObject
    pool: str
    name: str
    field: str | None = None
    old: Any = None
    new: Any = None
    keys_added: int = 0
    keys_revoked: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "object": self.object, "pool": self.pool, "name": self.name}
        if self.field is not None:
            out.update(field=self.field, old=self.old, new=self.new)
        elif self.kind == "added":
            out["new"] = self.new
        else:
            out["old"] = self.old
        if self.field == API_KEYS:
            out.update(keys_added=self.keys_added, keys_revoked=self.keys_revoked)
        return out

    def __str__(self) -> str:
        where = f"entitlement {self.name} (pool {self.pool})" if self.object == "entitlement" else f"pool {self.name}"
        if self.kind != "changed":
            summary = self.new if self.kind == "added" else self.old
            return f"{where} {self.kind}" + (f" ({_summary_text(summary)})" if summary else "")
        text = f"{where} {self.field} {_shown(self.old)} -> {_shown(self.new)}"
        if self.field == API_KEYS:
            text += f" ({self.keys_added} added, {self.keys_revoked} revoked)"
        return text


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, Mapping | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _summary_text(summary: Mapping[str, Any]) -> str:
    return ", ".join(_keys(v) if k == API_KEYS else f"{k} {_shown(v)}" for k, v in summary.items())


def _keys(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"


def _entitlement_summary(e: Entitlement) -> dict[str, Any]:
    """What a log line says of an entitlement added or removed (its keys as a count)."""
    return {"tier": e.tier.value, "priority": e.priority, API_KEYS: len(e.api_keys)}


def _fields(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, old, new) of every leaf that differs between two dumped models. A
    sub-object that appears or disappears (``pricing: null`` to a price) is one change at
    its own path."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in (*a, *(k for k in b if k not in a)):
            yield from _fields(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    elif a != b:
        yield path, a, b


def _dump(model: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude=exclude)


def _entitlement_changes(old: Entitlement, new: Entitlement) -> Iterator[ConfigChange]:
    for field, a, b in _fields(_dump(old, {API_KEYS}), _dump(new, {API_KEYS})):
        yield ConfigChange("changed", "entitlement", new.pool, new.name, field, a, b)
    before, after = set(old.api_keys), set(new.api_keys)
    if before != after:
        yield ConfigChange(
            "changed", "entitlement", new.pool, new.name, API_KEYS, _keys(len(before)), _keys(len(after)),
            keys_added=len(after - before), keys_revoked=len(before - after),
        )  # fmt: skip


def config_changes(old: TokenPoolsConfig, new: TokenPoolsConfig) -> list[ConfigChange]:
    """Every difference from ``old`` to ``new``, in the order of the module docstring; empty
    when the two configs are equal."""
    changes: list[ConfigChange] = []
    old_pools = {p.name: p for p in old.pools}
    new_pools = {p.name: p for p in new.pools}
    for name, p in new_pools.items():
        before = old_pools.get(name)
        if before is None:
            changes.append(ConfigChange("added", "pool", name, name))
            continue
        for field, a, b in _fields(_dump(before), _dump(p)):
            changes.append(ConfigChange("changed", "pool", name, name, field, a, b))
    changes.extend(ConfigChange("removed", "pool", name, name) for name in old_pools if name not in new_pools)

    old_ents = {e.name: e for e in old.entitlements}
    new_ents = {e.name: e for e in new.entitlements}
    for name, e in new_ents.items():
        before_e = old_ents.get(name)
        if before_e is None:
            changes.append(ConfigChange("added", "entitlement", e.pool, name, new=_entitlement_summary(e)))
        else:
            changes.extend(_entitlement_changes(before_e, e))
    changes.extend(
        ConfigChange("removed", "entitlement", e.pool, name, old=_entitlement_summary(e))
        for name, e in old_ents.items()
        if name not in new_ents
    )
    return changes


def fresh_starts(changes: Sequence[ConfigChange]) -> dict[str, str]:
    """Entitlements that start clean (debt and smoothed demand dropped) -> why, in the words
    of the log: ``moved tier elastic -> guaranteed``, ``moved pool p -> q``, or both. Every
    entitlement not named here (and not removed) carries its state over."""
    moves: dict[str, list[str]] = {}
    for c in changes:
        if c.object == "entitlement" and c.kind == "changed" and c.field in ("pool", "tier"):
            moves.setdefault(c.name, []).append(f"{c.field} {_shown(c.old)} -> {_shown(c.new)}")
    return {name: "moved " + " and ".join(parts) for name, parts in moves.items()}
