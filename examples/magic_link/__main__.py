"""Run the whole demo with one command, from the repository root:

    python -m examples.magic_link [--port 8000] [--smtp-port 8025] [--data-dir .demo-data]

It starts the SMTP server (a thread), a deferq worker (a child process running
`deferq worker examples.magic_link.tasks`) and the web app (uvicorn, in this process), all on
127.0.0.1 and the SQLite store in the data directory. Ctrl-C stops all three.
`--no-worker` leaves the worker out, to watch `discard_after` at work: sign in, wait past
DEMO_DISCARD_AFTER, then start a worker yourself.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from deferq.logs import configure_logging
from examples.magic_link.config import HOST, Settings
from examples.magic_link.mailserver import start_mailserver
from examples.magic_link.web import create_app

logger = logging.getLogger("examples.magic_link")

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS_MODULE = "examples.magic_link.tasks"
WORKER_STOP_TIMEOUT = 20.0
"""Seconds the worker gets to stop after SIGTERM (its grace period is 5s) before a kill."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.magic_link", description="Run the magic-link sign-in demo."
    )
    env = os.environ
    parser.add_argument("--port", type=int, default=int(env.get("DEMO_PORT", "8000")))
    parser.add_argument("--smtp-port", type=int, default=int(env.get("DEMO_SMTP_PORT", "8025")))
    parser.add_argument("--data-dir", default=env.get("DEMO_DATA_DIR", ".demo-data"))
    parser.add_argument("--slots", type=int, default=2, help="attempts the worker runs at once")
    parser.add_argument(
        "--no-worker", action="store_true", help="do not start a worker (see discard_after)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start everything, serve until Ctrl-C or SIGTERM, stop everything; the exit code."""
    args = parse_args(argv)
    configure_logging(0)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs each SMTP command

    # The worker is another process: it learns the settings from the environment, too.
    data_dir = Path(args.data_dir).resolve()
    os.environ.update(
        DEMO_PORT=str(args.port), DEMO_SMTP_PORT=str(args.smtp_port), DEMO_DATA_DIR=str(data_dir)
    )
    settings = Settings.from_env()
    os.environ.setdefault("DEFERQ_URL", settings.deferq_url)
    data_dir.mkdir(parents=True, exist_ok=True)
    _ = settings.secret  # made once here, before two processes race to make it

    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=HOST, port=args.port))
    previous = _stop_server_on_signals(server)
    mailserver = start_mailserver(settings)
    worker = None
    try:
        if not args.no_worker:
            worker = start_worker(args.slots)
        print(f"Sign in at     {settings.base_url}/", flush=True)
        print(f"Mailbox at     {settings.base_url}/mailbox", flush=True)
        print(f"Executions at  {settings.base_url}/executions", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        server.run()
    finally:
        worker_code = stop_worker(worker) if worker is not None else 0
        mailserver.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if worker_code == 0 and server.started else 1


def start_worker(slots: int) -> subprocess.Popen[bytes]:
    """`deferq worker examples.magic_link.tasks` as a child process, in a session of its own:
    Ctrl-C reaches this launcher only, which then asks the worker to stop exactly once."""
    command = [sys.executable, "-m", "deferq.cli", "worker", TASKS_MODULE]
    command += ["--slots", str(slots), "--grace", "5s"]
    worker = subprocess.Popen(command, cwd=REPO_ROOT, start_new_session=True)
    logger.info("Worker process started", extra={"action": "spawn_worker", "pid": worker.pid})
    return worker


def stop_worker(worker: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait for the worker's graceful stop; kill it if it does not come."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        code = worker.wait(timeout=WORKER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.warning("Worker did not stop in time; killing it", extra={"action": "kill_worker"})
        worker.kill()
        worker.wait()
        return 1
    if code == -signal.SIGTERM:
        # Python had not yet set up the worker's signal handlers: it was still starting, had
        # claimed nothing, and our SIGTERM ended it at once. That is a clean stop.
        logger.info("Worker stopped before it had started", extra={"action": "stop_worker"})
        return 0
    return code


def _stop_server_on_signals(server: uvicorn.Server) -> dict[int, Any]:
    """Make SIGINT and SIGTERM stop the web server, which returns from `run()`, whether they
    come before it runs or after (uvicorn signals itself again once it has stopped)."""

    def stop(signum: int, frame: Any) -> None:
        server.should_exit = True

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}


if __name__ == "__main__":
    sys.exit(main())
