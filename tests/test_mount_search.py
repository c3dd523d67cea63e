"""``.search/`` through real mounts, with both engines (``SLURPFS_SEARCH_ENGINE``).

Driven only with os.* and real tools (ls, cat, find, grep, vim); every mount is
unmounted with ``slurpfs umount``, which must find the daemon exited 0 with no
warning in its log, and the data directory is fsck-checked afterwards.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Nodes, assert_no_canary
from fsutil import (
    AUTH,
    BACKUP_EVERYWHERE,
    Mounted,
    developer_only,
    mounted_at,
    run_as,
    slurpfs,
    wait_for,
)
from test_index_support import ENGINES, document

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine"),
]

DEV = "developer"
ARCH = "architect"
VAULT = "claude:architect@vault:keys"
SECRET_WORDS = ("xylophonesecret", "secrettag", "secrettech", "vault", "ceremony", "hsm")
INDEXED = 5.0  # seconds to wait for a save to become searchable (the goal is one)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mnt(nodes: Nodes, tmp_path: Path, engine: str) -> Iterator[Mounted]:
    m = mounted_at(nodes, tmp_path, env={"SLURPFS_SEARCH_ENGINE": engine})
    try:
        yield m
        m.unmount()
    finally:
        m.sweep()


def save(m: Mounted, authority: str, path: str, role: str, data: bytes) -> Path:
    d = m.ucxl / authority / path
    d.mkdir(parents=True, exist_ok=True)
    (d / role).write_bytes(data)
    return d / role


def links(query_dir: Path) -> list[str]:
    """The result links of a query directory, in rank order."""
    return sorted(n for n in os.listdir(query_dir) if not n.startswith("."))


def read_status(m: Mounted) -> dict[str, str]:
    lines = (m.mnt / ".slurp" / "status").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def fresh_status(m: Mounted) -> dict[str, str]:
    """``.slurp/status`` rendered after this call began.

    A rendering is kept for up to a second (so that size and content agree);
    one whose uptime is more than a second past the first one read was made
    after it.
    """
    first = float(read_status(m)["uptime_seconds"])
    out: dict[str, str] = {}

    def rendered_later() -> bool:
        out.update(read_status(m))
        return float(out["uptime_seconds"]) > first + 1.0

    wait_for(rendered_later, timeout=10, what="a fresh .slurp/status")
    return out


def searchable(m: Mounted, query: str, n: int = 1) -> None:
    """Wait until `query` has `n` hits (a save is indexed in the background)."""
    wait_for(
        lambda: len(links(m.mnt / ".search" / query)) == n,
        timeout=INDEXED,
        what=f"{n} hits for {query!r}",
    )


# -- the directory ---------------------------------------------------------------------


def test_search_lists_nothing_and_tree_walks_never_query(mnt: Mounted, engine: str) -> None:
    save(mnt, AUTH, "src/auth.go", DEV, document("the zebraword is here"))
    searchable(mnt, "zebraword")
    assert os.listdir(mnt.mnt / ".search") == []
    before = fresh_status(mnt)
    assert before["index_engine"] == engine
    assert before["search_ready"] == "1"
    walked = subprocess.run(
        ["find", str(mnt.mnt)], check=True, capture_output=True, text=True
    ).stdout
    assert "/.search/" not in walked
    grepped = subprocess.run(
        ["grep", "-rl", "zebraword", str(mnt.mnt)], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert grepped == [str(mnt.ucxl / AUTH / "src/auth.go" / DEV)]
    subprocess.run(["ls", "-laR", str(mnt.mnt)], check=True, capture_output=True)
    after = fresh_status(mnt)
    assert after["search_queries"] == before["search_queries"]
    # ... while one query counts (the counter is live)
    assert len(links(mnt.mnt / ".search" / "zebraword")) == 1
    assert int(fresh_status(mnt)["search_queries"]) == int(before["search_queries"]) + 1


def test_results_are_symlinks_that_resolve(mnt: Mounted) -> None:
    auth = save(
        mnt,
        AUTH,
        "src/auth.go",
        DEV,
        document(
            "Tokens are validated against the rotating key set.",
            summary="JWT validation",
            tags=["security", "backend"],
            technologies=["go", "jwt"],
        ),
    )
    save(
        mnt, AUTH, "src/session.go", DEV, document("Sessions share the key set.", tags=["backend"])
    )
    searchable(mnt, "key", 2)
    q = mnt.mnt / ".search" / "rotating key"
    names = os.listdir(q)
    assert sorted(n for n in names if n.startswith(".")) == [".facets", ".results"]
    (first,) = links(q)
    assert first == "01-auth.go-developer"
    assert os.readlink(q / first) == f"../../ucxl/{AUTH}/src/auth.go/{DEV}"
    cat = subprocess.run(["cat", str(q / first)], check=True, capture_output=True).stdout
    assert cat == auth.read_bytes()
    results = (q / ".results").read_bytes()
    assert os.stat(q / ".results").st_size == len(results)
    assert f"ucxl://{AUTH}/src/auth.go\t{DEV}".encode() in results
    assert b"[rotating] [key]" in results  # the highlighted snippet
    facets = (q / ".facets").read_text()
    assert "technologies\tjwt\t1" in facets
    (best,) = links(mnt.mnt / ".search" / "key@limit=1")
    assert best.startswith("01-")
    assert len(links(mnt.mnt / ".search" / "tags:backend")) == 2


def test_a_bad_query_gives_an_error_file_and_an_info_line(mnt: Mounted) -> None:
    q = mnt.mnt / ".search" / '"rotating key'
    assert os.listdir(q) == [".error"]
    error = (q / ".error").read_text()
    assert "never closed" in error
    listed = subprocess.run(["ls", "-a", str(q)], check=True, capture_output=True, text=True)
    assert listed.stdout.split() == [".error"]
    log = mnt.log.read_text()
    assert " INFO slurpfs.fs: .search: query refused for uid 0 (QueryError)" in log
    # The log says that a query was refused, never what was asked.
    assert "rotating" not in log
    # (unmount fails the test on any WARNING in the log)


# -- freshness ---------------------------------------------------------------------------


def test_vim_edits_are_reflected(mnt: Mounted) -> None:
    f = save(mnt, AUTH, "src/auth.go", DEV, document("before the alphaword edit\n"))
    searchable(mnt, "alphaword")
    subprocess.run(
        ["vim", "-es", "-N", "-c", BACKUP_EVERYWHERE, "-c", "%s/alphaword/betaword/", "-c", "wq",
         str(f)],
        check=True,
        timeout=60,
    )  # fmt: skip
    assert b"betaword" in f.read_bytes()
    searchable(mnt, "betaword")
    searchable(mnt, "alphaword", 0)
    assert b"# 0 matches" in (mnt.mnt / ".search" / "alphaword" / ".results").read_bytes()
    f.unlink()  # a deletion disappears as well
    searchable(mnt, "betaword", 0)


def test_cli_writes_are_searchable_through_the_mount(mnt: Mounted) -> None:
    address = f"ucxl://{AUTH}/src/cli.go"
    slurpfs("put", "--data", mnt.data, address, "--role", DEV, input=b"the omegaword", env=mnt.env)
    searchable(mnt, "omegaword")


# -- secrets ------------------------------------------------------------------------------


def test_a_canary_is_searchable_and_nowhere_at_rest(mnt: Mounted, tmp_path: Path) -> None:
    canary = "canary" + secrets.token_hex(12)
    save(mnt, AUTH, "src/canary.go", DEV, document(f"the secret is {canary} today"))
    searchable(mnt, canary)
    assert canary.encode() in (mnt.mnt / ".search" / canary / ".results").read_bytes()
    mnt.unmount()
    scanned = assert_no_canary(mnt.data, canary.encode())
    assert scanned > 0
    assert_no_canary(tmp_path, canary.encode())
    mnt.mount()  # searchable again after a restart
    searchable(mnt, canary)


def test_need_to_know_through_the_mount(
    nodes: Nodes, engine: str, test_user: str, reachable_dir: Path
) -> None:
    m = mounted_at(
        nodes,
        reachable_dir,
        toml=developer_only(test_user),
        extra=("--allow-other",),
        env={"SLURPFS_SEARCH_ENGINE": engine},
    )
    try:
        mine = save(
            m,
            AUTH,
            "src/auth.go",
            DEV,
            document("the sharedword for developers", tags=["backend"], technologies=["go"]),
        )
        save(
            m,
            VAULT,
            "hsm/ceremony",
            ARCH,
            document(
                "the sharedword and the xylophonesecret master key",
                tags=["secrettag"],
                technologies=["secrettech"],
            ),
        )
        searchable(m, "sharedword", 2)  # root, the mounting user, holds every role
        search = m.mnt / ".search"

        def seen_by_developer(query: str) -> str:
            """Everything the developer can see of a query: names, targets, files."""
            q = search / query
            listing = run_as(test_user, "ls", "-la", q)
            assert listing.returncode == 0, listing.stderr
            files = run_as(test_user, "sh", "-c", f"cat '{q}'/.[!.]*")
            return listing.stdout.decode() + files.stdout.decode()

        for query in ("xylophonesecret", "tags:secrettag", "technologies:secrettech", "ceremony"):
            shown = seen_by_developer(query)
            assert "# 0 matches, 0 shown" in shown
            assert "->" not in shown  # no links
            assert "\t" not in shown  # no result lines, no facet counts
            assert len(links(search / query)) == 1  # root finds it
        shared = seen_by_developer("sharedword")
        for word in SECRET_WORDS:
            assert word not in shared
        assert "# 1 match, 1 shown" in shared
        assert "tags\tbackend\t1" in shared
        assert "project\tbzzz\t1" in shared
        (link,) = run_as(test_user, "ls", search / "sharedword").stdout.decode().split()
        followed = run_as(test_user, "cat", search / "sharedword" / link)
        assert followed.stdout == mine.read_bytes()
        denied = run_as(test_user, "ls", "-a", search / "sharedword@role=architect")
        assert denied.stdout.decode().split() == [".error"]
        said = run_as(test_user, "cat", search / "sharedword@role=architect" / ".error")
        assert b"may not read role 'architect'" in said.stdout
        # root sees both, in every form
        root_view = (search / "sharedword" / ".results").read_text()
        assert "# 2 matches, 2 shown" in root_view
        assert "xylophonesecret" in root_view
        assert "tags\tsecrettag\t1" in (search / "sharedword" / ".facets").read_text()
        m.unmount()
    finally:
        m.sweep()
