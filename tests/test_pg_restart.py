"""A real PostgreSQL restart under running workers.

The test starts a PostgreSQL server of its own (initdb into a temporary directory, on a free
loopback port), so that stopping and starting it disturbs nothing else. Workers run attempts
while the server goes down for a few seconds and comes back: they reconnect by themselves,
every execution runs exactly once and ends `succeeded`, and work stored after the restart
starts at once.

It needs PostgreSQL's server programs (`initdb`, `pg_ctl`; Debian's `postgresql` package puts
them in /usr/lib/postgresql/<version>/bin). Locally the test skips without them; with
CI=true it fails.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from deferq import App
from tests.support import WorkerProcess, wait_until
from tests.tasks import pg_tasks

pytest.importorskip("psycopg")

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DOWN_FOR = 3.0
"""Seconds the server stays down."""


def server_programs() -> Path | None:
    """The directory holding initdb and pg_ctl, newest version first."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(directory, "initdb").exists() and Path(directory, "pg_ctl").exists():
            return Path(directory)
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A PostgreSQL server of the test's own."""

    programs: Path
    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.programs / program), *args]
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.directory / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.directory / "data"),
            "-o",
            options,
            "-w",
            "-l",
            str(self.directory / "server.log"),
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")


@pytest.fixture
def server() -> Iterator[Server]:
    programs = server_programs()
    if programs is None:
        message = "PostgreSQL's server programs (initdb, pg_ctl) are not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    # Not under tmp_path: as root, the server runs as `postgres`, which must reach the files.
    directory = Path(tempfile.mkdtemp(prefix="deferq-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = Server(programs, directory, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()  # unless it is stopped already
        shutil.rmtree(directory, ignore_errors=True)


def by_state(server: Server) -> list[tuple[str, int, int]]:
    """(state, attempts, how many executions) on the server."""
    import psycopg

    with psycopg.connect(server.url, autocommit=True) as conn:
        return conn.execute(
            "SELECT state, attempts, count(*) FROM deferq_executions"
            " GROUP BY state, attempts ORDER BY state, attempts"
        ).fetchall()


def runs_of(directory: Path) -> Counter[int]:
    return Counter(int(line) for f in directory.iterdir() for line in f.read_text().split())


def test_workers_ride_out_a_server_restart(server: Server, tmp_path: Path) -> None:
    app = App(server.url)
    app.store.migrate()
    runs = tmp_path / "runs"
    runs.mkdir()
    before = 400
    try:
        with ExitStack() as stack:
            workers = [
                stack.enter_context(
                    WorkerProcess(
                        server.url,
                        ["tests.tasks.pg_tasks"],
                        "--name",
                        f"w{i}",
                        "--slots",
                        "2",
                        "--poll-interval",
                        "1s",
                        log_path=tmp_path / f"w{i}.log",
                    )
                )
                for i in range(2)
            ]
            app.enqueue_many(pg_tasks.slow_note, [(str(runs), i, 0.02) for i in range(before)])
            wait_until(
                lambda: runs.exists() and sum(runs_of(runs).values()) >= 50,
                what="the workers to be running attempts",
            )

            server.stop()  # attempts are running; outcomes and claims now fail
            time.sleep(DOWN_FOR)
            server.start()

            # Work stored after the restart starts within a poll interval, give or take.
            stored_at = time.monotonic()
            after = app.enqueue(pg_tasks.echo, ("after the restart",), {})
            done = app.wait_for_result(after.id, timeout=30)
            assert done == "after the restart"
            assert time.monotonic() - stored_at < 10  # the poll interval is 1 s

            wait_until(
                lambda: by_state(server) == [("succeeded", 1, before + 1)],
                timeout=120,
                what=f"every execution to succeed (now {by_state(server)})",
            )
            for process in workers:
                assert process.stop() == 0
                assert process.process is not None

        assert by_state(server) == [("succeeded", 1, before + 1)]
        assert runs_of(runs) == Counter(range(before))  # each ran exactly once
    finally:
        app.close()
