"""Fixtures built on fsutil (a pytest plugin, loaded by conftest, so that fsutil
can import conftest without a cycle).

`ops` is an `Operations` over the `model` fixture (no file may be left open, no
thread left running) and `fs` an `OpsHarness` over it (no node may be left
behind). A test module that needs more (an attached search service) overrides
`ops`. `mounts_checked` (every test) fails a passing test that started a daemon
without checking its end (`Mounted.check_ended`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from conftest import FAILED
from fsutil import OpsHarness, Running, checked_harness, checked_ops

from slurpfs.fs.ops import Operations
from slurpfs.model import ContextStore


@pytest.fixture
def ops(model: ContextStore) -> Iterator[Operations]:
    with checked_ops(model) as ops:
        yield ops


@pytest.fixture
async def fs(ops: Operations) -> AsyncIterator[OpsHarness]:
    async with checked_harness(ops) as harness:
        yield harness


@pytest.fixture(autouse=True)
def mounts_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    Running.test = request.node
    yield
    unchecked = [str(m.mnt) for m in Running.unchecked]
    Running.test = None
    Running.unchecked.clear()
    if not request.node.stash.get(FAILED, False):
        assert not unchecked, (
            f"mounted at {', '.join(unchecked)} without checking the daemon's end:"
            " unmount with Mounted.unmount, or call Mounted.check_ended"
        )
