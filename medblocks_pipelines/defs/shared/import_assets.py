"""Local NDJSON import: a Bulk Data export on disk, landed like any backend sync."""

import dagster as dg

from medblocks_pipelines.defs.shared.partitions import backend_org_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.summaries import landing_metadata
from medblocks_pipelines.lib.fhir.ndjson_import import import_ndjson_folder
from medblocks_pipelines.lib.partitions import split_partition_key
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance


class NdjsonImportConfig(dg.Config):
    """Where the files are."""

    path: str


@dg.asset(
    key=["backend", "ndjson_import"],
    partitions_def=backend_org_partitions,
    group_name="backend",
    kinds={"parquet"},
    owners=["team:data-platform"],
    tags={"medblocks/layer": "landing", "medblocks/pattern": "backend"},
    description="Lands a folder of NDJSON files (an export on disk) for one tenant organization "
    "into the lake; bad lines are quarantined with their reason.",
)
def ndjson_import(
    context: dg.AssetExecutionContext, config: NdjsonImportConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """Import the folder, record the pull, report counts."""
    from pathlib import Path

    tenant, org_id = split_partition_key(context.partition_key)
    cp = platform.control_plane
    org = cp.get_organization(org_id)
    pull_id = cp.start_pull(
        tenant_id=tenant,
        pattern="backend",
        source_id=org.source_id,
        organization_id=org_id,
        run_id=context.run_id,
    )
    prov = Provenance(tenant, "backend", org.source_id, org_id, None, context.run_id)
    try:
        with LakeWriter(platform.settings.lake, prov) as writer:
            files = import_ndjson_folder(Path(config.path), writer)
    except Exception as exc:
        cp.finish_pull(pull_id, status="failed", counts={}, error=type(exc).__name__)
        raise
    stats = writer.stats
    cp.finish_pull(
        pull_id,
        status="partial" if stats.quarantined else "success",
        counts=dict(stats.counts_by_type),
    )
    md = stats.as_metadata()
    return dg.MaterializeResult(
        metadata={
            "files_read": files,
            "landed": md["landed"],
            "quarantined": md["quarantined"],
            "by_type": dg.MetadataValue.json(md["by_type"]),
            "quarantine_reasons": dg.MetadataValue.json(md["quarantine_reasons"]),
            **landing_metadata(
                f"NDJSON import into {context.partition_key}",
                {"files read": files, "landed": md["landed"], "quarantined": md["quarantined"]},
                md["by_type"],
                md["quarantine_reasons"],
            ),
        }
    )


ndjson_import_job = dg.define_asset_job(
    "ndjson_import_job",
    selection=[ndjson_import],
    partitions_def=backend_org_partitions,
    description="Land a local NDJSON folder for a tenant organization.",
)
