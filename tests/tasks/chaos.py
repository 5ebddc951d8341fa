"""Background functions of the chaos test: a mix of fast, slow, failing, timing out,
concurrency-limited and abortable work. Each returns its `i` so results can be checked."""

from __future__ import annotations

import asyncio
import time

from deferq import RetryPolicy, defer

RETRY = RetryPolicy(2, initial_interval=0, randomization_factor=0)
RETRY_ONCE = RetryPolicy(1, initial_interval=0, randomization_factor=0)


@defer(retry=RETRY)
def fast(i: int) -> int:
    return i


@defer(retry=RETRY)
async def fast_async(i: int) -> int:
    await asyncio.sleep(0)
    return i


@defer
def fast_no_retry(i: int) -> int:
    return i


@defer(retry=RETRY)
def slow(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


@defer(retry=RETRY)
def failing(i: int) -> int:
    raise RuntimeError(f"failing {i}")


@defer(retry=RETRY)
def bad_result(i: int) -> object:
    return {i}  # a set is not JSON: result_not_json, which no retry can change


@defer(max_duration="500ms", retry=RETRY_ONCE)
def times_out(i: int) -> int:
    time.sleep(3600)
    return i


@defer(concurrency=2, retry=RETRY)
def limited(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


@defer(concurrency=1, max_concurrency_action="cancel", retry=RETRY)
def limited_or_cancelled(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


@defer(retry=RETRY)
def abortable(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i
