"""Personalisation opt-out and the consequences of a withdrawal (issue 13, PIPL Art. 15, 24,
47), over real HTTP against a real `idgate serve`.

A subject without a basis for ``personalisation`` (refused, withdrawn, or never asked) has
the events that are forwarded marked ``context.idgate.personalisation = false`` (``true``
when they have one); idgate writes ``context.idgate``, so a client cannot set the flag, and
a destination that declares only ``personalisation`` gets nothing of theirs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import MALL_WEB_KEY, TEST_CONFIG, Gateway, make_gateway
from tests.consent.test_consent_http import consent, delivered, ids, track

pytestmark = pytest.mark.slow

RECOMMENDED = "Recommendation Clicked"
# the sentinel of Gateway.wait_past too, so it reaches the personalisation-only destination
PERSONALISED_EVENTS = f"""
"{RECOMMENDED}" = ["analytics", "personalisation"]
"Sentinel" = ["analytics", "personalisation"]
"""


def config(extra: str = "") -> str:
    plan = '"Ad Clicked" = ["ad_measurement"]'
    assert plan in TEST_CONFIG
    return (
        TEST_CONFIG.replace(plan, f"{plan}\n{PERSONALISED_EVENTS}")
        + """
[[tenants.destinations]]
id = "mall-recs"
purposes = ["personalisation"]
"""
        + extra
    )


@pytest.fixture(scope="module")
def mall(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = make_gateway(tmp_path_factory.mktemp("withdrawal"), config=config()).start()
    yield gw
    gw.stop()


def forged(personalisation: bool = True) -> dict[str, Any]:
    """A client's attempt to set idgate's own context."""
    return {"idgate": {"personalisation": personalisation, "tenant": "shop", "consentProof": [1]}}


def test_a_subject_without_personalisation_is_flagged_and_the_recs_destination_gets_nothing(
    mall: Gateway,
) -> None:
    _, anon, _ = ids()
    assert consent(mall, anonymousId=anon, grant=["analytics"]).status_code == 200
    m, out = track(mall, RECOMMENDED, anonymousId=anon, context=forged())
    assert out["accepted"] == 1, out
    event = delivered(mall, m, "mall-warehouse")
    assert event is not None
    idgate = event["context"]["idgate"]
    assert idgate["personalisation"] is False  # the client's `true` did not survive
    assert idgate["tenant"] == "mall" and idgate["consentProof"] != [1]
    mall.wait_past("mall-recs", write_key=MALL_WEB_KEY, grant=["analytics", "personalisation"])
    assert delivered(mall, m, "mall-recs", timeout=0) is None


def test_a_withdrawal_of_personalisation_flags_the_next_events(mall: Gateway) -> None:
    _, anon, _ = ids()
    assert consent(mall, anonymousId=anon, grant=["analytics", "personalisation"]).status_code == 200
    m, _ = track(mall, RECOMMENDED, anonymousId=anon, context=forged(False))
    assert consent(mall, anonymousId=anon, withdraw=["personalisation"]).status_code == 200
    m2, out = track(mall, RECOMMENDED, anonymousId=anon)
    assert out["accepted"] == 1, out
    before, after = delivered(mall, m, "mall-warehouse"), delivered(mall, m2, "mall-warehouse")
    assert before is not None and after is not None
    # granted: an explicit true (the client's forged false was replaced)
    assert before["context"]["idgate"]["personalisation"] is True
    assert after["context"]["idgate"]["personalisation"] is False
    assert delivered(mall, m, "mall-recs") is not None
    mall.wait_past("mall-recs", write_key=MALL_WEB_KEY, grant=["analytics", "personalisation"])
    assert delivered(mall, m2, "mall-recs", timeout=0) is None
