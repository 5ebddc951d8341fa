"""The embedded store: one SQLite file in WAL mode, shared by every process on the machine.

Every write runs in a `BEGIN IMMEDIATE` transaction, so writers queue on SQLite's lock (with a
generous busy timeout) instead of failing with "database is locked" on a lock upgrade. A lock
still held when the busy timeout ends, or a failing disk, raises `StoreUnavailable`, as a lost
connection does on PostgreSQL: callers may try again, and a worker keeps its reports for its
next turn.

Each thread gets a connection of its own, closed when the thread ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from deferq.durations import parse_duration
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
from deferq.store.listing import build_where, listing_sql, validate_query

logger = logging.getLogger("deferq.store")

Q = load_queries("sqlite")
BUSY_TIMEOUT_MS = 60_000
"""How long a write waits for another connection's write lock before `StoreUnavailable`;
the URL parameter `busy_timeout` (`sqlite:///file.sqlite3?busy_timeout=5s`) changes it."""
PRUNE_BATCH = 2_000
"""Finished executions deleted per transaction by `prune_finished`: claims wait for one
batch at a time (about 60 ms), not for the whole sweep."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(instant: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got naive {instant.isoformat()!r}")
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int | None) -> datetime | None:
    if value is None:
        return None
    return _EPOCH + timedelta(microseconds=value)


def _now_us() -> int:
    return time.time_ns() // 1000


def _when_us(when: When, now_us: int) -> int:
    if isinstance(when, timedelta):
        return now_us + (when // timedelta(microseconds=1))
    return to_us(when)


def busy_timeout_from_url(url: str) -> int:
    """The busy timeout in milliseconds the URL asks for: its `busy_timeout` parameter, a
    duration (`?busy_timeout=5s`), or `BUSY_TIMEOUT_MS`. Other parameters are refused."""
    path_from_url(url)
    _, _, query = url.partition("?")
    timeout = BUSY_TIMEOUT_MS
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if key != "busy_timeout" or not sep:
            raise ConfigurationError(
                f"invalid SQLite store URL {url!r}: unknown parameter {pair!r} "
                "(known: busy_timeout, e.g. ?busy_timeout=5s)"
            )
        try:
            duration = parse_duration(value, name="busy_timeout")
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid SQLite store URL {url!r}: {exc}") from None
        timeout = duration // timedelta(milliseconds=1)
    return timeout


_TRANSIENT_ERRORS = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
"""Result codes of failures that may pass: a lock held too long, a full or failing disk.
Others (a syntax error, a constraint) are bugs and are raised as they are."""


def _is_transient(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return isinstance(exc, sqlite3.OperationalError)
    return (code & 0xFF) in _TRANSIENT_ERRORS


@contextmanager
def _available(path: str) -> Iterator[None]:
    """Turn a failure that may pass into `StoreUnavailable`."""
    try:
        yield
    except sqlite3.Error as exc:
        if _is_transient(exc):
            raise StoreUnavailable(f"SQLite store {path!r} unavailable: {exc}") from exc
        raise


class _ThreadConnection:
    """The holder of one thread's connection, kept in the store's thread-local data.

    When the thread ends, Python drops its thread-local data and with it this holder, whose
    finalizer closes the connection: an application calling from many short-lived threads
    does not run out of file descriptors."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


def _close_connection(
    conn: sqlite3.Connection, connections: set[sqlite3.Connection], lock: threading.Lock
) -> None:
    with lock:
        connections.discard(conn)
    with suppress(sqlite3.Error):
        conn.close()


def path_from_url(url: str) -> str:
    """`sqlite:///relative.db` or `sqlite:////absolute/path.db` to a file path."""
    if not url.startswith("sqlite:///"):
        raise ConfigurationError(
            f"invalid SQLite store URL {url!r}: expected sqlite:///path/to/file.sqlite3"
        )
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"invalid SQLite store URL {url!r}: the store must be a file that workers share"
        )
    return path


class SQLiteStore(Store):
    """A store in one SQLite file."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_from_url(url)
        self.busy_timeout_ms = busy_timeout_from_url(url)
        self._local = threading.local()
        self._connections: set[sqlite3.Connection] = set()
        self._lock = threading.Lock()
        self._migrated = False

    # Connections

    def _connect(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        timeout_ms = self.busy_timeout_ms
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=timeout_ms / 1e3
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
        # Durable against a crash of the process; a power cut may lose the last commits.
        conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpoints (which fsync) every 16 MB of WAL instead of 4 MB: fewer stalls for
        # enqueueing callers, at the cost of a larger WAL file between checkpoints.
        conn.execute("PRAGMA wal_autocheckpoint = 4000")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open_thread_connection()
        return conn

    def _open_thread_connection(self) -> sqlite3.Connection:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self.path!r}: {exc}") from exc
        holder = _ThreadConnection(conn)
        weakref.finalize(holder, _close_connection, conn, self._connections, self._lock)
        with self._lock:
            self._connections.add(conn)
        self._local.holder = holder
        self._local.conn = conn
        if not self._migrated:
            try:
                with _available(self.path):
                    self.migrate()
            except BaseException:
                # Dropping the holder closes the connection; the next call tries again.
                del self._local.conn, self._local.holder
                raise
        return conn

    @contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction. A lock held by another connection past the busy timeout, or
        a failing disk, raises `StoreUnavailable` with nothing written."""
        conn = conn or self.conn
        with _available(self.path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
        """The rows of one query outside a write transaction; a busy or failing store raises
        `StoreUnavailable`."""
        with _available(self.path):
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def migrate(self) -> None:
        conn = self.conn
        if self._migrated:
            return
        migrations = load_migrations("sqlite")
        latest = migrations[-1][0]
        if conn.execute("PRAGMA user_version").fetchone()[0] < latest:
            with self._write(conn):
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                for number, name, sql in migrations:
                    if number > current:
                        logger.info(
                            "Applying migration",
                            extra={"action": "apply_migration", "migration": name},
                        )
                        for statement in _split_statements(sql):
                            conn.execute(statement)
                        conn.execute(f"PRAGMA user_version = {number}")
        self._migrated = True

    def now(self) -> datetime:
        return datetime.now(UTC)

    # Callers' side

    def enqueue(self, items: Sequence[NewExecution], connection: Any = None) -> list[Execution]:
        if connection is not None:
            raise ConfigurationError(
                "enqueueing in the caller's transaction needs the PostgreSQL store"
            )
        now = _now_us()
        rows = []
        meta_rows: list[tuple[str, str, str]] = []
        executions = []
        for item in items:
            scheduled = _when_us(item.scheduled, now)
            discard = None if item.discard is None else _when_us(item.discard, now)
            rows.append(
                (
                    item.id,
                    item.function_name,
                    item.arguments,
                    json.dumps(item.metadata, ensure_ascii=False) if item.metadata else None,
                    now,
                    scheduled,
                    discard,
                    item.retry_policy,
                    item.max_duration,
                    None if item.cron_tick is None else to_us(item.cron_tick),
                )
            )
            meta_rows.extend((item.id, k, v) for k, v in item.metadata.items())
            executions.append(_new_execution(item, now, scheduled, discard))
        conn = self.conn
        if len(rows) == 1 and not meta_rows:
            # One statement commits on its own: the cheapest durable enqueue.
            self._retrying(conn.execute, Q["insert_execution"], rows[0])
        else:
            with self._write(conn):
                conn.executemany(Q["insert_execution"], rows)
                if meta_rows:
                    conn.executemany(Q["insert_metadata"], meta_rows)
        return executions

    def _retrying(self, fn: Any, *args: Any) -> Any:
        # The single-call enqueue's path: a plain try, cheaper than the context manager.
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            if _is_transient(exc):
                raise StoreUnavailable(f"SQLite store {self.path!r} unavailable: {exc}") from exc
            raise

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
            "now": to_us(now),
            "next_tick": None if next_tick is None else to_us(next_tick),
        }
        with self._write() as conn:
            first_seen, last_tick = conn.execute(Q["upsert_schedule"], params).fetchone()
        return from_us(first_seen), from_us(last_tick)  # type: ignore[return-value]

    def insert_cron_execution(self, item: NewExecution, next_tick: datetime | None) -> bool:
        assert item.cron_tick is not None
        now = _now_us()
        tick = to_us(item.cron_tick)
        with self._write() as conn:
            cursor = conn.execute(
                Q["insert_cron_execution"],
                (
                    item.id,
                    item.function_name,
                    item.arguments,
                    None,
                    now,
                    _when_us(item.scheduled, now),
                    None if item.discard is None else _when_us(item.discard, now),
                    item.retry_policy,
                    item.max_duration,
                    tick,
                ),
            )
            conn.execute(
                Q["set_last_tick"],
                {
                    "name": item.function_name,
                    "tick": tick,
                    "next_tick": None if next_tick is None else to_us(next_tick),
                },
            )
            return cursor.rowcount == 1

    def list_schedules(self) -> list[Schedule]:
        return [
            Schedule(
                function_name=row["function_name"],
                expression=row["expression"],
                timezone=row["timezone"],
                last_tick=from_us(row["last_tick"]),
                next_tick=from_us(row["next_tick"]),
                seen_at=from_us(row["seen_at"]),  # type: ignore[arg-type]
            )
            for row in self._read(Q["list_schedules"])
        ]

    def get_execution(self, execution_id: str) -> Execution | None:
        rows = self._read(Q["get_execution"], (execution_id,))
        return _row_to_execution(rows[0]) if rows else None

    def get_result(self, execution_id: str) -> tuple[Execution, str | None] | None:
        rows = self._read(Q["get_execution"], (execution_id,))
        return (_row_to_execution(rows[0]), rows[0]["result"]) if rows else None

    def list_executions(self, query: ExecutionQuery) -> Page:
        validate_query(query)
        sql, params = _listing_sql(query)
        rows = self._read(sql, params)
        items = [_row_to_execution(r) for r in rows[: query.first]]
        next_cursor = items[-1].id if len(rows) > query.first else None
        return Page(items=items, next_cursor=next_cursor)

    def list_attempts(self, execution_id: str) -> list[Attempt]:
        rows = self._read(Q["list_attempts"], (execution_id,))
        return [_row_to_attempt(r) for r in rows]

    def cancel_execution(self, execution_id: str, force: bool) -> Execution:
        with self._write() as conn:
            if conn.execute(Q["cancel_created"], (_now_us(), execution_id)).rowcount == 0 and force:
                conn.execute(Q["abort_started"], (execution_id,))
            row = conn.execute(Q["get_execution"], (execution_id,)).fetchone()
        if row is None:
            raise ExecutionNotFound(execution_id)
        execution = _row_to_execution(row)
        # A second cancel or abort of the same execution answers with it, changing nothing.
        allowed = (
            {ExecutionState.CANCELLED, ExecutionState.ABORTING}
            if force
            else {ExecutionState.CANCELLED}
        )
        if execution.state not in allowed:
            raise ExecutionNotCancellable(execution)
        return execution

    def reschedule_execution(self, execution_id: str, when: When) -> Execution:
        with self._write() as conn:
            conn.execute(Q["reschedule"], (_when_us(when, _now_us()), execution_id))
            row = conn.execute(Q["get_execution"], (execution_id,)).fetchone()
        if row is None:
            raise ExecutionNotFound(execution_id)
        execution = _row_to_execution(row)
        if execution.state != ExecutionState.CREATED:
            raise ExecutionNotReschedulable(execution)
        return execution

    # Workers' side

    def register_worker(self, worker_id: str, name: str, host: str, pid: int) -> None:
        now = _now_us()
        with self._write() as conn:
            conn.execute(Q["register_worker"], (worker_id, name, host, pid, now, now))

    def heartbeat(self, worker_id: str) -> bool:
        with self._write() as conn:
            return conn.execute(Q["heartbeat"], (_now_us(), worker_id)).rowcount == 1

    def unregister_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute(Q["unregister_worker"], (_now_us(), worker_id))

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
        """Record finished attempts and claim new ones in one transaction: a busy worker
        pays for one commit per turn of its loop."""
        conn = self.conn
        horizon_us = horizon // timedelta(microseconds=1)
        if limit <= 0 or not functions:
            limit = 0
        elif not self._read(Q["due_any"], (_now_us() + horizon_us,)):
            # A cheap read first: most polls of an idle store end here, without the write lock.
            limit = 0
        if not reports and not limit:
            return []
        with self._write(conn):
            now = _now_us()
            if reports:
                self._record(conn, reports, now)
            if not limit:
                return []
            return self._claim(conn, worker_id, functions, limit, now, now + horizon_us)

    def _claim(
        self,
        conn: sqlite3.Connection,
        worker_id: str,
        functions: Mapping[str, FunctionLimits],
        limit: int,
        now: int,
        due_before: int,
    ) -> list[ClaimedAttempt]:
        free = [name for name, f in functions.items() if f.concurrency is None]
        limited = {name: f for name, f in functions.items() if f.concurrency is not None}
        ids: list[str] = []
        if free:
            marks = ", ".join("?" * len(free))
            ids += [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM deferq_executions INDEXED BY deferq_executions_due"
                    " WHERE state = 'created' AND scheduled_for <= ?"
                    " AND (discard_after IS NULL OR discard_after > ?)"
                    f" AND function_name IN ({marks}) ORDER BY scheduled_for, id LIMIT ?",
                    (due_before, now, *free, limit),
                )
            ]
        for name, limits in limited.items():
            if len(ids) >= limit:
                break
            ids += self._claimable_limited(conn, name, limits, now, due_before, limit - len(ids))
        if not ids:
            return []
        rows = conn.execute(Q["start_executions"], (now, worker_id, json.dumps(ids))).fetchall()
        rows.sort(key=lambda r: (r[9], r[0]))
        claimed = [_claimed(r) for r in rows]
        conn.executemany(
            Q["insert_attempt"], [(c.execution_id, c.number, worker_id, now) for c in claimed]
        )
        return claimed

    def _claimable_limited(
        self,
        conn: sqlite3.Connection,
        name: str,
        limits: FunctionLimits,
        now: int,
        due_before: int,
        room: int,
    ) -> list[str]:
        """Ids of due executions of a concurrency-limited function that fit its free slots;
        with the "cancel" action, the due ones that do not fit are cancelled."""
        assert limits.concurrency is not None
        running = conn.execute(Q["running_count"], (name,)).fetchone()[0]
        available = max(0, limits.concurrency - running)
        take = min(available, room)
        fetch = None if limits.cancel_when_limited else take
        if fetch == 0:
            return []
        rows = conn.execute(
            "SELECT id FROM deferq_executions INDEXED BY deferq_executions_due"
            " WHERE state = 'created' AND scheduled_for <= ?"
            " AND (discard_after IS NULL OR discard_after > ?) AND function_name = ?"
            " ORDER BY scheduled_for, id" + ("" if fetch is None else " LIMIT ?"),
            (due_before, now, name) + (() if fetch is None else (fetch,)),
        ).fetchall()
        ids = [r[0] for r in rows]
        if limits.cancel_when_limited:
            # Those beyond the free slots of the whole store are cancelled; those beyond this
            # worker's room stay for other workers.
            reason = f"concurrency limit of {limits.concurrency} reached"
            conn.executemany(Q["cancel_limited"], [(now, reason, i) for i in ids[available:]])
        return ids[:take]

    def record_attempt_reports(self, reports: Sequence[AttemptReport]) -> None:
        if reports:
            with self._write() as conn:
                self._record(conn, reports, _now_us())

    def _record(self, conn: sqlite3.Connection, reports: Sequence[AttemptReport], now: int) -> None:
        conn.executemany(Q["finish_execution"], [_finish_params(r, now) for r in reports])
        conn.executemany(
            Q["finish_attempt"],
            [
                (
                    now,
                    r.outcome.value,
                    r.error_code,
                    r.error_message,
                    r.traceback,
                    r.execution_id,
                    r.number,
                )
                for r in reports
            ],
        )

    def aborting_executions(self, worker_id: str) -> list[str]:
        return [r[0] for r in self._read(Q["aborting_executions"], (worker_id,))]

    def discard_expired(self) -> int:
        now = _now_us()
        expired = self._read(
            "SELECT 1 FROM deferq_executions INDEXED BY deferq_executions_discard"
            " WHERE state = 'created' AND discard_after IS NOT NULL AND discard_after <= ?"
            " LIMIT 1",
            (now,),
        )
        if not expired:
            return 0
        with self._write() as conn:
            return conn.execute(Q["discard_expired"], (now, now)).rowcount

    def declare_lost_workers(self, lost_after: timedelta) -> list[ClaimedAttempt]:
        now = _now_us()
        with self._write() as conn:
            lost = [
                r[0]
                for r in conn.execute(
                    Q["declare_lost_workers"], (now, now - lost_after // timedelta(microseconds=1))
                ).fetchall()
            ]
            attempts = [_claimed(r) for r in conn.execute(Q["running_of_lost_workers"])]
        if lost:
            logger.warning(
                "Declared workers lost",
                extra={
                    "action": "declare_workers_lost",
                    "workers": lost,
                    "attempts": len(attempts),
                },
            )
        return attempts

    def next_due_in(
        self, functions: Sequence[str] | None = None, since: timedelta | None = None
    ) -> timedelta | None:
        now = _now_us()
        params = {
            "functions": None if functions is None else json.dumps(list(functions)),
            "after": None if since is None else now - since // timedelta(microseconds=1),
        }
        row = self.conn.execute(Q["next_due"], params).fetchone()
        if row is None:
            return None
        return timedelta(microseconds=max(0, row[0] - now))

    def cancel_over_limit(self, functions: Mapping[str, FunctionLimits]) -> None:
        names = [n for n, f in functions.items() if f.cancel_when_limited and f.concurrency]
        if not names:
            return
        conn = self.conn
        now = _now_us()
        due = conn.execute(Q["due_of_functions"], (now, json.dumps(names))).fetchone()
        if due is None:  # a cheap read first: most looks end here, without the write lock
            return
        with self._write(conn):
            now = _now_us()
            for name in names:
                self._claimable_limited(conn, name, functions[name], now, now, 0)

    def prune_finished(self, older_than: timedelta) -> int:
        cutoff = _now_us() - older_than // timedelta(microseconds=1)
        pruned = 0
        while True:
            with self._write() as conn:
                ids = [
                    r[0]
                    for r in conn.execute(Q["prune_finished"], (cutoff, PRUNE_BATCH)).fetchall()
                ]
                conn.executemany(
                    "DELETE FROM deferq_attempts WHERE execution_id = ?", [(i,) for i in ids]
                )
                conn.executemany(
                    "DELETE FROM deferq_metadata WHERE execution_id = ?", [(i,) for i in ids]
                )
            pruned += len(ids)
            if len(ids) < PRUNE_BATCH:
                return pruned

    def watch(self) -> Watcher:
        return _DataVersionWatcher(self)


class _DataVersionWatcher(Watcher):
    """Notices commits by other connections through `PRAGMA data_version`, which costs a few
    microseconds to read: cheap enough to check every few milliseconds."""

    poll_interval = 0.005

    def __init__(self, store: SQLiteStore) -> None:
        self.conn = store._connect()
        self.version = self._version()

    def _version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def changed(self) -> bool:
        version = self._version()
        if version == self.version:
            return False
        self.version = version
        return True

    def close(self) -> None:
        self.conn.close()


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
        discard_after=from_us(row[7]),
        started_at=from_us(row[8]),  # type: ignore[arg-type]
    )


def _listing_sql(query: ExecutionQuery) -> tuple[str, list[Any]]:
    """The `list_executions` query, shaped so that SQLite walks an index in id order and
    stops after a page, however many executions are stored:

    - a metadata filter on one value is driven from the metadata table's primary key
      (key, value, execution_id), which holds that value's executions in id order;
    - otherwise `listing_sql`: several states are read one ordered arm per state, merged,
      since the (state, id) index orders each state's executions but not several states'
      together; anything else walks the (state, id) or (function_name, id) index.
    """
    limit = query.first + 1
    driver = next(
        (
            (key, values if isinstance(values, str) else next(iter(values)))
            for key, values in (query.metadata or {}).items()
            if isinstance(values, str) or len(values) == 1
        ),
        None,
    )
    if driver is not None:
        key, value = driver
        rest = dict(query.metadata or {})
        del rest[key]
        where, params = build_where(
            dataclasses.replace(query, metadata=rest), "?", to_us, _metadata_clause
        )
        return (
            "SELECT e.* FROM deferq_metadata m"
            " CROSS JOIN deferq_executions e ON e.id = m.execution_id"
            f" WHERE m.key = ? AND m.value = ? AND {where}"
            " ORDER BY m.execution_id DESC LIMIT ?",
            [key, str(value), *params, limit],
        )
    return listing_sql(query, "?", to_us, _metadata_clause)


def _metadata_clause(key: str, values: list[str]) -> tuple[str, list[Any]]:
    marks = ", ".join("?" * len(values))
    return (
        "EXISTS (SELECT 1 FROM deferq_metadata m WHERE m.execution_id = id"
        f" AND m.key = ? AND m.value IN ({marks}))",
        [key, *values],
    )


def _finish_params(report: AttemptReport, now: int) -> dict[str, Any]:
    outcome = report.outcome
    retry_at = None
    if report.retry_in is not None:
        retry_at = now + report.retry_in // timedelta(microseconds=1)
    if outcome == AttemptOutcome.INTERRUPTED:
        retry_at = now
    state = {
        AttemptOutcome.SUCCEEDED: "succeeded",
        AttemptOutcome.FAILED: "failed",
        AttemptOutcome.ABORTED: "aborted",
        AttemptOutcome.INTERRUPTED: "created",
    }[outcome]
    return {
        "now": now,
        "retry_at": retry_at,
        "state": state,
        "result": report.result,
        "error_code": report.error_code,
        "error_message": report.error_message,
        "counts_as_failure": 1 if outcome == AttemptOutcome.FAILED else 0,
        "id": report.execution_id,
        "number": report.number,
    }


def _new_execution(item: NewExecution, now: int, scheduled: int, discard: int | None) -> Execution:
    return Execution(
        id=item.id,
        function_name=item.function_name,
        state=ExecutionState.CREATED,
        created_at=from_us(now),  # type: ignore[arg-type]
        scheduled_for=from_us(scheduled),  # type: ignore[arg-type]
        discard_after=from_us(discard),
        metadata=dict(item.metadata),
        arguments_json=item.arguments,
        cron_tick=item.cron_tick,
        max_duration=item.max_duration,
        retry_policy_json=item.retry_policy,
    )


def _row_to_execution(row: sqlite3.Row) -> Execution:
    return Execution(
        id=row["id"],
        function_name=row["function_name"],
        state=ExecutionState(row["state"]),
        created_at=from_us(row["created_at"]),  # type: ignore[arg-type]
        scheduled_for=from_us(row["scheduled_for"]),  # type: ignore[arg-type]
        discard_after=from_us(row["discard_after"]),
        started_at=from_us(row["started_at"]),
        finished_at=from_us(row["finished_at"]),
        attempts=row["attempts"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else {},
        error_code=row["error_code"],
        error_message=row["error_message"],
        arguments_json=row["arguments"],
        cron_tick=from_us(row["cron_tick"]),
        max_duration=row["max_duration"],
        retry_policy_json=row["retry_policy"],
    )


def _row_to_attempt(row: sqlite3.Row) -> Attempt:
    return Attempt(
        execution_id=row["execution_id"],
        number=row["number"],
        started_at=from_us(row["started_at"]),  # type: ignore[arg-type]
        finished_at=from_us(row["finished_at"]),
        worker=row["worker_id"],
        outcome=AttemptOutcome(row["outcome"]),
        error_code=row["error_code"],
        error_message=row["error_message"],
        traceback=row["traceback"],
    )


def _split_statements(sql: str) -> list[str]:
    """Split a migration file into statements. Comments are dropped first; our migrations
    hold no ';' inside string literals."""
    code = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return [statement.strip() for statement in code.split(";") if statement.strip()]
