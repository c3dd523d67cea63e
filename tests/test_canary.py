"""No plaintext at rest: a canary stored in contexts never reaches a file, a log or an error."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from pathlib import Path

import pytest
import zstandard
from conftest import Nodes, assert_no_canary, canary_forms, find_canary, run_cli

from slurpfs import fsck
from slurpfs.errors import AccessDenied
from slurpfs.model import BatchItem
from slurpfs.ucxl import Address, parse

AUTHORITY = "ucxl://claude:architect@bzzz:auth"
ROLES = ("developer", "architect", "reviewer")


@pytest.fixture
def canary() -> bytes:
    return b"canary-" + secrets.token_hex(16).encode()


# -- the detector itself -----------------------------------------------------------------


@pytest.mark.parametrize("shift", [0, 1, 2, 7])
def test_the_detector_finds_every_encoding(canary: bytes, shift: int) -> None:
    """The canary scan must not be a test that cannot fail."""
    pad = os.urandom(shift)
    junk = os.urandom(64)

    for name, form in canary_forms(canary).items():
        assert find_canary(junk + form + junk, canary) is not None, name
    text = canary.decode()
    embedded = {
        "raw": pad + canary,
        "utf-16": (pad.hex() + text).encode("utf-16"),  # with a byte order mark
        "utf-16-be": text.encode("utf-16-be"),
        "hex": binascii.hexlify(pad + canary),
        "base64": base64.b64encode(pad + canary),
        "base64-wrapped": base64.encodebytes(os.urandom(50) + pad + canary),
        "base64-url": base64.urlsafe_b64encode(pad + canary),
        "zstd": zstandard.ZstdCompressor().compress(pad + canary * 3 + os.urandom(100)),
        "zstd-in-a-file": junk + zstandard.ZstdCompressor().compress(pad + canary) + junk,
    }
    for name, blob in embedded.items():
        assert find_canary(junk + blob + junk, canary) is not None, name


def test_the_detector_ignores_noise(canary: bytes) -> None:
    noise = os.urandom(1 << 20)

    assert find_canary(noise, canary) is None
    assert find_canary(canary[:-1] + b"!", canary) is None


def test_the_file_scan_reports_the_file(canary: bytes, tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "clean").write_bytes(b"nothing")
    (tmp_path / "a" / "b" / "leak").write_bytes(b"x" + base64.b64encode(b"yz" + canary))

    with pytest.raises(AssertionError, match="leak"):
        assert_no_canary(tmp_path, canary)
    assert assert_no_canary(tmp_path, canary, exclude=[tmp_path / "a" / "b"]) == 1


# -- the store ---------------------------------------------------------------------------


def documents(canary: bytes) -> dict[tuple[Address, str], bytes]:
    """Contexts that hold the canary in every place a document can."""
    text = canary.decode()
    docs: dict[tuple[Address, str], bytes] = {}
    for role in ROLES:
        docs[(parse(f"{AUTHORITY}/src/auth.go"), role)] = (
            f"---\nsummary: {text}\ntags: [{text}, security]\ninsights:\n  - {text}\n---\n"
            f"Body for {role}: {text}\n"
        ).encode()
        docs[(parse(f"{AUTHORITY}/big/compressible"), role)] = (
            b"lorem ipsum " * 2000 + canary + b"\n"
        ) * 20
        docs[(parse(f"{AUTHORITY}/big/noise"), role)] = os.urandom(5000) + canary + os.urandom(5000)
        docs[(parse(f"{AUTHORITY}/utf16"), role)] = f"utf-16 {text}".encode("utf-16")
    return docs


def test_no_file_holds_the_plaintext(
    nodes: Nodes,
    canary: bytes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    node, model = nodes.new()
    docs = documents(canary)
    for (address, role), data in docs.items():
        model.put(address, role, b"earlier version " + data)
        model.put(address, role, data)
    expiring = parse(f"{AUTHORITY}/ephemeral")
    for role in ROLES:
        model.put(expiring, role, canary + b" expires", ttl=60)
    report = model.put_many(
        BatchItem(parse(f"{AUTHORITY}/batch/n{i}"), ROLES[i % 3], canary + b" batch %d" % i)
        for i in range(9)
    )
    assert report.failed == ()
    deleted = parse(f"{AUTHORITY}/deleted")
    model.put(deleted, "developer", canary + b" then deleted")
    model.delete(deleted, "developer")
    for (address, role), data in docs.items():  # reads fill the cache and the audit log
        assert model.get(address, role).data == data
    model.resolve(parse(f"{AUTHORITY}/src/auth.go"), "developer")
    model.sync()
    assert_no_canary(tmp_path, canary)

    assert fsck.check(model).ok
    assert_no_canary(tmp_path, canary)

    removed = model.expire(now=model.stat(expiring, "developer").mtime + 3600)
    assert removed == 3
    model.sync()
    assert_no_canary(tmp_path, canary)

    model = node.reopen(model)  # a restart: only what is on disk survives
    for (address, role), data in docs.items():
        assert model.get(address, role).data == data  # really stored, really readable
    assert fsck.check(model).ok
    node.close(model)
    scanned = assert_no_canary(tmp_path, canary)

    assert scanned >= 8  # store, lock, audit log, config, keys, ...
    assert find_canary(caplog.text.encode(), canary) is None
    out, err = capsys.readouterr()
    assert find_canary((out + err).encode(), canary) is None


def test_errors_and_statistics_hold_no_plaintext(nodes: Nodes, canary: bytes) -> None:
    node, model = nodes.new(held=["developer"])
    address = parse(f"{AUTHORITY}/src/auth.go")
    model.put(address, "architect", canary)
    model.put(address, "developer", canary)
    model = node.reopen(model)

    texts: list[str] = []
    for role, callers in (("architect", None), ("architect", ["architect"]), ("developer", [])):
        with pytest.raises(AccessDenied) as info:
            model.get(address, role, caller_roles=callers)
        texts += [str(info.value), repr(info.value)]
    texts += [repr(model.statistics()), repr(model.keyring), repr(model.list_dir(address))]
    texts += [repr(model.history(address, "developer")), repr(model.stat(address, "developer"))]

    assert find_canary("\n".join(texts).encode(), canary) is None


def test_the_cli_leaves_no_plaintext(canary: bytes, tmp_path: Path) -> None:
    data = tmp_path / "data"
    exported = tmp_path / "export"  # plaintext by request: the one place it may be
    source = tmp_path / "source"  # the user's own files
    source.mkdir()
    (source / "notes.md").write_bytes(b"imported " + canary)
    outputs: list[bytes] = []

    def cli(*args: str | Path, input: bytes | None = None) -> bytes:
        proc = run_cli(*args, "--data", data, input=input)
        assert proc.returncode in (0, 4, 9), proc.stderr  # 4: denied, 9: partial export
        outputs.append(proc.stderr)
        return proc.stdout

    cli("init", "--hold", "developer,reviewer")
    for role in ROLES:
        outputs.append(cli("put", f"{AUTHORITY}/src/auth.go", "--role", role, input=canary))
    outputs.append(cli("import", source, "--authority", "me:dev@proj:task", "--role", "developer"))
    assert cli("get", f"{AUTHORITY}/src/auth.go", "--role", "developer") == canary
    outputs.append(cli("get", f"{AUTHORITY}/src/auth.go", "--role", "architect"))  # denied
    for args in (
        ["history", f"{AUTHORITY}/src/auth.go", "--role", "developer"],
        ["ls", f"{AUTHORITY}/src/auth.go"],
        ["status"],
        ["fsck"],
        ["audit", "show"],
        ["audit", "verify"],
        ["keys", "list"],
        ["rm", f"{AUTHORITY}/src/auth.go", "--role", "reviewer"],
        ["export", exported],
    ):
        outputs.append(cli(*args))

    assert (exported / "me:dev@proj:task" / "notes.md" / "developer").read_bytes().endswith(canary)
    assert_no_canary(tmp_path, canary, exclude=[exported, source])
    for i, text in enumerate(outputs):
        assert find_canary(text, canary) is None, i
