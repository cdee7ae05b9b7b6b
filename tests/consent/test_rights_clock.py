"""The rights-request clock: 15 Chinese working days, public holidays and make-up working days
(chinese-calendar, amended by config), and the open requests' status at a given time."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from consent.rights_clock import SHANGHAI, RightsClock, WorkingCalendar, local_day

OFFICIAL = WorkingCalendar.build()


def test_national_day_week_is_skipped_and_the_make_up_saturday_counts() -> None:
    # 2026: 1-7 October are holidays, Saturday 10 October is a make-up working day.
    assert not OFFICIAL.is_working_day(date(2026, 10, 1))
    assert OFFICIAL.is_working_day(date(2026, 10, 10))
    # received on Wednesday 30 September: 15 working days are 8, 9 and 10 Oct (make-up
    # Saturday), 12-16, 19-23, 26 and 27 October -> due on Tuesday 27 October, end of day.
    assert OFFICIAL.add_working_days(date(2026, 9, 30), 15) == date(2026, 10, 27)
    clock = RightsClock(OFFICIAL)
    received = datetime(2026, 9, 30, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai
    due = clock.due(received)
    assert due.astimezone(SHANGHAI).date() == date(2026, 10, 27)
    assert due.astimezone(SHANGHAI).hour == 23


def test_without_holidays_fifteen_working_days_are_three_weeks() -> None:
    plain = WorkingCalendar.build(official=False)
    assert plain.add_working_days(date(2026, 9, 30), 15) == date(2026, 10, 21)


def test_spring_festival_2026_is_skipped() -> None:
    # 2026 Spring Festival: 15-23 February off, make-up working days on Sat 14 and Sat 28 Feb.
    assert not OFFICIAL.is_working_day(date(2026, 2, 16))
    assert OFFICIAL.is_working_day(date(2026, 2, 14)) and OFFICIAL.is_working_day(date(2026, 2, 28))
    assert OFFICIAL.add_working_days(date(2026, 2, 13), 1) == date(2026, 2, 14)
    assert OFFICIAL.add_working_days(date(2026, 2, 14), 1) == date(2026, 2, 24)


def test_config_days_win_and_later_years_fall_back_to_weekdays_plus_config() -> None:
    cal = WorkingCalendar.build(holidays=[date(2027, 1, 1)], workdays=[date(2027, 1, 9)])
    assert not cal.is_working_day(date(2027, 1, 1))  # a Friday, from config
    assert cal.is_working_day(date(2027, 1, 9))  # a Saturday worked, from config
    assert cal.is_working_day(date(2027, 1, 4)) and not cal.is_working_day(date(2027, 1, 10))
    assert cal.add_working_days(date(2026, 12, 31), 2) == date(2027, 1, 5)


def test_a_request_becomes_nearly_due_then_overdue() -> None:
    clock = RightsClock(OFFICIAL, due_working_days=15, nearly_due_working_days=3)
    received = datetime(2026, 11, 2, 2, 0, tzinfo=UTC)  # Monday 2 November, Shanghai
    due = clock.due(received)
    assert local_day(due) == date(2026, 11, 23)
    assert clock.status(due, datetime(2026, 11, 10, tzinfo=UTC)) == "on_time"
    assert clock.status(due, datetime(2026, 11, 18, 2, tzinfo=UTC)) == "nearly_due"  # 3 working days left
    assert clock.working_days_left(due, datetime(2026, 11, 23, 2, tzinfo=UTC)) == 0
    assert clock.status(due, datetime(2026, 11, 23, 15, 59, tzinfo=UTC)) == "nearly_due"
    assert clock.status(due, datetime(2026, 11, 23, 16, 0, tzinfo=UTC)) == "overdue"  # midnight Shanghai
    assert clock.working_days_left(due, datetime(2026, 11, 25, 2, tzinfo=UTC)) == -2


@pytest.mark.parametrize("days", [0, -3])
def test_no_working_days_to_add_is_the_day_itself(days: int) -> None:
    assert OFFICIAL.add_working_days(date(2026, 10, 1), days) == date(2026, 10, 1)


def test_a_pause_gives_back_the_working_days_after_its_day_up_to_the_day_of_the_resume() -> None:
    clock = RightsClock(OFFICIAL)
    at = lambda text: datetime.fromisoformat(f"{text}+08:00")  # noqa: E731 - Shanghai local time
    # the same day, however long: nothing
    assert clock.paused_working_days(at("2026-11-25T00:01:00"), at("2026-11-25T23:59:00")) == 0
    # Wednesday to Thursday: one; Friday evening to Monday morning: one (the weekend is not worked)
    assert clock.paused_working_days(at("2026-11-25T17:00:00"), at("2026-11-26T09:00:00")) == 1
    assert clock.paused_working_days(at("2026-11-27T17:00:00"), at("2026-11-30T09:00:00")) == 1
    # across National Day: 30 September to 8 October gives back 8 October only
    assert clock.paused_working_days(at("2026-09-30T10:00:00"), at("2026-10-08T10:00:00")) == 1
    # the days left after the resume are the days left at the pause
    due = clock.due(at("2026-11-02T10:00:00"))
    paused, resumed = at("2026-11-04T10:00:00"), at("2026-11-24T14:00:00")
    moved = clock.extend(due, clock.paused_working_days(paused, resumed))
    assert local_day(moved) == date(2026, 12, 11)
    assert clock.working_days_left(moved, resumed) == clock.working_days_left(due, paused) == 13
