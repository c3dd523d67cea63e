"""Log lines: ``log.format = json`` writes one JSON object per line with stable keys."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

import pytest
from conftest import Nodes, find_canary
from fsutil import AUTH, mounted_at

from slurpfs import config, logs
from slurpfs.errors import ConfigError

KEYS = {"time", "level", "logger", "event", "fields"}
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse here")


def record(msg: str, *args: object, exc: BaseException | None = None, **extra: object) -> str:
    logger = logging.getLogger("slurpfs.test")
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    rec = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra
    )
    return logs.formatter("json").format(rec)


def test_a_json_line_has_the_stable_keys() -> None:
    """Expected: one line, a JSON object with exactly time/level/logger/event/fields;
    the message formatted as the text format would; `extra=` values under fields."""
    line = record("mounted %s in %.1f s", "/mnt", 0.25, peer="node-b")
    assert "\n" not in line
    body = json.loads(line)
    assert set(body) == KEYS
    assert body["level"] == "WARNING"
    assert body["logger"] == "slurpfs.test"
    assert body["event"] == "mounted /mnt in 0.2 s"
    assert body["fields"] == {"peer": "node-b"}
    assert body["time"].endswith("Z")
    assert body["time"][10] == "T"


def test_a_traceback_stays_on_its_line() -> None:
    try:
        raise ValueError("broken\nacross lines")
    except ValueError as exc:
        line = record("internal error", exc=exc)
    assert "\n" not in line
    body = json.loads(line)
    assert set(body) == KEYS
    assert "ValueError: broken" in body["fields"]["exception"]


def test_the_text_format_is_the_default() -> None:
    assert config.load(environ={}, table={}).log.format == "text"
    assert not isinstance(logs.formatter("text"), logs.JsonLines)


def test_an_unknown_format_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^SLURPFS_LOG_FORMAT: must be text or json"):
        config.load(environ={"SLURPFS_LOG_FORMAT": "xml"}, table={})


@pytest.mark.mount
@needs_fuse
def test_a_json_mount_logs_only_json_lines(nodes: Nodes, tmp_path: Path) -> None:
    """A daemon mounted with ``SLURPFS_LOG_FORMAT=json``, its search worker, a save
    and a read, then an unmount. Expected: every line of daemon.log (the worker's
    lines included) parses as one JSON object with the stable keys; the start and
    the exit are there; the saved content is in no line, in any encoding."""
    m = mounted_at(nodes, tmp_path, env={"SLURPFS_LOG_FORMAT": "json"})
    canary = secrets.token_hex(16).encode()
    try:
        target = m.ucxl / AUTH / "src" / "auth.go"
        target.mkdir(parents=True)
        (target / "developer").write_bytes(b"secret " + canary + b"\n")
        assert canary in (target / "developer").read_bytes()
        m.unmount()
    finally:
        m.sweep()
    raw = m.log.read_bytes()
    lines = raw.decode().splitlines()
    bodies = [json.loads(line) for line in lines]
    assert all(set(b) == KEYS for b in bodies)
    loggers = {b["logger"] for b in bodies}
    assert "slurpfs.daemon" in loggers
    assert any(name.startswith("slurpfs.search") or "worker" in name for name in loggers), loggers
    assert any("exiting with status 0" in b["event"] for b in bodies)
    assert find_canary(raw, canary) is None
