"""Domain errors to errno, in one place.

Every request handler is decorated with `handler`, which runs it inside
`errmap` (so does a block inside a handler that wants it): a `SlurpError` becomes
`pyfuse3.FUSEError` carrying the error's ``errno``; `FUSEError` passes through; an
`OSError` that reaches a handler (the machine speaking: a full disk, an I/O error)
becomes its own errno and an ERROR log line, so the mount goes on serving. Any other
exception is a bug: it is logged with its traceback and the request fails with
`EIO`, but the mount (and every other open buffer in it) stays up.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from time import perf_counter
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3

from slurpfs.errors import AccessDenied, AuditUnavailable, Corrupt, InvalidAddress, SlurpError
from slurpfs.metrics import NO_EVENTS, Events, Latency

log = logging.getLogger("slurpfs.fs")


class ReadOnly(SlurpError):
    """History, temporal views, conflicts and status files cannot be changed."""

    errno = errno.EROFS


class NotPermitted(SlurpError):
    """The operation makes no sense at this place in the tree (a file in ucxl/, a link)."""

    errno = errno.EPERM


class IsADirectory(SlurpError):
    errno = errno.EISDIR


class NotADirectory(SlurpError):
    errno = errno.ENOTDIR


class CrossDevice(SlurpError):
    """A rename that would move stored history: tools fall back to copy and delete."""

    errno = errno.EXDEV


class NameTooLong(SlurpError):
    errno = errno.ENAMETOOLONG


class TooLarge(SlurpError):
    errno = errno.EFBIG


class Unsupported(SlurpError):
    """A valid request this filesystem does not do (e.g. RENAME_EXCHANGE)."""

    errno = errno.EINVAL


def fuse_error(exc: SlurpError | OSError) -> pyfuse3.FUSEError:
    """The `FUSEError` for a domain error, or for an `OSError` (the machine speaking:
    a full disk, an I/O error), logging what a user or operator must see."""
    if isinstance(exc, OSError):
        log.error("request failed: %s", exc)
    elif isinstance(exc, InvalidAddress):
        # The caller only sees EINVAL; the log line says why.
        log.info("invalid name: %s", exc)
    elif isinstance(exc, Corrupt):
        log.error("refusing to serve corrupt data: %s", exc)
    elif isinstance(exc, AccessDenied):
        log.debug("access denied: %s", exc)
    elif isinstance(exc, AuditUnavailable):
        log.error("%s", exc)
    return pyfuse3.FUSEError(exc.errno or errno.EIO)


def error_kind(exc: SlurpError | OSError) -> str | None:
    """The kind a failed request counts as in ``slurpfs_errors_total`` (None: not an
    error of the node's, such as a name that does not exist or a read-only view)."""
    if isinstance(exc, OSError):
        return "io"
    for kind, cls in _KINDS:
        if isinstance(exc, cls):
            return kind
    return None


_KINDS: tuple[tuple[str, type[SlurpError]], ...] = (
    ("corrupt", Corrupt),
    ("denied", AccessDenied),
    ("invalid", InvalidAddress),
    ("audit", AuditUnavailable),
)


class errmap:  # lower case: it reads as a function at every handler
    """Turn a `SlurpError` or `OSError` raised in the block into the matching `FUSEError`.

    `cleanup` runs when the block ends, however it ends. (A class rather than a
    generator-based context manager: it wraps every request.)
    """

    __slots__ = ("_cleanup", "_errors")

    def __init__(
        self, cleanup: Callable[[], None] | None = None, errors: Events = NO_EVENTS
    ) -> None:
        self._cleanup = cleanup
        self._errors = errors

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if isinstance(exc, SlurpError | OSError):
                counted = error_kind(exc)
                if counted is not None:
                    self._errors.count(counted)
                raise fuse_error(exc) from None
            if isinstance(exc, Exception) and not isinstance(exc, pyfuse3.FUSEError):
                self._errors.count("internal")
                log.error("internal error; the request fails with EIO", exc_info=exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if self._cleanup is not None:
                self._cleanup()


class _Sweeps(Protocol):
    def sweep(self) -> None: ...


class _Handlers(Protocol):
    @property
    def inodes(self) -> _Sweeps: ...

    @property
    def latency(self) -> Latency: ...

    @property
    def errors(self) -> Events: ...


H = TypeVar("H", bound=_Handlers)
P = ParamSpec("P")
R = TypeVar("R")


def handler(
    method: Callable[Concatenate[H, P], Awaitable[R]],
) -> Callable[Concatenate[H, P], Coroutine[Any, Any, R]]:
    """A FUSE request handler: its whole body runs inside `errmap`, and the inode
    table's nodes resolved but never handed to the kernel are purged at its end.

    pyfuse3 answers only `FUSEError`; any other exception leaving a handler ends the
    FUSE loop, and with it the mount. So every handler has this decorator, however
    simple (``statfs``, ``forget``, ``release``): a bug fails one request, never the
    mount. Its latency goes into ``slurpfs_fuse_request_seconds{op}``, its failures
    into ``slurpfs_errors_total{kind}`` (`error_kind`).
    """

    op = method.__name__

    async def run(ops: H, /, *args: P.args, **kwargs: P.kwargs) -> R:
        start = perf_counter()
        try:
            with errmap(ops.inodes.sweep, ops.errors):
                return await method(ops, *args, **kwargs)
        finally:
            ops.latency.observe(op, perf_counter() - start)

    functools.update_wrapper(run, method)
    return run


def fail(code: int) -> pyfuse3.FUSEError:
    """Shorthand for handlers: ``raise fail(errno.ENOENT)``."""
    return pyfuse3.FUSEError(code)
