"""Fixtures of the PostgreSQL store's own tests: each test gets a schema of its own, dropped
afterwards. Without a server they skip, except under CI=true, where they fail."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import PG_DSN, postgres_schema_url, require_postgres

if TYPE_CHECKING:
    from deferq.store.postgres import PostgresStore


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose connections use a fresh, empty schema."""
    require_postgres()
    yield from postgres_schema_url()


@pytest.fixture
def open_store(pg_url: str) -> Iterator[Callable[[], PostgresStore]]:
    """Opens stores on the test's schema (one per simulated process); closes them after."""
    from deferq.store.postgres import PostgresStore

    opened: list[PostgresStore] = []

    def make() -> PostgresStore:
        store = PostgresStore(pg_url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], PostgresStore]) -> PostgresStore:
    """A migrated store on the test's schema."""
    opened = open_store()
    opened.migrate()
    return opened


@pytest.fixture
def admin() -> Iterator[Any]:
    """An autocommit connection of the test's own, outside the store."""
    require_postgres()
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        yield conn
