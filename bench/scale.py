"""Indexes that hold at scale: claims and listing with a million finished executions stored.

    .venv/bin/python bench/scale.py --url postgresql://postgres@127.0.0.1:5432/deferq_scale
    .venv/bin/python bench/scale.py --url sqlite:////tmp/deferq-scale/store.sqlite3

Fills a store with `--finished` executions that ended (1,000,000) and `--queued` ones waiting
(100,000), then measures what SPEC asks to stay fast at that size: claiming, as a worker's
main loop does it, against the same claims on an empty store; listing by state, function and
metadata, first page and later pages; fetching one execution; and pruning finished ones past
a retention while a worker keeps claiming. Prints markdown tables. See bench/README.md.

The given PostgreSQL database is dropped and created again (two schemas in it: the empty
store and the loaded one); a SQLite URL names a file that must not exist yet (the empty store
goes next to it). Both are removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(ROOT))

from bench.stores import PostgresTarget  # noqa: E402
from deferq import defer  # noqa: E402
from deferq.app import App  # noqa: E402
from deferq.functions import BackgroundFunction  # noqa: E402
from deferq.models import AttemptOutcome  # noqa: E402
from deferq.retry import RetryPolicy  # noqa: E402
from deferq.store.base import (  # noqa: E402
    AttemptReport,
    ClaimedAttempt,
    ExecutionQuery,
    FunctionLimits,
    NewExecution,
    Store,
)

SLOW_MS = 100.0
"""A listing or lookup slower than this misses the target."""
CLAIM_RATIO = 1.5
"""A claim slower than the empty store's by more than this factor is flagged."""
FUNCTIONS = [f"app.jobs.task_{n:02d}" for n in range(20)]
FLOWS = ["sign-in", "sign-up", "checkout", "refund", "export", "import", "invite", "digest"]
TENANTS = 1000
WORKERS = [str(uuid.UUID(int=random.Random(n).getrandbits(128))) for n in range(8)]
RETRY_POLICY = json.dumps(RetryPolicy(3).to_dict())
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/app/jobs.py", line 118, in run\n'
    "    response = client.post(url, json=payload, timeout=10)\n"
    '  File "/srv/app/http.py", line 52, in post\n'
    "    raise UpstreamError(f'{url} answered {status}')\n"
    "app.http.UpstreamError: https://api.example.com/v2/hooks answered 503\n"
)
ENQUEUE_CHUNK = 10_000
FILL_CHUNK = 50_000


# The rows: one generator of finished executions, written by each dialect's filler


@dataclass(slots=True)
class FinishedRow:
    """One finished execution as the store would hold it after its last attempt was
    recorded; times in microseconds since the epoch."""

    id: str
    function_name: str
    state: str
    arguments: str
    metadata: dict[str, str]
    result: str | None
    created_at: int
    scheduled_for: int
    discard_after: int | None
    started_at: int | None
    finished_at: int
    attempts: int
    failed_attempts: int
    retry_policy: str | None
    error_code: str | None
    error_message: str | None
    attempt_rows: list[tuple[Any, ...]] = field(default_factory=list)
    """(execution_id, number, worker_id, started_at, finished_at, outcome, error_code,
    error_message, traceback), times in microseconds."""


def execution_id(ms: int, sequence: int, rng: random.Random) -> str:
    """An id in deferq's format (see deferq.ids) for a given millisecond."""
    rand = rng.getrandbits(62)
    value = (ms << 80) | (0x7 << 76) | ((sequence & 0xFFF) << 64) | (0b10 << 62) | rand
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def cursor_at(instant_us: int) -> str:
    """A cursor that lists executions created before `instant_us` (ids are time-ordered)."""
    return execution_id(instant_us // 1000, 0, random.Random(0))[:14] + "7000-8000-000000000000"


def pick_function(rng: random.Random) -> str:
    # Skewed: the first function gets about a fifth of the executions, the last about 2.5%.
    return FUNCTIONS[int(len(FUNCTIONS) * rng.random() ** 2)]


def pick_metadata(rng: random.Random) -> dict[str, str]:
    """Most executions carry a tenant (skewed: tenant-0000 is large, tenant-0999 small),
    half a flow, a third a request id unique to them; a fifth carry nothing."""
    if rng.random() < 0.2:
        return {}
    metadata = {"tenant": f"tenant-{int(TENANTS * rng.random() ** 2):04d}"}
    if rng.random() < 0.5:
        metadata["flow"] = rng.choice(FLOWS)
    if rng.random() < 0.3:
        metadata["request_id"] = f"req-{rng.getrandbits(64):016x}"
    return metadata


def finished_rows(n: int, start_us: int, end_us: int, seed: int) -> Iterator[FinishedRow]:
    """`n` finished executions created evenly from `start_us` to `end_us`, oldest first:
    90% succeeded, 6% failed, 2% cancelled, 1% discarded, 1% aborted."""
    rng = random.Random(seed)
    step = (end_us - start_us) / n
    for i in range(n):
        created = start_us + int(i * step)
        row_id = execution_id(created // 1000, i, rng)
        function_name = pick_function(rng)
        scheduled = created + (rng.randrange(3_600_000_000) if rng.random() < 0.05 else 0)
        discard = scheduled + 600_000_000 if rng.random() < 0.1 else None
        roll = rng.random()
        row = FinishedRow(
            id=row_id,
            function_name=function_name,
            state="succeeded",
            arguments=json.dumps([[i], {"source": "scale"}], separators=(",", ":")),
            metadata=pick_metadata(rng),
            result=None,
            created_at=created,
            scheduled_for=scheduled,
            discard_after=discard,
            started_at=None,
            finished_at=scheduled,
            attempts=0,
            failed_attempts=0,
            retry_policy=RETRY_POLICY if rng.random() < 0.3 else None,
            error_code=None,
            error_message=None,
        )
        if roll < 0.90:
            run_attempts(row, rng, rng.choice((1,) * 46 + (2, 2, 2, 3)), succeeded=True)
        elif roll < 0.96:
            run_attempts(row, rng, rng.randint(1, 4), succeeded=False)
        elif roll < 0.98:
            row.state = "cancelled"
            row.finished_at = created + rng.randrange(60_000_000)
            row.error_message = "cancelled on request"
        elif roll < 0.99:
            row.state = "discarded"
            row.discard_after = scheduled + 600_000_000
            row.finished_at = row.discard_after + rng.randrange(60_000_000)
            row.error_message = "not started before its discard_after"
        else:
            run_attempts(row, rng, 1, succeeded=False)
            row.state, row.failed_attempts = "aborted", 0
            row.error_code = "aborted"
            row.error_message = "aborted on request"
            row.attempt_rows[-1] = row.attempt_rows[-1][:5] + (
                "aborted",
                "aborted",
                "aborted by request",
                None,
            )
        yield row


def run_attempts(row: FinishedRow, rng: random.Random, count: int, succeeded: bool) -> None:
    """Attempts 1..count, each failed but the last one of a success; retries move
    scheduled_for as the store does."""
    due = row.scheduled_for
    if count > 1:
        row.retry_policy = RETRY_POLICY
    for number in range(1, count + 1):
        started = due + int(rng.expovariate(1 / 20_000)) + 500
        finished = started + int(rng.expovariate(1 / 200_000)) + 100
        last = number == count
        if last and succeeded:
            row.attempt_rows.append(
                (row.id, number, rng.choice(WORKERS), started, finished, "succeeded")
                + (None, None, None)
            )
        else:
            timeout = rng.random() < 0.1
            code = "timeout" if timeout else "raised"
            message = (
                "ran longer than its max_duration of 1800s"
                if timeout
                else "UpstreamError: https://api.example.com/v2/hooks answered 503"
            )
            row.attempt_rows.append(
                (row.id, number, rng.choice(WORKERS), started, finished, "failed", code)
                + (message, None if timeout else TRACEBACK)
            )
            row.error_code, row.error_message = code, message
        row.started_at, row.finished_at, row.scheduled_for = started, finished, due
        due = finished + 30_000_000 * int(1.5 ** (number - 1))
    row.attempts = count
    if succeeded:
        row.state, row.error_code, row.error_message = "succeeded", None, None
        row.failed_attempts = count - 1
        row.result = json.dumps({"ok": True, "items": rng.randrange(100)})
    else:
        row.state = "failed"
        row.failed_attempts = count


def now_us() -> int:
    return time.time_ns() // 1000


# The stores: the same measurements, a filler and an EXPLAIN per dialect


class Dialect:
    name = ""

    def empty_url(self) -> str:
        raise NotImplementedError

    def loaded_url(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create the place the stores live in."""

    def fill_finished(self, rows: Iterator[FinishedRow]) -> None:
        raise NotImplementedError

    def analyze(self) -> None:
        raise NotImplementedError

    def sizes(self) -> list[tuple[str, int]]:
        return []

    def explain_listing(self, query: ExecutionQuery) -> str:
        raise NotImplementedError

    def explain_claim(
        self, worker_id: str, functions: dict[str, FunctionLimits], limit: int
    ) -> str:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError


class PostgresDialect(Dialect):
    """A database of its own, with schema `scale_empty` for the empty store and
    `scale_loaded` for the loaded one. Autovacuum is off on the loaded store's tables from
    the fill to the end, so that the figure "before ANALYZE" is one and the later ones are
    not disturbed by a vacuum of a million rows arriving at a random moment."""

    name = "PostgreSQL"

    def __init__(self, url: str) -> None:
        self.target = PostgresTarget(url)
        self.url = url

    def _schema_url(self, schema: str) -> str:
        separator = "&" if "?" in self.url else "?"
        return f"{self.url}{separator}options={quote(f'-csearch_path={schema}')}"

    def empty_url(self) -> str:
        return self._schema_url("scale_empty")

    def loaded_url(self) -> str:
        return self._schema_url("scale_loaded")

    def connect(self) -> Any:
        import psycopg

        from deferq.store.postgres import conninfo_from_url

        return psycopg.connect(conninfo_from_url(self.loaded_url()), autocommit=True)

    def prepare(self) -> None:
        self.target.fresh_url()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA scale_empty")
            conn.execute("CREATE SCHEMA scale_loaded")

    def after_migrate(self) -> None:
        with self.connect() as conn:
            for table in ("deferq_executions", "deferq_attempts"):
                conn.execute(
                    f"ALTER TABLE {table} SET (autovacuum_enabled = false,"
                    " toast.autovacuum_enabled = false)"
                )

    def fill_finished(self, rows: Iterator[FinishedRow]) -> None:
        """COPY in chunks, executions and their attempts, with every index in place."""
        from psycopg.types.json import Jsonb

        def ts(value: int | None) -> datetime | None:
            return (
                None
                if value is None
                else datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)
            )

        with self.connect() as conn:
            done = False
            while not done:
                done = True
                with conn.transaction(), conn.cursor() as cursor:
                    attempts: list[tuple[Any, ...]] = []
                    with cursor.copy(
                        "COPY deferq_executions (id, function_name, state, arguments, metadata,"
                        " result, created_at, scheduled_for, discard_after, started_at,"
                        " finished_at, attempts, failed_attempts, retry_policy, max_duration,"
                        " worker_id, error_code, error_message, cron_tick)"
                        " FROM STDIN (FORMAT BINARY)"
                    ) as copy:
                        copy.set_types(
                            ["text", "text", "text", "text", "jsonb", "text"]
                            + ["timestamptz"] * 5
                            + ["int4", "int4", "text", "float8", "text", "text", "text"]
                            + ["timestamptz"]
                        )
                        for count, row in enumerate(rows, 1):
                            copy.write_row(
                                (
                                    row.id, row.function_name, row.state, row.arguments,
                                    Jsonb(row.metadata) if row.metadata else None, row.result,
                                    ts(row.created_at), ts(row.scheduled_for),
                                    ts(row.discard_after), ts(row.started_at),
                                    ts(row.finished_at), row.attempts, row.failed_attempts,
                                    row.retry_policy, 1800.0, None, row.error_code,
                                    row.error_message, None,
                                )
                            )  # fmt: skip
                            attempts += row.attempt_rows
                            if count == FILL_CHUNK:
                                done = False
                                break
                    with cursor.copy(
                        "COPY deferq_attempts (execution_id, number, worker_id, started_at,"
                        " finished_at, outcome, error_code, error_message, traceback)"
                        " FROM STDIN (FORMAT BINARY)"
                    ) as copy:
                        copy.set_types(
                            ["text", "int4", "text", "timestamptz", "timestamptz", "text"]
                            + ["text"] * 3
                        )
                        for a in attempts:
                            copy.write_row((a[0], a[1], a[2], ts(a[3]), ts(a[4]), *a[5:]))

    def analyze(self) -> None:
        with self.connect() as conn:
            conn.execute("ANALYZE deferq_executions")
            conn.execute("ANALYZE deferq_attempts")
            conn.execute("ANALYZE deferq_workers")

    def autoanalyzed(self) -> bool:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT last_autoanalyze IS NOT NULL OR last_analyze IS NOT NULL"
                " FROM pg_stat_user_tables"
                " WHERE schemaname = 'scale_loaded' AND relname = 'deferq_executions'"
            ).fetchone()
        return bool(row and row[0])

    def sizes(self) -> list[tuple[str, int]]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'scale_loaded' AND c.relkind IN ('r', 'i')"
                " AND c.relname LIKE 'deferq_%' ORDER BY c.relkind DESC, c.relname"
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def explain_listing(self, query: ExecutionQuery) -> str:
        from deferq.store.listing import build_where
        from deferq.store.postgres import _aware, _metadata_clause

        where, params = build_where(query, "%s", _aware, _metadata_clause)
        sql = f"SELECT * FROM deferq_executions WHERE {where} ORDER BY id DESC LIMIT %s"
        with self.connect() as conn:
            rows = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + sql, [*params, query.first + 1]
            ).fetchall()
        return f"{sql}\n-- params: {params}\n" + "\n".join(r[0] for r in rows)

    def explain_claim(
        self, worker_id: str, functions: dict[str, FunctionLimits], limit: int
    ) -> str:
        from deferq.store.postgres import CLAIM, _claim_params

        params = _claim_params(worker_id, functions, limit, timedelta(0))
        with self.connect() as conn:
            conn.execute("BEGIN")
            try:
                rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + CLAIM, params).fetchall()
            finally:
                conn.execute("ROLLBACK")
        return "\n".join(r[0] for r in rows)

    def server_version(self) -> str:
        return self.target.server_version()

    def cleanup(self) -> None:
        self.target.cleanup()


class SQLiteDialect(Dialect):
    """Two files: the loaded store at the given path, the empty one next to it."""

    name = "SQLite"

    def __init__(self, url: str) -> None:
        from deferq.store.sqlite import path_from_url

        self.path = Path(path_from_url(url))
        self.empty_path = self.path.with_name(self.path.stem + "-empty" + self.path.suffix)

    def empty_url(self) -> str:
        return f"sqlite:///{self.empty_path}"

    def loaded_url(self) -> str:
        return f"sqlite:///{self.path}"

    def prepare(self) -> None:
        for path in (self.path, self.empty_path):
            if path.exists():
                raise SystemExit(f"{path} exists: give the path of a new file")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def after_migrate(self) -> None:
        pass

    def connect(self) -> Any:
        import sqlite3

        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def fill_finished(self, rows: Iterator[FinishedRow]) -> None:
        """executemany in transactions of FILL_CHUNK executions, with every index in place;
        metadata also goes to the side table, as the store's enqueue writes it."""
        conn = self.connect()
        try:
            done = False
            while not done:
                done = True
                executions, attempts, metadata = [], [], []
                for count, row in enumerate(rows, 1):
                    executions.append(
                        (
                            row.id, row.function_name, row.state, row.arguments,
                            json.dumps(row.metadata, ensure_ascii=False) if row.metadata
                            else None,
                            row.result, row.created_at, row.scheduled_for, row.discard_after,
                            row.started_at, row.finished_at, row.attempts, row.failed_attempts,
                            row.retry_policy, 1800.0, None, row.error_code, row.error_message,
                            None,
                        )
                    )  # fmt: skip
                    attempts += row.attempt_rows
                    metadata += [(row.id, k, v) for k, v in row.metadata.items()]
                    if count == FILL_CHUNK:
                        done = False
                        break
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO deferq_executions VALUES"
                    " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    executions,
                )
                conn.executemany(
                    "INSERT INTO deferq_attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", attempts
                )
                conn.executemany("INSERT INTO deferq_metadata VALUES (?, ?, ?)", metadata)
                conn.execute("COMMIT")
        finally:
            conn.close()

    def analyze(self) -> None:
        conn = self.connect()
        try:
            conn.execute("ANALYZE")
        finally:
            conn.close()

    def autoanalyzed(self) -> bool:
        return False  # nothing analyzes a SQLite file unless asked; the store never does

    def sizes(self) -> list[tuple[str, int]]:
        conn = self.connect()
        try:
            rows = conn.execute(
                "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY name"
            ).fetchall()
        except Exception:  # dbstat is an optional part of SQLite
            rows = [("file", self.path.stat().st_size)]
        finally:
            conn.close()
        return [(r[0], r[1]) for r in rows if r[0].startswith(("deferq_", "file"))]

    def explain_listing(self, query: ExecutionQuery) -> str:
        from deferq.store.listing import build_where
        from deferq.store.sqlite import _metadata_clause, to_us

        where, params = build_where(query, "?", to_us, _metadata_clause)
        sql = f"SELECT * FROM deferq_executions WHERE {where} ORDER BY id DESC LIMIT ?"
        return f"{sql}\n-- params: {params}\n" + self._plan(sql, [*params, query.first + 1])

    def explain_claim(
        self, worker_id: str, functions: dict[str, FunctionLimits], limit: int
    ) -> str:
        # The reads of SQLiteStore.record_and_claim and _claim, which builds some of them.
        from deferq.store.sqlite import Q

        now = now_us()
        free = [name for name, f in functions.items() if f.concurrency is None]
        marks = ", ".join("?" * len(free))
        choose = (
            "SELECT id FROM deferq_executions INDEXED BY deferq_executions_due"
            " WHERE state = 'created' AND scheduled_for <= ?"
            " AND (discard_after IS NULL OR discard_after > ?)"
            f" AND function_name IN ({marks}) ORDER BY scheduled_for, id LIMIT ?"
        )
        choose_limited = (
            "SELECT id FROM deferq_executions INDEXED BY deferq_executions_due"
            " WHERE state = 'created' AND scheduled_for <= ?"
            " AND (discard_after IS NULL OR discard_after > ?) AND function_name = ?"
            " ORDER BY scheduled_for, id LIMIT ?"
        )
        steps: list[tuple[str, str, list[Any]]] = [("due_any", Q["due_any"], [now])]
        if free:
            steps.append(("choose", choose, [now, now, *free, limit]))
        for name, f in functions.items():
            if f.concurrency is not None:
                steps.append((f"running_count {name}", Q["running_count"], [name]))
                steps.append((f"choose {name}", choose_limited, [now, now, name, limit]))
        steps.append(("start_executions", Q["start_executions"], [now, worker_id, "[]"]))
        return "\n".join(f"{label}: {self._plan(sql, params)}" for label, sql, params in steps)

    def _plan(self, sql: str, params: Sequence[Any]) -> str:
        import sqlite3

        conn = self.connect()
        try:
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        except sqlite3.Error as exc:  # a plan is an aid: say why there is none, go on
            return f"(no plan: {exc})"
        finally:
            conn.close()
        return " | ".join(r[3] for r in rows)

    def server_version(self) -> str:
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"

    def cleanup(self) -> None:
        for base in (self.path, self.empty_path):
            for suffix in ("", "-wal", "-shm"):
                Path(f"{base}{suffix}").unlink(missing_ok=True)


# Enqueueing the waiting executions through the store's bulk path


def background_functions() -> list[BackgroundFunction[Any, Any]]:
    def job(x: int, source: str = "") -> None:
        return None

    return [defer(name=name)(job) for name in FUNCTIONS]


def enqueue_waiting(app: App, n: int, seed: int, delayed_share: float = 0.1) -> float:
    """Store `n` executions as `enqueue_many` does (`App.new_execution` for each call, then
    one `Store.enqueue` per chunk of 10,000); a tenth scheduled up to a day ahead. Returns
    executions per second."""
    rng = random.Random(seed)
    functions = {f.name: f for f in background_functions()}
    took = 0.0
    for start in range(0, n, ENQUEUE_CHUNK):
        items: list[NewExecution] = []
        for i in range(start, min(n, start + ENQUEUE_CHUNK)):
            fn = functions[pick_function(rng)]
            delay = (
                timedelta(seconds=rng.randrange(3600, 86_400))
                if rng.random() < delayed_share
                else None
            )
            fn = fn.with_call_options(metadata=pick_metadata(rng), delay=delay)
            items.append(app.new_execution(fn, (i,), {"source": "scale"}))
        began = time.perf_counter()
        app.store.enqueue(items)
        took += time.perf_counter() - began
    return n / took if took else 0.0


# Measurements


@dataclass
class Timing:
    label: str
    samples: list[float]
    """Milliseconds."""
    note: str = ""

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class ClaimFigures:
    phase: str
    single: Timing
    batch: Timing
    per_second: float
    limited: Timing
    """Batches claimed by a worker of one concurrency-limited function."""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    value = fn()
    return (time.perf_counter() - began) * 1000, value


def succeeded(claimed: Sequence[ClaimedAttempt]) -> list[AttemptReport]:
    return [
        AttemptReport(c.execution_id, c.number, AttemptOutcome.SUCCEEDED, result="null")
        for c in claimed
    ]


class Claimer:
    """A fake worker, registered as `deferq worker` registers itself, claiming through
    `record_and_claim` as its main loop does: each call stores the reports of the previous
    batch and claims the next."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.id = str(uuid.uuid4())
        self.functions = {name: FunctionLimits() for name in FUNCTIONS}
        # A worker of one concurrency-limited function (a limit too high to bind): the
        # stores count its running executions on every claim.
        self.limited = {FUNCTIONS[0]: FunctionLimits(concurrency=1_000_000)}
        store.register_worker(self.id, "scale-bench", socket.gethostname(), os.getpid())
        self.reports: list[AttemptReport] = []

    def claim(self, limit: int, limited: bool = False) -> list[ClaimedAttempt]:
        reports, self.reports = self.reports, []
        functions = self.limited if limited else self.functions
        claimed = self.store.record_and_claim(reports, self.id, functions, limit)
        self.reports = succeeded(claimed)
        return claimed

    def measure(self, phase: str, singles: int, rounds: int, batch: int) -> ClaimFigures:
        """`singles` claims of 1, `rounds` batches, then a quarter as many batches as a
        worker of one concurrency-limited function."""
        single = [timed(lambda: self.claim(1))[0] for _ in range(singles)]
        batch_ms, claimed = [], 0
        for _ in range(rounds):
            ms, got = timed(lambda: self.claim(batch))
            batch_ms.append(ms)
            claimed += len(got)
        if claimed < rounds * batch:
            raise SystemExit(f"{phase}: only {claimed} executions were due to claim")
        limited = []
        for _ in range(rounds // 4):
            ms, got = timed(lambda: self.claim(batch, limited=True))
            limited.append(ms)
            if len(got) < batch:
                raise SystemExit(f"{phase}: too few executions of {FUNCTIONS[0]} were due")
        self.flush()
        return ClaimFigures(
            phase,
            Timing("claim 1", single),
            Timing(f"record {batch} + claim {batch}", batch_ms),
            claimed / (sum(batch_ms) / 1000),
            Timing(f"record {batch} + claim {batch}, one limited function", limited),
        )

    def flush(self) -> None:
        reports, self.reports = self.reports, []
        self.store.record_attempt_reports(reports)


@dataclass
class ListingCase:
    label: str
    query: ExecutionQuery
    timing: Timing | None = None
    returned: int = 0


def listing_cases(
    store: Store, window: tuple[int, int], queued_window: tuple[int, int]
) -> list[ListingCase]:
    """The listings measured: by state, function, metadata and combined; first pages, the
    next page through the cursor, and a page from the middle (a cursor half-way back)."""
    middle = cursor_at((window[0] + window[1]) // 2)
    queued_middle = cursor_at((queued_window[0] + queued_window[1]) // 2)
    request_id = next(
        e.metadata["request_id"]
        for e in store.list_executions(ExecutionQuery(states=["succeeded"], after=middle)).items
        if "request_id" in e.metadata
    )
    q = ExecutionQuery
    common_fn, rare_fn = FUNCTIONS[0], FUNCTIONS[-1]
    big, small = "tenant-0000", f"tenant-{TENANTS - 1:04d}"
    cases = [
        ListingCase("no filter", q()),
        ListingCase("state created", q(states=["created"])),
        ListingCase("state created, page 2 (cursor)", q(states=["created"])),
        ListingCase("state created, middle (cursor)", q(states=["created"], after=queued_middle)),
        ListingCase("state succeeded", q(states=["succeeded"])),
        ListingCase("state failed", q(states=["failed"])),
        ListingCase("state failed, middle (cursor)", q(states=["failed"], after=middle)),
        ListingCase("states started + aborting", q(states=["started", "aborting"])),
        ListingCase(f"function {common_fn} (~22%)", q(functions=[common_fn])),
        ListingCase(f"function {rare_fn} (~2.5%)", q(functions=[rare_fn])),
        ListingCase(f"function {rare_fn}, middle (cursor)", q(functions=[rare_fn], after=middle)),
        ListingCase(f"metadata tenant={big} (~2.5%)", q(metadata={"tenant": big})),
        ListingCase(f"metadata tenant={small} (~0.04%)", q(metadata={"tenant": small})),
        ListingCase("metadata flow=checkout (~5%)", q(metadata={"flow": "checkout"})),
        ListingCase(
            "metadata flow=checkout, middle (cursor)",
            q(metadata={"flow": "checkout"}, after=middle),
        ),
        ListingCase("metadata request_id (1 row)", q(metadata={"request_id": request_id})),
        ListingCase(
            f"state failed + function {rare_fn}", q(states=["failed"], functions=[rare_fn])
        ),
        ListingCase(
            f"state created + tenant={big}", q(states=["created"], metadata={"tenant": big})
        ),
        ListingCase(
            f"state failed + function {common_fn} + flow=refund",
            q(states=["failed"], functions=[common_fn], metadata={"flow": "refund"}),
        ),
        ListingCase(
            f"state succeeded + tenant={small}",
            q(states=["succeeded"], metadata={"tenant": small}),
        ),
    ]
    first = store.list_executions(cases[1].query)
    cases[2].query = q(states=["created"], after=first.next_cursor)
    return cases


def measure_listing(
    store: Store, cases: list[ListingCase], runs: int, budget_s: float, ids: list[str]
) -> list[Timing]:
    """Each listing `runs` times (fewer when its runs pass `budget_s` seconds); then
    get_execution of `runs` ids."""
    for case in cases:
        samples: list[float] = []
        began = time.perf_counter()
        while len(samples) < runs and (not samples or time.perf_counter() - began < budget_s):
            ms, page = timed(lambda: store.list_executions(case.query))  # noqa: B023
            samples.append(ms)
            case.returned = len(page.items)
        case.timing = Timing(case.label, samples)
    lookups = [timed(lambda: store.get_execution(i))[0] for i in ids[:runs]]  # noqa: B023
    return [Timing("get_execution by id", lookups)]


@dataclass
class PruneFigures:
    retention: timedelta
    removed: int
    seconds: float
    during: Timing
    errors: list[str]


def measure_prune(store: Store, claimer: Claimer, retention: timedelta, batch: int) -> PruneFigures:
    """prune_finished while another thread claims a batch every 20 ms, as a busy worker
    would: how long the prune takes and what the claims see meanwhile."""
    done = threading.Event()
    during: list[float] = []
    errors: list[str] = []

    def claim_meanwhile() -> None:
        while not done.is_set():
            try:
                ms, _ = timed(lambda: claimer.claim(batch))
                if not done.is_set():
                    during.append(ms)
            except Exception as exc:  # any failure is what we report
                errors.append(f"{type(exc).__name__}: {exc}")
            done.wait(0.02)

    thread = threading.Thread(target=claim_meanwhile, name="claims-during-prune")
    thread.start()
    time.sleep(0.2)
    ms, removed = timed(lambda: store.prune_finished(retention))
    done.set()
    thread.join()
    claimer.flush()
    return PruneFigures(
        retention, removed, ms / 1000, Timing("claims during prune", during), errors
    )


# The run


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", required=True, help="postgresql://.../<database> or sqlite:///<new file>"
    )
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=14.0, help="finished ones span this far back")
    parser.add_argument(
        "--retention-days", type=float, default=7.0, help="prune_finished older than"
    )
    parser.add_argument("--batch", type=int, default=32, help="claim batch (slots 2, prefetch 64)")
    parser.add_argument("--claim-rounds", type=int, default=100, help="batches claimed per phase")
    parser.add_argument("--single-claims", type=int, default=50, help="claims of 1 per phase")
    parser.add_argument("--runs", type=int, default=20, help="runs of each listing")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per listing at most")
    parser.add_argument("--explain", action="store_true", help="print plans of slow ones")
    parser.add_argument(
        "--list-before-analyze",
        action="store_true",
        help="also list before ANALYZE (a quarter of --runs): SQLite stores are never analyzed",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="leave the stores in place")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt(ms: float) -> str:
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def claim_table(empties: list[ClaimFigures], figures: list[ClaimFigures]) -> list[str]:
    """Ratios to the mean of the empty store's batch p50, measured first and last."""
    baseline = statistics.mean(f.batch.p50 for f in empties)
    limited = statistics.mean(f.limited.p50 for f in empties)
    lines = [
        "| store | claim 1: p50 / p95 ms | record + claim batch: p50 / p95 ms | claimed/s"
        " | batch p50 vs empty | batch, worker of one limited function: p50 / p95 ms | vs empty |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in [*empties, *figures]:
        ratio, limited_ratio = f.batch.p50 / baseline, f.limited.p50 / limited
        flag = " **slow**" if ratio > CLAIM_RATIO else ""
        limited_flag = " **slow**" if limited_ratio > CLAIM_RATIO else ""
        lines.append(
            f"| {f.phase} | {fmt(f.single.p50)} / {fmt(f.single.p95)}"
            f" | {fmt(f.batch.p50)} / {fmt(f.batch.p95)} | {f.per_second:,.0f}"
            f" | {ratio:.2f}x{flag} | {fmt(f.limited.p50)} / {fmt(f.limited.p95)}"
            f" | {limited_ratio:.2f}x{limited_flag} |"
        )
    return lines


def listing_table(cases: list[ListingCase], extra: list[Timing]) -> list[str]:
    lines = ["| listing (first = 50) | rows | p50 ms | p95 ms | runs |", "|---|---|---|---|---|"]
    for case in cases:
        t = case.timing
        assert t is not None
        flag = " **over 100 ms**" if t.p95 > SLOW_MS else ""
        lines.append(
            f"| {case.label} | {case.returned} | {fmt(t.p50)} | {fmt(t.p95)}{flag}"
            f" | {len(t.samples)} |"
        )
    for t in extra:
        flag = " **over 100 ms**" if t.p95 > SLOW_MS else ""
        lines.append(f"| {t.label} | 1 | {fmt(t.p50)} | {fmt(t.p95)}{flag} | {len(t.samples)} |")
    return lines


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    dialect: PostgresDialect | SQLiteDialect
    if args.url.startswith("sqlite:"):
        dialect = SQLiteDialect(args.url)
    else:
        dialect = PostgresDialect(args.url)
    dialect.prepare()
    out: list[str] = []
    try:
        run(args, dialect, out)
    finally:
        if not args.keep:
            dialect.cleanup()
    print("\n".join(out))
    return 0


def run(args: argparse.Namespace, dialect: PostgresDialect | SQLiteDialect, out: list[str]) -> None:
    sample = (args.claim_rounds + args.claim_rounds // 4) * args.batch + args.single_claims
    phases = 3  # before ANALYZE, after, after the prune
    out += [
        f"## deferq at scale: {dialect.name}",
        "",
        f"- store: {dialect.server_version()}; {args.finished:,} finished executions over"
        f" {args.days:g} days, {args.queued:,} queued (a tenth scheduled up to a day ahead),"
        f" {len(FUNCTIONS)} functions",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]

    # The empty store: only what the claims take, claimed once now and once at the end, so
    # that the noise of a shared machine shows.
    log("empty store: enqueue and claim")
    empty = App(dialect.empty_url())
    empty.store.migrate()
    # Five times what is claimed, so that the first function (a fifth of them) has enough.
    enqueue_waiting(empty, 5 * sample, args.seed, delayed_share=0.0)
    if isinstance(dialect, PostgresDialect):
        with dialect.connect() as conn:
            conn.execute("ANALYZE scale_empty.deferq_executions")
    empty_claimer = Claimer(empty.store)
    rounds = (args.single_claims, args.claim_rounds, args.batch)
    baseline = empty_claimer.measure("empty (queued executions only)", *rounds)

    # The loaded store.
    loaded = App(dialect.loaded_url())
    loaded.store.migrate()
    dialect.after_migrate()
    end = now_us() - 60_000_000
    window = (end - int(args.days * 86_400e6), end)
    log(f"fill {args.finished:,} finished executions")
    fill_s, _ = timed(
        lambda: dialect.fill_finished(finished_rows(args.finished, *window, args.seed))
    )
    log(f"enqueue {args.queued:,} waiting executions")
    queued_from = now_us()
    queue_s, rate = timed(
        lambda: enqueue_waiting(loaded, args.queued + phases * sample, args.seed + 1)
    )
    queued_window = (queued_from, now_us())
    out += [
        f"- fill: {args.finished:,} finished executions and their attempts by COPY/executemany"
        f" in {fill_s / 1000:.0f} s; {args.queued + phases * sample:,} queued through the bulk"
        f" enqueue path in {queue_s / 1000:.0f} s ({rate:,.0f}/s in Store.enqueue); the claims"
        f" below take {phases * sample:,} of them, so {args.queued:,} stay queued",
    ]

    claimer = Claimer(loaded.store)
    figures: list[ClaimFigures] = []
    plans: list[tuple[str, str]] = []

    def claims(phase: str) -> ClaimFigures:
        log(f"claims: {phase}")
        figure = claimer.measure(phase, args.single_claims, args.claim_rounds, args.batch)
        figures.append(figure)
        if not args.explain:
            return figure
        if figure.batch.p50 > CLAIM_RATIO * baseline.batch.p50:
            plan = dialect.explain_claim(claimer.id, claimer.functions, args.batch)
            plans.append((f"claim of {args.batch}, {phase}", plan))
        if figure.limited.p50 > CLAIM_RATIO * baseline.limited.p50:
            plan = dialect.explain_claim(claimer.id, claimer.limited, args.batch)
            plans.append((f"claim of {args.batch}, one limited function, {phase}", plan))
        return figure

    store = loaded.store
    analyzed = dialect.autoanalyzed()
    claims("loaded, before ANALYZE" + (" (autovacuum had analyzed)" if analyzed else ""))
    before: list[ListingCase] = []
    if args.list_before_analyze:
        log("listing before ANALYZE")
        before = listing_cases(store, window, queued_window)
        measure_listing(store, before, max(1, args.runs // 4), args.budget, [])
    analyze_ms, _ = timed(dialect.analyze)
    out.append(f"- ANALYZE took {analyze_ms / 1000:.1f} s")
    claims("loaded, after ANALYZE")

    log("listing")
    cases = listing_cases(store, window, queued_window)
    ids = [e.id for e in store.list_executions(ExecutionQuery(first=1000)).items]
    middle = cursor_at((window[0] + window[1]) // 2)
    ids += [e.id for e in store.list_executions(ExecutionQuery(first=1000, after=middle)).items]
    ids = random.Random(args.seed).sample(ids, min(len(ids), args.runs))
    lookups = measure_listing(store, cases, args.runs, args.budget, ids)
    if args.explain:
        for case in cases:
            if case.timing is not None and case.timing.p95 > SLOW_MS:
                plans.append((f"listing: {case.label}", dialect.explain_listing(case.query)))

    log("prune")
    prune = measure_prune(store, claimer, timedelta(days=args.retention_days), args.batch)
    claims("loaded, after the prune")
    loaded.close()
    log("empty store: claim again")
    again = empty_claimer.measure("empty, again at the end", *rounds)
    empty.close()

    out += ["", "### Claims", ""]
    out += claim_table([baseline, again], figures)
    if before:
        out += ["", "### Listing before ANALYZE", ""]
        out += listing_table(before, [])
    out += ["", "### Listing and lookup (after ANALYZE)", ""]
    out += listing_table(cases, lookups)
    out += ["", "### Pruning", ""]
    out += prune_table(prune, args.retention_days)
    sizes = dialect.sizes()
    if sizes:
        out += ["", "### Sizes after the prune", "", "| relation | MB |", "|---|---|"]
        out += [f"| {name} | {size / 2**20:,.0f} |" for name, size in sizes]
    out.append(f"\n- load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if plans:
        out += ["", "### Plans of the slow ones", ""]
        for label, plan in plans:
            out += [f"{label}:", "", "```", plan, "```", ""]


def prune_table(prune: PruneFigures, retention_days: float) -> list[str]:
    during = prune.during
    meanwhile = "none completed"
    if during.samples:
        meanwhile = f"{fmt(during.p50)} / {fmt(during.p95)} / {fmt(max(during.samples))}"
    lines = [
        "| retention | removed | took s | claims meanwhile | their p50 / p95 / max ms | errors |",
        "|---|---|---|---|---|---|",
        f"| {retention_days:g} days | {prune.removed:,} | {prune.seconds:.1f}"
        f" | {len(during.samples)} | {meanwhile} | {len(prune.errors)} |",
    ]
    if prune.errors:
        lines.append(f"\nFirst error during the prune: {prune.errors[0]}")
    return lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
