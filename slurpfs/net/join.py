"""Joining a cluster over the network: `slurpfs peers join TOKEN`.

The joiner dials the inviter named in the token with the token's PSK, proves
its node key (Noise) and sends one signed request carrying the invite's secret
(`members.join_request`); the inviter's `Admissions` checks it
(`Cluster.admit`: the secret's hash, unused, unexpired; the request signed by
the node the Noise handshake proved), adds the joiner to its member log and
answers with the whole log, which the joiner stores (`Cluster.adopt`).

The inviter takes such a request only while it has a pending invite, and only
on the join stream (`transport.Joins`); its mount must be running, since the
replication worker is what listens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import SlurpError
from slurpfs.net import members
from slurpfs.net.members import Cluster, InviteRefused, Member, Token
from slurpfs.net.transport import JOIN_TIMEOUT, PeerUnavailable, RemoteFailure, knock

__all__ = ["Admissions", "InviterUnreachable", "join"]

log = logging.getLogger(__name__)


class InviterUnreachable(SlurpError):
    """No address of the inviter answered in time."""


class Admissions:
    """The inviter's side (`transport.Joins`) over this node's `Cluster`.

    `admitted` hears of each new member (the worker dials it next).
    """

    def __init__(self, cluster: Cluster, admitted: Callable[[Member], None] | None = None) -> None:
        self._cluster = cluster
        self._admitted = admitted

    def open(self) -> bool:
        return self._cluster.inviting()

    async def admit(self, peer: bytes, request: bytes) -> bytes:
        member = members.joiner_of(request)
        if member.node_id != peer:
            raise InviteRefused("the join request names another node than the one connected")
        answer = await trio.to_thread.run_sync(self._cluster.admit, request)
        log.info("admitted %s (%s) to the cluster", member.name, member.node_id.hex()[:16])
        if self._admitted is not None:
            self._admitted(member)
        return answer


async def join(
    data_dir: Path,
    keystore: Keystore,
    token: Token,
    addrs: Sequence[str],
    name: str | None = None,
    *,
    timeout: float = JOIN_TIMEOUT,  # noqa: ASYNC109 (per address of the inviter)
) -> Cluster:
    """Join the cluster of ``token`` as a member reached at ``addrs``; the stored cluster.

    `InviterUnreachable` when no address of the inviter answers in time;
    `InviteRefused` with the inviter's reason when it refused.
    """
    identity = keystore.load().node
    me = Member(identity.node_id, tuple(addrs), name or members.default_name())
    request = members.join_request(identity, token, me)
    if not token.addrs:
        raise InviterUnreachable("the token names no address of the inviter")
    failures = []
    for address in token.addrs:
        try:
            answer = await knock(
                identity, token.psk, address, token.inviter, request, timeout=timeout
            )
        except PeerUnavailable as exc:
            failures.append(str(exc))
            continue
        except RemoteFailure as exc:
            raise InviteRefused(f"the inviter refused: {exc}") from None
        entries = members.decode_entries(answer)
        return Cluster.adopt(data_dir, keystore, token.psk, entries)
    raise InviterUnreachable(
        f"the inviter {token.inviter.hex()[:16]} did not answer ({'; '.join(failures)}):"
        " is its mount running?"
    )
