"""Background functions for the tests of control over running work: max duration, abort,
concurrency limits, shutdown and crash recovery.

Each function takes a `log` path and a `key` naming the call. `begin()` appends a line to
the log when the function really starts and notes which other runs were still alive at that
moment (their process exists and has not logged their end). The tests read these lines to
check, from the running code's own point of view, that two attempts of one execution never
overlap and that a concurrency limit holds even while stopped attempts are being killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from deferq import RetryPolicy, defer

RETRY_ONCE_NOW = RetryPolicy(1, initial_interval=0, randomization_factor=0)
RETRY_TWICE_NOW = RetryPolicy(2, initial_interval=0, randomization_factor=0)
RETRY_LATER = RetryPolicy(3, initial_interval="1h", randomization_factor=0)
"""A retry an hour later: an execution back in `created` and due now did not use it."""

_this_run: dict[str, Any] = {}


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie runs no code


def read_log(log: str) -> list[dict[str, Any]]:
    path = Path(log)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def begin(log: str, key: str, group: str = "") -> dict[str, Any]:
    """Log that a run of `key` starts in this process, with the runs alive right now."""
    with open(log, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        latest: dict[int, dict[str, Any]] = {}
        ended: set[str] = set()
        for line in f.read().splitlines():
            entry = json.loads(line)
            if entry["event"] == "start":
                latest[entry["pid"]] = entry
            else:
                ended.add(entry["run"])
        alive = [
            [entry["key"], entry["group"]]
            for pid, entry in latest.items()
            if entry["run"] not in ended and pid != os.getpid() and process_alive(pid)
        ]
        entry = {
            "event": "start",
            "key": key,
            "group": group,
            "pid": os.getpid(),
            "run": uuid.uuid4().hex,
            "at": time.time(),
            "alive": alive,
        }
        f.write(json.dumps(entry) + "\n")
        f.flush()
    _this_run.update(entry)
    return entry


def end(log: str) -> None:
    """Log that the run begun last in this process is over (about to return or raise)."""
    line = {"event": "end", "key": _this_run["key"], "run": _this_run["run"], "at": time.time()}
    with open(log, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(line) + "\n")


def starts(log: str, key: str | None = None) -> list[dict[str, Any]]:
    return [e for e in read_log(log) if e["event"] == "start" and key in (None, e["key"])]


def _wait_for(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.002)


def _block(how: str) -> None:
    """Never return, in one of the ways that defeat a polite stop."""
    if how == "python_sleep":
        time.sleep(3600)
    elif how == "libc_sleep":
        # Inside a C call that releases the GIL: no Python code runs to notice a signal.
        ctypes.CDLL(None).sleep(3600)
    elif how == "c_spin":
        # A C loop that holds the GIL (catastrophic regex backtracking): no thread of the
        # process runs Python code until it is killed.
        re.fullmatch(r"(a+)+b", "a" * 64)
    raise ValueError(f"unknown way to block: {how!r}")


async def _block_swallowing_cancellation() -> None:
    while True:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)


# Past max_duration


@defer(max_duration="1s", retry=RETRY_ONCE_NOW)
def stuck(log: str, key: str, how: str) -> None:
    begin(log, key)
    _block(how)


@defer(max_duration="1s", retry=RETRY_ONCE_NOW)
async def stuck_async(log: str, key: str) -> None:
    begin(log, key)
    await _block_swallowing_cancellation()


@defer(max_duration="1s", retry=RETRY_ONCE_NOW, concurrency=1)
def limited_and_stuck(log: str, key: str) -> None:
    """Concurrency 1 and always past its max duration: the next may start only once the
    stuck one is really stopped."""
    begin(log, key, group="limited_and_stuck")
    _block("libc_sleep")


# Aborted: the retry policy would run them again at once if an abort counted as a failure.


@defer(retry=RETRY_TWICE_NOW)
def blocks(log: str, key: str, how: str) -> None:
    begin(log, key)
    _block(how)


@defer(retry=RETRY_TWICE_NOW)
async def blocks_async(log: str, key: str) -> None:
    begin(log, key)
    await _block_swallowing_cancellation()


@defer(retry=RETRY_TWICE_NOW)
def waits_then(log: str, key: str, gate: str, then: str) -> str:
    """Waits for the file `gate`, then returns or raises a retryable error, as `then` says."""
    begin(log, key)
    _wait_for(gate)
    end(log)
    if then == "raise":
        raise RuntimeError(f"{key} failed after its gate opened")
    return key


# General purpose


@defer
def hold(log: str, key: str, seconds: float = 0.0) -> str:
    begin(log, key)
    time.sleep(seconds)
    end(log)
    return key


@defer(retry=RETRY_ONCE_NOW)
def hold_with_retry(log: str, key: str, seconds: float = 0.0) -> str:
    return hold.__wrapped__(log, key, seconds)


@defer
def slow_first(log: str, key: str, seconds: float) -> str:
    """Sleeps `seconds` on the first run of `key`, returns at once on later runs. No retry:
    a second run happens only if the first did not count as a failure."""
    first = not starts(log, key)
    begin(log, key)
    time.sleep(seconds if first else 0)
    end(log)
    return key


@defer(retry=RETRY_LATER)
def slow_first_retry_later(log: str, key: str, seconds: float) -> str:
    return slow_first.__wrapped__(log, key, seconds)


@defer(retry=RETRY_ONCE_NOW)
def hangs_first_time(log: str, key: str) -> str:
    """Hangs on the first run of `key` (to be lost with its worker); returns on later runs."""
    return slow_first.__wrapped__(log, key, 3600)


@defer
def hangs_first_time_no_retry(log: str, key: str) -> str:
    return slow_first.__wrapped__(log, key, 3600)


# Concurrency limits


@defer(concurrency=2, max_duration="1s", retry=RETRY_ONCE_NOW)
def limited_two(
    log: str, key: str, mode: str = "sleep", seconds: float = 0.0, gate: str = ""
) -> str:
    """At most 2 at once. mode: sleep (`seconds`, then return), raise_first (raise on the
    first run of `key`), stuck (past max_duration), gate (wait for the file `gate`)."""
    first = not starts(log, key)
    begin(log, key, group="limited_two")
    if mode == "stuck":
        _block("python_sleep")
    if mode == "gate":
        _wait_for(gate)
    time.sleep(seconds)
    end(log)
    if mode == "raise_first" and first:
        raise RuntimeError("the first run fails")
    return key


@defer(concurrency=1)
def one_at_a_time(log: str, key: str, seconds: float = 0.0) -> str:
    begin(log, key, group="one_at_a_time")
    time.sleep(seconds)
    end(log)
    return key


@defer(concurrency=1, max_concurrency_action="cancel")
def exclusive(log: str, key: str, seconds: float = 0.0) -> str:
    begin(log, key, group="exclusive")
    time.sleep(seconds)
    end(log)
    return key
