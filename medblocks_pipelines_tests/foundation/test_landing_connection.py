"""One landing database per writer (lib/warehouse/lake.py ``_landing_connection``): a writer lands
all its files through one in-memory DuckDB instead of opening one per file, and no file sees
another's state. Behaviour, not timing."""

import gzip
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance


def _obs(i: int, status: str = "final") -> str:
    return (
        '{"resourceType":"Observation","id":"o%d","meta":{"versionId":"1"},'
        '"status":"%s","code":{"text":"pulse"}}' % (i, status)
    )


@pytest.fixture()
def opened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """Every DuckDB database opened in the test; temporary folders go under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    real = duckdb.connect
    cons: list[Any] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        con = real(*args, **kwargs)
        cons.append(con)
        return con

    monkeypatch.setattr(duckdb, "connect", counting)
    return cons


def _writer(tmp_path: Path) -> LakeWriter:
    return LakeWriter(tmp_path / "lake", Provenance("acme", "backend", "s", None, None, "r1"))


def _landed(tmp_path: Path) -> list[tuple[str, str]]:
    return (
        duckdb.connect()
        .execute(
            "SELECT resource_id, json_extract_string(resource, '$.status') FROM read_parquet(?) "
            "ORDER BY resource_id, 2",
            [str(tmp_path / "lake" / "resources" / "**" / "*.parquet")],
        )
        .fetchall()
    )


def test_files_of_one_writer_share_a_database_and_none_of_their_state(
    tmp_path: Path, opened: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of ~2 KB: each file lands in several chunks, with the `seen` table of chunk keys.
    monkeypatch.setenv("MEDBLOCKS_LANDING_CHUNK_BYTES", "2000")
    first = tmp_path / "a.ndjson"
    first.write_text("".join(_obs(i) + "\n" for i in range(60)))
    # The same keys with other content in the next file: a conflict only across files, which
    # the warehouse reports (version_conflicts); within this file each key is new. A `seen`
    # table left over from the first file would quarantine all 60.
    second = tmp_path / "b.ndjson"
    second.write_text("".join(_obs(i, "amended") + "\n" for i in range(60)))
    third = tmp_path / "c.ndjson"
    third.write_text(_obs(100) + "\n")
    with _writer(tmp_path) as w:
        for path in (first, second, third):
            w.add_ndjson_file(path, origin=path.name, expected_type="Observation")
        assert len(opened) == 1  # one database for the three files
    assert w.stats.quarantined == 0
    assert w.stats.counts_by_type["Observation"] == 121
    rows = _landed(tmp_path)
    assert len(rows) == 121
    assert ("o7", "amended") in rows and ("o7", "final") in rows
    # close() closed it and removed its scratch folder (chunk files included).
    with pytest.raises(duckdb.ConnectionException):
        opened[0].execute("SELECT 1")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_file_duckdb_refuses_gets_the_line_by_line_pass_and_the_next_a_new_database(
    tmp_path: Path, opened: list[Any]
) -> None:
    # A gzip stream that ends early: DuckDB refuses the whole file, the line-by-line pass lands
    # what decompresses and quarantines the cut.
    data = "".join(_obs(i) + "\n" for i in range(1000, 3000)).encode()
    whole = gzip.compress(data, compresslevel=1)
    bad = tmp_path / "bad.ndjson.gz"
    bad.write_bytes(whole[: len(whole) // 2])
    good = tmp_path / "good.ndjson"
    good.write_text(_obs(2) + "\n" + _obs(3) + "\n")
    with _writer(tmp_path) as w:
        w.add_ndjson_file(bad, origin="bad", expected_type="Observation")
        assert len(opened) == 1
        w.add_ndjson_file(good, origin="good", expected_type="Observation")
        w.add_ndjson_file(good, origin="good-again", expected_type="Observation")
        # The refused statement retired the first database; the two good files shared the next.
        assert len(opened) == 2
    assert w.stats.quarantined == 1
    ids = [r[0] for r in _landed(tmp_path)]
    assert ids.count("o2") == 2 and ids.count("o3") == 2
    assert 0 < len(ids) - 4 < 2000  # the part of the cut file before the cut
    assert list((tmp_path / "tmp").iterdir()) == []
