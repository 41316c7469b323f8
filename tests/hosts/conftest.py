"""The multi-host scenarios need root, ip and nft; without them they skip, saying which
(and fail instead under HERD_REQUIRE_ALL=1, as CI sets)."""

from __future__ import annotations

import pytest

from tests.hosts.lab import require_lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder carries the `hosts` marker (nox -s hosts runs them)."""
    for item in items:
        if "tests/hosts/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.hosts)


@pytest.fixture(autouse=True)
def lab_possible() -> None:
    """Skip (or fail under HERD_REQUIRE_ALL=1) where namespaces cannot be made."""
    require_lab()
