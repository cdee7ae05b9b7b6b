"""The ledger commands in dev find the key the dev gateway generated (./var, or
$IDGATE_DATA_DIR), and an auditor pins it: `idgate keys ledger-public-key` gives what
`idgate ledger verify --public-key` takes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from consent.signing import key_id_of, new_ledger_key_b64
from tests.cli.conftest import ServeFactory, clean_env, idgate


def test_dev_ledger_key_is_found_and_pinned_by_the_auditor(tmp_path: Path, serve: ServeFactory) -> None:
    gw = serve(tmp_path / "var").wait_ready()
    r = httpx.post(
        f"{gw.url}/v1/consent",
        auth=("acme-web-demo-key", ""),
        json={"anonymousId": "anon-1", "grant": ["analytics"], "noticeId": "privacy-2026-11"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    gw.stop()

    dev = clean_env(IDGATE_ENV="dev")  # no key, no data dir: ./var, as after `make run`
    public = idgate("keys", "ledger-public-key", env=dev, cwd=tmp_path)
    assert public.returncode == 0, public.stderr
    public_key = public.stdout.strip()
    assert str(Path("var") / "dev-ledger-key") in public.stderr

    checkpoint = idgate("ledger", "checkpoint", env=dev, cwd=tmp_path)
    assert checkpoint.returncode == 0, checkpoint.stderr
    assert checkpoint.stdout.startswith("checkpoint ") and f"key {key_id_of(public_key)}" in checkpoint.stdout

    exported = idgate("ledger", "export", "--out", "-", env=dev, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]  # nothing but the export
    assert lines[-1]["kind"] == "end" and lines[-1]["public_key"] == public_key
    assert "seal unsigned" not in exported.stderr

    verified = idgate("ledger", "verify", "-", "--public-key", public_key, env=dev, input=exported.stdout)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("OK: ")

    (tmp_path / "ledger.jsonl").write_text(exported.stdout)
    other = idgate("keys", "ledger-public-key", env=clean_env(IDGATE_LEDGER_KEY=new_ledger_key_b64()))
    pinned_wrong = idgate(
        "ledger", "verify", str(tmp_path / "ledger.jsonl"), "--public-key", other.stdout.strip(), env=dev
    )
    assert pinned_wrong.returncode == 1 and pinned_wrong.stdout.startswith("TAMPERED")


def test_without_a_dev_key_the_ledger_commands_say_where_they_looked(tmp_path: Path) -> None:
    done = idgate("ledger", "checkpoint", env=clean_env(IDGATE_ENV="dev"), cwd=tmp_path)
    assert done.returncode == 2
    assert "IDGATE_LEDGER_KEY" in done.stderr and "dev-ledger-key" in done.stderr
    assert not (tmp_path / "var" / "dev-ledger-key").exists()  # the CLI never makes one up
