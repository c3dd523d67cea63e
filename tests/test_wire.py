"""The worker protocol's wire (slurpfs.service.wire) over a real socket pair."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from slurpfs.errors import QueryError
from slurpfs.service.wire import (
    MAX_FRAME,
    FrameReader,
    Message,
    Peer,
    PeerGone,
    RemoteError,
    WireError,
    decode,
    encode,
)


def test_frames_split_and_join_across_reads() -> None:
    frames = encode(Message("a", {"x": 1})) + encode(Message("b", {"y": "é"}, 7))
    reader = FrameReader()
    got: list[bytes] = []
    for i in range(len(frames)):  # one byte at a time: a partial frame waits
        got += reader.feed(frames[i : i + 1])
    assert [decode(f) for f in got] == [Message("a", {"x": 1}), Message("b", {"y": "é"}, 7)]
    assert reader.pending == 0


def test_an_oversized_frame_is_refused_before_it_is_read() -> None:
    reader = FrameReader()
    with pytest.raises(WireError, match="over the limit"):
        reader.feed((MAX_FRAME + 1).to_bytes(4, "big"))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "not a JSON object"),
        (b"[1, 2]", "no message kind"),
        (b'{"x": 1}', "no message kind"),
        (b'{"t": "a", "id": "7"}', "bad id"),
        (b'{"t": "a", "v": NaN}', "not a JSON object"),
    ],
)
def test_malformed_frames_are_wire_errors(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        decode(payload)


def test_nan_is_never_sent() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        encode(Message("a", {"v": float("nan")}))


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
        trio.socket.from_stdlib_socket(b)
    )


async def test_requests_answers_errors_and_notices() -> None:
    left_stream, right_stream = _pair()
    notices: list[Message] = []
    release = trio.Event()
    noticed = trio.Event()

    async def serve_right(message: Message) -> Mapping[str, Any] | None:
        if message.kind == "echo":
            return {"back": message["value"]}
        if message.kind == "slow":
            await release.wait()
            return {"slow": True}
        if message.kind == "bad":
            raise QueryError("that query cannot run")
        notices.append(message)
        noticed.set()
        return None

    async def nothing(message: Message) -> None:
        raise AssertionError(f"the left side got {message}")

    left = Peer(left_stream, nothing, name="right")
    right = Peer(right_stream, serve_right, name="left")
    async with left_stream, right_stream, trio.open_nursery() as nursery:
        nursery.start_soon(right.hello)  # both sides say hello at once
        assert (await left.hello())["protocol"] == 1
        nursery.start_soon(left.serve)
        nursery.start_soon(right.serve)
        slow: list[Mapping[str, Any]] = []
        answered = trio.Event()

        async def ask_slow() -> None:
            slow.append(await left.request("slow"))
            answered.set()

        nursery.start_soon(ask_slow)
        # a slow request does not hold up the next one
        assert await left.request("echo", value=[1, "two"]) == {"back": [1, "two"]}
        with pytest.raises(RemoteError, match="cannot run") as caught:
            await left.request("bad")
        assert caught.value.kind == "QueryError"
        await left.notify("changed", seq=3)
        release.set()
        await answered.wait()
        await noticed.wait()
        assert slow == [{"slow": True}]
        assert notices == [Message("changed", {"seq": 3})]
        nursery.cancel_scope.cancel()


async def test_waiting_requests_fail_when_the_other_side_dies() -> None:
    left_stream, right_stream = _pair()

    async def never(message: Message) -> Mapping[str, Any] | None:
        raise AssertionError(f"nothing is asked of the left side: {message}")

    left = Peer(left_stream, never, name="worker")
    right = Peer(right_stream, never, name="supervisor")
    failed: list[PeerGone] = []

    async def ask() -> None:
        try:
            await left.request("query")  # the right side never serves: no answer comes
        except PeerGone as exc:
            failed.append(exc)

    async with left_stream, trio.open_nursery() as nursery:
        nursery.start_soon(right.hello)
        await left.hello()
        nursery.start_soon(left.serve)
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        await right_stream.aclose()  # the worker dies: its end of the pair closes
    # serve() saw the end, failed the waiting request, and both tasks ended
    # (a reset, as the dead end had an unread request: "worker is gone: ...reset by peer")
    assert len(failed) == 1
    assert str(failed[0]).startswith("worker ")
    assert left.statistics().waiting == 0
    with pytest.raises(PeerGone):
        await left.request("query")


async def test_another_protocol_version_is_refused() -> None:
    left_stream, right_stream = _pair()

    async def never(message: Message) -> None:
        return None

    async with left_stream, right_stream:
        await right_stream.send_all(encode(Message("hello", {"protocol": 99})))
        with pytest.raises(WireError, match="another protocol"):
            await Peer(left_stream, never, name="worker").hello()


async def test_notices_are_handled_in_the_order_they_were_sent() -> None:
    # Notices that arrive in one read (a reader that fell behind) are handled in
    # the order they were sent, every time: a notice may only say what changed
    # since the one before it. (Trio runs tasks started together in either
    # order, so handling each in a task of its own reversed about half the
    # bursts: 32 bursts of two all in order by chance is a 1 in 2^32 event.)
    left_stream, right_stream = _pair()
    seen: list[int] = []

    async def record(message: Message) -> None:
        seen.append(message["n"])

    right = Peer(right_stream, record, name="left")
    async with left_stream, right_stream, trio.open_nursery() as nursery:
        await left_stream.send_all(encode(Message("hello", {"protocol": 1})))
        await right.hello()
        nursery.start_soon(right.serve)
        for burst in range(32):
            first, second = (Message("status", {"n": 2 * burst + i}) for i in range(2))
            await left_stream.send_all(encode(first) + encode(second))  # one write, one read
            await trio.testing.wait_all_tasks_blocked()
            assert seen[-2:] == [2 * burst, 2 * burst + 1]
        nursery.cancel_scope.cancel()
    assert seen == list(range(64))
    assert right.statistics().received == 64
