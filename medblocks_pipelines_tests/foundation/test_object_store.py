"""The lake and the warehouses in object storage (moto in server mode on loopback).

Two "machines" are two data folders with the same lake and warehouse URLs: each lands its own
organization, either one builds, and the other reads the published warehouse. The warehouse built
from the object-store lake must equal the one built from a local lake holding the same records.
"""

import dataclasses
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from medblocks_pipelines.lib.errors import LandingError, StorageError, WarehouseError
from medblocks_pipelines.lib.settings import Settings, get_settings
from medblocks_pipelines.lib.warehouse.build import (
    build_warehouse,
    open_warehouse,
    tenant_build_lock,
    warehouse_path,
)
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance, delete_connection_data
from medblocks_sandbox.generator import PopulationSpec, generate_population

TENANT = "acme"


@pytest.fixture(scope="module")
def population() -> Any:
    return generate_population(PopulationSpec(seed=3, persons=6))


def _machine(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, bucket: str) -> Settings:
    monkeypatch.setenv("MEDBLOCKS_LAKE_ROOT", f"s3://{bucket}/lake")
    monkeypatch.setenv("MEDBLOCKS_WAREHOUSE_DIR", f"s3://{bucket}/warehouses/")
    monkeypatch.delenv("MEDBLOCKS_DATABASE_URL", raising=False)
    settings = get_settings(tmp_path / name)
    settings.ensure_dirs()
    return settings


def _local_twin(tmp_path: Path) -> Settings:
    root = (tmp_path / "local").resolve()
    settings = Settings(root, f"sqlite:///{root / 'control.db'}", root / "lake", root / "warehouse")
    settings.ensure_dirs()
    return settings


def _land(
    lake: str | Path, population: Any, org_id: str, run: str, connection: str | None = None
) -> None:
    prov = Provenance(TENANT, "backend", f"{org_id}-ehr", org_id, connection, run)
    with LakeWriter(lake, prov) as writer:
        for resource in population.resources_for(org_id):
            writer.add(json.dumps(resource))
        writer.add("{not json")  # one bad line: quarantined, never dropped


def _keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _content(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    with open_warehouse(TENANT, settings=settings) as con:
        return {
            "resources": con.execute(
                "SELECT resource_key, content_hash, organization, resource FROM resources ORDER BY ALL"
            ).fetchall(),
            "quarantine": con.execute(
                "SELECT source, reason FROM quarantine ORDER BY ALL"
            ).fetchall(),
            "tables": con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
                "ORDER BY ALL"
            ).fetchall(),
            "facts": con.execute(
                "SELECT count(*), count(DISTINCT person_id) FROM facts"
            ).fetchall(),
        }


def test_settings_take_object_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBLOCKS_LAKE_ROOT", "s3://bucket/lake/")
    monkeypatch.setenv("MEDBLOCKS_WAREHOUSE_DIR", "file:///srv/warehouses")
    settings = get_settings(tmp_path)
    assert settings.lake_url == "s3://bucket/lake" and settings.lake == "s3://bucket/lake"
    assert settings.lake_root == tmp_path.resolve() / "lake-mirror"
    assert settings.warehouse_url is None and settings.warehouse_dir == Path("/srv/warehouses")


def test_lake_writer_puts_whole_files_in_the_bucket(
    tmp_path: Path, s3_bucket: tuple[str, Any], population: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, client = s3_bucket
    settings = _machine(tmp_path, "a", monkeypatch, bucket)
    org = population.organizations[0].id
    prov = Provenance(TENANT, "backend", f"{org}-ehr", org, None, "run-1")
    ndjson = tmp_path / "Observation.ndjson"
    observations = [r for r in population.resources_for(org) if r["resourceType"] == "Observation"]
    ndjson.write_text("\n".join(json.dumps(r) for r in observations) + "\n")
    with LakeWriter(settings.lake, prov) as writer:
        staging = writer.root
        writer.add(json.dumps(population.resources_for(org)[0]))
        writer.add_ndjson_file(ndjson)  # the DuckDB fast path stages and uploads too
        writer.add_tombstone("Observation", "gone-1", deleted_at="2026-01-01T00:00:00Z")
        writer.add('{"resourceType": "Patient"}')
    stats = writer.stats
    keys = _keys(client, bucket)
    assert keys and all(k.startswith("lake/") and k.endswith(".parquet") for k in keys)
    assert len(keys) == stats.files
    assert not staging.exists()  # the private staging folder is gone
    assert not any(settings.lake_root.rglob("*"))  # nothing lands locally
    rows = 0
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        table = pq.read_table(io.BytesIO(body))
        if key.startswith("lake/resources/"):
            assert f"tenant={TENANT}/" in key
            rows += table.num_rows
        else:
            assert key.startswith("lake/quarantine/") and table.column("reason")[0].as_py() == (
                "missing id"
            )
    assert rows == stats.landed + stats.tombstones == 1 + len(observations) + 1


def test_two_machines_share_one_lake_and_the_published_warehouse(
    tmp_path: Path, s3_bucket: tuple[str, Any], population: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, client = s3_bucket
    a = _machine(tmp_path, "a", monkeypatch, bucket)
    b = _machine(tmp_path, "b", monkeypatch, bucket)
    local = _local_twin(tmp_path)
    org1, org2 = (o.id for o in population.organizations[:2])
    _land(a.lake, population, org1, "run-a")
    _land(b.lake, population, org2, "run-b")
    _land(local.lake, population, org1, "run-a")
    _land(local.lake, population, org2, "run-b")

    built = build_warehouse(TENANT, settings=b)
    lake_files = [k for k in _keys(client, bucket, "lake/") if k.endswith(".parquet")]
    assert built.storage["mirror_files"] == len(lake_files)
    assert built.storage["mirror_downloaded"] == len(lake_files)  # writers do not fill the mirror
    assert _keys(client, bucket, "warehouses/") == [f"warehouses/{TENANT}.duckdb"]
    assert built.storage["published_bytes"] == warehouse_path(b, TENANT).stat().st_size

    # Machine A never built: it reads the published copy, equal to B's and to a local-lake build.
    assert not warehouse_path(a, TENANT).exists()
    build_warehouse(TENANT, settings=local)
    remote_a = _content(a)
    assert remote_a == _content(b) == _content(local)
    orgs = {row[2] for row in remote_a["resources"]}
    assert orgs == {org1, org2} and len(remote_a["quarantine"]) == 2
    with open_warehouse(TENANT, settings=a) as con:
        (prefix_ok,) = con.execute(
            "SELECT bool_and(starts_with(lake_file, ?)) FROM resource_versions",
            [f"s3://{bucket}/lake/"],
        ).fetchone()  # type: ignore[misc]
    assert prefix_ok  # pointers name the lake, not one machine's mirror

    # A lands a new version and builds: its mirror fetches only what it lacks; B then sees it.
    patient = next(r for r in population.resources_for(org1) if r["resourceType"] == "Patient")
    changed = {**patient, "meta": {"versionId": "99", "lastUpdated": "2030-01-01T00:00:00Z"}}
    with LakeWriter(
        a.lake, Provenance(TENANT, "backend", f"{org1}-ehr", org1, None, "run-a2")
    ) as w:
        w.add(json.dumps(changed))
    again = build_warehouse(TENANT, settings=a)
    assert again.storage["mirror_files"] == len(lake_files) + 1
    assert again.storage["mirror_downloaded"] == len(lake_files) + 1  # A's first build
    third = build_warehouse(TENANT, settings=a)
    assert third.storage["mirror_downloaded"] == 0 and third.storage["mirror_removed"] == 0
    with open_warehouse(TENANT, settings=b) as con:
        (version,) = con.execute(
            "SELECT version_id FROM resources WHERE resource_type = 'Patient' AND resource_id = ? "
            "AND organization = ?",
            [patient["id"], org1],
        ).fetchone()  # type: ignore[misc]
    assert version == "99"


def test_consent_deletion_rewrites_the_remote_lake(
    tmp_path: Path, s3_bucket: tuple[str, Any], population: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, client = s3_bucket
    settings = _machine(tmp_path, "a", monkeypatch, bucket)
    org1, org2 = (o.id for o in population.organizations[:2])
    _land(settings.lake, population, org1, "run-1", connection="conn-1")
    _land(settings.lake, population, org2, "run-2", connection="conn-2")
    before = build_warehouse(TENANT, settings=settings).table_counts["resources"]
    expected_gone = len(population.resources_for(org1))

    removed = delete_connection_data(settings.lake, TENANT, "conn-1")
    assert removed == expected_gone
    after = build_warehouse(TENANT, settings=settings)
    assert after.storage["mirror_removed"] > 0  # the mirror drops what the store no longer has
    assert after.table_counts["resources"] == before - expected_gone
    with open_warehouse(TENANT, settings=settings) as con:
        assert con.execute("SELECT DISTINCT connection FROM resources").fetchall() == [("conn-2",)]
    assert delete_connection_data(settings.lake, TENANT, "conn-1") == 0  # idempotent


def test_store_failures_are_one_clear_error_and_readers_keep_their_copy(
    tmp_path: Path, s3_bucket: tuple[str, Any], population: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, client = s3_bucket
    settings = _machine(tmp_path, "a", monkeypatch, bucket)
    org = population.organizations[0].id

    nowhere = dataclasses.replace(settings, lake_url=f"s3://no-such-bucket-{bucket}/lake")
    with pytest.raises(LandingError, match="cannot upload lake file"):
        _land(nowhere.lake, population, org, "run-x")

    with pytest.raises(WarehouseError, match="no warehouse for tenant"):
        open_warehouse(TENANT, settings=settings)  # nothing published, nothing local

    _land(settings.lake, population, org, "run-1")
    build_warehouse(TENANT, settings=settings)
    gone = dataclasses.replace(settings, warehouse_url=f"s3://no-such-bucket-{bucket}/w")
    with open_warehouse(TENANT, settings=gone) as con:  # store unreadable: the local copy serves
        assert con.execute("SELECT count(*) FROM resources").fetchall()[0][0] > 0
    # A wrong lake URL never publishes an empty warehouse over the good one.
    published = _keys(client, bucket, "warehouses/")
    wrong = dataclasses.replace(settings, lake_url=f"s3://no-such-bucket-{bucket}/lake")
    with pytest.raises(StorageError, match="does not exist or is not readable"):
        build_warehouse(TENANT, settings=wrong)
    assert _keys(client, bucket, "warehouses/") == published
    with open_warehouse(TENANT, settings=settings) as con:
        assert con.execute("SELECT count(*) FROM resources").fetchall()[0][0] > 0


def test_build_lock_spans_machines_on_postgres(
    tmp_path: Path, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two machines (separate warehouse folders, so no shared file lock) building one tenant
    take turns through PostgreSQL; another tenant is not held up."""
    a, b = (
        Settings(tmp_path / n, pg_database_url, tmp_path / n / "lake", tmp_path / n / "wh")
        for n in ("a", "b")
    )
    order: list[str] = []
    a_holds = threading.Event()
    release_a = threading.Event()

    def first() -> None:
        with tenant_build_lock(a, TENANT):
            order.append("a-in")
            a_holds.set()
            release_a.wait(10)
            order.append("a-out")

    def second() -> None:
        with tenant_build_lock(b, TENANT):
            order.append("b-in")

    t1 = threading.Thread(target=first)
    t1.start()
    assert a_holds.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    with tenant_build_lock(b, "other-tenant"):
        order.append("other")
    time.sleep(0.3)
    assert "b-in" not in order  # still waiting on machine A
    release_a.set()
    t1.join(10)
    t2.join(10)
    assert order == ["a-in", "other", "a-out", "b-in"]


def test_local_lake_pointers_are_unchanged(tmp_path: Path, population: Any) -> None:
    local = _local_twin(tmp_path)
    _land(local.lake, population, population.organizations[0].id, "run-1")
    build_warehouse(TENANT, settings=local, steps=[])
    con = duckdb.connect(str(warehouse_path(local, TENANT)), read_only=True)
    try:
        (ok,) = con.execute(
            "SELECT bool_and(starts_with(lake_file, ?)) FROM resource_versions",
            [str(local.lake_root)],
        ).fetchone()  # type: ignore[misc]
    finally:
        con.close()
    assert ok


def test_cds_index_follows_the_published_warehouse(
    tmp_path: Path, s3_bucket: tuple[str, Any], population: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CDS server on machine A answers from what machine B publishes, without blocking
    requests on the download."""
    from medblocks_pipelines.lib.cds.index import TenantIndex
    from medblocks_pipelines.lib.warehouse.build import refresh_published

    bucket, _client = s3_bucket
    a = _machine(tmp_path, "a", monkeypatch, bucket)
    b = _machine(tmp_path, "b", monkeypatch, bucket)
    orgs = [o.id for o in population.organizations]
    _land(b.lake, population, orgs[0], "run-1")
    build_warehouse(TENANT, settings=b)
    index = TenantIndex(
        warehouse_path(a, TENANT), refresh=lambda: refresh_published(a, TENANT), refresh_interval=0
    )
    first = index.current()  # nothing local yet: the first refresh and load are synchronous
    assert first is not None and first.persons > 0

    for org in orgs[1:]:
        _land(b.lake, population, org, "run-2")
    build_warehouse(TENANT, settings=b)
    deadline = time.monotonic() + 20
    snap = first
    while snap is first and time.monotonic() < deadline:
        time.sleep(0.2)
        index._last_check = -1e9  # do not wait out the 1 s file check between polls
        snap = index.current()
    assert snap is not first and snap is not None
    # every organization's patients now, not just the first one's
    assert len(snap.patient_person) > len(first.patient_person)
