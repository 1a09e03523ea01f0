"""Lake compaction: many small pull files become one per folder, and the warehouse built after it
holds exactly what it held before (only the internal lake pointers differ)."""

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse import compaction
from medblocks_pipelines.lib.warehouse.build import build_warehouse, warehouse_path
from medblocks_pipelines.lib.warehouse.compaction import compact_tenant
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

TENANT = "acme"


def _patient(i: int, version: int = 1) -> str:
    return json.dumps(
        {
            "resourceType": "Patient",
            "id": f"p{i}",
            "meta": {"versionId": str(version), "lastUpdated": f"2026-01-0{version}T00:00:00Z"},
            "gender": "female",
        }
    )


def _pulls(lake: str | Path, n: int) -> None:
    """``n`` patient-access pulls of one connection each: one small file per pull and type,
    with a re-fetch of the same content, a new version, a tombstone and a bad line now and then."""
    for i in range(n):
        prov = Provenance(TENANT, "patient_access", "mercy", "mercy", f"conn-{i}", f"run-{i}")
        with LakeWriter(lake, prov) as w:
            w.add(_patient(i))
            w.add(_patient(i // 2))  # re-fetches identical content: dedup across files
            if i % 5 == 0:
                w.add(_patient(i, version=2))
            if i % 7 == 0:
                w.add_tombstone("Patient", f"p{i + 1}", deleted_at="2026-01-09T00:00:00Z")
            if i % 4 == 0:
                w.add("{broken", origin=f"page-{i}")


def _content(path: Path) -> dict[str, Any]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {
            "resources": con.execute(
                "SELECT resource_key, version_id, content_hash, resource, connection, run_id, "
                "fetched_at FROM resources ORDER BY ALL"
            ).fetchall(),
            "versions": con.execute(
                "SELECT * EXCLUDE (lake_file, lake_row) FROM resource_versions ORDER BY ALL"
            ).fetchall(),
            "tombstones": con.execute("SELECT * FROM tombstones ORDER BY ALL").fetchall(),
            "sightings": con.execute("SELECT * FROM resource_sightings ORDER BY ALL").fetchall(),
            "quarantine": con.execute("SELECT * FROM quarantine ORDER BY ALL").fetchall(),
        }
    finally:
        con.close()


def _files(settings: Settings) -> list[Path]:
    return sorted(settings.lake_root.rglob("*.parquet"))


def test_compaction_keeps_the_warehouse_identical(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compaction, "MIN_SMALL_FILES", 8)
    settings.ensure_dirs()
    _pulls(settings.lake, 40)
    before_files = _files(settings)
    reference = build_warehouse(
        TENANT, settings=settings, steps=[], options={"compact": False}
    ).table_counts
    expected = _content(warehouse_path(settings, TENANT))
    assert expected["tombstones"] and expected["quarantine"] and len(before_files) >= 40

    result = build_warehouse(TENANT, settings=settings, steps=[])
    after_files = _files(settings)
    # One Patient folder and one quarantine folder, each now a single file.
    assert len(after_files) == 2 and all(f.name.startswith("c-") for f in after_files)
    assert result.storage["compacted_folders"] == 2
    assert result.storage["compacted_files_in"] == len(before_files)
    assert result.table_counts == reference
    assert _content(warehouse_path(settings, TENANT)) == expected

    # Nothing left to do: a further build compacts nothing and changes nothing.
    again = build_warehouse(TENANT, settings=settings, steps=[])
    assert "compacted_folders" not in again.storage and _files(settings) == after_files
    assert _content(warehouse_path(settings, TENANT)) == expected


def test_compaction_killed_before_removing_originals_loses_and_duplicates_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.ensure_dirs()
    _pulls(settings.lake, 40)
    build_warehouse(TENANT, settings=settings, steps=[], options={"compact": False})
    expected = _content(warehouse_path(settings, TENANT))
    monkeypatch.setattr(compaction, "MIN_SMALL_FILES", 8)

    import fsspec.implementations.local as local_fs

    real_rm = local_fs.LocalFileSystem.rm_file

    def killed(self: Any, path: str) -> None:
        raise OSError("killed")

    monkeypatch.setattr(local_fs.LocalFileSystem, "rm_file", killed)
    with pytest.raises(Exception, match="cannot compact"):
        compact_tenant(settings.lake, TENANT)
    monkeypatch.setattr(local_fs.LocalFileSystem, "rm_file", real_rm)
    # The combined copy and every original are there: the build sees each row once.
    assert any(f.name.startswith("c-") for f in _files(settings))
    build_warehouse(TENANT, settings=settings, steps=[], options={"compact": False})
    assert _content(warehouse_path(settings, TENANT)) == expected
    # The next compaction folds the leftovers in, still without changing the warehouse.
    build_warehouse(TENANT, settings=settings, steps=[])
    assert len(_files(settings)) == 2
    assert _content(warehouse_path(settings, TENANT)) == expected


def test_large_files_and_quiet_folders_are_left_alone(settings: Settings) -> None:
    settings.ensure_dirs()
    _pulls(settings.lake, 5)
    before = _files(settings)
    stats = compact_tenant(settings.lake, TENANT)
    assert stats.folders == 0 and _files(settings) == before
    stats = compact_tenant(settings.lake, TENANT, min_files=2, small_bytes=10)  # nothing is small
    assert stats.folders == 0 and _files(settings) == before
    stats = compact_tenant(settings.lake, TENANT, min_files=2)
    assert stats.folders == 2 and stats.files_in == len(before) and stats.rows > 0


def test_compaction_in_object_storage(
    tmp_path: Path, s3_bucket: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medblocks_pipelines.lib.settings import get_settings

    bucket, client = s3_bucket
    monkeypatch.setenv("MEDBLOCKS_LAKE_ROOT", f"s3://{bucket}/lake")
    monkeypatch.delenv("MEDBLOCKS_WAREHOUSE_DIR", raising=False)
    settings = get_settings(tmp_path / "m")
    settings.ensure_dirs()
    _pulls(settings.lake, 12)
    build_warehouse(TENANT, settings=settings, steps=[], options={"compact": False})
    expected = _content(warehouse_path(settings, TENANT))
    stats = compact_tenant(settings.lake, TENANT, min_files=3)
    assert stats.folders == 2
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 2 and all(k.rsplit("/", 1)[1].startswith("c-") for k in keys)
    result = build_warehouse(TENANT, settings=settings, steps=[], options={"compact": False})
    assert result.storage["mirror_removed"] > 0 and result.storage["mirror_downloaded"] == 2
    assert _content(warehouse_path(settings, TENANT)) == expected


def test_a_big_backlog_is_compacted_in_bounded_groups(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.ensure_dirs()
    _pulls(settings.lake, 40)
    build_warehouse(TENANT, settings=settings, steps=[], options={"compact": False})
    expected = _content(warehouse_path(settings, TENANT))
    patient_files = [f for f in _files(settings) if "resource_type=Patient" in str(f)]
    sizes = sorted(f.stat().st_size for f in patient_files)
    # Room for about ten files per combined file: the 40 Patient files become four or five.
    monkeypatch.setattr(compaction, "MAX_GROUP_BYTES", sizes[-1] * 10)
    stats = compact_tenant(settings.lake, TENANT, min_files=8)
    combined = [f for f in _files(settings) if "resource_type=Patient" in str(f)]
    assert 4 <= len(combined) <= 5 and all(f.name.startswith("c-") for f in combined)
    assert stats.folders == 2 and stats.files_out == len(combined) + 1  # + the quarantine folder
    build_warehouse(TENANT, settings=settings, steps=[], options={"compact": False})
    assert _content(warehouse_path(settings, TENANT)) == expected
