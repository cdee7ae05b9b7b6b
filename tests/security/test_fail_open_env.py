"""Attack: a deployment that forgets IDGATE_ENV.

``IDGATE_ENV`` used to default to ``dev``, where the config's demo write keys and the
README's demo admin tokens are accepted: anyone who read the README could call the admin
API of a deployment that simply did not set the variable. Production is now the default:
without the variable the demo secrets and generated keys are refused (the gateway does not
start on a config that holds them), and dev mode is an explicit opt-in that the banner shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from consent.signing import new_ledger_key_b64
from gateway.settings import Settings
from identity.pseudonym import new_key_document
from tests.cli.conftest import EXAMPLE_CONFIG, ServeFactory, clean_env

pytestmark = pytest.mark.slow


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    factory = ServeFactory(tmp_path)
    yield factory
    for served in factory.started:
        served.stop()


def test_settings_default_to_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDGATE_ENV", raising=False)
    monkeypatch.setenv("IDGATE_KEYS", new_key_document(["acme"]))
    monkeypatch.setenv("IDGATE_LEDGER_KEY", new_ledger_key_b64())
    settings = Settings.from_env()
    assert settings.env == "production" and not settings.dev


def test_without_idgate_env_the_demo_setup_does_not_start(tmp_path: Path, serve: ServeFactory) -> None:
    """The example config with its demo keys and no IDGATE_ENV: refused, with the way out."""
    no_keys = serve(tmp_path / "a", env=clean_env())
    assert no_keys.wait_exit() != 0
    assert "IDGATE_ENV=dev" in no_keys.stderr(), no_keys.stderr()

    # with real keys, the config's demo write keys and admin tokens are still refused
    keys = {"IDGATE_KEYS": new_key_document(["acme"]), "IDGATE_LEDGER_KEY": new_ledger_key_b64()}
    demo_config = serve(tmp_path / "b", env=clean_env(**keys))
    assert demo_config.wait_exit() != 0
    err = demo_config.stderr()
    assert "dev_token" in err and "dev_write_key" in err, err


def test_dev_mode_is_an_explicit_opt_in_the_banner_shows(tmp_path: Path, serve: ServeFactory) -> None:
    gw = serve(tmp_path / "var", env=clean_env(IDGATE_ENV="dev"), config=EXAMPLE_CONFIG).wait_ready()
    lines = gw.stdout().splitlines()
    assert lines[0].startswith("idgate dev on ")
    assert "DEV MODE (IDGATE_ENV=dev" in lines[1], lines[:3]
    # and there the demo admin tokens work, as the README shows
    r = httpx.get(
        f"{gw.url}/admin/consent/verify",
        headers={"Authorization": "Bearer operator-demo-token"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
