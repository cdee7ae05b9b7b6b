"""Personalisation opt-out and the consequences of a withdrawal (issue 13, PIPL Art. 15, 24,
47), over real HTTP against a real `idgate serve`.

A subject without a basis for ``personalisation`` (refused, withdrawn, or never asked) has
the events that are forwarded marked ``context.idgate.personalisation = false`` (``true``
when they have one); idgate writes ``context.idgate``, so a client cannot set the flag, and
a destination that declares only ``personalisation`` gets nothing of theirs.

A withdrawal sends a ``consent.withdrawn`` notice (unified ID, purposes, time, ledger seqs;
no raw identifier) to the destinations that received the person's data and declare a
withdrawn purpose, and to no other; deliveries made before it stay valid in the ledger's
point-in-time view. Under ``on_withdraw_all = "delete"`` a person-wide withdrawal that leaves
the person with no consent-based purpose granted (in one call or the last of several) opens
and completes one deletion; an opt-out of a purpose never granted, or a client withdrawing
for its own device, does not. A process killed between the withdrawal's record and the
opening of its deletion opens it at the next start (the sweep), once, whichever replica
sweeps."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.conftest import (
    MALL_SERVER_KEY,
    MALL_WEB_KEY,
    TEST_CONFIG,
    Gateway,
    assertion,
    backend_env,
    make_gateway,
)
from tests.consent.test_consent_http import consent, delivered, ids, track
from tests.consent.test_rights import bearer, ledger_records, open_request
from tests.receivers import Receiver
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

RECOMMENDED = "Recommendation Clicked"
# the sentinel of Gateway.wait_past too, so it reaches the personalisation-only destination
PERSONALISED_EVENTS = f"""
"{RECOMMENDED}" = ["analytics", "personalisation"]
"Sentinel" = ["analytics", "personalisation"]
"""


def config(extra: str = "", on_withdraw_all: str = "keep") -> str:
    plan = '"Ad Clicked" = ["ad_measurement"]'
    mall = 'minor_age_trait = "age"'
    assert plan in TEST_CONFIG and mall in TEST_CONFIG
    return (
        TEST_CONFIG.replace(plan, f"{plan}\n{PERSONALISED_EVENTS}").replace(
            mall, f'{mall}\nconsent = {{ on_withdraw_all = "{on_withdraw_all}" }}'
        )
        + """
[[tenants.destinations]]
id = "mall-recs"
purposes = ["personalisation"]
"""
        + extra
    )


@pytest.fixture(scope="module")
def hook() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


def webhook(url: str) -> str:
    return f"""
[[tenants.destinations]]
id = "mall-hook"
sink = "webhook"
purposes = ["analytics"]
options = {{ url = "{url}", timeout_seconds = 2 }}
"""


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def mall(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hook: Receiver
) -> Iterator[Gateway]:
    """The embedded gateway (SQLite) and one on PostgreSQL."""
    with ExitStack() as stack:
        env = backend_env(request.param, stack)
        gw = make_gateway(
            tmp_path_factory.mktemp(f"withdrawal-{request.param}"),
            config=config(webhook(hook.webhook_url)),
            extra_env=env,
        ).start()
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
    # delivered before the withdrawal (after it, delivery asks again and withholds it)
    assert delivered(mall, m, "mall-recs") is not None
    assert consent(mall, anonymousId=anon, withdraw=["personalisation"]).status_code == 200
    m2, out = track(mall, RECOMMENDED, anonymousId=anon)
    assert out["accepted"] == 1, out
    before, after = delivered(mall, m, "mall-warehouse"), delivered(mall, m2, "mall-warehouse")
    assert before is not None and after is not None
    # granted: an explicit true (the client's forged false was replaced)
    assert before["context"]["idgate"]["personalisation"] is True
    assert after["context"]["idgate"]["personalisation"] is False
    mall.wait_past("mall-recs", write_key=MALL_WEB_KEY, grant=["analytics", "personalisation"])
    assert delivered(mall, m2, "mall-recs", timeout=0) is None


WITHDRAWN = '"type":"consent.withdrawn"'


def server(gw: Gateway, kind: str, **body: Any) -> dict[str, Any]:
    """The shop's backend (a server source: it speaks for the whole person)."""
    r = httpx.post(f"{gw.url}/v1/{kind}", auth=(MALL_SERVER_KEY, ""), json=body, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def withdrawal_notices(lines: list[dict[str, Any]], unified_id: str) -> list[dict[str, Any]]:
    return [e for e in lines if e.get("type") == "consent.withdrawn" and e.get("unifiedId") == unified_id]


def test_a_withdrawal_notice_reaches_the_destinations_that_held_the_person_and_no_other(
    mall: Gateway, hook: Receiver
) -> None:
    user, anon, _ = ids()
    server(mall, "consent", userId=user, anonymousId=anon, grant=["analytics"], noticeId="notice-v1")
    m, out = track(mall, userId=user, anonymousId=anon, key=MALL_SERVER_KEY)
    assert out["accepted"] == 1, out
    event = delivered(mall, m, "mall-warehouse")
    assert event is not None
    unified = event["context"]["unified_id"]
    (hooked,) = wait_until(
        lambda: [e for e in list(hook.events) if e.get("messageId") == m], 20, what="the event at the hook"
    )
    before = datetime.now(UTC).isoformat()

    (receipt,) = server(mall, "consent", userId=user, withdraw=["analytics"])["recorded"]
    notices = wait_until(
        lambda: withdrawal_notices(mall.sink_lines("mall-warehouse"), unified), 20, what="the file notice"
    )
    (notice,) = notices
    assert notice["purposes"] == ["analytics"] and notice["ledgerSeqs"] == [receipt["seq"]]
    assert datetime.fromisoformat(notice["receivedAt"]) <= datetime.now(UTC)
    assert notice["context"]["idgate"] == {"tenant": "mall", "notice": True}
    (at_hook,) = wait_until(
        lambda: withdrawal_notices(list(hook.events), hooked["context"]["unified_id"]),
        20,
        what="the hook notice",
    )
    # canary scan: the person's raw identifiers are in no notice
    for text in (json.dumps(notice), json.dumps(at_hook)):
        assert user not in text and anon not in text
    # mall-overseas declares analytics but never got the person's data (no cross_border)
    mall.wait_past("mall-overseas", write_key=MALL_WEB_KEY, grant=["analytics", "cross_border"])
    assert not [e for e in mall.sink_lines("mall-overseas") if e.get("type") == "consent.withdrawn"]
    # not retroactive: the delivery before the withdrawal relied on a grant valid then
    view = wait_until(
        lambda: (
            v
            if (
                v := httpx.get(
                    f"{mall.url}/admin/consent/subject",
                    headers=bearer(),
                    params={"tenant": "mall", "identifier": user, "at": before},
                    timeout=10,
                ).json()
            )["deliveries"]
            else None
        ),
        20,
        what="the deliveries before the withdrawal",
    )
    assert view["purposes"]["analytics"]["state"] == "given"
    assert {d["destination"] for d in view["deliveries"]} >= {"mall-warehouse", "mall-hook"}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def deleting(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with ExitStack() as stack:
        gw = make_gateway(
            tmp_path_factory.mktemp(f"withdraw-delete-{request.param}"),
            config=config(on_withdraw_all="delete"),
            extra_env=backend_env(request.param, stack),
        ).start()
        yield gw
        gw.stop()


# Every default purpose that rests on consent (what a withdraw-all names).
EVERY_PURPOSE = [
    "analytics",
    "personalisation",
    "marketing",
    "ad_measurement",
    "identity_linking",
    "third_party_sharing",
    "cross_border",
    "sensitive_pi",
]


def delete_requests(gw: Gateway) -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.url}/admin/rights", params={"tenant": "mall"}, headers=bearer(), timeout=10)
    assert r.status_code == 200, r.text
    return [x for x in r.json()["requests"] if x["kind"] == "delete"]


def test_delete_mode_a_person_wide_withdrawal_of_everything_deletes_the_person(deleting: Gateway) -> None:
    user, anon, _ = ids()
    server(deleting, "consent", userId=user, anonymousId=anon, grant=["analytics"], noticeId="notice-v1")
    m, _ = track(deleting, userId=user, anonymousId=anon, key=MALL_SERVER_KEY)
    assert delivered(deleting, m, "mall-warehouse") is not None
    before = {x["requestId"] for x in delete_requests(deleting)}

    server(deleting, "consent", userId=user, withdraw=EVERY_PURPOSE)
    (request,) = [x for x in delete_requests(deleting) if x["requestId"] not in before]
    assert request["requestedBy"] == "subject" and request["channel"] == "backend", request
    (done,) = wait_until(
        lambda: [
            x
            for x in delete_requests(deleting)
            if x["requestId"] == request["requestId"] and x["status"] == "completed"
        ],
        30,
        what="the deletion to complete",
    )
    assert done["outcome"] in ("done", "partly_done"), done
    assert not [e for e in deleting.sink_lines("mall-warehouse") if e["messageId"] == m]  # the line is gone
    opened = [
        x
        for x in ledger_records(deleting, identifier=user)
        if x["type"] == "rights_request" and x["state"] == "requested"
    ]
    assert opened, "the request is in the ledger"


def test_delete_mode_a_client_with_an_identity_assertion_speaks_for_the_person(deleting: Gateway) -> None:
    user, anon, _ = ids()
    signed = assertion(user, anon)
    r = consent(deleting, userId=user, anonymousId=anon, grant=["analytics"], identityAssertion=signed)
    assert r.status_code == 200, r.text
    before = {x["requestId"] for x in delete_requests(deleting)}
    r = consent(deleting, userId=user, anonymousId=anon, withdraw=EVERY_PURPOSE, identityAssertion=signed)
    assert r.status_code == 200, r.text
    (request,) = [x for x in delete_requests(deleting) if x["requestId"] not in before]
    assert request["requestedBy"] == "subject" and request["channel"] == "web", request
    assert request["subject"].startswith("user_id:") and user not in json.dumps(request)


def test_delete_mode_a_client_withdrawing_for_its_own_device_deletes_nobody(deleting: Gateway) -> None:
    _, anon, _ = ids()
    assert consent(deleting, anonymousId=anon, grant=["analytics"]).status_code == 200
    m, _ = track(deleting, anonymousId=anon)
    # delivered before the withdrawal (after it, delivery would withhold it: consent is asked again)
    assert delivered(deleting, m, "mall-warehouse") is not None
    before = {x["requestId"] for x in delete_requests(deleting)}
    r = consent(deleting, anonymousId=anon, withdraw=EVERY_PURPOSE)
    assert r.status_code == 200, r.text
    deleting.wait_past("mall-warehouse", write_key=MALL_WEB_KEY, grant=["analytics"])
    assert {x["requestId"] for x in delete_requests(deleting)} == before
    assert delivered(deleting, m, "mall-warehouse", timeout=0) is not None  # kept


def test_a_withdraw_all_request_tells_the_destinations_too(mall: Gateway) -> None:
    user, anon, _ = ids()
    server(mall, "consent", userId=user, anonymousId=anon, grant=["analytics"], noticeId="notice-v1")
    m, _ = track(mall, userId=user, anonymousId=anon, key=MALL_SERVER_KEY)
    event = delivered(mall, m, "mall-warehouse")
    assert event is not None
    r = open_request(mall, kind="withdraw_all", subject={"type": "user_id", "id": user}, channel="email")
    assert r.status_code == 201 and r.json()["status"] == "completed", r.text
    (notice,) = wait_until(
        lambda: withdrawal_notices(mall.sink_lines("mall-warehouse"), event["context"]["unified_id"]),
        20,
        what="the notice of the request's withdrawal",
    )
    assert "analytics" in notice["purposes"] and user not in json.dumps(notice)


def test_a_consent_signal_on_an_event_tells_the_destinations_too(mall: Gateway) -> None:
    _, anon, _ = ids()
    on = {"consent": {"categoryPreferences": {"Analytics": True}}}
    m, out = track(mall, anonymousId=anon, context=on)
    assert out["accepted"] == 1, out
    event = delivered(mall, m, "mall-warehouse")
    assert event is not None
    _, out = track(mall, anonymousId=anon, context={"consent": {"categoryPreferences": {"Analytics": False}}})
    assert out["dropped"] == {"refused_in_event": 1}, out
    (notice,) = wait_until(
        lambda: withdrawal_notices(mall.sink_lines("mall-warehouse"), event["context"]["unified_id"]),
        20,
        what="the notice of the signalled withdrawal",
    )
    assert notice["purposes"] == ["analytics"] and anon not in json.dumps(notice)


def swept_past(gw: Gateway, seq: int, timeout: float = 30) -> None:
    """Wait until the gateway's withdraw-all sweep has looked at every withdrawal up to ``seq``."""

    def past() -> bool:
        for line in gw.log_text().splitlines():
            if '"consent.withdraw_all_swept_to"' in line and json.loads(line)["seq"] >= seq:
                return True
        return False

    wait_until(past, timeout, what=f"the withdraw-all sweep past seq {seq}")


def completed(gw: Gateway, request_id: str) -> dict[str, Any]:
    (done,) = wait_until(
        lambda: [
            x for x in delete_requests(gw) if x["requestId"] == request_id and x["status"] == "completed"
        ],
        60,
        what="the deletion to complete",
    )
    return dict(done)


def test_delete_mode_withdrawals_one_by_one_delete_the_person_once(deleting: Gateway) -> None:
    user, anon, _ = ids()
    granted = ["analytics", "marketing"]
    server(deleting, "consent", userId=user, anonymousId=anon, grant=granted, noticeId="notice-v1")
    m, _ = track(deleting, userId=user, anonymousId=anon, key=MALL_SERVER_KEY)
    assert delivered(deleting, m, "mall-warehouse") is not None
    before = {x["requestId"] for x in delete_requests(deleting)}

    (first,) = server(deleting, "consent", userId=user, withdraw=["marketing"])["recorded"]
    swept_past(deleting, first["seq"])
    assert {x["requestId"] for x in delete_requests(deleting)} == before, "analytics is still granted"

    (last,) = server(deleting, "consent", userId=user, withdraw=["analytics"])["recorded"]
    (request,) = [x for x in delete_requests(deleting) if x["requestId"] not in before]
    assert request["verification"]["reference"] == f"ledger:{last['seq']}", request
    assert request["requestedBy"] == "subject" and request["channel"] == "backend", request
    assert completed(deleting, request["requestId"])["outcome"] in ("done", "partly_done")
    assert not [e for e in deleting.sink_lines("mall-warehouse") if e["messageId"] == m]  # the line is gone
    # the sweep looks at the same withdrawal again: the deletion it opened is the only one
    swept_past(deleting, last["seq"])
    assert [x["requestId"] for x in delete_requests(deleting) if x["requestId"] not in before] == [
        request["requestId"]
    ]


def test_delete_mode_an_opt_out_of_a_purpose_never_granted_deletes_nobody(deleting: Gateway) -> None:
    user, anon, _ = ids()
    server(deleting, "consent", userId=user, anonymousId=anon, grant=["analytics"], noticeId="notice-v1")
    before = {x["requestId"] for x in delete_requests(deleting)}
    fresh, _, _ = ids()
    # a sign-up that opts out of marketing: nothing was granted, nothing is taken away
    (opt_out,) = server(deleting, "consent", userId=fresh, withdraw=["marketing"])["recorded"]
    # a person who still has analytics withdraws marketing, never granted either
    (other,) = server(deleting, "consent", userId=user, withdraw=["marketing"])["recorded"]
    swept_past(deleting, max(opt_out["seq"], other["seq"]))
    assert {x["requestId"] for x in delete_requests(deleting)} == before


def test_delete_mode_a_client_withdrawing_one_by_one_for_its_own_device_deletes_nobody(
    deleting: Gateway,
) -> None:
    _, anon, _ = ids()
    assert consent(deleting, anonymousId=anon, grant=["analytics", "marketing"]).status_code == 200
    m, _ = track(deleting, anonymousId=anon)
    assert delivered(deleting, m, "mall-warehouse") is not None
    before = {x["requestId"] for x in delete_requests(deleting)}
    seqs = []
    for purpose in ("marketing", "analytics"):
        r = consent(deleting, anonymousId=anon, withdraw=[purpose])
        assert r.status_code == 200, r.text
        seqs += [x["seq"] for x in r.json()["recorded"]]
    swept_past(deleting, max(seqs))
    assert {x["requestId"] for x in delete_requests(deleting)} == before
    assert delivered(deleting, m, "mall-warehouse", timeout=0) is not None  # kept


HOLD = "IDGATE_DEV_WITHDRAW_ALL_HOLD"


def held_withdrawal(gw: Gateway, timeout: float = 30) -> int:
    """The seq of the withdrawal whose deletion the gateway holds (``IDGATE_DEV_WITHDRAW_ALL_HOLD``):
    recorded in the ledger, its deletion not opened."""

    def held() -> int | None:
        for line in gw.log_text().splitlines():
            if '"consent.withdraw_all_held"' in line:
                return int(json.loads(line)["withdrawal"].removeprefix("ledger:"))
        return None

    return int(wait_until(held, timeout, what="the withdrawal's deletion held"))


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis])]
)
def test_delete_mode_a_crash_before_the_deletion_opened_is_made_good_at_restart(
    backend: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """kill -9 while the call that withdrew the last purpose is between the withdrawal's
    ledger record and the opening of its deletion (held there by the dev-only fault hook):
    the restarted gateway opens it. On PostgreSQL two replicas restart and sweep; one opens it."""
    with ExitStack() as stack:
        env = backend_env(backend, stack)
        if backend == "postgres":
            env.update(request.getfixturevalue("redis_ns").env())
        g = make_gateway(
            tmp_path / "a", config=config(on_withdraw_all="delete"), extra_env={**env, HOLD: "1"}
        ).start()
        stack.callback(g.stop)
        user, anon, _ = ids()
        granted = ["analytics", "marketing"]
        server(g, "consent", userId=user, anonymousId=anon, grant=granted, noticeId="notice-v1")
        m, _ = track(g, userId=user, anonymousId=anon, key=MALL_SERVER_KEY)
        assert delivered(g, m, "mall-warehouse") is not None
        server(g, "consent", userId=user, withdraw=["marketing"])  # analytics still granted: no hold
        before = {x["requestId"] for x in delete_requests(g)}

        def withdraw_the_last() -> None:  # its answer never comes: the process dies first
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(
                    f"{g.url}/v1/consent",
                    auth=(MALL_SERVER_KEY, ""),
                    json={"userId": user, "withdraw": ["analytics"]},
                    timeout=60,
                )

        call = threading.Thread(target=withdraw_the_last, daemon=True)
        call.start()
        seq = held_withdrawal(g)
        (withdrawal,) = [x for x in ledger_records(g, identifier=user) if x["seq"] == seq]
        assert withdrawal["state"] == "withdrawn" and withdrawal["purposes"] == ["analytics"], withdrawal
        assert {x["requestId"] for x in delete_requests(g)} == before  # not opened
        g.kill9()
        call.join(timeout=30)

        del g.env[HOLD]
        replicas = [g.start()]
        if backend == "postgres":
            b = make_gateway(tmp_path / "b", config=config(on_withdraw_all="delete"), extra_env=env)
            replicas.append(b.start())
            stack.callback(b.stop)
        found = wait_until(
            lambda: [x for x in delete_requests(g) if x["requestId"] not in before],
            30,
            what="the deletion opened after the restart",
        )
        assert len(found) == 1, found
        (opened,) = found
        assert opened["verification"]["reference"] == f"ledger:{seq}", opened
        assert opened["requestedBy"] == "subject" and opened["channel"] == "backend", opened
        assert completed(g, opened["requestId"])["outcome"] in ("done", "partly_done")
        wait_until(
            lambda: not [e for e in g.sink_lines("mall-warehouse") if e["messageId"] == m],
            30,
            what="the person's line gone from the sink",
        )
        for replica in replicas:
            swept_past(replica, seq)
        assert [x["requestId"] for x in delete_requests(g) if x["requestId"] not in before] == [
            opened["requestId"]
        ]
