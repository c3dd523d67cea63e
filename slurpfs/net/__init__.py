"""Replication between nodes: the transport seam and, on top of it, the peer protocol.

Importing this package imports nothing heavy: `slurpfs.net.transport` (the only
module that knows py-libp2p) is imported by whoever runs a transport.
"""
