"""The health section's last hour (gateway.health.HealthHistory): everything since start
while the process is younger than an hour, then the increase since the snapshot an hour
ago; one snapshot a minute, a bounded number kept."""

from __future__ import annotations

from gateway.health import HealthHistory
from tests.waiting import ManualClock


def test_the_last_hour_is_since_start_then_the_increase_over_an_hour() -> None:
    clock = ManualClock()
    history = HealthHistory(clock)
    merges = 0.0

    def read(tenant: str) -> dict[str, float]:
        return {"merges": merges}

    for minute in range(200):  # one merge a minute, the refresh loop every 20 s
        for _ in range(3):
            history.note(["mall"], read)
            clock.now += 20
        merges += 1
        if minute == 30:
            hour, minutes = history.last_hour("mall", {"merges": merges})
            assert hour == {"merges": 31} and round(minutes) == 31  # young: since start
    hour, minutes = history.last_hour("mall", {"merges": merges})
    # the snapshot at most an hour old, taken on the minute: 60 merges since, over 60 min
    assert hour == {"merges": 60} and minutes == 60
    assert len(history.snapshots) <= 62


def test_a_tenant_or_figure_new_since_the_snapshot_counts_from_zero() -> None:
    clock = ManualClock()
    history = HealthHistory(clock)
    history.note(["mall"], lambda t: {"merges": 5.0})
    clock.now += 3700
    history.note(["mall"], lambda t: {"merges": 9.0})
    hour, _ = history.last_hour("mall", {"merges": 12.0, "dropped:no_consent": 2.0})
    assert hour == {"merges": 7.0, "dropped:no_consent": 2.0}
    assert history.last_hour("shop", {"merges": 1.0})[0] == {"merges": 1.0}
