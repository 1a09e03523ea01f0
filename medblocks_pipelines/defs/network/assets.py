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
from medblocks_pipelines.lib.network.facilitated import (
    facilitated_config,
    open_session,
    run_facilitated_query,
)
from medblocks_pipelines.lib.network.query import QueryResult, run_network_query
from medblocks_pipelines.lib.network.scope import resolve_scope


class NetworkQueryConfig(dg.Config):
    """Who to query and why (set by the sensor or by `medblocks sync network`)."""

    persons: list[str] = []
    purpose: str = "T-TREAT"
    trigger: str = "request"
    actor: str = "medblocks-network"
    retry_reason: str | None = None
    #: ``ihe`` (XCPD/XCA), ``fhir`` (TEFCA Facilitated FHIR with UDAP) or ``both``.
    transport: str = "ihe"


@dg.asset(
    key=["network", "query_results"],
    partitions_def=network_partitions,
    group_name="network",
    kinds={"soap", "parquet"},
    owners=["team:data-platform"],
    tags={"medblocks/pattern": "network"},
    description="Records retrieved through an exchange network for persons with a documented "
    "relationship: IHE (XCPD -> XCA, C-CDA converted to FHIR) and/or TEFCA Facilitated FHIR "
    "(UDAP B2B -> $match -> US Core), landed in the lake.",
)
def network_query_results(
    context: dg.AssetExecutionContext, config: NetworkQueryConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """Run one policy-checked network query per configured person; report counts only."""
    cp = platform.control_plane
    tenant, network = resolve_scope(cp, context.partition_key)
    if config.trigger == "sweep":
        raise ConfigError("network queries are never run as sweeps; name the persons")
    if config.transport not in ("ihe", "fhir", "both"):
        raise ConfigError(f"unknown network transport {config.transport!r}: ihe, fhir or both")
    refusals: Counter[str] = Counter()
    responders: Counter[str] = Counter()
    resources: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    # Per responding gateway / FHIR node: ok, no_match, timeout, error... (our ids only).
    node_status: Counter[str] = Counter()
    session = None
    if config.transport != "ihe" and config.persons:
        tsettings = cp.get_tenant(tenant).get("settings") or {}
        # One UDAP session per run: registrations and tokens reused across persons.
        session = open_session(cp, facilitated_config(cp, network, tsettings))
    try:
        for person in config.persons:
            results: list[QueryResult] = []
            if config.transport in ("ihe", "both"):
                results.append(
                    run_network_query(
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
                )
            if session is not None:
                results.append(
                    run_facilitated_query(
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
                        session=session,
                    )
                )
            for result in results:
                totals["queries"] += 1
                if not result.allowed:
                    refusals[result.reason] += 1
                    continue
                totals[f"status_{result.status}"] += 1
                totals["documents_retrieved"] += result.documents_retrieved
                totals["documents_skipped"] += result.documents_skipped
                totals["quarantined"] += result.quarantined
                responders.update(result.responders)
                resources.update(result.resources_by_type)
                node_status.update(result.gateway_status.values())
    finally:
        if session is not None:
            session.http.close()
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
            "transport": config.transport,
            "node_status": dg.MetadataValue.json(dict(node_status)),
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
