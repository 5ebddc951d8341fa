"""Cron functions on New York time, for the days its clocks change."""

from __future__ import annotations

from deferq import defer


@defer.cron("0 17 * * *", tz="America/New_York")
def at_five_pm() -> str:
    return "17:00"


@defer.cron("30 1 * * *", tz="America/New_York")
def at_half_past_one() -> str:
    return "01:30"
