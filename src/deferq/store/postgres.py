"""The PostgreSQL store: many workers on many machines share one database.

The database clock decides what is due, what has expired and which worker is lost. Claims
take rows with `FOR UPDATE SKIP LOCKED`; a concurrency-limited function is claimed under an
advisory lock of its own. Enqueueing notifies listening workers (LISTEN/NOTIFY), so an idle
worker starts new work without polling.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from deferq.errors import (
    ConfigurationError,
    ExecutionNotCancellable,
    ExecutionNotFound,
    ExecutionNotReschedulable,
)
from deferq.models import Attempt, AttemptOutcome, Execution, ExecutionState, Page, Schedule
from deferq.store.base import (
    AttemptReport,
    ClaimedAttempt,
    ExecutionQuery,
    FunctionLimits,
    NewExecution,
    Store,
    StoreUnavailable,
    Watcher,
    When,
    load_migrations,
    load_queries,
)
from deferq.store.listing import build_where, validate_query

logger = logging.getLogger("deferq.store")

Q = load_queries("postgres")
MIGRATION_LOCK = 0x64656665_7271  # "deferq": serializes migrations in one database
POOL_SIZE = 8


def _split(when: When | None) -> tuple[datetime | None, float | None]:
    """(absolute, relative seconds) for a query's coalesce(at, now() + in)."""
    if when is None:
        return None, None
    if isinstance(when, timedelta):
        return None, when.total_seconds()
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got naive {when.isoformat()!r}")
    return when, None


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def conninfo_from_url(url: str) -> str:
    """psycopg takes postgresql:// URLs as they are; `postgres://` is accepted too."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "application_name"]
    query.append(("application_name", "deferq"))
    return urlunsplit(parts._replace(query=urlencode(query)))


class PostgresStore(Store):
    """A store in a PostgreSQL database (psycopg 3, a small connection pool per process)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conninfo = conninfo_from_url(url)
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()
        self._migrated = False
        self.channel = "deferq"

    # Connections

    @property
    def pool(self) -> ConnectionPool:
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ConnectionPool(
                        self.conninfo,
                        min_size=1,
                        max_size=POOL_SIZE,
                        kwargs={"autocommit": True, "prepare_threshold": 2},
                        configure=_configure,
                        open=True,
                        timeout=30,
                        name="deferq",
                    )
                pool = self._pool
            if not self._migrated:
                self.migrate()
        return pool

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        pool = self.pool
        try:
            with pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            pool.check()  # let the pool replace connections the server dropped
            raise StoreUnavailable(f"PostgreSQL store unavailable: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self._conn() as conn, conn.transaction():
            yield conn

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def migrate(self) -> None:
        if self._migrated:
            return
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                _configure(conn)
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS deferq_migrations ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    row = conn.execute("SELECT max(version) FROM deferq_migrations").fetchone()
                    current = (row[0] if row else None) or 0
                    for number, name, sql in load_migrations("postgres"):
                        if number <= current:
                            continue
                        logger.info(
                            "Applying migration",
                            extra={"action": "apply_migration", "migration": name},
                        )
                        conn.execute(sql)
                        conn.execute(
                            "INSERT INTO deferq_migrations (version, name) VALUES (%s, %s)",
                            (number, name),
                        )
                schema = conn.execute("SELECT current_schema()").fetchone()
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL store unavailable: {exc}") from exc
        if schema and schema[0] != "public":
            self.channel = f"deferq_{schema[0]}"
        self._migrated = True

    def now(self) -> datetime:
        with self._conn() as conn:
            row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0].astimezone(UTC)

    # Callers' side

    def enqueue(self, items: Sequence[NewExecution], connection: Any = None) -> list[Execution]:
        if connection is not None:
            if not isinstance(connection, psycopg.Connection):
                raise ConfigurationError(
                    f"expected a psycopg connection to enqueue in, got {connection!r}"
                )
            _ = self.pool  # the schema must exist
            return self._enqueue(connection, items)
        if len(items) == 1:
            with self._conn() as conn:
                return self._enqueue(conn, items)
        with self._transaction() as conn:
            return self._enqueue(conn, items)

    def _enqueue(
        self, conn: psycopg.Connection[Any], items: Sequence[NewExecution]
    ) -> list[Execution]:
        if len(items) == 1:
            item = items[0]
            row = conn.execute(Q["insert_execution"], self._insert_params(item)).fetchone()
            assert row is not None
            return [_new_execution(item, *row[:3])]
        rows = conn.execute(
            Q["insert_executions"],
            {
                "ids": [i.id for i in items],
                "functions": [i.function_name for i in items],
                "arguments": [i.arguments for i in items],
                "metadata": [_metadata_json(i.metadata) for i in items],
                "scheduled_at": [_split(i.scheduled)[0] for i in items],
                "scheduled_in": [_split(i.scheduled)[1] for i in items],
                "discard_at": [_split(i.discard)[0] for i in items],
                "discard_in": [_split(i.discard)[1] for i in items],
                "retry_policies": [i.retry_policy for i in items],
                "max_durations": [i.max_duration for i in items],
            },
        ).fetchall()
        conn.execute(Q["notify"], {"channel": self.channel})
        times = {r[0]: r[1:] for r in rows}
        return [_new_execution(i, *times[i.id]) for i in items]

    def _insert_params(self, item: NewExecution) -> dict[str, Any]:
        scheduled_at, scheduled_in = _split(item.scheduled)
        discard_at, discard_in = _split(item.discard)
        return {
            "id": item.id,
            "function_name": item.function_name,
            "arguments": item.arguments,
            "metadata": _metadata_json(item.metadata),
            "scheduled_at": scheduled_at,
            "scheduled_in": scheduled_in,
            "discard_at": discard_at,
            "discard_in": discard_in,
            "retry_policy": item.retry_policy,
            "max_duration": item.max_duration,
            "cron_tick": item.cron_tick,
            "channel": self.channel,
        }

    def sync_schedule(
        self,
        function_name: str,
        expression: str,
        timezone: str,
        next_tick: datetime | None,
        now: datetime,
    ) -> tuple[datetime, datetime | None]:
        with self._conn() as conn:
            row = conn.execute(
                Q["upsert_schedule"],
                {
                    "name": function_name,
                    "expression": expression,
                    "timezone": timezone,
                    "now": now,
                    "next_tick": next_tick,
                },
            ).fetchone()
        assert row is not None
        return row[0].astimezone(UTC), _utc(row[1])

    def insert_cron_execution(self, item: NewExecution, next_tick: datetime | None) -> bool:
        assert item.cron_tick is not None
        scheduled_at, scheduled_in = _split(item.scheduled)
        with self._transaction() as conn:
            cursor = conn.execute(
                Q["insert_cron_execution"],
                {
                    "id": item.id,
                    "function_name": item.function_name,
                    "arguments": item.arguments,
                    "scheduled_at": scheduled_at or item.cron_tick,
                    "retry_policy": item.retry_policy,
                    "max_duration": item.max_duration,
                    "cron_tick": item.cron_tick,
                },
            )
            conn.execute(
                Q["set_last_tick"],
                {"name": item.function_name, "tick": item.cron_tick, "next_tick": next_tick},
            )
            inserted = cursor.rowcount == 1
            if inserted:
                conn.execute(Q["notify"], {"channel": self.channel})
        return inserted

    def list_schedules(self) -> list[Schedule]:
        with self._conn() as conn, conn.cursor(row_factory=dict_row) as cursor:
            rows = cursor.execute(Q["list_schedules"]).fetchall()
        return [
            Schedule(
                function_name=r["function_name"],
                expression=r["expression"],
                timezone=r["timezone"],
                last_tick=_utc(r["last_tick"]),
                next_tick=_utc(r["next_tick"]),
                seen_at=r["seen_at"].astimezone(UTC),
            )
            for r in rows
        ]

    def get_execution(self, execution_id: str) -> Execution | None:
        row = self._one(Q["get_execution"], {"id": execution_id})
        return None if row is None else _row_to_execution(row)

    def get_result(self, execution_id: str) -> tuple[Execution, str | None] | None:
        row = self._one(Q["get_execution"], {"id": execution_id})
        return None if row is None else (_row_to_execution(row), row["result"])

    def _one(self, sql: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
        with self._conn() as conn, conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(sql, params).fetchone()

    def list_executions(self, query: ExecutionQuery) -> Page:
        validate_query(query)
        where, params = build_where(query, "%s", _aware, _metadata_clause)
        sql = f"SELECT * FROM deferq_executions WHERE {where} ORDER BY id DESC LIMIT %s"
        with self._conn() as conn, conn.cursor(row_factory=dict_row) as cursor:
            rows = cursor.execute(sql, [*params, query.first + 1]).fetchall()
        items = [_row_to_execution(r) for r in rows[: query.first]]
        next_cursor = items[-1].id if len(rows) > query.first else None
        return Page(items=items, next_cursor=next_cursor)

    def list_attempts(self, execution_id: str) -> list[Attempt]:
        with self._conn() as conn, conn.cursor(row_factory=dict_row) as cursor:
            rows = cursor.execute(Q["list_attempts"], {"id": execution_id}).fetchall()
        return [_row_to_attempt(r) for r in rows]

    def cancel_execution(self, execution_id: str, force: bool) -> Execution:
        row = self._one(Q["cancel_execution"], {"id": execution_id, "force": force})
        if row is None:
            raise ExecutionNotFound(execution_id)
        execution = _row_to_execution(row)
        # A second cancel or abort of the same execution answers with it, changing nothing.
        allowed = {ExecutionState.CANCELLED}
        if force:
            allowed.add(ExecutionState.ABORTING)
        if execution.state not in allowed:
            raise ExecutionNotCancellable(execution)
        return execution

    def reschedule_execution(self, execution_id: str, when: When) -> Execution:
        at, seconds = _split(when)
        row = self._one(Q["reschedule"], {"id": execution_id, "at": at, "in": seconds})
        if row is None:
            raise ExecutionNotFound(execution_id)
        execution = _row_to_execution(row)
        if execution.state != ExecutionState.CREATED:
            raise ExecutionNotReschedulable(execution)
        with self._conn() as conn:
            conn.execute(Q["notify"], {"channel": self.channel})
        return execution

    # Workers' side

    def register_worker(self, worker_id: str, name: str, host: str, pid: int) -> None:
        with self._conn() as conn:
            conn.execute(
                Q["register_worker"], {"id": worker_id, "name": name, "host": host, "pid": pid}
            )

    def heartbeat(self, worker_id: str) -> bool:
        with self._conn() as conn:
            return conn.execute(Q["heartbeat"], {"id": worker_id}).rowcount == 1

    def unregister_worker(self, worker_id: str) -> None:
        with self._conn() as conn:
            conn.execute(Q["unregister_worker"], {"id": worker_id})

    def claim_due_executions(
        self,
        worker_id: str,
        functions: Mapping[str, FunctionLimits],
        limit: int,
        horizon: timedelta = timedelta(0),
    ) -> list[ClaimedAttempt]:
        return self.record_and_claim((), worker_id, functions, limit, horizon)

    def record_and_claim(
        self,
        reports: Sequence[AttemptReport],
        worker_id: str,
        functions: Mapping[str, FunctionLimits],
        limit: int,
        horizon: timedelta = timedelta(0),
    ) -> list[ClaimedAttempt]:
        """Record finished attempts and claim new ones in one transaction."""
        if limit <= 0 or not functions:
            limit = 0
        if not reports and not limit:
            return []
        with self._transaction() as conn:
            if reports:
                self._record(conn, reports)
            if not limit:
                return []
            return self._claim(conn, worker_id, functions, limit, horizon.total_seconds())

    def _claim(
        self,
        conn: psycopg.Connection[Any],
        worker_id: str,
        functions: Mapping[str, FunctionLimits],
        limit: int,
        horizon: float,
    ) -> list[ClaimedAttempt]:
        free = [name for name, f in functions.items() if f.concurrency is None]
        rows: list[tuple[Any, ...]] = []
        if free:
            rows += conn.execute(
                Q["claim"],
                {
                    "functions": free,
                    "limit": limit,
                    "worker": worker_id,
                    "horizon": horizon,
                },
            ).fetchall()
        for name, limits in functions.items():
            if limits.concurrency is None or len(rows) >= limit:
                continue
            rows += self._claim_limited(conn, worker_id, name, limits, limit - len(rows), horizon)
        return [_claimed(r) for r in rows]

    def _claim_limited(
        self,
        conn: psycopg.Connection[Any],
        worker_id: str,
        name: str,
        limits: FunctionLimits,
        room: int,
        horizon: float,
    ) -> list[tuple[Any, ...]]:
        """Claim what fits a concurrency-limited function's free places, under its lock; with
        the "cancel" action, cancel the due ones beyond the free places of the whole store."""
        assert limits.concurrency is not None
        conn.execute(Q["lock_function"], {"name": name})
        count = conn.execute(Q["running_count"], {"name": name}).fetchone()
        available = max(0, limits.concurrency - (count[0] if count else 0))
        take = min(available, room)
        rows: list[tuple[Any, ...]] = []
        if take:
            rows = conn.execute(
                Q["claim"],
                {"functions": [name], "limit": take, "worker": worker_id, "horizon": horizon},
            ).fetchall()
        if limits.cancel_when_limited:
            conn.execute(
                Q["cancel_limited"],
                {
                    "name": name,
                    "keep": available - len(rows),
                    "reason": f"concurrency limit of {limits.concurrency} reached",
                },
            )
        return rows

    def record_attempt_reports(self, reports: Sequence[AttemptReport]) -> None:
        if reports:
            with self._transaction() as conn:
                self._record(conn, reports)

    def _record(self, conn: psycopg.Connection[Any], reports: Sequence[AttemptReport]) -> None:
        with conn.cursor() as cursor:
            cursor.executemany(Q["finish_execution"], [_finish_params(r) for r in reports])
            cursor.executemany(
                Q["finish_attempt"],
                [
                    {
                        "outcome": r.outcome.value,
                        "error_code": r.error_code,
                        "error_message": r.error_message,
                        "traceback": r.traceback,
                        "id": r.execution_id,
                        "number": r.number,
                    }
                    for r in reports
                ],
            )
        if any(r.outcome != AttemptOutcome.SUCCEEDED for r in reports):
            conn.execute(Q["notify"], {"channel": self.channel})  # retries may be due

    def aborting_executions(self, worker_id: str) -> list[str]:
        with self._conn() as conn:
            rows = conn.execute(Q["aborting_executions"], {"worker": worker_id}).fetchall()
        return [r[0] for r in rows]

    def discard_expired(self) -> int:
        with self._conn() as conn:
            return conn.execute(Q["discard_expired"]).rowcount

    def declare_lost_workers(self, lost_after: timedelta) -> list[ClaimedAttempt]:
        with self._transaction() as conn:
            lost = [
                r[0]
                for r in conn.execute(
                    Q["declare_lost_workers"], {"lost_after": lost_after.total_seconds()}
                ).fetchall()
            ]
            rows = []
            if lost:
                rows = conn.execute(Q["running_of_workers"], {"workers": lost}).fetchall()
        if lost:
            logger.warning(
                "Declared workers lost",
                extra={
                    "action": "declare_workers_lost",
                    "workers": lost,
                    "attempts": len(rows),
                },
            )
        return [_claimed(r) for r in rows]

    def next_due_in(self) -> timedelta | None:
        with self._conn() as conn:
            row = conn.execute(Q["next_due"]).fetchone()
        if row is None or row[0] is None:
            return None
        return timedelta(seconds=max(0.0, float(row[0])))

    def prune_finished(self, older_than: timedelta) -> int:
        with self._conn() as conn:
            row = conn.execute(
                Q["prune_finished"], {"older_than": older_than.total_seconds()}
            ).fetchone()
        return int(row[0]) if row else 0

    def watch(self) -> Watcher:
        _ = self.pool  # the schema and channel must be known
        return _ListenWatcher(self)


class _ListenWatcher(Watcher):
    """LISTENs on the store's channel on a connection of its own; its socket becomes
    readable when an execution is enqueued, rescheduled or returned for a retry. If that
    connection breaks, it falls back to polling and tries to listen again."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.conn: psycopg.Connection[Any] | None = None
        self._listen()

    def _listen(self) -> None:
        try:
            conn = psycopg.connect(self.store.conninfo, autocommit=True)
            conn.execute(f'LISTEN "{self.store.channel}"')
        except psycopg.OperationalError:
            self.conn = None
            self.poll_interval = 0.5
            return
        self.conn = conn
        self.poll_interval = None

    def fileno(self) -> int | None:
        return None if self.conn is None else self.conn.pgconn.socket

    def changed(self) -> bool:
        if self.conn is None:
            self._listen()
            return True
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError:
            self.close()
            self.poll_interval = 0.5
            return True
        news = False
        while pgconn.notifies() is not None:
            news = True
        return news

    def close(self) -> None:
        if self.conn is not None:
            with suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET TIME ZONE 'UTC'")


def _aware(instant: datetime) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got naive {instant.isoformat()!r}")
    return instant


def _metadata_json(metadata: Mapping[str, str]) -> str | None:
    return json.dumps(dict(metadata), ensure_ascii=False) if metadata else None


def _metadata_clause(key: str, values: list[str]) -> tuple[str, list[Any]]:
    # One containment test per value, so the GIN index answers each.
    tests = " OR ".join(["metadata @> %s::jsonb"] * len(values))
    return f"({tests})", [json.dumps({key: v}, ensure_ascii=False) for v in values]


def _claimed(row: Sequence[Any]) -> ClaimedAttempt:
    """A claimed attempt from the columns the claim and lost-worker queries return."""
    return ClaimedAttempt(
        execution_id=row[0],
        function_name=row[1],
        arguments=row[2],
        number=row[3],
        failed_attempts=row[4],
        retry_policy=row[5],
        max_duration=row[6],
        discard_after=_utc(row[7]),
        started_at=row[8].astimezone(UTC),
    )


def _finish_params(report: AttemptReport) -> dict[str, Any]:
    outcome = report.outcome
    retry_in = None if report.retry_in is None else report.retry_in.total_seconds()
    if outcome == AttemptOutcome.INTERRUPTED:
        retry_in = 0.0
    return {
        "retry_in": retry_in,
        "state": {
            AttemptOutcome.SUCCEEDED: "succeeded",
            AttemptOutcome.FAILED: "failed",
            AttemptOutcome.ABORTED: "aborted",
            AttemptOutcome.INTERRUPTED: "created",
        }[outcome],
        "result": report.result,
        "error_code": report.error_code,
        "error_message": report.error_message,
        "counts_as_failure": 1 if outcome == AttemptOutcome.FAILED else 0,
        "id": report.execution_id,
        "number": report.number,
    }


def _new_execution(
    item: NewExecution, created: datetime, scheduled: datetime, discard: datetime | None
) -> Execution:
    return Execution(
        id=item.id,
        function_name=item.function_name,
        state=ExecutionState.CREATED,
        created_at=created.astimezone(UTC),
        scheduled_for=scheduled.astimezone(UTC),
        discard_after=_utc(discard),
        metadata=dict(item.metadata),
        arguments_json=item.arguments,
        cron_tick=item.cron_tick,
        max_duration=item.max_duration,
        retry_policy_json=item.retry_policy,
    )


def _row_to_execution(row: Mapping[str, Any]) -> Execution:
    return Execution(
        id=row["id"],
        function_name=row["function_name"],
        state=ExecutionState(row["state"]),
        created_at=row["created_at"].astimezone(UTC),
        scheduled_for=row["scheduled_for"].astimezone(UTC),
        discard_after=_utc(row["discard_after"]),
        started_at=_utc(row["started_at"]),
        finished_at=_utc(row["finished_at"]),
        attempts=row["attempts"],
        metadata=row["metadata"] or {},
        error_code=row["error_code"],
        error_message=row["error_message"],
        arguments_json=row["arguments"],
        cron_tick=_utc(row["cron_tick"]),
        max_duration=row["max_duration"],
        retry_policy_json=row["retry_policy"],
    )


def _row_to_attempt(row: Mapping[str, Any]) -> Attempt:
    return Attempt(
        execution_id=row["execution_id"],
        number=row["number"],
        started_at=row["started_at"].astimezone(UTC),
        finished_at=_utc(row["finished_at"]),
        worker=row["worker_id"],
        outcome=AttemptOutcome(row["outcome"]),
        error_code=row["error_code"],
        error_message=row["error_message"],
        traceback=row["traceback"],
    )
