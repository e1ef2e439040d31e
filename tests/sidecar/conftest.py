from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Server, running


@pytest.fixture(scope="session")
def sim() -> Iterator[Server]:
    """One demo simulator shared by the sidecar tests (each test starts its own sidecar)."""
    with running(["sim", "--port", "0", "--profile", "demo", "--seed", "3"]) as server:
        yield server
