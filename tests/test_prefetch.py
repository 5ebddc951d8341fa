"""Executions claimed ahead of free slots (the prefetch buffer) keep the promises of
executions waiting in the store: discard_after still holds until they begin."""

from __future__ import annotations

from pathlib import Path

import deferq
from deferq.app import App
from tests.support import WorkerProcess, wait_until
from tests.tasks import basic


def test_a_buffered_execution_past_its_discard_after_never_begins(
    app: App, store_url: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.txt"
    blocker = basic.sleep_for(3.0)
    expiring = [deferq.discard_after(basic.record_pid, "1s")(str(runs)) for _ in range(3)]

    with WorkerProcess(store_url, ["tests.tasks.basic"], "--slots", "1", "--prefetch", "5"):
        # All four are claimed at once: the blocker runs, the others wait in the buffer
        # while their discard_after passes.
        wait_until(
            lambda: all(deferq.get_execution(e.id).state != "created" for e in expiring),
            timeout=20,
            what="the expiring executions to be claimed into the buffer",
        )
        wait_until(
            lambda: deferq.get_execution(blocker.id).state == "succeeded",
            timeout=30,
            what="the blocker to finish",
        )
        wait_until(
            lambda: all(deferq.get_execution(e.id).state.is_final for e in expiring),
            timeout=20,
            what="the expiring executions to end",
        )

    assert not runs.exists(), "an execution began after its discard_after"
    for execution in expiring:
        done = deferq.get_execution(execution.id)
        assert done.state == "discarded"
        [attempt] = deferq.list_attempts(execution.id)
        assert attempt.outcome == "interrupted"
        assert "discard_after" in (attempt.error_message or "")
