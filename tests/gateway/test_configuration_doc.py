"""docs/configuration.md covers every key of the TOML config and every environment
variable the settings read, and its defaults are the code's: a field added to
gateway/config.py or gateway/settings.py without its line in the reference fails here."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from gateway import config as cfg
from identity.graph import DEFAULT_MAX_PER_TYPE, DEVICE_LIKE_LIMIT, IdentityRules
from identity.identifiers import IDENTIFIER_TYPES
from tests.conftest import ROOT

DOC = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
STRUCTS = (
    cfg.Config,
    cfg.Limits,
    cfg.RateLimits,
    cfg.AdminToken,
    cfg.ConsoleUser,
    cfg.Tenant,
    cfg.Source,
    cfg.Purpose,
    cfg.NoticeConfig,
    cfg.ConsentConfig,
    cfg.IdentityConfig,
    cfg.CleaningConfig,
    cfg.InternalId,
    cfg.Destination,
    cfg.Recipient,
    cfg.RetryPolicy,
    cfg.RightsConfig,
    cfg.RetentionConfig,
    cfg.KpiDefinition,
    cfg.AlertRule,
    cfg.AlertChannel,
)


def documented_rows() -> dict[str, str]:
    """First-column key -> the whole table row, over every table of the doc."""
    rows = {}
    for line in DOC.splitlines():
        m = re.match(r"\| `\[*([a-z_.A-Z]+)\]*` \|(.*)", line)
        if m:
            rows.setdefault(m.group(1).rsplit(".", 1)[-1], m.group(2))
    return rows


def test_every_config_key_is_documented_with_its_default() -> None:
    rows = documented_rows()
    missing = []
    for struct in STRUCTS:
        for field in msgspec.structs.fields(struct):
            if field.name not in rows and f"`{field.name}" not in DOC:
                missing.append(f"{struct.__name__}.{field.name}")
                continue
            default = field.default
            if isinstance(default, bool | int) and field.name in rows:
                shown = str(default).lower() if isinstance(default, bool) else str(default)
                assert f"`{shown}`" in rows[field.name], f"{struct.__name__}.{field.name}: default {shown}"
    assert not missing, f"not in docs/configuration.md: {missing}"


def test_the_choices_purposes_and_identity_defaults_are_the_codes() -> None:
    for literal in (
        cfg.Platform,
        cfg.LegalBasis,
        cfg.ConsentKind,
        cfg.Region,
        cfg.SinkKind,
        cfg.WithdrawAllAction,
    ):
        for value in literal.__args__:
            assert f"`{value}`" in DOC, value
    for name, purpose in cfg.DEFAULT_PURPOSES.items():
        assert f"| `{name}` | `{purpose.legal_basis}` | `{purpose.kind}` |" in DOC, name
    for id_type in IDENTIFIER_TYPES:
        assert f"`{id_type}`" in DOC
    (row,) = [line for line in DOC.splitlines() if line.startswith("| `max_per_type` |")]
    for id_type, limit in DEFAULT_MAX_PER_TYPE.items():
        if limit != DEVICE_LIKE_LIMIT:
            assert f"`{id_type}` {limit}" in row
    assert f"every other type {DEVICE_LIKE_LIMIT}" in row
    rules = IdentityRules()
    assert ", ".join(f"`{t}`" for t in rules.priority) in " ".join(DOC.split())


def test_every_environment_variable_is_documented() -> None:
    paths = [ROOT / "gateway/settings.py", ROOT / "consent/cli.py", *(ROOT / "gateway").glob("*cli.py")]
    code = "".join(p.read_text(encoding="utf-8") for p in paths)
    read = set(re.findall(r'"((?:IDGATE_|REDIS_|DATABASE_)[A-Z_]*)"', code))
    assert "IDGATE_ENV" in read and "DATABASE_URL" in read
    table = {m for m in re.findall(r"^\| `([A-Z_]+)` \|", DOC, flags=re.MULTILINE)}
    assert read <= table, f"not in docs/configuration.md: {sorted(read - table)}"


def test_the_readme_links_the_reference() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/configuration.md)" in readme
    assert Path(ROOT / "export" / "README.md").exists() and "export/README.md" in DOC
