"""The public API: declaring background functions, calling them, per-call options, what is
refused at call time, and managing executions (get, result, await, cancel, reschedule, rerun).

Functions here run in-process through `deferq.testing.run_due`, except where a real worker
process is the point (`await_result`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import deferq
from deferq import (
    BackgroundFunction,
    DeferqError,
    ExecutionFailed,
    ExecutionNotCancellable,
    ExecutionNotFound,
    ExecutionNotReschedulable,
    ResultNotReady,
    ResultTimeout,
    RetryPolicy,
    add_metadata,
    assign_options,
    defer,
    delay,
    discard_after,
)
from deferq.app import App
from deferq.functions import CallOptions, registry
from deferq.ids import new_execution_id
from deferq.models import Execution
from deferq.serialization import MAX_ARGUMENTS_BYTES, MAX_RESULT_BYTES
from deferq.testing import run_due
from tests.support import WorkerProcess, wait_until
from tests.tasks import basic, lifecycle

CALLS: list[str] = []
"""What `greet` was called with, in this process."""


@defer
def greet(name: str) -> str:
    CALLS.append(name)
    return f"hello {name}"


@defer(retry=3, concurrency=2, max_duration="10min", max_concurrency_action="cancel")
async def resize(url: str, width: int = 640) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"url": url, "width": width}


class Images:
    @defer
    def thumbnail(path: str) -> str:
        return path


@defer
def echo_both(value: Any, note: str = "") -> list[Any]:
    return [value, note]


@defer
def returns_set() -> Any:
    return {1, 2}


@defer(retry=3)
def returns_tuple_with_retry() -> Any:
    return (1, 2)


@defer
def returns_none() -> None:
    return None


@defer
def returns_text(size: int) -> str:
    return "x" * size


@defer
def raises(message: str) -> None:
    raise ValueError(message)


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    CALLS.clear()


def stored() -> list[Execution]:
    """Every execution in the store, newest first."""
    return deferq.list_executions(first=1000).items


def near(value: datetime | None, expected: datetime, within: float = 2.0) -> bool:
    assert value is not None
    return abs(value - expected) <= timedelta(seconds=within)


def is_utc(value: datetime | None) -> bool:
    return value is not None and value.utcoffset() == timedelta(0)


def test_errors_derive_from_deferq_error() -> None:
    exported = [getattr(deferq, name) for name in deferq.__all__]
    errors = [e for e in exported if isinstance(e, type) and issubclass(e, Exception)]
    assert len(errors) >= 9
    for error in errors:
        assert issubclass(error, DeferqError), error
    assert issubclass(ResultTimeout, TimeoutError)


# Declaring


def test_bare_decorator_keeps_the_function_and_its_defaults() -> None:
    assert isinstance(greet, BackgroundFunction)
    assert greet.name == f"{__name__}.greet"
    assert registry[greet.name] is greet
    assert greet.__name__ == "greet"
    assert greet.__wrapped__("ada") == "hello ada"
    assert CALLS == ["ada"]
    assert not greet.is_async
    assert greet.options.retry.max_retries == 0
    assert greet.options.concurrency is None
    assert greet.options.max_concurrency_action == "keep"
    assert greet.options.max_duration == timedelta(minutes=30)


def test_decorator_with_options_on_an_async_function() -> None:
    assert resize.name == f"{__name__}.resize"
    assert resize.is_async
    assert resize.options.retry.max_retries == 3
    assert resize.options.concurrency == 2
    assert resize.options.max_concurrency_action == "cancel"
    assert resize.options.max_duration == timedelta(minutes=10)
    assert asyncio.run(resize.__wrapped__("u", width=10)) == {"url": "u", "width": 10}


def test_name_is_module_and_qualname() -> None:
    assert Images.thumbnail.name == f"{__name__}.Images.thumbnail"
    assert basic.add.name == "tests.tasks.basic.add"
    assert registry["tests.tasks.basic.add"] is basic.add


@pytest.mark.parametrize(
    ("options", "error", "quoted"),
    [
        ({"concurrency": 0}, ValueError, "concurrency must be a positive integer or None, not 0"),
        ({"concurrency": -3}, ValueError, "concurrency"),
        ({"concurrency": 1.5}, ValueError, "1.5"),
        ({"concurrency": True}, ValueError, "True"),
        ({"max_concurrency_action": "drop"}, ValueError, "max_concurrency_action"),
        ({"max_concurrency_action": "drop"}, ValueError, "'drop'"),
        ({"retry": "yes"}, TypeError, "'yes'"),
        ({"retry": -2}, ValueError, "-2"),
        ({"retry": 1.5}, TypeError, "1.5"),
        ({"retry": RetryPolicy}, TypeError, "retry"),
        ({"max_duration": "10 parsecs"}, ValueError, "'10 parsecs'"),
        ({"max_duration": "10 parsecs"}, ValueError, "max_duration"),
        ({"max_duration": 0}, ValueError, "max_duration"),
        ({"max_duration": -5}, ValueError, "-5"),
        ({"max_duration": ""}, ValueError, "max_duration"),
    ],
)
def test_bad_function_options_are_refused_naming_the_input(
    options: dict[str, Any], error: type[Exception], quoted: str
) -> None:
    with pytest.raises(error) as info:

        @defer(**options)
        def refused() -> None: ...

    assert quoted in str(info.value)
    assert not any(name.endswith(".refused") for name in registry)


# Calling


def test_calling_stores_an_execution_without_running_it(app: App) -> None:
    before = app.store.now()
    execution = greet("ada")

    assert CALLS == []
    assert execution.state == "created"
    assert execution.function_name == greet.name
    assert execution.attempts == 0
    stored_one = deferq.get_execution(execution.id)
    assert stored_one.state == deferq.ExecutionState.CREATED
    assert stored_one.arguments == {"args": ["ada"], "kwargs": {}}
    assert stored_one.metadata == {}
    assert stored_one.started_at is None and stored_one.finished_at is None
    assert stored_one.discard_after is None
    assert is_utc(stored_one.created_at) and is_utc(stored_one.scheduled_for)
    assert near(stored_one.created_at, before)
    assert stored_one.scheduled_for <= app.store.now()

    [ran] = run_due()
    assert ran.id == execution.id and ran.state == "succeeded"
    assert CALLS == ["ada"]
    assert deferq.get_result(execution.id) == "hello ada"


def test_call_async_stores_an_execution(app: App) -> None:
    execution = asyncio.run(greet.call_async("grace"))
    assert deferq.get_execution(execution.id).state == "created"
    run_due()
    assert deferq.get_result(execution.id) == "hello grace"


def test_keyword_arguments_and_defaults_reach_the_function(app: App) -> None:
    execution = resize("https://example.com/a.png", width=320)
    default_width = resize("https://example.com/b.png")
    run_due()
    assert deferq.get_result(execution.id) == {"url": "https://example.com/a.png", "width": 320}
    assert deferq.get_result(default_width.id)["width"] == 640


# Per-call options


def test_wrappers_return_new_callables_and_leave_the_original_unchanged(app: App) -> None:
    later = delay(greet, "1h")
    expiring = discard_after(greet, "2h")
    tagged = add_metadata(greet, {"user_id": "42"})
    both = assign_options(greet, delay="1h", discard_after="2h", metadata={"flow": "x"})

    for wrapped in (later, expiring, tagged, both):
        assert isinstance(wrapped, BackgroundFunction)
        assert wrapped is not greet
        assert wrapped.name == greet.name
        assert wrapped.__wrapped__ is greet.__wrapped__
    assert greet.call_options == CallOptions()

    # Wrapping a wrapper keeps what it had and leaves it alone too.
    later_tagged = add_metadata(later, {"user_id": "7"})
    assert later.call_options.metadata == {}
    assert later_tagged.call_options.delay == timedelta(hours=1)

    plain = deferq.get_execution(greet("a").id)
    assert plain.scheduled_for <= app.store.now()
    assert plain.discard_after is None and plain.metadata == {}

    delayed = deferq.get_execution(later("b").id)
    assert near(delayed.scheduled_for, delayed.created_at + timedelta(hours=1))
    assert delayed.metadata == {}

    expires = deferq.get_execution(expiring("c").id)
    assert expires.scheduled_for <= app.store.now()
    assert expires.discard_after is not None
    assert near(expires.discard_after, expires.created_at + timedelta(hours=2))

    with_metadata = deferq.get_execution(tagged("d").id)
    assert with_metadata.metadata == {"user_id": "42"}

    combined = deferq.get_execution(both("e").id)
    assert near(combined.scheduled_for, combined.created_at + timedelta(hours=1))
    assert combined.discard_after is not None
    assert near(combined.discard_after, combined.created_at + timedelta(hours=2))
    assert combined.metadata == {"flow": "x"}

    chained = deferq.get_execution(later_tagged("f").id)
    assert chained.metadata == {"user_id": "7"}
    assert near(chained.scheduled_for, chained.created_at + timedelta(hours=1))

    # Only the undelayed ones are due.
    assert {e.id for e in run_due()} == {plain.id, expires.id, with_metadata.id}


def test_wrappers_take_only_background_functions() -> None:
    def plain() -> None: ...

    with pytest.raises(TypeError, match="decorated with @defer"):
        delay(plain, "1h")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decorated with @defer"):
        add_metadata(plain, {"k": "v"})  # type: ignore[arg-type]


def test_durations_are_counted_from_the_call_not_from_the_wrapping(app: App) -> None:
    later = delay(greet, "1h")
    expiring = discard_after(greet, "2h")
    wrapped_at = app.store.now()
    gap = timedelta(milliseconds=200)
    wait_until(lambda: app.store.now() >= wrapped_at + gap, timeout=10, what="the clock")

    delayed = deferq.get_execution(later("a").id)
    assert delayed.scheduled_for >= wrapped_at + timedelta(hours=1) + gap
    assert near(delayed.scheduled_for, delayed.created_at + timedelta(hours=1), within=0.1)

    expires = deferq.get_execution(expiring("b").id)
    assert expires.discard_after is not None
    assert expires.discard_after >= wrapped_at + timedelta(hours=2) + gap


@pytest.mark.parametrize(
    ("spelled", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5min", timedelta(minutes=5)),
        ("1h30m", timedelta(minutes=90)),
        ("2 days", timedelta(days=2)),
        ("1.5h", timedelta(minutes=90)),
        ("1w", timedelta(weeks=1)),
        ("3 Hours", timedelta(hours=3)),
        (45, timedelta(seconds=45)),
        (timedelta(minutes=3), timedelta(minutes=3)),
    ],
)
def test_delay_spellings(app: App, spelled: Any, expected: timedelta) -> None:
    execution = deferq.get_execution(delay(greet, spelled)("x").id)
    assert near(execution.scheduled_for, execution.created_at + expected, within=0.5)


def test_delay_until_an_aware_datetime_in_any_zone(app: App) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    when = (app.store.now() + timedelta(hours=3)).astimezone(india)
    execution = deferq.get_execution(delay(greet, when)("x").id)
    assert execution.scheduled_for == when
    assert is_utc(execution.scheduled_for)
    assert run_due() == []


def test_an_explicit_zero_delay_is_honoured(app: App) -> None:
    later = delay(greet, "1h")
    now_again = delay(later, 0)
    assert now_again.call_options.delay == timedelta(0)
    reset = assign_options(later, delay=0)
    assert reset.call_options.delay == timedelta(0)
    cleared = assign_options(later, delay=None)
    assert cleared.call_options.delay is None

    still_later = later("later")
    due = [now_again("now"), reset("reset"), cleared("cleared")]

    assert {e.id for e in run_due()} == {e.id for e in due}
    assert deferq.get_execution(still_later.id).state == "created"
    assert sorted(CALLS) == ["cleared", "now", "reset"]


@pytest.mark.parametrize(
    ("start", "deadline"),
    [
        ("2h", "1h"),
        ("1h", "1h"),
        ("1h", 0),
        (timedelta(hours=1), timedelta(minutes=59)),
        ("aware:+60", "aware:+30"),
        (None, "aware:-5"),
    ],
)
def test_discard_after_not_after_the_start_is_refused(app: App, start: Any, deadline: Any) -> None:
    def when(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("aware:"):
            return app.store.now() + timedelta(minutes=int(value[6:]))
        return value

    wrapped = assign_options(greet, delay=when(start), discard_after=when(deadline))
    with pytest.raises(ValueError, match="discard_after"):
        wrapped("never")
    assert stored() == []


def test_a_naive_datetime_is_refused(app: App) -> None:
    naive = datetime.now() + timedelta(hours=1)  # naive on purpose
    with pytest.raises(ValueError, match="naive") as info:
        delay(greet, naive)
    assert "delay" in str(info.value)
    with pytest.raises(ValueError, match="discard_after"):
        discard_after(greet, naive)
    with pytest.raises(ValueError, match="naive"):
        assign_options(greet, delay=naive)

    execution = delay(greet, "1h")("x")
    with pytest.raises(ValueError, match="naive"):
        deferq.reschedule_execution(execution.id, naive)
    assert deferq.get_execution(execution.id).scheduled_for == execution.scheduled_for
    assert [e.id for e in stored()] == [execution.id]


@pytest.mark.parametrize("bad", ["soon", "", "-5s", -1, "5 fortnights", "1h 1h", float("nan")])
def test_bad_durations_are_refused_quoting_the_input(app: App, bad: Any) -> None:
    with pytest.raises(ValueError) as info:
        delay(greet, bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError):
        assign_options(greet, discard_after=bad)
    assert stored() == []


def test_a_later_metadata_replaces_an_earlier_one(app: App) -> None:
    twice = add_metadata(add_metadata(greet, {"a": "1", "b": "1"}), {"b": "2"})
    execution = twice("x")
    assert deferq.get_execution(execution.id).metadata == {"b": "2"}
    assert deferq.list_executions(metadata={"a": ["1"]}).items == []
    assert [e.id for e in deferq.list_executions(metadata={"b": ["2"]}).items] == [execution.id]


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ({"k": "line\nbreak"}, ValueError),
        ({"k": "nul\x00"}, ValueError),
        ({"": "empty key"}, ValueError),
        ({"k": ""}, ValueError),
        ({"k": "v" * 257}, ValueError),
        ({f"k{i}": "v" for i in range(26)}, ValueError),
        ({"k": 1}, TypeError),
        (["k", "v"], TypeError),
    ],
)
def test_bad_metadata_is_refused(app: App, metadata: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="metadata"):
        add_metadata(greet, metadata)
    with pytest.raises(error, match="metadata"):
        assign_options(greet, metadata=metadata)
    assert stored() == []


# What JSON cannot carry exactly is refused at call time


def _lambda() -> Any:
    return lambda: 1


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "fragment"),
    [
        (({1, 2},), {}, TypeError, "set at args[0]"),
        ((object(),), {}, TypeError, "object at args[0]"),
        ((_lambda(),), {}, TypeError, "function at args[0]"),
        (((1, 2),), {}, TypeError, "tuple at args[0]"),
        (({"deep": [{"tags": {"a"}}]},), {}, TypeError, "set at args[0]"),
        ((), {"value": {"a"}}, TypeError, "set at value"),
        (("a\x00b",), {}, ValueError, "NUL"),
        (("\ud800",), {}, ValueError, "lone surrogate"),
        ((["ok", "x\udfff"],), {}, ValueError, "lone surrogate"),
        ((float("nan"),), {}, ValueError, "nan"),
        (("x" * (MAX_ARGUMENTS_BYTES + 1),), {}, ValueError, "limit"),
        # Under the limit in characters, over it in UTF-8 bytes.
        (("é" * (MAX_ARGUMENTS_BYTES // 2 + 1),), {}, ValueError, "limit"),
    ],
)
def test_values_json_cannot_carry_are_refused_and_nothing_is_stored(
    app: App, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as info:
        echo_both(*args, **kwargs)
    assert fragment in str(info.value)
    assert echo_both.name in str(info.value)
    with pytest.raises(error):
        asyncio.run(echo_both.call_async(*args, **kwargs))
    with pytest.raises(error):
        echo_both.enqueue_many([("fine",), (args, kwargs) if kwargs else args])
    assert stored() == []


def test_arguments_just_under_the_size_limit_are_stored_and_run(app: App) -> None:
    text = "x" * (MAX_ARGUMENTS_BYTES - 100)
    execution = echo_both(text)
    run_due()
    assert deferq.get_result(execution.id) == [text, ""]


def test_unicode_survives_arguments_result_and_metadata(app: App) -> None:
    value = {
        "emoji": "🎉👩‍💻🇯🇵",
        "cjk": "漢字かなカナ한국어",
        "rtl": "مرحبا بالعالم שלום",
        "marks": ["\u200f", "e\u0301", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"],
        "ключ 🔑": "значение",
    }
    metadata = {"客户": "東京", "emoji": "🎉", "rtl": "שלום"}
    execution = add_metadata(echo_both, metadata)(value, note="ünïcødé ✓")

    [ran] = run_due()
    assert ran.state == "succeeded"
    assert deferq.get_result(execution.id) == [value, "ünïcødé ✓"]
    stored_one = deferq.get_execution(execution.id)
    assert stored_one.arguments == {"args": [value], "kwargs": {"note": "ünïcødé ✓"}}
    assert stored_one.metadata == metadata
    for key, wanted in metadata.items():
        found = deferq.list_executions(metadata={key: [wanted]}).items
        assert [e.id for e in found] == [execution.id]


def test_a_result_json_cannot_carry_fails_with_result_not_json(app: App) -> None:
    execution = returns_set()
    [ran] = run_due()
    assert ran.state == "failed"
    assert ran.error_code == "result_not_json"
    with pytest.raises(ExecutionFailed) as info:
        deferq.get_result(execution.id)
    assert info.value.error_code == "result_not_json"
    assert "set" in (info.value.error_message or "")
    [attempt] = deferq.list_attempts(execution.id)
    assert attempt.outcome == "failed" and attempt.error_code == "result_not_json"


def test_result_not_json_is_not_retried(app: App) -> None:
    execution = returns_tuple_with_retry()
    run_due(include_scheduled=True)
    failed = deferq.get_execution(execution.id)
    assert failed.state == "failed" and failed.error_code == "result_not_json"
    assert failed.attempts == 1


def test_a_result_over_the_size_limit_fails(app: App) -> None:
    execution = returns_text(MAX_RESULT_BYTES + 1)
    [ran] = run_due()
    assert ran.id == execution.id
    assert ran.state == "failed"
    assert f"{MAX_RESULT_BYTES:,}" in (ran.error_message or "")


# Reading executions and results


@pytest.mark.parametrize("unknown", [new_execution_id(), "no-such-id"])
def test_unknown_ids_raise_execution_not_found(app: App, unknown: str) -> None:
    greet("someone")
    calls = [
        deferq.get_execution,
        deferq.get_result,
        deferq.cancel_execution,
        deferq.reschedule_execution,
        deferq.rerun_execution,
        deferq.list_attempts,
    ]
    for call in calls:
        with pytest.raises(ExecutionNotFound) as info:
            call(unknown)
        assert unknown in str(info.value)
        assert isinstance(info.value, DeferqError)
    assert len(stored()) == 1


def test_get_result_in_every_state(app: App) -> None:
    waiting = greet("waiting")
    with pytest.raises(ResultNotReady, match="created"):
        deferq.get_result(waiting.id)

    nothing = returns_none()
    failing = raises("bad input")
    cancelled = delay(greet, "1h")("cancelled")
    deferq.cancel_execution(cancelled.id)
    run_due()

    assert deferq.get_result(waiting.id) == "hello waiting"
    assert deferq.get_result(nothing.id) is None
    with pytest.raises(ExecutionFailed) as info:
        deferq.get_result(failing.id)
    assert info.value.error_code == "raised"
    assert "ValueError: bad input" in (info.value.error_message or "")
    assert info.value.execution.state == "failed"
    with pytest.raises(ExecutionFailed) as info:
        deferq.get_result(cancelled.id)
    assert info.value.execution.state == "cancelled"


def test_await_result_against_a_worker(app: App, store_url: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with WorkerProcess(store_url, ["tests.tasks.basic"], "--slots", "2", log_path=log):
        assert deferq.await_result(basic.add, timeout=60)(2, 3) == 5
        assert asyncio.run(deferq.await_result_async(basic.add_async, timeout=60)(4, 5)) == 9
        assert deferq.await_result(basic.echo, timeout=60)({"k": ["v", 1]}) == {"k": ["v", 1]}

        # Retries included: always_fails has two immediate retries.
        with pytest.raises(ExecutionFailed) as info:
            deferq.await_result(basic.always_fails, timeout=60)("boom")
        assert info.value.error_code == "raised"
        assert info.value.execution.attempts == 3
        assert "RuntimeError: boom" in (info.value.error_message or "")


def test_await_result_times_out_while_a_worker_runs_it(
    app: App, store_url: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate.txt"
    modules = ["tests.tasks.lifecycle"]
    with WorkerProcess(store_url, modules, "--slots", "2", log_path=tmp_path / "worker.log"):
        with pytest.raises(ResultTimeout) as info:
            deferq.await_result(lifecycle.wait_for_file, timeout=0.5)(str(gate))
        running = info.value.execution
        assert running.state in ("created", "started")

        async def wait_async() -> Any:
            return await deferq.await_result_async(lifecycle.wait_for_file, timeout=0.5)(str(gate))

        with pytest.raises(ResultTimeout) as info:
            asyncio.run(wait_async())
        assert info.value.execution.state in ("created", "started")

        # Timing out stops only the waiting: the executions still run to their end.
        gate.write_text("opened", encoding="utf-8")
        for execution_id in (running.id, info.value.execution.id):
            wait_until(
                lambda i=execution_id: deferq.get_execution(i).state == "succeeded",
                timeout=60,
                what="the execution to succeed",
            )
            assert deferq.get_result(execution_id) == "opened"


def test_await_result_times_out_without_a_worker(app: App) -> None:
    with pytest.raises(ResultTimeout) as info:
        deferq.await_result(basic.add, timeout=0.3)(1, 2)
    assert isinstance(info.value, TimeoutError)
    assert info.value.execution.state == "created"
    [waiting] = stored()
    assert waiting.id == info.value.execution.id and waiting.state == "created"


def test_await_result_async_times_out_without_blocking_the_loop(app: App) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> None:
        ticker = asyncio.create_task(tick())
        try:
            with pytest.raises(ResultTimeout):
                await deferq.await_result_async(basic.add, timeout=0.5)(1, 2)
        finally:
            ticker.cancel()

    asyncio.run(main())
    assert ticks >= 3  # the loop kept running while the result was awaited
    assert [e.state for e in stored()] == ["created"]


# Cancel, reschedule, rerun


def test_cancel_a_created_execution(app: App) -> None:
    execution = delay(greet, "1h")("never")
    cancelled = deferq.cancel_execution(execution.id)
    assert cancelled.state == "cancelled"
    stored_one = deferq.get_execution(execution.id)
    assert stored_one.state == "cancelled"
    assert stored_one.finished_at is not None and is_utc(stored_one.finished_at)
    assert run_due(include_scheduled=True) == []
    assert CALLS == []
    assert deferq.list_attempts(execution.id) == []


@pytest.mark.parametrize("force", [False, True])
def test_cancel_a_finished_execution_is_refused(app: App, force: bool) -> None:
    done = greet("done")
    failed = raises("bad")
    run_due()
    for execution, state in ((done, "succeeded"), (failed, "failed")):
        with pytest.raises(ExecutionNotCancellable, match=state):
            deferq.cancel_execution(execution.id, force=force)
        assert deferq.get_execution(execution.id).state == state


def test_reschedule_a_created_execution(app: App) -> None:
    execution = assign_options(greet, delay="1h", discard_after="3h")("x")
    before = app.store.now()
    moved = deferq.reschedule_execution(execution.id, "2h")
    stored_one = deferq.get_execution(execution.id)
    assert stored_one.scheduled_for == moved.scheduled_for
    assert before + timedelta(hours=2) <= stored_one.scheduled_for
    assert near(stored_one.scheduled_for, before + timedelta(hours=2))
    assert stored_one.discard_after == execution.discard_after
    assert stored_one.state == "created"

    when = datetime(2100, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert deferq.reschedule_execution(execution.id, when).scheduled_for == when
    assert deferq.get_execution(execution.id).scheduled_for == when
    assert run_due() == []

    deferq.reschedule_execution(execution.id)  # now
    assert deferq.get_execution(execution.id).scheduled_for <= app.store.now()
    assert deferq.get_execution(execution.id).discard_after == execution.discard_after
    assert [e.id for e in run_due()] == [execution.id]
    assert CALLS == ["x"]


def test_reschedule_refuses_bad_times_and_executions_not_created(app: App) -> None:
    waiting = delay(greet, "1h")("waiting")
    with pytest.raises(ValueError, match="'later'"):
        deferq.reschedule_execution(waiting.id, "later")
    assert deferq.get_execution(waiting.id).scheduled_for == waiting.scheduled_for

    done = greet("done")
    cancelled = delay(greet, "1h")("cancelled")
    deferq.cancel_execution(cancelled.id)
    run_due()
    for execution, state in ((done, "succeeded"), (cancelled, "cancelled")):
        with pytest.raises(ExecutionNotReschedulable, match=state):
            deferq.reschedule_execution(execution.id, "5min")
        assert deferq.get_execution(execution.id).state == state


def test_rerun_makes_a_new_execution_due_now(app: App) -> None:
    original = add_metadata(delay(echo_both, "1h"), {"user_id": "42", "流れ": "登録"})(
        {"n": 1}, note="again"
    )
    copy = deferq.rerun_execution(original.id)

    assert copy.id != original.id
    stored_copy = deferq.get_execution(copy.id)
    assert stored_copy.function_name == original.function_name
    assert stored_copy.arguments == {"args": [{"n": 1}], "kwargs": {"note": "again"}}
    assert stored_copy.metadata == {"user_id": "42", "流れ": "登録"}
    assert stored_copy.state == "created"
    assert stored_copy.scheduled_for <= app.store.now()

    assert [e.id for e in run_due()] == [copy.id]
    assert deferq.get_result(copy.id) == [{"n": 1}, "again"]
    assert deferq.get_execution(original.id).state == "created"


def test_rerun_a_failed_execution(app: App) -> None:
    failed = raises("first")
    run_due()
    copy = deferq.rerun_execution(failed.id)
    [ran] = run_due()
    assert ran.id == copy.id and ran.state == "failed" and ran.attempts == 1
    assert deferq.get_execution(failed.id).state == "failed"
    assert deferq.get_execution(failed.id).attempts == 1
    assert {e.id for e in stored()} == {failed.id, copy.id}


def test_a_call_the_function_cannot_accept_is_refused_and_nothing_stored(app: App) -> None:
    from tests.tasks import basic

    with pytest.raises(TypeError, match=r"cannot call tests\.tasks\.basic\.add: .*positional"):
        basic.add(1, 2, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        basic.add(1, 2, c=3)
    with pytest.raises(TypeError, match="missing a required argument"):
        basic.add(1)
    assert list(deferq.list_executions()) == []


# The longest duration (100 years): refused beyond it, at call time, with nothing stored


@defer(
    retry=RetryPolicy(
        3,
        initial_interval="36525d",
        max_interval="36525d",
        multiplier=1e300,
        randomization_factor=0,
    )
)
def fails_with_the_longest_backoff() -> None:
    raise RuntimeError("again")


@pytest.mark.parametrize(
    ("wrap", "quoted"),
    [
        (lambda: delay(greet, "999999w"), "invalid delay '999999w'"),
        (lambda: delay(greet, timedelta.max), "invalid delay datetime.timedelta(days=999999999"),
        (lambda: discard_after(greet, "36526d"), "invalid discard_after '36526d'"),
        (lambda: assign_options(greet, delay=10**12), "invalid delay 1000000000000"),
        (
            lambda: delay(greet, datetime(9999, 12, 31, tzinfo=UTC)),
            "invalid delay '9999-12-31T00:00:00+00:00'",
        ),
        (
            lambda: discard_after(greet, datetime.now(UTC) + timedelta(days=36_600)),
            "invalid discard_after '2",
        ),
    ],
)
def test_times_over_100_years_ahead_are_refused_and_nothing_stored(
    app: App, wrap: Any, quoted: str
) -> None:
    with pytest.raises(ValueError) as info:
        wrap()("x")
    assert str(info.value).startswith(quoted)
    assert "100 years" in str(info.value)
    assert stored() == []


def test_the_longest_delay_is_stored_and_read_back(app: App) -> None:
    execution = delay(greet, "36525d")("x")
    expected = execution.created_at + timedelta(days=36_525)
    assert deferq.get_execution(execution.id).scheduled_for == expected
    assert [e.id for e in deferq.list_executions().items] == [execution.id]


@pytest.mark.parametrize("when", ["999999w", timedelta(days=40_000), 10**20])
def test_a_reschedule_over_100_years_ahead_is_refused(app: App, when: Any) -> None:
    waiting = delay(greet, "1h")("x")
    with pytest.raises(ValueError, match="100 years"):
        deferq.reschedule_execution(waiting.id, when)
    assert deferq.get_execution(waiting.id).scheduled_for == waiting.scheduled_for
    assert [e.id for e in deferq.list_executions().items] == [waiting.id]


def test_a_max_duration_over_100_years_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid max_duration '36526d'"):
        defer(max_duration="36526d")(greet.__wrapped__)


def test_a_retry_with_the_longest_backoff_is_stored_and_readable(app: App) -> None:
    execution = fails_with_the_longest_backoff()
    assert [e.id for e in run_due()] == [execution.id]
    retried = deferq.get_execution(execution.id)
    assert retried.state == "created" and retried.attempts == 1
    wait = retried.scheduled_for - datetime.now(UTC)
    assert timedelta(days=36_524) < wait <= timedelta(days=36_525)
    assert [e.id for e in deferq.list_executions(states=["created"]).items] == [execution.id]


# Malformed ids name no execution, on every store alike


@pytest.mark.parametrize(
    "malformed",
    [
        "ab\x00c",
        "\x00",
        "\ud800",
        "x" * 10_000,
        new_execution_id() + "\x00",
        " " + new_execution_id(),
    ],
)
def test_malformed_ids_are_not_found(app: App, malformed: str) -> None:
    greet("someone")
    for call in (
        deferq.get_execution,
        deferq.get_result,
        deferq.cancel_execution,
        deferq.reschedule_execution,
        deferq.rerun_execution,
        deferq.list_attempts,
        lambda i: app.wait_for_result(i, timeout=0.1),
    ):
        with pytest.raises(ExecutionNotFound) as info:
            call(malformed)
        assert info.value.execution_id == malformed
    with pytest.raises(ExecutionNotFound):
        asyncio.run(app.wait_for_result_async(malformed, timeout=0.1))
    assert len(stored()) == 1


# Arguments too large to write as text


def test_an_overlong_int_argument_is_refused_naming_it(app: App) -> None:
    with pytest.raises(ValueError) as info:
        echo_both([1, 10**5000])
    assert str(info.value).startswith(
        "cannot store argument 'value' (positional argument 0) of tests.test_api.echo_both: "
        "int of about 5,000 digits at args[0][1]"
    )
    assert stored() == []


@pytest.mark.parametrize(
    ("metadata", "error", "fragment"),
    [
        ({"k": None}, TypeError, "metadata value None of key 'k' must be a str"),
        ({"k": 42}, TypeError, "metadata value 42 of key 'k' must be a str"),
        ({"k": ["v"]}, TypeError, "of key 'k' must be a str"),
        ({7: "v"}, TypeError, "metadata key 7 must be a str"),
        ({None: "v"}, TypeError, "metadata key None must be a str"),
    ],
)
def test_metadata_of_other_types_is_refused_naming_the_key(
    app: App, metadata: Any, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as info:
        add_metadata(greet, metadata)
    assert fragment in str(info.value)
    assert stored() == []
