"""The signed answer to an access or copy request (PIPL Art. 44, 45): what idgate holds on a person.

A bundle is one JSON document::

    {"bundle": {...}, "signature": {"algorithm": "Ed25519", "keyId": ..., "publicKey": ..., "value": ...}}

``bundle`` lists the person's identifiers (type and pseudonym, never a raw value: idgate
holds none) and unified IDs, their consent history (every ledger record naming one of those
identifiers, with notice id and hash and the record's chain hash, so each can be checked
against a ledger export), the deliveries that relied on those consents, the events still held
(outbox, dead letters) and the destinations that received the person's data. ``signature``
is the ledger key's Ed25519 signature over the canonical JSON of ``bundle`` (sorted keys,
compact, UTF-8: ``consent.ledger_format.canonical_json``), the same key that signs the
ledger's checkpoints, so ``verify_bundle`` (or ``idgate rights verify-bundle``) checks it
offline with nothing but the document and, optionally, the trusted public key.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from consent.ledger_format import RECORD_FIELDS, canonical_json, record_object, rfc3339
from consent.proofs import Delivery
from consent.signing import LedgerSigner, verify

BUNDLE_FORMAT = "idgate-rights-bundle/1"
# The tabular parts of a bundle, as CSV: part -> its columns.
CSV_PARTS: dict[str, tuple[str, ...]] = {
    "identifiers": ("type", "pseudonym"),
    "consentHistory": (
        "seq",
        "record_id",
        "record_type",
        "state",
        "purposes",
        "notice_id",
        "notice_hash",
        "consent_kind",
        "legal_basis",
        "source",
        "platform",
        "at",
        "identifiers",
        "hash",
    ),
    "deliveries": ("destination", "messageId", "deliveredAt", "ledgerSeq"),
    "heldEvents": ("store", "messageId", "receivedAt", "destinations", "deadAt", "reason", "event"),
}


def consent_history(records: Sequence[Any]) -> list[dict[str, Any]]:
    """Ledger records as in a ledger export (every field, times as RFC 3339)."""
    out = []
    for r in records:
        obj = record_object({name: getattr(r, name) for name in RECORD_FIELDS})
        obj.pop("kind", None)
        out.append(obj)
    return out


def build_bundle(
    *,
    request_id: str,
    tenant: str,
    kind: str,
    subject: str,
    nodes: Sequence[str],
    unified_ids: Sequence[str],
    records: Sequence[Any],
    deliveries: Sequence[Delivery],
    held: Sequence[Mapping[str, Any]],
    recipients: Collection[str],
    generated_at: datetime,
) -> dict[str, Any]:
    identifiers = [{"type": n.partition(":")[0], "pseudonym": n.partition(":")[2]} for n in nodes]
    return {
        "format": BUNDLE_FORMAT,
        "requestId": request_id,
        "tenant": tenant,
        "kind": kind,
        "generatedAt": rfc3339(generated_at),
        "subject": subject,
        "identifiers": identifiers,
        "unifiedIds": sorted(set(unified_ids)),
        "consentHistory": consent_history(records),
        "deliveries": [
            {
                "destination": d.destination,
                "messageId": d.message_id,
                "deliveredAt": rfc3339(d.delivered_at),
                "ledgerSeq": d.ledger_seq,
            }
            for d in deliveries
        ],
        "heldEvents": [dict(h) for h in held],
        "destinations": sorted(set(recipients) | {d.destination for d in deliveries}),
    }


def bundle_digest(bundle: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(bundle)).hexdigest()


def sign_bundle(bundle: Mapping[str, Any], signer: LedgerSigner) -> dict[str, Any]:
    return {
        "bundle": dict(bundle),
        "signature": {
            "algorithm": "Ed25519",
            "keyId": signer.key_id,
            "publicKey": signer.public_key_b64,
            "value": signer.sign(canonical_json(bundle)),
        },
    }


def verify_bundle(document: Mapping[str, Any], trusted_keys: Collection[str] | None = None) -> bool:
    """True when ``document`` is a bundle signed by its stated key (and that key is one of
    ``trusted_keys``, base64 public keys, when given); False for anything else."""
    try:
        bundle, signature = document["bundle"], document["signature"]
        if bundle.get("format") != BUNDLE_FORMAT or signature.get("algorithm") != "Ed25519":
            return False
        public_key = str(signature["publicKey"])
        if trusted_keys is not None and public_key not in trusted_keys:
            return False
        return verify(public_key, canonical_json(bundle), str(signature["value"]))
    except (KeyError, TypeError, AttributeError, ValueError):
        return False


def bundle_csv(bundle: Mapping[str, Any], part: str) -> str:
    """One tabular part of a bundle as CSV (lists joined with ``;``, nested values as JSON).
    Not signed itself: it is derived from the signed JSON, whose digest the caller names."""
    columns = CSV_PARTS[part]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in bundle[part]:
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                cells.append(";".join(value))
            elif isinstance(value, dict | list):
                cells.append(json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
            else:
                cells.append("" if value is None else str(value))
        writer.writerow(cells)
    return out.getvalue()
