"""An every-minute cron function allowed one execution at a time, which runs until the
test creates the file `CRON_TEST_GATE` names."""

from __future__ import annotations

import os
import time
from pathlib import Path

from deferq import defer

GATE_TIMEOUT = 60.0


@defer.cron("* * * * *", concurrency=1)
def holds_until_released() -> str:
    gate = Path(os.environ["CRON_TEST_GATE"])
    deadline = time.monotonic() + GATE_TIMEOUT
    while not gate.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} was not created within {GATE_TIMEOUT}s")
        time.sleep(0.02)
    return "released"
