"""Cancel and reschedule racing a claim: the answer of each call agrees with what happened to
the execution. A refusal names the state the execution really was in; a reschedule that
succeeds means the execution was not started at its old time."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from deferq.errors import ExecutionNotCancellable, ExecutionNotReschedulable
from deferq.models import Execution
from deferq.store.base import ClaimedAttempt, FunctionLimits
from tests.postgres.support import Relay, new
from tests.support import wait_until

psycopg = pytest.importorskip("psycopg")


from deferq.store.postgres import PostgresStore  # noqa: E402

pytestmark = pytest.mark.postgres

LIMITED = {"tests.job": FunctionLimits(concurrency=1_000_000)}
"""Claimed in a transaction (lock, claim, commit): the claimed rows stay locked, and seen
as `created` by others, until the COMMIT arrives."""
FREE = {"tests.job": FunctionLimits()}


def call(action: Callable[[], Execution]) -> Execution | Exception:
    try:
        return action()
    except (ExecutionNotCancellable, ExecutionNotReschedulable) as exc:
        return exc


@pytest.fixture
def caller(pg_url: str) -> Iterator[PostgresStore]:
    """A store of a caller whose connections are named, to see them wait on the server."""
    opened = PostgresStore(f"{pg_url}&application_name={CALLER}")
    yield opened
    opened.close()


CALLER = f"deferq_caller_{uuid.uuid4().hex[:10]}"


def answer_during_a_claim(
    store: PostgresStore, relayed_store: PostgresStore, relay: Relay, admin: Any, action: Any
) -> tuple[Execution | Exception, list[ClaimedAttempt]]:
    """Run `action(execution_id)` (on the `caller` store) while a worker's claim of that
    execution has run but not committed: the call waits for the row, and answers after the
    claim commits."""
    execution = store.enqueue([new()])[0]
    claims: list[ClaimedAttempt] = []
    relay.hold(b"COMMIT")
    claimer = threading.Thread(
        target=lambda: claims.extend(relayed_store.claim_due_executions("w", LIMITED, 1))
    )
    claimer.start()
    wait_until(relay.held.is_set, what="the claim's COMMIT to be on its way")

    answers: list[Execution | Exception] = []
    caller = threading.Thread(target=lambda: answers.append(call(lambda: action(execution.id))))
    caller.start()
    wait_until(
        lambda: admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid)) > 0"
            " AND application_name = %s",
            (CALLER,),
        ).fetchall(),
        what="the call to wait for the claimed row",
    )
    relay.release()
    claimer.join(10)
    caller.join(10)
    assert [c.execution_id for c in claims] == [execution.id]
    assert len(answers) == 1
    return answers[0], claims


def test_a_reschedule_waiting_for_a_claim_is_refused_with_the_started_state(
    store: PostgresStore,
    relayed_store: PostgresStore,
    caller: PostgresStore,
    relay: Relay,
    admin: Any,
) -> None:
    answer, claims = answer_during_a_claim(
        store,
        relayed_store,
        relay,
        admin,
        lambda execution_id: caller.reschedule_execution(execution_id, timedelta(hours=1)),
    )
    assert isinstance(answer, ExecutionNotReschedulable)
    assert answer.execution.state == "started"
    assert answer.execution.attempts == 1
    now = store.get_execution(claims[0].execution_id)
    assert now is not None and now.state == "started"


@pytest.mark.parametrize("force", [False, True], ids=["cancel", "abort"])
def test_a_cancel_waiting_for_a_claim_answers_with_what_it_did(
    store: PostgresStore,
    relayed_store: PostgresStore,
    caller: PostgresStore,
    relay: Relay,
    admin: Any,
    force: bool,
) -> None:
    answer, claims = answer_during_a_claim(
        store,
        relayed_store,
        relay,
        admin,
        lambda execution_id: caller.cancel_execution(execution_id, force),
    )
    now = store.get_execution(claims[0].execution_id)
    assert now is not None
    if force:  # the claim committed first, so the cancel became an abort
        assert isinstance(answer, Execution)
        assert (answer.state, now.state) == ("aborting", "aborting")
    else:
        assert isinstance(answer, ExecutionNotCancellable)
        assert (answer.execution.state, now.state) == ("started", "started")


@pytest.mark.parametrize("functions", [FREE, LIMITED], ids=["one-statement", "transaction"])
def test_many_cancels_and_reschedules_racing_claims_agree_with_the_outcome(
    open_store: Callable[[], PostgresStore], store: PostgresStore, functions: Any
) -> None:
    """Each execution gets one call, cancel or reschedule an hour ahead, while two workers
    claim in small batches; then every answer is checked against the execution."""
    count = 600
    executions = store.enqueue([new() for _ in range(count)])
    rng = random.Random(7)
    actions = {e.id: rng.choice(["cancel", "reschedule"]) for e in executions}
    answers: dict[str, Execution | Exception] = {}
    claimed: dict[str, str] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def claim(worker_id: str) -> None:
        own = open_store()
        try:
            while not stop.is_set():
                for c in own.claim_due_executions(worker_id, functions, 5):
                    claimed[c.execution_id] = worker_id
                stop.wait(0.002)  # paced, so that the calls meet both states
        except BaseException as exc:
            errors.append(exc)

    def manage(ids: list[str]) -> None:
        own = open_store()
        try:
            for execution_id in ids:
                if actions[execution_id] == "cancel":
                    answers[execution_id] = call(
                        lambda i=execution_id: own.cancel_execution(i, False)
                    )
                else:
                    answers[execution_id] = call(
                        lambda i=execution_id: own.reschedule_execution(i, timedelta(hours=1))
                    )
        except BaseException as exc:
            errors.append(exc)

    ids = [e.id for e in executions]
    shares = [ids[i::4] for i in range(4)]
    claimers = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(2)]
    managers = [threading.Thread(target=manage, args=(share,)) for share in shares]
    for thread in claimers + managers:
        thread.start()
    for thread in managers:
        thread.join(120)
    stop.set()
    for thread in claimers:
        thread.join(30)
    assert not errors, errors
    assert len(answers) == count

    refused = 0
    for execution_id, answer in answers.items():
        now = store.get_execution(execution_id)
        assert now is not None
        was_claimed = execution_id in claimed
        what = f"{actions[execution_id]} of {execution_id}: {answer!r}, now {now.state}"
        if isinstance(answer, Execution):
            assert not was_claimed, what
            assert now.attempts == 0, what
            expected = "cancelled" if actions[execution_id] == "cancel" else "created"
            assert (answer.state, now.state) == (expected, expected), what
            assert now.scheduled_for == answer.scheduled_for, what
        else:
            refused += 1
            assert isinstance(answer, (ExecutionNotCancellable, ExecutionNotReschedulable))
            assert was_claimed, what
            assert (answer.execution.state, now.state) == ("started", "started"), what
            assert answer.execution.attempts == 1, what
    assert 0 < refused < count  # both answers occurred: the calls did race the claims
