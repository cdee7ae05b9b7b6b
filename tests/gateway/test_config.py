from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import (
    PUBLISHED_DEMO_SECRETS,
    ConfigProblems,
    hash_write_key,
    index_write_keys,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
IDGATE = str(Path(sys.executable).with_name("idgate"))

BROKEN = """
surprise = 1

[limits]
max_message_bytes = "big"

[[tenants]]
id = "Acme Corp"

[[tenants.sources]]
id = "web"
platform = "tv"

[[tenants.sources]]
id = "app"
platform = "app"
write_key_sha256 = "abc"

[[tenants.sources]]
id = "app"
platform = "app"
dev_write_key = "demo-key-123"

[tenants.tracking_plan]
"Order Completed" = ["analytics", "telepathy"]

[[tenants.destinations]]
id = "wh"
purposes = ["nope"]
region = "moon"
"""


def test_every_problem_is_reported_with_its_location() -> None:
    with pytest.raises(ConfigProblems) as info:
        parse_config(BROKEN, path="broken.toml", dev=False)
    problems = info.value.problems
    text = "\n".join(problems)
    for expected in [
        "surprise: unknown top-level key",
        "limits.max_message_bytes",
        "tenants[0].sources[0].platform",
    ]:
        assert expected in text, text
    # The tenant with an invalid source is reported once as a whole; fix it and the rest shows up.
    fixed = (
        BROKEN.replace('platform = "tv"', 'platform = "web"\ndev_write_key = "demo-key-000"')
        .replace('region = "moon"', 'region = "overseas"')
        .replace('max_message_bytes = "big"', "")
    )
    with pytest.raises(ConfigProblems) as info:
        parse_config(fixed, dev=False)
    text = "\n".join(info.value.problems)
    for expected in [
        "tenants[0].id: 'Acme Corp' must match",
        "tenants[0].sources[0].dev_write_key: plain secrets are only allowed with IDGATE_ENV=dev",
        "tenants[0].sources[1].write_key_sha256: must be 64 lowercase hex characters",
        "tenants[0].sources[2].id: duplicate source id 'app'",
        "tenants[0].tracking_plan.'Order Completed': unknown purpose 'telepathy'",
        "tenants[0].destinations[0].purposes: unknown purpose 'nope'",
    ]:
        assert expected in text, text


def test_toml_syntax_error() -> None:
    with pytest.raises(ConfigProblems) as info:
        parse_config("[[tenants]\nid=", dev=True)
    assert info.value.problems[0].startswith("TOML syntax")


def test_write_keys_indexed_by_hash_dev_keys_only_in_dev() -> None:
    cfg = parse_config(
        '[[tenants]]\nid="a"\n[[tenants.sources]]\nid="s"\nplatform="web"\n'
        f'write_key_sha256="{hash_write_key("real-key-1")}"\ndev_write_key="demo-key-1"\n',
        dev=True,
    )
    assert set(index_write_keys(cfg, dev=True)) == {
        hash_write_key("real-key-1"),
        hash_write_key("demo-key-1"),
    }
    assert set(index_write_keys(cfg, dev=False)) == {hash_write_key("real-key-1")}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IDGATE, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_config_check(tmp_path: Path) -> None:
    ok = run_cli("config", "check", "idgate.example.toml")
    assert ok.returncode == 0 and "OK" in ok.stdout
    prod = run_cli("config", "check", "--production", "idgate.example.toml")
    assert prod.returncode == 1 and "dev_write_key" in prod.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(BROKEN)
    bad = run_cli("config", "check", str(broken))
    assert bad.returncode == 1 and "tenants[0].sources[0].platform" in bad.stderr


def test_cli_keys(tmp_path: Path) -> None:
    out = tmp_path / "keys.json"
    assert run_cli("keys", "generate", "--tenant", "acme", "--out", str(out)).returncode == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert run_cli("keys", "generate", "--tenant", "acme", "--out", str(out)).returncode == 0
    assert '"active": 2' in out.read_text()
    wk = run_cli("keys", "write-key").stdout.splitlines()
    key = wk[0].split(": ", 1)[1]
    assert wk[1] == f'write_key_sha256 = "{hash_write_key(key)}"'


def test_serve_refuses_production_without_keys(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "IDGATE_ENV": "production"}
    env.pop("IDGATE_KEYS", None)
    env.pop("IDGATE_KEY_FILE", None)
    r = subprocess.run(
        [IDGATE, "serve", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and "IDGATE_KEYS" in r.stderr


DESTINATIONS = """
[[tenants]]
id = "a"
[[tenants.sources]]
id = "web"
platform = "web"
write_key_sha256 = "{h1}"
[[tenants.destinations]]
id = "hook"
sink = "webhook"
options = {{ url = "ftp://nowhere", retries = 3 }}
batch_size = 0
pseudonym_domain = "Not A Domain"
retry = {{ max_attempts = 0, initial_backoff_ms = 500, max_backoff_ms = 100 }}
[[tenants.destinations]]
id = "shared"

[[tenants]]
id = "b"
[[tenants.sources]]
id = "web-b"
platform = "web"
write_key_sha256 = "{h2}"
[[tenants.destinations]]
id = "shared"
sink = "redis_stream"
"""


def test_destination_delivery_settings_are_checked() -> None:
    text = DESTINATIONS.format(h1="1" * 64, h2="2" * 64)
    with pytest.raises(ConfigProblems) as info:
        parse_config(text, dev=False)
    problems = "\n".join(info.value.problems)
    where = "tenants[0].destinations[0]"
    assert f"{where}.options.url" in problems
    assert f"{where}.options.retries" in problems
    assert f"{where}.batch_size" in problems
    assert f"{where}.pseudonym_domain" in problems
    assert f"{where}.retry.max_attempts" in problems
    assert f"{where}.retry: need 1 <= initial_backoff_ms <= max_backoff_ms" in problems
    assert "tenants[1].destinations[0].options.stream" in problems  # required option missing
    assert "destination 'shared': used by tenants 'a' and 'b'" in problems


def test_trust_levels_are_checked() -> None:
    """A client platform's key is public: never trusted as server; a server source's demo key
    must be a real secret; assertions need exactly one key."""
    text = """
[[tenants]]
id = "t1"
[[tenants.sources]]
id = "web"
platform = "web"
trust = "server"
dev_write_key = "web-demo-key-1"
[[tenants.sources]]
id = "backend"
platform = "server"
dev_write_key = "short-server-key"
[[tenants.sources]]
id = "app"
platform = "app"
dev_write_key = "app-demo-key-1"
assertions = { hs256_secret_env = "X", ed25519_public_key = "pem" }
"""
    with pytest.raises(ConfigProblems) as info:
        parse_config(text, dev=True)
    problems = "\n".join(info.value.problems)
    assert "tenants[0].sources[0].trust: a web source's key ships to every device" in problems
    assert "tenants[0].sources[1].dev_write_key: a server source needs a secret of at least 32" in problems
    assert "tenants[0].sources[2].assertions: needs exactly one of" in problems
    ok = parse_config(
        text.replace('trust = "server"\n', "")
        .replace("short-server-key", "s" * 32)
        .replace(', ed25519_public_key = "pem"', ""),
        dev=True,
    )
    web, backend, app = ok.tenants[0].sources
    assert not web.is_server and backend.is_server and not app.is_server


def test_wechat_appids_are_checked() -> None:
    """A client source's own appids: valid appids, and not on a server source (it proves
    every openid)."""
    text = """
[[tenants]]
id = "t1"
[[tenants.sources]]
id = "mp"
platform = "miniprogram"
dev_write_key = "mp-demo-key-1"
wechat_appids = ["wx0123456789abcdef", "not an appid"]
[[tenants.sources]]
id = "backend"
platform = "server"
dev_write_key = "s-0000000000000000000000000000000000000001"
wechat_appids = ["wx0123456789abcdef"]
"""
    with pytest.raises(ConfigProblems) as info:
        parse_config(text, dev=True)
    assert info.value.problems == [
        "tenants[0].sources[0].wechat_appids[1]: 'not an appid' must match ^[A-Za-z0-9_-]{1,64}$",
        "tenants[0].sources[1].wechat_appids: a server source asserts every openid itself",
    ], info.value.problems
    ok = parse_config(
        text.replace(', "not an appid"', "").replace('01"\nwechat_appids = ["wx0123456789abcdef"]', '01"'),
        dev=True,
    )
    mp, backend = ok.tenants[0].sources
    assert mp.own_appids == frozenset({"wx0123456789abcdef"}) and backend.own_appids is None


def test_hashes_of_the_published_demo_secrets_are_refused_outside_dev() -> None:
    """A production config that stored the hash of a README demo key or token (anyone can
    read the value) is refused; dev accepts it like the plain demo values."""
    example = (ROOT / "idgate.example.toml").read_text()
    shipped = set(re.findall(r'^(?:dev_write_key|sensors_dev_token|dev_token) = "([^"]+)"', example, re.M))
    assert shipped and shipped <= PUBLISHED_DEMO_SECRETS, shipped - PUBLISHED_DEMO_SECRETS
    text = f"""
[[admin_tokens]]
name = "ops"
role = "operator"
token_sha256 = "{hash_write_key("operator-demo-token")}"
[[tenants]]
id = "t1"
[[tenants.sources]]
id = "backend"
platform = "server"
write_key_sha256 = "{hash_write_key("acme-server-demo-key-0000000000000001")}"
[[tenants.sources]]
id = "mp"
platform = "miniprogram"
write_key_sha256 = "{hash_write_key("a-real-secret-from-idgate-keys-0001")}"
sensors_project = "t1"
sensors_token_sha256 = "{hash_write_key("acme-sensors-demo-token")}"
"""
    with pytest.raises(ConfigProblems) as info:
        parse_config(text)
    problems = [p for p in info.value.problems if "demo secret" in p]
    assert sorted(p.partition(":")[0] for p in problems) == [
        "admin_tokens[0].token_sha256",
        "tenants[0].sources[0].write_key_sha256",
        "tenants[0].sources[1].sensors_token_sha256",
    ], info.value.problems
    assert all("IDGATE_ENV=dev" in p for p in problems)
    assert "demo secret" not in "\n".join(_problems_or_none(text, dev=True))


def _problems_or_none(text: str, *, dev: bool) -> list[str]:
    try:
        parse_config(text, dev=dev)
    except ConfigProblems as exc:
        return list(exc.problems)
    return []


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("burst_seconds = 0", "rate_limits.burst_seconds: must be between 0.01 and 60"),
        ("burst_seconds = 120.5", "rate_limits.burst_seconds: must be between 0.01 and 60"),
        ("forwarded_hops = 11", "rate_limits.forwarded_hops: must be between 0 and 10"),
        ("source_events_per_second = 0", "rate_limits.source_events_per_second: must be at least 1"),
    ],
)
def test_rate_limits_out_of_range_are_named(table: str, expected: str) -> None:
    from tests.conftest import TEST_CONFIG

    with pytest.raises(ConfigProblems) as info:
        parse_config(TEST_CONFIG.replace("[rate_limits]\n", f"[rate_limits]\n{table}\n"), dev=True)
    assert expected in "\n".join(info.value.problems)
    config = parse_config(
        TEST_CONFIG.replace("[rate_limits]\n", "[rate_limits]\nburst_seconds = 0.25\n"), dev=True
    )
    assert config.rate_limits.burst_seconds == 0.25
