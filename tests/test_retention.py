"""Finished executions are deleted after the retention; nothing else is."""

from __future__ import annotations

from datetime import timedelta

import pytest

import deferq
from deferq.app import App
from deferq.testing import run_due
from tests.tasks import basic


def test_prune_deletes_only_finished_executions_past_the_retention(app: App) -> None:
    finished = basic.add(1, 2)
    failed = basic.returns_set()
    run_due(functions=[basic.add, basic.returns_set])
    waiting = deferq.delay(basic.add, "1h")(3, 4)

    assert app.store.prune_finished(timedelta(hours=1)) == 0
    assert deferq.get_execution(finished.id).state == "succeeded"

    assert app.store.prune_finished(timedelta(0)) == 2

    for gone in (finished, failed):
        with pytest.raises(deferq.ExecutionNotFound):
            deferq.get_execution(gone.id)
        with pytest.raises(deferq.ExecutionNotFound):
            deferq.list_attempts(gone.id)
    assert deferq.get_execution(waiting.id).state == "created"
    assert [e.id for e in deferq.list_executions().items] == [waiting.id]
