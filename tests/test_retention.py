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


def test_prune_deletes_in_batches_until_none_is_left(app: App) -> None:
    """More finished executions than one batch of the SQLite store's prune: every one goes,
    with its attempts and metadata, and the count covers them all."""
    many = 4_500
    made = deferq.add_metadata(basic.add, {"batch": "old"}).enqueue_many(
        [(n, n) for n in range(many)]
    )
    assert len(run_due(functions=[basic.add])) == many
    waiting = deferq.delay(basic.add, "1h")(0, 0)

    assert app.store.prune_finished(timedelta(0)) == many

    assert [e.id for e in deferq.list_executions(first=1000).items] == [waiting.id]
    assert deferq.list_executions(metadata={"batch": "old"}).items == []
    for gone in (made[0], made[many // 2], made[-1]):
        with pytest.raises(deferq.ExecutionNotFound):
            deferq.list_attempts(gone.id)
