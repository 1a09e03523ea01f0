"""Patient-access commands.

    medblocks connections link --tenant T --patient-ref P --source S [--return-url URL]
    medblocks connections revoke ID --tenant T [--delete-data/--keep-data]
    medblocks connections refresh ID --tenant T
    medblocks sync patient-access --tenant T --source S [--all] [--in-process]

The scripted patient browser that drives the consent pages (demo, tests) is a dev tool of the
sandbox: ``medblocks_sandbox.consent_browser`` and ``medblocks_sandbox.drivers.consent``.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click
import httpx

from medblocks_pipelines.lib.errors import MedblocksError, PullsFailed
from medblocks_pipelines.lib.partitions import partition_key

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

DEFAULT_PUBLIC_BASE = "http://127.0.0.1:8000"


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
@click.command()
@click.option("--tenant", required=True)
@click.option("--patient-ref", required=True, help="The tenant's own id for the patient.")
@click.option("--source", required=True)
@click.option("--return-url", help="Where the patient's browser goes after the consent.")
@click.option(
    "--public-base-url",
    envvar="MEDBLOCKS_PUBLIC_BASE_URL",
    default=DEFAULT_PUBLIC_BASE,
    show_default=True,
    help="How browsers reach `medblocks serve`.",
)
def connections_link(
    tenant: str, patient_ref: str, source: str, return_url: str | None, public_base_url: str
) -> None:
    """Create a pending connection and print the link the patient opens to connect."""
    from medblocks_pipelines.cli.core import control_plane
    from medblocks_pipelines.lib.smart.launch import create_connect_link

    link = create_connect_link(
        control_plane(),
        tenant_id=tenant,
        source_id=source,
        patient_ref=patient_ref,
        public_base_url=public_base_url,
        return_url=return_url,
    )
    click.echo(
        f"connection {link.connection_id} (pending, link valid until "
        f"{link.expires_at:%Y-%m-%d %H:%M} UTC)"
    )
    click.echo(link.url)


@click.command()
@click.argument("connection_id")
@click.option("--tenant", required=True, help="The tenant the connection belongs to.")
@click.option(
    "--delete-data/--keep-data",
    default=None,
    help="Delete the connection's data from the lake and warehouse (default: the "
    "tenant's delete_on_revoke setting).",
)
def connections_revoke(connection_id: str, tenant: str, delete_data: bool | None) -> None:
    """Revoke a connection: pulls stop, tokens are revoked and destroyed, data optionally deleted."""
    from medblocks_pipelines.cli.core import control_plane, owned_by
    from medblocks_pipelines.lib.fhir.pull import revoke_connection
    from medblocks_pipelines.lib.settings import get_settings

    cp = control_plane()
    owned_by(tenant, "connection", connection_id, cp.get_connection)
    settings = get_settings()
    result = revoke_connection(cp, connection_id, lake_root=settings.lake, delete_data=delete_data)
    click.echo(
        f"connection {connection_id} revoked"
        + (" (also at the source)" if result.revoked_at_source else "")
    )
    if result.delete_data:
        click.echo(f"{result.rows_deleted} landed rows deleted")
        if result.rows_deleted:
            from medblocks_pipelines.lib.warehouse.build import build_warehouse

            build = build_warehouse(tenant, settings=settings, control_plane=cp)
            click.echo(
                f"warehouse of {tenant} rebuilt: {build.table_counts.get('resources', 0)} resources"
            )


@click.command()
@click.argument("connection_id")
@click.option("--tenant", required=True, help="The tenant the connection belongs to.")
def connections_refresh(connection_id: str, tenant: str) -> None:
    """Refresh a connection's access token now (rotation stored atomically)."""
    from medblocks_pipelines.cli.core import control_plane, owned_by
    from medblocks_pipelines.lib.smart.tokens import TokenManager

    cp = control_plane()
    owned_by(tenant, "connection", connection_id, cp.get_connection)
    with httpx.Client(timeout=20.0) as http:
        manager = TokenManager(cp, connection_id, http=http)
        # Even if the token is far from expiry (event reason: forced).
        manager.force_refresh()
    conn = cp.get_connection(connection_id)
    click.echo(f"connection {connection_id} refreshed; token expires {conn.token_expires_at}")


@click.command()
@click.option("--tenant", required=True)
@click.option("--source", required=True)
@click.option(
    "--all", "all_active", is_flag=True, help="Pull every active connection, not only those due."
)
@click.option("--full", is_flag=True, help="Ignore the incremental watermark.")
@click.option(
    "--in-process/--dagster",
    default=False,
    show_default=True,
    help="Run the pull directly instead of as a Dagster run.",
)
def sync_patient_access(
    tenant: str, source: str, all_active: bool, full: bool, in_process: bool
) -> None:
    """Pull the tenant's patient-access connections at one source into the lake."""
    from medblocks_pipelines.cli.core import control_plane

    cp = control_plane()
    key = partition_key(tenant, source)
    if not in_process:
        from datetime import UTC, datetime

        from medblocks_pipelines.cli.runtime import run_job

        started = datetime.now(UTC)
        tags = {"medblocks/tenant": tenant, "medblocks/source": source}
        try:
            result = run_job(
                "patient_access_pull_job",
                partition_key=key,
                run_config={
                    "ops": {
                        "patient_access__records": {
                            "config": {"all_active": all_active, "full": full}
                        }
                    }
                },
                tags=tags,
            )
        except MedblocksError:
            # The run failed: still show what each pull did before the error line.
            _echo_run_pulls(cp, tenant, _run_since(cp, tenant, source, started))
            raise
        rows = _echo_run_pulls(cp, tenant, result.run_id)
        click.echo(f"run {result.run_id[:8]} succeeded ({_summary(rows)})")
        return
    import uuid

    from medblocks_pipelines.lib.fhir.pull_batch import due_connections, pull_batch
    from medblocks_pipelines.lib.fhir.pull_report import render_table, row_from_result
    from medblocks_pipelines.lib.settings import get_settings

    if all_active:
        ids = [
            c.id
            for c in cp.list_connections(
                tenant_id=tenant, pattern="patient_access", state="active", source_id=source
            )
        ]
    else:
        ids = due_connections(cp, tenant_id=tenant, source_id=source)
    if not ids:
        click.echo("no connections due")
        return
    batch = pull_batch(
        cp,
        ids,
        lake_root=get_settings().lake,
        run_id=f"cli-{uuid.uuid4().hex[:12]}",
        full=full,
    )
    meta = batch.as_metadata()
    click.echo(
        f"{meta['connections_pulled']} connections: {meta['by_status']}, "
        f"{meta['resources']} resources, {meta['quarantined']} quarantined"
    )
    rows = [row_from_result(r) for r in batch.results]
    click.echo(render_table(rows))
    if meta["failures_by_reason"]:
        click.echo(f"failures: {meta['failures_by_reason']}")
    if meta["anomalies"]:
        click.echo(f"anomalies: {meta['anomalies']}")
    for res in batch.results:
        for note in res.anomaly_notes[:5]:
            click.echo(f"  {res.connection_id}: {note}")
    if batch.all_failed:
        raise PullsFailed(f"every pull failed: {_summary(rows)}")


def _summary(rows: Sequence[Any]) -> str:
    from medblocks_pipelines.lib.fhir.pull_report import summary_line

    return summary_line(rows)


def _run_since(cp: "ControlPlane", tenant: str, source: str, started: Any) -> str | None:
    """The run id of this command's failed run: its pulls of ``source`` started after us."""
    for pull in cp.list_pulls(tenant_id=tenant, limit=50):
        began = pull.started_at
        if began is not None and began.tzinfo is None:
            began = began.replace(tzinfo=started.tzinfo)
        if pull.source_id == source and began is not None and began >= started:
            return str(pull.run_id)
    return None


def _echo_run_pulls(cp: "ControlPlane", tenant: str, run_id: str | None) -> list[Any]:
    """Print the per-connection table of one run's pulls (from pull history); returns the rows."""
    from medblocks_pipelines.lib.fhir.pull_report import anomaly_totals, render_table, run_rows

    rows = run_rows(cp, tenant_id=tenant, run_id=run_id) if run_id else []
    if rows:
        click.echo(render_table(rows))
        anomalies = anomaly_totals(rows)
        if anomalies:
            click.echo(f"anomalies: {anomalies}")
        for row in rows:
            if row.error and " | " in row.error:
                click.echo(f"  {row.connection_id}: {row.error.split(' | ', 1)[1]}")
    return rows


__all__ = [
    "connections_link",
    "connections_refresh",
    "connections_revoke",
    "sync_patient_access",
]
