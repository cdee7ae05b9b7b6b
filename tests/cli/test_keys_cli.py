"""``idgate keys`` and ``idgate --version``: key files are never destroyed, the ledger's
public key can be printed for auditors, and stdout holds only what the command prints."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

from consent.signing import LedgerSigner, new_ledger_key_b64
from tests.cli.conftest import clean_env, idgate


def test_version_prints_the_package_version() -> None:
    done = idgate("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"idgate {version('idgate')}"


def test_ledger_key_never_overwrites_an_existing_file_without_force(tmp_path: Path) -> None:
    out = tmp_path / "ledger.key"
    first = idgate("keys", "ledger-key", "--out", str(out))
    assert first.returncode == 0, first.stderr
    key = out.read_text()
    assert LedgerSigner.from_b64(key) and os.stat(out).st_mode & 0o077 == 0

    again = idgate("keys", "ledger-key", "--out", str(out))
    assert again.returncode != 0
    assert "exists" in again.stderr and "--force" in again.stderr
    assert out.read_text() == key

    forced = idgate("keys", "ledger-key", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert out.read_text() != key and LedgerSigner.from_b64(out.read_text())
    assert os.stat(out).st_mode & 0o077 == 0


def versions(path: Path) -> dict[str, dict[str, str]]:
    return {t: e["keys"] for t, e in json.loads(path.read_text())["tenants"].items()}


def test_key_rotation_adds_a_version_and_keeps_every_old_one(tmp_path: Path) -> None:
    out = tmp_path / "keys.json"
    assert idgate("keys", "generate", "--tenant", "acme", "--out", str(out)).returncode == 0
    v1 = versions(out)
    rotated = idgate("keys", "generate", "--tenant", "acme", "--tenant", "shop", "--out", str(out))
    assert rotated.returncode == 0, rotated.stderr
    v2 = versions(out)
    assert v2["acme"]["1"] == v1["acme"]["1"] and set(v2["acme"]) == {"1", "2"}
    assert set(v2["shop"]) == {"1"}
    assert json.loads(out.read_text())["tenants"]["acme"]["active"] == 2
    assert os.stat(out).st_mode & 0o077 == 0


def test_key_generation_refuses_to_overwrite_a_file_that_is_not_a_key_document(tmp_path: Path) -> None:
    out = tmp_path / "ledger.key"  # e.g. the ledger key, named by mistake
    out.write_text(new_ledger_key_b64() + "\n")
    before = out.read_text()
    done = idgate("keys", "generate", "--tenant", "acme", "--out", str(out))
    assert done.returncode != 0
    assert "not a key document" in done.stderr and "Traceback" not in done.stderr
    assert out.read_text() == before


def test_ledger_public_key_from_env_file_and_the_dev_key(tmp_path: Path) -> None:
    private = new_ledger_key_b64()
    public = LedgerSigner.from_b64(private).public_key_b64

    from_env = idgate("keys", "ledger-public-key", env=clean_env(IDGATE_LEDGER_KEY=private))
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout == public + "\n"
    assert private not in from_env.stdout + from_env.stderr

    key_file = tmp_path / "ledger.key"
    key_file.write_text(private + "\n")
    key_file.chmod(0o600)
    from_file = idgate("keys", "ledger-public-key", env=clean_env(IDGATE_LEDGER_KEY_FILE=str(key_file)))
    assert from_file.stdout == public + "\n", from_file.stderr

    # dev: the key the dev gateway generated under the data directory
    data = tmp_path / "var"
    data.mkdir()
    (data / "dev-ledger-key").write_text(private + "\n")
    (data / "dev-ledger-key").chmod(0o600)
    dev = idgate("keys", "ledger-public-key", env=clean_env(IDGATE_ENV="dev", IDGATE_DATA_DIR=str(data)))
    assert dev.stdout == public + "\n", dev.stderr
    # ... and never outside dev
    prod = idgate(
        "keys", "ledger-public-key", env=clean_env(IDGATE_ENV="production", IDGATE_DATA_DIR=str(data))
    )
    assert prod.returncode == 2 and prod.stdout == ""
    assert "IDGATE_LEDGER_KEY" in prod.stderr


def test_log_lines_go_to_stderr_never_into_stdout(tmp_path: Path) -> None:
    """What a command says about its work stays on stderr: a key file other users can read is
    refused there (nothing on stdout), and with a private one stdout holds the result only."""
    private = new_ledger_key_b64()
    key_file = tmp_path / "ledger.key"
    key_file.write_text(private + "\n")
    key_file.chmod(0o644)
    env = clean_env(IDGATE_ENV="production", IDGATE_LEDGER_KEY_FILE=str(key_file))
    refused = idgate("keys", "ledger-public-key", env=env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert f"ledger key file {key_file} has mode 0644" in refused.stderr
    assert f"chmod 600 {key_file}" in refused.stderr

    key_file.chmod(0o600)
    done = idgate("keys", "ledger-public-key", env=env)
    assert done.stdout == LedgerSigner.from_b64(private).public_key_b64 + "\n"

    # the same for the ledger commands, which existed before: a checkpoint prints one line
    data = tmp_path / "var"
    checkpoint = idgate(
        "ledger",
        "checkpoint",
        "--database-url",
        f"sqlite:///{tmp_path / 'consent.sqlite3'}",
        env={**env, "IDGATE_DATA_DIR": str(data)},
    )
    assert checkpoint.returncode == 0, checkpoint.stderr
    assert checkpoint.stdout == "nothing to checkpoint: every record is covered\n"
