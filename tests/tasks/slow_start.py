"""A task module that takes a while to import when DEFERQ_TEST_IMPORT_DELAY is set: a slot's
fresh child process (after an attempt was stopped) needs that long before it can run."""

from __future__ import annotations

import os
import time

from deferq import defer
from tests.tasks.control import RETRY_ONCE_NOW, begin

time.sleep(float(os.environ.get("DEFERQ_TEST_IMPORT_DELAY", "0")))


@defer(max_duration="1s", retry=RETRY_ONCE_NOW)
def stuck_slow_start(log: str, key: str) -> None:
    begin(log, key)
    time.sleep(3600)
