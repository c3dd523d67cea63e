"""The sqlite engine's index at rest: encrypted pages, damage, rollback, rotation, memory.

Everything here runs the real engine (SQLite3 Multiple Ciphers through apsw) on
real files under the data directory.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import stat
from pathlib import Path

import pytest
from conftest import Nodes, assert_no_canary, find_canary, run_cli
from test_index_support import address, document, new_model, put_many, seed

from slurpfs.errors import QueryError
from slurpfs.index import SearchService, check_index
from slurpfs.index.engine import INDEX_DIR
from slurpfs.model import ContextStore
from slurpfs.ucxl import Address

NOT_INITIALISED = 7  # the CLI's exit code for a bad configuration


@pytest.fixture
def model(nodes: Nodes) -> ContextStore:
    return new_model(nodes, "sqlite")


def databases(model: ContextStore, role: str = "developer") -> list[Path]:
    """The role's database files (not the -wal/-shm files beside them)."""
    return sorted((model.config.data_dir / INDEX_DIR).glob(f"{role}.*.db"))


def hits(search: SearchService, query: str, role: str = "developer") -> set[str]:
    return {h.address.split("/", 1)[1] for h in search.search(query, [role]).hits}


def many(n: int, word: str = "common") -> list[tuple[Address, str, bytes]]:
    return [
        (address(f"bulk/d{i:04d}"), "developer", document(f"{word} unique{i:04d}x filler text"))
        for i in range(n)
    ]


def test_files_are_private_and_hold_no_plaintext_after_indexing_and_after_a_save(
    model: ContextStore,
) -> None:
    canary = "canary" + secrets.token_hex(8)
    tag = "tagcanary" + secrets.token_hex(4)
    put_many(model, [*many(300), (address("c/x"), "developer", document(canary, tags=[tag]))])
    with SearchService.open(model) as search:
        assert hits(search, canary) == {"c/x"}
        assert hits(search, f"tags:{tag}") == {"c/x"}
        (db,) = databases(model)
        assert Path(f"{db}-wal").exists()  # the log is checked too, not only the file
        scanned = assert_no_canary(model.config.data_dir, canary.encode())
        assert_no_canary(model.config.data_dir, tag.encode())
        # a save: a new version through the indexer's path (catch-up commits and saves)
        edit = "edited" + secrets.token_hex(8)
        model.put(address("c/x"), "developer", document(f"{canary} {edit}", tags=[tag]))
        search.catch_up()
        assert hits(search, edit) == {"c/x"}
        (hit,) = search.search(edit, ["developer"]).hits
        assert edit in hit.snippet.text  # cut from the plaintext fetched at query time
        for secret in (canary, edit, tag):
            assert assert_no_canary(model.config.data_dir, secret.encode()) >= scanned
    folder = model.config.data_dir / INDEX_DIR
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_no_body_is_stored_so_the_index_stays_smaller_than_the_text(model: ContextStore) -> None:
    words = [secrets.token_hex(3) for _ in range(2000)]
    rng = secrets.SystemRandom()
    bodies = [" ".join(rng.choice(words) for _ in range(600)) for _ in range(200)]
    put_many(model, [(address(f"t/d{i}"), "developer", document(b)) for i, b in enumerate(bodies)])
    with SearchService.open(model, catch_up=False):
        pass
    (db,) = databases(model)
    at_rest = sum(p.stat().st_size for p in db.parent.glob(f"{db.name}*"))
    assert at_rest < sum(len(b) for b in bodies)
    # a 16 KiB excerpt per document (the whoosh engine's) would alone exceed that


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _checkpointed(model: ContextStore) -> Path:
    """Open and close the service so that the log is folded into the file; its path."""
    SearchService.open(model).close()
    (db,) = databases(model)
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    return db


@pytest.mark.expect_warnings(
    r"search index of role developer refused, rebuilding it: the search index of role 'developer' fails authentication while opening it \((?:CorruptError: database disk image is malformed|NotADBError: file is not a database)\)"
)
@pytest.mark.parametrize("where", ["first page", "middle", "last page"])
def test_a_flipped_byte_is_refused_and_the_index_rebuilt(
    nodes: Nodes, model: ContextStore, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    seed(model)
    put_many(model, many(400))
    db = _checkpointed(model)
    size = db.stat().st_size
    _flip(db, {"first page": 100, "middle": size // 2, "last page": size - 100}[where])
    caplog.set_level(logging.ERROR, "slurpfs.index")
    with SearchService.open(model) as search:
        assert "developer" in search.statistics().rebuilt
        assert hits(search, '"rotating key"') == {"src/auth.go"}
        assert search.search("common", ["developer"]).total == 400
        assert hits(search, "unique0123x") == {"bulk/d0123"}
    assert any("refused, rebuilding" in r.getMessage() for r in caplog.records)
    assert db not in databases(model)  # the damaged file is gone, a new one in its place
    assert check_index(model) == []


@pytest.mark.expect_warnings(
    r"search index of role developer refused, rebuilding it: the search index of role 'developer' fails authentication while (?:searching|opening) it \(\w+: [^)]*\)"
)
def test_damage_found_by_a_search_rebuilds_the_index_and_answers_right(
    model: ContextStore, caplog: pytest.LogCaptureFixture
) -> None:
    seed(model)
    put_many(model, many(400))
    with SearchService.open(model) as search:
        search.search("common", ["developer"])
        (db,) = databases(model)
        # fold the log into the file, then damage every page after the first few
        search._indexes["developer"]._writer.pragma("wal_checkpoint", "truncate")  # type: ignore[attr-defined]
        data = bytearray(db.read_bytes())
        for offset in range(5 * 4096 + 200, len(data), 4096):
            data[offset] ^= 0x40
        db.write_bytes(bytes(data))
        search._indexes["developer"]._reader.pragma("cache_size", 0)  # type: ignore[attr-defined]
        search._indexes["developer"]._reader.pragma("cache_size", -1024)  # type: ignore[attr-defined]
        caplog.set_level(logging.ERROR, "slurpfs.index")
        result = search.search("common", ["developer"])
        assert result.total == 400
        assert hits(search, "unique0007x") == {"bulk/d0007"}
    assert any("fails authentication" in r.getMessage() for r in caplog.records)
    assert check_index(model) == []


@pytest.mark.expect_warnings(
    r"search index of role developer refused, rebuilding it: the search index of role 'developer' is an older copy \(save \d+, the manifest names save \d+\): refusing it"
)
def test_an_older_copy_put_back_is_refused_and_caught_up(
    model: ContextStore, caplog: pytest.LogCaptureFixture
) -> None:
    seed(model)
    db = _checkpointed(model)
    old = db.read_bytes()
    model.put(address("later"), "developer", document("afterthought"))
    with SearchService.open(model) as search:
        assert hits(search, "afterthought") == {"later"}
        search._indexes["developer"]._writer.pragma("wal_checkpoint", "truncate")  # type: ignore[attr-defined]
    (db,) = databases(model)
    assert db.read_bytes() != old
    db.write_bytes(old)  # the older, validly encrypted copy
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    caplog.set_level(logging.ERROR, "slurpfs.index")
    with SearchService.open(model) as search:
        assert "developer" in search.statistics().rebuilt
        assert hits(search, "afterthought") == {"later"}
        assert hits(search, "rotating") == {"src/auth.go", "docs/readme"}
    assert any("older copy" in r.getMessage() for r in caplog.records)
    assert check_index(model) == []


@pytest.mark.expect_warnings(r"search index of role developer refused, rebuilding it: .*")
def test_a_database_of_another_role_or_build_is_refused(
    model: ContextStore, caplog: pytest.LogCaptureFixture
) -> None:
    seed(model)
    _checkpointed(model)
    (dev,) = databases(model, "developer")
    (arch,) = databases(model, "architect")
    shutil.copyfile(arch, dev)  # the architect's index (it holds the secret) as the developer's
    caplog.set_level(logging.ERROR, "slurpfs.index")
    with SearchService.open(model) as search:
        assert "developer" in search.statistics().rebuilt
        assert search.search("xylophonesecret", ["developer"]).total == 0
        assert hits(search, "rotating") == {"src/auth.go", "docs/readme"}
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_key_rotation_re_keys_the_index_and_searches_keep_working(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    node, model = nodes.new(overrides={"search.engine": "sqlite"})
    seed(model)
    caplog.set_level(logging.INFO, "slurpfs.index")
    with SearchService.open(model) as search:
        assert hits(search, "rotating") == {"src/auth.go", "docs/readme"}
        model.rotate_role("developer")  # generation 2; generation 1 is destroyed
        model.put(address("after"), "developer", document("postrotation words"))
        search.catch_up()
        assert hits(search, "postrotation") == {"after"}
        assert hits(search, "rotating") == {"src/auth.go", "docs/readme"}
    assert any("re-keyed to key generation 2" in r.getMessage() for r in caplog.records)
    model = node.reopen(model)
    with SearchService.open(model) as search:
        assert search.statistics().rebuilt == ()  # opened under the new key, not rebuilt
        assert hits(search, "postrotation") == {"after"}
    assert check_index(model) == []


def test_a_rotation_while_closed_rebuilds_under_the_new_key(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    node, model = nodes.new(overrides={"search.engine": "sqlite"})
    seed(model)
    SearchService.open(model).close()
    model.rotate_role("developer")
    caplog.set_level(logging.ERROR, "slurpfs.index")
    with SearchService.open(model) as search:
        assert "developer" in search.statistics().rebuilt
        assert hits(search, "rotating") == {"src/auth.go", "docs/readme"}
    model = node.reopen(model)
    with SearchService.open(model) as search:
        assert search.statistics().rebuilt == ()
        assert hits(search, "rotating") == {"src/auth.go", "docs/readme"}


def test_switching_engines_rebuilds_quietly(nodes: Nodes) -> None:
    node, model = nodes.new(overrides={"search.engine": "whoosh"})
    seed(model)
    SearchService.open(model).close()
    with SearchService.open(model, engine="sqlite") as search:
        assert set(search.statistics().rebuilt) == {"architect", "developer", "reviewer"}
        assert hits(search, "rotating") == {"src/auth.go", "docs/readme"}
    with SearchService.open(model, engine="sqlite") as search:
        assert search.statistics().rebuilt == ()


def test_a_database_file_removed_is_rebuilt(model: ContextStore) -> None:
    seed(model)
    db = _checkpointed(model)
    db.unlink()
    with SearchService.open(model) as search:
        assert "developer" in search.statistics().rebuilt
        assert hits(search, "rotating") == {"src/auth.go", "docs/readme"}


@pytest.mark.parametrize(
    ("value", "says"),
    [("lots", "expected an integer"), ("0", "must be from"), ("1000", "must be from")],
)
def test_bad_cache_bytes_exits_7_naming_the_key(tmp_path: Path, value: str, says: str) -> None:
    data = tmp_path / "data"
    assert run_cli("init", "--data", data).returncode == 0
    proc = run_cli("status", "--data", data, env={"SLURPFS_SEARCH_CACHE_BYTES": value})
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == NOT_INITIALISED, err
    assert "SLURPFS_SEARCH_CACHE_BYTES" in err
    assert says in err
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[search]\ncache_bytes = {value if value.isdigit() else repr(value)}\n")
    proc = run_cli("status", "--data", data, "--config", bad)
    assert proc.returncode == NOT_INITIALISED
    assert "search.cache_bytes" in proc.stderr.decode(errors="replace")


def test_new_data_directories_use_the_sqlite_engine(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run_cli("init", "--data", data).returncode == 0
    text = (data / "config.toml").read_text()
    assert 'engine = "sqlite"' in text
    assert "cache_bytes = 67108864" in text


def test_the_snippet_comes_from_the_plaintext_and_marks_the_words(model: ContextStore) -> None:
    seed(model)
    with SearchService.open(model) as search:
        (hit,) = search.search("leak", ["developer"]).hits
        assert "keys [leak]" in hit.snippet.marked()
        assert find_canary(hit.snippet.text.encode(), b"leak") is not None


@pytest.mark.parametrize(
    "query",
    [
        "rot?ting", "ro*ing", "rot*", "tags:sec*", "tags:back?nd", "technologies:jw*",
        "agent:ali*", "NOT key", "*", '"key set"~3', "project:bzzz OR banners",
        "key ANDNOT tags:security",
    ],
)  # fmt: skip
def test_wildcards_and_lone_exclusions_find_what_whoosh_finds(nodes: Nodes, query: str) -> None:
    found: dict[str, set[str]] = {}
    for engine in ("sqlite", "whoosh"):
        model = new_model(nodes, engine, name=engine)
        seed(model)
        with SearchService.open(model) as search:
            found[engine] = hits(search, query)
    assert found["sqlite"] == found["whoosh"], query


def test_what_fts5_cannot_express_is_a_query_error(model: ContextStore) -> None:
    seed(model)
    words = [(address(f"w/{i}"), "developer", document(f"r{i:04d}x")) for i in range(300)]
    put_many(model, words)
    with SearchService.open(model) as search:
        for query, says in [
            ("key OR NOT rotating", "needs a word"),
            ("path:[a TO c]", "TermRange queries are not supported"),
            ("r?*x", "more than 256 words"),  # a wildcard expands to 256 words at most
        ]:
            with pytest.raises(QueryError, match=says):
                search.search(query, ["developer"])
        assert search.search("r00?1x", ["developer"]).total == 10
