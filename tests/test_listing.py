"""`list_executions`: every filter, how they combine, cursor pagination newest first, and the
errors for arguments it cannot serve."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import deferq
from deferq import ExecutionState, add_metadata, defer, delay
from deferq.app import App
from deferq.models import Execution
from deferq.testing import run_due


@defer
def job(n: int) -> int:
    return n


@defer
def other_job(n: int) -> int:
    return -n


@defer
def broken() -> None:
    raise KeyError("missing")


@defer
def returns_set() -> Any:
    return {1}


def ids(items: list[Execution]) -> list[str]:
    return [e.id for e in items]


def listed(**filters: Any) -> list[str]:
    """Ids of every execution the filters match, newest first (one page)."""
    return ids(deferq.list_executions(first=1000, **filters).items)


def all_pages(page_size: int, **filters: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = deferq.list_executions(first=page_size, after=cursor, **filters)
        pages.append(ids(page.items))
        if page.next_cursor is None:
            return pages
        assert page.next_cursor.startswith(page.items[-1].id + ".")
        cursor = page.next_cursor
        assert len(pages) < 1000, "pagination does not end"


def test_newest_first(app: App) -> None:
    made = [job(n).id for n in range(5)]
    page = deferq.list_executions()
    assert ids(page.items) == made[::-1]
    assert page.next_cursor is None
    assert [e.arguments["args"] for e in page.items] == [[n] for n in reversed(range(5))]


def test_filter_by_state(app: App) -> None:
    succeeded = job(1).id
    failed = broken().id
    cancelled = delay(job, "1h")(2).id
    deferq.cancel_execution(cancelled)
    run_due()
    waiting = delay(job, "1h")(3).id

    assert listed(states=["succeeded"]) == [succeeded]
    assert listed(states=["failed"]) == [failed]
    assert listed(states="failed") == [failed]
    assert listed(states=[ExecutionState.CANCELLED]) == [cancelled]
    assert listed(states=["created", "cancelled"]) == [waiting, cancelled]
    assert listed(states=["started", "aborting", "aborted", "discarded"]) == []
    assert listed(states=[]) == []
    assert listed() == [waiting, cancelled, failed, succeeded]


def test_filter_by_function(app: App) -> None:
    first = job(1).id
    second = other_job(2).id
    third = job(3).id

    assert listed(functions=[job]) == [third, first]
    assert listed(functions=[other_job.name]) == [second]
    assert listed(functions=other_job.name) == [second]
    assert listed(functions=[job, other_job]) == [third, second, first]
    assert listed(functions=["tests.no_such_module.job"]) == []
    assert listed(functions=[]) == []


def test_filter_by_error_code(app: App) -> None:
    raised = broken().id
    not_json = returns_set().id
    fine = job(1).id
    run_due()

    assert listed(error_codes=["raised"]) == [raised]
    assert listed(error_codes=["result_not_json"]) == [not_json]
    assert listed(error_codes=["raised", "result_not_json"]) == [not_json, raised]
    assert listed(error_codes=["timeout"]) == []
    assert fine not in listed(error_codes=["raised", "result_not_json", "timeout"])


def test_filter_by_metadata_and_across_keys_or_within_a_key(app: App) -> None:
    def tagged(metadata: dict[str, str]) -> str:
        return add_metadata(job, metadata)(0).id

    in_1 = tagged({"flow": "sign-in", "user": "1"})
    up_1 = tagged({"flow": "sign-up", "user": "1"})
    in_2 = tagged({"flow": "sign-in", "user": "2"})
    reset = tagged({"flow": "reset"})
    untagged = job(0).id

    assert listed(metadata={"flow": ["sign-in"]}) == [in_2, in_1]
    assert listed(metadata={"flow": ["sign-in", "sign-up"]}) == [in_2, up_1, in_1]
    assert listed(metadata={"flow": ["sign-in"], "user": ["1"]}) == [in_1]
    assert listed(metadata={"flow": ["sign-in", "sign-up"], "user": ["1"]}) == [up_1, in_1]
    assert listed(metadata={"flow": ["reset"], "user": ["1"]}) == []
    assert listed(metadata={"user": "2"}) == [in_2]
    assert listed(metadata={"flow": ["reset"]}) == [reset]
    assert untagged in listed(metadata={})

    # Exact matches only: no prefixes, no other case, no value found under another key.
    assert listed(metadata={"flow": ["sign"]}) == []
    assert listed(metadata={"flow": ["Sign-in"]}) == []
    assert listed(metadata={"user": ["sign-in"]}) == []
    assert listed(metadata={"missing": ["1"]}) == []
    assert listed(metadata={"flow": []}) == []

    # Combined with other filters.
    deferq.cancel_execution(in_1)
    assert listed(metadata={"user": ["1"]}, states=["created"]) == [up_1]
    assert listed(metadata={"user": ["1"]}, functions=[other_job]) == []


def test_filter_by_unicode_metadata(app: App) -> None:
    tokyo = add_metadata(job, {"町": "東京", "emoji": "🎉"})(1).id
    osaka = add_metadata(job, {"町": "大阪", "emoji": "🎊"})(2).id
    hebrew = add_metadata(job, {"עיר": "ירושלים", "emoji": "🎉"})(3).id

    assert listed(metadata={"町": ["東京"]}) == [tokyo]
    assert listed(metadata={"町": ["東京", "大阪"]}) == [osaka, tokyo]
    assert listed(metadata={"emoji": ["🎉"]}) == [hebrew, tokyo]
    assert listed(metadata={"עיר": ["ירושלים"], "emoji": ["🎉"]}) == [hebrew]
    assert listed(metadata={"町": ["京"]}) == []
    assert deferq.get_execution(hebrew).metadata == {"עיר": "ירושלים", "emoji": "🎉"}


def test_filter_by_scheduled_time(app: App) -> None:
    now = app.store.now()
    due = job(0).id
    hours = {n: deferq.get_execution(delay(job, f"{n}h")(n).id) for n in (1, 2, 3)}
    two = hours[2]

    assert listed(
        scheduled_between=(now + timedelta(minutes=90), now + timedelta(minutes=150))
    ) == [two.id]
    assert listed(scheduled_between=(now + timedelta(minutes=30), None)) == [
        hours[3].id,
        two.id,
        hours[1].id,
    ]
    assert listed(scheduled_between=(None, now + timedelta(minutes=30))) == [due]
    assert listed(scheduled_between=(None, None)) == listed()
    # The start is included, the end is not.
    exact = two.scheduled_for
    assert listed(scheduled_between=(exact, exact + timedelta(microseconds=1))) == [two.id]
    assert two.id not in listed(scheduled_between=(None, exact))
    assert listed(scheduled_between=(exact, None)) == [hours[3].id, two.id]


def test_filter_by_started_time(app: App) -> None:
    early = [job(n).id for n in range(3)]
    run_due(functions=[job])
    mark = app.store.now()
    late = [other_job(n).id for n in range(2)]
    run_due(functions=[other_job])
    never = delay(job, "1h")(9).id

    for execution_id in early:
        started = deferq.get_execution(execution_id).started_at
        assert started is not None and started < mark
    assert listed(started_between=(mark, None)) == late[::-1]
    assert listed(started_between=(None, mark)) == early[::-1]
    # Executions that never started are outside any started range.
    assert listed(started_between=(None, mark + timedelta(hours=2))) == (early + late)[::-1]
    assert never not in listed(started_between=(mark - timedelta(days=1), None))
    assert listed(started_between=(mark + timedelta(hours=1), None)) == []


def test_cursor_pagination_has_no_duplicates_and_no_gaps(app: App) -> None:
    made = [e.id for e in job.enqueue_many([(n,) for n in range(12)])]
    made += [other_job(n).id for n in range(11)]
    newest_first = made[::-1]

    pages = all_pages(5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [i for p in pages for i in p] == newest_first

    ones = all_pages(1)
    assert [i for p in ones for i in p] == newest_first

    exact = all_pages(23)
    assert exact == [newest_first]

    jobs = all_pages(4, functions=[job])
    assert [len(p) for p in jobs] == [4, 4, 4]
    assert [i for p in jobs for i in p] == made[:12][::-1]


def test_pages_stay_stable_while_executions_are_added(app: App) -> None:
    made = [job(n).id for n in range(10)]
    first = deferq.list_executions(first=4)
    added = [job(100 + n).id for n in range(5)]
    seen = ids(first.items)
    cursor = first.next_cursor
    while cursor is not None:
        page = deferq.list_executions(first=4, after=cursor)
        seen += ids(page.items)
        cursor = page.next_cursor
    assert seen == made[::-1]
    assert listed()[:5] == added[::-1]


@pytest.mark.parametrize(
    ("filters", "error", "fragment"),
    [
        ({"first": 0}, ValueError, "first"),
        ({"first": -1}, ValueError, "first"),
        ({"first": 1001}, ValueError, "1001"),
        ({"first": "10"}, ValueError, "'10'"),
        ({"first": 2.5}, ValueError, "2.5"),
        ({"states": ["bogus"]}, ValueError, "'bogus'"),
        ({"states": ["created", "done"]}, ValueError, "'done'"),
        ({"after": 123}, TypeError, "123"),
        ({"scheduled_between": ("2026-01-01",)}, ValueError, "scheduled_between"),
        ({"started_between": "yesterday"}, ValueError, "started_between"),
        ({"started_between": (datetime(2026, 1, 1), None)}, ValueError, "2026"),
        ({"scheduled_between": ("2024-01-01", None)}, TypeError, "'2024-01-01'"),
        ({"scheduled_between": (None, "2024-01-01")}, TypeError, "scheduled_between end"),
        ({"started_between": (1_700_000_000, None)}, TypeError, "started_between start"),
        ({"error_codes": ["crashed"]}, ValueError, "'crashed'"),
        ({"error_codes": ["raised", "Timeout"]}, ValueError, "'Timeout'"),
        ({"error_codes": [None]}, TypeError, "None"),
        ({"error_codes": 5}, TypeError, "error_codes"),
        ({"states": 5}, TypeError, "states"),
        ({"functions": 5}, TypeError, "functions"),
        ({"functions": [5]}, TypeError, "5"),
        ({"metadata": {"k": None}}, TypeError, "'k'"),
        ({"metadata": {"k": [1]}}, TypeError, "'k'"),
        ({"metadata": {1: "v"}}, TypeError, "key 1"),
        ({"metadata": ["k", "v"]}, TypeError, "metadata"),
        ({"after": "junk"}, ValueError, "invalid cursor 'junk'"),
        ({"after": ""}, ValueError, "invalid cursor ''"),
        ({"after": "\x00"}, ValueError, "invalid cursor '\\x00'"),
    ],
)
def test_bad_arguments_raise_clear_errors(
    app: App, filters: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    job(1)
    with pytest.raises(error) as info:
        deferq.list_executions(**filters)
    assert fragment in str(info.value)


def test_an_unknown_state_names_the_known_ones(app: App) -> None:
    with pytest.raises(ValueError) as info:
        deferq.list_executions(states=["finished"])
    for state in ExecutionState:
        assert state.value in str(info.value)


def test_the_largest_page(app: App) -> None:
    job.enqueue_many([(n,) for n in range(1001)])
    page = deferq.list_executions(first=1000)
    assert len(page.items) == 1000
    rest = deferq.list_executions(first=1000, after=page.next_cursor)
    assert len(rest.items) == 1 and rest.next_cursor is None
    assert rest.items[0].arguments["args"] == [0]


def test_an_open_started_range_lists_only_executions_that_started(app: object) -> None:
    import deferq
    from deferq.testing import run_due
    from tests.tasks import basic

    ran = basic.add(1, 1)
    run_due(functions=[basic.add])
    waiting = deferq.delay(basic.add, "1h")(2, 2)

    listed = [e.id for e in deferq.list_executions(started_between=(None, None)).items]

    assert listed == [ran.id]
    assert waiting.id not in listed


def test_unknown_error_codes_are_named_with_the_known_ones(app: App) -> None:
    with pytest.raises(ValueError) as info:
        deferq.list_executions(error_codes=["raised", "crashed", "lost"])
    message = str(info.value)
    assert "'crashed', 'lost'" in message
    for code in ("raised", "timeout", "worker_lost", "concurrency_limit"):
        assert code in message


def test_every_error_code_the_engine_stores_can_be_listed(app: App) -> None:
    from deferq.models import ErrorCode

    for code in ErrorCode:
        assert listed(error_codes=[code.value]) == []


def cursor_after_first(**filters: Any) -> str:
    for n in range(3):
        job(n)
    page = deferq.list_executions(first=1, **filters)
    assert page.next_cursor is not None
    return page.next_cursor


@pytest.mark.parametrize(
    "other",
    [
        {"states": ["created", "failed"]},
        {"functions": [job.name]},
        {"error_codes": ["raised"]},
        {"metadata": {"flow": "x"}},
        {"scheduled_between": (None, datetime.now(UTC) + timedelta(days=1))},
        {"started_between": (None, None)},
    ],
)
def test_a_cursor_passed_with_other_filters_is_refused(app: App, other: dict[str, Any]) -> None:
    cursor = cursor_after_first(states=["created"])
    with pytest.raises(ValueError) as info:
        deferq.list_executions(after=cursor, **other)
    assert f"cursor {cursor!r} does not belong to these filters" in str(info.value)


def test_a_cursor_goes_with_the_same_filters_however_they_are_spelled(app: App) -> None:
    cursor = cursor_after_first(states=["created", "failed"], metadata={})
    page = deferq.list_executions(
        states=("failed", "created", "created"), metadata={}, after=cursor
    )
    assert len(page.items) == 2
    page = deferq.list_executions(states=["created", "failed"], metadata={}, after=cursor, first=1)
    assert len(page.items) == 1  # the page size may change from page to page


def test_a_changed_cursor_is_refused(app: App) -> None:
    cursor = cursor_after_first()
    last_id, check = cursor.split(".")
    other_id = job(9).id
    changed = [
        f"{other_id}.{check}",  # another execution's id
        f"{last_id}.{check[:-1]}{'0' if check[-1] != '0' else '1'}",
        last_id,  # the check cut off
        cursor + "0",
        cursor.upper(),
    ]
    for bad in changed:
        with pytest.raises(ValueError, match="cursor") as info:
            deferq.list_executions(after=bad)
        assert repr(bad) in str(info.value)


def test_the_store_refuses_a_cursor_that_is_not_an_id(app: App) -> None:
    from deferq.store.base import ExecutionQuery

    with pytest.raises(ValueError) as info:
        app.store.list_executions(ExecutionQuery(after="x\x00"))
    assert str(info.value) == "invalid cursor 'x\\x00': not an execution id"


def test_combined_filters_page_by_page_agree_with_filtering_everything(app: App) -> None:
    """Every shape of the listing query (driven by one metadata value, merged per state, or
    plain) gives, page by page, what filtering all executions by hand gives."""
    made: list[str] = []
    for n in range(60):
        metadata = {"tenant": f"t{n % 3}"}
        if n % 2:
            metadata["flow"] = ("in", "up", "reset")[(n // 4) % 3]
        made.append(add_metadata(job if n % 4 else other_job, metadata)(n).id)
    for n, execution_id in enumerate(made):
        if n % 7 == 0:
            deferq.cancel_execution(execution_id)
    everything = {e.id: e for e in deferq.list_executions(first=1000).items}
    assert len(everything) == 60

    def by_hand(
        states: list[str] | None = None,
        functions: list[Any] | None = None,
        metadata: dict[str, list[str]] | None = None,
    ) -> list[str]:
        names = None if functions is None else {f.name for f in functions}
        return [
            e.id
            for e in sorted(everything.values(), key=lambda e: e.id, reverse=True)
            if (states is None or e.state in states)
            and (names is None or e.function_name in names)
            and all(e.metadata.get(k) in v for k, v in (metadata or {}).items())
        ]

    cases: list[dict[str, Any]] = [
        {"metadata": {"tenant": ["t1"]}},
        {"metadata": {"tenant": ["t1"]}, "states": ["created"]},
        {"metadata": {"tenant": ["t0"], "flow": ["in", "reset"]}},
        {"metadata": {"flow": ["up"], "tenant": ["t0", "t2"]}, "functions": [job]},
        {"metadata": {"tenant": ["t0", "t1"]}, "states": ["cancelled", "created"]},
        {"states": ["cancelled", "created"]},
        {"states": ["created", "cancelled", "created"], "functions": [other_job]},
        {"states": ["cancelled", "succeeded"]},
        {"functions": [job], "metadata": {"flow": ["reset"]}, "states": ["created"]},
    ]
    for filters in cases:
        expected = by_hand(**filters)
        assert expected, f"the case {filters} should match something"
        for size in (1, 4, 1000):
            assert [i for p in all_pages(size, **filters) for i in p] == expected, (filters, size)


def test_several_states_with_many_filter_values_answer(app: App) -> None:
    """Split per state, a query repeats its other values once per state: past a bound it
    is not split, so thousands of values still fit one statement's parameters."""
    made = add_metadata(job, {"user": "7"})(1).id
    users = [str(n) for n in range(9000)]
    all_states = [state.value for state in ExecutionState]
    assert listed(metadata={"user": users}, states=all_states) == [made]
    names = [f"app.f{n}" for n in range(9000)] + [job.name]
    assert listed(functions=names, states=all_states) == [made]


@pytest.mark.parametrize(
    "filters",
    [
        {"functions": ["a\x00b"]},
        {"metadata": {"k\x00": ["v"]}},
        {"metadata": {"k": ["v\x00"]}},
        {"metadata": {"k": "v\x00"}},
    ],
)
def test_a_nul_in_a_filter_is_refused_with_the_filter_named(
    app: App, filters: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="NUL"):
        deferq.list_executions(**filters)
