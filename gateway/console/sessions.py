"""Sessions of the compliance console: who signed in, their CSRF token, when it ends.

A session lives in a Litestar store (memory in the embedded mode, the gateways' Redis in
distributed mode, so every replica knows it) under the SHA-256 of its id: the id itself is
only in the officer's cookie. Sign-in always starts a new session (a session id planted
before sign-in is never promoted: no fixation); the session ends after ``idle_seconds``
without a request, after ``absolute_seconds`` in any case, and at sign-out.

The session holds who signed in (a principal: the SHA-256 of the admin token, or the
console user's name), not the officer: each request resolves it again through the
configuration, so a token or user taken out of it (and the gateway restarted) ends its
sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import msgspec
from litestar.stores.base import Store

SESSION_COOKIE = "idgate_console"
# The sign-in form's CSRF token, before there is a session (double submit: cookie and field).
SIGN_IN_COOKIE = "idgate_console_sign_in"
LANGUAGE_COOKIE = "idgate_console_lang"


class ConsoleSession(msgspec.Struct, frozen=True):
    principal: str  # gateway.console.accounts
    csrf: str
    started_at: float


@dataclass(frozen=True)
class ConsoleSessions:
    store: Store
    idle_seconds: int
    absolute_seconds: int

    @staticmethod
    def key(session_id: str) -> str:
        """The store key of a session: the hash of its id (a copy of the store holds no id)."""
        return "console-session:" + hashlib.sha256(session_id.encode()).hexdigest()

    async def start(self, principal: str) -> tuple[str, ConsoleSession]:
        """A new session (new id, new CSRF token) for this principal."""
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(principal=principal, csrf=secrets.token_urlsafe(32), started_at=time.time())
        await self.store.set(self.key(session_id), msgspec.json.encode(session), expires_in=self.idle_seconds)
        return session_id, session

    async def get(self, session_id: str) -> ConsoleSession | None:
        """The live session of this id (its idle time starts again), or None."""
        if not session_id or len(session_id) > 128:
            return None
        raw = await self.store.get(self.key(session_id), renew_for=self.idle_seconds)
        if raw is None:
            return None
        session = msgspec.json.decode(raw, type=ConsoleSession)
        if time.time() - session.started_at > self.absolute_seconds:
            await self.end(session_id)
            return None
        return session

    async def end(self, session_id: str) -> None:
        if session_id and len(session_id) <= 128:
            await self.store.delete(self.key(session_id))


def same_token(expected: str, given: str | None) -> bool:
    """A CSRF token check in constant time."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())
