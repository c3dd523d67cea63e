"""Shared fixtures: a scrubbed environment, data directories checked by fsck, the CLI.

* Every test runs with ``SLURPFS_*`` and ``XDG_*`` removed and ``HOME`` pointing at
  an empty temporary directory, so nothing reads or writes the real user's files.
* `nodes` makes data directories (weak KDF); at teardown it closes every model it
  opened and runs `slurpfs.fsck.check` on each data directory with a fresh model:
  the consistency check that ends every store and model test. A test that damages
  a store on purpose says so with `Node.expect_damage()` and checks fsck itself.
* `run_cli` runs the ``slurpfs`` command in this process (`slurpfs.cli.main`, as a
  subprocess would run it, checked to leave no descriptor or thread behind);
  `run_cli_process` runs it as a real subprocess.
* `ProcessState` is what a process holds (descriptors, threads): the leak checks.
* `assert_no_canary` searches files for a secret in every encoding the store could use.
* `test_user` is an unprivileged system user (created once); `reachable_dir` a
  temporary directory it can reach, for mounts shared with it (``--allow-other``).
* A WARNING (or worse) logged by slurpfs fails the test unless the test expects
  it: ``@pytest.mark.expect_warnings("regex", ...)`` names the messages (each one
  matched whole by a pattern, each pattern matching one).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pytest
import tqdm
import zstandard

from slurpfs import audit, cli, config, fsck
from slurpfs.crypto.keys import NodeIdentity
from slurpfs.crypto.keystore import KdfParams, Keystore
from slurpfs.model import ContextStore, verify_audit
from slurpfs.store import schema as s

WEAK_KDF = KdfParams.weak()
TEST_USER = "slurpfs-test"

pytest_plugins = ["ops_fixtures"]  # `ops` and `fs`: Operations without a kernel
CLI_TIMEOUT = 120.0
_SCRUBBED_PREFIXES = ("SLURPFS_", "XDG_")
# tqdm starts a monitor thread with its first bar, even a disabled one, that lives as
# long as the process: nothing for a CLI process, a thread left behind by each
# in-process command here. It only corrects the refresh rate of a bar on a terminal.
tqdm.tqdm.monitor_interval = 0


FAILED = pytest.StashKey[bool]()  # in a test item's stash once a phase of it failed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expect_warnings(*patterns): the warnings or errors slurpfs logs in this test,"
        " each matched whole by one of the regular expressions (and each matching)",
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
    marker = request.node.get_closest_marker("expect_warnings")
    expected = () if marker is None else marker.args
    assert marker is None or expected, "expect_warnings names the messages it expects"
    yield
    loud = [
        r.getMessage()
        for r in caplog.get_records("setup") + caplog.get_records("call")
        if r.levelno >= logging.WARNING and r.name.startswith("slurpfs")
    ]
    check_warnings(loud, expected, "slurpfs logged")


def check_warnings(
    messages: Sequence[str], expected: Sequence[str], what: str, *, each_seen: bool = True
) -> None:
    """Each message is matched whole (`re.fullmatch`) by one of the `expected`
    patterns, and (if `each_seen`) each pattern matches a message: the warnings a
    test expects, and those only."""
    unexpected = [m for m in messages if not any(re.fullmatch(p, m) for p in expected)]
    assert not unexpected, f"{what} unexpected warnings: " + "; ".join(unexpected)
    if not each_seen:
        return
    missing = [p for p in expected if not any(re.fullmatch(p, m) for m in messages)]
    assert not missing, f"{what} no warning matching: " + "; ".join(missing)


def make_config(
    data_dir: Path,
    *,
    toml: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> config.Config:
    """A configuration for `data_dir`; `toml` is written to a file and loaded."""
    env = {"HOME": os.environ["HOME"], **suite_settings(), **(environ or {})}
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


def twin(
    nodes: Nodes, a: Node, a_model: ContextStore, *, trust: bool = True
) -> tuple[Node, ContextStore]:
    """A second node ("b") holding the same role keys as `a` (its own node key),
    which trusts `a`'s signatures when `trust`; opened."""
    b, b_model = nodes.new("b")
    b.close(b_model)
    for name in ("roles", "public.json"):
        source, target = a.data_dir / "keys" / name, b.data_dir / "keys" / name
        if source.is_dir():
            shutil.rmtree(target)
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    if trust:
        Keystore(b.data_dir, None, WEAK_KDF).trust_node(a_model.keyring.node.node_id)
    return b, b.open()


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


def audit_chain_broken(reason: str) -> str:
    """The error a process logs when the audit log does not continue its anchored
    chain, as an `expect_warnings` pattern; `reason` is a regular expression."""
    return (
        rf"audit log \S+/audit\.log does not continue its anchored chain: {reason};"
        r" the anchor is kept as evidence \(see `slurpfs audit verify`\)"
    )


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
        # Another pytest-xdist worker may add it at the same moment: that one's
        # success counts (useradd exits 9, "already exists"); the lookup decides.
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=False,
        )
        pwd.getpwnam(TEST_USER)
    return TEST_USER


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A temporary directory other users can enter (pytest's own are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="slurpfs-access-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


# -- the CLI ---------------------------------------------------------------------


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for slurpfs subprocesses (weak KDF, test HOME; the run's
    `suite_settings`)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ["HOME"],
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SLURPFS_TEST_WEAK_KDF": "1",
        **suite_settings(),
    }
    env.update(extra or {})
    return env


# ``SLURPFS_TEST_WRITE_BEHIND=0 scripts/test``: the whole suite with write-behind off
# (on by default) in every node and mount it makes; ``=1`` sets it on explicitly. A
# test's own environment still wins. Read once here: `scrubbed_env` removes every
# SLURPFS_ variable before each test.
WRITE_BEHIND = {"0": "false", "1": "true"}.get(os.environ.get("SLURPFS_TEST_WRITE_BEHIND", ""))


def suite_settings() -> dict[str, str]:
    """Configuration the whole run applies (as environment overrides)."""
    return {} if WRITE_BEHIND is None else {"SLURPFS_DURABILITY_WRITE_BEHIND": WRITE_BEHIND}


def run_cli_process(
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


def run_cli(
    *args: str | Path,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``slurpfs ARGS`` in this process, as `run_cli_process` would run it.

    `slurpfs.cli.main` runs with the subprocess's environment (``os.environ`` too),
    standard input, output and error in memory, warnings logged to that standard
    error as an unconfigured process prints them, a traceback and exit code 1 for
    an exception, and `cwd`. It must leave this process as it found it: no
    descriptor or thread more. ``mount`` forks a daemon: use `run_cli_process`.
    """
    argv = [str(a) for a in args]
    assert "mount" not in argv, "`slurpfs mount` forks a daemon: use run_cli_process"
    environ = cli_env(env)
    _refuse_open_store(argv, environ)
    before, settings = ProcessState.now(), _interpreter_settings()
    stdin = io.BytesIO(input or b"")
    stdout, stderr = io.BytesIO(), io.BytesIO()
    with _process_as_cli(environ, cwd, stdin, stdout, stderr):
        code = _main_exit_code(argv)
    leaks = ProcessState.now().gained_since(before)
    assert not leaks, f"slurpfs {' '.join(argv)} left behind: " + "; ".join(leaks)
    assert _interpreter_settings() == settings, f"slurpfs {' '.join(argv)} changed them"
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def _main_exit_code(argv: list[str]) -> int:
    """`main`'s exit code as the interpreter would make it (SystemExit, a traceback)."""
    try:
        return cli.main(argv, dict(os.environ), guarded=False)  # no fork: output is captured here
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1


@contextmanager
def _process_as_cli(
    env: Mapping[str, str], cwd: Path | None, stdin: io.BytesIO, out: io.BytesIO, err: io.BytesIO
) -> Iterator[None]:
    """This process's environment, directory and standard streams as a CLI's, for a while."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = io.TextIOWrapper(stdin, encoding="utf-8")
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(
        err, encoding="utf-8", errors="backslashreplace", write_through=True
    )
    # An unconfigured process prints warnings to stderr (logging's last resort).
    printer = logging.StreamHandler(sys.stderr)
    printer.setLevel(logging.WARNING)
    logging.getLogger().addHandler(printer)
    os.environ.clear()
    os.environ.update(env)
    try:
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        logging.getLogger().removeHandler(printer)
        for stream in (sys.stdin, sys.stdout, sys.stderr):
            stream.flush()
            stream.detach()  # (the BytesIO stays open for getvalue)
        sys.stdin, sys.stdout, sys.stderr = saved_streams


def _interpreter_settings() -> dict[str, object]:
    """What a command could change for the rest of the process, and must not."""
    root = logging.getLogger()
    return {
        "signal handlers": {s: signal.getsignal(s) for s in signal.valid_signals()},
        "root log handlers": list(root.handlers),
        "log levels": (root.level, logging.getLogger("slurpfs").level),
        "switch interval": sys.getswitchinterval(),
    }


def _refuse_open_store(argv: Sequence[str], environ: Mapping[str, str]) -> None:
    """LMDB must not be opened twice by one process: fail if this process already has
    the store of the data directory the command names (or the default) open."""
    data = next(
        (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--data"),
        os.path.join(environ["HOME"], ".local/share/slurpfs"),
    )
    store = os.path.realpath(os.path.join(data, "store", "data.mdb"))
    held = ProcessState.now().fds.values()
    assert store not in held, (
        f"a model of {data} is open in this process: close it before running the CLI in-process"
    )


# -- what a process holds --------------------------------------------------------


@dataclass(frozen=True)
class ProcessState:
    """The open descriptors (with their targets) and the threads of this process."""

    fds: dict[int, str]
    threads: dict[int, str]  # native id -> name (idle trio workers left out)
    python_threads: frozenset[int]  # the native ids of those Python started

    @classmethod
    def now(cls) -> ProcessState:
        fds: dict[int, str] = {}
        for name in os.listdir("/proc/self/fd"):
            with suppress(FileNotFoundError):  # (the descriptor of the listing itself)
                fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        names = {t.native_id: t.name for t in threading.enumerate()}
        threads: dict[int, str] = {}
        for tid in map(int, os.listdir("/proc/self/task")):
            found = names.get(tid) or _comm(tid)
            if found is not None and not found.startswith(_IDLE_TRIO_WORKER):
                threads[tid] = found
        return cls(fds, threads, frozenset(t for t in names if t is not None))

    def gained_since(self, before: ProcessState, *, native: bool = True) -> list[str]:
        """What this state holds that `before` did not, in words; threads that
        Python did not start (a library's own) only if `native`."""
        fds = [f"descriptor {fd} -> {target}" for fd, target in self.fds.items()
               if before.fds.get(fd) != target]  # fmt: skip
        threads = [f"thread {name!r} ({tid})" for tid, name in self.threads.items()
                   if tid not in before.threads
                   and (native or tid in self.python_threads)]  # fmt: skip
        return fds + threads


# trio keeps a worker thread for 10 s after its job, under this name, for the next one.
_IDLE_TRIO_WORKER = "Trio thread "


def _comm(tid: int) -> str | None:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None  # it ended meanwhile (between the listing and the read)


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
