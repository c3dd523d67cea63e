"""Data keys sealed ahead of time, so a commit does not wait for public-key work.

Every version gets a fresh random data key, sealed (`SealedBox`, X25519) to each
reader role's current public key. Neither depends on the content, so a mount makes
them before they are needed: a background task tops the pool up in a worker thread
(libsodium runs without the GIL, on the other core) and a commit takes a ready
(data key, slots) pair instead of paying ~50 µs per reader on the FUSE loop.

Each prepared key is handed out once and then forgotten, exactly as an inline one
would be; the pool lives in process memory only. Pools are kept per reader set
(the exact public keys, generations included), so after a key rotation the old
set's keys are simply never taken again and are dropped when the set falls out of
the few most recent ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable

from slurpfs.crypto.envelope import PreparedKey, prepare_key
from slurpfs.crypto.keys import RolePublicKey

# Prepared keys per reader set, and how many reader sets are kept.
DEFAULT_DEPTH = 64
MAX_READER_SETS = 8

# Distinct readers (`envelope.distinct_readers`), generations included.
ReaderSet = tuple[RolePublicKey, ...]


class KeyPool:
    """Prepared keys per reader set; thread-safe.

    `take` is called by committers (any thread); when a set is at or below half
    its depth it calls `on_low` (from the taking thread), and whoever runs the pool
    calls `fill` (in a thread of its own) to top every recently used set up to
    `depth`.
    """

    def __init__(
        self, depth: int = DEFAULT_DEPTH, *, on_low: Callable[[], None] | None = None
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.depth = depth
        self.on_low = on_low
        self._lock = threading.Lock()
        self._ready: OrderedDict[ReaderSet, deque[PreparedKey]] = OrderedDict()
        self.taken = 0
        self.missed = 0

    def take(self, readers: ReaderSet) -> PreparedKey | None:
        """A prepared key for exactly `readers`, or None (the caller seals inline).

        A miss registers the set, so the next `fill` prepares keys for it.
        """
        with self._lock:
            ready = self._kept(readers)
            prepared = ready.popleft() if ready else None
            low = len(ready) <= self.depth // 2
            if prepared is None:
                self.missed += 1
            else:
                self.taken += 1
        if low and self.on_low is not None:
            self.on_low()
        return prepared

    def want(self, readers: ReaderSet) -> None:
        """Keep keys for `readers` from the next `fill` on (as a first `take` would)."""
        with self._lock:
            self._kept(readers)

    def _kept(self, readers: ReaderSet) -> deque[PreparedKey]:
        """The queue of `readers`, now the most recently used (lock held)."""
        ready = self._ready.get(readers)
        if ready is None:
            ready = self._ready[readers] = deque()
            while len(self._ready) > MAX_READER_SETS:
                self._ready.popitem(last=False)  # the set used least recently
        else:
            self._ready.move_to_end(readers)
        return ready

    def fill(self) -> int:
        """Top every kept reader set up to `depth`; returns how many keys were made.

        The sealing runs outside the lock, so `take` never waits for it.
        """
        made = 0
        while True:
            with self._lock:
                short = [rs for rs, q in self._ready.items() if len(q) < self.depth]
            if not short:
                return made
            for readers in short:
                prepared = prepare_key(readers)
                with self._lock:
                    ready = self._ready.get(readers)
                    if ready is None or len(ready) >= self.depth:
                        continue  # dropped or filled meanwhile: the key is discarded
                    ready.append(prepared)
                    made += 1

    def clear(self) -> None:
        """Forget every prepared key (a key generation changed or was destroyed)."""
        with self._lock:
            self._ready.clear()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._ready.values())
