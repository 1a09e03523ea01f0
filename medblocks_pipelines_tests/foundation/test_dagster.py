"""Dagster: the definitions load, their keys match the snapshot, the registry sensor keeps dynamic
partitions in step, and an import + warehouse build materializes end to end on a SQLite instance and on
a PostgreSQL instance (dagster-postgres)."""

import json
import os
from pathlib import Path

import dagster as dg
import pytest

from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.sensors import registry_partitions_sensor
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import open_warehouse

SNAPSHOT = Path(__file__).parent / "definitions_snapshot.json"


def _defs() -> dg.Definitions:
    from medblocks_pipelines.cli.runtime import load_definitions

    return load_definitions()


def _snapshot_of(defs: dg.Definitions) -> dict[str, list[str]]:
    repo = defs.get_repository_def()
    return {
        "assets": sorted(k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()),
        "asset_checks": sorted(
            f"{k.asset_key.to_user_string()}:{k.name}" for k in repo.asset_graph.asset_check_keys
        ),
        "jobs": sorted(j.name for j in repo.get_all_jobs() if not j.name.startswith("__")),
        "schedules": sorted(s.name for s in repo.schedule_defs),
        "sensors": sorted(s.name for s in repo.sensor_defs),
        "lineage": sorted(
            f"{parent.to_user_string()} -> {node.key.to_user_string()}"
            for node in repo.asset_graph.asset_nodes
            for parent in node.parent_keys
        ),
    }


def test_definitions_load_and_match_snapshot() -> None:
    defs = _defs()
    dg.Definitions.validate_loadable(defs)
    snap = _snapshot_of(defs)
    if os.environ.get("UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(snap, indent=2) + "\n")
    assert snap == json.loads(SNAPSHOT.read_text()), (
        "definitions changed: review, then run with UPDATE_SNAPSHOT=1"
    )


def test_every_asset_is_documented_and_owned() -> None:
    repo = _defs().get_repository_def()
    for node in repo.asset_graph.asset_nodes:
        key = node.key
        if not node.is_materializable:
            continue
        assert node.description, f"{key.to_user_string()} has no description"
        assert node.group_name and node.group_name != "default", key.to_user_string()
        assert node.owners, f"{key.to_user_string()} has no owner"
        assert node.kinds, f"{key.to_user_string()} has no kinds"


def _seed(settings: Settings) -> None:
    cp = open_control_plane(settings)
    cp.add_tenant("acme", "Acme")
    cp.add_source("mercy-ehr", "Mercy", "epic", "ehr", "http://x", ["backend"])
    cp.add_organization("mercy", "acme", "mercy-ehr", "Mercy General")


def test_registry_sensor_adds_and_removes_partitions(settings: Settings) -> None:
    _seed(settings)
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"platform": PlatformResource()})
        result = registry_partitions_sensor(ctx)
        requests = {
            r.partitions_def_name: r.partition_keys for r in result.dynamic_partitions_requests
        }
        assert requests["tenants"] == ["acme"]
        assert requests["backend_orgs"] == ["acme.mercy"]
        for req in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        again = registry_partitions_sensor(
            dg.build_sensor_context(instance=instance, resources={"platform": PlatformResource()})
        )
        assert not again.dynamic_partitions_requests  # nothing to do: cheap tick
        instance.add_dynamic_partitions("backend_orgs", ["acme.gone"])
        third = registry_partitions_sensor(
            dg.build_sensor_context(instance=instance, resources={"platform": PlatformResource()})
        )
        deletes = [
            r
            for r in third.dynamic_partitions_requests
            if isinstance(r, dg.DeleteDynamicPartitionsRequest)
        ]
        assert deletes and deletes[0].partition_keys == ["acme.gone"]


def _import_then_build(instance: dg.DagsterInstance, settings: Settings, folder: Path) -> None:
    from medblocks_pipelines.defs.shared.import_assets import ndjson_import
    from medblocks_pipelines.defs.warehouse.assets import tenant_warehouse

    instance.add_dynamic_partitions("backend_orgs", ["acme.mercy"])
    instance.add_dynamic_partitions("tenants", ["acme"])
    res = dg.materialize(
        [ndjson_import],
        partition_key="acme.mercy",
        instance=instance,
        resources={"platform": PlatformResource()},
        run_config={"ops": {"backend__ndjson_import": {"config": {"path": str(folder)}}}},
    )
    assert res.success
    (mat,) = res.asset_materializations_for_node("backend__ndjson_import")
    assert mat.metadata["landed"].value == 3
    assert mat.metadata["quarantined"].value == 1
    res = dg.materialize(
        [tenant_warehouse],
        partition_key="acme",
        instance=instance,
        resources={"platform": PlatformResource()},
    )
    assert res.success
    with open_warehouse("acme", settings=settings) as con:
        assert con.execute("SELECT count(*) FROM resources").fetchone()[0] == 3
        assert con.execute("SELECT count(*) FROM pull_history").fetchone()[0] == 1


def _ndjson_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "Patient.ndjson").write_text(
        "\n".join(json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(3))
        + "\n{broken\n"
    )
    return folder


def test_import_and_build_on_sqlite_instance(settings: Settings, tmp_path: Path) -> None:
    _seed(settings)
    with dg.instance_for_test() as instance:
        _import_then_build(instance, settings, _ndjson_folder(tmp_path))


@pytest.mark.postgres
def test_import_and_build_on_postgres_instance(
    settings: Settings, tmp_path: Path, pg_dagster_url: str
) -> None:
    """The production instance shape: dagster-postgres storage (scheme postgresql+psycopg2)."""
    _seed(settings)
    db = pg_dagster_url.rsplit("/", 1)[1]
    overrides = {
        "storage": {
            "postgres": {
                "postgres_db": {
                    "username": "postgres",
                    "password": "",
                    "hostname": "127.0.0.1",
                    "db_name": db,
                    "port": 5432,
                    "scheme": "postgresql+psycopg2",
                }
            }
        }
    }
    with dg.instance_for_test(overrides=overrides) as instance:
        assert "Postgres" in type(instance.run_storage).__name__
        _import_then_build(instance, settings, _ndjson_folder(tmp_path))
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.is_success for r in runs)


@pytest.mark.postgres
def test_production_dagster_yaml_runs_on_postgres(
    settings: Settings, tmp_path: Path, pg_dagster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committed deploy/dagster.yaml is a working instance config (env-var credentials)."""
    import shutil

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(Path(__file__).parents[2] / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_PG_USERNAME", "postgres")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "")
    monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_DB", pg_dagster_url.rsplit("/", 1)[1])
    _seed(settings)
    with dg.DagsterInstance.get() as instance:
        assert "Postgres" in type(instance.event_log_storage).__name__
        _import_then_build(instance, settings, _ndjson_folder(tmp_path))
