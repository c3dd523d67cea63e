"""Caches: the in-memory plaintext LRU (`memory`) and the Redis tier of envelopes
(`redis_tier`), which the model sees through `EnvelopeTier`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class EnvelopeTier(Protocol):
    """Envelope bodies by version id, beside the store (`redis_tier.RedisTier`).

    ``get`` returns only a body that hashes to the id (or None: absent, unreachable);
    neither call raises for an outage."""

    def get(self, version_id: bytes) -> bytes | None: ...

    def put(self, version_id: bytes, envelope: bytes) -> None: ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """`put` of each (version id, envelope), in one round trip."""
