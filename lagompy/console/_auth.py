"""Who may act in the console: a bearer token (the console's ``token`` setting), or a browser
session made by posting that token once to the login page.

The session cookie holds a random nonce and its HMAC under the token (HttpOnly,
SameSite=Strict, limited to the console's path): changing the token ends every session. Each
form carries a CSRF token, the HMAC of the session's nonce under another label: a page of
another site cannot read it, so it cannot post a form that passes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from starlette.requests import Request

from lagompy.console._settings import ConsoleSettings

__all__ = ["COOKIE", "Auth", "Caller"]

#: The session cookie's name.
COOKIE = "lagompy_console"


@dataclass(frozen=True)
class Caller:
    """Who sends a request: ``session`` (the nonce of a browser session) or None for a bearer
    token; ``actor`` names them in the audit log."""

    actor: str
    session: str | None


class Auth:
    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        token = settings.token
        self._key = None if token is None else token.encode()

    def _mac(self, label: str, nonce: str) -> str:
        assert self._key is not None
        return hmac.new(self._key, f"{label}:{nonce}".encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        if self._key is None:
            return False
        return hmac.compare_digest(given.encode(), self._key)

    def new_session(self) -> str:
        """A session cookie's value."""
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._mac('session', nonce)}"

    def session_of(self, request: Request) -> str | None:
        """The nonce of the request's valid session cookie, or None."""
        if self._key is None:
            return None
        value = request.cookies.get(COOKIE, "")
        nonce, _, mac = value.partition(".")
        if not nonce or not hmac.compare_digest(mac.encode(), self._mac("session", nonce).encode()):
            return None
        return nonce

    def csrf_for(self, session: str) -> str:
        return self._mac("csrf", session)

    def csrf_matches(self, session: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf_for(session).encode())

    def actor(self, request: Request, how: str) -> str:
        """Who acts, for the audit log: the trusted proxy's user header when configured,
        else how they signed in; with the client's address."""
        header = self.settings.user_header
        who = request.headers.get(header, "").strip() if header else ""
        client = request.client.host if request.client is not None else "?"
        return f"{who[:100] or how} ({client})"
