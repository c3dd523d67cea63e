"""The replication transport on loopback: round trip, batched 4 KiB frames, CPU per frame.

Run ``.venv/bin/python scripts/bench_lib/transport.py [FRAMES [BATCH [ROUND_TRIPS]]]``.
It starts a second node in a child process (this file with ``--peer``), waits
until both see each other up, then measures on the reused streams:

* the round trip of a 64-byte `request` (median and p99);
* `send` of FRAMES frames of 4 KiB in batches of BATCH, until the peer counted them
  all: frames/s, MB/s, and CPU seconds per frame of both processes together.

The machine may be shared: the 1-minute load average is printed with the results.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

import trio
from nacl.signing import SigningKey

from slurpfs.crypto.keys import NodeIdentity
from slurpfs.net.transport import Transport


class Counter:
    """The peer's receiver: counts frames; answers "count" and "cpu", or echoes."""

    def __init__(self) -> None:
        self.count = 0
        self.stop = trio.Event()

    async def frames(self, peer: bytes, purpose: str, frames: list[bytes]) -> None:
        self.count += len(frames)

    async def request(self, peer: bytes, purpose: str, frame: bytes) -> bytes:
        if frame == b"count":
            return struct.pack(">Q", self.count)
        if frame == b"cpu":
            self.stop.set()
            return struct.pack(">d", time.process_time())
        return frame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def node(config: dict[str, Any], receiver: Any) -> Transport:
    identity = NodeIdentity(SigningKey(bytes.fromhex(config["seed"])))
    members = {bytes.fromhex(k): v for k, v in config["members"].items()}
    return Transport(identity, bytes.fromhex(config["psk"]), receiver, members)


async def peer(config: dict[str, Any]) -> None:
    counter = Counter()
    transport = await node(config, counter)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run, config["listen"])
        await counter.stop.wait()
        await trio.sleep(0.5)  # let the answer leave
        transport.stop()


async def wait_up(transport: Transport) -> None:
    while True:  # polled: the transport has no "up" event, by design
        if all(p.up for p in transport.peers()):
            return
        await trio.sleep(0.05)


async def measure(config: dict[str, Any], them: bytes, frames: int, batch: int, trips: int) -> Any:
    transport = await node(config, Counter())
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run, config["listen"])
        with trio.fail_after(60):
            await wait_up(transport)
        rtts = []
        for _ in range(trips):
            start = time.perf_counter()
            await transport.request(them, "meta", b"x" * 64)
            rtts.append(time.perf_counter() - start)
        payload = os.urandom(4096)
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(frames // batch):
            await transport.send(them, "bodies", [payload] * batch)
        while True:
            (count,) = struct.unpack(">Q", await transport.request(them, "bodies", b"count"))
            if count >= frames:
                break
            await trio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        (peer_cpu,) = struct.unpack(">d", await transport.request(them, "meta", b"cpu"))
        transport.stop()
    rtts.sort()
    return {
        "rtt_64B_ms": {
            "median": statistics.median(rtts) * 1e3,
            "p99": rtts[len(rtts) * 99 // 100] * 1e3,
        },
        "frames": frames,
        "batch": batch,
        "frames_per_s": frames / elapsed,
        "MB_per_s": frames * 4096 / elapsed / 1e6,
        "cpu_ms_per_frame_sender": cpu / frames * 1e3,
        "cpu_ms_per_frame_receiver_upper_bound": peer_cpu / frames * 1e3,  # includes its start-up
        "load_average_1min": os.getloadavg()[0],
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--peer"]:
        trio.run(peer, json.loads(argv[1]))
        return
    frames, batch, trips = (int(a) for a in (argv + ["10000", "16", "500"][len(argv) :])[:3])
    seeds = [os.urandom(32), os.urandom(32)]
    ids = [bytes(SigningKey(s).verify_key).hex() for s in seeds]
    addresses = [f"/ip4/127.0.0.1/tcp/{free_port()}" for _ in seeds]
    members = dict(zip(ids, addresses, strict=True))
    psk = os.urandom(32).hex()
    configs = [
        {"seed": s.hex(), "psk": psk, "listen": addr, "members": members}
        for s, addr in zip(seeds, addresses, strict=True)
    ]
    child = subprocess.Popen([sys.executable, __file__, "--peer", json.dumps(configs[1])])
    try:
        result = trio.run(measure, configs[0], bytes.fromhex(ids[1]), frames, batch, trips)
    finally:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()  # by its PID
            child.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
