"""The export sensor lands an export again when its land run failed or died (crash recovery puts
the export back to ``ready``), at most ``MAX_LAND_ATTEMPTS`` times, and never while one runs."""

import time
import uuid
from typing import Any

import dagster as dg

from medblocks_pipelines.defs.backend.assets import bulk_export
from medblocks_pipelines.defs.backend.sensors import MAX_LAND_ATTEMPTS, backend_bulk_export_sensor
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.partitions import partition_key

from .conftest import TENANT, Env

KEY = partition_key(TENANT, "mercy-general")


@dg.op
def _noop() -> None:
    return None


@dg.job
def _placeholder_job() -> None:
    _noop()


def _tick(instance: dg.DagsterInstance, platform: PlatformResource, cursor: str | None) -> Any:
    ctx = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"platform": platform}
    )
    result = backend_bulk_export_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    return result


def _land_run(instance: dg.DagsterInstance, export_id: str, status: dg.DagsterRunStatus) -> None:
    instance.create_run_for_job(
        _placeholder_job,
        run_id=str(uuid.uuid4()),
        tags={"medblocks/export": export_id},
        status=status,
    )


def test_a_failed_land_run_is_relaunched_a_bounded_number_of_times(env: Env) -> None:
    env.add_org("mercy-general")
    platform = PlatformResource(data_dir=str(env.settings.data_dir))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("backend_orgs", [KEY])
        res = dg.materialize(
            [bulk_export], partition_key=KEY, instance=instance, resources={"platform": platform}
        )
        export_id = (
            res.asset_materializations_for_node("backend__bulk_export")[0]
            .metadata["export_id"]
            .value
        )
        deadline = time.monotonic() + 30
        result = _tick(instance, platform, None)
        while not result.run_requests:
            assert time.monotonic() < deadline, "export never became ready"
            time.sleep(0.3)
            result = _tick(instance, platform, None)
        assert [r.run_key for r in result.run_requests] == [f"land:{export_id}"]
        cursor = result.cursor
        # not launched yet, or running: nothing more
        assert not _tick(instance, platform, cursor).run_requests
        _land_run(instance, str(export_id), dg.DagsterRunStatus.STARTED)
        assert not _tick(instance, platform, cursor).run_requests
        instance.report_run_failed(instance.get_runs()[0])  # died; recovery marks it failed
        for attempt in range(1, MAX_LAND_ATTEMPTS):
            again = _tick(instance, platform, cursor)
            assert [r.run_key for r in again.run_requests] == [f"land:{export_id}:{attempt}"]
            assert again.run_requests[0].tags["medblocks/export"] == export_id
            cursor = again.cursor
            _land_run(instance, str(export_id), dg.DagsterRunStatus.FAILURE)
        assert not _tick(instance, platform, cursor).run_requests  # gave up: a human looks
