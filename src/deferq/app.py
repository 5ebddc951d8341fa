"""`App`: one store and the operations on its executions. Module-level functions use the
default app, configured by `DEFERQ_URL` or `deferq.configure(url=...)`."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from deferq.durations import parse_when
from deferq.errors import (
    ConfigurationError,
    ExecutionFailed,
    ExecutionNotFound,
    ResultNotReady,
    ResultTimeout,
)
from deferq.functions import DEFAULT_MAX_DURATION, BackgroundFunction
from deferq.ids import new_execution_id
from deferq.models import Attempt, Execution, ExecutionState, Page, is_execution_id
from deferq.serialization import decode_result, encode_arguments
from deferq.store.base import ExecutionQuery, NewExecution, Store
from deferq.store.listing import validate_query

logger = logging.getLogger("deferq")

DEFAULT_URL = "sqlite:///deferq.sqlite3"
MAX_BULK = 100_000


def open_store(url: str) -> Store:
    """The store a URL names: `sqlite:///file` or `postgresql://...`."""
    if url.startswith("sqlite:"):
        from deferq.store.sqlite import SQLiteStore

        return SQLiteStore(url)
    if url.startswith(("postgresql:", "postgres:")):
        try:
            from deferq.store.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigurationError(
                f"the PostgreSQL store needs psycopg: pip install 'deferq[postgres]' ({exc})"
            ) from exc
        return PostgresStore(url)
    raise ConfigurationError(
        f"unknown store URL {url!r}: expected sqlite:///path or postgresql://..."
    )


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
    return url


class App:
    """A store and everything done with its executions."""

    def __init__(self, url: str | None = None) -> None:
        self._url = url
        self._store: Store | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._url or os.environ.get("DEFERQ_URL") or DEFAULT_URL

    @property
    def store(self) -> Store:
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    self._store = open_store(self.url)
                    logger.debug(
                        "Using store",
                        extra={"action": "open_store", "store": redact(self.url)},
                    )
                store = self._store
        return store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # Enqueueing

    def new_execution(
        self, fn: BackgroundFunction[Any, Any], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> NewExecution:
        """Validate one call and turn it into the row to store. Raises before anything is
        stored when an argument cannot be stored exactly."""
        fn.check_arguments(args, kwargs)
        options = fn.call_options
        scheduled = options.delay if options.delay is not None else timedelta(0)
        if options.discard_after is not None:
            _check_discard_after(scheduled, options.discard_after)
        policy = fn.options.retry
        return NewExecution(
            id=new_execution_id(),
            function_name=fn.name,
            arguments=encode_arguments(
                tuple(args),
                dict(kwargs),
                function_name=fn.name,
                positional_names=fn.positional_names,
            ),
            scheduled=scheduled,
            discard=options.discard_after,
            metadata=options.metadata,
            retry_policy=json.dumps(policy.to_dict()) if policy.max_retries else None,
            max_duration=fn.options.max_duration.total_seconds(),
        )

    def enqueue(
        self, fn: BackgroundFunction[Any, Any], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Execution:
        return self.store.enqueue([self.new_execution(fn, args, kwargs)])[0]

    def enqueue_many(
        self, fn: BackgroundFunction[Any, Any], calls: Iterable[Any]
    ) -> list[Execution]:
        items: list[NewExecution] = []
        for index, call in enumerate(calls):
            if len(items) >= MAX_BULK:
                raise ValueError(f"enqueue_many takes at most {MAX_BULK} calls at once")
            args, kwargs = _split_call(call, index)
            items.append(self.new_execution(fn, args, kwargs))
        return self.store.enqueue(items) if items else []

    def enqueue_in_transaction(
        self,
        connection: Any,
        fn: BackgroundFunction[Any, Any],
        *args: Any,
        **kwargs: Any,
    ) -> Execution:
        """Store an execution inside the caller's own database transaction (PostgreSQL): it
        exists if and only if that transaction commits."""
        return self.store.enqueue([self.new_execution(fn, args, kwargs)], connection=connection)[0]

    # Reading

    def get_execution(self, execution_id: str) -> Execution:
        """The execution with this id, or `ExecutionNotFound`."""
        execution = self.store.get_execution(_check_id(execution_id))
        if execution is None:
            raise ExecutionNotFound(execution_id)
        return execution

    def get_result(self, execution_id: str) -> Any:
        """The return value of a succeeded execution.

        Raises `ResultNotReady` while it has not finished, `ExecutionFailed` if it ended
        failed, aborted, cancelled or discarded."""
        found = self.store.get_result(_check_id(execution_id))
        if found is None:
            raise ExecutionNotFound(execution_id)
        return _result_of(*found)

    def list_executions(
        self,
        *,
        states: Iterable[str] | None = None,
        functions: Iterable[str | BackgroundFunction[Any, Any]] | None = None,
        error_codes: Iterable[str] | None = None,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
        scheduled_between: tuple[datetime | None, datetime | None] | None = None,
        started_between: tuple[datetime | None, datetime | None] | None = None,
        first: int = 50,
        after: str | None = None,
    ) -> Page:
        """Executions newest first, filtered; pass `page.next_cursor` as `after` for more.

        `metadata={"flow": ["sign-in", "sign-up"], "user_id": "42"}` matches executions whose
        `flow` is either value AND whose `user_id` is 42. A cursor belongs to the filters of
        the listing that gave it: passed with other filters, or changed, it raises
        `ValueError`."""
        query = ExecutionQuery(
            states=_states(states),
            functions=(
                None if functions is None else [_name(f) for f in _listed(functions, "functions")]
            ),
            error_codes=None if error_codes is None else _listed(error_codes, "error_codes"),
            metadata=None if metadata is None else _mapping(metadata, "metadata"),
            scheduled_between=scheduled_between,
            started_between=started_between,
            first=first,
        )
        validate_query(query)
        if after is not None:
            query = dataclasses.replace(query, after=_read_cursor(after, query))
        page = self.store.list_executions(query)
        if page.next_cursor is None:
            return page
        return Page(items=page.items, next_cursor=_make_cursor(page.next_cursor, query))

    def list_attempts(self, execution_id: str) -> list[Attempt]:
        """Every attempt of one execution, first to last."""
        attempts = self.store.list_attempts(_check_id(execution_id))
        if not attempts:
            self.get_execution(execution_id)
        return attempts

    # Changing

    def cancel_execution(self, execution_id: str, force: bool = False) -> Execution:
        """Cancel a `created` execution; with `force=True`, abort a `started` one too.

        Raises `ExecutionNotCancellable` for any other state. The request is stored, so it
        holds while workers are down or restarting."""
        return self.store.cancel_execution(_check_id(execution_id), bool(force))

    def reschedule_execution(self, execution_id: str, when: Any = None) -> Execution:
        """Give a `created` execution a new start time: a duration from now, an aware
        datetime, or now (None). Its `discard_after` is unchanged."""
        target = timedelta(0) if when is None else parse_when(when, name="when")
        return self.store.reschedule_execution(_check_id(execution_id), target)

    def rerun_execution(self, execution_id: str) -> Execution:
        """A new execution with the same function, arguments and metadata, due now."""
        old = self.get_execution(execution_id)
        item = NewExecution(
            id=new_execution_id(),
            function_name=old.function_name,
            arguments=old.arguments_json or "[[],{}]",
            scheduled=timedelta(0),
            metadata=old.metadata,
            retry_policy=old.retry_policy_json,
            max_duration=old.max_duration or DEFAULT_MAX_DURATION.total_seconds(),
        )
        return self.store.enqueue([item])[0]

    # Waiting

    def await_result(
        self, fn: BackgroundFunction[Any, Any], *, timeout: float | None = None
    ) -> Callable[..., Any]:
        """A callable that enqueues `fn` and waits for its result, retries included.

        Raises `ExecutionFailed` if it ends without a result, `ResultTimeout` after `timeout`
        seconds."""

        def call(*args: Any, **kwargs: Any) -> Any:
            execution = self.enqueue(fn, args, kwargs)
            return self.wait_for_result(execution.id, timeout=timeout)

        return call

    def await_result_async(
        self, fn: BackgroundFunction[Any, Any], *, timeout: float | None = None
    ) -> Callable[..., Any]:
        """As `await_result`, for async code: waits without blocking the event loop."""

        async def call(*args: Any, **kwargs: Any) -> Any:
            execution = await asyncio.to_thread(self.enqueue, fn, args, kwargs)
            return await self.wait_for_result_async(execution.id, timeout=timeout)

        return call

    def wait_for_result(self, execution_id: str, *, timeout: float | None = None) -> Any:
        """Block until the execution is final, then return its result (see `get_result`)."""
        _check_id(execution_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            found = self.store.get_result(execution_id)
            if found is None:
                raise ExecutionNotFound(execution_id)
            execution, result = found
            if execution.state.is_final:
                return _result_of(execution, result)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(execution, timeout or 0)
            time.sleep(pause if deadline is None else min(pause, deadline - time.monotonic()))
            pause = min(pause * 1.5, 0.1)

    async def wait_for_result_async(
        self, execution_id: str, *, timeout: float | None = None
    ) -> Any:
        _check_id(execution_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            found = await asyncio.to_thread(self.store.get_result, execution_id)
            if found is None:
                raise ExecutionNotFound(execution_id)
            execution, result = found
            if execution.state.is_final:
                return _result_of(execution, result)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(execution, timeout or 0)
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.1)


def _result_of(execution: Execution, result: str | None) -> Any:
    if execution.state == ExecutionState.SUCCEEDED:
        return None if result is None else decode_result(result)
    if execution.state.is_final:
        raise ExecutionFailed(execution)
    raise ResultNotReady(execution)


def _check_discard_after(scheduled: timedelta | datetime, discard: timedelta | datetime) -> None:
    now = datetime.now(UTC)
    start = now + scheduled if isinstance(scheduled, timedelta) else scheduled
    end = now + discard if isinstance(discard, timedelta) else discard
    # discard_after=0 alone is allowed ("now or never"); after a delay it could never start.
    if end < start or (end == start and discard != timedelta(0)):
        raise ValueError(
            f"discard_after {_show(discard)} is not after the start time {_show(scheduled)}: "
            "the execution could never start"
        )


def _show(value: timedelta | datetime) -> str:
    return value.isoformat() if isinstance(value, datetime) else f"in {value}"


def _check_id(execution_id: Any) -> str:
    """The id to look up. Text that is not shaped like an execution id names no execution:
    `ExecutionNotFound`, on every store alike, without asking the store."""
    if not isinstance(execution_id, str) or not execution_id:
        raise TypeError(f"an execution id is a non-empty string, not {execution_id!r}")
    if not is_execution_id(execution_id):
        raise ExecutionNotFound(execution_id)
    return execution_id


# Cursors: the last id of a page, then a check of that id and the filters, so that a cursor
# passed back with other filters, cut or changed is refused instead of listing the wrong rows.

_CURSOR_CHECK_LENGTH = 16


def _make_cursor(last_id: str, query: ExecutionQuery) -> str:
    return f"{last_id}.{_cursor_check(last_id, query)}"


def _read_cursor(cursor: Any, query: ExecutionQuery) -> str:
    if not isinstance(cursor, str):
        raise TypeError(f"after must be a cursor string, not {cursor!r}")
    last_id, _, check = cursor.partition(".")
    if not is_execution_id(last_id) or len(check) != _CURSOR_CHECK_LENGTH:
        raise ValueError(
            f"invalid cursor {_quote(cursor)}: pass the next_cursor of a page as it came"
        )
    if check != _cursor_check(last_id, query):
        raise ValueError(
            f"cursor {_quote(cursor)} does not belong to these filters: it came from a "
            "listing with other filters, or was changed; pass it with the filters of the "
            "page it came from"
        )
    return last_id


def _cursor_check(last_id: str, query: ExecutionQuery) -> str:
    def instants(between: Any) -> Any:
        if between is None:
            return None
        return [None if t is None else t.astimezone(UTC).isoformat() for t in between]

    def values(items: Any) -> Any:
        return None if items is None else sorted(set(items))

    metadata = None
    if query.metadata is not None:
        metadata = {
            key: sorted({v} if isinstance(v, str) else set(v)) for key, v in query.metadata.items()
        }
    filters = {
        "after": last_id,
        "states": values(query.states),
        "functions": values(query.functions),
        "error_codes": values(query.error_codes),
        "metadata": metadata,
        "scheduled_between": instants(query.scheduled_between),
        "started_between": instants(query.started_between),
    }
    text = json.dumps(filters, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=_CURSOR_CHECK_LENGTH // 2).hexdigest()


def _quote(value: str) -> str:
    return repr(value) if len(value) <= 80 else repr(value[:60]) + "..."


def _split_call(call: Any, index: int) -> tuple[Sequence[Any], Mapping[str, Any]]:
    if (
        isinstance(call, tuple)
        and len(call) == 2
        and isinstance(call[0], tuple)
        and isinstance(call[1], dict)
    ):
        return call[0], call[1]
    if isinstance(call, tuple):
        return call, {}
    if isinstance(call, dict):
        return (), call
    raise TypeError(
        f"enqueue_many item {index} must be a tuple of arguments, a dict of keyword arguments "
        f"or call_args(...), not {call!r}"
    )


def _listed(values: Any, name: str) -> list[Any]:
    if isinstance(values, str):
        return [values]
    if isinstance(values, bytes | Mapping) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a str or a list of str, not {values!r}")
    return list(values)


def _mapping(values: Any, name: str) -> dict[Any, Any]:
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{name} must be a mapping of keys to a value or a list of values, not {values!r}"
        )
    return dict(values)


def _states(states: Iterable[str] | None) -> list[str] | None:
    if states is None:
        return None
    result = []
    for state in _listed(states, "states"):
        try:
            result.append(ExecutionState(state).value)
        except ValueError:
            known = ", ".join(s.value for s in ExecutionState)
            raise ValueError(f"unknown state {state!r} (states: {known})") from None
    return result


def _name(fn: str | BackgroundFunction[Any, Any]) -> str:
    if isinstance(fn, BackgroundFunction):
        return fn.name
    if not isinstance(fn, str):
        raise TypeError(
            f"functions must be names or background functions, not {fn!r} ({type(fn).__name__})"
        )
    return fn


_default: App | None = None
_default_lock = threading.Lock()


def default_app() -> App:
    """The app module-level functions use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = App()
    return _default


def configure(url: str | None = None) -> App:
    """Point the default app at a store: `configure(url="postgresql://...")`."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = App(url)
    return _default
