"""Clinician-workflow commands: ``medblocks sync clinician`` and ``medblocks cds ...``.

``sync clinician`` runs the targeted sync of a launched patient now (what the launch sensor does
within seconds). ``cds fire`` drives the sandbox EHR's CDS client: it signs a JWT, fills prefetch
from the sandbox organization's store, calls our service and prints the cards.
"""

import json
import os
from typing import Any

import click
import httpx

from medblocks_pipelines.lib.errors import ConfigError


def latest_launch(cp: Any, *, tenant: str, org: str, patient: str) -> dict[str, Any]:
    """The most recent active launch connection of ``patient`` at ``org`` (ConfigError if none)."""
    conns = [
        c
        for c in cp.list_connections(
            tenant_id=tenant, pattern="clinician_workflow", state="active", organization_id=org
        )
        if c.get("source_patient_id") == patient
    ]
    if not conns:
        raise ConfigError(
            f"no active EHR launch of that patient at organization {org}",
            hint="launch the app from the EHR first (its token is what we pull with)",
        )
    return max(conns, key=lambda c: c["created_at"])


@click.command("clinician")
@click.option("--tenant", required=True)
@click.option("--org", "org_id", required=True, help="Organization whose EHR launched the app.")
@click.option("--patient", required=True, help="The patient id at that EHR.")
def sync_clinician(tenant: str, org_id: str, patient: str) -> None:
    """Targeted sync of one launched patient from the EHR that launched us."""
    from medblocks_pipelines.cli.core import control_plane
    from medblocks_pipelines.cli.runtime import run_job
    from medblocks_pipelines.lib.partitions import partition_key

    cp = control_plane()
    conn = latest_launch(cp, tenant=tenant, org=org_id, patient=patient)
    result = run_job(
        "clinician_sync_job",
        partition_key=partition_key(tenant, org_id),
        run_config={
            "ops": {"clinician_workflow__records": {"config": {"connection_ids": [conn["id"]]}}}
        },
        tags={
            "medblocks/tenant": tenant,
            "medblocks/source": conn["source_id"],
            "medblocks/trigger": "cli",
        },
    )
    mats = result.asset_materializations_for_node("clinician_workflow__records")
    meta = mats[0].metadata if mats else {}
    pulled = meta.get("connections_pulled")
    resources = meta.get("resources")
    click.echo(
        f"connection {conn['id']}: {getattr(pulled, 'value', 0)} pulled, "
        f"{getattr(resources, 'value', 0)} resources landed"
    )


@click.group("cds")
def cds() -> None:
    """CDS Hooks: drive the sandbox EHR's CDS client against a CDS service."""


@cds.command("fire")
@click.option(
    "--hook",
    type=click.Choice(["patient-view", "order-select", "order-sign"]),
    default="patient-view",
    show_default=True,
)
@click.option("--org", "org_id", required=True, help="Sandbox EHR organization calling.")
@click.option("--patient", required=True, help="Patient id at that organization.")
@click.option(
    "--service-base",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="Base URL of the CDS service (our `medblocks serve`).",
)
@click.option(
    "--sandbox-url",
    envvar="MEDBLOCKS_CDS_EHR_URL",
    required=True,
    help="Base URL of the sandbox cds_ehr role.",
)
@click.option(
    "--prefetch",
    "prefetch_mode",
    default="fill",
    show_default=True,
    type=click.Choice(["fill", "omit", "null", "outcome"]),
)
@click.option(
    "--orders",
    "orders_file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON list of draft orders (default: the demo's HbA1c, lipid panel, amoxicillin).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw response.")
def cds_fire(
    hook: str,
    org_id: str,
    patient: str,
    service_base: str,
    sandbox_url: str,
    prefetch_mode: str,
    orders_file: str | None,
    as_json: bool,
) -> None:
    """Fire one hook from the sandbox EHR and print the cards."""
    from medblocks_sandbox.drivers.clinician import demo_orders

    secret = os.environ.get("MEDBLOCKS_SANDBOX_ADMIN_SECRET")
    if not secret:
        raise ConfigError(
            "MEDBLOCKS_SANDBOX_ADMIN_SECRET is not set",
            hint="use the admin secret the sandbox was started with",
        )
    orders: list[Any] = []
    if hook != "patient-view":
        if orders_file:
            with open(orders_file, encoding="utf-8") as fh:
                orders = json.load(fh)
        else:
            orders = demo_orders(patient)
    body = {
        "org": org_id,
        "service_base": service_base,
        "hook": hook,
        "patient": patient,
        "orders": orders,
        "prefetch_mode": prefetch_mode,
    }
    resp = httpx.post(
        f"{sandbox_url.rstrip('/')}/_admin/fire",
        json=body,
        timeout=60.0,
        headers={"X-Admin-Secret": secret},
    )
    if resp.status_code != 200:
        raise click.ClickException(f"sandbox answered {resp.status_code}: {resp.text[:200]}")
    answer = resp.json()
    if as_json:
        click.echo(json.dumps(answer["body"], indent=2))
        return
    click.echo(f"{hook}: HTTP {answer['status']}")
    body_out = answer["body"]
    if answer["status"] != 200:
        click.echo(f"  refused: {body_out.get('error')}: {body_out.get('detail')}")
        return
    for card in body_out.get("cards", []):
        click.secho(f"[{card['indicator']}] {card['summary']}", bold=True)
        for line in str(card.get("detail", "")).splitlines():
            if line.strip():
                click.echo(f"    {line}")
        for s in card.get("suggestions", []):
            click.echo(f"    suggestion: {s['label']}")
    if not body_out.get("cards"):
        click.echo("  no cards")
