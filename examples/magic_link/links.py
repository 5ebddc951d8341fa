"""Magic links: signed, short-lived and single-use.

A token is `payload.signature`, both base64url: the payload is JSON with the purpose, the
email, an expiry and a random nonce; the signature is an HMAC-SHA256 of the payload with the
demo's secret. The signature proves the server made the token; the expiry bounds its life;
the nonce, stored server-side when the mail is built and marked used on the first click,
makes it work once. Session cookies use the same signing with another purpose, so neither
kind of token can stand in for the other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from examples.magic_link.config import Settings

LINK = "sign-in"
SESSION = "session"
SESSION_LIFETIME = 24 * 3600
"""Seconds a session cookie keeps a user signed in."""


class LinkRefused(Exception):
    """A magic link that does not sign anyone in; `status` is the HTTP status to answer."""

    status = 400
    title = "This link is not valid"


class TamperedLink(LinkRefused):
    """The token was not made by this server, or was changed since."""


class ExpiredLink(LinkRefused):
    """The token is genuine but older than its lifetime."""

    status = 410
    title = "This link has expired"


class UsedLink(LinkRefused):
    """The token is genuine but has signed someone in already (or its nonce is unknown)."""

    status = 410
    title = "This link was already used"


# Signing


def sign(payload: dict[str, Any], secret: bytes) -> str:
    """`payload` as a token only the holder of `secret` can make."""
    body = _encode(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_encode(_mac(body, secret))}"


def unsign(token: str, secret: bytes, purpose: str) -> dict[str, Any]:
    """The payload of a token made by `sign` for `purpose`; `TamperedLink` for anything else."""
    body, _, signature = token.partition(".")
    try:
        genuine = hmac.compare_digest(_decode(signature), _mac(body, secret))
        payload = json.loads(_decode(body)) if genuine else None
    except (ValueError, binascii.Error):
        payload = None
    if not isinstance(payload, dict) or payload.get("purpose") != purpose:
        raise TamperedLink(f"token refused: not a {purpose} token signed by this server")
    return payload


def _mac(body: str, secret: bytes) -> bytes:
    return hmac.new(secret, body.encode(), hashlib.sha256).digest()


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode() + b"=" * (-len(text) % 4))


# Magic links


def issue_link_token(email: str, settings: Settings, *, now: float | None = None) -> str:
    """A new magic-link token for `email`, valid from `now` (default: the current time) for
    `settings.link_lifetime`; its nonce is stored, unused."""
    now = time.time() if now is None else now
    expires_at = int(now + settings.link_lifetime.total_seconds())
    nonce = secrets.token_urlsafe(16)
    with _links_db(settings.links_path) as db:
        db.execute("DELETE FROM sign_in_links WHERE expires_at < ?", (now - SESSION_LIFETIME,))
        db.execute(
            "INSERT INTO sign_in_links (nonce, email, expires_at) VALUES (?, ?, ?)",
            (nonce, email, expires_at),
        )
    payload = {"purpose": LINK, "email": email, "exp": expires_at, "nonce": nonce}
    return sign(payload, settings.secret)


def redeem_link_token(token: str, settings: Settings, *, now: float | None = None) -> str:
    """The email a magic link signs in, marking the link used; `LinkRefused` if it is
    tampered with, expired or used already."""
    now = time.time() if now is None else now
    payload = unsign(token, settings.secret, LINK)
    if now >= payload["exp"]:
        raise ExpiredLink(f"token expired at {payload['exp']}")
    with _links_db(settings.links_path) as db:
        # One statement checks and marks: of two clicks at once, only one changes the row.
        marked = db.execute(
            "UPDATE sign_in_links SET used_at = ?"
            " WHERE nonce = ? AND email = ? AND used_at IS NULL",
            (now, payload["nonce"], payload["email"]),
        ).rowcount
    if marked != 1:
        raise UsedLink("token used already, or its nonce is unknown")
    return str(payload["email"])


@contextmanager
def _links_db(path: Path) -> Iterator[sqlite3.Connection]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path, timeout=10)) as db, db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS sign_in_links ("
            " nonce TEXT PRIMARY KEY, email TEXT NOT NULL,"
            " expires_at INTEGER NOT NULL, used_at REAL)"
        )
        yield db


# Sessions


def session_cookie(email: str, settings: Settings, *, now: float | None = None) -> str:
    """The value of the cookie that keeps `email` signed in."""
    now = time.time() if now is None else now
    payload = {"purpose": SESSION, "email": email, "exp": int(now + SESSION_LIFETIME)}
    return sign(payload, settings.secret)


def session_email(cookie: str | None, settings: Settings) -> str | None:
    """Who a session cookie signs in, or None if it is missing, forged or old."""
    if not cookie:
        return None
    try:
        payload = unsign(cookie, settings.secret, SESSION)
    except TamperedLink:
        return None
    return str(payload["email"]) if time.time() < payload["exp"] else None
