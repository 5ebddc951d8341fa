"""First version of an application's cron schedule: a summary at the top of every hour.

`cron_report_v2` changes its expression and `cron_report_v3` removes it; the three modules
stand for the same application code before and after each change."""

from __future__ import annotations

from deferq import defer

SUMMARY = "cron_report.summary"


@defer.cron("0 * * * *", name=SUMMARY)
def summary() -> str:
    return "v1"
