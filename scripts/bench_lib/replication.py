"""Section `replication`: two mounted nodes of one cluster on loopback.

A founds a cluster and B joins it (``peers invite`` / ``peers join`` / ``keys
grant``, the CLI a user runs; B is mounted once to take the granted key). With
both unmounted, A gets `--docs` new contexts of 4 KiB (one version each): first a
tools corpus under an authority of its own (a tenth of them, at least 100: the
files the tools read), then the rest. Both are mounted again, B last; then:

* **catch-up**: from B's mount command until B's mount shows the last context A
  committed (versions arrive in A's commit order, so every earlier one is there:
  a sample is read back and compared), in versions per second, with the CPU
  milliseconds per version of each daemon and of each of its workers (A's over
  the catch-up, B's since its mount command; B's search worker indexes what
  arrives at the same time: it is shown apart);
* **tools during catch-up**: as soon as B shows the whole tools corpus, warm
  ``cat`` of its files and ``grep -r`` over its authority through B's mount while
  the rest still arrives, against the same runs once B is idle again (ratio;
  goal within 1.3x);
* **save to visible**: `--saves` saves through A's mount, about 20 a second over
  ten contexts, each timed from its ``close`` (and from its ``open``) until B's
  mount reads the new bytes (p50, p99, max; goal p50 < 100 ms, p99 < 500 ms).

The machine may be shared: the 1-minute load average is recorded (also as each
set of tool runs begins: the ratio compares runs under whatever else ran then).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench_lib import corpus, daemons
from bench_lib.common import Json, Options, Section, table
from bench_lib.mount import ENV, NEEDLE

TOOLS_AUTHORITY = "bench:developer@tools:local"
SAVES_AUTHORITY = "bench:developer@saves:loopback"
GOAL_RATIO = 1.3
GOAL_P50_MS, GOAL_P99_MS = 100.0, 500.0
CATCH_UP_LIMIT_S = 3600.0
VISIBLE_LIMIT_S = 30.0
SAVE_INTERVAL_S = 0.05
SAMPLE = 200  # caught-up contexts read back and compared


def run(opts: Options) -> Section:
    base = opts.workdir / f"bench-replication-{os.getpid()}"
    base.mkdir(parents=True)
    try:
        data = _measure(base, opts)
    finally:
        daemons.remove(base, label="replication")
    return Section(data, _markdown(data))


def _cli(*args: str | Path) -> str:
    argv = daemons.slurpfs(*map(str, args))
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"slurpfs {' '.join(map(str, args))}: {done.stderr.strip()[-800:]}")
    return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tools_docs(count: int) -> list[corpus.Doc]:
    """The tools corpus: documents of the usual kind, under an authority of their own."""
    docs = corpus.generate(count, seed=7)
    return [corpus.Doc(f"ucxl://{TOOLS_AUTHORITY}/" + "/".join(d.parts[1:]),
                       (TOOLS_AUTHORITY, *d.parts[1:]), d.data) for d in docs]  # fmt: skip


def _import(data: Path, docs: Sequence[corpus.Doc]) -> None:
    """Store `docs` in A's store (A not mounted), as its own new versions."""
    from slurpfs import config, ucxl
    from slurpfs.model import BatchItem, ContextStore

    cfg = config.load(data / "config.toml", {"HOME": str(data.parent)})
    t0 = time.perf_counter()
    with ContextStore.open(cfg, None) as store:
        for i in range(0, len(docs), 500):
            batch = [
                BatchItem(ucxl.parse(d.address), corpus.ROLE, d.data) for d in docs[i : i + 500]
            ]
            report = store.put_many(batch)
            if report.failed:
                raise RuntimeError(f"import failed: {report.failed[:3]}")
    print(f"replication: imported {len(docs)} contexts into A in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)  # fmt: skip


def _path(mnt: Path, doc: corpus.Doc) -> Path:
    return mnt.joinpath("ucxl", *doc.parts, corpus.ROLE)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _wait_for(path: Path, data: bytes, limit: float) -> float | None:
    """Seconds until `path` reads `data` (polled every millisecond), or None."""
    t0 = time.monotonic()
    while _read(path) != data:
        if time.monotonic() - t0 > limit:
            return None
        time.sleep(0.001)
    return time.monotonic() - t0


def _tree(root: int) -> dict[int, str]:
    """`root` and its descendants (a daemon in the foreground and its workers) by PID."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier += children
    out = {}
    for pid in found:
        with contextlib.suppress(OSError):
            out[pid] = _role_of(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    return out


def _role_of(cmdline: list[bytes]) -> str:
    text = b" ".join(cmdline).decode(errors="replace")
    if "slurpfs.net.worker" in text:
        return "replication worker"
    if "search_worker" in text:
        return "search worker"
    return "daemon" if "mount" in text else text[:40]


def _cpu(daemon: int) -> dict[str, float]:
    """CPU seconds so far of the daemon and of each of its workers, by part."""
    out: dict[str, float] = {}
    for pid, role in _tree(daemon).items():
        with contextlib.suppress(OSError):
            out[role] = out.get(role, 0.0) + daemons.cpu_seconds(pid)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}


def _tool(mnt: Path, argv: list[str], ok: tuple[int, ...]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=mnt, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)  # fmt: skip
    if proc.returncode not in ok:
        raise RuntimeError(f"{argv[0]}: exit {proc.returncode}: {proc.stderr[-300:]!r}")
    return time.perf_counter() - t0


def _rounds(mnt: Path, tools: dict[str, tuple[list[str], tuple[int, ...]]], repeat: int) -> Json:
    """One untimed warm-up round, then `repeat` timed rounds of every tool."""
    runs: dict[str, list[float]] = {name: [] for name in tools}
    for rep in range(repeat + 1):
        for name, (argv, ok) in tools.items():
            elapsed = _tool(mnt, argv, ok)
            if rep:
                runs[name].append(elapsed)
    return {name: {"wall": round(statistics.median(t), 4), "runs_s": [round(x, 4) for x in t]}
            for name, t in runs.items()}  # fmt: skip


@contextlib.contextmanager
def _mounted(data: Path, mnt: Path, log: Path, info: Json) -> Iterator[int]:
    mnt.mkdir(exist_ok=True)
    argv = daemons.slurpfs("mount", "--foreground", "--data", str(data), str(mnt))
    stop = daemons.slurpfs("umount", str(mnt))
    with daemons.running(argv, mnt, log, info, env=ENV, stop=stop, label="replication") as pid:
        yield pid


def _listening(data: Path) -> bool:
    """Whether the mount of `data` runs a replication worker that listens."""
    snapshot = json.loads(_cli("peers", "--json", "--data", data))
    return bool(snapshot.get("listening"))


def _holds(data: Path, role: str) -> bool:
    listed = json.loads(_cli("keys", "list", "--json", "--data", data))["roles"]
    return any(r["role"] == role and r["held"] for r in listed)


def _until(what: str, check: Callable[[], bool], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {limit:.0f} s: {what}")
        time.sleep(0.2)


def _form(base: Path, a_data: Path, b_data: Path, info: Json) -> None:
    """A founds a cluster, B joins it and is granted the role (B's mount takes the
    granted key at its next start: B is mounted once, until it holds it)."""
    _cli("init", "--data", a_data)
    listen_a = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    listen_b = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    token = _cli("peers", "invite", "--data", a_data, "--listen", listen_a).strip()
    b_id = json.loads(_cli("init", "--json", "--data", b_data))["node_id"]
    with _mounted(a_data, base / "mnt-a", base / "form-a.log", info.setdefault("form_a", {})):
        _until("A's replication worker listens", lambda: _listening(a_data))
        _cli("peers", "join", token, "--data", b_data, "--listen", listen_b)
        _cli("keys", "grant", corpus.ROLE, "--to", b_id, "--data", a_data)
        with _mounted(b_data, base / "mnt-b", base / "form-b.log", info.setdefault("form_b", {})):
            _until("B holds the role", lambda: _holds(b_data, corpus.ROLE))


def _measure(base: Path, opts: Options) -> Json:
    tools_docs = _tools_docs(max(100, opts.docs // 10))
    catch_up = list(corpus.generate(max(1, opts.docs - len(tools_docs)), seed=2))
    a_data, b_data = base / "a", base / "b"
    out: Json = {"versions": len(tools_docs) + len(catch_up), "tools_corpus": len(tools_docs),
                 "saves": opts.saves, "repeat": opts.repeat, "load_1min": [os.getloadavg()[0]],
                 "daemon_a": {}, "daemon_b": {}}  # fmt: skip
    _form(base, a_data, b_data, out)
    # What B has not seen: the tools corpus first (it arrives first), then the rest.
    _import(a_data, tools_docs + catch_up)
    files = base / "tools.list"
    files.write_bytes(b"".join(os.fsencode("/".join(("ucxl", *d.parts, corpus.ROLE))) + b"\0"
                               for d in tools_docs))  # fmt: skip
    tools = {
        "cat": (["xargs", "-0", "-a", str(files), "cat"], (0,)),
        "grep": (["grep", "-r", "-l", "-F", NEEDLE, f"ucxl/{TOOLS_AUTHORITY}"], (0, 1)),
    }
    mnt_a, mnt_b = base / "mnt-a", base / "mnt-b"
    with _mounted(a_data, mnt_a, base / "a.log", out["daemon_a"]) as pid_a:
        _until("A's replication worker listens", lambda: _listening(a_data))
        cpu_a0 = _cpu(pid_a)
        started = time.monotonic()
        with _mounted(b_data, mnt_b, base / "b.log", out["daemon_b"]) as pid_b:
            out["mounted_s"] = round(time.monotonic() - started, 2)
            _catch_up(out, mnt_b, tools_docs, catch_up, tools, opts, started)
            out["cpu_s"] = {"a": _delta(_cpu(pid_a), cpu_a0), "b": _cpu(pid_b)}
            out["load_1min"].append(os.getloadavg()[0])
            daemons.settle(pid_b, limit_s=300, window_s=2.0)
            out["load_tools"]["idle"] = os.getloadavg()[0]
            out["idle"] = _rounds(mnt_b, tools, opts.repeat)
            out["save_to_visible"] = _saves(mnt_a, mnt_b, opts.saves)
            out["load_1min"].append(os.getloadavg()[0])
    out["ratio"] = {name: round(out["during"][name]["wall"] / out["idle"][name]["wall"], 2)
                    for name in tools}  # fmt: skip
    # The fastest run of each set: what is left of the catch-up's cost when the
    # other work on a shared machine happened to stay out of the way.
    out["ratio_fastest"] = {name: round(min(out["during"][name]["runs_s"])
                                        / min(out["idle"][name]["runs_s"]), 2)
                            for name in tools}  # fmt: skip
    return out


def _catch_up(out: Json, mnt_b: Path, tools_docs: list[corpus.Doc], catch_up: list[corpus.Doc],
              tools: dict[str, tuple[list[str], tuple[int, ...]]], opts: Options,
              started: float) -> None:  # fmt: skip
    last_tool, last = tools_docs[-1], catch_up[-1]
    if _wait_for(_path(mnt_b, last_tool), last_tool.data, CATCH_UP_LIMIT_S) is None:
        raise RuntimeError("B never showed the tools corpus")
    out["tools_corpus_s"] = round(time.monotonic() - started, 2)
    out["load_tools"] = {"during": os.getloadavg()[0]}
    out["during"] = _rounds(mnt_b, tools, opts.repeat)
    out["last_arrived_before_tools_ended"] = _read(_path(mnt_b, last)) == last.data
    if _wait_for(_path(mnt_b, last), last.data, CATCH_UP_LIMIT_S) is None:
        raise RuntimeError(f"B did not catch up within {CATCH_UP_LIMIT_S:.0f} s")
    elapsed = time.monotonic() - started
    out["catch_up_s"] = round(elapsed, 2)
    out["versions_per_s"] = round(out["versions"] / elapsed, 1)
    sample = random.Random(3).sample(catch_up, min(SAMPLE, len(catch_up)))
    wrong = [d.address for d in sample if _read(_path(mnt_b, d)) != d.data]
    if wrong:
        raise RuntimeError(f"B shows wrong or no content for {len(wrong)} of {len(sample)}: "
                           f"{wrong[:3]}")  # fmt: skip
    out["sample_checked"] = len(sample)


def _saves(mnt_a: Path, mnt_b: Path, count: int) -> Json:
    """Save through A's mount, time until B's mount reads the new bytes."""
    addresses = [mnt_a / "ucxl" / SAVES_AUTHORITY / f"ctx{i}" for i in range(10)]
    for directory in addresses:
        directory.mkdir(parents=True, exist_ok=True)
    after_close: list[float] = []
    whole: list[float] = []  # from the save's open: what the peer waits for a save
    missed = 0
    for i in range(count):
        directory = addresses[i % len(addresses)]
        data = f"save {i} at {time.time():.6f}\n".encode() * 8
        opened = time.monotonic()
        with open(directory / corpus.ROLE, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        closed = time.monotonic()
        seen = _wait_for(mnt_b / directory.relative_to(mnt_a) / corpus.ROLE, data, VISIBLE_LIMIT_S)
        if seen is None:
            missed += 1
        else:
            after_close.append(seen)
            whole.append(closed - opened + seen)
        time.sleep(SAVE_INTERVAL_S)
    return {"saves": count, "missed": missed, **_summary(after_close, ""),
            **_summary(whole, "from_open_")}  # fmt: skip


def _summary(values: list[float], prefix: str) -> Json:
    ordered = sorted(values)

    def ms(value: float) -> float:
        return round(value * 1000, 1)

    if not ordered:
        return {f"{prefix}p50_ms": None, f"{prefix}p99_ms": None, f"{prefix}max_ms": None}
    return {
        f"{prefix}p50_ms": ms(statistics.median(ordered)),
        f"{prefix}p99_ms": ms(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]),
        f"{prefix}max_ms": ms(ordered[-1]),
    }


def _markdown(data: Json) -> list[str]:
    rows = []
    for name in ("cat", "grep"):
        during, idle = data["during"][name]["wall"], data["idle"][name]["wall"]
        rows.append([f"`{name}`" if name != "grep" else "`grep -r`", f"{during * 1000:.0f}",
                     f"{idle * 1000:.0f}", f"{data['ratio'][name]:.2f}x",
                     "yes" if data["ratio"][name] <= GOAL_RATIO else "no"])  # fmt: skip
    saves = data["save_to_visible"]
    n = data["versions"]
    cpu = {side: ", ".join(f"{k} {v / n * 1000:.2f}" for k, v in sorted(parts.items()))
           for side, parts in data["cpu_s"].items()}  # fmt: skip
    return [
        f"### Replication: a fresh node catching up {n:,} versions, two mounts on loopback",
        "",
        f"- catch-up: {data['catch_up_s']} s from B's mount command ({data['versions_per_s']}"
        f" versions/s); the tools corpus ({data['tools_corpus']} contexts) was there after"
        f" {data['tools_corpus_s']} s; {data['sample_checked']} contexts read back and compared",
        f"- CPU ms per version: A (sending, over the catch-up) {cpu['a']}; B (receiving, since"
        f" its mount command) {cpu['b']}",
        "",
        *table(
            ["B's tool (warm, median)", "during catch-up, ms", "idle, ms", "ratio",
             f"within {GOAL_RATIO}x"],  # (B's daemon serves the tools too: its CPU counts them)
            rows,
        ),  # fmt: skip
        "",
        "- ratio of the fastest of each set of runs: "
        + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in data["ratio_fastest"].items()),
        f"- (the last version had {'already' if data['last_arrived_before_tools_ended'] else 'not yet'}"
        " arrived when the tool runs ended)",
        f"- save on A to visible on B ({saves['saves']} saves, {1 / SAVE_INTERVAL_S:.0f} a second"
        f" at most), from the save's `close`: p50 {saves['p50_ms']} ms, p99 {saves['p99_ms']} ms,"
        f" max {saves['max_ms']} ms; from its `open` (write, fsync and close included): p50"
        f" {saves['from_open_p50_ms']} ms, p99 {saves['from_open_p99_ms']} ms, max"
        f" {saves['from_open_max_ms']} ms; {saves['missed']} not visible within"
        f" {VISIBLE_LIMIT_S:.0f} s (goal p50 < {GOAL_P50_MS:.0f} ms, p99 < {GOAL_P99_MS:.0f} ms)",
        "- 1-minute load average at start, after catch-up, at the end: "
        + ", ".join(f"{x:.2f}" for x in data["load_1min"])
        + f"; as the tool runs began, during catch-up {data['load_tools']['during']:.2f},"
        f" idle {data['load_tools']['idle']:.2f}",
        f"- daemons: A exit {data['daemon_a'].get('daemon_exit')}, B exit"
        f" {data['daemon_b'].get('daemon_exit')}; log problems A"
        f" {data['daemon_a'].get('daemon_log_problems')}, B {data['daemon_b'].get('daemon_log_problems')}",
    ]
