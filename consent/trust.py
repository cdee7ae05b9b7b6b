"""What a consent call may record, given what its sender proved (identity.assertions).

A client source (public write key) records consent, withdrawals and minor flags for its
own device's identifiers only. Person-level identifiers (user id, phone, email, unionid)
count when a signed identity assertion names them; then the call speaks for the whole
person and its records land on the asserted identifiers too. Clearing an under-14 flag
and guardian consent need a server source or an assertion with ``guardian: true``.
Whatever cannot be backed is refused by name; the rest is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from identity.assertions import Standing
from identity.identifiers import Identifier


class ConsentForbidden(Exception):
    """Nothing of a consent call can be recorded on the sender's standing (maps to 403).
    ``reasons``: every part refused, by reason (what the refusal metric counts)."""

    def __init__(self, error: str, detail: str, field: str | None, reasons: Sequence[str] = ()) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.field = field
        self.reasons = tuple(reasons) or (error,)


@dataclass(frozen=True, slots=True)
class Refusal:
    field: str
    reason: str
    detail: str


@dataclass
class Screened:
    """What may be recorded: the subject's identifiers, the minor flag, and the refusals."""

    identifiers: list[tuple[str, str]]
    minor: bool | None
    guardian: bool
    refused: list[Refusal] = field(default_factory=list)


ASSERTION_FIELD = "identityAssertion"


def screen(
    standing: Standing,
    named: Sequence[tuple[Identifier, str]],
    *,
    minor: bool | None,
    guardian: bool,
    asks_consent: bool,
) -> Screened:
    """``named``: the subject's identifiers (pseudonymised) with the request field each came
    from. Raises ConsentForbidden when nothing the call asks can be recorded."""
    refused: list[Refusal] = []
    if standing.refused is not None:
        refused.append(Refusal(ASSERTION_FIELD, standing.refused.reason, standing.refused.detail))
    proven: list[Identifier] = []
    for ident, where in named:
        if standing.proves(ident):
            proven.append(ident)
        elif standing.is_foreign(ident):
            refused.append(
                Refusal(
                    f"{where}.appid",
                    "foreign_appid",
                    "an openid of an appid this source does not list in wechat_appids is another "
                    "app's user: a client source records consent only for its own device",
                )
            )
        else:
            refused.append(
                Refusal(
                    where,
                    "unproven_identifier",
                    f"a {ident.type} is a person-level identifier: a client source records consent "
                    f"for it only with a signed identity assertion ({ASSERTION_FIELD})",
                )
            )
    if standing.assertion is not None:  # the call speaks for the person the assertion names
        proven.extend(
            i for i in sorted(standing.assertion.person, key=lambda i: (i.type, i.value)) if i not in proven
        )
    if not proven:
        first = refused[-1] if refused else Refusal("userId", "unproven_identifier", "no identifier")
        error = "foreign_appid" if first.reason == "foreign_appid" else "assertion_required"
        raise ConsentForbidden(error, first.detail, first.field, [r.reason for r in refused])
    if guardian and not standing.guardian:
        raise ConsentForbidden(
            "guardian_assertion_required",
            "guardian consent from a client source needs an identity assertion with guardian: true",
            "consentKind",
            [r.reason for r in refused] + ["guardian_assertion_required"],
        )
    if minor is False and not standing.guardian:
        refused.append(
            Refusal(
                "subjectIsMinor",
                "guardian_assertion_required",
                "clearing an under-14 flag needs a server source or an identity assertion "
                "with guardian: true",
            )
        )
        minor = None
        if not asks_consent:
            raise ConsentForbidden(
                "guardian_assertion_required",
                refused[-1].detail,
                "subjectIsMinor",
                [r.reason for r in refused],
            )
    return Screened([(i.type, i.value) for i in proven], minor, guardian, refused)
