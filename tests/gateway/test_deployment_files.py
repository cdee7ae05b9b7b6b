"""Files and encodings at the edges of a real `idgate serve` (issue 12, item 9): data files
and keys are private to their owner, key files other users can read are refused at start,
and a gzip body with anything after its first member is refused."""

from __future__ import annotations

import base64
import gzip
import json
import os
import stat
import subprocess
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from consent.signing import new_ledger_key_b64
from identity.pseudonym import new_key_document
from tests.conftest import IDGATE, MALL_WEB_KEY, ROOT, SHOP_SENSORS_TOKEN, Gateway, make_gateway, mid
from tests.sensors.conftest import sensors_event

pytestmark = pytest.mark.slow


def loose_files(root: Path) -> list[str]:
    """Files and directories under ``root`` that its group or other users may use."""
    out = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if not path.is_symlink() and mode & 0o077:
            out.append(f"{path.relative_to(root)} {mode:04o}")
    return out


def test_data_files_and_dev_keys_are_private(fresh_gateway: Gateway) -> None:
    """The outbox, consent and identity databases (with their journals), sink files, dev
    keys and the lock: 0600 (directories 0700), whatever the umask; a file an older version
    left readable is made private at start."""
    old_umask = os.umask(0o022)
    try:
        old_sink = fresh_gateway.data_dir / "sinks" / "warehouse" / "2020-01-01.jsonl"
        old_sink.parent.mkdir(parents=True)
        old_sink.write_text("")
        old_sink.chmod(0o644)
        fresh_gateway.start()
    finally:
        os.umask(old_umask)
    ids = {mid()}
    fresh_gateway.send_tracks(sorted(ids))
    assert fresh_gateway.wait_for_sink(ids)
    with fresh_gateway.client(MALL_WEB_KEY) as c:
        body = {"anonymousId": "a-private", "grant": ["analytics"], "noticeId": "notice-v1"}
        r = c.post("/v1/consent", json=body)
        assert r.status_code == 200, r.text
    names = {p.name for p in fresh_gateway.data_dir.rglob("*")}
    assert {"outbox.sqlite3", "consent.sqlite3", "dev-keys.json", "dev-ledger-key", "idgate.lock"} <= names
    assert loose_files(fresh_gateway.data_dir) == []


def serve_refuses(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    gw = make_gateway(tmp_path, extra_env=env)
    return subprocess.run(
        [
            str(IDGATE),
            "serve",
            "--config",
            str(gw.config_path),
            "--port",
            "0",
            "--data-dir",
            str(gw.data_dir),
        ],
        env=gw.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("variable", ["IDGATE_KEY_FILE", "IDGATE_LEDGER_KEY_FILE"])
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660], ids=["0644", "0604", "0660"])
def test_key_files_other_users_can_read_are_refused_at_start(
    tmp_path: Path, variable: str, mode: int
) -> None:
    key_file = tmp_path / "secret.key"
    key_file.write_text(
        new_key_document(["shop", "mall"]) if variable == "IDGATE_KEY_FILE" else new_ledger_key_b64()
    )
    key_file.chmod(mode)
    done = serve_refuses(tmp_path, {variable: str(key_file)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert (
        f"cannot start: {'pseudonymisation' if variable == 'IDGATE_KEY_FILE' else 'ledger'} key file"
        in done.stderr
    )
    assert f"{key_file} has mode {mode:04o}" in done.stderr
    assert f"chmod 600 {key_file}" in done.stderr


def test_private_key_files_are_accepted(tmp_path: Path) -> None:
    keys, ledger = tmp_path / "keys.json", tmp_path / "ledger.key"
    keys.write_text(new_key_document(["shop", "mall"]))
    ledger.write_text(new_ledger_key_b64())
    keys.chmod(0o600)
    ledger.chmod(0o440)  # a Kubernetes Secret mounted for the pod's fsGroup
    gw = make_gateway(
        tmp_path / "gw", extra_env={"IDGATE_KEY_FILE": str(keys), "IDGATE_LEDGER_KEY_FILE": str(ledger)}
    )
    try:
        gw.start()
        gw.send_tracks([mid()])
    finally:
        gw.stop()


BATCH = json.dumps(
    {"batch": [{"type": "track", "userId": "u-gz", "event": "Gz", "messageId": "m-gz"}]}
).encode()


@pytest.mark.parametrize(
    ("case", "body"),
    [
        pytest.param(case, body, id=case)
        for case, body in [
            ("a second gzip member", gzip.compress(BATCH) + gzip.compress(b'{"batch": []}')),
            ("bytes after the member", gzip.compress(BATCH) + b"trailing"),
            ("a truncated member", gzip.compress(BATCH)[:-6]),
        ]
    ],
)
def test_a_gzip_body_must_be_exactly_one_member(gateway: Gateway, case: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    with gateway.client() as c:
        r = c.post("/v1/batch", content=body, headers=headers)
        assert r.status_code == 400, (case, r.text)
        assert r.json()["error"] == "invalid_encoding" and r.json()["field"] == "Content-Encoding", r.text
        whole = json.dumps(
            {"batch": [{"type": "track", "userId": "u-gz", "event": "Gz", "messageId": mid()}]}
        )
        ok = c.post("/v1/batch", content=gzip.compress(whole.encode()), headers=headers)
        assert ok.status_code == 200 and ok.json()["accepted"] == 1, ok.text


def test_sensors_gzip_data_must_be_exactly_one_member(gateway: Gateway) -> None:
    event = json.dumps(sensors_event("visitor-gz")).encode()
    url = f"{gateway.url}/sa?project=shop&token={SHOP_SENSORS_TOKEN}"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for payload in (gzip.compress(event) + gzip.compress(event), gzip.compress(event) + b"x"):
        data = quote(base64.b64encode(payload).decode())
        r = httpx.post(url, content=f"data={data}&gzip=1", headers=form, timeout=10)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_encoding" and r.json()["field"] == "data", r.text
    data = quote(base64.b64encode(gzip.compress(event)).decode())
    assert httpx.post(url, content=f"data={data}&gzip=1", headers=form, timeout=10).status_code == 200
