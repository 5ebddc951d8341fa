"""Helpers of the PostgreSQL store's tests."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from datetime import timedelta
from typing import Any

from deferq.ids import new_execution_id
from deferq.store.base import NewExecution, When


def new(
    function_name: str = "tests.job",
    scheduled: When = timedelta(0),
    **fields: Any,
) -> NewExecution:
    """An execution to enqueue, due now unless told otherwise."""
    return NewExecution(
        id=new_execution_id(),
        function_name=function_name,
        arguments=fields.pop("arguments", "[[],{}]"),
        scheduled=scheduled,
        **fields,
    )


def backend_pids(store: Any) -> list[int]:
    """Server process ids of a store's idle pooled connections."""
    return [item.conn.info.backend_pid for item in store._pool.idle]


class Relay:
    """A TCP relay to the PostgreSQL server that fails as a network does, on command:

    - `arm_cut(marker, later)`: the server's reply holding `marker` (or the `later`-th reply
      after it on the same connection) is lost, and that connection closed, after the
      server sent it;
    - `hold(marker)`: the client's message holding `marker` waits in the relay until
      `release()`, as if the network were slow;
    - `black_hole()`: from now on nothing is relayed either way, on any connection, and
      nothing is closed either: the server seems to have vanished without a reset;
    - `reset()`: every connection open so far is reset (RST); new ones are relayed again;
    - `refuse(True)`: new connections are reset at once, as by a server that is down.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.held = threading.Event()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._cut_marker: bytes | None = None
        self._later = 0
        self._hold_marker: bytes | None = None
        self._released = threading.Event()
        self._silent = False
        self._refusing = False
        self._generation = 0
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def url(self, url: str, host: str, port: int) -> str:
        """`url` (which names `host:port` plainly) pointed at the relay instead."""
        return url.replace(f"@{host}:{port}/", f"@127.0.0.1:{self.port}/", 1)

    def arm_cut(self, marker: bytes, later: int = 0) -> None:
        with self._lock:
            self._cut_marker, self._later = marker, later

    def hold(self, marker: bytes) -> None:
        with self._lock:
            self._hold_marker = marker
            self._released.clear()

    def release(self) -> None:
        self._released.set()

    def refuse(self, refusing: bool) -> None:
        self._refusing = refusing

    def black_hole(self) -> None:
        self._silent = True

    def reset(self) -> None:
        with self._lock:
            self._silent = False
            self._generation += 1

    def _take(self, kind: str, data: bytes) -> int | None:
        with self._lock:
            if kind == "cut" and self._cut_marker is not None and self._cut_marker in data:
                self._cut_marker = None
                return self._later
            if kind == "hold" and self._hold_marker is not None and self._hold_marker in data:
                self._hold_marker = None
                return 0
        return None

    def _accept(self) -> None:
        with self.listener:
            while not self.stopping.is_set():
                if not select.select([self.listener], [], [], 0.05)[0]:
                    continue
                client, _ = self.listener.accept()
                if self._refusing:
                    _reset(client)
                    continue
                thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _relay(self, client: socket.socket) -> None:
        generation = self._generation
        with client, socket.create_connection(self.upstream) as server:
            replies_left: int | None = None
            tail = b""
            while not self.stopping.is_set():
                if self._generation != generation:
                    _reset(client)
                    return
                if self._silent:
                    time.sleep(0.02)
                    continue
                for sock in select.select([client, server], [], [], 0.05)[0]:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        if self._take("hold", data) is not None:
                            self.held.set()
                            while not self._released.wait(0.05):
                                if self.stopping.is_set():
                                    return
                        server.sendall(data)
                        continue
                    if replies_left is None:
                        replies_left = self._take("cut", tail + data)
                    if replies_left == 0:
                        self.cut.set()
                        return  # the reply is lost with its connection
                    if replies_left is not None:
                        replies_left -= 1
                    tail = data[-64:]
                    client.sendall(data)

    def close(self) -> None:
        self.stopping.set()
        self._released.set()
        for thread in self.threads:
            thread.join(5)


def _reset(sock: socket.socket) -> None:
    """Close with a reset (RST), as a peer that lost the connection's state answers."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def schema_of(conn: Any) -> dict[str, list[Any]]:
    """Columns, indexes, constraints and applied migrations of the connection's schema,
    without the schema's name, so that two schemas compare."""
    (schema,) = conn.execute("SELECT current_schema()").fetchone()
    columns = conn.execute(
        "SELECT table_name, column_name, ordinal_position, data_type, is_nullable,"
        " column_default, collation_name FROM information_schema.columns"
        " WHERE table_schema = %s ORDER BY table_name, ordinal_position",
        (schema,),
    ).fetchall()
    indexes = conn.execute(
        "SELECT tablename, indexname, replace(indexdef, %s, '') FROM pg_indexes"
        " WHERE schemaname = %s ORDER BY indexname",
        (f"{schema}.", schema),
    ).fetchall()
    constraints = conn.execute(
        "SELECT c.conrelid::regclass::text, c.conname, c.contype,"
        " pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " JOIN pg_namespace n ON n.oid = c.connamespace"
        " WHERE n.nspname = %s ORDER BY c.conname",
        (schema,),
    ).fetchall()
    versions = conn.execute("SELECT version, name FROM deferq_migrations ORDER BY version")
    return {
        "columns": columns,
        "indexes": indexes,
        "constraints": constraints,
        "versions": versions.fetchall(),
    }
