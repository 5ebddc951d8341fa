"""The settings of the store's connections: TCP keepalives and server timeouts by default,
the URL's own values when it has them, and LISTEN connections that the timeouts leave
alone."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import quote

import pytest

from tests.postgres.support import new
from tests.support import wait_until

psycopg = pytest.importorskip("psycopg")

from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from deferq.store.base import StoreUnavailable  # noqa: E402
from deferq.store.postgres import (  # noqa: E402
    KEEPALIVES,
    PostgresStore,
    conninfo_from_url,
)

pytestmark = pytest.mark.postgres

SETTINGS = ("statement_timeout", "idle_in_transaction_session_timeout", "TimeZone")


def shown(store: PostgresStore) -> dict[str, str]:
    with store._borrow() as item:
        return {name: item.conn.execute(f"SHOW {name}").fetchone()[0] for name in SETTINGS}


def with_options(url: str, options: str) -> str:
    """`url` with more server settings in its `options` parameter."""
    head, _, current = url.partition("?options=")
    return f"{head}?options={current}%20{quote(options)}"


def test_connections_have_keepalives_and_timeouts_by_default(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        assert shown(store) == {
            "statement_timeout": "30s",
            "idle_in_transaction_session_timeout": "10s",
            "TimeZone": "UTC",
        }
        with store._borrow() as item:
            used = item.conn.info.get_parameters()
        assert {k: used.get(k) for k in KEEPALIVES} == KEEPALIVES
    finally:
        store.close()


def test_the_urls_own_settings_win(pg_url: str) -> None:
    url = with_options(pg_url, "-c statement_timeout=5s --idle_in_transaction_session_timeout=0")
    store = PostgresStore(f"{url}&keepalives_idle=42&tcp_user_timeout=0")
    try:
        assert shown(store) == {
            "statement_timeout": "5s",
            "idle_in_transaction_session_timeout": "0",
            "TimeZone": "UTC",
        }
        with store._borrow() as item:
            used = item.conn.info.get_parameters()
        assert (used["keepalives_idle"], used["tcp_user_timeout"]) == ("42", "0")
        assert used["keepalives_count"] == KEEPALIVES["keepalives_count"]
    finally:
        store.close()


def test_pgoptions_is_read_when_the_url_has_no_options(monkeypatch: Any) -> None:
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=7s -c search_path=elsewhere")
    options = conninfo_to_dict(conninfo_from_url("postgresql://app@db.internal/app"))["options"]
    assert "-c statement_timeout=7s" in options and "search_path=elsewhere" in options
    assert "statement_timeout=30s" not in options
    assert "idle_in_transaction_session_timeout=10s" in options


def test_listening_outlives_the_timeouts_and_bulk_enqueue_is_not_cut(pg_url: str) -> None:
    """Timeouts far shorter than a worker's idle wait, or a large bulk enqueue."""
    store = PostgresStore(
        with_options(
            pg_url, "-c statement_timeout=100ms -c idle_in_transaction_session_timeout=100ms"
        )
    )
    try:
        watcher = store.watch()
        try:
            time.sleep(0.5)  # idle on LISTEN, five times as long as both timeouts
            store.enqueue([new()])
            wait_until(watcher.changed, what="the notification")
            assert watcher.fileno() is not None and watcher.poll_interval is None
        finally:
            watcher.close()

        many = store.enqueue([new() for _ in range(30_000)])  # takes well over 100 ms
        assert len(many) == 30_000
        with store._borrow() as item, pytest.raises(psycopg.errors.QueryCanceled):
            item.conn.execute("SELECT pg_sleep(1)")  # any other statement is cut
    finally:
        store.close()


def test_a_server_that_accepts_but_never_answers_is_given_up_after_the_connect_timeout() -> None:
    """A listening socket that never speaks stands for a stuck server: opening the store
    fails with StoreUnavailable after the default connect timeout, not psycopg's 130 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/test")
            try:
                store.now()
            finally:
                store.close()
        waited = time.monotonic() - started
    assert int(KEEPALIVES["connect_timeout"]) <= waited < 2 * int(KEEPALIVES["connect_timeout"])


def test_pgconnect_timeout_is_read_when_the_url_has_no_connect_timeout(monkeypatch: Any) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "3")
    assert "connect_timeout" not in conninfo_to_dict(conninfo_from_url("postgresql://a@db/app"))
    url = "postgresql://a@db/app?connect_timeout=7"
    assert conninfo_to_dict(conninfo_from_url(url))["connect_timeout"] == "7"
    monkeypatch.delenv("PGCONNECT_TIMEOUT")
    default = conninfo_to_dict(conninfo_from_url("postgresql://a@db/app"))["connect_timeout"]
    assert default == KEEPALIVES["connect_timeout"]
