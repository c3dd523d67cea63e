"""A deterministic corpus of realistic contexts: YAML front matter plus varied prose.

Every document is exactly `size` bytes of ASCII text. The text is assembled from
sentence templates, a few hundred technical words, generated identifiers, paths
and numbers, so that zstd compresses a 4 KiB document about as well as real
engineering prose (2-2.5x), not like random bytes (1x) or a repeated string (100x).
With ``jargon=True`` (the search benchmark) sentences also name project words of
a Zipf-like vocabulary, so that words exist at every document frequency.
"""

from __future__ import annotations

import random
from bisect import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate

ROLE = "developer"

_AGENTS = ("claude", "gpt", "gemini", "alice", "bob", "ci")
_PROJECTS = ("bzzz", "hive", "whoosh", "ledger", "atlas", "relay")
_TASKS = ("auth", "storage", "search", "billing", "ui", "infra", "sync", "api")
_DIRS = (
    "src", "internal", "pkg", "cmd", "lib", "services", "handlers", "models", "store",
    "crypto", "net", "api", "web", "jobs", "config", "tests", "docs", "migrations",
)  # fmt: skip
_EXTS = (".go", ".py", ".rs", ".ts", ".md", ".sql", ".yaml", ".proto")

_NOUNS = (
    "token", "session", "key set", "cache", "index", "query planner", "scheduler", "worker pool",
    "replica", "leader", "follower", "snapshot", "write-ahead log", "compaction", "shard",
    "tenant", "request", "response", "handler", "middleware", "router", "connection pool",
    "transaction", "lock", "lease", "heartbeat", "timeout", "retry budget", "rate limiter",
    "circuit breaker", "queue", "consumer", "producer", "offset", "checkpoint", "manifest",
    "schema", "migration", "column", "bloom filter", "page", "segment", "tombstone", "bucket",
    "object", "blob", "chunk", "digest", "signature", "certificate", "nonce", "cipher",
    "envelope", "role", "permission", "policy", "audit trail", "metric", "histogram",
    "trace", "span", "log line", "alert", "dashboard", "deployment", "rollout", "canary",
    "feature flag", "config file", "secret", "vault", "build", "pipeline", "artifact",
    "container", "volume", "mount", "inode", "directory", "symlink", "parser", "lexer",
    "serializer", "codec", "buffer", "stream", "socket", "peer", "gossip message", "quorum",
    "vector clock", "conflict", "merge", "diff", "patch", "version", "branch", "release",
)  # fmt: skip
_VERBS = (
    "validates", "rotates", "caches", "evicts", "retries", "batches", "flushes", "serialises",
    "rejects", "accepts", "forwards", "replays", "signs", "verifies", "encrypts", "decrypts",
    "compresses", "indexes", "prunes", "merges", "splits", "schedules", "throttles", "drains",
    "renews", "revokes", "tracks", "records", "exports", "imports", "hydrates", "snapshots",
    "migrates", "reconciles", "deduplicates", "streams", "buffers", "pins", "shards", "locks",
)  # fmt: skip
_ADJS = (
    "stale", "expired", "concurrent", "idempotent", "partial", "corrupt", "untrusted",
    "rotating", "cold", "warm", "hot", "large", "small", "pending", "orphaned", "duplicate",
    "signed", "sealed", "encrypted", "compressed", "cached", "replicated", "local", "remote",
    "slow", "flaky", "noisy", "critical", "optional", "legacy", "experimental", "deprecated",
)  # fmt: skip
_REASONS = (
    "the upstream provider rate-limits bursts",
    "clients on old releases still send the legacy header",
    "a crash between the two writes left orphaned rows last quarter",
    "the p99 latency budget for this path is tight",
    "auditors asked for a complete trail of every decision",
    "the previous design leaked memory under sustained load",
    "replicas may observe writes in a different order",
    "we cannot trust the clock on edge devices",
    "the data set no longer fits in memory on small nodes",
    "operators need to roll back without downtime",
    "a security review flagged the old behaviour",
    "retries without jitter caused a thundering herd",
    "the vendor library is not safe for concurrent use",
    "support tickets showed users hitting this weekly",
    "the batch job overlaps with the nightly backup window",
    "we want the same behaviour on every platform",
)  # fmt: skip
_TECH = (
    "go", "python", "rust", "typescript", "postgres", "redis", "kafka", "grpc", "jwt",
    "oauth2", "lmdb", "zstd", "libsodium", "kubernetes", "terraform", "nginx", "s3",
    "prometheus", "opentelemetry", "sqlite", "protobuf", "graphql", "react", "wasm",
)  # fmt: skip
_TAGS = (
    "security", "backend", "frontend", "performance", "reliability", "storage", "api",
    "compliance", "observability", "migration", "testing", "ops", "ux", "data", "crypto",
)  # fmt: skip
_TEMPLATES = (
    "The {n1} {v1} every {a1} {n2} because {r}.",
    "We keep the {n1} {a1} on purpose: {r}.",
    "`{ident}` {v1} the {n1} before the {n2} is {a1}; see {path}.",
    "If the {n1} is {a1}, the {n2} {v1} it and logs `{ident}` with code {num}.",
    "Decision {num}: the {n1} {v1} the {n2} at most {num2} times, since {r}.",
    "Note that {path} {v1} the {n1} in a background task every {num2} ms.",
    "Do not remove the {a1} check in `{ident}`; {r}.",
    "An alternative was to let the {n2} handle it, but {r}.",
    "Benchmarks on {num2} nodes showed the {n1} at {num} requests per second.",
    "The {n1} and the {n2} share `{ident}`, which {v1} {a1} entries.",
    "Ownership of the {n1} moved to the {team} team in release {ver}.",
    "Open question: should the {n1} {v2} the {n2} when it is {a1}?",
    "Changing the {n1} format needs a migration, because {r}.",
    "Tests in {path} cover the {a1} {n1} and the {a2} {n2}.",
)  # fmt: skip
_TEAMS = ("platform", "identity", "storage", "search", "payments", "infra", "mobile", "sre")


@dataclass(frozen=True, slots=True)
class Doc:
    """One context: its UCXL address, the mount path parts below `ucxl/`, and its bytes."""

    address: str
    parts: tuple[str, ...]  # (authority, p1, ..., pn); the role file is parts + (ROLE,)
    data: bytes


def _stem(verb: str) -> str:
    """'verifies' -> 'verify', 'pushes' -> 'push', 'signs' -> 'sign'."""
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("shes", "ches", "sses", "xes")):
        return verb[:-2]
    return verb[:-1]


def _ident(rng: random.Random) -> str:
    words = [rng.choice(_NOUNS).title().replace(" ", "").replace("-", "") for _ in range(2)]
    return f"{_stem(rng.choice(_VERBS))}{words[0]}{words[1]}()"


def _path(rng: random.Random) -> str:
    depth = rng.randint(1, 3)
    dirs = "/".join(rng.choice(_DIRS) for _ in range(depth))
    name = rng.choice(_NOUNS).replace(" ", "_")
    return f"{dirs}/{name}{rng.choice(_EXTS)}"


def _sentence(rng: random.Random) -> str:
    return rng.choice(_TEMPLATES).format(
        n1=rng.choice(_NOUNS), n2=rng.choice(_NOUNS), v1=rng.choice(_VERBS),
        v2=_stem(rng.choice(_VERBS)), a1=rng.choice(_ADJS), a2=rng.choice(_ADJS),
        r=rng.choice(_REASONS), ident=_ident(rng), path=_path(rng),
        num=rng.randint(2, 99_999), num2=rng.choice((2, 3, 5, 8, 16, 30, 64, 250, 1000)),
        team=rng.choice(_TEAMS), ver=f"{rng.randint(0, 9)}.{rng.randint(0, 40)}",
    )  # fmt: skip


# -- project jargon (search corpus) ----------------------------------------------------
#
# The words above are a few hundred, each in a large share of the documents: a
# one-word query on them matches 10-60% of an index. Real engineering text also
# has a long tail of project words (service, customer, incident and component
# names) used at every frequency. `JARGON` is such a vocabulary: 4,000
# pronounceable made-up words drawn with Zipf-like weights (word n with weight
# 1/(n+3)), so that words at every document frequency exist, from about half of
# the documents down to a handful, as in real prose.

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "pr", "r", "s",
           "st", "t", "tr", "v", "z", "sk", "pl", "h")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
_CODAS = ("n", "r", "l", "x", "k", "m", "s", "th", "nd", "rk", "ld", "sh", "")
JARGON_WORDS = 4000
_JARGON_TEMPLATES = (
    "The {j1} service {v1} the {n1} before it reaches {j2}.",
    "Incident {j1}-{num} came from a {a1} {n1} in the {j2} cluster.",
    "`{ident}` in {j1} {v1} the {n1}; {j2} does not.",
    "Ask the {team} team before changing how {j1} handles the {n1}.",
    "{J1} and {j2} both read the {a1} {n1} from {path}.",
    "The {j1} dashboard shows the {n1} {v1} {num2} times a minute.",
    "Customer {J1} reported a {a1} {n1} after release {ver}.",
    "We moved the {n1} out of {j1} into {j2} because {r}.",
)  # fmt: skip


def _jargon_words() -> tuple[str, ...]:
    rng = random.Random(7)
    taken = {w for group in (_NOUNS, _VERBS, _ADJS, _TECH, _TAGS, _TEAMS, _DIRS)
             for phrase in group for w in phrase.split()}  # fmt: skip
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < JARGON_WORDS:
        word = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS)
                + rng.choice(_VOWELS) + rng.choice(_CODAS))  # fmt: skip
        if word not in seen and word not in taken:
            seen.add(word)
            words.append(word)
    return tuple(words)


JARGON = _jargon_words()
"""Project jargon in order of frequency (the first is the most common)."""
_JARGON_CUMULATIVE = tuple(accumulate(1.0 / (rank + 3) for rank in range(JARGON_WORDS)))


def _jargon(rng: random.Random) -> str:
    return JARGON[bisect(_JARGON_CUMULATIVE, rng.random() * _JARGON_CUMULATIVE[-1])]


def _jargon_sentence(rng: random.Random) -> str:
    j1, j2 = _jargon(rng), _jargon(rng)
    return rng.choice(_JARGON_TEMPLATES).format(
        j1=j1, J1=j1.title(), j2=j2, n1=rng.choice(_NOUNS), v1=rng.choice(_VERBS),
        a1=rng.choice(_ADJS), r=rng.choice(_REASONS), ident=_ident(rng), path=_path(rng),
        num=rng.randint(2, 99_999), num2=rng.choice((2, 3, 5, 8, 16, 30, 64, 250, 1000)),
        team=rng.choice(_TEAMS), ver=f"{rng.randint(0, 9)}.{rng.randint(0, 40)}",
    )  # fmt: skip


def _mixed_sentence(rng: random.Random) -> str:
    return _jargon_sentence(rng) if rng.random() < 0.45 else _sentence(rng)


def _authority(rng: random.Random) -> str:
    return f"{rng.choice(_AGENTS)}:architect@{rng.choice(_PROJECTS)}:{rng.choice(_TASKS)}"


def _document(
    rng: random.Random,
    address: str,
    size: int,
    sentence: Callable[[random.Random], str] = _sentence,
) -> bytes:
    lines = [
        "---",
        f"summary: {sentence(rng)}",
        f"purpose: {sentence(rng)}",
        f"tags: [{', '.join(rng.sample(_TAGS, rng.randint(1, 4)))}]",
        f"technologies: [{', '.join(rng.sample(_TECH, rng.randint(1, 4)))}]",
        "insights:",
        *(f"  - {sentence(rng)}" for _ in range(rng.randint(1, 3))),
        f"influences: [ucxl://{_authority(rng)}/{_path(rng)}]",
        "---",
        f"# {address.rsplit('/', 1)[-1]}",
        "",
    ]
    text = "\n".join(lines) + "\n"
    while len(text) < size:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(2, 6)))
        if rng.random() < 0.15:
            paragraph = f"## {rng.choice(_ADJS).title()} {rng.choice(_NOUNS)}\n\n{paragraph}"
        text += paragraph + "\n\n"
    return text[: size - 1].encode("ascii") + b"\n"


def generate(count: int, size: int = 4096, seed: int = 1, *, jargon: bool = False) -> Iterator[Doc]:
    """`count` documents at distinct addresses: 40 per directory, 200 per authority in turn.

    With `jargon`, about 45% of the sentences also name project jargon (see
    `_jargon_sentence`); the search benchmark uses it. Without, the documents are
    byte for byte those of earlier runs.
    """
    rng = random.Random(seed)
    sentence = _mixed_sentence if jargon else _sentence
    authorities = sorted({_authority(rng) for _ in range(40)})[:12]
    for i in range(count):
        authority = authorities[(i // 200) % len(authorities)]
        directory = f"{_DIRS[(i // 40) % len(_DIRS)]}/m{i // 40:04d}"  # 40 addresses each
        stem = rng.choice(_NOUNS).replace(" ", "_").replace("-", "_")
        name = f"{stem}_{i:05d}{rng.choice(_EXTS)}"
        parts = (authority, *directory.split("/"), name)
        address = "ucxl://" + "/".join(parts)
        yield Doc(address, parts, _document(rng, address, size, sentence))
