"""Big NDJSON files land through the DuckDB fast path under a tiny memory limit: split into
chunks (lib/warehouse/ndjson_chunks.py), exact counts, conflicting duplicates found across
chunks, record numbers and line numbers file-wide. Behaviour, not timing."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse import ndjson_chunks
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

N = 300_000


def _line(i: int, version: int = 1, status: str = "final") -> str:
    return (
        '{"resourceType":"Observation","id":"o%d","meta":{"versionId":"%d"},'
        '"status":"%s","code":{"text":"pulse"}}' % (i, version, status)
    )


def _write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, compresslevel=1))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture()
def tiny_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # A whole file of N lines does not fit in one DuckDB pass under this limit.
    monkeypatch.setattr(ndjson_chunks, "LANDING_MEMORY_LIMIT", "64MB")
    monkeypatch.delenv("MEDBLOCKS_LANDING_CHUNK_BYTES", raising=False)


def _land(tmp_path: Path, path: Path) -> tuple[LakeWriter, list[tuple[str, str]]]:
    with LakeWriter(tmp_path / "lake", Provenance("acme", "backend", "s", None, None, "r1")) as w:
        w.add_ndjson_file(path, origin="f", expected_type="Observation")
    con = duckdb.connect()
    origins = con.execute(
        "SELECT resource_id, origin FROM read_parquet(?) ORDER BY resource_id",
        [str(tmp_path / "lake" / "resources" / "**" / "*.parquet")],
    ).fetchall()
    return w, origins


def _lines_with_conflicts() -> list[str]:
    lines = [_line(i) for i in range(N)]
    lines.append(_line(5, status="amended"))  # conflicts with line 6, many chunks earlier
    lines.append(_line(7))  # an identical repeat: lands (the warehouse deduplicates)
    lines.append(_line(N - 1, status="amended"))  # conflicts within the last chunk
    return lines


LAND = """
import json, sys
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
with LakeWriter(sys.argv[1], Provenance("acme", "backend", "s", None, None, "r1")) as w:
    w.add_ndjson_file(sys.argv[2], origin="f", expected_type="Observation")
print(json.dumps(w.stats.as_metadata()))
"""


def test_big_file_lands_under_a_tiny_memory_limit(tmp_path: Path) -> None:
    # In a child process: the limit is read from the environment at import, as in production.
    path = _write(tmp_path / "Observation.ndjson", _lines_with_conflicts())
    env = {**os.environ, "MEDBLOCKS_LANDING_MEMORY_LIMIT": "64MB"}
    env.pop("MEDBLOCKS_LANDING_CHUNK_BYTES", None)
    lake = tmp_path / "lake"
    out = subprocess.run(
        [sys.executable, "-c", LAND, str(lake), str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    md = json.loads(out.stdout.strip().splitlines()[-1])
    assert md["by_type"] == {"Observation": N + 1}
    assert md["quarantined"] == 2
    assert md["quarantine_reasons"] == {"conflicting_duplicate": 2}
    rows = (
        duckdb.connect()
        .execute(
            "SELECT resource_id, origin FROM read_parquet(?) ORDER BY resource_id",
            [str(lake / "resources" / "**" / "*.parquet")],
        )
        .fetchall()
    )
    assert len(rows) == N + 1
    assert len({rid for rid, _ in rows}) == N
    # Every row took the fast path (record numbers, '#'), numbered file-wide.
    assert all("#" in origin for _, origin in rows)
    assert ("o7", "f#8") in rows and ("o7", f"f#{N + 2}") in rows
    assert ("o123456", "f#123457") in rows
    q = duckdb.connect().execute(
        "SELECT origin FROM read_parquet(?) ORDER BY origin",
        [str(tmp_path / "lake" / "quarantine" / "**" / "*.parquet")],
    )
    assert [o for (o,) in q.fetchall()] == [f"f#{N + 1}", f"f#{N + 3}"]


def test_big_gzip_file_lands_in_chunks(tmp_path: Path, tiny_memory: None) -> None:
    path = _write(tmp_path / "Observation.ndjson", _lines_with_conflicts(), gz=True)
    w, rows = _land(tmp_path, path)
    assert w.stats.counts_by_type == {"Observation": N + 1}
    assert w.stats.quarantine_reasons == {"conflicting_duplicate": 2}
    assert all("#" in origin for _, origin in rows)


def test_truncated_big_gzip_lands_line_by_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDBLOCKS_LANDING_CHUNK_BYTES", str(1 << 20))
    whole = _write(tmp_path / "Observation.ndjson", [_line(i) for i in range(50_000)], gz=True)
    data = whole.read_bytes()
    whole.write_bytes(data[: len(data) * 3 // 4])  # a download cut short
    assert whole.stat().st_size > (1 << 20) // 16  # big enough to be split
    w, rows = _land(tmp_path, whole)
    landed = w.stats.counts_by_type["Observation"]
    assert 0 < landed < 50_000
    assert w.stats.quarantine_reasons["truncated_gzip"] == 1
    # Line by line: line numbers, and every landed id is one of the file's first lines.
    assert all(":" in origin for _, origin in rows)
    assert {rid for rid, _ in rows} == {f"o{i}" for i in range(landed)}


def test_split_keeps_every_line_once(tmp_path: Path) -> None:
    lines = [_line(i) for i in range(20_000)]
    path = _write(tmp_path / "x.ndjson", lines)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    chunks = ndjson_chunks.split(path, scratch, 100_000)
    assert chunks is not None and len(chunks) > 5
    got: list[str] = []
    for c in chunks:
        assert c.first_line == len(got)
        got += c.path.read_text().splitlines()
    assert got == lines


def test_memory_limit_parsing() -> None:
    assert ndjson_chunks.memory_limit_bytes("512MB") == 512 * 10**6
    assert ndjson_chunks.memory_limit_bytes("1GiB") == 1 << 30
    assert ndjson_chunks.memory_limit_bytes("64 MB") == 64 * 10**6
    assert ndjson_chunks.memory_limit_bytes("lots") == 512 * 10**6
