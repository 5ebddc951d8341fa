"""Cron schedules run by real workers, with time driven by a clock the test moves.

Workers here are `tests.tasks.cron_worker`: a `deferq.worker.Worker` whose scheduler reads the
time from a file. Executions are claimed and run on real time, so every instant the clock
shows lies in the past and each stored tick is due at once.

To know that a scheduler has acted on an instant, a test waits until the schedule's
`seen_at` (the scheduler's clock when it last looked) reaches it; `settle` then moves the clock
on by a millisecond and waits again, so the whole pass at that instant has been stored before
anything is asserted, absences included.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import deferq
from deferq import Execution
from deferq.app import App, open_store
from deferq.cron import CronSchedule
from deferq.functions import BackgroundFunction, _function_options
from deferq.models import Schedule
from deferq.scheduler import Scheduler
from tests.support import ROOT, WorkerProcess, wait_until
from tests.tasks import cron_minutely, cron_policies

MINUTELY = cron_minutely.every_minute.name
SKIP = cron_policies.skips_missed.name
ONE = cron_policies.catches_up_once.name
ALL = cron_policies.catches_up_all.name
FIVE_PM = "tests.tasks.cron_new_york.at_five_pm"
HALF_PAST_ONE = "tests.tasks.cron_new_york.at_half_past_one"
OVERLAP = "tests.tasks.cron_overlap.holds_until_released"
SUMMARY = "cron_report.summary"
HEARTBEAT = "cron_report.heartbeat"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


# A June day: no clock change in any zone these schedules use, and long past, so every
# stored tick is due on the real clock.
START = utc(2026, 6, 1, 12, 0, 30)


class Clock:
    """The time the workers' schedulers read: one ISO instant in a file."""

    def __init__(self, path: Path, start: datetime) -> None:
        self.path = path
        self.set(start)

    def set(self, when: datetime) -> None:
        # Replaced in one step, so a scheduler never reads half a time.
        staging = self.path.with_name(self.path.name + ".new")
        staging.write_text(when.isoformat(), encoding="utf-8")
        os.replace(staging, self.path)
        self.now = when


class ClockedWorker(WorkerProcess):
    """`tests.tasks.cron_worker` in a subprocess: a worker whose scheduler follows `clock`."""

    def __init__(
        self,
        url: str,
        clock: Clock,
        modules: Sequence[str],
        log_path: Path,
        slots: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(url, modules, env=env, log_path=log_path)
        self.command = [
            sys.executable,
            "-m",
            "tests.tasks.cron_worker",
            "--clock-file",
            str(clock.path),
            "--slots",
            str(slots),
            *modules,
        ]


class CronHarness:
    """Starts clocked workers on one store and waits on what their schedulers do."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.clock = Clock(tmp_path / "clock.txt", START)
        self.workers: list[ClockedWorker] = []

    def start(
        self, *modules: str, slots: int = 1, env: dict[str, str] | None = None
    ) -> ClockedWorker:
        log = self.tmp_path / f"worker-{len(self.workers)}.log"
        worker = ClockedWorker(self.url, self.clock, modules, log, slots=slots, env=env)
        self.workers.append(worker)
        worker.start()
        wait_until(
            lambda: log.exists() and "Worker started" in log.read_text(encoding="utf-8"),
            timeout=60,
            what=f"a worker to start ({log.name})",
        )
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.__exit__(None, None, None)

    def schedules(self) -> dict[str, Schedule]:
        return {s.function_name: s for s in deferq.default_app().store.list_schedules()}

    def wait_seen(self, names: Sequence[str], at: datetime) -> None:
        """Wait until a scheduler has looked at each of these schedules at `at` or later."""

        def seen() -> bool:
            schedules = self.schedules()
            return all(n in schedules and schedules[n].seen_at >= at for n in names)

        wait_until(seen, timeout=30, what=f"schedulers to look at {names} at {at}")

    def settle(self, names: Sequence[str], when: datetime) -> None:
        """Move the clock to `when` and wait until the one running scheduler has stored
        everything due at that instant."""
        self.clock.set(when)
        self.wait_seen(names, when)
        later = when + timedelta(milliseconds=1)
        self.clock.set(later)
        self.wait_seen(names, later)


@pytest.fixture
def cron(app: App, store_url: str, tmp_path: Path) -> Iterator[CronHarness]:
    harness = CronHarness(store_url, tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def executions_of(name: str) -> list[Execution]:
    """Every execution of one function, oldest first."""
    found: list[Execution] = []
    cursor = None
    while True:
        page = deferq.list_executions(functions=[name], first=1000, after=cursor)
        found += page.items
        cursor = page.next_cursor
        if cursor is None:
            return sorted(found, key=lambda e: e.id)


def ticks_of(name: str) -> list[datetime]:
    return sorted(e.cron_tick for e in executions_of(name) if e.cron_tick is not None)


def wait_ticks(name: str, expected: list[datetime]) -> None:
    wait_until(
        lambda: ticks_of(name) == expected, timeout=30, what=f"the ticks of {name} to be {expected}"
    )


def wait_all_succeeded(names: Sequence[str]) -> list[Execution]:
    def done() -> list[Execution] | None:
        executions = [e for name in names for e in executions_of(name)]
        if all(e.state == "succeeded" for e in executions):
            return executions
        return None

    return wait_until(done, timeout=60, what=f"every execution of {names} to succeed")


def deferq_cli(url: str, *args: str) -> str:
    env = {
        **os.environ,
        "DEFERQ_URL": url,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "deferq.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# Exactly once per tick


def test_racing_schedulers_store_one_execution_per_tick(
    app: App, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight schedulers on eight connections look at the same instant at the same moment:
    the store keeps one execution per tick, on time and when catching up."""
    caplog.set_level(logging.INFO, logger="deferq.scheduler")
    functions = [cron_minutely.every_minute, cron_policies.catches_up_all]
    stores = [open_store(store_url) for _ in range(8)]
    now = [START]
    schedulers = [Scheduler(store, functions, clock=lambda: now[0]) for store in stores]
    failures: list[BaseException] = []

    def race() -> None:
        barrier = threading.Barrier(len(schedulers))

        def step(scheduler: Scheduler) -> None:
            try:
                barrier.wait(timeout=30)
                scheduler.tick()
            except BaseException as exc:  # reported by the test thread
                failures.append(exc)

        threads = [threading.Thread(target=step, args=(s,)) for s in schedulers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not failures, failures

    try:
        race()  # first seen: nothing is due yet
        for minute in range(1, 4):
            now[0] = START.replace(second=0) + timedelta(minutes=minute, seconds=1)
            race()
        # Down across several ticks: "all" stores each missed tick once, "one" the latest.
        now[0] = utc(2026, 6, 1, 12, 20, 1)
        race()
    finally:
        for store in stores:
            store.close()

    assert ticks_of(MINUTELY) == [utc(2026, 6, 1, 12, m) for m in (1, 2, 3, 20)]
    assert ticks_of(ALL) == [utc(2026, 6, 1, 12, m) for m in (5, 10, 15, 20)]
    for execution in executions_of(MINUTELY) + executions_of(ALL):
        assert execution.scheduled_for == execution.cron_tick
        assert execution.state == "created"
    # Each tick was stored by one scheduler; for the seven others the insert changed nothing.
    stored = [r for r in caplog.records if getattr(r, "action", None) == "schedule_cron_tick"]
    assert sorted((r.function, r.tick) for r in stored) == sorted(
        [(MINUTELY, t.isoformat()) for t in ticks_of(MINUTELY)]
        + [(ALL, t.isoformat()) for t in ticks_of(ALL)]
    )


@pytest.mark.slow
def test_three_workers_one_killed_each_tick_run_each_tick_once(cron: CronHarness) -> None:
    workers = [cron.start("tests.tasks.cron_minutely") for _ in range(3)]
    cron.wait_seen([MINUTELY], START)

    expected: list[datetime] = []
    for minute in range(1, 7):
        tick = utc(2026, 6, 1, 12, minute)
        expected.append(tick)
        cron.clock.set(tick + timedelta(seconds=20))
        wait_ticks(MINUTELY, expected)
        wait_all_succeeded([MINUTELY])

        # Between ticks, one worker dies by SIGKILL and a new one takes its place.
        victim = (minute - 1) % len(workers)
        workers[victim].kill()
        workers[victim] = cron.start("tests.tasks.cron_minutely")

    for worker in workers:
        assert worker.stop() == 0
    logs = [p.read_text(encoding="utf-8") for p in cron.tmp_path.glob("worker-*.log")]
    assert sum(log.count("Cron tick scheduled") for log in logs) == len(expected)

    executions = executions_of(MINUTELY)
    assert [e.cron_tick for e in sorted(executions, key=lambda e: e.cron_tick)] == expected
    assert all(e.state == "succeeded" and e.attempts == 1 for e in executions)
    for execution in executions:
        [attempt] = deferq.list_attempts(execution.id)
        assert attempt.outcome == "succeeded"


# Time zones


@pytest.mark.slow
def test_new_york_schedules_store_utc_ticks_across_the_fall_back_day(cron: CronHarness) -> None:
    """On 2026-11-01 New York's clocks go from 02:00 EDT back to 01:00 EST."""
    names = [FIVE_PM, HALF_PAST_ONE]
    cron.clock.set(utc(2026, 10, 31, 12, 0))
    cron.start("tests.tasks.cron_new_york")
    cron.wait_seen(names, cron.clock.now)

    steps = [
        # (clock, ticks of at_five_pm, ticks of at_half_past_one)
        (utc(2026, 10, 31, 21, 0, 5), [utc(2026, 10, 31, 21)], []),  # 17:00 EDT
        (utc(2026, 11, 1, 5, 30, 5), [utc(2026, 10, 31, 21)], [utc(2026, 11, 1, 5, 30)]),
        # 01:30 EST, the second 01:30 of the day: a fixed-time job runs only at the first.
        (utc(2026, 11, 1, 6, 30, 5), [utc(2026, 10, 31, 21)], [utc(2026, 11, 1, 5, 30)]),
        # 21:00 UTC is 16:00 EST now: not yet five o'clock.
        (utc(2026, 11, 1, 21, 0, 5), [utc(2026, 10, 31, 21)], [utc(2026, 11, 1, 5, 30)]),
        (
            utc(2026, 11, 1, 22, 0, 5),
            [utc(2026, 10, 31, 21), utc(2026, 11, 1, 22)],
            [utc(2026, 11, 1, 5, 30)],
        ),
        (
            utc(2026, 11, 2, 22, 0, 5),
            [utc(2026, 10, 31, 21), utc(2026, 11, 1, 22), utc(2026, 11, 2, 22)],
            [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)],
        ),
    ]
    for when, five_pm, half_past_one in steps:
        cron.settle(names, when)
        assert ticks_of(FIVE_PM) == five_pm, when
        assert ticks_of(HALF_PAST_ONE) == half_past_one, when

    schedules = cron.schedules()
    assert schedules[FIVE_PM].next_tick == utc(2026, 11, 3, 22)
    assert schedules[HALF_PAST_ONE].next_tick == utc(2026, 11, 3, 6, 30)
    for execution in wait_all_succeeded(names):
        assert execution.scheduled_for == execution.cron_tick


# Downtime and catch-up


@pytest.mark.slow
def test_catch_up_after_downtime_follows_each_policy(cron: CronHarness) -> None:
    names = [SKIP, ONE, ALL]
    worker = cron.start("tests.tasks.cron_policies")
    cron.wait_seen(names, START)
    cron.settle(names, utc(2026, 6, 1, 12, 5, 10))
    for name in names:
        assert ticks_of(name) == [utc(2026, 6, 1, 12, 5)]

    # Every worker is down across the ticks of 12:10, 12:15 and 12:20.
    assert worker.stop() == 0
    cron.clock.set(utc(2026, 6, 1, 12, 22))
    cron.start("tests.tasks.cron_policies")
    cron.settle(names, utc(2026, 6, 1, 12, 22))
    assert ticks_of(SKIP) == [utc(2026, 6, 1, 12, 5)]
    assert ticks_of(ONE) == [utc(2026, 6, 1, 12, m) for m in (5, 20)]
    assert ticks_of(ALL) == [utc(2026, 6, 1, 12, m) for m in (5, 10, 15, 20)]

    # Back on schedule: every policy runs the next tick.
    cron.settle(names, utc(2026, 6, 1, 12, 25, 5))
    assert ticks_of(SKIP) == [utc(2026, 6, 1, 12, m) for m in (5, 25)]
    assert ticks_of(ONE) == [utc(2026, 6, 1, 12, m) for m in (5, 20, 25)]
    assert ticks_of(ALL) == [utc(2026, 6, 1, 12, m) for m in (5, 10, 15, 20, 25)]
    wait_all_succeeded(names)


@pytest.mark.slow
def test_tick_that_fell_while_the_scheduler_restarted_still_fires(cron: CronHarness) -> None:
    names = [SKIP, ONE, ALL]
    worker = cron.start("tests.tasks.cron_policies")
    cron.wait_seen(names, START)

    # The only worker dies just before 12:05 and is back 20 seconds after it.
    cron.clock.set(utc(2026, 6, 1, 12, 4, 59))
    cron.wait_seen(names, cron.clock.now)
    worker.kill()
    cron.clock.set(utc(2026, 6, 1, 12, 5, 20))
    cron.start("tests.tasks.cron_policies")
    cron.settle(names, cron.clock.now)

    # Found within a minute of its time, the tick is on time even for "skip".
    for name in names:
        assert ticks_of(name) == [utc(2026, 6, 1, 12, 5)], name
    wait_all_succeeded(names)


# Overlap


@pytest.mark.slow
def test_tick_during_a_running_execution_is_stored_and_waits_its_turn(
    cron: CronHarness,
) -> None:
    gate = cron.tmp_path / "release"
    cron.start("tests.tasks.cron_overlap", slots=2, env={"CRON_TEST_GATE": str(gate)})
    cron.wait_seen([OVERLAP], START)

    cron.settle([OVERLAP], utc(2026, 6, 1, 12, 1, 5))
    [first] = executions_of(OVERLAP)
    wait_until(
        lambda: deferq.get_execution(first.id).state == "started",
        timeout=30,
        what="the 12:01 execution to start",
    )

    # The 12:02 tick comes while 12:01 still runs: it is stored, and with concurrency=1 it
    # waits although a slot is free.
    cron.settle([OVERLAP], utc(2026, 6, 1, 12, 2, 5))
    assert ticks_of(OVERLAP) == [utc(2026, 6, 1, 12, 1), utc(2026, 6, 1, 12, 2)]
    first, second = executions_of(OVERLAP)
    assert first.state == "started"
    assert second.state == "created"

    gate.touch()
    first, second = wait_all_succeeded([OVERLAP])
    assert first.cron_tick == utc(2026, 6, 1, 12, 1)
    assert first.finished_at is not None and second.started_at is not None
    assert second.started_at >= first.finished_at


# Visibility


def test_schedules_command_lists_schedules_with_next_run_times(cron: CronHarness) -> None:
    cron.start("tests.tasks.cron_minutely")
    cron.wait_seen([MINUTELY], START)
    [line] = deferq_cli(cron.url, "schedules").splitlines()
    assert line.startswith(f"{MINUTELY}  * * * * * (UTC)  last never  ")
    assert "next 2026-06-01T12:01:00+00:00" in line

    cron.settle([MINUTELY], utc(2026, 6, 1, 12, 1, 5))
    [line] = deferq_cli(cron.url, "schedules").splitlines()
    assert "last 2026-06-01T12:01:00+00:00  next 2026-06-01T12:02:00+00:00" in line

    # With modules: what the code declares, next ticks counted from the store's clock.
    before = datetime.now(UTC)
    out = deferq_cli(cron.url, "schedules", "tests.tasks.cron_new_york")
    after = datetime.now(UTC)
    five_pm, half_past_one = out.splitlines()
    assert five_pm.startswith(f"{FIVE_PM}  0 17 * * * (America/New_York)  next ")
    assert half_past_one.startswith(f"{HALF_PAST_ONE}  30 1 * * * (America/New_York)  next ")
    for line in (five_pm, half_past_one):
        upcoming = datetime.fromisoformat(line.rsplit(" ", 1)[1])
        assert before < upcoming <= after + timedelta(days=1)


def test_cron_function_called_by_hand_runs_without_a_tick(cron: CronHarness) -> None:
    cron.start("tests.tasks.cron_minutely")
    cron.wait_seen([MINUTELY], START)

    execution = cron_minutely.every_minute()
    assert execution.cron_tick is None
    [done] = wait_all_succeeded([MINUTELY])
    assert done.id == execution.id
    assert isinstance(deferq.get_result(execution.id), int)

    # A hand call is no tick: the schedule goes on as before.
    cron.settle([MINUTELY], utc(2026, 6, 1, 12, 1, 5))
    assert ticks_of(MINUTELY) == [utc(2026, 6, 1, 12, 1)]
    assert len(executions_of(MINUTELY)) == 2


# Changing and removing a schedule


@pytest.mark.slow
def test_changed_schedule_starts_afresh_and_removed_one_stops(cron: CronHarness) -> None:
    v1 = cron.start("tests.tasks.cron_report_v1")
    cron.wait_seen([SUMMARY], START)
    cron.settle([SUMMARY], utc(2026, 6, 1, 13, 0, 5))
    assert ticks_of(SUMMARY) == [utc(2026, 6, 1, 13)]
    assert v1.stop() == 0

    # Deployed with "30 * * * *" after 14:00 and 15:00 passed: the old expression's missed
    # ticks are not caught up, nor the new one's from before the change.
    cron.clock.set(utc(2026, 6, 1, 15, 10))
    v2 = cron.start("tests.tasks.cron_report_v2")
    cron.settle([SUMMARY], cron.clock.now)
    assert ticks_of(SUMMARY) == [utc(2026, 6, 1, 13)]
    schedule = cron.schedules()[SUMMARY]
    assert schedule.expression == "30 * * * *"
    assert schedule.next_tick == utc(2026, 6, 1, 15, 30)

    cron.settle([SUMMARY], utc(2026, 6, 1, 15, 30, 5))
    assert ticks_of(SUMMARY) == [utc(2026, 6, 1, 13), utc(2026, 6, 1, 15, 30)]
    assert v2.stop() == 0

    # Removed after 16:30 passed: nothing more, while the remaining schedule runs.
    cron.clock.set(utc(2026, 6, 1, 16, 40))
    cron.start("tests.tasks.cron_report_v3")
    cron.wait_seen([HEARTBEAT], cron.clock.now)
    for minute in (41, 42):
        cron.settle([HEARTBEAT], utc(2026, 6, 1, 16, minute, 5))
    cron.settle([HEARTBEAT], utc(2026, 6, 1, 17, 0, 5))
    assert ticks_of(HEARTBEAT) == [utc(2026, 6, 1, 16, 41), utc(2026, 6, 1, 16, 42)] + [
        utc(2026, 6, 1, 17)
    ]
    assert ticks_of(SUMMARY) == [utc(2026, 6, 1, 13), utc(2026, 6, 1, 15, 30)]
    wait_all_succeeded([SUMMARY, HEARTBEAT])

    # The removed schedule is still listed: its seen time no longer moves (a known limit).
    listed = {
        line.split("  ", 1)[0]: line for line in deferq_cli(cron.url, "schedules").splitlines()
    }
    assert sorted(listed) == [HEARTBEAT, SUMMARY]
    assert "seen 2026-06-01T15:30:05.001000+00:00" in listed[SUMMARY]
    assert "seen 2026-06-01T17:00:05.001000+00:00" in listed[HEARTBEAT]


def _cron_function(
    expression: str, tz: str = "UTC", name: str = "inproc.summary"
) -> BackgroundFunction[[], str]:
    """A cron function as a worker's code declares it, without registering it."""

    def job() -> str:
        return expression

    options = _function_options(False, None, "keep", "30min")
    return BackgroundFunction(job, options, cron=CronSchedule(expression, tz=tz), name=name)


def _drive(scheduler: Scheduler, now: list[datetime], until: datetime, step: timedelta) -> None:
    while now[0] < until:
        now[0] = min(until, now[0] + step)
        scheduler.tick()


def test_scheduler_stores_every_real_hour_of_the_fall_back_day(app: App) -> None:
    """An hourly New York job on 2026-11-01 runs 25 times, twice at 01:00 local time."""
    now = [utc(2026, 11, 1, 3, 0)]
    hourly = _cron_function("0 * * * *", tz="America/New_York", name="inproc.hourly")
    scheduler = Scheduler(app.store, [hourly], clock=lambda: now[0])
    scheduler.tick()
    _drive(scheduler, now, utc(2026, 11, 2, 4, 30), timedelta(minutes=10))

    # Local midnight is 04:00 UTC (EDT); the next one is 05:00 UTC (EST).
    day = [t for t in ticks_of("inproc.hourly") if utc(2026, 11, 1, 4) <= t < utc(2026, 11, 2, 5)]
    assert day == [utc(2026, 11, 1, 4) + timedelta(hours=h) for h in range(25)]
    assert ticks_of("inproc.hourly")[0] == utc(2026, 11, 1, 4)


def test_scheduler_runs_a_skipped_local_time_once_at_the_spring_forward(app: App) -> None:
    """02:30 does not exist in New York on 2026-03-08: the tick falls at 03:00 EDT."""
    now = [utc(2026, 3, 7, 0, 0)]
    nightly = _cron_function("30 2 * * *", tz="America/New_York", name="inproc.nightly")
    scheduler = Scheduler(app.store, [nightly], clock=lambda: now[0])
    scheduler.tick()
    _drive(scheduler, now, utc(2026, 3, 10, 0, 0), timedelta(minutes=10))

    assert ticks_of("inproc.nightly") == [
        utc(2026, 3, 7, 7, 30),  # 02:30 EST
        utc(2026, 3, 8, 7, 0),  # 03:00 EDT, the transition
        utc(2026, 3, 9, 6, 30),  # 02:30 EDT
    ]


def test_schedule_in_force_keeps_running_while_workers_with_a_new_version_start(
    app: App,
) -> None:
    """A rolling deploy: workers with the new expression start while old ones still run. The
    version in force keeps the schedule until no old worker is left, then the new one takes
    over; neither silences the other, and no tick runs twice."""
    now = [START]
    old = Scheduler(app.store, [_cron_function("0 * * * *")], clock=lambda: now[0])
    new = Scheduler(app.store, [_cron_function("30 * * * *")], clock=lambda: now[0])

    def run(schedulers: list[Scheduler], until: datetime) -> None:
        while now[0] < until:
            now[0] += timedelta(seconds=5)
            for scheduler in schedulers:
                scheduler.tick()

    old.tick()
    run([old], utc(2026, 6, 1, 13, 25))
    run([old, new], utc(2026, 6, 1, 14, 2))  # both run: 13:30 is not the new one's yet
    run([new], utc(2026, 6, 1, 15, 5))  # the old workers are gone

    assert ticks_of("inproc.summary") == [
        utc(2026, 6, 1, 13),
        utc(2026, 6, 1, 14),
        utc(2026, 6, 1, 14, 30),
    ]
    [schedule] = app.store.list_schedules()
    assert schedule.expression == "30 * * * *"
    assert schedule.next_tick == utc(2026, 6, 1, 15, 30)
