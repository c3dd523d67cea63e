"""fsck of the search index: does the index at rest agree with the store?

Only an engine that keeps its index at rest (sqlite, whoosh) has anything to
check; a tantivy index is rebuilt from the store whenever it is opened.
"""

from __future__ import annotations

from slurpfs.errors import KeyMissing
from slurpfs.index.document import doc_key
from slurpfs.index.engine import ENGINES, engine_setup
from slurpfs.index.sealed import IndexCorrupt, IndexOutdated, SealedIndexStore
from slurpfs.model import ContextStore

MAX_PROBLEMS_PER_ROLE = 20


def check_index(model: ContextStore) -> list[str]:
    """Problems of the saved search indexes, as lines for `slurpfs fsck`.

    Reports an index that fails authentication or is an older set than its
    manifest, a document missing for a live context, a document for a context
    that is deleted or gone, and a document of another version than the head.
    Changes committed after the index was saved are not problems (the indexer
    applies them when it runs). A role never indexed is not a problem either, nor
    an index saved with an older schema (rebuilt when the search service opens).
    """
    engine = ENGINES[model.config.search.engine]
    if not engine.persistent:
        return []
    store = model.store
    problems: list[str] = []
    roles = sorted(model.held_roles())
    for role in roles:
        sealed = SealedIndexStore(store, lambda: model.keyring, role)
        try:
            index = engine.load(role, engine_setup(model, sealed, roles=len(roles)))
        except (IndexCorrupt, KeyMissing) as exc:
            problems.append(f"search index of role {role}: {exc}")
            continue
        except IndexOutdated:
            continue  # not a problem: the search service rebuilds it when it opens
        if index is None:
            continue
        try:
            documents = index.documents()
        finally:
            index.close()
        pending: set[str] = set()
        seq = index.seq
        while True:
            last, records = store.changes_since(seq)
            pending.update(doc_key(r.address, r.role) for r in records)
            if last == seq:
                break
            seq = last
        expected: dict[str, str] = {}
        for address, file_role, leaves in store.iter_contexts():
            if file_role not in model.config.roles or role not in model.config.readers_of(
                file_role
            ):
                continue
            head = store.record(leaves[0]) if leaves else None
            if head is not None and not head.deleted:
                expected[doc_key(address, file_role)] = head.version_id.hex()
        found: list[str] = []
        for key in sorted(expected.keys() | documents.keys()):
            if key in pending:
                continue
            where = "{} [{}]".format(*key.split("\0", 1))
            if key not in documents:
                found.append(f"search index of role {role}: {where} is not indexed")
            elif key not in expected:
                found.append(f"search index of role {role}: {where} is indexed but not live")
            elif documents[key] != expected[key]:
                found.append(
                    f"search index of role {role}: {where} is indexed at version "
                    f"{documents[key][:16]}, the head is {expected[key][:16]}"
                )
        if len(found) > MAX_PROBLEMS_PER_ROLE:
            more = len(found) - MAX_PROBLEMS_PER_ROLE
            found = [*found[:MAX_PROBLEMS_PER_ROLE], f"search index of role {role}: {more} more"]
        problems.extend(found)
    return problems
