"""The web app: ask for a sign-in link, click it, see the mailbox and the executions.

GET  /              sign-in form (and who is signed in)
POST /sign-in       form or JSON `email`: enqueue the sign-in mail, answer at once
GET  /magic/{token} sign in with a magic link, or refuse it (4xx)
GET  /mailbox       the mails the local SMTP server received
GET  /executions    recent executions of the sign-in mail as JSON (`?email=` filters)
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

import deferq
from deferq import BackgroundFunction, add_metadata, discard_after
from deferq.durations import format_duration
from examples.magic_link.config import Settings
from examples.magic_link.links import (
    SESSION_LIFETIME,
    LinkRefused,
    redeem_link_token,
    session_cookie,
    session_email,
)
from examples.magic_link.mailserver import read_mailbox
from examples.magic_link.tasks import send_sign_in_email

SESSION_COOKIE = "demo_session"
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MAX_EMAIL_LENGTH = 254
LINK = re.compile(r"https?://\S+")


def create_app(settings: Settings | None = None) -> Starlette:
    """The demo's web app. Everything it needs lives in `app.state`, not in module globals,
    so two apps with different settings can live side by side (tests do that)."""
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/sign-in", sign_in, methods=["POST"]),
            Route("/magic/{token}", magic_link),
            Route("/mailbox", mailbox),
            Route("/executions", executions),
        ]
    )
    app.state.settings = settings or Settings.from_env()
    # The heart of the demo: an execution of this one that has not started within
    # `discard_after` (5 minutes by default) never runs. A late link is no use to anyone.
    app.state.send_expirable = discard_after(send_sign_in_email, app.state.settings.discard_after)
    return app


async def home(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    user = session_email(request.cookies.get(SESSION_COOKIE), settings)
    status = f"<p class=ok>Signed in as <b>{_e(user)}</b>.</p>" if user else ""
    return _page(
        "Sign in",
        f"""{status}
<form method=post action=/sign-in>
  <label>Email <input type=email name=email required autofocus
    placeholder=ada@example.com></label>
  <button>Send me a sign-in link</button>
</form>
<p>The link is mailed by a background function. It is sent once, and only if a worker
starts on it within {_e(format_duration(settings.discard_after))}.</p>""",
    )


async def sign_in(request: Request) -> Response:
    wants_json = request.headers.get("content-type", "").startswith("application/json")
    email = await _submitted_email(request, wants_json)
    if email is None:
        message = "Please give a valid email address."
        if wants_json:
            return JSONResponse({"error": message}, status_code=422)
        return _page("Sign in", f"<p class=error>{message}</p>", status_code=422)

    # Metadata is searchable: GET /executions?email=... lists one user's sign-in mails.
    send: BackgroundFunction[[str], None] = add_metadata(
        request.app.state.send_expirable, {"flow": "sign-in", "email": email}
    )
    execution = await send.call_async(email)

    if wants_json:
        return JSONResponse(
            {"execution_id": execution.id, "email": email, "state": execution.state.value},
            status_code=202,
        )
    return _page(
        "Check your mail",
        f"""<p>A sign-in link is on its way to <b>{_e(email)}</b>.</p>
<p>Execution <code>{_e(execution.id)}</code>: see <a href=/executions>executions</a>.</p>
<p>Open the <a href=/mailbox>mailbox</a> to read it.</p>""",
        status_code=202,
    )


async def _submitted_email(request: Request, as_json: bool) -> str | None:
    body = await request.body()
    try:
        if as_json:
            data = json.loads(body)
            email = data.get("email") if isinstance(data, dict) else None
        else:
            email = parse_qs(body.decode("utf-8")).get("email", [None])[0]
    except ValueError:
        return None
    if not isinstance(email, str):
        return None
    email = email.strip()
    if len(email) > MAX_EMAIL_LENGTH or not EMAIL.fullmatch(email) or not email.isprintable():
        return None
    return email


async def magic_link(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    try:
        email = await asyncio.to_thread(redeem_link_token, request.path_params["token"], settings)
    except LinkRefused as refused:
        return _page(
            refused.title,
            f"<p class=error>{_e(refused.title)}.</p>"
            "<p>Magic links work once, for a few minutes. <a href=/>Ask for a new one</a>.</p>",
            status_code=refused.status,
        )
    response = _page("Signed in", f"<p class=ok>Signed in as <b>{_e(email)}</b>.</p>")
    response.set_cookie(
        SESSION_COOKIE,
        session_cookie(email, settings),
        max_age=SESSION_LIFETIME,
        httponly=True,
        samesite="lax",
    )
    return response


async def mailbox(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    mails = await asyncio.to_thread(read_mailbox, settings.mailbox_path)
    rows = "".join(
        f"<tr><td>{_e(m['received_at'])}</td><td>{_e(m['from'])}</td><td>{_e(m['to'])}</td>"
        f"<td>{_e(m['subject'])}</td><td>{_links(m['text'])}</td></tr>"
        for m in reversed(mails)
    )
    if not rows:
        rows = "<tr><td colspan=5>No mail yet.</td></tr>"
    return _page(
        "Mailbox",
        "<p>Every mail the local SMTP server received, newest first.</p>"
        "<table><tr><th>Received (UTC)<th>From<th>To<th>Subject<th>Link</tr>"
        f"{rows}</table>",
    )


def _links(text: str) -> str:
    return " ".join(f"<a href='{_e(url)}'>open link</a>" for url in LINK.findall(text))


async def executions(request: Request) -> Response:
    email = request.query_params.get("email")
    page = await asyncio.to_thread(
        deferq.list_executions,
        functions=[send_sign_in_email],
        metadata={"email": [email]} if email else None,
        first=20,
    )
    return JSONResponse([_execution_json(e) for e in page.items])


def _execution_json(execution: deferq.Execution) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": execution.id,
        "state": execution.state.value,
        "created_at": iso(execution.created_at),
        "discard_after": iso(execution.discard_after),
        "started_at": iso(execution.started_at),
        "finished_at": iso(execution.finished_at),
        "attempts": execution.attempts,
        "metadata": execution.metadata,
        "error_code": execution.error_code,
        "error_message": execution.error_message,
    }


def _e(text: object) -> str:
    return html.escape(str(text))


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{_e(title)} · deferq demo</title>
<style>
 body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto;
        padding: 0 1rem; }}
 nav a {{ margin-right: 1rem; }}  .ok {{ color: #176b2c; }}  .error {{ color: #a31515; }}
 table {{ border-collapse: collapse; width: 100%; }}
 td, th {{ border-bottom: 1px solid #ddd; padding: .3rem .5rem; text-align: left; }}
</style></head>
<body><nav><a href=/>Sign in</a><a href=/mailbox>Mailbox</a>
<a href=/executions>Executions</a></nav>
<h1>{_e(title)}</h1>
{body}
</body></html>
""",
        status_code=status_code,
    )
