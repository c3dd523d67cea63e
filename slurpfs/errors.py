"""Typed domain errors.

Lower layers raise these; the FUSE layer maps them to errno in one place
(`slurpfs.fs.errmap`) and the CLI maps them to exit codes (`exit_code`).
Messages never contain context plaintext.
"""

from __future__ import annotations

import errno


class SlurpError(Exception):
    """Base of every error slurpfs raises on purpose."""

    errno: int = errno.EIO
    exit_code: int = 1

    def details(self) -> dict[str, object]:
        """Fields beyond the message that travel with the error between processes."""
        return {}


class ConfigError(SlurpError):
    """A configuration key is unknown or has a bad value; the message names the key."""

    errno = errno.EINVAL
    exit_code = 7


class NotInitialised(SlurpError):
    """The data directory has not been set up with `slurpfs init`."""

    errno = errno.ENOENT
    exit_code = 7


class InvalidAddress(SlurpError):
    """A UCXL address (or a mount path naming one) is malformed.

    The message says which part is wrong and why.
    """

    errno = errno.EINVAL
    exit_code = 6


class AddressTooLong(InvalidAddress):
    """An address longer than the store can key (`slurpfs.ucxl.MAX_ADDRESS_BYTES`)."""

    errno = errno.ENAMETOOLONG


class NotFound(SlurpError):
    """No such context, version or directory."""

    errno = errno.ENOENT
    exit_code = 3


class AlreadyExists(SlurpError):
    errno = errno.EEXIST
    exit_code = 1


class NotEmpty(SlurpError):
    errno = errno.ENOTEMPTY
    exit_code = 1


class AccessDenied(SlurpError):
    """The caller, or this node, may not read that role's contexts."""

    errno = errno.EACCES
    exit_code = 4


class KeyMissing(AccessDenied):
    """This node does not hold a private key that opens the envelope."""


class WrongPassphrase(SlurpError):
    errno = errno.EACCES
    exit_code = 4


class Corrupt(SlurpError):
    """Stored or received data failed authentication or does not parse.

    Never served as data: reported as EIO, audited and counted.
    """

    errno = errno.EIO
    exit_code = 5


class MalformedEnvelope(Corrupt):
    """The envelope bytes do not parse (truncated, bad magic, bad lengths)."""


class BadSignature(Corrupt):
    """The envelope header's signature does not verify: the header was altered."""


class UntrustedAuthor(Corrupt):
    """The envelope was signed by a node this node does not trust."""


class CiphertextTampered(Corrupt):
    """The ciphertext does not match the hash the signed header commits to."""


class EnvelopeMisplaced(Corrupt):
    """A valid envelope was found under an address or role it was not written for (replay)."""


class AuthenticationFailed(Corrupt):
    """AEAD decryption failed: the associated data or the ciphertext does not match."""


class WrongKey(Corrupt):
    """A key slot for a held role does not open with that role's private key."""


class BodyUnavailable(SlurpError):
    """A version's body is held by other members (placement) and none of them gave
    it in time: down, partitioned, or what they sent was not the version's.
    `tried` names the nodes asked (hex node ids), in the order asked."""

    errno = errno.EIO
    exit_code = 1

    def __init__(self, message: str, tried: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.tried = tried

    def details(self) -> dict[str, object]:
        return {"tried": list(self.tried)}


class QueryError(SlurpError):
    """A search query (or an option in a `.search/` name) does not parse.

    The message says what is wrong in words a user can act on.
    """

    errno = errno.EINVAL
    exit_code = 2


class Busy(SlurpError):
    """Other writers kept changing the same context; the write was not stored. Retry."""

    errno = errno.EAGAIN
    exit_code = 1


class StoreFull(SlurpError):
    errno = errno.ENOSPC
    exit_code = 8


class AuditUnavailable(SlurpError):
    """The audit log could not record an access decision (a full disk, an I/O error).

    Access is refused rather than granted unrecorded; nothing stored is affected.
    The errno is the one the log's file system gave (ENOSPC for a full disk).
    """

    exit_code = 8

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = code


def exit_code(exc: BaseException) -> int:
    """The CLI exit code for an exception (1 for anything unexpected)."""
    return exc.exit_code if isinstance(exc, SlurpError) else 1
