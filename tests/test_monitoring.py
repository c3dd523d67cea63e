"""The alert rules and the Grafana dashboard in monitoring/: valid, tested, and naming
only metrics a daemon exposes.

promtool comes from Debian's ``prometheus`` package (scripts/install installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import Nodes
from fsutil import AUTH, Mounted, mounted_at, wait_for
from prometheus_client.parser import text_string_to_metric_families
from redisutil import shared

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "slurpfs-rules.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse here")
_NAME = re.compile(r"\bslurpfs_[a-z0-9_]+(?:\.\+[a-z0-9_]*)?")


def promtool(*args: str | Path, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool is not None, "promtool is missing: scripts/install installs Debian's prometheus"
    return subprocess.run(
        [tool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 20 rules found" in result.stdout


def test_the_rules_fire_as_their_unit_tests_expect() -> None:
    """Integrity failure, repeated denials, a nearly full store, low disk, a high error
    rate (I/O errors, not names that do not parse), audit failure: each fires on the
    series of `slurpfs-rules.test.yml`, and not before its time."""
    result = promtool("test", "rules", "slurpfs-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check is a real one: an expression that does not parse fails it."""
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("> 0.9\n", "> > 0.9\n", 1))
    assert promtool("check", "rules", broken).returncode != 0


def named_metrics() -> set[str]:
    """Metric names (family names: no ``_total``/``_bucket``...) in the rules and dashboard."""
    exprs = [rule for rule in re.findall(r"expr: (.*(?:\n {10}.*)*)", RULES.read_text())]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names: set[str] = set()
    for expr in exprs:
        for name in _NAME.findall(expr):
            name = re.sub(r"_(bucket|count|sum|total)$", "", name)
            names.add(name)
    return names


@pytest.mark.mount
@needs_fuse
def test_every_metric_the_rules_and_dashboard_name_is_exposed(nodes: Nodes, tmp_path: Path) -> None:
    """A mount with its HTTP endpoints and a Redis tier, after a save, a read and a
    search. Expected: every metric the rules and the dashboard query is a family of
    /metrics (a pattern such as ``slurpfs_health_.+`` matches at least one)."""
    with shared(tmp_path / "redis") as srv:
        env = {"SLURPFS_HTTP_LISTEN": "127.0.0.1:0", "SLURPFS_CACHE_REDIS_URL": srv.url}
        text = scrape_after_work(mounted_at(nodes, tmp_path, env=env))
    exposed = {f.name for f in text_string_to_metric_families(text)}
    missing = []
    for name in sorted(named_metrics()):
        if ".+" in name:
            pattern = re.compile(name)
            if not any(pattern.fullmatch(e) for e in exposed):
                missing.append(name)
        elif name not in exposed:
            missing.append(name)
    assert not missing, f"named by the rules or the dashboard but not exposed: {missing}"


def scrape_after_work(m: Mounted) -> str:
    """/metrics of mount `m` after a save, a read and a search; then unmounted."""
    try:
        target = m.ucxl / AUTH / "src" / "auth.go"
        target.mkdir(parents=True)
        (target / "developer").write_text("hello\n")
        assert (target / "developer").read_text() == "hello\n"
        status = m.mnt / ".slurp" / "status"
        wait_for(lambda: "search_ready: 1" in status.read_text())
        os.listdir(m.mnt / ".search" / "hello")
        port = re.search(r"^http: http://127\.0\.0\.1:(\d+)/$", status.read_text(), re.M)
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=60) as reply:
            text: str = reply.read().decode()
        m.unmount()
    finally:
        m.sweep()
    return text
