"""Distributed mode: two replicas on one Redis and PostgreSQL share console sessions; an
officer signed in on one is signed in on the other, and signed out of both at once."""

from __future__ import annotations

import pytest

from tests.conftest import PostgresSchema, RedisNamespace
from tests.console.conftest import assert_replicas_share_sessions

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def test_replicas_share_console_sessions(
    tmp_path, pg_schema: PostgresSchema, redis_ns: RedisNamespace
) -> None:
    assert_replicas_share_sessions(tmp_path, {**redis_ns.env(), "DATABASE_URL": pg_schema.url})
