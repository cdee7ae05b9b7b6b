"""Alert rules without a clock: the verdicts, the cooldown and resolve transitions of the
evaluator, and bad alert configuration named by check_config or refused at start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from export.alert_history import ChannelDelivery
from export.alerts import AlertEvaluator, AlertRule, LocalLease, MemoryStateStore, Notice, Notifier, evaluate
from export.kpis import DEFAULT_KPIS, KpiEngine, KpiEvent, KpiReport, KpiWindow, MemoryKpiStore, WindowValue
from gateway.config import ConfigProblems, parse_config
from tests.conftest import TEST_CONFIG
from tests.gateway.conftest import in_process_app

DROP = AlertRule(
    id="drop", kpi="payment_success_rate", window=10, condition="drop", threshold=0.2, min_volume=10
)


def test_verdicts() -> None:
    assert evaluate(DROP, WindowValue(0.70, 20, 20, 1.0, previous=0.95)) == "firing"
    assert evaluate(DROP, WindowValue(0.80, 20, 20, 1.0, previous=0.95)) == "ok"  # -16 %
    # below the minimum volume the rule stays quiet, whatever the rate
    assert evaluate(DROP, WindowValue(0.0, 9, 9, 1.0, previous=0.95)) == "quiet"
    assert evaluate(DROP, WindowValue(None, 20, 20, 1.0, previous=0.95)) == "quiet"
    assert evaluate(DROP, WindowValue(0.5, 20, 20, 1.0, previous=None)) == "ok"  # nothing to compare
    below = AlertRule(id="gmv", kpi="gmv", condition="below", threshold=100)
    assert evaluate(below, WindowValue(99, 1, 1, 1.0)) == "firing"
    rise = AlertRule(id="r", kpi="orders", condition="rise", threshold=0.5)
    assert evaluate(rise, WindowValue(16, 16, 16, 1.0, previous=10)) == "firing"


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__([], env={})
        self.sent: list[tuple[str, str]] = []

    async def send(self, channel_id: str, notice: Notice) -> ChannelDelivery:
        self.sent.append((channel_id, notice.status))
        return ChannelDelivery(channel_id, "webhook", True, 1)


def report(value: float | None, previous: float | None, volume: int = 20) -> dict[str, list[KpiReport]]:
    v = WindowValue(value, volume, volume, 1.0, previous=previous)
    window = KpiWindow(minutes=10, total=v, by_platform={}, by_source={})
    return {"mall": [KpiReport("payment_success_rate", "ratio", "", "", [window])]}


def test_fires_once_resolves_once_and_cools_down() -> None:
    rule = AlertRule(**{**{f: getattr(DROP, f) for f in DROP.__struct_fields__}, "channels": ["a", "b"]})
    notifier = Recorder()
    evaluator = AlertEvaluator({"mall": [rule]}, MemoryStateStore(), LocalLease("me"), notifier, 60)

    async def run() -> None:
        await evaluator.run(report(0.7, 0.95), now=1000)
        await evaluator.run(report(0.7, 0.95), now=1010)  # still firing: nothing new
        await evaluator.run(report(0.0, 0.95, volume=3), now=1020)  # quiet: keeps firing
        assert notifier.sent == [("a", "firing"), ("b", "firing")]
        await evaluator.run(report(0.95, 0.7), now=1030)
        assert notifier.sent[2:] == [("a", "resolved"), ("b", "resolved")]
        # fires again within the cooldown (600 s): the state changes, nobody is paged again
        await evaluator.run(report(0.5, 0.95), now=1100)
        assert len(notifier.sent) == 4 and evaluator.firing[("mall", "drop")]
        await evaluator.run(report(0.95, 0.5), now=1200)
        await evaluator.run(report(0.5, 0.95), now=1700)
        assert notifier.sent[-2:] == [("a", "firing"), ("b", "firing")]

    asyncio.run(run())


def _with(extra: str) -> str:
    return TEST_CONFIG + extra


def test_bad_alert_config_is_named() -> None:
    bad = _with(
        """
[[tenants.alerts]]
id = "x"
kpi = "nope"
window = 7
condition = "drop"
threshold = 20
channels = ["pager"]

[[alert_channels]]
id = "robot"
kind = "dingtalk"
url_env = "DING_URL"
"""
    )
    with pytest.raises(ConfigProblems) as err:
        parse_config(bad, dev=True)
    problems = err.value.problems
    assert "tenants[1].alerts[0].kpi: unknown KPI 'nope'" in problems
    assert "tenants[1].alerts[0].window: must be one of 1, 5, 10, 60 (buckets)" in problems
    assert "tenants[1].alerts[0].threshold: a relative change is a fraction between 0 and 1" in problems
    assert "tenants[1].alerts[0].channels: unknown channel 'pager'" in problems
    assert (
        "alert_channels[0].secret_env: a dingtalk robot needs its signing secret (variable name)" in problems
    )


def test_a_channel_secret_missing_from_the_environment_stops_the_start(tmp_path: Path) -> None:
    config = _with(
        """
[[alert_channels]]
id = "robot"
kind = "wecom"
url_env = "IDGATE_TEST_UNSET_WECOM_URL"
"""
    )
    with pytest.raises(ConfigProblems) as err:
        in_process_app(tmp_path, config)
    assert err.value.problems == ["alert_channels 'robot': url_env IDGATE_TEST_UNSET_WECOM_URL is not set"]


def test_a_rule_fires_only_after_holding_for_its_duration() -> None:
    rule = AlertRule(
        id="drop",
        kpi="payment_success_rate",
        window=10,
        condition="drop",
        threshold=0.2,
        for_seconds=60,
        channels=["a"],
    )
    notifier = Recorder()
    states = MemoryStateStore()
    evaluator = AlertEvaluator({"mall": [rule]}, states, LocalLease("me"), notifier, 60)

    async def run() -> None:
        await evaluator.run(report(0.7, 0.95), now=1000)
        assert states.states["mall"]["drop"].state == "pending" and not evaluator.firing[("mall", "drop")]
        await evaluator.run(report(0.9, 0.95), now=1030)  # recovered before 60 s: never paged
        assert states.states["mall"]["drop"].state == "ok" and notifier.sent == []
        await evaluator.run(report(0.7, 0.95), now=1100)
        await evaluator.run(report(0.0, 0.95, volume=3), now=1130)  # quiet: keeps pending
        await evaluator.run(report(0.7, 0.95), now=1159)
        assert notifier.sent == []
        await evaluator.run(report(0.7, 0.95), now=1160)  # held 60 s since 1100
        assert notifier.sent == [("a", "firing")] and states.states["mall"]["drop"].since == 1100

    asyncio.run(run())


def test_day_and_week_comparisons() -> None:
    week = AlertRule(id="w", kpi="orders", condition="drop", threshold=0.5, compare="week_ago")
    assert evaluate(week, WindowValue(40, 40, 40, 1.0, previous=100, week_ago=100)) == "firing"
    assert evaluate(week, WindowValue(40, 40, 40, 1.0, previous=100, week_ago=60)) == "ok"
    assert evaluate(week, WindowValue(40, 40, 40, 1.0, previous=100)) == "ok"  # not kept: no change seen
    day = AlertRule(id="d", kpi="orders", condition="rise", threshold=0.5, compare="day_ago")
    assert evaluate(day, WindowValue(40, 40, 40, 1.0, previous=40, day_ago=20)) == "firing"


def test_comparisons_beyond_the_kpi_history_are_refused() -> None:
    rules = """
[[tenants.alerts]]
id = "vs-last-week"
kpi = "orders"
window = 60
condition = "drop"
threshold = 0.3
compare = "week_ago"

[[tenants.alerts]]
id = "below-vs-day"
kpi = "orders"
condition = "below"
compare = "day_ago"
for_seconds = -1
"""
    # the mall (second tenant) keeps a week minus a day
    config = _with(rules).replace('id = "mall"', 'id = "mall"\nkpi_history_days = 6', 1)
    with pytest.raises(ConfigProblems) as err:
        parse_config(config, dev=True)
    problems = err.value.problems
    assert (
        "tenants[1].alerts[0].compare: week_ago over a 60-bucket window reaches back 7.04 days, "
        "beyond the tenant's kpi_history_days (6)"
    ) in problems
    assert "tenants[1].alerts[1].compare: only a drop or rise compares with day_ago" in problems
    assert "tenants[1].alerts[1]: min_volume, for_seconds and cooldown_seconds cannot be negative" in problems
    assert not [p for p in problems if "alerts[0]" in p and "week_ago" not in p]
    # the default (8 days) holds a week and an hour
    parse_config(_with(rules.split('[[tenants.alerts]]\nid = "below')[0]), dev=True)
    huge = _with("").replace('id = "mall"', 'id = "mall"\nkpi_history_days = 400', 1)
    with pytest.raises(ConfigProblems, match="kpi_history_days: must be between 0 and 35"):
        parse_config(huge, dev=True)


def test_the_dev_clock_is_refused_outside_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.settings import Settings, SettingsError

    monkeypatch.setenv("IDGATE_ENV", "production")
    monkeypatch.setenv("IDGATE_KEYS", "{}")
    monkeypatch.setenv("IDGATE_LEDGER_KEY", "x")
    monkeypatch.setenv("IDGATE_DEV_CLOCK_FILE", "/tmp/clock")
    with pytest.raises(SettingsError, match="IDGATE_DEV_CLOCK_FILE is for tests"):
        Settings.from_env()


def test_source_and_coverage_rules_are_checked() -> None:
    bad = _with(
        """
[[tenants.alerts]]
id = "silent"
kpi = "orders"
source = "nowhere"

[[tenants.alerts]]
id = "silent-vs-yesterday"
kpi = "orders"
source = "mall-web"
condition = "drop"
threshold = 0.5
compare = "day_ago"

[[tenants.alerts]]
id = "coverage-drop"
kpi = "orders"
measure = "coverage"
condition = "drop"
threshold = 0.5
"""
    )
    with pytest.raises(ConfigProblems) as err:
        parse_config(bad, dev=True)
    problems = err.value.problems
    assert "tenants[1].alerts[0].source: unknown source 'nowhere'" in problems
    # a source compared with its own day or week earlier: kept for it (export.kpis)
    assert not [p for p in problems if p.startswith("tenants[1].alerts[1].")], problems
    assert "tenants[1].alerts[2].measure: coverage compares with a threshold (below / above)" in problems


def test_a_short_window_against_a_longer_baseline_pages_on_a_step_drop_mid_minute() -> None:
    """95 % -> 70 % half way through a minute: against the minute before, neither that
    minute (half at 95 %) nor the next (against the mixed one) falls 20 %; the next minute
    against the ten before it does, 5 s in (as soon as it holds ``min_volume`` payments)."""
    start = 600_000.0  # a minute boundary
    now = [start]
    kpis = [d for d in DEFAULT_KPIS if d.id.startswith("payment")]
    engine = KpiEngine(MemoryKpiStore(122), {"mall": kpis}, {"mall": {"web": "web"}}, clock=lambda: now[0])
    rules = [
        AlertRule(
            id="own", kpi="payment_success_rate", window=1, condition="drop", threshold=0.2, min_volume=50
        ),
        AlertRule(
            id="base",
            kpi="payment_success_rate",
            window=1,
            condition="drop",
            threshold=0.2,
            min_volume=50,
            baseline=10,
        ),
    ]
    evaluator = AlertEvaluator({"mall": rules}, MemoryStateStore(), LocalLease("me"), Recorder(), 60)
    assert evaluator.baselines("mall") == {"payment_success_rate": {(1, 10)}}

    def payments(rate: float, n: int) -> list[KpiEvent]:
        basis = frozenset({"necessary_service"})
        requested = [KpiEvent("Payment Requested", None, {}, basis, None) for _ in range(n)]
        return requested + [
            KpiEvent("Payment Succeeded", None, {}, basis, None) for _ in range(round(n * rate))
        ]

    async def at(second: float, rate: float, n: int) -> dict[str, str]:
        """``n`` payments at ``rate``, ``second`` s after the start; the verdicts then."""
        now[0] = start + second
        await engine.observe("mall", "web", payments(rate, n))
        value = (await engine.report("mall", windows=(1,), baselines=evaluator.baselines("mall")))[-1]
        return {r.id: evaluate(r, value.windows[0].total) for r in rules}

    async def run() -> None:
        for m in range(10):
            await at(60 * m + 1, 0.95, 40)
            assert await at(60 * m + 31, 0.95, 40) == {"own": "ok", "base": "ok"}
        assert await at(601, 0.95, 40) == {"own": "quiet", "base": "quiet"}  # under min_volume
        assert await at(631, 0.70, 40) == {"own": "ok", "base": "ok"}  # the drop: -13 % so far
        # 5 s into the next minute: 70 % against the mixed minute (82.5 %) is -15 %, against
        # the ten minutes before (93.75 %) -25 %
        assert await at(665, 0.70, 60) == {"own": "ok", "base": "firing"}

    asyncio.run(run())


def test_a_baseline_is_checked() -> None:
    bad = _with(
        """
[[tenants.alerts]]
id = "b1"
kpi = "payment_success_rate"
window = 1
condition = "below"
threshold = 0.5
baseline = 10

[[tenants.alerts]]
id = "b2"
kpi = "payment_success_rate"
window = 1
condition = "drop"
threshold = 0.2
baseline = 61
"""
    )
    with pytest.raises(ConfigProblems) as err:
        parse_config(bad, dev=True)
    problems = err.value.problems
    assert (
        "tenants[1].alerts[0].baseline: only a drop or rise against the window before has a baseline"
        in problems
    )
    assert (
        "tenants[1].alerts[1].baseline: must be 1 to 60 buckets (0: a window of its own length)" in problems
    )
