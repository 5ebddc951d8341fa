"""The scheduler side task: stores one execution per cron tick.

Every worker that knows a cron function runs this; the store's uniqueness rule on
(function, tick) makes a second execution of a tick impossible, however many schedulers race.
The schedule's last tick is kept in the store, so a tick that passed while every scheduler
was down is caught up on restart, following the schedule's catch-up policy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from deferq.functions import BackgroundFunction
from deferq.ids import new_execution_id
from deferq.store.base import NewExecution, Store

logger = logging.getLogger("deferq.scheduler")


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
        for function in self.functions:
            self._schedule(function, now)

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
