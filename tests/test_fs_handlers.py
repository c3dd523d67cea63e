"""Every FUSE handler goes through the error mapping (`slurpfs.fs.errmap.handler`).

pyfuse3 answers only `FUSEError`; anything else leaving a handler ends the FUSE
loop and the mount. Ops-level, over a real store.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import logging
from pathlib import Path

import pyfuse3
import pytest
from fsutil import OpsHarness, ctx, make_ops, raises_errno

from slurpfs.fs.ops import Operations
from slurpfs.model import ContextStore

HANDLERS = sorted(
    name
    for name, member in inspect.getmembers(pyfuse3.Operations, inspect.iscoroutinefunction)
    if not name.startswith("_") and name in Operations.__dict__
)


def test_every_handler_is_wrapped() -> None:
    assert {"statfs", "access", "forget", "release", "releasedir", "lookup"} <= set(HANDLERS)
    bare = [name for name in HANDLERS if not hasattr(Operations.__dict__[name], "__wrapped__")]
    assert not bare, f"handlers without @handler: {bare}"


@pytest.mark.expect_warnings("internal error; the request fails with EIO")
async def test_a_bug_in_releasedir_fails_the_request_not_the_mount(
    ops: Operations, fs: OpsHarness, caplog: pytest.LogCaptureFixture
) -> None:
    # A directory handle the table does not know (released twice): a KeyError in
    # the layer below, which used to leave the handler and end the FUSE loop.
    fh = await ops.opendir(pyfuse3.ROOT_INODE, ctx())
    await ops.releasedir(fh)
    with raises_errno(errno.EIO):
        await ops.releasedir(fh)
    assert any("internal error" in r.getMessage() for r in caplog.records)
    assert sorted(await fs.listdir("")) == [".search", ".slurp", "ucxl"]  # still serving


@pytest.mark.expect_warnings(r"request failed: \[Errno 2\] No such file or directory: '\S+/gone'")
async def test_statfs_of_a_vanished_data_directory_is_its_errno(
    model: ContextStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = dataclasses.replace(model.config.node, data_dir=str(tmp_path / "gone"))
    config = dataclasses.replace(model.config, node=node)
    ops = make_ops(model, config)
    with raises_errno(errno.ENOENT):
        await ops.statfs(ctx())
    assert any(r.levelno == logging.ERROR for r in caplog.records)
