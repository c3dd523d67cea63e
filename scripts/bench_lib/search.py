"""Section `search`: per-role indexes with whoosh and tantivy, side by side, in one run.

Two store layouts, loaded with `ContextStore.put_many` (setup, not measured):

* **five roles**: `ROLES`, none with extra readers, the contexts dealt out in turn,
  so each context is readable by exactly one role and each role index holds
  `per_role` contexts (25,000; 125,000 in all);
* **one role**: `developer` without extra readers holding `one_role` contexts
  (100,000), the first ones of the same corpus.

whoosh and tantivy each run on the five-role layout, tantivy also on the one-role
layout (the issue's goals are for whoosh at 25,000 per role and tantivy at 100,000
in one role). For each: building the indexes from the store (`SearchService.open`
on a store without an index: decrypt, extract, index, seal), the sealed index
bytes it added to the store, the decrypt+extract share of indexing, the first
query and one-term queries on the index as built; contexts saved with `put` until
a search finds them (and deleted until gone) with the daemon's `Indexer` running;
then `Sizes.queries` queries of each kind through `SearchService.search` with one
role as the caller (p50/p95), on the index as a running daemon keeps it; then a
restart: a new `ContextStore` and `SearchService.open` (no rebuild for whoosh, a
rebuild in RAM for tantivy) and the first query after it. Then the same queries through a real
mount: `slurpfs mount --foreground` on the same data directory, once `.slurp/status`
says the search service is ready, with `os.listdir(".search/<query>")` (or reading
`.results` / `.facets`), and files saved through the mount until `.search/` lists
them. Every daemon is our child, unmounted and reaped by its PID in `finally`.

Query words come from the corpus itself (a sample of its documents), chosen so that
each query matches a realistic share of an index (see `BANDS`); the hit counts each
query kind actually returned are reported next to its latencies.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import random
import re
import secrets
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench_lib import corpus, daemons
from bench_lib.common import Json, Options, Section, percentile, table
from slurpfs import config, ucxl
from slurpfs.crypto.keystore import KdfParams
from slurpfs.index import Indexer, SearchResult, SearchService
from slurpfs.index.document import extract
from slurpfs.index.engine import read_version
from slurpfs.index.query import DEFAULT_LIMIT
from slurpfs.index.sealed import INDEX_TABLE
from slurpfs.model import BatchItem, ContextStore

ROLES = ("developer", "architect", "reviewer", "operator", "auditor")
ONE_ROLE = "developer"
CONTEXT_BYTES = 2048
LOAD_BATCH = 500
POLL_S = 0.005  # saved-context test: how often a search asks whether it is there yet
VISIBLE_TIMEOUT_S = 60.0  # a sample still invisible then counts as timed out
READY_TIMEOUT_S = 900.0  # a mount's search service must be open by then


@dataclass(frozen=True)
class Sizes:
    per_role: int  # five-role layout: contexts per role index
    one_role: int  # one-role layout
    queries: int  # per query kind
    saves: int  # saved-context latency samples
    sample: int  # documents sampled to pick query words


FULL = Sizes(per_role=25_000, one_role=100_000, queries=200, saves=20, sample=10_000)
QUICK = Sizes(per_role=2_000, one_role=10_000, queries=50, saves=5, sample=4_000)


@dataclass(frozen=True)
class Kind:
    label: str
    limit: int
    mount_op: str  # "ls" (list the query directory) or the file read: ".results", ".facets"
    goal: bool  # one of the six kinds (the extra `common` row has no goal)


# The share of an index (of its documents) each kind's queries should match, estimated
# on the corpus sample; the table reports what they did match.
KINDS: dict[str, Kind] = {
    "term": Kind("one term", DEFAULT_LIMIT, "ls", True),
    "and": Kind("two terms (AND)", DEFAULT_LIMIT, "ls", True),
    "phrase": Kind('phrase ("a b")', DEFAULT_LIMIT, "ls", True),
    "tag": Kind("tag filter + term", DEFAULT_LIMIT, "ls", True),
    "highlights": Kind("top 10 with highlights", 10, ".results", True),
    "facets": Kind("facet counts (tag + technology filter)", DEFAULT_LIMIT, ".facets", True),
    "common": Kind("common term (10-40% of the index)", DEFAULT_LIMIT, "ls", False),
}
BANDS: dict[str, tuple[float, float]] = {
    "term": (0.002, 0.03),
    "and": (0.002, 0.03),
    "phrase": (0.002, 0.03),
    "tag": (0.002, 0.03),
    "highlights": (0.002, 0.03),
    "facets": (0.002, 0.05),
    "common": (0.10, 0.40),
}
# Goals (ms) from the issue: whoosh at 25,000 per role, tantivy at 100,000 in one role.
WHOOSH_P95_MS = {"highlights": 50.0}  # every other goal kind: 20 ms
WHOOSH_P95_DEFAULT_MS = 20.0
TANTIVY_P50_MS, TANTIVY_P95_MS = 10.0, 20.0
VISIBLE_GOAL_S = 1.0


@dataclass(frozen=True)
class Query:
    kind: str
    text: str
    limit: int

    def name(self, role: str | None) -> str:
        """The `.search/` name: QUERY[@limit=N][@role=R]."""
        limit = f"@limit={self.limit}" if self.limit != DEFAULT_LIMIT else ""
        return f"{self.text}{limit}{f'@role={role}' if role else ''}"


@dataclass(frozen=True)
class Layout:
    name: str  # "5x25k"
    title: str
    roles: tuple[str, ...]
    docs: Sequence[corpus.Doc]
    data_dir: Path
    cfg: config.Config

    def role_of(self, i: int) -> str:
        return self.roles[i % len(self.roles)]

    @property
    def per_role(self) -> int:
        return len(self.docs) // len(self.roles)


@dataclass(frozen=True)
class Column:
    key: str  # "whoosh_5" ...
    engine: str
    layout: Layout


def _ms(ns: float) -> float:
    return round(ns / 1e6, 2)


def _summary(samples_ns: Sequence[int]) -> Json:
    values = sorted(samples_ns)
    return {
        "n": len(values),
        "p50_ms": _ms(percentile(values, 50)),
        "p95_ms": _ms(percentile(values, 95)),
        "p99_ms": _ms(percentile(values, 99)),
        "mean_ms": _ms(sum(values) / len(values)),
        "max_ms": _ms(values[-1]),
    }


# -- run -------------------------------------------------------------------------------


def run(opts: Options) -> Section:
    sizes = QUICK if opts.quick else FULL
    base = opts.workdir / f"bench-search-{os.getpid()}"
    base.mkdir(parents=True)
    started = time.perf_counter()
    try:
        t0 = time.perf_counter()
        total = max(sizes.per_role * len(ROLES), sizes.one_role)
        docs = list(corpus.generate(total, size=CONTEXT_BYTES, jargon=True))
        queries, vocabulary = _pick_queries(docs, sizes)
        setup: Json = {"generate_s": round(time.perf_counter() - t0, 1), "vocabulary": vocabulary}
        print(f"search: {len(docs):,} contexts generated, queries picked", file=sys.stderr)
        columns: dict[str, Json] = {}
        five = _layout(base, "5x25k", ROLES, docs[: sizes.per_role * len(ROLES)], setup)
        for engine in ("whoosh", "tantivy"):
            columns[f"{engine}_5"] = _column(Column(f"{engine}_5", engine, five), queries, sizes)
        shutil.rmtree(five.data_dir, ignore_errors=True)
        one = _layout(base, "1x100k", (ONE_ROLE,), docs[: sizes.one_role], setup)
        columns["tantivy_1"] = _column(Column("tantivy_1", "tantivy", one), queries, sizes)
    finally:
        daemons.remove(base, label="search")
    data: Json = {
        "context_bytes": CONTEXT_BYTES,
        "sizes": vars(sizes),
        "roles": list(ROLES),
        "setup": setup,
        "queries": {k: [q.text for q in qs] for k, qs in queries.items()},
        "columns": columns,
        "engines_agree": _agreement(columns),
        "goals": _goals(columns),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return Section(data, _markdown(data))


def _column(column: Column, queries: dict[str, list[Query]], sizes: Sizes) -> Json:
    load, t0 = os.getloadavg()[0], time.perf_counter()
    print(f"search: {column.key}: in process", file=sys.stderr)
    out = _in_process(column, queries, sizes)
    print(f"search: {column.key}: through the mount", file=sys.stderr)
    out["mount"] = _through_mount(column, queries, sizes, out["queries"])
    out["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    out["column_s"] = round(time.perf_counter() - t0, 1)
    return out


# -- data ------------------------------------------------------------------------------


def _roles_toml(roles: Sequence[str]) -> str:
    return "".join(f"[roles.{r}]\nreaders = []\n\n" for r in roles)


def _layout(
    base: Path, name: str, roles: tuple[str, ...], docs: Sequence[corpus.Doc], setup: Json
) -> Layout:
    """A new data directory holding `docs`, dealt out to `roles` in turn."""
    where = base / name
    where.mkdir()
    toml = where / "roles.toml"
    toml.write_text(_roles_toml(roles), encoding="utf-8")
    data_dir = where / "data"
    # An explicit, empty environment: the caller's SLURPFS_* variables must not leak in.
    cfg = config.load(
        toml, environ={"HOME": str(where)}, overrides={"node.data_dir": str(data_dir)}
    )
    layout = Layout(name, f"{len(roles)} x {len(docs) // len(roles):,}", roles, docs, data_dir, cfg)
    t0 = time.perf_counter()
    with ContextStore.init(cfg, None, kdf=KdfParams.weak()) as store:  # writes data/config.toml
        for i in range(0, len(docs), LOAD_BATCH):
            batch = [
                BatchItem(ucxl.parse(d.address), layout.role_of(j), d.data)
                for j, d in enumerate(docs[i : i + LOAD_BATCH], start=i)
            ]
            report = store.put_many(batch)
            if report.failed:
                raise RuntimeError(f"loading failed: {report.failed[:3]}")
        store.sync()
    setup[f"load_{name}_s"] = round(time.perf_counter() - t0, 1)
    print(f"search: {name}: {len(docs):,} contexts loaded", file=sys.stderr)
    return layout


def _open_model(layout: Layout) -> ContextStore:
    return ContextStore.open(layout.cfg, None, kdf=KdfParams.weak())


def _index_table_bytes(model: ContextStore, roles: Sequence[str]) -> tuple[int, int]:
    """(bytes, records) of sealed search index data in the store."""
    size = records = 0
    for role in roles:
        for _, value in model.store.aux_scan(INDEX_TABLE, role.encode() + b"\0"):
            size += len(value)
            records += 1
    return size, records


def _mdb_bytes(layout: Layout) -> int:
    return (layout.data_dir / "store" / "data.mdb").stat().st_size


def _rss_bytes() -> int:
    """This process's resident memory (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- picking queries ----------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+")
_LIST = re.compile(r"^(tags|technologies): \[(.*)\]$", re.MULTILINE)
_STOP = frozenset(
    ("the", "a", "an", "of", "to", "in", "and", "is", "it", "at", "on", "for", "by", "with",
     "from", "that", "this", "be", "as", "or", "we", "if", "not", "but", "its", "see", "do",
     "are", "was", "has", "how", "when", "before", "after", "every", "each", "both", "does")
)  # fmt: skip
_FRONT_MATTER_KEYS = frozenset(
    {"summary", "purpose", "tags", "technologies", "insights", "influences"}
)


@dataclass
class _Sample:
    n: int
    df: Counter[str]
    bits: dict[str, int]  # word -> bitmap of sample documents (words in at least 0.1%)
    bigrams: Counter[tuple[str, str]]  # adjacent words -> documents
    tags: dict[str, int]  # tag -> bitmap
    technologies: dict[str, int]


def _bitmap(ids: list[int], n: int) -> int:
    buf = bytearray((n + 7) // 8)
    for i in ids:
        buf[i >> 3] |= 1 << (i & 7)
    return int.from_bytes(buf, "little")


def _sample(docs: Sequence[corpus.Doc], n: int) -> _Sample:
    step = max(1, len(docs) // n)
    chosen = list(docs[::step][:n])
    df: Counter[str] = Counter()
    bigrams: Counter[tuple[str, str]] = Counter()
    postings: dict[str, list[int]] = {}
    lists: dict[str, dict[str, list[int]]] = {"tags": {}, "technologies": {}}
    for i, doc in enumerate(chosen):
        text = doc.data.decode()
        words = [w.lower() for w in _TOKEN.findall(text)]
        unique = set(words)
        df.update(unique)
        for w in unique:
            postings.setdefault(w, []).append(i)
        bigrams.update(set(zip(words, words[1:], strict=False)))
        for field, values in _LIST.findall(text):
            for value in values.split(","):
                lists[field].setdefault(value.strip().lower(), []).append(i)
    count = len(chosen)
    floor = max(1, count // 1000)
    bits = {w: _bitmap(ids, count) for w, ids in postings.items() if len(ids) >= floor}
    return _Sample(
        count,
        df,
        bits,
        bigrams,
        {t: _bitmap(ids, count) for t, ids in lists["tags"].items()},
        {t: _bitmap(ids, count) for t, ids in lists["technologies"].items()},
    )


def _word_ok(word: str) -> bool:
    return word.isalpha() and len(word) >= 3 and word not in _STOP


def _pick_queries(docs: Sequence[corpus.Doc], sizes: Sizes) -> tuple[dict[str, list[Query]], Json]:
    """`sizes.queries` queries of each kind, words from a sample of the corpus (seeded)."""
    s = _sample(docs, sizes.sample)
    rng = random.Random(5)
    n = sizes.queries

    def band(kind: str) -> tuple[int, int]:
        lo, hi = BANDS[kind]
        return max(1, round(lo * s.n)), round(hi * s.n)

    def words(lo_frac: float, hi_frac: float) -> list[str]:
        lo, hi = lo_frac * s.n, hi_frac * s.n
        out = sorted(w for w in s.bits if lo <= s.df[w] <= hi and _word_ok(w))
        out = [w for w in out if w not in _FRONT_MATTER_KEYS]
        rng.shuffle(out)
        return out

    def take(kind: str, texts: list[str]) -> list[Query]:
        if not texts:
            raise RuntimeError(f"no {kind} query matches its band {BANDS[kind]} in the sample")
        return [Query(kind, texts[i % len(texts)], KINDS[kind].limit) for i in range(n)]

    queries: dict[str, list[Query]] = {}
    lo, hi = band("term")
    single = words(*BANDS["term"])
    queries["term"] = take("term", single[:n])
    rest = single[n:] or single
    queries["highlights"] = take("highlights", rest[:n])

    common = words(*BANDS["common"])
    queries["common"] = take("common", common[:n])

    lo, hi = band("and")
    pool = words(0.01, 0.40)
    pairs: list[str] = []
    seen: set[frozenset[str]] = set()
    for _ in range(200_000):
        if len(pairs) >= n:
            break
        a, b = rng.sample(pool, 2)
        key = frozenset((a, b))
        if key not in seen and lo <= (s.bits[a] & s.bits[b]).bit_count() <= hi:
            seen.add(key)
            pairs.append(f"{a} {b}")
    queries["and"] = take("and", pairs)

    lo, hi = band("phrase")
    phrases = sorted(
        f'"{a} {b}"'
        for (a, b), c in s.bigrams.items()
        if lo <= c <= hi and a != b and _word_ok(a) and _word_ok(b)
    )
    rng.shuffle(phrases)
    queries["phrase"] = take("phrase", phrases[:n])

    lo, hi = band("tag")
    tag_terms: list[str] = []
    mid = words(0.005, 0.15)
    for tag in sorted(s.tags):
        for w in mid:
            if lo <= (s.tags[tag] & s.bits[w]).bit_count() <= hi:
                tag_terms.append(f"tags:{tag} {w}")
    rng.shuffle(tag_terms)
    queries["tag"] = take("tag", tag_terms[:n])

    lo, hi = band("facets")
    combos = [
        f"tags:{tag} technologies:{tech}"
        for tag in sorted(s.tags)
        for tech in sorted(s.technologies)
        if lo <= (s.tags[tag] & s.technologies[tech]).bit_count() <= hi
    ]
    rng.shuffle(combos)
    queries["facets"] = take("facets", combos[:n])

    ordered = {k: queries[k] for k in KINDS}
    vocabulary: Json = {
        "sampled_documents": s.n,
        "distinct_words": len(s.df),
        "distinct_queries": {k: len({q.text for q in qs}) for k, qs in ordered.items()},
    }
    return ordered, vocabulary


# -- in process ---------------------------------------------------------------------------


def _search(service: SearchService, q: Query, role: str) -> SearchResult:
    return service.search(q.text, {role}, limit=q.limit)


def _run_queries(service: SearchService, layout: Layout, queries: list[Query]) -> Json:
    clock = time.perf_counter_ns
    samples: list[int] = []
    totals: list[int] = []
    highlighted = shown = 0
    facet_values = 0
    gc.collect()
    for i, q in enumerate(queries):
        role = layout.role_of(i)
        t0 = clock()
        result = _search(service, q, role)
        samples.append(clock() - t0)
        totals.append(result.total)
        shown += len(result.hits)
        highlighted += sum(1 for h in result.hits if h.snippet.highlights)
        facet_values += sum(len(v) for v in result.facets.values())
    return {
        **_summary(samples),
        "hits": _hits(totals, layout.per_role),
        "totals": totals,
        "shown": shown,
        "highlighted": highlighted,
        "facet_values_mean": round(facet_values / len(queries), 1),
    }


def _hits(totals: Sequence[int], index_docs: int) -> Json:
    ordered = sorted(totals)
    return {
        "min": ordered[0],
        "median": int(statistics.median(ordered)),
        "max": ordered[-1],
        "zero": sum(1 for t in ordered if t == 0),
        "median_share": round(statistics.median(ordered) / index_docs, 4),
    }


def _in_process(column: Column, queries: dict[str, list[Query]], sizes: Sizes) -> Json:
    layout, engine = column.layout, column.engine
    out: Json = {"engine": engine, "layout": layout.name, "contexts": len(layout.docs)}
    mdb_before = _mdb_bytes(layout)
    with _open_model(layout) as model:
        sealed_before = _index_table_bytes(model, layout.roles)
        gc.collect()
        rss_before = _rss_bytes()
        t0 = time.perf_counter()
        service = SearchService.open(model, engine=engine)
        build_s = time.perf_counter() - t0
        gc.collect()
        rss_growth = _rss_bytes() - rss_before
        try:
            stats = service.statistics()
            indexed = sum(stats.documents.values())
            if indexed != len(layout.docs):
                raise RuntimeError(
                    f"{column.key}: {indexed} documents indexed, not {len(layout.docs)}"
                )
            sealed_after = _index_table_bytes(model, layout.roles)
            out["build"] = {
                "seconds": round(build_s, 2),
                "contexts_per_s": round(indexed / build_s, 1),
                "documents": dict(stats.documents),
                "decrypt_extract": _decrypt_extract(model, layout),
            }
            out["at_rest"] = {
                "sealed_bytes": sealed_after[0] - sealed_before[0],
                "sealed_records": sealed_after[1] - sealed_before[1],
                "mdb_growth_bytes": _mdb_bytes(layout) - mdb_before,
                "persistent": engine == "whoosh",
            }
            # The indexes live in this process's memory (both engines); the growth
            # of its resident set over the build approximates their size there.
            out["memory"] = {"rss_growth_bytes": rss_growth}
            out["first_query_ms"] = _first_query(service, layout, queries)
            _warm_up(service, layout, queries)
            # The index exactly as the build left it (for whoosh: the segments of its
            # batches, merged by the first writes after it).
            out["term_as_built"] = _run_queries(service, layout, queries["term"])
            # Saves and deletions with the indexer running, as in a daemon; the
            # queries below then see the index in the state a running daemon keeps.
            out["saved"] = _saved_in_process(model, service, column, sizes.saves)
            _warm_up(service, layout, queries)
            out["queries"] = {}
            for kind, qs in queries.items():
                out["queries"][kind] = _run_queries(service, layout, qs)
                print(
                    f"search: {column.key}: {kind}: p50 {out['queries'][kind]['p50_ms']} ms, "
                    f"p95 {out['queries'][kind]['p95_ms']} ms",
                    file=sys.stderr,
                )
        finally:
            service.close()
    # A restart: a new ContextStore and SearchService on the same data directory.
    gc.collect()
    t0 = time.perf_counter()
    with _open_model(layout) as model:
        model_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        service = SearchService.open(model, engine=engine)
        open_s = time.perf_counter() - t0
        try:
            first = _first_query(service, layout, queries)
            again = [_search(service, q, layout.role_of(i)).total
                     for i, q in enumerate(queries["term"][:20])]  # fmt: skip
            out["reopen"] = {
                "store_open_ms": _ms(model_s * 1e9),
                "search_open_s": round(open_s, 2),
                "rebuilt_roles": len(service.statistics().rebuilt),
                "first_query_ms": first,
                "same_totals": again == out["queries"]["term"]["totals"][:20],
            }
        finally:
            service.close()
    return out


def _decrypt_extract(model: ContextStore, layout: Layout, n: int = 2000) -> Json:
    """µs per context to read, decrypt and parse a head into an index document (part of indexing)."""
    clock = time.perf_counter_ns
    samples: list[int] = []
    for i, doc in enumerate(layout.docs[:n]):
        t0 = clock()
        head = model.store.head(ucxl.parse(doc.address).key, layout.role_of(i))
        if head is None:
            raise RuntimeError(f"{doc.address}: no head")
        extract(head, read_version(model, head))
        samples.append(clock() - t0)
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_us": round(percentile(ordered, 50) / 1000, 1),
        "mean_us": round(sum(ordered) / len(ordered) / 1000, 1),
    }


def _first_query(service: SearchService, layout: Layout, queries: dict[str, list[Query]]) -> float:
    """The first query after opening (whoosh reads facet values of each segment then)."""
    t0 = time.perf_counter_ns()
    _search(service, queries["term"][0], layout.role_of(0))
    return _ms(time.perf_counter_ns() - t0)


def _warm_up(service: SearchService, layout: Layout, queries: dict[str, list[Query]]) -> None:
    for qs in queries.values():
        for i, q in enumerate(qs[:5]):
            _search(service, q, layout.role_of(i))


def _canary(i: int) -> str:
    return f"canary{i:03d}x{secrets.token_hex(4)}"  # one token: letters and digits only


def _saved_doc(i: int, canary: str) -> corpus.Doc:
    doc = next(corpus.generate(1, size=CONTEXT_BYTES, seed=1000 + i, jargon=True))
    return corpus.Doc(doc.address, doc.parts, doc.data + f"Saved note {canary}.\n".encode())


class _BackgroundIndexer:
    """The daemon's `Indexer`, run in its own trio loop in a thread, as in the daemon."""

    def __init__(self, service: SearchService) -> None:
        self.indexer = Indexer(service)
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> _BackgroundIndexer:
        ready = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.indexer.run)
                ready.set()

        def thread() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # reported by __exit__
                self._error = exc
                ready.set()

        self._thread = threading.Thread(target=thread, name="bench-indexer", daemon=True)
        self._thread.start()
        if not ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the indexer did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._thread is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self.indexer.stop, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(60)
        if self._error is not None:
            raise RuntimeError(f"the indexer failed: {self._error!r}")


def _wait_until(check: Callable[[], bool], since_ns: int) -> int | None:
    """ns from `since_ns` until `check()` holds (polled every POLL_S), None after the timeout."""
    deadline = since_ns + int(VISIBLE_TIMEOUT_S * 1e9)
    while True:
        now = time.perf_counter_ns()
        if check():
            return now - since_ns if now > since_ns else 0
        if now > deadline:
            return None
        time.sleep(POLL_S)


def _visibility(found_ns: list[int | None], gone_ns: list[int | None]) -> Json:
    out: Json = {}
    for name, values in (("visible", found_ns), ("gone", gone_ns)):
        ok = [v for v in values if v is not None]
        out[name] = {
            "n": len(values),
            "timeouts": len(values) - len(ok),
            "samples_ms": [None if v is None else _ms(v) for v in values],
            **({"p50_ms": _ms(percentile(sorted(ok), 50)), "p95_ms": _ms(percentile(sorted(ok), 95)),
                "max_ms": _ms(max(ok))} if ok else {}),
        }  # fmt: skip
    return out


def _saved_in_process(model: ContextStore, service: SearchService, column: Column, n: int) -> Json:
    """`put` a context with a unique word, search until it is found; `delete`, until gone."""
    layout = column.layout
    found: list[int | None] = []
    gone: list[int | None] = []
    with _BackgroundIndexer(service) as background:
        for i in range(n):
            role = layout.role_of(i)
            canary = _canary(i)
            doc = _saved_doc(i, canary)
            address = ucxl.parse(f"ucxl://{doc.parts[0]}/bench-saved/{column.key}-{i:04d}/note.md")

            def hits(canary: str = canary, role: str = role) -> int:
                return service.search(canary, {role}, limit=1).total

            model.put(address, role, doc.data)
            t0 = time.perf_counter_ns()
            found.append(_wait_until(lambda: hits() == 1, t0))
            model.delete(address, role)
            t0 = time.perf_counter_ns()
            gone.append(_wait_until(lambda: hits() == 0, t0))
        stats = background.indexer.statistics()
    out = _visibility(found, gone)
    out["indexer"] = {"batches": stats.batches, "errors": stats.errors}
    return out


# -- through a mount ----------------------------------------------------------------------


@contextlib.contextmanager
def _mounted(column: Column, mnt: Path, log: Path, info: Json) -> Iterator[float]:
    """`slurpfs mount --foreground` as our child (`daemons.running`); yields its start
    time (perf_counter) and puts its PID into `info`."""
    argv = daemons.slurpfs("mount", "--foreground", "--data", str(column.layout.data_dir), str(mnt))
    started = time.perf_counter()
    with daemons.running(
        argv,
        mnt,
        log,
        info,
        env=daemons.clean_env(SLURPFS_SEARCH_ENGINE=column.engine),
        stop=daemons.slurpfs("umount", str(mnt)),
        mount_timeout=60.0,
        exit_timeout=60.0,
        label="search",
    ) as pid:
        info["pid"] = pid
        yield started


def _status(mnt: Path) -> dict[str, str]:
    text = (mnt / ".slurp" / "status").read_text(errors="replace")
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def _wait_ready(mnt: Path, started: float, expected: int) -> float:
    """Seconds from the daemon's start until `.slurp/status` says search is ready and
    the role indexes hold every context."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        status = _status(mnt)
        if status.get("search_unavailable"):
            raise RuntimeError(f"search unavailable on the mount: {status['search_unavailable']}")
        if status.get("search_ready") == "1":
            docs = sum(int(v) for k, v in status.items() if k.startswith("index_documents_"))
            if docs >= expected:
                return time.perf_counter() - started
        time.sleep(0.1)
    raise RuntimeError(f"the search service of {mnt} was not ready after {READY_TIMEOUT_S:.0f} s")


def _settle(pid: int) -> float | None:
    """Wait until the daemon uses under 5% of a CPU over a second (catch-up done)."""
    return daemons.settle(pid, limit_s=120.0, window_s=1.0)


_MATCHES = re.compile(rb"# (?:counts over )?(\d+) match")


class _SearchDir:
    """`.search/` of a mount, opened once: queries are looked up relative to it, so that
    polling it sends no request on the rest of the tree (which the indexer waits on)."""

    def __init__(self, mnt: Path) -> None:
        self._fd = os.open(mnt / ".search", os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self._fd)

    def listdir(self, name: str) -> list[str]:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self._fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def read(self, name: str) -> bytes:
        fd = os.open(name, os.O_RDONLY, dir_fd=self._fd)
        try:
            return os.read(fd, 1 << 20)
        finally:
            os.close(fd)

    def links(self, name: str) -> int:
        return sum(1 for e in self.listdir(name) if not e.startswith("."))


def _mount_query(root: _SearchDir, q: Query, role: str | None) -> tuple[int, int | None]:
    """Run one query through `.search/`: (links listed or -1 for an error, total if read)."""
    name = q.name(role)
    if KINDS[q.kind].mount_op == "ls":
        entries = root.listdir(name)
        if ".error" in entries:
            return -1, None
        return sum(1 for e in entries if not e.startswith(".")), None
    found = _MATCHES.search(root.read(f"{name}/{KINDS[q.kind].mount_op}"))
    return 0, int(found.group(1)) if found else -1


def _through_mount(
    column: Column, queries: dict[str, list[Query]], sizes: Sizes, reference: Json
) -> Json:
    if not os.path.exists("/dev/fuse"):
        return {"skipped": "no /dev/fuse"}
    layout = column.layout
    base = layout.data_dir.parent
    mnt = base / f"mnt-{column.engine}"
    mnt.mkdir(exist_ok=True)
    info: Json = {}
    out: Json = {}
    with _mounted(column, mnt, base / f"daemon-{column.engine}.log", info) as started:
        out["ready_s"] = round(_wait_ready(mnt, started, len(layout.docs)), 2)
        out["settle_s"] = _settle(info["pid"])
        root = _SearchDir(mnt)
        try:
            out.update(_mount_queries(column, root, queries, reference))
            out["saved"] = _saved_through_mount(mnt, root, column, sizes.saves)
        finally:
            root.close()
    out.update(info)
    return out


def _mount_queries(
    column: Column, root: _SearchDir, queries: dict[str, list[Query]], reference: Json
) -> Json:
    layout = column.layout
    one = len(layout.roles) == 1
    out: Json = {}
    for qs in queries.values():  # warm-up
        for i, q in enumerate(qs[:5]):
            _mount_query(root, q, None if one else layout.role_of(i))
    out["queries"] = {}
    clock = time.perf_counter_ns
    for kind, qs in queries.items():
        samples: list[int] = []
        mismatched = errors = 0
        expected = reference[kind]["totals"]
        gc.collect()
        for i, q in enumerate(qs):
            t0 = clock()
            links, total = _mount_query(root, q, None if one else layout.role_of(i))
            samples.append(clock() - t0)
            if links < 0 or total == -1:
                errors += 1
            elif total is not None:
                mismatched += total != expected[i]
            else:
                mismatched += links != min(expected[i], q.limit)
        out["queries"][kind] = {**_summary(samples), "errors": errors, "mismatched": mismatched}
        print(f"search: {column.key}: mount {kind}: p50 {out['queries'][kind]['p50_ms']} ms, "
              f"p95 {out['queries'][kind]['p95_ms']} ms", file=sys.stderr)  # fmt: skip
    return out


def _saved_through_mount(mnt: Path, root: _SearchDir, column: Column, n: int) -> Json:
    """Write a new file (a context) through the mount; list `.search/<its word>` until it
    shows; remove the file; list until it is gone."""
    layout = column.layout
    one = len(layout.roles) == 1
    found: list[int | None] = []
    gone: list[int | None] = []
    for i in range(n):
        role = layout.role_of(i)
        canary = _canary(100 + i)
        doc = _saved_doc(100 + i, canary)
        folder = mnt / "ucxl" / doc.parts[0] / "bench-saved" / f"{column.key}-mount-{i:04d}"
        folder.mkdir(parents=True)
        path = folder / role
        query = canary if one else f"{canary}@role={role}"

        def links(query: str = query) -> int:
            return root.links(query)

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, doc.data)
        finally:
            os.close(fd)
        t0 = time.perf_counter_ns()
        found.append(_wait_until(lambda: links() == 1, t0))
        os.unlink(path)
        t0 = time.perf_counter_ns()
        gone.append(_wait_until(lambda: links() == 0, t0))
    return _visibility(found, gone)


# -- comparison, goals, report --------------------------------------------------------------

COLUMNS = {
    "whoosh_5": "whoosh, 5 roles",
    "tantivy_5": "tantivy, 5 roles",
    "tantivy_1": "tantivy, 1 role",
}


def _agreement(columns: dict[str, Json]) -> Json:
    """Queries whose totals differ between whoosh and tantivy on the same (five-role) data."""
    w, t = columns.get("whoosh_5"), columns.get("tantivy_5")
    if not w or not t:
        return {}
    out: Json = {}
    for kind in KINDS:
        a, b = w["queries"][kind]["totals"], t["queries"][kind]["totals"]
        out[kind] = sum(1 for x, y in zip(a, b, strict=True) if x != y)
    return out


def _goal_kinds() -> list[str]:
    return [k for k, v in KINDS.items() if v.goal]


def _goals(columns: dict[str, Json]) -> Json:
    out: Json = {}
    for where in ("api", "mount"):

        def queries(key: str, where: str = where) -> Json | None:
            col = columns.get(key)
            if col is None:
                return None
            q = col["queries"] if where == "api" else col["mount"].get("queries")
            return q if isinstance(q, dict) else None

        w, t = queries("whoosh_5"), queries("tantivy_1")
        if w is not None:
            out[f"whoosh_{where}"] = {
                k: {"p95_ms": w[k]["p95_ms"], "goal_p95_ms": WHOOSH_P95_MS.get(k, WHOOSH_P95_DEFAULT_MS),
                    "met": w[k]["p95_ms"] < WHOOSH_P95_MS.get(k, WHOOSH_P95_DEFAULT_MS)}
                for k in _goal_kinds()
            }  # fmt: skip
        if t is not None:
            out[f"tantivy_{where}"] = {
                k: {"p50_ms": t[k]["p50_ms"], "p95_ms": t[k]["p95_ms"],
                    "met": t[k]["p50_ms"] < TANTIVY_P50_MS and t[k]["p95_ms"] < TANTIVY_P95_MS}
                for k in _goal_kinds()
            }  # fmt: skip
    visible: Json = {}
    for key, col in columns.items():
        for where, saved in (
            ("api", col.get("saved")),
            ("mount", col.get("mount", {}).get("saved")),
        ):
            if saved is None:
                continue
            v = saved["visible"]
            visible[f"{key}_{where}"] = {
                "max_ms": v.get("max_ms"),
                "met": not v["timeouts"] and v.get("max_ms", 1e9) < VISIBLE_GOAL_S * 1000,
            }
    out["visible"] = visible
    return out


def _ratio(a: float | None, b: float | None) -> str | None:
    if a is None or b is None or not b:
        return None
    return f"{a / b:.2f}x"


def _met(value: bool | None) -> str | None:
    return None if value is None else ("yes" if value else "**no**")


def _pair(q: Json | None) -> str | None:
    return None if q is None else f"{q['p50_ms']:.2f} / {q['p95_ms']:.2f}"


def _query_table(columns: dict[str, Json], where: str, goals: Json) -> list[str]:
    def get(key: str, kind: str) -> Json | None:
        col = columns.get(key)
        if col is None:
            return None
        block = col["queries"] if where == "api" else col["mount"].get("queries")
        return block.get(kind) if isinstance(block, dict) else None

    rows = []
    for kind, spec in KINDS.items():
        w, t, t1 = get("whoosh_5", kind), get("tantivy_5", kind), get("tantivy_1", kind)
        hits5 = columns["whoosh_5"]["queries"][kind]["hits"] if "whoosh_5" in columns else None
        hits1 = columns["tantivy_1"]["queries"][kind]["hits"] if "tantivy_1" in columns else None
        wg = goals.get(f"whoosh_{where}", {}).get(kind)
        tg = goals.get(f"tantivy_{where}", {}).get(kind)
        rows.append([
            spec.label,
            f"{hits5['median']:,} ({hits5['median_share']:.1%})" if hits5 else None,
            _pair(w), _pair(t),
            f"{_ratio(t['p50_ms'], w['p50_ms'])} / {_ratio(t['p95_ms'], w['p95_ms'])}"
            if w and t else None,
            f"{hits1['median']:,} ({hits1['median_share']:.1%})" if hits1 else None,
            _pair(t1),
            f"p95 < {wg['goal_p95_ms']:.0f}: {_met(wg['met'])}" if wg else None,
            f"p50 < {TANTIVY_P50_MS:.0f}, p95 < {TANTIVY_P95_MS:.0f}: {_met(tg['met'])}" if tg else None,
        ])  # fmt: skip
    return table(
        ["query kind", "hits, 5 roles (median, share)", "whoosh p50 / p95 ms",
         "tantivy p50 / p95 ms", "tantivy / whoosh", "hits, 1 role (median, share)",
         "tantivy 1 role p50 / p95 ms", "goal whoosh 5 roles", "goal tantivy 1 role"],
        rows,
    )  # fmt: skip


def _mib(n: int | None) -> str | None:
    return None if n is None else f"{n / 2**20:,.1f} MiB"


def _other_table(columns: dict[str, Json]) -> list[str]:
    def val(key: str, *path: str) -> Any:
        node: Any = columns.get(key)
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node

    def row(
        label: str, fmt: Callable[[Any], str | None], *path: str, ratio: bool = True
    ) -> list[Any]:
        w, t, t1 = (val(k, *path) for k in ("whoosh_5", "tantivy_5", "tantivy_1"))
        r = (
            _ratio(t, w)
            if ratio and isinstance(w, int | float) and isinstance(t, int | float)
            else None
        )
        return [label, fmt(w), fmt(t), r, fmt(t1)]

    def num(unit: str) -> Callable[[Any], str | None]:
        return lambda v: (
            None if v is None else f"{v:,.2f} {unit}" if v < 100 else f"{v:,.0f} {unit}"
        )

    def vis(v: Any) -> str | None:
        if not isinstance(v, dict):
            return None
        if "p50_ms" not in v:
            return f"{v['timeouts']} of {v['n']} timed out"
        late = f", {v['timeouts']} timed out" if v["timeouts"] else ""
        return f"{v['p50_ms']:.0f} / {v['p95_ms']:.0f} / {v['max_ms']:.0f} ms{late}"

    def sealed(v: Any) -> str | None:
        return None if v is None else ("0 (RAM only)" if v == 0 else _mib(v))

    rows = [
        row("indexing: build from the store [contexts/s]", num("/s"), "build", "contexts_per_s"),
        row("indexing: build time", num("s"), "build", "seconds"),
        row("of it: read + decrypt + parse a context (p50)", num("µs"), "build", "decrypt_extract", "p50_us"),
        row("index at rest: sealed bytes added to the store", sealed, "at_rest", "sealed_bytes", ratio=False),
        row("index at rest: growth of data.mdb", _mib, "at_rest", "mdb_growth_bytes", ratio=False),
        row("process memory growth over the build (RSS)", _mib, "memory", "rss_growth_bytes", ratio=False),
        row("first query after the build", num("ms"), "first_query_ms"),
        row("one term, index as built: p50", num("ms"), "term_as_built", "p50_ms"),
        row("one term, index as built: p95", num("ms"), "term_as_built", "p95_ms"),
        row("restart: `ContextStore.open`", num("ms"), "reopen", "store_open_ms"),
        row("restart: `SearchService.open`", num("s"), "reopen", "search_open_s"),
        row("restart: first query", num("ms"), "reopen", "first_query_ms"),
        row("saved (`put`) → found by search, p50 / p95 / max", vis, "saved", "visible", ratio=False),
        row("deleted → gone from search, p50 / p95 / max", vis, "saved", "gone", ratio=False),
        row("mount: start → `.search/` ready", num("s"), "mount", "ready_s"),
        row("mount: file written → listed in `.search/`, p50 / p95 / max", vis, "mount", "saved", "visible", ratio=False),
        row("mount: file removed → gone from `.search/`, p50 / p95 / max", vis, "mount", "saved", "gone", ratio=False),
    ]  # fmt: skip
    return table(
        ["", "whoosh, 5 roles", "tantivy, 5 roles", "tantivy / whoosh", "tantivy, 1 role"], rows
    )


def _markdown(data: Json) -> list[str]:
    cols: dict[str, Json] = data["columns"]
    sizes = data["sizes"]
    per, one = sizes["per_role"], sizes["one_role"]
    lines = [
        f"### search: {per * len(ROLES):,} contexts in {len(ROLES)} roles ({per:,} per role index) "
        f"and {one:,} in one role; contexts of {data['context_bytes']:,} bytes",
        "",
        f"{sizes['queries']} queries of each kind (p50 / p95 in ms); five roles: through "
        "`SearchService.search` with one role as the caller (one index of "
        f"{per:,} contexts), the roles taken in turn; one role: one index of {one:,}. "
        "Hits: the median number of matches per query and its share of the index.",
        "",
        "**`SearchService.search`** (in process)",
        "",
        *_query_table(cols, "api", data["goals"]),
        "",
        '**Through the mount**: `os.listdir(".search/<query>@role=R")` (five roles; one role: '
        "no `@role`), top 10: reading `.search/<query>@limit=10/.results`, facets: reading "
        "`.search/<query>/.facets`",
        "",
        *_query_table(cols, "mount", data["goals"]),
        "",
        *_other_table(cols),
    ]
    notes = []
    agree = data.get("engines_agree")
    if agree:
        differ = sum(agree.values())
        notes.append(
            "whoosh and tantivy returned the same number of matches for every query"
            if not differ
            else f"whoosh and tantivy totals differ for {differ} queries: {agree}"
        )
    for key, col in cols.items():
        mount = col.get("mount", {})
        if "skipped" in mount:
            notes.append(f"{COLUMNS[key]}: mount skipped: {mount['skipped']}")
            continue
        bad = {k: (v["errors"], v["mismatched"]) for k, v in mount.get("queries", {}).items()
               if v["errors"] or v["mismatched"]}  # fmt: skip
        notes.append(
            f"{COLUMNS[key]}: daemon exit status {mount.get('daemon_exit')}, "
            f"{mount.get('daemon_log_problems')} WARNING/ERROR log lines; "
            + ("every mount query listed what the API returned" if not bad
               else f"mount queries with (errors, mismatches): {bad}")
            + f"; restart rebuilt {col['reopen']['rebuilt_roles']} role index(es), "
            f"same totals after it: {col['reopen']['same_totals']}; "
            f"column {col['column_s']:,.0f} s, load average "
            f"{col['load_1min'][0]:.2f} at the start, {col['load_1min'][1]:.2f} at the end"
        )  # fmt: skip
    lines += ["", *(f"- {n}" for n in notes)]
    return lines


# -- footprint: build rate, size at rest, memory and latency per engine and corpus --------
#
# The `footprint` section runs each engine in a child process of its own (so that its
# resident memory is the engine's, not the generator's), on a one-role store of 4 KB
# contexts from one of two corpora:
#
# * `realistic`: `corpus.generate` with jargon (English-like text, a small vocabulary);
# * `entropy`: words drawn uniformly from a 20,000-word vocabulary of random letters,
#   the corpus the size issue was reported with (every word rare, postings large).
#
# Reported per run: build rate (contexts/s through `SearchService.open` on a store
# without an index), bytes at rest (the sqlite files; whoosh's sealed records) against
# the plaintext bytes indexed, resident memory after the build and after the queries
# and its peak, and p50/p95 of term, AND, phrase, tag and facet queries (no snippets,
# as a listing asks) and of top-10 queries with highlights.

FOOTPRINT_BYTES = 4096
ENTROPY_VOCABULARY = 20_000
FOOTPRINT_TAGS = tuple(f"tag{i:03d}" for i in range(200))
FOOTPRINT_TECH = tuple(f"tech{i:02d}" for i in range(50))
FOOTPRINT_FULL: tuple[tuple[str, int, str], ...] = (
    ("realistic", 10_000, "sqlite"),
    ("realistic", 10_000, "whoosh"),
    ("entropy", 10_000, "sqlite"),
    ("entropy", 10_000, "whoosh"),
    ("entropy", 100_000, "sqlite"),
)
FOOTPRINT_QUICK: tuple[tuple[str, int, str], ...] = (
    ("realistic", 2_000, "sqlite"),
    ("realistic", 2_000, "whoosh"),
    ("entropy", 2_000, "sqlite"),
    ("entropy", 2_000, "whoosh"),
)
FOOTPRINT_KINDS = ("term", "and", "phrase", "tag", "facets", "highlights")


def _entropy_docs(count: int, seed: int = 1) -> Iterator[corpus.Doc]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [
        "".join(rng.choice(letters) for _ in range(rng.randint(3, 10)))
        for _ in range(ENTROPY_VOCABULARY)
    ]
    for i in range(count):
        words: list[str] = []
        n = 0
        while n < FOOTPRINT_BYTES - 200:
            word = rng.choice(vocab)
            words.append(word)
            n += len(word) + 1
        head = [
            "---",
            f"summary: {' '.join(rng.choice(vocab) for _ in range(6))}",
            f"tags: [{', '.join(rng.sample(FOOTPRINT_TAGS, 2))}]",
            f"technologies: [{rng.choice(FOOTPRINT_TECH)}]",
            "---",
        ]
        parts = (f"bench:developer@entropy:t{i // 5000}", f"d{i // 100:04d}", f"c{i:06d}")
        body = "\n".join(head) + "\n" + " ".join(words) + "\n"
        yield corpus.Doc("ucxl://" + "/".join(parts), parts, body.encode())


def _footprint_queries(docs: Sequence[corpus.Doc], n: int, seed: int = 7) -> dict[str, list[str]]:
    """Queries made of words of sampled documents, each word in 0.2-3% of the documents
    (`BANDS`, as the search section picks them): realistic shares, on either corpus."""
    rng = random.Random(seed)
    sample = rng.sample(list(docs), min(len(docs), 4000))
    parsed: list[tuple[list[str], list[str], list[str]]] = []
    df: Counter[str] = Counter()
    for doc in sample:
        head, _, body = doc.data.decode().rpartition("---\n")
        words = [w.lower() for w in _TOKEN.findall(body) if w.lower() not in _STOP]
        lists = dict(_LIST.findall(head))
        tags = [t.strip() for t in lists.get("tags", "").split(",") if t.strip()]
        tech = [t.strip() for t in lists.get("technologies", "").split(",") if t.strip()]
        parsed.append((words, [t for t in tags if " " not in t], [t for t in tech if " " not in t]))
        df.update(set(words))
    lo, hi = BANDS["term"]
    band = {w for w, c in df.items() if lo * len(sample) <= c <= hi * len(sample) and len(w) > 2}
    out: dict[str, list[str]] = {k: [] for k in FOOTPRINT_KINDS}
    while min(len(v) for v in out.values()) < n:
        words, tags, tech = rng.choice(parsed)
        mine = [w for w in words if w in band]
        if len(mine) < 2 or not tags or not tech:
            continue
        a, b = rng.sample(mine, 2)
        at = rng.choice([i for i, w in enumerate(words[:-1]) if w in band])
        for kind, q in (
            ("term", a),
            ("and", f"{a} AND {b}"),
            ("phrase", f'"{words[at]} {words[at + 1]}"'),
            ("tag", f"tags:{tags[0]} {a}"),
            ("facets", f"tags:{tags[0]} technologies:{tech[0]}"),
            ("highlights", b),
        ):
            if len(out[kind]) < n:
                out[kind].append(q)
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _footprint_child(
    cfg_path: str, data_dir: str, engine: str, queries: dict[str, list[str]], out: Any
) -> None:
    """One engine on one store, in a fresh process; puts its figures on `out`."""
    cfg = config.load(
        Path(cfg_path), environ={"HOME": data_dir}, overrides={"node.data_dir": data_dir}
    )
    with ContextStore.open(cfg, None, kdf=KdfParams.weak()) as model:
        contexts = sum(1 for _ in model.store.iter_contexts())
        rss_open = _rss_bytes()
        t0 = time.perf_counter()
        service = SearchService.open(model, engine=engine)
        build_s = time.perf_counter() - t0
        rss_built = _rss_bytes()
        if engine == "sqlite":
            at_rest = _dir_bytes(Path(data_dir) / "index")
        else:
            at_rest = _index_table_bytes(model, [ONE_ROLE])[0]
        latencies: Json = {}
        clock = time.perf_counter_ns
        for kind, texts in queries.items():
            samples: list[int] = []
            totals: list[int] = []
            for text in texts:
                snippets = kind == "highlights"
                t1 = clock()
                result = service.search(
                    text, [ONE_ROLE], limit=10 if snippets else DEFAULT_LIMIT, snippets=snippets
                )
                samples.append(clock() - t1)
                totals.append(result.total)
            latencies[kind] = {**_summary(samples), "hits_median": statistics.median(totals)}
        service.close()
        out.put(
            {
                "contexts": contexts,
                "build_s": round(build_s, 1),
                "build_per_s": round(contexts / build_s),
                "at_rest_bytes": at_rest,
                "rss_open_mb": round(rss_open / 2**20),
                "rss_built_mb": round(rss_built / 2**20),
                "rss_after_queries_mb": round(_rss_bytes() / 2**20),
                "rss_peak_mb": round(_peak_rss_bytes() / 2**20),
                "queries": latencies,
            }
        )


def run_footprint(opts: Options, runs: Sequence[tuple[str, int, str]] | None = None) -> Section:
    """The `footprint` section (see above); `runs` are (corpus, contexts, engine)."""
    import multiprocessing

    runs = runs or (FOOTPRINT_QUICK if opts.quick else FOOTPRINT_FULL)
    base = opts.workdir / f"bench-footprint-{os.getpid()}"
    base.mkdir(parents=True)
    results: list[Json] = []
    stores: dict[tuple[str, int], tuple[Layout, int, dict[str, list[str]]]] = {}
    spawn = multiprocessing.get_context("spawn")
    try:
        for corpus_name, count, engine in runs:
            if (corpus_name, count) not in stores:
                for layout, _, _ in stores.values():
                    shutil.rmtree(layout.data_dir.parent, ignore_errors=True)
                stores.clear()
                gen = (
                    _entropy_docs(count)
                    if corpus_name == "entropy"
                    else corpus.generate(count, size=FOOTPRINT_BYTES, jargon=True)
                )
                docs = list(gen)
                plain = sum(len(d.data) for d in docs)
                queries = _footprint_queries(docs, 50 if opts.quick else 200)
                layout = _layout(base, f"{corpus_name}-{count}", (ONE_ROLE,), docs, {})
                del docs
                stores[(corpus_name, count)] = (layout, plain, queries)
            layout, plain, queries = stores[(corpus_name, count)]
            shutil.rmtree(layout.data_dir / "index", ignore_errors=True)
            load = os.getloadavg()[0]
            print(f"footprint: {corpus_name} {count:,} {engine}", file=sys.stderr)
            out = spawn.Queue()
            child = spawn.Process(
                target=_footprint_child,
                args=(
                    str(layout.data_dir.parent / "roles.toml"),
                    str(layout.data_dir),
                    engine,
                    queries,
                    out,
                ),
            )
            child.start()
            while True:  # a child that dies without an answer must not hang the run
                with contextlib.suppress(queue.Empty):
                    figures = out.get(timeout=5)
                    break
                if not child.is_alive():
                    raise RuntimeError(f"footprint: the {engine} child exited {child.exitcode}")
            child.join()
            figures.update(
                corpus=corpus_name, engine=engine, plaintext_bytes=plain,
                at_rest_ratio=round(figures["at_rest_bytes"] / plain, 2),
                load_1min=[round(load, 2), round(os.getloadavg()[0], 2)],
            )  # fmt: skip
            results.append(figures)
            print(json.dumps(figures), file=sys.stderr)
    finally:
        daemons.remove(base, label="footprint")
    return Section({"runs": results}, _footprint_markdown(results))


def _footprint_markdown(results: Sequence[Json]) -> list[str]:
    head = ["corpus", "contexts", "engine", "build/s", "at rest / text", "RSS built / peak MB"]
    head += [f"{k} p50/p95 ms" for k in FOOTPRINT_KINDS]
    rows = []
    for r in results:
        q = r["queries"]
        rows.append(
            [r["corpus"], f"{r['contexts']:,}", r["engine"], str(r["build_per_s"]),
             f"{r['at_rest_ratio']:.2f}", f"{r['rss_built_mb']} / {r['rss_peak_mb']}"]
            + [f"{q[k]['p50_ms']} / {q[k]['p95_ms']}" for k in FOOTPRINT_KINDS]
        )  # fmt: skip
    return ["## search footprint", "", *table(head, rows), ""]
