"""The `deferq` command: run workers and manage executions from a terminal.

Every option can also come from an environment variable: `DEFERQ_URL`, `DEFERQ_SLOTS`,
`DEFERQ_GRACE`, ... (the option's name in capitals, prefixed by DEFERQ_).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from datetime import timedelta
from typing import Any

import click

from deferq.app import App
from deferq.durations import format_duration, parse_duration
from deferq.errors import DeferqError
from deferq.logs import configure_logging
from deferq.models import Execution, ExecutionState
from deferq.store.sqlite import path_from_url


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value, name=param.name if param else "duration")
        except (TypeError, ValueError) as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


@click.group(context_settings={"auto_envvar_prefix": "DEFERQ", "show_default": True})
@click.option("--url", envvar="DEFERQ_URL", help="Store URL [default: sqlite:///deferq.sqlite3]")
@click.option("-v", "--verbose", count=True, help="More logging (-v: debug).")
@click.option("-q", "--quiet", count=True, help="Less logging (-q: warnings, -qq: errors).")
@click.version_option(package_name="deferq")
@click.pass_context
def main(ctx: click.Context, url: str | None, verbose: int, quiet: int) -> None:
    """deferq: durable background functions for Python."""
    configure_logging(verbose - quiet)
    ctx.obj = App(url)


def _app(ctx: click.Context) -> App:
    """The app for commands that read or change executions: an SQLite store must exist
    already, so a mistyped path is reported instead of silently creating an empty store."""
    app: App = ctx.find_root().obj
    if app.url.startswith("sqlite:"):
        path = path_from_url(app.url)
        if not os.path.exists(path):
            raise click.ClickException(
                f"no store at {path!r} (from {app.url!r}): check DEFERQ_URL or --url; "
                "a worker or the first call of a background function creates it"
            )
    return app


# DEFERQ_SLOTS, not click's default of DEFERQ_WORKER_SLOTS for a subcommand's option.
@main.command(context_settings={"auto_envvar_prefix": "DEFERQ"})
@click.argument("modules", nargs=-1, required=True)
@click.option("--slots", type=click.IntRange(min=1), help="Attempts run at once [default: CPUs]")
@click.option("--grace", type=DURATION, default="30s", help="Time running attempts get to finish")
@click.option("--heartbeat-interval", type=DURATION, default="2s")
@click.option("--lost-after", type=DURATION, default="15s", help="Silence before a worker is lost")
@click.option("--poll-interval", type=DURATION, default="1s", help="Longest idle wait")
@click.option(
    "--prefetch",
    type=click.IntRange(min=0),
    help="Executions claimed ahead of free slots: more throughput for short functions "
    "[default: as many as slots]",
)
@click.option(
    "--retention",
    type=DURATION,
    default="7d",
    help="Finished executions older than this are deleted (0: keep them all)",
)
@click.option("--name", help="A name for this worker in logs and attempts")
@click.pass_context
def worker(
    ctx: click.Context,
    modules: tuple[str, ...],
    slots: int | None,
    grace: timedelta,
    heartbeat_interval: timedelta,
    lost_after: timedelta,
    poll_interval: timedelta,
    prefetch: int | None,
    retention: timedelta,
    name: str | None,
) -> None:
    """Import MODULES and run due executions of their background functions."""
    from deferq.worker import Worker, WorkerSettings

    _check_worker_timing(heartbeat_interval, lost_after, poll_interval)

    # Importing the modules can take a while: a stop asked meanwhile is kept, not fatal.
    early: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: early.append(number))
    try:
        settings = WorkerSettings(
            slots=slots,
            grace=grace,
            heartbeat_interval=heartbeat_interval,
            lost_after=lost_after,
            poll_interval=poll_interval,
            prefetch=prefetch,
            retention=retention,
            name=name,
        )
        runner = Worker(modules, app=ctx.find_root().obj, settings=settings)
    except ImportError as exc:
        logging.getLogger("deferq").debug("Import failed", exc_info=True)
        raise click.ClickException(
            f"cannot import {' '.join(modules)}: {exc}. Modules are dotted names "
            "(myapp.tasks), imported from the current directory and PYTHONPATH; -v shows "
            "the traceback"
        ) from exc
    except (ValueError, DeferqError) as exc:
        raise click.ClickException(str(exc)) from exc
    runner.install_signal_handlers()
    if early:
        runner.stop()
    sys.exit(runner.run())


MIN_WORKER_INTERVAL = timedelta(milliseconds=10)
"""Shortest --heartbeat-interval and --poll-interval: below it a worker only spins."""


def _check_worker_timing(
    heartbeat_interval: timedelta, lost_after: timedelta, poll_interval: timedelta
) -> None:
    """Refuse intervals that would make a worker spin, or be declared lost while alive."""
    for flag, value in (
        ("--heartbeat-interval", heartbeat_interval),
        ("--poll-interval", poll_interval),
    ):
        if value < MIN_WORKER_INTERVAL:
            raise click.BadParameter(
                f"{format_duration(value)!r} is too short: it must be at least "
                f"{format_duration(MIN_WORKER_INTERVAL)}, or the worker spins on the store "
                "instead of waiting",
                param_hint=flag,
            )
    # A worker stops its own attempts when no heartbeat was stored for half of --lost-after,
    # and the time since the last stored one reaches an interval plus the round trips of
    # the heartbeats: half of --lost-after must hold two intervals.
    if lost_after < heartbeat_interval * 4:
        raise click.BadParameter(
            f"{format_duration(lost_after)!r} must be at least 4 times --heartbeat-interval "
            f"({format_duration(heartbeat_interval)}): a live worker stops its own attempts "
            "at half of --lost-after, and a heartbeat a little late would make it do so",
            param_hint="--lost-after",
        )


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or update the store's tables."""
    app: App = ctx.find_root().obj
    _run(lambda: app.store.migrate())
    click.echo("store is up to date")


@main.command("ls")
@click.option("--state", "states", multiple=True, help="Only these states (repeatable)")
@click.option("--function", "functions", multiple=True, help="Only these functions")
@click.option("--error-code", "error_codes", multiple=True)
@click.option("--metadata", "metadata", multiple=True, help="key=value (repeatable)")
@click.option("--first", default=20, type=click.IntRange(1, 1000))
@click.option("--after", help="Cursor from a previous page")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line")
@click.pass_context
def list_command(
    ctx: click.Context,
    states: tuple[str, ...],
    functions: tuple[str, ...],
    error_codes: tuple[str, ...],
    metadata: tuple[str, ...],
    first: int,
    after: str | None,
    as_json: bool,
) -> None:
    """List executions, newest first."""
    wanted: dict[str, list[str]] = {}
    for pair in metadata:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="--metadata")
        wanted.setdefault(key, []).append(value)
    page = _run(
        lambda: _app(ctx).list_executions(
            states=states or None,
            functions=functions or None,
            error_codes=error_codes or None,
            metadata=wanted or None,
            first=first,
            after=after,
        )
    )
    for execution in page.items:
        if as_json:
            click.echo(json.dumps(_execution_dict(execution), ensure_ascii=False))
        else:
            click.echo(
                f"{execution.id}  {execution.state.value:<9}  {execution.function_name}  "
                f"scheduled {execution.scheduled_for:%Y-%m-%d %H:%M:%S}Z  "
                f"attempts {execution.attempts}"
                + (f"  {execution.error_code}" if execution.error_code else "")
            )
    if page.next_cursor:
        click.echo(f"next page: --after {page.next_cursor}", err=True)


@main.command()
@click.argument("execution_id")
@click.pass_context
def show(ctx: click.Context, execution_id: str) -> None:
    """Show one execution as JSON."""
    app = _app(ctx)
    execution = _run(lambda: app.get_execution(execution_id))
    shown = _execution_dict(execution)
    if execution.state == ExecutionState.SUCCEEDED:
        shown["result"] = _run(lambda: app.get_result(execution_id))
    click.echo(json.dumps(shown, indent=2, ensure_ascii=False))


@main.command()
@click.argument("execution_id")
@click.option("--force", is_flag=True, help="Abort it if it is already running")
@click.pass_context
def cancel(ctx: click.Context, execution_id: str, force: bool) -> None:
    """Cancel a created execution (--force: abort a started one)."""
    execution = _run(lambda: _app(ctx).cancel_execution(execution_id, force=force))
    click.echo(f"{execution.id} {execution.state.value}")


@main.command()
@click.argument("execution_id")
@click.argument("when", required=False)
@click.pass_context
def reschedule(ctx: click.Context, execution_id: str, when: str | None) -> None:
    """Move a created execution to WHEN (a duration from now; default now)."""
    execution = _run(lambda: _app(ctx).reschedule_execution(execution_id, when))
    click.echo(f"{execution.id} scheduled for {execution.scheduled_for.isoformat()}")


@main.command()
@click.argument("execution_id")
@click.pass_context
def rerun(ctx: click.Context, execution_id: str) -> None:
    """Run an execution again as a new execution, due now."""
    execution = _run(lambda: _app(ctx).rerun_execution(execution_id))
    click.echo(execution.id)


@main.command()
@click.argument("execution_id")
@click.pass_context
def attempts(ctx: click.Context, execution_id: str) -> None:
    """List the attempts of one execution."""
    for attempt in _run(lambda: _app(ctx).list_attempts(execution_id)):
        took = ""
        if attempt.finished_at:
            took = format_duration(attempt.finished_at - attempt.started_at)
        click.echo(
            f"#{attempt.number}  {attempt.outcome.value:<11} {attempt.started_at.isoformat()}"
            f"  {took}  worker {attempt.worker}"
            + (f"  {attempt.error_code}: {attempt.error_message}" if attempt.error_code else "")
        )
        if attempt.traceback:
            click.echo(attempt.traceback.rstrip())


@main.command()
@click.argument("modules", nargs=-1)
@click.pass_context
def schedules(ctx: click.Context, modules: tuple[str, ...]) -> None:
    """List cron schedules and their next ticks.

    Without MODULES: the schedules workers have run, as the store knows them. With MODULES:
    the cron functions declared in them, with their next ticks from now."""
    if modules:
        from deferq.functions import registry
        from deferq.runner import import_modules

        _run(lambda: import_modules(modules))
        now = _app(ctx).store.now()
        for fn in sorted(registry.values(), key=lambda f: f.name):
            if fn.cron is not None:
                click.echo(
                    f"{fn.name}  {fn.cron.describe()}  next {fn.cron.next_tick(now).isoformat()}"
                )
        return
    for schedule in _run(lambda: _app(ctx).store.list_schedules()):
        last = schedule.last_tick.isoformat() if schedule.last_tick else "never"
        upcoming = schedule.next_tick.isoformat() if schedule.next_tick else "-"
        click.echo(
            f"{schedule.function_name}  {schedule.expression} ({schedule.timezone})  "
            f"last {last}  next {upcoming}  seen {schedule.seen_at.isoformat()}"
        )


@main.command()
@click.option("--older-than", type=DURATION, default="7d", help="Retention of finished ones")
@click.pass_context
def prune(ctx: click.Context, older_than: timedelta) -> None:
    """Delete executions that finished longer ago than --older-than."""
    count = _run(lambda: _app(ctx).store.prune_finished(older_than))
    click.echo(f"deleted {count} executions")


def _run(action: Any) -> Any:
    try:
        return action()
    except (DeferqError, ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _execution_dict(execution: Execution) -> dict[str, Any]:
    def iso(value: Any) -> Any:
        return value.isoformat() if value is not None else None

    return {
        "id": execution.id,
        "function_name": execution.function_name,
        "state": execution.state.value,
        "created_at": iso(execution.created_at),
        "scheduled_for": iso(execution.scheduled_for),
        "discard_after": iso(execution.discard_after),
        "started_at": iso(execution.started_at),
        "finished_at": iso(execution.finished_at),
        "attempts": execution.attempts,
        "metadata": execution.metadata,
        "error_code": execution.error_code,
        "error_message": execution.error_message,
        "arguments": execution.arguments,
    }


if __name__ == "__main__":
    main()
