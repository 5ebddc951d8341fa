"""The lifecycle of SPEC §3: every state transition, retries with backoff, `discard_after` for
every attempt, cancels that outlive workers, and `deferq.testing.run_due`.

A `started` execution is observed by claiming it through the store as a worker would, without
running it; everything else runs through `run_due` or real worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import deferq
from deferq import (
    ExecutionFailed,
    ExecutionNotCancellable,
    ExecutionNotReschedulable,
    ResultNotReady,
    RetryPolicy,
    defer,
    delay,
    discard_after,
)
from deferq.app import App
from deferq.functions import BackgroundFunction
from deferq.ids import new_execution_id
from deferq.runner import report, run_function
from deferq.store.base import ClaimedAttempt, FunctionLimits
from deferq.testing import run_due
from tests.support import WorkerProcess, wait_until
from tests.tasks import basic, lifecycle

RUNS: list[str] = []
"""Tags of the runs of this module's functions, in run order."""


@defer
def succeed(tag: str) -> str:
    RUNS.append(tag)
    return f"done {tag}"


@defer
def fail(tag: str) -> None:
    RUNS.append(tag)
    raise RuntimeError(f"failed {tag}")


@defer(retry=RetryPolicy(2, initial_interval=0))
def fail_with_immediate_retries(tag: str) -> None:
    RUNS.append(tag)
    raise RuntimeError(f"failed {tag}")


@defer(retry=2)
def fail_with_default_retries(tag: str) -> None:
    RUNS.append(tag)
    raise RuntimeError(f"failed {tag}")


@defer(retry=True)
def fail_with_default_policy(tag: str) -> None:
    RUNS.append(tag)
    raise RuntimeError(f"failed {tag}")


@defer(retry=RetryPolicy(1, initial_interval="1h", max_interval="1h", randomization_factor=0))
def fail_once_then_succeed(tag: str) -> str:
    RUNS.append(tag)
    if RUNS.count(tag) == 1:
        raise RuntimeError(f"first run of {tag} fails")
    return f"done {tag}"


@defer(retry=RetryPolicy(3, initial_interval="10s", randomization_factor=0))
def fail_with_slow_retry(tag: str) -> None:
    RUNS.append(tag)
    raise RuntimeError(f"failed {tag}")


@pytest.fixture(autouse=True)
def _clear_runs() -> Iterator[None]:
    RUNS.clear()
    yield
    RUNS.clear()


def claim(app: App, fn: BackgroundFunction[Any, Any]) -> ClaimedAttempt:
    """Start the due execution of `fn` as a worker would, without running it."""
    worker_id = f"test-{new_execution_id()}"
    app.store.register_worker(worker_id, "test", "localhost", 0)
    [claimed] = app.store.claim_due_executions(worker_id, {fn.name: FunctionLimits()}, 10)
    return claimed


def finish(app: App, claimed: ClaimedAttempt) -> None:
    """Run a claimed attempt in this process and store its outcome, as a worker would."""
    loop = asyncio.new_event_loop()
    try:
        raw = run_function(claimed.function_name, claimed.arguments, loop)
    finally:
        loop.close()
    app.store.record_attempt_reports([report(claimed, raw)])


def near(value: Any, expected: Any, within: float = 2.0) -> bool:
    return value is not None and abs(value - expected) <= timedelta(seconds=within)


# Every transition


def test_created_started_succeeded(app: App) -> None:
    execution = succeed("a")
    assert deferq.get_execution(execution.id).state == "created"

    claimed = claim(app, succeed)
    assert claimed.execution_id == execution.id and claimed.number == 1
    started = deferq.get_execution(execution.id)
    assert started.state == "started"
    assert started.attempts == 1
    assert started.started_at is not None and started.finished_at is None
    [attempt] = deferq.list_attempts(execution.id)
    assert attempt.number == 1 and attempt.outcome == "running"
    assert attempt.worker is not None and attempt.finished_at is None
    with pytest.raises(ResultNotReady, match="started"):
        deferq.get_result(execution.id)
    with pytest.raises(ExecutionNotCancellable, match="started"):
        deferq.cancel_execution(execution.id)
    with pytest.raises(ExecutionNotReschedulable, match="started"):
        deferq.reschedule_execution(execution.id, "1h")
    assert deferq.get_execution(execution.id).state == "started"

    finish(app, claimed)
    done = deferq.get_execution(execution.id)
    assert done.state == "succeeded"
    assert done.finished_at is not None and done.started_at is not None
    assert done.started_at <= done.finished_at
    assert done.attempts == 1 and done.error_code is None
    [attempt] = deferq.list_attempts(execution.id)
    assert attempt.outcome == "succeeded" and attempt.finished_at is not None
    assert deferq.get_result(execution.id) == "done a"
    assert RUNS == ["a"]


def test_created_started_failed(app: App) -> None:
    execution = fail("b")
    [ran] = run_due()
    assert ran.id == execution.id
    assert ran.state == "failed"
    assert ran.error_code == "raised"
    assert ran.error_message == "RuntimeError: failed b"
    assert ran.attempts == 1 and ran.finished_at is not None
    [attempt] = deferq.list_attempts(execution.id)
    assert attempt.number == 1 and attempt.outcome == "failed"
    assert attempt.error_code == "raised"
    assert attempt.error_message == "RuntimeError: failed b"
    assert attempt.traceback is not None
    assert "RuntimeError: failed b" in attempt.traceback
    assert 'raise RuntimeError(f"failed {tag}")' in attempt.traceback
    assert attempt.started_at <= attempt.finished_at  # type: ignore[operator]


def test_created_cancelled(app: App) -> None:
    execution = succeed("c")
    cancelled = deferq.cancel_execution(execution.id)
    assert cancelled.state == "cancelled"
    assert run_due(include_scheduled=True) == []
    stored = deferq.get_execution(execution.id)
    assert stored.state == "cancelled" and stored.attempts == 0
    assert stored.finished_at is not None
    assert deferq.list_attempts(execution.id) == []
    assert RUNS == []


def test_force_cancels_a_created_execution_too(app: App) -> None:
    execution = succeed("c")
    assert deferq.cancel_execution(execution.id, force=True).state == "cancelled"
    assert run_due() == []
    assert RUNS == []


def test_created_discarded(app: App) -> None:
    deadline = app.store.now() + timedelta(milliseconds=300)
    execution = discard_after(succeed, deadline)("d")
    assert deferq.get_execution(execution.id).discard_after == deadline
    wait_until(lambda: app.store.now() > deadline, timeout=10, what="the discard_after")

    # Past its deadline an execution is never claimed, even before it is marked discarded.
    worker_id = f"test-{new_execution_id()}"
    app.store.register_worker(worker_id, "test", "localhost", 0)
    assert app.store.claim_due_executions(worker_id, {succeed.name: FunctionLimits()}, 10) == []

    assert run_due() == []
    discarded = deferq.get_execution(execution.id)
    assert discarded.state == "discarded"
    assert discarded.attempts == 0 and discarded.finished_at is not None
    assert deferq.list_attempts(execution.id) == []
    with pytest.raises(ExecutionFailed) as info:
        deferq.get_result(execution.id)
    assert info.value.execution.state == "discarded"
    assert RUNS == []


def test_force_cancel_of_a_started_execution_leaves_it_aborting(app: App) -> None:
    execution = succeed("e")
    claim(app, succeed)

    with pytest.raises(ExecutionNotCancellable):
        deferq.cancel_execution(execution.id)
    aborting = deferq.cancel_execution(execution.id, force=True)
    assert aborting.state == "aborting"
    assert deferq.get_execution(execution.id).state == "aborting"
    with pytest.raises(ResultNotReady, match="aborting"):
        deferq.get_result(execution.id)
    assert deferq.list_executions(states=["aborting"]).items[0].id == execution.id


# Retries


def test_a_failed_attempt_with_retries_left_returns_to_created_later(app: App) -> None:
    execution = fail_once_then_succeed("r")
    first_schedule = deferq.get_execution(execution.id).scheduled_for

    [ran] = run_due()
    assert ran.id == execution.id
    assert ran.state == "created"
    assert ran.attempts == 1
    [failed] = deferq.list_attempts(execution.id)
    assert failed.outcome == "failed" and failed.error_code == "raised"
    assert failed.finished_at is not None
    assert ran.scheduled_for > first_schedule + timedelta(minutes=59)
    assert near(ran.scheduled_for, failed.finished_at + timedelta(hours=1))
    assert run_due() == []  # the retry waits its backoff

    [retried] = run_due(include_scheduled=True)
    assert retried.id == execution.id
    assert retried.state == "succeeded" and retried.attempts == 2
    attempts = deferq.list_attempts(execution.id)
    assert [a.number for a in attempts] == [1, 2]
    assert [a.outcome for a in attempts] == ["failed", "succeeded"]
    assert attempts[0].error_message == "RuntimeError: first run of r fails"
    assert deferq.get_result(execution.id) == "done r"
    assert [e.id for e in deferq.list_executions().items] == [execution.id]


def test_an_explicit_zero_backoff_retries_at_once(app: App) -> None:
    execution = fail_with_immediate_retries("z")
    [ran] = run_due()  # due ones only: every retry was due at once
    assert ran.id == execution.id
    assert ran.state == "failed" and ran.attempts == 3
    assert RUNS == ["z", "z", "z"]
    attempts = deferq.list_attempts(execution.id)
    assert [(a.number, a.outcome, a.error_code) for a in attempts] == [
        (1, "failed", "raised"),
        (2, "failed", "raised"),
        (3, "failed", "raised"),
    ]


def test_retry_count_uses_the_default_intervals(app: App) -> None:
    execution = fail_with_default_retries("n")
    [ran] = run_due()
    assert ran.state == "created" and ran.attempts == 1
    [attempt] = deferq.list_attempts(execution.id)
    assert attempt.finished_at is not None
    # 30 seconds, spread by half either way.
    waited = ran.scheduled_for - attempt.finished_at
    assert timedelta(seconds=14) <= waited <= timedelta(seconds=46)

    run_due(include_scheduled=True)
    failed = deferq.get_execution(execution.id)
    assert failed.state == "failed" and failed.attempts == 3
    assert len(deferq.list_attempts(execution.id)) == 3


def test_retry_true_gives_thirteen_retries(app: App) -> None:
    execution = fail_with_default_policy("t")
    run_due(include_scheduled=True)
    failed = deferq.get_execution(execution.id)
    assert failed.state == "failed"
    assert failed.attempts == 14
    assert len(RUNS) == 14
    assert [a.number for a in deferq.list_attempts(execution.id)] == list(range(1, 15))


def test_a_retry_that_would_start_after_discard_after_is_discarded(app: App) -> None:
    execution = discard_after(fail_with_slow_retry, "3s")("late")
    [ran] = run_due()
    assert ran.id == execution.id
    assert ran.state == "discarded"
    assert ran.attempts == 1 and ran.finished_at is not None
    [attempt] = deferq.list_attempts(execution.id)
    assert attempt.outcome == "failed" and attempt.error_code == "raised"
    assert run_due(include_scheduled=True) == []
    assert RUNS == ["late"]


def test_a_retry_before_discard_after_is_kept(app: App) -> None:
    execution = discard_after(fail_with_slow_retry, "1h")("early")
    [ran] = run_due()
    assert ran.id == execution.id and ran.state == "created"
    assert ran.discard_after is not None and ran.scheduled_for < ran.discard_after


# With real workers


def start_worker(url: str, log: Path, *modules: str) -> WorkerProcess:
    return WorkerProcess(url, modules or ["tests.tasks.lifecycle"], "--slots", "2", log_path=log)


def probe(tmp_path: Path) -> None:
    """Return once the worker has run a fresh execution: it is up and claiming."""
    token = new_execution_id()
    path = str(tmp_path / "probe.txt")
    assert deferq.await_result(lifecycle.record_run, timeout=60)(path, token) == token


def final_state(execution_id: str, timeout: float = 60) -> deferq.Execution:
    def ended() -> deferq.Execution | None:
        execution = deferq.get_execution(execution_id)
        return execution if execution.state.is_final else None

    return wait_until(ended, timeout=timeout, what=f"execution {execution_id} to end")


def test_discard_after_passes_while_no_worker_runs(
    app: App, store_url: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.txt"
    deadline = app.store.now() + timedelta(milliseconds=500)
    execution = discard_after(lifecycle.record_run, deadline)(str(runs), "late")
    wait_until(lambda: app.store.now() > deadline, timeout=10, what="the discard_after")

    with start_worker(store_url, tmp_path / "worker.log"):
        probe(tmp_path)
        discarded = final_state(execution.id)
    assert discarded.state == "discarded"
    assert discarded.attempts == 0
    assert deferq.list_attempts(execution.id) == []
    assert not runs.exists()


def test_discard_after_with_an_idle_worker_runs_it(
    app: App, store_url: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.txt"
    with start_worker(store_url, tmp_path / "worker.log"):
        probe(tmp_path)
        execution = discard_after(lifecycle.record_run, "30s")(str(runs), "in time")
        done = final_state(execution.id)
    assert done.state == "succeeded" and done.attempts == 1
    assert runs.read_text(encoding="utf-8").startswith("in time ")


def test_a_worker_discards_a_retry_past_discard_after(
    app: App, store_url: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.txt"
    with start_worker(store_url, tmp_path / "worker.log"):
        execution = discard_after(lifecycle.fails_with_slow_retry, "3s")(str(runs))
        ended = final_state(execution.id)
    assert ended.state == "discarded"
    assert ended.attempts == 1
    [attempt] = deferq.list_attempts(execution.id)
    assert attempt.outcome == "failed" and attempt.error_code == "raised"
    assert runs.read_text(encoding="utf-8").splitlines() == ["run"]


def test_a_worker_retries_until_success(app: App, store_url: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    with start_worker(store_url, tmp_path / "worker.log"):
        result = deferq.await_result(lifecycle.fail_then_succeed, timeout=60)(str(runs), 2)
    assert result == 3
    [execution] = deferq.list_executions(functions=[lifecycle.fail_then_succeed]).items
    assert execution.state == "succeeded" and execution.attempts == 3
    outcomes = [a.outcome for a in deferq.list_attempts(execution.id)]
    assert outcomes == ["failed", "failed", "succeeded"]


def test_a_cancel_survives_a_worker_restart(app: App, store_url: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    with start_worker(store_url, tmp_path / "first.log") as first:
        probe(tmp_path)
        assert first.stop() == 0

    # No worker runs now: store one execution and cancel it, store another and leave it.
    cancelled = lifecycle.record_run(str(runs), "cancelled")
    deferq.cancel_execution(cancelled.id)
    kept = lifecycle.record_run(str(runs), "kept")

    with start_worker(store_url, tmp_path / "second.log"):
        assert final_state(kept.id).state == "succeeded"
        probe(tmp_path)
    stored = deferq.get_execution(cancelled.id)
    assert stored.state == "cancelled" and stored.attempts == 0
    assert deferq.list_attempts(cancelled.id) == []
    assert [line.split()[0] for line in runs.read_text(encoding="utf-8").splitlines()] == ["kept"]


# deferq.testing.run_due


ORDER: list[int] = []


@defer
def ordered(n: int) -> int:
    ORDER.append(n)
    return n


def test_run_due_runs_due_executions_in_due_order(app: App) -> None:
    ORDER.clear()
    first = ordered(1)
    moved = delay(ordered, "1h")(2)
    third = ordered(3)
    later = delay(ordered, "1h")(4)
    deferq.reschedule_execution(moved.id)  # due now, after the third was stored

    ran = run_due()
    assert [e.id for e in ran] == [first.id, third.id, moved.id]
    assert ORDER == [1, 3, 2]
    assert all(e.state == "succeeded" for e in ran)
    assert deferq.get_execution(later.id).state == "created"

    assert [e.id for e in run_due(include_scheduled=True)] == [later.id]
    assert ORDER == [1, 3, 2, 4]
    assert run_due(include_scheduled=True) == []


def test_run_due_runs_only_the_functions_given(app: App) -> None:
    mine = succeed("mine")
    theirs = fail("theirs")
    assert [e.id for e in run_due(functions=[succeed])] == [mine.id]
    assert deferq.get_execution(theirs.id).state == "created"
    assert RUNS == ["mine"]


def test_run_due_fails_as_a_worker_does(app: App, store_url: str, tmp_path: Path) -> None:
    in_process = basic.returns_set()
    [ran] = run_due(functions=[basic.returns_set])
    with start_worker(store_url, tmp_path / "worker.log", "tests.tasks.basic"):
        in_worker = final_state(basic.returns_set().id)
    assert ran.id == in_process.id
    assert ran.state == in_worker.state == "failed"
    assert ran.error_code == in_worker.error_code == "result_not_json"
    assert ran.error_message == in_worker.error_message
