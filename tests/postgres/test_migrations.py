"""Migrations: applied one by one they give the schema of a fresh install; several processes
migrating at once apply each migration exactly once."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from deferq.store.base import load_migrations
from tests.conftest import postgres_schema_url
from tests.postgres import support
from tests.support import ROOT, wait_until

psycopg = pytest.importorskip("psycopg")

from deferq.store.postgres import (  # noqa: E402
    MIGRATION_LOCK,
    PostgresStore,
    _apply_migrations,
    conninfo_from_url,
)

pytestmark = pytest.mark.postgres


def migrate(url: str) -> None:
    store = PostgresStore(url)
    try:
        store.migrate()
    finally:
        store.close()


def schema_of(url: str) -> dict[str, Any]:
    """What `support.schema_of` reads, through a connection of `url`."""
    with psycopg.connect(conninfo_from_url(url)) as conn:
        return support.schema_of(conn)


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    numbers = [number for number, _, _ in load_migrations("postgres")]
    assert numbers == list(range(1, len(numbers) + 1))


def test_migrations_one_by_one_give_the_schema_of_a_fresh_install(pg_url: str) -> None:
    migrations = load_migrations("postgres")
    with psycopg.connect(conninfo_from_url(pg_url), autocommit=True) as conn:
        for step in range(1, len(migrations) + 1):
            _apply_migrations(conn, migrations[:step])
    stepwise = schema_of(pg_url)

    fresh_urls = postgres_schema_url()
    fresh_url = next(fresh_urls)
    try:
        migrate(fresh_url)
        fresh = schema_of(fresh_url)
    finally:
        fresh_urls.close()

    assert stepwise["columns"], "no table was created"
    assert stepwise == fresh


def test_migrating_again_changes_nothing(pg_url: str) -> None:
    migrate(pg_url)
    before = schema_of(pg_url)
    migrate(pg_url)
    assert schema_of(pg_url) == before


def test_processes_migrating_at_once_apply_each_migration_once(pg_url: str, admin: Any) -> None:
    # Hold the migration lock so that every process is waiting on it, then let them race.
    admin.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    script = (
        "import sys; from deferq.store.postgres import PostgresStore; "
        "store = PostgresStore(sys.argv[1]); store.migrate(); store.close()"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script, pg_url], cwd=ROOT) for _ in range(4)
    ]
    try:
        wait_until(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND classid = %s AND objid = %s",
                    (MIGRATION_LOCK >> 32, MIGRATION_LOCK & 0xFFFFFFFF),
                ).fetchone()[0]
                >= 4
            ),
            what="four processes waiting for the migration lock",
        )
    finally:
        admin.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    assert [p.wait(60) for p in processes] == [0, 0, 0, 0]

    versions = schema_of(pg_url)["versions"]
    assert [v for v, _ in versions] == [n for n, _, _ in load_migrations("postgres")]


def test_a_search_path_naming_no_existing_schema_is_a_clear_error(pg_url: str) -> None:
    url = pg_url.replace("search_path%3D", "search_path%3Dmissing_", 1)
    assert url != pg_url
    result = subprocess.run(
        [sys.executable, "-m", "deferq.cli", "--url", url, "migrate"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "no schema to create deferq's tables in" in result.stderr
    assert "CREATE SCHEMA" in result.stderr
