"""The SQLite store under pressure: a write lock held past the busy timeout, and connections
of threads that have ended."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import deferq
from deferq import StoreUnavailable
from deferq.errors import ConfigurationError
from deferq.store.sqlite import BUSY_TIMEOUT_MS, SQLiteStore, busy_timeout_from_url
from tests.support import WorkerProcess, wait_until
from tests.tasks import basic


def test_a_worker_outlasts_a_write_lock_held_past_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "deferq.sqlite3"
    url = f"sqlite:///{path}?busy_timeout=200ms"
    app = deferq.App(url)
    executions = app.enqueue_many(basic.sleep_for, [(0.05,)] * 40)
    log = tmp_path / "worker.log"

    with WorkerProcess(url, ["tests.tasks.basic"], "--slots", "2", log_path=log) as worker:
        wait_until(lambda: app.list_executions(states=["succeeded"], first=2).items)

        # Another process's connection holds the write lock for 7 busy timeouts: attempts
        # end meanwhile, and the worker can neither record them nor claim.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        time.sleep(1.4)
        blocker.execute("ROLLBACK")
        blocker.close()

        def succeeded() -> int:
            return len(app.list_executions(states=["succeeded"], first=100).items)

        wait_until(lambda: succeeded() == 40, timeout=30, what="every execution succeeded")
        assert worker.process is not None and worker.process.poll() is None
    for execution in executions:
        attempts = app.list_attempts(execution.id)
        assert [a.outcome.value for a in attempts] == ["succeeded"], execution.id
    assert "action=store_unavailable" in log.read_text()
    app.close()


def test_a_write_while_another_connection_holds_the_lock_is_store_unavailable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "deferq.sqlite3"
    app = deferq.App(f"sqlite:///{path}?busy_timeout=50ms")
    first = app.enqueue(basic.add, (1, 2), {})
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            app.enqueue(basic.add, (3, 4), {})
        with pytest.raises(StoreUnavailable, match="locked"):
            app.enqueue_many(basic.add, [(5, 6), (7, 8)])
        with pytest.raises(StoreUnavailable, match="locked"):
            app.cancel_execution(first.id)
        assert app.get_execution(first.id).state == "created"  # reads go on in WAL mode
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert [e.id for e in app.list_executions().items] == [first.id]
    assert app.cancel_execution(first.id).state == "cancelled"
    app.close()


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", BUSY_TIMEOUT_MS), ("?busy_timeout=5s", 5000), ("?busy_timeout=250ms", 250)],
)
def test_the_busy_timeout_comes_from_the_url(query: str, expected: int) -> None:
    assert busy_timeout_from_url(f"sqlite:///store.sqlite3{query}") == expected


@pytest.mark.parametrize(
    ("query", "quoted"),
    [
        ("?busy_timeout=soon", "'soon'"),
        ("?busy_timeout", "'busy_timeout'"),
        ("?timeout=5s", "'timeout=5s'"),
        ("?busy_timeout=-1s", "'-1s'"),
    ],
)
def test_bad_url_parameters_are_refused(query: str, quoted: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        SQLiteStore(f"sqlite:///store.sqlite3{query}")
    assert quoted in str(caught.value)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
def test_connections_of_ended_threads_are_closed(sqlite_url: str) -> None:
    app = deferq.App(sqlite_url)
    stored = app.enqueue(basic.add, (1, 2), {})
    before = open_fds()
    errors: list[BaseException] = []

    def read_once() -> None:
        try:
            assert app.get_execution(stored.id).id == stored.id
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    for _ in range(400):
        threads = [threading.Thread(target=read_once) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        del threads
    assert errors == []

    # 4,000 threads each opened a connection (2 or 3 fds) and closed it when it ended. SQLite
    # defers closing the file of a closed connection while another connection of the process
    # holds a lock on it, and reuses such files for new connections: a few stay open, as many
    # as threads ran at once, not one per thread.
    wait_until(lambda: open_fds() <= before + 30, timeout=10, what="thread connections closed")
    assert len(app.store._connections) == 1  # type: ignore[attr-defined]
    app.close()
    assert open_fds() <= before


def test_close_closes_the_connections_of_live_threads(sqlite_url: str) -> None:
    store = SQLiteStore(sqlite_url)
    ready, done = threading.Event(), threading.Event()
    held: list[sqlite3.Connection] = []

    def use_store() -> None:
        held.append(store.conn)
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=use_store)
    thread.start()
    ready.wait(10)
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        held[0].execute("SELECT 1")
    done.set()
    thread.join()
