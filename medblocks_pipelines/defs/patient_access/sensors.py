"""Patient-access sensors: pull newly consented connections within seconds; flag refused refreshes.

Both read the control plane's outbox (``events``) from a low-water cursor (``lib/registry/outbox``),
so every activation is acted on once, whichever process (web callback, CLI) wrote it, even when
PostgreSQL commits a lower event id after a higher one was read.
"""

import dagster as dg

from medblocks_pipelines.defs.patient_access.assets import patient_access_pull_job
from medblocks_pipelines.defs.patient_access.checks import RECORDS_KEY
from medblocks_pipelines.defs.shared.partitions import patient_access_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.sandbox_guard import without_stopped_sandboxes
from medblocks_pipelines.lib.fhir.pull import PATTERN, refresh_failed_connections
from medblocks_pipelines.lib.partitions import partition_key
from medblocks_pipelines.lib.registry.outbox import OutboxCursor, read_new_events
from medblocks_pipelines.lib.registry.rows import Event

#: Connections per run request: a run pulls a batch, never one run per patient.
BATCH = 200


def _events(platform: PlatformResource, cursor: str | None, type_: str) -> tuple[list[Event], str]:
    rows, after = read_new_events(platform.control_plane, OutboxCursor.parse(cursor))
    picked = [r for r in rows if r.type == type_ and (r.payload or {}).get("pattern") == PATTERN]
    return picked, after.dump()


@dg.sensor(
    name="patient_access_new_connections_sensor",
    job=patient_access_pull_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns newly active patient-access connections into pull runs within seconds, "
    f"batched per tenant.source ({BATCH} connections per run request).",
)
def patient_access_new_connections_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    """Read ``connection.activated`` events after the cursor and request batched runs."""
    events, last = _events(platform, context.cursor, "connection.activated")
    by_partition: dict[tuple[str, str], list[str]] = {}
    for ev in events:
        payload = ev.payload
        by_partition.setdefault((ev.tenant_id, payload["source_id"]), []).append(
            payload["connection_id"]
        )
    requests: list[dg.RunRequest] = []
    keys: list[str] = []
    for (tenant, source), ids in sorted(by_partition.items()):
        key = partition_key(tenant, source)
        keys.append(key)
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            requests.append(
                dg.RunRequest(
                    run_key=f"pa-new:{key}:{chunk[0]}:{len(chunk)}",
                    partition_key=key,
                    run_config={
                        "ops": {"patient_access__records": {"config": {"connection_ids": chunk}}}
                    },
                    tags={
                        "medblocks/tenant": tenant,
                        "medblocks/source": source,
                        "medblocks/trigger": "new_connections",
                    },
                )
            )
    # A source added moments ago may not be a partition yet (the registry sensor runs every 30 s).
    existing = set(context.instance.get_dynamic_partitions(patient_access_partitions.name or ""))
    missing = sorted(set(keys) - existing)
    partition_requests = [patient_access_partitions.build_add_request(missing)] if missing else []
    requests = without_stopped_sandboxes(context, platform.control_plane, requests)
    if not requests:
        return dg.SensorResult(skip_reason="no newly active connections", cursor=last)
    return dg.SensorResult(
        run_requests=requests, cursor=last, dynamic_partitions_requests=partition_requests
    )


@dg.sensor(
    name="patient_access_refresh_failed_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Flags connections whose refresh token was refused: records an asset check "
    "evaluation (WARN) on patient_access/records for the tenant.source.",
)
def patient_access_refresh_failed_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    """Read ``connection.refresh_failed`` events and emit a failed check per tenant.source."""
    events, last = _events(platform, context.cursor, "connection.refresh_failed")
    partitions = sorted({(ev.tenant_id, ev.payload["source_id"]) for ev in events})
    evaluations: list[dg.AssetCheckEvaluation] = []
    for tenant, source in partitions:
        failed = refresh_failed_connections(
            platform.control_plane, tenant_id=tenant, source_id=source
        )
        context.log.warning(
            f"{len(failed)} patient-access connection(s) of {tenant}.{source} are refresh_failed"
        )
        evaluations.append(
            dg.AssetCheckEvaluation(
                asset_key=RECORDS_KEY,
                check_name="no_refresh_failed_connections",
                passed=not failed,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "partition": partition_key(tenant, source),
                    "refresh_failed_connections": len(failed),
                    "connection_ids": dg.MetadataValue.json(failed[:50]),
                },
            )
        )
    if not evaluations:
        return dg.SensorResult(skip_reason="no refused refreshes", cursor=last)
    return dg.SensorResult(asset_events=evaluations, cursor=last)
