"""Background functions for lifecycle and worker tests: each leaves a trace in a file, so a
test can count runs across processes and hold an attempt open until it says so."""

from __future__ import annotations

import os
import time
from pathlib import Path

from deferq import RetryPolicy, defer


@defer
def record_run(path: str, token: str) -> str:
    """Append `token pid` to a file: one line per run, whichever process ran it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{token} {os.getpid()}\n")
    return token


@defer(max_duration="60s")
def wait_for_file(path: str) -> str:
    """Run until `path` exists, so a test can look at a started execution."""
    while not Path(path).exists():
        time.sleep(0.01)
    return Path(path).read_text(encoding="utf-8")


@defer(retry=RetryPolicy(3, initial_interval=0, randomization_factor=0))
def fail_then_succeed(path: str, failures: int) -> int:
    """Fail the first `failures` runs (counted in a file), then return the run number."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("run\n")
    runs = len(Path(path).read_text(encoding="utf-8").splitlines())
    if runs <= failures:
        raise RuntimeError(f"planned failure {runs} of {failures}")
    return runs


@defer(retry=RetryPolicy(3, initial_interval="10s", randomization_factor=0))
def fails_with_slow_retry(path: str) -> None:
    """Always fail; the next retry would start 10 seconds later."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("run\n")
    raise RuntimeError("fails every time")
