"""Alert rules without a clock: the verdicts, the cooldown and resolve transitions of the
evaluator, and bad alert configuration named by check_config or refused at start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from export.alerts import AlertEvaluator, AlertRule, LocalLease, MemoryStateStore, Notice, Notifier, evaluate
from export.kpis import KpiReport, KpiWindow, WindowValue
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

    async def send(self, channel_id: str, notice: Notice) -> bool:
        self.sent.append((channel_id, notice.status))
        return True


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
