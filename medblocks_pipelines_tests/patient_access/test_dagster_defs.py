"""Dagster definitions of the patient-access pattern, against the real sandbox.

The asset pulls a batch and reports PHI-free metadata and its check; the new-connections sensor
batches activations into run requests from a cursor; the refresh-failed sensor flags refused
refreshes; the schedule asks for runs where connections are due. Plus a snapshot of what the
pattern defines, so nothing disappears unseen.
"""

import dagster as dg

from medblocks_pipelines.defs.patient_access import assets, checks, schedules, sensors
from medblocks_pipelines.defs.shared.partitions import patient_access_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.partitions import partition_key
from medblocks_pipelines_tests.patient_access.conftest import PatientAccessEnv


def pattern_defs() -> dg.Definitions:
    return dg.Definitions(
        assets=[assets.patient_access_records],
        jobs=[assets.patient_access_pull_job],
        sensors=[
            sensors.patient_access_new_connections_sensor,
            sensors.patient_access_refresh_failed_sensor,
        ],
        schedules=[schedules.patient_access_due_schedule],
        resources={"platform": PlatformResource()},
    )


def test_definitions_snapshot() -> None:
    defs = pattern_defs()
    dg.Definitions.validate_loadable(defs)
    assert [k.to_user_string() for k in defs.resolve_all_asset_keys()] == ["patient_access/records"]
    assert (
        defs.resolve_job_def("patient_access_pull_job").partitions_def == patient_access_partitions
    )
    assert sorted(s.name for s in defs.sensors) == [
        "patient_access_new_connections_sensor",
        "patient_access_refresh_failed_sensor",
    ]
    assert [s.name for s in defs.schedules] == ["patient_access_due_schedule"]
    assert checks.no_refresh_failed_spec.name == "no_refresh_failed_connections"


def _connect(env: PatientAccessEnv, n: int) -> tuple[str, list[str]]:
    org = env.org("ehr")
    sid = env.add_source(org)
    ids = []
    for login in env.logins(org)[:n]:
        conn_id, outcome = env.connect(sid, login)
        assert outcome.status == "active"
        ids.append(conn_id)
    return sid, ids


def test_asset_pulls_a_batch_and_reports_metadata(pa_env: PatientAccessEnv) -> None:
    sid, ids = _connect(pa_env, 2)
    key = partition_key("acme", sid)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(patient_access_partitions.name, [key])
        result = dg.materialize(
            [assets.patient_access_records],
            instance=instance,
            partition_key=key,
            resources={"platform": PlatformResource()},
        )
        assert result.success
        mat = result.asset_materializations_for_node("patient_access__records")[0]
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert meta["connections_pulled"] == 2
        assert meta["by_status"] == {"success": 2}
        assert meta["resources_by_type"]["Patient"] == 2
        assert meta["failures_by_reason"] == {}
        assert meta["next_due"] != "none"
        # No PHI: nothing but counts, our ids and timestamps.
        patients = [pa_env.cp.get_connection(i).source_patient_id for i in ids]
        from dagster import serialize_value

        stored = serialize_value(mat)  # every value as the event log stores it (tables included)
        assert not any(p in stored for p in patients)
        assert "| Patient | 2 |" in meta["summary"]
        (check,) = result.get_asset_check_evaluations()
        assert check.passed
        # Nothing is due any more: a second run pulls nobody and says so.
        again = dg.materialize(
            [assets.patient_access_records],
            instance=instance,
            partition_key=key,
            resources={"platform": PlatformResource()},
        )
        meta2 = again.asset_materializations_for_node("patient_access__records")[0].metadata
        assert meta2["connections_pulled"].value == 0


def test_new_connections_sensor_batches_runs_from_a_cursor(pa_env: PatientAccessEnv) -> None:
    sid, ids = _connect(pa_env, 3)
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(
            instance=instance, resources={"platform": PlatformResource()}
        ) as ctx:
            result = sensors.patient_access_new_connections_sensor(ctx)
        assert len(result.run_requests) == 1  # one batch for the tenant.source, not one per patient
        (req,) = result.run_requests
        assert req.partition_key == partition_key("acme", sid)
        assert req.run_config["ops"]["patient_access__records"]["config"]["connection_ids"] == ids
        assert req.tags["medblocks/source"] == sid
        assert result.dynamic_partitions_requests  # the partition is created if missing
        # The cursor moves past the events: the next tick requests nothing.
        with dg.build_sensor_context(
            instance=instance, cursor=result.cursor, resources={"platform": PlatformResource()}
        ) as ctx2:
            assert not sensors.patient_access_new_connections_sensor(ctx2).run_requests


def test_refresh_failed_is_flagged(pa_env: PatientAccessEnv) -> None:
    sid, ids = _connect(pa_env, 1)
    pa_env.cp.transition(ids[0], "refresh_failed", reason="refresh refused: invalid_grant")
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(
            instance=instance, resources={"platform": PlatformResource()}
        ) as ctx:
            result = sensors.patient_access_refresh_failed_sensor(ctx)
        (evaluation,) = result.asset_events
        assert evaluation.passed is False
        assert evaluation.metadata["refresh_failed_connections"].value == 1
    check = checks.refresh_failed_check(pa_env.cp, tenant_id="acme", source_id=sid)
    assert check.passed is False


def test_schedule_requests_runs_where_connections_are_due(pa_env: PatientAccessEnv) -> None:
    sid, _ids = _connect(pa_env, 1)
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(
            instance=instance, resources={"platform": PlatformResource()}
        ) as ctx:
            requests = schedules.patient_access_due_schedule(ctx)
        assert [r.partition_key for r in requests] == [partition_key("acme", sid)]
