"""Retry policies: how many times a failed execution runs again, and how long it waits."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from deferq.durations import MAX_DURATION, DurationLike, parse_duration

DEFAULT_RETRIES = 13
"""The number of retries `retry=True` gives."""

_LONGEST_SECONDS = MAX_DURATION.total_seconds()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and when a failed execution is tried again.

    The wait before retry `n` (1 for the first retry) is
    `min(max_interval, initial_interval * multiplier ** (n - 1))`, spread uniformly by
    plus or minus `randomization_factor` of itself so that executions failing together do not
    retry together. Intervals accept anything `parse_duration` does and are stored as
    `timedelta`, at most `MAX_DURATION` (100 years) each. Zeros given explicitly are
    honoured: `initial_interval=0` retries at once, `randomization_factor=0` waits exactly the
    computed time. `max_interval` caps the base wait, even the first one; the spread wait is
    capped at `MAX_DURATION`.

    >>> RetryPolicy(5, initial_interval="1s", multiplier=2).delay_before_retry(3, rand=0.5)
    datetime.timedelta(seconds=4)
    """

    max_retries: int
    initial_interval: DurationLike = "30s"
    multiplier: float = 1.5
    randomization_factor: float = 0.5
    max_interval: DurationLike = "10min"

    def __post_init__(self) -> None:
        if type(self.max_retries) is not int:
            raise TypeError(f"max_retries must be an int, not {self.max_retries!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries cannot be negative, got {self.max_retries!r}")
        initial = parse_duration(self.initial_interval, name="initial_interval")
        longest = parse_duration(self.max_interval, name="max_interval")
        multiplier = _real(self.multiplier, "multiplier")
        if multiplier < 1.0:
            raise ValueError(f"multiplier must be at least 1.0, got {self.multiplier!r}")
        factor = _real(self.randomization_factor, "randomization_factor")
        if not 0.0 <= factor <= 1.0:
            raise ValueError(
                f"randomization_factor must be from 0 to 1, got {self.randomization_factor!r}"
            )
        object.__setattr__(self, "initial_interval", initial)
        object.__setattr__(self, "max_interval", longest)
        object.__setattr__(self, "multiplier", multiplier)
        object.__setattr__(self, "randomization_factor", factor)

    def delay_before_retry(self, n: int, rand: float | None = None) -> timedelta:
        """The wait before retry `n` (n >= 1), never negative and never longer than
        `MAX_DURATION`, however large `n` is.

        `rand` in [0, 1] picks the point in the randomization spread (0 the shortest wait,
        0.5 the middle); by default it comes from `random.random()`.
        """
        if type(n) is not int or n < 1:
            raise ValueError(f"retry number must be an int of at least 1, got {n!r}")
        if rand is None:
            rand = random.random()
        elif not 0.0 <= rand <= 1.0:
            raise ValueError(f"rand must be from 0 to 1, got {rand!r}")

        base = self._base_seconds(n)
        spread = base * (1.0 + self.randomization_factor * (2.0 * rand - 1.0))
        seconds = min(max(spread, 0.0), _LONGEST_SECONDS)
        return min(timedelta(seconds=seconds), MAX_DURATION)

    def _base_seconds(self, n: int) -> float:
        initial = self._seconds(self.initial_interval)
        cap = self._seconds(self.max_interval)
        if initial <= 0.0 or cap <= 0.0:
            return 0.0
        # Compare in logarithms: multiplier ** (n - 1) overflows a float long before n does.
        growth = (n - 1) * math.log(self.multiplier)
        if growth >= math.log(cap / initial):
            return cap
        return min(cap, initial * self.multiplier ** (n - 1))  # below cap, so finite

    def _seconds(self, interval: DurationLike) -> float:
        # Fields accept any DurationLike but hold a timedelta once __post_init__ has run.
        return cast(timedelta, interval).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        """This policy as JSON-ready data, intervals in seconds."""
        return {
            "max_retries": self.max_retries,
            "initial_interval": self._seconds(self.initial_interval),
            "multiplier": self.multiplier,
            "randomization_factor": self.randomization_factor,
            "max_interval": self._seconds(self.max_interval),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetryPolicy:
        """The policy `to_dict` gave. Missing optional keys take their defaults; unknown keys
        are ignored, so a policy stored by a newer version still loads. An interval above
        `MAX_DURATION`, stored before that limit existed, is read as `MAX_DURATION`, so a
        worker can still retry such an execution."""
        if not isinstance(data, dict) or "max_retries" not in data:
            raise ValueError(f"not a stored retry policy: {data!r}")
        known = ("initial_interval", "multiplier", "randomization_factor", "max_interval")
        options = {key: data[key] for key in known if key in data}
        for key in ("initial_interval", "max_interval"):
            value = options.get(key)
            if isinstance(value, int | float) and value > _LONGEST_SECONDS:
                options[key] = _LONGEST_SECONDS
        return cls(data["max_retries"], **options)


def resolve_retry(value: bool | int | RetryPolicy | None) -> RetryPolicy:
    """The policy a `retry=` option means.

    `False` or `None`: no retry. `True`: the default policy with 13 retries. An `int` n:
    n retries with the default intervals. A `RetryPolicy`: itself.
    """
    if value is None or value is False:
        return RetryPolicy(0)
    if value is True:
        return RetryPolicy(DEFAULT_RETRIES)
    if isinstance(value, RetryPolicy):
        return value
    if type(value) is int:
        if value < 0:
            raise ValueError(f"retry cannot be a negative number of retries, got {value!r}")
        return RetryPolicy(value)
    raise TypeError(
        f"retry must be True, False, None, a number of retries or a RetryPolicy, not {value!r}"
    )


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
