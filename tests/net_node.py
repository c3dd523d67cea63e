"""A transport node in its own process, driven by JSON lines (for the transport tests).

``python net_node.py CONFIG`` where CONFIG is a JSON object: ``seed`` (hex, the
node's Ed25519 seed), ``psk`` (hex), ``listen`` (multiaddr), ``members``
({node id hex: multiaddr or null}). It prints ``{"ready": [addresses]}``, then
answers one JSON line on stdout per command line on stdin:

* ``{"op": "peers"}`` / ``{"op": "stats"}``: `Transport.peers` / `statistics`;
* ``{"op": "send", "peer", "purpose", "frames": [hex...]}``;
* ``{"op": "request", "peer", "purpose", "frame": hex}`` -> ``{"answer": hex}``;
* ``{"op": "received"}``: every frame received so far, with its batch number;
* ``{"op": "stop"}``: stops the transport; the process exits 0 once it returned.

Requests are answered with ``b"echo:" + frame``; a frame ``b"fail"`` is answered
with an error.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Any

import trio
from nacl.signing import SigningKey

from slurpfs.crypto.keys import NodeIdentity
from slurpfs.errors import SlurpError
from slurpfs.net.transport import Transport, TransportError


class Recorder:
    def __init__(self) -> None:
        self.received: list[tuple[str, str, str, int]] = []  # peer, purpose, frame, batch
        self.batches = 0

    async def frames(self, peer: bytes, purpose: str, frames: list[bytes]) -> None:
        self.batches += 1
        self.received += [(peer.hex(), purpose, f.hex(), self.batches) for f in frames]

    async def request(self, peer: bytes, purpose: str, frame: bytes) -> bytes:
        if frame == b"fail":
            raise SlurpError("asked to fail")
        return b"echo:" + frame


async def command(transport: Transport, recorder: Recorder, cmd: dict[str, Any]) -> Any:
    op = cmd["op"]
    if op == "peers":
        return [{**asdict(p), "node_id": p.node_id.hex()} for p in transport.peers()]
    if op == "stats":
        return asdict(transport.statistics())
    if op == "received":
        return recorder.received
    peer = bytes.fromhex(cmd.get("peer", ""))
    try:
        if op == "send":
            frames = [bytes.fromhex(f) for f in cmd["frames"]]
            await transport.send(peer, cmd["purpose"], frames)
            return True
        if op == "request":
            answer = await transport.request(peer, cmd["purpose"], bytes.fromhex(cmd["frame"]))
            return answer.hex()
    except TransportError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    raise ValueError(f"unknown op {op!r}")


async def serve_commands(transport: Transport, recorder: Recorder) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    while chunk := await stdin.receive_some():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            cmd = json.loads(line)
            if cmd["op"] == "stop":
                transport.stop()
                return
            reply(await command(transport, recorder, cmd))
    transport.stop()  # the test went away


def reply(value: Any) -> None:
    sys.stdout.write(json.dumps({"result": value}) + "\n")
    sys.stdout.flush()


async def main(config: dict[str, Any]) -> None:
    identity = NodeIdentity(SigningKey(bytes.fromhex(config["seed"])))
    members = {bytes.fromhex(k): v for k, v in config["members"].items()}
    recorder = Recorder()
    transport = Transport(identity, bytes.fromhex(config["psk"]), recorder, members)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(transport.run, config["listen"])
        sys.stdout.write(json.dumps({"ready": addresses}) + "\n")
        sys.stdout.flush()
        nursery.start_soon(serve_commands, transport, recorder)
    sys.stdout.write(json.dumps({"stopped": True}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
