"""Consent signals that arrive inside events rather than through the consent API.

- Segment's consent convention: ``context.consent.categoryPreferences`` maps consent
  categories (configured per tenant: ``Analytics = ["analytics"]``) to true/false.
- RudderStack's: ``context.consentManagement`` with ``allowedConsentIds`` and
  ``deniedConsentIds`` (OneTrust or Ketch category ids, mapped to purposes in the same
  ``consent_categories`` table: ``C0002 = ["analytics"]``).

On the "Segment Consent Preference Updated" event the choice is a consent record. On any
other event it is a record of what changed (a category the device's state does not yet
show as chosen); in every case a refused category narrows the event itself. Recorded under
the trust rules of consent calls (consent.trust): for the sender's own device unless it
proves more.
- An age trait (``minor_age_trait``) under 14 on an identify call flags the subject as a
  minor (PIPL Art 31), who then needs guardian consent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CONSENT_PREFERENCE_EVENT = "Segment Consent Preference Updated"
MINOR_AGE = 14


def category_preferences(context: Mapping[str, Any]) -> dict[str, bool]:
    """``context.consent.categoryPreferences`` as category -> allowed (booleans only)."""
    consent = context.get("consent")
    prefs = consent.get("categoryPreferences") if isinstance(consent, dict) else None
    if not isinstance(prefs, dict):
        return {}
    return {str(k): v for k, v in prefs.items() if isinstance(v, bool)}


@dataclass(frozen=True)
class CategoryChoice:
    """What a set of category preferences grants and refuses, as purposes."""

    granted: tuple[str, ...]
    refused: tuple[str, ...]


def consent_management(context: Mapping[str, Any]) -> dict[str, bool]:
    """RudderStack's ``context.consentManagement`` as category id -> allowed (strings only)."""
    cm = context.get("consentManagement")
    if not isinstance(cm, dict):
        return {}
    out: dict[str, bool] = {}
    for key, allowed in (("allowedConsentIds", True), ("deniedConsentIds", False)):
        ids = cm.get(key)
        if isinstance(ids, list):
            for category in ids:
                if isinstance(category, str) and category:
                    out.setdefault(category, allowed) if allowed else out.__setitem__(category, False)
    return out


def signalled(context: Mapping[str, Any]) -> dict[str, bool]:
    """Every consent signal an event carries (Segment's and RudderStack's), most restrictive
    first: a category refused by either is refused."""
    if "consent" not in context and "consentManagement" not in context:
        return {}
    prefs = category_preferences(context)
    for category, allowed in consent_management(context).items():
        prefs[category] = prefs.get(category, True) and allowed
    return prefs


def choice_from_categories(
    prefs: Mapping[str, bool], categories: Mapping[str, Sequence[str]]
) -> CategoryChoice:
    granted = {p for c, ok in prefs.items() if ok for p in categories.get(c, ())}
    refused = {p for c, ok in prefs.items() if not ok for p in categories.get(c, ())} - granted
    return CategoryChoice(tuple(sorted(granted)), tuple(sorted(refused)))


def narrowed_purposes(context: Mapping[str, Any], categories: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Purposes an event's own consent claim refuses (it can only narrow)."""
    if "consent" not in context and "consentManagement" not in context:
        return ()
    # most restrictive: a purpose refused through any category is refused
    prefs = signalled(context)
    return tuple(
        p for category, allowed in prefs.items() if not allowed for p in categories.get(category, ())
    )


def is_minor_age(traits: Mapping[str, Any] | None, trait: str) -> bool:
    """Whether the configured age trait says the subject is under 14."""
    if not trait or not traits:
        return False
    age = traits.get(trait)
    return isinstance(age, int | float) and not isinstance(age, bool) and 0 <= age < MINOR_AGE
