"""``idgate violations list|show|replay`` (issue 14) beside a real ``idgate serve``: list
and show read the records from the data directory, replay goes through the running
gateway's admin API with the token from IDGATE_ADMIN_TOKEN and prints each record's
outcome; refusals and unknown ids are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli.conftest import clean_env, idgate
from tests.conftest import COMPLIANCE_TOKEN, OPERATOR_TOKEN, Gateway, free_port
from tests.gateway.test_tracking_plan import batch, fix_plan, product_added
from tests.gateway.test_tracking_plan import enforcing as enforcing  # the fixture: an enforce-mode gateway

pytestmark = pytest.mark.slow


def cli(
    gw: Gateway, *args: str, token: str = OPERATOR_TOKEN, url: str = ""
) -> subprocess.CompletedProcess[str]:
    """``idgate ARGS`` as an operator on the gateway's machine: its data directory, its URL
    (the port changes at each start) and the token in the environment."""
    env = clean_env(
        IDGATE_ENV="dev",
        IDGATE_DATA_DIR=str(gw.data_dir),
        IDGATE_URL=url or gw.url,
        IDGATE_ADMIN_TOKEN=token,
    )
    return idgate(*args, env=env)


def test_list_show_and_replay_a_blocked_event_from_the_command_line(enforcing: tuple[Gateway, Path]) -> None:
    gw, plan = enforcing
    first, second = product_added("9.90"), product_added("4.50")
    out = batch(gw, first, second, product_added(1.5))
    assert out["accepted"] == 1 and [v["action"] for v in out["planViolations"]] == ["kept", "kept"]

    listed = cli(gw, "violations", "list", "--tenant", "shop", "--json")
    assert listed.returncode == 0, listed.stderr
    body = json.loads(listed.stdout)
    assert body["counts"] == {"product_added": 2}
    ids = {r["messageId"]: r["id"] for r in body["violations"]}
    first_id, second_id = ids[first["messageId"]], ids[second["messageId"]]
    # the older name is the same command
    alias = cli(gw, "plan", "violations", "--tenant", "shop", "--json")
    assert alias.returncode == 0 and json.loads(alias.stdout) == body, alias.stderr
    table = cli(gw, "violations", "list", "--tenant", "shop")
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("2 records: product_added 2\n")
    row = next(line for line in table.stdout.splitlines() if first["messageId"] in line)
    assert row.split()[:4] == [first_id, "shop/shop-web", "product_added", "kept"], row
    assert "type properties.price" in row

    shown = cli(gw, "violations", "show", first_id)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["id"] == first_id and record["messageId"] == first["messageId"]
    assert record["violations"] == [
        {"rule": "type", "path": "properties.price", "detail": "must satisfy type: 'number'"}
    ]
    assert record["event"]["properties"]["price"] == "9.90"
    assert record["event"]["anonymousId"]  # the pseudonym, never the raw identifier
    assert first["anonymousId"] not in shown.stdout + shown.stderr
    for missing in ("999999", "abc", "²"):
        unknown = cli(gw, "violations", "show", missing)
        assert unknown.returncode == 2, (missing, unknown.stdout, unknown.stderr)
        assert f"no violation record with id {missing!r}" in unknown.stderr
        assert "Traceback" not in unknown.stderr

    # before the fix: still violating, kept, exit 1
    early = cli(gw, "violations", "replay", first_id, "--json")
    assert early.returncode == 1, early.stderr
    answer = json.loads(early.stdout)
    assert answer["records"] == [
        {
            "id": first_id,
            "messageId": first["messageId"],
            "event": "product_added",
            "outcome": "stillViolating",
        }
    ]
    assert (answer["stillViolating"], answer["replayed"]) == (1, 0)

    fix_plan(plan)
    gw.stop()
    gw.start()
    # the client sends the second event again (same message id) and, the plan fixed, it goes
    # through: its record's replay is then a duplicate, not a second delivery
    assert batch(gw, second)["accepted"] == 1
    replayed = cli(gw, "violations", "replay", first_id, second_id)
    assert replayed.returncode == 0, replayed.stderr
    assert [line.split() for line in replayed.stdout.splitlines()] == [
        ["id", "event", "message", "id", "outcome"],
        [first_id, "product_added", first["messageId"], "replayed"],
        [second_id, "product_added", second["messageId"], "duplicate"],
        ["1", "replayed,", "1", "duplicate"],
    ]
    gw.wait_past()
    delivered = [e["messageId"] for e in gw.sink_lines()]
    assert delivered.count(first["messageId"]) == 1 and delivered.count(second["messageId"]) == 1
    assert json.loads(cli(gw, "violations", "list", "--json").stdout)["counts"] == {}
    # a record that went through is gone: replaying it again names it, exit 2
    again = cli(gw, "violations", "replay", first_id)
    assert again.returncode == 2 and f"no violation record with id {first_id!r}" in again.stderr, again.stderr


def test_replay_refusals_are_one_line_and_a_non_zero_exit(enforcing: tuple[Gateway, Path]) -> None:
    gw, _ = enforcing
    batch(gw, product_added("9.90"))
    (record,) = json.loads(cli(gw, "violations", "list", "--json").stdout)["violations"]

    wrong = cli(gw, "violations", "replay", record["id"], token="not-a-token")
    assert wrong.returncode == 1
    assert (
        f"idgate: {gw.url} refused the admin token (401" in wrong.stderr
        and "IDGATE_ADMIN_TOKEN" in wrong.stderr
    )
    role = cli(gw, "violations", "replay", record["id"], "--tenant", "shop", token=COMPLIANCE_TOKEN)
    assert role.returncode == 1 and "(403: this needs the operator role" in role.stderr, role.stderr
    unset = cli(gw, "violations", "replay", record["id"], token="")
    assert unset.returncode == 2 and "set IDGATE_ADMIN_TOKEN" in unset.stderr, unset.stderr
    down = cli(gw, "violations", "replay", record["id"], url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach the gateway at http://127.0.0.1:" in down.stderr, (
        down.stderr
    )
    assert "Connection refused" in down.stderr
    # unknown ids: looked up (exit 2), or refused by the gateway for the tenant named (exit 2)
    unknown = cli(gw, "violations", "replay", "999999")
    assert unknown.returncode == 2 and "no violation record with id '999999'" in unknown.stderr, (
        unknown.stderr
    )
    for_tenant = cli(gw, "violations", "replay", record["id"], "999999", "--tenant", "shop")
    assert for_tenant.returncode == 2, for_tenant.stderr
    assert "unknown violation record id for this tenant 'shop'" in for_tenant.stderr
    assert cli(gw, "violations", "replay", "--all").returncode == 2  # --all needs --tenant
    for refused in (wrong, role, unset, down, unknown, for_tenant):
        assert refused.stdout == "" and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    # nothing of that changed the record
    assert json.loads(cli(gw, "violations", "list", "--json").stdout)["violations"] == [record]
