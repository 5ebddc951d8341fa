"""Log output of the command line: one line per record, the fixed message then its fields.

Every record deferq logs has a fixed message and an `action` field (see docs/logging.md);
the other fields carry the execution, function and worker it concerns.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class FieldsFormatter(logging.Formatter):
    """`2026-12-04T10:00:00.123Z INFO deferq.worker Attempt started action=start_attempt ...`"""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        fields = " ".join(
            f"{key}={_show(value)}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD
        )
        line = f"{when[:-6]}Z {record.levelname} {record.name} {record.getMessage()}"
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _show(value: object) -> str:
    if isinstance(value, str) and value and " " not in value and '"' not in value:
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: INFO; -v: DEBUG."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if verbosity < -1:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FieldsFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
