"""Fixtures shared by the suite. The `store_url` fixture runs a test once per store:
SQLite always; PostgreSQL when a server answers on 127.0.0.1:5432 (database `test`), each test
in a schema of its own. With CI=true an unreachable PostgreSQL fails instead of skipping."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import deferq
from deferq.app import App

PG_DSN = os.environ.get("DEFERQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_error() -> str | None:
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc}); pip install 'deferq[postgres]'"
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"no PostgreSQL server reachable at {PG_DSN}: {exc}".strip()


_PG_ERROR: list[str | None] = []


def require_postgres() -> None:
    if not _PG_ERROR:
        _PG_ERROR.append(_postgres_error())
    error = _PG_ERROR[0]
    if error is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI: {error}")
    pytest.skip(error)


def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections use a fresh schema; the schema is dropped afterwards."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_DSN}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/deferq.sqlite3"
    else:
        require_postgres()
        yield from postgres_schema_url()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/deferq.sqlite3"


@pytest.fixture
def app(store_url: str) -> Iterator[App]:
    """The default app, pointed at a fresh store of each kind."""
    current = deferq.configure(url=store_url)
    yield current
    current.close()
    deferq.configure(url=None)
