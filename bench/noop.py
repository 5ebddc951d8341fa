"""The background functions the benchmark runs.

`work` is the peers' no-op job: it increments a Redis counter, so completion is counted the
same way for deferq as for every peer. `stamp` records how long after its call it began to
run, on the caller's clock (`time.time()`, one machine), for the latency measurement.
"""

from __future__ import annotations

import time

from bench.redis_client import connect
from deferq import defer

COUNTER = "deferq-bench:done"
LATENCIES = "deferq-bench:latency"

redis = connect()


@defer(name="bench.noop.work")
def work(x: int) -> int:
    redis.incr(COUNTER)
    return x + 1


@defer(name="bench.noop.stamp")
def stamp(sent_at: float) -> None:
    redis.rpush(LATENCIES, repr(time.time() - sent_at))
