"""Network query results as an asset partitioned per (tenant, network).

A run queries the persons named in its config (by request or by the relationship sensor); it
never sweeps a population. Each person's query goes through the purpose-of-use policy and the
audit log in :func:`medblocks_pipelines.lib.network.query.run_network_query`.
"""

from collections import Counter

import dagster as dg

from medblocks_pipelines.defs.network.partitions import network_partitions
from medblocks_pipelines.defs.shared.outcomes import fail_if_nothing_succeeded
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.summaries import landing_metadata
from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.network.query import QueryResult, run_network_query
from medblocks_pipelines.lib.network.scope import resolve_scope

#: Per-query rows kept in the metadata (the CLI prints them); counts cover every query.
MAX_DETAIL = 100


def query_detail(result: QueryResult) -> dict[str, object]:
    """One query's outcome for the metadata: our own ids (query, audit, gateways) and counts only."""
    return {
        **result.as_metadata(),
        "query_id": result.query_id,
        "audit_id": result.audit_id,
        "network": result.network,
        "gateway_status": dict(sorted(result.gateway_status.items())),
        "resources_by_type": dict(sorted(result.resources_by_type.items())),
    }


class NetworkQueryConfig(dg.Config):
    """Who to query and why (set by the sensor or by `medblocks sync network`)."""

    persons: list[str] = []
    purpose: str = "T-TREAT"
    trigger: str = "request"
    actor: str = "medblocks-network"
    retry_reason: str | None = None


@dg.asset(
    key=["network", "query_results"],
    partitions_def=network_partitions,
    group_name="network",
    kinds={"soap", "parquet"},
    owners=["team:data-platform"],
    tags={"medblocks/layer": "landing", "medblocks/pattern": "network"},
    description="Documents retrieved through an exchange network (XCPD -> XCA) for persons with a "
    "documented relationship, converted from C-CDA to FHIR and landed in the lake.",
)
def network_query_results(
    context: dg.AssetExecutionContext, config: NetworkQueryConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """Run one policy-checked network query per configured person; report counts only."""
    cp = platform.control_plane
    tenant, network = resolve_scope(cp, context.partition_key)
    if config.trigger == "sweep":
        raise ConfigError("network queries are never run as sweeps; name the persons")
    refusals: Counter[str] = Counter()
    responders: Counter[str] = Counter()
    resources: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    detail: list[dict[str, object]] = []
    for person in config.persons:
        result = run_network_query(
            cp,
            platform.settings,
            tenant=tenant,
            person=person,
            purpose=config.purpose,
            actor=config.actor,
            network=network,
            trigger=config.trigger,
            retry_reason=config.retry_reason,
            run_id=context.run_id,
        )
        totals["queries"] += 1
        if len(detail) < MAX_DETAIL:
            detail.append(query_detail(result))
        if not result.allowed:
            refusals[result.reason] += 1
            continue
        totals[f"status_{result.status}"] += 1
        totals["documents_retrieved"] += result.documents_retrieved
        totals["documents_skipped"] += result.documents_skipped
        totals["quarantined"] += result.quarantined
        responders.update(result.responders)
        resources.update(result.resources_by_type)
    if not config.persons:
        context.log.info("no persons to query: nothing sent")
    allowed = totals["queries"] - sum(refusals.values())
    fail_if_nothing_succeeded(
        attempted=allowed,
        failed=totals["status_failed"],
        what="allowed network query",
        metadata={"queries": totals["queries"], "allowed": allowed},
    )
    return dg.MaterializeResult(
        metadata={
            "queries": totals["queries"],
            "allowed": totals["queries"] - sum(refusals.values()),
            "refused": sum(refusals.values()),
            "refusals_by_reason": dg.MetadataValue.json(dict(refusals)),
            "responders": dg.MetadataValue.json(dict(responders)),
            "documents_retrieved": totals["documents_retrieved"],
            "documents_skipped": totals["documents_skipped"],
            "resources_extracted": sum(resources.values()),
            "resources_by_type": dg.MetadataValue.json(dict(sorted(resources.items()))),
            "quarantined": totals["quarantined"],
            "partial_queries": totals["status_partial"],
            "failed_queries": totals["status_failed"],
            "query_detail": dg.MetadataValue.json(detail),
            **landing_metadata(
                f"Network queries for {context.partition_key}",
                {
                    "queries": totals["queries"],
                    "refused (purpose or relationship)": sum(refusals.values()),
                    "documents retrieved": totals["documents_retrieved"],
                    "resources extracted": sum(resources.values()),
                    "quarantined": totals["quarantined"],
                    "partial / failed queries": (
                        f"{totals['status_partial']} / {totals['status_failed']}"
                    ),
                },
                dict(resources),
                {f"refused: {k}": v for k, v in refusals.items()},
                freshness="queried now",
            ),
        }
    )


network_query_job = dg.define_asset_job(
    "network_query_job",
    selection=[network_query_results],
    partitions_def=network_partitions,
    description="Query an exchange network for named persons under a purpose of use.",
)
