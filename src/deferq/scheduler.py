"""The scheduler side task: stores one execution per cron tick.

Every worker that knows a cron function runs this; the store's uniqueness rule on
(function, tick) makes a second execution of a tick impossible, however many schedulers race.
The schedule's last tick is kept in the store, so a tick that passed while every scheduler
was down is caught up on restart, following the schedule's catch-up policy.

A schedule changed in code (another expression or time zone) starts afresh: no tick of the
old version is caught up. While workers with both versions run, as in a rolling deploy, the
version in force keeps the schedule until no scheduler has looked at it for
`HANDOVER_AFTER`; only then does the other version take over.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from deferq.functions import BackgroundFunction
from deferq.ids import new_execution_id
from deferq.store.base import NewExecution, Store

logger = logging.getLogger("deferq.scheduler")

HANDOVER_AFTER = timedelta(seconds=10)
"""How long the version of a schedule in force must go unseen before a worker whose code
declares another version takes it over. Schedulers look every second; without this wait,
two versions running at once would restart the schedule at every look and no tick would
ever come due."""


class Scheduler:
    """Stores the executions of due cron ticks for a set of cron functions."""

    def __init__(
        self,
        store: Store,
        functions: Sequence[BackgroundFunction[Any, Any]],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.functions = [f for f in functions if f.cron is not None]
        self.clock = clock or store.now

    def tick(self) -> None:
        """Store the executions of every tick due now; one step of the side task."""
        now = self.clock()
        held = self._held_by_other_versions(now)
        for function in self.functions:
            if function.name not in held:
                self._schedule(function, now)

    def _held_by_other_versions(self, now: datetime) -> set[str]:
        """Names of our schedules whose stored version differs from ours and is still
        looked at by another worker."""
        ours = {f.name: f.cron for f in self.functions}
        held = set()
        for stored in self.store.list_schedules():
            schedule = ours.get(stored.function_name)
            if (
                schedule is not None
                and (stored.expression, stored.timezone) != (schedule.expression, schedule.tz)
                and stored.seen_at > now - HANDOVER_AFTER
            ):
                held.add(stored.function_name)
        return held

    def _schedule(self, function: BackgroundFunction[Any, Any], now: datetime) -> None:
        schedule = function.cron
        assert schedule is not None
        first_seen, last_tick = self.store.sync_schedule(
            function.name, schedule.expression, schedule.tz, schedule.next_tick(now), now
        )
        for tick in schedule.due_ticks(last_tick or first_seen, now):
            policy = function.options.retry
            item = NewExecution(
                id=new_execution_id(),
                function_name=function.name,
                arguments="[[],{}]",
                scheduled=tick,
                retry_policy=json.dumps(policy.to_dict()) if policy.max_retries else None,
                max_duration=function.options.max_duration.total_seconds(),
                cron_tick=tick,
            )
            if self.store.insert_cron_execution(item, schedule.next_tick(now)):
                logger.info(
                    "Cron tick scheduled",
                    extra={
                        "action": "schedule_cron_tick",
                        "function": function.name,
                        "tick": tick.isoformat(),
                        "execution": item.id,
                    },
                )
