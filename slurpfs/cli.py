"""The `slurpfs` command.

Exit codes (also in README.md):
  0 success          1 other failure     2 usage error
  3 not found        4 access denied     5 corrupt data (failed authentication)
  6 invalid address  7 not initialised / bad configuration
  8 store full or context too large      9 partial failure (import/export/fsck)
 10 cannot mount or unmount (mountpoint missing or busy, no /dev/fuse, data in use)
 11 not merged (`merge`: versions stay conflicts; the reasons listed)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from slurpfs import audit, compact, config, fsck
from slurpfs.backup import cli as backup_cli
from slurpfs.crypto.keystore import KdfParams, Keystore
from slurpfs.errors import (
    InvalidAddress,
    NotFound,
    NotInitialised,
    SlurpError,
    WrongPassphrase,
    exit_code,
)
from slurpfs.index import cli as index_cli
from slurpfs.index.check import check_index
from slurpfs.model import (
    BatchItem,
    ContextStore,
    ContextTooLarge,
    VersionInfo,
    data_paths,
    verify_audit,
)
from slurpfs.net import peerscmd
from slurpfs.net.merge import merge_context
from slurpfs.service import control, mountcmd
from slurpfs.ucxl import Address, Authority, Temporal, parse

EXIT_PARTIAL = 9
EXIT_UNMERGED = 11
TTL_MAX_SECONDS = 10 * 365 * 24 * 3600
Handler = Callable[[argparse.Namespace, config.Config, bytes | None], int]
T = TypeVar("T")


class Abort(SlurpError):
    """A user error the CLI reports as-is."""


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: operands and options in any order.

    Plain argparse binds every positional at the first operand it meets, so in
    ``put ADDRESS --role R FILE`` the optional FILE is already spent (as empty)
    when it arrives and is refused. Leaf commands parse intermixed instead.
    """

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # the intermixed parse calls back in here
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _common(*, top: bool) -> argparse.ArgumentParser:
    """Options every subcommand takes (defined once).

    They are accepted before and after the subcommand; a subcommand's copy must
    not reset what was given before it, hence SUPPRESS below the top level.
    """
    d: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--data", metavar="DIR", help="data directory (default: ~/.local/share/slurpfs)", **d
    )
    p.add_argument("--config", metavar="FILE", type=Path, help="configuration file (TOML)", **d)
    p.add_argument("--json", action="store_true", help="machine-readable output", **d)
    p.add_argument(
        "--passphrase-file", metavar="FILE", type=Path, help="file holding the key passphrase", **d
    )
    return p


def _passphrase(args: argparse.Namespace, environ: Mapping[str, str]) -> bytes | None:
    """The key passphrase: --passphrase-file, SLURPFS_PASSPHRASE_FILE, SLURPFS_PASSPHRASE, or none."""
    path = args.passphrase_file or (
        Path(environ["SLURPFS_PASSPHRASE_FILE"]) if environ.get("SLURPFS_PASSPHRASE_FILE") else None
    )
    if path is not None:
        if path.stat().st_mode & 0o077:
            raise Abort(f"passphrase file {path} is readable by group or others; chmod 600 it")
        return path.read_bytes().rstrip(b"\r\n")
    if environ.get("SLURPFS_PASSPHRASE"):
        return environ["SLURPFS_PASSPHRASE"].encode()
    return None


def _ask_new_passphrase() -> bytes:
    if not sys.stdin.isatty():
        raise Abort("--ask-passphrase needs a terminal; use SLURPFS_PASSPHRASE_FILE instead")
    first = getpass.getpass("new slurpfs passphrase: ")
    if not first:
        raise Abort("the passphrase must not be empty")
    if getpass.getpass("repeat passphrase: ") != first:
        raise Abort("the passphrases do not match")
    return first.encode()


def _kdf(environ: Mapping[str, str]) -> KdfParams:
    # Tests only: a weak KDF keeps suites fast. Never set in production.
    return KdfParams.weak() if environ.get("SLURPFS_TEST_WEAK_KDF") == "1" else KdfParams.default()


def _keyed(opener: Callable[[bytes | None], T], passphrase: bytes | None) -> T:
    """`opener(passphrase)`; with no passphrase given and the keys encrypted, ask on a terminal."""
    try:
        return opener(passphrase)
    except WrongPassphrase:
        if passphrase is None and sys.stdin.isatty():
            return opener(getpass.getpass("slurpfs passphrase: ").encode())
        raise


def open_model(
    cfg: config.Config,
    passphrase: bytes | None,
    environ: Mapping[str, str],
    *,
    accept_rollback: bool = False,
) -> ContextStore:
    kdf = _kdf(environ)
    return _keyed(
        lambda p: ContextStore.open(cfg, p, kdf=kdf, accept_rollback=accept_rollback),
        passphrase,
    )


def _address(text: str) -> Address:
    return parse(text if text.startswith("ucxl://") else "ucxl://" + text)


def _info_dict(info: VersionInfo, n: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": info.version_id.hex(),
        "address": "ucxl://" + info.address,
        "role": info.role,
        "hlc": info.hlc,
        "time": info.mtime,
        "author": info.author.hex(),
        "size": info.size,
        "deleted": info.deleted,
        "parents": [p.hex() for p in info.parents],
    }
    if n is not None:
        out["n"] = n
    return out


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif text:
        print(text)


def _notify(cfg: config.Config) -> None:
    """Tell a daemon serving this data directory that contexts changed (cache invalidation)."""
    try:
        from slurpfs.service.control import notify_daemon
    except ImportError:  # pragma: no cover - the mount layer is not installed
        return
    notify_daemon(cfg.data_dir, timeout=5.0)


# -- commands ---------------------------------------------------------------


class Commands:
    """One method per subcommand; each gets (args, config, passphrase) and returns an exit code."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def model(self, cfg: config.Config, passphrase: bytes | None) -> ContextStore:
        return open_model(cfg, passphrase, self.environ)

    def keystore(self, cfg: config.Config, passphrase: bytes | None) -> Keystore:
        return Keystore(cfg.data_dir, passphrase, _kdf(self.environ))

    def has_contexts(self, cfg: config.Config, passphrase: bytes | None) -> bool:
        """True once any context was stored here (deleted ones count: history stays)."""
        with self.model(cfg, passphrase) as model:
            return bool(model.store.children(""))

    def init(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        if args.roles:
            names = [r.strip() for r in args.roles.split(",") if r.strip()]
            if dict(cfg.roles) == config.default_roles():  # the file names no roles
                chosen = config.default_roles(names)  # the default readers among `names`
            else:
                chosen = {n: cfg.roles.get(n, config.RoleConfig(n)) for n in names}
            cfg = cfg.replace(roles=chosen)
            config._check(cfg)
        held = [r.strip() for r in args.hold.split(",")] if args.hold else None
        if args.ask_passphrase and passphrase is None:
            passphrase = _ask_new_passphrase()
        with ContextStore.init(cfg, passphrase, kdf=_kdf(self.environ), held=held) as model:
            node = model.keyring.node.node_id_hex
            roles = sorted(model.held_roles())
        _emit(
            args,
            {
                "data_dir": str(cfg.data_dir),
                "node_id": node,
                "roles": list(cfg.role_names),
                "held": roles,
            },
            f"initialised {cfg.data_dir}\n  node id: {node}\n  roles:   {', '.join(cfg.role_names)}"
            f"\n  held:    {', '.join(roles) or '(none)'}"
            + ("\n  keys are encrypted with the passphrase" if passphrase else ""),
        )
        return 0

    def put(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        address = _address(args.address)
        limit = cfg.store.max_context_bytes
        if args.file in (None, "-"):
            data = sys.stdin.buffer.read(limit + 1)  # no more than can be stored, plus one
        else:
            with open(args.file, "rb") as f:
                data = f.read(limit + 1)
        if len(data) > limit:
            raise ContextTooLarge(f"the input is over store.max_context_bytes ({limit})")
        with self.model(cfg, passphrase) as model:
            model.authorise_change(address.key, args.role, action="write")
            saved = model.save(address, args.role, data, ttl=args.ttl)
            model.sync()
        info = saved.info
        if saved.stored:
            _notify(cfg)
        same = "" if saved.stored else ", unchanged: the same bytes as the latest version"
        _emit(
            args,
            {**_info_dict(info), "stored": saved.stored},
            f"{address} [{args.role}] version {info.short_id} ({info.size} bytes){same}",
        )
        return 0

    def get(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        """The bytes as they are; with ``--json`` the version's metadata and the content
        as text (``"encoding": "utf-8"``) or, when it is not UTF-8, as base64."""
        address = _address(args.address)
        with self.model(cfg, passphrase) as model, _temporal_hint(address):
            ctx = model.get(address, args.role)
        if args.output:
            _write_private(Path(args.output), ctx.data)
            _emit(args, _info_dict(ctx.info) | {"output": args.output}, "")
        elif args.json:
            _emit(args, _info_dict(ctx.info) | _content_json(ctx.data), "")
        else:
            sys.stdout.buffer.write(ctx.data)
            sys.stdout.buffer.flush()
        return 0

    def history(
        self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None
    ) -> int:
        """Every version, deletions included; `n` numbers the content versions as
        ``.history/<role>/<n>`` does (a deletion has none)."""
        address = _address(args.address)
        with self.model(cfg, passphrase) as model:
            versions = model.all_versions(address, args.role)
        if not versions:
            with _temporal_hint(address):
                raise NotFound(f"no versions of {address} for role {args.role}")
        rows: list[dict[str, Any]] = []
        lines = [f"{'n':>4}  {'version':<16}  {'time (UTC)':<20}  {'size':>9}  author"]
        n = 0
        for v in versions:
            if v.deleted:
                rows.append(_info_dict(v) | {"n": None})
                lines.append(
                    f"{'-':>4}  {v.short_id}  {_iso(v.mtime)}  {'deleted':>9}  {v.author.hex()[:12]}"
                )
            else:
                n += 1
                rows.append(_info_dict(v, n))
                lines.append(
                    f"{n:>4}  {v.short_id}  {_iso(v.mtime)}  {v.size:>9}  {v.author.hex()[:12]}"
                )
        _emit(args, rows, "\n".join(lines))
        return 0

    def ls(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        address = _address(args.address) if args.address else None
        with self.model(cfg, passphrase) as model:
            listing = model.list_dir(address)
        data = {
            "dirs": list(listing.dirs),
            "roles": list(listing.roles),
            "conflicts": [f"{role}.conflict-{v.short_id}" for role, v in listing.conflicts],
        }
        text = "\n".join([d + "/" for d in listing.dirs] + list(listing.roles) + data["conflicts"])
        _emit(args, data, text)
        return 0

    def rm(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        address = _address(args.address)
        with self.model(cfg, passphrase) as model:
            model.authorise_change(address.key, args.role, action="delete")
            info = model.delete(address, args.role)
            model.sync()
        _notify(cfg)
        _emit(args, _info_dict(info), f"deleted (version {info.short_id}; history kept)")
        return 0

    def merge(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        """Merge the concurrent versions (conflicts) of one context now, three-way as
        `replication.auto_merge` would; exit 11 if any stays a conflict, with why."""
        address = _address(args.address)
        if address.temporal is not None:
            raise InvalidAddress(f"cannot merge at a temporal address {str(address)!r}")
        with self.model(cfg, passphrase) as model:
            if not model.all_versions(address, args.role):
                raise NotFound(f"no context at {address} for role {args.role!r}")
            model.authorise_change(address.key, args.role, action="merge")
            outcome = merge_context(model, address.key, args.role, three_way=True)
            model.sync()
        merged = outcome.merged
        if merged is not None:
            _notify(cfg)
        lines = [f"not merged: {u.version.short_id}: {u.reason}" for u in outcome.unmerged]
        if merged is not None:
            lines.append(
                f"{address} [{args.role}]: merged {len(merged.parents)} versions"
                f" into version {merged.short_id}"
            )
        elif not outcome.unmerged:
            lines.append(f"{address} [{args.role}]: nothing to merge (one current version)")
        _emit(
            args,
            {
                "merged": None if merged is None else _info_dict(merged),
                "unmerged": [
                    {"version": u.version.version_id.hex(), "reason": u.reason}
                    for u in outcome.unmerged
                ],
            },
            "\n".join(lines),
        )
        return EXIT_UNMERGED if outcome.unmerged else 0

    def fsck(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        accept = args.accept_rollback
        with open_model(cfg, passphrase, self.environ, accept_rollback=accept) as model:
            report = fsck.check(model, deep=not args.shallow)
            if not args.no_index:
                report.problems.extend(f"search index: {p}" for p in check_index(model))
        summary = (
            f"{report.versions} versions, {report.contexts} contexts, {report.directories} directories,"
            f" {report.decrypted} decrypted"
            + (f", {report.stubs} held by other members (stubs)" if report.stubs else "")
            + ": "
            + ("clean" if report.ok else f"{len(report.problems)} problems")
            + (
                f"; {report.conflicts} contexts with unresolved conflicts"
                " (<role>.conflict-<id> files in a mount)"
                if report.conflicts
                else ""
            )
        )
        _emit(
            args,
            {
                "ok": report.ok,
                "versions": report.versions,
                "contexts": report.contexts,
                "decrypted": report.decrypted,
                "conflicts": report.conflicts,
                "stubs": report.stubs,
                "problems": report.problems,
            },
            "\n".join([*report.problems, summary]),
        )
        return 0 if report.ok else 5

    def compact(
        self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None
    ) -> int:
        with self.model(cfg, passphrase) as model:
            plan = compact.plan_retention(model)
            dropped = 0 if args.dry_run else compact.apply_retention(model, plan)
            room = compact.space(model.store)
            gains = [compact.dictionary_gain(model, role) for role in sorted(model.held_roles())]
        mib = 1 << 20
        due = room.free_bytes >= cfg.compaction.free_threshold or args.copy
        data: dict[str, Any] = {
            "dry_run": args.dry_run,
            "retention": {
                "versions": len(plan.drops),
                "contexts": plan.contexts,
                "plaintext_bytes": plan.plaintext_bytes,
                "dropped": dropped,
            },
            "file_bytes": room.file_bytes,
            "free_bytes": room.free_bytes,
            "copy": "due" if due else "not needed",
            "dictionaries": [
                {
                    "role": g.role,
                    "documents": g.documents,
                    "ratio_before": round(g.ratio_before, 3),
                    "ratio_after": round(g.ratio_after, 3),
                    "reason": g.reason,
                }
                for g in gains
            ],
        }
        lines = [
            f"retention: {'would drop' if args.dry_run else 'dropped'} {len(plan.drops)} versions"
            f" of {plan.contexts} contexts ({plan.plaintext_bytes} bytes of plaintext)",
            f"store: {room.file_bytes / mib:.1f} MiB, {room.free_bytes / mib:.1f} MiB free pages"
            f" (threshold {cfg.compaction.free_threshold / mib:.1f} MiB)",
            *(
                f"zstd dictionary for {g.role}: "
                + (
                    g.reason
                    if g.reason
                    else f"{g.documents} small documents, ratio {g.ratio_before:.2f}"
                    f" -> {g.ratio_after:.2f} (measured, not applied)"
                )
                for g in gains
            ),
        ]
        if due and not args.dry_run and compact.mounted(cfg):
            data.update(copy="waits for an unmount")
            lines.append("compacting copy: due; waits for an unmount (a mount serves this store)")
        elif due and not args.dry_run:
            before, after = compact.compacting_copy(cfg)
            data.update(copy="done", file_bytes_after=after)
            lines.append(f"compacting copy: {before / mib:.1f} MiB -> {after / mib:.1f} MiB")
        else:
            lines.append(
                "compacting copy: " + ("would run" if due else "not needed") + " (needs no mount)"
            )
        _emit(args, data, "\n".join(lines))
        return 0

    def import_(
        self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None
    ) -> int:
        root = Path(args.dir)
        if not root.is_dir():
            raise Abort(f"{root} is not a directory")
        authority = Authority.parse(args.authority)
        files, skipped = _import_sources(root)
        for label, reason in skipped:
            print(f"slurpfs: skipped {label}: {reason}", file=sys.stderr)
        failed: list[tuple[str, str]] = []
        committed = unchanged = 0
        with self.model(cfg, passphrase) as model:
            batch: list[BatchItem] = []
            for path in tqdm(files, desc="import", unit="file", disable=None, file=sys.stderr):
                rel = path.relative_to(root)
                try:
                    address = Address(authority, tuple(rel.parts))
                    model.authorise_change(address.key, args.role, action="write")
                    batch.append(BatchItem(address, args.role, path.read_bytes(), label=str(rel)))
                except (InvalidAddress, OSError) as exc:
                    failed.append((str(rel), str(exc)))
                if len(batch) >= 500:
                    report = model.put_many(batch)
                    committed += len(report.committed)
                    unchanged += len(report.unchanged)
                    failed.extend(report.failed)
                    batch = []
            report = model.put_many(batch)
            committed += len(report.committed)
            unchanged += len(report.unchanged)
            failed.extend(report.failed)
            model.sync()
        _notify(cfg)
        return self._summary(args, "imported", committed, failed, skipped, unchanged=unchanged)

    def export(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        out = Path(args.dir)
        _private_dirs(out)
        failed: list[tuple[str, str]] = []
        written = 0
        with self.model(cfg, passphrase) as model:
            readable = model.readable_roles(model.held_roles())
            jobs = list(_walk(model, None))
            for address, role in tqdm(
                jobs, desc="export", unit="ctx", disable=None, file=sys.stderr
            ):
                target = out.joinpath(*address.to_mount_parts()[1:], role)
                if role not in readable:
                    failed.append((f"{address} [{role}]", "no key for this role on this node"))
                    continue
                try:
                    ctx = model.get(address, role)
                    _private_dirs(target.parent)
                    _write_private(target, ctx.data)
                    os.utime(target, (ctx.info.mtime, ctx.info.mtime))
                    written += 1
                except (SlurpError, OSError) as exc:
                    failed.append((f"{address} [{role}]", str(exc)))
            for address in _walk_dirs(model, None):
                _private_dirs(out.joinpath(*address.to_mount_parts()[1:]))
        return self._summary(args, "exported", written, failed)

    def _summary(
        self,
        args: argparse.Namespace,
        verb: str,
        ok: int,
        failed: list[tuple[str, str]],
        skipped: list[tuple[str, str]] | None = None,
        *,
        unchanged: int | None = None,
    ) -> int:
        """Report a batch; exit 9 if an item failed (skipped ones are not failures).

        `unchanged` counts items equal to what was stored already (nothing stored)."""
        counts = f"{verb} {ok}, failed {len(failed)}"
        data: dict[str, Any] = {
            verb: ok,
            "failed": [{"item": label, "reason": reason} for label, reason in failed],
        }
        if unchanged is not None:
            data["unchanged"] = unchanged
            if unchanged:
                counts = f"{verb} {ok}, unchanged {unchanged}, failed {len(failed)}"
        if skipped is not None:
            counts += f", skipped {len(skipped)}"
            data["skipped"] = [{"item": label, "reason": reason} for label, reason in skipped]
        text = "\n".join([f"FAILED {label}: {reason}" for label, reason in failed] + [counts])
        _emit(args, data, text)
        return EXIT_PARTIAL if failed else 0

    def demo(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        from slurpfs import demo

        with self.model(cfg, passphrase) as model:
            n = demo.load(model)
        _notify(cfg)
        _emit(args, {"stored": n}, f"stored {n} demo contexts, two versions each")
        return 0

    def status(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        with self.model(cfg, passphrase) as model:
            st = model.store.statistics()
            data = {
                "data_dir": str(cfg.data_dir),
                "node_id": model.keyring.node.node_id_hex,
                "roles": list(model.role_names),
                "held": sorted(model.held_roles()),
                "versions": st.versions,
                "contexts": st.contexts,
                "stored_bytes": st.envelope_bytes,
                "plaintext_bytes": st.plaintext_bytes,
            }
        search = control.request(cfg.data_dir, "search", timeout=2.0)  # (a mount's worker)
        if search is not None and search.startswith("search "):
            data["search"] = search.removeprefix("search ")
        _emit(args, data, "\n".join(f"{k}: {v}" for k, v in data.items()))
        return 0

    def peers(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        """The cluster's members as the member log lists them, with their state from
        the mount's replication worker when one runs."""
        from slurpfs.net.members import Cluster
        from slurpfs.service.replication import render_peers_table

        cluster = Cluster.load(cfg.data_dir, self.keystore(cfg, passphrase))
        if cluster is None:
            raise NotInitialised(
                "this node belongs to no cluster (`slurpfs peers invite` founds one)"
            )
        reply = control.request(cfg.data_dir, "peers", timeout=5.0)
        if reply is not None and reply.startswith("peers {"):
            snapshot = json.loads(reply.removeprefix("peers "))
        else:
            snapshot = _log_only(cluster, reply is not None)
        snapshot["members"] = [
            {"node_id": m.node_id.hex(), "name": m.name, "addrs": list(m.addrs)}
            for m in cluster.members()
        ]
        snapshot["removed"] = [n.hex() for n in cluster.removed()]
        _emit(args, snapshot, render_peers_table(snapshot).rstrip("\n"))
        return 0

    def keys(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        keystore = Keystore(cfg.data_dir, passphrase, _kdf(self.environ))
        if args.keys_cmd == "list":
            ring = keystore.load()
            rows = [
                {
                    "role": r,
                    "generation": ring.current_public(r).generation,
                    "held": r in ring.held_roles(),
                }
                for r in sorted(ring.roles())
            ]
            _emit(
                args,
                {"node_id": ring.node.node_id_hex, "roles": rows},
                f"node {ring.node.node_id_hex}\n"
                + "\n".join(
                    f"{r['role']:<16} gen {r['generation']}  {'held' if r['held'] else 'public only'}"
                    for r in rows
                ),
            )
        elif args.keys_cmd == "add":
            keystore.add_role(args.role)
            _emit(args, {"added": args.role}, f"added role {args.role}")
        elif args.keys_cmd == "rotate":
            with self.model(cfg, passphrase) as model:
                announce = peerscmd.rotation_announcer(cfg, model.keystore, args.role)
                rep = model.rotate_role(args.role, announce)
            _emit(
                args,
                {
                    "role": rep.role,
                    "old": rep.old_generation,
                    "new": rep.new_generation,
                    "rewrapped": rep.rewrapped,
                },
                f"{rep.role}: generation {rep.old_generation} -> {rep.new_generation},"
                f" {rep.rewrapped} versions re-wrapped, old private key destroyed",
            )
        elif args.keys_cmd == "drop":
            keystore.drop_private(args.role)
            _emit(
                args, {"dropped": args.role}, f"destroyed this node's private key for {args.role}"
            )
        if args.keys_cmd in ("add", "rotate"):  # a cluster's members learn the new key
            peerscmd.publish_role(cfg, keystore, args.role)
        return 0

    def audit(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        path = data_paths(cfg.data_dir)["audit"]
        if args.audit_cmd == "verify":
            kdf = _kdf(self.environ)
            found = _keyed(lambda p: verify_audit(cfg, p, kdf=kdf), passphrase)
            _emit(
                args,
                {
                    "ok": True,
                    "entries": found.entries,
                    "legacy": found.legacy,
                    "anchored": found.anchored,
                },
                _verified_text(found),
            )
        else:
            entries = audit.read(path, args.n)
            _emit(
                args,
                [_entry(e) for e in entries],
                "\n".join(
                    f"{_iso(e.time)} {'ALLOW' if e.allowed else 'DENY '} {e.who:<10} {e.action:<6} {e.role:<10} ucxl://{e.address} {e.reason}"
                    for e in entries
                ),
            )
        return 0


def _log_only(cluster: Any, mounted: bool) -> dict[str, Any]:
    """What the member log says of the members (no state: no worker runs)."""
    me = cluster.me().node_id
    rows: list[dict[str, Any]] = [
        {
            "node_id": m.node_id.hex(),
            "name": m.name,
            "state": "me" if m.node_id == me else "unknown",
            "address": m.addrs[0] if m.addrs else None,
        }
        for m in cluster.members()
    ]
    rows += [{"node_id": n.hex(), "name": "", "state": "removed"} for n in cluster.removed()]
    why = "the mount runs no replication worker" if mounted else "not mounted"
    return {"worker": why, "problem": "", "listening": [], "peers": rows}


def _content_json(data: bytes) -> dict[str, str]:
    try:
        return {"encoding": "utf-8", "content": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"encoding": "base64", "content": base64.b64encode(data).decode("ascii")}


_MISPLACED_TEMPORAL = re.compile(r"(.+?)(~~[0-9]+|\^\^[0-9]+|\*\^|\*~)")


@contextlib.contextmanager
def _temporal_hint(address: Address) -> Iterator[None]:
    """A `NotFound` for an address whose last component ends in a temporal segment
    (``auth.go~~1``) says where the segment goes."""
    try:
        yield
    except NotFound as exc:
        match = _MISPLACED_TEMPORAL.fullmatch(address.path[-1]) if address.path else None
        if match is None or address.temporal is not None:
            raise
        try:
            meant = Address(
                address.authority,
                (*address.path[:-1], match[1]),
                Temporal.parse(match[2]),
            )
        except InvalidAddress:
            raise exc from None
        raise NotFound(
            f"{exc}; a temporal segment goes right after the authority, as a path"
            f" component of its own: {meant}"
        ) from None


def _verified_text(found: audit.Verified) -> str:
    n, legacy, anchored = found.entries, found.legacy, found.anchored
    if anchored is None:  # only a log no keyed slurpfs has opened yet
        return (
            f"audit log intact: {n} entries, all in the unkeyed legacy format: the chain"
            " holds, but anyone who can write the log could have rewritten it"
        )
    text = f"audit log intact: {n} entries, keyed and anchored up to entry {anchored}"
    if n > anchored:
        text += f"\n  the last {n - anchored} are not anchored yet (the next sync or close anchors them)"
    if legacy:
        text += (
            f"\n  entries 1-{legacy} are in the unkeyed legacy format:"
            " fixed since the keyed chain began, but not authenticated"
        )
    return text


def _entry(e: audit.AuditEntry) -> dict[str, Any]:
    return {name: getattr(e, name) for name in e.__slots__}


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _import_sources(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The regular files under `root` (sorted), and what is skipped, with why.

    Symbolic links are not followed (a link may point anywhere, and two paths to one
    file would make two contexts); FIFOs, sockets and devices are not contexts.
    """
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for top, dirs, names in os.walk(root, onerror=None):
        base = Path(top)
        for name in sorted(dirs):
            if (base / name).is_symlink():
                skipped.append(
                    (str((base / name).relative_to(root)), "symbolic link, not followed")
                )
        for name in names:
            path = base / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                skipped.append((rel, "symbolic link, not followed"))
            elif path.is_file():
                files.append(path)
            else:
                skipped.append((rel, "not a regular file"))
    return sorted(files), sorted(skipped)


def _walk(model: ContextStore, address: Address | None) -> Iterator[tuple[Address, str]]:
    listing = model.list_dir(address)
    if address is not None:
        for role in listing.roles:
            yield address, role
    for name in listing.dirs:
        child = Address(Authority.parse(name)) if address is None else address.child(name)
        yield from _walk(model, child)


def _walk_dirs(model: ContextStore, address: Address | None) -> Iterator[Address]:
    for name in model.list_dir(address).dirs:
        child = Address(Authority.parse(name)) if address is None else address.child(name)
        yield child
        yield from _walk_dirs(model, child)


def build_parser(commands: Commands) -> argparse.ArgumentParser:
    common = _common(top=False)
    parser = argparse.ArgumentParser(
        prog="slurpfs",
        description="The SLURP encrypted context store, as a filesystem and on the command line.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(top=True)],
    )
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common], description=help)
        p.set_defaults(handler=handler)
        return p

    p = add("init", commands.init, "create a data directory, node identity and role keys")
    p.add_argument("--roles", help="comma-separated role names (default: from the config)")
    p.add_argument("--hold", help="roles whose private keys this node keeps (default: all)")
    p.add_argument(
        "--ask-passphrase",
        action="store_true",
        help="prompt for a passphrase to encrypt the private keys (Argon2id)",
    )
    p = add("put", commands.put, "store a new version of a context")
    p.add_argument("address")
    p.add_argument("--role", required=True)
    p.add_argument("file", nargs="?", help="file to read (default: standard input)")
    p.add_argument("--ttl", type=_seconds, help="expire the context after this many seconds")
    p = add("get", commands.get, "print a context (temporal segments work)")
    p.add_argument("address")
    p.add_argument("--role", required=True)
    p.add_argument("-o", "--output", help="write to this file instead of standard output")
    p = add("history", commands.history, "list the versions of a context")
    p.add_argument("address")
    p.add_argument("--role", required=True)
    p = add("ls", commands.ls, "list an address directory (the authorities without one)")
    p.add_argument("address", nargs="?")
    p = add("rm", commands.rm, "delete a context (history stays)")
    p.add_argument("address")
    p.add_argument("--role", required=True)
    p = add(
        "merge", commands.merge, "merge a context's concurrent versions now (three-way, by line)"
    )
    p.add_argument("address")
    p.add_argument("role")
    p = add("fsck", commands.fsck, "check the store's consistency and authenticity")
    p.add_argument("--shallow", action="store_true", help="do not decrypt")
    p.add_argument("--no-index", action="store_true", help="do not check the search index")
    p.add_argument(
        "--accept-rollback",
        action="store_true",
        help="accept the store as it is now although it is behind its seal or not the one"
        " sealed (after restoring an older copy on purpose), seal it again, then check it",
    )
    p = add(
        "compact",
        commands.compact,
        "apply the version-retention policy and give free pages back (a compacting copy)",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    p.add_argument("--copy", action="store_true", help="copy even below compaction.free_threshold")
    p = add(
        "import", commands.import_, "import a directory tree as contexts of one authority and role"
    )
    p.add_argument("dir")
    p.add_argument("--authority", required=True, help="agent:role@project:task")
    p.add_argument("--role", required=True)
    p = add("export", commands.export, "export every readable context as <authority>/<path>/<role>")
    p.add_argument("dir")
    add("status", commands.status, "show the store's status")
    add("demo", commands.demo, "store a few dozen demo contexts")
    peer_commands = peerscmd.PeerCommands(commands.keystore, commands.has_contexts, commands.model)
    peers_parser = add(
        "peers", commands.peers, "list the cluster's members: state, address, RTT, lag"
    )
    p = add("keys", commands.keys, "manage role keys")
    keys_sub = p.add_subparsers(dest="keys_cmd", required=True)
    keys_sub.add_parser("list", parents=[common])
    for name in ("add", "drop", "rotate"):
        kp = keys_sub.add_parser(name, parents=[common])
        kp.add_argument("role")
    peerscmd.register(peers_parser, keys_sub, common, peer_commands)
    p = add("audit", commands.audit, "show or verify the audit log")
    audit_sub = p.add_subparsers(dest="audit_cmd", required=True)
    audit_sub.add_parser(
        "verify",
        parents=[common],
        help="check the chain with the node key (asks for the passphrase) and the anchor",
    )
    ap = audit_sub.add_parser("show", parents=[common])
    ap.add_argument("-n", type=int, default=50)
    mountcmd.register(sub, common)
    index_cli.register(sub, common, opener=commands.model)
    backup_cli.register(sub, common, opener=commands.model, kdf=lambda: _kdf(commands.environ))
    return parser


def _private_dirs(path: Path) -> None:
    """`mkdir -p` with every directory it creates 0700 (pathlib's `parents` uses
    the umask for all but the last)."""
    if path.is_dir():
        return
    _private_dirs(path.parent)
    path.mkdir(mode=0o700, exist_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    """Plaintext the user asked for, readable by the user alone (0600 whatever the
    umask; an existing file is truncated and made 0600 too)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _seconds(text: str) -> float:
    """A TTL: a positive, finite number of seconds (at most ten years)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= TTL_MAX_SECONDS:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text!r}: give seconds above 0, at most {TTL_MAX_SECONDS}"
        )
    return value


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    guarded: bool = True,
) -> int:
    """Run one ``slurpfs`` command; its exit code.

    `guarded` runs it in a child process (`_guarded`) so that a crash reading a
    damaged store is a clear exit 5. A caller that runs commands inside its own
    process and handles such a crash itself (or cannot fork: captured output,
    threads) passes False.
    """
    env = dict(os.environ if environ is None else environ)
    commands = Commands(env)
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if not guarded or args.command in _UNGUARDED:
        return _run(args, env)
    return _guarded(args, lambda: _run(args, env))


# `mount` and `umount` manage processes of their own and report how they ended.
_UNGUARDED = frozenset({"mount", "umount"})
_CRASHES = {signal.SIGBUS: "SIGBUS", signal.SIGSEGV: "SIGSEGV"}


def _guarded(args: argparse.Namespace, run: Callable[[], int]) -> int:
    """`run()` in a child process, so that a crash reading a damaged store is exit 5
    with the reason rather than the process killed with nothing said.

    LMDB reads the store through a memory map and trusts what it finds: a damaged
    page can point outside the file (SIGBUS) or the map (SIGSEGV). The child shares
    the terminal, standard streams and process group; this process forwards SIGTERM
    and SIGHUP to it and leaves SIGINT to the terminal, which sends it to both.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()  # a bug: say where
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
            with contextlib.suppress(BaseException):
                sys.stderr.flush()
            os._exit(code)
    forward = lambda signum, _frame: os.kill(pid, signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in _CRASHES:
        data = getattr(args, "data", None) or "the data directory"
        return _failed(
            args,
            f"the store in {data} is damaged: reading it crashed the process"
            f" ({_CRASHES[signal.Signals(os.WTERMSIG(status))]}: a page of store/data.mdb"
            " points outside the file); restore the store from a backup or a peer",
            5,
        )
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _run(args: argparse.Namespace, env: dict[str, str]) -> int:
    try:
        cfg = config.load(args.config, env, {"node.data_dir": args.data})
        passphrase = _passphrase(args, env)
        handler: Handler = args.handler
        return handler(args, cfg, passphrase)
    except SlurpError as exc:
        return _failed(args, str(exc), exit_code(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # The machine speaking about a path the user gave (a missing input file, an
        # output directory that is not there, a full disk): say which and why.
        where = f"{exc.filename}: " if exc.filename else ""
        return _failed(args, f"{where}{exc.strerror or exc}", 1)


def _failed(args: argparse.Namespace, message: str, code: int) -> int:
    """Say why on stderr; with ``--json``, also as ``{"error", "exit_code"}`` on stdout
    (a script reading the JSON of every command reads the failures too)."""
    print(f"slurpfs: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
