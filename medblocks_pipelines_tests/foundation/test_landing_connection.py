"""A lake writer keeps one DuckDB connection for every file it lands on the fast path (opening
one per file cost as much as landing a small file): nothing of one file's landing may reach the
next file's, a failed file gets the next one a fresh connection, and closing the writer removes
its scratch folder. Behaviour, not timing."""

import gzip
from pathlib import Path

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance


def _obs(i: int, version: int = 1, status: str = "final") -> str:
    return (
        '{"resourceType":"Observation","id":"o%d","meta":{"versionId":"%d"},'
        '"status":"%s","code":{"text":"pulse"}}' % (i, version, status)
    )


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _landed(lake: Path) -> list[tuple[str, str]]:
    return duckdb.sql(
        "SELECT resource_id, origin FROM read_parquet(?) ORDER BY origin, resource_id",
        params=[str(lake / "resources" / "**" / "*.parquet")],
    ).fetchall()


def _writer(tmp_path: Path) -> LakeWriter:
    return LakeWriter(tmp_path / "lake", Provenance("acme", "backend", "s", None, None, "r1"))


def test_files_share_one_connection_and_leave_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks: each file lands in several, with the cross-chunk table ("seen") of
    # conflicting duplicates; the second file must start without the first one's keys.
    monkeypatch.setenv("MEDBLOCKS_LANDING_CHUNK_BYTES", str(1 << 20))
    first = _write(tmp_path / "a.ndjson", [_obs(i) for i in range(30_000)])
    # The same ids and versions with other content: conflicts only if "seen" leaked.
    second = _write(tmp_path / "b.ndjson", [_obs(i, status="amended") for i in range(30_000)])
    w = _writer(tmp_path)
    with w:
        w.add_ndjson_file(first, origin="a", expected_type="Observation")
        con = w._landing[0] if w._landing else None
        scratch = w._landing[1] if w._landing else None
        assert con is not None and scratch is not None and scratch.is_dir()
        w.add_ndjson_file(second, origin="b", expected_type="Observation")
        assert w._landing is not None and w._landing[0] is con  # reused, not reopened
        tables = con.execute("SELECT table_name FROM duckdb_tables()").fetchall()
        assert tables == []  # rows and seen are dropped after each file
        assert list(scratch.iterdir()) == []  # each file's chunks are removed
    assert w.stats.quarantined == 0
    assert w.stats.counts_by_type["Observation"] == 60_000
    origins = [o.split("#")[0] for _, o in _landed(tmp_path / "lake")]
    assert origins.count("a") == origins.count("b") == 30_000
    assert not scratch.exists()  # close() removed the scratch folder
    assert w._landing is None


def test_a_failed_statement_gets_the_next_file_a_fresh_connection(tmp_path: Path) -> None:
    # A gzip stream cut in half: DuckDB's read fails (the file then lands line by line).
    whole = gzip.compress(("\n".join(_obs(i) for i in range(200)) + "\n").encode())
    bad = tmp_path / "bad.ndjson.gz"
    bad.write_bytes(whole[: len(whole) // 2])
    good = _write(tmp_path / "good.ndjson", [_obs(i) for i in range(10, 20)])
    w = _writer(tmp_path)
    with w:
        w.add_ndjson_file(good, origin="g1", expected_type="Observation")
        assert w._landing is not None
        con = w._landing[0]
        # The connection a statement failed on is not trusted with the next file.
        w.add_ndjson_file(bad, origin="bad", expected_type="Observation")
        bad_landed = w.stats.counts_by_type["Observation"] - 10
        assert bad_landed > 0 and w.stats.quarantined == 1  # the cut tail
        w.add_ndjson_file(good, origin="g2", expected_type="Observation")
        assert w._landing is not None and w._landing[0] is not con
        with pytest.raises(duckdb.ConnectionException):
            con.execute("SELECT 1")  # the old one was closed
    assert w.stats.counts_by_type["Observation"] == 20 + bad_landed
    got = _landed(tmp_path / "lake")
    assert [o.split("#")[0].split(":")[0] for _, o in got].count("g2") == 10


def test_an_error_mid_file_closes_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _write(tmp_path / "good.ndjson", [_obs(i) for i in range(5)])
    w = _writer(tmp_path)
    with w:
        w.add_ndjson_file(good, origin="g1", expected_type="Observation")
        assert w._landing is not None
        con, scratch = w._landing[0], w._landing[1]

        def boom(*_: object, **__: object) -> None:
            raise RuntimeError("disk full")

        monkeypatch.setattr(w, "_copy_fast", boom)
        with pytest.raises(RuntimeError):
            w.add_ndjson_file(good, origin="g2", expected_type="Observation")
        assert w._landing is None and not scratch.exists()
        with pytest.raises(duckdb.ConnectionException):
            con.execute("SELECT 1")
        monkeypatch.undo()
        w.add_ndjson_file(good, origin="g3", expected_type="Observation")  # a fresh one
    origins = {o.split("#")[0] for _, o in _landed(tmp_path / "lake")}
    assert origins == {"g1", "g3"}


def test_an_unclosed_writer_leaves_no_scratch_folder(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.ndjson", [_obs(i) for i in range(5)])
    w = _writer(tmp_path)
    w.add_ndjson_file(good, origin="g", expected_type="Observation")
    assert w._landing is not None
    scratch = w._landing[1]
    assert scratch.is_dir()
    del w
    import gc

    gc.collect()
    assert not scratch.exists()
