"""The compliance console in a real headless Chromium (Debian's, driven by Playwright),
against a real ``idgate serve`` (embedded: SQLite): sign-in and out, finding a person by
phone number, the roles, ledger verification after tampering, a rights request through
its states, CSRF, and that no page or request after the search carries the raw number.

Every request the browser makes is seen by ``Recorder``: each URL, request body and
response body; anything that leaves 127.0.0.1 is aborted (the console needs no CDN).
The subject test takes the README's screenshot (1366x768): into its temporary directory on
every run, and over docs/console.png when IDGATE_UPDATE_SCREENSHOTS=1 (its pseudonyms change
from run to run, so an ordinary test run leaves the checkout as it was).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Recorder, assert_fits, sign_in
from tests.conftest import COMPLIANCE_TOKEN, ROOT, Gateway, make_gateway
from tests.console.conftest import CONSOLE_CONFIG, TOKENS, held_merge, person_with_phone

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCREENSHOT = ROOT / "docs" / "console.png"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = make_gateway(tmp_path_factory.mktemp("console-gw"), config=CONSOLE_CONFIG).start()
    yield gw
    gw.stop()


def raw_forms(phone: str) -> list[str]:
    return [phone, "+86" + phone, phone[3:]]


# -- sign-in -----------------------------------------------------------------------------------
def test_sign_in_and_out_with_the_keyboard(gateway: Gateway, browser_page: tuple[Any, Recorder]) -> None:
    page, _ = browser_page
    page.goto(gateway.url + "/console/ledger")
    assert page.url.endswith("/console/sign-in")
    # the token field has the focus: type, Enter
    page.wait_for_function("document.activeElement && document.activeElement.id === 'token'")
    page.keyboard.type(TOKENS["auditor"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#officer")
    assert page.inner_text("#officer") == "audit"
    cookie = next(c for c in page.context.cookies() if c["name"] == "idgate_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    # the first Tab reaches the skip link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.click("#sign-out")
    assert page.url.endswith("/console/sign-in")
    page.goto(gateway.url + "/console/")
    assert page.url.endswith("/console/sign-in")


def test_a_wrong_token_is_refused(gateway: Gateway, browser_page: tuple[Any, Recorder]) -> None:
    page, _ = browser_page
    page.goto(gateway.url + "/console/sign-in")
    page.fill("#token", "not-the-token")
    page.click("#sign-in")
    page.wait_for_selector("#sign-in-failed")
    assert not [c for c in page.context.cookies() if c["name"] == "idgate_console"]


# -- subject -----------------------------------------------------------------------------------
def test_a_compliance_officer_finds_a_person_by_phone_and_the_number_never_comes_back(
    gateway: Gateway, browser_page: tuple[Any, Recorder], tmp_path: Path
) -> None:
    page, recorder = browser_page
    with gateway.client() as c:
        phone, _ = person_with_phone(c)
    sign_in(page, gateway, "compliance")
    page.click("text=English")
    page.click("nav >> text=Subject")
    start = recorder.mark()
    page.select_option("select[name=tenant]", "mall")
    page.select_option("#type", "phone")
    page.fill("#identifier", phone)
    page.click("#search")
    page.wait_for_selector("#subject-node")

    # the person: phone, user id and device, one unified ID, how each link was made
    node = page.inner_text("#subject-node")
    assert node.startswith("phone:k1.")
    types = page.locator("#identifiers tbody tr td:first-child").all_inner_texts()
    assert sorted(types) == ["device_id", "phone", "user_id"]
    assert page.inner_text("#unified-id").startswith("p_")
    assert page.locator("#cluster > li").count() == 2
    assert "mall-server" in page.inner_text("#cluster")
    # consent now: analytics withdrawn, identity linking granted; the timeline has both records
    state = dict(
        zip(
            page.locator("#consent-state tbody td:nth-child(1)").all_inner_texts(),
            page.locator("#consent-state tbody td:nth-child(2)").all_inner_texts(),
            strict=True,
        )
    )
    assert state["analytics"] == "withdrawn" and state["identity_linking"] == "given", state
    timeline = page.inner_text("#timeline")
    assert "notice-v1" in timeline and "withdrawn" in timeline and "given" in timeline
    taken = tmp_path / SCREENSHOT.name
    page.screenshot(path=str(taken))
    assert taken.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("IDGATE_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(taken, SCREENSHOT)
    assert_fits(page)

    # browse on after the search; then look at everything the browser sent and received
    page.click("nav >> text=Ledger")
    page.wait_for_selector("#verify")
    page.click("nav >> text=Rights requests")
    page.wait_for_selector("h1")
    after = recorder.exchanges[start:]
    (search,) = [e for e in after if e.method == "POST" and e.url.endswith("/console/subject")]
    assert phone in search.request_body  # what the officer typed, in the body of the POST
    assert "?" not in search.url  # and nowhere in its URL
    for exchange in after:
        for raw in raw_forms(phone):
            assert raw not in exchange.url, exchange.url
            assert raw not in exchange.body, f"{exchange.url} answered with the raw number"
            if exchange is not search:
                assert raw not in exchange.request_body, exchange.url
    for raw in raw_forms(phone):
        assert raw not in page.content()
        assert raw not in gateway.log_text()


# -- roles -------------------------------------------------------------------------------------
def test_an_operator_cannot_reach_rights_requests(
    gateway: Gateway, browser_page: tuple[Any, Recorder]
) -> None:
    page, _ = browser_page
    sign_in(page, gateway, "operator")
    assert page.locator("nav >> a[href='/console/rights']").count() == 0
    assert page.locator("nav >> a[href='/console/subject']").count() == 0
    response = page.goto(gateway.url + "/console/rights")
    assert response is not None and response.status == 403
    assert page.get_attribute("#problem", "data-problem") == "forbidden"
    # what operators do: verify the ledger, look at the quarantine
    page.goto(gateway.url + "/console/")
    page.click("#verify")
    assert page.get_attribute("#verdict", "data-ok") == "true"


def open_overdue_request(gw: Gateway, phone: str) -> str:
    """A request received 60 days ago, through the admin API."""
    received = (datetime.now(UTC) - timedelta(days=60)).isoformat()
    body = {
        "tenant": "mall",
        "kind": "access",
        "subject": {"type": "phone", "id": phone},
        "requestedBy": "subject",
        "channel": "letter",
        "verification": {"method": "id_document", "outcome": "verified"},
        "receivedAt": received,
    }
    r = httpx.post(
        gw.url + "/admin/rights/", json=body, headers={"Authorization": f"Bearer {COMPLIANCE_TOKEN}"}
    )
    assert r.status_code == 201, r.text
    return str(r.json()["requestId"])


def test_an_auditor_can_verify_and_read_but_not_change(
    gateway: Gateway, browser_page: tuple[Any, Recorder]
) -> None:
    page, _ = browser_page
    with gateway.client() as c:
        phone, _ = person_with_phone(c)
    request_id = open_overdue_request(gateway, phone)
    sign_in(page, gateway, "auditor")
    page.goto(gateway.url + "/console/ledger")
    page.click("#verify")
    assert page.get_attribute("#verdict", "data-ok") == "true"
    assert int(page.inner_text("#verified-records")) > 0
    # the queue, read-only: no form to open a request, none to answer one
    page.goto(gateway.url + "/console/rights?tenant=mall")
    assert page.locator("#open-request").count() == 0
    page.click(f"text={request_id}")
    page.wait_for_selector("#request-status")
    assert page.locator("#complete-form, #extend-form, #bundle").count() == 0
    # a change forged from the page (with the auditor's own CSRF token) is refused
    csrf = page.evaluate("document.querySelector('input[name=csrf_token]').value")
    status = page.evaluate(
        """async ([url, csrf]) => (await fetch(url, {method: "POST",
              headers: {"Content-Type": "application/x-www-form-urlencoded"},
              body: new URLSearchParams({csrf_token: csrf, outcome: "done"})})).status""",
        [f"{gateway.url}/console/rights/{request_id}/complete?tenant=mall", csrf],
    )
    assert status == 403
    page.reload()
    assert page.inner_text("#request-status") == "open"


# -- identity review ---------------------------------------------------------------------------
def test_a_compliance_officer_approves_a_quarantined_merge_and_an_auditor_cannot(
    gateway: Gateway, browser_page: tuple[Any, Recorder]
) -> None:
    page, _ = browser_page
    with gateway.client() as c:
        phone, _ = held_merge(c)
    sign_in(page, gateway, "auditor")
    page.goto(gateway.url + "/console/quarantine?tenant=mall")
    page.wait_for_selector("#quarantine")
    assert_fits(page)
    assert page.locator("button.approve, button.reject").count() == 0  # read-only
    row = page.locator("#quarantine tbody tr").last
    a, b = row.locator("td:nth-child(1)").inner_text(), row.locator("td:nth-child(2)").inner_text()
    assert "component_too_large" in row.inner_text()
    csrf = page.evaluate("document.querySelector('input[name=csrf_token]').value")
    status = page.evaluate(
        """async ([url, form]) => (await fetch(url, {method: "POST",
              headers: {"Content-Type": "application/x-www-form-urlencoded"},
              body: new URLSearchParams(form)})).status""",
        [
            gateway.url + "/console/quarantine/review",
            {"csrf_token": csrf, "tenant": "mall", "a": a, "b": b, "decision": "approve"},
        ],
    )
    assert status == 403

    sign_in(page, gateway, "compliance")
    page.goto(gateway.url + "/console/quarantine?tenant=mall")
    held = page.locator("#quarantine tbody tr", has_text=b)
    held.locator("button.approve").click()
    page.wait_for_selector("#reviewed")
    assert page.get_attribute("#reviewed", "data-outcome") == "linked"
    assert page.locator("#quarantine tbody tr", has_text=b).count() == 0
    # the person now has four identifiers: two devices
    page.click("nav >> text=个人查询")
    page.select_option("select[name=tenant]", "mall")
    page.fill("#identifier", phone)
    page.click("#search")
    page.wait_for_selector("#subject-node")
    types = page.locator("#identifiers tbody tr td:first-child").all_inner_texts()
    assert sorted(types) == ["device_id", "device_id", "phone", "user_id"]
    assert "review" in page.inner_text("#cluster")


# -- rights requests ---------------------------------------------------------------------------
def test_a_rights_request_moves_through_its_states(
    gateway: Gateway, browser_page: tuple[Any, Recorder]
) -> None:
    page, _ = browser_page
    with gateway.client() as c:
        phone, _ = person_with_phone(c)
    overdue = open_overdue_request(gateway, phone)
    sign_in(page, gateway, "compliance")
    page.goto(gateway.url + "/console/rights?tenant=mall")
    # open requests by due date: the overdue ones first, highlighted
    rows = page.locator("#queue tbody tr")
    clocks = [rows.nth(i).get_attribute("data-clock") for i in range(rows.count())]
    assert clocks[0] == "overdue" and clocks == sorted(clocks, key=lambda c: c != "overdue"), clocks
    assert_fits(page)
    row = page.locator("#queue tbody tr", has_text=overdue)
    assert row.get_attribute("data-clock") == "overdue"
    assert row.evaluate("row => getComputedStyle(row.cells[0]).backgroundColor") != "rgb(255, 255, 255)"

    form = page.locator("#open-request")
    form.locator("select[name=kind]").select_option("access")
    form.locator("select[name=type]").select_option("phone")
    form.locator("input[name=identifier]").fill(phone)
    form.locator("select[name=channel]").select_option("email")
    form.locator("input[name=reference]").fill("CASE-42")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#request-status")
    assert page.inner_text("#request-status") == "open"
    assert phone not in page.content() and "/console/rights/" in page.url
    assert_fits(page)

    page.select_option("#extend-form select[name=reason]", "complex_request")
    page.fill("#extend-form input[name=working_days]", "10")
    page.click("#extend")
    page.wait_for_selector("#request-status")
    assert page.inner_text("#request-status") == "open"
    assert "complex_request" in page.inner_text("#steps")

    # the clock stops while the officer waits on the subject, and starts again
    page.select_option("#pause-form select[name=reason]", "awaiting_clarification")
    page.click("#pause")
    page.wait_for_selector("#resume-form")
    assert page.get_attribute("#request-due", "data-clock") == "paused"
    assert "awaiting_clarification" in page.inner_text("#request-paused")
    assert page.locator("#pause-form").count() == 0
    assert_fits(page)
    page.click("#resume")
    page.wait_for_selector("#pause-form")
    assert page.get_attribute("#request-due", "data-clock") != "paused"
    assert page.locator("#request-paused").count() == 0

    with page.expect_download() as download:
        page.click("#bundle")
    bundle = download.value.path().read_text()
    assert '"signature"' in bundle and phone not in bundle
    page.reload()
    assert page.inner_text("#request-status") == "completed"
    assert page.locator("#complete-form").count() == 0


def test_a_form_posted_without_its_csrf_token_is_refused(
    gateway: Gateway, browser_page: tuple[Any, Recorder]
) -> None:
    page, _ = browser_page
    sign_in(page, gateway, "compliance")
    page.goto(gateway.url + "/console/rights?tenant=mall")
    before = page.locator("#queue tbody tr").count()
    form = page.locator("#open-request")
    form.locator("input[name=identifier]").fill("13800000000")
    page.evaluate("document.querySelector('#open-request input[name=csrf_token]').remove()")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#problem")
    assert page.get_attribute("#problem", "data-problem") == "csrf"
    page.goto(gateway.url + "/console/rights?tenant=mall")
    assert page.locator("#queue tbody tr").count() == before


# -- ledger ------------------------------------------------------------------------------------
def test_the_ledger_page_finds_a_record_tampered_in_the_database(
    tmp_path: Any, browser_page: tuple[Any, Recorder]
) -> None:
    page, _ = browser_page
    gw = make_gateway(tmp_path, config=CONSOLE_CONFIG).start()
    try:
        with gw.client() as c:
            person_with_phone(c)
        sign_in(page, gw, "auditor")
        page.goto(gw.url + "/console/ledger?tenant=mall")
        assert_fits(page)
        seqs = [int(s) for s in page.locator("#records tbody td:first-child").all_inner_texts()]
        assert len(seqs) >= 3
        page.click("#verify")
        assert page.get_attribute("#verdict", "data-ok") == "true"
        # someone with access to the database file removes the guard and edits a record
        target = seqs[1]
        with sqlite3.connect(gw.data_dir / "consent.sqlite3") as db:
            db.execute("DROP TRIGGER consent_ledger_no_update")
            db.execute("UPDATE consent_ledger SET state = 'withdrawn' WHERE seq = ?", (target,))
        page.goto(gw.url + "/console/ledger?tenant=mall")
        page.click("#verify")
        assert page.get_attribute("#verdict", "data-ok") == "false"
        assert page.inner_text("#problem") == "edited"
        assert int(page.inner_text("#first-bad-seq")) == target
        # the signed export downloads
        page.goto(gw.url + "/console/ledger?tenant=mall")
        with page.expect_download() as download:
            page.click("#export-jsonl")
        assert (
            '"seal"' in download.value.path().read_text() or "checkpoint" in download.value.path().read_text()
        )
    finally:
        gw.stop()
