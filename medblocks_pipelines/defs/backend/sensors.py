"""The backend sensor: polls in-flight Bulk Data exports and launches the land run when ready.

Each tick is cheap: at most ``MAX_POLLS_PER_TICK`` status requests, only for exports whose next poll
time (from the server's ``Retry-After``, clamped) has come. Exports are read from the control
plane, so an export whose kick-off run (or CLI) crashed is resumed from its saved polling URL.
The cursor keeps the ids already launched, so a land run is requested once per export; an export
back to ``ready`` after its land run failed or died (crash recovery) is landed again, at most
``MAX_LAND_ATTEMPTS`` times in all.
"""

import json

import dagster as dg

from medblocks_pipelines.defs.backend.assets import backend_land_job
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.sandbox_guard import (
    stopped_sandbox_sources,
    without_stopped_sandboxes,
)
from medblocks_pipelines.lib.errors import ConfigError, NotFound
from medblocks_pipelines.lib.fhir.bulk_sync import due_exports, poll_export
from medblocks_pipelines.lib.partitions import partition_key

MAX_POLLS_PER_TICK = 20
MAX_LAND_ATTEMPTS = 3  # land runs per export: the first and two more after failures or crashes


def _failed_land_attempts(instance: dg.DagsterInstance, export_id: str) -> int:
    """How many land runs of ``export_id`` failed; 0 while one is queued or in progress (or none
    was launched yet: the request may still be waiting for the daemon)."""
    runs = instance.get_runs(dg.RunsFilter(tags={"medblocks/export": export_id}))
    ended = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    if not runs or any(r.status not in ended for r in runs):
        return 0
    return sum(1 for r in runs if r.status in ended)


@dg.sensor(
    name="backend_bulk_export_sensor",
    job=backend_land_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls kicked-off Bulk Data exports (honouring Retry-After) and launches the "
    "download/land run for each export whose manifest is ready.",
)
def backend_bulk_export_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    """One tick: poll what is due, then request a land run for each newly ready export."""
    cp = platform.control_plane
    launched: list[str] = json.loads(context.cursor) if context.cursor else []
    polled = failed = 0
    due = due_exports(cp, limit=MAX_POLLS_PER_TICK)
    # An export of the demo's sandbox, stopped since: nothing answers; leave it be (not failed).
    stopped = stopped_sandbox_sources(cp, {str(r.source_id) for r in due})
    for row in due:
        if row.source_id in stopped:
            continue
        try:
            st = poll_export(cp, row.id)
        except (NotFound, ConfigError) as exc:
            # The organization or its config is gone: this export can never land. Record it
            # (one bad row must not stall every other export's polling).
            cp.update_bulk_export(row.id, status="failed", error=f"config: {exc}"[:500])
            context.log.warning(f"export {row.id} abandoned: {exc}")
            failed += 1
            continue
        polled += 1
        if st.state == "expired":
            # Abandoned (recorded with an event); the next scheduled kick-off starts anew.
            failed += 1
            context.log.warning(f"export {row.id} expired at the source; abandoned")
        if st.state == "failed":
            failed += 1
            context.log.warning(f"export {row.id} failed at the source (HTTP {st.http_status})")
    ready = cp.list_bulk_exports(status="ready")
    requests = []
    for row in ready:
        if not row.organization_id:
            continue
        attempt = 0
        if row.id in launched:
            # Launched before and back to `ready`: its land run failed or died (crash recovery
            # puts the export back). Land it again, a bounded number of times.
            attempt = _failed_land_attempts(context.instance, row.id)
            if attempt == 0 or attempt >= MAX_LAND_ATTEMPTS:
                continue
        requests.append(
            dg.RunRequest(
                run_key=f"land:{row.id}" + (f":{attempt}" if attempt else ""),
                partition_key=partition_key(row.tenant_id, row.organization_id),
                run_config={"ops": {"backend__bulk_resources": {"config": {"export_id": row.id}}}},
                tags={
                    "medblocks/tenant": row.tenant_id,
                    "medblocks/source": row.source_id,
                    "medblocks/export": row.id,
                },
            )
        )
    requests = without_stopped_sandboxes(context, cp, requests)
    # Keep only ids still waiting to land, so the cursor stays small.
    waiting = {r.id for r in cp.list_bulk_exports(status=("ready", "downloading"))}
    cursor = json.dumps(
        sorted((set(launched) | {r.tags["medblocks/export"] for r in requests}) & waiting)
    )
    if not requests:
        return dg.SensorResult(
            skip_reason=f"polled {polled} export(s), {failed} failed, none newly ready",
            cursor=cursor,
        )
    return dg.SensorResult(run_requests=requests, cursor=cursor)
