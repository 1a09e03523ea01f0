"""The backend Dagster pieces against the sandbox over sockets: kick-off asset, the sensor that
polls outside any run (and resumes an export whose kick-off crashed), the land asset's metadata,
rerun without duplicates in the warehouse, the cadence schedule, and a definitions snapshot.
"""

import json
import time
from datetime import UTC, datetime

import dagster as dg
import pytest

from medblocks_pipelines.defs.backend.assets import (
    backend_land_job,
    bulk_export,
    bulk_resources,
)
from medblocks_pipelines.defs.backend.schedules import backend_cadence_schedule, fires_between
from medblocks_pipelines.defs.backend.sensors import (
    backend_bulk_export_sensor,
)
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.fhir.bulk_sync import kickoff_export
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse

from .conftest import TENANT, Env

KEY = f"{TENANT}.mercy-general"


@pytest.fixture
def instance() -> dg.DagsterInstance:
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions("backend_orgs", [KEY])
        yield inst


def _platform(env: Env) -> PlatformResource:
    return PlatformResource(data_dir=str(env.settings.data_dir))


def _tick_until_ready(
    env: Env,
    instance: dg.DagsterInstance,
    cursor: str | None = None,
) -> dg.SensorResult:
    deadline = time.monotonic() + 20
    while True:
        ctx = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"platform": _platform(env)}
        )
        result = backend_bulk_export_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        if result.run_requests:
            return result
        assert time.monotonic() < deadline, "export never became ready"
        # the next poll time honours the server's Retry-After (0 here, clamped to 1 s)
        time.sleep(0.3)


def test_kickoff_sensor_land_and_rerun_without_duplicates(
    env: Env, instance: dg.DagsterInstance
) -> None:
    env.add_org("mercy-general")
    platform = _platform(env)
    res = dg.materialize(
        [bulk_export], partition_key=KEY, instance=instance, resources={"platform": platform}
    )
    assert res.success
    md = res.asset_materializations_for_node("backend__bulk_export")[0].metadata
    export_id = md["export_id"].value
    assert md["reused_in_flight"].value is False
    assert env.cp.get_bulk_export(export_id).status == "kicked_off"

    result = _tick_until_ready(env, instance)
    (req,) = result.run_requests
    assert req.partition_key == KEY
    assert req.tags["medblocks/source"] == "src-mercy-general"
    assert req.run_config["ops"]["backend__bulk_resources"]["config"]["export_id"] == export_id
    # The cursor remembers the launch: the next tick does not request it again.
    again = backend_bulk_export_sensor(
        dg.build_sensor_context(
            instance=instance, cursor=result.cursor, resources={"platform": platform}
        )
    )
    assert not again.run_requests

    land = dg.materialize(
        [bulk_resources],
        partition_key=KEY,
        instance=instance,
        resources={"platform": platform},
        run_config=req.run_config,
    )
    assert land.success
    # (the tenant warehouse rebuild after a landing is the warehouse's debounced sensor's job)
    lmd = {
        k: v.value
        for k, v in land.asset_materializations_for_node("backend__bulk_resources")[
            0
        ].metadata.items()
    }
    assert lmd["landed"] > 0 and lmd["files"] > 0 and lmd["bytes"] > 0
    assert lmd["quarantined"] == 0 and lmd["deleted"] == 0
    assert lmd["watermark"] and lmd["count_mismatches"] == {}
    assert set(lmd["by_type"]) >= {"Patient", "Observation"}
    # What the UI shows at a glance: a table by type, failures by reason, a markdown summary.
    table = {
        r.data["resource_type"]: r.data["count"] for r in lmd["resources_by_type_table"].records
    }
    assert table == lmd["by_type"] and lmd["failures_by_reason_table"].records == []
    assert f"| Patient | {lmd['by_type']['Patient']:,} |" in lmd["summary"]
    assert f"source data as of {lmd['watermark']}" in lmd["summary"]
    evaluations = {e.check_name: e.passed for e in land.get_asset_check_evaluations()}
    assert evaluations == {"manifest_counts_match": True, "no_quarantined_rows": True}

    build_warehouse(TENANT, settings=env.settings, steps=[])
    with open_warehouse(TENANT, settings=env.settings) as con:
        first = con.execute(
            "SELECT count(*), count(DISTINCT resource_key) FROM resources"
        ).fetchone()
    assert first is not None and first[0] == first[1] == lmd["landed"]

    # Full re-sync of the same data: new export, landed again; the warehouse has no duplicates.
    res2 = dg.materialize(
        [bulk_export],
        partition_key=KEY,
        instance=instance,
        resources={"platform": platform},
        run_config={"ops": {"backend__bulk_export": {"config": {"full": True}}}},
    )
    export2 = (
        res2.asset_materializations_for_node("backend__bulk_export")[0].metadata["export_id"].value
    )
    assert export2 != export_id
    _tick_until_ready(env, instance, cursor=result.cursor)
    job = dg.Definitions(
        assets=[bulk_export, bulk_resources],
        jobs=[backend_land_job],
        resources={"platform": platform},
    ).resolve_job_def("backend_land_job")
    land2 = job.execute_in_process(
        instance=instance,
        partition_key=KEY,
        run_config={"ops": {"backend__bulk_resources": {"config": {"export_id": export2}}}},
    )
    assert land2.success
    build_warehouse(TENANT, settings=env.settings, steps=[])
    with open_warehouse(TENANT, settings=env.settings) as con:
        second = con.execute(
            "SELECT count(*), count(DISTINCT resource_key) FROM resources"
        ).fetchone()
    assert second == first


def test_sensor_resumes_export_after_crash(env: Env, instance: dg.DagsterInstance) -> None:
    """A kick-off whose process died right after saving: only the control plane remembers it."""
    env.add_org("mercy-general")
    kicked = kickoff_export(env.cp, TENANT, "mercy-general", run_id="crashed-run")
    # no run, no CLI: the sensor alone finds and polls it
    result = _tick_until_ready(env, instance)
    assert [
        r.run_config["ops"]["backend__bulk_resources"]["config"]["export_id"]
        for r in result.run_requests
    ] == [kicked.export_id]
    assert env.cp.get_bulk_export(kicked.export_id).status == "ready"


def test_sensor_records_failed_export(env: Env, instance: dg.DagsterInstance) -> None:
    ehr = env.add_org("mercy-general")
    ehr.faults.add("export_fail", at_fraction=0.1, status=500)
    kicked = kickoff_export(env.cp, TENANT, "mercy-general", run_id="r")
    deadline = time.monotonic() + 10
    while env.cp.get_bulk_export(kicked.export_id).status == "kicked_off":
        assert time.monotonic() < deadline
        result = backend_bulk_export_sensor(
            dg.build_sensor_context(instance=instance, resources={"platform": _platform(env)})
        )
        assert not result.run_requests
        time.sleep(0.3)
    row = env.cp.get_bulk_export(kicked.export_id)
    assert row.status == "failed" and "500" in row.error


def test_cadence_schedule_requests_due_orgs(env: Env, instance: dg.DagsterInstance) -> None:
    env.add_org("mercy-general", org_config={"cadence": "0 * * * *"})
    platform = _platform(env)
    at = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    # Schedule contexts enter an instance of their own: close them (`with`), never leave them to
    # the garbage collector, whose late exit resets Dagster's defs-state variable to a dead one.
    with dg.build_schedule_context(
        instance=instance, scheduled_execution_time=at, resources={"platform": platform}
    ) as ctx:
        reqs = backend_cadence_schedule(ctx)
    assert isinstance(reqs, list) and [r.partition_key for r in reqs] == [KEY]
    assert reqs[0].run_key == f"{KEY}:2026-11-28T10:00:00+00:00"
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=at.replace(minute=30),
        resources={"platform": platform},
    ) as later:
        assert isinstance(backend_cadence_schedule(later), dg.SkipReason)
    assert len(fires_between("0 2 * * *", at.replace(day=1), at)) == 27


def test_definitions_snapshot() -> None:
    from medblocks_pipelines.cli.runtime import load_definitions

    # Loaded as the CLI loads them: in a fresh context (see test_runtime_context.py).
    d = load_definitions()
    keys = {k.to_user_string() for k in d.resolve_asset_graph().get_all_asset_keys()}
    assert {"backend/bulk_export", "backend/bulk_resources"} <= keys
    assert d.resolve_job_def("backend_kickoff_job") and d.resolve_job_def("backend_land_job")
    assert d.resolve_sensor_def("backend_bulk_export_sensor")
    assert d.resolve_schedule_def("backend_cadence_schedule")
    # One rebuild path for every pattern: the debounced warehouse sensor watches this asset.
    assert d.resolve_sensor_def("warehouse_on_landing_sensor")
    node = d.resolve_assets_def(["backend", "bulk_resources"])
    assert json.dumps(node.partitions_def.name) == '"backend_orgs"'  # type: ignore[union-attr]


def test_sensor_abandons_expired_export_and_kickoff_starts_anew(
    env: Env, instance: dg.DagsterInstance
) -> None:
    """A partial export lands with its missing types in the metadata; an export that then
    expires at the source (status 404) is abandoned by the sensor, and the next kick-off starts a
    new export from the held-back watermark, without ``full``."""
    ehr = env.add_org("mercy-general")
    platform = _platform(env)
    ehr.faults.add("manifest_errors_partial", types=["Condition"])
    kicked = kickoff_export(env.cp, TENANT, "mercy-general", run_id="r1")
    (req,) = _tick_until_ready(env, instance).run_requests or []
    land = dg.materialize(
        [bulk_resources],
        partition_key=KEY,
        instance=instance,
        resources={"platform": platform},
        run_config=req.run_config,
    )
    md = land.asset_materializations_for_node("backend__bulk_resources")[0].metadata
    assert md["missing_types"].value == ["Condition"] and md["status"].value == "partial"
    since = env.cp.get_bulk_export(kicked.export_id).since

    res = dg.materialize(
        [bulk_export], partition_key=KEY, instance=instance, resources={"platform": platform}
    )
    second = res.asset_materializations_for_node("backend__bulk_export")[0].metadata
    export_id = str(second["export_id"].value)
    for job in ehr.bulk.jobs():
        job.expired = True
    backend_bulk_export_sensor(
        dg.build_sensor_context(instance=instance, resources={"platform": platform})
    )
    assert env.cp.get_bulk_export(export_id).status == "expired"
    third = (
        dg.materialize(
            [bulk_export], partition_key=KEY, instance=instance, resources={"platform": platform}
        )
        .asset_materializations_for_node("backend__bulk_export")[0]
        .metadata
    )
    assert third["reused_in_flight"].value is False and third["export_id"].value != export_id
    # the Condition hold keeps the export's _since at the first one's (a full export here)
    assert env.cp.get_bulk_export(str(third["export_id"].value)).since == since
