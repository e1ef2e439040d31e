"""The state file is a typed document: it loads exactly, or it is refused naming the key and the file.

A mistyped or unknown key, a debt entry for an entitlement the file does not list, an array
that does not decode, a missing key or another version: each is a StateFileError that says
what and where, never debt silently read as zero.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.control.persist import StateFileError, load_state, save_state
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState, snapshot_plan


def saved_state(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    ents = [make_entitlement("g", "guaranteed", guaranteed=vec(400, 1000, 4)), make_entitlement("a"),
            make_entitlement("b", weight=2)]  # fmt: skip
    rows = build_pool_rows(config([make_pool()], ents))
    demand = np.array([[300.0, 900, 3], [2000, 5000, 20], [2000, 5000, 20]])
    usage = np.array([[300.0, 900, 3], [100, 200, 1], [2000, 5000, 20]])
    plan, state = plan_interval(rows, {"p": PoolInput(2, demand, usage)}, PlannerState(), 0.0, 5.0)
    state.last_plan, state.plan_version = snapshot_plan(plan), 3
    path = tmp_path / "state.json"
    save_state(path, state)
    return path, json.loads(path.read_text())


def test_a_saved_state_loads_exactly(tmp_path: Path) -> None:
    path, doc = saved_state(tmp_path)
    restored = load_state(path)
    assert restored.to_json() == doc
    assert restored.pools["p"].debt_of("a") > 0 > restored.pools["p"].debt_of("b")


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _rename(doc: dict[str, Any], path: tuple[str, ...], new: str) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[new] = doc.pop(path[-1])


CASES: list[Any] = [
    pytest.param(lambda d: _rename(d, ("pools", "p", "debt"), "debtt"), ["pools.p.debtt", "pools.p.debt"],
                 id="mistyped-key"),
    pytest.param(lambda d: _set(d, ("pools", "p", "debt", "ghost"), 12.0), ["ghost"],
                 id="debt-for-an-unlisted-entitlement"),
    pytest.param(lambda d: _set(d, ("plan_versionn",), 1), ["plan_versionn"], id="unknown-top-level-key"),
    pytest.param(lambda d: d["pools"]["p"].pop("scale_history"), ["pools.p.scale_history"], id="missing-key"),
    pytest.param(lambda d: _set(d, ("pools", "p", "debt", "a"), "lots"), ["pools.p.debt.a", "lots"],
                 id="debt-not-a-number"),
    pytest.param(lambda d: _set(d, ("pools", "p", "last_allocation", "b64"), "!!"), ["pools.p.last_allocation"],
                 id="array-that-does-not-decode"),
    pytest.param(lambda d: _set(d, ("version",), 2), ["state version 2"], id="another-version"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "named"), CASES)
def test_a_bad_state_file_is_refused_naming_the_key_and_the_file(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], named: list[str]
) -> None:
    path, doc = saved_state(tmp_path)
    bad = copy.deepcopy(doc)
    mutate(bad)
    path.write_text(json.dumps(bad))
    with pytest.raises(StateFileError) as refused:
        load_state(path)
    message = str(refused.value)
    assert str(path) in message
    for word in named:
        assert word in message, message
