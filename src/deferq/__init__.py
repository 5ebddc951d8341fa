"""deferq: durable background functions for Python, with control over time.

from deferq import defer, discard_after

@defer(retry=False)
def send_sign_in_email(email: str) -> None: ...

send_expirable = discard_after(send_sign_in_email, "5min")
execution = send_expirable("ada@example.com")   # stored; a worker runs it later
"""

from __future__ import annotations

from typing import Any

from deferq.app import App, configure, default_app
from deferq.errors import (
    ConfigurationError,
    DeferqError,
    ExecutionFailed,
    ExecutionNotCancellable,
    ExecutionNotFound,
    ExecutionNotReschedulable,
    FunctionNotRegistered,
    ResultNotReady,
    ResultTimeout,
)
from deferq.functions import (
    BackgroundFunction,
    add_metadata,
    assign_options,
    call_args,
    defer,
    delay,
    discard_after,
)
from deferq.models import Attempt, ErrorCode, Execution, ExecutionState, Page
from deferq.retry import RetryPolicy
from deferq.store.base import StoreUnavailable

__version__ = "0.1.0"

__all__ = [
    "App",
    "Attempt",
    "BackgroundFunction",
    "ConfigurationError",
    "DeferqError",
    "ErrorCode",
    "Execution",
    "ExecutionFailed",
    "ExecutionNotCancellable",
    "ExecutionNotFound",
    "ExecutionNotReschedulable",
    "ExecutionState",
    "FunctionNotRegistered",
    "Page",
    "ResultNotReady",
    "ResultTimeout",
    "RetryPolicy",
    "StoreUnavailable",
    "add_metadata",
    "assign_options",
    "await_result",
    "await_result_async",
    "call_args",
    "cancel_execution",
    "configure",
    "defer",
    "delay",
    "discard_after",
    "get_execution",
    "get_result",
    "list_attempts",
    "list_executions",
    "reschedule_execution",
    "rerun_execution",
]


def get_execution(execution_id: str) -> Execution:
    """The execution with this id, or `ExecutionNotFound`."""
    return default_app().get_execution(execution_id)


def get_result(execution_id: str) -> Any:
    """The return value; `ResultNotReady` while not finished; `ExecutionFailed` if it ended
    failed, aborted, cancelled or discarded."""
    return default_app().get_result(execution_id)


def await_result(fn: BackgroundFunction[Any, Any], *, timeout: float | None = None) -> Any:
    """A callable that enqueues `fn` and waits for its result, retries included."""
    return default_app().await_result(fn, timeout=timeout)


def await_result_async(fn: BackgroundFunction[Any, Any], *, timeout: float | None = None) -> Any:
    """As `await_result`, for async code."""
    return default_app().await_result_async(fn, timeout=timeout)


def cancel_execution(execution_id: str, force: bool = False) -> Execution:
    """Cancel a created execution; with `force=True`, abort a started one."""
    return default_app().cancel_execution(execution_id, force=force)


def reschedule_execution(execution_id: str, when: Any = None) -> Execution:
    """Give a created execution a new start time (duration, aware datetime, or now)."""
    return default_app().reschedule_execution(execution_id, when)


def rerun_execution(execution_id: str) -> Execution:
    """A new execution with the same function, arguments and metadata, due now."""
    return default_app().rerun_execution(execution_id)


def list_executions(**filters: Any) -> Page:
    """Executions newest first; see `App.list_executions` for the filters."""
    return default_app().list_executions(**filters)


def list_attempts(execution_id: str) -> list[Attempt]:
    """Every attempt of one execution."""
    return default_app().list_attempts(execution_id)
