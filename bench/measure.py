"""deferq's side of the benchmark: enqueue rates, processing rates, latency and memory,
measured the way the peer harness measures the peers."""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deferq
from bench import noop
from bench.procs import tree_rss

ROOT = Path(__file__).resolve().parent.parent
BULK_CHUNK = 10_000


@contextmanager
def store_app(url: str) -> Iterator[deferq.App]:
    """Point the default app, which `noop.work(...)` enqueues through, at a store."""
    app = deferq.configure(url=url)
    app.store.migrate()
    try:
        yield app
    finally:
        app.close()


# Enqueueing


def single_enqueue(url: str, n: int) -> float:
    """Executions per second stored by one caller making one call each."""
    with store_app(url):
        started = time.perf_counter()
        for i in range(n):
            noop.work(i)
        return n / (time.perf_counter() - started)


def bulk_enqueue(url: str, n: int) -> list[float]:
    """Store `n` executions with `enqueue_many` of up to 10,000 each; the rate of each call."""
    rates = []
    with store_app(url):
        for start in range(0, n, BULK_CHUNK):
            calls = [(i,) for i in range(start, min(n, start + BULK_CHUNK))]
            began = time.perf_counter()
            noop.work.enqueue_many(calls)
            rates.append(len(calls) / (time.perf_counter() - began))
    return rates


def concurrent_enqueue(url: str, n: int, threads: int) -> float:
    """Executions per second stored by `threads` callers at once, one call each."""
    per_thread = n // threads
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def caller() -> None:
        barrier.wait()
        try:
            for i in range(per_thread):
                noop.work(i)
        except BaseException as exc:
            errors.append(exc)

    with store_app(url):
        workers = [threading.Thread(target=caller) for _ in range(threads)]
        for thread in workers:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in workers:
            thread.join()
        elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} callers failed, first: {errors[0]!r}")
    return per_thread * threads / elapsed


def single_and_bare(url: str, n: int, rounds: int = 5) -> tuple[float, float]:
    """Single-call enqueue and a bare psycopg insert-and-commit loop (rows like an
    execution's, one commit each) on the same database, taking turns in `rounds` rounds so
    that both see the same load of a shared machine."""
    import psycopg

    from deferq.ids import new_execution_id

    per_round = max(1, n // rounds)
    enqueue_time = bare_time = 0.0
    sql = "INSERT INTO bench_baseline VALUES (%s, %s, 'created', %s, now(), now(), 1800)"
    with store_app(url), psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_baseline (id text PRIMARY KEY, function_name text NOT NULL,"
            " state text NOT NULL, arguments text NOT NULL, created_at timestamptz NOT NULL,"
            " scheduled_for timestamptz NOT NULL, max_duration float8 NOT NULL)"
        )
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(per_round):
                noop.work(i)
            enqueue_time += time.perf_counter() - started
            started = time.perf_counter()
            for i in range(per_round):
                conn.execute(sql, (new_execution_id(), noop.work.name, f"[[{i}],{{}}]"))
            bare_time += time.perf_counter() - started
    total = per_round * rounds
    return total / enqueue_time, total / bare_time


# Workers


@dataclass
class WorkerConfig:
    processes: int = 1
    slots: int = 2
    prefetch: int | None = None

    @property
    def flags(self) -> str:
        text = f"--slots {self.slots}"
        if self.prefetch is not None:
            text += f" --prefetch {self.prefetch}"
        return text


class Workers:
    """`deferq worker bench.noop` processes, each in a process group of its own."""

    def __init__(self, url: str, config: WorkerConfig, log_dir: Path) -> None:
        command = [sys.executable, "-m", "deferq.cli", "--url", url, "-q", "worker"]
        command += config.flags.split() + ["bench.noop"]
        self.command = command
        self.log_dir = log_dir
        self.config = config
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> Workers:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]))
        for index in range(self.config.processes):
            log = open(self.log_dir / f"worker-{index}.log", "ab")  # noqa: SIM115
            self.processes.append(
                subprocess.Popen(
                    self.command,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )
            log.close()
        return self

    def rss(self) -> tuple[int, int]:
        """Resident bytes and process count of the workers with their slots' children."""
        total = count = 0
        for process in self.processes:
            rss, processes = tree_rss(process.pid)
            total, count = total + rss, count + processes
        return total, count

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        failed = [p.returncode for p in self.processes if p.returncode not in (0, -15)]
        if failed:
            print(f"  worker exit codes {failed}; see {self.log_dir}", file=sys.stderr)


# Processing


@dataclass
class Processing:
    store: str
    config: WorkerConfig
    n: int
    processed: float = 0.0
    steady: float = 0.0
    done: int = 0
    rss_start: int = 0
    rss_end: int = 0
    process_count: int = 0
    bulk_rates: list[float] = field(default_factory=list)


def processing(
    store: str,
    url: str,
    n: int,
    config: WorkerConfig,
    redis: Any,
    log_dir: Path,
    timeout: float,
) -> Processing:
    """Fill a store with `n` executions, start the workers, and time the drain as the peer
    harness does: processed/s over the whole drain (start-up included), steady/s from the
    first tenth done to the last. A drain still running after `timeout` seconds ends there:
    the rates are those of the executions done by then."""
    result = Processing(store, config, n)
    result.bulk_rates = bulk_enqueue(url, n)
    redis.delete(noop.COUNTER)
    workers = Workers(url, config, log_dir)
    began = time.perf_counter()
    workers.start()
    try:
        _drain(result, workers, redis, began, timeout)
    finally:
        workers.stop()
    return result


def _drain(result: Processing, workers: Workers, redis: Any, began: float, timeout: float) -> None:
    n = result.n
    first = n // 10
    t_first = None
    done = done_first = 0
    deadline = began + timeout
    while done < n and time.perf_counter() < deadline:
        time.sleep(0.005)
        done = int(redis.get(noop.COUNTER) or 0)
        if t_first is None and done >= first:
            t_first, done_first = time.perf_counter(), done
            result.rss_start, _ = workers.rss()
    t_end = time.perf_counter()
    result.rss_end, result.process_count = workers.rss()
    result.done = done
    result.processed = done / (t_end - began)
    if t_first is not None and t_end > t_first:
        result.steady = (done - done_first) / (t_end - t_first)


# Latency


@dataclass
class Latency:
    store: str
    flags: str
    count: int
    to_started_at: list[float]
    to_running: list[float]

    @staticmethod
    def percentile(values: list[float], fraction: float) -> float:
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


def latency(store: str, url: str, count: int, pause: float, redis: Any, log_dir: Path) -> Latency:
    """Enqueue one execution at a time to an idle worker, pausing between calls; for each,
    the time from the call to its attempt's `started_at`, and to the function running."""
    config = WorkerConfig()
    workers = Workers(url, config, log_dir)
    redis.delete(noop.LATENCIES)
    sent: list[tuple[str, float]] = []
    with store_app(url) as app:
        workers.start()
        try:
            noop.stamp(time.time())  # the first one waits for the worker to start
            _wait_for_stamps(redis, 1, 60.0)
            redis.delete(noop.LATENCIES)
            for _ in range(count):
                time.sleep(pause * random.uniform(0.5, 1.5))
                sent_at = time.time()
                sent.append((noop.stamp(sent_at).id, sent_at))
            _wait_for_stamps(redis, count, 60.0)
        finally:
            workers.stop()
        to_running = [float(v) for v in redis.lrange(noop.LATENCIES, 0, -1)]
        to_started_at = []
        for execution_id, sent_at in sent:
            started_at = app.get_execution(execution_id).started_at
            if started_at is not None:
                to_started_at.append(started_at.timestamp() - sent_at)
    return Latency(store, config.flags, count, sorted(to_started_at), sorted(to_running))


def _wait_for_stamps(redis: Any, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while redis.llen(noop.LATENCIES) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker ran fewer than {count} stamps in {timeout:g}s")
        time.sleep(0.01)
