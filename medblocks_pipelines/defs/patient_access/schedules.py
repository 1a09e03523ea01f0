"""The patient-access schedule: re-pull connections on each source's cadence.

Each connection carries ``next_pull_due`` (last pull + the source's ``pull_cadence_hours``, default
24). Every 15 minutes the schedule asks for a run of each tenant.source that has connections due;
the run pulls a batch of them, so the cadence holds per connection without one run per patient.
"""

from datetime import UTC, datetime

import dagster as dg

from medblocks_pipelines.defs.patient_access.assets import patient_access_pull_job
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.sandbox_guard import without_stopped_sandboxes
from medblocks_pipelines.lib.fhir.pull import PATTERN
from medblocks_pipelines.lib.fhir.pull_batch import due_connections
from medblocks_pipelines.lib.partitions import partition_key


@dg.schedule(
    name="patient_access_due_schedule",
    job=patient_access_pull_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 15 minutes: one run per tenant.source with connections whose cadence is due.",
)
def patient_access_due_schedule(
    context: dg.ScheduleEvaluationContext, platform: PlatformResource
) -> dg.SkipReason | list[dg.RunRequest]:
    """Request a pull for every tenant.source that has active connections due now."""
    cp = platform.control_plane
    now = datetime.now(UTC)
    pairs = sorted(
        {(c.tenant_id, c.source_id) for c in cp.list_connections(pattern=PATTERN, state="active")}
    )
    stamp = now.strftime("%Y%m%dT%H%M%S")
    requests = []
    for tenant, source in pairs:
        due = due_connections(cp, tenant_id=tenant, source_id=source, now=now)
        if not due:
            continue
        key = partition_key(tenant, source)
        requests.append(
            dg.RunRequest(
                run_key=f"pa-due:{key}:{stamp}",
                partition_key=key,
                tags={
                    "medblocks/tenant": tenant,
                    "medblocks/source": source,
                    "medblocks/trigger": "cadence",
                    "medblocks/due": str(len(due)),
                },
            )
        )
    requests = without_stopped_sandboxes(context, cp, requests)
    if not requests:
        return dg.SkipReason("no patient-access connections are due")
    return requests
