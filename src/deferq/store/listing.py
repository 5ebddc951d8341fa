"""The `list_executions` query, built the same way for every SQL dialect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deferq.store.base import ExecutionQuery

MAX_PAGE_SIZE = 1000


def validate_query(query: ExecutionQuery) -> None:
    """Refuse a page size or cursor that cannot be served."""
    if type(query.first) is not int or not 1 <= query.first <= MAX_PAGE_SIZE:
        raise ValueError(f"first must be an integer from 1 to {MAX_PAGE_SIZE}, not {query.first!r}")
    if query.after is not None and not isinstance(query.after, str):
        raise TypeError(f"after must be a cursor string, not {query.after!r}")
    for name in ("scheduled_between", "started_between"):
        value = getattr(query, name)
        if value is not None and (not isinstance(value, tuple | list) or len(value) != 2):
            raise ValueError(f"{name} must be a (start, end) pair, not {value!r}")


def build_where(
    query: ExecutionQuery,
    placeholder: str,
    time_param: Callable[[Any], Any],
    metadata_clause: Callable[[str, list[str]], tuple[str, list[Any]]],
) -> tuple[str, list[Any]]:
    """The WHERE clause (without the word) and its parameters.

    `metadata_clause(key, values)` returns the dialect's test that the row's metadata has
    `key` with one of `values`, and that test's parameters.
    """
    clauses: list[str] = []
    params: list[Any] = []

    def one_of(column: str, values: Any) -> None:
        values = [str(v) for v in values]
        if not values:
            clauses.append("1 = 0")
            return
        clauses.append(f"{column} IN ({', '.join([placeholder] * len(values))})")
        params.extend(values)

    if query.states is not None:
        one_of("state", query.states)
    if query.functions is not None:
        one_of("function_name", query.functions)
    if query.error_codes is not None:
        one_of("error_code", query.error_codes)
    for key, values in (query.metadata or {}).items():
        if isinstance(values, str):
            values = [values]
        values = list(values)
        if not values:
            clauses.append("1 = 0")
            continue
        clause, clause_params = metadata_clause(str(key), [str(v) for v in values])
        clauses.append(clause)
        params.extend(clause_params)
    for column, between in (
        ("scheduled_for", query.scheduled_between),
        ("started_at", query.started_between),
    ):
        if between is None:
            continue
        # A range, even an open one, asks for executions that have that time at all.
        clauses.append(f"{column} IS NOT NULL")
        start, end = between
        if start is not None:
            clauses.append(f"{column} >= {placeholder}")
            params.append(time_param(start))
        if end is not None:
            clauses.append(f"{column} < {placeholder}")
            params.append(time_param(end))
    if query.after is not None:
        clauses.append(f"id < {placeholder}")
        params.append(query.after)
    return (" AND ".join(clauses) or "1 = 1"), params
