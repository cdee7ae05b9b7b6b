"""``idgate plan``: a launch check of a sample of events against a tenant's plan (``check``),
the events it blocked or altered (``violations``, the same command as ``idgate violations
list``), its coverage (``coverage``) and plans brought from other tools (``import``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from gateway.config import ConfigProblems, load_config
from gateway.plan import SampleReport, TrackingPlan, plan_for
from gateway.plan_import import FORMATS
from gateway.plan_monitor import coverage, coverage_lines
from gateway.violations_cli import DATA_DIR, violation_file, violations_list


@click.group("plan")
def plan() -> None:
    """Tracking plans: launch checks, violations, coverage, imports."""


def _tenant_plan(config_path: Path, tenant: str | None) -> tuple[str, TrackingPlan]:
    """The tenant (default: the first with a plan) and its plan; exit 2 with one line if none."""
    try:
        cfg = load_config(config_path, dev=True)
    except ConfigProblems as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    tenants = [t for t in cfg.tenants if t.tracking_plan_file and (tenant is None or t.id == tenant)]
    found = plan_for(tenants[0]) if tenants else None
    if found is None:
        click.echo(
            f"idgate: no tenant {'named ' + repr(tenant) + ' ' if tenant else ''}with a tracking_plan_file",
            err=True,
        )
        sys.exit(2)
    return tenants[0].id, found


@plan.command("check")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("idgate.toml"))
@click.option("--tenant", default=None, help="Whose plan (default: the first tenant with one).")
@click.option(
    "--events",
    "events_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    required=True,
    help="A sample: one Segment or Sensors event (JSON) a line.",
)
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def plan_check(config_path: Path, tenant: str | None, events_path: Path, as_json: bool) -> None:
    """Validate a sample of events against the plan: which events and properties are missing,
    of the wrong type, out of range, or not planned. Exit status 1 when any event violates."""
    _, found = _tenant_plan(config_path, tenant)
    report = SampleReport(plan=found)
    with events_path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                report.add(json.loads(line))
            except json.JSONDecodeError:
                report.unreadable += 1
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2, sort_keys=True))
    else:
        click.echo("\n".join(report.lines()))
    sys.exit(1 if report.valid < report.checked else 0)


# the listing's older name, the same command
plan.add_command(violations_list, "violations")


@plan.command("coverage")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("idgate.toml"))
@click.option("--tenant", default=None, help="Whose plan (default: the first tenant with one).")
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def plan_coverage(config_path: Path, tenant: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Planned events never seen and seen events not planned, from the counts the gateway
    keeps in its data directory, or with REDIS_URL those every replica shares (a running
    gateway writes them within seconds). Exit status 1
    when a planned event was never seen or an unplanned one was."""
    tenant_id, found = _tenant_plan(config_path, tenant)
    redis_url = os.environ.get("REDIS_URL")
    if redis_url:  # distributed: the counts every replica shares
        from gateway.plan_monitor import seen_from_hash
        from identity.redis_client import open_redis

        client = open_redis(redis_url)
        try:
            prefix = os.environ.get("IDGATE_REDIS_PREFIX", "idgate")
            counts = seen_from_hash(tenant_id, client.hgetall(f"{prefix}:plan:seen:{tenant_id}"))
        finally:
            client.close()
    else:
        store = violation_file(data_dir)
        try:
            counts = store.seen(tenant_id)
        finally:
            store.close()
    report = coverage(found, counts)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo("\n".join(coverage_lines(report)))
    sys.exit(1 if report["neverSeen"] or report["notPlanned"] else 0)


@plan.command("import")
@click.option(
    "--from", "source", type=click.Choice(FORMATS), required=True, help="The tool the file comes from."
)
@click.argument("export", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Default: stdout.",
)
@click.option("--name", default=None, help="The plan's name (default: the export's).")
@click.option("--owner", default="imported", show_default=True, help="Owner of every event (review them).")
@click.option("--purpose", "purposes", multiple=True, default=("analytics",), show_default=True)
def plan_import(
    source: str, export: Path, out_path: Path | None, name: str | None, owner: str, purposes: tuple[str, ...]
) -> None:
    """Convert a Segment Protocols tracking plan (Public API rules or Config API export, JSON)
    or a RudderStack tracking plan (Data Catalog API, JSON) into idgate's YAML plan. What was
    left out or changed is listed on stderr; exit 2 when the file is not such a plan."""
    from gateway.plan import PlanProblems
    from gateway.plan_import import ImportProblem, convert

    try:
        raw = json.loads(export.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        click.echo(f"idgate: {export}: not JSON ({exc})", err=True)
        sys.exit(2)
    try:
        imported = convert(raw, source, name=name, owner=owner, purposes=purposes)  # type: ignore[arg-type]
    except ImportProblem as exc:
        click.echo(f"idgate: {export}: not a {source} tracking plan: {exc}", err=True)
        sys.exit(2)
    except PlanProblems as exc:
        click.echo(f"idgate: {export}: the converted plan is not valid: {'; '.join(exc.problems)}", err=True)
        sys.exit(2)
    for note in imported.notes:
        click.echo(f"note: {note}", err=True)
    text = (
        f"# Imported from {source} ({export.name}): review owners, purposes and data classes.\n"
        + imported.yaml()
    )
    if out_path is None:
        click.echo(text, nl=False)
    else:
        out_path.write_text(text, encoding="utf-8")
        click.echo(f"{len(imported.plan['events'])} events written to {out_path}", err=True)
