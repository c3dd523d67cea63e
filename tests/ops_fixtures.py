"""Fixtures of the tests that drive `Operations` without a kernel (a pytest plugin,
loaded by conftest, so that fsutil can import conftest without a cycle).

`ops` is an `Operations` over the `model` fixture (no file may be left open) and
`fs` an `OpsHarness` over it (no node may be left behind). A test module that
needs more (an attached search service) overrides `ops`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from fsutil import OpsHarness, checked_harness, checked_ops

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
