"""A worker that loses touch with the store, or is paused past --lost-after, stops its own
running attempts before they can run beside their retry; and stopping an attempt stops what
it started: subprocesses, asyncio tasks. Real worker processes, real signals.

A worker is cut off from the store for real: on SQLite the test holds the write lock (a
long `BEGIN EXCLUSIVE`), so no heartbeat can be stored; on PostgreSQL the worker reaches the
server through a loopback proxy of the test's own that stops passing bytes, as a network
partition would, and passes them again when it heals.

No overlap is checked from both points of view: the attempts' times in the store, and the
ticks the running code writes to a marker file while it runs.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from deferq.app import App
from deferq.models import Execution
from tests.support import WorkerProcess, wait_until
from tests.tasks import contact
from tests.tasks.contact import read_ticks
from tests.tasks.control import process_alive, starts

MODULE = "tests.tasks.contact"
FAST_LOSS = ("--heartbeat-interval", "200ms", "--lost-after", "1s")


class Partition:
    """A TCP proxy on loopback between one worker and PostgreSQL that can stop passing
    bytes in both directions (connections stay open, as in a network partition) and pass
    them again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with suppress(OSError):
            while not self.closed.is_set():
                self.flowing.wait()
                readable, _, _ = select.select([source], [], [], 0.05)
                if not readable or not self.flowing.is_set():
                    continue
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        with suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()
        self.listener.close()
        for sock in self.sockets:
            with suppress(OSError):
                sock.close()


class StoreAccess:
    """Cuts one worker (the first one started with `cut_off_url`) off from the store."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self.partition: Partition | None = None
        self.lock: sqlite3.Connection | None = None
        if store_url.startswith("postgresql"):
            parts = urlsplit(store_url)
            self.partition = Partition((parts.hostname or "127.0.0.1", parts.port or 5432))
            netloc = parts.netloc.replace(f":{parts.port or 5432}", f":{self.partition.port}")
            self.cut_off_url = urlunsplit(parts._replace(netloc=netloc))
        else:
            self.cut_off_url = store_url

    def cut(self) -> None:
        if self.partition is not None:
            self.partition.cut()
        else:
            # Every writer waits, the cut-off worker's heartbeats included (readers do not).
            path = self.store_url.removeprefix("sqlite:///")
            self.lock = sqlite3.connect(path, isolation_level=None, timeout=30)
            self.lock.execute("BEGIN EXCLUSIVE")

    def heal(self) -> None:
        if self.partition is not None:
            self.partition.heal()
        elif self.lock is not None:
            self.lock.execute("ROLLBACK")
            self.lock.close()
            self.lock = None

    def close(self) -> None:
        self.heal()
        if self.partition is not None:
            self.partition.close()


@pytest.fixture
def access(store_url: str) -> Iterator[StoreAccess]:
    access = StoreAccess(store_url)
    yield access
    access.close()


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "runs.log")


@pytest.fixture
def workers(app: App, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(url: str, *args: str) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(url, [MODULE], *args, log_path=log_path)
        started.append(worker.start())
        return worker

    yield start
    for worker in started:
        worker.__exit__(None, None, None)
    for path in sorted(tmp_path.glob("worker-*.log")):
        print(f"--- {path.name}")
        print("\n".join(path.read_text(errors="replace").splitlines()[-40:]))


def wait_final(app: App, execution_id: str, timeout: float = 30.0) -> Execution:
    return wait_until(
        lambda: (e := app.get_execution(execution_id)).state.is_final and e,
        timeout,
        what=f"execution {execution_id} to reach a final state",
    )


def at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def assert_first_run_stopped_before_the_second(
    app: App, execution: Execution, log: str, marker: str, paused: bool = False
) -> None:
    """The first attempt was lost and its retry succeeded; the first attempt's code ran no
    more once the retry began, and (unless it was paused meanwhile, which is not running)
    its process was gone by then."""
    attempts = app.list_attempts(execution.id)
    assert [a.error_code for a in attempts] == ["worker_lost", None]
    first, second = attempts
    assert first.finished_at is not None and first.finished_at <= second.started_at
    run_1, run_2 = starts(log, "cut-off")
    if not paused:
        assert run_2["alive"] == [], "the retry began while the first attempt's process lived"
    late = [t for pid, t in read_ticks(marker) if pid == run_1["pid"] and t >= run_2["at"]]
    assert late == [], f"the first attempt still ran {len(late)} ticks into its retry"


@contextmanager
def continued_at_exit(*pids: int) -> Iterator[None]:
    try:
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_a_worker_cut_off_from_the_store_stops_its_attempts_before_they_are_retried(
    app: App, store_url: str, access: StoreAccess, workers: Any, log: str, tmp_path: Path
) -> None:
    """Its heartbeats cannot be stored: before another worker may declare it lost (1 s),
    it stops its running attempt (at half of that), and claims nothing until a heartbeat
    is stored again. The attempt is recorded worker_lost and retried once."""
    marker = str(tmp_path / "ticks")
    workers(access.cut_off_url, "--slots", "1", "--prefetch", "0", *FAST_LOSS)
    execution = contact.ticks_first_time(log, "cut-off", marker)
    (run,) = wait_until(lambda: starts(log, "cut-off"), 20, what="the first run to begin")
    workers(store_url, "--slots", "1", *FAST_LOSS)

    access.cut()
    try:
        wait_until(lambda: not process_alive(run["pid"]), 5, what="the attempt to be stopped")
        if access.partition is None:
            # SQLite: nobody can store anything meanwhile; stay cut off past --lost-after.
            time.sleep(1.5)
    finally:
        access.heal()

    assert wait_final(app, execution.id).state == "succeeded"
    assert_first_run_stopped_before_the_second(app, execution, log, marker)


def test_a_worker_resumed_after_a_pause_past_lost_after_stops_its_attempts_first(
    app: App, store_url: str, access: StoreAccess, workers: Any, log: str, tmp_path: Path
) -> None:
    """Paused (SIGSTOP, the worker and its attempt's process) until another worker has
    taken the attempt over, then resumed while it cannot reach the store, so the store
    cannot tell it it was declared lost: the time that passed must be enough for it to stop
    the attempt before the attempt's process runs again."""
    marker = str(tmp_path / "ticks")
    paused = workers(access.cut_off_url, "--slots", "1", "--prefetch", "0", *FAST_LOSS)
    execution = contact.ticks_first_time(log, "cut-off", marker, 3.0)
    (run,) = wait_until(lambda: starts(log, "cut-off"), 20, what="the first run to begin")
    workers(store_url, "--slots", "1", *FAST_LOSS)

    with continued_at_exit(paused.pid, run["pid"]):
        os.kill(run["pid"], signal.SIGSTOP)
        paused.signal(signal.SIGSTOP)
        wait_until(lambda: len(starts(log, "cut-off")) == 2, 20, what="the retry to begin")
        access.cut()
        try:
            paused.signal(signal.SIGCONT)
            wait_until(lambda: not process_alive(run["pid"]), 5, what="the attempt to stop")
        finally:
            access.heal()

    assert wait_final(app, execution.id).state == "succeeded"
    assert_first_run_stopped_before_the_second(app, execution, log, marker, paused=True)


def test_the_attempt_of_a_paused_worker_stops_itself_before_it_is_taken_over(
    app: App, store_url: str, workers: Any, log: str, tmp_path: Path
) -> None:
    """Only the worker's own process is paused (SIGSTOP; Ctrl-Z in a terminal does the same,
    as the attempt's process leads a group of its own): the attempt sees the worker's last
    contact with the store grow old and stops itself at half of --lost-after, before
    another worker declares the paused one lost and retries the attempt."""
    marker = str(tmp_path / "ticks")
    paused = workers(store_url, "--slots", "1", "--prefetch", "0", *FAST_LOSS)
    execution = contact.ticks_first_time(log, "cut-off", marker)
    (run,) = wait_until(lambda: starts(log, "cut-off"), 20, what="the first run to begin")
    workers(store_url, "--slots", "1", *FAST_LOSS)

    with continued_at_exit(paused.pid):
        paused.signal(signal.SIGSTOP)
        wait_until(lambda: not process_alive(run["pid"]), 5, what="the attempt to stop itself")
        wait_until(lambda: len(starts(log, "cut-off")) == 2, 20, what="the retry to begin")
        paused.signal(signal.SIGCONT)

    assert wait_final(app, execution.id).state == "succeeded"
    assert_first_run_stopped_before_the_second(app, execution, log, marker)


def test_an_attempt_that_holds_the_interpreter_lock_is_stopped_while_its_worker_is_paused(
    app: App, store_url: str, workers: Any, log: str, tmp_path: Path
) -> None:
    """A C call that never releases the interpreter lock stops every Python thread of the
    attempt's process: what watches the worker's contact runs outside it."""
    paused = workers(store_url, "--slots", "1", "--prefetch", "0", *FAST_LOSS)
    execution = contact.holds_the_interpreter_first_time(log, "cut-off", 60)
    (run,) = wait_until(lambda: starts(log, "cut-off"), 20, what="the first run to begin")
    workers(store_url, "--slots", "1", *FAST_LOSS)

    with continued_at_exit(paused.pid):
        paused.signal(signal.SIGSTOP)
        wait_until(lambda: not process_alive(run["pid"]), 5, what="the attempt to be stopped")
        wait_until(lambda: len(starts(log, "cut-off")) == 2, 20, what="the retry to begin")
        paused.signal(signal.SIGCONT)

    assert wait_final(app, execution.id).state == "succeeded"
    assert_first_run_stopped_before_the_second(app, execution, log, str(tmp_path / "none"))


# What an attempt leaves behind


def read_pid(path: Path) -> int:
    return int(wait_until(lambda: path.exists() and path.read_text(), 20, what=str(path)))


@pytest.mark.parametrize("stop", ["max_duration", "abort"])
def test_stopping_an_attempt_kills_the_subprocesses_it_started(
    app: App, store_url: str, workers: Any, tmp_path: Path, stop: str
) -> None:
    pid_file = tmp_path / "pid"
    workers(store_url, "--slots", "1")
    if stop == "max_duration":
        execution = contact.spawns_and_blocks(str(pid_file))
        pid = read_pid(pid_file)
    else:
        execution = contact.spawns_and_waits(str(pid_file), str(tmp_path / "never"))
        pid = read_pid(pid_file)
        app.cancel_execution(execution.id, force=True)
    try:
        final = wait_final(app, execution.id)
        assert final.error_code == ("timeout" if stop == "max_duration" else "aborted")
        wait_until(lambda: not process_alive(pid), 5, what="the subprocess to be killed")
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("swallow_cancel", [False, True], ids=["task", "task-ignoring-cancel"])
def test_tasks_an_async_attempt_leaves_behind_do_not_run_during_later_attempts(
    app: App, store_url: str, workers: Any, log: str, tmp_path: Path, swallow_cancel: bool
) -> None:
    """The leftover tasks are cancelled when the attempt ends; one that ignores its
    cancellation stays behind on an event loop that never runs again."""
    marker = str(tmp_path / "ticks")
    workers(store_url, "--slots", "1", "--prefetch", "0")
    leaves = contact.leaves_a_task(marker, swallow_cancel)
    assert wait_final(app, leaves.id).state == "succeeded"
    later = contact.naps(log, "later", 0.5)
    assert wait_final(app, later.id).state == "succeeded"

    (run,) = starts(log, "later")
    assert read_ticks(marker), "the leftover task never ran"
    during = [t for _, t in read_ticks(marker) if t >= run["at"]]
    assert during == [], f"a task of an earlier attempt ran {len(during)} times in a later one"


def test_threads_an_attempt_leaves_behind_run_on_into_later_attempts_a_known_limit(
    app: App, store_url: str, workers: Any, log: str, tmp_path: Path
) -> None:
    """docs/limits.md: a thread started by a function is not stopped when its attempt
    ends; it runs on beside the later attempts of its slot until it ends or the slot's
    process is stopped."""
    marker = str(tmp_path / "ticks")
    workers(store_url, "--slots", "1", "--prefetch", "0")
    leaves = contact.leaves_a_thread(marker, 1.5)
    assert wait_final(app, leaves.id).state == "succeeded"
    later = contact.sleeps(log, "later", 0.5)
    assert wait_final(app, later.id).state == "succeeded"
    (run,) = starts(log, "later")
    assert [t for _, t in read_ticks(marker) if t >= run["at"]], "the limit no longer holds"
