"""Backups of a node's store: encrypted to a backup key, signed by the node.

`keys` (the backup key pair), `format` (the byte layout: manifest, frames,
records), `create` (full and incremental, from one read transaction),
`verify` (without the backup private key), `restore` (through
`slurpfs.ingest`), `prune` (retention), `cli` (``slurpfs backup ...``).
Byte layout: docs/FORMAT.md; design: docs/ARCHITECTURE.md.
"""
