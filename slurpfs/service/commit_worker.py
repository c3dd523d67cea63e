"""The commit worker: write-behind's group commit, sealed and committed in a process of its own.

With ``durability.write_behind`` the daemon acknowledges a ``close`` once the save
is in the encrypted journal (`slurpfs.store.journal`); the group commit then
seals the journaled saves into versions (zstd, XChaCha20-Poly1305, key slots,
the signature) and commits them in one LMDB transaction. That is the CPU of a
save, and in the daemon's process it would hold the interpreter lock the FUSE
loop needs. So the daemon asks this worker instead: ``commit`` names a range
of journal entries (``journal``: the journal's id, ``first`` and ``last``: their
seqs, ``offset``: where the first starts in the file); the worker reads them from the journal file (they are on disk, encrypted,
before the request is sent), stores them (`ContextStore.save_journaled`) and
answers with what each became. The daemon does the rest of a commit's
bookkeeping (its open files, the subscribers, the view).

If the worker is not running, fails, or dies, the daemon's group commit stores
the saves itself (`slurpfs.fs.writebehind`); the store's journal mark, written in
the batch's transaction, says whether a batch whose answer was lost is stored.
Plaintext stays in the worker's memory: it writes no files but the store's.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from slurpfs import ucxl
from slurpfs.config import Config, loads
from slurpfs.errors import SlurpError
from slurpfs.model import ContextStore, JournaledSave, Saved
from slurpfs.service.wire import Message, Peer, PeerGone, WireError
from slurpfs.service.workers import child_connect, child_start, serve_while, store_hello
from slurpfs.store.journal import CHAINED, FILE_NAME, Entry, journal_key, mark, pending, scan
from slurpfs.store.schema import VersionRecord

log = logging.getLogger("slurpfs.commit")
COMMIT_WORKER = "slurpfs.service.commit_worker"
NICE = 0  # its work is waited for (fsync, other processes' reads): not a background job


def journal_path(config: Config) -> Path:
    return config.data_dir / "journal" / FILE_NAME


# -- the daemon's side -----------------------------------------------------------------


class CommitClient:
    """`WorkerLogic` for the commit worker; `commit` asks it to store journal entries."""

    def __init__(self, config: Config, passphrase: bytes | None) -> None:
        self._config = config
        self._passphrase = passphrase
        self._peer: Peer | None = None
        self._ready = False
        self.batches = 0  # stored by the worker

    def setup(self) -> Mapping[str, Any]:
        return store_hello(self._config, self._passphrase)

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        if message.kind != "ready" or message.id is not None:
            raise WireError(f"the commit worker sent an unexpected {message.kind!r}")
        self._ready = True  # it opened the store
        return None

    def connected(self, peer: Peer) -> None:
        self._peer = peer

    def disconnected(self, reason: str) -> None:
        self._peer = None
        self._ready = False

    async def feed(self, peer: Peer) -> None:
        await trio.sleep_forever()

    @property
    def ready(self) -> bool:
        """Whether the worker runs and has opened the store."""
        return self._ready and self._peer is not None

    def report(self) -> dict[str, Any]:
        """Lines for ``.slurp/status``: whether it serves, and the batches it stored."""
        return {"commit_worker_ready": int(self.ready), "commit_worker_batches": self.batches}

    async def commit(self, journal_id: bytes, offset: int, first: int, last: int) -> list[Saved]:
        """Store journal entries `first`..`last` (the first at byte `offset` of the file)
        in one transaction: what each became. `SlurpError` (`PeerGone` if the worker
        went away) if it could not answer."""
        peer = self._peer
        if peer is None:
            raise SlurpError("the commit worker is not running")
        answer = await peer.request(
            "commit", journal=journal_id.hex(), offset=offset, first=first, last=last
        )
        self.batches += 1
        return [
            Saved(VersionRecord.unpack(bytes.fromhex(v), base64.b64decode(m)), stored=bool(s))
            for s, v, m in answer["saved"]
        ]

    async def keys_changed(self) -> None:
        """The daemon read its keys again (the member log): the worker does too."""
        peer = self._peer
        if peer is not None:
            with contextlib.suppress(PeerGone):  # (a new worker reads them at its start)
                await peer.notify("keys")


# -- the worker ------------------------------------------------------------------------


class CommitWorker:
    def __init__(self, config: Config, passphrase: bytes | None) -> None:
        self.model = ContextStore.open(config, passphrase)
        self.path = journal_path(config)
        self.key = journal_key(self.model.keyring.node)
        self._lock = threading.Lock()
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        try:
            await self._stop.wait()
        finally:
            self.model.close()

    async def handle(self, message: Message) -> Mapping[str, Any] | None:
        if message.kind == "commit":
            journal_id = bytes.fromhex(str(message["journal"]))
            offset, first, last = (
                int(message["offset"]),
                int(message["first"]),
                int(message["last"]),
            )
            saved = await trio.to_thread.run_sync(self._commit, journal_id, offset, first, last)
            return {
                "saved": [
                    [s.stored, s.info.version_id.hex(), base64.b64encode(s.info.pack()).decode()]
                    for s in saved
                ]
            }
        if message.kind == "keys":
            await trio.to_thread.run_sync(self.model.reload_keyring)
            return None
        if message.kind == "stop":
            self.stop()
            return None
        raise SlurpError(f"the commit worker does not know {message.kind!r}")

    def _commit(self, journal_id: bytes, offset: int, first: int, last: int) -> list[Saved]:
        """Store entries `first`..`last`; those the store's mark covers already (a request
        the daemon gave up on, asked again) are answered with their context's head."""
        # (A torn tail past `last` is an append under way.)
        found = scan(self.path, self.key, offset)
        if found.journal_id != journal_id:
            raise SlurpError(f"{self.path} is not the journal {journal_id.hex()}")
        entries = [e for e in found.entries if first <= e.seq <= last]
        if [e.seq for e in entries] != list(range(first, last + 1)):
            raise SlurpError(f"{self.path}: entries {first}..{last} are not all readable")
        with self._lock:  # one request at a time: the mark is read, then moved
            todo = {e.seq for e in pending(found, self.model.store.journal_mark())}
            stored = [self._head(e) for e in entries if e.seq not in todo]
            saves = [_save(e) for e in entries if e.seq in todo]
            if saves:
                stored += self.model.save_journaled(saves, mark(journal_id, last))
            return stored

    def _head(self, entry: Entry) -> Saved:
        leaves = self.model.store.leaves(entry.address, entry.role)
        return Saved(leaves[0], stored=True)


def _save(entry: Entry) -> JournaledSave:
    based_on = entry.based_on
    return JournaledSave(
        ucxl.parse("ucxl://" + entry.address),
        entry.role,
        entry.data,
        None if based_on == CHAINED else () if based_on is None else (based_on,),
    )


async def _main(sock: Any) -> int:
    worker: CommitWorker | None = None

    async def handle(message: Message) -> Mapping[str, Any] | None:
        if worker is None:
            raise SlurpError("the commit worker is starting")
        return await worker.handle(message)

    peer, hello = await child_connect(sock, handle)
    secret = hello.fields.get("passphrase")
    worker = CommitWorker(
        loads(str(hello["config"])), None if secret is None else base64.b64decode(secret)
    )
    await peer.notify("ready")
    await serve_while(peer, worker.run, worker.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = child_start(sys.argv[1:] if argv is None else argv, "commit", nice=NICE)
    return trio.run(_main, args.sock)


if __name__ == "__main__":
    sys.exit(main())
