"""Lost connections: a call that loses its connection raises StoreUnavailable, the next one
reconnects by itself, and nothing is lost. Idle connections that the server dropped are
replaced before use."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

from deferq.models import AttemptOutcome
from deferq.store.base import AttemptReport, FunctionLimits, StoreUnavailable
from tests.postgres.support import Relay, backend_pids, new
from tests.support import wait_until

psycopg = pytest.importorskip("psycopg")


from deferq.store.postgres import PostgresStore  # noqa: E402

pytestmark = pytest.mark.postgres

FREE = {"tests.job": FunctionLimits()}


def terminate(admin: Any, pids: list[int]) -> None:
    for pid in pids:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def run_blocked(admin: Any, store: PostgresStore, execution_id: str, call: Any) -> list[Any]:
    """Run `call()` in a thread while `admin` holds the execution's row lock; once the call
    waits for that lock, terminate its connection. Returns what the call raised or returned."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    with admin.transaction():
        admin.execute("SELECT 1 FROM deferq_executions WHERE id = %s FOR UPDATE", (execution_id,))
        thread = threading.Thread(target=run)
        thread.start()
        blocked = wait_until(
            lambda: admin.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            ).fetchall(),
            what="the call to wait for the row lock",
        )
        terminate(admin, [pid for (pid,) in blocked])
        thread.join(10)
    return outcome


@pytest.fixture
def schema_admin(admin: Any, pg_url: str) -> Any:
    """The admin connection, in the test's schema."""
    schema = pg_url.rsplit("%3D", 1)[1]
    admin.execute(f"SET search_path = {schema}")
    return admin


def test_idle_connections_the_server_dropped_are_replaced_unnoticed(
    store: PostgresStore, admin: Any
) -> None:
    execution = store.enqueue([new()])[0]
    pids = backend_pids(store)
    assert pids
    terminate(admin, pids)
    wait_until(
        lambda: (
            not admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchall()
        ),
        what="the terminated backends to exit",
    )
    assert store.get_execution(execution.id) == execution
    assert store.enqueue([new()])
    assert not set(backend_pids(store)) & set(pids)


def test_a_call_that_loses_its_connection_raises_and_the_next_reconnects(
    store: PostgresStore, schema_admin: Any
) -> None:
    execution = store.enqueue([new()])[0]
    outcome = run_blocked(
        schema_admin, store, execution.id, lambda: store.cancel_execution(execution.id, False)
    )
    assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable)
    assert store.get_execution(execution.id) == execution  # unchanged, and reachable again
    assert store.cancel_execution(execution.id, False).state == "cancelled"


def test_a_report_that_failed_to_store_is_stored_on_the_next_try(
    store: PostgresStore, schema_admin: Any
) -> None:
    execution = store.enqueue([new()])[0]
    (claimed,) = store.claim_due_executions("w", {"tests.job": FunctionLimits()}, 1)
    report = AttemptReport(execution.id, claimed.number, AttemptOutcome.SUCCEEDED, result="7")
    outcome = run_blocked(
        schema_admin, store, execution.id, lambda: store.record_attempt_reports([report])
    )
    assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable)
    assert store.get_execution(execution.id).state == "started"  # type: ignore[union-attr]

    store.record_attempt_reports([report])  # as the worker does on its next turn
    found = store.get_result(execution.id)
    assert found is not None and found[0].state == "succeeded" and found[1] == "7"
    assert [a.outcome for a in store.list_attempts(execution.id)] == ["succeeded"]


def test_an_unreachable_server_raises_store_unavailable() -> None:
    unreachable = PostgresStore("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(StoreUnavailable):
        unreachable.now()
    with pytest.raises(StoreUnavailable):
        unreachable.enqueue([new()])


def test_a_claim_whose_answer_and_read_back_are_lost_is_returned_by_the_next_claim(
    store: PostgresStore, relayed_store: PostgresStore, relay: Relay
) -> None:
    """The claim commits, its answer is lost, and the server cannot be reached to read it
    back: the call fails, and the worker's next claim returns what that claim took."""
    first, second = store.enqueue([new(), new()])
    (claimed,) = relayed_store.claim_due_executions("w", FREE, 1)
    report = AttemptReport(first.id, claimed.number, AttemptOutcome.SUCCEEDED, result="1")

    relay.arm_cut(second.id.encode())
    relay.refuse(True)
    # Reading back takes a connection other than the claim's: with none idle, it needs a
    # new one, which the relay refuses.
    relayed_store._pool.close()
    with pytest.raises(StoreUnavailable):
        relayed_store.record_and_claim([report], "w", FREE, 5)
    assert relay.cut.is_set()
    taken = store.get_execution(second.id)
    assert taken is not None and taken.state == "started"  # committed, reports included
    assert store.get_execution(first.id).state == "succeeded"  # type: ignore[union-attr]

    relay.refuse(False)
    # The worker kept its report (the call failed) and sends it again: it changes nothing.
    again = relayed_store.record_and_claim([report], "w", FREE, 5)
    assert [(c.execution_id, c.number) for c in again] == [(second.id, 1)]
    assert relayed_store.claim_due_executions("w", FREE, 5) == []
    assert [a.outcome for a in store.list_attempts(first.id)] == ["succeeded"]
    assert [a.outcome for a in store.list_attempts(second.id)] == ["running"]


def test_a_claim_lost_before_it_committed_claims_nothing_and_fails(
    store: PostgresStore, relayed_store: PostgresStore, relay: Relay
) -> None:
    """Read back, a claim that did not commit took nothing: the call fails, and the
    execution is claimed by the next call, once."""
    execution = store.enqueue([new(function_name="tests.limited")])[0]
    limited = {"tests.limited": FunctionLimits(concurrency=1)}
    relay.arm_cut(execution.id.encode())  # the CLAIM's answer: COMMIT is never sent
    with pytest.raises(StoreUnavailable):
        relayed_store.record_and_claim([], "w", limited, 1)
    assert store.get_execution(execution.id).state == "created"  # type: ignore[union-attr]
    (claimed,) = relayed_store.record_and_claim([], "w", limited, 1)
    assert (claimed.execution_id, claimed.number) == (execution.id, 1)


def test_a_report_stored_twice_is_applied_once(store: PostgresStore) -> None:
    """After a lost COMMIT answer the worker sends the same reports again."""
    execution = store.enqueue([new()])[0]
    (claimed,) = store.claim_due_executions("w", FREE, 1)
    failed = AttemptReport(
        execution.id,
        claimed.number,
        AttemptOutcome.FAILED,
        error_code="raised",
        error_message="boom",
        retry_in=timedelta(0),
    )
    store.record_attempt_reports([failed])
    store.record_attempt_reports([failed])
    again = store.get_execution(execution.id)
    assert again is not None and (again.state, again.attempts) == ("created", 1)

    (retried,) = store.claim_due_executions("w", FREE, 1)
    assert retried.number == 2 and retried.failed_attempts == 1
    store.record_and_claim([failed], "w", FREE, 1)  # the first attempt's report, once more
    now = store.get_execution(execution.id)
    assert now is not None and (now.state, now.attempts) == ("started", 2)
    assert [a.outcome for a in store.list_attempts(execution.id)] == ["failed", "running"]
