"""Helpers of the PostgreSQL store's tests."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from deferq.ids import new_execution_id
from deferq.store.base import NewExecution, When


def new(
    function_name: str = "tests.job",
    scheduled: When = timedelta(0),
    **fields: Any,
) -> NewExecution:
    """An execution to enqueue, due now unless told otherwise."""
    return NewExecution(
        id=new_execution_id(),
        function_name=function_name,
        arguments=fields.pop("arguments", "[[],{}]"),
        scheduled=scheduled,
        **fields,
    )


def backend_pids(store: Any) -> list[int]:
    """Server process ids of a store's idle pooled connections."""
    return [item.conn.info.backend_pid for item in store._pool.idle]
