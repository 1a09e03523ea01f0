"""Launch sensor: every EHR launch becomes a targeted sync of that patient within seconds.

Reads ``clinician.launch`` outbox events (written by the launch callback) after its cursor, looks
up each launch's patient, and requests one run per ``tenant.org`` with the new connections. The same
patient launched again at the same organization within ``DEDUPE_SECONDS`` is not synced again
(a clinician re-opening a chart); the cursor is a low-water mark over the outbox
(``lib/registry/outbox``) plus the recent launches.
"""

import time

import dagster as dg

from medblocks_pipelines.defs.clinician_workflow.assets import clinician_sync_job
from medblocks_pipelines.defs.shared.partitions import clinician_org_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.sandbox_guard import without_stopped_sandboxes
from medblocks_pipelines.lib.cds.launch import LAUNCH_EVENT, PATTERN
from medblocks_pipelines.lib.partitions import partition_key
from medblocks_pipelines.lib.registry.outbox import OutboxCursor, read_new_events
from medblocks_pipelines.lib.registry.rows import Event

DEDUPE_SECONDS = 600


def plan_syncs(
    events: list[Event], *, recent: dict[str, float], now: float, patient_of: dict[str, str | None]
) -> tuple[dict[tuple[str, str], list[str]], dict[str, float], int]:
    """Group launch events by (tenant, org), dropping repeats of a patient within the window.

    Returns the connection ids per partition, the updated recent-launch map and how many were
    deduplicated. ``patient_of`` maps connection id -> source patient id.
    """
    recent = {k: t for k, t in recent.items() if now - t < DEDUPE_SECONDS}
    plan: dict[tuple[str, str], list[str]] = {}
    deduped = 0
    for ev in events:
        payload = ev.payload
        if ev.type != LAUNCH_EVENT or payload.get("pattern") != PATTERN:
            continue
        cid, org = payload.get("connection_id"), payload.get("organization_id")
        patient = patient_of.get(cid) if cid else None
        if not cid or not org or not patient:
            continue
        key = f"{ev.tenant_id}|{org}|{patient}"
        if key in recent:
            deduped += 1
            continue
        recent[key] = now
        plan.setdefault((ev.tenant_id, org), []).append(cid)
    return plan, recent, deduped


@dg.sensor(
    name="clinician_launch_sensor",
    job=clinician_sync_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns EHR launches into targeted syncs of the launched patient within seconds, "
    f"deduplicated per patient and organization for {DEDUPE_SECONDS} s.",
)
def clinician_launch_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    """Read launch events after the cursor and request one sync run per tenant.org."""
    cp = platform.control_plane
    rows, after = read_new_events(cp, OutboxCursor.parse(context.cursor))
    launches = [r for r in rows if r.type == LAUNCH_EVENT]
    patient_of = {}
    for ev in launches:
        cid = (ev.payload or {}).get("connection_id")
        if cid:
            patient_of[cid] = cp.get_connection(cid).source_patient_id
    plan, recent, deduped = plan_syncs(
        launches, recent=after.extra.get("recent", {}), now=time.time(), patient_of=patient_of
    )
    after.extra["recent"] = recent
    cursor = after.dump()
    if not plan:
        return dg.SensorResult(
            skip_reason=f"no new launches ({deduped} deduplicated)", cursor=cursor
        )
    source_of = {
        (ev.tenant_id, (ev.payload or {}).get("organization_id")): (ev.payload or {}).get(
            "source_id"
        )
        for ev in launches
    }
    requests = []
    keys = []
    for (tenant, org), ids in sorted(plan.items()):
        key = partition_key(tenant, org)
        keys.append(key)
        requests.append(
            dg.RunRequest(
                run_key=f"cw-launch:{key}:{ids[0]}:{len(ids)}",
                partition_key=key,
                run_config={
                    "ops": {"clinician_workflow__records": {"config": {"connection_ids": ids}}}
                },
                tags={
                    "medblocks/tenant": tenant,
                    "medblocks/source": str(source_of.get((tenant, org))),
                    "medblocks/trigger": "ehr_launch",
                },
            )
        )
    existing = set(context.instance.get_dynamic_partitions(clinician_org_partitions.name or ""))
    missing = sorted(set(keys) - existing)
    return dg.SensorResult(
        run_requests=without_stopped_sandboxes(context, cp, requests),
        cursor=cursor,
        dynamic_partitions_requests=(
            [clinician_org_partitions.build_add_request(missing)] if missing else []
        ),
    )
