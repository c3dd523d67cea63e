"""A py-libp2p host that tries to get frames into a transport node (for the transport tests).

``python net_intruder.py CONFIG``; CONFIG is a JSON object with ``mode``,
``target`` (the node's multiaddr with ``/p2p/<peer id>``), ``psk`` (hex or
null), ``seed`` (hex, for ``member`` and ``no-psk``) or ``claim`` (a member's
node id hex, for ``plaintext``), and ``frame`` (hex, sent as one data frame):

* ``member``: the member's own key, Noise, the PSK: what a genuine peer does;
* ``plaintext``: a key of its own, but the ``/plaintext/2.0.0`` handshake
  claiming the member's public key (the handshake only *states* a key);
* ``stranger``: a key of its own, Noise, the PSK: not a member;
* ``no-psk``: the member's own key and Noise, without the cluster's PSK.

It prints one JSON line: ``connected``, ``wrote`` and the ``error`` that stopped it.
Every step is bounded in time.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import multiaddr
import trio
from libp2p import new_swarm
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import RetryConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
from libp2p.security.noise.transport import Transport as NoiseTransport
from nacl.signing import SigningKey

from slurpfs.net.transport import Kind, encode

BOUND = 8.0  # seconds for the whole attempt


class Claiming(Ed25519PrivateKey):
    """A private key of our own that states someone else's public key.

    The plaintext handshake sends ``get_public_key()`` and proves nothing: only a
    peer that accepts plaintext believes the claim.
    """

    def __init__(self, claimed: Ed25519PublicKey) -> None:
        super().__init__(SigningKey.generate())
        self._claimed = claimed

    def get_public_key(self) -> Ed25519PublicKey:
        return self._claimed


def host_for(config: dict[str, Any]) -> BasicHost:
    mode = config["mode"]
    if mode == "plaintext":
        claimed = Ed25519PublicKey.from_bytes(bytes.fromhex(config["claim"]))
        keys = KeyPair(Claiming(claimed), claimed)
        security: Any = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(keys)}
    else:
        signing = (
            SigningKey.generate()
            if mode == "stranger"
            else SigningKey(bytes.fromhex(config["seed"]))
        )
        keys = KeyPair(Ed25519PrivateKey(signing), Ed25519PublicKey(signing.verify_key))
        security = {NOISE: NoiseTransport(keys, noise_privkey=new_x25519_key_pair().private_key)}
    swarm = new_swarm(
        key_pair=keys,
        sec_opt=security,
        muxer_preference="YAMUX",
        retry_config=RetryConfig(max_retries=0),
        psk=config["psk"],
    )
    return BasicHost(network=swarm)


async def attempt(config: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"connected": False, "wrote": False, "error": None}
    host = host_for(config)
    target = info_from_p2p_addr(multiaddr.Multiaddr(config["target"]))
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.move_on_after(BOUND) as bound:
            try:
                await host.connect(target)
                result["connected"] = True
                stream = await host.new_stream(target.peer_id, [TProtocol("/slurpfs/meta/1.0.0")])
                await stream.write(encode(Kind.DATA, 0, bytes.fromhex(config["frame"])))
                result["wrote"] = True
                await trio.sleep(1)  # let the node read it (or reset the stream)
                await stream.close()
            except Exception as exc:  # whatever stopped the attempt is the result
                result["error"] = f"{type(exc).__name__}: {exc}"
        if bound.cancelled_caught:
            result["error"] = f"gave up after {BOUND} s"
    return result


if __name__ == "__main__":
    outcome = trio.run(attempt, json.loads(sys.argv[1]))
    sys.stdout.write(json.dumps(outcome) + "\n")
