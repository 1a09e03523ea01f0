"""The clinician-workflow asset: a targeted sync of the patients clinicians just opened.

Partitioned by ``tenant.org`` (``clinician_org_partitions``); patients are never partitions: one run
pulls the batch of launch connections the sensor names (each the patient of one EHR launch, with
the token that launch granted), through the single-connection pull of ``lib.fhir.pull``.
"""

import uuid
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from medblocks_pipelines.defs.shared.partitions import clinician_org_partitions
from medblocks_pipelines.defs.shared.pull_outcomes import (
    pull_outcome_metadata,
    raise_if_all_failed,
)
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.summaries import landing_metadata
from medblocks_pipelines.lib.cds.launch import PATTERN
from medblocks_pipelines.lib.fhir.pull_batch import BatchResult, pull_batch
from medblocks_pipelines.lib.partitions import split_partition_key

RECORDS_KEY = dg.AssetKey(["clinician_workflow", "records"])


class ClinicianSyncConfig(dg.Config):
    """Which launch connections to sync (the sensor fills this in)."""

    connection_ids: list[str] = []
    full: bool = True


@dg.asset(
    key=RECORDS_KEY,
    partitions_def=clinician_org_partitions,
    group_name="clinician_workflow",
    kinds={"fhir", "parquet"},
    owners=["team:data-platform"],
    tags={"medblocks/layer": "landing", "medblocks/pattern": PATTERN},
    description="Records of the patients clinicians opened through an EHR launch at this "
    "organization, pulled from that EHR with the launch's token and landed with provenance.",
)
def clinician_workflow_records(
    context: dg.AssetExecutionContext, config: ClinicianSyncConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """Pull the named launch connections of this tenant.org (only active ones of this org)."""
    tenant, org = split_partition_key(context.partition_key)
    cp = platform.control_plane
    active = {
        c.id
        for c in cp.list_connections(
            tenant_id=tenant, pattern=PATTERN, state="active", organization_id=org
        )
    }
    ids = [c for c in config.connection_ids if c in active]
    skipped = len(config.connection_ids) - len(ids)
    run_id = context.run_id or f"cw-{uuid.uuid4().hex[:12]}"
    meta: dict[str, Any] = {"connections_pulled": 0, "resources": 0}
    batch: BatchResult | None = None
    if ids:
        batch = pull_batch(
            cp, ids, lake_root=platform.settings.lake, run_id=run_id, full=config.full
        )
        meta = batch.as_metadata()
        for res in batch.results:
            cp.record_event(
                res.connection_id, "clinician.synced", {"run_id": run_id, "status": res.status}
            )
        raise_if_all_failed(batch, f"EHR-launch sync of {context.partition_key}")
    else:
        context.log.info("no active launch connections to sync in this run")
    return dg.MaterializeResult(
        metadata={
            "connections_pulled": int(meta.get("connections_pulled", 0) or 0),
            "connections_skipped": skipped,
            "resources": int(meta.get("resources", 0) or 0),
            "resources_by_type": dg.MetadataValue.json(meta.get("resources_by_type", {})),
            "by_status": dg.MetadataValue.json(meta.get("by_status", {})),
            **pull_outcome_metadata(batch),
            "synced_at": datetime.now(UTC).isoformat(),
            **landing_metadata(
                f"EHR-launch sync of {context.partition_key}",
                {
                    "connections pulled": int(meta.get("connections_pulled", 0) or 0),
                    "connections skipped (no longer active)": skipped,
                    "resources": int(meta.get("resources", 0) or 0),
                },
                meta.get("resources_by_type", {}),
                meta.get("failures_by_reason", {}),
                freshness="synced now (launch-triggered)",
            ),
        }
    )


clinician_sync_job = dg.define_asset_job(
    "clinician_sync_job",
    selection=[clinician_workflow_records],
    partitions_def=clinician_org_partitions,
    description="Targeted sync of launched patients for one tenant.org.",
)
