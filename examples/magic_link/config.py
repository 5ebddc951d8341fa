"""Settings of the demo, read from environment variables so that the web app, the SMTP server
and the worker (another process) all agree on them.

| variable             | meaning                                       | default                 |
|----------------------|-----------------------------------------------|-------------------------|
| `DEMO_DATA_DIR`      | where the demo keeps its files                | `.demo-data`            |
| `DEMO_PORT`          | port of the web app                           | `8000`                  |
| `DEMO_BASE_URL`      | start of the links in the mails               | `http://127.0.0.1:PORT` |
| `DEMO_SMTP_HOST`     | SMTP server the mails go to                   | `127.0.0.1`             |
| `DEMO_SMTP_PORT`     | its port                                      | `8025`                  |
| `DEMO_SECRET`        | key that signs links and session cookies      | random, in the data dir |
| `DEMO_LINK_LIFETIME` | how long a magic link works once mailed       | `5min`                  |
| `DEMO_DISCARD_AFTER` | how long a sign-in mail may wait for a worker | `5min`                  |

The deferq store is `DEFERQ_URL`, by default a SQLite file in the data directory.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from deferq.durations import parse_duration

HOST = "127.0.0.1"
"""The demo listens on loopback only: its secret and mails are not meant for a network."""


@dataclass(frozen=True)
class Settings:
    """Everything the parts of the demo need to know about each other."""

    data_dir: Path
    port: int
    base_url: str
    smtp_host: str
    smtp_port: int
    link_lifetime: timedelta
    discard_after: timedelta
    secret_text: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read the settings from `DEMO_*` variables (see the module docstring)."""
        port = int(environ.get("DEMO_PORT", "8000"))
        return cls(
            data_dir=Path(environ.get("DEMO_DATA_DIR", ".demo-data")).resolve(),
            port=port,
            base_url=environ.get("DEMO_BASE_URL", f"http://{HOST}:{port}").rstrip("/"),
            smtp_host=environ.get("DEMO_SMTP_HOST", HOST),
            smtp_port=int(environ.get("DEMO_SMTP_PORT", "8025")),
            link_lifetime=parse_duration(
                environ.get("DEMO_LINK_LIFETIME", "5min"), name="DEMO_LINK_LIFETIME"
            ),
            discard_after=parse_duration(
                environ.get("DEMO_DISCARD_AFTER", "5min"), name="DEMO_DISCARD_AFTER"
            ),
            secret_text=environ.get("DEMO_SECRET") or None,
        )

    @property
    def deferq_url(self) -> str:
        """The store used when `DEFERQ_URL` is not set."""
        return f"sqlite:///{self.data_dir / 'deferq.sqlite3'}"

    @property
    def mailbox_path(self) -> Path:
        """JSON lines file where the SMTP server keeps the mails it received."""
        return self.data_dir / "mailbox.jsonl"

    @property
    def links_path(self) -> Path:
        """SQLite file of the demo's own: the nonces of the magic links sent."""
        return self.data_dir / "links.sqlite3"

    @property
    def secret(self) -> bytes:
        """`DEMO_SECRET`, or a random key created once in the data directory."""
        if self.secret_text:
            return self.secret_text.encode()
        return _secret_file(self.data_dir / "secret.key")


def _secret_file(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f"{path.name}.{os.getpid()}")
        draft.write_text(secrets.token_hex(32))
        draft.chmod(0o600)
        try:
            # A hard link appears whole or not at all, so two processes starting at once
            # agree on one key: the first link wins, the other process reads it.
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip().encode()
