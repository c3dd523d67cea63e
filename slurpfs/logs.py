"""How the daemon and its workers write log lines: ``log.format`` ``text`` or ``json``.

``text`` (the default) is ``<time> <LEVEL> <logger>: <message>``. ``json`` is one
JSON object per line, for journald, Loki and the like, with stable keys::

    {"time": "2026-12-06T17:40:01.123Z", "level": "INFO", "logger": "slurpfs.daemon",
     "event": "mounted at /home/me/ucxl", "fields": {}}

``event`` is the message as the text format shows it; ``fields`` holds what the
call passed as ``extra=`` and, for an error with a traceback, ``exception``.
The serialisation is python-json-logger's. Neither format adds anything to what
the code logs: no log line carries context plaintext, and an address only at
DEBUG or where the reader of the log could see it otherwise (the code's rule).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS, merge_record_extra
from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RESERVED = frozenset(RESERVED_ATTRS) | {"message", "asctime"}


class JsonLines(JsonFormatter):
    """One JSON object per record: time, level, logger, event, fields."""

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        fields: dict[str, Any] = {}
        merge_record_extra(record, fields, reserved=_RESERVED)
        if message_dict.get("exc_info"):
            fields["exception"] = message_dict["exc_info"]
        log_data["time"] = _utc(record.created)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["event"] = record.message
        log_data["fields"] = fields


def _utc(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-12-06T17:40:01.123Z``."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``log.format`` `fmt` (checked at configuration load)."""
    if fmt == "json":
        return JsonLines()
    return logging.Formatter(TEXT_FORMAT)


def setup(path: Path | None, level: int, fmt: str = "text") -> None:
    """Send the root logger's records at `level` and above to `path` (stderr: None)."""
    handler: logging.Handler = (
        logging.FileHandler(path) if path is not None else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
