"""A local SMTP server that keeps every mail it receives in a JSON lines file, so that the
web app can show a mailbox and no mail leaves the machine."""

from __future__ import annotations

import email
import email.policy
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from examples.magic_link.config import HOST, Settings

logger = logging.getLogger("examples.magic_link.mailserver")


class MailboxHandler:
    """aiosmtpd handler: append each message to the mailbox file, one JSON object a line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        record = mail_record(envelope.mail_from, list(envelope.rcpt_tos), content)
        # One write of one line in append mode: a reader sees the whole line or none of it.
        with self.path.open("a", encoding="utf-8") as mailbox:
            mailbox.write(json.dumps(record, ensure_ascii=False) + "\n")
        logger.info(
            "Mail received",
            extra={"action": "receive_mail", "to": record["to"], "subject": record["subject"]},
        )
        return "250 Message accepted for delivery"


def mail_record(mail_from: str, rcpt_tos: list[str], content: bytes) -> dict[str, Any]:
    """What the mailbox keeps of one message."""
    message = email.message_from_bytes(content, policy=email.policy.default)
    body = message.get_body(preferencelist=("plain",))
    return {
        "received_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mail_from": mail_from,
        "rcpt_tos": rcpt_tos,
        "from": str(message.get("From", "")),
        "to": str(message.get("To", "")),
        "subject": str(message.get("Subject", "")),
        "text": body.get_content().replace("\r\n", "\n") if body is not None else "",
    }


def read_mailbox(path: Path) -> list[dict[str, Any]]:
    """Every mail received so far, oldest first."""
    if not path.exists():
        return []
    mails = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            mails.append(json.loads(line))
        except ValueError:
            continue  # a line still being written
    return mails


def start_mailserver(settings: Settings) -> Controller:
    """Start the SMTP server in a thread of its own; call `.stop()` on the result to stop it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        MailboxHandler(settings.mailbox_path), hostname=HOST, port=settings.smtp_port
    )
    controller.start()
    logger.info(
        "SMTP server started",
        extra={"action": "start_mailserver", "address": f"{HOST}:{settings.smtp_port}"},
    )
    return controller
