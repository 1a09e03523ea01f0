"""Operations commands: ``medblocks webhooks ...`` and ``medblocks exports ...``.

Mounted by the lead through ``PLUGINS`` in ``medblocks_pipelines/cli/__init__.py``:
``medblocks_pipelines.cli.ops:webhooks`` (top level, ``webhooks``) and
``medblocks_pipelines.cli.ops:exports`` (top level, ``exports``).
"""

import json
from datetime import datetime

import click
import httpx

from medblocks_pipelines.cli.core import control_plane, print_table
from medblocks_pipelines.lib.ops import webhooks as wh


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
@click.option("--tenant", "tenant_id", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def webhooks_list(tenant_id: str | None, as_json: bool) -> None:
    """List endpoints with their state and failure counts (never secrets)."""
    cp = control_plane()
    if as_json:
        for e in wh.list_endpoints(cp, tenant_id=tenant_id):
            click.echo(json.dumps({k: _fmt(v) if v is not None else None for k, v in e.items()}))
        return
    rows = [
        [
            e["id"],
            e["tenant_id"],
            e["url"],
            ",".join(e["event_types"]),
            e["status"],
            e["consecutive_failures"],
            e["disabled_reason"],
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
@click.option("--reason", default="disabled by operator", show_default=True)
def webhooks_disable(endpoint_id: str, reason: str) -> None:
    """Stop delivering to an endpoint (pending deliveries wait until it is enabled)."""
    wh.set_endpoint_status(control_plane(), endpoint_id, "disabled", reason=reason)
    click.echo(f"endpoint {endpoint_id} disabled")


@webhooks.command("enable")
@click.argument("endpoint_id")
def webhooks_enable(endpoint_id: str) -> None:
    """Enable an endpoint again; its pending deliveries become due at once."""
    wh.set_endpoint_status(control_plane(), endpoint_id, "enabled")
    click.echo(f"endpoint {endpoint_id} enabled")


@webhooks.command("test")
@click.argument("endpoint_id")
def webhooks_test(endpoint_id: str) -> None:
    """Send a signed ``webhook.test`` message now and print the receiver's status code."""
    with httpx.Client() as http:
        code, outcome = wh.send_test(control_plane(), endpoint_id, http=http)
    click.echo(f"endpoint {endpoint_id}: {outcome} (HTTP {code if code is not None else '-'})")
    if outcome != "success":
        raise SystemExit(1)


@webhooks.command("attempts")
@click.argument("endpoint_id")
@click.option("--limit", default=50, show_default=True)
def webhooks_attempts(endpoint_id: str, limit: int) -> None:
    """The latest delivery attempts of an endpoint (time, outcome, status code)."""
    attempts = wh.list_attempts(control_plane(), endpoint_id=endpoint_id)[-limit:]
    rows = [
        [a["delivery_id"], a["attempt"], _fmt(a["at"]), a["outcome"], a["status_code"], a["error"]]
        for a in attempts
    ]
    print_table(
        f"attempts of {endpoint_id}",
        ["delivery", "attempt", "at", "outcome", "status", "error"],
        rows,
    )
