"""Durations and points in time, as users write them: `"90s"`, `"1h30m"`, `timedelta`, an aware
`datetime`.

Every option that takes a time (`delay`, `discard_after`, `max_duration`, retry intervals)
goes through `parse_duration` or `parse_when`, so they all accept the same spellings and
refuse bad input the same way: a `ValueError` that quotes it, never a silent "now".
"""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime, timedelta
from typing import NoReturn

DurationLike = timedelta | int | float | str
"""What `parse_duration` accepts: a `timedelta`, a number of seconds, or a string."""

WhenLike = DurationLike | datetime
"""What `parse_when` accepts: a duration from now, or an aware `datetime`."""

MAX_TEXT_LENGTH = 100
"""Longest duration string accepted; real ones are a few characters."""

MAX_DURATION = timedelta(days=36_525)
"""Longest duration accepted anywhere (100 years of 365.25 days), and the furthest ahead of
now a point in time may be. Far enough for any real schedule, and near enough that adding it
to any time a store holds stays inside the range of a `datetime` (year 9999)."""

_MAX_DURATION_TEXT = "100 years (36525d)"

UNITS_HINT = "units: ms, s, min, h, d, w"

_UNITS: dict[str, str] = {}
for _keyword, _spellings in (
    ("milliseconds", "ms msec msecs millisecond milliseconds"),
    ("seconds", "s sec secs second seconds"),
    ("minutes", "m min mins minute minutes"),
    ("hours", "h hr hrs hour hours"),
    ("days", "d day days"),
    ("weeks", "w week weeks"),
):
    for _spelling in _spellings.split():
        _UNITS[_spelling] = _keyword
del _keyword, _spellings, _spelling

# One part: a number, then an optional unit. ASCII digits only: int() would accept "٣" too.
_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")

_ZERO = timedelta(0)


def parse_duration(value: DurationLike, *, name: str = "duration") -> timedelta:
    """Turn `value` into a non-negative `timedelta`.

    Accepts a `timedelta`, a number of seconds (`int` or `float`), or a string made of one or
    more parts, each a number and a unit, with optional spaces: `"90s"`, `"5min"`, `"1h30m"`,
    `"1h 30min"`, `"2 days"`, `"1.5h"`, `"1w"`, `"250ms"`. A string that is a single number
    counts seconds (`"30"`). Units, in any case and with plurals: ms/msec/millisecond,
    s/sec/second, m/min/minute, h/hr/hour, d/day, w/week. In a string of several parts each
    part needs a unit, and each unit may appear only once (`"1h 1h"` is refused).

    Zero is allowed. Negative, NaN, infinite and too large values (above `MAX_DURATION`,
    100 years), unknown units and leftover text raise `ValueError`; `bool` and other types
    raise `TypeError`. Messages quote the input and name the option (`name`).

    >>> parse_duration("1h30m")
    datetime.timedelta(seconds=5400)
    """
    if isinstance(value, timedelta):
        if value < _ZERO:
            raise ValueError(f"invalid {name} {value!r}: a duration cannot be negative")
        return _within_limit(value, value, name)
    if isinstance(value, str):
        if len(value) > MAX_TEXT_LENGTH:
            raise ValueError(
                f"invalid {name} {value[:40]!r}...: {len(value)} characters, too long for a "
                "duration"
            )
        return _parse_text(value, name)
    if isinstance(value, bool):
        raise TypeError(f"invalid {name} {value!r}: a bool is not a duration")
    if isinstance(value, int | float):
        return _from_seconds(value, value, name)
    raise TypeError(
        f"invalid {name} {value!r}: expected a timedelta, a number of seconds or a string "
        f"such as '5min', not {type(value).__qualname__}"
    )


def parse_when(value: WhenLike, *, name: str) -> timedelta | datetime:
    """Turn `value` into a duration from now (`timedelta`) or a point in time (UTC `datetime`).

    A `datetime` must be timezone-aware and at most `MAX_DURATION` (100 years) ahead of
    now; it is returned converted to UTC. Anything else is read by `parse_duration`.
    """
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError(
                f"invalid {name} {value!r}: a naive datetime is ambiguous; pass an aware "
                "datetime, e.g. datetime.now(timezone.utc) + timedelta(hours=1)"
            )
        try:
            instant = value.astimezone(UTC)
        except OverflowError:  # e.g. 9999-12-31 23:00 at UTC-5 is past year 9999 in UTC
            raise ValueError(
                f"invalid {name} {value.isoformat()!r}: outside the range of a datetime in UTC"
            ) from None
        if instant - datetime.now(UTC) > MAX_DURATION:
            raise ValueError(
                f"invalid {name} {value.isoformat()!r}: more than {_MAX_DURATION_TEXT} from "
                "now, the furthest ahead deferq schedules"
            )
        return instant
    return parse_duration(value, name=name)


def format_duration(td: timedelta) -> str:
    """A compact form of `td` that `parse_duration` reads back: `"5min"`, `"1h30min"`,
    `"250ms"`, `"0s"`. Days are the largest unit; below a second, milliseconds, with a
    fraction when there are microseconds (`"1.5ms"`). Negative values get a leading `-`."""
    if not isinstance(td, timedelta):
        raise TypeError(f"cannot format {td!r}: expected a timedelta")
    total = (td.days * 86_400 + td.seconds) * 1_000_000 + td.microseconds
    if total == 0:
        return "0s"
    sign = "-" if total < 0 else ""
    rest, micros = divmod(abs(total), 1_000_000)
    rest, seconds = divmod(rest, 60)
    rest, minutes = divmod(rest, 60)
    days, hours = divmod(rest, 24)

    parts = [sign]
    for amount, unit in ((days, "d"), (hours, "h"), (minutes, "min"), (seconds, "s")):
        if amount:
            parts.append(f"{amount}{unit}")
    if micros:
        millis, micro_rest = divmod(micros, 1000)
        fraction = f".{micro_rest:03d}".rstrip("0") if micro_rest else ""
        parts.append(f"{millis}{fraction}ms")
    return "".join(parts)


def _from_seconds(seconds: float, shown: object, name: str) -> timedelta:
    # isfinite() only for floats: it cannot turn an int past a float's range into a float.
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise ValueError(f"invalid {name} {shown!r}: a duration must be a finite number")
    if seconds < 0:
        raise ValueError(f"invalid {name} {_short(shown)}: a duration cannot be negative")
    if seconds > _MAX_SECONDS:
        _refuse_too_long(shown, name)
    return timedelta(seconds=seconds)


_MAX_SECONDS = MAX_DURATION.total_seconds()


def _within_limit(duration: timedelta, shown: object, name: str) -> timedelta:
    if duration > MAX_DURATION:
        _refuse_too_long(shown, name)
    return duration


def _refuse_too_long(shown: object, name: str) -> NoReturn:
    raise ValueError(
        f"invalid {name} {_short(shown)}: too large for a duration; the longest is "
        f"{_MAX_DURATION_TEXT}"
    )


# The same few spellings come back on every call ("5min" in a decorator or a wrapper), and
# timedelta is immutable, so answers are cached. Errors are not cached; they raise again.
@functools.lru_cache(maxsize=512)
def _parse_text(text: str, name: str) -> timedelta:
    if not text or text.isspace():
        raise ValueError(f"invalid {name} {text!r}: empty (write e.g. '90s', '5min', '1h30m')")
    if text.lstrip().startswith("-"):
        raise ValueError(f"invalid {name} {text!r}: a duration cannot be negative")

    amounts: dict[str, int | float] = {}
    position, end = 0, len(text)
    while position < end:
        match = _PART.match(text, position)
        if match is None:
            _refuse_leftover(text, position, name)
        number, unit = match.groups()
        position = match.end()
        if len(number) > 30:  # far past timedelta.max, and int() of huge text is slow
            raise ValueError(f"invalid {name} {text!r}: too large for a duration")
        amount = float(number) if "." in number else int(number)
        if not unit:
            if position < end and _PART.match(text, position) is None:
                _refuse_leftover(text, match.end(1), name)
            if amounts or position < end:
                raise ValueError(
                    f"invalid {name} {text!r}: {number!r} has no unit; only a lone number "
                    f"may leave it out, meaning seconds ({UNITS_HINT})"
                )
            return _from_seconds(amount, text, name)
        keyword = _UNITS.get(unit.lower())
        if keyword is None:
            raise ValueError(f"invalid {name} {text!r}: unknown unit {unit!r} ({UNITS_HINT})")
        if keyword in amounts:
            raise ValueError(f"invalid {name} {text!r}: {keyword} given twice")
        amounts[keyword] = amount

    try:
        duration = timedelta(**amounts)
    except OverflowError:
        _refuse_too_long(text, name)
    return _within_limit(duration, text, name)


def _refuse_leftover(text: str, position: int, name: str) -> NoReturn:
    raise ValueError(
        f"invalid {name} {text!r}: unexpected {text[position:].strip()!r} "
        "(write e.g. '90s', '5min', '1h30m')"
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..."
