"""The per-tenant warehouse asset: builds the tenant's DuckDB file from the lake, publishes atomically."""

import dagster as dg

from medblocks_pipelines.defs.shared.partitions import tenant_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.warehouse.build import build_warehouse


@dg.asset(
    key=["warehouse", "tenant_warehouse"],
    partitions_def=tenant_partitions,
    group_name="warehouse",
    kinds={"duckdb", "parquet"},
    owners=["team:data-platform"],
    pool="warehouse_build",
    tags={"medblocks/layer": "warehouse"},
    description="The tenant's unified record warehouse (DuckDB), rebuilt from the landing lake and "
    "published atomically; analysts and the CDS service read the last published file.",
)
def tenant_warehouse(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> dg.MaterializeResult:
    """Build the tenant's warehouse and report table row counts."""
    tenant = context.partition_key
    result = build_warehouse(
        tenant,
        settings=platform.settings,
        control_plane=platform.control_plane,
        run_id=context.run_id,
    )
    rows = "\n".join(f"| {name} | {count:,} |" for name, count in result.table_counts.items())
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(result.path)),
            "duration_s": round(result.duration_s, 3),
            "resources": result.table_counts.get("resources", 0),
            "quarantine": result.table_counts.get("quarantine", 0),
            "tables": dg.MetadataValue.md("| table | rows |\n|---|---|\n" + rows),
        }
    )


tenant_warehouse_job = dg.define_asset_job(
    "tenant_warehouse_job",
    selection=[tenant_warehouse],
    partitions_def=tenant_partitions,
    description="Rebuild one tenant's warehouse.",
)
