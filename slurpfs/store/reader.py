"""The store's read calls: the one interface a read-through tier wraps.

`LmdbStore` implements it. A tier in front of it (the Redis cache of envelopes,
which holds ciphertext only) implements the same calls, answers what it holds
and asks the store behind it for the rest; the model and the search service
read through this interface only, so such a tier slots in without them knowing.
Everything here returns what is stored as stored: envelopes, key slots and
version records, never plaintext (decrypting is the model's business).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from slurpfs.crypto.envelope import KeySlot
from slurpfs.store.schema import VersionRecord

if TYPE_CHECKING:
    from slurpfs.store.lmdb_store import StoredVersion

__all__ = ["StoreReader"]


class StoreReader(Protocol):
    """Reads of versions, heads and the address tree (see module docstring)."""

    def leaves(self, address: str, role: str) -> list[VersionRecord]:
        """The current leaves of a context, head first (empty if it has none)."""

    def head(self, address: str, role: str, *, now_ms: int | None = None) -> VersionRecord | None:
        """The head of a context, None if absent or expired at `now_ms`."""

    def record(self, version_id: bytes) -> VersionRecord | None:
        """The metadata record of a version."""

    def envelope(self, version_id: bytes) -> bytes | None:
        """The sealed envelope of a version (ciphertext)."""

    def slots(self, version_id: bytes) -> list[KeySlot]:
        """The sealed data-key slots of a version, one per reader role."""

    def read_version(self, version_id: bytes) -> StoredVersion | None:
        """Envelope, slots and node-local fast paths of a version, in one read."""

    def read_head(
        self,
        address: str,
        role: str,
        *,
        load: Callable[[VersionRecord], bool] = ...,
        now_ms: int | None = None,
    ) -> tuple[VersionRecord, StoredVersion | None] | None:
        """The head and (when `load` says so) what is stored of it, in one read."""

    def history(self, address: str, role: str) -> list[VersionRecord]:
        """Every version of a context (tombstones included), oldest first."""

    def children(self, address: str) -> list[str]:
        """Subdirectory names of an address directory."""

    def roles_at(self, address: str) -> list[str]:
        """Roles that have ever had a version at this address."""

    def is_dir(self, address: str) -> bool:
        """Whether the address is a directory of the tree."""

    def sequence(self) -> int:
        """The change sequence: moves with every commit of every process."""

    def changes_since(self, seq: int, limit: int = 10_000) -> tuple[int, list[VersionRecord]]:
        """Versions committed after sequence number `seq`, and the last sequence read."""
