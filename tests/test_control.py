"""Control of running work, with real worker processes and real signals: max duration,
abort, concurrency limits, graceful shutdown and crash recovery.

Two points of view are checked. The store's: attempts as `list_attempts` returns them, with
the times the store recorded. The running code's: each task logs when it really begins and
which other runs were still alive at that moment (see `tests/tasks/control.py`), which shows
that a stopped attempt was really gone before the next one began.

Windows are asserted loosely (a guarantee, not a benchmark): an attempt past its max
duration or aborted is stopped within about a second; a SIGKILLed worker's attempts are
recorded `worker_lost` within --lost-after plus about a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deferq import (
    ExecutionFailed,
    ExecutionNotCancellable,
    assign_options,
)
from deferq.app import App
from deferq.models import Attempt, Execution
from tests.support import WorkerProcess, wait_until
from tests.tasks import control
from tests.tasks.control import process_alive, starts

MODULE = "tests.tasks.control"
FAST_LOSS = ("--heartbeat-interval", "200ms", "--lost-after", "1s")
"""Crash detection in about a second: heartbeat every 200 ms, lost after 1 s of silence."""
QUIET_WORKER = ("--heartbeat-interval", "10s", "--lost-after", "60s")
"""Few background writes: the worker can be paused (SIGSTOP) without holding the store."""

START_WITHIN = 1.0
"""Longest wait for a free slot to begin a due execution, a fresh child process included."""


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "runs.log")


@pytest.fixture
def workers(app: App, store_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes on the test's store; all are stopped (or killed) afterwards
    and the end of their logs printed, which pytest shows when the test fails."""
    started: list[WorkerProcess] = []

    def start(
        *args: str,
        name: str | None = None,
        modules: tuple[str, ...] = (MODULE,),
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        label = name or f"worker-{len(started)}"
        extra = ("--name", name) if name else ()
        log_path = tmp_path / f"{label}-{len(started)}.log"
        worker = WorkerProcess(store_url, modules, *args, *extra, env=env, log_path=log_path)
        started.append(worker.start())
        return worker

    yield start
    for worker in started:
        worker.__exit__(None, None, None)
    for path in sorted(p for p in tmp_path.glob("*.log") if p.name != "runs.log"):
        print(f"--- {path.name}")
        print("\n".join(path.read_text(errors="replace").splitlines()[-40:]))


def wait_final(app: App, execution_id: str, timeout: float = 20.0) -> Execution:
    return wait_until(
        lambda: (e := app.get_execution(execution_id)).state.is_final and e,
        timeout,
        what=f"execution {execution_id} to reach a final state",
    )


def wait_started(log: str, key: str, count: int = 1, timeout: float = 20.0) -> list[Any]:
    return wait_until(
        lambda: len(runs := starts(log, key)) >= count and runs,
        timeout,
        what=f"run {count} of {key} to begin",
    )


def seconds(attempt: Attempt) -> float:
    assert attempt.finished_at is not None
    return (attempt.finished_at - attempt.started_at).total_seconds()


def at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def max_overlap(attempts: list[Attempt]) -> int:
    """Most attempts running at one instant, from their own start and end times. An attempt
    ending at the instant another starts does not overlap it."""
    events = []
    for attempt in attempts:
        assert attempt.finished_at is not None, attempt
        events += [(attempt.started_at, 1), (attempt.finished_at, -1)]
    running = most = 0
    for _, change in sorted(events):  # at equal times, -1 sorts before +1
        running += change
        most = max(most, running)
    return most


def assert_no_overlap(attempts: list[Attempt]) -> None:
    for earlier, later in zip(attempts, attempts[1:], strict=False):
        assert earlier.finished_at is not None
        assert earlier.finished_at <= later.started_at, (earlier, later)


def alive_runs_of(run: dict[str, Any], key: str) -> list[Any]:
    """The runs of `key` still alive in other processes when `run` began."""
    return [entry for entry in run["alive"] if entry[0] == key]


# Max duration


BLOCKED = [
    pytest.param(lambda log, key: control.stuck(log, key, "python_sleep"), id="time.sleep"),
    pytest.param(lambda log, key: control.stuck(log, key, "libc_sleep"), id="C-call-sleep"),
    pytest.param(lambda log, key: control.stuck(log, key, "c_spin"), id="C-loop-holding-GIL"),
    pytest.param(lambda log, key: control.stuck_async(log, key), id="async-swallows-cancel"),
]


@pytest.mark.parametrize("call", BLOCKED)
def test_attempt_past_max_duration_is_stopped_retried_and_never_overlaps(
    app: App, workers: Any, log: str, call: Callable[[str, str], Execution]
) -> None:
    workers("--slots", "2", "--prefetch", "0")
    execution = call(log, "stuck")
    wait_started(log, "stuck")

    # The other slot keeps serving while the stuck attempts are stopped.
    others = [control.hold(log, f"other-{i}") for i in range(10)]
    final = wait_final(app, execution.id)

    assert final.state == "failed"
    assert final.error_code == "timeout"
    attempts = app.list_attempts(execution.id)
    assert [(a.outcome, a.error_code) for a in attempts] == [("failed", "timeout")] * 2
    print("stopped after", [f"{seconds(a):.3f}s" for a in attempts], "with max_duration 1s")
    for attempt in attempts:
        assert 1.0 <= seconds(attempt) < 2.0, f"max_duration 1s, ran {seconds(attempt):.3f}s"
    assert_no_overlap(attempts)
    first, second = starts(log, "stuck")
    assert not process_alive(first["pid"])
    assert alive_runs_of(second, "stuck") == [], "the second attempt began while the first ran"
    for other in others:
        done = wait_final(app, other.id)
        assert done.state == "succeeded"
        assert done.finished_at is not None and done.finished_at < attempts[1].finished_at


def test_max_duration_counts_from_the_real_start_of_a_prefetched_attempt(
    app: App, workers: Any, log: str
) -> None:
    """With --prefetch, an attempt can wait in the worker's buffer after the store marked it
    started; the limit counts from when it really begins, so it gets its whole max duration.
    The stored `started_at` is the claim: earlier than the real start."""
    first = control.stuck(log, "first", "libc_sleep")
    second = control.stuck(log, "second", "libc_sleep")
    workers("--slots", "1", "--prefetch", "1")
    wait_final(app, first.id)
    wait_final(app, second.id)

    attempts = app.list_attempts(second.id)
    real_starts = starts(log, "second")
    assert len(attempts) == len(real_starts) == 2
    for attempt, run in zip(attempts, real_starts, strict=True):
        assert attempt.error_code == "timeout"
        assert attempt.started_at <= at(run["at"])
        assert attempt.finished_at is not None
        ran = (attempt.finished_at - at(run["at"])).total_seconds()
        assert 1.0 <= ran < 2.0, f"max_duration 1s, ran {ran:.3f}s from its real start"


def test_without_prefetch_an_attempt_is_claimed_only_when_a_slot_can_begin_it(
    app: App, workers: Any, log: str
) -> None:
    """After a stopped attempt, its slot needs a fresh child process. With --prefetch 0 the
    next attempt is claimed once that child is ready, so the stored start is the real one
    and the stored times show the max duration kept."""
    from tests.tasks import slow_start

    workers(
        "--slots",
        "1",
        "--prefetch",
        "0",
        modules=("tests.tasks.slow_start",),
        env={"DEFERQ_TEST_IMPORT_DELAY": "1.5"},
    )
    execution = slow_start.stuck_slow_start(log, "stuck")
    assert wait_final(app, execution.id).error_code == "timeout"
    attempts = app.list_attempts(execution.id)
    assert len(attempts) == 2
    for attempt, run in zip(attempts, starts(log, "stuck"), strict=True):
        claimed_early = (at(run["at"]) - attempt.started_at).total_seconds()
        assert claimed_early < 0.5, f"claimed {claimed_early:.2f}s before it could begin"
        assert 1.0 <= seconds(attempt) < 2.0


def test_concurrency_slot_of_a_timed_out_attempt_is_held_until_it_is_really_stopped(
    app: App, workers: Any, log: str
) -> None:
    workers("--slots", "2")
    workers("--slots", "2", "--prefetch", "0")
    executions = [control.limited_and_stuck(log, f"stuck-{i}") for i in range(2)]
    for execution in executions:
        assert wait_final(app, execution.id).error_code == "timeout"

    attempts = [a for e in executions for a in app.list_attempts(e.id)]
    assert len(attempts) == 4
    assert max_overlap(attempts) == 1
    for run in starts(log):
        assert run["alive"] == [], f"{run['key']} began while another still ran"


def test_an_attempt_is_stored_as_it_ends_while_the_other_slots_stay_busy(
    app: App, workers: Any, log: str
) -> None:
    """The worker groups reports to share commits, but never holds one back for long: a
    short attempt ends between long ones (the buffer full, no slot free) and its end is
    stored at once, not when the next slot frees up."""
    long_a = control.hold(log, "long-a", 4.0)
    short = control.hold(log, "short", 0.1)
    long_b = [control.hold(log, f"long-{i}", 4.0) for i in range(2)]
    workers("--slots", "2", "--prefetch", "2")
    wait_until(lambda: app.get_execution(short.id).state.is_final, 3)

    (ended,) = [e for e in control.read_log(log) if e["event"] == "end" and e["key"] == "short"]
    (attempt,) = app.list_attempts(short.id)
    assert attempt.finished_at is not None
    delay = (attempt.finished_at - at(ended["at"])).total_seconds()
    assert delay < 0.5, f"stored {delay:.2f}s after it ended"
    for execution in (long_a, *long_b):
        app.cancel_execution(execution.id, force=True)


# Abort


ABORTABLE = [
    pytest.param(lambda log, key: control.blocks(log, key, "python_sleep"), id="time.sleep"),
    pytest.param(lambda log, key: control.blocks(log, key, "libc_sleep"), id="C-call-sleep"),
    pytest.param(lambda log, key: control.blocks(log, key, "c_spin"), id="C-loop-holding-GIL"),
    pytest.param(lambda log, key: control.blocks_async(log, key), id="async-swallows-cancel"),
]


@pytest.mark.parametrize("call", ABORTABLE)
def test_abort_stops_the_running_attempt_without_retry(
    app: App, workers: Any, log: str, call: Callable[[str, str], Execution]
) -> None:
    workers("--slots", "1", "--prefetch", "0")
    execution = call(log, "blocked")
    (run,) = wait_started(log, "blocked")
    assert app.get_execution(execution.id).state == "started"

    asked = time.time()
    aborting = app.cancel_execution(execution.id, force=True)
    assert aborting.state == "aborting"
    final = wait_final(app, execution.id, timeout=5)

    assert final.state == "aborted"
    assert final.error_code == "aborted"
    (attempt,) = app.list_attempts(execution.id)
    assert (attempt.outcome, attempt.error_code) == ("aborted", "aborted")
    assert attempt.finished_at is not None
    latency = (attempt.finished_at - at(asked)).total_seconds()
    print(f"aborted {latency:.3f}s after the request")
    assert latency < 1.0, f"stopped {latency:.3f}s after the abort"
    assert not process_alive(run["pid"])
    with pytest.raises(ExecutionFailed) as failed:
        app.get_result(execution.id)
    assert failed.value.error_code == "aborted"

    # The worker stays healthy: the next execution starts at once on the only slot.
    enqueued = time.time()
    after = control.hold(log, "after")
    assert wait_final(app, after.id).state == "succeeded"
    (next_attempt,) = app.list_attempts(after.id)
    assert (next_attempt.started_at - at(enqueued)).total_seconds() < START_WITHIN
    # No retry followed the abort, although the policy allows two at once.
    assert app.get_execution(execution.id).attempts == 1
    assert len(starts(log, "blocked")) == 1


def pause(worker: WorkerProcess) -> None:
    """SIGSTOP the worker process alone: its child processes keep running, and what they
    send waits in the pipe until the worker is continued."""
    worker.signal(signal.SIGSTOP)


def resume(worker: WorkerProcess) -> None:
    worker.signal(signal.SIGCONT)


@pytest.mark.parametrize("then", ["return", "raise"])
def test_abort_racing_the_attempts_own_end(
    app: App, workers: Any, log: str, tmp_path: Path, then: str
) -> None:
    """The attempt ends on its own (returns, or raises an error the policy would retry) just
    as the abort is stored: the worker is paused while both happen, so its report of the
    attempt arrives after `aborting` was stored.

    The rule: once `aborting` is stored, the execution ends `aborted` and is never retried;
    the attempt row keeps what really happened (succeeded, or failed with `raised`) while the
    execution says `aborted`; a returned value is not handed out (`get_result` raises
    `ExecutionFailed`).
    Aborting twice answers the second time with the execution, changing nothing."""
    gate = tmp_path / "gate"
    worker = workers("--slots", "1", "--prefetch", "0", *QUIET_WORKER)
    execution = control.waits_then(log, "racer", str(gate), then)
    wait_started(log, "racer")

    pause(worker)
    try:
        gate.touch()
        wait_until(lambda: any(e["event"] == "end" for e in control.read_log(log)), 5)
        first = app.cancel_execution(execution.id, force=True)
        second = app.cancel_execution(execution.id, force=True)
    finally:
        resume(worker)
    assert first.state == second.state == "aborting"
    assert second.id == execution.id

    final = wait_final(app, execution.id)
    assert final.state == "aborted"
    (attempt,) = app.list_attempts(execution.id)
    assert final.error_code == "aborted"
    if then == "return":
        assert (attempt.outcome, attempt.error_code) == ("succeeded", None)
    else:
        assert (attempt.outcome, attempt.error_code) == ("failed", "raised")
    with pytest.raises(ExecutionFailed):
        app.get_result(execution.id)

    # Nothing more happens: a later execution runs and the racer still has one attempt.
    later = control.hold(log, "later")
    assert wait_final(app, later.id).state == "succeeded"
    assert app.get_execution(execution.id).attempts == 1
    assert len(starts(log, "racer")) == 1
    with pytest.raises(ExecutionNotCancellable):
        app.cancel_execution(execution.id, force=True)


def test_abort_of_a_finished_execution_is_refused(app: App, workers: Any, log: str) -> None:
    workers("--slots", "1")
    execution = control.hold(log, "done")
    assert wait_final(app, execution.id).state == "succeeded"
    for force in (False, True):
        with pytest.raises(ExecutionNotCancellable) as refused:
            app.cancel_execution(execution.id, force=force)
        assert refused.value.execution.state == "succeeded"
    assert app.get_execution(execution.id).state == "succeeded"


def test_abort_of_a_prefetched_attempt_that_never_began(app: App, workers: Any, log: str) -> None:
    running = control.blocks(log, "running", "python_sleep")
    waiting = control.hold(log, "waiting")
    workers("--slots", "1", "--prefetch", "1")
    wait_started(log, "running")
    wait_until(lambda: app.get_execution(waiting.id).state == "started", 5)

    app.cancel_execution(waiting.id, force=True)
    final = wait_final(app, waiting.id, timeout=5)
    assert final.state == "aborted"
    (attempt,) = app.list_attempts(waiting.id)
    assert attempt.outcome == "aborted"
    assert starts(log, "waiting") == []

    app.cancel_execution(running.id, force=True)
    assert wait_final(app, running.id, timeout=5).state == "aborted"


def test_abort_stored_while_the_worker_is_dead_ends_aborted(
    app: App, workers: Any, log: str
) -> None:
    first = workers("--slots", "1", *FAST_LOSS)
    execution = control.hangs_first_time(log, "orphan")
    wait_started(log, "orphan")
    first.kill()
    aborting = app.cancel_execution(execution.id, force=True)
    assert aborting.state == "aborting"

    workers("--slots", "1", *FAST_LOSS)
    final = wait_final(app, execution.id, timeout=10)
    assert final.state == "aborted"
    (attempt,) = app.list_attempts(execution.id)
    assert attempt.error_code == "worker_lost"
    assert len(starts(log, "orphan")) == 1


# Concurrency limits


def test_concurrency_limit_holds_across_workers(app: App, workers: Any, log: str) -> None:
    executions = [control.limited_two(log, f"job-{i}", "sleep", 0.3) for i in range(12)]
    workers("--slots", "3")
    workers("--slots", "3", "--prefetch", "0")
    for execution in executions:
        assert wait_final(app, execution.id).state == "succeeded"

    attempts = [a for e in executions for a in app.list_attempts(e.id)]
    assert max_overlap(attempts) == 2
    for run in starts(log):
        others = [key for key, group in run["alive"] if group == "limited_two"]
        assert len(others) < 2, f"{run['key']} began while {others} ran"


def test_concurrency_slots_are_not_leaked(app: App, workers: Any, log: str, tmp_path: Path) -> None:
    """After a retry, a timeout, an abort and a SIGKILLed worker, two new executions of a
    function limited to two run in parallel again."""
    first = workers("--slots", "3", *FAST_LOSS)
    retried = control.limited_two(log, "retried", "raise_first")
    timed_out = control.limited_two(log, "timed-out", "stuck")
    assert wait_final(app, retried.id).state == "succeeded"
    assert wait_final(app, timed_out.id).error_code == "timeout"

    aborted = control.limited_two(log, "aborted", "gate", gate=str(tmp_path / "never"))
    wait_started(log, "aborted")
    app.cancel_execution(aborted.id, force=True)
    assert wait_final(app, aborted.id).state == "aborted"

    gates = [tmp_path / "gate-0", tmp_path / "gate-1"]
    lost = [control.limited_two(log, f"lost-{i}", "gate", gate=str(g)) for i, g in enumerate(gates)]
    for execution in lost:
        wait_started(log, execution.arguments["args"][1])
    first.kill()
    workers("--slots", "3", *FAST_LOSS)
    for execution in lost:
        wait_started(log, execution.arguments["args"][1], count=2)
    for gate in gates:
        gate.touch()
    for execution in lost:
        assert wait_final(app, execution.id).state == "succeeded"
        assert [a.error_code for a in app.list_attempts(execution.id)] == ["worker_lost", None]

    fresh = [control.limited_two(log, f"fresh-{i}", "sleep", 0.5) for i in range(2)]
    for execution in fresh:
        assert wait_final(app, execution.id).state == "succeeded"
    a, b = (app.list_attempts(e.id)[0] for e in fresh)
    assert max_overlap([a, b]) == 2, "the two fresh executions did not run in parallel"

    everything = [retried, timed_out, aborted, *lost, *fresh]
    assert max_overlap([a for e in everything for a in app.list_attempts(e.id)]) <= 2
    assert app.list_executions(states=["started", "aborting", "created"]).items == []


def test_concurrency_one_runs_executions_in_the_order_they_became_due(
    app: App, workers: Any, log: str
) -> None:
    # Created in one order, due in the reverse order.
    count = 6
    executions = [
        assign_options(control.one_at_a_time, delay=timedelta(milliseconds=40 * (count - i)))(
            log, f"job-{i}", 0.05
        )
        for i in range(count)
    ]
    due_last = max(e.scheduled_for for e in executions)
    wait_until(lambda: datetime.now(UTC) > due_last, 5)
    workers("--slots", "2")
    workers("--slots", "2", "--prefetch", "0")
    for execution in executions:
        assert wait_final(app, execution.id).state == "succeeded"

    by_due = [e.id for e in sorted(executions, key=lambda e: e.scheduled_for)]
    by_start = sorted(executions, key=lambda e: app.list_attempts(e.id)[0].started_at)
    assert [e.id for e in by_start] == by_due
    assert max_overlap([app.list_attempts(e.id)[0] for e in executions]) == 1


def test_cancel_action_cancels_executions_due_while_the_limit_is_reached(
    app: App, workers: Any, log: str
) -> None:
    workers("--slots", "3")
    holder = control.exclusive(log, "holder", 2.0)
    wait_started(log, "holder")
    refused = [control.exclusive(log, f"refused-{i}") for i in range(3)]
    for execution in refused:
        final = wait_final(app, execution.id, timeout=5)
        assert final.state == "cancelled"
        assert final.error_code == "concurrency_limit"
        assert final.error_message and "concurrency limit of 1" in final.error_message
        assert final.attempts == 0
    assert wait_final(app, holder.id).state == "succeeded"

    # Once the slot is free, the next execution runs.
    after = control.exclusive(log, "after")
    assert wait_final(app, after.id).state == "succeeded"
    assert [r["key"] for r in starts(log)] == ["holder", "after"]


# Graceful shutdown


@pytest.mark.parametrize(
    ("signum", "prefetch"),
    [
        (signal.SIGTERM, "0"),
        (signal.SIGTERM, None),
        (signal.SIGINT, None),
    ],
    ids=["SIGTERM-prefetch-0", "SIGTERM-prefetch-default", "SIGINT-prefetch-default"],
)
def test_graceful_shutdown(
    app: App, workers: Any, log: str, signum: int, prefetch: str | None
) -> None:
    """Stop claiming at once; running attempts get --grace; the one that finishes inside it
    is not run again; the rest are stopped and return to `created`, due now, with no retry
    used (the function has none); exit code 0."""
    short = control.slow_first(log, "short", 1.0)
    long = control.slow_first(log, "long", 60)
    waiting = [control.slow_first_retry_later(log, f"waiting-{i}", 0.1) for i in range(2)]
    args = ["--slots", "2", "--grace", "3s"] + (["--prefetch", prefetch] if prefetch else [])
    worker = workers(*args)
    wait_started(log, "short")
    wait_started(log, "long")
    if prefetch is None:  # the two others wait in the worker's buffer
        wait_until(lambda: all(app.get_execution(e.id).state == "started" for e in waiting), 5)

    signalled = time.monotonic()
    worker.signal(signum)
    # Buffered attempts go back at once.
    for execution in waiting:
        wait_until(lambda e=execution: app.get_execution(e.id).state == "created", 1)
    late = control.hold(log, "late")
    code = worker.wait(10)
    took = time.monotonic() - signalled

    assert code == 0
    assert 3.0 <= took < 3.6, f"exited {took:.2f}s after the signal, with --grace 3s"
    assert app.get_execution(short.id).state == "succeeded"
    stopped = app.get_execution(long.id)
    assert stopped.state == "created"
    assert stopped.scheduled_for <= datetime.now(UTC)
    (attempt,) = app.list_attempts(long.id)
    assert (attempt.outcome, attempt.error_code) == ("interrupted", None)
    assert app.get_execution(late.id).attempts == 0
    for execution in waiting:
        back = app.get_execution(execution.id)
        assert back.state == "created"
        assert back.scheduled_for <= datetime.now(UTC), "waited a retry backoff"
        outcomes = [a.outcome for a in app.list_attempts(execution.id)]
        assert outcomes == (["interrupted"] if prefetch is None else [])

    workers("--slots", "2")
    for execution in (long, late, *waiting):
        assert wait_final(app, execution.id).state == "succeeded"
    assert len(starts(log, "short")) == 1
    assert len(starts(log, "long")) == 2
    for execution in waiting:
        assert len(starts(log, execution.arguments["args"][1])) == 1


def test_second_signal_ends_the_grace_period(app: App, workers: Any, log: str) -> None:
    worker = workers("--slots", "1", "--grace", "60s")
    long = control.slow_first(log, "long", 60)
    wait_started(log, "long")
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "Stopping on signal" in Path(worker.log_path).read_text(), 5)
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert time.monotonic() - signalled < 2.0
    assert app.get_execution(long.id).state == "created"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_whole_process_group(app: App, workers: Any, log: str, signum: int) -> None:
    """Ctrl-C in a terminal and service managers (systemd's default) signal every process of
    the worker, its slots' children included: the shutdown must still be graceful."""
    worker = workers("--slots", "2", "--grace", "5s")
    short = control.slow_first(log, "short", 1.0)
    wait_started(log, "short")
    os.killpg(worker.pid, signum)
    assert worker.wait(10) == 0
    final = app.get_execution(short.id)
    assert final.state == "succeeded", app.list_attempts(short.id)
    assert len(starts(log, "short")) == 1


# Crash recovery


@pytest.mark.parametrize("prefetch", ["0", None], ids=["prefetch-0", "prefetch-default"])
def test_sigkilled_worker_attempts_are_lost_and_retried_as_the_policy_allows(
    app: App, workers: Any, log: str, prefetch: str | None
) -> None:
    """A restarted worker with the same name (as a restart on the same host with the same
    pid layout would have) still has the dead worker's attempts recorded lost."""
    retried = control.hangs_first_time(log, "retried")
    not_retried = control.hangs_first_time_no_retry(log, "not-retried")
    buffered = control.hold_with_retry(log, "buffered")
    args = ["--slots", "2", *FAST_LOSS] + (["--prefetch", prefetch] if prefetch else [])
    dead = workers(*args, name="w-same")
    runs = [wait_started(log, "retried")[0], wait_started(log, "not-retried")[0]]
    if prefetch is None:
        wait_until(lambda: app.get_execution(buffered.id).state == "started", 5)

    killed = time.time()
    dead.kill()
    for run in runs:  # the slots' children die with their worker
        wait_until(lambda run=run: not process_alive(run["pid"]), 2)
    workers(*args, name="w-same")

    final = wait_final(app, not_retried.id, timeout=10)
    assert (final.state, final.error_code) == ("failed", "worker_lost")
    (attempt,) = app.list_attempts(not_retried.id)
    assert attempt.error_code == "worker_lost"
    detected = (attempt.finished_at - at(killed)).total_seconds()  # type: ignore[operator]
    print(f"lost recorded {detected:.3f}s after the SIGKILL, with --lost-after 1s")
    assert 0.75 <= detected < 2.5, f"lost detected {detected:.2f}s after the kill"
    assert len(starts(log, "not-retried")) == 1

    assert wait_final(app, retried.id).state == "succeeded"
    attempts = app.list_attempts(retried.id)
    assert [a.error_code for a in attempts] == ["worker_lost", None]
    assert_no_overlap(attempts)
    assert alive_runs_of(starts(log, "retried")[1], "retried") == []

    assert wait_final(app, buffered.id).state == "succeeded"
    expected = ["worker_lost", None] if prefetch is None else [None]
    assert [a.error_code for a in app.list_attempts(buffered.id)] == expected
    assert len(starts(log, "buffered")) == 1, "a buffered attempt never began, yet ran twice"


def test_slow_live_attempt_is_never_taken_over(app: App, workers: Any, log: str) -> None:
    workers("--slots", "2", *FAST_LOSS)
    workers("--slots", "2", *FAST_LOSS)
    execution = control.hold_with_retry(log, "slow", 4.0)
    assert wait_final(app, execution.id).state == "succeeded"
    (attempt,) = app.list_attempts(execution.id)
    assert seconds(attempt) >= 4.0
    assert len(starts(log, "slow")) == 1


def test_worker_declared_lost_while_paused_stops_its_attempts_on_resuming(
    app: App, workers: Any, log: str
) -> None:
    """A worker paused (SIGSTOP of its process group, and of its slot's child, which leads
    a group of its own) past --lost-after has its attempts taken over. When it resumes it
    must stop its now duplicate attempts at once, not give them a grace period."""
    paused = workers("--slots", "1", "--prefetch", "0", "--grace", "30s", *FAST_LOSS)
    execution = control.hangs_first_time(log, "taken-over")
    (run,) = wait_started(log, "taken-over")
    os.killpg(paused.pid, signal.SIGSTOP)
    os.killpg(run["pid"], signal.SIGSTOP)
    try:
        workers("--slots", "1", *FAST_LOSS)
        assert wait_final(app, execution.id, timeout=10).state == "succeeded"
    finally:
        os.killpg(paused.pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run["pid"], signal.SIGCONT)
    resumed = time.monotonic()
    wait_until(lambda: not process_alive(run["pid"]), 5, what="the duplicate attempt to stop")
    assert time.monotonic() - resumed < 2.0
    assert paused.wait(10) == 1  # it stops, saying why
    final = app.get_execution(execution.id)
    assert final.state == "succeeded"
    assert [a.error_code for a in app.list_attempts(execution.id)] == ["worker_lost", None]


def test_attempts_of_a_lost_worker_survive_a_rescuer_dying_midway(
    app: App, workers: Any, log: str
) -> None:
    dead = workers("--slots", "1", *FAST_LOSS)
    execution = control.hangs_first_time(log, "orphan")
    wait_started(log, "orphan")
    dead.kill()
    # The first step of a rescue, as a worker killed right after it would leave things.
    wait_until(lambda: app.store.declare_lost_workers(timedelta(seconds=1)), 5)

    workers("--slots", "1", *FAST_LOSS)
    final = wait_final(app, execution.id, timeout=5)
    assert final.state == "succeeded"
    assert [a.error_code for a in app.list_attempts(execution.id)] == ["worker_lost", None]
