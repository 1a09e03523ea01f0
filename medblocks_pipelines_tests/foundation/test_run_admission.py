"""The instance's run limits hold for CLI runs: two concurrent ``medblocks sync import-ndjson``
of one source with a per-source limit of 1 run one after the other (real subprocesses, one
SQLite instance), and neither starts while another in-progress run of that source holds the slot."""

import uuid
from functools import partial
from pathlib import Path

import dagster as dg
import pytest

from medblocks_pipelines.cli.runtime import process_tags
from medblocks_pipelines.lib.settings import Settings

from .cli_procs import SOURCE, TENANT, dagster_home, ndjson_folder, seed, start_cli, wait_for


def _says_waiting(log: Path) -> bool:
    return "waiting for a run slot" in log.read_text()


@dg.op
def _noop() -> None:
    return None


@dg.job
def _placeholder_job() -> None:
    _noop()


@pytest.mark.slow
def test_two_cli_syncs_of_one_source_run_one_after_the_other(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = dagster_home(tmp_path, source_limit=1)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    seed(settings)
    with dg.DagsterInstance.get() as instance:
        _run_two_syncs(instance, tmp_path)


def _run_two_syncs(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    # A run of the source already in progress (this test process, alive): the slot is taken.
    holder = instance.create_run_for_job(
        _placeholder_job,
        run_id=str(uuid.uuid4()),
        tags={"medblocks/source": SOURCE, **process_tags()},
        status=dg.DagsterRunStatus.STARTED,
    )
    folders = [ndjson_folder(tmp_path / f"in{i}", 200, start=i * 1000) for i in range(2)]
    logs = [tmp_path / f"cli{i}.log" for i in range(2)]
    procs = [
        start_cli("sync", "import-ndjson", "--tenant", TENANT, "--org", "mercy",
                  "--path", str(folder), log=log)
        for folder, log in zip(folders, logs, strict=True)
    ]  # fmt: skip
    try:
        for log in logs:  # both wait for the slot, none starts a run
            wait_for(partial(_says_waiting, log), desc=str(log))
        runs = instance.get_runs(dg.RunsFilter(job_name="ndjson_import_job"))
        assert runs == []
        instance.report_run_canceled(holder)  # the slot frees up
        codes = [p.wait(300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    records = instance.get_run_records(dg.RunsFilter(job_name="ndjson_import_job"))
    assert len(records) == 2
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
    assert all(r.dagster_run.tags["medblocks/source"] == SOURCE for r in records)
    first, second = sorted(records, key=lambda r: r.start_time or 0)
    # One after the other: the second started only once the first had ended.
    assert first.end_time is not None and second.start_time is not None
    assert second.start_time >= first.end_time
