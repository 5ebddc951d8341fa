"""Enqueueing on PostgreSQL: what a call returns is what is stored; the database clock sets
every time; in the caller's transaction an execution exists if and only if it commits."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

import deferq
from deferq import defer
from tests.postgres.support import new

psycopg = pytest.importorskip("psycopg")

from deferq.store.base import FunctionLimits  # noqa: E402
from deferq.store.postgres import PostgresStore, conninfo_from_url  # noqa: E402

pytestmark = pytest.mark.postgres


@defer
def greet(name: str) -> str:
    return f"hello {name}"


def db_now(admin: Any) -> datetime:
    return admin.execute("SELECT now()").fetchone()[0]


def test_what_enqueue_returns_is_what_is_stored(store: PostgresStore) -> None:
    paris = timezone(timedelta(hours=1))
    items = [
        new(),
        new(scheduled=timedelta(minutes=5), discard=timedelta(hours=1)),
        new(scheduled=datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=paris)),
        new(metadata={"user": "42", "客户": "東京"}, retry_policy='{"max_retries": 3}'),
        new(arguments='[["x"],{"k":"€"}]', max_duration=12.5),
    ]
    bulk = [
        new(scheduled=timedelta(seconds=i), metadata={"i": str(i)} if i % 2 else {})
        for i in range(50)
    ]
    returned = [store.enqueue([item])[0] for item in items] + store.enqueue(bulk)
    for execution in returned:
        assert store.get_execution(execution.id) == execution
        assert execution.created_at.tzinfo == UTC
    assert returned[2].scheduled_for == datetime(2031, 1, 2, 2, 4, 5, 678901, tzinfo=UTC)


def test_relative_times_are_added_to_the_database_clock(store: PostgresStore, admin: Any) -> None:
    before = db_now(admin)
    single = store.enqueue([new(scheduled=timedelta(minutes=1), discard=timedelta(days=2))])[0]
    bulk = store.enqueue([new(scheduled=timedelta(minutes=1)) for _ in range(3)])
    after = db_now(admin)
    for execution in [single, *bulk]:
        stored = store.get_execution(execution.id)
        assert stored is not None
        assert before <= stored.created_at <= after
        assert stored.scheduled_for - stored.created_at == timedelta(minutes=1)
    assert single.discard_after is not None
    assert single.discard_after - single.created_at == timedelta(days=2)


def test_a_skewed_caller_clock_changes_nothing(
    store: PostgresStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the local clock a day behind, an execution delayed by a minute is not due, and a
    worker that just registered is not lost: only the database's clock counts."""
    real_time, real_time_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real_time() - 86_400)
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() - 86_400 * 10**9)

    execution = store.enqueue([new(scheduled=timedelta(minutes=1))])[0]
    assert abs(execution.created_at - db_now(admin)) < timedelta(minutes=1)
    assert store.claim_due_executions("w", {"tests.job": FunctionLimits()}, 10) == []
    assert store.claim_due_executions(
        "w", {"tests.job": FunctionLimits()}, 10, horizon=timedelta(minutes=2)
    )

    store.register_worker("w", "w", "host", 1)
    assert store.declare_lost_workers(timedelta(minutes=1)) == []
    assert store.heartbeat("w")
    assert abs(store.now() - db_now(admin)) < timedelta(minutes=1)


def test_enqueue_in_a_committed_transaction(store: PostgresStore, pg_url: str) -> None:
    with psycopg.connect(conninfo_from_url(pg_url)) as conn:
        with conn.transaction():
            inside = store.enqueue([new()], connection=conn)[0]
            bulk = store.enqueue([new(), new()], connection=conn)
            assert store.get_execution(inside.id) is None  # not visible before the commit
        assert store.get_execution(inside.id) == inside
        assert [store.get_execution(e.id) for e in bulk] == bulk


def test_enqueue_in_a_rolled_back_transaction(store: PostgresStore, pg_url: str) -> None:
    with psycopg.connect(conninfo_from_url(pg_url)) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            execution = store.enqueue([new()], connection=conn)[0]
            raise RuntimeError("the application's transaction fails")
        assert store.get_execution(execution.id) is None
        conn.rollback()


def test_app_enqueue_in_transaction(store: PostgresStore, pg_url: str) -> None:
    app = deferq.App(pg_url)
    try:
        with psycopg.connect(conninfo_from_url(pg_url)) as conn:
            execution = app.enqueue_in_transaction(conn, greet, "ada")
            assert store.get_execution(execution.id) is None
            conn.commit()
        assert app.get_execution(execution.id).arguments == {"args": ["ada"], "kwargs": {}}
    finally:
        app.close()


def test_workers_hear_of_an_execution_when_its_transaction_commits(
    store: PostgresStore, pg_url: str
) -> None:
    with psycopg.connect(conninfo_from_url(pg_url), autocommit=True) as listener:
        listener.execute(f'LISTEN "{store.channel}"')
        with psycopg.connect(conninfo_from_url(pg_url)) as conn:
            store.enqueue([new(arguments='[["' + "x" * 100_000 + '"],{}]')], connection=conn)
            listener.execute("SELECT 1")  # a round trip: anything sent so far has arrived
            assert list(listener.notifies(timeout=0)) == []
            conn.commit()
        heard = next(listener.notifies(timeout=10))
    assert heard.channel == store.channel
    assert heard.payload == ""  # whatever the size of the arguments


def test_enqueue_in_refuses_what_is_not_a_psycopg_connection(store: PostgresStore) -> None:
    with pytest.raises(deferq.ConfigurationError, match="psycopg"):
        store.enqueue([new()], connection=object())
