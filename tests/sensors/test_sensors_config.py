"""Sensors project/token per source: validated like write keys, indexed by token hash."""

from __future__ import annotations

import pytest

from gateway.config import ConfigProblems, hash_write_key, index_sensors_tokens, parse_config

TOKEN_HASH = hash_write_key("server-token-0001")
WEB = "1" * 64


def config(sources: str) -> str:
    return f"""
[[tenants]]
id = "acme"
{sources}
"""


def test_a_sensors_only_source_needs_no_write_key_and_is_indexed_by_token() -> None:
    cfg = parse_config(
        config(
            f"""
[[tenants.sources]]
id = "server"
platform = "server"
sensors_project = "acme_prod"
sensors_token_sha256 = "{TOKEN_HASH}"

[[tenants.sources]]
id = "mp"
platform = "miniprogram"
dev_write_key = "mp-demo-key-1"
sensors_project = "acme_prod"
sensors_dev_token = "mp-sensors-token"
"""
        ),
        dev=True,
    )
    index = index_sensors_tokens(cfg, dev=True)
    assert index[TOKEN_HASH].source.id == "server"
    assert index[hash_write_key("mp-sensors-token")].source.id == "mp"
    # outside dev, plain tokens are not indexed (and the config check refuses them)
    assert hash_write_key("mp-sensors-token") not in index_sensors_tokens(cfg, dev=False)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ('sensors_project = "acme"', "sensors_project needs sensors_token_sha256"),
        (f'sensors_token_sha256 = "{TOKEN_HASH}"', "a Sensors token needs sensors_project"),
        ('sensors_project = "acme"\nsensors_token_sha256 = "abc"', "sensors_token_sha256: must be 64"),
        (f'sensors_project = "9 lives"\nsensors_token_sha256 = "{TOKEN_HASH}"', "sensors_project: '9 lives'"),
        ('sensors_project = "acme"\nsensors_dev_token = "demo-token-1"', "only allowed with IDGATE_ENV=dev"),
    ],
)
def test_problems_are_reported_with_their_location(fields: str, problem: str) -> None:
    with pytest.raises(ConfigProblems) as info:
        parse_config(
            config(
                f'[[tenants.sources]]\nid = "web"\nplatform = "web"\nwrite_key_sha256 = "{WEB}"\n{fields}'
            ),
            dev=False,
        )
    assert any(p.startswith("tenants[0].sources[0]") and problem in p for p in info.value.problems), (
        info.value
    )


def test_a_token_is_used_by_one_source_only() -> None:
    two = "".join(
        f'[[tenants.sources]]\nid = "s{i}"\nplatform = "server"\nsensors_project = "acme"\n'
        f'sensors_token_sha256 = "{TOKEN_HASH}"\n'
        for i in range(2)
    )
    with pytest.raises(ConfigProblems) as info:
        parse_config(config(two), dev=False)
    assert "tenants[0].sources[1]: Sensors token already used by tenants[0].sources[0]" in info.value.problems
