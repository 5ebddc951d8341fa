"""Cron schedules: when the ticks of a cron function fall, and which of them are due.

A `CronSchedule` is pure arithmetic on instants; the scheduler side task and the store decide
what is stored. Expressions are evaluated by the `cronsim` library, which follows Debian cron,
including on the days the clocks change in the schedule's time zone:

- clocks go back: a job at a fixed time of day (say `30 1 * * *`) runs once, at the first of
  the two local 01:30s; a job whose minute or hour field starts with `*` (`0 * * * *`,
  `*/15 1 * * *`) runs in both copies of the repeated hour;
- clocks go forward: a tick whose local time does not exist that day runs at the transition
  (a `30 2 * * *` job in America/New_York runs at 03:00 local, 07:00 UTC, on 2026-03-08); ticks
  that fall on the same instant that way count once.

Every instant a `CronSchedule` returns is an aware `datetime` in UTC.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

CATCH_UP_POLICIES = ("skip", "one", "all")
"""What to do with the ticks that passed while no scheduler was running; see `due_ticks`."""

MAX_CATCH_UP_TICKS = 1000
"""Most ticks the `"all"` policy returns at once; older missed ticks are dropped."""

ON_TIME_WINDOW = timedelta(minutes=1)
"""How late a tick may be found and still count as on time rather than missed (`"skip"`)."""

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The `@` shorthands accepted in place of five fields, and what each stands for."""

_MICROSECOND = timedelta(microseconds=1)


class CronSchedule:
    """A cron expression evaluated in a named time zone, with a catch-up policy.

    `expression` has the five standard fields (minute, hour, day of month, month, day of week,
    with names, ranges, steps, lists, `L`, `W` and `#` as cronsim reads them) or is one of
    `ALIASES`. `tz` is an IANA time zone name; `catch_up` is one of `CATCH_UP_POLICIES`.
    Everything is checked here, so a bad schedule fails when its function is declared:

    >>> CronSchedule("0 17 * * *", tz="America/New_York")
    CronSchedule('0 17 * * *', tz='America/New_York', catch_up='one')
    >>> CronSchedule("0 25 * * *")
    Traceback (most recent call last):
    ...
    ValueError: invalid cron expression '0 25 * * *': bad hour
    """

    def __init__(
        self,
        expression: str,
        tz: str = "UTC",
        catch_up: str = "one",
        *,
        on_time_window: timedelta = ON_TIME_WINDOW,
    ) -> None:
        self.expression = _normalize(expression)
        self.fields = _expand(self.expression)
        self.tz = tz
        self.zone = _zone(tz)
        self.catch_up = _policy(catch_up)
        if on_time_window < timedelta(0):
            raise ValueError(f"on_time_window must not be negative, got {on_time_window!r}")
        self.on_time_window = on_time_window
        self._check_fires()

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r}, tz={self.tz!r}, catch_up={self.catch_up!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CronSchedule):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def describe(self) -> str:
        """A short label for logs and the dashboard, such as `0 17 * * * (America/New_York)`."""
        return f"{self.expression} ({self.tz})"

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after the aware instant `after`, in UTC.

        >>> CronSchedule("@hourly").next_tick(datetime(2026, 1, 1, 10, 0, tzinfo=UTC))
        datetime.datetime(2026, 1, 1, 11, 0, tzinfo=datetime.timezone.utc)
        """
        _require_aware("after", after)
        for local in CronSim(self.fields, after.astimezone(self.zone)):
            # cronsim drops the fold of a start inside a repeated hour, so it may first
            # return ticks from the first copy of that hour; those are already past.
            tick = local.astimezone(UTC)
            if tick > after:
                return tick
        raise ValueError(
            f"cron expression {self.expression!r} has no tick in 50 years after {after}"
        )

    def ticks_between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """Every tick in `(start, end]`, oldest first, lazily; both ends must be aware."""
        _require_aware("start", start)
        _require_aware("end", end)
        tick = self.next_tick(start)
        while tick <= end:
            yield tick
            tick = self.next_tick(tick)

    def due_ticks(self, last_tick: datetime | None, now: datetime) -> list[datetime]:
        """The ticks to store an execution for now, oldest first, by the catch-up policy.

        `last_tick` is the latest tick already handled; for a schedule that has no tick yet,
        pass the instant it was first seen, so that nothing is due until its first tick after
        that. `None` means the schedule is being seen for the first time right now: there is
        no backlog, and the result is empty. Only ticks in `(last_tick, now]` are considered:

        - `"skip"`: the latest of them, and only if it is no older than `on_time_window`
          (an on-time tick); a backlog of missed ticks gives nothing, and the schedule resumes
          at its next normal tick;
        - `"one"` (the default): the latest of them, however late, so downtime across several
          ticks gives one catch-up execution;
        - `"all"`: all of them, but at most the latest `MAX_CATCH_UP_TICKS`.
        """
        _require_aware("now", now)
        if last_tick is None:
            return []
        _require_aware("last_tick", last_tick)
        if last_tick >= now:
            return []

        latest = self._previous_tick(now + _MICROSECOND)
        if latest <= last_tick:
            return []
        if self.catch_up == "skip":
            return [latest] if now - latest <= self.on_time_window else []
        if self.catch_up == "one":
            return [latest]
        return self._ticks_back_from(latest, last_tick, MAX_CATCH_UP_TICKS)

    def _previous_tick(self, before: datetime) -> datetime:
        """The latest tick strictly before `before`."""
        for local in CronSim(self.fields, before.astimezone(self.zone), reverse=True):
            tick = local.astimezone(UTC)
            if tick < before:
                break
        else:
            raise ValueError(
                f"cron expression {self.expression!r} has no tick in 50 years before {before}"
            )

        # Going backwards from inside a repeated hour, cronsim can miss a tick in the first
        # copy of that hour; stepping forward finds it.
        following = self.next_tick(tick)
        while following < before:
            tick = following
            following = self.next_tick(tick)
        return tick

    def _ticks_back_from(self, latest: datetime, floor: datetime, limit: int) -> list[datetime]:
        """Up to `limit` ticks in `(floor, latest]`, the newest ones, oldest first."""
        ticks = [latest]
        while len(ticks) < limit:
            tick = self._previous_tick(ticks[-1])
            if tick <= floor:
                break
            ticks.append(tick)
        ticks.reverse()
        return ticks

    def _check_fires(self) -> None:
        """Fail now, not in a worker, for an expression that matches no date (cronsim looks
        50 years ahead)."""
        self.next_tick(datetime.now(UTC))

    def _key(self) -> tuple[str, str, str, timedelta]:
        return (self.fields, self.tz, self.catch_up, self.on_time_window)


def _normalize(expression: str) -> str:
    if not isinstance(expression, str):
        raise TypeError(f"a cron expression is a string, got {expression!r}")
    return " ".join(expression.split())


def _expand(expression: str) -> str:
    """The five fields `expression` stands for, or `ValueError` quoting it."""
    if expression.startswith("@"):
        fields = ALIASES.get(expression.lower())
        if fields is None:
            known = ", ".join(ALIASES)
            raise ValueError(
                f"invalid cron expression {expression!r}: unknown alias (known: {known})"
            )
        return fields

    if len(expression.split()) != 5:
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week) or an @alias"
        )
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except CronSimError as exc:
        reason = str(exc).lower() or "not understood"
        raise ValueError(f"invalid cron expression {expression!r}: {reason}") from exc
    return expression


def _zone(tz: str) -> ZoneInfo:
    if not isinstance(tz, str) or not tz.strip():
        raise ValueError(f"unknown time zone {tz!r}: expected an IANA name such as 'Europe/Paris'")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(
            f"unknown time zone {tz!r}: expected an IANA name such as 'Europe/Paris'"
        ) from exc


def _policy(catch_up: str) -> str:
    if catch_up not in CATCH_UP_POLICIES:
        choices = ", ".join(repr(p) for p in CATCH_UP_POLICIES)
        raise ValueError(f"unknown catch-up policy {catch_up!r}: expected one of {choices}")
    return catch_up


def _require_aware(name: str, value: datetime) -> None:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {value!r}")
