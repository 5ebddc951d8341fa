"""Second version: the summary moves to half past every hour (see `cron_report_v1`)."""

from __future__ import annotations

from deferq import defer

SUMMARY = "cron_report.summary"


@defer.cron("30 * * * *", name=SUMMARY)
def summary() -> str:
    return "v2"
