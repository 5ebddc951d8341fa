"""The same every-five-minutes schedule under each catch-up policy."""

from __future__ import annotations

from deferq import defer


@defer.cron("*/5 * * * *", catch_up="skip")
def skips_missed() -> str:
    return "skip"


@defer.cron("*/5 * * * *")  # catch_up="one", the default
def catches_up_once() -> str:
    return "one"


@defer.cron("*/5 * * * *", catch_up="all")
def catches_up_all() -> str:
    return "all"
