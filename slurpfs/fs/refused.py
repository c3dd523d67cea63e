"""``.slurp/refused``: each user's recent refused requests, with the reason and the fix.

A bare errno explains some refusals badly: ``EPERM`` for ``README.txt`` in an
address directory (only role files and temporary files live there), ``EINVAL``
for a name (``git init`` makes ``.git``), ``EXDEV`` for a rename that would move
history, ``EACCES`` for a role the caller does not hold. Such refusals are
recorded here, per uid, a bounded number each, and logged; ``.slurp/refused``
shows each uid only its own (paths name what a user tried, which is theirs to
know). Nothing here holds context plaintext: names, reasons and fixes only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from slurpfs.errors import SlurpError

log = logging.getLogger("slurpfs.fs")

# Refusals per uid, and uids, kept (the oldest go first).
PER_UID = 64
UIDS = 1024
# What a bare errno explains badly; other errors (ENOENT, EEXIST, EROFS) say it all.
RECORDED = frozenset({errno.EPERM, errno.EINVAL, errno.EXDEV, errno.EACCES})

IMPORT_FIX = "store a tree of ordinary files with `slurpfs import DIR --authority AUTH --role ROLE`"
_FIXES = {
    errno.EINVAL: (
        "use a name of visible characters that does not start with '.' (names of"
        f" role files and directories are addresses); to keep other files, {IMPORT_FIX}"
    ),
    errno.EXDEV: "copy it instead (cp, then rm); mv does so by itself",
    errno.EACCES: (
        "ask for a role that may read it: users and groups get roles in the"
        " [roles.NAME] sections of the configuration"
    ),
    errno.EPERM: IMPORT_FIX,
}


class NameRefused(SlurpError):
    """A new name in an address directory that is neither a role file's nor a
    temporary file's (it would be lost at unmount): ``EPERM``, with the fix."""

    errno = errno.EPERM

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused request."""

    time: float
    op: str
    path: str
    code: int
    reason: str
    fix: str

    def render(self) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        name = errno.errorcode.get(self.code, str(self.code))
        return (
            f"{stamp} {self.op} {self.path}: {name} ({os.strerror(self.code)})\n"
            f"  why: {self.reason}\n"
            f"  fix: {self.fix}\n"
        )


class Refusals:
    """The recent refusals of each uid (at most `PER_UID` each, for `UIDS` uids)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._by_uid: OrderedDict[int, deque[Refusal]] = OrderedDict()
        self._clock = clock
        self.recorded = 0

    def record(self, uid: int, op: str, path: str, exc: SlurpError) -> None:
        """Keep (and log) `exc` as a refusal of `op` on `path` for `uid`."""
        code = exc.errno or errno.EIO
        fix = getattr(exc, "fix", "") or _FIXES.get(code, "")
        refusal = Refusal(self._clock(), op, path, code, str(exc), fix)
        ring = self._by_uid.pop(uid, None) or deque(maxlen=PER_UID)
        ring.append(refusal)
        self._by_uid[uid] = ring  # the most recent uid last
        while len(self._by_uid) > UIDS:
            self._by_uid.popitem(last=False)
        self.recorded += 1
        log.info("refused %s of %r for uid %d: %s", op, path, uid, refusal.reason)

    @contextlib.contextmanager
    def watch(self, uid: int, op: str, path: Callable[[], str]) -> Iterator[None]:
        """Record a `SlurpError` the block raises (and re-raise it) if its errno is in
        `RECORDED`; `path` is asked only then."""
        try:
            yield
        except SlurpError as exc:
            if exc.errno in RECORDED:
                self.record(uid, op, path(), exc)
            raise

    def render(self, uid: int) -> str:
        """What ``.slurp/refused`` shows `uid`: its refusals, oldest first ('' if none)."""
        return "".join(r.render() for r in self._by_uid.get(uid, ()))
