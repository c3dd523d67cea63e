"""``slurpfs peers invite|join|remove`` and ``slurpfs keys grant``: cluster membership
from the command line (`slurpfs.net.members`, `slurpfs.net.join`).

Each command changes ``<data>/cluster/`` and then tells a mount running on the
data directory (control request ``cluster``) so its replication worker picks
the change up at once; without a mount the change waits for the next one.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import fcntl
import json
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from slurpfs import config
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import AlreadyExists, ConfigError, NotEmpty, NotInitialised
from slurpfs.net import members
from slurpfs.net.members import Cluster, Member, Token
from slurpfs.service import control

if TYPE_CHECKING:
    from slurpfs.model import ContextStore

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/7400"
LISTEN_WAIT = 30.0  # seconds `invite` waits for the mount's worker to listen
Handler = Callable[[argparse.Namespace, config.Config, bytes | None], int]
KeystoreOf = Callable[[config.Config, bytes | None], Keystore]
ModelOf = Callable[[config.Config, bytes | None], "ContextStore"]
_SIOCGIFADDR = 0x8915
# `slurpfs.net.placement.MAX_PARTITIONS` (not imported: it loads numpy, and its threads)
MAX_PARTITIONS = 1 << 20


class PeerCommands:
    """The handlers; `keystore` opens the node's keys as the rest of the CLI does."""

    def __init__(
        self, keystore: KeystoreOf, has_contexts: Callable[..., bool], model: ModelOf
    ) -> None:
        self._keystore = keystore
        self._has_contexts = has_contexts
        self._model = model

    def invite(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        keys = self._keystore(cfg, passphrase)
        cluster = Cluster.load(cfg.data_dir, keys)
        founded = cluster is None
        listen = args.listen or _configured_listen(cfg)
        if cluster is None:
            addrs = advertised(listen or DEFAULT_LISTEN)
            cluster = Cluster.found(cfg.data_dir, keys, addrs, name=_name(cfg))
        elif listen:  # a member keeps its recorded address unless given another
            cluster.update_me(advertised(listen))
        token = cluster.invite(args.ttl)
        running = _tell_daemon(cfg)
        if founded:
            _say(f"founded a cluster with this node ({cluster.me().node_id.hex()[:16]})")
        if not running:
            _say(
                "no mount runs on this data directory: start `slurpfs mount` so the invitee can join"
            )
        elif not _wait_listening(cfg):
            _say(
                f"the mount's replication worker did not listen within {LISTEN_WAIT:.0f} s"
                " (see `slurpfs peers`): the invitee can join once it does"
            )
        _emit(
            args,
            {"token": token.encode(), "expires": token.expires, "founded": founded},
            token.encode(),
        )
        return 0

    def join(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        keys = self._keystore(cfg, passphrase)
        keys.load()
        if Cluster.load(cfg.data_dir, keys) is not None:
            raise AlreadyExists("this node already belongs to a cluster")
        if self._has_contexts(cfg, passphrase):
            raise NotEmpty(
                "this node's store already holds contexts: a node joins a cluster empty"
                " (use a new data directory, or export these and import them once joined)"
            )
        from slurpfs.net import join as joining  # libp2p: imported only when joining

        token = Token.decode(args.token)
        addrs = advertised(args.listen or _configured_listen(cfg) or DEFAULT_LISTEN)
        cluster = trio.run(lambda: joining.join(cfg.data_dir, keys, token, addrs, _name(cfg)))
        _tell_daemon(cfg)
        names = ", ".join(m.name for m in cluster.members())
        _say(f"joined the cluster of {token.inviter.hex()[:16]}: {names}")
        _emit(args, {"node_id": cluster.me().node_id.hex(), "members": _rows(cluster)}, "")
        return 0

    def remove(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        cluster = self._cluster(cfg, passphrase)
        member = cluster.find(args.node)
        cutoff = cluster.remove(member.node_id)
        _tell_daemon(cfg)
        held = sorted(cluster.roles_held_by(member.node_id))
        # Its copies of these role keys still open what was written before; what is
        # written from now on is sealed to a new generation it never receives.
        mine = self._keystore(cfg, passphrase).load().held_roles()
        rotated = [role for role in held if role in mine]
        if rotated:
            self._rotate(cfg, passphrase, rotated)
        others = [role for role in held if role not in mine]
        if others:
            _say(
                f"{member.name} held the keys of {', '.join(others)}, which this node does not"
                " hold: rotate them on a member that does (slurpfs keys rotate ROLE)"
            )
        _emit(
            args,
            {
                "removed": member.node_id.hex(),
                "name": member.name,
                "cutoff": cutoff,
                "held": held,
                "rotated": rotated,
            },
            f"removed {member.name} ({member.node_id.hex()[:16]}); nothing it signs from now on"
            " counts, and the cluster key it knew is being retired",
        )
        return 0

    def _rotate(self, cfg: config.Config, passphrase: bytes | None, roles: list[str]) -> None:
        """Rotate `roles` here, granting each new generation to the remaining holders
        (with or without a mount on the data directory: the store's writer lock
        orders the re-wraps with its saves, and the mount is told to reload its keys)."""
        with self._model(cfg, passphrase) as model:
            for role in roles:
                report = model.rotate_role(role, rotation_announcer(cfg, model.keystore, role))
                _say(
                    f"{role}: generation {report.old_generation} -> {report.new_generation},"
                    f" {report.rewrapped} versions re-wrapped"
                )

    def grant(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        cluster = self._cluster(cfg, passphrase)
        member = cluster.find(args.to)
        generations = cluster.grant(args.role, member.node_id)
        _tell_daemon(cfg)
        _emit(
            args,
            {"role": args.role, "to": member.node_id.hex(), "generations": generations},
            f"granted {args.role} ({generations} generations) to {member.name}",
        )
        return 0

    def settings(
        self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None
    ) -> int:
        """Print the cluster's signed settings; with ``--factor`` or ``--partitions``,
        sign a settings entry with the new values first (every member places bodies
        by the log, never by a local value)."""
        cluster = self._cluster(cfg, passphrase)
        current = cluster.settings()
        changed = args.factor is not None or args.partitions is not None
        if changed:
            factor = current.factor if args.factor is None else (args.factor or None)
            partitions = current.partitions if args.partitions is None else args.partitions
            new = dataclasses.replace(current, factor=factor, partitions=partitions)
            if new != current:
                cluster.set_settings(new)
                _tell_daemon(cfg)
            current = cluster.settings()
        members = len(cluster.members())
        data = {
            "factor": current.factor or 0,
            "partitions": current.partitions,
            "max_clock_offset_ms": current.max_clock_offset_ms,
            "members": members,
        }
        holders = "every member" if current.factor is None else f"{current.factor}"
        _emit(
            args,
            data,
            f"replication factor: {holders} ({min(current.factor or members, members)} of"
            f" {members} members hold each body)\npartitions: {current.partitions}\n"
            f"max clock offset: {current.max_clock_offset_ms} ms",
        )
        return 0

    def list(self, args: argparse.Namespace, cfg: config.Config, passphrase: bytes | None) -> int:
        """The members in the log (a minimal list; the replication layer shows their state)."""
        cluster = self._cluster(cfg, passphrase)
        rows = _rows(cluster)
        _emit(
            args,
            {"members": rows, "removed": [k.hex() for k in cluster.removed()]},
            "\n".join(f"{r['name']:<16} {r['node_id'][:16]}  {' '.join(r['addrs'])}" for r in rows),
        )
        return 0

    def _cluster(self, cfg: config.Config, passphrase: bytes | None) -> Cluster:
        cluster = Cluster.load(cfg.data_dir, self._keystore(cfg, passphrase))
        if cluster is None:
            raise NotInitialised(
                "this node belongs to no cluster (`slurpfs peers invite` founds one)"
            )
        return cluster


def register(
    peers_parser: argparse.ArgumentParser,
    keys_sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    commands: PeerCommands,
) -> None:
    """Add ``invite``, ``join``, ``remove`` under ``peers`` (the bare command, the
    list, is the caller's) and ``grant`` under ``keys``."""
    peers = peers_parser.add_subparsers(dest="peers_cmd", metavar="COMMAND")
    i = peers.add_parser("invite", parents=[common], help="print a single-use token to join")
    i.add_argument("--listen", metavar="MULTIADDR", help="this node's address for the peers")
    i.add_argument("--ttl", type=_ttl, default=600.0, help="seconds the token lives (600)")
    i.set_defaults(handler=commands.invite)
    j = peers.add_parser("join", parents=[common], help="join the cluster a token is from")
    j.add_argument("token")
    j.add_argument("--listen", metavar="MULTIADDR", help="this node's address for the peers")
    j.set_defaults(handler=commands.join)
    r = peers.add_parser("remove", parents=[common], help="remove a member for good")
    r.add_argument("node", metavar="NODE", help="node id (hex prefix) or name")
    r.set_defaults(handler=commands.remove)
    st = peers.add_parser(
        "settings",
        parents=[common],
        help="show the cluster's signed settings, or sign new ones (--factor, --partitions)",
    )
    st.add_argument(
        "--factor",
        type=_count(0, 255),
        metavar="R",
        help="members that hold each body (0: every member holds everything)",
    )
    st.add_argument(
        "--partitions",
        type=_partitions,
        metavar="N",
        help="partitions addresses hash into (4096 by default; a change re-places every body)",
    )
    st.set_defaults(handler=commands.settings)
    g = keys_sub.add_parser("grant", parents=[common], help="give a member a role's keys")
    g.add_argument("role")
    g.add_argument("--to", required=True, metavar="NODE", help="node id (hex prefix) or name")
    g.set_defaults(handler=commands.grant)


def publish_role(cfg: config.Config, keystore: Keystore, role: str) -> None:
    """After ``keys add`` or ``keys rotate`` on a clustered node: the role's public
    keys join the member log, so every member seals to them (the private keys
    reach other members only by ``keys grant``)."""
    cluster = Cluster.load(cfg.data_dir, keystore)
    if cluster is None:
        return
    ring = keystore.load()
    for generation in ring.generations(role):
        public = ring.public(role, generation)
        assert public is not None  # (a listed generation)
        cluster.publish_role_key(role, generation, public.public)
    _tell_daemon(cfg)


def rotation_announcer(
    cfg: config.Config, keystore: Keystore, role: str
) -> Callable[[], None] | None:
    """For `ContextStore.rotate_role` on a clustered node (None on another): once
    the new generation exists, its public key joins the member log and the role's
    keys are granted again to every member that held it, before any slot is
    re-wrapped (so a peer knows the key, and holds it, before the new slots come)."""
    if Cluster.load(cfg.data_dir, keystore) is None:
        return None

    def announce() -> None:
        cluster = Cluster.load(cfg.data_dir, keystore)
        assert cluster is not None  # (found a moment ago; a cluster is never undone)
        ring = keystore.load()
        current = ring.current_public(role)
        cluster.publish_role_key(role, current.generation, current.public)
        holders = cluster.regrant(role)
        _tell_daemon(cfg)
        if holders:
            names = ", ".join(m.name for m in holders)
            _say(f"granted {role} generation {current.generation} to {names}")

    return announce


# ---- addresses -----------------------------------------------------------------


def advertised(listen: str) -> list[str]:
    """The addresses peers reach a listen address at: an unspecified host
    (``0.0.0.0``) becomes each of this host's IPv4 addresses (loopback only if
    there is no other)."""
    parts = listen.split("/")
    if len(parts) < 5 or parts[1] != "ip4" or parts[3] != "tcp" or not parts[4].isdigit():
        raise ConfigError(f"a listen address is /ip4/HOST/tcp/PORT, not {listen!r}")
    if parts[2] != "0.0.0.0":
        return [listen]
    hosts = _host_addresses()
    outside = [h for h in hosts if not h.startswith("127.")]
    return [f"/ip4/{h}/tcp/{parts[4]}" for h in (outside or hosts or ["127.0.0.1"])]


def _host_addresses() -> list[str]:
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = array.array("B", struct.pack("256s", name.encode()[:15]))
            try:
                fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on this interface
                continue
            found.append(socket.inet_ntoa(request.tobytes()[20:24]))
    return found


def _configured_listen(cfg: config.Config) -> str | None:
    listen = getattr(cfg.replication, "listen", None)  # `[replication] listen` when configured
    return str(listen) if listen else None


def _name(cfg: config.Config) -> str:
    """``[node] name`` when set, else the host name."""
    return cfg.node.name if cfg.node.name != config.NodeConfig.name else members.default_name()


# ---- output --------------------------------------------------------------------


def _rows(cluster: Cluster) -> list[dict[str, Any]]:
    return [_row(m) for m in cluster.members()]


def _row(member: Member) -> dict[str, Any]:
    return {"node_id": member.node_id.hex(), "name": member.name, "addrs": list(member.addrs)}


def _tell_daemon(cfg: config.Config) -> bool:
    """Tell a mount on this data directory that its cluster changed; False if none runs."""
    try:
        reply = control.request(cfg.data_dir, "cluster", timeout=10.0)
    except OSError as exc:
        _say(f"the mount did not take the change now ({exc}); it will at its next start")
        return True
    return reply is not None


def _wait_listening(cfg: config.Config) -> bool:
    """Wait (at most `LISTEN_WAIT`) until the mount's replication worker listens,
    so that the token printed next can be used at once; False if it did not."""
    deadline = time.monotonic() + LISTEN_WAIT
    while time.monotonic() < deadline:
        try:
            reply = control.request(cfg.data_dir, "peers", timeout=5.0)
        except OSError:
            reply = ""
        if reply is None:
            return False  # the mount went away
        if reply.startswith("peers {") and json.loads(reply.removeprefix("peers "))["listening"]:
            return True
        time.sleep(0.1)
    return False


def _emit(args: argparse.Namespace, data: Mapping[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    elif text:
        print(text)


def _say(text: str) -> None:
    print(f"slurpfs: {text}", file=sys.stderr)


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: give {low} to {high}")
        return value

    return parse


def _partitions(text: str) -> int:
    return _count(1, MAX_PARTITIONS)(text)


def _ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 7 * 24 * 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds above 0, at most a week")
    return value
