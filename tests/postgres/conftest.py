"""Fixtures of the PostgreSQL store's own tests: each test gets a schema of its own, dropped
afterwards. Without a server they skip, except under CI=true, where they fail."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import PG_DSN, postgres_schema_url, require_postgres
from tests.postgres.support import Relay

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


@pytest.fixture
def relay() -> Iterator[Relay]:
    """A relay to the PostgreSQL server that fails as a network does, on command."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(PG_DSN)
    proxy = Relay(str(params.get("host")), int(params.get("port", 5432)))
    yield proxy
    proxy.close()


@pytest.fixture
def relayed_store(pg_url: str, relay: Relay, store: PostgresStore) -> Iterator[PostgresStore]:
    """A store (of a worker) whose connections go through the relay, migrated."""
    from psycopg.conninfo import conninfo_to_dict

    from deferq.store.postgres import PostgresStore

    params = conninfo_to_dict(PG_DSN)
    host, port = params.get("host"), params.get("port", 5432)
    if f"@{host}:{port}/" not in pg_url:
        pytest.skip(f"the test's URL does not name {host}:{port} plainly")
    opened = PostgresStore(relay.url(pg_url, str(host), int(port)))
    opened.migrate()
    yield opened
    opened.close()
