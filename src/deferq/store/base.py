"""The store interface: everything the engine asks of SQLite or PostgreSQL.

A store keeps executions, their attempts, and the workers that run them. It owns the clock
that decides what is due (the database's clock on PostgreSQL), so callers hand it relative
times (`timedelta`) where they can and let the store turn them into instants.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from deferq.errors import DeferqError
from deferq.models import Attempt, AttemptOutcome, Execution, Page, Schedule

When = timedelta | datetime
"""A relative time (from the store's now) or an aware instant."""


class StoreUnavailable(DeferqError):
    """The store could not be reached; the operation may succeed if tried again."""


@dataclass(frozen=True, slots=True)
class NewExecution:
    """An execution about to be stored."""

    id: str
    function_name: str
    arguments: str
    scheduled: When
    discard: When | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_policy: str | None = None
    """The retry policy as JSON, or None for no retry."""
    max_duration: float = 1800.0
    """Seconds an attempt may run."""
    cron_tick: datetime | None = None


@dataclass(frozen=True, slots=True)
class FunctionLimits:
    """What a worker knows of a function it serves, used while claiming."""

    concurrency: int | None = None
    cancel_when_limited: bool = False


@dataclass(frozen=True, slots=True)
class ClaimedAttempt:
    """An attempt a worker has claimed and must now run and report."""

    execution_id: str
    function_name: str
    arguments: str
    number: int
    failed_attempts: int
    retry_policy: str | None
    max_duration: float
    discard_after: datetime | None
    started_at: datetime


@dataclass(frozen=True, slots=True)
class AttemptReport:
    """How an attempt ended, as a worker reports it to the store.

    `retry_in` is set when the retry policy allows another attempt: the store then returns the
    execution to `created` that far in the future, or discards it if that is past its
    `discard_after`. An execution being aborted ends `aborted` whatever the report says.
    """

    execution_id: str
    number: int
    outcome: AttemptOutcome
    result: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    retry_in: timedelta | None = None


@dataclass(frozen=True, slots=True)
class ExecutionQuery:
    """Filters of `list_executions`; every given filter must hold."""

    states: Sequence[str] | None = None
    functions: Sequence[str] | None = None
    error_codes: Sequence[str] | None = None
    metadata: Mapping[str, Sequence[str]] | None = None
    scheduled_between: tuple[datetime | None, datetime | None] | None = None
    started_between: tuple[datetime | None, datetime | None] | None = None
    first: int = 50
    after: str | None = None


class Store(abc.ABC):
    """What every store implements. Methods are blocking and safe to call from any thread."""

    url: str

    @abc.abstractmethod
    def migrate(self) -> None:
        """Bring the schema up to date; safe when several processes do it at once."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections held by this process."""

    @abc.abstractmethod
    def now(self) -> datetime:
        """The store's clock, aware UTC."""

    # Callers' side

    @abc.abstractmethod
    def enqueue(self, items: Sequence[NewExecution], connection: Any = None) -> list[Execution]:
        """Store new executions in one transaction (the caller's, when `connection` is given)."""

    @abc.abstractmethod
    def sync_schedule(
        self,
        function_name: str,
        expression: str,
        timezone: str,
        next_tick: datetime | None,
        now: datetime,
    ) -> tuple[datetime, datetime | None]:
        """Record a cron schedule as a worker sees it in code at `now` (the scheduler's
        clock); return when it was first seen (with this expression and time zone) and the
        latest tick stored for it."""

    @abc.abstractmethod
    def insert_cron_execution(self, item: NewExecution, next_tick: datetime | None) -> bool:
        """Store the execution of one cron tick unless one exists for (function, tick), and
        move the schedule's last tick forward. True if this call stored it."""

    @abc.abstractmethod
    def list_schedules(self) -> list[Schedule]:
        """Every cron schedule workers have run, with its last and next tick."""

    @abc.abstractmethod
    def get_execution(self, execution_id: str) -> Execution | None: ...

    @abc.abstractmethod
    def get_result(self, execution_id: str) -> tuple[Execution, str | None] | None:
        """The execution and its result as JSON text (None until it succeeded)."""

    @abc.abstractmethod
    def list_executions(self, query: ExecutionQuery) -> Page: ...

    @abc.abstractmethod
    def list_attempts(self, execution_id: str) -> list[Attempt]: ...

    @abc.abstractmethod
    def cancel_execution(self, execution_id: str, force: bool) -> Execution:
        """created → cancelled; with force, started → aborting. Raises if neither applies."""

    @abc.abstractmethod
    def reschedule_execution(self, execution_id: str, when: When) -> Execution: ...

    # Workers' side

    @abc.abstractmethod
    def register_worker(self, worker_id: str, name: str, host: str, pid: int) -> None: ...

    @abc.abstractmethod
    def heartbeat(self, worker_id: str) -> bool:
        """Record that the worker lives; False if it was already declared lost."""

    @abc.abstractmethod
    def unregister_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    def claim_due_executions(
        self,
        worker_id: str,
        functions: Mapping[str, FunctionLimits],
        limit: int,
        horizon: timedelta = timedelta(0),
    ) -> list[ClaimedAttempt]:
        """Start up to `limit` due executions of `functions` (due within `horizon` from now),
        keeping each function's concurrency limit across all workers."""

    @abc.abstractmethod
    def record_attempt_reports(self, reports: Sequence[AttemptReport]) -> None:
        """Store how attempts ended, in one transaction. A report for an attempt that is no
        longer the execution's running attempt (taken over as lost) is ignored."""

    def record_and_claim(
        self,
        reports: Sequence[AttemptReport],
        worker_id: str,
        functions: Mapping[str, FunctionLimits],
        limit: int,
        horizon: timedelta = timedelta(0),
    ) -> list[ClaimedAttempt]:
        """Record finished attempts, then claim new ones. Stores that can do both in one
        transaction override this; the worker's main loop calls it once per turn."""
        self.record_attempt_reports(reports)
        return self.claim_due_executions(worker_id, functions, limit, horizon)

    @abc.abstractmethod
    def aborting_executions(self, worker_id: str) -> list[str]:
        """Ids of this worker's executions that were asked to abort."""

    @abc.abstractmethod
    def discard_expired(self) -> int:
        """Move `created` executions past their `discard_after` to `discarded`."""

    @abc.abstractmethod
    def declare_lost_workers(self, lost_after: timedelta) -> list[ClaimedAttempt]:
        """Mark workers silent for `lost_after` as lost; return the attempts they were running."""

    @abc.abstractmethod
    def next_due_in(
        self, functions: Sequence[str] | None = None, since: timedelta | None = None
    ) -> timedelta | None:
        """How long until the earliest `created` execution of `functions` (of any function
        when None) is due: zero if one is, None if there is none.

        With `since`, executions that were already due `since` ago are left out: a worker
        whose claim came back short passes the time since that claim, so that due work it
        could not take (a concurrency limit reached) does not make it claim again at once,
        while work that became due meanwhile does."""

    @abc.abstractmethod
    def cancel_over_limit(self, functions: Mapping[str, FunctionLimits]) -> None:
        """Cancel the due executions of functions with the "cancel" action that their
        concurrency limit leaves no room for, as a claim does, without claiming any: so
        they are cancelled promptly while every worker is busy."""

    def watch(self) -> Watcher:
        """Something the worker can wait on for new or newly due work."""
        return Watcher()

    @abc.abstractmethod
    def prune_finished(self, older_than: timedelta) -> int:
        """Delete executions that reached a final state more than `older_than` ago."""


class Watcher:
    """Tells the worker's main loop that work may have arrived.

    Either it has a file descriptor that becomes readable on news (`fileno()`, e.g. a
    PostgreSQL LISTEN connection), or the loop calls `changed()` every `poll_interval`
    seconds. This fallback has neither: the loop then tries to claim every poll interval.
    """

    poll_interval: float | None = None

    def fileno(self) -> int | None:
        return None

    def changed(self) -> bool:
        """Consume pending news; True if work may have arrived since the last call."""
        return False

    def close(self) -> None:
        """Release what the watcher holds."""


SQL_DIR = Path(__file__).parent / "sql"


def load_queries(dialect: str) -> dict[str, str]:
    """Read the named queries of one dialect: blocks headed by `-- name: <name>`."""
    queries: dict[str, str] = {}
    name = None
    lines: list[str] = []
    for line in (SQL_DIR / dialect / "queries.sql").read_text().splitlines():
        if line.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = line.split(":", 1)[1].strip(), []
        elif name is not None:
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


def load_migrations(dialect: str) -> list[tuple[int, str, str]]:
    """The numbered migrations of one dialect, in order: (number, file name, SQL)."""
    found = []
    for path in sorted((SQL_DIR / dialect / "migrations").glob("*.sql")):
        found.append((int(path.name.split("_", 1)[0]), path.name, path.read_text()))
    return found
