"""Erasure through the admin API: the identifiers leave the graph and an ``identity.deleted``
notice reaches exactly the destinations that received the person's data, in each one's
pseudonym domain."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import COMPLIANCE_TOKEN, MALL_WEB_KEY, OPERATOR_TOKEN, make_gateway, mid
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

CONFIG = f"""
[[admin_tokens]]
name = "dpo"
role = "compliance"
dev_token = "{COMPLIANCE_TOKEN}"

[[admin_tokens]]
name = "ops"
role = "operator"
dev_token = "{OPERATOR_TOKEN}"

[[tenants]]
id = "mall"

[[tenants.sources]]
id = "mall-web"
platform = "web"
dev_write_key = "{MALL_WEB_KEY}"

[[tenants.notices]]
id = "notice-v1"
content_sha256 = "{"a" * 64}"

[tenants.tracking_plan]
"*" = ["analytics"]
"Ad Clicked" = ["marketing"]

[[tenants.destinations]]
id = "warehouse"
purposes = ["analytics"]

[[tenants.destinations]]
id = "ads"
purposes = ["marketing"]
"""


def test_deletion_notice_goes_only_where_the_person_went(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, config=CONFIG).start()
    web = httpx.Client(base_url=gw.url, auth=(MALL_WEB_KEY, ""), timeout=10)
    dpo = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
    try:
        people = {"only-warehouse": ["analytics"], "everywhere": ["analytics", "marketing"]}
        # what each destination gets: every Viewed, and the Ad Clicked of who granted marketing
        sent: dict[str, set[str]] = {"warehouse": set(), "ads": set()}
        for anon, purposes in people.items():
            r = web.post(
                "/v1/consent", json={"anonymousId": anon, "grant": purposes, "noticeId": "notice-v1"}
            )
            assert r.status_code == 200, r.text
            for name, dest in (("Viewed", "warehouse"), ("Ad Clicked", "ads")):
                m = mid()
                r = web.post("/v1/track", json={"anonymousId": anon, "event": name, "messageId": m})
                assert r.status_code == 200, r.text
                if dest == "warehouse" or "marketing" in purposes:
                    sent[dest].add(m)
        for dest, ids in sent.items():  # each destination has received its persons' data
            gw.wait_for_sink(ids, dest)
        for anon in people:
            r = httpx.post(
                gw.url + "/admin/identity/erase",
                headers=dpo,
                json={"tenant": "mall", "identifiers": [{"type": "anonymous_id", "id": anon}]},
            )
            assert r.status_code == 200, r.text
            # never linked, so never in the graph: the answer says so (nothing was removed
            # there) and the deletion notice still goes to who received the person's data
            assert r.json()["erased"] == 0 and r.json()["notInGraph"] == 1 and r.json()["notices"] == 1

        def notices(dest: str) -> list[dict]:
            return [e for e in gw.sink_lines(dest) if e.get("type") == "identity.deleted"]

        # Each erasure appended one notice for every destination, and each destination gets
        # its records in order. The ads notice is for the later erasure, so once it and two
        # warehouse notices are there, both destinations are past every notice: a stray one
        # (to ads for the person who never went there) would have arrived first.
        wait_until(
            lambda: len(notices("warehouse")) >= 2 and len(notices("ads")) >= 1,
            timeout=15,
            what="the deletion notices at warehouse and ads",
        )
        warehouse, ads = notices("warehouse"), notices("ads")
        assert len(warehouse) == 2 and len(ads) == 1
        # each notice names the person as that destination knows it
        events = {e["anonymousId"]: e for e in gw.sink_lines("warehouse") if e.get("type") == "track"}
        assert {n["unifiedId"] for n in warehouse} == {e["context"]["unified_id"] for e in events.values()}
        [ad_event] = [e for e in gw.sink_lines("ads") if e.get("type") == "track"]
        assert ads[0]["unifiedId"] == ad_event["context"]["unified_id"]
        assert ads[0]["identifiers"] == [{"type": "anonymous_id", "id": ad_event["anonymousId"]}]
        # two domains: the same person is not joinable across the recipients
        assert ad_event["anonymousId"] not in events

        # bad input: a clear 4xx naming the field; the wrong role is refused
        bad = httpx.post(
            gw.url + "/admin/identity/erase", headers=dpo, json={"tenant": "mall", "identifiers": []}
        )
        assert bad.status_code == 400 and bad.json()["field"] == "identifiers"
        ops = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        body = {"tenant": "mall", "identifiers": [{"type": "anonymous_id", "id": "x"}]}
        assert httpx.post(gw.url + "/admin/identity/erase", headers=ops, json=body).status_code == 403
        unknown = {"tenant": "mall", "identifiers": [{"type": "shoe_size", "id": "42"}]}
        r = httpx.post(gw.url + "/admin/identity/erase", headers=dpo, json=unknown)
        assert r.status_code == 400 and r.json()["field"].startswith("identifiers[0]")
    finally:
        web.close()
        gw.stop()
