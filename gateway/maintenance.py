"""What keeps a replica healthy between requests: the consent projection healed from the
ledger, outages noticed once and their end logged, the outbox probed after it refused.

Every ``IDGATE_CONSENT_RECONCILE_MS`` (default 1 s) each replica reconciles the consent
state with the ledger (consent.service.ConsentService.reconcile): a withdrawal whose
immediate apply failed, or that a restored Redis snapshot lost, takes effect within that
period on every replica. A success there also means Redis and the database answer again;
an outbox that refused appends is probed with a tiny write until it accepts again, which
is what ``/readyz`` reports.
"""

from __future__ import annotations

import asyncio

import structlog

from consent.service import ConsentService
from export.outbox import Outbox
from gateway.errors import OUTAGES, dependency_of

log = structlog.get_logger("idgate.maintenance")


async def reconcile_once(consent: ConsentService) -> None:
    try:
        applied = await consent.reconcile()
    except Exception as exc:
        dependency = dependency_of(exc)
        if dependency is None:
            log.error("consent.reconcile_failed", error=type(exc).__name__)
        else:
            OUTAGES.down(dependency, exc, refused=False)
        return
    for dependency in ("redis", "database", "consent-state"):
        OUTAGES.up(dependency)
    if applied:
        log.info("consent.reconciled", records=applied)


async def probe_outbox(outbox: Outbox) -> None:
    if outbox.accepting or await outbox.probe():
        OUTAGES.up("outbox")


async def keep_healthy(consent: ConsentService, outbox: Outbox, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        await reconcile_once(consent)
        await probe_outbox(outbox)
