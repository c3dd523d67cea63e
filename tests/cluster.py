"""Cluster tests' harness: nodes as real processes in network namespaces, and a checker.

`Network` makes N network namespaces, each with one veth whose other end is a
port of a bridge in a namespace of its own, addresses ``10.77.0.<i>/24`` (they
exist only inside those namespaces: nothing changes in the test's own network).
Names carry this process's id and a serial (``slurpfs-<pid>-<k>-n1``, ...), so
two runs never share one. Processes run in a node's namespace through
``nsenter --net`` (network namespace only: a FUSE mount made there is the test's
too). Faults:

* `Network.partition` drops every packet between groups of hosts (blackhole
  routes in each member of a group towards the other groups: silent, as a lost
  link is; TCP keeps retransmitting), `Network.heal` takes them away;
* `Network.unplug` / `Network.plug` take a host's bridge port down and up;
* processes are paused, resumed and killed by their PIDs (`Network.signal_all`
  reaches every process in a host's namespace, daemons forked there included).

`Network.close` (always, even after a failure) kills every process in its
namespaces by PID, lazily unmounts the mounts registered with it, and deletes
the namespaces (which takes their veths and the bridge with them): it touches
nothing it did not make.

`SlurpNode` is a data directory and mount point on a host, driven through the
CLI in the host's namespace (`SlurpNode.copies` reads which bodies its store
holds, `SlurpNode.health` its mount's health checks); `ClusterNodes` makes N of
them one cluster (and adds more later); `History` records each acknowledged write through a
mount and `History.check` is the set-full checker: after healing, every node
shows the same state and every acknowledged write is in its address's history
(or a conflict), with the time each write took to become visible on every node.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from conftest import suite_settings

from slurpfs.net.transport import peer_id_of

NETNS_DIR = Path("/run/netns")
NOTES = Path(tempfile.gettempdir()) / "slurpfs-netns"  # a note per namespace made
SUBNET = "10.77.0"  # /24, inside the namespaces only
PORT = 7400
GUARD = 120.0  # seconds: a hang guard, never an expectation
DEV = "developer"  # the role every test node is granted
_RUNS = itertools.count(1)
# py-lmdb refuses a second open of one environment in a process: the tests' threads
# (a sampler beside the test's own checks) read stores one at a time.
_STORE_READS = threading.Lock()


def missing_tools() -> list[str]:
    """The tools this machine lacks to run the cluster tests (scripts/install installs
    them: iproute2, util-linux, fuse3)."""
    return [tool for tool in ("ip", "nsenter", "fusermount3") if not _which(tool)]


def _which(tool: str) -> bool:
    return any(
        os.access(Path(d) / tool, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)
    )


# Network namespaces need root: elsewhere the cluster tests are skipped (as root, as
# in CI, a missing tool fails them instead: they never silently do nothing).
NOT_ROOT = os.geteuid() != 0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip ARGS``; a failure raises with what it printed."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(
    what: str, check: Callable[[], Any], guard: float = GUARD, step: float = 0.05
) -> Any:
    """Poll `check` until it returns something true, and return that (a hang guard)."""
    end = time.monotonic() + guard
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not within {guard:g} s: {what}")
        time.sleep(step)


def mounted(path: Path) -> bool:
    target = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


# -- the network -------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One node's network namespace."""

    index: int  # 1-based
    netns: str
    ip: str
    port: str  # its bridge port's name (in the bridge's namespace)

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.netns}"]

    def multiaddr(self, port: int = PORT) -> str:
        return f"/ip4/{self.ip}/tcp/{port}"


class Network:
    """N hosts on one bridge, each in its own network namespace (see the module doc)."""

    def __init__(self, size: int) -> None:
        assert 1 <= size <= 200
        missing = missing_tools()
        assert not missing, f"the cluster tests need {', '.join(missing)} (run scripts/install)"
        self.prefix = f"slurpfs-{os.getpid()}-{next(_RUNS)}"
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts = [
            Host(i, f"{self.prefix}-n{i}", f"{SUBNET}.{i}", f"p{i}") for i in range(1, size + 1)
        ]
        self.namespaces: list[str] = []  # made so far: what close() deletes
        self.processes: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []  # unmounted (lazily) at close
        self._blackholes: list[tuple[Host, Host]] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self._add_namespace(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_namespace(host.netns)
            ip("link", "add", "eth0", "netns", host.netns, "type", "veth",
               "peer", "name", host.port, "netns", self.bridge_ns)  # fmt: skip
            ip("-n", self.bridge_ns, "link", "set", host.port, "master", "br0")
            ip("-n", self.bridge_ns, "link", "set", host.port, "up")
            ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "up")
            ip("-n", host.netns, "link", "set", "lo", "up")

    def _add_namespace(self, name: str) -> None:
        # Noted first: scripts/test's cleanup (scripts/sweep-netns) removes what a
        # crashed run left, and only what is noted.
        NOTES.mkdir(exist_ok=True)
        (NOTES / name).touch()
        try:
            ip("netns", "add", name)
        except RuntimeError:
            (NOTES / name).unlink()
            raise
        self.namespaces.append(name)

    # -- processes ------------------------------------------------------------------------

    def spawn(
        self, host: Host, argv: Sequence[str | Path], **popen: Any
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in `host`'s network namespace; it is killed at `close` if still running."""
        proc = subprocess.Popen([*host.nsenter, *map(str, argv)], **popen)
        self.processes.append(proc)
        return proc

    def run(
        self,
        host: Host,
        argv: Sequence[str | Path],
        *,
        env: Mapping[str, str] | None = None,
        input: bytes = b"",
        timeout: float = GUARD,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `argv` in `host`'s namespace to its end (what it printed, its exit code)."""
        return subprocess.run(
            [*host.nsenter, *map(str, argv)],
            input=input,
            capture_output=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            check=False,
        )

    def pids(self, host: Host) -> list[int]:
        """Every process in `host`'s namespace (only this harness puts any there)."""
        listed = ip("netns", "pids", host.netns, check=False).stdout.split()
        return [int(p) for p in listed if running(int(p))]

    def signal_all(self, host: Host, signum: int) -> list[int]:
        """Send `signum` to every process in `host`'s namespace, by PID; returns the PIDs."""
        pids = self.pids(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return pids

    def kill_all(self, host: Host) -> None:
        """kill -9 of every process in `host`'s namespace; returns once they are gone."""
        self.signal_all(host, signal.SIGCONT)  # (a stopped process dies of SIGKILL too)
        pids = self.signal_all(host, signal.SIGKILL)
        for proc in self.processes:
            if proc.pid in pids:
                proc.wait(timeout=GUARD)
        wait_until(f"the processes of {host.netns} to end", lambda: not self.pids(host), 30)

    # -- faults ---------------------------------------------------------------------------

    def partition(self, *groups: Sequence[Host]) -> None:
        """Drop every packet between hosts of different groups (until `heal`)."""
        for group, other in itertools.permutations(groups, 2):
            for a, b in itertools.product(group, other):
                ip("-n", a.netns, "route", "add", "blackhole", f"{b.ip}/32")
                self._blackholes.append((a, b))

    def heal(self) -> None:
        """Undo every `partition`."""
        while self._blackholes:
            a, b = self._blackholes.pop()
            ip("-n", a.netns, "route", "del", "blackhole", f"{b.ip}/32")

    def unplug(self, host: Host) -> None:
        """Take `host`'s bridge port down: it reaches no one, no one reaches it."""
        ip("-n", self.bridge_ns, "link", "set", host.port, "down")

    def plug(self, host: Host) -> None:
        ip("-n", self.bridge_ns, "link", "set", host.port, "up")

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Kill, unmount, delete: everything this network made, nothing else (idempotent)."""
        problems: list[str] = []
        for host in self.hosts:
            if host.netns in self.namespaces:
                try:
                    self.kill_all(host)
                except (AssertionError, subprocess.SubprocessError) as exc:
                    problems.append(str(exc))
        for proc in self.processes:
            if proc.poll() is None:  # (started here, then moved?) by its PID all the same
                proc.kill()
                proc.wait(timeout=GUARD)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self.processes.clear()
        for path in self.mounts:
            if mounted(path):
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
        self.mounts.clear()
        while self.namespaces:
            name = self.namespaces.pop()
            done = ip("netns", "del", name, check=False)
            if done.returncode != 0 and name in ip("netns", "list").stdout.split():
                problems.append(f"ip netns del {name}: {done.stderr.strip()}")
            else:
                (NOTES / name).unlink(missing_ok=True)
        assert not problems, "teardown: " + "; ".join(problems)

    def leftovers(self) -> list[str]:
        """Whatever of this network still exists (for the tests of this harness)."""
        names = ip("netns", "list").stdout
        found = [f"namespace {n}" for n in (self.bridge_ns, *(h.netns for h in self.hosts))
                 if n in names.split()]  # fmt: skip
        found += [f"mount {m}" for m in self.mounts if mounted(m)]
        found += [f"process {p.pid}" for p in self.processes if running(p.pid)]
        return found


# A daemon.log line (``<date> <time> LEVEL logger: message``) of a warning or worse.
_LOUD_LINE = r"^\S+ \S+ (?:WARNING|ERROR|CRITICAL) \S+: (.*)$"


# -- slurpfs nodes -----------------------------------------------------------------------


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for slurpfs processes of a cluster test (weak KDF)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "SLURPFS_TEST_WEAK_KDF": "1",
        **suite_settings(),
    }
    env.update(extra or {})
    return env


def refused_member(node: SlurpNode) -> str:
    """The warning a member logs when `node`, a member it does not know yet, dials it."""
    peer = peer_id_of(bytes.fromhex(node.node_id))
    return rf"refused a connection from non-member {re.escape(str(peer))} at \S+"


class SlurpNode:
    """A data directory and a mount point on a host, driven through the CLI there."""

    def __init__(self, network: Network, host: Host, root: Path, name: str | None = None) -> None:
        self.network = network
        self.host = host
        self.name = name or f"n{host.index}"
        self.data = root / self.name / "data"
        self.mnt = root / self.name / "mnt"
        self.listen = host.multiaddr()
        self.pid = 0  # the mounted daemon's
        self.node_id = ""  # hex, once initialised

    @property
    def ucxl(self) -> Path:
        return self.mnt / "ucxl"

    @property
    def log(self) -> Path:
        return self.data / "daemon.log"

    def cli(
        self, *args: str | Path, check: bool = True, timeout: float = GUARD
    ) -> subprocess.CompletedProcess[bytes]:
        """``slurpfs ARGS --data DATA`` in this node's namespace."""
        argv = [sys.executable, "-m", "slurpfs.cli", *map(str, args), "--data", str(self.data)]
        done = self.network.run(self.host, argv, env=node_env(), timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{self.name}: slurpfs {' '.join(map(str, args))} exited {done.returncode}:\n"
                f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}"
            )
        return done

    def init(self) -> None:
        self.node_id = json.loads(self.cli("init", "--json").stdout)["node_id"]

    def peers(self) -> dict[str, Any]:
        """`slurpfs peers --json`: the replication worker's state and the members'
        (``peers``: node_id, name, state, address, ...)."""
        snapshot: dict[str, Any] = json.loads(self.cli("peers", "--json").stdout)
        return snapshot

    def states(self) -> dict[str, str]:
        """Each member's state as this node sees it (node id hex -> up, down, me, ...)."""
        return {p["node_id"]: p["state"] for p in self.peers()["peers"]}

    def invite(self) -> str:
        """A join token from this node (founding the cluster on its first call); once
        it returns, this node's mount listens for the joiner."""
        lines = self.cli("peers", "invite", "--listen", self.listen).stdout.decode().split()
        assert len(lines) == 1, lines
        if self.pid:  # the mount starts its replication worker now, if it had none
            wait_until(f"{self.name}'s worker listens", lambda: self.peers()["listening"])
        return lines[0]

    def join(self, token: str) -> None:
        self.cli("peers", "join", token, "--listen", self.listen)

    def mount(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if self.mnt not in self.network.mounts:
            self.network.mounts.append(self.mnt)
        self.cli("mount", self.mnt)
        assert mounted(self.mnt)
        self.pid = int(os.getxattr(self.mnt, "user.slurp.pid"))

    def unmount(self) -> None:
        """A clean unmount: the daemon and every process it started exit."""
        self.cli("umount", self.mnt)
        assert not mounted(self.mnt)
        wait_until(f"{self.name}'s daemon to end", lambda: not self.network.pids(self.host), 60)
        self.pid = 0

    def kill9(self) -> None:
        """kill -9 of the daemon and its workers; the stale mount is taken away."""
        self.network.kill_all(self.host)
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True, check=False)
        wait_until(f"{self.mnt} unmounted", lambda: not mounted(self.mnt), 30)
        self.pid = 0

    def check_log(self, expected: Sequence[str] = ()) -> None:
        """The daemon's log since the last mount holds no WARNING or worse but those
        `expected` (regular expressions matched whole; none need match)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        loud = [m.group(1) for m in re.finditer(_LOUD_LINE, text, re.MULTILINE)]
        unexpected = [m for m in loud if not any(re.fullmatch(p, m) for p in expected)]
        assert not unexpected, f"{self.name}'s daemon logged: " + "; ".join(unexpected)

    def configure(self, section: str, key: str, value: str) -> None:
        """Set ``[section] key = value`` (TOML) in the node's config.toml (before mounting)."""
        path = self.data / "config.toml"
        text = path.read_text()
        head = f"[{section}]\n"
        at = text.index(head) + len(head)
        end = text.find("\n[", at)
        body = text[at : len(text) if end < 0 else end + 1]
        lines = [x for x in body.splitlines(keepends=True) if not x.startswith(f"{key} =")]
        path.write_text(text[:at] + f"{key} = {value}\n" + "".join(lines) + text[at + len(body) :])

    def copies(self) -> set[bytes]:
        """The version ids whose body this node's store holds as a copy (not a cache),
        read from its store directly (LMDB readers do not disturb a running daemon)."""
        import lmdb

        from slurpfs.store import schema

        if not (self.data / "store" / "data.mdb").exists():
            return set()
        with _STORE_READS:
            env = lmdb.open(str(self.data / "store"), readonly=True, max_dbs=64, map_size=1 << 36)
            try:
                with env.begin() as txn:  # (handles opened in a read transaction live in it)
                    bodies = env.open_db(schema.DB_ENVELOPES, txn=txn, create=False)
                    cached = env.open_db(schema.DB_CACHED, txn=txn, create=False)
                    held = {bytes(k) for k in txn.cursor(db=bodies).iternext(values=False)}
                    held -= {bytes(k) for k in txn.cursor(db=cached).iternext(values=False)}
            finally:
                env.close()
        return held

    def health(self) -> dict[str, tuple[str, str]]:
        """The mount's health checks (``.slurp/health``): name -> (status word, detail)."""
        text = (self.mnt / ".slurp" / "health").read_text()
        checks = {}
        for line in text.splitlines()[1:]:
            name, _, rest = line.partition(": ")
            word, _, detail = rest.partition(" - ")
            checks[name] = (word, detail)
        return checks

    def pause(self) -> None:
        self.network.signal_all(self.host, signal.SIGSTOP)

    def resume(self) -> None:
        self.network.signal_all(self.host, signal.SIGCONT)

    def path(self, address: str, role: str) -> Path:
        """The role file of ``address`` (``authority/path...``) in this node's mount."""
        return self.ucxl / address / role


class ClusterNodes:
    """The nodes of one test, on one network; `close` checks each daemon's end."""

    def __init__(self, network: Network, root: Path) -> None:
        self.network = network
        self.root = root
        self.all: list[SlurpNode] = []
        self.expected_warnings: list[str] = []
        self.config: list[tuple[str, str, str]] = []  # (section, key, value) for every node

    def add(self) -> SlurpNode:
        node = SlurpNode(self.network, self.network.hosts[len(self.all)], self.root)
        self.all.append(node)
        return node

    def _init(self, node: SlurpNode) -> None:
        node.init()
        for section, key, value in self.config:
            node.configure(section, key, value)

    def cluster(self, count: int) -> list[SlurpNode]:
        """`count` new nodes made one cluster through the CLI, each granted the
        developer role, mounted, and seeing every other member up."""
        members = [self.add() for _ in range(count)]
        for node in members:
            self._init(node)
        founder = members[0]
        founder.mount()  # a join dials the inviter's running mount
        for node in members[1:]:
            node.join(founder.invite())
            founder.cli("keys", "grant", DEV, "--to", node.node_id)
        for node in members[1:]:
            node.mount()
        # A member mounted before the member log told it of a later joiner refuses
        # that joiner's first dials (once it learns, the joiner's next dial is let in).
        self.expected_warnings += [refused_member(node) for node in members]
        for node in members[1:]:  # the grant reaches it with the member log
            wait_until(f"{node.name} holds {DEV}", partial(holds, node, DEV))
        for node in members:
            wait_until(f"{node.name} sees every member up", partial(all_up, node, members))
        return members

    def join(
        self, founder: SlurpNode, before_mount: Callable[[SlurpNode], None] | None = None
    ) -> SlurpNode:
        """One more node joins through `founder` (mounted), is granted the developer
        role and mounted (`before_mount` is called with it just before); returns once
        it holds the role."""
        node = self.add()
        self._init(node)
        node.join(founder.invite())
        founder.cli("keys", "grant", DEV, "--to", node.node_id)
        if before_mount is not None:
            before_mount(node)
        self.expected_warnings.append(refused_member(node))  # (as in `cluster`)
        node.mount()
        wait_until(f"{node.name} holds {DEV}", partial(holds, node, DEV))
        return node

    def close(self) -> None:
        """Unmount each running node cleanly and check its log (after a passing test)."""
        for node in self.all:
            if node.pid:
                node.unmount()
            node.check_log(self.expected_warnings)


def holds(node: SlurpNode, role: str) -> bool:
    listed = json.loads(node.cli("keys", "list", "--json").stdout)["roles"]
    return any(r["role"] == role and r["held"] for r in listed)


def all_up(node: SlurpNode, members: Sequence[SlurpNode]) -> bool:
    states = node.states()
    return all(states.get(m.node_id) == "up" for m in members if m is not node)


# -- the checker -------------------------------------------------------------------------


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:16]


@dataclass
class Write:
    """One write through a mount, as its writer saw it (monotonic times)."""

    node: str
    address: str
    role: str
    content: bytes
    invoked: float
    acked: float | None = None  # when close (after fsync) returned; None: it failed
    error: str | None = None
    visible: dict[str, float] = field(default_factory=dict)  # node -> first seen (monotonic)


def write_file(path: Path, content: bytes) -> None:
    """open, write, fsync, close: what an editor's save does, and nothing else."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def contents_of(node: SlurpNode, address: str, role: str) -> set[bytes]:
    """Every content this node shows for (address, role): the head, its conflicts and
    its history."""
    directory = node.ucxl / address
    found: set[bytes] = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        shown = name == role or name.startswith(f"{role}.conflict-")
        if shown and (data := read_file(directory / name)) is not None:
            found.add(data)
    history = directory / ".history" / role
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(history):
            if (data := read_file(history / name)) is not None:
                found.add(data)
    return found


def shows(node: SlurpNode, write: Write) -> bool:
    """Whether `node` shows `write` (as the head, a conflict or in the history)."""
    head = read_file(node.path(write.address, write.role))
    return head == write.content or write.content in contents_of(node, write.address, write.role)


class Shown:
    """What one node showed for one (address, role) so far (the observer's cache:
    history files are read again only when their number changed)."""

    def __init__(self) -> None:
        self.contents: set[bytes] = set()
        self.history_length = -1

    def has(self, node: SlurpNode, write: Write) -> bool:
        if write.content in self.contents:
            return True
        directory = node.ucxl / write.address
        if read_file(directory / write.role) == write.content:
            return True
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return False
        for name in names:
            conflict = name.startswith(f"{write.role}.conflict-")
            if conflict and (data := read_file(directory / name)) is not None:
                self.contents.add(data)
        history = directory / ".history" / write.role
        with contextlib.suppress(FileNotFoundError):
            listed = os.listdir(history)
            if len(listed) != self.history_length:
                self.history_length = len(listed)
                self.contents.update(d for n in listed if (d := read_file(history / n)) is not None)
        return write.content in self.contents


@dataclass(frozen=True)
class NodeState:
    """What a node shows through its mount: per address directory, its role and
    conflict files (name -> content digest) and each role's history (digests, in order)."""

    files: Mapping[str, Mapping[str, str]]
    histories: Mapping[str, Mapping[str, tuple[str, ...]]]


def node_state(node: SlurpNode) -> NodeState:
    files: dict[str, dict[str, str]] = {}
    histories: dict[str, dict[str, tuple[str, ...]]] = {}
    for dirpath, dirnames, filenames in os.walk(node.ucxl):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        address = os.path.relpath(dirpath, node.ucxl)
        shown = {n: digest(d) for n in filenames if (d := read_file(Path(dirpath, n))) is not None}
        if shown:
            files[address] = shown
        history_root = Path(dirpath, ".history")
        if history_root.is_dir():
            histories[address] = {
                role: tuple(
                    digest(read_file(history_root / role / n) or b"")
                    for n in sorted(os.listdir(history_root / role), key=_numeric)
                )
                for role in sorted(os.listdir(history_root))
            }
    return NodeState(files, histories)


def _numeric(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (sys.maxsize, name)


@dataclass
class Report:
    """The checker's verdict: lost writes, divergent nodes, and visibility latencies."""

    acknowledged: int
    failed: int
    lost: list[str]  # "node: write" for each acknowledged write a node does not show
    divergent: list[str]  # nodes whose state differs from the first node's
    latencies: list[float]  # per acknowledged write seen everywhere: ack -> last node shows it
    never_seen: int  # acknowledged writes the observer did not see on every node before the check

    @property
    def ok(self) -> bool:
        return not self.lost and not self.divergent

    def summary(self) -> str:
        lat = sorted(self.latencies)
        timing = "no write was observed on every node"
        if lat:
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            timing = (
                f"visible everywhere after ack: p50 {statistics.median(lat) * 1000:.0f} ms,"
                f" p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
            )
        return (
            f"{self.acknowledged} acknowledged, {self.failed} failed, {len(self.lost)} lost,"
            f" {len(self.divergent)} divergent nodes, {self.never_seen} not observed"
            f" everywhere before the check; {timing}"
        )


class History:
    """Each write through a mount (Jepsen's invoke/ok/fail), and an observer thread
    that notes when each acknowledged write becomes visible on each node."""

    def __init__(self, nodes: Sequence[SlurpNode]) -> None:
        self.nodes = list(nodes)
        self.writes: list[Write] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observers: list[threading.Thread] = []

    def write(self, node: SlurpNode, address: str, role: str, content: bytes) -> Write:
        """Write `content` as (address, role) through `node`'s mount, and record it."""
        entry = Write(node.name, address, role, content, time.monotonic())
        with self._lock:
            self.writes.append(entry)
        try:
            path = node.path(address, role)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, content)
        except OSError as exc:
            entry.error = f"{type(exc).__name__}: {exc}"
            return entry
        entry.acked = time.monotonic()
        entry.visible[node.name] = entry.acked
        return entry

    def acknowledged(self) -> list[Write]:
        with self._lock:
            return [w for w in self.writes if w.acked is not None]

    # -- the observer ----------------------------------------------------------------------

    def __enter__(self) -> History:
        for node in self.nodes:  # one each: a paused node's mount blocks only its own
            thread = threading.Thread(target=self._observe, args=(node,), daemon=True)
            thread.start()
            self._observers.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._observers:
            thread.join(timeout=GUARD)

    def _observe(self, node: SlurpNode) -> None:
        seen: dict[tuple[str, str], Shown] = {}
        while not self._stop.wait(0.005):
            for write in self.acknowledged():
                if node.name in write.visible:
                    continue
                shown = seen.setdefault((write.address, write.role), Shown())
                try:
                    if mounted(node.mnt) and shown.has(node, write):
                        write.visible[node.name] = time.monotonic()
                except OSError:
                    pass  # a node being killed or restarted: look again later

    def wait_visible(self, guard: float = GUARD) -> None:
        """Wait until the observer saw every acknowledged write on every node (a hang
        guard: the message names what some node never showed)."""
        names = {n.name for n in self.nodes}

        def missing() -> list[str]:
            return [f"{w.node}'s {w.content[:30]!r} on {', '.join(sorted(names - w.visible.keys()))}"
                    for w in self.acknowledged() if not names <= w.visible.keys()]  # fmt: skip

        with contextlib.suppress(AssertionError):
            wait_until("every write visible everywhere", lambda: not missing(), guard)
        assert not missing(), f"not visible within {guard:g} s: " + "; ".join(missing())

    # -- the check -------------------------------------------------------------------------

    def converge(self, guard: float = GUARD) -> list[NodeState]:
        """Wait until every node shows the same state (a hang guard), and return it."""

        def same() -> list[NodeState] | None:
            states = [node_state(n) for n in self.nodes]
            return states if all(s == states[0] for s in states) else None

        found: list[NodeState] | None = None
        with contextlib.suppress(AssertionError):
            found = wait_until("every node shows the same state", same, guard, step=0.5)
        return found or [node_state(n) for n in self.nodes]

    def check(self, guard: float = GUARD) -> Report:
        """After healing: wait for convergence, then check every acknowledged write on
        every node and compare the nodes' states. The report says what was lost."""
        states = self.converge(guard)
        writes = self.acknowledged()
        never = sum(1 for w in writes if len(w.visible) < len(self.nodes))
        lost = [
            f"{node.name}: {w.node} wrote {w.address}/{w.role} = {w.content[:40]!r}"
            for node in self.nodes
            for w in writes
            if not shows(node, w)
        ]
        divergent = [n.name for n, s in zip(self.nodes, states, strict=True) if s != states[0]]
        latencies = [
            max(w.visible.values()) - w.acked
            for w in writes
            if w.acked is not None and len(w.visible) == len(self.nodes)
        ]
        failed = sum(1 for w in self.writes if w.acked is None)
        return Report(len(writes), failed, lost, divergent, latencies, never)


def conflicts(state: NodeState) -> dict[str, list[str]]:
    """Per address, the conflict files a node shows."""
    found = {a: sorted(n for n in f if ".conflict-" in n) for a, f in state.files.items()}
    return {a: names for a, names in found.items() if names}


class WriteLoop:
    """A client writing new contents through one node's mount in a thread, until stopped:
    ``<name> <i>`` to the addresses in turn (a failed write is recorded, not retried)."""

    def __init__(
        self, history: History, node: SlurpNode, addresses: Sequence[str], role: str
    ) -> None:
        self.history, self.node, self.addresses, self.role = history, node, addresses, role
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.count = 0

    def __enter__(self) -> WriteLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=GUARD)

    def _run(self) -> None:
        while not self._stop.is_set():
            address = self.addresses[self.count % len(self.addresses)]
            content = f"{self.node.name} {self.count}\n".encode()
            self.history.write(self.node, address, self.role, content)
            self.count += 1
            self._stop.wait(0.02)

    def wait_for(self, count: int) -> None:
        """Wait until this loop has made `count` writes in all (a hang guard)."""
        wait_until(f"{self.node.name} wrote {count} times", lambda: self.count >= count)
