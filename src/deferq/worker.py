"""The worker: a main loop that claims due executions and hands them to slots, plus named
side tasks (heartbeat, abort watcher, rescuer, discarder, scheduler), supervised: if a side
task dies, the worker stops loudly.

Each slot owns one child process that runs one attempt at a time. The main loop alone talks
to the children and to the store's hot path: one turn of the loop waits for any child to
answer, stops attempts past their max duration or asked to abort, then records finished
attempts and claims new ones in a single transaction. Stopping an attempt kills its child,
which stops any code, a sync call blocked in C or an async function that swallows
cancellation included; a fresh child takes its place.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from multiprocessing.connection import wait as wait_for_any
from typing import Any

from deferq.app import App, default_app, redact
from deferq.functions import BackgroundFunction, registry
from deferq.models import AttemptOutcome, ErrorCode
from deferq.runner import (
    child_main,
    contact_clock,
    failure,
    import_modules,
    interrupted,
    report,
    unbegun,
)
from deferq.store.base import AttemptReport, ClaimedAttempt, FunctionLimits, StoreUnavailable

logger = logging.getLogger("deferq.worker")


_spawn = multiprocessing.get_context("spawn")

OUT_OF_CONTACT = "stopped: its worker was out of contact with the store"

_UNLIMITED = FunctionLimits()

REPORT_LINGER = 0.005
"""Seconds a finished attempt's report may wait for others to share its commit. Past it the
report is stored whatever else is going on: a busy worker must not hold a result back."""


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
        prefetch: int | None = None,
        retention: timedelta = timedelta(days=7),
        name: str | None = None,
    ) -> None:
        self.slots = slots if slots is not None else max(2, os.cpu_count() or 2)
        if type(self.slots) is not int or self.slots < 1:
            raise ValueError(f"slots must be a positive integer, not {slots!r}")
        if prefetch is None:
            prefetch = self.slots
        if type(prefetch) is not int or prefetch < 0:
            raise ValueError(f"prefetch must be an integer of at least 0, not {prefetch!r}")
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
        self.prefetch = prefetch
        self.retention = retention
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"


class Slot:
    """One child process and the attempt it is running, if any."""

    def __init__(
        self, index: int, modules: list[str], contact: Any = None, fence_after: float = 0.0
    ) -> None:
        self.index = index
        self.modules = modules
        self.contact = contact
        self.fence_after = fence_after
        self.process: Any = None
        self.conn: Any = None
        self.ready = False
        self.current: ClaimedAttempt | None = None
        self.started = 0.0
        self.lock = threading.Lock()

    def start_child(self) -> None:
        parent_conn, child_conn = _spawn.Pipe()
        self.process = _spawn.Process(
            target=child_main,
            args=(
                self.modules,
                child_conn,
                os.getpid(),
                logging.getLogger().level,
                self.contact,
                self.fence_after,
            ),
            name=f"deferq-slot-{self.index}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.conn = parent_conn
        self.ready = False

    @property
    def free(self) -> bool:
        return self.ready and self.current is None

    def send(self, claimed: ClaimedAttempt) -> None:
        self.current = claimed
        self.started = time.monotonic()
        self.conn.send_bytes(json.dumps([claimed.function_name, claimed.arguments]).encode())

    def deadline(self) -> float | None:
        return None if self.current is None else self.started + self.current.max_duration

    def kill(self) -> None:
        """Stop the child and the subprocesses it started, and wait until the child is gone:
        its attempt has really ended."""
        with self.lock:
            if self.process is not None:
                self._kill_group(self.process)
                self.process.join()
                self.conn.close()
            self.process = self.conn = None
            self.ready = False

    def kill_running(self) -> bool:
        """Kill the child if it runs an attempt, without waiting for it (safe from another
        thread than the main loop's, which notices the end and reports the attempt)."""
        with self.lock:
            process = self.process
            if self.current is None or process is None or process.exitcode is not None:
                return False
            self._kill_group(process)
            return True

    @staticmethod
    def _kill_group(process: Any) -> None:
        # The child leads a process group of its own (see `child_main`); until it has made
        # it, it runs no function and has started nothing, so killing it alone is enough.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.exitcode is None:
            process.kill()


class Worker:
    """Claims due executions of the background functions it knows and runs them."""

    def __init__(
        self,
        modules: Sequence[str] = (),
        app: App | None = None,
        settings: WorkerSettings | None = None,
        functions: Sequence[BackgroundFunction[Any, Any]] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """`clock` replaces the store's clock for the cron scheduler (tests drive time with
        it); everything else keeps the store's clock."""
        self.app = app or default_app()
        self.clock = clock
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
        self.fence_after = self.settings.lost_after.total_seconds() / 2
        self._contact = _spawn.Value("d", contact_clock(), lock=False)
        """When the last heartbeat the store accepted was sent (`contact_clock`), in memory
        shared with the slots' children: a child whose worker is paused (SIGSTOP, Ctrl-Z)
        sees it grow old and stops its own attempt, as the worker would."""
        self.slots = [
            Slot(i, self.modules, self._contact, self.fence_after)
            for i in range(self.settings.slots)
        ]
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.fatal: str | None = None
        self.aborting: set[str] = set()
        self.running_count = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._reports: list[AttemptReport] = []
        self._reports_since = 0.0  # when the oldest report not yet stored was made
        self._watch_ready = False
        self.buffer: collections.deque[ClaimedAttempt] = collections.deque()
        """Attempts claimed (started in the store) but not yet handed to a slot."""
        self._claimed_at: dict[str, float] = {}
        """When (monotonic) the claim of each buffered attempt was sent: with the claim's
        time in the store, it gives the store's clock, by which discard_after is judged."""
        self.maybe_due = True
        """Work may be due that this worker can take: worth a claim."""
        self.fenced = threading.Event()
        """Set while no heartbeat was stored for `fence_after`: running attempts are
        stopped and nothing is claimed or begun, lest it overlap the retry of an attempt
        taken over as lost."""
        self._fence_lock = threading.Lock()

    @property
    def _contact_at(self) -> float:
        return float(self._contact.value)

    @_contact_at.setter
    def _contact_at(self, at: float) -> None:
        self._contact.value = at

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
            self._await_ready(slot)
        self._contact_at = contact_clock()
        store.register_worker(self.id, self.settings.name, socket.gethostname(), os.getpid())
        logger.info(
            "Worker started",
            extra={
                "action": "start_worker",
                "worker": self.id,
                "worker_name": self.settings.name,
                "slots": self.settings.slots,
                "functions": sorted(self.functions),
                "store": redact(self.app.url),
            },
        )
        side_tasks = self._start_side_tasks()
        try:
            self._main_loop()
        finally:
            self._shutdown(side_tasks)
        if self.fatal:
            logger.error(
                "Worker stopped by a failure",
                extra={"action": "worker_failed", "worker": self.id, "error": self.fatal},
            )
            return 1
        logger.info("Worker stopped", extra={"action": "stop_worker", "worker": self.id})
        return 0

    def stop(self) -> None:
        """Stop claiming; running attempts get the grace period to finish."""
        self.stopping.set()
        self.wake()

    def wake(self) -> None:
        """Make the main loop take a turn now (safe from threads and signal handlers)."""
        with contextlib.suppress(BlockingIOError):  # full of wake-ups already
            os.write(self._wake_w, b"x")

    def install_signal_handlers(self) -> None:
        def handle(signum: int, frame: Any) -> None:
            if self.stopping.is_set():
                self.settings.grace = timedelta(0)  # a second signal: no more grace
            logger.info(
                "Stopping on signal",
                extra={"action": "stop_requested", "signal": signal.Signals(signum).name},
            )
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _await_ready(self, slot: Slot) -> None:
        status = json.loads(slot.conn.recv_bytes())
        if status[0] != "ready":
            raise RuntimeError(f"a slot's child process could not import the modules: {status[1]}")
        slot.ready = True

    # The main loop

    def _main_loop(self) -> None:
        store = self.app.store
        watcher = store.watch()
        # Claim in batches: once the slots and the buffer have room for this many.
        batch = max(1, (self.settings.slots + self.settings.prefetch) // 2)
        poll_at = 0.0  # when to try a claim anyway (poll interval, or the next due time)
        watch_at = 0.0  # when to ask a polling watcher for news
        grace_end: float | None = None
        try:
            while True:
                now = time.monotonic()
                if self.stopping.is_set():
                    if grace_end is None:
                        grace_end = now + self.settings.grace.total_seconds()
                        self._release_buffer()
                    grace_end = min(grace_end, now + self.settings.grace.total_seconds())
                    if not self.running_count or now >= grace_end:
                        self._stop_all_attempts()
                        self._flush_reports()
                        return

                fenced = self._out_of_contact()
                self._enforce_limits(now, fenced)
                self._feed_slots()
                room = 0
                if grace_end is None and not fenced:
                    room = self._capacity() - self.running_count - len(self.buffer)
                    if not self.maybe_due and room:
                        if now >= poll_at:
                            self.maybe_due = True
                        elif now >= watch_at or self._watch_ready:
                            self._watch_ready = False
                            self.maybe_due = watcher.changed()
                            watch_at = now + (watcher.poll_interval or 3600.0)
                starving = not self.buffer and any(s.free for s in self.slots)
                wanted = self.maybe_due and (room >= batch or (starving and room))
                claim = room if wanted else 0
                due_to_store = starving or now >= self._reports_since + REPORT_LINGER
                if claim or len(self._reports) >= batch or (self._reports and due_to_store):
                    claimed = self._record_and_claim(claim)
                    if claim and len(claimed) < claim:
                        self.maybe_due = False
                        poll_at = now + self._until_due(store, time.monotonic() - now)
                        watch_at = now + (watcher.poll_interval or 3600.0)
                    self.buffer.extend(claimed)
                    self._feed_slots()
                    if claimed and len(claimed) == claim:
                        continue

                wake_at = None
                if room and not self.maybe_due:
                    wake_at = min(poll_at, watch_at)
                self._wait(now, wake_at, watcher, grace_end)
        finally:
            watcher.close()

    def _capacity(self) -> int:
        # A slot whose child is still starting (after a kill, it takes a moment) is no room
        # yet: with --prefetch 0 a claimed attempt must begin at once.
        return sum(slot.ready for slot in self.slots) + self.settings.prefetch

    def _until_due(self, store: Any, since_claim: float) -> float:
        """Seconds until a claim is worth trying without news, after a claim that came back
        short `since_claim` seconds ago: the poll interval, or sooner when an execution of
        our functions becomes due. Due work the claim could not take (a concurrency limit
        reached) waits for news: the watcher, one of our limited attempts ending, the poll."""
        wait = self.settings.poll_interval.total_seconds()
        try:
            due_in = store.next_due_in(list(self.functions), timedelta(seconds=since_claim))
        except StoreUnavailable:
            return wait
        if due_in is not None:
            wait = min(wait, due_in.total_seconds())
        return wait

    def _record_and_claim(self, limit: int) -> list[ClaimedAttempt]:
        reports, self._reports = self._reports, []
        sent = time.monotonic()
        try:
            claimed = self.app.store.record_and_claim(reports, self.id, self.functions, limit)
            for attempt in claimed:
                self._claimed_at[attempt.execution_id] = sent
            return claimed
        except StoreUnavailable as exc:
            self._reports[:0] = reports  # kept for the next turn: nothing is lost
            logger.warning(
                "Store unavailable", extra={"action": "store_unavailable", "error": str(exc)}
            )
            self.stopping.wait(0.5)
            return []

    def _feed_slots(self) -> None:
        """Hand buffered attempts to free slots; the attempt's time starts now. One asked to
        abort, or past its discard_after, while it waited ends here without beginning.
        Nothing begins while the worker is out of contact with the store."""
        if not self.buffer or self._out_of_contact():
            return
        for slot in self.slots:
            while slot.free and self.buffer:
                claimed = self.buffer.popleft()
                if claimed.execution_id in self.aborting:
                    self._finish(claimed, failure(claimed, "aborted", "aborted before it began"))
                elif self._past_discard_after(claimed):
                    # The store discards it: its retry time (now) is past discard_after.
                    self._finish(claimed, unbegun(claimed, "its discard_after passed"))
                else:
                    slot.send(claimed)
                    self.running_count += 1
                    self.log_started(claimed)

    def _past_discard_after(self, claimed: ClaimedAttempt) -> bool:
        """Whether the store's clock has reached the attempt's discard_after. The store's
        now is the claim's time in the store plus the time since the claim was sent (a
        little later than the truth: a start is never late), so a worker whose own clock
        is wrong judges it right."""
        sent = self._claimed_at.pop(claimed.execution_id, None)
        if claimed.discard_after is None:
            return False
        if sent is None:
            return True  # never so: every buffered attempt has its claim time
        store_now = claimed.started_at + timedelta(seconds=time.monotonic() - sent)
        return claimed.discard_after <= store_now

    def _wait(
        self, now: float, wake_at: float | None, watcher: Any, grace_end: float | None = None
    ) -> None:
        """Block until a child answers, the loop is woken, a deadline passes (an attempt's
        max duration, the grace period), or it is time to look at the store again."""
        timeout = 1.0 if grace_end is None else min(1.0, grace_end - now)
        for slot in self.slots:
            deadline = slot.deadline()
            if deadline is not None:
                timeout = min(timeout, deadline - now)
        if wake_at is not None:
            timeout = min(timeout, wake_at - now)
        if self._reports:
            timeout = min(timeout, self._reports_since + REPORT_LINGER - now)
        waitables: list[Any] = [self._wake_r]
        watched = watcher.fileno()
        if watched is not None and wake_at is not None:
            waitables.append(watched)
        waitables += [s.conn for s in self.slots if s.conn is not None]
        ready_ones = wait_for_any(waitables, max(0.0, timeout))
        if self._out_of_contact():
            # Resumed after a pause, perhaps: running attempts stop before anything else.
            self._enforce_limits(time.monotonic(), fenced=True)
        for ready in ready_ones:
            if ready == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            elif ready == watched:
                self._watch_ready = True  # the watcher tells what changed on the next turn
            else:
                answering = next((s for s in self.slots if s.conn is ready), None)
                if answering is not None:  # else its child was just stopped and replaced
                    self._receive(answering)

    def _receive(self, slot: Slot) -> None:
        try:
            message = json.loads(slot.conn.recv_bytes())
        except (EOFError, OSError):
            code = slot.process.exitcode if slot.process is not None else None
            message = f"the process running the attempt exited (exit code {code})"
            if self.fenced.is_set():
                message = OUT_OF_CONTACT
            self._stop_slot(slot, ErrorCode.WORKER_LOST.value, message)
            return
        if not slot.ready:
            if message[0] != "ready":
                raise RuntimeError(f"a slot's child could not start: {message[1]}")
            slot.ready = True
            return
        claimed = slot.current
        assert claimed is not None
        slot.current = None
        self.running_count -= 1
        self._finish(claimed, report(claimed, message))
        if self.functions.get(claimed.function_name, _UNLIMITED).concurrency is not None:
            self.maybe_due = True  # its place under the limit is free: worth a claim
        if self.buffer:
            self._feed_slots()

    def _enforce_limits(self, now: float, fenced: bool = False) -> None:
        """Stop attempts past their max duration, those asked to abort, and all of them
        while the worker is out of contact with the store."""
        if self.aborting and self.buffer:
            self._abort_buffered()
        for slot in self.slots:
            current = slot.current
            if current is None:
                continue
            if fenced:
                self._stop_slot(slot, ErrorCode.WORKER_LOST.value, OUT_OF_CONTACT)
            elif current.execution_id in self.aborting:
                self._stop_slot(slot, ErrorCode.ABORTED.value, "aborted on request")
            elif now >= slot.started + current.max_duration:
                self._stop_slot(
                    slot,
                    ErrorCode.TIMEOUT.value,
                    f"stopped after its max_duration of {current.max_duration:g}s",
                )

    def _abort_buffered(self) -> None:
        """An attempt asked to abort while it waits in the buffer ends now, never begun:
        it must not wait for a slot that a long attempt may hold for hours."""
        kept: collections.deque[ClaimedAttempt] = collections.deque()
        for claimed in self.buffer:
            if claimed.execution_id in self.aborting:
                self._finish(claimed, failure(claimed, "aborted", "aborted before it began"))
            else:
                kept.append(claimed)
        self.buffer = kept

    def _stop_slot(self, slot: Slot, error_code: str | None, message: str = "") -> None:
        """Kill a slot's child, so its attempt has really ended, then report that attempt:
        failed with `error_code`, or interrupted (back to `created`, no retry used) if None.

        An attempt whose result is already waiting in the pipe ended on its own: its result
        stands and its healthy child is kept."""
        result = self._result_waiting(slot)
        if result is not None and slot.current is not None:
            done, slot.current = slot.current, None
            self.running_count -= 1
            self._finish(done, report(done, result))
            return
        slot.kill()
        claimed, slot.current = slot.current, None
        if claimed is not None:
            self.running_count -= 1
            self._finish(
                claimed,
                interrupted(claimed)
                if error_code is None
                else failure(claimed, error_code, message),
            )
        if not self.stopping.is_set():
            slot.start_child()

    @staticmethod
    def _result_waiting(slot: Slot) -> list[Any] | None:
        """The result a slot's child already sent, if any (read without blocking)."""
        if slot.conn is None or not slot.ready or slot.current is None:
            return None
        try:
            if slot.conn.poll():
                return list(json.loads(slot.conn.recv_bytes()))
        except (EOFError, OSError):
            pass  # the child is gone; the caller stops the slot
        return None

    def _stop_all_attempts(self) -> None:
        busy = [s for s in self.slots if s.current is not None]
        if busy:
            logger.warning(
                "Grace period over: stopping running attempts",
                extra={"action": "interrupt_attempts", "count": len(busy)},
            )
        for slot in busy:
            self._stop_slot(slot, None)

    def _release_buffer(self) -> None:
        """Attempts claimed but not begun go back to `created` when the worker stops."""
        while self.buffer:
            self._finish_unbegun(self.buffer.popleft())

    def _finish_unbegun(self, claimed: ClaimedAttempt) -> None:
        self._finish(claimed, unbegun(claimed, "the worker stopped before it began"))

    def _flush_reports(self) -> None:
        for _ in range(20):
            if not self._reports:
                return
            self._record_and_claim(0)

    def _finish(self, claimed: ClaimedAttempt, attempt_report: AttemptReport) -> None:
        self._claimed_at.pop(claimed.execution_id, None)
        if not self._reports:
            self._reports_since = time.monotonic()
        self._reports.append(attempt_report)
        self.log_finished(claimed, attempt_report)

    # Side tasks

    def _start_side_tasks(self) -> list[threading.Thread]:
        tasks: list[tuple[str, Callable[[], None], timedelta]] = [
            ("heartbeat", self._heartbeat, self.settings.heartbeat_interval),
            ("fence", self._watch_contact, timedelta(seconds=min(0.1, self.fence_after / 5))),
            ("abort_watcher", self._watch_aborts, self.settings.abort_check_interval),
            ("rescuer", self._rescue_lost_attempts, self.settings.lost_after / 3),
            ("discarder", self._discard_expired, timedelta(milliseconds=250)),
        ]
        if any(f.cancel_when_limited and f.concurrency for f in self.functions.values()):
            tasks.append(("canceller", self._cancel_over_limit, timedelta(milliseconds=250)))
        if self.settings.retention > timedelta(0):
            tasks.append(("pruner", self._prune_finished, timedelta(minutes=1)))
        if self.cron_functions:
            from deferq.scheduler import Scheduler

            scheduler = Scheduler(self.app.store, self.cron_functions, clock=self.clock)
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
            self.stopped.wait(seconds)

    def _heartbeat(self) -> None:
        # Out of contact, a second heartbeat follows at once: the first, sent before the
        # store came back, may have waited long enough to be stale already.
        for _ in range(2):
            sent = contact_clock()
            if not self.app.store.heartbeat(self.id):
                # Our attempts run again elsewhere: stop them at once, no grace period.
                self.settings.grace = timedelta(0)
                raise RuntimeError(
                    "this worker was declared lost (no heartbeat for "
                    f"{self.settings.lost_after}); its attempts were taken over"
                )
            self._contact_at = sent
            if not self.fenced.is_set():
                return
            if contact_clock() - sent <= self.fence_after:
                with self._fence_lock:
                    self.fenced.clear()
                logger.info(
                    "In contact with the store again: claiming again",
                    extra={"action": "regain_contact", "worker": self.id},
                )
                self.wake()
                return

    def _out_of_contact(self) -> bool:
        """Whether no heartbeat was stored for `fence_after` (half of --lost-after): the
        store may soon declare this worker lost and retry its attempts elsewhere, so they
        must stop now. Judged by a clock that counts through pauses, so a worker resumed
        after a SIGSTOP knows at once."""
        if self.fenced.is_set():
            return True
        silent = contact_clock() - self._contact_at
        if silent <= self.fence_after:
            return False
        with self._fence_lock:
            if self.fenced.is_set():
                return True
            self.fenced.set()
        logger.warning(
            "Out of contact with the store: stopping running attempts",
            extra={
                "action": "lose_contact",
                "worker": self.id,
                "silent_for": round(silent, 3),
                "running": self.running_count,
            },
        )
        self.wake()
        return True

    def _watch_contact(self) -> None:
        """Kill the running attempts' processes once out of contact, even while the main
        loop waits on the store: the main loop records them when it gets back."""
        if self._out_of_contact():
            for slot in self.slots:
                slot.kill_running()

    def _watch_aborts(self) -> None:
        if not self.running_count and not self.buffer:
            return
        aborting = set(self.app.store.aborting_executions(self.id))
        if aborting != self.aborting:
            self.aborting = aborting
            if aborting:
                self.wake()

    def _rescue_lost_attempts(self) -> None:
        if self.fenced.is_set():
            return  # out of contact, this worker would be the first it declared lost
        lost = self.app.store.declare_lost_workers(self.settings.lost_after)
        if not lost:
            return
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

    def _cancel_over_limit(self) -> None:
        self.app.store.cancel_over_limit(self.functions)

    def _prune_finished(self) -> None:
        count = self.app.store.prune_finished(self.settings.retention)
        if count:
            logger.info(
                "Pruned finished executions",
                extra={"action": "prune_executions", "count": count},
            )

    # Shutdown

    def _shutdown(self, side_tasks: list[threading.Thread]) -> None:
        self._release_buffer()
        self._stop_all_attempts()
        for slot in self.slots:
            slot.kill()
        self.stopped.set()
        for thread in side_tasks:
            thread.join(timeout=5)
        try:
            self.app.store.record_attempt_reports(self._reports)
            self._reports = []
            self.app.store.unregister_worker(self.id)
        except StoreUnavailable as exc:
            logger.error(
                "Could not store the last attempt reports",
                extra={"action": "store_unavailable", "error": str(exc)},
            )
        os.close(self._wake_r)
        os.close(self._wake_w)

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
        extra: dict[str, Any] = {
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
