"""The v1beta1 wire's pure rules: rounding, routing shares and their deadband, the columns plain and packed."""

from __future__ import annotations

import re

import numpy as np
import orjson
import pytest
from pydantic import TypeAdapter

from tokenscaler.core.codec import encode_array
from tokenscaler.core.pool_limits import (
    Columns,
    LimitColumns,
    PackedColumns,
    pack_columns,
    rounded,
    routing_shares,
    share_vector,
)


def test_rounding_keeps_six_significant_figures_and_zero() -> None:
    a = np.array([0.0, 123456789.0, 0.000123456789, -2.5, 1.0])
    assert rounded(a).tolist() == [0.0, 123457000.0, 0.000123457, -2.5, 1.0]


def test_routing_sends_only_shares_away_from_even_and_floors_at_half_even() -> None:
    observed = np.array([np.nan, 0.25, 0.26, 0.5, 0.01])  # 4 replicas: even is 0.25
    rows = routing_shares(observed, ready_replicas=4)
    # unseen and within 5% of even: even, not sent; 0.01 floors at half an even share
    assert rows == {3: 0.5, 4: 0.125}
    assert share_vector(5, 4, rows).tolist() == pytest.approx([0.25, 0.25, 0.25, 0.5, 0.125])
    assert routing_shares(None, 4) == {}


def _columns(packed: bool, since: int | None, rows: np.ndarray | None, tier, limit, burst):  # type: ignore[no-untyped-def]
    if packed:
        raw = orjson.loads(orjson.dumps(pack_columns(since, rows, tier, limit, burst)))
    else:
        raw = {"since": since, "index": None if rows is None else rows.tolist(), "tier": tier.tolist(),
               "limit": limit.tolist(), "burst": burst.tolist()}  # fmt: skip
    return TypeAdapter(Columns).validate_python(raw)


@pytest.mark.parametrize("rows", [None, np.array([3, 0, 7])])
def test_packed_columns_decode_to_the_same_arrays_as_json_columns(rows: np.ndarray | None) -> None:
    k = 10 if rows is None else rows.size
    rng = np.random.default_rng(1)
    tier = rng.integers(0, 3, k).astype(np.int8)
    limit, burst = rounded(rng.uniform(0, 1e4, (k, 3))), rounded(rng.uniform(0, 1e4, (k, 3)))
    limit[0, 1] = 1e18  # unlimited, as published
    plain, packed = _columns(False, 4, rows, tier, limit, burst), _columns(True, 4, rows, tier, limit, burst)
    assert isinstance(plain, LimitColumns) and isinstance(packed, PackedColumns)
    for a, b in zip(plain.arrays(), packed.arrays(), strict=True):
        assert (a is None and b is None) or (np.array_equal(a, b) and a.dtype == b.dtype)
    assert packed.since == plain.since == 4


def _packed(**change: object) -> dict[str, object]:
    good = pack_columns(None, None, np.array([0, 1], dtype=np.int8), np.ones((2, 3)), np.ones((2, 3)))
    return orjson.loads(orjson.dumps({**good, **change}))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"limit": {"dtype": "<f8", "shape": [2, 3], "b64": "not base64!"}}, "limits.limit: not an encoded array"),
        ({"limit": encode_array(np.ones((2, 2)))}, "limits.limit: shape [2, 2] for 2 rows of 3"),
        ({"burst": encode_array(np.full((2, 3), -1.0))}, "limits.burst: -1.0 (limits are numbers >= 0)"),
        ({"burst": encode_array(np.full((2, 3), np.nan))}, "limits.burst: nan"),
        ({"tier": encode_array(np.array([0, 5], dtype=np.int8))}, "limits.tier: 5 (ranks are 0, 1, 2)"),
        ({"tier": encode_array(np.array([0.0, 1.0]))}, "limits.tier: dtype <f8 (expected integers)"),
        ({"index": encode_array(np.array([0], dtype=np.int32))}, "limits: 1 index entries for 2 rows"),
    ],
)
def test_bad_packed_columns_are_refused_naming_the_column(change: dict[str, object], says: str) -> None:
    cols = TypeAdapter(Columns).validate_python(_packed(**change))
    with pytest.raises(ValueError, match=re.escape(says)):
        cols.arrays()


def test_a_json_row_of_the_wrong_length_is_refused_naming_the_column() -> None:
    raw = {"tier": [1, 1], "limit": [[1, 2, 3], [1, 2]], "burst": [[0, 0, 0]] * 2}
    cols = TypeAdapter(Columns).validate_python(raw)
    with pytest.raises(ValueError, match=re.escape("limits.limit: a row of 2 numbers (rows hold 3)")):
        cols.arrays()
