"""Network query results as an asset partitioned per (tenant, network).

A run queries the persons named in its config (by request or by the relationship sensor); it
never sweeps a population. Each person's query goes through the purpose-of-use policy and the
audit log in :func:`medblocks_pipelines.lib.network.query.run_network_query`.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from medblocks_pipelines.defs.network.partitions import network_partitions
from medblocks_pipelines.defs.shared.outcomes import fail_if_nothing_succeeded
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.summaries import landing_metadata
from medblocks_pipelines.lib.errors import ConfigError, MedblocksError
from medblocks_pipelines.lib.network.facilitated import (
    facilitated_config,
    open_session,
    run_facilitated_query,
)
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
    #: ``ihe`` (XCPD/XCA), ``fhir`` (TEFCA Facilitated FHIR with UDAP) or ``both``.
    transport: str = "ihe"


@dg.asset(
    key=["network", "query_results"],
    partitions_def=network_partitions,
    group_name="network",
    kinds={"soap", "parquet"},
    owners=["team:data-platform"],
    tags={"medblocks/layer": "landing", "medblocks/pattern": "network"},
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
    tally = _Tally()
    session = None
    if config.transport != "ihe" and config.persons:
        tsettings = cp.get_tenant(tenant).settings or {}
        # One UDAP session per run: registrations and tokens reused across persons.
        session = open_session(cp, facilitated_config(cp, network, tsettings))
    common = {
        "tenant": tenant,
        "purpose": config.purpose,
        "actor": config.actor,
        "network": network,
        "trigger": config.trigger,
        "retry_reason": config.retry_reason,
        "run_id": context.run_id,
    }
    try:
        for person in config.persons:
            queries: list[Any] = []
            if config.transport in ("ihe", "both"):
                queries.append(
                    lambda p=person: run_network_query(cp, platform.settings, person=p, **common)
                )
            if session is not None:
                queries.append(
                    lambda p=person: run_facilitated_query(
                        cp, platform.settings, person=p, session=session, **common
                    )
                )
            for query in queries:
                try:
                    result = query()
                except MedblocksError as exc:
                    # An allowed query that failed before or while sending (no demographics, no
                    # signing key...): its audit row says why; the other persons still get theirs.
                    context.log.warning(f"a network query failed: {type(exc).__name__}")
                    tally.failed(type(exc).__name__)
                    continue
                tally.add(result)
    finally:
        if session is not None:
            session.http.close()
    if not config.persons:
        context.log.info("no persons to query: nothing sent")
    t = tally.totals
    fail_if_nothing_succeeded(
        attempted=tally.allowed,
        failed=t["status_failed"],
        what="allowed network query",
        metadata={"queries": t["queries"], "allowed": tally.allowed},
    )
    return dg.MaterializeResult(
        metadata={
            **tally.metadata(context.partition_key),
            "transport": config.transport,
        }
    )


@dataclass
class _Tally:
    """Counts over one run's queries (and the first MAX_DETAIL queries' detail rows)."""

    refusals: Counter[str] = field(default_factory=Counter)
    responders: Counter[str] = field(default_factory=Counter)
    resources: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    # Per responding gateway / FHIR node: ok, no_match, timeout, error... (our ids only).
    node_status: Counter[str] = field(default_factory=Counter)
    totals: Counter[str] = field(default_factory=Counter)
    detail: list[dict[str, object]] = field(default_factory=list)

    @property
    def allowed(self) -> int:
        return self.totals["queries"] - sum(self.refusals.values())

    def add(self, result: QueryResult) -> None:
        self.totals["queries"] += 1
        if len(self.detail) < MAX_DETAIL:
            self.detail.append(query_detail(result))
        if not result.allowed:
            self.refusals[result.reason] += 1
            return
        self.totals[f"status_{result.status}"] += 1
        self.totals["documents_retrieved"] += result.documents_retrieved
        self.totals["documents_skipped"] += result.documents_skipped
        self.totals["quarantined"] += result.quarantined
        self.responders.update(result.responders)
        self.resources.update(result.resources_by_type)
        self.node_status.update(result.gateway_status.values())

    def failed(self, error: str) -> None:
        self.totals["queries"] += 1
        self.totals["status_failed"] += 1
        self.errors[error] += 1
        if len(self.detail) < MAX_DETAIL:
            self.detail.append({"allowed": True, "status": "failed", "error": error})

    def metadata(self, partition: str) -> dict[str, Any]:
        t, resources = self.totals, self.resources
        refused = sum(self.refusals.values())
        return {
            "queries": t["queries"],
            "allowed": self.allowed,
            "refused": refused,
            "refusals_by_reason": dg.MetadataValue.json(dict(self.refusals)),
            "responders": dg.MetadataValue.json(dict(self.responders)),
            "documents_retrieved": t["documents_retrieved"],
            "documents_skipped": t["documents_skipped"],
            "resources_extracted": sum(resources.values()),
            "resources_by_type": dg.MetadataValue.json(dict(sorted(resources.items()))),
            "quarantined": t["quarantined"],
            "partial_queries": t["status_partial"],
            "failed_queries": t["status_failed"],
            "errors_by_class": dg.MetadataValue.json(dict(self.errors)),
            "query_detail": dg.MetadataValue.json(self.detail),
            "node_status": dg.MetadataValue.json(dict(self.node_status)),
            **landing_metadata(
                f"Network queries for {partition}",
                {
                    "queries": t["queries"],
                    "refused (purpose or relationship)": refused,
                    "documents retrieved": t["documents_retrieved"],
                    "resources extracted": sum(resources.values()),
                    "quarantined": t["quarantined"],
                    "partial / failed queries": f"{t['status_partial']} / {t['status_failed']}",
                },
                dict(resources),
                {
                    **{f"refused: {k}": v for k, v in self.refusals.items()},
                    **{f"failed: {k}": v for k, v in self.errors.items()},
                },
                freshness="queried now",
            ),
        }


network_query_job = dg.define_asset_job(
    "network_query_job",
    selection=[network_query_results],
    partitions_def=network_partitions,
    description="Query an exchange network for named persons under a purpose of use.",
)
