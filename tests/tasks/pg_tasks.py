"""Background functions of the PostgreSQL worker tests (tests/test_postgres.py)."""

from __future__ import annotations

import os
import time

from deferq import defer


@defer
def note(directory: str, i: int) -> int:
    """Append `i` to a file named after this process: the files show every run."""
    with open(os.path.join(directory, str(os.getpid())), "a", encoding="utf-8") as f:
        f.write(f"{i}\n")
    return i


@defer
def pause(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@defer
def echo(value: object) -> object:
    return value


@defer(concurrency=2)
def limited(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@defer
def slow_note(directory: str, i: int, seconds: float) -> int:
    """`note` after a pause: attempts are running when the store goes away."""
    time.sleep(seconds)
    return note.__wrapped__(directory, i)
