"""The CDS index's facts shared between serving processes (lib/warehouse/shared_facts.py): the first
load of a publish writes them to a mapped file beside the warehouse, later loads (other workers)
map it without querying, a new publish replaces it, and a folder that cannot hold it changes
nothing but memory. Behaviour, not memory figures (bench_cds_load reports those)."""

import os
from pathlib import Path
from typing import Any

import pytest

from medblocks_pipelines.lib.cds import index as index_mod
from medblocks_pipelines.lib.cds.index import load_snapshot
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import build_warehouse
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
from medblocks_pipelines.lib.warehouse.shared_facts import FOLDER


@pytest.fixture(scope="module")
def population() -> Any:
    from medblocks_sandbox.generator import PopulationSpec, generate_population

    return generate_population(PopulationSpec(seed=5, persons=12))


def _publish(settings: Settings, population: Any, orgs: int) -> Path:
    for org in [o.id for o in population.organizations if o.kind == "ehr"][:orgs]:
        prov = Provenance("acme", "backend", org, org, None, f"run-{org}")
        with LakeWriter(settings.lake_root, prov) as w:
            for res in population.resources_for(org):
                w.add(res)
    return build_warehouse("acme", settings=settings).path


def _shared_files(published: Path) -> list[str]:
    folder = published.parent / FOLDER
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_second_process_maps_the_first_ones_facts_and_a_new_publish_replaces_them(
    settings: Settings, population: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = _publish(settings, population, orgs=1)
    first = load_snapshot(published)
    assert first.facts.height > 0
    files = _shared_files(published)
    assert len(files) == 1 and files[0].startswith("acme.") and files[0].endswith(".arrow")

    # Another worker: the facts come from the file; the facts query is never run.
    def no_query(*_a: Any, **_k: Any) -> str:
        raise AssertionError("the facts were queried again")

    with monkeypatch.context() as m:
        m.setattr(index_mod, "facts_sql", no_query)
        second = load_snapshot(published)
    assert second.facts.equals(first.facts)
    assert second.ranges == first.ranges
    person = next(iter(first.ranges))
    assert second.facts_of(person) == first.facts_of(person)

    # A new publish (more data): a new file, the earlier one removed, the new facts served.
    republished = _publish(settings, population, orgs=2)
    third = load_snapshot(republished)
    assert third.facts.height > first.facts.height
    newer = _shared_files(republished)
    assert len(newer) == 1 and newer != files


def test_facts_stay_in_memory_when_no_file_can_be_shared(
    settings: Settings, population: Any
) -> None:
    published = _publish(settings, population, orgs=1)
    (published.parent / FOLDER).write_text("not a folder")  # mkdir fails: no room for sharing
    snap = load_snapshot(published)
    assert snap.facts.height > 0 and snap.persons > 0


def test_a_damaged_shared_file_is_written_again(settings: Settings, population: Any) -> None:
    published = _publish(settings, population, orgs=1)
    good = load_snapshot(published)
    (name,) = _shared_files(published)
    damaged = published.parent / FOLDER / name
    # Damaged by replacement, never in place: `good` still maps the original file, and a file
    # truncated under a mapping faults its readers (the module docstring says so).
    cut = damaged.with_name("cut")
    cut.write_bytes(damaged.read_bytes()[:100])
    os.replace(cut, damaged)
    again = load_snapshot(published)
    assert again.facts.equals(good.facts)
    assert damaged.stat().st_size > 100  # rewritten whole


def test_workers_loading_together_all_map_the_first_file(tmp_path: Path) -> None:
    import polars as pl

    from medblocks_pipelines.lib.warehouse.shared_facts import share_facts

    path = tmp_path / FOLDER / "acme.1-2-3.x.arrow"
    first = share_facts(path, pl.DataFrame({"person_id": ["p1", "p2"], "n": [1, 2]}))
    inode = path.stat().st_ino
    # A second worker that queried at the same time: its file does not replace the first one.
    second = share_facts(path, pl.DataFrame({"person_id": ["p1", "p2"], "n": [1, 2]}))
    assert path.stat().st_ino == inode
    assert first.equals(second)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_publish_removes_the_facts_of_the_warehouse_it_replaces(
    settings: Settings, population: Any
) -> None:
    # No serving process needs to load the new publish for the old facts (a revoked consent's
    # rows among them, once the lake lost them) to leave the disk.
    published = _publish(settings, population, orgs=1)
    load_snapshot(published)
    assert len(_shared_files(published)) == 1
    _publish(settings, population, orgs=1)
    assert _shared_files(published) == []
