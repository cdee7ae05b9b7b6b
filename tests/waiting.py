"""Waiting for a condition instead of sleeping: poll it until a deadline, then fail naming
what was awaited.

A fixed sleep is either too short on a loaded machine (a flaky failure) or too long
everywhere else (a slow suite). Wait for the thing itself:

    lines = wait_until(lambda: gw.sink_lines("hook"), what="a line in the hook sink")
    await async_wait_until(lambda: outbox.pending() == 0, what="the outbox drained")

To assert that something did NOT happen, wait for a later event that proves the pipeline
moved past the point where it would have happened (a sentinel sent after it arrived, the
outbox has nothing in flight), then assert; never sleep "long enough".
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.02


class ManualClock:
    """A ``time.time``-like clock the test moves by hand (``clock.now += 2``), for code that
    takes its clock as a parameter: never a sleep."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class WaitTimeout(AssertionError):
    """The awaited condition did not hold before the deadline."""


def _timed_out(what: str, timeout: float, last: object) -> WaitTimeout:
    return WaitTimeout(f"timed out after {timeout:g}s waiting for {what} (last value: {last!r:.300})")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = POLL_SECONDS,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that; fail with
    ``what`` in the message once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = POLL_SECONDS,
) -> T:
    """``wait_until`` for a running event loop: ``predicate`` may be sync or return an
    awaitable, and the loop keeps running the code under test between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)
