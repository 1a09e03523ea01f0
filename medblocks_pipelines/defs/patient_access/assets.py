"""The patient-access asset: pulls a batch of a tenant's consented connections at one source.

Partitioned by ``tenant.source`` (``patient_access_partitions``); patients are never partitions:
one run pulls a batch of connections, in parallel threads paced by the source's rate limiter.
"""

import uuid
from datetime import UTC, datetime

import dagster as dg

from medblocks_pipelines.defs.patient_access.checks import (
    RECORDS_KEY,
    no_refresh_failed_spec,
    refresh_failed_check,
)
from medblocks_pipelines.defs.shared.partitions import patient_access_partitions
from medblocks_pipelines.defs.shared.pull_outcomes import (
    pull_outcome_metadata,
    raise_if_all_failed,
)
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.summaries import landing_metadata
from medblocks_pipelines.lib.fhir.pull import PATTERN
from medblocks_pipelines.lib.fhir.pull_batch import BatchResult, due_connections, pull_batch
from medblocks_pipelines.lib.partitions import split_partition_key


class PatientAccessPullConfig(dg.Config):
    """What to pull in this run (the sensor names new connections; the schedule pulls what is due)."""

    connection_ids: list[str] = []
    all_active: bool = False
    full: bool = False
    batch_size: int = 1000


@dg.asset(
    key=RECORDS_KEY,
    partitions_def=patient_access_partitions,
    group_name="patient_access",
    kinds={"fhir", "parquet"},
    owners=["team:data-platform"],
    check_specs=[no_refresh_failed_spec],
    tags={"medblocks/layer": "landing", "medblocks/pattern": PATTERN},
    description="US Core (EHR) or CMS Patient Access (payer) records of the patients who connected "
    "this tenant's app to this source, landed in the lake with provenance. Incremental per "
    "connection with _lastUpdated.",
)
def patient_access_records(
    context: dg.AssetExecutionContext, config: PatientAccessPullConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """Pull a batch of active connections: new ones (sensor), due ones (schedule) or all."""
    tenant, source = split_partition_key(context.partition_key)
    cp = platform.control_plane
    active = {
        c.id
        for c in cp.list_connections(
            tenant_id=tenant, pattern=PATTERN, state="active", source_id=source
        )
    }
    if config.connection_ids:
        ids = [c for c in config.connection_ids if c in active]
    elif config.all_active:
        ids = sorted(active)
    else:
        ids = due_connections(cp, tenant_id=tenant, source_id=source)
    ids = ids[: config.batch_size]
    run_id = context.run_id or f"pa-{uuid.uuid4().hex[:12]}"
    batch: BatchResult | None = None
    if ids:
        batch = pull_batch(
            cp, ids, lake_root=platform.settings.lake, run_id=run_id, full=config.full
        )
        meta = batch.as_metadata()
        if batch.results and all((r.error or "").startswith("source:") for r in batch.results):
            raise dg.Failure(
                description=f"source {source} could not be used (discovery or client config)",
                metadata={"failures_by_reason": dg.MetadataValue.json(meta["failures_by_reason"])},
            )
        raise_if_all_failed(batch, f"patient-access pull of {context.partition_key}")
    else:
        context.log.info("no connections to pull in this run")
        meta = {"connections_pulled": 0, "resources": 0}
    remaining = cp.list_connections(
        tenant_id=tenant, pattern=PATTERN, state="active", source_id=source
    )
    due_times = [c.next_pull_due for c in remaining if c.next_pull_due]
    next_due = min(due_times) if due_times else None
    metadata: dict[str, dg.RawMetadataValue] = {
        "connections_pulled": meta.get("connections_pulled", 0),
        "resources": meta.get("resources", 0),
        "resources_by_type": dg.MetadataValue.json(meta.get("resources_by_type", {})),
        "by_status": dg.MetadataValue.json(meta.get("by_status", {})),
        "failures_by_reason": dg.MetadataValue.json(meta.get("failures_by_reason", {})),
        "quarantined": meta.get("quarantined", 0),
        **pull_outcome_metadata(batch),
        "requests": meta.get("requests", 0),
        "token_refreshes": meta.get("token_refreshes", 0),
        "active_connections": len(remaining),
        "next_due": next_due.astimezone(UTC).isoformat() if next_due else "none",
        "pulled_at": datetime.now(UTC).isoformat(),
        **landing_metadata(
            f"Patient-access pull of {context.partition_key}",
            {
                "connections pulled": int(meta.get("connections_pulled", 0) or 0),
                "resources": int(meta.get("resources", 0) or 0),
                "quarantined": int(meta.get("quarantined", 0) or 0),
                "active connections": len(remaining),
                **{
                    f"connections {k}": int(v) for k, v in sorted(meta.get("by_status", {}).items())
                },
            },
            meta.get("resources_by_type", {}),
            meta.get("failures_by_reason", {}),
            freshness=(
                "pulled now; next pull due "
                + (next_due.astimezone(UTC).isoformat() if next_due else "(none scheduled)")
            ),
        ),
    }
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[refresh_failed_check(cp, tenant_id=tenant, source_id=source)],
    )


patient_access_pull_job = dg.define_asset_job(
    "patient_access_pull_job",
    selection=[patient_access_records],
    partitions_def=patient_access_partitions,
    description="Pull a batch of patient-access connections for one tenant.source.",
)
