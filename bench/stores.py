"""The stores deferq is measured on, each recreated empty for every measurement."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/deferqbench"


class SQLiteTarget:
    name = "SQLite"

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="deferq-bench-"))
        self.count = 0

    def fresh_url(self) -> str:
        """The URL of a new, empty store file."""
        self.count += 1
        return f"sqlite:///{self.directory / f'store-{self.count}.sqlite3'}"

    def server_version(self) -> str:
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"

    def cleanup(self) -> None:
        for path in self.directory.iterdir():
            path.unlink()
        self.directory.rmdir()


class PostgresTarget:
    """A database of its own (`deferqbench` by default), dropped and created again for every
    measurement through the server's `postgres` database."""

    name = "PostgreSQL"

    def __init__(self, url: str) -> None:
        self.url = url
        base, _, self.database = url.rpartition("/")
        self.database = self.database.split("?", 1)[0]
        self.admin_url = f"{base}/postgres"

    def connect_admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=3)

    def fresh_url(self) -> str:
        with self.connect_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.database}"')
        return self.url

    def server_version(self) -> str:
        with self.connect_admin() as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        return f"PostgreSQL {version}"

    def cleanup(self) -> None:
        with self.connect_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def postgres_target(url: str | None) -> tuple[PostgresTarget | None, str]:
    """The PostgreSQL target, or None and why it is skipped."""
    if importlib.util.find_spec("deferq.store.postgres") is None:
        return None, "deferq has no PostgreSQL store yet (src/deferq/store/postgres.py)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed"
    target = PostgresTarget(url or os.environ.get("DEFERQ_BENCH_PG", DEFAULT_PG_URL))
    try:
        target.server_version()
    except Exception as exc:  # any failure to connect means: not measured
        return None, f"PostgreSQL not reachable ({type(exc).__name__}: {exc})"
    return target, ""
