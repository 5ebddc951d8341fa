"""Background functions for the tests of what a worker does with running work when it loses
touch with the store, and of what an attempt leaves behind: subprocesses, asyncio tasks and
threads.

Runs log their start with `control.begin` (see `tests/tasks/control.py`); code that keeps
running writes ticks, one line `<pid> <time>` every 20 ms, to a marker file, so a test sees
from the running code's own point of view when it really stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import subprocess
import threading
import time

from deferq import RetryPolicy, defer
from tests.tasks.control import begin, end, starts

RETRY_ONCE_NOW = RetryPolicy(1, initial_interval=0, randomization_factor=0)
TICK = 0.02


def tick(marker: str) -> None:
    with open(marker, "a") as f:
        f.write(f"{os.getpid()} {time.time()}\n")


def read_ticks(marker: str) -> list[tuple[int, float]]:
    if not os.path.exists(marker):
        return []
    with open(marker) as f:
        return [(int(pid), float(at)) for pid, at in (line.split() for line in f if line)]


@defer(retry=RETRY_ONCE_NOW)
def ticks_first_time(log: str, key: str, marker: str, then: float = 1.0) -> str:
    """Ticks for ever on the first run of `key` (to be taken over as lost); later runs tick
    for `then` seconds and return."""
    first = not starts(log, key)
    begin(log, key)
    deadline = None if first else time.monotonic() + then
    while deadline is None or time.monotonic() < deadline:
        tick(marker)
        time.sleep(TICK)
    end(log)
    return key


@defer(max_duration="1s")
def spawns_and_blocks(pid_file: str) -> None:
    """Starts a subprocess that outlives any attempt, then blocks past max_duration."""
    child = subprocess.Popen(["sleep", "1000"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    time.sleep(3600)


@defer
def spawns_and_waits(pid_file: str, gate: str) -> None:
    """Starts a subprocess, then waits for the file `gate` (never written: to be aborted)."""
    child = subprocess.Popen(["sleep", "1000"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    while not os.path.exists(gate):
        time.sleep(0.01)


async def _ticking(marker: str, swallow_cancel: bool) -> None:
    while True:
        tick(marker)
        if swallow_cancel:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(TICK)
        else:
            await asyncio.sleep(TICK)


_kept: list[asyncio.Task[None]] = []


@defer
async def leaves_a_task(marker: str, swallow_cancel: bool = False) -> str:
    """Returns at once, leaving a task that ticks for ever on the slot's event loop."""
    _kept.append(asyncio.get_running_loop().create_task(_ticking(marker, swallow_cancel)))
    await asyncio.sleep(0.05)
    return "left"


@defer
async def naps(log: str, key: str, seconds: float) -> str:
    begin(log, key)
    await asyncio.sleep(seconds)
    end(log)
    return key


@defer
def leaves_a_thread(marker: str, seconds: float) -> str:
    """Returns at once, leaving a thread that ticks for `seconds`."""

    def run() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tick(marker)
            time.sleep(TICK)

    threading.Thread(target=run, name="left-behind").start()
    return "left"


@defer
def sleeps(log: str, key: str, seconds: float) -> str:
    begin(log, key)
    time.sleep(seconds)
    end(log)
    return key


@defer(retry=RETRY_ONCE_NOW)
def holds_the_interpreter_first_time(log: str, key: str, seconds: int) -> str:
    """On the first run of `key`, a C call that keeps the interpreter lock for `seconds`
    (libc's sleep called through `ctypes.PyDLL`, which does not release it): no Python
    thread of the process runs meanwhile. Later runs return at once."""
    first = not starts(log, key)
    begin(log, key)
    if first:
        ctypes.PyDLL(None).sleep(seconds)
    end(log)
    return key
