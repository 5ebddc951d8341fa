"""`deferq ls / show / cancel / reschedule / rerun / attempts`, run as a real command against a
store holding executions; errors exit non-zero with a message on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import deferq
from deferq import RetryPolicy, add_metadata, defer, delay
from deferq.app import App
from deferq.ids import new_execution_id
from deferq.store.base import FunctionLimits
from deferq.testing import run_due
from tests.support import ROOT


@defer
def job(n: int) -> int:
    return n


@defer(retry=RetryPolicy(2, initial_interval=0))
def flaky(message: str) -> None:
    raise RuntimeError(message)


def cli(url: str, *args: str, use_flag: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `deferq ARGS...` against the store at `url` (DEFERQ_URL, or --url)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        "PYTHONIOENCODING": "utf-8",
    }
    env.pop("DEFERQ_URL", None)
    command = [sys.executable, "-m", "deferq.cli"]
    if use_flag:
        command += ["--url", url]
    else:
        env["DEFERQ_URL"] = url
    return subprocess.run(
        [*command, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )


def ok(url: str, *args: str) -> str:
    result = cli(url, *args)
    assert result.returncode == 0, f"deferq {' '.join(args)} failed: {result.stderr}"
    return result.stdout


def first_column(output: str) -> list[str]:
    return [line.split()[0] for line in output.splitlines() if line.strip()]


@pytest.fixture
def executions(app: App) -> dict[str, Any]:
    """A succeeded, a failed (three attempts) and a delayed execution with Unicode metadata."""
    done = job(1)
    failed = flaky("kaput")
    run_due()
    waiting = add_metadata(delay(job, "1h"), {"flow": "sign-in", "客户": "東京"})(2)
    return {"done": done.id, "failed": failed.id, "waiting": waiting.id}


def test_ls_lists_newest_first(store_url: str, executions: dict[str, Any]) -> None:
    output = ok(store_url, "ls")
    assert first_column(output) == [executions[k] for k in ("waiting", "failed", "done")]
    lines = output.splitlines()
    assert "created" in lines[0] and job.name in lines[0]
    assert "failed" in lines[1] and "attempts 3" in lines[1] and "raised" in lines[1]
    assert "succeeded" in lines[2]


def test_ls_filters(store_url: str, executions: dict[str, Any]) -> None:
    assert first_column(ok(store_url, "ls", "--state", "failed")) == [executions["failed"]]
    assert first_column(ok(store_url, "ls", "--state", "failed", "--state", "succeeded")) == [
        executions["failed"],
        executions["done"],
    ]
    assert first_column(ok(store_url, "ls", "--function", job.name)) == [
        executions["waiting"],
        executions["done"],
    ]
    assert first_column(ok(store_url, "ls", "--error-code", "raised")) == [executions["failed"]]
    assert first_column(ok(store_url, "ls", "--metadata", "flow=sign-in")) == [
        executions["waiting"]
    ]
    assert first_column(ok(store_url, "ls", "--metadata", "客户=東京")) == [executions["waiting"]]
    assert ok(store_url, "ls", "--metadata", "flow=sign-up") == ""


def test_ls_json(store_url: str, executions: dict[str, Any]) -> None:
    rows = [json.loads(line) for line in ok(store_url, "ls", "--json").splitlines()]
    assert [row["id"] for row in rows] == [executions[k] for k in ("waiting", "failed", "done")]
    waiting = rows[0]
    assert waiting["state"] == "created"
    assert waiting["metadata"] == {"flow": "sign-in", "客户": "東京"}
    assert waiting["arguments"] == {"args": [2], "kwargs": {}}
    assert datetime.fromisoformat(waiting["scheduled_for"]) > datetime.fromisoformat(
        waiting["created_at"]
    ) + timedelta(minutes=59)
    assert rows[1]["error_code"] == "raised"


def test_ls_pages(store_url: str, executions: dict[str, Any]) -> None:
    first = cli(store_url, "ls", "--first", "2")
    assert first.returncode == 0
    assert first_column(first.stdout) == [executions["waiting"], executions["failed"]]
    assert f"--after {executions['failed']}." in first.stderr
    cursor = first.stderr.split("--after ", 1)[1].split()[0]
    rest = cli(store_url, "ls", "--first", "2", "--after", cursor)
    assert first_column(rest.stdout) == [executions["done"]]
    assert "next page" not in rest.stderr


def test_ls_refuses_a_cursor_of_other_filters_or_changed(
    store_url: str, executions: dict[str, Any]
) -> None:
    first = cli(store_url, "ls", "--first", "1")
    cursor = first.stderr.split("--after ", 1)[1].split()[0]
    other = cli(store_url, "ls", "--state", "created", "--after", cursor)
    assert other.returncode == 1
    assert f"cursor '{cursor}' does not belong to these filters" in other.stderr
    for junk in ["junk", cursor[:-1], executions["done"]]:
        result = cli(store_url, "ls", "--after", junk)
        assert result.returncode == 1
        assert f"invalid cursor '{junk}'" in result.stderr
        assert "Traceback" not in result.stderr


def test_ls_refuses_an_unknown_error_code(store_url: str, executions: dict[str, Any]) -> None:
    result = cli(store_url, "ls", "--error-code", "raised", "--error-code", "crashed")
    assert result.returncode == 1
    assert "unknown error code 'crashed'" in result.stderr
    assert "worker_lost" in result.stderr  # the known ones are listed


def test_ls_refuses_bad_filters(store_url: str, executions: dict[str, Any]) -> None:
    bad_state = cli(store_url, "ls", "--state", "bogus")
    assert bad_state.returncode == 1
    assert "unknown state 'bogus'" in bad_state.stderr
    bad_metadata = cli(store_url, "ls", "--metadata", "no-equals-sign")
    assert bad_metadata.returncode != 0
    assert "key=value" in bad_metadata.stderr
    bad_first = cli(store_url, "ls", "--first", "0")
    assert bad_first.returncode != 0
    assert "--first" in bad_first.stderr


def test_ls_on_an_empty_store(app: App, store_url: str) -> None:
    app.store.migrate()
    assert ok(store_url, "ls") == ""


def test_a_mistyped_sqlite_path_is_reported_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nodir" / "deferq.sqlite3"
    result = cli(f"sqlite:///{missing}", "ls")
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert not missing.parent.exists()


def test_the_url_can_be_given_as_a_flag(store_url: str, executions: dict[str, Any]) -> None:
    result = cli(store_url, "ls", "--state", "succeeded", use_flag=True)
    assert result.returncode == 0, result.stderr
    assert first_column(result.stdout) == [executions["done"]]


def test_show(store_url: str, executions: dict[str, Any]) -> None:
    shown = json.loads(ok(store_url, "show", executions["waiting"]))
    assert shown["id"] == executions["waiting"]
    assert shown["function_name"] == job.name
    assert shown["state"] == "created"
    assert shown["metadata"] == {"flow": "sign-in", "客户": "東京"}
    assert shown["arguments"] == {"args": [2], "kwargs": {}}
    assert shown["started_at"] is None and shown["attempts"] == 0

    failed = json.loads(ok(store_url, "show", executions["failed"]))
    assert failed["state"] == "failed" and failed["attempts"] == 3
    assert failed["error_message"] == "RuntimeError: kaput"
    assert "result" not in failed and "result" not in shown

    done = json.loads(ok(store_url, "show", executions["done"]))
    assert done["state"] == "succeeded"
    assert done["result"] == deferq.get_result(executions["done"])


def test_cancel(app: App, store_url: str, executions: dict[str, Any]) -> None:
    output = ok(store_url, "cancel", executions["waiting"])
    assert output.strip() == f"{executions['waiting']} cancelled"
    assert deferq.get_execution(executions["waiting"]).state == "cancelled"

    refused = cli(store_url, "cancel", executions["done"])
    assert refused.returncode == 1
    assert f"cannot cancel execution {executions['done']}: it is succeeded" in refused.stderr
    assert deferq.get_execution(executions["done"]).state == "succeeded"


def test_cancel_force_of_a_started_execution(app: App, store_url: str) -> None:
    execution = job(5)
    worker_id = f"test-{new_execution_id()}"
    app.store.register_worker(worker_id, "test", "localhost", 0)
    app.store.claim_due_executions(worker_id, {job.name: FunctionLimits()}, 1)

    refused = cli(store_url, "cancel", execution.id)
    assert refused.returncode == 1 and "it is started" in refused.stderr
    assert ok(store_url, "cancel", "--force", execution.id).strip() == (f"{execution.id} aborting")
    assert deferq.get_execution(execution.id).state == "aborting"


def test_reschedule(app: App, store_url: str, executions: dict[str, Any]) -> None:
    waiting = executions["waiting"]
    before = app.store.now()
    output = ok(store_url, "reschedule", waiting, "2h")
    moved = deferq.get_execution(waiting)
    assert output.strip() == f"{waiting} scheduled for {moved.scheduled_for.isoformat()}"
    assert before + timedelta(hours=2) <= moved.scheduled_for
    assert moved.scheduled_for <= app.store.now() + timedelta(hours=2)

    ok(store_url, "reschedule", waiting)
    assert deferq.get_execution(waiting).scheduled_for <= app.store.now()
    assert [e.id for e in run_due()] == [waiting]


def test_reschedule_refusals(app: App, store_url: str, executions: dict[str, Any]) -> None:
    waiting = deferq.get_execution(executions["waiting"])
    bad_time = cli(store_url, "reschedule", waiting.id, "soon")
    assert bad_time.returncode == 1 and "'soon'" in bad_time.stderr
    assert deferq.get_execution(waiting.id).scheduled_for == waiting.scheduled_for

    finished = cli(store_url, "reschedule", executions["done"], "1h")
    assert finished.returncode == 1
    assert "cannot reschedule" in finished.stderr and "succeeded" in finished.stderr


def test_rerun(app: App, store_url: str, executions: dict[str, Any]) -> None:
    new_id = ok(store_url, "rerun", executions["done"]).strip()
    assert new_id != executions["done"]
    copy = deferq.get_execution(new_id)
    assert copy.function_name == job.name
    assert copy.arguments == {"args": [1], "kwargs": {}}
    assert copy.state == "created"
    assert [e.id for e in run_due()] == [new_id]
    assert deferq.get_result(new_id) == 1


def test_attempts(store_url: str, executions: dict[str, Any]) -> None:
    output = ok(store_url, "attempts", executions["failed"])
    numbered = [line for line in output.splitlines() if line.startswith("#")]
    assert [line.split()[0] for line in numbered] == ["#1", "#2", "#3"]
    for line in numbered:
        assert "failed" in line and "raised: RuntimeError: kaput" in line
    assert "Traceback (most recent call last)" in output
    assert "raise RuntimeError(message)" in output

    [succeeded] = [
        line for line in ok(store_url, "attempts", executions["done"]).splitlines() if line
    ]
    assert succeeded.startswith("#1") and "succeeded" in succeeded
    assert ok(store_url, "attempts", executions["waiting"]) == ""


@pytest.mark.parametrize(
    "command",
    [["show"], ["cancel"], ["cancel", "--force"], ["reschedule"], ["rerun"], ["attempts"]],
    ids=lambda c: "-".join(c),
)
def test_an_unknown_id_is_an_error(
    store_url: str, executions: dict[str, Any], command: list[str]
) -> None:
    unknown = new_execution_id()
    result = cli(store_url, *command, unknown)
    assert result.returncode == 1
    assert f"no execution with id '{unknown}'" in result.stderr
    assert result.stdout == ""
    assert len(deferq.list_executions().items) == 3


@pytest.mark.parametrize(
    ("flags", "named", "quoted"),
    [
        (["--heartbeat-interval", "0"], "--heartbeat-interval", "'0s'"),
        (["--heartbeat-interval", "1ms"], "--heartbeat-interval", "'1ms'"),
        (["--poll-interval", "0s"], "--poll-interval", "'0s'"),
        (["--poll-interval", "0.001"], "--poll-interval", "'1ms'"),
        (["--heartbeat-interval", "5s", "--lost-after", "10s"], "--lost-after", "'10s'"),
        (["--heartbeat-interval", "1s", "--lost-after", "2001ms"], "--lost-after", "'2s1ms'"),
        (["--heartbeat-interval", "1s", "--lost-after", "3s"], "--lost-after", "'3s'"),
        (["--heartbeat-interval", "20s"], "--lost-after", "'15s'"),
    ],
)
def test_worker_refuses_intervals_that_spin_or_lose_live_workers(
    store_url: str, flags: list[str], named: str, quoted: str
) -> None:
    result = cli(store_url, "worker", "tests.tasks.basic", *flags)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and quoted in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_refuses_intervals_from_the_environment(store_url: str) -> None:
    env = {**os.environ, "DEFERQ_URL": store_url, "DEFERQ_POLL_INTERVAL": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    result = subprocess.run(
        [sys.executable, "-m", "deferq.cli", "worker", "tests.tasks.basic"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--poll-interval" in result.stderr and "'0s' is too short" in result.stderr


def test_a_malformed_id_is_not_found(store_url: str, executions: dict[str, Any]) -> None:
    for command in (["show"], ["cancel"], ["attempts"]):
        result = cli(store_url, *command, "not-an-id")
        assert result.returncode == 1
        assert "no execution with id 'not-an-id'" in result.stderr


def test_worker_refuses_a_module_it_cannot_import(app: App, store_url: str) -> None:
    result = cli(store_url, "worker", "tests.tasks.no_such_module")
    assert result.returncode == 1
    assert "tests.tasks.no_such_module" in result.stderr
