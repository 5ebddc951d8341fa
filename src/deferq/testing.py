"""Running background functions inside an application's own tests.

    from deferq.testing import run_due

    def test_sign_in_sends_mail(tmp_path):
        deferq.configure(url=f"sqlite:///{tmp_path}/deferq.sqlite3")
        send_sign_in_email("ada@example.com")
        [execution] = run_due()
        assert execution.state == "succeeded"

`run_due` claims and runs due executions in this process, one at a time in due order,
through the same store, serialization and state machine as a worker: an argument or result
that would fail in production fails here too. It does not enforce `max_duration` and cannot
abort (that needs a worker's child processes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from deferq.app import App, default_app
from deferq.functions import BackgroundFunction, registry
from deferq.ids import new_execution_id
from deferq.models import Execution
from deferq.runner import report, run_function
from deferq.store.base import FunctionLimits

TESTING_WORKER = "testing"


def run_due(
    app: App | None = None,
    *,
    functions: Sequence[BackgroundFunction[Any, Any]] | None = None,
    include_scheduled: bool = False,
    limit: int = 10_000,
) -> list[Execution]:
    """Run due executions until none is due; return them as they ended, in run order.

    With `include_scheduled=True`, executions scheduled in the future (delays, retries
    waiting their backoff) run too, without waiting; `discard_after` still holds.
    """
    app = app or default_app()
    store = app.store
    chosen = functions if functions is not None else list(registry.values())
    names = {f.name: FunctionLimits() for f in chosen}
    horizon = timedelta(days=365_000) if include_scheduled else timedelta(0)
    worker_id = f"{TESTING_WORKER}-{new_execution_id()}"
    store.register_worker(worker_id, TESTING_WORKER, "localhost", 0)
    loop = asyncio.new_event_loop()
    ran: list[str] = []
    try:
        while len(ran) < limit:
            store.discard_expired()
            claimed = store.claim_due_executions(worker_id, names, 1, horizon=horizon)
            if not claimed:
                break
            attempt = claimed[0]
            raw = run_function(attempt.function_name, attempt.arguments, loop)
            store.record_attempt_reports([report(attempt, raw)])
            ran.append(attempt.execution_id)
    finally:
        loop.close()
        store.unregister_worker(worker_id)
    return [app.get_execution(i) for i in dict.fromkeys(ran)]
