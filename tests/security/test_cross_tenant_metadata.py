"""Attack: a tenant-scoped officer reading other tenants' ledger metadata.

The consent ledger is one hash chain for every tenant. A compliance officer whose token is
scoped to one tenant could read the whole ledger's record and checkpoint counts from
``/admin/consent/verify``, and every checkpoint (their seq ranges count every tenant's
records) from the exports. Now such a token gets the verdict without the counts, and
exports of its tenant's records only, without checkpoints.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import COMPLIANCE_TOKEN, MALL_WEB_KEY, OPERATOR_TOKEN, Gateway, make_gateway
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

DPO = {"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}  # every tenant
OPS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
SHOP_DPO = {"Authorization": "Bearer other-compliance-token"}  # tenant "shop" only


def grant(gw: Gateway, key: str) -> None:
    body = {"anonymousId": f"dev-{uuid.uuid4().hex[:8]}", "grant": ["analytics"], "noticeId": "notice-v1"}
    r = httpx.post(gw.url + "/v1/consent", json=body, auth=(key, ""), timeout=10)
    assert r.status_code == 200, r.text


def export_lines(gw: Gateway, headers: dict[str, str], **params: str) -> list[dict[str, Any]]:
    r = httpx.get(gw.url + "/admin/consent/export", headers=headers, params=params, timeout=10)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line]


def test_tenant_scoped_officer_sees_only_its_tenant(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, extra_env={"IDGATE_CHECKPOINT_SECONDS": "1"}).start()
    try:
        for _ in range(5):
            grant(gw, MALL_WEB_KEY)  # another tenant's records
        # one of shop's: a notice version (shop's config has none)
        r = httpx.post(
            gw.url + "/admin/notices",
            headers=OPS,
            json={"tenant": "shop", "id": "shop-notice-1", "contentSha256": "3" * 64},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        # a checkpoint over all of them (signed every second here)
        wait_until(
            lambda: [o for o in export_lines(gw, DPO) if o["kind"] == "checkpoint" and o["to_seq"] >= 7],
            what="a checkpoint over the records",
        )
        whole = httpx.get(gw.url + "/admin/consent/verify", headers=DPO, timeout=10).json()
        assert whole["ok"] and whole["records"] >= 7 and whole["checkpoints"] >= 1

        # verify: the verdict, not the whole ledger's counts
        scoped = httpx.get(gw.url + "/admin/consent/verify", headers=SHOP_DPO, timeout=10)
        assert scoped.status_code == 200, scoped.text
        view = scoped.json()
        assert view["ok"] is True
        assert view["records"] == 0 and view["checkpoints"] == 0 and view["signed_through"] == 0, view

        # export: shop's records only, no checkpoints, no global last seq
        lines = export_lines(gw, SHOP_DPO, tenant="shop")
        records = [o for o in lines if o["kind"] == "record"]
        assert records and all(o["tenant"] == "shop" for o in records)
        assert not [o for o in lines if o["kind"] == "checkpoint"]
        header = lines[0]
        assert header["ledger_last_seq"] == max(o["seq"] for o in records)
        assert lines[-1]["checkpoints"] == 0
        # the checkpoints themselves: refused
        r = httpx.get(
            gw.url + "/admin/consent/export",
            headers=SHOP_DPO,
            params={"tenant": "shop", "format": "csv", "part": "checkpoints"},
            timeout=10,
        )
        assert r.status_code == 403, r.text
        # other tenants' records, counts and access: refused as before
        for path, params in (
            ("/admin/consent/export", {"tenant": "mall"}),
            ("/admin/consent/stats", {"tenant": "mall"}),
            ("/admin/consent/records", {"tenant": "mall"}),
        ):
            r = httpx.get(gw.url + path, headers=SHOP_DPO, params=params, timeout=10)
            assert r.status_code == 403, (path, r.text)
    finally:
        gw.stop()
