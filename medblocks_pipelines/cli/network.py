"""``medblocks sync network`` and ``medblocks audit list``.

``sync network`` runs one policy-checked network query in-process (the same function the Dagster
asset calls). A refusal is printed with its reason and exits 1; it is in the audit log either way.
"""

import json
import os
from typing import Any

import click

from medblocks_pipelines.lib.network.query import QueryResult, run_network_query


@click.command("network")
@click.option("--tenant", required=True, help="Tenant id.")
@click.option("--person", required=True, help="Person (or patient) id in the tenant's record.")
@click.option("--purpose", required=True, help="TEFCA exchange purpose, e.g. T-TREAT.")
@click.option("--network", default=None, help="Network source id (default: the tenant's only one).")
@click.option("--actor", default=None, help="Who asks (default: $USER).")
@click.option(
    "--retry-reason",
    type=click.Choice(["more_results", "corrected_demographics", "technical_error"]),
    default=None,
    help="Repeat a T-TRTMNT query without a new event, for one of the SOP's reasons.",
)
@click.option(
    "--transport",
    type=click.Choice(["ihe", "fhir"]),
    default="ihe",
    show_default=True,
    help="ihe: XCPD/XCA; fhir: TEFCA Facilitated FHIR with UDAP.",
)
@click.option(
    "--id-token",
    envvar="MEDBLOCKS_IAS_ID_TOKEN",
    default=None,
    help="T-IAS over FHIR: the identity provider's IAL2 id_token (or $MEDBLOCKS_IAS_ID_TOKEN).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def network_sync(
    tenant: str,
    person: str,
    purpose: str,
    network: str | None,
    actor: str | None,
    retry_reason: str | None,
    transport: str,
    id_token: str | None,
    as_json: bool,
) -> None:
    """Query an exchange network for one person under a purpose of use."""
    from medblocks_pipelines.cli.core import control_plane, print_table
    from medblocks_pipelines.lib.network.facilitated import run_facilitated_query
    from medblocks_pipelines.lib.settings import get_settings

    cp = control_plane()
    common: dict[str, Any] = {
        "tenant": tenant,
        "person": person,
        "purpose": purpose,
        "actor": actor or os.environ.get("USER") or "cli",
        "network": network,
        "retry_reason": retry_reason,
    }
    result: QueryResult
    if transport == "fhir":
        result = run_facilitated_query(cp, get_settings(), id_token=id_token, **common)
    else:
        result = run_network_query(cp, get_settings(), **common)
    if as_json:
        click.echo(
            json.dumps(
                {
                    **result.as_metadata(),
                    "gateway_status": result.gateway_status,
                    "resources_by_type": result.resources_by_type,
                    "audit_id": result.audit_id,
                }
            )
        )
    elif not result.allowed:
        click.secho(
            f"refused: {result.reason} (audit #{result.audit_id}); nothing was sent", fg="red"
        )
    else:
        rows: list[list[Any]] = [[g, s] for g, s in sorted(result.gateway_status.items())]
        print_table(
            f"network query #{result.query_id} ({result.status}, {transport})",
            ["gateway" if transport == "ihe" else "node", "status"],
            rows,
        )
        click.echo(
            f"documents retrieved {result.documents_retrieved}, skipped (already fetched) "
            f"{result.documents_skipped}, resources {sum(result.resources_by_type.values())}, "
            f"quarantined {result.quarantined}; audit #{result.audit_id}"
        )
    if not result.allowed:
        raise SystemExit(1)


@click.command("list")
@click.option("--tenant", required=True, help="The tenant whose entries to list.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON lines.")
def audit_list(tenant: str, limit: int, as_json: bool) -> None:
    """List audit-log entries (network queries allowed and refused), newest first."""
    from medblocks_pipelines.cli.core import control_plane, print_table

    rows = control_plane().list_audit(tenant_id=tenant, limit=limit)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, default=str))
        return
    print_table(
        "audit log",
        [
            "id",
            "at",
            "tenant",
            "actor",
            "action",
            "person",
            "purpose",
            "decision",
            "reason",
            "responders",
            "documents",
        ],
        [
            [
                r["id"],
                str(r["at"])[:19],
                r["tenant_id"],
                r["actor"],
                r["action"],
                r["person_id"],
                r["purpose"],
                r["decision"],
                r["reason"],
                ",".join(r["responders"] or []),
                len(r["documents"] or []),
            ]
            for r in rows
        ],
    )
