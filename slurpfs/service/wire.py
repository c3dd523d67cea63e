"""The worker protocol's wire: typed, length-prefixed messages over a local socket.

The supervisor and each worker process talk over one end each of a
``socketpair`` (never a file, never a name in the file system)::

    frame   = length[4, big-endian] ‖ JSON object (UTF-8)
    message = {"t": kind, "id": n (requests and their replies), ...fields}

A request carries an ``id``; its answer carries the same ``id`` and the kind
``ok`` (with the fields of the answer) or ``error`` (``kind``: the error class
the other side raised, ``message``). Messages without an ``id`` are notices
(``changed``, ``status``, ``stop``): nobody waits for an answer. Notices are
handled one at a time, in the order they were sent: a notice may say what
changed since the one before it (a worker's ``status`` carries only the fields
that changed), so a later one must never be applied before an earlier one,
even when both arrive in one read. The first
message each way is ``hello`` with the protocol version; a peer speaking
another version is refused (`WireError`).

Frames are bounded (`MAX_FRAME`): a frame announcing more is refused, not
allocated. Contexts' plaintext may travel in a frame (search snippets): it
stays in the two processes' memory and the kernel's socket buffers.

This module knows frames and requests, not what a worker does with them:
`Peer` is the same on both sides.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from slurpfs.errors import SlurpError

PROTOCOL = 1
MAX_FRAME = 64 << 20
_LENGTH = struct.Struct(">I")
_READ = 1 << 16


class WireError(SlurpError):
    """The other side broke the protocol (a bad frame, another version)."""


class PeerGone(SlurpError):
    """The other process closed its end or died: no answer will come."""


class RemoteError(SlurpError):
    """The other side answered a request with an error."""

    def __init__(self, kind: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.fields = dict(details or {})  # the error's other fields (`SlurpError.details`)


@dataclass(frozen=True, slots=True)
class Message:
    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


def encode(message: Message) -> bytes:
    body: dict[str, Any] = {"t": message.kind, **message.fields}
    if message.id is not None:
        body["id"] = message.id
    payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_FRAME:
        raise WireError(
            f"a {message.kind!r} message of {len(payload)} bytes exceeds the frame limit"
        )
    return _LENGTH.pack(len(payload)) + payload


def decode(payload: bytes) -> Message:
    try:
        body = json.loads(payload, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"a frame is not a JSON object: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("t"), str):
        raise WireError("a frame has no message kind")
    kind = body.pop("t")
    ident = body.pop("id", None)
    if ident is not None and (not isinstance(ident, int) or isinstance(ident, bool)):
        raise WireError(f"a {kind!r} message has a bad id")
    return Message(kind, body, ident)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


class FrameReader:
    """Splits a byte stream into frames (a partial frame waits for more bytes)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise WireError(f"a frame announces {length} bytes, over the limit {MAX_FRAME}")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[_LENGTH.size : end]))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


Handler = Callable[[Message], Awaitable[Mapping[str, Any] | None]]
"""Answers a request (the fields of ``ok``) or handles a notice (returns None).

A notice is handled in the reading task, before the next message is read: its
handler must be quick and must not wait for the other side (no request)."""


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    sent: int
    received: int
    waiting: int  # requests sent and not yet answered


class Peer:
    """One end of a worker connection: send notices, make requests, serve them.

    `serve` reads until the other side closes; it runs each incoming request's
    handler in its own task, so a slow request does not hold up the others, and
    handles notices itself, in the order they were sent (never in tasks: trio
    runs tasks started together in either order). Requests still waiting when
    the connection ends fail with `PeerGone`.
    """

    def __init__(self, stream: trio.abc.Stream, handler: Handler, *, name: str) -> None:
        self.stream = stream
        self.handler = handler
        self.name = name
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Call] = {}
        self._closed = False
        self._reader = FrameReader()
        self._early: list[bytes] = []  # frames that arrived with the other side's hello
        self.sent = self.received = 0

    async def hello(self, **fields: Any) -> Message:
        """Exchange ``hello`` messages; returns the other side's (`WireError` if it
        speaks another protocol version)."""
        await self._send(Message("hello", {"protocol": PROTOCOL, **fields}))
        frames: list[bytes] = []
        while not frames:
            frames = self._reader.feed(await self._receive_some())
        self._early = frames[1:]
        first = decode(frames[0])
        if first.kind != "hello" or first.fields.get("protocol") != PROTOCOL:
            raise WireError(
                f"{self.name} speaks another protocol: {first.kind} {first.fields.get('protocol')!r}"
            )
        return first

    async def notify(self, kind: str, **fields: Any) -> None:
        await self._send(Message(kind, fields))

    async def request(self, kind: str, **fields: Any) -> Mapping[str, Any]:
        """Send a request and wait for its answer (`RemoteError`, `PeerGone`)."""
        if self._closed:
            raise PeerGone(f"{self.name} is not connected")
        call = _Call()
        ident = next(self._ids)
        self._waiting[ident] = call
        try:
            await self._send(Message(kind, fields, ident))
            await call.done.wait()
        finally:
            self._waiting.pop(ident, None)
        if call.error is not None:
            raise call.error
        return call.answer

    async def serve(self) -> None:
        """Read messages until the other side closes; then fail what still waits.

        Requests being handled when the connection ends run to their end; their
        answers have nobody to go to and are dropped.
        """
        async with trio.open_nursery() as nursery:
            try:
                for frame in self._early:
                    await self._dispatch(decode(frame), nursery)
                while True:
                    for frame in self._reader.feed(await self._receive_some()):
                        await self._dispatch(decode(frame), nursery)
            except PeerGone as exc:
                self._end(exc)
            except BaseException:
                self._end(PeerGone(f"the connection to {self.name} ended"))
                raise

    def _end(self, reason: PeerGone) -> None:
        self._closed = True
        for call in self._waiting.values():
            call.fail(reason)

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(self.sent, self.received, len(self._waiting))

    async def _dispatch(self, message: Message, nursery: trio.Nursery) -> None:
        self.received += 1
        if message.kind in ("ok", "error"):
            call = self._waiting.get(message.id) if message.id is not None else None
            if call is None:
                raise WireError(f"{self.name} answered a request nobody made ({message.id})")
            if message.kind == "ok":
                call.succeed(message.fields)
            else:
                fields = dict(message.fields)
                kind = str(fields.pop("kind", "SlurpError"))
                call.fail(RemoteError(kind, str(fields.pop("message", "")), fields))
            return
        if message.id is None:
            await self.handler(message)  # a notice: here, in order (its error ends serve)
            return
        nursery.start_soon(self._answer, message, message.id)

    async def _answer(self, message: Message, ident: int) -> None:
        try:
            answer = await self.handler(message)
        except SlurpError as exc:
            with contextlib.suppress(PeerGone):
                fields = {**exc.details(), "kind": type(exc).__name__, "message": str(exc)}
                await self._send(Message("error", fields, ident))
            return
        with contextlib.suppress(PeerGone):  # asked, then gone: nobody to answer
            await self._send(Message("ok", dict(answer or {}), ident))

    async def _send(self, message: Message) -> None:
        frame = encode(message)
        async with self._send_lock:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed = True
                raise PeerGone(f"{self.name} is gone: {exc}") from None
        self.sent += 1

    async def _receive_some(self) -> bytes:
        try:
            data = await self.stream.receive_some(_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone(f"{self.name} is gone: {exc}") from None
        if not data:
            raise PeerGone(f"{self.name} closed the connection")
        return bytes(data)


class _Call:
    __slots__ = ("answer", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: Mapping[str, Any] = {}
        self.error: SlurpError | None = None

    def succeed(self, answer: Mapping[str, Any]) -> None:
        self.answer = answer
        self.done.set()

    def fail(self, error: SlurpError) -> None:
        self.error = error
        self.done.set()
