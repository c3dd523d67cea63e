"""``slurpfs search`` and ``slurpfs index rebuild``.

`register` adds both subcommands to the ``slurpfs`` parser; their handlers take
``(args, config, passphrase)`` and return an exit code like every other
command. Exit codes: 0 success (also when nothing matches), 2 the query does
not parse, 4 a role the caller may not read, others as ``slurpfs --help`` lists.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from slurpfs.config import Config
from slurpfs.index.query import parse_query_name
from slurpfs.index.render import dumps, result_json, result_lines
from slurpfs.index.service import Progress, SearchService
from slurpfs.model import ContextStore

Opener = Callable[[Config, bytes | None], ContextStore]
Handler = Callable[[argparse.Namespace, Config, bytes | None], int]


def _default_opener(cfg: Config, passphrase: bytes | None) -> ContextStore:
    return ContextStore.open(cfg, passphrase)


@contextmanager
def _progress(args: argparse.Namespace, what: str) -> Iterator[Progress | None]:
    """A progress bar on a terminal (not with --json); None elsewhere."""
    if getattr(args, "json", False) or not sys.stderr.isatty():
        yield None
        return
    bar = tqdm(desc=what, unit=" contexts", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def search_command(opener: Opener) -> Handler:
    def handler(args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        spec = parse_query_name(args.query)
        limit = args.limit if args.limit is not None else spec.limit
        role = args.role if args.role is not None else spec.role
        with opener(cfg, passphrase) as model:
            caller = (
                [r.strip() for r in args.as_roles.split(",") if r.strip()]
                if args.as_roles
                else model.held_roles()
            )
            with _progress(args, "indexing") as progress:
                service = SearchService.open(model, progress=progress)
            with service:
                result = service.search(spec.text, caller, role=role, limit=limit)
            model.sync()
        if args.json:
            print(dumps(result_json(result)))
        else:
            print(result_lines(result, color=sys.stdout.isatty()))
        return 0

    return handler


def rebuild_command(opener: Opener) -> Handler:
    def handler(args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        with opener(cfg, passphrase) as model:
            service = SearchService.open(model, catch_up=False)
            with service:
                roles = [args.role] if args.role else list(service.roles)
                with _progress(args, "rebuilding") as progress:
                    indexed = service.rebuild(roles, progress=progress)
                counts = {r: service.doc_count(r) for r in roles}
            model.sync()
        report: dict[str, Any] = {"engine": service.engine, "indexed": indexed, "documents": counts}
        if args.json:
            print(dumps(report))
        else:
            for role, n in counts.items():
                print(f"{role}: {n} documents")
            print(f"rebuilt {len(roles)} {service.engine} index(es), {indexed} documents written")
        return 0

    return handler


def register(
    subparsers: Any,  # argparse._SubParsersAction, which is private
    common: argparse.ArgumentParser,
    *,
    opener: Opener | None = None,
) -> None:
    """Add ``search`` and ``index`` to the ``slurpfs`` parser.

    `common` carries the shared options (``--data``, ``--json``, ...); `opener`
    opens the model (the CLI passes its own, which prompts for a passphrase).
    """
    open_model = opener or _default_opener
    p = subparsers.add_parser(
        "search",
        parents=[common],
        help="search the contexts this node's roles may read",
        description="Search contexts. QUERY uses whoosh syntax (words, field:value, "
        '"phrases", AND/OR/NOT, parentheses) and may end with @limit=N and @role=ROLE, '
        "as names under .search/ do.",
    )
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--role", help="only hits in this role's files")
    p.add_argument("--limit", type=int, help="at most this many hits (default 50)")
    p.add_argument(
        "--as", dest="as_roles", metavar="ROLES", help="search as a caller holding only these roles"
    )
    p.set_defaults(handler=search_command(open_model))

    p = subparsers.add_parser(
        "index", parents=[common], help="manage the search index", description="Search index."
    )
    sub = p.add_subparsers(dest="index_cmd", required=True, metavar="COMMAND")
    rp = sub.add_parser(
        "rebuild",
        parents=[common],
        help="rebuild the search index from the store",
        description="Rebuild the search index of every role (or one) from the store.",
    )
    rp.add_argument("--role", help="rebuild only this role's index")
    p.set_defaults(handler=rebuild_command(open_model))
