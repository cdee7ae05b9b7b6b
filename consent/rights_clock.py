"""The rights-request clock: due dates counted in Chinese working days.

PIPL Art. 50 asks a handler to answer a data subject's request in time; idgate's default is 15
working days from receipt. A working day is a day of the Asia/Shanghai calendar that is not a
public holiday, or is a make-up working day (调休: a Saturday or Sunday worked to bridge a
holiday). The official calendar comes from the ``chinese-calendar`` package (State Council
notices, one release per year) and can be amended in config (``[rights] holidays`` and
``workdays``): days configured there win, and years the package does not know yet fall back
to Monday-Friday plus the configured days.

Counting: the day of receipt does not count; the request is due at the end (23:59:59.999999,
Asia/Shanghai) of the N-th working day after it. A request is *nearly due* when at most
``nearly_due_working_days`` working days are left, and *overdue* once its due time has passed
while it is still open.

Stopping the clock: while the handler waits on the subject (proof of identity, a request to
clarify), an officer may pause the request's clock and resume it when the answer comes. A
paused request is neither overdue nor nearly due, and its working days left stay what they
were when it was paused. On resume the due date moves by the working days the pause took
(``paused_working_days``): every working day *after* the day of the pause, up to and
*including* the day of the resume. The day of the pause counts as used (the clock ran part
of it); the day of the resume is given back whole, as the day of receipt does not count. So a
pause resumed the same day moves nothing; paused on Wednesday and resumed on Thursday, one
day; paused on Friday and resumed on Monday, one day (the weekend was not working days).
Counted that way, the working days left right after the resume are exactly those left when
the clock was paused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import chinese_calendar

SHANGHAI = ZoneInfo("Asia/Shanghai")
# A due date further away than this many calendar days means a broken calendar (every day a holiday).
_MAX_SPAN_DAYS = 3660


@dataclass(frozen=True)
class WorkingCalendar:
    """Which days are working days in mainland China (Asia/Shanghai)."""

    holidays: frozenset[date] = field(default_factory=frozenset)
    workdays: frozenset[date] = field(default_factory=frozenset)
    official: bool = True  # use the chinese-calendar package for the years it covers

    @classmethod
    def build(
        cls, holidays: Iterable[date] = (), workdays: Iterable[date] = (), *, official: bool = True
    ) -> WorkingCalendar:
        return cls(frozenset(holidays), frozenset(workdays), official)

    def is_working_day(self, day: date) -> bool:
        if day in self.workdays:
            return True
        if day in self.holidays:
            return False
        if self.official:
            try:
                return bool(chinese_calendar.is_workday(day))
            except NotImplementedError:  # a year the package has no data for yet
                pass
        return day.weekday() < 5

    def add_working_days(self, start: date, days: int) -> date:
        """The ``days``-th working day after ``start`` (``start`` itself does not count)."""
        day = start
        for _ in range(_MAX_SPAN_DAYS):
            if days <= 0:
                return day
            day += timedelta(days=1)
            if self.is_working_day(day):
                days -= 1
        raise ValueError("no working day within ten years: check [rights] holidays")

    def working_days_between(self, start: date, end: date) -> int:
        """Working days after ``start`` up to and including ``end`` (negative when ``end`` is before)."""
        if end < start:
            return -self.working_days_between(end, start)
        return sum(
            1 for n in range(1, (end - start).days + 1) if self.is_working_day(start + timedelta(days=n))
        )


def local_day(at: datetime) -> date:
    return at.astimezone(SHANGHAI).date()


@dataclass(frozen=True)
class RightsClock:
    """Due dates and their status for rights requests."""

    calendar: WorkingCalendar
    due_working_days: int = 15
    nearly_due_working_days: int = 3

    def due(self, received: datetime) -> datetime:
        """End of the ``due_working_days``-th working day after the day of receipt, in UTC."""
        day = self.calendar.add_working_days(local_day(received), self.due_working_days)
        return datetime.combine(day, time.max, tzinfo=SHANGHAI).astimezone(UTC)

    def extend(self, due: datetime, working_days: int) -> datetime:
        """A due time moved ``working_days`` working days later (end of that day)."""
        day = self.calendar.add_working_days(local_day(due), working_days)
        return datetime.combine(day, time.max, tzinfo=SHANGHAI).astimezone(UTC)

    def paused_working_days(self, paused_at: datetime, resumed_at: datetime) -> int:
        """The working days a pause gives back: after the day of the pause, up to and including
        the day of the resume (none when resumed the same day)."""
        return max(0, self.calendar.working_days_between(local_day(paused_at), local_day(resumed_at)))

    def working_days_left(self, due: datetime, now: datetime) -> int:
        """Working days from today to the due day (0 on the due day itself, negative when late)."""
        return self.calendar.working_days_between(local_day(now), local_day(due))

    def status(self, due: datetime, now: datetime) -> str:
        """``overdue``, ``nearly_due`` or ``on_time`` for a request still open at ``now``."""
        if now > due:
            return "overdue"
        if self.working_days_left(due, now) <= self.nearly_due_working_days:
            return "nearly_due"
        return "on_time"
