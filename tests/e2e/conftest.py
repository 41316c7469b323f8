"""Fixtures that start real herds; each test gets its own ports, logs and processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.herd import Herd, require_program, running


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker (the run uses --strict-markers)."""
    config.addinivalue_line(
        "markers",
        "requires_program(*names): skip, naming the Debian package, unless every program"
        " is installed; fail instead under HERD_REQUIRE_ALL=1 (CI)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Check `requires_program` before any fixture starts a herd for nothing."""
    for marker in item.iter_markers("requires_program"):
        require_program(*marker.args)


@pytest.fixture
async def herd(tmp_path: Path) -> AsyncIterator[Herd]:
    """The default herd's five servers and six links, on free ports, all linked."""
    with running(Herd.create(tmp_path)) as started:
        await started.start_all()
        yield started


@pytest.fixture(scope="session", autouse=True)
def places_index() -> None:
    """Build the offline gazetteer's cache once, before any herd starts.

    A server builds it itself on its first start on a machine (a few seconds, one
    build even for a whole herd), but that first start's WHATSAT may then wait for it;
    the tests that assert WHATSAT answers should not depend on which test ran first.
    """
    subprocess.run(
        [sys.executable, "-m", "herd_trio.places.build"],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )
