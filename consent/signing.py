"""The Ed25519 key that signs consent ledger checkpoints and export seals.

The private key comes from the environment (``IDGATE_LEDGER_KEY``: base64 of the 32 raw
bytes) or a key file holding that text; in dev, a key file is generated under the data
directory (mode 0600) when neither is given. Key material is never logged and never shown
by ``repr``. Verification needs only the public key, which every signed object carries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

log = structlog.get_logger(__name__)

LEDGER_KEY_BYTES = 32


class InvalidLedgerKey(Exception):
    """The ledger signing key is missing or malformed (the message never holds key material)."""


def key_id_of(public_key_b64: str) -> str:
    """First 16 hex chars of sha256 over the raw public key: short enough to read, long enough to pin."""
    raw = base64.b64decode(public_key_b64, validate=True)
    return hashlib.sha256(raw).hexdigest()[:16]


class LedgerSigner:
    """Signs byte strings with the ledger's Ed25519 private key."""

    __slots__ = ("_key", "public_key_b64", "key_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw_public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw_public).decode("ascii")
        self.key_id = hashlib.sha256(raw_public).hexdigest()[:16]

    @classmethod
    def from_b64(cls, text: str) -> LedgerSigner:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidLedgerKey("ledger key is not valid base64") from None
        if len(raw) != LEDGER_KEY_BYTES:
            raise InvalidLedgerKey(f"ledger key must be {LEDGER_KEY_BYTES} raw bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._key.sign(data)).decode("ascii")

    def __repr__(self) -> str:  # never show key material
        return f"LedgerSigner(key_id={self.key_id})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("LedgerSigner holds a private key and is not picklable")


def verify(public_key_b64: str, data: bytes, signature_b64: str) -> bool:
    """True when ``signature_b64`` is a valid signature of ``data`` by that key; False for anything else."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        public.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True


def new_ledger_key_b64() -> str:
    """A fresh private key as base64 of its 32 raw bytes (the IDGATE_LEDGER_KEY format)."""
    raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode("ascii")


def _create_private(path: Path, text: str) -> None:
    """Create ``path`` (mode 0600) with ``text``, atomically; FileExistsError when it exists.

    Written to a temporary file first and hard-linked into place, so a second process
    starting at the same moment never reads a half-written key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_key_file(path: Path) -> LedgerSigner:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidLedgerKey(f"cannot read ledger key file {path}: {exc.strerror}") from None
    # imported here: the offline verifier imports this module and must not need identity
    from identity.key_files import key_file_mode_problem

    problem = key_file_mode_problem(path)
    if problem is not None:
        raise InvalidLedgerKey(f"ledger {problem}")
    return LedgerSigner.from_b64(text)


def load_signer(*, env_value: str | None, key_file: Path | None, dev_file: Path | None) -> LedgerSigner:
    """The signer from ``IDGATE_LEDGER_KEY``, else the key file, else (dev only) ``dev_file``.

    ``dev_file`` is read when it exists and generated (mode 0600) when it does not; pass
    None outside dev so a missing key fails instead of silently signing with a new one.
    """
    if env_value:
        return LedgerSigner.from_b64(env_value)
    if key_file is not None:
        return _read_key_file(key_file)
    if dev_file is not None:
        if not dev_file.exists():
            try:
                _create_private(dev_file, new_ledger_key_b64())
                log.warning("ledger.dev_key_generated", path=str(dev_file))
            except FileExistsError:
                pass  # another process created it first: use theirs
        return _read_key_file(dev_file)
    raise InvalidLedgerKey("no ledger signing key: set IDGATE_LEDGER_KEY or IDGATE_LEDGER_KEY_FILE")
