"""``medblocks sync backend`` kicks off before Dagster loads (issue 17): the export request goes
out first and is polled while Dagster loads, then one run (``backend_sync_job``) records that
export and lands it; if that early kick-off fails, the kick-off run kicks off itself (its retries,
its failure record) and the land run lands it, as before. Against the sandbox EHR."""

import dagster as dg
from click.testing import CliRunner

from .conftest import TENANT, Env

ORG = "mercy-general"


def _kickoff_run(instance: dg.DagsterInstance, job: str = "backend_kickoff_job") -> dg.RunRecord:
    (record,) = instance.get_run_records(dg.RunsFilter(job_name=job))
    return record


def _sync() -> str:
    from medblocks_pipelines.cli import main

    out = CliRunner().invoke(main, ["sync", "backend", "--tenant", TENANT, "--org", ORG])
    assert out.exit_code == 0, out.output
    return out.output


def test_export_is_kicked_off_before_the_run_and_recorded_by_it(
    env: Env, live_defs_state: object
) -> None:
    env.add_org(ORG, org_config={"types": ["Patient", "Condition"]})
    assert "status success" in _sync()
    (row,) = env.cp.list_bulk_exports(tenant_id=TENANT)
    assert row.status == "completed"
    instance = dg.DagsterInstance.get()
    record = _kickoff_run(instance, "backend_sync_job")
    assert row.kicked_off_at.timestamp() < record.start_time  # before the run began
    assert row.run_id == record.dagster_run.run_id  # that run recorded and landed it
    assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    assert not instance.get_run_records(dg.RunsFilter(job_name="backend_kickoff_job"))
    mats = dg.DagsterInstance.get().fetch_materializations(
        dg.AssetKey(["backend", "bulk_export"]), limit=1
    )
    md = mats.records[0].asset_materialization.metadata  # type: ignore[union-attr]
    assert md["export_id"].value == row.id
    assert md["reused_in_flight"].value is False


def test_a_failed_early_kickoff_is_left_to_the_run(env: Env, live_defs_state: object) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Patient"]})
    ehr.faults.add("error_burst", path=r"\$export", count=1, status=503)
    assert "status success" in _sync()
    (row,) = env.cp.list_bulk_exports(tenant_id=TENANT)
    assert row.status == "completed"
    instance = dg.DagsterInstance.get()
    record = _kickoff_run(instance)
    assert row.kicked_off_at.timestamp() > record.start_time  # kicked off by the run
    (land,) = instance.get_run_records(dg.RunsFilter(job_name="backend_land_job"))
    assert row.run_id == land.dagster_run.run_id


def test_the_landing_begins_at_admission_and_the_runs_step_reports_it(
    env: Env, live_defs_state: object, monkeypatch: object
) -> None:
    """The CLI begins the landing when its run is admitted; the run's land step takes it over
    (it never lands a second time) and reports it as its own."""
    import pytest

    from medblocks_pipelines.defs.backend import assets

    assert isinstance(monkeypatch, pytest.MonkeyPatch)

    def second_landing(*_a: object, **_k: object) -> None:
        raise AssertionError("the land step landed again instead of taking the CLI's landing")

    monkeypatch.setattr(assets, "land_export", second_landing)
    env.add_org(ORG, org_config={"types": ["Patient", "Condition"]})
    assert "status success" in _sync()
    (row,) = env.cp.list_bulk_exports(tenant_id=TENANT)
    record = _kickoff_run(dg.DagsterInstance.get(), "backend_sync_job")
    assert row.status == "completed" and row.run_id == record.dagster_run.run_id
    (pull,) = [p for p in env.cp.list_pulls(tenant_id=TENANT) if p.run_id == row.run_id]
    assert pull.status == "success"
    mats = dg.DagsterInstance.get().fetch_materializations(
        dg.AssetKey(["backend", "bulk_resources"]), limit=1
    )
    md = mats.records[0].asset_materialization.metadata  # type: ignore[union-attr]
    assert md["landed"].value == row.counts["landed"] > 0
    assert md["landed"].value == sum(n for t, n in pull.counts.items() if not t.startswith("_"))


def test_a_failed_landing_fails_the_run_and_the_command(
    env: Env, live_defs_state: object, monkeypatch: object
) -> None:
    import pytest

    from medblocks_pipelines.cli import main
    from medblocks_pipelines.lib.errors import ProtocolError
    from medblocks_pipelines.lib.fhir import bulk_land

    assert isinstance(monkeypatch, pytest.MonkeyPatch)

    def broken(*_a: object, **_k: object) -> None:
        raise ProtocolError("files answered 500 three times")

    monkeypatch.setattr(bulk_land, "land_export", broken)
    env.add_org(ORG, org_config={"types": ["Patient"]})
    out = CliRunner().invoke(main, ["sync", "backend", "--tenant", TENANT, "--org", ORG])
    assert out.exit_code != 0
    record = _kickoff_run(dg.DagsterInstance.get(), "backend_sync_job")
    assert record.dagster_run.status == dg.DagsterRunStatus.FAILURE
    (row,) = env.cp.list_bulk_exports(tenant_id=TENANT)
    assert row.status != "completed"  # nothing recorded as landed; the next sync lands it
