"""The `list_executions` query, built the same way for every SQL dialect."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from deferq.models import ErrorCode, ExecutionState, is_execution_id
from deferq.store.base import ExecutionQuery

MAX_PAGE_SIZE = 1000

KNOWN_ERROR_CODES = tuple(code.value for code in ErrorCode)
KNOWN_STATES = tuple(state.value for state in ExecutionState)


def validate_query(query: ExecutionQuery) -> None:
    """Refuse filters, a page size or a cursor that cannot be served: `TypeError` for a value
    of the wrong type, `ValueError` for an unknown state or error code, a naive datetime, a
    cursor that is not an execution id; each names the filter and quotes the value."""
    if type(query.first) is not int or not 1 <= query.first <= MAX_PAGE_SIZE:
        raise ValueError(f"first must be an integer from 1 to {MAX_PAGE_SIZE}, not {query.first!r}")
    if query.after is not None and not isinstance(query.after, str):
        raise TypeError(f"after must be a cursor string, not {query.after!r}")
    if query.after is not None and not is_execution_id(query.after):
        raise ValueError(f"invalid cursor {_quote(query.after)}: not an execution id")
    _check_texts("states", query.states)
    for state in query.states or ():
        if state not in KNOWN_STATES:
            raise ValueError(f"unknown state {state!r} (states: {', '.join(KNOWN_STATES)})")
    _check_texts("functions", query.functions)
    _check_texts("error_codes", query.error_codes)
    unknown = [code for code in query.error_codes or () if code not in KNOWN_ERROR_CODES]
    if unknown:
        raise ValueError(
            f"unknown error code{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (error codes: {', '.join(KNOWN_ERROR_CODES)})"
        )
    _check_metadata_filter(query.metadata)
    for name in ("scheduled_between", "started_between"):
        value = getattr(query, name)
        if value is None:
            continue
        if not isinstance(value, tuple | list) or len(value) != 2:
            raise ValueError(f"{name} must be a (start, end) pair, not {_quote(value)}")
        for end, instant in zip(("start", "end"), value, strict=True):
            _check_instant(f"{name} {end}", instant)


def _check_texts(name: str, values: Any) -> None:
    if values is None:
        return
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple):
        raise TypeError(f"{name} must be a list of str, not {_quote(values)}")
    for value in values:
        if type(value) is not str:
            raise TypeError(
                f"{name} must be a list of str; {_quote(value)} is a {type(value).__name__}"
            )
        _check_no_nul(name, value)


def _check_no_nul(name: str, value: str) -> None:
    # Nothing stored holds NUL (arguments, names and metadata refuse it), and PostgreSQL
    # cannot even compare with it.
    if "\x00" in value:
        raise ValueError(f"{name} value {_quote(value)} contains NUL, which nothing stored holds")


def _check_metadata_filter(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata must be a mapping of keys to a value or a list of values, "
            f"not {_quote(metadata)}"
        )
    for key, values in metadata.items():
        if type(key) is not str:
            raise TypeError(f"metadata filter key {_quote(key)} must be a str")
        _check_no_nul("metadata filter key", key)
        if type(values) is str:
            _check_no_nul(f"metadata filter of key {key!r}", values)
            continue
        if not isinstance(values, list | tuple | set | frozenset):
            raise TypeError(
                f"metadata filter of key {key!r} must be a str or a list of str, "
                f"not {_quote(values)}"
            )
        for value in values:
            if type(value) is not str:
                raise TypeError(
                    f"metadata filter of key {key!r} holds {_quote(value)}, "
                    f"a {type(value).__name__}; values are str"
                )
            _check_no_nul(f"metadata filter of key {key!r}", value)


def _check_instant(label: str, instant: Any) -> None:
    if instant is None:
        return
    if not isinstance(instant, datetime):
        raise TypeError(
            f"{label} must be an aware datetime or None, not {_quote(instant)} "
            f"({type(instant).__name__})"
        )
    if instant.utcoffset() is None:
        raise ValueError(
            f"{label} {instant.isoformat()!r} is a naive datetime; pass an aware one, e.g. "
            "datetime(2026, 1, 1, tzinfo=timezone.utc)"
        )


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..."


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


def split_by_state(query: ExecutionQuery) -> list[ExecutionQuery]:
    """The query once per state asked for, when it asks for several.

    An index on (state, id) holds each state's executions in id order, but not several
    states' together: a store reads one page of each state in order and merges them, rather
    than walking every execution newest first (or sorting every match) to find a page.
    Empty when the query asks for fewer than two states.
    """
    states = list(dict.fromkeys(query.states or ()))
    if len(states) < 2 or _filter_values(query) > MAX_SPLIT_VALUES:
        return []
    return [dataclasses.replace(query, states=[state]) for state in states]


MAX_SPLIT_VALUES = 100
"""Each per-state read repeats the other filters' values as parameters; past this many
values the query is not split (PostgreSQL takes at most 65,535 parameters a statement)."""


def _filter_values(query: ExecutionQuery) -> int:
    metadata = query.metadata or {}
    return (
        len(query.functions or ())
        + len(query.error_codes or ())
        + sum(1 if isinstance(v, str) else len(v) for v in metadata.values())
    )


def listing_sql(
    query: ExecutionQuery,
    placeholder: str,
    time_param: Callable[[Any], Any],
    metadata_clause: Callable[[str, list[str]], tuple[str, list[Any]]],
) -> tuple[str, list[Any]]:
    """The page query of `list_executions` (one row more than the page, to tell whether
    another follows) and its parameters, newest first. Several states are read as one
    ordered, limited read per state, merged (see `split_by_state`)."""
    limit = query.first + 1
    parts = split_by_state(query)
    if not parts:
        where, params = build_where(query, placeholder, time_param, metadata_clause)
        sql = f"SELECT * FROM deferq_executions WHERE {where} ORDER BY id DESC LIMIT {placeholder}"
        return sql, [*params, limit]
    arms: list[str] = []
    params = []
    for number, part in enumerate(parts):
        where, part_params = build_where(part, placeholder, time_param, metadata_clause)
        arms.append(
            f"SELECT * FROM (SELECT * FROM deferq_executions WHERE {where}"
            f" ORDER BY id DESC LIMIT {placeholder}) AS state_{number}"
        )
        params += [*part_params, limit]
    merged = " UNION ALL ".join(arms)
    sql = f"SELECT * FROM ({merged}) AS page ORDER BY id DESC LIMIT {placeholder}"
    return sql, [*params, limit]
