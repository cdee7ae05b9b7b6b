"""Distributed mode: two replicas on one Redis and PostgreSQL share console sessions; an
officer signed in on one is signed in on the other, and signed out of both at once."""

from __future__ import annotations

import httpx
import pytest

from gateway.console.sessions import SESSION_COOKIE
from tests.conftest import PostgresSchema, RedisNamespace, make_gateway
from tests.console.conftest import CONSOLE_CONFIG, TOKENS, csrf_of, person_with_phone, sign_in

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def test_replicas_share_console_sessions(
    tmp_path, pg_schema: PostgresSchema, redis_ns: RedisNamespace
) -> None:
    env = {**redis_ns.env(), "DATABASE_URL": pg_schema.url}
    a = make_gateway(tmp_path / "a", config=CONSOLE_CONFIG, extra_env=env).start()
    b = make_gateway(tmp_path / "b", config=CONSOLE_CONFIG, extra_env=env).start()
    try:
        with httpx.Client(base_url=a.url) as on_a, httpx.Client(base_url=b.url) as on_b:
            phone, _ = person_with_phone(on_a)
            csrf = sign_in(on_a, TOKENS["compliance"])
            on_b.cookies.set(SESSION_COOKIE, on_a.cookies[SESSION_COOKIE], path="/console")
            # the load balancer sends the next request to the other replica
            r = on_b.post(
                "/console/subject",
                data={"csrf_token": csrf, "tenant": "mall", "type": "phone", "identifier": phone},
            )
            assert r.status_code == 200 and 'id="subject-node">phone:k' in r.text, r.text
            assert phone not in r.text
            # signed out on B: A refuses the session too
            r = on_b.post("/console/sign-out", data={"csrf_token": csrf_of(r.text)})
            assert r.status_code == 303
            assert on_a.get("/console/").status_code == 303
    finally:
        a.stop()
        b.stop()
