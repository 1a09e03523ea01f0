"""Per-organization cadence: each organization's ``cadence`` cron (nightly by default) kicks off
an incremental export (``_since`` = the last ``transactionTime``).

Organizations live in the registry and change at run time, so one schedule ticks every
``TICK_MINUTES`` and requests a kick-off for every organization whose own cron fired since the
previous tick; the run key carries the fire time, so each fire starts at most one run.
"""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
from croniter import croniter

from medblocks_pipelines.defs.backend.assets import backend_kickoff_job
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.sandbox_guard import without_stopped_sandboxes
from medblocks_pipelines.lib.partitions import partition_key

DEFAULT_CADENCE = "0 2 * * *"  # nightly cohort sync
TICK_MINUTES = 5


def fires_between(cron: str, start: datetime, end: datetime, tz: str = "UTC") -> list[datetime]:
    """Fire times of ``cron`` in ``(start, end]``."""
    out = []
    it = croniter(cron, start.astimezone(ZoneInfo(tz)))
    while (when := it.get_next(datetime)) <= end:
        if when > start:
            out.append(when)
    return out


@dg.schedule(
    name="backend_cadence_schedule",
    cron_schedule=f"*/{TICK_MINUTES} * * * *",
    job=backend_kickoff_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Kicks off each backend organization's incremental export on its own cadence "
    "(organization config `cadence`, cron, nightly by default).",
)
def backend_cadence_schedule(
    context: dg.ScheduleEvaluationContext, platform: PlatformResource
) -> dg.SkipReason | list[dg.RunRequest]:
    """Request kick-offs for the organizations whose cadence fired in the last tick window."""
    cp = platform.control_plane
    now = context.scheduled_execution_time
    start = now - timedelta(minutes=TICK_MINUTES)
    sources = {s.id: s for s in cp.list_sources()}
    requests = []
    for org in cp.list_organizations():
        src = sources.get(org.source_id)
        if src is None or "backend" not in (src.patterns or []):
            continue
        cron = (org.config or {}).get("cadence") or DEFAULT_CADENCE
        if not croniter.is_valid(cron):
            context.log.warning(f"organization {org.id} has an invalid cadence; skipped")
            continue
        for fire in fires_between(cron, start, now):
            key = partition_key(org.tenant_id, org.id)
            requests.append(
                dg.RunRequest(
                    run_key=f"{key}:{fire.isoformat()}",
                    partition_key=key,
                    tags={
                        "medblocks/tenant": org.tenant_id,
                        "medblocks/source": org.source_id,
                    },
                )
            )
    return without_stopped_sandboxes(context, cp, requests) or dg.SkipReason(
        "no organization is due"
    )
