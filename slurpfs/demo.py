"""Demo contexts: a small, realistic team history across two projects and three roles.

Used by `slurpfs demo` (and the README's first command) to give a fresh mount
something worth browsing and searching. Every context has history: a first draft
and the current text, so ``.history/<role>/`` and ``~~1`` have something to show.
"""

from __future__ import annotations

from dataclasses import dataclass

from slurpfs.model import BatchItem, ContextStore
from slurpfs.ucxl import parse


@dataclass(frozen=True)
class DemoContext:
    address: str
    role: str
    summary: str
    tags: tuple[str, ...]
    technologies: tuple[str, ...]
    body: str
    influences: tuple[str, ...] = ()

    def render(self) -> bytes:
        return self._render(self.summary, self.body)

    def draft(self) -> bytes:
        """The first version: the summary marked as a draft, the body's first sentence."""
        first = self.body.strip().split(". ", 1)[0].rstrip(".")
        return self._render(f"{self.summary} (draft)", f"{first}. To be expanded.")

    def _render(self, summary: str, body: str) -> bytes:
        lines = ["---", f"summary: {summary}", f"tags: [{', '.join(self.tags)}]"]
        lines.append(f"technologies: [{', '.join(self.technologies)}]")
        if self.influences:
            lines.append(f"influences: [{', '.join(self.influences)}]")
        lines += ["---", body.strip(), ""]
        return "\n".join(lines).encode()


AUTH = "ucxl://claude:architect@bzzz:auth"
SEARCH = "ucxl://gpt:developer@hive:search"

_TOPICS: list[tuple[str, str, tuple[str, ...], tuple[str, ...], str]] = [
    (
        f"{AUTH}",
        "Authentication service for the bzzz public API",
        ("security", "backend"),
        ("go",),
        "Everything under this address is about how callers prove who they are. Tokens, sessions "
        "and key rotation live here; authorisation decisions live in the policy service.",
    ),
    (
        f"{AUTH}/src",
        "Go sources of the auth service",
        ("backend",),
        ("go",),
        "The package layout follows the request path: middleware, validation, session store.",
    ),
    (
        f"{AUTH}/src/auth.go",
        "JWT validation for the public API",
        ("security", "backend"),
        ("go", "jwt"),
        "Tokens are validated against the rotating key set because a leaked signing key must be "
        "revocable within one rotation period. We accept the previous key for 24 hours so that "
        "long-lived mobile sessions survive a rotation.",
    ),
    (
        f"{AUTH}/src/session.go",
        "Server-side sessions backed by Redis",
        ("security", "sessions"),
        ("go", "redis"),
        "Sessions are opaque random identifiers; the session record lives in Redis with a sliding "
        "TTL. We chose opaque identifiers over stateless tokens for browser sessions so that "
        "logout is immediate.",
    ),
    (
        f"{AUTH}/src/keys/rotation.go",
        "Signing-key rotation job",
        ("security", "operations"),
        ("go", "jwt", "cron"),
        "A new signing key is generated every 7 days; the old key stays valid for verification "
        "for one more period. Rotation is idempotent and safe to run on every replica.",
    ),
    (
        f"{AUTH}/src/middleware/ratelimit.go",
        "Per-client rate limiting",
        ("security", "performance"),
        ("go", "redis"),
        "Token bucket per client id, stored in Redis. Limits are deliberately generous for "
        "authenticated clients; credential-stuffing shows up as many failed logins per IP, "
        "which has its own stricter bucket.",
    ),
    (
        f"{AUTH}/docs/decisions/0001-jwt.md",
        "Decision: JWT for service-to-service calls",
        ("decision", "security"),
        ("jwt",),
        "Context: services call each other without a shared session store. Decision: short-lived "
        "JWTs (5 minutes) signed by the auth service. Consequence: clock skew must stay under 30 s.",
    ),
    (
        f"{AUTH}/docs/decisions/0002-argon2.md",
        "Decision: Argon2id for password hashing",
        ("decision", "security"),
        ("argon2",),
        "bcrypt's 72-byte limit and fixed memory cost were the reasons to move. Parameters are "
        "tuned so that one hash takes about 250 ms on the login pods.",
    ),
    (
        f"{AUTH}/tests/auth_test.go",
        "Table-driven tests of token validation",
        ("testing",),
        ("go",),
        "Every rejection path has a case: expired, not yet valid, wrong audience, unknown key id, "
        "algorithm none, and a token signed with a rotated-out key.",
    ),
    (
        f"{AUTH}/deploy/helm/values.yaml",
        "Deployment values for the auth service",
        ("operations", "deployment"),
        ("kubernetes", "helm"),
        "Three replicas across zones; the rotation job runs as a CronJob with a lease so only one "
        "replica rotates at a time.",
    ),
    (
        f"{SEARCH}",
        "Search service for the hive knowledge base",
        ("search", "backend"),
        ("python",),
        "Indexes decision records and design notes; answers queries from agents and people.",
    ),
    (
        f"{SEARCH}/indexer/pipeline.py",
        "Batching indexer fed by the commit stream",
        ("search", "performance"),
        ("python", "whoosh"),
        "Commits arrive on a bounded queue; the indexer batches them for up to 200 ms so that an "
        "editor's burst of saves becomes one index write. Deletions are applied in the same batch.",
    ),
    (
        f"{SEARCH}/indexer/tokenize.py",
        "Tokenizer for code and prose",
        ("search",),
        ("python",),
        "Identifiers are split on camelCase and snake_case so that searching for 'rotation' finds "
        "'KeyRotation' and 'key_rotation'.",
    ),
    (
        f"{SEARCH}/query/ranking.py",
        "Ranking: BM25F with field boosts",
        ("search", "ranking"),
        ("python", "whoosh"),
        "Summary and tags are boosted over body text because people put the why there; the boost "
        "values came from an offline evaluation on 300 labelled queries.",
    ),
    (
        f"{SEARCH}/query/facets.py",
        "Facet counts per tag and technology",
        ("search",),
        ("python",),
        "Facets are computed over the hits the caller may read only; counting across roles would "
        "leak the existence of hidden documents.",
    ),
    (
        f"{SEARCH}/api/server.py",
        "HTTP API of the search service",
        ("backend", "api"),
        ("python", "trio"),
        "One trio nursery holds the server, the indexer and the metrics endpoint; shutdown cancels "
        "the nursery and waits for the indexer to flush.",
    ),
    (
        f"{SEARCH}/docs/decisions/0003-per-role-index.md",
        "Decision: one index per reader role",
        ("decision", "search", "security"),
        ("whoosh",),
        "A shared index with a role filter leaks through scores and term statistics. One index per "
        "role costs disk space and keeps need-to-know intact.",
    ),
    (
        f"{SEARCH}/ops/runbook.md",
        "Runbook: rebuilding an index",
        ("operations", "search"),
        ("python",),
        "Rebuild one role at a time; queries keep working on the old index until the new one is "
        "swapped in atomically.",
    ),
]

_ROLE_NOTES = {
    "developer": "Implementation notes: edge cases and the tests that pin them down.",
    "architect": "Architecture notes: the trade-off taken and what would make us revisit it.",
    "reviewer": "Review notes: what to check in every change to this part.",
}


def contexts() -> list[DemoContext]:
    """A few dozen contexts: each topic for one to three roles, with role-specific text."""
    out: list[DemoContext] = []
    for i, (address, summary, tags, tech, body) in enumerate(_TOPICS):
        roles = ("developer", "architect", "reviewer")[: 1 + i % 3]
        for role in roles:
            text = f"{body}\n\n{_ROLE_NOTES[role]}\n"
            influences = (_TOPICS[i - 1][0],) if i and "decision" in tags else ()
            out.append(DemoContext(address, role, summary, tags, tech, text, influences))
    return out


def load(model: ContextStore) -> int:
    """Store the demo contexts, each as a draft and then its current text (one batch
    per version); returns how many contexts were stored."""
    committed = 0
    for version in (DemoContext.draft, DemoContext.render):
        items = [BatchItem(parse(c.address), c.role, version(c)) for c in contexts()]
        report = model.put_many(items)
        if report.failed:
            raise RuntimeError(f"demo contexts failed: {report.failed}")
        committed = len(report.committed)
    model.sync()
    return committed
