"""An inviter in its own process: a `Transport` with the join handler over a
cluster directory (for the join tests, before a mount runs the replication worker).

``python join_node.py CONFIG``; CONFIG is a JSON object: ``data`` (a data
directory with keys, no passphrase, and a cluster), ``listen`` (multiaddr).
It prints ``{"ready": [addresses]}`` and then answers JSON lines on stdin as
`net_node.py` does (``peers``, ``stats``, ``stop``); an admitted node becomes a
member of the running transport at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio
from net_node import Recorder, serve_commands

from slurpfs.crypto.keystore import KdfParams, Keystore
from slurpfs.net.join import Admissions
from slurpfs.net.members import Cluster, Member
from slurpfs.net.transport import Transport


async def main(config: dict[str, Any]) -> None:
    keystore = Keystore(Path(config["data"]), None, KdfParams.weak())
    cluster = Cluster.load(Path(config["data"]), keystore)
    assert cluster is not None, "no cluster in the data directory"

    def allowlist() -> dict[bytes, str | None]:
        return {m.node_id: (m.addrs[0] if m.addrs else None) for m in cluster.members()}

    def admitted(member: Member) -> None:
        transport.set_members(allowlist())

    recorder = Recorder()
    transport = Transport(
        keystore.load().node, cluster.psk, recorder, allowlist(), Admissions(cluster, admitted)
    )
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(transport.run, config["listen"])
        sys.stdout.write(json.dumps({"ready": addresses}) + "\n")
        sys.stdout.flush()
        nursery.start_soon(serve_commands, transport, recorder)
    sys.stdout.write(json.dumps({"stopped": True}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
