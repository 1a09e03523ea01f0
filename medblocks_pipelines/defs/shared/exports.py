"""Per-tenant exports of the warehouse to files, object storage and FHIR servers.

One partition per tenant; the asset runs every enabled destination of the tenant
(``medblocks exports add``). Each destination keeps its own watermark, so a failed destination is
retried on the next run without re-sending what the others already got.
"""

import dagster as dg

from medblocks_pipelines.defs.shared.partitions import tenant_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.errors import ExportError
from medblocks_pipelines.lib.ops.exports import list_destinations, run_export
from medblocks_pipelines.lib.partitions import split_partition_key


@dg.asset(
    key=["exports", "tenant_exports"],
    deps=[dg.AssetKey(["warehouse", "tenant_warehouse"])],
    partitions_def=tenant_partitions,
    group_name="exports",
    kinds={"ndjson", "parquet", "s3"},
    owners=["team:data-platform"],
    tags={"medblocks/layer": "export"},
    description="Sends what changed in a tenant's warehouse since each destination's last "
    "committed export (a backfill the first time) to its NDJSON/Parquet folder, S3-compatible "
    "bucket or FHIR server. Every run is recorded in export_runs with an export.* event.",
)
def tenant_exports(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> dg.MaterializeResult:
    """Run each enabled destination; fail the step if any destination failed (after trying all)."""
    (tenant,) = split_partition_key(context.partition_key)
    cp = platform.control_plane
    rows: list[str] = []
    failed: list[str] = []
    totals = {"exported": 0, "deleted": 0, "bytes": 0}
    for dest in list_destinations(cp, tenant_id=tenant, enabled_only=True):
        try:
            res = run_export(cp, platform.settings, dest.id, run_id=context.run_id)
        except ExportError as exc:
            failed.append(dest.id)
            context.log.error(f"export {dest.id} failed: {exc}")
            rows.append(f"| {dest.id} | {dest.kind} | failed | - | - | - |")
            continue
        totals["exported"] += res.exported
        totals["deleted"] += res.deleted
        totals["bytes"] += res.bytes
        rows.append(
            f"| {dest.id} | {dest.kind} | {res.mode} #{res.seq} | {res.exported} | "
            f"{res.deleted} | {res.duration_s:.1f}s |"
        )
    summary = "\n".join(
        ["| destination | kind | run | exported | deleted | took |", "|---|---|---|---|---|---|"]
        + rows
    )
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} export destination(s) failed: {', '.join(failed)}",
            metadata={"summary": dg.MetadataValue.md(summary)},
        )
    return dg.MaterializeResult(
        metadata={
            "destinations": len(rows),
            "exported": totals["exported"],
            "deleted": totals["deleted"],
            "bytes": totals["bytes"],
            "summary": dg.MetadataValue.md(summary or "no enabled destinations"),
        }
    )


tenant_export_job = dg.define_asset_job(
    "tenant_export_job",
    selection=[tenant_exports],
    partitions_def=tenant_partitions,
    description="Export a tenant's warehouse changes to its destinations.",
)


WAREHOUSE_KEY = dg.AssetKey(["warehouse", "tenant_warehouse"])


@dg.sensor(
    name="exports_after_warehouse_sensor",
    job=tenant_export_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a tenant's export run after each new build of its warehouse, for "
    "tenants with at least one enabled export destination.",
)
def exports_after_warehouse_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    """Every warehouse materialization since the cursor (storage id) becomes one run request."""
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=WAREHOUSE_KEY, after_storage_id=after),
        limit=500,
        ascending=True,
    ).records
    if not records:
        return dg.SensorResult(skip_reason="no new warehouse builds")
    with_destinations = {
        d.tenant_id for d in list_destinations(platform.control_plane, enabled_only=True)
    }
    requests: dict[str, dg.RunRequest] = {}
    for record in records:
        tenant = record.partition_key
        if tenant and tenant in with_destinations:
            # Several builds of one tenant since the last tick need one export, not several.
            requests[tenant] = dg.RunRequest(
                run_key=f"export-{tenant}-{record.storage_id}",
                partition_key=tenant,
                tags={"medblocks/tenant": tenant},
            )
    return dg.SensorResult(
        run_requests=list(requests.values()),
        cursor=str(records[-1].storage_id),
        skip_reason=None if requests else "new builds, but no export destinations",
    )
