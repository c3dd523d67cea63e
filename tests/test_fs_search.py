"""Ops-level tests of ``.search/``: `Operations` handlers called directly, no kernel.

A search service over a real store (both engines) is attached to the
filesystem as the daemon does once it has opened it; commits are indexed by
calling `catch_up`, as the daemon's indexer would.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as st
import textwrap
from collections.abc import Iterator
from typing import Any

import pyfuse3
import pytest
import trio
from conftest import Nodes
from fsutil import OpsHarness, checked_ops, raises_errno
from test_index_support import ENGINES, address, document, seed

from slurpfs.fs.ops import Operations
from slurpfs.fs.search import ERROR, FACETS, RESULTS, SearchTree
from slurpfs.index import SearchResult, SearchService
from slurpfs.model import ContextStore

DEV_UID = 54321  # a user mapped to `developer` only
SECRETS = ("xylophonesecret", "secrettag", "secrettech", "vault", "hsm", "ceremony")
ROLES_TOML = textwrap.dedent(
    f"""
    [roles.developer]
    readers = ["architect"]
    users = ["{DEV_UID}"]
    [roles.architect]
    readers = []
    [roles.reviewer]
    readers = ["architect"]
    """
)


@pytest.fixture(params=ENGINES)
def model(request: pytest.FixtureRequest, nodes: Nodes) -> ContextStore:
    _node, model = nodes.new(toml=ROLES_TOML, overrides={"search.engine": request.param})
    seed(model)
    return model


@pytest.fixture
def service(model: ContextStore) -> Iterator[SearchService]:
    with SearchService.open(model) as service:
        yield service


@pytest.fixture
def ops(model: ContextStore, service: SearchService) -> Iterator[Operations]:
    with checked_ops(model) as ops:
        ops.search.attach(service)
        yield ops


@pytest.fixture
def dev(fs: OpsHarness) -> OpsHarness:
    """The same filesystem, asked by a user who holds only `developer`."""
    return fs.as_user(uid=DEV_UID, gid=DEV_UID)


async def readlink(fs: OpsHarness, path: str) -> str:
    return os.fsdecode(await fs.ops.readlink(await fs.ino(path), fs.ctx))


async def everything(fs: OpsHarness, query: str) -> str:
    """Every name, link target and file of a query directory, as one text."""
    names = await fs.listdir(f".search/{query}")
    out = list(names)
    for name in names:
        if name.startswith("."):
            out.append((await fs.read(f".search/{query}/{name}")).decode())
        else:
            out.append(await readlink(fs, f".search/{query}/{name}"))
    return "\n".join(out)


def queries(ops: Operations) -> int:
    return ops.search.statistics().queries


# -- layout ----------------------------------------------------------------------------


async def test_search_lists_nothing_and_a_lookup_runs_no_query(fs: OpsHarness) -> None:
    assert await fs.listdir(".search") == []
    attrs = await fs.lookup(".search/rotating key")
    assert st.S_ISDIR(attrs.st_mode)
    assert attrs.st_mode & 0o777 == 0o555
    assert (attrs.entry_timeout, attrs.attr_timeout) == (0, 0)  # the kernel must ask again
    assert queries(fs.ops) == 0
    assert fs.ops.search.statistics().ready == 1


async def test_results_are_links_in_rank_order_with_results_and_facets(fs: OpsHarness) -> None:
    listed = await fs.list_attrs(".search/key")
    names = [os.fsdecode(n) for n, _ in listed]
    assert names[:2] == [FACETS, RESULTS]
    links = names[2:]
    assert links == sorted(links)
    assert len(links) == 3  # the owner holds every role: two developer contexts, one architect
    for name, attrs in listed:
        assert (attrs.entry_timeout, attrs.attr_timeout) == (0, 0)
        if name.startswith(b"."):
            assert st.S_ISREG(attrs.st_mode)
            data = await fs.read(f".search/key/{os.fsdecode(name)}")
            # True sizes, so that cat reads them whole; a listing makes no snippets,
            # so it shows .results empty until a lookup (which the kernel always
            # makes: it keeps no attributes here) asks for its size.
            assert attrs.st_size == (0 if name == RESULTS.encode() else len(data))
            assert (await fs.lookup(f".search/key/{os.fsdecode(name)}")).st_size == len(data)
        else:
            assert st.S_ISLNK(attrs.st_mode)
            target = await readlink(fs, f".search/key/{os.fsdecode(name)}")
            assert attrs.st_size == len(target.encode())
            assert target.startswith("../../ucxl/")
    results = (await fs.read(f".search/key/{RESULTS}")).decode()
    assert results.splitlines()[1] == "# 3 matches, 3 shown"
    assert "ucxl://claude:architect@vault:keys/hsm/ceremony\tarchitect" in results
    facets = (await fs.read(f".search/key/{FACETS}")).decode()
    assert "project\tvault\t1" in facets


async def test_a_link_resolves_to_the_role_file(fs: OpsHarness) -> None:
    first = (await fs.listdir(".search/xylophonesecret"))[2]
    target = await readlink(fs, f".search/xylophonesecret/{first}")
    assert target == "../../ucxl/claude:architect@vault:keys/hsm/ceremony/architect"
    # .search/<query>/../../ is the mount root
    assert b"xylophonesecret" in await fs.read(target.removeprefix("../../"))


async def test_limit_and_role_options(fs: OpsHarness) -> None:
    assert len(await fs.listdir(".search/key@limit=1")) == 3
    one = (await fs.listdir(".search/key@limit=1"))[2]
    assert one.startswith("01-")
    only_arch = await fs.listdir(".search/key@role=architect")
    assert [n for n in only_arch if not n.startswith(".")] == ["01-ceremony-architect"]
    both = await fs.listdir(".search/key@role=developer@limit=100")
    links = [n for n in both if not n.startswith(".")]
    assert {n.rsplit("-", 1)[1] for n in links} == {"developer"}
    assert [n[:4] for n in links] == ["001-", "002-"]  # ranks padded to the limit's width


# -- need to know ------------------------------------------------------------------------


async def test_a_developer_never_sees_an_architect_context(fs: OpsHarness, dev: OpsHarness) -> None:
    for query in ("xylophonesecret", "tags:secrettag", "technologies:secrettech", "ceremony"):
        assert await dev.listdir(f".search/{query}") == [FACETS, RESULTS]
        results = (await dev.read(f".search/{query}/{RESULTS}")).decode()
        assert "# 0 matches, 0 shown" in results
        facets = (await dev.read(f".search/{query}/{FACETS}")).decode()
        assert facets.splitlines()[2:] == []
        # ... while the owner, who holds architect, finds it
        assert "01-" in "".join(await fs.listdir(f".search/{query}"))
    broad = "key OR rotating OR banners"
    shown = await everything(dev, broad)
    for secret in SECRETS:
        assert secret not in shown
    assert "# 3 matches, 3 shown" in shown
    assert "tags\tbackend\t2" in shown
    for secret in SECRETS:
        assert secret in (await everything(fs, broad)).lower()
    # a user holding no role at all sees nothing (and no error)
    nobody = fs.as_user(uid=DEV_UID + 1, gid=DEV_UID + 1)
    assert await nobody.listdir(f".search/{broad}") == [FACETS, RESULTS]
    assert b"# 0 matches" in await nobody.read(f".search/{broad}/{RESULTS}")
    # a name that the owner's result has is not there for the developer
    owner_links = [n for n in await fs.listdir(".search/ceremony") if not n.startswith(".")]
    with raises_errno(errno.ENOENT):
        await dev.lookup(f".search/ceremony/{owner_links[0]}")


async def test_each_role_set_has_its_own_inodes(fs: OpsHarness, dev: OpsHarness) -> None:
    assert await fs.ino(".search/key") != await dev.ino(".search/key")
    owner = await fs.ino(f".search/key/{RESULTS}")
    developer = await dev.ino(f".search/key/{RESULTS}")
    assert owner != developer
    # Whoever holds an inode, its attributes and bytes are computed for the caller.
    dev_size = (await dev.ops.getattr(owner, dev.ctx)).st_size
    assert dev_size == len(await dev.read(f".search/key/{RESULTS}"))
    assert dev_size < (await fs.ops.getattr(owner, fs.ctx)).st_size


async def test_a_role_the_caller_may_not_read_is_an_error(
    dev: OpsHarness, caplog: pytest.LogCaptureFixture
) -> None:
    assert await dev.listdir(".search/key@role=architect") == [ERROR]
    text = (await dev.read(f".search/key@role=architect/{ERROR}")).decode()
    assert "may not read role 'architect'" in text
    assert any(r.levelno == logging.INFO and ".search" in r.getMessage() for r in caplog.records)


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ('"unclosed', "never closed"),
        ("nosuchfield:x", "unknown field 'nosuchfield'"),
        ("AND key", "needs something to search for before it"),
        ("key@limit=0", "the limit must be a number"),
        ("key@colour=red", "unknown option"),
        ("key@role=nobody", "no such role"),
        ("   ", "the query is empty"),
    ],
)
async def test_a_query_that_does_not_parse_gives_only_an_error_file(
    fs: OpsHarness, caplog: pytest.LogCaptureFixture, name: str, says: str
) -> None:
    assert await fs.listdir(f".search/{name}") == [ERROR]
    text = (await fs.read(f".search/{name}/{ERROR}")).decode()
    assert text.startswith("query: ")
    assert says in text
    assert (await fs.lookup(f".search/{name}/{ERROR}")).st_size == len(text.encode())
    with raises_errno(errno.ENOENT):
        await fs.lookup(f".search/{name}/{RESULTS}")
    logged = [r for r in caplog.records if ".search" in r.getMessage()]
    assert logged
    assert all(r.levelno == logging.INFO for r in logged)
    assert fs.ops.search.statistics().invalid >= 1


async def test_a_name_that_is_not_utf8_is_an_error(fs: OpsHarness) -> None:
    search = await fs.ino(".search")
    attrs = await fs.ops.lookup(search, b"\xff\xfe", fs.ctx)
    fs.held[attrs.st_ino] = fs.held.get(attrs.st_ino, 0) + 1
    child = await fs.ops.lookup(attrs.st_ino, ERROR.encode(), fs.ctx)
    fs.held[child.st_ino] = fs.held.get(child.st_ino, 0) + 1
    fi = await fs.ops.open(child.st_ino, os.O_RDONLY, fs.ctx)
    try:
        assert b"not valid UTF-8" in await fs.ops.read(fi.fh, 0, 4096)
    finally:
        await fs.ops.release(fi.fh)


async def test_search_results_are_read_only(fs: OpsHarness) -> None:
    with raises_errno(errno.EROFS):
        await fs.mkdir(".search/new")
    with raises_errno(errno.EROFS):
        await fs.mkdir(".search/key/new")
    query = await fs.ino(".search/key")
    with raises_errno(errno.EROFS):
        await fs.ops.create(query, b"new", 0o644, os.O_WRONLY | os.O_CREAT, fs.ctx)
    with raises_errno(errno.EROFS):
        await fs.unlink(f".search/key/{RESULTS}")
    with raises_errno(errno.EROFS):
        await fs.rename(f".search/key/{RESULTS}", ".search/key/moved")
    with raises_errno(errno.EROFS):
        await fs.ops.symlink(query, b"link", b"target", fs.ctx)
    results = await fs.ino(f".search/key/{RESULTS}")
    with raises_errno(errno.EROFS):
        await fs.ops.open(results, os.O_WRONLY, fs.ctx)
    with raises_errno(errno.EROFS):
        await fs.ops.setattr(
            results, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, fs.ctx
        )
    assert await fs.ops.access(results, os.R_OK, fs.ctx)
    assert not await fs.ops.access(results, os.W_OK, fs.ctx)
    assert not await fs.ops.access(query, os.W_OK, fs.ctx)


# -- freshness and the brief cache ------------------------------------------------------


async def test_repeated_requests_run_the_query_once(fs: OpsHarness) -> None:
    await fs.read(f".search/key/{RESULTS}")
    await fs.listdir(".search/key")
    await fs.lookup(f".search/key/{FACETS}")
    await fs.read(f".search/key/{RESULTS}")
    assert queries(fs.ops) == 1
    assert fs.ops.search.statistics().cached >= 3


async def test_a_listing_makes_no_snippets(
    fs: OpsHarness, service: SearchService, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[bool] = []
    search = service.search

    def spy(*args: Any, **kwargs: Any) -> SearchResult:
        asked.append(kwargs["snippets"])
        return search(*args, **kwargs)

    monkeypatch.setattr(service, "search", spy)
    links = [n for n in await fs.listdir(".search/key") if not n.startswith(".")]
    await readlink(fs, f".search/key/{links[0]}")
    await fs.read(f".search/key/{FACETS}")
    assert asked == [False]  # names, link targets and facets need no snippets
    results = await fs.read(f".search/key/{RESULTS}")
    assert asked == [False, True]
    assert b"[key]" in results.lower()  # with highlighted snippets
    assert (await fs.lookup(f".search/key/{RESULTS}")).st_size == len(results)
    listed = dict(await fs.list_attrs(".search/key"))  # kept with its snippets now
    assert listed[RESULTS.encode()].st_size == len(results)
    assert asked == [False, True]


async def test_concurrent_requests_share_one_run(fs: OpsHarness) -> None:
    query = await fs.ino(".search/rotating")
    sizes: list[int] = []

    async def one() -> None:
        attrs = await fs.ops.lookup(query, RESULTS.encode(), fs.ctx)
        fs.held[attrs.st_ino] = fs.held.get(attrs.st_ino, 0) + 1
        sizes.append(attrs.st_size)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert len(set(sizes)) == 1
    assert queries(fs.ops) == 1


async def test_an_indexed_commit_is_seen_at_once(
    fs: OpsHarness, model: ContextStore, service: SearchService
) -> None:
    assert await fs.listdir(".search/quasarword") == [FACETS, RESULTS]
    target = address("src/new.go")
    model.put(target, "developer", document("quasarword appears", tags=["fresh"]))
    service.catch_up()  # what the indexer does within a second of the commit
    links = [n for n in await fs.listdir(".search/quasarword") if not n.startswith(".")]
    assert links == ["01-new.go-developer"]
    model.put(target, "developer", document("nebulaword replaces it"))
    service.catch_up()
    assert await fs.listdir(".search/quasarword") == [FACETS, RESULTS]
    assert len(await fs.listdir(".search/nebulaword")) == 3


async def test_a_result_is_kept_only_briefly(
    model: ContextStore, service: SearchService, fs: OpsHarness
) -> None:
    now = [0.0]
    fs.ops.search = SearchTree(fs.ops.inodes, owner_uid=0, owner_gid=0, clock=lambda: now[0])
    fs.ops.search.attach(service)
    await fs.listdir(".search/key")
    await fs.listdir(".search/key")
    assert queries(fs.ops) == 1
    now[0] += fs.ops.search.cache_seconds
    await fs.listdir(".search/key")
    assert queries(fs.ops) == 2


# -- readiness -----------------------------------------------------------------------------


async def test_queries_wait_for_the_service_then_say_it_is_not_ready(
    fs: OpsHarness, service: SearchService
) -> None:
    tree = fs.ops.search = SearchTree(fs.ops.inodes, owner_uid=0, owner_gid=0, ready_wait=0.05)
    assert await fs.listdir(".search/key") == [ERROR]
    assert b"still being opened" in await fs.read(f".search/key/{ERROR}")
    assert tree.statistics().not_ready >= 1
    assert tree.statistics().ready == 0

    async def attach_soon() -> None:
        await trio.sleep(0.01)
        tree.attach(service)

    tree.ready_wait = 10.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attach_soon)
        listed = await fs.listdir(".search/key")  # waits for the service, not cached before
    assert listed[:2] == [FACETS, RESULTS]
    assert len(listed) == 5


async def test_a_service_that_failed_to_open_is_explained(fs: OpsHarness) -> None:
    tree = fs.ops.search = SearchTree(fs.ops.inodes, owner_uid=0, owner_gid=0)
    tree.unavailable("search is unavailable on this mount: the index is damaged")
    assert await fs.listdir(".search/key") == [ERROR]
    assert b"the index is damaged" in await fs.read(f".search/key/{ERROR}")


# -- statistics ------------------------------------------------------------------------------


async def test_status_and_metrics_report_search(fs: OpsHarness) -> None:
    await fs.listdir(".search/key")
    status = (await fs.read(".slurp/status")).decode()
    for line in ("search_ready: 1", "search_queries: 1", "index_documents_developer: 3"):
        assert line in status
    assert "index_engine: " in status
    metrics = (await fs.read(".slurp/metrics")).decode()
    assert "slurpfs_search_queries_total 1.0" in metrics
    assert "slurpfs_index_documents_architect 4.0" in metrics
