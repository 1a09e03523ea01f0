"""``medblocks sync network`` and ``medblocks audit list``.

``sync network`` runs ``network_query_job`` for the (tenant, network) partition through the
CLI runtime (``cli/runtime.py``), so the query is a Dagster run with a materialization of
``network/query_results`` that the UI shows. The run config carries the person, purpose, actor
and retry reason (our own ids; demographics are looked up inside the run, never passed). A
refusal is decided inside the run, never leaves the machine, is audited, and exits 1 here.
"""

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import click

from medblocks_pipelines.lib.network.query import QueryResult

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

NETWORK_ASSET_NODE = "network__query_results"


def network_run_config(
    *,
    person: str,
    purpose: str,
    actor: str,
    trigger: str = "request",
    retry_reason: str | None,
    transport: str = "ihe",
) -> dict[str, Any]:
    """The run config of ``network_query_job`` for one person (no demographics: ids only)."""
    config: dict[str, Any] = {
        "persons": [person],
        "purpose": purpose,
        "trigger": trigger,
        "actor": actor,
        "retry_reason": retry_reason,
        "transport": transport,
    }
    return {"ops": {NETWORK_ASSET_NODE: {"config": config}}}


def run_network_sync(
    cp: "ControlPlane",
    *,
    tenant: str,
    person: str,
    purpose: str,
    actor: str,
    network: str | None = None,
    retry_reason: str | None = None,
    trigger: str = "request",
    transport: str = "ihe",
) -> dict[str, Any]:
    """Run one person's network query as a Dagster run; return its detail row (ids, counts)."""
    from medblocks_pipelines.cli.runtime import run_job
    from medblocks_pipelines.lib.network.config import network_config
    from medblocks_pipelines.lib.partitions import partition_key

    tenant_row = cp.get_tenant(tenant)
    tsettings = tenant_row.settings or {}
    if transport == "fhir":
        # A Facilitated FHIR network needs no IHE gateways: resolve it as the FHIR path does.
        from medblocks_pipelines.lib.network.facilitated import facilitated_config

        net = facilitated_config(cp, network, tsettings).network
    else:
        net = network_config(cp, network, tsettings).id
    result = run_job(
        "network_query_job",
        partition_key=partition_key(tenant, net),
        run_config=network_run_config(
            person=person,
            purpose=purpose,
            actor=actor,
            trigger=trigger,
            retry_reason=retry_reason,
            transport=transport,
        ),
        tags={"medblocks/tenant": tenant, "medblocks/source": net, "medblocks/trigger": "cli"},
    )
    [mat] = result.asset_materializations_for_node(NETWORK_ASSET_NODE)
    detail = mat.metadata["query_detail"]
    [row] = getattr(detail, "data", None) or [{}]
    return {**row, "run_id": result.run_id}


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
    """Query an exchange network for one person under a purpose of use (a Dagster run)."""
    from medblocks_pipelines.cli.core import control_plane, print_table

    cp = control_plane()
    actor_name = actor or os.environ.get("USER") or "cli"
    try:
        if id_token is not None:
            # A T-IAS query carries the person's IAL2 id_token: a credential, which never goes
            # into Dagster run config or the event log. It runs here, under the same gate and
            # audit, and is recorded in the control plane's network queries.
            from medblocks_pipelines.lib.network.facilitated import run_facilitated_query
            from medblocks_pipelines.lib.settings import get_settings

            res: QueryResult = run_facilitated_query(
                cp,
                get_settings(),
                tenant=tenant,
                person=person,
                purpose=purpose,
                actor=actor_name,
                network=network,
                retry_reason=retry_reason,
                id_token=id_token,
            )
            r = {
                **res.as_metadata(),
                "query_id": res.query_id,
                "audit_id": res.audit_id,
                "gateway_status": dict(sorted(res.gateway_status.items())),
                "resources_by_type": dict(sorted(res.resources_by_type.items())),
                "run_id": "(in-process)",
            }
        else:
            r = run_network_sync(
                cp,
                tenant=tenant,
                person=person,
                purpose=purpose,
                actor=actor_name,
                network=network,
                retry_reason=retry_reason,
                transport=transport,
            )
    finally:
        cp.engine.dispose()
    if as_json:
        click.echo(json.dumps(r))
    elif not r["allowed"]:
        click.secho(f"refused: {r['reason']} (audit #{r['audit_id']}); nothing was sent", fg="red")
    else:
        rows: list[list[Any]] = [[g, s] for g, s in sorted(r["gateway_status"].items())]
        print_table(
            f"network query #{r['query_id']} ({r['status']}, {transport})",
            ["gateway" if transport == "ihe" else "gateway/node", "status"],
            rows,
        )
        click.echo(
            f"documents retrieved {r['documents_retrieved']}, skipped (already fetched) "
            f"{r['documents_skipped']}, resources {r['resources']}, quarantined "
            f"{r['quarantined']}; audit #{r['audit_id']}; Dagster run {r['run_id'][:8]}"
        )
    if not r["allowed"]:
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
            click.echo(json.dumps(dataclasses.asdict(r), default=str))
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
                r.id,
                str(r.at)[:19],
                r.tenant_id,
                r.actor,
                r.action,
                r.person_id,
                r.purpose,
                r.decision,
                r.reason,
                ",".join(r.responders or []),
                len(r.documents or []),
            ]
            for r in rows
        ],
    )
