"""Who may sign in to the console: admin tokens (``gateway.auth.AdminTokens``) and the
configured console users (name and Argon2id password hash, argon2-cffi), and how many
failed attempts a name or a client network gets (counted in the gateway's rate-limit
store: memory embedded, Redis shared by every replica).

A session names its officer by a principal: ``token:<sha256 of the token>`` or
``user:<name>``, resolved again on every request.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.auth import AdminTokens, Officer
from gateway.config import ConsoleUser
from gateway.rate_limits import CounterStore, Hit

# Failed sign-ins before further attempts are refused for the rest of the window.
FAILURES_PER_NAME = 10
FAILURES_PER_NETWORK = 30
FAILURE_WINDOW_SECONDS = 900


@dataclass(frozen=True)
class ConsoleAccount:
    officer: Officer
    password_argon2: str


class ConsoleAccounts:
    def __init__(self, users: Sequence[ConsoleUser]) -> None:
        self.hasher = PasswordHasher()
        self.by_name = {
            u.name: ConsoleAccount(Officer(u.name, u.role, frozenset(u.tenants)), u.password_argon2)
            for u in users
        }
        # an unknown name costs one verification too: the answer time does not tell names apart
        self._unknown = self.hasher.hash(secrets.token_urlsafe(24))

    def password(self, name: str, password: str) -> Officer | None:
        """The officer of this name and password (blocking: Argon2 is slow on purpose)."""
        account = self.by_name.get(name)
        try:
            self.hasher.verify(account.password_argon2 if account else self._unknown, password)
        except (VerificationError, InvalidHashError):
            return None
        return account.officer if account else None

    @staticmethod
    def token_principal(token: str) -> str:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()

    def officer(self, principal: str, tokens: AdminTokens) -> Officer | None:
        kind, _, value = principal.partition(":")
        if kind == "token":
            return tokens.index.get(value)
        if kind == "user":
            account = self.by_name.get(value)
            return account.officer if account else None
        return None


def _failure_hits(name: str, network: str, amount: int) -> tuple[Hit, Hit]:
    # amount 0 reads: over when the failures so far already reach the limit
    spare = 1 if amount == 0 else 0
    return (
        Hit("console_sign_in_failures_per_name", f"{{console}}:fail:name:{name}", amount,
            FAILURES_PER_NAME - spare, FAILURE_WINDOW_SECONDS),
        Hit("console_sign_in_failures_per_network", f"{{console}}:fail:net:{network}", amount,
            FAILURES_PER_NETWORK - spare, FAILURE_WINDOW_SECONDS),
    )  # fmt: skip


async def may_try(store: CounterStore, name: str, network: str) -> bool:
    """Whether this name and client network may still try to sign in."""
    return await store.hit(_failure_hits(name, network, 0)) is None


async def count_failure(store: CounterStore, name: str, network: str) -> None:
    await store.hit(_failure_hits(name, network, 1))
