"""The worker: a main loop that claims due executions, slots that run them in child
processes, and named side tasks (recorder, heartbeat, abort watcher, rescuer, discarder,
scheduler), supervised: if a side task dies, the worker stops loudly.

Each slot owns one child process and runs one attempt at a time in it. Stopping an attempt
(max duration, abort, end of the shutdown grace period) kills that child, which stops any
code, including a sync call blocked in C or an async function that swallows cancellation,
and a new child takes its place.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from deferq.app import App, default_app
from deferq.functions import BackgroundFunction, registry
from deferq.models import AttemptOutcome, ErrorCode
from deferq.runner import child_main, failure, import_modules, interrupted, report
from deferq.store.base import AttemptReport, ClaimedAttempt, FunctionLimits, StoreUnavailable

logger = logging.getLogger("deferq.worker")

_spawn = multiprocessing.get_context("spawn")


class WorkerSettings:
    """Tunables of a worker; each has a `deferq worker` flag and a `DEFERQ_*` variable."""

    def __init__(
        self,
        slots: int | None = None,
        grace: timedelta = timedelta(seconds=30),
        heartbeat_interval: timedelta = timedelta(seconds=2),
        lost_after: timedelta = timedelta(seconds=15),
        poll_interval: timedelta = timedelta(seconds=1),
        abort_check_interval: timedelta = timedelta(milliseconds=250),
        name: str | None = None,
    ) -> None:
        self.slots = slots or max(2, os.cpu_count() or 2)
        if self.slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots!r}")
        if lost_after <= heartbeat_interval * 2:
            raise ValueError(
                f"lost_after ({lost_after}) must be more than twice the heartbeat interval "
                f"({heartbeat_interval}), or live workers would be declared lost"
            )
        self.grace = grace
        self.heartbeat_interval = heartbeat_interval
        self.lost_after = lost_after
        self.poll_interval = poll_interval
        self.abort_check_interval = abort_check_interval
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"


class Slot:
    """One child process and the thread that feeds it attempts and watches their time."""

    def __init__(self, index: int, worker: Worker) -> None:
        self.index = index
        self.worker = worker
        self.inbox: queue.Queue[ClaimedAttempt | None] = queue.Queue(maxsize=1)
        self.current: ClaimedAttempt | None = None
        self.abort_requested = False
        self.kill_requested = False
        self.process: Any = None
        self.conn: Any = None
        self.thread = threading.Thread(target=self._loop, name=f"deferq-slot-{index}", daemon=True)

    def start_child(self) -> None:
        parent_conn, child_conn = _spawn.Pipe()
        process = _spawn.Process(
            target=child_main,
            args=(self.worker.modules, child_conn, os.getpid(), logging.getLogger().level),
            name=f"deferq-slot-{self.index}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self.process, self.conn = process, parent_conn

    def wait_ready(self) -> None:
        status = json.loads(self.conn.recv_bytes())
        if status[0] != "ready":
            raise RuntimeError(f"a slot's child process could not import the modules: {status[1]}")

    def stop_child(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.process is not None:
            self.process.join()
            self.conn.close()
        self.process = None

    def _loop(self) -> None:
        while True:
            claimed = self.inbox.get()
            if claimed is None:
                return
            self.current = claimed
            self.abort_requested = False
            try:
                attempt_report = self._run(claimed)
            finally:
                self.current = None
            self.worker.finished(self, claimed, attempt_report)

    def _run(self, claimed: ClaimedAttempt) -> AttemptReport:
        if self.process is None:
            self.start_child()
            self.wait_ready()
        self.worker.log_started(claimed)
        self.conn.send_bytes(json.dumps([claimed.function_name, claimed.arguments]).encode())
        deadline = time.monotonic() + claimed.max_duration
        while True:
            remaining = deadline - time.monotonic()
            try:
                if self.conn.poll(min(0.05, max(remaining, 0))):
                    return report(claimed, json.loads(self.conn.recv_bytes()))
            except (EOFError, OSError):
                code = self.process.exitcode if self.process else None
                self.stop_child()
                return failure(
                    claimed,
                    ErrorCode.WORKER_LOST.value,
                    f"the process running the attempt exited (exit code {code})",
                )
            if self.abort_requested:
                self.stop_child()
                return failure(claimed, ErrorCode.ABORTED.value, "aborted on request")
            if self.kill_requested:
                self.stop_child()
                return interrupted(claimed)
            if remaining <= 0:
                self.stop_child()
                return failure(
                    claimed,
                    ErrorCode.TIMEOUT.value,
                    f"stopped after its max_duration of {claimed.max_duration:g}s",
                )


class Worker:
    """Claims due executions of the background functions it knows and runs them."""

    def __init__(
        self,
        modules: Sequence[str] = (),
        app: App | None = None,
        settings: WorkerSettings | None = None,
        functions: Sequence[BackgroundFunction[Any, Any]] | None = None,
    ) -> None:
        self.app = app or default_app()
        self.settings = settings or WorkerSettings()
        self.modules = list(modules)
        import_modules(self.modules)
        chosen = functions if functions is not None else list(registry.values())
        self.functions = {
            f.name: FunctionLimits(
                concurrency=f.options.concurrency,
                cancel_when_limited=f.options.max_concurrency_action == "cancel",
            )
            for f in chosen
        }
        self.cron_functions = [f for f in chosen if f.cron is not None]
        self.id = str(uuid.uuid4())
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.fatal: str | None = None
        self._wake = threading.Event()
        self._idle: queue.Queue[Slot] = queue.Queue()
        self._reports: queue.Queue[AttemptReport] = queue.Queue()
        self._running = 0
        self._running_lock = threading.Lock()
        self.slots = [Slot(i, self) for i in range(self.settings.slots)]

    # Lifecycle

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or `stop()`; return the exit code (0 after a clean stop)."""
        store = self.app.store
        store.migrate()
        if not self.functions:
            logger.warning("No background functions to run", extra={"action": "no_functions"})
        for slot in self.slots:
            slot.start_child()
        for slot in self.slots:
            slot.wait_ready()
            slot.thread.start()
            self._idle.put(slot)
        store.register_worker(self.id, self.settings.name, socket.gethostname(), os.getpid())
        logger.info(
            "Worker started",
            extra={
                "action": "start_worker",
                "worker": self.id,
                "worker_name": self.settings.name,
                "slots": self.settings.slots,
                "functions": sorted(self.functions),
            },
        )
        side_tasks = self._start_side_tasks()
        try:
            self._main_loop()
        finally:
            self._shutdown(side_tasks)
        if self.fatal:
            logger.error(
                "Worker stopped by a failure", extra={"action": "worker_failed", "error": self.fatal}
            )
            return 1
        logger.info("Worker stopped", extra={"action": "stop_worker", "worker": self.id})
        return 0

    def stop(self) -> None:
        """Stop claiming; running attempts get the grace period to finish."""
        self.stopping.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        def handle(signum: int, frame: Any) -> None:
            if self.stopping.is_set():
                # A second signal: no more grace.
                self.settings.grace = timedelta(0)
            logger.info(
                "Stopping on signal",
                extra={"action": "stop_requested", "signal": signal.Signals(signum).name},
            )
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # The main loop

    def _main_loop(self) -> None:
        store = self.app.store
        watcher = store.watch()
        while not self.stopping.is_set():
            free = self._idle.qsize()
            if free:
                try:
                    claimed = store.claim_due_executions(self.id, self.functions, free)
                except StoreUnavailable as exc:
                    logger.warning(
                        "Store unavailable", extra={"action": "store_unavailable", "error": str(exc)}
                    )
                    self.stopping.wait(1.0)
                    continue
                for attempt in claimed:
                    self._dispatch(attempt)
                if claimed and len(claimed) == free:
                    continue
            self._wake.clear()
            if not self._idle.qsize():
                self._wake.wait(self.settings.poll_interval.total_seconds())
            else:
                watcher.wait(self.settings.poll_interval.total_seconds(), self._wake)

    def _dispatch(self, claimed: ClaimedAttempt) -> None:
        slot = self._idle.get_nowait()
        with self._running_lock:
            self._running += 1
        slot.inbox.put(claimed)

    def finished(self, slot: Slot, claimed: ClaimedAttempt, attempt_report: AttemptReport) -> None:
        """Called by a slot when its attempt has ended and its child is ready or gone."""
        self._reports.put(attempt_report)
        self.log_finished(claimed, attempt_report)
        with self._running_lock:
            self._running -= 1
        self._idle.put(slot)
        self._wake.set()

    # Side tasks

    def _start_side_tasks(self) -> list[threading.Thread]:
        tasks: list[tuple[str, Callable[[], None], timedelta]] = [
            ("recorder", self._record_reports, timedelta(0)),
            ("heartbeat", self._heartbeat, self.settings.heartbeat_interval),
            ("abort_watcher", self._watch_aborts, self.settings.abort_check_interval),
            ("rescuer", self._rescue_lost_attempts, self.settings.lost_after / 3),
            ("discarder", self._discard_expired, timedelta(milliseconds=250)),
        ]
        if self.cron_functions:
            from deferq.scheduler import Scheduler

            scheduler = Scheduler(self.app.store, self.cron_functions)
            tasks.append(("scheduler", scheduler.tick, timedelta(seconds=1)))
        threads = []
        for name, step, interval in tasks:
            thread = threading.Thread(
                target=self._supervise, args=(name, step, interval), name=f"deferq-{name}"
            )
            thread.daemon = True
            thread.start()
            threads.append(thread)
        return threads

    def _supervise(self, name: str, step: Callable[[], None], interval: timedelta) -> None:
        """Run a side task's step every `interval` until the worker stops. A store outage is
        waited out; any other error stops the worker."""
        seconds = interval.total_seconds()
        while not self.stopped.is_set():
            try:
                step()
            except StoreUnavailable as exc:
                logger.warning(
                    "Store unavailable",
                    extra={"action": "store_unavailable", "task": name, "error": str(exc)},
                )
                self.stopped.wait(1.0)
            except BaseException as exc:
                self.fatal = f"side task {name} crashed: {type(exc).__name__}: {exc}"
                logger.exception(
                    "Side task crashed", extra={"action": "side_task_crashed", "task": name}
                )
                self.stop()
                return
            if seconds:
                self.stopped.wait(seconds)

    def _record_reports(self) -> None:
        try:
            batch = [self._reports.get(timeout=0.1)]
        except queue.Empty:
            return
        batch += _drain(self._reports, limit=1000)
        try:
            self.app.store.record_attempt_reports(batch)
        except BaseException:
            for item in batch:  # kept, to be stored on the next step or at shutdown
                self._reports.put(item)
            raise

    def _heartbeat(self) -> None:
        if not self.app.store.heartbeat(self.id):
            raise RuntimeError(
                "this worker was declared lost (no heartbeat for "
                f"{self.settings.lost_after}); its attempts were taken over"
            )

    def _watch_aborts(self) -> None:
        if not self._running:
            return
        aborting = set(self.app.store.aborting_executions(self.id))
        if not aborting:
            return
        for slot in self.slots:
            current = slot.current
            if current is not None and current.execution_id in aborting:
                slot.abort_requested = True

    def _rescue_lost_attempts(self) -> None:
        lost = self.app.store.declare_lost_workers(self.settings.lost_after)
        reports = [
            failure(
                claimed,
                ErrorCode.WORKER_LOST.value,
                "the worker running the attempt stopped heartbeating",
            )
            for claimed in lost
        ]
        self.app.store.record_attempt_reports(reports)
        for claimed in lost:
            logger.warning(
                "Attempt lost with its worker",
                extra={
                    "action": "attempt_lost",
                    "execution": claimed.execution_id,
                    "function": claimed.function_name,
                    "attempt": claimed.number,
                },
            )

    def _discard_expired(self) -> None:
        count = self.app.store.discard_expired()
        if count:
            logger.info(
                "Discarded executions past their discard_after",
                extra={"action": "discard_executions", "count": count},
            )

    # Shutdown

    def _shutdown(self, side_tasks: list[threading.Thread]) -> None:
        deadline = time.monotonic() + self.settings.grace.total_seconds()
        while self._running and time.monotonic() < deadline:
            self._wake.clear()
            self._wake.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            deadline = min(deadline, time.monotonic() + self.settings.grace.total_seconds())
        if self._running:
            logger.warning(
                "Grace period over: stopping running attempts",
                extra={"action": "interrupt_attempts", "count": self._running},
            )
        for slot in self.slots:
            slot.kill_requested = True
        for slot in self.slots:
            slot.inbox.put(None)
        for slot in self.slots:
            slot.thread.join()
            slot.stop_child()
        self.stopped.set()
        for thread in side_tasks:
            thread.join(timeout=5)
        try:
            leftover = _drain(self._reports)
            self.app.store.record_attempt_reports(leftover)
            self.app.store.unregister_worker(self.id)
        except StoreUnavailable as exc:
            logger.error(
                "Could not record the last reports",
                extra={"action": "store_unavailable", "error": str(exc)},
            )

    # Logs

    def log_started(self, claimed: ClaimedAttempt) -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "Attempt started",
                extra={
                    "action": "start_attempt",
                    "execution": claimed.execution_id,
                    "function": claimed.function_name,
                    "attempt": claimed.number,
                    "worker": self.id,
                },
            )

    def log_finished(self, claimed: ClaimedAttempt, attempt_report: AttemptReport) -> None:
        outcome = attempt_report.outcome
        final_failure = outcome == AttemptOutcome.FAILED and attempt_report.retry_in is None
        level = logging.ERROR if final_failure else logging.INFO
        if not logger.isEnabledFor(level):
            return
        extra = {
            "action": f"attempt_{outcome.value}",
            "execution": claimed.execution_id,
            "function": claimed.function_name,
            "attempt": claimed.number,
            "worker": self.id,
        }
        if attempt_report.error_code:
            extra["error_code"] = attempt_report.error_code
            extra["error"] = attempt_report.error_message
        if attempt_report.retry_in is not None:
            extra["retry_in"] = attempt_report.retry_in.total_seconds()
        logger.log(level, f"Attempt {outcome.value}", extra=extra)


def _drain(q: queue.Queue[Any], limit: int = 1_000_000) -> list[Any]:
    items: list[Any] = []
    while len(items) < limit:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items
