"""The background function of the demo: send a sign-in mail with a magic link.

A worker runs it: `deferq worker examples.magic_link.tasks` (the launcher starts one).
"""

from __future__ import annotations

import logging
import smtplib
from email.message import EmailMessage

from deferq import defer
from deferq.durations import format_duration
from examples.magic_link.config import Settings
from examples.magic_link.links import issue_link_token

logger = logging.getLogger("examples.magic_link.tasks")

MAIL_FROM = "deferq demo <sign-in@demo.localhost>"


# No retry: if the SMTP server took the mail but the answer got lost, a retry would mail a
# second working link. A user who gets nothing asks again; that is safer than two links.
@defer(retry=False)
def send_sign_in_email(email: str) -> None:
    """Mail `email` a one-time link that signs them in for the next few minutes.

    Returns nothing on purpose: a result is stored with the execution, and the link is a
    credential that belongs in the user's mailbox only."""
    settings = Settings.from_env()
    token = issue_link_token(email, settings)
    message = sign_in_message(email, f"{settings.base_url}/magic/{token}", settings)
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=10) as smtp:
        smtp.send_message(message)
    logger.info("Sign-in mail sent", extra={"action": "send_sign_in_mail", "to": email})


def sign_in_message(email: str, link: str, settings: Settings) -> EmailMessage:
    """The mail itself: plain text, the link on a line of its own."""
    message = EmailMessage()
    message["From"] = MAIL_FROM
    message["To"] = email
    message["Subject"] = "Your sign-in link"
    message.set_content(
        "Hello,\n\n"
        "Click this link to sign in:\n\n"
        f"{link}\n\n"
        f"It works once, within {format_duration(settings.link_lifetime)}.\n"
        "If you did not ask to sign in, ignore this mail.\n"
    )
    return message
