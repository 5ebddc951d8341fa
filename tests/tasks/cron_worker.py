"""A worker whose cron scheduler reads the time from a file, for tests that drive time.

    python -m tests.tasks.cron_worker --clock-file PATH [--slots N] MODULE [MODULE...]

The file holds one aware ISO 8601 instant; the test replaces it (atomically) to move time
on. Only the scheduler follows this clock; claiming, heartbeats and everything else keep the
store's clock. The store is the one `DEFERQ_URL` names, as for `deferq worker`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from deferq.app import App
from deferq.logs import configure_logging
from deferq.worker import Worker, WorkerSettings


def file_clock(path: Path) -> Callable[[], datetime]:
    """A clock that answers with the instant written in `path`, read on every call."""

    def now() -> datetime:
        instant = datetime.fromisoformat(path.read_text(encoding="utf-8").strip())
        if instant.utcoffset() is None:
            raise ValueError(f"the clock file {path} holds a naive time: {instant!r}")
        return instant

    return now


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cron_worker")
    parser.add_argument("--clock-file", type=Path, required=True)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("modules", nargs="+")
    args = parser.parse_args(argv)

    configure_logging(0)
    clock = file_clock(args.clock_file)
    clock()  # fail at start, not in the scheduler, on a missing or bad clock file
    worker = Worker(
        args.modules,
        app=App(),
        settings=WorkerSettings(slots=args.slots, grace=timedelta(seconds=10)),
        clock=clock,
    )
    worker.install_signal_handlers()
    return worker.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
