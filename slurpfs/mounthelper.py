"""``mount.fuse.slurpfs``: what ``mount -t fuse.slurpfs`` and ``/etc/fstab`` run.

mount(8) calls ``mount.fuse.slurpfs DATA_DIR MOUNTPOINT [-o OPTIONS] [-n] [-s] [-v]``;
this turns that into ``slurpfs mount --data DATA_DIR MOUNTPOINT ...``. Options:

* ``allow_other``, ``debug``: as ``--allow-other``, ``--debug``;
* ``config=FILE``, ``passphrase_file=FILE``: as ``--config``, ``--passphrase-file``;
* what mount(8) and fstab put there for every file system (``rw``, ``defaults``,
  ``noauto``, ``nofail``, ``_netdev``, ``x-*``, ...) is ignored.

Anything else (``ro`` too: a slurpfs mount is read-write) is refused with exit 2,
naming the option. Exit codes are those of `slurpfs.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from slurpfs import cli

_FLAGS = {"allow_other": "--allow-other", "debug": "--debug"}
_VALUES = {"config": "--config", "passphrase_file": "--passphrase-file"}
_GENERIC = frozenset(
    [
        "rw",
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "nofail",
        "_netdev",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "async",
        "atime",
        "noatime",
        "relatime",
        "nodiratime",
    ]
)
USAGE = "usage: mount.fuse.slurpfs DATA_DIR MOUNTPOINT [-o OPTION[,OPTION...]] [-n] [-s] [-v]"


class UsageError(Exception):
    pass


def translate(argv: Sequence[str]) -> list[str]:
    """mount(8)'s arguments -> ``slurpfs`` arguments (raises `UsageError`)."""
    operands: list[str] = []
    options: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options += next(args, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg in ("-n", "-s", "-v", "-f"):  # no mtab, sloppy, verbose, fake: nothing to do
            continue
        else:
            operands.append(arg)
    if len(operands) != 2:
        raise UsageError(USAGE)
    data_dir, mountpoint = operands
    out = ["mount", "--data", data_dir, mountpoint]
    for option in filter(None, options):
        name, eq, value = option.partition("=")
        if name in _FLAGS and not eq:
            out.append(_FLAGS[name])
        elif name in _VALUES and value:
            out += [_VALUES[name], value]
        elif option in _GENERIC or name.startswith("x-") or name == "comment":
            continue
        else:
            raise UsageError(f"mount.fuse.slurpfs: unsupported mount option {option!r}\n{USAGE}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = translate(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
