"""Identity-graph health in /metrics over real HTTP: persons created, merges, quarantined
links and breaker trips move by exactly what the events caused; no identifier leaks."""

from __future__ import annotations

import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    COMPLIANCE_TOKEN,
    MALL_APP_KEY,
    MALL_WEB_KEY,
    OPERATOR_TOKEN,
    Gateway,
    PostgresSchema,
    RedisNamespace,
    assertion,
    make_gateway,
)
from tests.identity.test_identity_http import grant, send
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

LINKING = ["analytics", "identity_linking"]
OPS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
DPO = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
FAMILIES = (
    "idgate_identity_persons_created",
    "idgate_identity_merges",
    "idgate_identity_splits",
    "idgate_identity_quarantined",
    "idgate_identity_breaker_trips",
    "idgate_identity_quarantine_size",
)


@pytest.fixture
def gw(tmp_path):
    g = make_gateway(tmp_path).start()
    yield g
    g.stop()


def scrape(gw: Gateway) -> tuple[str, dict[str, float]]:
    """The /metrics text and the mall's identity series (counters by family name)."""
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("tenant") != "mall":
                continue
            if family.name in FAMILIES and s.name in (family.name, f"{family.name}_total"):
                values[family.name] = s.value
            elif s.name == "idgate_identity_person_identifiers_count":
                values["person_sizes"] = s.value
            elif s.name == "idgate_identity_person_identifiers_sum":
                values["person_identifiers"] = s.value
    return text, values


def moved(gw: Gateway, before: dict[str, float], expected: dict[str, float]) -> dict[str, float]:
    """Poll /metrics until the expected deltas show; then every series moved by exactly
    those (the ones not named: not at all)."""

    def deltas() -> dict[str, float]:
        now = scrape(gw)[1]
        return {k: now.get(k, 0) - before.get(k, 0) for k in {*before, *now, *expected}}

    wait_until(
        lambda: all(deltas()[k] >= v for k, v in expected.items()),
        what=f"identity metrics to move by {expected}",
    )
    got = deltas()
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in expected.items() if v}
    return got


def test_identity_health_metrics_move_by_what_the_events_did(gw: Gateway) -> None:
    _, start = scrape(gw)
    t = uuid.uuid4().hex[:8]
    # a web visitor logs in: two identifiers (two persons), merged into one of two
    cookie, user = f"cookie-{t}", f"user-{t}"
    grant(gw, MALL_WEB_KEY, LINKING, anonymousId=cookie)
    login = send(
        gw,
        MALL_WEB_KEY,
        "identify",
        anonymousId=cookie,
        userId=user,
        context={"identityAssertion": assertion(user, cookie)},
    )
    gw.wait_for_sink({login}, "mall-warehouse")
    moved(
        gw,
        start,
        {
            "idgate_identity_persons_created": 2,
            "idgate_identity_merges": 1,
            "person_sizes": 1,
            "person_identifiers": 2,
        },
    )
    _, before = scrape(gw)
    # a shared shop tablet: nine customers log in on it one after another. The first joins
    # it; the next four are refused (one user id per device); from then on the tablet has
    # tried to join five other persons, and the breaker holds each further login for review
    tablet = f"tablet-{t}"
    grant(gw, MALL_APP_KEY, LINKING, identifiers=[{"type": "device_id", "id": tablet}])
    sent = []
    for i in range(9):
        customer = f"customer-{t}-{i}"
        token = assertion(customer, tablet)
        device = [{"type": "device_id", "id": tablet}]
        grant(gw, MALL_APP_KEY, LINKING, userId=customer, identifiers=device, identityAssertion=token)
        context = {"device": {"id": tablet}, "identityAssertion": token}
        sent.append(send(gw, MALL_APP_KEY, "track", userId=customer, event="Product Viewed", context=context))
    gw.wait_for_sink(set(sent), "mall-warehouse")
    moved(
        gw,
        before,
        {
            "idgate_identity_persons_created": 10,
            "idgate_identity_merges": 1,
            "person_sizes": 1,
            "person_identifiers": 2,
            "idgate_identity_quarantined": 4,
            "idgate_identity_breaker_trips": 4,
            "idgate_identity_quarantine_size": 4,
        },
    )
    held = httpx.get(f"{gw.url}/admin/identity/quarantine", headers=OPS, params={"tenant": "mall"}).json()
    assert [q["reason"].split(":")[0] for q in held["quarantined"]] == ["breaker"] * 4
    # the operator unlinks the web login: one split
    _, before = scrape(gw)
    found = httpx.get(
        f"{gw.url}/admin/identity/explain",
        headers=DPO,
        params={"tenant": "mall", "a": user, "a_type": "user_id", "b": cookie, "b_type": "anonymous_id"},
    ).json()
    nodes = {"tenant": "mall", "a": {"node": found["a"]}, "b": {"node": found["b"]}}
    r = httpx.post(f"{gw.url}/admin/identity/unlink", headers=OPS, json=nodes)
    assert r.status_code == 200 and r.json()["split"] is True, r.text
    moved(gw, before, {"idgate_identity_splits": 1})
    # canary: no identifier, pseudonym or unified ID in /metrics
    text, _ = scrape(gw)
    for secret in (t, found["a"], found["b"], *found_unified(gw, sent + [login])):
        assert secret not in text, secret


def found_unified(gw: Gateway, message_ids: list[str]) -> list[str]:
    events = gw.wait_for_sink(set(message_ids), "mall-warehouse")
    return [e["context"]["unified_id"] for e in events]


def test_a_change_counts_on_the_replica_that_made_it_not_on_replay(
    tmp_path, pg_schema: PostgresSchema, redis_ns: RedisNamespace
) -> None:
    env = {**redis_ns.env(), "DATABASE_URL": pg_schema.url}
    a = make_gateway(tmp_path / "a", extra_env=env).start()
    b = make_gateway(tmp_path / "b", extra_env=env).start()
    try:
        before_a, before_b = scrape(a)[1], scrape(b)[1]
        t = uuid.uuid4().hex[:8]
        cookie, user = f"cookie-{t}", f"user-{t}"
        grant(a, MALL_WEB_KEY, LINKING, anonymousId=cookie)
        context = {"identityAssertion": assertion(user, cookie)}
        send(a, MALL_WEB_KEY, "identify", anonymousId=cookie, userId=user, context=context)
        moved(
            a,
            before_a,
            {
                "idgate_identity_persons_created": 2,
                "idgate_identity_merges": 1,
                "person_sizes": 1,
                "person_identifiers": 2,
            },
        )
        # b replays the merge from the log: it knows the person, and counts nothing
        params = {"tenant": "mall", "a": user, "a_type": "user_id", "b": cookie, "b_type": "anonymous_id"}
        wait_until(
            lambda: httpx.get(f"{b.url}/admin/identity/explain", headers=DPO, params=params).json()["linked"],
            what="replica b to replay the merge",
        )
        moved(b, before_b, {})
    finally:
        a.stop()
        b.stop()
