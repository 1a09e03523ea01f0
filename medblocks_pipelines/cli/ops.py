"""Operations commands: ``medblocks webhooks ...`` and ``medblocks exports ...``.

Mounted by the lead through ``PLUGINS`` in ``medblocks_pipelines/cli/__init__.py``:
``medblocks_pipelines.cli.ops:webhooks`` (top level, ``webhooks``) and
``medblocks_pipelines.cli.ops:exports`` (top level, ``exports``).
"""

import dataclasses
import json
import os
from datetime import datetime
from typing import TYPE_CHECKING

import click
import httpx

from medblocks_pipelines.cli.core import control_plane, owned_by, print_table
from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.ops import exports as ex
from medblocks_pipelines.lib.ops import webhooks as wh
from medblocks_pipelines.lib.ops.rows import ExportDestination, WebhookEndpoint
from medblocks_pipelines.lib.settings import get_settings

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

_TENANT = click.option("--tenant", "tenant_id", required=True, help="The tenant it belongs to.")


def _endpoint(cp: "ControlPlane", tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    return owned_by(
        tenant_id,
        "webhook endpoint",
        endpoint_id,
        lambda i: wh.get_endpoint(cp, i),
        listing="webhooks list",
    )


def _destination(cp: "ControlPlane", tenant_id: str, destination_id: str) -> ExportDestination:
    return owned_by(
        tenant_id,
        "export destination",
        destination_id,
        lambda i: ex.get_destination(cp, i),
        listing="exports list",
    )


def _fmt(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return value


@click.group()
def webhooks() -> None:
    """Webhook endpoints: tenants hear about connections, syncs, exports and refusals."""


@webhooks.command("add")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--url", required=True, help="The receiver (http or https).")
@click.option(
    "--events",
    default="*",
    show_default=True,
    help="Comma-separated event types or prefixes, e.g. connection.*,sync.failed",
)
@click.option("--description", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print id and secret as JSON.")
def webhooks_add(
    tenant_id: str, url: str, events: str, description: str | None, as_json: bool
) -> None:
    """Register an endpoint; prints its signing secret once (kept encrypted in the vault)."""
    types = [e.strip() for e in events.split(",") if e.strip()]
    endpoint_id, secret = wh.add_endpoint(
        control_plane(), tenant_id=tenant_id, url=url, event_types=types, description=description
    )
    if as_json:
        click.echo(json.dumps({"id": endpoint_id, "secret": secret}))
        return
    click.echo(f"endpoint {endpoint_id} added")
    click.echo(f"signing secret (shown once): {secret}")


@webhooks.command("list")
@_TENANT
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def webhooks_list(tenant_id: str, as_json: bool) -> None:
    """List endpoints with their state and failure counts (never secrets)."""
    cp = control_plane()
    if as_json:
        for e in wh.list_endpoints(cp, tenant_id=tenant_id):
            fields = dataclasses.asdict(e).items()
            click.echo(json.dumps({k: _fmt(v) if v is not None else None for k, v in fields}))
        return
    rows = [
        [
            e.id,
            e.tenant_id,
            e.url,
            ",".join(e.event_types),
            e.status,
            e.consecutive_failures,
            e.disabled_reason,
        ]
        for e in wh.list_endpoints(cp, tenant_id=tenant_id)
    ]
    print_table(
        "webhook endpoints",
        ["id", "tenant", "url", "events", "status", "failures", "disabled reason"],
        rows,
    )


@webhooks.command("disable")
@click.argument("endpoint_id")
@_TENANT
@click.option("--reason", default="disabled by operator", show_default=True)
def webhooks_disable(endpoint_id: str, tenant_id: str, reason: str) -> None:
    """Stop delivering to an endpoint (pending deliveries wait until it is enabled)."""
    cp = control_plane()
    _endpoint(cp, tenant_id, endpoint_id)
    wh.set_endpoint_status(cp, endpoint_id, "disabled", reason=reason)
    click.echo(f"endpoint {endpoint_id} disabled")


@webhooks.command("enable")
@click.argument("endpoint_id")
@_TENANT
def webhooks_enable(endpoint_id: str, tenant_id: str) -> None:
    """Enable an endpoint again; its pending deliveries become due at once."""
    cp = control_plane()
    _endpoint(cp, tenant_id, endpoint_id)
    wh.set_endpoint_status(cp, endpoint_id, "enabled")
    click.echo(f"endpoint {endpoint_id} enabled")


@webhooks.command("test")
@click.argument("endpoint_id")
@_TENANT
def webhooks_test(endpoint_id: str, tenant_id: str) -> None:
    """Send a signed ``webhook.test`` message now and print the receiver's status code."""
    cp = control_plane()
    _endpoint(cp, tenant_id, endpoint_id)
    with httpx.Client() as http:
        code, outcome = wh.send_test(cp, endpoint_id, http=http)
    click.echo(f"endpoint {endpoint_id}: {outcome} (HTTP {code if code is not None else '-'})")
    if outcome != "success":
        raise SystemExit(1)


@webhooks.command("attempts")
@click.argument("endpoint_id")
@_TENANT
@click.option("--limit", default=50, show_default=True)
def webhooks_attempts(endpoint_id: str, tenant_id: str, limit: int) -> None:
    """The latest delivery attempts of an endpoint (time, outcome, status code)."""
    cp = control_plane()
    _endpoint(cp, tenant_id, endpoint_id)
    attempts = wh.list_attempts(cp, endpoint_id=endpoint_id)[-limit:]
    rows = [
        [a.delivery_id, a.attempt, _fmt(a.at), a.outcome, a.status_code, a.error] for a in attempts
    ]
    print_table(
        f"attempts of {endpoint_id}",
        ["delivery", "attempt", "at", "outcome", "status", "error"],
        rows,
    )


# -- exports ---------------------------------------------------------------------------------
@click.group()
def exports() -> None:
    """Export destinations: NDJSON/Parquet folders or S3 buckets, and FHIR servers."""


@exports.command("add")
@click.argument("destination_id")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--kind", type=click.Choice(list(ex.KINDS)), required=True)
@click.option("--url", required=True, help="Folder, s3://bucket/prefix or FHIR base URL.")
@click.option("--config", "config_json", default=None, help="JSON: gzip, resource_types, ...")
@click.option(
    "--purpose",
    default=None,
    help="TEFCA Exchange Purpose the destination receives data for (e.g. T-PYMNT); network rows "
    "go only where the read policy allows their purpose. None: no network rows.",
)
@click.option(
    "--credentials-env",
    default=None,
    help="Name of an env var holding credentials JSON (kept in the vault).",
)
def exports_add(
    destination_id: str,
    tenant_id: str,
    kind: str,
    url: str,
    config_json: str | None,
    purpose: str | None,
    credentials_env: str | None,
) -> None:
    """Create or update a destination."""
    config = json.loads(config_json) if config_json else {}
    if purpose:
        config["purpose"] = purpose
    creds = None
    if credentials_env:
        raw = os.environ.get(credentials_env)
        if not raw:
            raise ConfigError(f"environment variable {credentials_env} is not set")
        creds = json.loads(raw)
    ex.add_destination(
        control_plane(),
        id=destination_id,
        tenant_id=tenant_id,
        kind=kind,
        url=url,
        config=config,
        credentials=creds,
    )
    click.echo(f"export destination {destination_id} saved")


@exports.command("list")
@_TENANT
def exports_list(tenant_id: str) -> None:
    """List destinations and their last committed export."""
    cp = control_plane()
    rows = [
        [
            d.id,
            d.tenant_id,
            d.kind,
            d.url,
            "yes" if d.enabled else "no",
            cp.get_watermark(ex.watermark_key(d.id)),
        ]
        for d in ex.list_destinations(cp, tenant_id=tenant_id)
    ]
    print_table("export destinations", ["id", "tenant", "kind", "url", "enabled", "last seq"], rows)


@exports.command("run")
@click.argument("destination_id")
@_TENANT
def exports_run(destination_id: str, tenant_id: str) -> None:
    """Run one destination's export now (outside Dagster)."""
    cp = control_plane()
    _destination(cp, tenant_id, destination_id)
    res = ex.run_export(cp, get_settings(), destination_id)
    click.echo(
        f"export {destination_id} {res.mode} #{res.seq}: {res.exported} resources, "
        f"{res.deleted} deletions, {res.bytes} bytes in {res.duration_s:.1f}s"
    )


@exports.command("runs")
@_TENANT
@click.option("--destination", "destination_id", default=None)
@click.option("--limit", default=20, show_default=True)
def exports_runs(tenant_id: str, destination_id: str | None, limit: int) -> None:
    """Recent export runs of the tenant with status, counts and errors."""
    cp = control_plane()
    if destination_id is not None:
        _destination(cp, tenant_id, destination_id)
    runs = ex.list_runs(cp, destination_id=destination_id, tenant_id=tenant_id)[:limit]
    rows = [
        [
            r.id,
            r.destination_id,
            r.seq,
            r.mode,
            r.status,
            (r.counts or {}).get("exported"),
            (r.counts or {}).get("deleted"),
            _fmt(r.started_at),
            r.error,
        ]
        for r in runs
    ]
    print_table(
        "export runs",
        ["id", "destination", "seq", "mode", "status", "exported", "deleted", "started", "error"],
        rows,
    )


@exports.command("pause")
@click.argument("destination_id")
@_TENANT
def exports_pause(destination_id: str, tenant_id: str) -> None:
    """Skip this destination in scheduled runs."""
    cp = control_plane()
    _destination(cp, tenant_id, destination_id)
    ex.set_destination_enabled(cp, destination_id, False)
    click.echo(f"export destination {destination_id} paused")


@exports.command("resume")
@click.argument("destination_id")
@_TENANT
def exports_resume(destination_id: str, tenant_id: str) -> None:
    """Include this destination in scheduled runs again."""
    cp = control_plane()
    _destination(cp, tenant_id, destination_id)
    ex.set_destination_enabled(cp, destination_id, True)
    click.echo(f"export destination {destination_id} resumed")
