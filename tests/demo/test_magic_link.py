"""End to end: the magic-link demo, driven over HTTP and SMTP with real processes.

Each launcher runs `python -m examples.magic_link` on free loopback ports, a temporary data
directory and a temporary SQLite store; the tests read the mails from the SMTP server's store
and the executions from the deferq store.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from deferq import App, Execution
from examples.magic_link.config import Settings
from examples.magic_link.links import issue_link_token, sign, unsign
from examples.magic_link.mailserver import read_mailbox

REPO_ROOT = Path(__file__).resolve().parents[2]
MAGIC_LINK = re.compile(r"http://\S+/magic/\S+")
WORKER_PID = re.compile(r"action=spawn_worker pid=(\d+)")
START_TIMEOUT = 30.0
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """Poll `check` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Demo:
    """One running launcher and what the tests need to talk to it."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    @property
    def store_url(self) -> str:
        return self.env["DEFERQ_URL"]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def mails_to(self, email: str) -> list[dict[str, Any]]:
        return [m for m in read_mailbox(self.settings.mailbox_path) if email in m["rcpt_tos"]]

    def worker_pid(self) -> int | None:
        found = WORKER_PID.search(self.output())
        return int(found.group(1)) if found else None


def start_demo(directory: Path, *args: str, **env: str) -> Demo:
    """Start the launcher and wait until its web app answers."""
    directory.mkdir(parents=True, exist_ok=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "DEFERQ_"))}
    environment.update(
        DEFERQ_URL=f"sqlite:///{directory / 'deferq.sqlite3'}",
        DEMO_DATA_DIR=str(directory / "data"),
        DEMO_PORT=str(free_port()),
        DEMO_SMTP_PORT=str(free_port()),
        DEMO_SECRET="a secret for the tests only",
        **env,
    )
    log = directory / "launcher.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.magic_link", *args],
            cwd=REPO_ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    demo = Demo(process, environment, log)

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the launcher exited early:\n{demo.output()}")
        try:
            return httpx.get(f"{demo.base_url}/", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, "the web app to answer", timeout=START_TIMEOUT)
    return demo


def stop_demo(demo: Demo) -> int:
    """Ctrl-C the launcher as a user would; return its exit code."""
    if demo.process.poll() is None:
        demo.process.send_signal(signal.SIGINT)
    try:
        return demo.process.wait(timeout=30)
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
            demo.process.wait()
        pid = demo.worker_pid()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)  # the launcher's own worker, left behind


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def sign_in(demo: Demo, email: str) -> str:
    """POST /sign-in as JSON; the execution id."""
    with demo.client() as client:
        response = client.post("/sign-in", json={"email": email})
    assert response.status_code == 202, response.text
    assert response.json()["email"] == email
    return str(response.json()["execution_id"])


def mailed_link(demo: Demo, email: str) -> str:
    """Wait for the sign-in mail to `email` and return the magic link in it."""
    [mail] = wait_for(lambda: demo.mails_to(email), f"a mail to {email}")
    assert mail["subject"] == "Your sign-in link"
    links = MAGIC_LINK.findall(mail["text"])
    assert len(links) == 1, mail["text"]
    assert links[0].startswith(f"{demo.base_url}/magic/")
    return str(links[0])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The whole demo, as `python -m examples.magic_link` starts it."""
    running = start_demo(tmp_path_factory.mktemp("magic-link"))
    yield running
    stop_demo(running)


def test_sign_in_mails_a_link_that_signs_in(demo: Demo) -> None:
    email = "ada@example.com"
    with demo.client() as client:
        response = client.post(
            "/sign-in",
            content="email=ada%40example.com",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 202
        assert "Check your mail" in response.text

        link = mailed_link(demo, email)
        assert link.removeprefix(demo.base_url) in client.get("/mailbox").text

        signed_in = client.get(link)
        assert signed_in.status_code == 200
        assert "Signed in as <b>ada@example.com</b>" in signed_in.text
        assert "demo_session" in signed_in.cookies
        assert "Signed in as <b>ada@example.com</b>" in client.get("/").text

        [execution] = client.get("/executions", params={"email": email}).json()
    assert execution["state"] == "succeeded"
    assert execution["attempts"] == 1
    assert execution["metadata"] == {"flow": "sign-in", "email": email}
    assert execution["discard_after"] is not None


def test_a_link_works_once(demo: Demo) -> None:
    email = "grace@example.com"
    sign_in(demo, email)
    link = mailed_link(demo, email)
    with demo.client() as client:
        assert client.get(link).status_code == 200
        again = client.get(link)
    assert again.status_code == 410
    assert "already used" in again.text
    assert "demo_session" not in again.cookies


def test_expired_and_tampered_links_are_refused(demo: Demo) -> None:
    email = "edsger@example.com"
    settings = demo.settings
    lifetime = settings.link_lifetime.total_seconds()
    expired = issue_link_token(email, settings, now=time.time() - lifetime - 1)
    fresh = issue_link_token(email, settings)
    payload = unsign(fresh, settings.secret, "sign-in")
    forged_payload = sign({**payload, "email": "mallory@example.com"}, b"another secret")
    body, signature = fresh.split(".")
    other_email = forged_payload.split(".")[0]

    with demo.client() as client:
        response = client.get(f"/magic/{expired}")
        assert response.status_code == 410
        assert "expired" in response.text

        for token in (forged_payload, f"{other_email}.{signature}", f"{body}.{signature}x"):
            response = client.get(f"/magic/{token}")
            assert response.status_code == 400, token
            assert "not valid" in response.text

        # The same kind of token, not expired, signs in: expiry alone refused the first.
        response = client.get(f"/magic/{fresh}")
    assert response.status_code == 200
    assert f"Signed in as <b>{email}</b>" in response.text


def test_a_sign_in_mail_not_started_in_time_is_discarded(tmp_path: Path) -> None:
    demo = start_demo(tmp_path, "--no-worker", DEMO_DISCARD_AFTER="2s")
    store = App(demo.store_url)
    worker: subprocess.Popen[bytes] | None = None
    try:
        late = sign_in(demo, "late@example.com")
        execution = store.get_execution(late)
        assert execution.state == "created"
        assert execution.discard_after is not None
        deadline = execution.discard_after
        wait_for(lambda: datetime.now(UTC) > deadline, "the discard_after deadline", 10)

        worker = subprocess.Popen(
            [sys.executable, "-m", "deferq.cli", "worker", "examples.magic_link.tasks"]
            + ["--slots", "1"],
            cwd=REPO_ROOT,
            env=demo.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def finished() -> Execution | None:
            execution = store.get_execution(late)
            return execution if execution.state.is_final else None

        final = wait_for(finished, "the late execution to end")
        assert final.state == "discarded"
        assert final.started_at is None
        assert store.list_attempts(late) == []

        # The worker is live and mails promptly: only the late mail was held back.
        sign_in(demo, "prompt@example.com")
        mailed_link(demo, "prompt@example.com")
        assert store.get_execution(late).state == "discarded"
        assert demo.mails_to("late@example.com") == []
        with demo.client() as client:
            [listed] = client.get("/executions", params={"email": "late@example.com"}).json()
        assert listed["state"] == "discarded"

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        store.close()
        stop_demo(demo)


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    demo = start_demo(tmp_path)
    worker_pid = wait_for(demo.worker_pid, "the worker process to start")
    wait_for(lambda: "Worker started" in demo.output(), "the worker to log its start")
    settings = demo.settings

    assert stop_demo(demo) == 0, demo.output()
    assert not _alive(worker_pid)
    assert not port_open(settings.port)
    assert not port_open(settings.smtp_port)
    assert "Worker stopped" in demo.output()


def test_ctrl_c_right_after_start_is_a_clean_stop(tmp_path: Path) -> None:
    """Ctrl-C while the worker process is still starting Python (before it can handle
    signals) stops everything with exit code 0, not a failure. A `sitecustomize` that sleeps
    in the worker process only holds it in that window for certain."""
    slow_start = tmp_path / "slow-start"
    slow_start.mkdir()
    (slow_start / "sitecustomize.py").write_text(
        "\n".join(
            ["import sys, time", "if 'deferq.cli' in sys.orig_argv:", "    time.sleep(3)", ""]
        )
    )
    pythonpath = os.pathsep.join(filter(None, [str(slow_start), os.environ.get("PYTHONPATH")]))
    demo = start_demo(tmp_path, PYTHONPATH=pythonpath)
    worker_pid = wait_for(demo.worker_pid, "the worker process to start")

    assert stop_demo(demo) == 0, demo.output()
    assert not _alive(worker_pid)
    assert "Worker stopped" in demo.output()  # either the worker's own line or the launcher's
