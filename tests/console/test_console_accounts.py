"""Console users: a name and an Argon2id password instead of an admin token; failed
sign-ins counted per name and client network; the config checks; the CLI that hashes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner
from litestar import Litestar
from litestar.testing import TestClient

from gateway.cli import main
from gateway.config import ConfigProblems, parse_config
from gateway.console.accounts import FAILURES_PER_NAME
from gateway.console.sessions import SESSION_COOKIE
from tests.console.conftest import CONSOLE_CONFIG, csrf_of
from tests.gateway.conftest import in_process_app

# cheap parameters for the tests' hashes (the verification reads them from the hash)
HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
PASSWORD = "correct horse battery staple"
_FIRST_TENANT = "\n[[tenants]]\n"


def users_config(*users: tuple[str, str, str]) -> str:
    blocks = "".join(
        f'\n[[console_users]]\nname = "{name}"\nrole = "{role}"\npassword_argon2 = "{hashed}"\n'
        for name, role, hashed in users
    )
    return CONSOLE_CONFIG.replace(_FIRST_TENANT, blocks + _FIRST_TENANT, 1)


CONFIG = users_config(
    ("li.wei", "compliance", HASHER.hash(PASSWORD)),
    ("zhang.min", "auditor", HASHER.hash(PASSWORD)),
    ("locked.out", "auditor", HASHER.hash(PASSWORD)),
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Litestar]]:
    app = in_process_app(tmp_path_factory.mktemp("console-users"), CONFIG)
    with TestClient(app=app) as test_client:
        yield test_client


def password_sign_in(client: TestClient[Litestar], name: str, password: str) -> int:
    client.cookies.clear()
    form = client.get("/console/sign-in")
    r = client.post(
        "/console/sign-in",
        data={"name": name, "password": password, "csrf_token": csrf_of(form.text)},
        follow_redirects=False,
    )
    return r.status_code


def test_a_console_user_signs_in_with_name_and_password(client: TestClient[Litestar]) -> None:
    assert password_sign_in(client, "zhang.min", PASSWORD) == 303
    home = client.get("/console/")
    assert 'id="officer">zhang.min<' in home.text
    assert client.get("/console/ledger").status_code == 200
    assert client.get("/console/subject").status_code == 403  # an auditor
    entries = client.get(
        "/admin/access-log", headers={"Authorization": "Bearer compliance-test-token"}
    ).json()["entries"]
    assert any(e["action"] == "console.sign_in" and e["params"] == {"with": "user"} for e in entries)


@pytest.mark.parametrize(("name", "password"), [("li.wei", "wrong password"), ("nobody", PASSWORD)])
def test_a_wrong_password_or_name_is_refused_alike(
    client: TestClient[Litestar], name: str, password: str
) -> None:
    assert password_sign_in(client, name, password) == 401
    assert SESSION_COOKIE not in client.cookies


def test_failed_sign_ins_lock_a_name_out_for_the_window(client: TestClient[Litestar]) -> None:
    for _ in range(FAILURES_PER_NAME):
        assert password_sign_in(client, "locked.out", "guess") == 401
    # even the right password, now
    assert password_sign_in(client, "locked.out", PASSWORD) == 429
    # other names are not locked
    assert password_sign_in(client, "li.wei", PASSWORD) == 303


def test_the_config_checks_console_users() -> None:
    bad = users_config(("li.wei", "compliance", "plain-password"), ("dpo", "auditor", HASHER.hash("x")))
    with pytest.raises(ConfigProblems) as info:
        parse_config(bad, dev=True)
    text = "\n".join(info.value.problems)
    assert "console_users[0].password_argon2: not an Argon2 hash" in text
    assert "console_users[1].name: 'dpo' names another console user or admin token" in text


def test_the_cli_hashes_a_password_for_the_config(tmp_path: Path) -> None:
    done = CliRunner().invoke(main, ["console", "hash-password"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert done.exit_code == 0, done.output
    hashed = done.output.strip().splitlines()[-1]
    assert hashed.startswith("$argon2id$") and PasswordHasher().verify(hashed, PASSWORD)
    short = CliRunner().invoke(main, ["console", "hash-password"], input="short\nshort\n")
    assert short.exit_code != 0
