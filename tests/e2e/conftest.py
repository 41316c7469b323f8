"""Fixtures that start real herds; each test gets its own ports, logs and processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.herd import Herd, running


@pytest.fixture
async def herd(tmp_path: Path) -> AsyncIterator[Herd]:
    """The default herd's five servers and six links, on free ports, all linked."""
    with running(Herd.create(tmp_path)) as started:
        await started.start_all()
        yield started
