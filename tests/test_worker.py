"""Worker processes (`deferq worker`): they run sync and async functions, show a running
attempt as `started`, stop cleanly on SIGINT and SIGTERM, share one store without running an
attempt twice, and claim only the functions they import."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import deferq
from deferq import Execution
from deferq.app import App
from tests.support import WorkerProcess, wait_until
from tests.tasks import basic, elsewhere, lifecycle


def worker(url: str, log: Path, *modules: str, slots: int = 2) -> WorkerProcess:
    return WorkerProcess(url, modules or ["tests.tasks.basic"], "--slots", str(slots), log_path=log)


def final_state(execution_id: str, timeout: float = 60) -> Execution:
    def ended() -> Execution | None:
        execution = deferq.get_execution(execution_id)
        return execution if execution.state.is_final else None

    return wait_until(ended, timeout=timeout, what=f"execution {execution_id} to end")


def wait_for_start(log: Path) -> None:
    wait_until(
        lambda: log.exists() and "Worker started" in log.read_text(encoding="utf-8"),
        timeout=60,
        what=f"a worker to start ({log.name})",
    )


def all_executions() -> list[Execution]:
    found: list[Execution] = []
    cursor = None
    while True:
        page = deferq.list_executions(first=1000, after=cursor)
        found += page.items
        cursor = page.next_cursor
        if cursor is None:
            return found


def test_sync_and_async_functions_run(app: App, store_url: str, tmp_path: Path) -> None:
    with worker(store_url, tmp_path / "worker.log"):
        sync_one = basic.add(2, 3)
        async_one = basic.add_async(20, 30)
        keywords = basic.add_async(a=1, b=2)
        for execution in (sync_one, async_one, keywords):
            assert final_state(execution.id).state == "succeeded"
    assert deferq.get_result(sync_one.id) == 5
    assert deferq.get_result(async_one.id) == 50
    assert deferq.get_result(keywords.id) == 3
    for execution in (sync_one, async_one, keywords):
        [attempt] = deferq.list_attempts(execution.id)
        assert attempt.outcome == "succeeded" and attempt.worker


def test_a_running_attempt_is_started(app: App, store_url: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate.txt"
    with worker(store_url, tmp_path / "worker.log", "tests.tasks.lifecycle"):
        execution = lifecycle.wait_for_file(str(gate))
        started = wait_until(
            lambda: (e := deferq.get_execution(execution.id)).state == "started" and e,
            timeout=60,
            what="the execution to start",
        )
        assert started.attempts == 1 and started.started_at is not None
        assert started.finished_at is None
        [attempt] = deferq.list_attempts(execution.id)
        assert attempt.outcome == "running" and attempt.worker

        gate.write_text("let it finish", encoding="utf-8")
        done = final_state(execution.id)
    assert done.state == "succeeded" and done.attempts == 1
    assert deferq.get_result(execution.id) == "let it finish"


def test_failures_are_recorded_by_the_worker(app: App, store_url: str, tmp_path: Path) -> None:
    with worker(store_url, tmp_path / "worker.log"):
        raised = basic.always_fails("kaput")
        not_json = basic.returns_set()
        raised_end = final_state(raised.id)
        not_json_end = final_state(not_json.id)

    assert raised_end.state == "failed" and raised_end.error_code == "raised"
    assert raised_end.attempts == 3
    attempts = deferq.list_attempts(raised.id)
    assert [a.number for a in attempts] == [1, 2, 3]
    for attempt in attempts:
        assert attempt.outcome == "failed" and attempt.error_code == "raised"
        assert attempt.error_message == "RuntimeError: kaput"
        assert attempt.traceback and "raise RuntimeError(message)" in attempt.traceback

    assert not_json_end.state == "failed"
    assert not_json_end.error_code == "result_not_json"
    with pytest.raises(deferq.ExecutionFailed) as info:
        deferq.get_result(not_json.id)
    assert info.value.error_code == "result_not_json"


def test_unicode_round_trips_through_a_worker(app: App, store_url: str, tmp_path: Path) -> None:
    value = {
        "emoji": "🎉👩‍💻🇯🇵",
        "cjk": "漢字かなカナ한국어",
        "rtl": "مرحبا بالعالم שלום",
        "ключ 🔑": ["e\u0301", "\u200f", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"],
    }
    metadata = {"客户": "東京", "emoji": "🎉", "שם": "עולם"}
    with worker(store_url, tmp_path / "worker.log"):
        execution = deferq.add_metadata(basic.echo, metadata)(value)
        done = final_state(execution.id)
    assert done.state == "succeeded"
    assert deferq.get_result(execution.id) == value
    assert done.metadata == metadata
    assert [e.id for e in deferq.list_executions(metadata={"客户": ["東京"]}).items] == [
        execution.id
    ]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_worker_exits_0_on_signal(
    app: App, store_url: str, tmp_path: Path, signum: signal.Signals
) -> None:
    log = tmp_path / "worker.log"
    with worker(store_url, log) as process:
        assert deferq.await_result(basic.add, timeout=60)(1, 1) == 2
        process.signal(signum)
        assert process.wait(60) == 0
    text = log.read_text(encoding="utf-8")
    assert f"signal={signum.name}" in text
    assert "Worker stopped" in text and "action=stop_worker" in text


@pytest.mark.slow
def test_two_workers_run_each_execution_exactly_once(
    app: App, store_url: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.txt"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    count = 2000
    with (
        worker(store_url, logs[0], "tests.tasks.lifecycle"),
        worker(store_url, logs[1], "tests.tasks.lifecycle"),
    ):
        for log in logs:
            wait_for_start(log)
        made = lifecycle.record_run.enqueue_many([(str(runs), f"t{n}") for n in range(count)])

        def all_done() -> bool:
            succeeded = deferq.list_executions(states=["succeeded"], first=1000)
            if succeeded.next_cursor is None:
                return False
            rest = deferq.list_executions(
                states=["succeeded"], first=1000, after=succeeded.next_cursor
            )
            return len(succeeded.items) + len(rest.items) == count

        wait_until(all_done, timeout=100, interval=0.1, what=f"{count} executions to succeed")

    executions = all_executions()
    assert len(executions) == count
    assert {e.id for e in executions} == {e.id for e in made}
    assert all(e.state == "succeeded" and e.attempts == 1 for e in executions)

    tokens = [line.split()[0] for line in runs.read_text(encoding="utf-8").splitlines()]
    assert len(tokens) == count
    assert sorted(tokens) == sorted(f"t{n}" for n in range(count))

    workers = set()
    for execution in executions:
        [attempt] = deferq.list_attempts(execution.id)
        assert attempt.outcome == "succeeded"
        workers.add(attempt.worker)
    assert len(workers) == 2, "both workers should have run some executions"

    for log in logs:
        text = log.read_text(encoding="utf-8")
        assert "Worker stopped" in text
        assert "database is locked" not in text
        assert "Store unavailable" not in text


def test_a_worker_claims_only_functions_it_imports(
    app: App, store_url: str, tmp_path: Path
) -> None:
    marks = tmp_path / "marks.txt"
    foreign = elsewhere.mark_elsewhere(str(marks))
    with worker(store_url, tmp_path / "basic.log", "tests.tasks.basic"):
        # Stored after the foreign one, so the worker would have claimed that one first.
        assert deferq.await_result(basic.add, timeout=60)(1, 2) == 3
        waiting = deferq.get_execution(foreign.id)
        assert waiting.state == "created" and waiting.attempts == 0
    assert not marks.exists()

    with worker(store_url, tmp_path / "elsewhere.log", "tests.tasks.elsewhere"):
        done = final_state(foreign.id)
    assert done.state == "succeeded" and done.attempts == 1
    assert marks.read_text(encoding="utf-8").strip() == str(deferq.get_result(foreign.id))
