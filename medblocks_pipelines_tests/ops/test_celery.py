"""Scale-out: the platform's jobs through Celery workers on RabbitMQ, Dagster on PostgreSQL.

A ``dagster-celery`` worker runs as a separate process; the test process launches
``ndjson_import_job`` for two organizations and ``tenant_warehouse_job`` with the Celery executor on a
PostgreSQL-backed Dagster instance (control plane on PostgreSQL too), then checks the warehouse
equals the one the in-process executor builds from the same files.

Skips locally when RabbitMQ or PostgreSQL is unreachable; fails in CI (``CI=true``).
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
import yaml

from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import get_settings
from medblocks_pipelines.lib.warehouse.build import warehouse_path
from medblocks_pipelines_tests.conftest import fresh_pg_database
from medblocks_pipelines_tests.ops import celery_jobs

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(150)]
REPO = Path(__file__).resolve().parents[2]
ORGS = ("org-a", "org-b")


def _require(what: str, ok: bool) -> None:
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI but not reachable")
    pytest.skip(f"{what} is not reachable on 127.0.0.1")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _write_export(folder: Path, org: str, n: int) -> None:
    """A small Bulk Data export on disk: patients, observations and one bad line."""
    folder.mkdir(parents=True)
    with (folder / "Patient.ndjson").open("w") as fh:
        for i in range(n):
            fh.write(
                json.dumps(
                    {
                        "resourceType": "Patient",
                        "id": f"{org}-p{i}",
                        "name": [{"family": f"F{i}"}],
                        "gender": "female",
                        "birthDate": f"19{50 + i % 40}-01-0{1 + i % 9}",
                    }
                )
                + "\n"
            )
    with (folder / "Observation.ndjson").open("w") as fh:
        for i in range(n * 2):
            fh.write(
                '{"resourceType":"Observation","id":"%s-o%d","status":"final","code":{"coding":'
                '[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":'
                '"Patient/%s-p%d"},"effectiveDateTime":"2026-01-01","valueQuantity":'
                '{"value":7%d.10,"unit":"/min"}}\n' % (org, i, org, i % n, i % 10)
            )
        fh.write("{not json\n")


def _register(database_url: str | None, data_dir: Path) -> None:
    env = {"MEDBLOCKS_DATA_DIR": str(data_dir)}
    old = {k: os.environ.get(k) for k in ("MEDBLOCKS_DATA_DIR", "MEDBLOCKS_DATABASE_URL")}
    try:
        os.environ.update(env)
        if database_url:
            os.environ["MEDBLOCKS_DATABASE_URL"] = database_url
        else:
            os.environ.pop("MEDBLOCKS_DATABASE_URL", None)
        cp = open_control_plane(get_settings())
        cp.add_tenant("acme", "Acme")
        cp.add_source("mercy", "Mercy", "epic", "ehr", None, ["backend"])
        for org in ORGS:
            cp.add_organization(org, "acme", "mercy", org)
        cp.engine.dispose()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_config(exports: Path, org: str) -> dict[str, Any]:
    return {"ops": {"backend__ndjson_import": {"config": {"path": str(exports / org)}}}}


def _snapshot(path: Path) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT resource_key, content_hash, resource, tenant, pattern, source, organization "
            "FROM resources ORDER BY resource_key"
        ).fetchall()
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema='main'"
            ).fetchall()
        ]
        counts = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0] for t in tables}
    finally:
        con.close()
    return rows, counts


@pytest.fixture
def worker_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """PostgreSQL for Dagster and the control plane, a Dagster home, a unique Celery queue."""
    _require("RabbitMQ (5672)", _port_open(5672))
    _require("PostgreSQL (5432)", _port_open(5432))
    with (
        fresh_pg_database("celery_dagster", control_plane=False) as dagster_url,
        fresh_pg_database("celery_cp") as cp_url,
    ):
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(
            yaml.safe_dump(
                {
                    "storage": {"postgres": {"postgres_url": dagster_url}},
                    "telemetry": {"enabled": False},
                }
            )
        )
        queue = f"medblocks-test-{secrets.token_hex(4)}"
        (tmp_path / "celery.yaml").write_text(
            yaml.safe_dump(
                {
                    "execution": {
                        "config": {
                            **celery_jobs.celery_config(),
                            "config_source": {"task_default_queue": queue},
                        }
                    }
                }
            )
        )
        env = dict(os.environ)
        env.update(
            DAGSTER_HOME=str(home),
            MEDBLOCKS_DATA_DIR=str(tmp_path / "celery_data"),
            MEDBLOCKS_DATABASE_URL=cp_url,
            MEDBLOCKS_CELERY_QUEUE=queue,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            # dagster-celery starts the `celery` command found on PATH.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        yield env


def test_celery_workers_build_the_same_warehouse(
    tmp_path: Path, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    exports = tmp_path / "exports"
    for org, n in zip(ORGS, (15, 10), strict=True):
        _write_export(exports / org, org, n)

    # 1. In-process baseline (SQLite control plane, ephemeral instance).
    base_dir = tmp_path / "inproc_data"
    _register(None, base_dir)
    platform = PlatformResource(data_dir=str(base_dir))
    defs = celery_jobs.definitions(executor=dg.in_process_executor)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("backend_orgs", [f"acme.{o}" for o in ORGS])
    instance.add_dynamic_partitions("tenants", ["acme"])
    for org in ORGS:
        res = defs.resolve_job_def("ndjson_import_job").execute_in_process(
            run_config=_import_config(exports, org),
            partition_key=f"acme.{org}",
            instance=instance,
            resources={"platform": platform},
        )
        assert res.success
    assert (
        defs.resolve_job_def("tenant_warehouse_job")
        .execute_in_process(
            partition_key="acme", instance=instance, resources={"platform": platform}
        )
        .success
    )
    expected = _snapshot(warehouse_path(platform.settings, "acme"))

    # 2. The same through a Celery worker process, Dagster and the control plane on PostgreSQL.
    celery_dir = Path(worker_env["MEDBLOCKS_DATA_DIR"])
    _register(worker_env["MEDBLOCKS_DATABASE_URL"], celery_dir)
    for key in (
        "DAGSTER_HOME",
        "MEDBLOCKS_DATA_DIR",
        "MEDBLOCKS_DATABASE_URL",
        "MEDBLOCKS_CELERY_QUEUE",
    ):
        monkeypatch.setenv(key, worker_env[key])
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-celery"),
            "worker",
            "start",
            "-A",
            "dagster_celery.app",
            "-y",
            str(tmp_path / "celery.yaml"),
            "-q",
            worker_env["MEDBLOCKS_CELERY_QUEUE"],
            "-n",
            "medblocks-test",
            "--loglevel",
            "INFO",
            "--",
            "--concurrency=2",
        ],
        env=worker_env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output: list[str] = []
    threading.Thread(target=_pump, args=(worker, output), daemon=True).start()
    try:
        _wait_ready(worker, output)
        started = time.monotonic()
        with dg.DagsterInstance.from_config(worker_env["DAGSTER_HOME"]) as pg_instance:
            pg_instance.add_dynamic_partitions("backend_orgs", [f"acme.{o}" for o in ORGS])
            pg_instance.add_dynamic_partitions("tenants", ["acme"])
            runs = []
            for org in ORGS:
                with dg.execute_job(
                    dg.reconstructable(celery_jobs.celery_import_job),
                    instance=pg_instance,
                    run_config=_import_config(exports, org),
                    tags={"dagster/partition": f"acme.{org}", "medblocks/tenant": "acme"},
                ) as result:
                    assert result.success, _why(result, output)
                    runs.append(result.run_id)
            with dg.execute_job(
                dg.reconstructable(celery_jobs.celery_warehouse_job),
                instance=pg_instance,
                tags={"dagster/partition": "acme", "medblocks/tenant": "acme"},
            ) as result:
                assert result.success, _why(result, output)
                runs.append(result.run_id)
            # Every step ran in the worker process, not here.
            for run_id in runs:
                engine = [
                    e.message
                    for e in pg_instance.all_logs(run_id)
                    if e.message and "in celery worker" in e.message
                ]
                assert engine, f"run {run_id} has no step executed by a celery worker"
        elapsed = time.monotonic() - started
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=5)

    got = _snapshot(warehouse_path(get_settings(str(celery_dir)), "acme"))
    assert got[0] == expected[0]  # the same resources, byte for byte
    assert got[1] == expected[1]  # every table the same size
    assert expected[1]["resources"] == 15 + 30 + 10 + 20
    assert expected[1]["quarantine"] == 2
    print(f"celery: 3 runs in {elapsed:.1f}s")


def _why(result: Any, output: list[str]) -> str:
    errors = [
        str(e.event_specific_data.error.message)[:800]
        for e in result.all_events
        if e.is_failure and getattr(e.event_specific_data, "error", None) is not None
    ]
    return "\n".join(errors) + "\n--- worker ---\n" + "".join(output[-30:])


def _pump(worker: subprocess.Popen[bytes], output: list[str]) -> None:
    assert worker.stdout is not None
    for line in iter(worker.stdout.readline, b""):
        output.append(line.decode(errors="replace"))


def _wait_ready(worker: subprocess.Popen[bytes], output: list[str], timeout: float = 60) -> None:
    # A task sent to a queue nobody consumes would wait forever: start only once it listens.
    deadline = time.monotonic() + timeout
    while not any(" ready." in line for line in output):
        if worker.poll() is not None:
            pytest.fail("celery worker exited: " + "".join(output[-40:]))
        if time.monotonic() > deadline:
            pytest.fail("celery worker not ready in time: " + "".join(output[-40:]))
        time.sleep(0.2)
