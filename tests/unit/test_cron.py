"""Cron schedules: expressions, time zones across DST changes, and catch-up after downtime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from deferq.cron import MAX_CATCH_UP_TICKS, ON_TIME_WINDOW, CronSchedule

NEW_YORK = ZoneInfo("America/New_York")


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def local_day(day: tuple[int, int, int], tz: ZoneInfo = NEW_YORK) -> tuple[datetime, datetime]:
    """The instants just before the start and at the end of one local calendar day."""
    start = datetime(*day, tzinfo=tz).astimezone(UTC) - timedelta(microseconds=1)
    end = (datetime(*day, tzinfo=tz) + timedelta(days=1)).astimezone(UTC)
    return start, end - timedelta(microseconds=1)


def ticks_on(schedule: CronSchedule, day: tuple[int, int, int]) -> list[datetime]:
    return list(schedule.ticks_between(*local_day(day, schedule.zone)))


# Fall back: 2026-11-01 02:00 EDT becomes 01:00 EST in America/New_York.
FALL_BACK = (2026, 11, 1)
# Spring forward: 2026-03-08 02:00 EST becomes 03:00 EDT.
SPRING_FORWARD = (2026, 3, 8)


class TestDaylightSavingTime:
    def test_fall_back_day_has_25_hours(self) -> None:
        start, end = local_day(FALL_BACK)
        assert end - start == timedelta(hours=25)

    def test_daily_job_on_fall_back_runs_once_at_its_local_time(self) -> None:
        schedule = CronSchedule("0 17 * * *", tz="America/New_York")
        assert ticks_on(schedule, FALL_BACK) == [utc(2026, 11, 1, 22, 0)]
        assert schedule.next_tick(utc(2026, 10, 31, 21, 0)) == utc(2026, 11, 1, 22, 0)

    def test_hourly_job_on_fall_back_runs_every_real_hour(self) -> None:
        ticks = ticks_on(CronSchedule("0 * * * *", tz="America/New_York"), FALL_BACK)
        # Local midnight (EDT) is 04:00 UTC; the day lasts 25 hours.
        assert ticks == [utc(2026, 11, 1, 4, 0) + timedelta(hours=h) for h in range(25)]
        assert len(ticks) == 25
        one_oclock = [t for t in ticks if t.astimezone(NEW_YORK).hour == 1]
        assert one_oclock == [utc(2026, 11, 1, 5, 0), utc(2026, 11, 1, 6, 0)]

    def test_fixed_time_in_repeated_hour_runs_once_at_first_occurrence(self) -> None:
        schedule = CronSchedule("30 1 * * *", tz="America/New_York")
        assert ticks_on(schedule, FALL_BACK) == [utc(2026, 11, 1, 5, 30)]

    def test_next_tick_from_inside_the_second_copy_of_the_repeated_hour(self) -> None:
        # 06:10 UTC is 01:10 EST, after the only 01:30 of the day (05:30 UTC) has passed.
        inside = utc(2026, 11, 1, 6, 10)
        fixed = CronSchedule("30 1 * * *", tz="America/New_York")
        assert fixed.next_tick(inside) == utc(2026, 11, 2, 6, 30)
        assert fixed.due_ticks(utc(2026, 10, 31, 5, 30), inside) == [utc(2026, 11, 1, 5, 30)]
        hourly = CronSchedule("0 * * * *", tz="America/New_York")
        assert hourly.next_tick(inside) == utc(2026, 11, 1, 7, 0)
        assert hourly.next_tick(utc(2026, 11, 1, 5, 10)) == utc(2026, 11, 1, 6, 0)

    def test_skipped_time_on_spring_forward_runs_once_at_the_transition(self) -> None:
        # 02:30 does not exist that day; the tick falls at 03:00 EDT, 07:00 UTC.
        schedule = CronSchedule("30 2 * * *", tz="America/New_York")
        assert ticks_on(schedule, SPRING_FORWARD) == [utc(2026, 3, 8, 7, 0)]
        assert schedule.next_tick(utc(2026, 3, 8, 7, 0)) == utc(2026, 3, 9, 6, 30)

    def test_afternoon_job_on_spring_forward_uses_the_new_offset(self) -> None:
        schedule = CronSchedule("4 16 * * *", tz="America/New_York")
        assert ticks_on(schedule, SPRING_FORWARD) == [utc(2026, 3, 8, 20, 4)]
        assert schedule.next_tick(utc(2026, 3, 7, 21, 4)) == utc(2026, 3, 8, 20, 4)

    def test_hourly_job_on_spring_forward_runs_every_real_hour(self) -> None:
        ticks = ticks_on(CronSchedule("0 * * * *", tz="America/New_York"), SPRING_FORWARD)
        assert ticks == [utc(2026, 3, 8, 5, 0) + timedelta(hours=h) for h in range(23)]

    def test_same_instant_twice_counts_once(self) -> None:
        # 02:15 and 02:45 are both skipped; they fall on the one transition instant.
        schedule = CronSchedule("15,45 2 * * *", tz="America/New_York")
        assert ticks_on(schedule, SPRING_FORWARD) == [utc(2026, 3, 8, 7, 0)]

    def test_utc_is_the_default(self) -> None:
        schedule = CronSchedule("0 17 * * *")
        assert schedule.tz == "UTC"
        assert ticks_on(schedule, FALL_BACK) == [utc(2026, 11, 1, 17, 0)]

    def test_other_zones_by_name(self) -> None:
        paris = CronSchedule("0 9 * * *", tz="Europe/Paris")
        assert paris.next_tick(utc(2026, 7, 1)) == utc(2026, 7, 1, 7, 0)
        assert paris.next_tick(utc(2026, 12, 1)) == utc(2026, 12, 1, 8, 0)
        kolkata = CronSchedule("0 9 * * *", tz="Asia/Kolkata")
        assert kolkata.next_tick(utc(2026, 7, 1)) == utc(2026, 7, 1, 3, 30)


class TestTicks:
    def test_next_tick_is_strictly_after_and_in_utc(self) -> None:
        schedule = CronSchedule("*/5 * * * *")
        assert schedule.next_tick(utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 10, 10)
        assert schedule.next_tick(utc(2026, 1, 1, 10, 4, 59, 999999)) == utc(2026, 1, 1, 10, 5)
        assert schedule.next_tick(utc(2026, 1, 1, 10, 5, 0, 1)) == utc(2026, 1, 1, 10, 10)
        paris = datetime(2026, 1, 1, 11, 5, tzinfo=ZoneInfo("Europe/Paris"))
        tick = schedule.next_tick(paris)
        assert tick == utc(2026, 1, 1, 10, 10)
        assert tick.tzinfo is UTC

    def test_ticks_between_excludes_start_and_includes_end(self) -> None:
        schedule = CronSchedule("0 * * * *")
        ticks = list(schedule.ticks_between(utc(2026, 1, 1, 10), utc(2026, 1, 1, 13)))
        assert ticks == [utc(2026, 1, 1, 11), utc(2026, 1, 1, 12), utc(2026, 1, 1, 13)]
        assert list(schedule.ticks_between(utc(2026, 1, 1, 13), utc(2026, 1, 1, 10))) == []

    def test_naive_datetimes_are_refused(self) -> None:
        schedule = CronSchedule("0 * * * *")
        with pytest.raises(ValueError, match="after must be an aware datetime"):
            schedule.next_tick(datetime(2026, 1, 1))
        with pytest.raises(ValueError, match="now must be an aware datetime"):
            schedule.due_ticks(utc(2026, 1, 1), datetime(2026, 1, 2))
        with pytest.raises(ValueError, match="last_tick must be an aware datetime"):
            schedule.due_ticks(datetime(2026, 1, 1), utc(2026, 1, 2))
        with pytest.raises(ValueError, match="end must be an aware datetime"):
            list(schedule.ticks_between(utc(2026, 1, 1), datetime(2026, 1, 2)))


class TestExpressions:
    @pytest.mark.parametrize(
        ("alias", "after", "expected"),
        [
            ("@hourly", utc(2026, 5, 6, 7, 8), utc(2026, 5, 6, 8, 0)),
            ("@daily", utc(2026, 5, 6, 7, 8), utc(2026, 5, 7, 0, 0)),
            ("@midnight", utc(2026, 5, 6, 7, 8), utc(2026, 5, 7, 0, 0)),
            ("@weekly", utc(2026, 5, 6, 7, 8), utc(2026, 5, 10, 0, 0)),  # the next Sunday
            ("@monthly", utc(2026, 5, 6, 7, 8), utc(2026, 6, 1, 0, 0)),
            ("@yearly", utc(2026, 5, 6, 7, 8), utc(2027, 1, 1, 0, 0)),
            ("@annually", utc(2026, 5, 6, 7, 8), utc(2027, 1, 1, 0, 0)),
            ("@DAILY", utc(2026, 5, 6, 7, 8), utc(2026, 5, 7, 0, 0)),
        ],
    )
    def test_aliases(self, alias: str, after: datetime, expected: datetime) -> None:
        assert CronSchedule(alias).next_tick(after) == expected

    def test_alias_in_a_time_zone(self) -> None:
        schedule = CronSchedule("@daily", tz="America/New_York")
        assert schedule.next_tick(utc(2026, 11, 1, 12)) == utc(2026, 11, 2, 5, 0)

    def test_standard_syntax(self) -> None:
        after = utc(2026, 1, 1)  # a Thursday
        assert CronSchedule("0 9 * * MON-FRI").next_tick(after) == utc(2026, 1, 1, 9)
        assert CronSchedule("0 9 * * sat,sun").next_tick(after) == utc(2026, 1, 3, 9)
        assert CronSchedule("0 0 1 */3 *").next_tick(after) == utc(2026, 4, 1)
        assert CronSchedule("0 0 * * 7").next_tick(after) == utc(2026, 1, 4)
        assert CronSchedule("0 0 L * *").next_tick(after) == utc(2026, 1, 31)

    def test_whitespace_is_normalized(self) -> None:
        schedule = CronSchedule("  0   17 * *  * ", tz="America/New_York")
        assert schedule.expression == "0 17 * * *"

    @pytest.mark.parametrize(
        ("expression", "reason"),
        [
            ("", "expected 5 fields"),
            ("* * * *", "expected 5 fields"),
            ("0 * * * * *", "expected 5 fields"),
            ("61 * * * *", "bad minute"),
            ("0 25 * * *", "bad hour"),
            ("0 0 32 * *", "bad day-of-month"),
            ("0 0 31 2 *", "bad day-of-month"),
            ("0 0 * 13 *", "bad month"),
            ("0 0 * * FUNDAY", "bad day-of-week"),
            ("every five minutes", "expected 5 fields"),
            ("@reboot", "unknown alias"),
            ("@often", "unknown alias"),
        ],
    )
    def test_invalid_expressions_are_refused_with_the_expression_quoted(
        self, expression: str, reason: str
    ) -> None:
        with pytest.raises(ValueError, match=reason) as raised:
            CronSchedule(expression)
        assert f"invalid cron expression {' '.join(expression.split())!r}" in str(raised.value)

    def test_non_string_expression(self) -> None:
        with pytest.raises(TypeError, match="a cron expression is a string"):
            CronSchedule(5)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "tz", ["Mars/Olympus_Mons", "america/new_york", "", " ", "EST5EDT/../../etc", "/etc/passwd"]
    )
    def test_unknown_time_zones_are_refused_with_the_name_quoted(self, tz: str) -> None:
        with pytest.raises(ValueError, match="unknown time zone") as raised:
            CronSchedule("0 * * * *", tz=tz)
        assert repr(tz) in str(raised.value)

    @pytest.mark.parametrize("policy", ["", "none", "ONE", "latest", "every"])
    def test_unknown_catch_up_policies_are_refused_with_the_policy_quoted(
        self, policy: str
    ) -> None:
        with pytest.raises(ValueError, match="unknown catch-up policy") as raised:
            CronSchedule("0 * * * *", catch_up=policy)
        assert repr(policy) in str(raised.value)
        assert "'skip', 'one', 'all'" in str(raised.value)

    def test_repr_describe_and_equality(self) -> None:
        schedule = CronSchedule("0 17 * * *", tz="America/New_York")
        assert repr(schedule) == "CronSchedule('0 17 * * *', tz='America/New_York', catch_up='one')"
        assert schedule.describe() == "0 17 * * * (America/New_York)"
        assert schedule == CronSchedule("0 17 * * *", "America/New_York", "one")
        assert schedule != CronSchedule("0 17 * * *", "America/New_York", "all")
        assert CronSchedule("@daily") == CronSchedule("0 0 * * *")
        assert len({CronSchedule("@daily"), CronSchedule("0 0 * * *")}) == 1


class TestCatchUp:
    """Every test here: an hourly schedule whose last handled tick was 10:00, workers down until
    after 15:00, so the ticks 11:00 to 15:00 were missed."""

    LAST = utc(2026, 1, 1, 10)
    MISSED = [utc(2026, 1, 1, h) for h in range(11, 16)]
    BACK = utc(2026, 1, 1, 15, 20)

    def test_the_default_is_one(self) -> None:
        assert CronSchedule("0 * * * *").catch_up == "one"

    def test_one_runs_only_the_latest_missed_tick(self) -> None:
        schedule = CronSchedule("0 * * * *", catch_up="one")
        assert schedule.due_ticks(self.LAST, self.BACK) == [utc(2026, 1, 1, 15)]
        # Once it is handled, nothing more is due until the next tick.
        assert schedule.due_ticks(utc(2026, 1, 1, 15), self.BACK) == []
        assert schedule.due_ticks(utc(2026, 1, 1, 15), utc(2026, 1, 1, 16)) == [utc(2026, 1, 1, 16)]

    def test_skip_runs_nothing_from_the_backlog_then_the_next_normal_tick(self) -> None:
        schedule = CronSchedule("0 * * * *", catch_up="skip")
        assert schedule.due_ticks(self.LAST, self.BACK) == []
        assert schedule.due_ticks(self.LAST, utc(2026, 1, 1, 15, 59)) == []
        assert schedule.due_ticks(self.LAST, utc(2026, 1, 1, 16, 0, 2)) == [utc(2026, 1, 1, 16)]

    def test_skip_still_runs_a_tick_found_within_the_on_time_window(self) -> None:
        schedule = CronSchedule("0 * * * *", catch_up="skip")
        just_late = utc(2026, 1, 1, 11) + ON_TIME_WINDOW
        assert schedule.due_ticks(self.LAST, just_late) == [utc(2026, 1, 1, 11)]
        too_late = just_late + timedelta(microseconds=1)
        assert schedule.due_ticks(self.LAST, too_late) == []
        strict = CronSchedule("0 * * * *", catch_up="skip", on_time_window=timedelta(0))
        assert strict.due_ticks(self.LAST, utc(2026, 1, 1, 11)) == [utc(2026, 1, 1, 11)]

    def test_all_runs_every_missed_tick_oldest_first(self) -> None:
        schedule = CronSchedule("0 * * * *", catch_up="all")
        assert schedule.due_ticks(self.LAST, self.BACK) == self.MISSED

    def test_all_is_capped_at_the_most_recent_ticks(self) -> None:
        schedule = CronSchedule("* * * * *", catch_up="all")
        now = utc(2026, 1, 10, 12, 0, 30)
        ticks = schedule.due_ticks(utc(2026, 1, 1), now)  # more than 12,000 missed minutes
        assert len(ticks) == MAX_CATCH_UP_TICKS == 1000
        assert ticks[-1] == utc(2026, 1, 10, 12, 0)
        assert ticks[0] == utc(2026, 1, 10, 12, 0) - timedelta(minutes=999)
        assert all(b - a == timedelta(minutes=1) for a, b in zip(ticks, ticks[1:], strict=False))

    @pytest.mark.parametrize("policy", ["skip", "one", "all"])
    def test_on_time_tick_is_due_under_every_policy(self, policy: str) -> None:
        schedule = CronSchedule("*/5 * * * *", catch_up=policy)
        last = utc(2026, 1, 1, 10, 0)
        assert schedule.due_ticks(last, utc(2026, 1, 1, 10, 4, 59)) == []
        assert schedule.due_ticks(last, utc(2026, 1, 1, 10, 5)) == [utc(2026, 1, 1, 10, 5)]
        assert schedule.due_ticks(last, utc(2026, 1, 1, 10, 5, 1)) == [utc(2026, 1, 1, 10, 5)]

    @pytest.mark.parametrize("policy", ["skip", "one", "all"])
    def test_a_new_schedule_has_no_backlog(self, policy: str) -> None:
        schedule = CronSchedule("0 * * * *", catch_up=policy)
        now = utc(2026, 1, 1, 10, 30)
        assert schedule.due_ticks(None, now) == []
        # Seen first at 10:30: nothing is due until 11:00, the first tick after that.
        first_seen = now
        assert schedule.due_ticks(first_seen, utc(2026, 1, 1, 10, 59, 59)) == []
        assert schedule.due_ticks(first_seen, utc(2026, 1, 1, 11, 0, 1)) == [utc(2026, 1, 1, 11)]

    @pytest.mark.parametrize("policy", ["skip", "one", "all"])
    def test_nothing_is_due_when_the_last_tick_is_not_in_the_past(self, policy: str) -> None:
        schedule = CronSchedule("0 * * * *", catch_up=policy)
        now = utc(2026, 1, 1, 11)
        assert schedule.due_ticks(now, now) == []
        assert schedule.due_ticks(now + timedelta(hours=1), now) == []

    def test_catch_up_across_a_dst_change_counts_real_hours(self) -> None:
        schedule = CronSchedule("0 * * * *", tz="America/New_York", catch_up="all")
        last = utc(2026, 11, 1, 4)  # local midnight, EDT
        now = utc(2026, 11, 1, 8, 30)  # 03:30 EST
        assert schedule.due_ticks(last, now) == [utc(2026, 11, 1, h) for h in (5, 6, 7, 8)]
        one = CronSchedule("0 * * * *", tz="America/New_York")
        assert one.due_ticks(last, now) == [utc(2026, 11, 1, 8)]
