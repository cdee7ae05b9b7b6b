"""The rule behind ``on_withdraw_all = "delete"`` (consent.withdraw_all), on ledger-like
records: the withdrawal that leaves the person with no consent-based purpose granted."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy.engine import Engine

from consent.ledger import Ledger, RecordDraft
from consent.rotation import SubjectAliases
from consent.withdraw_all import (
    SweepMark,
    earlier_nodes,
    granted,
    latest_states,
    leaves_nothing,
    not_yet_opened,
)

CONSENT_PURPOSES = frozenset({"analytics", "marketing", "personalisation"})
USER, WEB, APP = "user_id:u", "anonymous_id:w", "anonymous_id:a"


@dataclass(frozen=True)
class Rec:
    seq: int
    identifiers: tuple[str, ...]
    purposes: tuple[str, ...]
    state: str
    record_type: str = "consent"


def test_the_last_of_several_withdrawals_leaves_nothing_and_the_earlier_ones_do_not() -> None:
    history = [
        Rec(1, (USER, WEB), ("analytics", "marketing"), "given"),
        Rec(2, (USER,), ("marketing",), "withdrawn"),
        Rec(3, (USER,), ("analytics",), "withdrawn"),
    ]
    assert not leaves_nothing(history, [history[1]], CONSENT_PURPOSES)
    assert leaves_nothing(history, [history[2]], CONSENT_PURPOSES)


def test_one_call_naming_every_purpose_leaves_nothing_even_with_nothing_granted_before() -> None:
    call = [Rec(1, (USER,), tuple(sorted(CONSENT_PURPOSES)), "withdrawn")]
    assert leaves_nothing(call, call, CONSENT_PURPOSES)


def test_an_opt_out_of_a_purpose_never_granted_takes_nothing_away() -> None:
    history = [Rec(1, (USER,), ("marketing",), "withdrawn")]
    assert not leaves_nothing(history, history, CONSENT_PURPOSES)


def test_a_grant_on_another_device_of_the_person_counts_until_a_person_wide_withdrawal() -> None:
    history = [
        Rec(1, (APP,), ("analytics",), "given"),
        Rec(2, (USER,), ("analytics",), "withdrawn"),
    ]
    assert granted(latest_states(history, 1), CONSENT_PURPOSES) == {"analytics"}
    assert granted(latest_states(history, 2), CONSENT_PURPOSES) == set()
    assert leaves_nothing(history, [history[1]], CONSENT_PURPOSES)


def test_a_later_grant_is_not_seen_when_deciding_on_an_earlier_withdrawal() -> None:
    """The sweep decides as the call would have: the state folded up to the call."""
    history = [
        Rec(1, (USER,), ("analytics",), "given"),
        Rec(2, (USER,), ("analytics",), "withdrawn"),
        Rec(3, (USER,), ("analytics",), "given"),
    ]
    assert leaves_nothing(history, [history[1]], CONSENT_PURPOSES)


def test_a_purpose_still_granted_elsewhere_keeps_the_person() -> None:
    history = [
        Rec(1, (USER, WEB), ("analytics", "personalisation"), "given"),
        Rec(2, (USER,), ("analytics",), "withdrawn"),
    ]
    assert not leaves_nothing(history, [history[1]], CONSENT_PURPOSES)


def rights_record(request_id: str, event: str, subject: str, **detail: object) -> RecordDraft:
    return RecordDraft(
        tenant="shop",
        record_type="rights_request",
        subject=subject.split(":", 1)[1],
        identifiers=[subject],
        state="requested" if event != "completed" else "completed",
        source="admin:idgate-withdrawal",
        platform="admin",
        detail={"request_id": request_id, "event": event, **detail},
    )


def test_a_withdrawal_opens_one_deletion_and_none_while_one_is_open(ledger: Ledger) -> None:
    """``not_yet_opened`` under the ledger's lock, on SQLite and PostgreSQL: refused for a
    withdrawal already named by a request, and while a delete of the person is open."""
    verification = {"method": "account_login", "outcome": "verified", "reference": "ledger:7"}
    opened = rights_record("dsr-1", "opened", USER, kind="delete", verification=verification)
    check = not_yet_opened(ledger, "shop", "ledger:7", [USER, WEB])
    (appended,) = ledger.append_prepared([ledger.prepare([opened])], preconditions=[check])
    assert len(appended) == 1
    # the same withdrawal again (the sweep, another replica): refused
    (again,) = ledger.append_prepared([ledger.prepare([opened])], preconditions=[check])
    assert again == []
    # another withdrawal of the person while the deletion is open: refused too
    later = not_yet_opened(ledger, "shop", "ledger:9", [WEB, USER])
    (refused,) = ledger.append_prepared([ledger.prepare([opened])], preconditions=[later])
    assert refused == []
    # once it is completed, a new withdrawal may open a new one
    ledger.append([rights_record("dsr-1", "completed", USER, outcome="done")])
    (reopened,) = ledger.append_prepared([ledger.prepare([opened])], preconditions=[later])
    assert len(reopened) == 1
    # another person's withdrawal is not held back
    other = not_yet_opened(ledger, "shop", "ledger:11", [APP])
    (free,) = ledger.append_prepared([ledger.prepare([opened])], preconditions=[other])
    assert len(free) == 1


def test_the_sweep_mark_starts_at_the_end_once_and_only_moves_forward(engine: Engine) -> None:
    mark = SweepMark(engine)
    assert mark.get() is None
    assert mark.start(40) == 40
    assert mark.start(90) == 40  # a later start keeps it
    mark.advance(55)
    mark.advance(50)
    assert mark.get() == 55


def test_a_grant_under_an_earlier_key_version_counts_as_the_identifier_s_own() -> None:
    """Key rotation: the same user under an older pseudonym (``same``) shares its state."""
    old_user = "user_id:u-old"
    history = [
        Rec(1, (old_user,), ("analytics", "marketing"), "given"),
        Rec(2, (USER,), ("analytics",), "withdrawn"),
    ]
    assert not leaves_nothing(history, [history[1]], CONSENT_PURPOSES, {old_user: USER})
    later = [*history, Rec(3, (USER,), ("marketing",), "withdrawn")]
    assert leaves_nothing(later, [later[2]], CONSENT_PURPOSES, {old_user: USER})
    # an older withdrawal under the old pseudonym gives way to a later grant under the new one
    regranted = [Rec(1, (old_user,), ("analytics",), "withdrawn"), Rec(2, (USER,), ("analytics",), "given")]
    assert granted(latest_states(regranted, 2, {old_user: USER}), CONSENT_PURPOSES) == {"analytics"}


def test_earlier_pseudonyms_are_followed_back_through_rotations(engine: Engine) -> None:
    aliases = SubjectAliases(engine)
    aliases._insert("shop", [("v1.a", "v2.a"), ("v2.a", "v3.a"), ("v1.b", "v2.b")])
    assert earlier_nodes(aliases, "shop", ["user_id:v3.a", "anonymous_id:v2.b"]) == {
        "user_id:v2.a": "user_id:v3.a",
        "user_id:v1.a": "user_id:v3.a",
        "anonymous_id:v1.b": "anonymous_id:v2.b",
    }


def test_the_withdraw_all_hold_is_refused_outside_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash tests' fault hook cannot be switched on in production."""
    from gateway.settings import Settings, SettingsError

    monkeypatch.setenv("IDGATE_ENV", "production")
    monkeypatch.setenv("IDGATE_KEYS", "{}")
    monkeypatch.setenv("IDGATE_LEDGER_KEY", "x")
    monkeypatch.setenv("IDGATE_DEV_WITHDRAW_ALL_HOLD", "1")
    with pytest.raises(SettingsError, match="IDGATE_DEV_WITHDRAW_ALL_HOLD is for tests"):
        Settings.from_env()
