"""Crash recovery without a human: ``kill -9`` real ``medblocks`` CLI processes at a few points
(a sync whose run just started, a sync while its pull lands, a warehouse build while its file is
half-built); the next CLI runs recover on their own and the warehouse equals a clean run's. Also:
pool slots of dead runs are freed, download folders of dead runs removed, and ``medblocks
doctor`` shows what ``--repair`` then clears."""

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings, get_settings
from medblocks_pipelines.lib.warehouse.build import open_warehouse, table_counts

from .cli_procs import ORG, SOURCE, TENANT, dagster_home, ndjson_folder, seed, start_cli, wait_for

PATIENTS = 20_000


def _kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], Any], desc: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (it must not have ended before)."""
    try:
        wait_for(lambda: ready() or proc.poll() is not None, timeout=180, desc=desc)
        assert proc.poll() is None, f"the process ended before {desc}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _run_cli(*args: str, log: Path) -> None:
    proc = start_cli(*args, log=log)
    assert proc.wait(300) == 0, log.read_text()[-3000:]


def _fingerprint(settings: Settings) -> dict[str, Any]:
    """Row counts of every table and a hash of the resources (stable columns only)."""
    with open_warehouse(TENANT, settings=settings) as con:
        counts = table_counts(con)
        digest = con.execute(
            "SELECT count(*), sum(hash(resource_key || content_hash)) FROM resources"
        ).fetchone()
    return {"counts": counts, "resources": digest}


def _clean_run(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The same import and build in a fresh data folder, nothing killed (in-process)."""
    from medblocks_pipelines.defs.shared.import_assets import ndjson_import
    from medblocks_pipelines.defs.shared.resources import PlatformResource
    from medblocks_pipelines.defs.warehouse.assets import tenant_warehouse

    monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(tmp_path / "clean"))
    settings = get_settings()
    settings.ensure_dirs()
    seed(settings)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("backend_orgs", [f"{TENANT}.{ORG}"])
        instance.add_dynamic_partitions("tenants", [TENANT])
        for asset, key, config in (
            (ndjson_import, f"{TENANT}.{ORG}", {"path": str(folder)}),
            (tenant_warehouse, TENANT, None),
        ):
            run_config = {"ops": {"backend__ndjson_import": {"config": config}}} if config else {}
            assert dg.materialize(
                [asset],
                partition_key=key,
                instance=instance,
                resources={"platform": PlatformResource()},
                run_config=run_config,
            ).success
    return _fingerprint(settings)


@pytest.mark.slow
def test_kill_9_syncs_and_a_build_then_the_next_runs_recover_alone(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home(tmp_path)))
    seed(settings)
    folder = ndjson_folder(tmp_path / "in", PATIENTS)
    sync = ("sync", "import-ndjson", "--tenant", TENANT, "--org", ORG, "--path", str(folder))
    build = ("warehouse", "build", "--tenant", TENANT)
    cp = open_control_plane(settings)
    with dg.DagsterInstance.get() as instance:

        def started() -> list[dg.DagsterRun]:
            return list(instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])))

        # 1. a sync killed as soon as its run has started: the run looks STARTED forever
        _kill_when(start_cli(*sync, log=tmp_path / "k1.log"), started, "the run started")
        (first,) = [r.run_id for r in started()]
        # 2. the next sync recovers it on start; killed in turn while its pull lands
        proc = start_cli(*sync, log=tmp_path / "k2.log")
        _kill_when(proc, cp.running_pulls, "a pull running")
        (second,) = [r.run_id for r in started()]
        assert second != first
        assert [p.run_id for p in cp.running_pulls()] == [second]
        # 3. the next sync completes with no manual step, recovering the second
        _run_cli(*sync, log=tmp_path / "sync.log")
        for run_id in (first, second):
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
        assert cp.running_pulls() == []
        failed = [p for p in cp.list_pulls() if p.run_id in (first, second)]
        assert failed and all(p.status == "failed" for p in failed)
        assert all("process is gone" in (p.error or "") for p in failed)
        # 4. a build killed while its file is half-built, then a build that completes
        half_built = lambda: list(settings.warehouse_dir.glob(".acme.*.building.duckdb"))  # noqa: E731
        _kill_when(start_cli(*build, log=tmp_path / "k3.log"), half_built, "a half-built file")
        assert half_built()
        _run_cli(*build, log=tmp_path / "build.log")
        assert half_built() == []
        assert started() == []
    cp.engine.dispose()
    crashed = _fingerprint(settings)
    clean = _clean_run(tmp_path, folder, monkeypatch)
    # pull_history records every attempt, the killed ones as failed: the only expected difference
    assert crashed["counts"].pop("pull_history") > clean["counts"].pop("pull_history")
    assert crashed == clean


@dg.op
def _noop() -> None:
    return None


@dg.job
def _placeholder_job() -> None:
    _noop()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def _run(instance: dg.DagsterInstance, tags: dict[str, str]) -> str:
    run = instance.create_run_for_job(
        _placeholder_job,
        run_id=str(uuid.uuid4()),
        tags={
            "medblocks/tenant": TENANT,
            "medblocks/source": SOURCE,
            "medblocks/launched_by": "cli",
            **tags,
        },
        status=dg.DagsterRunStatus.STARTED,
    )
    return run.run_id


def _doctor(*args: str, log: Path) -> str:
    _run_cli("doctor", *args, log=log)
    return log.read_text()


@pytest.mark.slow
def test_doctor_shows_then_repairs_slots_pulls_and_files_of_a_dead_run(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medblocks_pipelines.cli.runtime import process_tags
    from medblocks_pipelines.lib.runs.process import this_host

    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home(tmp_path)))
    seed(settings)
    cp = open_control_plane(settings)
    # a start time no live process has: a reused pid does not make the dead run look alive
    dead_tags = {"medblocks/host": this_host(), "medblocks/pid": str(_dead_pid())}
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("tenant_pool", 1)
        dead = _run(instance, {**dead_tags, "medblocks/pid_start": "1"})
        live = _run(instance, process_tags())  # this test process: alive, left alone
        assert storage.claim_concurrency_slot("tenant_pool", dead, "step").is_claimed
        assert not storage.claim_concurrency_slot("tenant_pool", live, "step").is_claimed
        pull = cp.start_pull(tenant_id=TENANT, pattern="backend", source_id=SOURCE, run_id=dead)
        export = cp.save_bulk_export(
            tenant_id=TENANT, source_id=SOURCE, polling_url="http://x/poll", request={}
        )
        cp.update_bulk_export(export, status="downloading", run_id=dead)
        work = settings.data_dir / "bulk_work" / "exp1"
        for run_id in (dead, live):
            (work / run_id[:12]).mkdir(parents=True)
            (work / run_id[:12] / "batch-00001.ndjson").write_text("{}\n")
        settings.warehouse_dir.mkdir(parents=True, exist_ok=True)
        half = settings.warehouse_dir / f".{TENANT}.deadbeef.building.duckdb"
        half.write_bytes(b"x")

        shown = _doctor(log=tmp_path / "doctor.log")
        for text in (dead, "tenant_pool", str(pull), export, dead[:12], half.name, "--repair"):
            assert text in shown, shown
        assert live not in shown
        run = instance.get_run_by_id(dead)
        assert run is not None and run.status == dg.DagsterRunStatus.STARTED  # only shown

        _doctor("--repair", log=tmp_path / "repair.log")
        run = instance.get_run_by_id(dead)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
        live_run = instance.get_run_by_id(live)
        assert live_run is not None and live_run.status == dg.DagsterRunStatus.STARTED
        # the slot the dead run held is free: the live run gets it
        assert storage.claim_concurrency_slot("tenant_pool", live, "step").is_claimed
        (row,) = [p for p in cp.list_pulls() if p.id == pull]
        assert row.status == "failed" and "process is gone" in row.error
        exp = cp.get_bulk_export(export)  # the next land run takes it again
        assert exp.status == "ready" and "process is gone" in exp.error
        assert not (work / dead[:12]).exists() and (work / live[:12]).exists()
        assert not half.exists()
        assert "nothing to repair" in _doctor(log=tmp_path / "again.log")
        instance.report_run_canceled(live_run)
    cp.engine.dispose()


def test_recovery_sensor_recovers_a_dead_run(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medblocks_pipelines.defs.shared.resources import PlatformResource
    from medblocks_pipelines.defs.shared.sensors import dead_run_recovery_sensor
    from medblocks_pipelines.lib.runs.process import this_host

    seed(settings)
    with dg.instance_for_test() as instance:
        tags = {"medblocks/host": this_host(), "medblocks/pid": str(_dead_pid())}
        dead = _run(instance, {**tags, "medblocks/pid_start": "1"})
        ctx = dg.build_sensor_context(instance=instance, resources={"platform": PlatformResource()})
        first = dead_run_recovery_sensor(ctx)
        assert isinstance(first, dg.SkipReason) and dead[:8] in (first.skip_message or "")
        run = instance.get_run_by_id(dead)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
        again = dead_run_recovery_sensor(
            dg.build_sensor_context(instance=instance, resources={"platform": PlatformResource()})
        )
        assert (
            isinstance(again, dg.SkipReason) and again.skip_message == "no run left anything behind"
        )


@pytest.mark.parametrize(
    ("host", "beat_age", "dead"),
    [
        ("other-host", 3600, True),  # no heartbeat for an hour: its process is gone
        ("other-host", 5, False),  # a fresh heartbeat: alive, whatever this host sees
        ("this", 3600, False),  # this host sees its pid alive: that wins over an old heartbeat
    ],
)
def test_runs_of_another_host_are_dead_once_their_heartbeat_is_stale(
    host: str, beat_age: int, dead: bool
) -> None:
    import time

    from medblocks_pipelines.cli.runtime import process_tags
    from medblocks_pipelines.defs.shared.run_recovery import dead_runs

    tags = process_tags()  # this process: alive
    if host != "this":
        tags["medblocks/host"] = host
    tags["medblocks/heartbeat"] = str(int(time.time()) - beat_age)
    with dg.instance_for_test() as instance:
        run_id = _run(instance, tags)
        assert [r.run_id for r in dead_runs(instance)] == ([run_id] if dead else [])
