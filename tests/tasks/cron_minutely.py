"""A cron function that runs every minute, for the exactly-once and listing tests."""

from __future__ import annotations

import os

from deferq import defer


@defer.cron("* * * * *")
def every_minute() -> int:
    return os.getpid()
