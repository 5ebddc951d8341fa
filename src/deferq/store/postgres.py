"""The PostgreSQL store: many workers on many machines share one database.

The database clock decides what is due, what has expired and which worker is lost: callers
hand relative times to the database, which adds them to its `now()`. Claims take rows with
`FOR UPDATE SKIP LOCKED`, in batches, in one statement; a concurrency-limited function is
claimed under an advisory lock of its own. Enqueueing sends NOTIFY in the same statement, so
a worker waiting on its LISTEN connection starts new work without polling.

Connections come from a small pool of this module's own: a connection is taken by one call
at a time, checked for news from the server (a restart, a terminated backend) without a
round trip, and given back. The single-call enqueue, the hottest path, runs a statement
prepared once per connection straight through libpq: one round trip, one commit.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import secrets
import select
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

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
from deferq.store.listing import listing_sql, validate_query

logger = logging.getLogger("deferq.store")

Q = load_queries("postgres")
RECORD = f"WITH {Q['record_ctes']}\n{Q['record_result']}"
CLAIM = f"WITH {Q['claim_ctes']}\n{Q['claim_result']}"
RECORD_AND_CLAIM = f"WITH {Q['record_ctes']},\n{Q['claim_ctes']}\n{Q['claim_result']}"

MIGRATION_LOCK = 0x64656665_7271  # "deferq": one migrating process at a time per database
MAX_IDLE_CONNECTIONS = 16
"""Connections a process keeps open between calls; more are opened while more calls run at
once, and closed when they end."""
LISTEN_RETRY_SECONDS = 1.0
"""How often a worker whose LISTEN connection broke tries to listen again."""
FALLBACK_POLL_SECONDS = 0.25
"""How often a worker without a LISTEN connection looks for new work."""
CLAIM_READ_BACK_SECONDS = 5.0
"""How long reading back a claim whose answer was lost waits for the server process that ran
it to be gone; past it, the claim stays in doubt and the next claim of the worker asks again."""

KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
    "connect_timeout": "10",
}
"""libpq parameters of every connection the store opens, unless the URL sets them: a server
that vanished without a reset is noticed after about 25 s of silence while waiting for an
answer, and after 30 s of unacknowledged sending; a connection not open after 10 s (a server
that accepts but never answers, a lost SYN) is given up, where psycopg would wait 130 s."""
SESSION_SETTINGS = {
    "statement_timeout": "30s",
    "idle_in_transaction_session_timeout": "10s",
}
"""Server settings of every session the store opens, unless the URL's `options` set them. The
store's own statements are short; the few that are not (bulk enqueue, migrations, the discard
and prune sweeps) lift the statement timeout for their own transaction. A session left idle
in a transaction by a worker that vanished is ended, and the advisory locks it held (a
concurrency-limited function's) are freed for other workers. A LISTEN connection waits
outside any statement and transaction, and neither setting touches it."""
CLAIM_SETTINGS = "-c enable_bitmapscan=off"
"""Server settings of the connections that claim. Every part of a claim is an ordered walk
of an index or a lookup by key; a bitmap scan never helps it. Before the table is analyzed
(after a bulk enqueue, until autovacuum comes) the planner believes few executions are due,
and would gather every due one through a bitmap scan and sort them all: 8 ms a claim with
20,000 due, seconds with a million, instead of a fraction of a millisecond. Set on
connections of their own, so that listing (whose metadata filters need bitmap scans) is not
touched, and a claim stays one statement."""
_OPTION_NAME = re.compile(r"(?:^|\s)(?:-c\s*|--)([A-Za-z_.]+)=")

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_INT8 = struct.Struct(">q")
_INSERT_ONE = b"deferq_insert_execution"
_INSERT_ONE_SQL = Q["insert_execution"].encode()
_IDLE = pq.TransactionStatus.IDLE
_COPY_TYPES = [
    "text", "text", "text", "text", "jsonb", "timestamptz", "timestamptz", "timestamptz",
    "text", "float8", "timestamptz",
]  # fmt: skip
_STATES = {
    AttemptOutcome.SUCCEEDED: "succeeded",
    AttemptOutcome.FAILED: "failed",
    AttemptOutcome.ABORTED: "aborted",
    AttemptOutcome.INTERRUPTED: "created",
}


def conninfo_from_url(url: str) -> str:
    """The libpq connection string of a store URL (`postgresql://` or `postgres://`), with
    the session settings the store relies on (UTF-8 text, UTC times) and its defaults for
    keepalives and timeouts, which the URL's own parameters and `options` override."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"invalid PostgreSQL store URL: {exc}") from exc
    # libpq would read PGOPTIONS, but only without `options`
    options = str(params.get("options", os.environ.get("PGOPTIONS", "")))
    chosen = {name.lower() for name in _OPTION_NAME.findall(options)}
    defaults = [f"-c {k}={v}" for k, v in SESSION_SETTINGS.items() if k not in chosen]
    params["options"] = " ".join([options, *defaults, "-c TimeZone=UTC"]).strip()
    params["client_encoding"] = "UTF8"
    params.setdefault("application_name", "deferq")
    for name, value in KEEPALIVES.items():
        if name == "connect_timeout" and os.environ.get("PGCONNECT_TIMEOUT"):
            continue  # libpq reads it when the connection string has none
        params.setdefault(name, value)
    return make_conninfo("", **params)


def claim_conninfo(conninfo: str) -> str:
    """The connection string of the connections that claim: `conninfo` with
    `CLAIM_SETTINGS` (the URL's own `options` still win)."""
    params = conninfo_to_dict(conninfo)
    params["options"] = f"{CLAIM_SETTINGS} {params.get('options', '')}".strip()
    return make_conninfo("", **params)


def _micros(delta: timedelta) -> int:
    return delta // timedelta(microseconds=1)


def _split(when: When | None) -> tuple[datetime | None, int | None]:
    """(instant, microseconds from now): the two halves of `coalesce(at, now() + us)`."""
    if when is None:
        return None, None
    if isinstance(when, timedelta):
        return None, _micros(when)
    return _aware(when), None


def _aware(instant: datetime) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got naive {instant.isoformat()!r}")
    return instant


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _at(when: When | None, now: datetime) -> datetime | None:
    """The instant `when` names, computed from the database's `now` exactly as the database
    computes `now() + interval` (both count whole microseconds)."""
    if when is None:
        return None
    if isinstance(when, timedelta):
        return now + when
    return _aware(when).astimezone(UTC)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"PostgreSQL store unavailable: {exc}".strip())


# Connections


class _Connection:
    """A pooled connection, the poll object that tells whether the server sent anything
    while it sat idle, and whether the hot-path statement is prepared on it."""

    __slots__ = ("conn", "pgconn", "poller", "generation", "prepared", "backend_start")

    def __init__(self, conn: psycopg.Connection[Any], generation: int) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.poller = select.poll()
        self.poller.register(self.pgconn.socket, select.POLLIN)
        self.generation = generation
        self.prepared = False
        self.backend_start: datetime | None = None  # read before the first claim

    def usable(self) -> bool:
        """An idle connection has nothing to read unless the server closed it or is
        closing it (a restart, `pg_terminate_backend`): then it is of no more use."""
        return not self.poller.poll(0) and self.pgconn.status == pq.ConnStatus.OK

    def lost(self) -> bool:
        return self.pgconn.status != pq.ConnStatus.OK

    def close(self) -> None:
        with suppress(Exception):
            self.conn.close()


class _DoubtfulClaim:
    """A claim sent on a connection that broke before its answer arrived: it may or may not
    have committed. The server process that ran it is named by pid and start time."""

    __slots__ = ("worker_id", "token", "pid", "backend_start", "error")

    def __init__(self, worker_id: str, token: str, item: _Connection, error: BaseException) -> None:
        self.worker_id = worker_id
        self.token = token
        self.pid = item.pgconn.backend_pid
        self.backend_start = item.backend_start
        self.error = error


class _Pool:
    """Idle connections, most recently used first. Taking and giving back is a deque
    operation, safe from any thread; a connection serves one call at a time."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.idle: collections.deque[_Connection] = collections.deque()
        self.generation = 0

    def take(self) -> _Connection:
        while True:
            try:
                item = self.idle.pop()
            except IndexError:
                return self.connect()
            if item.usable():
                return item
            item.close()

    def connect(self) -> _Connection:
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.OperationalError as exc:
            raise _unavailable(exc) from exc
        return _Connection(conn, self.generation)

    def give_back(self, item: _Connection) -> None:
        if (
            item.generation == self.generation
            and len(self.idle) < MAX_IDLE_CONNECTIONS
            and item.pgconn.status == pq.ConnStatus.OK
            and item.pgconn.transaction_status == _IDLE
        ):
            self.idle.append(item)
        else:
            item.close()

    def close(self) -> None:
        """Close idle connections; those in use are closed when given back."""
        self.generation += 1
        while self.idle:
            self.idle.pop().close()


class _Borrowed:
    """`with store._borrow() as item:` a pooled connection for one call. A lost connection
    or any other operational failure becomes `StoreUnavailable`."""

    __slots__ = ("pool", "item")

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool

    def __enter__(self) -> _Connection:
        self.item = self.pool.take()
        return self.item

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self.pool.give_back(self.item)
        if isinstance(exc, psycopg.OperationalError):
            raise _unavailable(exc) from exc


class PostgresStore(Store):
    """A store in a PostgreSQL database (psycopg 3).

    >>> store = PostgresStore("postgresql://app@db.internal/app")  # doctest: +SKIP

    Tables live in the connection's current schema (set `options=-csearch_path%3D...` in
    the URL to choose one) and are created or migrated on first use.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.conninfo = conninfo_from_url(url)
        self._pool = _Pool(self.conninfo)
        self._claim_pool = _Pool(claim_conninfo(self.conninfo))
        self._lock = threading.Lock()
        self._migrated = False
        self._channel = "deferq"
        self._doubtful_claims: list[_DoubtfulClaim] = []
        self._limited_running: set[str] = set()
        """Executions of concurrency-limited functions this process claimed and has not
        reported yet: their reports free a place under the limit."""

    @property
    def channel(self) -> str:
        """The notification channel: `deferq`, or `deferq_<schema>` outside `public`."""
        if not self._migrated:
            self.migrate()  # the channel depends on the schema
        return self._channel

    def _borrow(self, for_claims: bool = False) -> _Borrowed:
        if not self._migrated:
            self.migrate()
        return _Borrowed(self._claim_pool if for_claims else self._pool)

    def close(self) -> None:
        self._pool.close()
        self._claim_pool.close()

    def migrate(self) -> None:
        with self._lock:
            if self._migrated:
                return
            with _Borrowed(self._pool) as item:
                schema = _apply_migrations(item.conn, load_migrations("postgres"))
            self._channel = channel_name(schema)
            self._migrated = True

    def now(self) -> datetime:
        with self._borrow() as item:
            row = item.conn.execute(Q["now"]).fetchone()
        assert row is not None
        return row[0].astimezone(UTC)

    # Callers' side

    def enqueue(self, items: Sequence[NewExecution], connection: Any = None) -> list[Execution]:
        if connection is not None:
            return self._enqueue_in(connection, items)
        if len(items) == 1:
            return [self._enqueue_one(items[0])]
        return self._enqueue_many(items)

    def _enqueue_one(self, new: NewExecution) -> Execution:
        """The single-call hot path: a prepared statement executed through libpq directly,
        text parameters in and one binary timestamp out."""
        scheduled_at, scheduled_us = _split(new.scheduled)
        discard_at, discard_us = _split(new.discard)
        params: list[Any] = [  # bytes in the text format, None for NULL
            new.id.encode(),
            new.function_name.encode(),
            new.arguments.encode(),
            json.dumps(dict(new.metadata), ensure_ascii=False).encode() if new.metadata else None,
            None if scheduled_at is None else scheduled_at.isoformat().encode(),
            None if scheduled_us is None else str(scheduled_us).encode(),
            None if discard_at is None else discard_at.isoformat().encode(),
            None if discard_us is None else str(discard_us).encode(),
            None if new.retry_policy is None else new.retry_policy.encode(),
            repr(float(new.max_duration)).encode(),
            None if new.cron_tick is None else _aware(new.cron_tick).isoformat().encode(),
            self.channel.encode(),
        ]
        with self._borrow() as item:
            pgconn = item.pgconn
            if not item.prepared:
                _check(pgconn, pgconn.prepare(_INSERT_ONE, _INSERT_ONE_SQL))
                item.prepared = True
            result = pgconn.exec_prepared(_INSERT_ONE, params, result_format=1)
            _check(pgconn, result)
            micros = _INT8.unpack(result.get_value(0, 0))[0]  # type: ignore[arg-type]
        return _new_execution(new, _PG_EPOCH + timedelta(microseconds=micros))

    def _enqueue_many(self, items: Sequence[NewExecution]) -> list[Execution]:
        """Bulk: COPY in one transaction, with times computed from the transaction's now(),
        as the database itself computes them; one notification at the end."""
        channel = self.channel
        with self._borrow() as item, item.conn.transaction():
            conn = item.conn
            row = conn.execute(Q["now_untimed"]).fetchone()  # as long as the batch needs
            assert row is not None
            now = row[0].astimezone(UTC)
            with conn.cursor() as cursor, cursor.copy(Q["copy_executions"]) as copy:
                copy.set_types(_COPY_TYPES)
                for new in items:
                    copy.write_row(
                        (
                            new.id,
                            new.function_name,
                            "created",
                            new.arguments,
                            dict(new.metadata) if new.metadata else None,
                            now,
                            _at(new.scheduled, now),
                            _at(new.discard, now),
                            new.retry_policy,
                            float(new.max_duration),
                            None if new.cron_tick is None else _aware(new.cron_tick),
                        )
                    )
            conn.execute(Q["notify"], {"channel": channel})
        return [_new_execution(i, now) for i in items]

    def _enqueue_in(self, connection: Any, items: Sequence[NewExecution]) -> list[Execution]:
        """Enqueue on the caller's connection, inside whatever transaction it has open: the
        executions exist if and only if that transaction commits."""
        if not isinstance(connection, psycopg.Connection):
            raise ConfigurationError(
                f"expected a psycopg (sync) connection to enqueue in, got {connection!r}"
            )
        if not self._migrated:
            self.migrate()
        try:
            if len(items) == 1:
                row = connection.execute(
                    Q["insert_execution_in_transaction"], self._one_params(items[0])
                ).fetchone()
            else:
                row = connection.execute(
                    Q["insert_executions"], self._bulk_params(items)
                ).fetchone()
        except psycopg.OperationalError as exc:
            raise _unavailable(exc) from exc
        assert row is not None
        now = row[0].astimezone(UTC)
        return [_new_execution(i, now) for i in items]

    def _one_params(self, item: NewExecution) -> dict[str, Any]:
        scheduled_at, scheduled_us = _split(item.scheduled)
        discard_at, discard_us = _split(item.discard)
        return {
            "id": item.id,
            "function_name": item.function_name,
            "arguments": item.arguments,
            "metadata": _metadata_json(item.metadata),
            "scheduled_at": scheduled_at,
            "scheduled_us": scheduled_us,
            "discard_at": discard_at,
            "discard_us": discard_us,
            "retry_policy": item.retry_policy,
            "max_duration": item.max_duration,
            "cron_tick": item.cron_tick,
            "channel": self.channel,
        }

    def _bulk_params(self, items: Sequence[NewExecution]) -> dict[str, Any]:
        scheduled = [_split(i.scheduled) for i in items]
        discard = [_split(i.discard) for i in items]
        return {
            "ids": [i.id for i in items],
            "functions": [i.function_name for i in items],
            "arguments": [i.arguments for i in items],
            "metadata": _or_empty([_metadata_json(i.metadata) for i in items]),
            "scheduled_at": _or_empty([s[0] for s in scheduled]),
            "scheduled_us": _or_empty([s[1] for s in scheduled]),
            "discard_at": _or_empty([d[0] for d in discard]),
            "discard_us": _or_empty([d[1] for d in discard]),
            "retry_policies": _or_empty([i.retry_policy for i in items]),
            "max_durations": [float(i.max_duration) for i in items],
            "cron_ticks": _or_empty([i.cron_tick for i in items]),
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
        params = {
            "name": function_name,
            "expression": expression,
            "timezone": timezone,
            "now": _aware(now),
            "next_tick": next_tick,
        }
        with self._borrow() as item:
            row = item.conn.execute(Q["upsert_schedule"], params).fetchone()
        assert row is not None
        return row[0].astimezone(UTC), _utc(row[1])

    def insert_cron_execution(self, item: NewExecution, next_tick: datetime | None) -> bool:
        assert item.cron_tick is not None
        params = {**self._one_params(item), "next_tick": next_tick}
        with self._borrow() as borrowed:
            return borrowed.conn.execute(Q["insert_cron_execution"], params).rowcount == 1

    def list_schedules(self) -> list[Schedule]:
        return [
            Schedule(
                function_name=r["function_name"],
                expression=r["expression"],
                timezone=r["timezone"],
                last_tick=_utc(r["last_tick"]),
                next_tick=_utc(r["next_tick"]),
                seen_at=r["seen_at"].astimezone(UTC),
            )
            for r in self._rows(Q["list_schedules"], {})
        ]

    def get_execution(self, execution_id: str) -> Execution | None:
        rows = self._rows(Q["get_execution"], {"id": execution_id})
        return _row_to_execution(rows[0]) if rows else None

    def get_result(self, execution_id: str) -> tuple[Execution, str | None] | None:
        rows = self._rows(Q["get_execution"], {"id": execution_id})
        return (_row_to_execution(rows[0]), rows[0]["result"]) if rows else None

    def _rows(self, query: str, params: Any) -> list[dict[str, Any]]:
        with self._borrow() as item, item.conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(query, params).fetchall()

    def list_executions(self, query: ExecutionQuery) -> Page:
        validate_query(query)
        sql, params = listing_sql(query, "%s", _aware, _metadata_clause)
        rows = self._rows(sql, params)
        items = [_row_to_execution(r) for r in rows[: query.first]]
        next_cursor = items[-1].id if len(rows) > query.first else None
        return Page(items=items, next_cursor=next_cursor)

    def list_attempts(self, execution_id: str) -> list[Attempt]:
        return [_row_to_attempt(r) for r in self._rows(Q["list_attempts"], {"id": execution_id})]

    def cancel_execution(self, execution_id: str, force: bool) -> Execution:
        rows = self._rows(Q["cancel_execution"], {"id": execution_id, "force": force})
        if not rows:
            raise ExecutionNotFound(execution_id)
        execution = _row_to_execution(rows[0])
        if rows[0]["changed"]:
            return execution
        # A second cancel or abort of the same execution answers with it, changing nothing.
        allowed = {ExecutionState.CANCELLED}
        if force:
            allowed.add(ExecutionState.ABORTING)
        if execution.state not in allowed:
            raise ExecutionNotCancellable(execution)
        return execution

    def reschedule_execution(self, execution_id: str, when: When) -> Execution:
        at, us = _split(when)
        params = {"id": execution_id, "at": at, "us": us, "channel": self.channel}
        rows = self._rows(Q["reschedule"], params)
        if not rows:
            raise ExecutionNotFound(execution_id)
        execution = _row_to_execution(rows[0])
        if not rows[0]["changed"]:
            raise ExecutionNotReschedulable(execution)
        return execution

    # Workers' side

    def register_worker(self, worker_id: str, name: str, host: str, pid: int) -> None:
        with self._borrow() as item:
            item.conn.execute(
                Q["register_worker"], {"id": worker_id, "name": name, "host": host, "pid": pid}
            )

    def heartbeat(self, worker_id: str) -> bool:
        with self._borrow() as item:
            return item.conn.execute(Q["heartbeat"], {"id": worker_id}).rowcount == 1

    def unregister_worker(self, worker_id: str) -> None:
        with self._borrow() as item:
            item.conn.execute(Q["unregister_worker"], {"id": worker_id})

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
        """Record finished attempts and claim new ones in one transaction; without
        concurrency-limited functions, in one statement (one round trip, one commit).

        Each claim carries a token of its own, stored on the executions it takes. If the
        connection breaks before the answer arrives, the claim is read back by that token:
        what it took is returned as if the answer had come, and nothing stays `started`
        unknown to its worker. Storing the reports again after a lost commit changes
        nothing: a report for an attempt that is not running any more is ignored.

        When an attempt of a concurrency-limited function ends, idle workers are notified:
        one of them may be waiting for the place it frees."""
        freed = self._freed_places(reports)
        claimed = self._record_and_claim(reports, worker_id, functions, limit, horizon)
        self._limited_running.update(
            c.execution_id
            for c in claimed
            if c.function_name in functions and functions[c.function_name].concurrency
        )
        self._announce_freed(freed)
        return claimed

    def _freed_places(self, reports: Sequence[AttemptReport]) -> list[str]:
        return [r.execution_id for r in reports if r.execution_id in self._limited_running]

    def _announce_freed(self, freed: Sequence[str]) -> None:
        """Notify idle workers, once the reports that freed places are stored. A worker
        waiting for a place under a limit learns of it at once instead of at its next poll
        (SQLite's workers notice every commit anyway)."""
        if not freed:
            return
        self._limited_running.difference_update(freed)
        with self._borrow() as item:
            item.conn.execute(Q["notify"], {"channel": self.channel})

    def _record_and_claim(
        self,
        reports: Sequence[AttemptReport],
        worker_id: str,
        functions: Mapping[str, FunctionLimits],
        limit: int,
        horizon: timedelta,
    ) -> list[ClaimedAttempt]:
        if limit <= 0 or not functions:
            limit = 0
        if not reports and not limit:
            return []
        recovered: list[ClaimedAttempt] = []
        if limit and self._doubtful_claims:
            recovered = self._settle_doubtful_claims(worker_id)
            limit = max(0, limit - len(recovered))
        params: dict[str, Any] = {"channel": self.channel}
        if reports:
            params.update(_record_params(reports))
        if not limit:
            if reports:
                with self._borrow() as item:
                    item.conn.execute(RECORD, params)
            return recovered
        params.update(_claim_params(worker_id, functions, limit, horizon))
        doubt: _DoubtfulClaim | None = None
        rows: list[Any] = []
        with self._borrow(for_claims=True) as item:
            if item.backend_start is None:
                row = item.conn.execute(Q["backend_start"]).fetchone()
                item.backend_start = row[0] if row else None
            try:
                rows = _claim(item.conn, params, bool(reports))
            except psycopg.OperationalError as exc:
                if not item.lost():
                    raise  # the server answered with an error: the transaction rolled back
                doubt = _DoubtfulClaim(worker_id, params["token"], item, exc)
        if doubt is not None:
            self._doubtful_claims.append(doubt)
            claimed = self._settle(doubt)
            if not claimed:  # not committed (or it took nothing): fail as the claim did
                raise _unavailable(doubt.error) from doubt.error
            return recovered + claimed
        return recovered + [_claimed(r) for r in rows]

    def _settle_doubtful_claims(self, worker_id: str) -> list[ClaimedAttempt]:
        """What the worker's earlier claims in doubt took (their reading back failed when
        they were made); StoreUnavailable while one cannot be read back yet."""
        found: list[ClaimedAttempt] = []
        for doubt in [d for d in self._doubtful_claims if d.worker_id == worker_id]:
            found += self._settle(doubt)
        return found

    def _settle(self, doubt: _DoubtfulClaim) -> list[ClaimedAttempt]:
        claimed = self._read_back_claim(doubt)  # StoreUnavailable: it stays in doubt
        self._doubtful_claims.remove(doubt)
        logger.warning(
            "Claim read back after its answer was lost",
            extra={
                "action": "read_back_claim",
                "worker": doubt.worker_id,
                "attempts": len(claimed),
                "error": str(doubt.error),
            },
        )
        return claimed

    def _read_back_claim(self, doubt: _DoubtfulClaim) -> list[ClaimedAttempt]:
        """End the server process that ran the claim if it still runs, then read back what
        the claim took: an authoritative answer, since nothing can commit it any more."""
        deadline = time.monotonic() + CLAIM_READ_BACK_SECONDS
        with self._borrow() as item:
            conn = item.conn
            ends = {"pid": doubt.pid, "since": doubt.backend_start}
            while conn.execute(Q["end_backend"], ends).fetchone() is not None:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"PostgreSQL store unavailable: the server process {doubt.pid} that "
                        "ran a claim whose answer was lost is still there"
                    )
                time.sleep(0.01)
            rows = conn.execute(
                Q["claimed_by_token"], {"worker": doubt.worker_id, "token": doubt.token}
            ).fetchall()
        return [_claimed(r) for r in rows]

    def record_attempt_reports(self, reports: Sequence[AttemptReport]) -> None:
        if reports:
            freed = self._freed_places(reports)
            params = {"channel": self.channel, **_record_params(reports)}
            with self._borrow() as item:
                item.conn.execute(RECORD, params)
            self._announce_freed(freed)

    def aborting_executions(self, worker_id: str) -> list[str]:
        with self._borrow() as item:
            rows = item.conn.execute(Q["aborting_executions"], {"worker": worker_id}).fetchall()
        return [r[0] for r in rows]

    def discard_expired(self) -> int:
        with self._borrow() as item, item.conn.transaction():
            # A sweep after a long stop may change many rows: no statement timeout.
            item.conn.execute(Q["untimed"])
            return item.conn.execute(Q["discard_expired"]).rowcount

    def declare_lost_workers(self, lost_after: timedelta) -> list[ClaimedAttempt]:
        with self._borrow() as item:
            conn = item.conn
            lost_rows = conn.execute(
                Q["declare_lost_workers"], {"lost_after_us": _micros(lost_after)}
            ).fetchall()
            rows = conn.execute(Q["running_of_lost_workers"]).fetchall()
        lost = [r[0] for r in lost_rows]
        if lost:
            logger.warning(
                "Declared workers lost",
                extra={"action": "declare_workers_lost", "workers": lost, "attempts": len(rows)},
            )
        return [_claimed(r) for r in rows]

    def next_due_in(
        self, functions: Sequence[str] | None = None, since: timedelta | None = None
    ) -> timedelta | None:
        params = {
            "functions": None if functions is None else list(functions),
            "since_us": None if since is None else _micros(since),
        }
        with self._borrow() as item:
            row = item.conn.execute(Q["next_due"], params).fetchone()
        if row is None or row[0] is None:
            return None
        return timedelta(seconds=max(0.0, float(row[0])))

    def cancel_over_limit(self, functions: Mapping[str, FunctionLimits]) -> None:
        # The claim statement with no room to claim: it cancels what the limits leave no
        # place for, by the same rule and under the same locks as a real claim.
        limits = {n: f for n, f in functions.items() if f.cancel_when_limited and f.concurrency}
        if not limits:
            return
        params: dict[str, Any] = {"channel": self.channel}
        params.update(_claim_params("", limits, 0, timedelta(0)))
        with self._borrow(for_claims=True) as item, item.conn.transaction():
            item.conn.execute(Q["lock_functions"], {"names": params["limited"]})
            item.conn.execute(CLAIM, params)

    def prune_finished(self, older_than: timedelta) -> int:
        with self._borrow() as item, item.conn.transaction():
            item.conn.execute(Q["untimed"])  # the first prune may delete many rows
            row = item.conn.execute(
                Q["prune_finished"], {"older_than_us": _micros(older_than)}
            ).fetchone()
        return int(row[0]) if row else 0

    def watch(self) -> Watcher:
        return ListenWatcher(self.conninfo, self.channel)


class ListenWatcher(Watcher):
    """LISTENs on the store's channel on a connection of its own, whose socket becomes
    readable when an execution is enqueued, rescheduled or returned to `created`.

    If that connection breaks, the watcher says "maybe" every `FALLBACK_POLL_SECONDS` (the
    worker then tries a claim) and tries to listen again every `LISTEN_RETRY_SECONDS`.
    """

    def __init__(self, conninfo: str, channel: str) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.conn: psycopg.Connection[Any] | None = None
        self.poll_interval: float | None = None
        self._retry_at = 0.0
        self._listen()

    def _listen(self) -> bool:
        self._retry_at = time.monotonic() + LISTEN_RETRY_SECONDS
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except psycopg.OperationalError as exc:
            self._fall_back(exc)
            return False
        self.conn = conn
        self.poll_interval = None
        return True

    def _fall_back(self, exc: BaseException) -> None:
        self.close()
        if self.poll_interval is None:
            logger.warning(
                "Store unavailable",
                extra={"action": "store_unavailable", "task": "listener", "error": str(exc)},
            )
        self.poll_interval = FALLBACK_POLL_SECONDS

    def fileno(self) -> int | None:
        return None if self.conn is None else self.conn.pgconn.socket

    def changed(self) -> bool:
        if self.conn is None:
            if time.monotonic() >= self._retry_at:
                self._listen()
            return True  # notifications may have been missed meanwhile
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc:
            self._fall_back(exc)
            return True
        news = False
        while pgconn.notifies() is not None:
            news = True
        if pgconn.status != pq.ConnStatus.OK:
            self._fall_back(psycopg.OperationalError("the listening connection was closed"))
            return True
        return news

    def close(self) -> None:
        if self.conn is not None:
            with suppress(Exception):
                self.conn.close()
            self.conn = None


def channel_name(schema: str | None) -> str:
    """The notification channel of a schema: NOTIFY channels are identifiers, cut (as
    PostgreSQL cuts them) to 63 bytes."""
    name = "deferq" if schema in (None, "public") else f"deferq_{schema}"
    return name.encode()[:63].decode(errors="ignore")


def _apply_migrations(
    conn: psycopg.Connection[Any], migrations: Sequence[tuple[int, str, str]]
) -> str | None:
    """Apply the migrations not yet recorded in `deferq_migrations`, under an advisory
    lock: processes starting together apply each exactly once. Returns the schema."""
    with conn.transaction():
        conn.execute(Q["untimed"])  # waiting for another process's migration included
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        path = conn.execute("SHOW search_path").fetchone()
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS deferq_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        except psycopg.errors.InvalidSchemaName as exc:
            raise ConfigurationError(
                "no schema to create deferq's tables in: the search_path "
                f"{path[0] if path else '?'!r} names no schema that exists; create it first "
                "(CREATE SCHEMA ...) or name another in the URL's options"
            ) from exc
        row = conn.execute("SELECT max(version), current_schema() FROM deferq_migrations")
        current, schema = row.fetchone() or (None, None)
        for number, name, script in migrations:
            if number <= (current or 0):
                continue
            logger.info(
                "Applying migration", extra={"action": "apply_migration", "migration": name}
            )
            conn.execute(script.encode())  # several statements: the simple query protocol
            conn.execute(
                "INSERT INTO deferq_migrations (version, name) VALUES (%s, %s)", (number, name)
            )
    return schema


def _claim(conn: psycopg.Connection[Any], params: dict[str, Any], reports: bool) -> list[Any]:
    """Run a claim (after the reports, if any) and return its rows."""
    limited = params["limited"]
    if not limited:
        return conn.execute(RECORD_AND_CLAIM if reports else CLAIM, params).fetchall()
    # The running counts must be read after the locks are held, hence a second statement
    # (each statement of a transaction sees what committed before it).
    with conn.transaction():
        if reports:
            conn.execute(RECORD, params)
        conn.execute(Q["lock_functions"], {"names": limited})
        return conn.execute(CLAIM, params).fetchall()


def _check(pgconn: pq.abc.PGconn, result: pq.abc.PGresult) -> None:
    """Raise what psycopg would for a failed libpq call."""
    if result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return
    if pgconn.status != pq.ConnStatus.OK:
        message = (result.error_message or pgconn.error_message).decode(errors="replace")
        raise psycopg.OperationalError(message.strip() or "the connection was lost")
    raise psycopg.errors.error_from_result(result, encoding="utf-8")


def _or_empty(values: list[Any]) -> list[Any]:
    """`values`, or no values at all when every one is None (unnest pads with NULLs)."""
    return values if any(v is not None for v in values) else []


def _metadata_json(metadata: Mapping[str, str]) -> str | None:
    return json.dumps(dict(metadata), ensure_ascii=False) if metadata else None


def _metadata_clause(key: str, values: list[str]) -> tuple[str, list[Any]]:
    # One containment test per value, so the GIN index answers each.
    tests = " OR ".join(["metadata @> %s::jsonb"] * len(values))
    return f"({tests})", [json.dumps({key: v}, ensure_ascii=False) for v in values]


def _record_params(reports: Sequence[AttemptReport]) -> dict[str, Any]:
    retry_us: list[int | None] = []
    for r in reports:
        if r.outcome == AttemptOutcome.INTERRUPTED:
            retry_us.append(0)
        else:
            retry_us.append(None if r.retry_in is None else _micros(r.retry_in))
    return {
        "r_ids": [r.execution_id for r in reports],
        "r_numbers": [r.number for r in reports],
        "r_outcomes": [r.outcome.value for r in reports],
        "r_states": [_STATES[r.outcome] for r in reports],
        "r_retry_us": _or_empty(retry_us),
        "r_results": _or_empty([r.result for r in reports]),
        "r_error_codes": _or_empty([r.error_code for r in reports]),
        "r_error_messages": _or_empty([r.error_message for r in reports]),
        "r_tracebacks": _or_empty([r.traceback for r in reports]),
        "r_failures": [1 if r.outcome == AttemptOutcome.FAILED else 0 for r in reports],
    }


def _claim_params(
    worker_id: str, functions: Mapping[str, FunctionLimits], limit: int, horizon: timedelta
) -> dict[str, Any]:
    limited = sorted(name for name, f in functions.items() if f.concurrency is not None)
    return {
        "worker": worker_id,
        "limit": limit,
        "horizon_us": _micros(horizon),
        "free": [name for name, f in functions.items() if f.concurrency is None],
        "limited": limited,
        "concurrency": [functions[name].concurrency for name in limited],
        "cancel": [functions[name].cancel_when_limited for name in limited],
        "token": secrets.token_hex(8),
    }


def _claimed(row: Sequence[Any]) -> ClaimedAttempt:
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


def _new_execution(item: NewExecution, now: datetime) -> Execution:
    scheduled = _at(item.scheduled, now)
    assert scheduled is not None
    return Execution(
        id=item.id,
        function_name=item.function_name,
        state=ExecutionState.CREATED,
        created_at=now,
        scheduled_for=scheduled,
        discard_after=_at(item.discard, now),
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
