"""The PostgreSQL store with real processes: the `deferq migrate` command, workers that run
what a caller's transaction committed and nothing it rolled back, workers whose clocks are
wrong, idle workers woken by NOTIFY, workers whose connections are cut, and many workers on
one schema. The store's own calls are tested in tests/postgres/.

The clock tests run workers under libfaketime (Debian package `faketime`): locally they skip
without it, with CI=true they fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deferq import App, Execution, ExecutionNotFound, assign_options
from deferq.store.base import load_migrations
from tests.conftest import PG_DSN, postgres_schema_url, require_postgres
from tests.postgres.support import Relay, schema_of
from tests.support import ROOT, WorkerProcess, wait_until
from tests.tasks import basic, pg_clock_ahead, pg_clock_behind, pg_tasks

psycopg = pytest.importorskip("psycopg")

from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from deferq.store.postgres import MIGRATION_LOCK, conninfo_from_url  # noqa: E402

pytestmark = pytest.mark.postgres

MODULE = "tests.tasks.pg_tasks"
UNFINISHED = ("created", "started", "aborting")
TABLES = {
    "deferq_attempts",
    "deferq_executions",
    "deferq_migrations",
    "deferq_schedules",
    "deferq_workers",
}
NOTIFY_LATENCY = timedelta(seconds=2)
"""How soon an idle worker polling every 30 s must start new work: NOTIFY, not polling."""


# Fixtures and helpers


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose connections use a fresh, empty schema (dropped afterwards)."""
    require_postgres()
    yield from postgres_schema_url()


@pytest.fixture
def pg_app(pg_url: str) -> Iterator[App]:
    """An app on the test's schema, migrated."""
    app = App(pg_url)
    app.store.migrate()
    yield app
    app.close()


@pytest.fixture
def db(pg_url: str) -> Iterator[Any]:
    """An autocommit connection of the test's own, in the test's schema."""
    with psycopg.connect(
        conninfo_from_url(pg_url), autocommit=True, application_name="deferq_test"
    ) as conn:
        yield conn


def named(url: str, application_name: str) -> str:
    """The URL with an application_name that tells its connections apart on the server."""
    return f"{url}&application_name={application_name}"


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def one(db: Any, query: str, params: Sequence[Any] = ()) -> Any:
    row = db.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def worker(
    url: str,
    logs: Path,
    name: str,
    *args: str,
    modules: Sequence[str] = (MODULE,),
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    return WorkerProcess(
        url, list(modules), "--name", name, *args, env=env, log_path=logs / f"{name}.log"
    )


def wait_registered(db: Any, count: int) -> None:
    wait_until(
        lambda: one(db, "SELECT count(*) FROM deferq_workers WHERE stopped_at IS NULL") == count,
        timeout=60,
        what=f"{count} workers to register",
    )


def in_states(db: Any, *states: str) -> int:
    """How many executions of the schema are in one of `states`."""
    return one(db, "SELECT count(*) FROM deferq_executions WHERE state = ANY(%s)", (list(states),))


def by_state(db: Any) -> list[tuple[str, int, int]]:
    """(state, attempts, how many executions) of the schema."""
    return db.execute(
        "SELECT state, attempts, count(*) FROM deferq_executions GROUP BY state, attempts"
        " ORDER BY state, attempts"
    ).fetchall()


def wait_finished(db: Any, timeout: float = 60.0) -> None:
    """Until no execution of the schema is unfinished."""
    wait_until(
        lambda: in_states(db, *UNFINISHED) == 0,
        timeout=timeout,
        what="every execution to reach a final state",
    )


def final(app: App, execution_id: str, timeout: float = 30.0) -> Execution:
    def ended() -> Execution | None:
        execution = app.get_execution(execution_id)
        return execution if execution.state.is_final else None

    return wait_until(ended, timeout=timeout, what=f"execution {execution_id} to end")


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    env.pop("DEFERQ_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "deferq.cli", "--url", url, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def applied(conn: Any) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT version, name, applied_at FROM deferq_migrations ORDER BY version"
    ).fetchall()


def tables(conn: Any) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    ).fetchall()
    return {name for (name,) in rows}


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals [start, end) open at one instant."""
    events = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    running = most = 0
    for _, step in events:  # at equal instants an end (-1) sorts before a start
        running += step
        most = max(most, running)
    return most


# Migrations


def test_cli_migrate_creates_the_tables_and_a_second_run_changes_nothing(
    pg_url: str, db: Any
) -> None:
    assert tables(db) == set()

    first = run_cli(pg_url, "migrate")
    assert first.returncode == 0, first.stderr
    assert "store is up to date" in first.stdout
    assert tables(db) == TABLES
    migrations = load_migrations("postgres")
    assert [(v, n) for v, n, _ in applied(db)] == [(v, n) for v, n, _ in migrations]
    schema, versions = schema_of(db), applied(db)

    again = run_cli(pg_url, "migrate")
    assert again.returncode == 0, again.stderr
    assert schema_of(db) == schema
    assert applied(db) == versions  # same rows, same applied_at: nothing was applied again


def test_cli_migrate_in_four_processes_at_once_applies_the_schema_once(
    pg_url: str, db: Any
) -> None:
    name = unique_name("deferq_migrate")
    with psycopg.connect(conninfo_from_url(pg_url), autocommit=True) as holder:
        # Hold the migration lock until all four wait for it, so that they really race.
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
        command = [sys.executable, "-m", "deferq.cli", "--url", named(pg_url, name), "migrate"]
        processes = [
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        try:
            wait_until(
                lambda: (
                    one(
                        db,
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                        " WHERE l.locktype = 'advisory' AND NOT l.granted"
                        " AND a.application_name = %s",
                        (name,),
                    )
                    == 4
                ),
                timeout=60,
                what="four processes waiting for the migration lock",
            )
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0]
    assert all("store is up to date" in out for out in outputs)
    assert [v for v, _, _ in applied(db)] == [v for v, _, _ in load_migrations("postgres")]

    alone = postgres_schema_url()
    alone_url = next(alone)
    try:
        assert run_cli(alone_url, "migrate").returncode == 0
        with psycopg.connect(conninfo_from_url(alone_url), autocommit=True) as other:
            assert schema_of(db) == schema_of(other)
    finally:
        alone.close()


# Enqueueing in the caller's transaction


def test_a_worker_runs_what_a_transaction_commits_and_never_what_it_rolls_back(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()

    def ran() -> list[int]:
        return sorted(int(line) for f in runs.iterdir() for line in f.read_text().split())

    def marker(i: int) -> Execution:
        """Enqueued outside the transaction; once it has run, the worker has looked for
        work after everything enqueued before it."""
        execution = pg_app.enqueue(pg_tasks.note, (str(runs), i), {})
        assert final(pg_app, execution.id).state == "succeeded"
        return execution

    with worker(pg_url, tmp_path, "w", "--poll-interval", "100ms"):
        wait_registered(db, 1)
        with psycopg.connect(conninfo_from_url(pg_url)) as conn:
            rolled_back = pg_app.enqueue_in_transaction(conn, pg_tasks.note, str(runs), 1)
            marker(0)
            with pytest.raises(ExecutionNotFound):
                pg_app.get_execution(rolled_back.id)
            conn.rollback()
            marker(2)

            committed = pg_app.enqueue_in_transaction(conn, pg_tasks.note, str(runs), 3)
            marker(4)
            with pytest.raises(ExecutionNotFound):  # not visible, so not run, before commit
                pg_app.get_execution(committed.id)
            assert ran() == [0, 2, 4]
            before_commit = one(db, "SELECT now()")
            conn.commit()

        done = final(pg_app, committed.id)
        assert done.state == "succeeded" and done.attempts == 1
        assert done.started_at is not None and done.started_at > before_commit
        marker(5)

    assert ran() == [0, 2, 3, 4, 5]
    with pytest.raises(ExecutionNotFound):
        pg_app.get_execution(rolled_back.id)
    attempts = "SELECT count(*) FROM deferq_attempts WHERE execution_id = %s"
    assert one(db, attempts, (rolled_back.id,)) == 0


# The database's clock

FAKETIME_LIBRARY = "/usr/$LIB/faketime/libfaketimeMT.so.1"
"""Where Debian's libfaketime is; the dynamic linker expands $LIB."""


def skewed(offset: str) -> dict[str, str]:
    """Environment of a process whose wall clock is `offset` (like "+10m") off; its
    monotonic clock is left alone, as on a machine whose clock is set wrong."""
    return {"LD_PRELOAD": FAKETIME_LIBRARY, "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture(scope="module")
def faketime() -> None:
    """Skip (fail under CI=true) unless libfaketime really moves a process's clock."""
    script = "import time; print(time.time())"
    try:
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, **skewed("+10m")},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        works = abs(float(out) - time.time() - 600) < 60
    except (subprocess.SubprocessError, ValueError):
        works = False
    if not works:
        message = "libfaketime is missing: apt-get install faketime"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.usefixtures("faketime")
def test_workers_with_skewed_clocks_start_nothing_early_and_lose_no_one(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    """One worker ten minutes behind, one ten minutes ahead, one on time, each with
    functions of its own; heartbeats every 250 ms and a worker lost after 2 s, so that a
    local clock used anywhere for those would show within seconds."""
    beat = ("--heartbeat-interval", "250ms", "--lost-after", "2s")
    sides = {
        "on_time": (MODULE, {}),
        "behind": ("tests.tasks.pg_clock_behind", skewed("-10m")),
        "ahead": ("tests.tasks.pg_clock_ahead", skewed("+10m")),
    }
    with ExitStack() as stack:
        processes = {
            name: stack.enter_context(
                worker(pg_url, tmp_path, name, *beat, modules=[module], env=env)
            )
            for name, (module, env) in sides.items()
        }
        wait_registered(db, len(processes))

        functions = {"behind": pg_clock_behind.local_time, "ahead": pg_clock_ahead.local_time}
        due = {side: pg_app.enqueue(fn, (), {}) for side, fn in functions.items()}
        delayed = {
            side: pg_app.enqueue(assign_options(fn, delay="4s"), (), {})
            for side, fn in functions.items()
        }

        for side, offset in (("behind", -600), ("ahead", 600)):
            done = final(pg_app, due[side].id)
            assert done.state == "succeeded" and done.attempts == 1
            assert done.started_at is not None
            local = datetime.fromisoformat(pg_app.get_result(done.id))
            # The attempt did run under the skewed clock.
            assert abs((local - done.started_at).total_seconds() - offset) < 60

            later = final(pg_app, delayed[side].id)
            assert later.state == "succeeded" and later.attempts == 1
            assert later.started_at is not None
            assert later.started_at >= later.scheduled_for
            assert later.scheduled_for - later.created_at == timedelta(seconds=4)

        # Over a lost-after period has passed on the database's clock by now.
        assert one(db, "SELECT now() - max(started_at) FROM deferq_workers") > timedelta(seconds=3)
        workers = db.execute(
            "SELECT name, lost_at, now() - heartbeat_at FROM deferq_workers ORDER BY name"
        ).fetchall()
        assert [name for name, _, _ in workers] == ["ahead", "behind", "on_time"]
        for name, lost_at, silent_for in workers:
            assert lost_at is None, f"worker {name} was declared lost"
            assert silent_for < timedelta(seconds=2), f"worker {name} stopped heartbeating"
        assert one(db, "SELECT count(*) FROM deferq_attempts WHERE error_code IS NOT NULL") == 0
        running = {n for n, p in processes.items() if p.process and p.process.poll() is None}
        assert running == set(processes)
        for name, process in processes.items():
            assert process.stop() == 0, f"worker {name} did not stop cleanly"


@pytest.mark.usefixtures("faketime")
@pytest.mark.parametrize("offset", ["+10m", "-10m"])
def test_a_skewed_worker_runs_work_within_its_discard_after(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path, offset: str
) -> None:
    """Due now, to be discarded in five minutes of the database's clock: a worker whose
    clock is ten minutes off must run it, once."""
    with worker(pg_url, tmp_path, "skewed", env=skewed(offset)):
        wait_registered(db, 1)
        execution = pg_app.enqueue(assign_options(pg_tasks.echo, discard_after="5m"), (1,), {})
        done = final(pg_app, execution.id, timeout=8)
    assert (done.state, done.attempts) == ("succeeded", 1)


# Waking idle workers


def test_an_idle_worker_starts_new_work_at_once_whatever_the_enqueue_path(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    def single() -> tuple[str, datetime]:
        execution = pg_app.enqueue(pg_tasks.echo, ("single",), {})
        return execution.id, execution.created_at

    def bulk() -> tuple[str, datetime]:
        first, _ = pg_app.enqueue_many(pg_tasks.echo, [("bulk",), ("bulk",)])
        return first.id, first.created_at

    def in_transaction() -> tuple[str, datetime]:
        with psycopg.connect(conninfo_from_url(pg_url)) as conn:
            execution = pg_app.enqueue_in_transaction(conn, pg_tasks.echo, "in transaction")
        return execution.id, execution.created_at

    def rescheduled() -> tuple[str, datetime]:
        later = pg_app.enqueue(assign_options(pg_tasks.echo, delay="1h"), ("later",), {})
        now = pg_app.reschedule_execution(later.id)
        return now.id, now.scheduled_for

    with worker(pg_url, tmp_path, "idle", "--poll-interval", "30s"):
        wait_registered(db, 1)
        warm_up = pg_app.enqueue(pg_tasks.echo, ("warm up",), {})
        assert final(pg_app, warm_up.id).state == "succeeded"  # it has claimed; now it waits

        for enqueue in (single, bulk, in_transaction, rescheduled):
            execution_id, since = enqueue()
            done = final(pg_app, execution_id, timeout=40)
            assert done.state == "succeeded" and done.started_at is not None
            assert done.started_at - since < NOTIFY_LATENCY, enqueue.__name__
            wait_finished(db)


def test_900_kb_arguments_enqueue_and_notify_with_an_empty_payload(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    def big(tag: str) -> str:
        return tag + ":" + uuid.uuid4().hex * (900_000 // 32)

    channel = pg_app.store.channel  # type: ignore[attr-defined]
    db.execute(f'LISTEN "{channel}"')
    with worker(pg_url, tmp_path, "w", "--poll-interval", "30s"):
        wait_registered(db, 1)
        values = {"single": big("single"), "bulk": big("bulk"), "transaction": big("tx")}
        single = pg_app.enqueue(pg_tasks.echo, (values["single"],), {})
        (bulk,) = pg_app.enqueue_many(pg_tasks.echo, [(values["bulk"],)])
        with psycopg.connect(conninfo_from_url(pg_url)) as conn:
            in_tx = pg_app.enqueue_in_transaction(conn, pg_tasks.echo, values["transaction"])

        for key, execution in (("single", single), ("bulk", bulk), ("transaction", in_tx)):
            done = final(pg_app, execution.id)
            assert done.state == "succeeded" and done.started_at is not None
            assert done.started_at - done.created_at < NOTIFY_LATENCY
            assert pg_app.get_result(execution.id) == values[key]

    heard = list(db.notifies(timeout=5, stop_after=3))
    assert len(heard) >= 3
    assert {(n.channel, n.payload) for n in heard} == {(channel, "")}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


IDLE_WINDOW = 2.0
IDLE_CPU = 0.3
"""Most CPU seconds a waiting worker may use over IDLE_WINDOW seconds. A worker waiting for
news uses next to none; one retrying a claim in a loop uses a good part of a core."""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize(
    "blocked",
    ["function it does not import", "concurrency limit reached"],
)
def test_a_worker_waits_quietly_beside_due_work_it_cannot_take(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path, blocked: str
) -> None:
    with worker(pg_url, tmp_path, "w", "--slots", "4", "--grace", "100ms") as process:
        wait_registered(db, 1)
        if blocked == "concurrency limit reached":
            pg_app.enqueue_many(pg_tasks.limited, [(60.0,)] * 3)  # two run, one waits
            wait_until(lambda: in_states(db, "started") == 2, what="two attempts running")
        else:
            pg_app.enqueue(pg_clock_ahead.local_time, (), {})
        assert in_states(db, "created") == 1

        # A measurement window, not a wait for an event.
        before = cpu_seconds(process.pid)
        time.sleep(IDLE_WINDOW)
        used = cpu_seconds(process.pid) - before
    assert used < IDLE_CPU, f"the worker used {used:.2f} s of CPU in {IDLE_WINDOW} s"


# Lost connections


def test_workers_whose_connections_are_terminated_reconnect_and_lose_nothing(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    name = unique_name("deferq_faults")
    workers_url = named(pg_url, name)

    def backends() -> list[int]:
        rows = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchall()
        return [pid for (pid,) in rows]

    def listening() -> int:
        return one(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'idle' AND query LIKE 'LISTEN%%'",
            (name,),
        )

    def running(ids: list[str]) -> int:
        return one(
            db,
            "SELECT count(*) FROM deferq_executions WHERE state = 'started' AND id = ANY(%s)",
            (ids,),
        )

    terminated: set[int] = set()
    enqueued: list[str] = []
    with ExitStack() as stack:
        workers = [
            stack.enter_context(worker(workers_url, tmp_path, f"w{i}", "--slots", "4"))
            for i in range(2)
        ]
        wait_registered(db, 2)
        wait_until(lambda: listening() == 2, what="both workers to listen")

        for _ in range(4):
            wave = pg_app.enqueue_many(pg_tasks.pause, [(0.02 * (i % 5),) for i in range(80)])
            wave += [pg_app.enqueue(pg_tasks.pause, (0.05,), {}) for _ in range(10)]
            wave_ids = [e.id for e in wave]
            enqueued += wave_ids
            wait_until(lambda ids=wave_ids: running(ids), what="attempts of this wave running")
            # The connections the workers opened since the last cut, pool and listener alike.
            pids = wait_until(
                lambda: [pid for pid in backends() if pid not in terminated],
                what="the workers to connect again",
            )
            for pid in pids:
                db.execute("SELECT pg_terminate_backend(%s)", (pid,))
            terminated.update(pids)
            for process in workers:
                assert process.process is not None and process.process.poll() is None

        wait_finished(db)
        # Both listen again, on new connections.
        wait_until(lambda: listening() == 2, what="both workers to listen again")
        assert not set(backends()) & terminated

        after = pg_app.enqueue_many(pg_tasks.pause, [(0.01,)] * 20)
        enqueued += [e.id for e in after]
        wait_finished(db)
        for process in workers:
            assert process.stop() == 0

    assert by_state(db) == [("succeeded", 1, len(enqueued))]
    outcomes = db.execute(
        "SELECT outcome, count(*) FROM deferq_attempts WHERE finished_at IS NOT NULL"
        " GROUP BY outcome"
    ).fetchall()
    assert outcomes == [("succeeded", len(enqueued))]  # one attempt each, ended once
    assert one(db, "SELECT count(*) FROM deferq_workers WHERE lost_at IS NOT NULL") == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "replies_after"),
    [
        pytest.param("tests.tasks.basic", 0, id="claim-in-one-statement"),
        pytest.param(MODULE, 1, id="claim-of-a-limited-function-commit"),
    ],
)
def test_a_claim_whose_answer_is_lost_does_not_leave_its_execution_started(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path, module: str, replies_after: int
) -> None:
    """The worker's connection breaks right after the server committed a claim: the claim
    statement itself, or, for a worker with concurrency-limited functions, the COMMIT that
    follows it. The worker must find out what it holds and run it (or give it back)."""
    params = conninfo_to_dict(PG_DSN)
    upstream = f"{params.get('host')}:{params.get('port', 5432)}"
    if f"@{upstream}/" not in pg_url:
        pytest.skip(f"the test's URL does not name {upstream} plainly")
    proxy = Relay(str(params["host"]), int(params.get("port", 5432)))
    try:
        relayed = pg_url.replace(f"@{upstream}/", f"@127.0.0.1:{proxy.port}/", 1)
        with worker(relayed, tmp_path, "w", modules=[module]) as process:
            wait_registered(db, 1)
            fn = basic.echo if module == "tests.tasks.basic" else pg_tasks.echo
            execution = pg_app.enqueue(assign_options(fn, delay="1s"), ("lost",), {})
            proxy.arm_cut(execution.id.encode(), replies_after)
            wait_until(proxy.cut.is_set, what="the answer to the claim to be lost")

            done = final(pg_app, execution.id, timeout=10)
            assert done.state == "succeeded"
            assert pg_app.get_result(execution.id) == "lost"
            assert process.process is not None and process.process.poll() is None
    finally:
        proxy.close()


def relayed(relay: Relay, url: str) -> str:
    """`url` pointed at `relay`; skips the test if `url` does not name the server plainly."""
    params = conninfo_to_dict(PG_DSN)
    host, port = str(params.get("host")), int(params.get("port", 5432))
    if f"@{host}:{port}/" not in url:
        pytest.skip(f"the test's URL does not name {host}:{port} plainly")
    return relay.url(url, host, port)


@pytest.mark.slow
def test_a_worker_gone_silent_holding_a_function_lock_blocks_no_other_worker(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    """Worker A's network goes silent (no reset) while its server process holds the
    advisory lock of a concurrency-limited function, in the middle of a claim. The server
    ends that idle transaction (`idle_in_transaction_session_timeout`), so worker B claims
    the function; A, silent, is declared lost, and stops once it hears of it."""
    params = conninfo_to_dict(PG_DSN)
    relay = Relay(str(params.get("host")), int(params.get("port", 5432)))
    silent = unique_name("deferq_silent")
    function = "tests.tasks.pg_tasks.limited"
    lock = (
        "SELECT pg_advisory_xact_lock("
        "hashtextextended('deferq:' || current_schema() || ':' || %s, 0))"
    )

    def a_holds_the_lock(granted: bool, state: str) -> bool:
        return bool(
            one(
                db,
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.locktype = 'advisory' AND l.granted = %s AND a.state = %s"
                " AND a.application_name = %s",
                (granted, state, silent),
            )
        )

    try:
        url_a = named(relayed(relay, pg_url), silent)
        with worker(url_a, tmp_path, "a", "--slots", "1", "--prefetch", "0") as a:
            wait_registered(db, 1)
            # A's claim waits for the function's lock, held here in a transaction.
            with psycopg.connect(conninfo_from_url(pg_url)) as holder:
                holder.execute(lock, (function,))
                execution = pg_app.enqueue(pg_tasks.limited, (0.0,), {})
                wait_until(lambda: a_holds_the_lock(False, "active"), what="A to wait for the lock")
                relay.black_hole()
            # A's server process takes the lock, answers into the silence, and waits.
            wait_until(
                lambda: a_holds_the_lock(True, "idle in transaction"),
                what="A's server process to hold the lock, waiting for A",
            )

            b_args = ("--heartbeat-interval", "500ms", "--lost-after", "3s")
            with worker(pg_url, tmp_path, "b", *b_args) as b:
                done = final(pg_app, execution.id, timeout=30)
                assert done.state == "succeeded"
                (attempt,) = pg_app.list_attempts(execution.id)
                b_id = one(db, "SELECT id FROM deferq_workers WHERE name = 'b'")
                assert attempt.worker == b_id
                wait_until(
                    lambda: one(db, "SELECT lost_at FROM deferq_workers WHERE name = 'a'"),
                    what="A to be declared lost",
                )

                relay.reset()  # the network comes back: A's connections are reset
                a.wait(30)  # A hears it was declared lost, and stops
                assert b.process is not None and b.process.poll() is None
    finally:
        relay.close()
    assert by_state(db) == [("succeeded", 1, 1)]


# Many workers

PREFETCH = [("--prefetch", "64"), ("--prefetch", "64"), ("--prefetch", "8"), ("--prefetch", "0")]


@pytest.mark.slow
def test_four_workers_run_20000_executions_each_exactly_once(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    count = 20_000
    with ExitStack() as stack:
        # Prefetch as the benchmarks run it, except one worker that claims a slot at a time.
        workers = [
            stack.enter_context(worker(pg_url, tmp_path, f"w{i}", "--slots", "2", *prefetch))
            for i, prefetch in enumerate(PREFETCH)
        ]
        wait_registered(db, len(workers))
        pg_app.enqueue_many(pg_tasks.note, [(str(runs), i) for i in range(count)])
        wait_finished(db, timeout=300)
        for process in workers:
            assert process.stop() == 0

    assert by_state(db) == [("succeeded", 1, count)]
    assert one(db, "SELECT count(*) FROM deferq_attempts WHERE outcome = 'succeeded'") == count
    assert one(db, "SELECT count(DISTINCT worker_id) FROM deferq_attempts") == len(PREFETCH)

    seen = Counter(int(line) for f in runs.iterdir() for line in f.read_text().split())
    assert seen == Counter(range(count))  # each ran exactly once


# Concurrency limits


def test_a_concurrency_limit_holds_across_three_workers(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    """Each worker holds one attempt at most (one slot, nothing claimed ahead), so reaching
    the limit of 2 takes two workers, and the third must be kept out."""
    limit = 2  # pg_tasks.limited
    with ExitStack() as stack:
        workers = [
            stack.enter_context(
                worker(pg_url, tmp_path, f"w{i}", "--slots", "1", "--prefetch", "0")
            )
            for i in range(3)
        ]
        wait_registered(db, len(workers))
        pg_app.enqueue_many(pg_tasks.limited, [(0.1 + 0.05 * (i % 3),) for i in range(30)])
        wait_finished(db)
        for process in workers:
            assert process.stop() == 0

    assert by_state(db) == [("succeeded", 1, 30)]
    attempts = db.execute("SELECT started_at, finished_at, worker_id FROM deferq_attempts")
    intervals = attempts.fetchall()
    assert len(intervals) == 30
    assert max_overlap([(start, end) for start, end, _ in intervals]) == limit
    assert len({worker_id for _, _, worker_id in intervals}) >= limit


def test_a_place_freed_under_a_limit_wakes_a_worker_waiting_for_it(
    pg_app: App, pg_url: str, db: Any, tmp_path: Path
) -> None:
    """Worker a holds both places of `limited` (limit 2) and is stopped; worker b, waiting
    for a place with a poll interval of a minute, starts the third execution as soon as a's
    reports are stored, not at its next poll: the reports notify it."""
    quiet = ("--prefetch", "0", "--poll-interval", "60s")
    with ExitStack() as stack:
        a = stack.enter_context(worker(pg_url, tmp_path, "a", "--slots", "2", *quiet))
        wait_registered(db, 1)
        made = pg_app.enqueue_many(pg_tasks.limited, [(4.0,)] * 3)
        wait_until(lambda: in_states(db, "started") == 2, 30, what="a to hold both places")
        b = stack.enter_context(worker(pg_url, tmp_path, "b", "--slots", "1", *quiet))
        wait_registered(db, 2)
        time.sleep(0.5)  # b has looked, and found the limit reached
        assert in_states(db, "started") == 2
        a.signal(signal.SIGTERM)  # a finishes its attempts, claims nothing more
        wait_finished(db, timeout=20)
        assert a.wait(30) == 0 and b.stop() == 0

    ends = [pg_app.get_execution(e.id) for e in made]
    first_two = sorted(ends, key=lambda e: e.started_at or 0)[:2]
    third = max(ends, key=lambda e: e.started_at or 0)
    freed_at = min(e.finished_at for e in first_two if e.finished_at)
    assert third.started_at is not None
    assert third.started_at - freed_at < timedelta(seconds=2), (freed_at, third.started_at)
