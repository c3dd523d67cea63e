"""``slurpfs backup keys init | create | list | verify | restore | prune``.

Handlers take ``(args, config, passphrase)`` and return an exit code like every
other command: 0 success, 5 a backup that fails verification, 3 a backup or
key file that is not there, 7 no backup key yet; others as ``slurpfs --help``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slurpfs.backup import catalog, create, prune, restore, verify
from slurpfs.backup import format as fmt
from slurpfs.backup import keys as backup_keys
from slurpfs.config import Config
from slurpfs.crypto.keystore import KdfParams
from slurpfs.errors import NotFound
from slurpfs.model import ContextStore

Opener = Callable[[Config, bytes | None], ContextStore]
Progress = Callable[[int, int], None]


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif text:
        print(text)


@contextmanager
def _bar(args: argparse.Namespace, what: str) -> Iterator[Progress | None]:
    """A progress bar on a terminal (not with --json); None elsewhere."""
    if args.json or not sys.stderr.isatty():
        yield None
        return
    bar = tqdm(desc=what, unit=" versions", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = max(total, done)
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _at(text: str) -> int:
    """--at: an ISO-8601 time (UTC unless it says otherwise), as epoch ms."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time (e.g. 2026-11-26T10:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _locate(path: Path) -> tuple[Path, str]:
    """(destination, backup id) for a backup's directory, or the newest in a destination."""
    if (path / fmt.MANIFEST).exists():
        return path.parent, path.name
    found = catalog.ids(path)
    if not found:
        raise NotFound(f"no backups in {path}")
    return path, found[-1]


def _row(entry: catalog.Entry) -> dict[str, Any]:
    m = entry.manifest
    return {
        "id": entry.id,
        "kind": m["kind"],
        "parent": m["parent"],
        "created": m["created"],
        "node": m["node"],
        "sequence": m["sequence"],
        "versions": m["counts"]["versions"],
        "live": m["counts"]["live"],
        "bytes": sum(int(f["size"]) for f in m["files"]),
    }


class BackupCommands:
    def __init__(self, opener: Opener, kdf: Callable[[], KdfParams]) -> None:
        self.opener = opener
        self.kdf = kdf

    def run(self, args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        handler: Callable[[argparse.Namespace, Config, bytes | None], int] = getattr(
            self, "_" + args.backup_cmd
        )
        return handler(args, cfg, passphrase)

    def _keys(self, args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        out = args.private_key or cfg.data_dir / "backup.key"
        public = backup_keys.init(cfg.data_dir, out, force=args.force)
        _emit(
            args,
            {"public_key": bytes(public).hex(), "private_key": str(out)},
            f"backup public key: {bytes(public).hex()}\nprivate key written to {out}:"
            " move it offline; it is needed to restore, never to back up",
        )
        return 0

    def _create(self, args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        with self.opener(cfg, passphrase) as model, _bar(args, "backup") as bar:
            made = create.create(model, Path(args.dest), full=args.full, progress=bar)
        _emit(
            args,
            {
                "id": made.id,
                "kind": made.kind,
                "parent": made.parent,
                "why_full": made.why_full,
                "versions": made.versions,
                "bytes": made.bytes,
                "path": str(made.path),
            },
            f"{made.kind} backup {made.id}: {made.versions} versions, {made.bytes} bytes"
            + (f" (on {made.parent})" if made.parent else f" ({made.why_full})"),
        )
        return 0

    def _list(self, args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        dest = Path(args.dest)
        rows = [_row(catalog.load(dest, i)) for i in catalog.ids(dest)]
        _emit(
            args,
            rows,
            "\n".join(
                f"{r['id']}  {r['kind']:<11} {r['versions']:>9} versions {r['bytes']:>12} bytes"
                f"  seq {r['sequence']}"
                for r in rows
            )
            or f"no backups in {dest}",
        )
        return 0

    def _verify(self, args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        path = Path(args.dest)
        dest, ids = (path.parent, [path.name]) if (path / fmt.MANIFEST).exists() else (path, None)
        private = backup_keys.load_private(args.key) if args.key else None
        report = verify.verify(dest, ids, node=args.node, private=private)
        summary = (
            f"{len(report.checked)} backups verified"
            + (" (contents opened with the backup key)" if private else "")
            + (": clean" if report.ok else f"; {len(report.problems)} problems")
        )
        _emit(
            args,
            {"ok": report.ok, "checked": report.checked, "problems": report.problems},
            "\n".join([*report.problems, summary]),
        )
        return 0 if report.ok else 5

    def _restore(self, args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        dest, backup_id = _locate(Path(args.backup))
        private = backup_keys.load_private(args.key)
        with _bar(args, "restore") as bar:
            done = restore.restore(
                dest,
                backup_id,
                cfg.data_dir,
                private,
                passphrase=passphrase,
                kdf=self.kdf(),
                at_ms=args.at,
                progress=bar,
            )
        _emit(
            args,
            {
                "data_dir": str(done.data_dir),
                "backup": backup_id,
                "chain": done.backups,
                "versions": done.versions,
                "contexts": done.contexts,
                "audit_entries": done.audit_entries,
            },
            f"restored {backup_id} ({done.backups} backups in its chain) into {done.data_dir}:"
            f" {done.versions} versions of {done.contexts} contexts, {done.audit_entries}"
            " audit entries",
        )
        return 0

    def _prune(self, args: argparse.Namespace, cfg: Config, passphrase: bytes | None) -> int:
        policy = prune.Policy(args.keep_daily, args.keep_weekly, args.keep_monthly)
        result = prune.prune(Path(args.dest), policy, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        _emit(
            args,
            {"kept": result.kept, "removed": result.removed, "dry_run": args.dry_run},
            "\n".join(f"{verb} {i}" for i in result.removed)
            + f"\n{len(result.kept)} kept, {len(result.removed)} {verb}",
        )
        return 0


def register(
    subparsers: Any,  # argparse._SubParsersAction, which is private
    common: argparse.ArgumentParser,
    *,
    opener: Opener,
    kdf: Callable[[], KdfParams],
) -> None:
    """Add ``backup`` and its subcommands to the ``slurpfs`` parser."""
    commands = BackupCommands(opener, kdf)
    p = subparsers.add_parser(
        "backup",
        parents=[common],
        help="encrypted, signed, incremental backups of the store",
        description="Backups: encrypted to the backup key, signed by the node.",
    )
    p.set_defaults(handler=commands.run)
    sub = p.add_subparsers(dest="backup_cmd", required=True)
    kp = sub.add_parser("keys", parents=[common], help="the backup key pair")
    ksub = kp.add_subparsers(dest="keys_cmd", required=True)
    ki = ksub.add_parser("init", parents=[common], help="make the backup key pair")
    ki.add_argument(
        "--private-key", type=Path, help="where to write the private key (default: DATA/backup.key)"
    )
    ki.add_argument("--force", action="store_true", help="replace an existing backup key")
    c = sub.add_parser("create", parents=[common], help="make a backup (incremental if it can)")
    c.add_argument("dest", metavar="DEST")
    c.add_argument(
        "--full", action="store_true", help="a full backup even if one could build on another"
    )
    ls = sub.add_parser("list", parents=[common], help="list the backups in DEST")
    ls.add_argument("dest", metavar="DEST")
    v = sub.add_parser("verify", parents=[common], help="check backups without restoring them")
    v.add_argument("dest", metavar="DEST|BACKUP")
    v.add_argument("--node", help="the node id (hex) the backups must be signed by")
    v.add_argument("--key", type=Path, help="the backup private key: also open every frame")
    r = sub.add_parser(
        "restore", parents=[common], help="restore a backup into a new data directory (--data)"
    )
    r.add_argument("backup", metavar="BACKUP", help="a backup's directory, or DEST for its newest")
    r.add_argument("--key", type=Path, required=True, help="the backup private key file")
    r.add_argument("--at", type=_at, help="restore as of this time (ISO-8601, UTC by default)")
    pr = sub.add_parser("prune", parents=[common], help="remove backups past the retention")
    pr.add_argument("dest", metavar="DEST")
    pr.add_argument("--keep-daily", type=int, default=7)
    pr.add_argument("--keep-weekly", type=int, default=4)
    pr.add_argument("--keep-monthly", type=int, default=6)
    pr.add_argument("--dry-run", action="store_true")
