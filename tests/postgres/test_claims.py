"""Claiming under contention: workers never claim the same execution twice, and a
function's concurrency limit holds whatever number of workers claim at once."""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deferq.models import Attempt, AttemptOutcome
from deferq.store.base import AttemptReport, ClaimedAttempt, FunctionLimits
from tests.postgres.support import new

psycopg = pytest.importorskip("psycopg")

from deferq.store import postgres  # noqa: E402
from deferq.store.postgres import PostgresStore  # noqa: E402

pytestmark = pytest.mark.postgres

FREE = {"tests.job": FunctionLimits()}


def run_claimers(
    open_store: Callable[[], PostgresStore],
    functions: dict[str, FunctionLimits],
    count: int,
    batch: int,
    hold: bool = False,
) -> list[ClaimedAttempt]:
    """`count` workers, each with a store (connections) of its own, claim and report
    success until nothing is due; returns every claim."""
    claims: list[ClaimedAttempt] = []
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def worker(index: int) -> None:
        store = open_store()
        rng = random.Random(index)
        start.wait()
        try:
            reports: list[AttemptReport] = []
            idle = 0
            while idle < 3:
                claimed = store.record_and_claim(reports, f"w{index}", functions, batch)
                claims.extend(claimed)
                if hold and claimed:
                    threading.Event().wait(rng.random() / 500)  # the attempts run a moment
                reports = [
                    AttemptReport(c.execution_id, c.number, AttemptOutcome.SUCCEEDED)
                    for c in claimed
                ]
                idle = 0 if claimed else idle + 1
            store.record_attempt_reports(reports)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return claims


def max_overlap(attempts: list[Attempt]) -> int:
    events = []
    for attempt in attempts:
        assert attempt.finished_at is not None
        events += [(attempt.started_at, 1), (attempt.finished_at, -1)]
    running = most = 0
    for _, change in sorted(events):  # an end sorts before a start at the same instant
        running += change
        most = max(most, running)
    return most


def test_four_workers_never_claim_the_same_execution(store: PostgresStore, open_store: Any) -> None:
    executions = store.enqueue([new() for _ in range(2000)])
    claims = run_claimers(open_store, FREE, count=4, batch=16)
    claimed_ids = [c.execution_id for c in claims]
    assert len(claimed_ids) == len(set(claimed_ids)) == 2000
    assert set(claimed_ids) == {e.id for e in executions}
    assert {c.number for c in claims} == {1}
    assert {store.get_execution(e.id).state for e in executions[::50]} == {"succeeded"}  # type: ignore[union-attr]


def test_the_concurrency_limit_holds_under_concurrent_claimers(
    store: PostgresStore, open_store: Any, admin: Any, pg_url: str
) -> None:
    limited = {"tests.limited": FunctionLimits(concurrency=3), **FREE}
    executions = store.enqueue(
        [new("tests.limited") for _ in range(150)] + [new() for _ in range(150)]
    )
    schema = pg_url.rsplit("%3D", 1)[1]
    most_seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        # Every snapshot shows a committed state: the running count must fit the limit.
        with psycopg.connect(admin.info.dsn, autocommit=True) as conn:
            conn.execute(f"SET search_path = {schema}")
            while not done.is_set():
                (running,) = conn.execute(
                    "SELECT count(*) FROM deferq_executions WHERE function_name ="
                    " 'tests.limited' AND state IN ('started', 'aborting')"
                ).fetchone()
                most_seen.append(running)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        claims = run_claimers(open_store, limited, count=4, batch=4, hold=True)
    finally:
        done.set()
        sampler.join()

    assert len(claims) == len({c.execution_id for c in claims}) == 300
    assert max(most_seen) <= 3
    attempts = [
        attempt
        for e in executions
        if e.function_name == "tests.limited"
        for attempt in store.list_attempts(e.id)
    ]
    assert len(attempts) == 150
    assert max_overlap(attempts) <= 3


def test_the_cancel_action_cancels_due_executions_beyond_the_free_places(
    store: PostgresStore,
) -> None:
    functions = {"tests.limited": FunctionLimits(concurrency=2, cancel_when_limited=True)}
    due = store.enqueue([new("tests.limited", scheduled=timedelta(0)) for _ in range(5)])
    later = store.enqueue([new("tests.limited", scheduled=timedelta(hours=1))])[0]

    first = store.claim_due_executions("w1", functions, 1)
    assert [c.execution_id for c in first] == [due[0].id]
    states = [store.get_execution(e.id) for e in due]
    assert [s.state for s in states] == [  # type: ignore[union-attr]
        "started",
        "created",
        "cancelled",
        "cancelled",
        "cancelled",
    ]
    assert {(s.error_code, s.error_message) for s in states[2:]} == {  # type: ignore[union-attr]
        ("concurrency_limit", "concurrency limit of 2 reached")
    }

    second = store.claim_due_executions("w2", functions, 5)
    assert [c.execution_id for c in second] == [due[1].id]
    assert store.claim_due_executions("w3", functions, 5) == []
    assert store.get_execution(later.id).state == "created"  # type: ignore[union-attr]


def test_one_claim_takes_free_and_limited_functions_in_due_order(store: PostgresStore) -> None:
    functions = {"tests.limited": FunctionLimits(concurrency=1), **FREE}
    base = datetime.now(UTC) - timedelta(minutes=10)
    order = ["tests.job", "tests.limited", "tests.job", "tests.limited", "tests.job"]
    executions = store.enqueue(
        [new(name, scheduled=base + timedelta(seconds=i)) for i, name in enumerate(order)]
    )
    claimed = store.claim_due_executions("w", functions, 3)
    assert [c.execution_id for c in claimed] == [e.id for e in executions[:3]]


def test_a_cron_tick_is_stored_once_whatever_number_of_schedulers_race(
    store: PostgresStore, open_store: Any
) -> None:
    tick = datetime(2030, 1, 1, tzinfo=UTC)
    now = store.now()
    for _ in range(2):
        store.sync_schedule("tests.cron", "* * * * *", "UTC", tick, now)
    outcomes: list[bool] = []
    start = threading.Barrier(4)

    def schedule() -> None:
        racer = open_store()
        racer.migrate()
        start.wait()
        outcomes.append(
            racer.insert_cron_execution(
                new("tests.cron", scheduled=tick, cron_tick=tick), tick + timedelta(minutes=1)
            )
        )

    threads = [threading.Thread(target=schedule) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert collections.Counter(outcomes) == {True: 1, False: 3}
    (schedule_row,) = store.list_schedules()
    assert schedule_row.last_tick == tick
    assert schedule_row.next_tick == tick + timedelta(minutes=1)


def test_a_claim_right_after_a_bulk_enqueue_walks_the_due_index(store: PostgresStore) -> None:
    """Before the table is analyzed the planner believes few executions are due; a claim
    must still read them in due order from the index and stop after its limit, not gather
    every due one and sort them (8 ms a claim with 20,000 due, seconds with a million)."""
    store.enqueue([new() for _ in range(5000)])
    params: dict[str, Any] = {"channel": store.channel}
    params.update(postgres._claim_params("w", FREE, 1, timedelta(0)))
    with store._borrow(for_claims=True) as item, item.conn.transaction(force_rollback=True):
        plan = "\n".join(r[0] for r in item.conn.execute("EXPLAIN " + postgres.CLAIM, params))
    assert "Index Scan using deferq_executions_due on" in plan, plan
    assert "Bitmap" not in plan, plan
    # Other statements keep bitmap scans: metadata filters need them.
    with store._borrow() as item:
        assert item.conn.execute("SHOW enable_bitmapscan").fetchone() == ("on",)
