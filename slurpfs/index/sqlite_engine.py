"""The sqlite engine: one SQLite FTS5 database per role, encrypted page by page.

Each role's index is one database file under the data directory
(``index/<role>.<token>.db``, 0600, in a 0700 directory), opened through SQLite3
Multiple Ciphers (the ``apsw-sqlite3mc`` package): every page, in the file and
in its write-ahead log, is encrypted and authenticated with ChaCha20-Poly1305
under the role's index key at the key generation the manifest names
(`slurpfs.index.sealed.index_key`, given raw: no passphrase derivation). A page
that fails authentication is an `apsw.CorruptError`, a wrong key an
`apsw.NotADBError`: both become `IndexCorrupt`, and the search service rebuilds
the index from the store rather than serve it.

What is kept (layout in docs/FORMAT.md, "Search index at rest"):

* ``fts``: a *contentless* FTS5 table (``content=''``, ``contentless_delete=1``,
  full positions): postings of the text fields and of keyword and address
  values (`slurpfs.index.sqlite_query`), never the text itself;
* ``docs``: the stored fields of a hit (address, file role, version, HLC,
  summary, authority parts); ``keywords``: tags, technologies and the project,
  for facet counts;
* ``meta``: schema version, role, the file's random token, the save counter
  and the change sequence the index reflects.

No body and no excerpt is stored: snippets are cut at query time from the
version's plaintext, fetched through the `TextLoader` the service gives.

Rollback: the role's manifest in the store (`SealedIndexStore`, sealed and bound
to role, node and key generation) names the database file and the counter it
was saved at. A file whose counter is lower (an older copy put back), that
holds another token (another build, another node) or that another role's key
opens is refused. The counter in the file is written first and the manifest
after it, so a reader in another process may find the file one save ahead of
its manifest, never behind.

Memory: ``search.cache_bytes`` (split between role indexes by the service, and
here between a writer and a reader connection) bounds SQLite's page cache;
memory mapping is off and temporary tables live in memory. The index is read
on demand, never held whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import apsw

from slurpfs.errors import Busy, QueryError, StoreFull
from slurpfs.index.document import EXCERPT_CHARS, FACETS, IndexDoc
from slurpfs.index.results import (
    NO_SNIPPET,
    EngineHit,
    EngineResult,
    Snippet,
    highlight_words,
    plain_snippet,
)
from slurpfs.index.sealed import IndexConflict, IndexCorrupt, IndexOutdated, IndexRollback
from slurpfs.index.setup import EngineSetup
from slurpfs.index.sqlite_query import (
    COLUMNS,
    EXACT_COLUMNS,
    KEYWORD_COLUMNS,
    TEXT_COLUMNS,
    WEIGHTS,
    Translated,
    Translator,
    keyword_token,
)

log = logging.getLogger("slurpfs.index")

ENGINE = "sqlite"
SCHEMA_VERSION = 1
CIPHER = "chacha20"  # SQLite3 Multiple Ciphers' ChaCha20-Poly1305 (sqleet) page cipher
BUSY_TIMEOUT_MS = 30_000  # waiting for another process's write transaction
MIN_CACHE_KIB = 256  # page cache floor per connection
EXPAND_LIMIT = 4096  # vocabulary terms a wildcard's prefix may cover
WAL_LIMIT_BYTES = 4 << 20
_NAME = re.compile(r"(?P<role>[a-z][a-z0-9_-]{0,31})\.(?P<token>[0-9a-f]{32})\.db")
_SIDE_FILES = ("", "-wal", "-shm", "-journal")

_SCHEMA = f"""
CREATE TABLE meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE docs(
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    file_role TEXT NOT NULL,
    version TEXT NOT NULL,
    hlc INTEGER NOT NULL,
    summary TEXT NOT NULL,
    agent TEXT NOT NULL,
    role TEXT NOT NULL,
    project TEXT NOT NULL,
    task TEXT NOT NULL
);
CREATE TABLE keywords(
    doc INTEGER NOT NULL,
    facet TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (doc, facet, value)
) WITHOUT ROWID;
CREATE VIRTUAL TABLE fts USING fts5(
    {", ".join(COLUMNS)},
    content='', contentless_delete=1, detail=full,
    tokenize='unicode61 remove_diacritics 0'
);
CREATE VIRTUAL TABLE vocab USING fts5vocab(fts, 'row');
"""
_INSERT_DOC = (
    "INSERT INTO docs(key, address, file_role, version, hlc, summary, agent, role, project, task)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_FTS = f"INSERT INTO fts(rowid, {', '.join(COLUMNS)}) VALUES (?{', ?' * len(COLUMNS)})"
_BM25 = f"bm25(fts, {', '.join(repr(w) for w in WEIGHTS)})"
# Every page of every table and index, overflow pages included (substr of the
# last byte walks a blob's overflow chain): the pages a search could ever read.
_VERIFY = (
    "SELECT count(*) FROM meta",
    "SELECT count(*) FROM docs NOT INDEXED",
    "SELECT count(key) FROM docs INDEXED BY sqlite_autoindex_docs_1",
    "SELECT count(*) FROM keywords",
    "SELECT count(*), sum(length(substr(block, -1))) FROM fts_data",
    "SELECT count(*) FROM fts_idx",
    "SELECT count(*), sum(length(substr(sz, -1))) FROM fts_docsize",
    "SELECT count(*) FROM fts_config",
)


def _connect(path: Path, key: bytes, cache_bytes: int) -> apsw.Connection:
    """A connection to an existing database file, keyed and configured.

    The key is passed raw (``raw:`` and 64 hex digits), so SQLite3MC derives
    nothing from it; nothing is read before the key is set.
    """
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        conn.pragma("cipher", CIPHER)
        conn.pragma("key", "raw:" + key.hex())
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        conn.pragma("temp_store", 2)  # temporary tables and sorts: memory only
        conn.pragma("mmap_size", 0)
        # Pages freed (segments merged away) can be given back to the file system:
        # after a build's optimize, a third of the file. Takes effect in a new file only.
        conn.pragma("auto_vacuum", "incremental")
        conn.pragma("cache_size", -max(MIN_CACHE_KIB, cache_bytes // 1024))
        conn.pragma("journal_mode", "wal")  # the first read: a wrong key fails here
        conn.pragma("synchronous", "normal")
        conn.pragma("journal_size_limit", WAL_LIMIT_BYTES)  # the log shrinks back after a build
    except BaseException:
        conn.close()
        raise
    return conn


def _reader(path: Path, key: bytes, cache_bytes: int) -> apsw.Connection:
    """A connection for searches, with its table of matches (memory, this connection only)."""
    conn = _connect(path, key, cache_bytes)
    conn.execute("CREATE TEMP TABLE matches(id INTEGER PRIMARY KEY, score REAL NOT NULL)")
    return conn


@contextlib.contextmanager
def _errors(role: str, doing: str) -> Iterator[None]:
    """SQLite's errors as the domain's: damage, a full disk, a lock held too long."""
    try:
        yield
    except (apsw.CorruptError, apsw.NotADBError) as exc:
        raise IndexCorrupt(
            f"the search index of role {role!r} fails authentication while {doing} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    except apsw.FullError:
        raise StoreFull(f"no space left for the search index of role {role!r}") from None
    except apsw.BusyError:
        raise Busy(f"the search index of role {role!r} is locked by another process") from None


def _keywords(value: tuple[str, ...]) -> str:
    return " ".join(keyword_token(v) for v in value)


def _fts_row(doc_id: int, doc: IndexDoc) -> tuple[Any, ...]:
    values: list[str] = [str(getattr(doc, name)) for name in TEXT_COLUMNS]
    values += [_keywords(getattr(doc, name)) for name in KEYWORD_COLUMNS]
    values += [keyword_token(v) if (v := getattr(doc, name)) else "" for name in EXACT_COLUMNS]
    return (doc_id, *values)


class SqliteIndex:
    """One role's FTS5 database. Thread-safe: one writer connection and one reader
    connection, each used under its own lock (searches never wait for indexing)."""

    engine = ENGINE
    persistent = True

    def __init__(  # noqa: PLR0913
        self,
        role: str,
        setup: EngineSetup,
        path: Path,
        key_generation: int,
        *,
        counter: int,
        seq: int,
        docs: int,
        fresh: bool,
    ) -> None:
        self.role = role
        self.seq = seq
        self._setup = setup
        self._path = path
        self._key_generation = key_generation
        self._counter = counter  # the save counter this process last wrote or read
        self._docs = docs
        self._fresh = fresh  # created here: other files of the role go at the first save
        key = setup.sealed.key(key_generation)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer = _connect(path, key, setup.cache_bytes // 2)
        try:
            self._reader = _reader(path, key, setup.cache_bytes // 2)
        except BaseException:
            self._writer.close()
            raise
        self._translator = Translator()

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def create(cls, role: str, setup: EngineSetup) -> SqliteIndex:
        """A new, empty database file (named by the manifest at the first save)."""
        directory = setup.directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        path = directory / f"{role}.{secrets.token_hex(16)}.db"
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        key_generation = setup.sealed.current_generation()
        try:
            with _errors(role, "creating it"):
                conn = _connect(path, setup.sealed.key(key_generation), 0)
                try:
                    with conn:
                        conn.execute(_SCHEMA)
                        conn.executemany(
                            "INSERT INTO meta(name, value) VALUES (?, ?)",
                            [
                                ("schema", SCHEMA_VERSION),
                                ("role", role),
                                ("token", _token(path)),
                                ("counter", 0),
                                ("seq", 0),
                            ],
                        )
                finally:
                    conn.close()
            return cls(role, setup, path, key_generation, counter=0, seq=0, docs=0, fresh=True)
        except BaseException:
            _remove_files(path)
            raise

    @classmethod
    def load(cls, role: str, setup: EngineSetup) -> SqliteIndex | None:
        """The saved index, or None if none is saved (or its file is gone).

        Every page is read once, so a damaged page is found now, not by a search.
        `IndexCorrupt` for damage, a wrong key or a file that is not the one the
        manifest names; `IndexRollback` for an older copy of it; `IndexOutdated`
        for another schema or engine; `KeyMissing` if its key generation is gone.
        """
        loaded = setup.sealed.load(ENGINE)
        if loaded is None:
            return None
        meta, _ = loaded
        name = meta.extra.get("database", "")
        match = _NAME.fullmatch(name)
        if match is None or match["role"] != role:
            raise IndexCorrupt(f"the index manifest of role {role!r} names no database of it")
        path = setup.directory / name
        if not path.is_file():
            log.info("search index of role %s: %s is gone, rebuilding it", role, path)
            return None
        with _errors(role, "opening it"):
            try:
                found = _read_meta(path, setup.sealed.key(meta.key_generation), setup.cache_bytes)
            except apsw.SQLError as exc:
                raise IndexCorrupt(
                    f"the search index of role {role!r} does not open: {exc}"
                ) from None
        if found.get("schema") != SCHEMA_VERSION:
            raise IndexOutdated(
                f"the search index of role {role!r} has schema {found.get('schema')!r}, "
                f"this version writes {SCHEMA_VERSION}"
            )
        if found.get("role") != role or found.get("token") != match["token"]:
            raise IndexCorrupt(f"{path} is not the search index the manifest of {role!r} names")
        counter = int(found["counter"])
        if counter < meta.generation:
            raise IndexRollback(
                f"the search index of role {role!r} is an older copy (save {counter}, "
                f"the manifest names save {meta.generation}): refusing it"
            )
        return cls(
            role,
            setup,
            path,
            meta.key_generation,
            counter=counter,
            seq=int(found["seq"]),
            docs=int(found["docs"]),
            fresh=False,
        )

    # -- writing ---------------------------------------------------------------------

    def write(
        self,
        upserts: Sequence[IndexDoc],
        deletes: Collection[str],
        *,
        seq: int,
        save: bool = True,
        commit: bool = True,
        merge: bool = True,
    ) -> None:
        """Replace documents by key, remove keys; with `commit`, record `seq` and a
        new save counter, and with `save` name the file in the manifest.

        Each call is one SQLite transaction, also without `commit`: only a build
        writes so, into a new file no manifest names yet, so no reader sees it half
        done. FTS5 merges segments as it goes, in C (`merge` changes nothing).
        `IndexConflict` if another process wrote the file since we last did.
        """
        with self._write_lock:
            self._rekey_if_rotated()
            conn = self._writer
            finishing = commit and self._fresh  # the last write of a build
            with _errors(self.role, "indexing"):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    counter = _meta_int(conn, "counter")
                    if counter != self._counter:
                        raise IndexConflict(
                            f"the search index of role {self.role!r} was written by "
                            "another process meanwhile"
                        )
                    removed = sum(
                        self._remove(conn, key) for key in {*deletes, *(d.key for d in upserts)}
                    )
                    for doc in upserts:
                        self._insert(conn, doc)
                    if finishing:
                        # The end of a build: one segment per column set, the smallest
                        # and fastest form of the index (a merge in C, seconds at 100,000).
                        conn.execute("INSERT INTO fts(fts) VALUES ('optimize')")
                    if commit:
                        counter = max(counter + 1, self._setup.sealed.next_generation)
                        conn.executemany(
                            "UPDATE meta SET value = ? WHERE name = ?",
                            [(counter, "counter"), (seq, "seq")],
                        )
                    conn.execute("COMMIT")
                except BaseException:
                    if not conn.get_autocommit():
                        conn.execute("ROLLBACK")
                    raise
            self._docs += len(upserts) - removed
            if commit:
                self._counter = counter
                self.seq = seq
                if save:
                    self._save()
                if finishing:
                    with _errors(self.role, "indexing"):
                        conn.execute("PRAGMA incremental_vacuum").fetchall()
                        conn.pragma("wal_checkpoint", "truncate")

    def _remove(self, conn: apsw.Connection, key: str) -> bool:
        row = conn.execute("SELECT id FROM docs WHERE key = ?", (key,)).fetchone()
        if row is None:
            return False
        conn.execute("DELETE FROM fts WHERE rowid = ?", row)
        conn.execute("DELETE FROM keywords WHERE doc = ?", row)
        conn.execute("DELETE FROM docs WHERE id = ?", row)
        return True

    def _insert(self, conn: apsw.Connection, doc: IndexDoc) -> None:
        conn.execute(
            _INSERT_DOC,
            (doc.key, doc.address, doc.file_role, doc.version, doc.hlc, doc.summary,
             doc.agent, doc.role, doc.project, doc.task),
        )  # fmt: skip
        doc_id = conn.last_insert_rowid()
        conn.execute(_INSERT_FTS, _fts_row(doc_id, doc))
        values = [(doc_id, facet, v) for facet in KEYWORD_COLUMNS for v in getattr(doc, facet)]
        if doc.project:
            values.append((doc_id, "project", doc.project))
        conn.executemany(
            "INSERT OR IGNORE INTO keywords(doc, facet, value) VALUES (?, ?, ?)", values
        )

    def _rekey_if_rotated(self) -> None:
        """After a key rotation, re-encrypt the file under the new generation's key.

        The next save's manifest names the new generation; until then the old key
        (still held: a rotation re-wraps before it destroys) opens the old manifest.
        """
        current = self._setup.sealed.current_generation()
        if current == self._key_generation:
            return
        key = self._setup.sealed.key(current)
        with self._read_lock, _errors(self.role, "re-keying it"):
            self._reader.close()
            self._writer.pragma("rekey", "raw:" + key.hex())
            self._reader = _reader(self._path, key, self._setup.cache_bytes // 2)
        log.info("search index of role %s re-keyed to key generation %d", self.role, current)
        self._key_generation = current

    def _save(self) -> None:
        """Name this file and its save counter in the role's manifest."""
        self._setup.sealed.save(
            ENGINE,
            {},
            (),
            seq=self.seq,
            docs=self._docs,
            generation=self._counter,
            extra={"database": self._path.name},
        )
        if self._fresh:
            self._fresh = False
            self._remove_others()

    def _remove_others(self) -> None:
        """Remove the role's older database files (a rebuild replaced them)."""
        for path in self._path.parent.iterdir():
            base = path.name
            for suffix in _SIDE_FILES[1:]:
                base = base.removesuffix(suffix)
            match = _NAME.fullmatch(base)
            if match and match["role"] == self.role and base != self._path.name:
                path.unlink(missing_ok=True)

    def save(self) -> None:
        """Commit a new save counter and name it in the manifest."""
        self.write([], (), seq=self.seq)

    def tidy(self) -> bool:
        """Nothing to do: FTS5 merges segments while it writes, in C."""
        return False

    # -- reading ---------------------------------------------------------------------

    def doc_count(self) -> int:
        return self._docs

    def documents(self) -> dict[str, str]:
        with self._read_lock, _errors(self.role, "listing it"):
            return dict(self._reader.execute("SELECT key, version FROM docs"))

    def _expand(self, field: str, prefix: str) -> list[str]:
        """Values of `field` starting with `prefix` (a wildcard's candidates): words of
        the vocabulary for a text field, whole values for a keyword or address field."""
        if field in KEYWORD_COLUMNS:
            sql = "SELECT DISTINCT value FROM keywords WHERE facet = ? AND value >= ? AND value < ?"
            params: tuple[Any, ...] = (field,)
        elif field in EXACT_COLUMNS:
            sql = f"SELECT DISTINCT {field} FROM docs WHERE {field} >= ? AND {field} < ?"
            params = ()
        else:
            sql, params = "SELECT term FROM vocab WHERE term >= ? AND term < ?", ()
        rows = self._reader.execute(
            f"{sql} LIMIT ?", (*params, prefix, prefix + "\U0010ffff", EXPAND_LIMIT + 1)
        ).fetchall()
        if len(rows) > EXPAND_LIMIT:
            raise QueryError(f"too many words start with {prefix!r}: make the wildcard longer")
        return [str(term) for (term,) in rows]

    def search(
        self, text: str, *, file_roles: frozenset[str] | None, limit: int, snippets: bool = True
    ) -> EngineResult:
        facets: dict[str, dict[str, int]] = {name: {} for name in FACETS}
        with self._read_lock:
            translated = self._translator.translate(text, self._expand)
            if translated.match is None and not translated.everything:
                return EngineResult([], 0, facets)
            with _errors(self.role, "searching it"):
                try:
                    rows, total = self._run(translated, file_roles, limit, facets)
                except apsw.SQLError as exc:  # FTS5 refused the expression
                    raise QueryError(f"the query {text!r} cannot be run: {exc}") from None
        hits = [
            EngineHit(
                score=-float(score),
                address=address,
                file_role=file_role,
                version=version,
                hlc=int(hlc),
                summary=summary,
                snippet=self._snippet(address, file_role, version, summary, translated.words)
                if snippets
                else NO_SNIPPET,
            )
            for address, file_role, version, hlc, summary, score in rows
        ]
        return EngineResult(hits, total, facets)

    def _run(
        self,
        translated: Translated,
        file_roles: frozenset[str] | None,
        limit: int,
        facets: dict[str, dict[str, int]],
    ) -> tuple[list[tuple[Any, ...]], int]:
        """The top rows, and the total and facet counts (into `facets`) of all matches.

        The match is evaluated once, into a temporary table in memory (ids and
        scores); the top rows, the total and the facet counts are read from it.
        """
        conn = self._reader
        params: list[Any] = []
        if translated.everything:  # every document (but the matches): all score 0
            fill = "SELECT d.id, 0.0 FROM docs d WHERE 1"
            if translated.match is not None:
                fill += " AND d.id NOT IN (SELECT rowid FROM fts WHERE fts MATCH ?)"
                params.append(translated.match)
        else:
            fill = f"SELECT fts.rowid, {_BM25} FROM fts JOIN docs d ON d.id = fts.rowid"
            fill += " WHERE fts MATCH ?"
            params.append(translated.match)
        if file_roles is not None:
            roles = sorted(file_roles)
            fill += f" AND d.file_role IN ({', '.join('?' * len(roles))})"
            params += roles
        conn.execute("BEGIN")  # one snapshot for every read below
        try:
            conn.execute("DELETE FROM temp.matches")
            conn.execute(f"INSERT INTO temp.matches(id, score) {fill}", params)
            rows = conn.execute(
                "SELECT d.address, d.file_role, d.version, d.hlc, d.summary, m.score "
                "FROM temp.matches m CROSS JOIN docs d ON d.id = m.id "
                "ORDER BY m.score, m.id LIMIT ?",
                (limit,),
            ).fetchall()
            total = int(conn.execute("SELECT count(*) FROM temp.matches").get or 0)
            if total:
                for facet, value, n in conn.execute(
                    # CROSS JOIN: the matches drive (the planner has no statistics
                    # of the temporary table and would scan every keyword row).
                    "SELECT k.facet, k.value, count(*) FROM temp.matches m "
                    "CROSS JOIN keywords k ON k.doc = m.id GROUP BY k.facet, k.value"
                ):
                    facets[facet][value] = n
            conn.execute("DELETE FROM temp.matches")
        finally:
            conn.execute("COMMIT")
        return rows, total

    def _snippet(
        self, address: str, file_role: str, version: str, summary: str, words: frozenset[str]
    ) -> Snippet:
        body = (self._setup.text(address, file_role, version) or "")[:EXCERPT_CHARS]
        return (
            highlight_words(body, words)
            or highlight_words(summary, words)
            or plain_snippet(summary, body)
        )

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._reader.close()
            self._writer.close()


def _token(path: Path) -> str:
    match = _NAME.fullmatch(path.name)
    assert match is not None, path
    return match["token"]


def _meta_int(conn: apsw.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise IndexCorrupt(f"the search index lacks its {name!r} record")
    return int(row[0])


def _read_meta(path: Path, key: bytes, cache_bytes: int) -> dict[str, Any]:
    """The meta records of a database file, after reading every page of it."""
    conn = _connect(path, key, cache_bytes)
    try:
        conn.execute("BEGIN")  # one snapshot: the records and the pages read agree
        for statement in _VERIFY:
            conn.execute(statement).fetchall()
        found: dict[str, Any] = dict(conn.execute("SELECT name, value FROM meta"))
        found["docs"] = conn.execute("SELECT count(*) FROM docs").get
        conn.execute("COMMIT")
        return found
    finally:
        conn.close()


def _remove_files(path: Path) -> None:
    for suffix in _SIDE_FILES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)
