"""The shapes deferq hands back: executions, attempts, pages."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class ExecutionState(enum.StrEnum):
    """Where an execution is in its life. A `str`, so `state == "succeeded"` works."""

    CREATED = "created"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DISCARDED = "discarded"
    ABORTING = "aborting"
    ABORTED = "aborted"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        ExecutionState.SUCCEEDED,
        ExecutionState.FAILED,
        ExecutionState.CANCELLED,
        ExecutionState.DISCARDED,
        ExecutionState.ABORTED,
    }
)
RUNNING_STATES = frozenset({ExecutionState.STARTED, ExecutionState.ABORTING})


class ErrorCode(enum.StrEnum):
    """Why an attempt (and so perhaps its execution) did not succeed."""

    RAISED = "raised"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    UNKNOWN_FUNCTION = "unknown_function"
    RESULT_NOT_JSON = "result_not_json"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    CONCURRENCY_LIMIT = "concurrency_limit"
    """Not an attempt's: an execution cancelled because its function's limit was reached."""

    def __str__(self) -> str:
        return self.value


_EXECUTION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_execution_id(value: object) -> bool:
    """Whether `value` has the shape of an execution id: a lowercase UUID. Text of any other
    shape names no execution (and may hold what a store cannot even look up, such as NUL)."""
    return type(value) is str and _EXECUTION_ID.fullmatch(value) is not None


class AttemptOutcome(enum.StrEnum):
    """How one attempt ended. `interrupted`: stopped by a worker shutdown, not counted."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Execution:
    """One stored call of a background function."""

    id: str
    function_name: str
    state: ExecutionState
    created_at: datetime
    scheduled_for: datetime
    discard_after: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None
    arguments_json: str | None = None
    """The stored arguments, as JSON text `[args, kwargs]`."""
    cron_tick: datetime | None = None
    max_duration: float | None = None
    """Seconds an attempt may run, as stored with the execution."""
    retry_policy_json: str | None = None
    """The retry policy stored with the execution, as JSON (None: no retry)."""

    @property
    def arguments(self) -> dict[str, Any]:
        """The stored arguments as `{"args": [...], "kwargs": {...}}`."""
        if self.arguments_json is None:
            return {"args": [], "kwargs": {}}
        args, kwargs = json.loads(self.arguments_json)
        return {"args": args, "kwargs": kwargs}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of an execution on a worker."""

    execution_id: str
    number: int
    started_at: datetime
    finished_at: datetime | None
    worker: str | None
    outcome: AttemptOutcome
    error_code: str | None = None
    error_message: str | None = None
    traceback: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of `list_executions`; pass `next_cursor` back as `after` for the next."""

    items: list[Execution]
    next_cursor: str | None

    def __iter__(self) -> Iterator[Execution]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A cron schedule as the store knows it."""

    function_name: str
    expression: str
    timezone: str
    last_tick: datetime | None
    next_tick: datetime | None
    seen_at: datetime
    """When a worker last ran the scheduler with this schedule in its code."""
