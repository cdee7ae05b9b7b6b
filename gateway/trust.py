"""Who may assert what: the identity-assertion verifiers of the configured client sources.

A client source's write key is public; its person-level claims count only with a signed
identity assertion from the shop's backend (identity.assertions). This module builds one
verifier per source that has assertion keys, failing at start when a secret is missing.
"""

from __future__ import annotations

from gateway.config import Config, ConfigProblems
from identity.assertions import AssertionVerifier, load_key

Verifiers = dict[tuple[str, str], AssertionVerifier]


def assertion_verifiers(config: Config, *, path: str = "<config>") -> Verifiers:
    """(tenant, source) -> verifier; ConfigProblems when a key cannot be loaded."""
    out: Verifiers = {}
    problems: list[str] = []
    for tenant in config.tenants:
        for source in tenant.sources:
            a = source.assertions
            if a is None:
                continue
            try:
                key = load_key(
                    hs256_secret_env=a.hs256_secret_env,
                    hs256_secret_file=a.hs256_secret_file,
                    ed25519_public_key=a.ed25519_public_key,
                    audience=a.audience,
                    issuer=a.issuer,
                    max_lifetime_seconds=a.max_lifetime_seconds,
                )
            except ValueError as exc:
                problems.append(f"tenant {tenant.id!r} source {source.id!r} assertions: {exc}")
                continue
            out[(tenant.id, source.id)] = AssertionVerifier(key)
    if problems:
        raise ConfigProblems(path, problems)
    return out
