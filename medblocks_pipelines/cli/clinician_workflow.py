"""Clinician-workflow commands: ``medblocks sync clinician``.

``sync clinician`` runs the targeted sync of a launched patient now (what the launch sensor does
within seconds). Driving the sandbox EHR's CDS client (``cds fire``) is a sandbox command:
``medblocks-sandbox cds fire``.
"""

from typing import TYPE_CHECKING

import click

from medblocks_pipelines.lib.errors import ConfigError

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane
    from medblocks_pipelines.lib.registry.rows import Connection


def latest_launch(cp: "ControlPlane", *, tenant: str, org: str, patient: str) -> "Connection":
    """The most recent active launch connection of ``patient`` at ``org`` (ConfigError if none)."""
    conns = [
        c
        for c in cp.list_connections(
            tenant_id=tenant, pattern="clinician_workflow", state="active", organization_id=org
        )
        if c.source_patient_id == patient
    ]
    if not conns:
        raise ConfigError(
            f"no active EHR launch of that patient at organization {org}",
            hint="launch the app from the EHR first (its token is what we pull with)",
        )
    return max(conns, key=lambda c: c.created_at)


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
            "ops": {"clinician_workflow__records": {"config": {"connection_ids": [conn.id]}}}
        },
        tags={
            "medblocks/tenant": tenant,
            "medblocks/source": conn.source_id,
            "medblocks/trigger": "cli",
        },
    )
    mats = result.asset_materializations_for_node("clinician_workflow__records")
    meta = mats[0].metadata if mats else {}
    pulled = meta.get("connections_pulled")
    resources = meta.get("resources")
    click.echo(
        f"connection {conn.id}: {getattr(pulled, 'value', 0)} pulled, "
        f"{getattr(resources, 'value', 0)} resources landed"
    )
