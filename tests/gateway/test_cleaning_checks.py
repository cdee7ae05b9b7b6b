"""gateway.cleaning's checks alone (no server): the RE2 run of crawlerdetect's list gives
crawlerdetect's own verdict; internal networks by CIDR, IPv4 and IPv6; blocked identifier
values and patterns; the timestamp bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from crawlerdetect import CrawlerDetect

from gateway.cleaning import TrafficCleaner, is_crawler
from gateway.config import CleaningConfig, InternalId, cleaning_problems
from gateway.events import Event
from tests.gateway.test_cleaning import BOTS, HUMAN

AGENTS = [
    *BOTS.values(),
    HUMAN,
    "Mozilla/5.0 (Linux; Android 11; M2012K11AC Build/RKQ1.200826.002; wv) AppleWebKit/537.36 (KHTML, "
    "like Gecko) Version/4.0 Chrome/86.0.4240.99 XWEB/4317 MMWEBSDK/20220903 Mobile Safari/537.36 "
    "MMWEBID/6283 MicroMessenger/8.0.28.2240(0x28001C35) WeChat/arm64 Weixin NetType/WIFI "
    "Language/zh_CN ABI/arm64 MiniProgramEnv/android",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/108.0.0.0 "
    "Safari/537.36 QIHU 360SE",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Mobile/15E148 Baidu/13.0 BaiduBoxApp",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (Linux; Android 10) YandexSearch/1.0",
    "Mozilla/5.0 (compatible; Yahoo! Slurp; http://help.yahoo.com/help/us/ysearch/slurp)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Python-urllib/3.11",
    "curl/8.4.0",
    "okhttp/4.9.0",
    "Dalvik/2.1.0 (Linux; U; Android 11; M2012K11AC Build/RKQ1.200826.002)",
    "analytics-python/2.3.3",
]


@pytest.mark.parametrize("agent", AGENTS)
def test_the_re2_run_gives_crawlerdetects_verdict(agent: str) -> None:
    assert is_crawler(agent) == CrawlerDetect().isCrawler(agent)


def test_internal_networks_ipv4_and_ipv6() -> None:
    cleaner = TrafficCleaner.compile(CleaningConfig(internal_networks=["10.20.0.0/16", "2001:db8:77::/48"]))
    assert cleaner.is_internal_address("10.20.255.1")
    assert not cleaner.is_internal_address("10.21.0.1")
    assert cleaner.is_internal_address("2001:db8:77:ffff::1")
    assert not cleaner.is_internal_address("2001:db8:78::1")
    assert not cleaner.is_internal_address("not an address")
    assert not cleaner.is_internal_address("")


def test_blocked_identifier_values_and_patterns() -> None:
    cleaner = TrafficCleaner.compile(
        CleaningConfig(blocked_identifiers=["Test"], blocked_identifier_patterns=["demo-[0-9]+", "x{3}"])
    )
    assert cleaner.blocks_identifiers
    assert cleaner.is_blocked_identifier(" TEST ") and cleaner.is_blocked_identifier("demo-42")
    assert cleaner.is_blocked_identifier("xxx")
    assert not cleaner.is_blocked_identifier("demo-42a")  # a full match, not a search
    assert not cleaner.is_blocked_identifier("a-demo-42")
    assert not TrafficCleaner.compile(CleaningConfig()).blocks_identifiers


def test_timestamp_bounds() -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)

    def skewed(config: CleaningConfig, delta: timedelta) -> bool:
        event = Event(type="track", message_id="m", timestamp=now + delta, received_at=now)
        return TrafficCleaner.compile(config).has_skewed_timestamp(event)

    default = CleaningConfig()
    assert skewed(default, timedelta(days=1, seconds=1)) and not skewed(default, timedelta(hours=23))
    assert skewed(default, -timedelta(days=31)) and not skewed(default, -timedelta(days=29))
    off = CleaningConfig(max_future_seconds=0, max_past_seconds=0)
    assert not skewed(off, timedelta(days=400)) and not skewed(off, -timedelta(days=400))


def test_problems_name_the_field() -> None:
    config = msgspec.convert(
        {
            "bot_patterns": ["ok", "(unclosed"],
            "internal_networks": ["10.0.0.0/8", "10.0.0.0/40", "office"],
            "internal_ids": [{"type": "user_id", "value": "undefined"}, {"type": "nope", "value": "qa-1"}],
            "max_past_seconds": -1,
        },
        CleaningConfig,
    )
    problems = cleaning_problems(config)
    assert [p.split(":")[0] for p in problems] == [
        "bot_patterns[1]",
        "internal_networks[1]",
        "internal_networks[2]",
        "internal_ids[0]",
        "internal_ids[1]",
        "max_future_seconds / max_past_seconds",
    ], problems
    assert "qa-1" not in " ".join(problems) and "undefined" not in " ".join(problems)
    assert cleaning_problems(CleaningConfig(internal_ids=[InternalId(type="user_id", value="qa-1")])) == []
