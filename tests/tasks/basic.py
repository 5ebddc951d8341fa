"""Background functions used by the worker tests."""

from __future__ import annotations

import asyncio
import os
import time

from deferq import RetryPolicy, defer


@defer
def add(a: int, b: int) -> int:
    return a + b


@defer
async def add_async(a: int, b: int) -> int:
    await asyncio.sleep(0.001)
    return a + b


@defer
def echo(value: object) -> object:
    return value


@defer
def record_pid(path: str) -> int:
    """Append this process's pid to a file: counts runs across processes."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


@defer(retry=RetryPolicy(2, initial_interval=0, randomization_factor=0))
def always_fails(message: str) -> None:
    raise RuntimeError(message)


@defer
def returns_set() -> object:
    return {1, 2}


@defer(max_duration="1s")
def sleeps_forever() -> None:
    time.sleep(3600)


@defer
def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
