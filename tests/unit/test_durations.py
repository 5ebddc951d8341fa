from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from deferq.durations import MAX_DURATION, format_duration, parse_duration, parse_when


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5min", timedelta(minutes=5)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2 days", timedelta(days=2)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("1w", timedelta(weeks=1)),
        ("250ms", timedelta(milliseconds=250)),
        (" 10 minutes ", timedelta(minutes=10)),
        ("1h 30min", timedelta(hours=1, minutes=30)),
        ("30", timedelta(seconds=30)),
        ("30.5", timedelta(seconds=30.5)),
        ("0s", timedelta(0)),
        ("0", timedelta(0)),
        ("5MIN", timedelta(minutes=5)),
        ("2 Hours", timedelta(hours=2)),
        ("3 hrs", timedelta(hours=3)),
        ("1 hr", timedelta(hours=1)),
        ("10 secs", timedelta(seconds=10)),
        ("1 second", timedelta(seconds=1)),
        ("7 msec", timedelta(milliseconds=7)),
        ("2 milliseconds", timedelta(milliseconds=2)),
        ("1 day", timedelta(days=1)),
        ("2 weeks", timedelta(weeks=2)),
        ("3 mins", timedelta(minutes=3)),
        ("1 minute", timedelta(minutes=1)),
        ("1d 2h 3min 4s 5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        ("30m1h", timedelta(hours=1, minutes=30)),
        ("1.0005s", timedelta(seconds=1, microseconds=500)),
        ("\t1h\n", timedelta(hours=1)),
    ],
)
def test_parse_duration_reads_strings(value: str, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, timedelta(0)),
        (0.0, timedelta(0)),
        (90, timedelta(seconds=90)),
        (1.5, timedelta(seconds=1.5)),
        (timedelta(minutes=3), timedelta(minutes=3)),
        (timedelta(0), timedelta(0)),
    ],
)
def test_parse_duration_reads_numbers_and_timedeltas(
    value: float | timedelta, expected: timedelta
) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("5 minutess", "unknown unit 'minutess'"),
        ("5 months", "unknown unit 'months'"),
        ("", "empty"),
        ("   ", "empty"),
        ("-5s", "negative"),
        (" -1h", "negative"),
        ("5min foo", "unexpected 'foo'"),
        ("h", "unexpected 'h'"),
        ("1..5h", "unexpected '..5h'"),
        ("1.", "unexpected '.'"),
        (".5h", "unexpected '.5h'"),
        ("1h30", "'30' has no unit"),
        ("30 5min", "'30' has no unit"),
        ("1h 1h", "hours given twice"),
        ("1m 1min", "minutes given twice"),
        ("5min,", "unexpected ','"),
        ("+5s", "unexpected '+5s'"),
        ("\u0663s", "unexpected"),  # an Arabic-Indic digit: only ASCII digits count
        ("9" * 40 + "w", "too large"),
        ("99999999999w", "too large"),
        ("1" + " " * 200 + "s", "too long"),
    ],
)
def test_parse_duration_refuses_bad_strings(value: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value, name="discard_after")
    message = str(caught.value)
    assert message.startswith("invalid discard_after ")
    assert repr(value if len(value) <= 100 else value[:40]) in message
    assert reason in message


def test_unknown_unit_message_lists_the_units() -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration("5 minutess", name="discard_after")
    assert str(caught.value) == (
        "invalid discard_after '5 minutess': unknown unit 'minutess' (units: ms, s, min, h, d, w)"
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1, "negative"),
        (-0.001, "negative"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (-math.inf, "finite"),
        (1e300, "too large"),
        (10**20, "too large"),
        (timedelta(seconds=-1), "negative"),
    ],
)
def test_parse_duration_refuses_bad_numbers(value: float | timedelta, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value, name="delay")
    assert f"invalid delay {value!r}" in str(caught.value)
    assert reason in str(caught.value)


@pytest.mark.parametrize("value", [True, False, None, [1], b"5s", object(), 1j])
def test_parse_duration_refuses_other_types(value: object) -> None:
    with pytest.raises(TypeError) as caught:
        parse_duration(value, name="max_duration")  # type: ignore[arg-type]
    assert "invalid max_duration" in str(caught.value)
    assert repr(value) in str(caught.value)


def test_bool_is_not_a_number_of_seconds() -> None:
    with pytest.raises(TypeError, match="bool is not a duration"):
        parse_duration(True)


def test_errors_are_raised_again_after_caching() -> None:
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown unit"):
            parse_duration("3 fortnights")


def test_name_is_part_of_the_cached_answer() -> None:
    with pytest.raises(ValueError, match="invalid delay "):
        parse_duration("1 eon", name="delay")
    with pytest.raises(ValueError, match="invalid discard_after "):
        parse_duration("1 eon", name="discard_after")


def test_parse_when_accepts_durations() -> None:
    assert parse_when("5min", name="delay") == timedelta(minutes=5)
    assert parse_when(0, name="delay") == timedelta(0)


def test_parse_when_converts_aware_datetimes_to_utc() -> None:
    paris_summer = timezone(timedelta(hours=2))
    when = datetime(2030, 6, 1, 14, 0, tzinfo=paris_summer)
    result = parse_when(when, name="delay")
    assert isinstance(result, datetime)
    assert result == when
    assert result.utcoffset() == timedelta(0)
    assert result.hour == 12


def test_parse_when_refuses_naive_datetimes() -> None:
    naive = datetime(2030, 6, 1, 14, 0)
    with pytest.raises(ValueError) as caught:
        parse_when(naive, name="discard_after")
    message = str(caught.value)
    assert "invalid discard_after" in message
    assert repr(naive) in message
    assert "aware" in message


def test_parse_when_refuses_bad_durations() -> None:
    with pytest.raises(ValueError, match="invalid delay '-1h'"):
        parse_when("-1h", name="delay")


@pytest.mark.parametrize(
    ("td", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(minutes=5), "5min"),
        (timedelta(hours=1, minutes=30), "1h30min"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(seconds=90), "1min30s"),
        (timedelta(days=9, seconds=1), "9d1s"),
        (timedelta(microseconds=1500), "1.5ms"),
        (timedelta(microseconds=1), "0.001ms"),
        (timedelta(minutes=-5), "-5min"),
    ],
)
def test_format_duration(td: timedelta, text: str) -> None:
    assert format_duration(td) == text


@pytest.mark.parametrize(
    "td",
    [
        timedelta(0),
        timedelta(days=3, hours=4, minutes=5, seconds=6, microseconds=7008),
        timedelta(microseconds=999_999),
        timedelta(weeks=52),
        MAX_DURATION,
    ],
)
def test_format_duration_reads_back(td: timedelta) -> None:
    assert parse_duration(format_duration(td)) == td


def test_format_duration_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="'5min'"):
        format_duration("5min")  # type: ignore[arg-type]


def test_an_aware_datetime_in_utc_is_kept() -> None:
    when = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_when(when, name="delay") == when


# The longest duration: 100 years, so that adding it to any stored time stays a datetime.


@pytest.mark.parametrize(
    "value",
    ["36525d", "5217w", 36_525 * 86_400, float(36_525 * 86_400), MAX_DURATION],
)
def test_the_longest_duration_is_accepted(value: object) -> None:
    assert parse_duration(value, name="delay") <= MAX_DURATION  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("36526d", "'36526d'"),
        ("5218w", "'5218w'"),
        ("999999w", "'999999w'"),
        ("36525d 1s", "'36525d 1s'"),
        (36_525 * 86_400 + 1, "3155760001"),
        (1e18, "1e+18"),
        (10**400, "1000000000"),
        (MAX_DURATION + timedelta(microseconds=1), "days=36525"),
        (timedelta.max, "days=999999999"),
    ],
)
def test_durations_over_100_years_are_refused_quoting_the_input(value: object, quoted: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value, name="delay")  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith("invalid delay ")
    assert quoted in message
    assert "100 years" in message
    assert len(message) < 200


def test_a_huge_negative_int_is_refused_as_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-(10**400), name="delay")


def test_a_datetime_up_to_100_years_ahead_is_accepted() -> None:
    when = datetime.now(UTC) + MAX_DURATION - timedelta(minutes=1)
    assert parse_when(when, name="delay") == when


@pytest.mark.parametrize(
    "when",
    [
        datetime.now(UTC) + MAX_DURATION + timedelta(days=1),
        datetime(9999, 12, 31, tzinfo=UTC),
        datetime.max.replace(tzinfo=UTC),
    ],
)
def test_a_datetime_more_than_100_years_ahead_is_refused(when: datetime) -> None:
    with pytest.raises(ValueError) as caught:
        parse_when(when, name="discard_after")
    assert str(caught.value).startswith(f"invalid discard_after {when.isoformat()!r}")
    assert "100 years" in str(caught.value)


def test_a_datetime_past_year_9999_in_utc_is_refused() -> None:
    when = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))
    with pytest.raises(ValueError) as caught:
        parse_when(when, name="delay")
    assert when.isoformat() in str(caught.value)
