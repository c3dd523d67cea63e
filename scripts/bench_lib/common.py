"""Shared pieces of the benchmark: options, latency statistics, machine facts, tables."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

Json = dict[str, Any]


@dataclass(frozen=True)
class Options:
    """What the command line asked for; every section gets the same object."""

    quick: bool
    profile: bool
    workdir: Path
    docs: int  # contexts / files per data set
    creates: int  # files created in the create+write test
    saves: int  # iterations of the editor save loop
    repeat: int  # timed repetitions of each whole-tree tool run
    runs: int  # model: independent runs (new store each); figures are medians over runs


@dataclass
class Section:
    """What a section hands back: JSON-able data and the markdown to print."""

    data: Json
    markdown: list[str] = field(default_factory=list)


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency(samples_ns: Iterable[int], wall_ns: int | None = None) -> Json:
    """Summary of per-operation latencies: throughput, mean and percentiles in µs."""
    values = sorted(samples_ns)
    n = len(values)
    total = sum(values) if wall_ns is None else wall_ns
    return {
        "n": n,
        "wall_s": round(total / 1e9, 4),
        "ops_per_s": round(n / (total / 1e9), 1) if total else None,
        "mean_us": round(sum(values) / n / 1000, 2),
        "p50_us": round(percentile(values, 50) / 1000, 2),
        "p90_us": round(percentile(values, 90) / 1000, 2),
        "p99_us": round(percentile(values, 99) / 1000, 2),
        "max_us": round(values[-1] / 1000, 2),
    }


def timed_loop(
    items: Iterable[Any], op: Callable[[Any], object]
) -> tuple[list[int], int, list[object]]:
    """Run `op` on each item; (per-op ns, wall ns, results). Results are kept for checking."""
    clock = time.perf_counter_ns
    samples: list[int] = []
    results: list[object] = []
    start = clock()
    for item in items:
        t0 = clock()
        out = op(item)
        samples.append(clock() - t0)
        results.append(out)
    return samples, clock() - start, results


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tool_version(argv: Sequence[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_digest() -> str:
    """BLAKE2b over the slurpfs package sources: ties numbers to an exact (maybe uncommitted) tree."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted((REPO / "slurpfs").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def machine() -> Json:
    """Facts about where the numbers come from."""
    mem_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    dirty = _git("status", "--porcelain", "--", "slurpfs")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "slurpfs_tree_modified": bool(dirty) if dirty is not None else None,
        "slurpfs_source_digest": source_digest(),
        "gocryptfs": _tool_version(["gocryptfs", "-version"]),
    }


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)
    return lines


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def mib(n: int) -> float:
    return round(n / 2**20, 2)
