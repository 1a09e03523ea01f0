"""``kill -9`` of a real ``medblocks sync backend`` process while it downloads an export; the next
sync completes with no manual step: the dead run is failed, its pull closed as failed, the export
taken again, and its download folder removed."""

import os
import signal
from pathlib import Path

import dagster as dg
import pytest

from medblocks_pipelines.cli.runtime import EMBEDDED_DAGSTER_YAML
from medblocks_pipelines_tests.foundation.cli_procs import start_cli, wait_for

from .conftest import TENANT, Env

FILES = r"/bulk-files/"


@pytest.mark.slow
def test_sync_backend_killed_while_downloading_then_the_next_sync_recovers(
    env: Env, tmp_path: Path
) -> None:
    ehr = env.add_org("mercy-general")
    (Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml").write_text(EMBEDDED_DAGSTER_YAML)
    ehr.faults.add("latency", path=FILES, seconds=2.0)  # downloads take a while: time to kill
    args = ("sync", "backend", "--tenant", TENANT, "--org", "mercy-general")
    work = env.settings.data_dir / "bulk_work"
    proc = start_cli(*args, log=tmp_path / "killed.log")
    try:
        wait_for(
            lambda: proc.poll() is not None or any(work.glob("*/*")),
            timeout=240,
            desc="the download folder",
        )
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    (folder,) = work.glob("*/*")
    (export,) = env.cp.list_bulk_exports(status="downloading")
    (pull,) = env.cp.running_pulls()
    ehr.faults.clear()

    again = start_cli(*args, log=tmp_path / "next.log")
    assert again.wait(300) == 0, (tmp_path / "next.log").read_text()[-3000:]
    assert "status success" in (tmp_path / "next.log").read_text()
    assert not folder.exists() and list(work.glob("*/*")) == []
    assert env.cp.get_bulk_export(export.id).status == "completed"  # the same export
    pulls = {p.id: p for p in env.cp.list_pulls(tenant_id=TENANT)}
    assert pulls[pull.id].status == "failed"
    assert "process is gone" in pulls[pull.id].error
    assert sorted(p.status for p in pulls.values()) == ["failed", "success"]
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_by_id(pull.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
