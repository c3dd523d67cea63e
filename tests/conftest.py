"""Shared fixtures: a scrubbed environment, data directories checked by fsck, the CLI.

* Every test runs with ``SLURPFS_*`` and ``XDG_*`` removed and ``HOME`` pointing at
  an empty temporary directory, so nothing reads or writes the real user's files.
* `nodes` makes data directories (weak KDF); at teardown it closes every model it
  opened and runs `slurpfs.fsck.check` on each data directory with a fresh model:
  the consistency check that ends every store and model test. A test that damages
  a store on purpose says so with `Node.expect_damage()` and checks fsck itself.
* `run_cli` runs the real ``slurpfs`` command in a subprocess.
* `assert_no_canary` searches files for a secret in every encoding the store could use.
* `test_user` is an unprivileged system user (created once); `reachable_dir` a
  temporary directory it can reach, for mounts shared with it (``--allow-other``).
* A WARNING (or worse) logged by slurpfs fails the test unless it is marked
  ``@pytest.mark.expect_warnings``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pytest
import zstandard

from slurpfs import audit, config, fsck
from slurpfs.crypto.keys import NodeIdentity
from slurpfs.crypto.keystore import KdfParams
from slurpfs.model import ContextStore, verify_audit
from slurpfs.store import schema as s

WEAK_KDF = KdfParams.weak()
TEST_USER = "slurpfs-test"

pytest_plugins = ["ops_fixtures"]  # `ops` and `fs`: Operations without a kernel
CLI_TIMEOUT = 120.0
_SCRUBBED_PREFIXES = ("SLURPFS_", "XDG_")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expect_warnings: the test expects slurpfs to log warnings or errors"
    )


# -- environment ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def scrubbed_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Remove slurpfs and XDG settings from the environment; HOME is a fresh directory."""
    for name in list(os.environ):
        if name.startswith(_SCRUBBED_PREFIXES):
            monkeypatch.delenv(name)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _fail_on_warnings(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="slurpfs")
    yield
    if request.node.get_closest_marker("expect_warnings") is not None:
        return
    loud = [
        r
        for r in caplog.get_records("call") + caplog.get_records("setup")
        if r.levelno >= logging.WARNING and r.name.startswith("slurpfs")
    ]
    assert not loud, "unexpected warnings: " + "; ".join(r.getMessage() for r in loud)


def make_config(
    data_dir: Path,
    *,
    toml: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> config.Config:
    """A configuration for `data_dir`; `toml` is written to a file and loaded."""
    env = {"HOME": os.environ["HOME"], **(environ or {})}
    path = None
    if toml is not None:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        path = data_dir.parent / f"{data_dir.name}.toml"
        path.write_text(toml, encoding="utf-8")
    return config.load(path, env, {"node.data_dir": str(data_dir), **(overrides or {})})


# -- data directories checked by fsck --------------------------------------------


@dataclass
class Node:
    """One data directory under test and the models opened on it."""

    config: config.Config
    open_models: list[ContextStore] = field(default_factory=list)
    damaged: bool = False

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def open(self) -> ContextStore:
        model = ContextStore.open(self.config, None, kdf=WEAK_KDF)
        self.open_models.append(model)
        return model

    def close(self, model: ContextStore) -> None:
        self.open_models.remove(model)
        model.close()

    def reopen(self, model: ContextStore) -> ContextStore:
        """Close `model` and open the data directory again (a restart: no cache)."""
        self.close(model)
        return self.open()

    def close_all(self) -> None:
        while self.open_models:
            self.close(self.open_models[-1])

    def expect_damage(self) -> None:
        """This test damages the store on purpose; skip the teardown fsck."""
        self.damaged = True

    def verify_audit(self) -> audit.Verified:
        """`slurpfs audit verify` of this data directory (no model needs to be open)."""
        return verify_audit(self.config, kdf=WEAK_KDF)

    def fsck(self) -> fsck.FsckReport:
        """Close every open model and check the data directory with a fresh one."""
        self.close_all()
        model = ContextStore.open(self.config, None, kdf=WEAK_KDF)
        try:
            return fsck.check(model)
        finally:
            model.close()


class Nodes:
    """Factory of `Node`s for one test."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self.created: list[Node] = []

    def new(
        self,
        name: str = "data",
        *,
        toml: str | None = None,
        held: Iterable[str] | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> tuple[Node, ContextStore]:
        """Initialise a data directory and return it with an open model.

        `overrides` are configuration keys as on the command line: ``{"store.map_size": n}``.
        """
        cfg = make_config(self._root / name, toml=toml, overrides=overrides)
        model = ContextStore.init(cfg, None, kdf=WEAK_KDF, held=held)
        node = Node(cfg, [model])
        self.created.append(node)
        return node, model


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    factory = Nodes(tmp_path)
    yield factory
    problems: list[str] = []
    for node in factory.created:
        node.close_all()
    for node in factory.created:
        if node.damaged:
            continue
        report = node.fsck()
        problems.extend(f"{node.data_dir}: {p}" for p in report.problems)
    assert not problems, "fsck after the test:\n" + "\n".join(problems)


@pytest.fixture
def node_and_model(nodes: Nodes) -> tuple[Node, ContextStore]:
    return nodes.new()


@pytest.fixture
def node(node_and_model: tuple[Node, ContextStore]) -> Node:
    return node_and_model[0]


@pytest.fixture
def model(node_and_model: tuple[Node, ContextStore]) -> ContextStore:
    """An initialised store (default roles, every key held); fsck-checked at teardown."""
    return node_and_model[1]


@pytest.fixture
def data_dir(node: Node) -> Path:
    return node.data_dir


# -- audit logs without a data directory ------------------------------------------


class MemoryAnchors:
    """An audit anchor cell in memory (the store's `aux:audit` for a bare `AuditLog`)."""

    def __init__(self) -> None:
        self.value: bytes | None = None

    def load(self) -> bytes | None:
        return self.value

    def replace(self, old: bytes | None, new: bytes) -> bool:
        if self.value != old:
            return False
        self.value = new
        return True


def audit_keys() -> audit.AuditKeys:
    """Audit keys of a fresh random node."""
    return audit.AuditKeys.for_node(NodeIdentity.generate())


# -- other users -----------------------------------------------------------------


@pytest.fixture(scope="session")
def test_user() -> str:
    """An unprivileged system user for access tests (created if missing)."""
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True,
        )
    return TEST_USER


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A temporary directory other users can enter (pytest's own are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="slurpfs-access-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


# -- the CLI as a subprocess -----------------------------------------------------


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for slurpfs subprocesses (weak KDF, test HOME)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ["HOME"],
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SLURPFS_TEST_WEAK_KDF": "1",
    }
    env.update(extra or {})
    return env


def run_cli(
    *args: str | Path,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``slurpfs ARGS`` (as ``python -m slurpfs.cli``) and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "slurpfs.cli", *map(str, args)],
        input=input if input is not None else b"",
        capture_output=True,
        env=cli_env(env),
        cwd=cwd,
        timeout=CLI_TIMEOUT,
        check=False,
    )


# -- canaries --------------------------------------------------------------------


def _base64_cores(secret: bytes) -> list[bytes]:
    """Substrings that any base64 text of a stream containing `secret` must contain.

    The encoding of `secret` depends on its offset modulo 3; for each alignment keep
    the characters that encode only bytes of the secret.
    """
    cores = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret)
        start = (shift + 2) // 3 * 4
        end = (shift + len(secret)) // 3 * 4
        core = encoded[start:end]
        cores += [core, core.translate(bytes.maketrans(b"+/", b"-_"))]
    return cores


def canary_forms(canary: bytes) -> dict[str, bytes]:
    """The canary in every encoding a file could plausibly hold it in."""
    forms = {
        "raw": canary,
        "utf-16-le": canary.decode().encode("utf-16-le"),
        "utf-16-be": canary.decode().encode("utf-16-be"),
        "utf-32-le": canary.decode().encode("utf-32-le"),
        "hex": binascii.hexlify(canary),
        "HEX": binascii.hexlify(canary).upper(),
        "base32": base64.b32encode(canary)[: len(canary) // 5 * 8],
    }
    for i, core in enumerate(_base64_cores(canary)):
        forms[f"base64-{i}"] = core
    return forms


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_frames(data: bytes, limit: int) -> Iterator[bytes]:
    """Whatever decompresses from each zstd frame magic found in `data`."""
    start = data.find(_ZSTD_MAGIC)
    while start != -1:
        try:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data[start:])
        except zstandard.ZstdError:
            pass  # not a frame, just the same four bytes
        else:
            yield out[:limit]
        start = data.find(_ZSTD_MAGIC, start + 1)


def find_canary(data: bytes, canary: bytes, *, _depth: int = 0) -> str | None:
    """The name of the first encoding in which `canary` occurs in `data`, else None."""
    forms = canary_forms(canary)
    unwrapped = data.replace(b"\r", b"").replace(b"\n", b"")  # line-wrapped base64
    for name, form in forms.items():
        if form in data or (name.startswith("base") and form in unwrapped):
            return name
    if _depth == 0:
        for inner in _zstd_frames(data, 64 << 20):
            found = find_canary(inner, canary, _depth=1)
            if found is not None:
                return f"zstd/{found}"
    return None


def assert_no_canary(root: Path, canary: bytes, *, exclude: Sequence[Path] = ()) -> int:
    """Assert no regular file under `root` holds `canary`; returns the files scanned.

    Symlinks are not followed; files under `exclude` are skipped.
    """
    scanned = 0
    hits: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if path.is_symlink() or any(path.is_relative_to(e) for e in exclude):
                continue
            found = find_canary(path.read_bytes(), canary)
            if found is not None:
                hits.append(f"{path} ({found})")
            scanned += 1
    assert not hits, f"canary {canary!r} found in: " + ", ".join(hits)
    return scanned


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs at ``tmp_path/small``, unmounted last (list it before `nodes`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", root], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", root], check=False)


@contextmanager
def raw_store(node: Node) -> Iterator[tuple[Any, dict[bytes, Any]]]:
    """A write transaction on the node's LMDB store, opened behind the model's back."""
    node.close_all()
    node.expect_damage()
    raw = lmdb.open(str(node.data_dir / "store"), max_dbs=16)
    try:
        dbs = {name: raw.open_db(name) for name in s.ALL_DBS}
        with raw.begin(write=True) as txn:
            yield txn, dbs
    finally:
        raw.close()
