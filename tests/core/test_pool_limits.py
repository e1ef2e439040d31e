"""The v1beta1 wire's pure rules: rounding, routing shares and their deadband, the sidecar's view."""

from __future__ import annotations

import numpy as np
import pytest

from tokenscaler.core.pool_limits import rounded, routing_shares, share_vector


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
