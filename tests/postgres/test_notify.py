"""LISTEN/NOTIFY: a waiting worker wakes as soon as work arrives, and falls back to polling
when its listening connection breaks."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from multiprocessing.connection import wait as wait_for_any
from typing import Any

import pytest

from deferq.models import AttemptOutcome
from deferq.store.base import AttemptReport, FunctionLimits
from tests.postgres.support import new
from tests.support import wait_until

psycopg = pytest.importorskip("psycopg")

from deferq.store import postgres  # noqa: E402
from deferq.store.postgres import ListenWatcher, PostgresStore  # noqa: E402

pytestmark = pytest.mark.postgres

TIMEOUT = 10.0


def woken_after(watcher: ListenWatcher, action: Any) -> float:
    """Seconds from `action()` to the watcher's socket becoming readable, as the worker's
    main loop waits on it; TIMEOUT if it never does."""
    fileno = watcher.fileno()
    assert fileno is not None
    ready = threading.Event()
    woken: list[float] = []

    def wait() -> None:
        ready.set()
        if wait_for_any([fileno], TIMEOUT):
            woken.append(time.monotonic())

    waiter = threading.Thread(target=wait)
    waiter.start()
    ready.wait()
    started = time.monotonic()
    action()
    waiter.join()
    return (woken[0] if woken else started + TIMEOUT) - started


def test_an_enqueue_wakes_a_waiting_watcher_at_once(store: PostgresStore, open_store: Any) -> None:
    watcher = store.watch()
    try:
        assert watcher.changed() is False
        caller = open_store()  # another process, as far as connections go
        assert woken_after(watcher, lambda: caller.enqueue([new()])) < TIMEOUT / 5
        assert watcher.changed() is True
        assert watcher.changed() is False  # the news was consumed

        assert woken_after(watcher, lambda: caller.enqueue([new(), new()])) < TIMEOUT / 5
        assert watcher.changed() is True
    finally:
        watcher.close()


def test_a_reschedule_and_an_interrupted_attempt_wake_watchers(store: PostgresStore) -> None:
    later = store.enqueue([new(scheduled=timedelta(hours=1))])[0]
    running = store.enqueue([new()])[0]
    (claimed,) = store.claim_due_executions("w", {"tests.job": FunctionLimits()}, 1)
    assert claimed.execution_id == running.id
    watcher = store.watch()
    try:
        reschedule = lambda: store.reschedule_execution(later.id, timedelta(0))  # noqa: E731
        assert woken_after(watcher, reschedule) < TIMEOUT / 5
        assert watcher.changed() is True

        report = AttemptReport(running.id, claimed.number, AttemptOutcome.INTERRUPTED)
        interrupt = lambda: store.record_attempt_reports([report])  # noqa: E731
        assert woken_after(watcher, interrupt) < TIMEOUT / 5
        assert watcher.changed() is True
    finally:
        watcher.close()


def test_a_broken_listening_connection_falls_back_to_polling_then_listens_again(
    store: PostgresStore, admin: Any, open_store: Any
) -> None:
    watcher = store.watch()
    try:
        assert watcher.conn is not None and watcher.poll_interval is None
        pid = watcher.conn.info.backend_pid
        kill = lambda: admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # noqa: E731
        assert woken_after(watcher, kill) < TIMEOUT / 5
        assert wait_until(watcher.changed, 5, what="the watcher to notice the broken connection")
        assert watcher.fileno() is None
        assert watcher.poll_interval == postgres.FALLBACK_POLL_SECONDS
        assert watcher.changed() is True  # while polling, every look may find work

        watcher._retry_at = 0.0  # the retry interval has passed
        assert watcher.changed() is True
        assert watcher.fileno() is not None and watcher.poll_interval is None
        caller = open_store()
        assert woken_after(watcher, lambda: caller.enqueue([new()])) < TIMEOUT / 5
    finally:
        watcher.close()


def test_a_watcher_that_cannot_connect_polls(store: PostgresStore) -> None:
    watcher = ListenWatcher("host=127.0.0.1 port=1 user=postgres connect_timeout=2", "deferq")
    try:
        assert watcher.fileno() is None
        assert watcher.poll_interval == postgres.FALLBACK_POLL_SECONDS
        assert watcher.changed() is True
    finally:
        watcher.close()
