"""The command line of `scripts/bench`: parse options, run the sections, print and save."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench_lib.common import Json, Options, Section, machine

SECTIONS = (
    "model", "mount", "search", "worker", "footprint", "replication", "placement", "backup", "scale",
    "maintenance",
)  # fmt: skip


def _section(name: str) -> Callable[[Options], Section]:
    if name == "model":
        from bench_lib import model

        return model.run
    if name == "mount":
        from bench_lib import mount

        return mount.run
    if name == "worker":
        from bench_lib import worker

        return worker.run
    if name == "scale":
        from bench_lib import scale

        return scale.run
    if name == "replication":
        from bench_lib import replication

        return replication.run
    if name == "placement":
        from bench_lib import placement

        return placement.run
    if name == "backup":
        from bench_lib import backup

        return backup.run
    if name == "maintenance":
        from bench_lib import maintenance

        return maintenance.run
    from bench_lib import search

    return search.run_footprint if name == "footprint" else search.run


def _parse(argv: list[str]) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark slurpfs: the model, the mount beside a plain directory and gocryptfs, "
        "and search with whoosh and tantivy.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1,000 documents instead of 10,000 (search: 10,000 instead of 100,000)",
    )
    parser.add_argument(
        "--only",
        default="model,mount,search,worker",
        help=f"comma-separated sections of {', '.join(SECTIONS)} "
        "(footprint, replication, placement, backup, scale and maintenance run only when named)",
    )
    parser.add_argument(
        "--docs", type=int, help="contexts of the model, mount and worker sections (default 10,000)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    parser.add_argument(
        "--runs", type=int, help="model: independent runs, medians reported (default 3, quick 1)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="model: also time every stage of put and get"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()), help="scratch space"
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    args.only = only
    if args.docs is not None and args.docs < 1:
        parser.error("--docs must be at least 1")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    quick = bool(args.quick)
    opts = Options(
        quick=quick,
        profile=bool(args.profile),
        workdir=args.workdir.resolve(),
        docs=args.docs or (1000 if quick else 10_000),
        creates=200 if quick else 2000,
        saves=50 if quick else 200,
        repeat=1 if quick else 3,
        runs=args.runs or (1 if quick else 3),
    )
    return args, opts


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`: unmounts, kills, cleans


def main(argv: list[str]) -> int:
    args, opts = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.time()
    results: Json = {
        "command": " ".join(["scripts/bench", *argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine(),
        "load_before": os.getloadavg(),
        "options": {
            "quick": opts.quick,
            "documents": opts.docs,
            "creates": opts.creates,
            "saves": opts.saves,
            "repeat": opts.repeat,
            "model_runs": opts.runs,
        },
        "sections": {},
    }
    report: list[str] = []
    for name in args.only:
        print(f"bench: {name} ...", file=sys.stderr)
        t0 = time.perf_counter()
        section = _section(name)(opts)
        section.data["section_seconds"] = round(time.perf_counter() - t0, 1)
        results["sections"][name] = section.data
        report += [*section.markdown, ""]
    results["load_after"] = os.getloadavg()
    m = results["machine"]
    print(f"## slurpfs benchmark ({results['started']})\n")
    print(
        f"`{results['command']}` on {m['nproc']} × {m['cpu_model']}, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, commit {m['commit']}"
        f"{' + uncommitted changes in slurpfs/' if m['slurpfs_tree_modified'] else ''} "
        f"(source digest {m['slurpfs_source_digest']}); load average "
        f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after.\n"
    )
    print("\n".join(report))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"bench: results written to {args.out}", file=sys.stderr)
    return 0
