"""Which roles a FUSE caller holds.

Configuration maps roles to unix users and groups (``roles.<name>.users`` and
``.groups``, by name or number). The user who mounted the filesystem holds every
role whose private key the node has, in addition to any mapping. Supplementary
groups come from ``/proc/<pid>/status`` of the calling process, read only when
some role is mapped to a group.

Holding a role is not the same as reading its files: the model decides which
role files a set of held roles opens (`ContextStore.readable_roles`, e.g.
``architect`` also reads ``developer``) and whether this node has the key.
"""

from __future__ import annotations

import grp
import logging
import pwd
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from slurpfs.config import RoleConfig

log = logging.getLogger("slurpfs.fs")


def read_sup_groups(pid: int) -> frozenset[int]:
    """Supplementary group ids of `pid` from /proc (empty if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: ids from the FUSE request, and the roles they hold."""

    uid: int
    gid: int
    pid: int
    roles: frozenset[str]

    @property
    def who(self) -> str:
        """How the audit log names this caller."""
        return f"uid:{self.uid}"


class RoleMap:
    """Maps (uid, gid, pid) to held roles. Names are resolved once, at mount time."""

    def __init__(
        self,
        roles: Mapping[str, RoleConfig],
        held: Collection[str],
        owner_uid: int,
        *,
        sup_groups: Callable[[int], frozenset[int]] = read_sup_groups,
    ) -> None:
        self._held = frozenset(held)
        self._owner = owner_uid
        self._sup_groups = sup_groups
        self._by_uid: dict[int, set[str]] = {}
        self._by_gid: dict[int, set[str]] = {}
        # Without group mappings the roles depend on the uid alone (every request asks).
        self._uid_roles: dict[int, frozenset[str]] = {}
        for role in roles.values():
            for user in role.users:
                uid = _resolve(user, lambda n: pwd.getpwnam(n).pw_uid, "user", role.name)
                if uid is not None:
                    self._by_uid.setdefault(uid, set()).add(role.name)
            for group in role.groups:
                gid = _resolve(group, lambda n: grp.getgrnam(n).gr_gid, "group", role.name)
                if gid is not None:
                    self._by_gid.setdefault(gid, set()).add(role.name)

    def set_held(self, held: Collection[str]) -> None:
        """The node's keys changed (a role granted through the member log)."""
        self._held = frozenset(held)
        self._uid_roles.clear()

    def roles(self, uid: int, gid: int, pid: int) -> frozenset[str]:
        """The roles the caller holds (before the node's keys are considered)."""
        if not self._by_gid:
            known = self._uid_roles.get(uid)
            if known is None:
                known = self._uid_roles[uid] = self._roles(uid, gid, pid)
            return known
        return self._roles(uid, gid, pid)

    def _roles(self, uid: int, gid: int, pid: int) -> frozenset[str]:
        out: set[str] = set(self._held) if uid == self._owner else set()
        out |= self._by_uid.get(uid, set())
        if self._by_gid:
            out |= self._by_gid.get(gid, set())
            if pid > 0:
                for g in self._sup_groups(pid):
                    out |= self._by_gid.get(g, set())
        return frozenset(out)

    def caller(self, uid: int, gid: int, pid: int) -> Caller:
        return Caller(uid, gid, pid, self.roles(uid, gid, pid))


def _resolve(name: str, lookup: Callable[[str], int], what: str, role: str) -> int | None:
    if name.isdigit():
        return int(name)
    try:
        return lookup(name)
    except KeyError:
        log.warning("roles.%s: no such %s %r; mapping ignored", role, what, name)
        return None
