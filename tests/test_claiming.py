"""What a worker does about due work it cannot take, on both stores, with real worker
processes: it waits for news instead of claiming again in a loop, and executions of a
function with the "cancel" concurrency action are cancelled promptly while every worker is
busy."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deferq.app import App
from tests.support import WorkerProcess, wait_until
from tests.tasks import control, elsewhere
from tests.tasks.control import starts

MODULE = "tests.tasks.control"


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "runs.log")


@pytest.fixture
def workers(app: App, store_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(store_url, [MODULE], *args, log_path=log_path)
        started.append(worker.start())
        return worker

    yield start
    for worker in started:
        worker.__exit__(None, None, None)
    for path in sorted(tmp_path.glob("worker-*.log")):
        print(f"--- {path.name}")
        print("\n".join(path.read_text(errors="replace").splitlines()[-30:]))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


IDLE_WINDOW = 2.0
IDLE_CPU = 0.3
"""Most CPU seconds a waiting worker may use over IDLE_WINDOW seconds. A worker waiting for
news uses next to none; one retrying a claim in a loop uses a good part of a core."""


def in_state(app: App, state: str) -> int:
    return len(app.list_executions(states=[state]).items)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("blocked", ["function it does not import", "concurrency limit reached"])
def test_a_worker_waits_quietly_beside_due_work_it_cannot_take(
    app: App, workers: Any, log: str, tmp_path: Path, blocked: str
) -> None:
    worker = workers("--slots", "4", "--grace", "100ms")
    if blocked == "concurrency limit reached":
        running = control.one_at_a_time(log, "running", 60)
        waiting = control.one_at_a_time(log, "waiting", 0)
        wait_until(lambda: starts(log, "running"), 20, what="the first one to run")
    else:
        waiting = elsewhere.mark_elsewhere(str(tmp_path / "marks"))
        # Something it can take shows it claims: it looked at the store and saw both.
        assert wait_until(lambda: app.get_execution(control.hold(log, "seen").id), 5)
        wait_until(lambda: starts(log, "seen"), 20, what="the worker to claim")
    assert app.get_execution(waiting.id).state == "created"

    # A measurement window, not a wait for an event.
    before = cpu_seconds(worker.pid)
    time.sleep(IDLE_WINDOW)
    used = cpu_seconds(worker.pid) - before
    assert used < IDLE_CPU, f"the worker used {used:.2f} s of CPU in {IDLE_WINDOW} s"
    assert app.get_execution(waiting.id).state == "created"
    if blocked == "concurrency limit reached":
        # The news it waits for: the running one ends, the waiting one starts at once.
        app.cancel_execution(running.id, force=True)
        wait_until(lambda: starts(log, "waiting"), 5, what="the waiting one to start")


def test_cancel_action_cancels_promptly_while_every_worker_is_busy(
    app: App, workers: Any, log: str
) -> None:
    """Executions that become due while the limit is reached are cancelled with the reason
    stored, within about a second, even though no worker has a free slot to claim them."""
    workers("--slots", "1", "--prefetch", "0")
    holder = control.exclusive(log, "holder", 30.0)
    wait_until(lambda: starts(log, "holder"), 20, what="the holder to run")
    refused = [control.exclusive(log, f"refused-{i}") for i in range(2)]
    for execution in refused:
        final = wait_until(
            lambda e=execution: (x := app.get_execution(e.id)).state.is_final and x,
            5,
            what="the refused execution to be cancelled",
        )
        assert final.state == "cancelled"
        assert final.error_code == "concurrency_limit"
        assert final.error_message and "concurrency limit of 1" in final.error_message
        assert final.attempts == 0
    assert app.get_execution(holder.id).state == "started"
    assert [r["key"] for r in starts(log)] == ["holder"]
    app.cancel_execution(holder.id, force=True)
