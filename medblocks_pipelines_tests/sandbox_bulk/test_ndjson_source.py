"""Exports over pre-generated NDJSON on disk (NdjsonDirSource): the unfiltered system export
serves the generator's files unchanged by streaming, filtered exports stream line by line with
bounded memory, and gzip files on disk are served either way."""

import gzip
import json
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from medblocks_sandbox.bulk_source import NdjsonDirSource
from medblocks_sandbox.generator.ndjson import stream_bulk_ndjson

from .conftest import BulkEnv


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ndjson")
    stats = stream_bulk_ndjson(out, resources=6000, seed=7)
    return out, stats


def _scan(path: Path, predicate: Callable[[dict[str, Any]], bool]) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip() and predicate(json.loads(line)))


def test_unfiltered_system_export_serves_files_unchanged(
    make_env: Callable[..., BulkEnv], generated: tuple[Path, dict[str, Any]]
) -> None:
    directory, stats = generated
    env = make_env(source=NdjsonDirSource(directory))
    manifest = env.export()
    counts = {o["type"]: o["count"] for o in manifest["output"]}
    assert counts == stats["by_type"]
    assert sum(counts.values()) == 6000
    obs = next(o for o in manifest["output"] if o["type"] == "Observation")
    body = httpx.get(obs["url"], headers={"Accept-Encoding": "identity", **env.auth()}).content
    assert body == (directory / "Observation.ndjson").read_bytes()
    job = env.server.jobs()[0]
    # Nothing was copied into the job's directory.
    assert all(f.path.parent == directory for f in job.files)
    assert not any(job.directory.iterdir())


def test_filtered_export_streams_with_bounded_memory(
    make_env: Callable[..., BulkEnv], generated: tuple[Path, dict[str, Any]]
) -> None:
    directory, _ = generated
    env = make_env(source=NdjsonDirSource(directory), export_seconds=0.0)
    expected = _scan(
        directory / "Observation.ndjson",
        lambda r: any(
            c.get("code") == "laboratory"
            for cat in r.get("category", [])
            for c in cat.get("coding", [])
        ),
    )
    assert expected > 0
    size = (directory / "Observation.ndjson").stat().st_size
    env.export(params={"_type": "Observation", "_typeFilter": "Observation?status=final"})
    tracemalloc.start()  # after a first run, so imports and caches are not counted
    try:
        manifest = env.export(
            params={"_type": "Observation", "_typeFilter": "Observation?category=laboratory"}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(o["count"] for o in manifest["output"]) == expected
    # The source file is several MB; the export never holds more than a fraction of it.
    assert peak < size / 4, (peak, size)


def test_patient_level_export_over_files(
    make_env: Callable[..., BulkEnv], generated: tuple[Path, dict[str, Any]]
) -> None:
    directory, stats = generated
    env = make_env(source=NdjsonDirSource(directory), max_lines_per_file=1000)
    manifest = env.export("/Patient/$export", params={"_type": "Patient,Condition"})
    counts: dict[str, int] = {}
    for item in manifest["output"]:
        counts[item["type"]] = counts.get(item["type"], 0) + item["count"]
        assert item["count"] <= 1000
    assert counts == {
        "Patient": stats["by_type"]["Patient"],
        "Condition": stats["by_type"]["Condition"],
    }


def test_gzip_files_on_disk(make_env: Callable[..., BulkEnv], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"resourceType": "Patient", "id": f"x{n}"}) for n in range(50)]
    with gzip.open(src / "Patient.000.ndjson.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    shutil.copy(src / "Patient.000.ndjson.gz", src / "Patient.001.ndjson.gz")
    env = make_env(source=NdjsonDirSource(src))
    manifest = env.export()
    assert [o["count"] for o in manifest["output"]] == [50, 50]
    url = manifest["output"][0]["url"]
    plain = httpx.get(url, headers={"Accept-Encoding": "identity", **env.auth()})
    assert "content-encoding" not in plain.headers
    assert plain.text.splitlines() == lines
    with httpx.stream("GET", url, headers={"Accept-Encoding": "gzip", **env.auth()}) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        raw = b"".join(zipped.iter_raw())
    assert raw == (src / "Patient.000.ndjson.gz").read_bytes()


def test_mixed_file_is_split_by_type(make_env: Callable[..., BulkEnv], tmp_path: Path) -> None:
    (tmp_path / "everything.ndjson").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"resourceType": "Patient", "id": "a"},
                {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/a"}},
                {"resourceType": "Patient", "id": "b"},
            ]
        )
        + "\n"
    )
    source = NdjsonDirSource(tmp_path)
    assert source.resource_types() == ["Observation", "Patient"]
    assert source.raw_files("Patient") is None
    env = make_env(source=source)
    manifest = env.export()
    assert {o["type"]: o["count"] for o in manifest["output"]} == {"Observation": 1, "Patient": 2}
