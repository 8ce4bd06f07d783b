"""An SMTP sink run INSIDE a container (python3 + Debian's python3-aiosmtpd of the shared
local image): STARTTLS required before AUTH and before mail, AUTH required, each accepted
mail written to MAILBOX as one JSON file, each refused login appended to MAILBOX/failed-logins.

Arguments: MAILBOX CERT KEY USERNAME PASSWORD_FILE PORT. Standalone on purpose (stdlib +
aiosmtpd only): the test mounts this file into the container. The way it checks logins
and the LOGIN prompts are the ones of tests/monitoring/live.py's in-process sink.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hmac
import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


class Sink:
    def __init__(self, mailbox: Path, username: str, password: str) -> None:
        self.mailbox = mailbox
        self.username = username
        self.password = password
        self.count = 0

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode(errors="replace")
        ok = login == self.username and hmac.compare_digest(
            auth_data.password, self.password.encode()
        )
        if not ok:
            with (self.mailbox / "failed-logins").open("a") as log:
                log.write(f"{mechanism} as {login!r} at {time.time():.0f}\n")
        return AuthResult(success=ok, auth_data=auth_data)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        body = message.get_body(preferencelist=("plain", "html"))
        auth = session.auth_data if isinstance(session.auth_data, LoginPassword) else None
        self.count += 1
        record = {
            "subject": str(message["Subject"]),
            "from": envelope.mail_from,
            "recipients": list(envelope.rcpt_tos),
            "login": auth.login.decode() if auth else "",
            "tls": session.ssl is not None,
            "received_at": time.time(),
            "body": body.get_content() if body is not None else "",
        }
        # Written then renamed: the reader never sees half a file.
        partial = self.mailbox / f".{self.count:04d}.json"
        partial.write_text(json.dumps(record))
        partial.rename(self.mailbox / f"{self.count:04d}.json")
        return "250 OK"


class StandardLoginSMTP(SMTP):
    # The AUTH LOGIN prompts real servers send; Alertmanager's LOGIN client needs them.
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"


def main(mailbox: str, cert: str, key: str, username: str, password_file: str, port: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sink = Sink(Path(mailbox), username, Path(password_file).read_text().strip())

    def factory() -> SMTP:
        return StandardLoginSMTP(
            sink,
            tls_context=context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            authenticator=sink.authenticate,
        )

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(factory, host="0.0.0.0", port=int(port)))  # noqa: S104 - inside its container
    print(f"smtp sink listening on {server.sockets[0].getsockname()}", flush=True)
    loop.run_forever()


if __name__ == "__main__":
    main(*sys.argv[1:])
