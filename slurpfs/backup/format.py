"""The byte layout of a backup (docs/FORMAT.md, "Backups").

A backup is a directory ``<DEST>/<id>/`` holding

- ``manifest.json``: what the backup is (plain JSON, readable without any key:
  id, parent, node, store epoch and sequence, counts, the data key sealed to the
  backup public key, and the name, size and BLAKE2b-256 of every data file);
- ``manifest.sig``: the node's Ed25519 signature of ``manifest.json``'s bytes;
- ``data-NNNNN.slb``: the records, in frames. Each frame is zstd-compressed, then
  encrypted with XChaCha20-Poly1305 under the backup's random data key; its nonce
  and associated data bind the backup id, the file, the frame's index and
  whether it is the stream's last, so a frame moved, dropped or replayed fails.

The record stream (in the frames, in order) is: files of the data directory
(``F``), the live version ids (``L``), directories (``D``), TTLs (``T``), audit
log bytes (``A``), ids the retention policy dropped (``X``), then versions (``V``); ``E`` ends it with the record count.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard
from nacl import bindings
from nacl.exceptions import CryptoError

from slurpfs.crypto.envelope import KeySlot
from slurpfs.errors import Corrupt

FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FILE_MAGIC = b"SLBK"
FRAME_DOMAIN = b"slurpfs/backup-frame/v1"
FRAME_TARGET = 1 << 20  # plaintext bytes gathered before a frame is sealed
FILE_TARGET = 256 << 20  # a data file ends after the frame that passes this
MAX_FRAME = 1 << 31
_FILE_HEADER = struct.Struct(">4sBI")  # magic, format, file index
_FRAME_LEN = struct.Struct(">I")
_RECORD = struct.Struct(">BI")  # type, payload length
U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")

R_FILE, R_LIVE, R_DIR, R_TTL, R_AUDIT, R_VERSION, R_END, R_DROPPED = b"FLDTAVEX"


def data_name(index: int) -> str:
    return f"data-{index:05d}.slb"


def blake2b_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _nonce(file_index: int, frame: int) -> bytes:
    return U32.pack(file_index) + U64.pack(frame) + bytes(12)


def _ad(backup_id: str, file_index: int, frame: int, last: bool) -> bytes:
    return b"".join(
        (FRAME_DOMAIN, backup_id.encode(), U32.pack(file_index), U64.pack(frame), bytes([last]))
    )


# -- records ----------------------------------------------------------------


def record(kind: int, payload: bytes) -> bytes:
    return _RECORD.pack(kind, len(payload)) + payload


def file_record(name: str, content: bytes) -> bytes:
    raw = name.encode()
    return record(R_FILE, U16.pack(len(raw)) + raw + content)


def version_record(version_id: bytes, envelope: bytes, slots: list[KeySlot]) -> bytes:
    parts = [version_id, U32.pack(len(envelope)), envelope, U16.pack(len(slots))]
    for slot in slots:
        role = slot.role.encode()
        parts += [bytes([len(role)]), role, U32.pack(slot.generation), U16.pack(len(slot.sealed))]
        parts.append(slot.sealed)
    return record(R_VERSION, b"".join(parts))


@dataclass(frozen=True, slots=True)
class VersionItem:
    version_id: bytes
    envelope: bytes
    slots: tuple[KeySlot, ...]


def parse_version(payload: bytes) -> VersionItem:
    try:
        vid = payload[:32]
        (n,) = U32.unpack_from(payload, 32)
        pos = 36
        envelope = payload[pos : pos + n]
        pos += n
        (count,) = U16.unpack_from(payload, pos)
        pos += 2
        slots = []
        for _ in range(count):
            rlen = payload[pos]
            role = payload[pos + 1 : pos + 1 + rlen].decode()
            pos += 1 + rlen
            (generation,) = U32.unpack_from(payload, pos)
            (slen,) = U16.unpack_from(payload, pos + 4)
            sealed = payload[pos + 6 : pos + 6 + slen]
            pos += 6 + slen
            slots.append(KeySlot(role, generation, bytes(sealed)))
        if pos != len(payload) or len(vid) != 32 or len(envelope) != n:
            raise ValueError("length mismatch")
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise Corrupt(f"a version record in the backup does not parse ({exc})") from None
    return VersionItem(bytes(vid), bytes(envelope), tuple(slots))


def parse_file(payload: bytes) -> tuple[str, bytes]:
    (n,) = U16.unpack_from(payload)
    return payload[2 : 2 + n].decode(), payload[2 + n :]


def split_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        if pos + _RECORD.size > len(data):
            raise Corrupt("a backup frame ends inside a record header")
        kind, n = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if pos + n > len(data):
            raise Corrupt("a backup frame ends inside a record")
        yield kind, data[pos : pos + n]
        pos += n


# -- frames -----------------------------------------------------------------


class FrameWriter:
    """Gathers records into sealed frames across numbered data files in `directory`."""

    def __init__(self, directory: Path, backup_id: str, key: bytes) -> None:
        self._dir = directory
        self._id = backup_id
        self._key = key
        self._cctx = zstandard.ZstdCompressor(level=3)
        self._buf: list[bytes] = []
        self._buffered = 0
        self._file_index = -1
        self._frame = 0
        self._file: BinaryIO | None = None
        self._file_bytes = 0
        self.records = 0
        self.plain_bytes = 0
        self.files: list[str] = []

    def add(self, rec: bytes) -> None:
        self._buf.append(rec)
        self._buffered += len(rec)
        self.records += 1
        self.plain_bytes += len(rec)
        if self._buffered >= FRAME_TARGET:
            self._flush(last=False)

    def close(self) -> list[str]:
        """Write the end record and the last frame; the data files' names."""
        self.add(record(R_END, U64.pack(self.records + 1)))
        self._flush(last=True)
        if self._file is not None:
            self._finish_file()
        return self.files

    def _flush(self, *, last: bool) -> None:
        if self._file is None or self._file_bytes >= FILE_TARGET:
            if self._file is not None:
                self._finish_file()
            self._open_file()
        assert self._file is not None
        plain = self._cctx.compress(b"".join(self._buf))
        self._buf.clear()
        self._buffered = 0
        sealed = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plain,
            _ad(self._id, self._file_index, self._frame, last),
            _nonce(self._file_index, self._frame),
            self._key,
        )
        self._file.write(_FRAME_LEN.pack(len(sealed)) + sealed)
        self._file_bytes += _FRAME_LEN.size + len(sealed)
        self._frame += 1

    def _open_file(self) -> None:
        self._file_index += 1
        name = data_name(self._file_index)
        fd = os.open(self._dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._file.write(_FILE_HEADER.pack(FILE_MAGIC, FORMAT, self._file_index))
        self._file_bytes = _FILE_HEADER.size
        self.files.append(name)

    def _finish_file(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None


def frame_lengths(path: Path, index: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each sealed frame in data file `path`; Corrupt naming the
    file if its structure is wrong (no key needed)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_FILE_HEADER.size)
        if len(head) != _FILE_HEADER.size:
            raise Corrupt(f"{path.name}: shorter than its header")
        magic, fmt, stored_index = _FILE_HEADER.unpack(head)
        if magic != FILE_MAGIC or fmt != FORMAT or stored_index != index:
            raise Corrupt(f"{path.name}: not data file {index} of a format-{FORMAT} backup")
        pos = _FILE_HEADER.size
        while pos < size:
            raw = f.read(_FRAME_LEN.size)
            if len(raw) != _FRAME_LEN.size:
                raise Corrupt(f"{path.name}: ends inside a frame header")
            (n,) = _FRAME_LEN.unpack(raw)
            if n > MAX_FRAME or pos + _FRAME_LEN.size + n > size:
                raise Corrupt(f"{path.name}: a frame at byte {pos} runs past the end of the file")
            yield pos + _FRAME_LEN.size, n
            f.seek(n, 1)
            pos += _FRAME_LEN.size + n


def read_stream(
    directory: Path, backup_id: str, names: list[str], key: bytes
) -> Iterator[tuple[int, bytes]]:
    """Decrypt and yield every record of a backup, in order; Corrupt naming the file
    whose frame fails to open, or if the stream is cut short."""
    dctx = zstandard.ZstdDecompressor()
    frame = 0
    count = 0
    ended = False
    for index, name in enumerate(names):
        path = directory / name
        frames = list(frame_lengths(path, index))
        with path.open("rb") as f:
            for i, (offset, n) in enumerate(frames):
                f.seek(offset)
                sealed = f.read(n)
                last = index == len(names) - 1 and i == len(frames) - 1
                try:
                    plain = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                        sealed, _ad(backup_id, index, frame, last), _nonce(index, frame), key
                    )
                    data = dctx.decompress(plain, max_output_size=MAX_FRAME)
                except (CryptoError, zstandard.ZstdError):
                    raise Corrupt(
                        f"{name}: frame {frame} does not authenticate (damaged, altered,"
                        " moved, or not of this backup)"
                    ) from None
                frame += 1
                for kind, payload in split_records(data):
                    count += 1
                    if kind == R_END:
                        if U64.unpack(payload)[0] != count or not last:
                            raise Corrupt(f"{name}: the record stream's end does not match")
                        ended = True
                        continue
                    yield kind, payload
    if not ended:
        raise Corrupt(f"backup {backup_id}: its record stream is cut short")


# -- manifest ---------------------------------------------------------------


def dump_manifest(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def load_manifest(raw: bytes, where: Path) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Corrupt(f"{where}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise Corrupt(f"{where}: not a format-{FORMAT} backup manifest")
    return doc
