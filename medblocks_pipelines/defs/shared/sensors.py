"""Keeps Dagster's dynamic partitions in step with the registry."""

import dagster as dg
import sqlalchemy as sa

from medblocks_pipelines.defs.shared.partitions import desired_partition_keys
from medblocks_pipelines.defs.shared.resources import PlatformResource


@dg.sensor(
    name="registry_partitions_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds and removes dynamic partitions (tenants, organizations, sources, networks) "
    "so they match the control-plane registry.",
)
def registry_partitions_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    """Diff registry keys against the instance's dynamic partitions and request the changes."""
    desired = desired_partition_keys(platform.control_plane)
    requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
    for name, keys in sorted(desired.items()):
        existing = set(context.instance.get_dynamic_partitions(name))
        added = sorted(keys - existing)
        removed = sorted(existing - keys)
        if added:
            requests.append(dg.AddDynamicPartitionsRequest(name, added))
        if removed:
            requests.append(dg.DeleteDynamicPartitionsRequest(name, removed))
    if not requests:
        return dg.SensorResult(skip_reason="partitions match the registry")
    return dg.SensorResult(dynamic_partitions_requests=requests)


def add_partitions(instance: dg.DagsterInstance, name: str, keys: list[str]) -> None:
    """Add dynamic partitions that another process may be adding at the same moment.

    Two CLI runs (or a run and the sensor) can both find a new tenant missing; Dagster's SQLite
    storage checks, then inserts, so the slower one hits the unique index (``IntegrityError``)
    and its run would crash before it started. The partition is there either way: read again and
    add what is still missing.
    """
    for attempt in range(3):
        try:
            instance.add_dynamic_partitions(name, keys)
            return
        except sa.exc.IntegrityError:
            keys = sorted(set(keys) - set(instance.get_dynamic_partitions(name)))
            if not keys:
                return
            if attempt == 2:
                raise


def sync_partitions(instance: dg.DagsterInstance, platform: PlatformResource) -> dict[str, int]:
    """Apply the registry's partitions directly (CLI and demo, where no daemon runs sensors)."""
    added: dict[str, int] = {}
    for name, keys in desired_partition_keys(platform.control_plane).items():
        existing = set(instance.get_dynamic_partitions(name))
        new = sorted(keys - existing)
        if new:
            add_partitions(instance, name, new)
        for key in sorted(existing - keys):
            instance.delete_dynamic_partition(name, key)
        added[name] = len(new)
    return added


@dg.sensor(
    name="dead_run_recovery_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Crash recovery without a human: runs of this host whose process is gone (a "
    "killed CLI) are marked failed, pool slots of ended runs freed, their pull rows failed and "
    "their temporary files removed (see defs/shared/run_recovery.py).",
)
def dead_run_recovery_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SkipReason:
    """Recover what dead runs left; the skip reason says what was done (counts and run ids)."""
    from medblocks_pipelines.defs.shared.run_recovery import recover

    report = recover(
        context.instance,
        control_plane=platform.control_plane,
        settings=platform.settings,
        repair=True,
    )
    if report.clean:
        return dg.SkipReason("no run left anything behind")
    return dg.SkipReason(
        f"recovered {len(report.dead_runs)} dead run(s) {[r[:8] for r in report.dead_runs]}, "
        f"freed slots of {len(report.slot_runs)} run(s), failed {len(report.stale_pulls)} "
        f"pull(s), released {len(report.stale_exports)} export(s), "
        f"removed {len(report.orphan_paths)} leftover path(s)"
    )
