"""E-mail to users when their sessions fail (``smtplib``; only when an SMTP host is set).

Every failure is also in the API's event feed (``GET api/events``); mail is the optional
second channel. Sending runs in a thread and never raises: a mail server that is down costs a
log line, not a session.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage

log = logging.getLogger("nsml_server.notify")


@dataclass(frozen=True)
class SMTPSettings:
    """Where and how to send.

    Attributes:
        host: the SMTP server ('' disables mail).
        port: its port (25, 587 with STARTTLS, 465 with TLS).
        sender: the From address.
        to_template: the address of a user, ``{user}`` replaced by the user name, e.g.
            ``{user}@lab.example.org``.
        security: ``none``, ``starttls`` or ``tls``.
        username: login name ('' for no login).
        password: login password.
        timeout_s: connection timeout.
        base_url: the hub's public URL for links in the message ('' for none).
    """

    host: str = ""
    port: int = 25
    sender: str = "nsml@localhost"
    to_template: str = "{user}"
    security: str = "none"
    username: str = ""
    password: str = ""
    timeout_s: float = 30.0
    base_url: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.host)


def failure_message(
    settings: SMTPSettings, user: str, session: str, state: str, message: str, log_tail: str
) -> EmailMessage:
    """The e-mail telling *user* that *session* ended *state* (pure)."""
    msg = EmailMessage()
    msg["From"] = settings.sender
    msg["To"] = settings.to_template.format(user=user)
    msg["Subject"] = f"[nsml] {session} {state.replace('_', ' ')}"
    lines = [
        f"Your session {session} ended: {state}.",
        "",
        message,
        "",
        f"Logs: nsml logs {session}",
    ]
    if settings.base_url:
        lines.append(f"Hub: {settings.base_url}")
    if log_tail.strip():
        tail = "\n".join(log_tail.splitlines()[-40:])
        lines += ["", "The end of its output:", "", tail]
    msg.set_content("\n".join(lines) + "\n")
    return msg


def send(settings: SMTPSettings, msg: EmailMessage) -> None:
    """Deliver *msg* (blocking). Raises what smtplib raises."""
    if settings.security == "tls":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            settings.host,
            settings.port,
            timeout=settings.timeout_s,
            context=ssl.create_default_context(),
        )
    else:
        smtp = smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout_s)
    with smtp:
        if settings.security == "starttls":
            smtp.starttls(context=ssl.create_default_context())
        if settings.username:
            smtp.login(settings.username, settings.password)
        smtp.send_message(msg)


class Notifier:
    """Sends failure mail when SMTP is configured; a callable for the session runner."""

    def __init__(self, settings: SMTPSettings) -> None:
        self.settings = settings

    def __call__(self, user: str, session: str, state: str, message: str, log_tail: str) -> None:
        if not self.settings.enabled:
            return
        msg = failure_message(self.settings, user, session, state, message, log_tail)
        try:
            send(self.settings, msg)
            log.info("%s: mailed %s about %s", session, msg["To"], state)
        except Exception as e:
            log.warning(
                "%s: could not mail %s through %s:%d: %s",
                session,
                msg["To"],
                self.settings.host,
                self.settings.port,
                e,
            )
