"""The warehouse build copies current rows into ``resources`` a batch of lake files at a time (so
its memory does not grow with the lake): batches of any size give the warehouse one batch gives,
with the same resource in many files, newer versions, tombstones and conflicting contents."""

from collections.abc import Sequence

import pytest

from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse import build
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

TABLES = ("resources", "resource_versions", "tombstones", "version_conflicts", "resource_sightings")


def _obs(i: int, version: int, value: str) -> str:
    return (
        '{"resourceType":"Observation","id":"o%d","meta":{"versionId":"%d",'
        '"lastUpdated":"2026-01-%02dT00:00:00Z"},"status":"final","code":{"text":"pulse"},'
        '"valueQuantity":{"value":%s}}' % (i, version, version, value)
    )


def _land(settings: Settings) -> None:
    """Six runs from two sources, each its own lake files; ids recur across the files."""
    for run in range(6):
        source = "mercy-ehr" if run % 2 else "county-ehr"
        prov = Provenance("acme", "backend", source, "mercy", None, f"r{run}")
        with LakeWriter(settings.lake_root, prov) as w:
            for i in range(40):
                if (i + run) % 3 == 0:
                    continue  # each id in two of a source's three runs
                # Version grows with the run for odd ids, stays for even ones (the same content
                # fetched again), and o5's content changes under one versionId (a conflict).
                version = 1 + run // 2 if i % 2 and i != 5 else 1
                value = f"{run}.5" if i == 5 else "7.10"
                w.add(_obs(i, version, value))
            w.add(f'{{"resourceType":"Patient","id":"p{run}"}}')
            if run == 4:
                w.add_tombstone("Observation", "o2", deleted_at="2026-02-01T00:00:00Z")
                w.add_tombstone("Patient", "p0", deleted_at="2026-02-01T00:00:00Z")


def _snapshot(settings: Settings) -> dict[str, list[tuple]]:
    with open_warehouse("acme", settings=settings) as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}


def test_batches_of_lake_files_build_the_same_warehouse(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _land(settings)
    files = list((settings.lake_root).rglob("*.parquet"))
    assert len(files) >= 6
    seen: list[int] = []
    split = build._file_batches

    def counting(per_file: Sequence[tuple[int, str, int]], rows: int) -> list:
        batches = split(per_file, rows)
        seen.append(len(batches))
        return batches

    monkeypatch.setattr(build, "_file_batches", counting)
    # compact=False: compaction would merge the small files into one, leaving nothing to batch.
    monkeypatch.setattr(build, "RESOURCES_BATCH_ROWS", 10**9)
    build_warehouse("acme", settings=settings, steps=[], options={"compact": False})
    whole = _snapshot(settings)
    monkeypatch.setattr(build, "RESOURCES_BATCH_ROWS", 1)
    build_warehouse("acme", settings=settings, steps=[], options={"compact": False})
    assert seen[0] == 1 and seen[1] > 3  # one batch, then one per lake file with current rows
    assert _snapshot(settings) == whole
    resources = whole["resources"]
    assert len(resources) == len({r[0] for r in resources}) == 2 * 40 + 6 - 2  # o2, p0 deleted
    assert [r[0] for r in whole["version_conflicts"]] == [
        "county-ehr/Observation/o5",
        "mercy-ehr/Observation/o5",
    ]


def test_file_batches_are_consecutive_and_bounded() -> None:
    files = [(1, "a", 3), (2, "b", 1), (3, "c", 9), (4, "d", 2), (5, "e", 2)]
    batches = build._file_batches(files, 4)
    assert [[f for f, _, _ in b] for b in batches] == [[1, 2], [3], [4, 5]]
    assert build._file_batches([], 4) == []
