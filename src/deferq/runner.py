"""Running one attempt: resolve the function, run it, turn what happened into a report.

The same steps run in a worker's child processes and in `deferq.testing`, so a value that
would fail in production fails in tests too.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import json
import logging
import mmap
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

from deferq.functions import registry
from deferq.models import AttemptOutcome, ErrorCode
from deferq.retry import RetryPolicy
from deferq.serialization import decode_arguments, encode_result
from deferq.store.base import AttemptReport, ClaimedAttempt

logger = logging.getLogger("deferq.runner")

NOT_RETRIED = frozenset({ErrorCode.RESULT_NOT_JSON.value, ErrorCode.ABORTED.value})
"""Failures the retry policy does not apply to: running again cannot change them, or the
user asked for the execution to stop."""

Raw = list[Any]
"""What running an attempt produced: ["ok", result_json] or ["error", code, message, trace]."""


def run_function(function_name: str, arguments: str, loop: asyncio.AbstractEventLoop) -> Raw:
    """Run one attempt in this process and say what happened."""
    function = registry.get(function_name)
    if function is None:
        return [
            "error",
            ErrorCode.UNKNOWN_FUNCTION.value,
            f"no background function named {function_name!r} in this worker",
            None,
        ]
    try:
        args, kwargs = decode_arguments(arguments)
        value = function.__wrapped__(*args, **kwargs)
        if asyncio.iscoroutine(value):
            try:
                value = loop.run_until_complete(value)
            finally:
                cancel_leftover_tasks(loop)
    except BaseException as exc:  # the function's failure is data, whatever it raised
        return [
            "error",
            ErrorCode.RAISED.value,
            f"{type(exc).__qualname__}: {exc}",
            traceback.format_exc(),
        ]
    try:
        return ["ok", encode_result(value, function_name=function_name)]
    except (TypeError, ValueError) as exc:
        return ["error", ErrorCode.RESULT_NOT_JSON.value, str(exc), None]


LEFTOVER_TASKS_GRACE = 1.0
"""Seconds the tasks an async attempt left behind get to end once cancelled."""


def cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks an async attempt left running on the slot's event loop and let them
    end, so none runs on during a later attempt. Those still pending after
    `LEFTOVER_TASKS_GRACE` (they swallow their cancellation) keep the loop from being run
    again: the slot replaces it."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, _ = loop.run_until_complete(asyncio.wait(tasks, timeout=LEFTOVER_TASKS_GRACE))
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit


def retry_in(claimed: ClaimedAttempt, error_code: str) -> timedelta | None:
    """How long before the next attempt, or None when the policy allows no more."""
    if claimed.retry_policy is None or error_code in NOT_RETRIED:
        return None
    policy = RetryPolicy.from_dict(json.loads(claimed.retry_policy))
    retry_number = claimed.failed_attempts + 1
    if retry_number > policy.max_retries:
        return None
    return policy.delay_before_retry(retry_number)


def report(claimed: ClaimedAttempt, raw: Raw) -> AttemptReport:
    """The report of an attempt that ran to its end."""
    if raw[0] == "ok":
        return AttemptReport(
            claimed.execution_id, claimed.number, AttemptOutcome.SUCCEEDED, result=raw[1]
        )
    return failure(claimed, raw[1], raw[2], raw[3])


def failure(
    claimed: ClaimedAttempt, error_code: str, message: str, trace: str | None = None
) -> AttemptReport:
    """The report of a failed attempt, with the retry the policy allows."""
    outcome = AttemptOutcome.ABORTED if error_code == "aborted" else AttemptOutcome.FAILED
    return AttemptReport(
        claimed.execution_id,
        claimed.number,
        outcome,
        error_code=error_code,
        error_message=message[:4000],
        traceback=trace,
        retry_in=retry_in(claimed, error_code),
    )


def interrupted(claimed: ClaimedAttempt) -> AttemptReport:
    """The report of an attempt stopped by a worker shutdown: back to `created`, no retry used."""
    return AttemptReport(
        claimed.execution_id,
        claimed.number,
        AttemptOutcome.INTERRUPTED,
        error_message="stopped by a worker shutdown; will run again",
    )


def unbegun(claimed: ClaimedAttempt, reason: str) -> AttemptReport:
    """The report of an attempt claimed but never handed to a slot: back to `created` (or
    `discarded`, past its discard_after), no retry used."""
    return AttemptReport(
        claimed.execution_id,
        claimed.number,
        AttemptOutcome.INTERRUPTED,
        error_message=f"not begun: {reason}",
    )


# The child process side


def import_modules(modules: Sequence[str]) -> None:
    """Import the modules that declare background functions, as a worker does at start."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        importlib.import_module(module)


def contact_clock() -> float:
    """Seconds on a clock that keeps counting while the process is paused (SIGSTOP) and,
    on Linux, while the machine sleeps: the store's clock, which decides when a silent
    worker is lost, keeps counting through both."""
    return time.clock_gettime(_CONTACT_CLOCK)


_CONTACT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _kill_on_parent_death() -> None:
    """Linux: have the kernel kill this process when its parent dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _die_with_parent(parent_pid: int) -> None:
    # Linux: the kernel kills this process when the worker dies, even by SIGKILL. Elsewhere,
    # and as a second guard, a thread watches the parent's pid.
    _kill_on_parent_death()

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(0.5)

    threading.Thread(target=watch, name="deferq-parent-watch", daemon=True).start()


def _guard_contact(contact: Any, fence_after: float) -> mmap.mmap:
    """Fork a guard that stops this process's attempt, and what it started, once its worker
    has had no heartbeat stored for `fence_after`; return the flag (one byte of shared
    memory) that says an attempt runs.

    The worker's own fence does the same, but cannot while the worker is paused (SIGSTOP,
    or Ctrl-Z in a terminal, which does not reach this process group) and the store may
    declare it lost and retry the attempt elsewhere. The guard is a process of its own, in
    this process group, not a thread: an attempt in a C call that keeps the interpreter
    lock stops every thread of its process. Forked before anything else runs here."""
    running = mmap.mmap(-1, 1)  # shared with the guard: anonymous maps are MAP_SHARED
    owner = os.getpid()
    if os.fork() != 0:
        return running
    try:  # the guard
        _kill_on_parent_death()
        interval = min(0.25, fence_after / 4)
        while os.getppid() == owner:
            if running[0] and contact_clock() - contact.value > fence_after:
                os.killpg(0, signal.SIGKILL)
            time.sleep(interval)
    finally:
        os._exit(0)


def child_main(
    modules: list[str],
    conn: Connection,
    parent_pid: int,
    log_level: int,
    contact: Any = None,
    fence_after: float = 0.0,
) -> None:
    """Entry point of a slot's child process: run attempts sent by the worker, one at a time.
    `contact` (shared with the worker) holds when the worker last heard from the store."""
    # Ctrl-C, and SIGTERM from service managers that signal every process of a service
    # (systemd's default), reach the whole process group: the worker decides when its
    # children stop, and stops them with SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A process group of its own, before any function runs: stopping an attempt kills the
    # group, so the subprocesses the function started die with it.
    os.setpgid(0, 0)
    running = None
    if contact is not None and fence_after > 0:
        running = _guard_contact(contact, fence_after)
    _die_with_parent(parent_pid)
    logging.basicConfig(level=log_level)
    try:
        import_modules(modules)
    except BaseException as exc:
        conn.send_bytes(json.dumps(["failed", f"{type(exc).__name__}: {exc}"]).encode())
        return
    conn.send_bytes(b'["ready"]')
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        function_name, arguments = json.loads(message)
        if running is not None:
            running[0] = 1
        raw = run_function(function_name, arguments, loop)
        if running is not None:
            running[0] = 0
        if asyncio.all_tasks(loop):
            # Tasks that ignored their cancellation would run again with the next async
            # attempt: they are left behind on a closed loop instead.
            loop.close()
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
        conn.send_bytes(json.dumps(raw).encode())
