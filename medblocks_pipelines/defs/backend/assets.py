"""Backend pattern assets: an organization's Bulk Data export, kicked off, then downloaded and landed.

Two steps, two assets, because a bulk export can take hours to days (ARCHITECTURE constraint 3):
``bulk_export`` kicks off and saves the polling URL; ``backend_sensor`` polls outside any run and
launches ``backend_land_job`` (the ``bulk_resources`` asset) once the manifest is ready. The tenant
warehouse (``["warehouse", "tenant_warehouse"]``) is built from the lake downstream.
"""

import dagster as dg

from medblocks_pipelines.defs.shared.partitions import backend_org_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.summaries import landing_metadata
from medblocks_pipelines.lib.errors import ConfigError, TransientError
from medblocks_pipelines.lib.fhir.bulk import clamp_wait
from medblocks_pipelines.lib.fhir.bulk_land import take_early_landing
from medblocks_pipelines.lib.fhir.bulk_sync import (
    KickoffResult,
    in_flight_export,
    kickoff_export,
    land_export,
    set_since,
)
from medblocks_pipelines.lib.partitions import split_partition_key


class KickoffConfig(dg.Config):
    """``full``: clear the organization's watermark and export everything (manual re-sync);
    ``since``: start from this ``_since`` (FHIR instant) instead of the watermark; ``patients``:
    a patient-list export of these patient ids (POST with ``patient``)."""

    full: bool = False
    since: str = ""
    patients: list[str] = []
    #: An export ``medblocks sync backend`` already kicked off before Dagster loaded: the run
    #: records it (``reused``, ``warnings``: what the kick-off said) instead of starting one.
    export_id: str = ""
    reused: bool = False
    warnings: list[str] = []


class LandConfig(dg.Config):
    """Which export to land; empty means the partition's in-flight export."""

    export_id: str = ""


@dg.asset(
    key=["backend", "bulk_export"],
    partitions_def=backend_org_partitions,
    group_name="backend",
    kinds={"fhir"},
    owners=["team:data-platform"],
    tags={"medblocks/pattern": "backend"},
    description="Kicks off the organization's FHIR Bulk Data $export (incremental by _since, the "
    "last transactionTime) and saves its polling URL at once; the backend sensor waits for it.",
)
def bulk_export(
    context: dg.AssetExecutionContext, config: KickoffConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """Kick off (or reuse the organization's in-flight export) and report what was asked."""
    tenant, org_id = split_partition_key(context.partition_key)
    if config.export_id:
        result = _kicked_off_by_cli(platform, config, context.run_id)
    else:
        result = _kick_off(context, config, platform, tenant, org_id)
    for warning in result.warnings:
        context.log.warning(warning)
    if result.reused:
        context.log.info(f"export {result.export_id} is still in flight; not starting another")
    return dg.MaterializeResult(
        metadata={
            "export_id": result.export_id,
            "reused_in_flight": result.reused,
            "since": result.since or "(full export)",
            "full_resync": config.full,
            "patient_list": len(config.patients),
            "adaptations": dg.MetadataValue.json(list(result.warnings)),
        }
    )


def _kick_off(
    context: dg.AssetExecutionContext,
    config: KickoffConfig,
    platform: PlatformResource,
    tenant: str,
    org_id: str,
) -> KickoffResult:
    if config.since:
        set_since(platform.control_plane, tenant, org_id, config.since)
    try:
        return kickoff_export(
            platform.control_plane,
            tenant,
            org_id,
            full=config.full,
            run_id=context.run_id,
            patients=tuple(config.patients),
        )
    except TransientError as exc:
        # 429 (one export at a time) or 5xx: retry the step after the server's Retry-After.
        wait = clamp_wait(exc.retry_after, 30.0, lo=5.0, hi=600.0)
        raise dg.RetryRequested(max_retries=3, seconds_to_wait=wait) from exc


def _kicked_off_by_cli(
    platform: PlatformResource, config: KickoffConfig, run_id: str
) -> KickoffResult:
    """The export the CLI kicked off: recorded by this run (a new one is linked to it)."""
    row = platform.control_plane.get_bulk_export(config.export_id)
    if not config.reused:
        platform.control_plane.update_bulk_export(config.export_id, run_id=run_id)
    return KickoffResult(config.export_id, config.reused, row.since, tuple(config.warnings))


@dg.asset(
    key=["backend", "bulk_resources"],
    deps=[bulk_export],
    partitions_def=backend_org_partitions,
    group_name="backend",
    kinds={"parquet", "fhir"},
    owners=["team:data-platform"],
    # No pool (one name across every source and tenant): the per-source `medblocks/source` run
    # limit and the source's `max_parallel_downloads` bound a source's load.
    tags={"medblocks/layer": "landing", "medblocks/pattern": "backend"},
    check_specs=[
        dg.AssetCheckSpec(
            "manifest_counts_match",
            asset=["backend", "bulk_resources"],
            description="Lines received per type equal the manifest's counts.",
        ),
        dg.AssetCheckSpec(
            "no_quarantined_rows",
            asset=["backend", "bulk_resources"],
            description="Every received line landed (none quarantined).",
        ),
    ],
    description="Downloads every file of a completed export (parallel, per-source limit, resumable) "
    "and lands it in the lake: resources, tombstones from `deleted`, error-file outcomes counted; "
    "then moves the watermark over the types delivered (failed types are held back) and DELETEs "
    "the export. An export that expired on the server is abandoned; the next kick-off restarts it.",
)
def bulk_resources(
    context: dg.AssetExecutionContext, config: LandConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """Land the export and report counts, bytes, duration, quarantine, errors, deletions."""
    tenant, org_id = split_partition_key(context.partition_key)
    cp = platform.control_plane
    export_id = config.export_id
    if not export_id:
        row = in_flight_export(cp, tenant, org_id)
        if row is None:
            raise ConfigError(
                f"no export in flight for {context.partition_key}",
                hint="materialize backend/bulk_export first",
            )
        export_id = row.id
    # `medblocks sync backend` begins the landing as its run is admitted (start_early_landing);
    # then this step waits for it and reports it, else it lands here.
    early = take_early_landing(export_id, context.run_id)
    if early is not None:
        report = early.result()
    else:
        report = land_export(cp, platform.settings, export_id, run_id=context.run_id)
    for warning in report.warnings:
        context.log.warning(warning)
    md = report.as_metadata()
    checks = [
        dg.AssetCheckResult(
            check_name="manifest_counts_match",
            passed=not report.count_mismatches,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"mismatched_types": len(report.count_mismatches)},
        ),
        dg.AssetCheckResult(
            check_name="no_quarantined_rows",
            passed=report.quarantined == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"quarantined": report.quarantined},
        ),
    ]
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "export_id": export_id,
            "status": md["status"],
            "landed": md["landed"],
            "by_type": dg.MetadataValue.json(md["by_type"]),
            "expected_by_type": dg.MetadataValue.json(md["expected_by_type"]),
            "count_mismatches": dg.MetadataValue.json(md["count_mismatches"]),
            "quarantined": md["quarantined"],
            "quarantine_reasons": dg.MetadataValue.json(md["quarantine_reasons"]),
            "deleted": md["deleted"],
            "error_entries": dg.MetadataValue.json(md["error_entries"]),
            "missing_types": dg.MetadataValue.json(md["missing_types"]),
            "watermark_held_back": md["watermark_held_back"],
            "attachments_inlined": md["attachments_inlined"],
            "files": md["files"],
            "bytes": md["bytes"],
            "resumed_bytes": md["resumed_bytes"],
            "attachments": md["attachments"],
            "tokens_fetched": md["tokens_fetched"],
            "duration_s": md["duration_s"],
            "watermark": md["watermark"] or "",
            "since": md["since"] or "(full export)",
            **landing_metadata(
                f"Bulk export {export_id} of {context.partition_key}: {md['status']}",
                {
                    "landed": md["landed"],
                    "deleted": md["deleted"],
                    "quarantined": md["quarantined"],
                    "types whose count differs from the manifest": len(md["count_mismatches"]),
                    "types missing (held back for the next sync)": len(md["missing_types"]),
                    "files": md["files"],
                    "duration": f"{md['duration_s']} s",
                },
                md["by_type"],
                {
                    **md["quarantine_reasons"],
                    **{f"error {c}": n for c, n in md["error_codes"].items()},
                },
                freshness=(
                    f"source data as of {md['watermark']} (export transactionTime)"
                    + (f", changes since {md['since']}" if md["since"] else ", full export")
                    if md["watermark"]
                    else None
                ),
            ),
        },
    )


backend_kickoff_job = dg.define_asset_job(
    "backend_kickoff_job",
    selection=[bulk_export],
    partitions_def=backend_org_partitions,
    description="Kick off one organization's Bulk Data export (the sensor lands it when ready).",
)

backend_land_job = dg.define_asset_job(
    "backend_land_job",
    selection=[bulk_resources],
    partitions_def=backend_org_partitions,
    description="Download and land a ready Bulk Data export for one organization.",
)

backend_sync_job = dg.define_asset_job(
    "backend_sync_job",
    selection=[bulk_export, bulk_resources],
    partitions_def=backend_org_partitions,
    description="`medblocks sync backend`: record an export the CLI kicked off and waited for "
    "(ready), and land it, in one run (the schedule and the sensor use the two jobs above).",
)
