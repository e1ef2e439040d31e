from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kube.apiserver import ApiServer


@pytest.fixture
def apiserver() -> Iterator[ApiServer]:
    server = ApiServer().start()
    try:
        yield server
    finally:
        server.close()
