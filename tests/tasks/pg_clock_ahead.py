"""A background function only the worker whose clock runs ahead imports."""

from __future__ import annotations

from datetime import UTC, datetime

from deferq import defer


@defer
def local_time() -> str:
    """The clock of the process that runs the attempt."""
    return datetime.now(UTC).isoformat()
